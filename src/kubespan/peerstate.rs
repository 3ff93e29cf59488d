//! Peer state machine and endpoint rotation (spec §8.3, §8.4).
//!
//! Mirrors Talos `adapters/kubespan/peer_status.go` (`CalculateState`, `ShouldChangeEndpoint`,
//! `PickNewEndpoint`, `UpdateEndpoint`, `UpdateFromWireguard`) and the per-peer part of the
//! `ManagerController` loop, with `now` passed in. WireGuard reports handshakes as wall-clock
//! times, so all instants here are [`SystemTime`].
//!
//! [`next_deadline`] is not in Talos: it tells the caller when a peer's state would next change
//! if nothing else happened, so the daemon can wake exactly then instead of on a fixed tick.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// `KubeSpanPeerStatus.state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PeerState {
    #[default]
    Unknown,
    Up,
    Down,
}

impl PeerState {
    /// The YAML/text form Talos prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The KubeSpan timers. `Default` is the Talos constants (spec §2, §8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// C: how long a freshly set endpoint gets to complete a handshake.
    pub endpoint_connect_timeout: Duration,
    /// D: no handshake for this long means down. WireGuard handshake timeout 180 s + rekey
    /// timeout 5 s + rekey-attempt time 90 s.
    pub peer_down_interval: Duration,
    /// Persistent keepalive configured on every peer.
    pub keepalive: Duration,
    /// Talos re-evaluates all peers on this tick.
    pub reconcile_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            endpoint_connect_timeout: Duration::from_secs(15),
            peer_down_interval: Duration::from_secs(275),
            keepalive: Duration::from_secs(25),
            reconcile_interval: Duration::from_secs(30),
        }
    }
}

/// `KubeSpanPeerStatus` without the label (the caller joins it from the peer spec).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    /// The endpoint WireGuard currently reports for the peer.
    pub endpoint: Option<SocketAddr>,
    /// The last endpoint KubeSpan itself configured.
    pub last_used_endpoint: Option<SocketAddr>,
    /// When KubeSpan last configured an endpoint (T0).
    pub last_endpoint_change: Option<SystemTime>,
    /// Last completed handshake (H); `None` if there never was one.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub state: PeerState,
}

/// What the WireGuard device reports for one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WgObservation {
    pub endpoint: Option<SocketAddr>,
    /// `None` when the device reports no handshake (the zero timestamp).
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Talos `UpdateFromWireguard`: copy what the device reports, except that a
/// handshake once seen is not forgotten. Kernel WireGuard keeps a peer's last
/// handshake time for as long as the peer exists, and the state rules assume
/// that; boringtun reports none as soon as the current session has expired
/// (after 180 s, since it does not rekey on keepalives), which made idle peers
/// flap to `down` every few minutes until the next handshake.
pub fn update_from_wireguard(status: &mut PeerStatus, observed: &WgObservation) {
    status.endpoint = observed.endpoint;
    if observed.last_handshake.is_some() {
        status.last_handshake = observed.last_handshake;
    }
    status.rx_bytes = observed.rx_bytes;
    status.tx_bytes = observed.tx_bytes;
}

/// `now - then`, as Go's `time.Since` would see it: possibly negative when the clock went back.
#[derive(Clone, Copy)]
enum Since {
    /// `then` is Go's zero time: infinitely long ago for every comparison here.
    Never,
    Negative,
    Elapsed(Duration),
}

impl Since {
    fn of(now: SystemTime, then: Option<SystemTime>) -> Self {
        match then {
            None => Self::Never,
            Some(then) => now
                .duration_since(then)
                .map_or(Self::Negative, Self::Elapsed),
        }
    }

    fn lt(self, bound: Duration) -> bool {
        match self {
            Self::Never => false,
            Self::Negative => true,
            Self::Elapsed(d) => d < bound,
        }
    }

    fn gt(self, bound: Duration) -> bool {
        match self {
            Self::Never => true,
            Self::Negative => false,
            Self::Elapsed(d) => d > bound,
        }
    }
}

