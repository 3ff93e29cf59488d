//! In-process tests: a real discovery server on an ephemeral loopback port, real
//! gRPC clients. Covers the upstream server test scenarios (spec
//! `discovery-protocol.md` §6 items 1–8) and our own guarantees.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use kubespan::discovery::ratelimit::RateConfig;
use kubespan::discovery::server::{self, Config, RunningServer, SnapshotConfig};
use kubespan::discovery::service::ServiceOptions;
use kubespan::proto::server::cluster_client::ClusterClient;
use kubespan::proto::server::*;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn config() -> Config {
    Config {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        landing_addr: None,
        metrics_addr: None,
        gc_interval: Duration::from_secs(1),
        snapshot: None,
        rate: RateConfig {
            rate: 0.0,
            burst: 1,
        },
        ..Config::default()
    }
}

async fn start(cfg: Config) -> (RunningServer, ClusterClient<Channel>) {
    let srv = server::start(cfg).await.expect("server starts");
    let c = client(srv.grpc_addr.unwrap()).await;
    (srv, c)
}

async fn client(addr: SocketAddr) -> ClusterClient<Channel> {
    ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

fn upd(
    cluster: &str,
    id: &str,
    data: Option<&[u8]>,
    eps: &[&[u8]],
    ttl: Option<u64>,
) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: cluster.into(),
        affiliate_id: id.into(),
        affiliate_data: data.map(|d| d.to_vec().into()),
        affiliate_endpoints: eps.iter().map(|e| e.to_vec().into()).collect(),
        ttl: ttl.map(|s| prost_types::Duration {
            seconds: s as i64,
            nanos: 0,
        }),
    }
}

async fn list(c: &mut ClusterClient<Channel>, cluster: &str) -> Vec<Affiliate> {
    let mut a = c
        .list(ListRequest {
            cluster_id: cluster.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates;
    a.sort_by(|x, y| x.id.cmp(&y.id));
    a
}

fn eps(a: &Affiliate) -> Vec<&[u8]> {
    a.endpoints.iter().map(|e| e.as_ref()).collect()
}

async fn next(s: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a watch message within 5 s")
        .expect("stream ok")
        .expect("stream open")
}

async fn watch(c: &mut ClusterClient<Channel>, cluster: &str) -> tonic::Streaming<WatchResponse> {
    c.watch(WatchRequest {
        cluster_id: cluster.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn hello(cluster: &str) -> HelloRequest {
    HelloRequest {
        cluster_id: cluster.into(),
        client_version: "v1.13.0".into(),
    }
}

// §6.1
#[tokio::test]
async fn hello_reports_client_ip_and_proxy_headers_only_when_trusted() {
    let (srv, mut c) = start(config()).await;
    let r = c.hello(hello("c")).await.unwrap().into_inner();
    assert_eq!(r.client_ip.as_ref(), &[127, 0, 0, 1]);
    assert!(r.redirect.is_none());
    // Not trusted by default: a client cannot spoof its address.
    let mut req = Request::new(hello("c"));
    req.metadata_mut()
        .insert("x-real-ip", "1.2.3.4".parse().unwrap());
    assert_eq!(
        c.hello(req).await.unwrap().into_inner().client_ip.as_ref(),
        &[127, 0, 0, 1]
    );
    srv.shutdown().await.unwrap();

    let mut cfg = config();
    cfg.options.trust_proxy_headers = true;
    let (srv, mut c) = start(cfg).await;
    let mut req = Request::new(hello("c"));
    req.metadata_mut()
        .insert("x-real-ip", "1.2.3.4".parse().unwrap());
    assert_eq!(
        c.hello(req).await.unwrap().into_inner().client_ip.as_ref(),
        &[1, 2, 3, 4]
    );
    let mut req = Request::new(hello("c"));
    req.metadata_mut()
        .insert("x-forwarded-for", "5.6.7.8, 9.9.9.9".parse().unwrap());
    assert_eq!(
        c.hello(req).await.unwrap().into_inner().client_ip.as_ref(),
        &[5, 6, 7, 8]
    );
    let mut req = Request::new(hello("c"));
    req.metadata_mut()
        .insert("x-real-ip", "2001:db8::1".parse().unwrap());
    let ip = c.hello(req).await.unwrap().into_inner().client_ip;
    assert_eq!(ip.len(), 16);
    assert_eq!(ip[..4], [0x20, 0x01, 0x0d, 0xb8]);
    srv.shutdown().await.unwrap();
}

// §6.2
#[tokio::test]
async fn hello_without_client_ip_reporting() {
    let mut cfg = config();
    cfg.options.disable_client_ip_reporting = true;
    let (srv, mut c) = start(cfg).await;
    assert!(
        c.hello(hello("c"))
            .await
            .unwrap()
            .into_inner()
            .client_ip
            .is_empty()
    );
    srv.shutdown().await.unwrap();
}

// §6.3
#[tokio::test]
async fn update_merges_endpoints_keeping_order_and_dropping_duplicates() {
    let (srv, mut c) = start(config()).await;
    c.affiliate_update(upd("c", "af1", Some(b"data"), &[b"e1", b"e2"], Some(60)))
        .await
        .unwrap();
    let l = list(&mut c, "c").await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].data.as_ref(), b"data");
    assert_eq!(eps(&l[0]), [&b"e1"[..], b"e2"]);
    c.affiliate_update(upd("c", "af1", None, &[b"e3", b"e2"], Some(60)))
        .await
        .unwrap();
    let l = list(&mut c, "c").await;
    assert_eq!(
        l[0].data.as_ref(),
        b"data",
        "data untouched without affiliate_data"
    );
    assert_eq!(eps(&l[0]), [&b"e1"[..], b"e2", b"e3"]);
    srv.shutdown().await.unwrap();
}

// §6.4
#[tokio::test]
async fn delete_missing_is_fine_and_delete_removes() {
    let (srv, mut c) = start(config()).await;
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "nope".into(),
    })
    .await
    .unwrap();
    c.affiliate_update(upd("c", "af1", Some(b"d"), &[], None))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "c").await.len(), 1);
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "af1".into(),
    })
    .await
    .unwrap();
    assert!(list(&mut c, "c").await.is_empty());
    srv.shutdown().await.unwrap();
}

