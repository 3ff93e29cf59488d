// Generates the protobuf and gRPC code from `proto/` with a vendored protoc, so a
// fresh machine builds without a system protobuf compiler.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let include = protoc_bin_vendored::include_path()?;
    let include = include.to_str().ok_or("non-UTF-8 protoc include path")?;
    let protos = [
        "proto/server/cluster.proto",
        "proto/client/affiliate.proto",
        "proto/storage/storage.proto",
        "proto/api/api.proto",
    ];
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Watch fan-out clones every affiliate once per watcher: make that a refcount.
        .bytes(".sidero.discovery.server")
        .compile_protos(&protos, &["proto", include])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
