//! The reconcile planner: pure. From the peer specs, what WireGuard reports and
//! `now`, it advances every peer's state machine and returns what the data
//! plane must look like and when to look again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::kubespan::peerspec::PeerSpec;
use crate::kubespan::peerstate::{self, PeerState, PeerStatus, Timing, WgObservation};
use crate::kubespan::routed::{RoutedSet, routed_set};

/// One WireGuard peer as it should be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    pub public_key: String,
    pub allowed_ips: Vec<IpNet>,
    /// `None`: leave WireGuard's current endpoint alone (it may have learned a
    /// NAT-mapped one from the peer itself).
    pub endpoint: Option<SocketAddr>,
}

/// A peer whose state changed in this reconcile, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub public_key: String,
    pub label: String,
    pub from: PeerState,
    pub to: PeerState,
    /// The endpoint newly chosen in this reconcile, if any.
    pub new_endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Sorted by public key.
    pub peers: Vec<DesiredPeer>,
    pub routed: RoutedSet,
    /// When to reconcile again without new input.
    pub next_wake: SystemTime,
    pub transitions: Vec<Transition>,
    /// Endpoint rotations made in this reconcile.
    pub rotations: usize,
}

/// How often WireGuard is read for handshakes: fast while a peer is not up
/// (so a handshake is noticed within a second, not on a 30 s tick), slow when
/// the mesh is healthy.
#[derive(Debug, Clone, Copy)]
pub struct Polling {
    pub converging: Duration,
    pub steady: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Polling {
            converging: Duration::from_secs(1),
            steady: Duration::from_secs(10),
        }
    }
}

/// Advances `statuses` (kept by the caller between reconciles) and plans the
/// device. Statuses of peers that no longer have a spec are dropped.
pub fn plan(
    statuses: &mut BTreeMap<String, PeerStatus>,
    specs: &BTreeMap<String, PeerSpec>,
    observed: &BTreeMap<String, WgObservation>,
    force_routing: bool,
    timing: &Timing,
    polling: Polling,
    now: SystemTime,
) -> Plan {
    statuses.retain(|key, _| specs.contains_key(key));
    let mut peers = Vec::with_capacity(specs.len());
    let mut transitions = Vec::new();
    let mut rotations = 0;
    let mut all_up = true;
    let mut next_wake: Option<SystemTime> = None;
    for (key, spec) in specs {
        let status = statuses.entry(key.clone()).or_default();
        let d = peerstate::step(status, &spec.endpoints, observed.get(key), now, timing);
        if d.endpoint_changed() {
            rotations += 1;
        }
        if d.state_changed() || d.endpoint_changed() {
            transitions.push(Transition {
                public_key: key.clone(),
                label: spec.label.clone(),
                from: d.previous_state,
                to: d.state,
                new_endpoint: d.endpoint_changed().then(|| d.endpoint_to_push()).flatten(),
            });
        }
        all_up &= d.state == PeerState::Up;
        if let Some(t) = peerstate::next_deadline(status, now, timing) {
            next_wake = Some(next_wake.map_or(t, |w| w.min(t)));
        }
        peers.push(DesiredPeer {
            public_key: key.clone(),
            allowed_ips: spec.allowed_ips.clone(),
            endpoint: d.endpoint_to_push(),
        });
    }
    let poll = if all_up {
        polling.steady
    } else {
        polling.converging
    };
    let poll_at = now + poll;
    Plan {
        peers,
        routed: routed_set(specs, statuses, force_routing),
        next_wake: next_wake.map_or(poll_at, |t| t.min(poll_at)),
        transitions,
        rotations,
    }
}

/// One endpoint harvested for harvestExtraEndpoints (Talos `KubeSpanEndpoint`):
/// where WireGuard reaches an up peer, to publish under the peer's affiliate ID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Harvested {
    pub affiliate_id: String,
    pub endpoint: SocketAddr,
    pub public_key: String,
}

