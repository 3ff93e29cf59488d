//! The routed set: destinations that are marked into the KubeSpan tunnel (spec §4.4, §4.5).

use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::BTreeMap;

use super::ipset::IpSet;
use super::peerspec::PeerSpec;
use super::peerstate::{PeerState, PeerStatus};
use crate::core::ula::{UlaPurpose, is_ula};

/// Minimal prefix lists per family, ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutedSet {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl RoutedSet {
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// Union of the AllowedIPs of every peer that is up, or of every peer when `force_routing`
/// (i.e. `allowDownPeerBypass` is off, the default). Peers without a status count as unknown.
///
/// Prefixes that are KubeSpan ULAs are left out, as current Talos does: the KubeSpan /64 is
/// on-link on the `kubespan` interface already. The test is on the prefix's address, so only
/// the peers' `/128` KubeSpan addresses (and any prefix starting inside a KubeSpan /64) drop out.
pub fn routed_set(
    specs: &BTreeMap<String, PeerSpec>,
    statuses: &BTreeMap<String, PeerStatus>,
    force_routing: bool,
) -> RoutedSet {
    let prefixes = specs
        .iter()
        .filter(|(key, _)| {
            force_routing || statuses.get(*key).is_some_and(|s| s.state == PeerState::Up)
        })
        .flat_map(|(_, spec)| spec.allowed_ips.iter().copied())
        .filter(|net| !is_ula(net.network(), UlaPurpose::KubeSpan));
    let set = IpSet::from_prefixes(prefixes);
    RoutedSet {
        v4: set.v4_prefixes(),
        v6: set.v6_prefixes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allowed: &[&str]) -> PeerSpec {
        PeerSpec {
            node_id: "n".into(),
            address: "fd7f:175a:b97c:5602::1".parse().unwrap(),
            allowed_ips: allowed.iter().map(|s| s.parse().unwrap()).collect(),
            endpoints: vec![],
            label: String::new(),
        }
    }

    fn status(state: PeerState) -> PeerStatus {
        PeerStatus {
            state,
            ..Default::default()
        }
    }

    fn fixture() -> (BTreeMap<String, PeerSpec>, BTreeMap<String, PeerStatus>) {
        let specs = BTreeMap::from([
            (
                "up".to_string(),
                spec(&[
                    "10.244.3.0/25",
                    "192.168.3.4/32",
                    "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128",
                ]),
            ),
            (
                "down".to_string(),
                spec(&[
                    "10.244.3.128/25",
                    "2001:db8::/64",
                    "fd7f:175a:b97c:5602:e871:1bff:feb2:ccee/128",
                ]),
            ),
            ("nostatus".to_string(), spec(&["172.16.0.9/32"])),
        ]);
        let statuses = BTreeMap::from([
            ("up".to_string(), status(PeerState::Up)),
            ("down".to_string(), status(PeerState::Down)),
        ]);
        (specs, statuses)
    }

    fn strs<T: ToString>(v: &[T]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn forced_routing_takes_every_peer_and_collapses() {
        let (specs, statuses) = fixture();
        let set = routed_set(&specs, &statuses, true);
        assert_eq!(
            strs(&set.v4),
            ["10.244.3.0/24", "172.16.0.9/32", "192.168.3.4/32"]
        );
        assert_eq!(strs(&set.v6), ["2001:db8::/64"]);
    }

    #[test]
    fn bypass_takes_only_up_peers() {
        let (specs, mut statuses) = fixture();
        let set = routed_set(&specs, &statuses, false);
        assert_eq!(strs(&set.v4), ["10.244.3.0/25", "192.168.3.4/32"]);
        assert!(set.v6.is_empty());

        // Nothing up: nothing routed.
        statuses.insert("up".into(), status(PeerState::Unknown));
        assert!(routed_set(&specs, &statuses, false).is_empty());

        // Handshakes bring peers up again: the set is repopulated. A peer without a status
        // yet is unknown, so it stays out until it has one.
        for s in statuses.values_mut() {
            s.state = PeerState::Up;
        }
        assert!(
            !routed_set(&specs, &statuses, false)
                .v4
                .contains(&"172.16.0.9/32".parse().unwrap())
        );
        statuses.insert("nostatus".into(), status(PeerState::Up));
        assert_eq!(
            routed_set(&specs, &statuses, false),
            routed_set(&specs, &statuses, true)
        );
    }

    #[test]
    fn kubespan_ulas_are_left_out_but_other_ulas_are_not() {
        let specs = BTreeMap::from([(
            "p".to_string(),
            spec(&[
                "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169/128",
                "fdae:41e4:649b:9303::/64",
            ]),
        )]);
        let set = routed_set(&specs, &BTreeMap::new(), true);
        assert!(set.v4.is_empty());
        assert_eq!(strs(&set.v6), ["fdae:41e4:649b:9303::/64"]);
    }
}
