//! The discovery client against the real in-process discovery server on
//! 127.0.0.1 (spec `discovery-protocol.md` §5, §6 items 9 and 12, and the Talos
//! harvested-endpoint scenario). Waits are on the client's watch channel with
//! timeouts; nothing sleeps for a fixed time.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use aes::Aes256;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use bytes::Bytes;
use kubespan::client::{
    BackoffConfig, ClientError, ClientSnapshot, Config, DiscoveryClient, ServiceEndpoint,
};
use kubespan::core::cipher::ClusterCipher;
use kubespan::core::types::{AffiliateSpec, KubeSpanInfo};
use kubespan::discovery::ratelimit::RateConfig;
use kubespan::discovery::server::{self, RunningServer};
use kubespan::discovery::service::ServiceOptions;
use kubespan::proto::server::cluster_client::ClusterClient;
use kubespan::proto::server::{AffiliateUpdateRequest, ListRequest};
use tonic::transport::Channel;

/// Bytes 00..1f, base64: a Talos-style cluster secret.
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// Bytes 0x64..0x83: another cluster's secret.
const OTHER_SECRET: &str = "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";
const CLUSTER: &str = "test-cluster-id";
const WAIT: Duration = Duration::from_secs(10);

fn server_config(addr: SocketAddr, redirect: Option<SocketAddr>) -> server::Config {
    server::Config {
        addr: Some(addr),
        landing_addr: None,
        metrics_addr: None,
        gc_interval: Duration::from_secs(1),
        // No persistence: a restart loses everything, and clients must republish.
        snapshot: None,
        rate: RateConfig {
            rate: 0.0,
            burst: 1,
        },
        options: ServiceOptions {
            redirect_endpoint: redirect.map(|a| a.to_string()),
            ..Default::default()
        },
        ..server::Config::default()
    }
}

async fn start_server() -> (RunningServer, SocketAddr) {
    start_server_at("127.0.0.1:0".parse().unwrap(), None).await
}

async fn start_server_at(
    addr: SocketAddr,
    redirect: Option<SocketAddr>,
) -> (RunningServer, SocketAddr) {
    let srv = server::start(server_config(addr, redirect))
        .await
        .expect("discovery server starts");
    let addr = srv.grpc_addr.unwrap();
    (srv, addr)
}

fn config(addr: SocketAddr, id: &str, secret: &str) -> Config {
    let endpoint = ServiceEndpoint::parse(&format!("http://{addr}")).unwrap();
    let cipher = ClusterCipher::from_secret_base64(secret).unwrap();
    let mut cfg = Config::new(endpoint, CLUSTER, id, cipher);
    // Long enough that no periodic refresh interferes with a test's counts.
    cfg.ttl = Duration::from_secs(120);
    cfg.refresh_interval = Some(Duration::from_secs(60));
    cfg.backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        ..BackoffConfig::default()
    };
    cfg.hello_timeout = Duration::from_secs(2);
    cfg
}

fn client(addr: SocketAddr, id: &str) -> DiscoveryClient {
    DiscoveryClient::spawn(config(addr, id, SECRET)).expect("client starts")
}

fn spec(id: &str, endpoints: &[&str]) -> AffiliateSpec {
    AffiliateSpec {
        node_id: id.into(),
        addresses: vec!["10.5.0.2".parse().unwrap()],
        hostname: format!("{id}.example.org"),
        nodename: id.into(),
        machine_type: "worker".into(),
        operating_system: "kubespan test".into(),
        kubespan: Some(KubeSpanInfo {
            public_key: "mB6cb7DbOOfFeLrmSqX7EG8+Mq+vBRnLQtgOc3bEl3Q=".into(),
            address: "fd7f:175a:b97c:5602:d8f1:cfff:fe3c:6d8b".parse().unwrap(),
            additional_addresses: vec!["10.244.1.0/24".parse().unwrap()],
            exclude_advertised_networks: vec![],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }),
        control_plane: None,
    }
}

/// Waits until the client's snapshot satisfies `pred`, or fails with the last one.
async fn wait(
    c: &DiscoveryClient,
    what: &str,
    mut pred: impl FnMut(&ClientSnapshot) -> bool,
) -> ClientSnapshot {
    let mut rx = c.subscribe();
    let got = tokio::time::timeout(WAIT, async {
        rx.wait_for(|s| pred(s)).await.map(|s| s.clone())
    })
    .await;
    match got {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("client stopped while waiting for {what}"),
        Err(_) => panic!(
            "timed out waiting for {what}; last snapshot: {:#?}",
            *rx.borrow()
        ),
    }
}