/// Talos `CalculateState` (spec §8.3), evaluated at `now`.
///
/// | time since T0 | state |
/// | --- | --- |
/// | > D | up if the last handshake is less than D old, else down |
/// | < C | up if a handshake happened after T0, else unknown |
/// | otherwise | up if a handshake happened after T0, else down |
///
/// Then down without any endpoint ever configured is unknown.
pub fn compute_state(status: &PeerStatus, now: SystemTime, timing: &Timing) -> PeerState {
    let since_change = Since::of(now, status.last_endpoint_change);
    let since_handshake = Since::of(now, status.last_handshake);
    let handshake_after_change = match (status.last_handshake, status.last_endpoint_change) {
        (Some(h), Some(t0)) => h > t0,
        // Any real handshake is after Go's zero time.
        (Some(_), None) => true,
        (None, _) => false,
    };

    let state = if since_change.gt(timing.peer_down_interval) {
        if since_handshake.lt(timing.peer_down_interval) {
            PeerState::Up
        } else {
            PeerState::Down
        }
    } else if handshake_after_change {
        PeerState::Up
    } else if since_change.lt(timing.endpoint_connect_timeout) {
        PeerState::Unknown
    } else {
        PeerState::Down
    };

    if state == PeerState::Down && status.last_used_endpoint.is_none() {
        PeerState::Unknown
    } else {
        state
    }
}

/// Talos `ShouldChangeEndpoint`: the peer is down, or KubeSpan never chose an endpoint.
pub fn should_change_endpoint(status: &PeerStatus) -> bool {
    status.state == PeerState::Down || status.last_used_endpoint.is_none()
}

/// Talos `PickNewEndpoint` (spec §8.4): the first endpoint if none was ever chosen, else the
/// one after the last used one (wrapping, or the first if it is gone from the list). A single
/// endpoint that is already in use, and still what WireGuard reports, cannot be rotated.
pub fn pick_new_endpoint(status: &PeerStatus, endpoints: &[SocketAddr]) -> Option<SocketAddr> {
    let first = *endpoints.first()?;
    let Some(last_used) = status.last_used_endpoint else {
        return Some(first);
    };
    let position = endpoints.iter().position(|&e| e == last_used);
    if endpoints.len() == 1 && position == Some(0) && status.endpoint == Some(last_used) {
        return None;
    }
    let next = position.map_or(0, |i| (i + 1) % endpoints.len());
    Some(endpoints[next])
}

/// Talos `UpdateEndpoint`: KubeSpan configures `endpoint` now.
pub fn update_endpoint(status: &mut PeerStatus, endpoint: SocketAddr, now: SystemTime) {
    status.endpoint = Some(endpoint);
    status.last_used_endpoint = Some(endpoint);
    status.last_endpoint_change = Some(now);
    status.state = PeerState::Unknown;
}

/// Whether and why to hand an endpoint to WireGuard for this peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointUpdate {
    /// Leave the WireGuard peer's endpoint as it is (it may be one WireGuard learned from the
    /// peer itself).
    Keep,
    /// A newly chosen endpoint (first choice or rotation).
    NewChoice(SocketAddr),
    /// Push the last chosen endpoint again: WireGuard reports none, or the same one.
    Reassert(SocketAddr),
}

/// The outcome of one [`step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The state before this step.
    pub previous_state: PeerState,
    /// The state after this step (also written to the status).
    pub state: PeerState,
    pub endpoint: EndpointUpdate,
}

impl Decision {
    /// The endpoint to set on the WireGuard peer, if any.
    pub fn endpoint_to_push(&self) -> Option<SocketAddr> {
        match self.endpoint {
            EndpointUpdate::Keep => None,
            EndpointUpdate::NewChoice(e) | EndpointUpdate::Reassert(e) => Some(e),
        }
    }

    /// True when a new endpoint was chosen (Talos then rewrites link and routes too).
    pub fn endpoint_changed(&self) -> bool {
        matches!(self.endpoint, EndpointUpdate::NewChoice(_))
    }

    /// True when the peer moved between unknown/up/down; with `allowDownPeerBypass` this
    /// changes the routed set.
    pub fn state_changed(&self) -> bool {
        self.previous_state != self.state
    }
}

