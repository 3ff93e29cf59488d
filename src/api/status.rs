//! `kubespan status`: one report that answers "is my mesh healthy", built from
//! the daemon's view at `now`. Pure; the daemon serves it as JSON and the CLI
//! renders it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::daemon::run::NodeView;
use crate::kubespan::peerspec::PeerSpec;
use crate::kubespan::peerstate::{PeerState, PeerStatus, Timing};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub node_id: String,
    pub public_key: String,
    /// The KubeSpan address.
    pub address: String,
    pub backend: String,
    pub discovery: DiscoveryStatus,
    pub peers: Vec<PeerLine>,
    /// Affiliates of the cluster that did not decrypt or decode (wrong secret
    /// or hostile data), since the daemon started.
    pub affiliates_skipped: u64,
    pub reconciles: u64,
    pub reconcile_errors: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryStatus {
    pub enabled: bool,
    pub endpoint: String,
    pub connected: bool,
    pub connected_for_seconds: Option<u64>,
    pub last_refresh_seconds_ago: Option<u64>,
    /// This node's address as the discovery service sees it.
    pub public_ip: Option<String>,
    pub last_error: Option<String>,
    /// Affiliates known, from the service or kept from the state directory.
    pub affiliates: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerLine {
    pub label: String,
    pub public_key: String,
    pub state: String,
    /// The endpoint WireGuard uses now.
    pub endpoint: Option<String>,
    /// Endpoints the peer advertises.
    pub candidates: usize,
    /// Endpoints tried since the peer appeared.
    pub tried: u64,
    pub last_handshake_seconds_ago: Option<u64>,
    pub receive_bytes: u64,
    pub transmit_bytes: u64,
    /// Why the peer is not up; empty when it is.
    pub reason: String,
}

fn age(now: SystemTime, then: Option<SystemTime>) -> Option<u64> {
    then.map(|t| now.duration_since(t).unwrap_or_default().as_secs())
}

/// A short human form of a duration: `42s`, `5m10s`, `2h3m`.
pub fn short_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Why a peer is not up, in a few words a user can act on.
pub fn reason(spec: &PeerSpec, st: &PeerStatus, now: SystemTime, timing: &Timing) -> String {
    if st.state == PeerState::Up {
        return String::new();
    }
    let n = spec.endpoints.len();
    if n == 0 && st.endpoint.is_none() {
        return "no endpoint: the peer advertises none and has not reached us".into();
    }
    let since_change = st
        .last_endpoint_change
        .map(|t| now.duration_since(t).unwrap_or_default());
    if let (Some(ep), Some(elapsed)) = (st.last_used_endpoint, since_change)
        && elapsed < timing.endpoint_connect_timeout
    {
        let left = timing.endpoint_connect_timeout - elapsed;
        let position = spec
            .endpoints
            .iter()
            .position(|&e| e == ep)
            .map_or_else(|| "learned".to_string(), |i| format!("{} of {n}", i + 1));
        return format!(
            "trying endpoint {ep} ({position}), {} left for a handshake",
            short_duration(left.as_secs().max(1))
        );
    }
    match age(now, st.last_handshake) {
        None => format!("no handshake yet; rotating through {n} endpoint(s)"),
        Some(a) => format!(
            "no handshake for {}; rotating through {n} endpoint(s)",
            short_duration(a)
        ),
    }
}

/// The report at `now`.
pub fn report(view: &NodeView, now: SystemTime) -> StatusReport {
    let discovery = match &view.discovery {
        None => DiscoveryStatus {
            affiliates: view.affiliates.len(),
            ..Default::default()
        },
        Some(d) => DiscoveryStatus {
            enabled: true,
            endpoint: d.connection.endpoint.to_string(),
            connected: d.connection.connected,
            connected_for_seconds: d
                .connection
                .connected
                .then(|| age(now, d.connection.connected_since))
                .flatten(),
            last_refresh_seconds_ago: age(now, d.connection.last_refresh),
            public_ip: d.public_ip.map(|ip| ip.to_string()),
            last_error: d.connection.last_error.clone(),
            affiliates: view.affiliates.len(),
        },
    };
    let peers = view
        .specs
        .iter()
        .map(|(key, spec)| {
            let st = view.statuses.get(key).cloned().unwrap_or_default();
            PeerLine {
                label: spec.label.clone(),
                public_key: key.clone(),
                state: st.state.as_str().into(),
                endpoint: st.endpoint.map(|e| e.to_string()),
                candidates: spec.endpoints.len(),
                tried: view.endpoint_attempts.get(key).copied().unwrap_or(0),
                last_handshake_seconds_ago: age(now, st.last_handshake),
                receive_bytes: st.rx_bytes,
                transmit_bytes: st.tx_bytes,
                reason: reason(spec, &st, now, &view.timing),
            }
        })
        .collect();
    let skipped = view.discovery.as_ref().map_or(0, |d| {
        d.counters.skipped_decrypt + d.counters.skipped_decode
    });
    StatusReport {
        node_id: view.node_id.clone(),
        public_key: view.public_key.clone(),
        address: view
            .kubespan_address
            .map(|a| a.to_string())
            .unwrap_or_default(),
        backend: view.backend.clone(),
        discovery,
        peers,
        affiliates_skipped: skipped,
        reconciles: view.reconciles,
        reconcile_errors: view.reconcile_errors,
    }
}

/// Whether every peer is up and discovery (if enabled) is connected.
pub fn healthy(r: &StatusReport) -> bool {
    r.peers.iter().all(|p| p.state == "up") && (!r.discovery.enabled || r.discovery.connected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn spec(endpoints: &[&str]) -> PeerSpec {
        PeerSpec {
            node_id: "n".into(),
            address: "fd00::1".parse().unwrap(),
            allowed_ips: vec![],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            label: "peer".into(),
        }
    }

    #[test]
    fn reasons_say_why_a_peer_is_not_up() {
        let timing = Timing::default();
        let none = spec(&[]);
        assert_eq!(
            reason(&none, &PeerStatus::default(), t(0), &timing),
            "no endpoint: the peer advertises none and has not reached us"
        );
        let two = spec(&["10.0.0.1:51820", "10.0.0.2:51820"]);
        let trying = PeerStatus {
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            last_used_endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            last_endpoint_change: Some(t(100)),
            ..Default::default()
        };
        assert_eq!(
            reason(&two, &trying, t(105), &timing),
            "trying endpoint 10.0.0.2:51820 (2 of 2), 10s left for a handshake"
        );
        let down = PeerStatus {
            state: PeerState::Down,
            last_handshake: Some(t(0)),
            ..trying.clone()
        };
        assert_eq!(
            reason(&two, &down, t(400), &timing),
            "no handshake for 6m40s; rotating through 2 endpoint(s)"
        );
        let never = PeerStatus {
            state: PeerState::Down,
            ..trying
        };
        assert_eq!(
            reason(&two, &never, t(200), &timing),
            "no handshake yet; rotating through 2 endpoint(s)"
        );
        let up = PeerStatus {
            state: PeerState::Up,
            ..never
        };
        assert_eq!(reason(&two, &up, t(200), &timing), "");
    }

    #[test]
    fn report_lists_every_peer_with_counters() {
        let mut view = NodeView {
            node_id: "self".into(),
            kubespan_address: Some("fd7f::1".parse().unwrap()),
            backend: "userspace".into(),
            ..Default::default()
        };
        view.specs
            .insert("k1".into(), spec(&["10.0.0.1:51820", "10.0.0.2:51820"]));
        view.statuses.insert(
            "k1".into(),
            PeerStatus {
                state: PeerState::Up,
                endpoint: Some("10.0.0.1:51820".parse().unwrap()),
                last_handshake: Some(t(90)),
                rx_bytes: 7,
                tx_bytes: 9,
                ..Default::default()
            },
        );
        view.endpoint_attempts.insert("k1".into(), 1);
        let r = report(&view, t(100));
        assert_eq!(r.address, "fd7f::1");
        assert!(!r.discovery.enabled);
        assert_eq!(r.peers.len(), 1);
        let p = &r.peers[0];
        assert_eq!(
            (
                p.state.as_str(),
                p.candidates,
                p.tried,
                p.last_handshake_seconds_ago
            ),
            ("up", 2, 1, Some(10))
        );
        assert_eq!((p.receive_bytes, p.transmit_bytes), (7, 9));
        assert!(healthy(&r));
        // JSON round trip: what the CLI receives is what the daemon built.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), r);
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(5), "5s");
        assert_eq!(short_duration(65), "1m5s");
        assert_eq!(short_duration(7260), "2h1m");
        assert_eq!(short_duration(90000), "1d1h");
    }
}