// §6.5
#[tokio::test]
async fn watch_snapshot_then_updates_then_deletions() {
    let (srv, mut c) = start(config()).await;
    let mut empty = watch(&mut c, "other").await;
    let snap = next(&mut empty).await;
    assert!(
        snap.affiliates.is_empty() && !snap.deleted,
        "empty snapshot still sent"
    );

    c.affiliate_update(upd("c", "af1", Some(b"d1"), &[], Some(60)))
        .await
        .unwrap();
    let mut w = watch(&mut c, "c").await;
    let snap = next(&mut w).await;
    assert!(!snap.deleted);
    assert_eq!(snap.affiliates.len(), 1);
    assert_eq!(snap.affiliates[0].id, "af1");
    assert_eq!(snap.affiliates[0].data.as_ref(), b"d1");
    assert!(snap.affiliates[0].endpoints.is_empty());

    c.affiliate_update(upd("c", "af2", Some(b"d2"), &[b"e"], Some(60)))
        .await
        .unwrap();
    let m = next(&mut w).await;
    assert!(!m.deleted);
    assert_eq!(m.affiliates.len(), 1);
    assert_eq!(m.affiliates[0].id, "af2");
    assert_eq!(eps(&m.affiliates[0]), [&b"e"[..]]);

    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "af1".into(),
    })
    .await
    .unwrap();
    let m = next(&mut w).await;
    assert!(m.deleted);
    assert_eq!(
        m.affiliates,
        vec![Affiliate {
            id: "af1".into(),
            ..Default::default()
        }]
    );

    // Shutdown ends open streams with status OK.
    srv.shutdown().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "stream ended cleanly: {end:?}");
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map(|_| ()).expect_err("request must fail").code()
}