/// One reconcile of one peer, as the Talos `ManagerController` does it:
///
/// 1. copy the WireGuard observation into the status (if the device knows the peer);
/// 2. compute the state at `now`;
/// 3. if down or never configured, pick the next endpoint from `spec_endpoints`;
/// 4. otherwise re-assert the last chosen endpoint if WireGuard reports none or that same
///    one. If WireGuard reports a different endpoint, the peer roamed (e.g. reached us from
///    behind NAT) and the endpoint is left alone while the peer is not down.
pub fn step(
    status: &mut PeerStatus,
    spec_endpoints: &[SocketAddr],
    observed: Option<&WgObservation>,
    now: SystemTime,
    timing: &Timing,
) -> Decision {
    let previous_state = status.state;
    if let Some(observed) = observed {
        update_from_wireguard(status, observed);
    }
    status.state = compute_state(status, now, timing);

    let mut endpoint = EndpointUpdate::Keep;
    if should_change_endpoint(status)
        && let Some(new) = pick_new_endpoint(status, spec_endpoints)
    {
        update_endpoint(status, new, now);
        endpoint = EndpointUpdate::NewChoice(new);
    }
    if endpoint == EndpointUpdate::Keep
        && let Some(last_used) = status.last_used_endpoint
        && status.endpoint.is_none_or(|e| e == last_used)
    {
        status.endpoint = Some(last_used);
        endpoint = EndpointUpdate::Reassert(last_used);
    }

    Decision {
        previous_state,
        state: status.state,
        endpoint,
    }
}

