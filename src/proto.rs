//! Generated protobuf and gRPC code (see `proto/` and `build.rs`).

/// `sidero.discovery.server`: the discovery service API.
pub mod server {
    tonic::include_proto!("sidero.discovery.server");
}

/// `sidero.discovery.client`: the encrypted affiliate payload.
pub mod client {
    tonic::include_proto!("sidero.discovery.client");
}

/// `sidero.discovery.storage`: the discovery service state snapshot.
pub mod storage {
    tonic::include_proto!("sidero.discovery.storage");
}

/// `kubespan.api.v1`: the daemon's local API (`kubespan get`, `kubespan status`).
pub mod api {
    tonic::include_proto!("kubespan.api.v1");
}