// §6.6
#[tokio::test]
async fn validation_errors_and_limits() {
    let (srv, mut c) = start(config()).await;
    for bad in [String::new(), "x".repeat(1024), "x".repeat(257)] {
        assert_eq!(code(c.hello(hello(&bad)).await), Code::InvalidArgument);
        assert_eq!(
            code(c.affiliate_update(upd(&bad, "a", None, &[], None)).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.affiliate_delete(AffiliateDeleteRequest {
                    cluster_id: bad.clone(),
                    affiliate_id: "a".into()
                })
                .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.list(ListRequest {
                    cluster_id: bad.clone()
                })
                .await
            ),
            Code::InvalidArgument
        );
        // Watch opens, and reports the error on its first receive.
        let mut w = watch(&mut c, &bad).await;
        assert_eq!(w.message().await.unwrap_err().code(), Code::InvalidArgument);
    }
    let code = |r: Result<tonic::Response<AffiliateUpdateResponse>, tonic::Status>| {
        r.map(|_| ()).err().map(|s| s.code())
    };
    let long = "x".repeat(257);
    assert_eq!(
        code(c.affiliate_update(upd("c", &long, None, &[], None)).await),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            c.affiliate_update(upd("c", "a", Some(&[0; 2049]), &[], None))
                .await
        ),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            c.affiliate_update(upd("c", "a", None, &[&[0; 33]], None))
                .await
        ),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            c.affiliate_update(upd("c", "a", None, &[], Some(31 * 60)))
                .await
        ),
        Some(Code::InvalidArgument)
    );
    for i in 0..1024 {
        let id = format!("af{i}");
        assert_eq!(
            code(
                c.affiliate_update(upd("c", &id, Some(b"d"), &[], Some(60)))
                    .await
            ),
            None
        );
    }
    assert_eq!(
        code(
            c.affiliate_update(upd("c", "af1024", Some(b"d"), &[], Some(60)))
                .await
        ),
        Some(Code::ResourceExhausted)
    );
    for i in 0..64u8 {
        assert_eq!(
            code(
                c.affiliate_update(upd("c", "af0", None, &[&[i]], Some(60)))
                    .await
            ),
            None
        );
    }
    assert_eq!(
        code(
            c.affiliate_update(upd("c", "af0", None, &[&[64]], Some(60)))
                .await
        ),
        Some(Code::ResourceExhausted)
    );
    srv.shutdown().await.unwrap();
}

// §6.7
#[tokio::test]
async fn rate_limit_per_client_ip() {
    let mut cfg = config();
    cfg.rate = RateConfig {
        rate: 1.0,
        burst: 60,
    };
    cfg.options.trust_proxy_headers = true;
    let (srv, mut c) = start(cfg).await;
    let limited = |ip: &str| {
        let mut r = Request::new(hello("c"));
        r.set_timeout(Duration::from_millis(500));
        r.metadata_mut().insert("x-real-ip", ip.parse().unwrap());
        r
    };
    for i in 0..60 {
        c.hello(limited("1.1.1.1"))
            .await
            .unwrap_or_else(|e| panic!("hello {i}: {e}"));
    }
    let err = c.hello(limited("1.1.1.1")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.message(), "rate limit exceeds request timeout");
    // Another client IP has its own bucket.
    c.hello(limited("2.2.2.2")).await.unwrap();
    let mut r = Request::new(hello("c"));
    r.set_timeout(Duration::from_millis(500));
    r.metadata_mut()
        .insert("x-forwarded-for", "3.3.3.3".parse().unwrap());
    c.hello(r).await.unwrap();
    srv.shutdown().await.unwrap();
}

