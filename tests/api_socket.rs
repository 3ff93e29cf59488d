//! The daemon's local API over a real Unix socket, with the real client the
//! CLI uses: get, list, watch (versions and events), status, and the errors a
//! user sees.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use kubespan::api::cli::connect;
use kubespan::api::server;
use kubespan::api::status::StatusReport;
use kubespan::core::types::{AffiliateSpec, KubeSpanInfo};
use kubespan::daemon::run::NodeView;
use kubespan::kubespan::peerspec::PeerSpec;
use kubespan::kubespan::peerstate::{PeerState, PeerStatus};
use kubespan::proto::api as pb;
use kubespan::proto::api::watch_event::Kind;
use tokio::sync::watch;

fn view() -> NodeView {
    let mut v = NodeView {
        node_id: "self-id".into(),
        public_key: "self-pub".into(),
        kubespan_address: Some("fd7f::1".parse().unwrap()),
        kubespan_prefix: Some("fd7f::1/64".parse().unwrap()),
        backend: "userspace".into(),
        ..Default::default()
    };
    v.affiliates.insert(
        "peer-id".into(),
        AffiliateSpec {
            node_id: "peer-id".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            hostname: "peer.example".into(),
            nodename: "peer".into(),
            machine_type: "worker".into(),
            operating_system: "Debian".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "peer-pub".into(),
                address: "fd7f::2".parse().unwrap(),
                additional_addresses: vec![],
                exclude_advertised_networks: vec![],
                endpoints: vec!["10.0.0.2:51820".parse().unwrap()],
            }),
            control_plane: None,
        },
    );
    v.specs.insert(
        "peer-pub".into(),
        PeerSpec {
            node_id: "peer-id".into(),
            address: "fd7f::2".parse().unwrap(),
            allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
            endpoints: vec!["10.0.0.2:51820".parse().unwrap()],
            label: "peer".into(),
        },
    );
    v.statuses.insert(
        "peer-pub".into(),
        PeerStatus {
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            state: PeerState::Up,
            rx_bytes: 1000,
            tx_bytes: 2000,
            ..Default::default()
        },
    );
    v
}

async fn next(w: &mut tonic::Streaming<pb::WatchEvent>) -> pb::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("a watch event within 5 s")
        .unwrap()
        .unwrap()
}

fn list(t: &str) -> pb::ListRequest {
    pb::ListRequest {
        r#type: t.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn get_list_watch_and_status_over_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/kubespan.sock");
    let (tx, rx) = watch::channel(view());
    let api = server::start(&path, rx, "PRIVATE-KEY".into()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is root-only");

    let mut c = connect(&path).await.unwrap();
    let members = c.list(list("members")).await.unwrap().into_inner();
    assert_eq!(members.resources.len(), 1);
    let m = &members.resources[0];
    assert_eq!((m.namespace.as_str(), m.id.as_str()), ("cluster", "peer"));
    assert_eq!(m.r#type, "Members.cluster.talos.dev");
    let spec: serde_json::Value = serde_json::from_str(&m.spec_json).unwrap();
    assert_eq!(spec["addresses"][0], "10.0.0.2");

    // Raw affiliates live in their own namespace; members do not.
    let raw = c
        .list(pb::ListRequest {
            r#type: "affiliates".into(),
            namespace: "cluster-raw".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(raw.resources.is_empty(), "no raw affiliates in this view");
    let err = c
        .list(pb::ListRequest {
            r#type: "members".into(),
            namespace: "cluster-raw".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // The private key only when asked.
    let get_ksi = |secrets| pb::GetRequest {
        r#type: "ksi".into(),
        id: "local".into(),
        include_secrets: secrets,
        ..Default::default()
    };
    let ksi = c.get(get_ksi(false)).await.unwrap().into_inner();
    assert!(!ksi.spec_json.contains("PRIVATE-KEY"), "{}", ksi.spec_json);
    assert!(ksi.spec_json.contains("self-pub"));
    let ksi = c.get(get_ksi(true)).await.unwrap().into_inner();
    assert!(ksi.spec_json.contains("PRIVATE-KEY"));

    let err = c.list(list("pods")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("kubespanpeerstatuses"),
        "{}",
        err.message()
    );
    let err = c
        .get(pb::GetRequest {
            r#type: "members".into(),
            id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Watch: the current statuses, then BOOTSTRAPPED, then each change with
    // its version, then the destruction.
    let mut w = c
        .watch(list("kubespanpeerstatuses"))
        .await
        .unwrap()
        .into_inner();
    let e = next(&mut w).await;
    assert_eq!(e.kind(), Kind::Created);
    let r = e.resource.unwrap();
    assert_eq!((r.id.as_str(), r.version), ("peer-pub", 1));
    assert_eq!(next(&mut w).await.kind(), Kind::Bootstrapped);

    tx.send_modify(|v| v.statuses.get_mut("peer-pub").unwrap().rx_bytes = 5000);
    let e = next(&mut w).await;
    assert_eq!(e.kind(), Kind::Updated);
    let r = e.resource.unwrap();
    assert_eq!(r.version, 2);
    assert!(r.spec_json.contains("5000"), "{}", r.spec_json);

    // A change to another type is not sent to this watch.
    tx.send_modify(|v| v.node_id = "renamed".into());
    tx.send_modify(|v| {
        v.specs.clear();
        v.statuses.clear();
    });
    let e = next(&mut w).await;
    assert_eq!(e.kind(), Kind::Destroyed);
    assert_eq!(e.resource.unwrap().id, "peer-pub");

    let status = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let report: StatusReport = serde_json::from_str(&status.status_json).unwrap();
    assert_eq!(report.node_id, "renamed");
    assert_eq!(report.backend, "userspace");
    assert!(report.peers.is_empty());

    // Shutdown ends the open watch and removes the socket.
    api.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("the watch ends at shutdown");
    assert!(!matches!(end, Ok(Some(_))), "no event after shutdown");
    assert!(!path.exists(), "the socket is removed");
}

#[tokio::test]
async fn errors_a_user_can_act_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubespan.sock");

    let err = connect(&path).await.err().unwrap().to_string();
    assert!(err.contains("daemon is not running"), "{err}");
    assert!(err.contains("no API socket"), "{err}");

    // A socket left behind by a crash: reported as stale, and a new daemon
    // replaces it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let err = connect(&path).await.err().unwrap().to_string();
    assert!(err.contains("stale socket"), "{err}");
    let (_tx, rx) = watch::channel(view());
    let api = server::start(&path, rx.clone(), "k".into()).unwrap();
    connect(&path).await.unwrap();

    // A second daemon on the same socket is refused, and the first keeps it.
    let err = server::start(&path, rx, "k".into())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another kubespan daemon"), "{err}");
    connect(&path).await.unwrap();
    api.shutdown().await;
}