fn sees(s: &ClientSnapshot, want: &AffiliateSpec) -> bool {
    s.get(&want.node_id).map(|a| &a.spec) == Some(want)
}

fn ids(s: &ClientSnapshot) -> BTreeSet<&str> {
    s.affiliates.iter().map(|a| a.id.as_str()).collect()
}

async fn raw(addr: SocketAddr) -> ClusterClient<Channel> {
    ClusterClient::connect(format!("http://{addr}"))
        .await
        .expect("raw client connects")
}

async fn listed(addr: SocketAddr) -> BTreeSet<String> {
    raw(addr)
        .await
        .list(ListRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates
        .into_iter()
        .map(|a| a.id)
        .collect()
}

#[tokio::test]
async fn two_clients_discover_each_other_follow_changes_and_deletion() {
    let (srv, addr) = start_server().await;
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    let spec_a = spec("node-a", &["192.0.2.1:51820"]);
    let spec_b = spec("node-b", &["192.0.2.2:51820", "[2001:db8::2]:51820"]);
    assert!(a.set_local(spec_a.clone()).unwrap());
    assert!(b.set_local(spec_b.clone()).unwrap());

    let sa = wait(&a, "a to see b", |s| sees(s, &spec_b)).await;
    let sb = wait(&b, "b to see a", |s| sees(s, &spec_a)).await;
    for s in [&sa, &sb] {
        assert_eq!(s.affiliates.len(), 1, "own affiliate is not listed");
        assert_eq!(s.public_ip, Some(IpAddr::from([127, 0, 0, 1])));
        assert!(s.connection.connected);
        assert_eq!(s.connection.endpoint.port, addr.port());
        assert!(s.connection.connected_since.is_some());
        assert!(s.connection.last_refresh.is_some());
        assert_eq!(s.counters.skipped_decrypt + s.counters.skipped_decode, 0);
    }

    // Equal data: nothing is encrypted or sent again.
    let sent = a.snapshot().counters.updates_sent;
    assert!(!a.set_local(spec_a.clone()).unwrap());

    // An added endpoint reaches the other side.
    let spec_b2 = spec(
        "node-b",
        &[
            "192.0.2.2:51820",
            "[2001:db8::2]:51820",
            "198.51.100.7:4000",
        ],
    );
    assert!(b.set_local(spec_b2.clone()).unwrap());
    wait(&a, "a to see b's new endpoint", |s| sees(s, &spec_b2)).await;
    assert_eq!(
        a.snapshot().counters.updates_sent,
        sent,
        "re-setting equal data sent nothing"
    );

    // Deletion, acknowledged by the server, disappears for the other client.
    a.delete_local();
    tokio::time::timeout(WAIT, a.wait_synced())
        .await
        .expect("delete acknowledged in time")
        .unwrap();
    assert_eq!(a.snapshot().counters.deletes_sent, 1);
    assert_eq!(listed(addr).await, BTreeSet::from(["node-b".to_string()]));
    wait(&b, "a to disappear for b", |s| s.affiliates.is_empty()).await;

    // Coming back works too.
    a.set_local(spec_a.clone()).unwrap();
    wait(&b, "a to come back", |s| sees(s, &spec_a)).await;

    a.shutdown().await;
    b.shutdown().await;
    srv.shutdown().await.unwrap();
}

async fn stored(addr: SocketAddr, id: &str) -> Option<(Bytes, Vec<Bytes>)> {
    raw(addr)
        .await
        .list(ListRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates
        .into_iter()
        .find(|a| a.id == id)
        .map(|a| (a.data, a.endpoints))
}

#[tokio::test]
async fn refresh_keeps_data_alive_with_the_identical_cached_blob() {
    let (srv, addr) = start_server().await;
    let mut cfg = config(addr, "node-a", SECRET);
    cfg.ttl = Duration::from_secs(1);
    cfg.refresh_interval = Some(Duration::from_millis(200));
    let a = DiscoveryClient::spawn(cfg).unwrap();
    a.set_local(spec("node-a", &["192.0.2.1:51820"])).unwrap();
    tokio::time::timeout(WAIT, a.wait_synced())
        .await
        .unwrap()
        .unwrap();
    let first = stored(addr, "node-a").await.expect("published");
    let sent = a.snapshot().counters.updates_sent;

    // Twelve refreshes take 2.4 s: past the 1 s TTL plus the 1 s GC period, so
    // only the refreshes can have kept the affiliate alive.
    wait(&a, "twelve periodic refreshes", |s| {
        s.counters.updates_sent >= sent + 12
    })
    .await;
    let last = stored(addr, "node-a")
        .await
        .expect("kept alive by refreshes");
    assert_eq!(
        first, last,
        "refreshes resend the same bytes (one nonce per change)"
    );
    a.shutdown().await;
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_with_the_wrong_secret_is_skipped_and_counted() {
    let (srv, addr) = start_server().await;
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    let c = DiscoveryClient::spawn(config(addr, "node-c", OTHER_SECRET)).unwrap();
    let spec_a = spec("node-a", &["192.0.2.1:51820"]);
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    c.set_local(spec("node-c", &["192.0.2.3:51820"])).unwrap();
    tokio::time::timeout(WAIT, c.wait_synced())
        .await
        .unwrap()
        .unwrap();
    a.set_local(spec_a.clone()).unwrap();
    b.set_local(spec_b.clone()).unwrap();

    for (me, peer) in [(&a, &spec_b), (&b, &spec_a)] {
        let s = wait(me, "the peer and a skipped foreign affiliate", |s| {
            sees(s, peer) && s.counters.skipped_decrypt >= 1
        })
        .await;
        assert_eq!(ids(&s), BTreeSet::from([peer.node_id.as_str()]));
    }
    let s = wait(&c, "c to reject both others", |s| {
        s.counters.skipped_decrypt >= 2
    })
    .await;
    assert!(s.affiliates.is_empty());

    // The others keep working.
    let spec_a2 = spec("node-a", &["192.0.2.1:51820", "192.0.2.100:51820"]);
    a.set_local(spec_a2.clone()).unwrap();
    wait(&b, "b to see a's update", |s| sees(s, &spec_a2)).await;

    for x in [a, b, c] {
        x.shutdown().await;
    }
    srv.shutdown().await.unwrap();
}

/// AES-256 raw blocks with the cluster key: what anyone holding the secret
/// (or a buggy client) could put into an endpoint.
fn ecb(key_b64: &str, plaintext: [u8; 16]) -> Bytes {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(key_b64)
        .unwrap();
    let aes = Aes256::new_from_slice(&key).unwrap();
    let mut block = plaintext;
    aes.encrypt_block((&mut block).into());
    Bytes::copy_from_slice(&block)
}

fn update(id: &str, data: Option<Bytes>, endpoints: Vec<Bytes>) -> AffiliateUpdateRequest {
    AffiliateUpdateRequest {
        cluster_id: CLUSTER.into(),
        affiliate_id: id.into(),
        affiliate_data: data,
        affiliate_endpoints: endpoints,
        ttl: Some(prost_types::Duration {
            seconds: 120,
            nanos: 0,
        }),
    }
}

#[tokio::test]
async fn junk_written_by_a_raw_client_is_counted_and_ignored() {
    let (srv, addr) = start_server().await;
    let mut junk = raw(addr).await;
    let cipher = ClusterCipher::from_secret_base64(SECRET).unwrap();
    // Present before the clients connect: arrives in their snapshot.
    let mut random = [0u8; 64];
    getrandom::fill(&mut random).unwrap();
    junk.affiliate_update(update(
        "junk-random",
        Some(Bytes::copy_from_slice(&random)),
        vec![],
    ))
    .await
    .unwrap();

    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    a.set_local(spec("node-a", &[])).unwrap();
    b.set_local(spec_b.clone()).unwrap();
    let s = wait(&a, "a to see b past the junk", |s| {
        sees(s, &spec_b) && s.counters.skipped_decrypt >= 1
    })
    .await;
    assert_eq!(ids(&s), BTreeSet::from(["node-b"]));

    // Written while watching: incremental updates.
    // Authenticates, but is not an Affiliate message.
    junk.affiliate_update(update(
        "junk-decode",
        Some(cipher.seal(&[0x08, 0x01]).unwrap().into()),
        vec![],
    ))
    .await
    .unwrap();
    // Valid data; one good endpoint between one whose length byte (0xff) points
    // far past the blob and one of the wrong size.
    let good: SocketAddr = "203.0.113.9:51820".parse().unwrap();
    let mut bogus = [0u8; 16];
    bogus[0] = 0xff;
    let spec_j = spec("junk-endpoints", &[]);
    junk.affiliate_update(update(
        "junk-endpoints",
        Some(cipher.encrypt_affiliate(&spec_j).unwrap().into()),
        vec![
            ecb(SECRET, bogus),
            cipher.encrypt_endpoint(good).into(),
            Bytes::from_static(&[0u8; 20]),
        ],
    ))
    .await
    .unwrap();

    let mut want_j = spec_j.clone();
    want_j.kubespan.as_mut().unwrap().endpoints = vec![good];
    let s = wait(&a, "the junk to be sorted out", |s| {
        sees(s, &want_j) && s.counters.skipped_decode >= 1
    })
    .await;
    assert_eq!(ids(&s), BTreeSet::from(["junk-endpoints", "node-b"]));
    assert_eq!(s.counters.endpoints_dropped, 2);
    assert!(sees(&s, &spec_b), "the real peer is undisturbed");
    assert!(s.connection.connected);

    // Still working afterwards (the server merges endpoints: the old one stays
    // until its TTL runs out).
    let spec_b2 = spec("node-b", &["192.0.2.2:51820", "192.0.2.22:51820"]);
    b.set_local(spec_b2.clone()).unwrap();
    wait(&a, "a to see b's update", |s| sees(s, &spec_b2)).await;

    a.shutdown().await;
    b.shutdown().await;
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_record_overwritten_under_our_id_is_published_again() {
    let (srv, addr) = start_server().await;
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    a.set_local(spec("node-a", &[])).unwrap();
    b.set_local(spec_b.clone()).unwrap();
    wait(&a, "a to see b", |s| sees(s, &spec_b)).await;
    let cipher = ClusterCipher::from_secret_base64(SECRET).unwrap();
    // Endpoints travel beside the data, so the data alone is b's spec without them.
    let decrypts_to_b = |data: &Bytes| {
        cipher.decrypt_affiliate(data).ok().is_some_and(|d| {
            d.node_id == "node-b"
                && d.hostname == spec_b.hostname
                && d.addresses == spec_b.addresses
        })
    };

    // Someone who knows the cluster ID but not the secret writes junk under
    // node-b's ID: node-b notices and publishes its record again.
    let mut junk = raw(addr).await;
    let mut random = [0u8; 64];
    getrandom::fill(&mut random).unwrap();
    junk.affiliate_update(update(
        "node-b",
        Some(Bytes::copy_from_slice(&random)),
        vec![],
    ))
    .await
    .unwrap();
    wait(&b, "b to republish", |s| {
        s.counters.overwrites_repaired >= 1
    })
    .await;
    let (data, _) = stored(addr, "node-b").await.unwrap();
    assert!(
        decrypts_to_b(&data),
        "the service holds node-b's own record again"
    );
    // A node that connects now finds node-b intact.
    let c = client(addr, "node-c");
    wait(&c, "c to see b", |s| sees(s, &spec_b)).await;
    assert!(sees(&a.snapshot(), &spec_b), "a kept b throughout");

    // Deleted under our ID: published again too.
    junk.affiliate_delete(kubespan::proto::server::AffiliateDeleteRequest {
        cluster_id: CLUSTER.into(),
        affiliate_id: "node-b".into(),
    })
    .await
    .unwrap();
    wait(&b, "b to republish after a deletion", |s| {
        s.counters.overwrites_repaired >= 2
    })
    .await;
    let restored = tokio::time::timeout(WAIT, async {
        loop {
            if let Some((data, _)) = stored(addr, "node-b").await
                && decrypts_to_b(&data)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        restored.is_ok(),
        "node-b is back on the service after its deletion"
    );

    for x in [a, b, c] {
        x.shutdown().await;
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn clients_repopulate_a_restarted_server_without_persistence() {
    let (srv, addr) = start_server().await;
    let (a, b) = (client(addr, "node-a"), client(addr, "node-b"));
    let spec_a = spec("node-a", &["192.0.2.1:51820"]);
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    a.set_local(spec_a.clone()).unwrap();
    b.set_local(spec_b.clone()).unwrap();
    let before_a = wait(&a, "a to see b", |s| sees(s, &spec_b)).await;
    let before_b = wait(&b, "b to see a", |s| sees(s, &spec_a)).await;

    srv.shutdown().await.unwrap();
    let (srv, _) = start_server_at(addr, None).await;

    // A fresh snapshot from the new server that holds the peer proves the peer
    // republished on its own.
    for (me, peer, before) in [(&a, &spec_b, &before_a), (&b, &spec_a, &before_b)] {
        let s = wait(me, "a fresh snapshot and the peer on the new server", |s| {
            s.connection.connected
                && s.counters.watch_snapshots > before.counters.watch_snapshots
                && sees(s, peer)
        })
        .await;
        assert!(s.counters.reconnects >= 1);
        assert!(s.connection.last_error.is_some(), "the loss was recorded");
    }
    assert_eq!(
        listed(addr).await,
        BTreeSet::from(["node-a".to_string(), "node-b".to_string()])
    );

    a.shutdown().await;
    b.shutdown().await;
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn redirect_moves_clients_to_the_new_server() {
    let (srv2, addr2) = start_server().await;
    let (srv1, addr1) = start_server().await;
    let (a, b) = (client(addr1, "node-a"), client(addr1, "node-b"));
    let spec_a = spec("node-a", &["192.0.2.1:51820"]);
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    a.set_local(spec_a.clone()).unwrap();
    b.set_local(spec_b.clone()).unwrap();
    let before_a = wait(&a, "a to see b", |s| sees(s, &spec_b)).await;
    let before_b = wait(&b, "b to see a", |s| sees(s, &spec_a)).await;

    // Server 1 comes back redirecting; its Watch streams end, clients reconnect.
    srv1.shutdown().await.unwrap();
    let (srv1, _) = start_server_at(addr1, Some(addr2)).await;
    for (me, peer, before) in [(&a, &spec_b, &before_a), (&b, &spec_a, &before_b)] {
        let s = wait(me, "the move to server 2", |s| {
            s.connection.connected
                && s.connection.endpoint.port == addr2.port()
                && s.counters.watch_snapshots > before.counters.watch_snapshots
                && sees(s, peer)
        })
        .await;
        assert!(s.counters.redirects >= 1);
        assert!(
            !s.connection.endpoint.tls,
            "the redirect kept plaintext mode"
        );
    }
    assert!(
        listed(addr1).await.is_empty(),
        "nothing published on server 1"
    );

    // Server 1 can go; updates flow through server 2.
    srv1.shutdown().await.unwrap();
    let spec_a2 = spec("node-a", &["192.0.2.1:51820", "192.0.2.11:51820"]);
    a.set_local(spec_a2.clone()).unwrap();
    wait(&b, "b to see a's update via server 2", |s| {
        sees(s, &spec_a2)
    })
    .await;

    a.shutdown().await;
    b.shutdown().await;
    srv2.shutdown().await.unwrap();
}

#[tokio::test]
async fn harvested_endpoints_join_the_peers_endpoint_list() {
    let (srv, addr) = start_server().await;
    let (a, b, c) = (
        client(addr, "node-a"),
        client(addr, "node-b"),
        client(addr, "node-c"),
    );
    let spec_b = spec("node-b", &["192.0.2.2:51820"]);
    a.set_local(spec("node-a", &[])).unwrap();
    b.set_local(spec_b.clone()).unwrap();
    c.set_local(spec("node-c", &[])).unwrap();
    wait(&c, "c to see b", |s| sees(s, &spec_b)).await;

    let harvested: SocketAddr = "1.1.1.1:343".parse().unwrap();
    assert!(
        a.set_other_endpoints(vec![("node-b".into(), harvested)])
            .unwrap()
    );
    let mut want = spec_b.clone();
    want.kubespan.as_mut().unwrap().endpoints.push(harvested);
    wait(&c, "c to see the harvested endpoint as b's second", |s| {
        sees(s, &want)
    })
    .await;
    // Unchanged input: no publish round.
    let sent = a.snapshot().counters.updates_sent;
    assert!(
        !a.set_other_endpoints(vec![("node-b".into(), harvested)])
            .unwrap()
    );
    tokio::time::timeout(WAIT, a.wait_synced())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.snapshot().counters.updates_sent, sent);

    for x in [a, b, c] {
        x.shutdown().await;
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_endpoint_verifies_the_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = server_config("127.0.0.1:0".parse().unwrap(), None);
    cfg.tls = Some((cert, key));
    let srv = server::start(cfg).await.unwrap();
    let addr = srv.grpc_addr.unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());

    let mut trusted = config(addr, "node-a", SECRET);
    trusted.endpoint = ServiceEndpoint::parse(&url).unwrap();
    trusted.extra_ca_pem = Some(ck.cert.pem().into_bytes());
    let a = DiscoveryClient::spawn(trusted.clone()).unwrap();
    a.set_local(spec("node-a", &[])).unwrap();
    tokio::time::timeout(WAIT, a.wait_synced())
        .await
        .unwrap()
        .unwrap();
    assert!(a.snapshot().connection.connected);
    assert_eq!(listed_tls(&trusted).await, ["node-a"]);

    // Without the CA the self-signed certificate is refused.
    let mut untrusted = trusted.clone();
    untrusted.affiliate_id = "node-x".into();
    untrusted.extra_ca_pem = None;
    match DiscoveryClient::spawn(untrusted) {
        // No system roots on this host: refused before connecting, just as well.
        Err(ClientError::Tls { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(x) => {
            let s = wait(&x, "the certificate to be refused", |s| {
                s.connection.last_error.is_some()
            })
            .await;
            assert!(!s.connection.connected);
            let err = s.connection.last_error.unwrap();
            assert!(err.contains("certificate"), "{err}");
            x.shutdown().await;
        }
    }

    a.shutdown().await;
    srv.shutdown().await.unwrap();
}

async fn listed_tls(cfg: &Config) -> Vec<String> {
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            cfg.extra_ca_pem.clone().unwrap(),
        ))
        .domain_name("127.0.0.1");
    let ch = Channel::from_shared(cfg.endpoint.uri())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    ClusterClient::new(ch)
        .list(ListRequest {
            cluster_id: CLUSTER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates
        .into_iter()
        .map(|a| a.id)
        .collect()
}

#[tokio::test]
async fn configuration_and_input_errors() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let mut cfg = config(addr, "node-a", SECRET);
    cfg.cluster_id.clear();
    assert!(matches!(
        DiscoveryClient::spawn(cfg),
        Err(ClientError::ClusterId(0))
    ));
    let mut cfg = config(addr, "node-a", SECRET);
    cfg.ttl = Duration::from_secs(31 * 60);
    assert!(matches!(
        DiscoveryClient::spawn(cfg),
        Err(ClientError::Ttl(_))
    ));
    let mut cfg = config(addr, "node-a", SECRET);
    cfg.refresh_interval = Some(cfg.ttl);
    assert!(matches!(
        DiscoveryClient::spawn(cfg),
        Err(ClientError::RefreshInterval { .. })
    ));
    let mut cfg = config(addr, "node-a", SECRET);
    cfg.endpoint = ServiceEndpoint::parse("https://127.0.0.1:9/").unwrap();
    cfg.extra_ca_pem = Some(b"not a certificate".to_vec());
    assert!(matches!(
        DiscoveryClient::spawn(cfg.clone()),
        Err(ClientError::ExtraCa)
    ));
    cfg.extra_ca_pem =
        Some(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n".to_vec());
    assert!(matches!(
        DiscoveryClient::spawn(cfg),
        Err(ClientError::Tls { .. })
    ));

    let a = client(addr, "node-a");
    assert!(matches!(
        a.set_local(spec("node-b", &[])),
        Err(ClientError::NodeIdMismatch { .. })
    ));
    // Nothing listens on the discard port: the error is reported, not fatal.
    let s = wait(&a, "a connection error", |s| {
        s.connection.last_error.is_some()
    })
    .await;
    assert!(!s.connection.connected);
    assert!(
        s.connection
            .last_error
            .as_deref()
            .unwrap()
            .contains("127.0.0.1:9"),
        "{:?}",
        s.connection.last_error
    );
    a.shutdown().await;
}