/// Talos's EndpointController: every up peer with an endpoint, sorted by
/// affiliate ID.
pub fn harvested_endpoints(
    specs: &BTreeMap<String, PeerSpec>,
    statuses: &BTreeMap<String, PeerStatus>,
) -> Vec<Harvested> {
    let mut list: Vec<Harvested> = specs
        .iter()
        .filter_map(|(key, spec)| {
            let st = statuses.get(key)?;
            let endpoint = st.endpoint.filter(|_| st.state == PeerState::Up)?;
            Some(Harvested {
                affiliate_id: spec.node_id.clone(),
                endpoint,
                public_key: key.clone(),
            })
        })
        .collect();
    list.sort();
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn spec(label: &str, ip: &str, endpoints: &[&str]) -> PeerSpec {
        PeerSpec {
            node_id: label.into(),
            address: "fd00::1".parse().unwrap(),
            allowed_ips: vec![ip.parse().unwrap()],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            label: label.into(),
        }
    }

    fn obs(endpoint: Option<&str>, hs: Option<SystemTime>) -> WgObservation {
        WgObservation {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            last_handshake: hs,
            rx_bytes: 10,
            tx_bytes: 20,
        }
    }

    #[test]
    fn new_peer_gets_first_endpoint_then_up_on_handshake_then_rotates_when_dead() {
        let timing = Timing::default();
        let polling = Polling::default();
        let specs: BTreeMap<_, _> = [(
            "keyA".to_string(),
            spec("a", "10.0.0.1/32", &["10.0.0.1:51820", "192.0.2.1:51820"]),
        )]
        .into();
        let mut st = BTreeMap::new();

        let p = plan(
            &mut st,
            &specs,
            &BTreeMap::new(),
            true,
            &timing,
            polling,
            t(0),
        );
        assert_eq!(p.peers[0].endpoint, Some("10.0.0.1:51820".parse().unwrap()));
        assert_eq!(p.rotations, 1);
        assert_eq!(p.transitions.len(), 1);
        // Converging: look again within a second.
        assert_eq!(p.next_wake, t(1));
        // Forced routing: the peer's IPs are routed even before it is up.
        assert_eq!(p.routed.v4.len(), 1);

        // A handshake one second later is noticed on the next reconcile.
        let seen: BTreeMap<_, _> =
            [("keyA".to_string(), obs(Some("10.0.0.1:51820"), Some(t(1))))].into();
        let p = plan(&mut st, &specs, &seen, true, &timing, polling, t(1));
        assert_eq!(st["keyA"].state, PeerState::Up);
        assert_eq!(p.transitions[0].to, PeerState::Up);
        assert_eq!(p.rotations, 0);
        // Healthy: steady polling.
        assert_eq!(p.next_wake, t(11));

        // Silence past the peer-down interval: down, then the next endpoint.
        let p = plan(&mut st, &specs, &seen, true, &timing, polling, t(400));
        assert_eq!(p.rotations, 1);
        assert_eq!(
            p.peers[0].endpoint,
            Some("192.0.2.1:51820".parse().unwrap())
        );
        assert_eq!(st["keyA"].state, PeerState::Unknown);
    }

    #[test]
    fn roamed_endpoint_is_left_alone_and_bypass_routes_only_up_peers() {
        let timing = Timing::default();
        let specs: BTreeMap<_, _> = [
            (
                "keyA".to_string(),
                spec("a", "10.0.0.1/32", &["10.0.0.1:51820"]),
            ),
            (
                "keyB".to_string(),
                spec("b", "10.0.0.2/32", &["10.0.0.2:51820"]),
            ),
        ]
        .into();
        let mut st = BTreeMap::new();
        plan(
            &mut st,
            &specs,
            &BTreeMap::new(),
            false,
            &timing,
            Polling::default(),
            t(0),
        );
        // A handshaked from behind NAT: WireGuard reports another endpoint.
        let seen: BTreeMap<_, _> = [(
            "keyA".to_string(),
            obs(Some("203.0.113.9:40000"), Some(t(2))),
        )]
        .into();
        let p = plan(
            &mut st,
            &specs,
            &seen,
            false,
            &timing,
            Polling::default(),
            t(2),
        );
        assert_eq!(
            p.peers[0].endpoint, None,
            "never overwrite a roamed endpoint"
        );
        assert_eq!(st["keyA"].state, PeerState::Up);
        // allowDownPeerBypass: only the up peer is routed.
        assert_eq!(p.routed.v4, vec!["10.0.0.1/32".parse().unwrap()]);
        // A peer whose spec is gone loses its status.
        let only_a: BTreeMap<_, _> = [("keyA".to_string(), specs["keyA"].clone())].into();
        plan(
            &mut st,
            &only_a,
            &seen,
            false,
            &timing,
            Polling::default(),
            t(3),
        );
        assert!(!st.contains_key("keyB"));
    }

    #[test]
    fn wake_time_is_the_earliest_state_deadline_when_sooner_than_polling() {
        let timing = Timing {
            endpoint_connect_timeout: Duration::from_millis(500),
            ..Timing::default()
        };
        let specs: BTreeMap<_, _> = [(
            "keyA".to_string(),
            spec("a", "10.0.0.1/32", &["10.0.0.1:1", "10.0.0.2:1"]),
        )]
        .into();
        let mut st = BTreeMap::new();
        let p = plan(
            &mut st,
            &specs,
            &BTreeMap::new(),
            true,
            &timing,
            Polling::default(),
            t(0),
        );
        assert_eq!(p.next_wake, t(0) + Duration::from_millis(500));
    }

    #[test]
    fn harvest_takes_only_up_peers_with_an_endpoint() {
        let specs: BTreeMap<String, PeerSpec> = [
            (
                "k1".to_string(),
                spec("n1", "10.0.0.1/32", &["10.0.0.1:51820"]),
            ),
            (
                "k2".to_string(),
                spec("n2", "10.0.0.2/32", &["10.0.0.2:51820"]),
            ),
            ("k3".to_string(), spec("n3", "10.0.0.3/32", &[])),
        ]
        .into();
        let up = |e: Option<&str>, state| PeerStatus {
            endpoint: e.map(|e| e.parse().unwrap()),
            state,
            ..Default::default()
        };
        let statuses: BTreeMap<String, PeerStatus> = [
            ("k1".to_string(), up(Some("192.0.2.1:4000"), PeerState::Up)),
            (
                "k2".to_string(),
                up(Some("10.0.0.2:51820"), PeerState::Down),
            ),
            ("k3".to_string(), up(None, PeerState::Up)),
        ]
        .into();
        let h = harvested_endpoints(&specs, &statuses);
        assert_eq!(
            h,
            vec![Harvested {
                affiliate_id: "n1".into(),
                endpoint: "192.0.2.1:4000".parse().unwrap(),
                public_key: "k1".into(),
            }]
        );
    }
}