// §6.8
#[tokio::test]
async fn redirect_in_every_hello() {
    let mut cfg = config();
    cfg.options = ServiceOptions {
        redirect_endpoint: Some("new.example.com:443".into()),
        ..Default::default()
    };
    let (srv, mut c) = start(cfg).await;
    for _ in 0..2 {
        let r = c.hello(hello("c")).await.unwrap().into_inner();
        assert_eq!(r.redirect.unwrap().endpoint, "new.example.com:443");
    }
    // Other RPCs keep working on a redirecting server.
    c.affiliate_update(upd("c", "a", Some(b"d"), &[], Some(60)))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "c").await.len(), 1);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttl_expiry_by_gc_notifies_watchers() {
    let mut cfg = config();
    cfg.gc_interval = Duration::from_millis(100);
    let (srv, mut c) = start(cfg).await;
    c.affiliate_update(upd("c", "short", Some(b"d"), &[], Some(1)))
        .await
        .unwrap();
    c.affiliate_update(upd("c", "long", Some(b"d"), &[b"e-long"], Some(60)))
        .await
        .unwrap();
    c.affiliate_update(upd("c", "long", None, &[b"e-short"], Some(1)))
        .await
        .unwrap();
    let mut w = watch(&mut c, "c").await;
    assert_eq!(next(&mut w).await.affiliates.len(), 2);
    let mut seen = HashMap::new();
    for _ in 0..2 {
        let m = next(&mut w).await;
        seen.insert(m.affiliates[0].id.clone(), m);
    }
    assert!(seen["short"].deleted);
    let long = &seen["long"];
    assert!(
        !long.deleted,
        "endpoint expiry is an update, not a false deletion"
    );
    assert_eq!(eps(&long.affiliates[0]), [&b"e-long"[..]]);
    let l = list(&mut c, "c").await;
    assert_eq!(l.len(), 1);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn slow_watcher_is_aborted_while_others_get_every_update() {
    let (srv, mut c) = start(config()).await;
    let addr = srv.grpc_addr.unwrap();
    // Each watcher on its own connection, as separate nodes would be: an unread
    // stream also holds its connection's HTTP/2 window.
    let mut slow = watch(&mut client(addr).await, "c").await;
    next(&mut slow).await;
    let mut fast = watch(&mut client(addr).await, "c").await;
    next(&mut fast).await;
    // Enough distinct 2 KiB updates to overflow every buffer between the server's
    // 32-message queue and the slow client's unread socket.
    const N: usize = 3000;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while n < N {
            let m = next(&mut fast).await;
            assert!(!m.deleted);
            n += 1;
        }
        n
    });
    for i in 0..N {
        let mut data = vec![0u8; 2048];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        c.affiliate_update(upd("c", "a", Some(&data), &[], Some(60)))
            .await
            .unwrap();
    }
    assert_eq!(
        reader.await.unwrap(),
        N,
        "the fast watcher got every update"
    );
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), slow.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("slow watcher ended without an error"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "subscription canceled: lost update");
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn snapshot_and_subscription_are_atomic_under_concurrent_updates() {
    let (srv, mut c) = start(config()).await;
    let addr = srv.grpc_addr.unwrap();
    let writer = tokio::spawn(async move {
        let mut c = client(addr).await;
        for i in 0..400u32 {
            let id = format!("a{}", i % 40);
            c.affiliate_update(upd("c", &id, Some(&i.to_le_bytes()), &[], Some(60)))
                .await
                .unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut w = watch(&mut c, "c").await;
    let mut view: HashMap<String, Vec<u8>> = next(&mut w)
        .await
        .affiliates
        .into_iter()
        .map(|a| (a.id, a.data.to_vec()))
        .collect();
    writer.await.unwrap();
    let want: HashMap<String, Vec<u8>> = list(&mut c, "c")
        .await
        .into_iter()
        .map(|a| (a.id, a.data.to_vec()))
        .collect();
    while view != want {
        let m = next(&mut w).await;
        for a in m.affiliates {
            view.insert(a.id, a.data.to_vec());
        }
    }
    assert_eq!(view.len(), 40);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_with_snapshot_loses_no_affiliate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let mut cfg = config();
    cfg.snapshot = Some(SnapshotConfig {
        path: path.clone(),
        interval: Duration::from_secs(3600),
    });
    let (srv, mut c) = start(cfg.clone()).await;
    for i in 0..10 {
        c.affiliate_update(upd(
            "c1",
            &format!("a{i}"),
            Some(b"blob"),
            &[b"ep"],
            Some(1800),
        ))
        .await
        .unwrap();
    }
    c.affiliate_update(upd("c2", "x", Some(b"other"), &[], Some(600)))
        .await
        .unwrap();
    let before = list(&mut c, "c1").await;
    srv.shutdown().await.unwrap();
    assert!(path.exists(), "snapshot saved on shutdown");

    let (srv, mut c) = start(cfg).await;
    assert_eq!(list(&mut c, "c1").await, before);
    assert_eq!(list(&mut c, "c2").await.len(), 1);
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn corrupt_snapshot_is_set_aside_and_server_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    std::fs::write(&path, b"\x0a\xff\xff\xff\xff garbage").unwrap();
    let mut cfg = config();
    cfg.snapshot = Some(SnapshotConfig {
        path: path.clone(),
        interval: Duration::from_secs(3600),
    });
    let (srv, mut c) = start(cfg).await;
    assert!(list(&mut c, "c").await.is_empty());
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.binpb.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "corrupt file kept for inspection");
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_and_landing_pages() {
    let mut cfg = config();
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.landing_addr = Some("127.0.0.1:0".parse().unwrap());
    let (srv, mut c) = start(cfg).await;
    c.hello(hello("c")).await.unwrap();
    c.affiliate_update(upd("c", "a", Some(b"d"), &[b"e"], Some(60)))
        .await
        .unwrap();
    let metrics = http_get(srv.metrics_addr.unwrap(), "/metrics").await;
    for want in [
        "discovery_server_hello_requests_total{client_version=\"v1.13\"} 1",
        "discovery_state_clusters 1",
        "discovery_state_affiliates 1",
        "discovery_state_endpoints 1",
        "grpc_server_handled_total{grpc_method=\"AffiliateUpdate\"",
    ] {
        assert!(metrics.contains(want), "metrics lack {want:?}:\n{metrics}");
    }
    let stats = http_get(srv.landing_addr.unwrap(), "/stats").await;
    assert!(stats.ends_with("{\"affiliates\":1}"), "{stats}");
    srv.shutdown().await.unwrap();
}

/// A minimal HTTP/1.0 GET, enough for our own pages.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
