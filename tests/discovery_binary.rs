//! The real `kubespan discovery-service` process: signals, snapshots, TLS.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubespan::proto::server::cluster_client::ClusterClient;
use kubespan::proto::server::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A server process that is killed if the test fails before stopping it.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary and reads its gRPC address from the start-up log line.
fn spawn(args: &[&str]) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubespan"))
        .arg("discovery-service")
        .args([
            "--addr",
            "127.0.0.1:0",
            "--landing-addr=",
            "--metrics-addr=",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before listening")
            .unwrap();
        if let Some(rest) = line.split("grpc=Some(").nth(1) {
            break rest.split(')').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (proc, addr)
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn wait_exit(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < within,
            "process did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn update(id: &str) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: "cluster".into(),
        affiliate_id: id.into(),
        affiliate_data: Some(b"opaque".to_vec().into()),
        affiliate_endpoints: vec![b"endpoint".to_vec().into()],
        ttl: Some(prost_types::Duration {
            seconds: 1800,
            nanos: 0,
        }),
    }
}

async fn list(c: &mut ClusterClient<Channel>) -> Vec<String> {
    let mut ids: Vec<String> = c
        .list(ListRequest {
            cluster_id: "cluster".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates
        .into_iter()
        .map(|a| a.id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn sigterm_ends_streams_saves_snapshot_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("state.binpb");
    let snap_arg = format!("--snapshot-path={}", snap.display());
    let (mut p, addr) = spawn(&[&snap_arg]);
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.affiliate_update(update("a")).await.unwrap();
    c.affiliate_update(update("b")).await.unwrap();
    let mut w = c
        .watch(WatchRequest {
            cluster_id: "cluster".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(w.message().await.unwrap().unwrap().affiliates.len(), 2);

    sigterm(&p);
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("stream ends promptly");
    assert!(
        matches!(end, Ok(None)),
        "watch ended with status OK: {end:?}"
    );
    let status = wait_exit(&mut p, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    assert!(snap.exists(), "snapshot saved on SIGTERM");

    let (p2, addr) = spawn(&[&snap_arg]);
    let mut c = ClusterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(list(&mut c).await, ["a", "b"], "restart lost no affiliate");
    drop(p2);
}

fn write(path: &Path, s: &str) {
    std::fs::write(path, s).unwrap();
}

#[tokio::test]
async fn serves_tls_when_given_a_certificate_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    write(&cert, &ck.cert.pem());
    write(&key, &ck.signing_key.serialize_pem());
    let (p, addr) = spawn(&[
        "--snapshots-enabled=false",
        &format!("--certificate-path={}", cert.display()),
        &format!("--key-path={}", key.display()),
    ]);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ck.cert.pem()))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connection");
    let mut c = ClusterClient::new(ch);
    c.affiliate_update(update("a")).await.unwrap();
    assert_eq!(list(&mut c).await, ["a"]);
    // Plaintext h2c is refused on a TLS listener.
    let plain = ClusterClient::connect(format!("http://{addr}")).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c
            .list(ListRequest {
                cluster_id: "cluster".into(),
            })
            .await
            .is_err(),
    };
    assert!(refused);
    drop(p);
}

#[test]
fn bad_flags_give_one_line_errors() {
    for (args, want) in [
        (&["--gc-interval", "soon"][..], "invalid duration"),
        (&["--addr", "nowhere"][..], "invalid address"),
        (&["--rate-limit", "-1"][..], "must be a number >= 0"),
        (&["--rate-burst", "0"][..], "--rate-burst"),
        (&["--snapshots-enabled=maybe"][..], "--snapshots-enabled"),
        (&["--certificate-path", "/x"][..], "--key-path"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kubespan"))
            .arg("discovery-service")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn busy_listen_address_is_a_clear_start_up_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_kubespan"))
        .args([
            "discovery-service",
            "--addr",
            &addr,
            "--landing-addr=",
            "--metrics-addr=",
        ])
        .arg("--snapshots-enabled=false")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--addr"), "{err}");
}
