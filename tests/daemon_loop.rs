//! The daemon's reconcile loop, in process: real nodes, a real discovery server
//! on loopback, real discovery clients and the real planner, over a fake data
//! plane that simulates WireGuard handshakes on a tiny network.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kubespan::client::{self, DiscoveryClient};
use kubespan::config::Settings;
use kubespan::core::cipher::ClusterCipher;
use kubespan::daemon::local::HostAddress;
use kubespan::daemon::plan::{DesiredPeer, Polling};
use kubespan::daemon::run::{DataPlane, HostFacts, LinkPlan, Node, NodeSetup, NodeView, Stop};
use kubespan::discovery::ratelimit::RateConfig;
use kubespan::discovery::server::{self, Config, RunningServer};
use kubespan::identity::KeyPair;
use kubespan::kubespan::peerstate::{PeerState, Timing, WgObservation};
use tokio::sync::{mpsc, watch};

const SECRET: &str = "Bn0/rBSrPw87fdpGO+fjUTL4p5GqqmgNDmsw7bDMkF4=";

/// The simulated network: which endpoints deliver to which node, and what each
/// node's WireGuard device currently holds.
#[derive(Default)]
struct Net {
    /// endpoint -> public key of the node listening there.
    listeners: BTreeMap<SocketAddr, String>,
    /// public key -> the node's source address as others see it.
    source: BTreeMap<String, SocketAddr>,
    /// device (public key) -> peer key -> observation.
    devices: BTreeMap<String, BTreeMap<String, WgObservation>>,
    rulesets: BTreeMap<String, String>,
    torn_down: BTreeSet<String>,
}

#[derive(Clone)]
struct FakeDp {
    me: String,
    net: Arc<Mutex<Net>>,
}

impl DataPlane for FakeDp {
    async fn setup(&mut self, _link: &LinkPlan) -> anyhow::Result<()> {
        self.net
            .lock()
            .unwrap()
            .devices
            .entry(self.me.clone())
            .or_default();
        Ok(())
    }

    async fn observe(&mut self) -> anyhow::Result<BTreeMap<String, WgObservation>> {
        Ok(self
            .net
            .lock()
            .unwrap()
            .devices
            .get(&self.me)
            .cloned()
            .unwrap_or_default())
    }

    async fn apply_peers(&mut self, _l: &LinkPlan, peers: &[DesiredPeer]) -> anyhow::Result<()> {
        let mut net = self.net.lock().unwrap();
        let now = SystemTime::now();
        let mut dev: BTreeMap<String, WgObservation> = BTreeMap::new();
        for p in peers {
            let mut o = net
                .devices
                .get(&self.me)
                .and_then(|d| d.get(&p.public_key))
                .cloned()
                .unwrap_or(WgObservation {
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            if let Some(e) = p.endpoint {
                o.endpoint = Some(e);
            }
            dev.insert(p.public_key.clone(), o);
        }
        net.devices.insert(self.me.clone(), dev);
        // Handshake with every peer whose endpoint reaches it.
        let me = self.me.clone();
        let my_source = net.source.get(&me).copied();
        let targets: Vec<(String, SocketAddr)> = net.devices[&me]
            .iter()
            .filter_map(|(k, o)| o.endpoint.map(|e| (k.clone(), e)))
            .collect();
        for (key, endpoint) in targets {
            if net.listeners.get(&endpoint) != Some(&key) {
                continue;
            }
            let o = net.devices.get_mut(&me).unwrap().get_mut(&key).unwrap();
            o.last_handshake = Some(now);
            o.rx_bytes += 100;
            o.tx_bytes += 100;
            // The responder learns our source address if it knows us.
            if let Some(peer_dev) = net.devices.get_mut(&key)
                && let Some(back) = peer_dev.get_mut(&me)
            {
                back.last_handshake = Some(now);
                back.endpoint = my_source;
                back.rx_bytes += 100;
            }
        }
        Ok(())
    }

    async fn apply_ruleset(&mut self, script: &str) -> anyhow::Result<()> {
        self.net
            .lock()
            .unwrap()
            .rulesets
            .insert(self.me.clone(), script.to_owned());
        Ok(())
    }

    async fn teardown(&mut self) -> anyhow::Result<()> {
        let mut net = self.net.lock().unwrap();
        net.devices.remove(&self.me);
        net.torn_down.insert(self.me.clone());
        Ok(())
    }
}

struct FakeHost(Vec<HostAddress>);

impl HostFacts for FakeHost {
    async fn addresses(&mut self) -> anyhow::Result<Vec<HostAddress>> {
        Ok(self.0.clone())
    }
}

struct TestNode {
    public_key: String,
    view: watch::Receiver<NodeView>,
    stop: watch::Sender<Option<Stop>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn discovery() -> RunningServer {
    server::start(Config {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        landing_addr: None,
        metrics_addr: None,
        snapshot: None,
        rate: RateConfig {
            rate: 0.0,
            burst: 1,
        },
        ..Config::default()
    })
    .await
    .unwrap()
}

/// A node of the simulated network: its own addresses, where it listens,
/// extra announced endpoints and endpoint filters.
struct NodeSpec<'a> {
    name: &'a str,
    ips: &'a [&'a str],
    listen: &'a [&'a str],
    extra: &'a [&'a str],
    filters: &'a [&'a str],
}

