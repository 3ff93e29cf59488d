//! WireGuard peer specs from merged affiliates (spec §7, Talos `PeerSpecController`).
//!
//! One spec per remote affiliate that runs KubeSpan, keyed by its WireGuard public key. The
//! AllowedIPs are the peer's additional prefixes and node addresses, minus what it asks not
//! to be routed, plus its KubeSpan address; where two peers claim the same addresses, the
//! earlier node ID keeps them.
//!
//! One deliberate addition to Talos: addresses of the local node are removed from every
//! peer (see [`LocalNode`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use super::ipset::IpSet;
use crate::core::types::AffiliateSpec;

/// `KubeSpanPeerSpecs.kubespan.talos.dev`: what WireGuard is told about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's affiliate (node) ID; not part of the Talos resource, kept for reports.
    pub node_id: String,
    /// The peer's KubeSpan address.
    pub address: Ipv6Addr,
    /// Minimal CIDR list, IPv4 first, then IPv6, ascending.
    pub allowed_ips: Vec<IpNet>,
    /// The peer's advertised endpoints, in its order.
    pub endpoints: Vec<SocketAddr>,
    /// The peer's nodename (empty if it has none).
    pub label: String,
}

/// The local node, as far as peer specs care.
#[derive(Clone, Copy, Debug)]
pub struct LocalNode<'a> {
    /// The local affiliate is skipped: it is not a peer.
    pub node_id: &'a str,
    /// Our own node addresses. Talos lets a peer claim these; we remove them from every peer,
    /// because a peer owning one of our addresses would put that address in the routed set and
    /// traffic to ourselves (e.g. from pods, through prerouting) would be marked into the
    /// tunnel.
    pub addresses: &'a [IpAddr],
    /// Our own KubeSpan address, removed from every peer for the same reason.
    pub kubespan_address: Option<Ipv6Addr>,
}

/// Something worth a log line; the specs are still produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerSpecWarning {
    /// Talos "peer address overlap": `removed` was taken from this peer because an earlier
    /// (lower node ID) peer already has it.
    Overlap {
        public_key: String,
        node_id: String,
        other_public_key: String,
        other_node_id: String,
        removed: Vec<IpNet>,
    },
    /// The peer ends up with no AllowedIPs at all; it still gets a spec (Talos: "conflict
    /// resolution removed all ranges").
    NothingLeft { public_key: String, node_id: String },
    /// Not in Talos: the peer claims local addresses, which were removed from it.
    ClaimsLocalAddress {
        public_key: String,
        node_id: String,
        removed: Vec<IpNet>,
    },
    /// The peer publishes a public key but no KubeSpan address; Talos fails to build its IP set
    /// and skips it, and so do we.
    MissingKubeSpanAddress { public_key: String, node_id: String },
    /// Two affiliates publish the same public key. WireGuard can only have one peer per key:
    /// the later node ID's spec replaces the earlier one, as in Talos.
    DuplicatePublicKey {
        public_key: String,
        node_id: String,
        other_node_id: String,
    },
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for PeerSpecWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Overlap {
                public_key,
                node_id,
                other_public_key,
                other_node_id,
                removed,
            } => write!(
                f,
                "peer address overlap: {} removed from peer {public_key} (node {node_id}), \
                 already routed to peer {other_public_key} (node {other_node_id}); make the \
                 nodes publish disjoint addresses (e.g. keep VIPs out of node addresses)",
                join(removed)
            ),
            Self::NothingLeft {
                public_key,
                node_id,
            } => write!(
                f,
                "peer {public_key} (node {node_id}) has no allowed IPs left after overlap \
                 resolution; no traffic will be routed to it"
            ),
            Self::ClaimsLocalAddress {
                public_key,
                node_id,
                removed,
            } => write!(
                f,
                "peer {public_key} (node {node_id}) claims this node's own addresses {}; \
                 they were removed from its allowed IPs, check for duplicate addresses",
                join(removed)
            ),
            Self::MissingKubeSpanAddress {
                public_key,
                node_id,
            } => write!(
                f,
                "peer {public_key} (node {node_id}) publishes no KubeSpan address and was \
                 skipped; it must publish its KubeSpan address with its public key"
            ),
            Self::DuplicatePublicKey {
                public_key,
                node_id,
                other_node_id,
            } => write!(
                f,
                "nodes {other_node_id} and {node_id} publish the same WireGuard public key \
                 {public_key}; the spec of {node_id} wins. Regenerate the key on one of them"
            ),
        }
    }
}