/// The earliest instant after `now` at which [`compute_state`] gives a different answer for
/// this status, with no new input; `None` if it never would.
///
/// The state only depends on time through T0 + C (a fresh endpoint times out), T0 + D (the
/// rule switches to the handshake-age test) and H + D (the last handshake gets too old), so it
/// suffices to evaluate those instants. Call it after [`step`]: a peer found down there has
/// already been given its next endpoint, so its deadline is that endpoint's timeout.
pub fn next_deadline(status: &PeerStatus, now: SystemTime, timing: &Timing) -> Option<SystemTime> {
    let current = compute_state(status, now, timing);
    let c = timing.endpoint_connect_timeout;
    let d = timing.peer_down_interval;
    let mut candidates: Vec<SystemTime> = Vec::with_capacity(3);
    if let Some(t0) = status.last_endpoint_change {
        candidates.extend(t0.checked_add(c));
        // `> D` is strict: the rule changes one tick after T0 + D.
        candidates.extend(t0.checked_add(d + Duration::from_nanos(1)));
    }
    if let Some(h) = status.last_handshake {
        candidates.extend(h.checked_add(d));
    }
    candidates.retain(|&t| t > now);
    candidates.sort_unstable();
    candidates
        .into_iter()
        .find(|&t| compute_state(status, t, timing) != current)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const C: Duration = Duration::from_secs(15);
    const D: Duration = Duration::from_secs(275);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_expired_userspace_session_does_not_make_an_idle_peer_down() {
        let timing = Timing::default();
        let endpoints = [ep("192.0.2.1:51820")];
        let mut status = PeerStatus::default();
        // Configured at t(0), handshake at t(1).
        step(&mut status, &endpoints, None, t(0), &timing);
        let seen = |h: Option<SystemTime>| WgObservation {
            endpoint: Some(endpoints[0]),
            last_handshake: h,
            ..Default::default()
        };
        let d = step(
            &mut status,
            &endpoints,
            Some(&seen(Some(t(1)))),
            t(2),
            &timing,
        );
        assert_eq!(d.state, PeerState::Up);
        // boringtun drops the session 180 s later and reports no handshake
        // until the keepalive has brought a new one.
        let d = step(&mut status, &endpoints, Some(&seen(None)), t(190), &timing);
        assert_eq!(d.state, PeerState::Up);
        assert_eq!(status.last_handshake, Some(t(1)));
        let d = step(
            &mut status,
            &endpoints,
            Some(&seen(Some(t(200)))),
            t(201),
            &timing,
        );
        assert_eq!(d.state, PeerState::Up);
        assert_eq!(status.last_handshake, Some(t(200)));
        // Without any new handshake the peer still goes down after D.
        let d = step(
            &mut status,
            &endpoints,
            Some(&seen(None)),
            t(200) + D + Duration::from_secs(1),
            &timing,
        );
        assert_eq!(d.state, PeerState::Down);
    }

    #[test]
    fn talos_defaults() {
        let timing = Timing::default();
        assert_eq!(timing.endpoint_connect_timeout, C);
        assert_eq!(timing.peer_down_interval, D);
        assert_eq!(timing.keepalive, Duration::from_secs(25));
        assert_eq!(timing.reconcile_interval, Duration::from_secs(30));
        assert_eq!(PeerState::default().to_string(), "unknown");
        assert_eq!(PeerState::Up.as_str(), "up");
        assert_eq!(PeerState::Down.to_string(), "down");
    }

    /// Talos TestPeerStatus_PickNewEndpoint, step by step.
    #[test]
    fn rotation_sequence() {
        let mut status = PeerStatus::default();
        let now = t(0);

        assert_eq!(pick_new_endpoint(&status, &[]), None);

        let endpoints = [ep("10.3.4.5:10500"), ep("192.168.3.8:457")];

        // first choice: the first endpoint
        let e = pick_new_endpoint(&status, &endpoints).unwrap();
        assert_eq!(e, endpoints[0]);
        update_endpoint(&mut status, e, now);

        // then the second
        let e = pick_new_endpoint(&status, &endpoints).unwrap();
        assert_eq!(e, endpoints[1]);
        update_endpoint(&mut status, e, now);

        // then wrap around to the first
        let e = pick_new_endpoint(&status, &endpoints).unwrap();
        assert_eq!(e, endpoints[0]);
        update_endpoint(&mut status, e, now);

        // a single endpoint already in use cannot be rotated
        assert_eq!(pick_new_endpoint(&status, &endpoints[..1]), None);

        // a single different endpoint can
        let e = pick_new_endpoint(&status, &endpoints[1..]).unwrap();
        assert_eq!(e, endpoints[1]);
        update_endpoint(&mut status, e, now);

        // a totally new list restarts at its first entry
        let fresh = [ep("10.3.4.5:10501"), ep("192.168.3.8:458")];
        assert_eq!(pick_new_endpoint(&status, &fresh), Some(fresh[0]));
    }

    #[test]
    fn single_endpoint_is_retried_when_wireguard_lost_it() {
        let only = ep("10.0.0.1:51820");
        let status = PeerStatus {
            last_used_endpoint: Some(only),
            endpoint: None,
            ..Default::default()
        };
        assert_eq!(pick_new_endpoint(&status, &[only]), Some(only));
    }

    /// Talos TestPeerStatus_CalculateState.
    #[test]
    fn state_table() {
        let now = t(10_000);
        let used = Some(ep("192.168.1.1:10000"));
        let cases = [
            (
                "no endpoint set",
                Duration::from_secs(3600),
                Duration::from_secs(3600),
                None,
                PeerState::Unknown,
            ),
            ("peer is down", 2 * D, 2 * D, used, PeerState::Down),
            (
                "fresh peer, no handshake",
                2 * D,
                C / 2,
                used,
                PeerState::Unknown,
            ),
            (
                "fresh peer, with handshake",
                Duration::ZERO,
                C / 2,
                used,
                PeerState::Up,
            ),
            (
                "after initial timeout, with handshake",
                Duration::ZERO,
                C + Duration::from_secs(1),
                used,
                PeerState::Up,
            ),
            (
                "after initial timeout, no handshake",
                2 * C,
                C + Duration::from_secs(1),
                used,
                PeerState::Down,
            ),
            (
                "established peer, up",
                D / 2,
                D + Duration::from_secs(1),
                used,
                PeerState::Up,
            ),
        ];
        for (name, since_handshake, since_change, last_used, want) in cases {
            let status = PeerStatus {
                last_handshake: Some(now - since_handshake),
                last_endpoint_change: Some(now - since_change),
                last_used_endpoint: last_used,
                ..Default::default()
            };
            assert_eq!(
                compute_state(&status, now, &Timing::default()),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn boundaries_are_exact() {
        let timing = Timing::default();
        let used = Some(ep("10.0.0.1:51820"));
        let t0 = t(0);
        let waiting = PeerStatus {
            last_used_endpoint: used,
            last_endpoint_change: Some(t0),
            ..Default::default()
        };
        let just_before = t0 + C - Duration::from_nanos(1);
        assert_eq!(
            compute_state(&waiting, just_before, &timing),
            PeerState::Unknown
        );
        assert_eq!(compute_state(&waiting, t0 + C, &timing), PeerState::Down);

        let h = t(100);
        let up = PeerStatus {
            last_handshake: Some(h),
            ..waiting.clone()
        };
        assert_eq!(
            compute_state(&up, h + D - Duration::from_nanos(1), &timing),
            PeerState::Up
        );
        assert_eq!(compute_state(&up, h + D, &timing), PeerState::Down);
    }

    #[test]
    fn handshake_without_endpoint_change_is_up() {
        // The peer dialled us before we ever chose an endpoint for it (e.g. it has none).
        let now = t(1000);
        let status = PeerStatus {
            last_handshake: Some(now - Duration::from_secs(5)),
            ..Default::default()
        };
        assert_eq!(
            compute_state(&status, now, &Timing::default()),
            PeerState::Up
        );
        // ...and unknown, not down, once that gets old, since we never configured anything.
        assert_eq!(
            compute_state(&status, now + D, &Timing::default()),
            PeerState::Unknown
        );
    }

    #[test]
    fn clock_going_back_counts_as_fresh() {
        let status = PeerStatus {
            last_used_endpoint: Some(ep("10.0.0.1:51820")),
            last_endpoint_change: Some(t(100)),
            ..Default::default()
        };
        assert_eq!(
            compute_state(&status, t(50), &Timing::default()),
            PeerState::Unknown
        );
    }

    #[test]
    fn new_peer_gets_first_endpoint_and_unknown_state() {
        let mut status = PeerStatus::default();
        let eps = [ep("10.0.0.1:51820"), ep("10.0.0.2:51820")];
        let d = step(&mut status, &eps, None, t(0), &Timing::default());
        assert_eq!(d.endpoint, EndpointUpdate::NewChoice(eps[0]));
        assert!(d.endpoint_changed());
        assert_eq!(d.endpoint_to_push(), Some(eps[0]));
        assert_eq!(d.state, PeerState::Unknown);
        assert_eq!(status.last_used_endpoint, Some(eps[0]));
        assert_eq!(status.endpoint, Some(eps[0]));
        assert_eq!(status.last_endpoint_change, Some(t(0)));
    }

    #[test]
    fn peer_without_endpoints_is_left_alone() {
        let mut status = PeerStatus::default();
        let d = step(&mut status, &[], None, t(0), &Timing::default());
        assert_eq!(d.endpoint, EndpointUpdate::Keep);
        assert_eq!(d.state, PeerState::Unknown);
        assert_eq!(next_deadline(&status, t(0), &Timing::default()), None);
    }

    /// Unreachable endpoints are walked every C until a handshake; then the peer is up until
    /// its last handshake is D old.
    #[test]
    fn walks_endpoints_until_handshake_then_stays_up() {
        let timing = Timing::default();
        let eps = [ep("10.0.0.1:51820"), ep("10.0.0.2:51820")];
        let mut status = PeerStatus::default();
        let no_handshake = WgObservation::default();

        step(&mut status, &eps, None, t(0), &timing);
        assert_eq!(next_deadline(&status, t(0), &timing), Some(t(0) + C));

        // Before the timeout: still unknown, the same endpoint is re-asserted (WG shows none).
        let d = step(&mut status, &eps, Some(&no_handshake), t(10), &timing);
        assert_eq!(d.endpoint, EndpointUpdate::Reassert(eps[0]));
        assert_eq!(d.state, PeerState::Unknown);

        // At the deadline: down, so rotate to the second endpoint; unknown again.
        let d = step(&mut status, &eps, Some(&no_handshake), t(15), &timing);
        assert_eq!(d.previous_state, PeerState::Unknown);
        assert_eq!(d.endpoint, EndpointUpdate::NewChoice(eps[1]));
        assert_eq!(d.state, PeerState::Unknown);
        assert_eq!(next_deadline(&status, t(15), &timing), Some(t(30)));

        // Wrap around.
        let d = step(&mut status, &eps, Some(&no_handshake), t(30), &timing);
        assert_eq!(d.endpoint, EndpointUpdate::NewChoice(eps[0]));

        // A handshake through the first endpoint.
        let hs = WgObservation {
            endpoint: Some(eps[0]),
            last_handshake: Some(t(33)),
            rx_bytes: 148,
            tx_bytes: 92,
        };
        let d = step(&mut status, &eps, Some(&hs), t(35), &timing);
        assert_eq!(d.state, PeerState::Up);
        assert!(d.state_changed());
        assert_eq!(d.endpoint, EndpointUpdate::Reassert(eps[0]));
        assert_eq!((status.rx_bytes, status.tx_bytes), (148, 92));
        assert_eq!(next_deadline(&status, t(35), &timing), Some(t(33) + D));

        // Up stays up past T0 + D as long as handshakes are fresh...
        let fresh = WgObservation {
            last_handshake: Some(t(300)),
            ..hs.clone()
        };
        let d = step(&mut status, &eps, Some(&fresh), t(310), &timing);
        assert_eq!(d.state, PeerState::Up);
        assert!(!d.endpoint_changed());
        // ...and is declared down only D after the last one, then rotation resumes.
        let d = step(&mut status, &eps, Some(&fresh), t(300) + D, &timing);
        assert_eq!(d.previous_state, PeerState::Up);
        assert_eq!(d.endpoint, EndpointUpdate::NewChoice(eps[1]));
    }

    #[test]
    fn roamed_endpoint_is_not_overwritten() {
        let timing = Timing::default();
        let configured = ep("10.0.0.1:51820");
        let roamed = ep("203.0.113.9:40001");
        let mut status = PeerStatus::default();
        step(&mut status, &[configured], None, t(0), &timing);

        // The peer reached us from behind NAT: WireGuard learned a different endpoint.
        let observed = WgObservation {
            endpoint: Some(roamed),
            last_handshake: Some(t(5)),
            rx_bytes: 1,
            tx_bytes: 1,
        };
        for now in [t(10), t(20), t(200), t(5) + D - Duration::from_secs(1)] {
            let d = step(&mut status, &[configured], Some(&observed), now, &timing);
            assert_eq!(d.endpoint, EndpointUpdate::Keep, "at {now:?}");
            assert_eq!(d.state, PeerState::Up);
            assert_eq!(status.endpoint, Some(roamed));
            assert_eq!(status.last_used_endpoint, Some(configured));
        }

        // Talos behaviour once the roamed path is dead for D: the peer is down and KubeSpan
        // rotates (here back to its only advertised endpoint).
        let d = step(
            &mut status,
            &[configured],
            Some(&observed),
            t(5) + D,
            &timing,
        );
        assert_eq!(d.previous_state, PeerState::Up);
        assert_eq!(d.endpoint, EndpointUpdate::NewChoice(configured));
    }

    #[test]
    fn single_endpoint_down_peer_is_reasserted_not_reset() {
        let timing = Timing::default();
        let only = ep("10.0.0.1:51820");
        let mut status = PeerStatus::default();
        step(&mut status, &[only], None, t(0), &timing);
        let observed = WgObservation {
            endpoint: Some(only),
            ..Default::default()
        };
        let d = step(&mut status, &[only], Some(&observed), t(20), &timing);
        assert_eq!(d.state, PeerState::Down);
        // Cannot rotate; T0 is kept, so the state stays down and is re-asserted each time.
        assert_eq!(d.endpoint, EndpointUpdate::Reassert(only));
        assert_eq!(status.last_endpoint_change, Some(t(0)));
        assert_eq!(next_deadline(&status, t(20), &timing), None);
    }

    #[test]
    fn status_without_observation_keeps_old_wireguard_data() {
        let timing = Timing::default();
        let mut status = PeerStatus {
            last_handshake: Some(t(0)),
            rx_bytes: 7,
            ..Default::default()
        };
        step(&mut status, &[], None, t(10), &timing);
        assert_eq!(status.last_handshake, Some(t(0)));
        assert_eq!(status.rx_bytes, 7);
    }

    fn arb_status() -> impl Strategy<Value = PeerStatus> {
        (
            prop::option::of(0u64..2000),
            prop::option::of(0u64..2000),
            any::<bool>(),
        )
            .prop_map(|(t0, h, used)| PeerStatus {
                last_endpoint_change: t0.map(t),
                last_handshake: h.map(t),
                last_used_endpoint: used.then(|| ep("10.0.0.1:51820")),
                ..Default::default()
            })
    }

    proptest! {
        /// The state is constant from `now` until the deadline and differs at it; without a
        /// deadline it never changes.
        #[test]
        fn deadline_is_exactly_the_next_change(status in arb_status(), now in 0u64..2500) {
            let timing = Timing::default();
            let now = t(now);
            let current = compute_state(&status, now, &timing);
            let deadline = next_deadline(&status, now, &timing);

            let mut probes = vec![now, now + Duration::from_secs(10_000)];
            for base in [status.last_endpoint_change, status.last_handshake].into_iter().flatten() {
                for offset in [C, D, D + Duration::from_nanos(1)] {
                    let edge = base + offset;
                    probes.extend([edge - Duration::from_nanos(1), edge, edge + Duration::from_nanos(1)]);
                }
            }
            probes.extend((0..300).map(|i| now + Duration::from_secs(i * 10)));

            for probe in probes.into_iter().filter(|&p| p >= now) {
                let before_deadline = deadline.is_none_or(|d| probe < d);
                if before_deadline {
                    prop_assert_eq!(compute_state(&status, probe, &timing), current, "probe {:?}", probe);
                }
            }
            if let Some(d) = deadline {
                prop_assert!(d > now);
                prop_assert_ne!(compute_state(&status, d, &timing), current);
            }
        }
    }
}