/// A plain node: `10.0.0.N`, listening on `10.0.0.N:51820`.
fn plain<'a>(name: &'a str, ip: &'a [&'a str], listen: &'a [&'a str]) -> NodeSpec<'a> {
    NodeSpec {
        name,
        ips: ip,
        listen,
        extra: &[],
        filters: &["10.0.0.0/8"],
    }
}

async fn node(
    net: &Arc<Mutex<Net>>,
    srv: &RunningServer,
    n: NodeSpec<'_>,
    timing: Timing,
) -> TestNode {
    let NodeSpec {
        name,
        ips,
        listen,
        extra,
        filters,
    } = n;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{}", srv.grpc_addr.unwrap());
    let list = |l: &[&str]| {
        l.iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (extra_yaml, filters_yaml) = (list(extra), list(filters));
    let settings = Settings::parse(
        &format!(
            "cluster:\n  id: test-cluster\n  secret: {SECRET}\n  discovery:\n    registries:\n      service:\n        endpoint: {endpoint}\n\
             kubespan:\n  extraAnnouncedEndpoints: [{extra_yaml}]\n  filters:\n    endpoints: [{filters_yaml}]\n\
             node:\n  stateDir: {}\n  nodename: {name}\n",
            dir.path().display()
        ),
        Path::new("test.yaml"),
    )
    .unwrap();
    let keys = KeyPair::generate().unwrap();
    let node_id = kubespan::core::base62::generate_node_id().unwrap();
    {
        let mut n = net.lock().unwrap();
        for l in listen {
            n.listeners
                .insert(l.parse().unwrap(), keys.public_key.clone());
        }
        n.source
            .insert(keys.public_key.clone(), listen[0].parse().unwrap());
    }
    let mut cfg = client::Config::new(
        client::endpoint::ServiceEndpoint::parse(&endpoint).unwrap(),
        "test-cluster",
        node_id.clone(),
        ClusterCipher::new(&settings.cluster_key).unwrap(),
    );
    cfg.ttl = Duration::from_secs(60);
    let client = DiscoveryClient::spawn(cfg).unwrap();
    let ks = kubespan::identity::kubespan_address(
        "test-cluster",
        &kubespan::identity::LinkInfo {
            name: "eth0".into(),
            mac: vec![2, 0, 0, 0, 0, name.as_bytes()[0]],
            ethernet: true,
            kind: None,
        },
    )
    .unwrap();
    let setup = NodeSetup {
        settings,
        node_id,
        keys: keys.clone(),
        kubespan_address: ks,
        hostname: name.into(),
        operating_system: "test".into(),
        timing,
        polling: Polling {
            converging: Duration::from_millis(50),
            steady: Duration::from_millis(200),
        },
        retain_grace: Duration::from_secs(300),
        backend: "fake".into(),
    };
    let host = FakeHost(
        ips.iter()
            .map(|ip| HostAddress {
                ip: ip.parse().unwrap(),
                link_up: true,
            })
            .collect(),
    );
    let dp = FakeDp {
        me: keys.public_key.clone(),
        net: net.clone(),
    };
    let (node, view) = Node::new(setup, dp, host, Some(client)).unwrap();
    let (stop, stop_rx) = watch::channel(None);
    let (_host_tx, host_rx) = mpsc::channel(1);
    let task = tokio::spawn(async move {
        let _keep_host_events_open = _host_tx;
        node.run(host_rx, stop_rx).await
    });
    TestNode {
        public_key: keys.public_key,
        view,
        stop,
        task,
        _dir: dir,
    }
}

async fn until(n: &mut TestNode, what: &str, f: impl Fn(&NodeView) -> bool) -> NodeView {
    let got = tokio::time::timeout(Duration::from_secs(10), n.view.wait_for(|v| f(v)))
        .await
        .map(|v| v.unwrap().clone());
    match got {
        Ok(v) => v,
        Err(_) => {
            let v = n.view.borrow();
            let d = v.discovery.as_ref().map(|d| {
                let ids: Vec<&str> = d.affiliates.iter().map(|a| a.id.as_str()).collect();
                format!("{ids:?} {:?}", d.counters)
            });
            panic!(
                "timed out waiting for: {what}; retained {:?}; specs {:?}; statuses {:?}; discovery {d:?}",
                v.retained,
                v.specs.keys().collect::<Vec<_>>(),
                v.statuses
            )
        }
    }
}

fn state(v: &NodeView, key: &str) -> Option<PeerState> {
    v.statuses.get(key).map(|s| s.state)
}

async fn stop(n: TestNode) {
    n.stop.send(Some(Stop::Shutdown)).unwrap();
    n.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn two_nodes_discover_each_other_and_come_up() {
    let srv = discovery().await;
    let net = Arc::new(Mutex::new(Net::default()));
    let t = Timing::default();
    let mut a = node(
        &net,
        &srv,
        plain("a", &["10.0.0.1"], &["10.0.0.1:51820"]),
        t,
    )
    .await;
    let mut b = node(
        &net,
        &srv,
        plain("b", &["10.0.0.2"], &["10.0.0.2:51820"]),
        t,
    )
    .await;
    let (ka, kb) = (a.public_key.clone(), b.public_key.clone());
    let va = until(&mut a, "a sees b up", |v| {
        state(v, &kb) == Some(PeerState::Up)
    })
    .await;
    until(&mut b, "b sees a up", |v| {
        state(v, &ka) == Some(PeerState::Up)
    })
    .await;

    let spec = &va.specs[&kb];
    assert_eq!(spec.label, "b");
    assert_eq!(
        spec.endpoints,
        vec!["10.0.0.2:51820".parse::<SocketAddr>().unwrap()]
    );
    let allowed: Vec<String> = spec.allowed_ips.iter().map(|n| n.to_string()).collect();
    assert_eq!(allowed[0], "10.0.0.2/32");
    assert!(allowed[1].ends_with("/128"));
    // The routed set (forced routing) holds b's node address, not its ULA.
    assert_eq!(va.routed.v4, vec!["10.0.0.2/32".parse().unwrap()]);
    assert!(va.routed.v6.is_empty());
    let rules = net.lock().unwrap().rulesets[&ka].clone();
    assert!(
        rules.contains("table inet kubespan") && rules.contains("10.0.0.2"),
        "{rules}"
    );

    stop(a).await;
    assert!(net.lock().unwrap().torn_down.contains(&ka));
    stop(b).await;
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn dead_endpoints_are_rotated_until_one_works() {
    let srv = discovery().await;
    let net = Arc::new(Mutex::new(Net::default()));
    let fast = Timing {
        endpoint_connect_timeout: Duration::from_millis(300),
        ..Timing::default()
    };
    // b advertises two black holes before its real endpoint. a advertises only
    // an endpoint nobody listens on, so b can never start a handshake (which
    // would let a's WireGuard learn b's endpoint by roaming): only a's own
    // rotation can bring the pair up.
    let mut a = node(
        &net,
        &srv,
        NodeSpec {
            name: "a",
            ips: &["10.0.0.1"],
            listen: &["10.0.0.1:51820"],
            extra: &["10.8.8.8:51820"],
            filters: &["!0.0.0.0/0"],
        },
        fast,
    )
    .await;
    let b = node(
        &net,
        &srv,
        NodeSpec {
            name: "b",
            ips: &["10.0.0.2"],
            listen: &["10.0.0.2:51820"],
            extra: &["10.9.9.1:51820", "10.9.9.2:51820", "10.0.0.2:51820"],
            // Only a negative filter: none of b's own addresses is advertised, so
            // its endpoints are exactly the three extras, dead ones first.
            filters: &["!0.0.0.0/0"],
        },
        fast,
    )
    .await;
    let kb = b.public_key.clone();
    let v = until(&mut a, "a reaches b through its third endpoint", |v| {
        state(v, &kb) == Some(PeerState::Up)
    })
    .await;
    assert_eq!(
        v.statuses[&kb].last_used_endpoint,
        Some("10.0.0.2:51820".parse().unwrap())
    );
    assert!(
        v.rotations >= 3,
        "first choice plus two rotations: {}",
        v.rotations
    );
    stop(a).await;
    stop(b).await;
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn deleted_affiliate_drops_the_peer_at_once_but_a_service_restart_does_not() {
    let srv = discovery().await;
    let port = srv.grpc_addr.unwrap();
    let net = Arc::new(Mutex::new(Net::default()));
    let t = Timing::default();
    let mut a = node(
        &net,
        &srv,
        plain("a", &["10.0.0.1"], &["10.0.0.1:51820"]),
        t,
    )
    .await;
    let b = node(
        &net,
        &srv,
        plain("b", &["10.0.0.2"], &["10.0.0.2:51820"]),
        t,
    )
    .await;
    let c = node(
        &net,
        &srv,
        plain("c", &["10.0.0.3"], &["10.0.0.3:51820"]),
        t,
    )
    .await;
    let (kb, kc) = (b.public_key.clone(), c.public_key.clone());
    until(&mut a, "a sees b and c up", |v| {
        state(v, &kb) == Some(PeerState::Up) && state(v, &kc) == Some(PeerState::Up)
    })
    .await;

    // The service restarts empty on the same port: nobody loses a peer, and the
    // mesh is whole again once everyone has republished.
    srv.shutdown().await.unwrap();
    let srv = server::start(Config {
        addr: Some(port),
        landing_addr: None,
        metrics_addr: None,
        snapshot: None,
        rate: RateConfig {
            rate: 0.0,
            burst: 1,
        },
        ..Config::default()
    })
    .await
    .unwrap();
    let mut saw_loss = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let v = a.view.borrow().clone();
        saw_loss |= !v.specs.contains_key(&kb) || !v.specs.contains_key(&kc);
        // Back means: a's client has the new server's snapshot, and both peers
        // have republished there.
        let back = v
            .discovery
            .as_ref()
            .is_some_and(|d| d.counters.watch_snapshots >= 2 && d.affiliates.len() == 2);
        if back {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients did not republish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!saw_loss, "a peer was dropped while the service restarted");

    // c leaves for real: deleted on the service, gone from a at once.
    let c_id = c.view.borrow().node_id.clone();
    let mut raw =
        kubespan::proto::server::cluster_client::ClusterClient::connect(format!("http://{port}"))
            .await
            .unwrap();
    stop(c).await;
    raw.affiliate_delete(kubespan::proto::server::AffiliateDeleteRequest {
        cluster_id: "test-cluster".into(),
        affiliate_id: c_id,
    })
    .await
    .unwrap();
    until(&mut a, "a drops c", |v| !v.specs.contains_key(&kc)).await;
    assert!(a.view.borrow().specs.contains_key(&kb));
    stop(a).await;
    stop(b).await;
    srv.shutdown().await.unwrap();
}