/// The peer specs keyed by public key, and what went wrong building them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSpecs {
    pub specs: BTreeMap<String, PeerSpec>,
    pub warnings: Vec<PeerSpecWarning>,
}

/// Builds the peer specs from the merged affiliates (keyed by node ID; the local affiliate may
/// be among them and is skipped).
pub fn build_peer_specs(
    affiliates: &BTreeMap<String, AffiliateSpec>,
    local: &LocalNode<'_>,
) -> PeerSpecs {
    let local_set = IpSet::from_addrs(
        local
            .addresses
            .iter()
            .copied()
            .chain(local.kubespan_address.map(IpAddr::V6)),
    );

    let mut out = PeerSpecs::default();
    // Sets already handed out, by public key with the owning node ID. Keyed like Talos'
    // `peerIPSets`, so a duplicate key replaces the earlier entry.
    let mut accepted: BTreeMap<String, (String, IpSet)> = BTreeMap::new();

    // BTreeMap order = node ID order, plain byte-wise string comparison, which is how COSI
    // lists resources: this is what makes "earlier node ID wins" deterministic.
    for (node_id, affiliate) in affiliates {
        if node_id == local.node_id {
            continue;
        }
        let Some(ks) = &affiliate.kubespan else {
            continue;
        };
        if ks.public_key.is_empty() {
            continue;
        }
        let public_key = &ks.public_key;
        if ks.address.is_unspecified() {
            out.warnings.push(PeerSpecWarning::MissingKubeSpanAddress {
                public_key: public_key.clone(),
                node_id: node_id.clone(),
            });
            continue;
        }

        // Step 2: prefixes (masked to their network) and host routes, minus the peer's own
        // exclusions, then its KubeSpan address, which therefore cannot be excluded.
        let mut set = IpSet::from_parts(
            ks.additional_addresses.iter().copied(),
            affiliate.addresses.iter().copied(),
        )
        .difference(&IpSet::from_prefixes(
            ks.exclude_advertised_networks.iter().copied(),
        ));
        set.insert_addr(IpAddr::V6(ks.address));

        let claimed = set.intersection(&local_set);
        if !claimed.is_empty() {
            out.warnings.push(PeerSpecWarning::ClaimsLocalAddress {
                public_key: public_key.clone(),
                node_id: node_id.clone(),
                removed: claimed.prefixes(),
            });
            set = set.difference(&local_set);
        }

        // Step 3: earlier peers keep what they have; only the overlap leaves this one.
        for (other_key, (other_node, other_set)) in &accepted {
            let overlap = set.intersection(other_set);
            if overlap.is_empty() {
                continue;
            }
            out.warnings.push(PeerSpecWarning::Overlap {
                public_key: public_key.clone(),
                node_id: node_id.clone(),
                other_public_key: other_key.clone(),
                other_node_id: other_node.clone(),
                removed: overlap.prefixes(),
            });
            set = set.difference(other_set);
        }
        if set.is_empty() {
            out.warnings.push(PeerSpecWarning::NothingLeft {
                public_key: public_key.clone(),
                node_id: node_id.clone(),
            });
        }

        if let Some((previous_node, _)) = accepted.get(public_key) {
            out.warnings.push(PeerSpecWarning::DuplicatePublicKey {
                public_key: public_key.clone(),
                node_id: node_id.clone(),
                other_node_id: previous_node.clone(),
            });
        }

        out.specs.insert(
            public_key.clone(),
            PeerSpec {
                node_id: node_id.clone(),
                address: ks.address,
                allowed_ips: set.prefixes(),
                endpoints: ks.endpoints.clone(),
                label: affiliate.nodename.clone(),
            },
        );
        accepted.insert(public_key.clone(), (node_id.clone(), set));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::KubeSpanInfo;

    const NODE_A: &str = "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC";
    const NODE_B: &str = "9dwHNUViZlPlIervqX9Qo256RUhrfhgO0xBBnKcKl4F";
    const NODE_C: &str = "xCnFFfxylOf9i5ynhAkt6ZbfcqaLDGKfIa3gwpuaxe7F";
    const KEY_A: &str = "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=";
    const KEY_B: &str = "Zr5ewpUm2Ywo1c+/59WFKIBjZ3c/nVbIWsT5elbjwCU=";
    const KEY_C: &str = "mB6WlFOR66Jx5rtPMIpxJ3s4XHyer9NCzqWPP7idGRo";

    fn ks(key: &str, addr: &str, additional: &[&str], endpoints: &[&str]) -> KubeSpanInfo {
        KubeSpanInfo {
            public_key: key.into(),
            address: addr.parse().unwrap(),
            additional_addresses: additional.iter().map(|s| s.parse().unwrap()).collect(),
            exclude_advertised_networks: vec![],
            endpoints: endpoints.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn affiliate(
        node_id: &str,
        nodename: &str,
        addrs: &[&str],
        ks: Option<KubeSpanInfo>,
    ) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            nodename: nodename.into(),
            addresses: addrs.iter().map(|s| s.parse().unwrap()).collect(),
            kubespan: ks,
            ..Default::default()
        }
    }

    fn strs(nets: &[IpNet]) -> Vec<String> {
        nets.iter().map(ToString::to_string).collect()
    }

    fn nobody() -> LocalNode<'static> {
        LocalNode {
            node_id: "local-node-id",
            addresses: &[],
            kubespan_address: None,
        }
    }

    /// Talos peer_spec_test.go TestReconcile (affiliate4, the local node, shares its KubeSpan
    /// address with affiliate3 there; Talos does not look at local addresses, so neither does
    /// this run).
    #[test]
    fn talos_reconcile_vectors() {
        let local_id = "local-node-id";
        let affiliates = BTreeMap::from([
            (
                NODE_A.to_string(),
                affiliate(
                    NODE_A,
                    "bar",
                    &["192.168.3.4"],
                    Some(ks(
                        KEY_A,
                        "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
                        &["10.244.3.1/24", "10.244.3.0/32"],
                        &["10.0.0.2:51820", "192.168.3.4:51820"],
                    )),
                ),
            ),
            (
                NODE_B.to_string(),
                affiliate(NODE_B, "worker-1", &["192.168.3.5"], None),
            ),
            (
                NODE_C.to_string(),
                affiliate(
                    NODE_C,
                    "worker-2",
                    &["192.168.3.6"],
                    Some(ks(
                        KEY_C,
                        "fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67",
                        &["10.244.4.1/24"],
                        &["192.168.3.6:51820"],
                    )),
                ),
            ),
            (
                local_id.to_string(),
                affiliate(
                    local_id,
                    "",
                    &["192.168.3.7"],
                    Some(ks(
                        "27E8I+ekrqT21cq2iW6+fDe+H7WBw6q9J7vqLCeswiM=",
                        "fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67",
                        &["10.244.5.1/24"],
                        &["192.168.3.7:51820"],
                    )),
                ),
            ),
        ]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        assert_eq!(out.specs.keys().collect::<Vec<_>>(), [KEY_A, KEY_C]);

        let a = &out.specs[KEY_A];
        assert_eq!(
            a.address.to_string(),
            "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"
        );
        assert_eq!(
            strs(&a.allowed_ips),
            [
                "10.244.3.0/24",
                "192.168.3.4/32",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0/128"
            ]
        );
        assert_eq!(
            a.endpoints,
            vec![
                "10.0.0.2:51820".parse::<SocketAddr>().unwrap(),
                "192.168.3.4:51820".parse().unwrap()
            ]
        );
        assert_eq!(a.label, "bar");
        assert_eq!(a.node_id, NODE_A);

        let c = &out.specs[KEY_C];
        assert_eq!(
            strs(&c.allowed_ips),
            [
                "10.244.4.0/24",
                "192.168.3.6/32",
                "fdc8:8aee:4e2d:1202:f073:9cff:fe6c:4d67/128"
            ]
        );
        assert_eq!(c.label, "worker-2");
    }

    /// Spec §7 example: exclusion is applied before the KubeSpan address is added.
    #[test]
    fn exclusion_vector() {
        let mut info = ks(
            KEY_A,
            "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
            &["10.244.3.1/24", "10.244.3.0/32"],
            &[],
        );
        info.exclude_advertised_networks = vec![
            "10.244.3.128/25".parse().unwrap(),
            // Excluding the KubeSpan address has no effect: it is added afterwards.
            "fd50:8d60:4238:6302::/64".parse().unwrap(),
        ];
        let affiliates = BTreeMap::from([(
            NODE_A.to_string(),
            affiliate(NODE_A, "bar", &["192.168.3.4"], Some(info)),
        )]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert_eq!(
            strs(&out.specs[KEY_A].allowed_ips),
            [
                "10.244.3.0/25",
                "192.168.3.4/32",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0/128"
            ]
        );
    }

    /// Talos peer_spec_test.go TestIPOverlap.
    #[test]
    fn talos_overlap_vectors() {
        let affiliates = BTreeMap::from([
            (
                NODE_A.to_string(),
                affiliate(
                    NODE_A,
                    "bar",
                    &[],
                    Some(ks(
                        KEY_A,
                        "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
                        &["10.244.3.1/24", "10.244.3.0/32"],
                        &["10.0.0.2:51820", "192.168.3.4:51820"],
                    )),
                ),
            ),
            (
                NODE_B.to_string(),
                affiliate(
                    NODE_B,
                    "worker-1",
                    &[],
                    Some(ks(
                        KEY_B,
                        "fd50:8d60:4238:6302:f857:23ff:fe21:d1e1",
                        &["10.244.2.0/23", "192.168.3.0/24"],
                        &["10.0.0.2:51820", "192.168.3.4:51820"],
                    )),
                ),
            ),
        ]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert_eq!(
            strs(&out.specs[KEY_A].allowed_ips),
            [
                "10.244.3.0/24",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0/128"
            ]
        );
        assert_eq!(
            strs(&out.specs[KEY_B].allowed_ips),
            [
                "10.244.2.0/24",
                "192.168.3.0/24",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e1/128"
            ]
        );
        assert_eq!(
            out.warnings,
            vec![PeerSpecWarning::Overlap {
                public_key: KEY_B.into(),
                node_id: NODE_B.into(),
                other_public_key: KEY_A.into(),
                other_node_id: NODE_A.into(),
                removed: vec!["10.244.3.0/24".parse().unwrap()],
            }]
        );
        assert!(out.warnings[0].to_string().contains("10.244.3.0/24"));
    }

    #[test]
    fn overlap_winner_is_the_lower_node_id_whatever_the_insertion_order() {
        // Same VIP on both; the lexicographically larger node ID loses it (spec §13).
        let mk = |id: &str, key: &str, ula: &str| {
            affiliate(
                id,
                id,
                &["10.5.0.100", "10.5.0.1"],
                Some(ks(key, ula, &[], &[])),
            )
        };
        let mut affiliates = BTreeMap::new();
        affiliates.insert(NODE_C.to_string(), mk(NODE_C, KEY_C, "fd00::c"));
        affiliates.insert(NODE_A.to_string(), mk(NODE_A, KEY_A, "fd00::a"));
        let out = build_peer_specs(&affiliates, &nobody());
        assert_eq!(
            strs(&out.specs[KEY_A].allowed_ips),
            ["10.5.0.1/32", "10.5.0.100/32", "fd00::a/128"]
        );
        assert_eq!(strs(&out.specs[KEY_C].allowed_ips), ["fd00::c/128"]);
    }

    #[test]
    fn peer_left_with_nothing_still_gets_a_spec() {
        let affiliates = BTreeMap::from([
            (
                NODE_A.to_string(),
                affiliate(
                    NODE_A,
                    "a",
                    &[],
                    Some(ks(KEY_A, "fd00::1", &["10.0.0.0/8"], &[])),
                ),
            ),
            (
                NODE_B.to_string(),
                // Same KubeSpan address as A (a cloned machine), addresses inside A's prefix.
                affiliate(
                    NODE_B,
                    "b",
                    &["10.1.1.1"],
                    Some(ks(KEY_B, "fd00::1", &[], &[])),
                ),
            ),
        ]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert!(out.specs[KEY_B].allowed_ips.is_empty());
        assert!(out.warnings.contains(&PeerSpecWarning::NothingLeft {
            public_key: KEY_B.into(),
            node_id: NODE_B.into()
        }));
    }

    #[test]
    fn local_and_kubespan_less_affiliates_are_skipped() {
        let mut empty_key = ks("", "fd00::2", &[], &[]);
        empty_key.public_key.clear();
        let affiliates = BTreeMap::from([
            (
                "me".to_string(),
                affiliate(
                    "me",
                    "me",
                    &["10.0.0.1"],
                    Some(ks(KEY_A, "fd00::1", &[], &[])),
                ),
            ),
            (
                NODE_B.to_string(),
                affiliate(NODE_B, "b", &["10.0.0.2"], None),
            ),
            (
                NODE_C.to_string(),
                affiliate(NODE_C, "c", &["10.0.0.3"], Some(empty_key)),
            ),
        ]);
        let local = LocalNode {
            node_id: "me",
            addresses: &[],
            kubespan_address: None,
        };
        let out = build_peer_specs(&affiliates, &local);
        assert!(out.specs.is_empty());
        assert!(out.warnings.is_empty());
    }

    #[test]
    fn missing_kubespan_address_skips_the_peer() {
        let affiliates = BTreeMap::from([(
            NODE_A.to_string(),
            affiliate(NODE_A, "a", &["10.0.0.2"], Some(ks(KEY_A, "::", &[], &[]))),
        )]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert!(out.specs.is_empty());
        assert_eq!(
            out.warnings,
            vec![PeerSpecWarning::MissingKubeSpanAddress {
                public_key: KEY_A.into(),
                node_id: NODE_A.into()
            }]
        );
    }

    #[test]
    fn local_addresses_are_never_given_to_a_peer() {
        let local_addrs: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let local = LocalNode {
            node_id: "me",
            addresses: &local_addrs,
            kubespan_address: Some("fd00::1".parse().unwrap()),
        };
        let affiliates = BTreeMap::from([(
            NODE_A.to_string(),
            // Claims our node IP through its pod CIDR, and our KubeSpan address as its own.
            affiliate(
                NODE_A,
                "a",
                &["10.0.0.2"],
                Some(ks(KEY_A, "fd00::1", &["10.0.0.0/30"], &[])),
            ),
        )]);
        let out = build_peer_specs(&affiliates, &local);
        assert_eq!(
            strs(&out.specs[KEY_A].allowed_ips),
            ["10.0.0.0/32", "10.0.0.2/31"]
        );
        assert_eq!(
            out.warnings,
            vec![PeerSpecWarning::ClaimsLocalAddress {
                public_key: KEY_A.into(),
                node_id: NODE_A.into(),
                removed: vec![
                    "10.0.0.1/32".parse().unwrap(),
                    "fd00::1/128".parse().unwrap()
                ],
            }]
        );
    }

    #[test]
    fn duplicate_public_key_later_node_wins_and_is_reported() {
        let affiliates = BTreeMap::from([
            (
                NODE_A.to_string(),
                affiliate(
                    NODE_A,
                    "a",
                    &["10.0.0.2"],
                    Some(ks(KEY_A, "fd00::a", &[], &[])),
                ),
            ),
            (
                NODE_B.to_string(),
                affiliate(
                    NODE_B,
                    "b",
                    &["10.0.0.3"],
                    Some(ks(KEY_A, "fd00::b", &[], &[])),
                ),
            ),
        ]);
        let out = build_peer_specs(&affiliates, &nobody());
        assert_eq!(out.specs.len(), 1);
        assert_eq!(out.specs[KEY_A].node_id, NODE_B);
        assert_eq!(
            strs(&out.specs[KEY_A].allowed_ips),
            ["10.0.0.3/32", "fd00::b/128"]
        );
        assert!(out.warnings.contains(&PeerSpecWarning::DuplicatePublicKey {
            public_key: KEY_A.into(),
            node_id: NODE_B.into(),
            other_node_id: NODE_A.into(),
        }));
    }
}
