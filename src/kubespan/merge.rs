//! Raw affiliates → merged affiliates → members (spec §6).
//!
//! Talos keeps one raw affiliate per registry per remote node in `cluster-raw`
//! (`k8s/<nodeID>`, `service/<nodeID>`), merges them by node ID in raw-ID order
//! (`AffiliateMergeController`, `AffiliateSpec.Merge`), and turns every affiliate with a
//! nodename into a member (`MemberController`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use crate::core::types::{AffiliateSpec, ControlPlaneInfo, KubeSpanInfo};

/// Appends the items of `extra` not yet in `base`, keeping order.
fn union_into<T: PartialEq + Clone>(base: &mut Vec<T>, extra: &[T]) {
    for item in extra {
        if !base.contains(item) {
            base.push(item.clone());
        }
    }
}

/// The machine type as Talos holds it after decoding (`machine.ParseType`): `init`,
/// `controlplane`, `worker`, or `unknown`. `join` and the empty string are `worker`; anything
/// unrecognised is `unknown` (Talos ignores the parse error).
pub fn canonical_machine_type(machine_type: &str) -> &'static str {
    match machine_type {
        "init" => "init",
        "controlplane" => "controlplane",
        "worker" | "join" | "" => "worker",
        _ => "unknown",
    }
}

/// Talos `AffiliateSpec.Merge`: folds `other` into `base`.
///
/// Lists are unioned order-preserving (addresses, additional addresses, exclude networks,
/// endpoints); hostname, nodename, machine type, public key, KubeSpan address and control
/// plane are overridden when `other` has a value (for the machine type: when it is not
/// `unknown` after [`canonical_machine_type`]). The operating system is *not* merged: Talos
/// keeps the first source's value.
pub fn merge_into(base: &mut AffiliateSpec, other: &AffiliateSpec) {
    union_into(&mut base.addresses, &other.addresses);

    if other.control_plane.is_some() {
        base.control_plane = other.control_plane;
    }
    if !other.hostname.is_empty() {
        base.hostname.clone_from(&other.hostname);
    }
    if !other.nodename.is_empty() {
        base.nodename.clone_from(&other.nodename);
    }
    let other_type = canonical_machine_type(&other.machine_type);
    if other_type != "unknown" {
        base.machine_type = other_type.to_owned();
    }

    // Talos' KubeSpan block is a plain struct whose zero value means "none"; `None` here.
    if let Some(theirs) = &other.kubespan {
        let ours = base.kubespan.get_or_insert_with(|| KubeSpanInfo {
            public_key: String::new(),
            address: Ipv6Addr::UNSPECIFIED,
            additional_addresses: Vec::new(),
            exclude_advertised_networks: Vec::new(),
            endpoints: Vec::new(),
        });
        if !theirs.public_key.is_empty() {
            ours.public_key.clone_from(&theirs.public_key);
        }
        if !theirs.address.is_unspecified() {
            ours.address = theirs.address;
        }
        union_into(&mut ours.additional_addresses, &theirs.additional_addresses);
        union_into(
            &mut ours.exclude_advertised_networks,
            &theirs.exclude_advertised_networks,
        );
        union_into(&mut ours.endpoints, &theirs.endpoints);
    }
}

/// Merges raw affiliates (keyed by raw ID, e.g. `k8s/<nodeID>`, `service/<nodeID>`) into one
/// affiliate per node ID.
///
/// Raw IDs are processed in ascending order, so `k8s/…` is the base and `service/…` is folded
/// into it. Machine types come out canonical ([`canonical_machine_type`]). Grouping is by the affiliate's own `node_id`, not by the raw ID's suffix, as in
/// Talos. Raw affiliates with an empty node ID are skipped: they cannot be keyed. A node whose
/// raw sources are all gone is simply absent from the result.
pub fn merge_affiliates(raw: &BTreeMap<String, AffiliateSpec>) -> BTreeMap<String, AffiliateSpec> {
    let mut merged: BTreeMap<String, AffiliateSpec> = BTreeMap::new();
    for spec in raw.values() {
        if spec.node_id.is_empty() {
            continue;
        }
        match merged.get_mut(&spec.node_id) {
            Some(base) => merge_into(base, spec),
            None => {
                // Talos decodes every raw record's machine type into its enum first.
                let mut base = spec.clone();
                base.machine_type = canonical_machine_type(&spec.machine_type).to_owned();
                merged.insert(spec.node_id.clone(), base);
            }
        }
    }
    merged
}

/// The `cluster` namespace view: merged remote affiliates plus the local affiliate.
///
/// The local node is never in `cluster-raw` on Talos (discovery skips its own ID); if a raw
/// affiliate claims the local node ID anyway, it is ignored so the local record stays
/// authoritative.
pub fn cluster_affiliates(
    raw: &BTreeMap<String, AffiliateSpec>,
    local: Option<&AffiliateSpec>,
) -> BTreeMap<String, AffiliateSpec> {
    let mut merged = match local {
        Some(local) => {
            let remote: BTreeMap<String, AffiliateSpec> = raw
                .iter()
                .filter(|(_, spec)| spec.node_id != local.node_id)
                .map(|(id, spec)| (id.clone(), spec.clone()))
                .collect();
            merge_affiliates(&remote)
        }
        None => merge_affiliates(raw),
    };
    if let Some(local) = local {
        merged.insert(local.node_id.clone(), local.clone());
    }
    merged
}

/// `Members.cluster.talos.dev`: a cluster member as other Talos nodes see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    pub machine_type: String,
    pub operating_system: String,
    pub control_plane: Option<ControlPlaneInfo>,
}

/// Every affiliate with a non-empty nodename becomes a member keyed by nodename.
///
/// Two affiliates with the same nodename: the later one in node-ID order wins, as the later
/// write to the same member ID does in Talos.
pub fn members(affiliates: &BTreeMap<String, AffiliateSpec>) -> BTreeMap<String, Member> {
    affiliates
        .values()
        .filter(|a| !a.nodename.is_empty())
        .map(|a| {
            (
                a.nodename.clone(),
                Member {
                    node_id: a.node_id.clone(),
                    addresses: a.addresses.clone(),
                    hostname: a.hostname.clone(),
                    machine_type: a.machine_type.clone(),
                    operating_system: a.operating_system.clone(),
                    control_plane: a.control_plane,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_A: &str = "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC";
    const NODE_B: &str = "9dwHNUViZlPlIervqX9Qo256RUhrfhgO0xBBnKcKl4F";

    /// The three raw affiliates of Talos `affiliate_merge_test.go`.
    fn talos_raw() -> BTreeMap<String, AffiliateSpec> {
        let k8s_a = AffiliateSpec {
            node_id: NODE_A.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            machine_type: "controlplane".into(),
            addresses: vec!["192.168.3.4".parse().unwrap()],
            kubespan: Some(KubeSpanInfo {
                public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
                address: "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0".parse().unwrap(),
                additional_addresses: vec!["10.244.3.1/24".parse().unwrap()],
                exclude_advertised_networks: vec![],
                endpoints: vec![
                    "10.0.0.2:51820".parse().unwrap(),
                    "192.168.3.4:51820".parse().unwrap(),
                ],
            }),
            control_plane: Some(ControlPlaneInfo {
                api_server_port: 6443,
            }),
            ..Default::default()
        };
        let service_a = AffiliateSpec {
            node_id: NODE_A.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            machine_type: "controlplane".into(),
            addresses: vec!["192.168.3.4".parse().unwrap(), "10.5.0.2".parse().unwrap()],
            ..Default::default()
        };
        let service_b = AffiliateSpec {
            node_id: NODE_B.into(),
            hostname: "worker-1".into(),
            nodename: "worker-1".into(),
            machine_type: "worker".into(),
            addresses: vec!["192.168.3.5".parse().unwrap()],
            ..Default::default()
        };
        BTreeMap::from([
            (format!("k8s/{NODE_A}"), k8s_a),
            (format!("service/{NODE_A}"), service_a),
            (format!("service/{NODE_B}"), service_b),
        ])
    }

    #[test]
    fn two_sources_merge_into_one() {
        let merged = merge_affiliates(&talos_raw());
        assert_eq!(merged.len(), 2);

        let a = &merged[NODE_A];
        assert_eq!(a.node_id, NODE_A);
        assert_eq!(
            a.addresses,
            vec![
                "192.168.3.4".parse::<IpAddr>().unwrap(),
                "10.5.0.2".parse().unwrap()
            ]
        );
        assert_eq!(a.hostname, "foo.com");
        assert_eq!(a.nodename, "bar");
        assert_eq!(a.machine_type, "controlplane");
        let ks = a.kubespan.as_ref().unwrap();
        assert_eq!(
            ks.address,
            "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"
                .parse::<Ipv6Addr>()
                .unwrap()
        );
        assert_eq!(
            ks.public_key,
            "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY="
        );
        // Merging does not canonicalize prefixes; peer specs do.
        assert_eq!(ks.additional_addresses[0].to_string(), "10.244.3.1/24");
        assert_eq!(ks.endpoints.len(), 2);
        assert_eq!(
            a.control_plane,
            Some(ControlPlaneInfo {
                api_server_port: 6443
            })
        );

        let b = &merged[NODE_B];
        assert_eq!(b.hostname, "worker-1");
        assert_eq!(b.machine_type, "worker");
        assert!(b.kubespan.is_none());
        assert!(b.control_plane.is_none());
    }

    #[test]
    fn removing_the_source_with_kubespan_data_clears_it() {
        let mut raw = talos_raw();
        raw.remove(&format!("k8s/{NODE_A}"));
        let a = &merge_affiliates(&raw)[NODE_A];
        assert!(a.kubespan.is_none());
        assert!(a.control_plane.is_none());
        assert_eq!(a.addresses.len(), 2);
    }

    #[test]
    fn removing_the_last_source_removes_the_node() {
        let mut raw = talos_raw();
        raw.remove(&format!("service/{NODE_B}"));
        let merged = merge_affiliates(&raw);
        assert!(!merged.contains_key(NODE_B));
        assert!(merged.contains_key(NODE_A));
    }

    #[test]
    fn later_source_overrides_only_non_empty_fields_and_unions_lists() {
        let base_ks = KubeSpanInfo {
            public_key: "old".into(),
            address: "fd00::1".parse().unwrap(),
            additional_addresses: vec!["10.0.0.0/24".parse().unwrap()],
            exclude_advertised_networks: vec!["1.1.1.1/32".parse().unwrap()],
            endpoints: vec!["1.2.3.4:51820".parse().unwrap()],
        };
        let mut base = AffiliateSpec {
            node_id: "n".into(),
            hostname: "h1".into(),
            nodename: "n1".into(),
            machine_type: "worker".into(),
            operating_system: "Talos (v1.11.0)".into(),
            kubespan: Some(base_ks),
            ..Default::default()
        };
        let other = AffiliateSpec {
            node_id: "n".into(),
            machine_type: "unknown".into(),
            operating_system: "Talos (v1.12.0)".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: String::new(),
                address: Ipv6Addr::UNSPECIFIED,
                additional_addresses: vec![
                    "10.0.1.0/24".parse().unwrap(),
                    "10.0.0.0/24".parse().unwrap(),
                ],
                exclude_advertised_networks: vec![
                    "1.1.1.1/32".parse().unwrap(),
                    "8.8.8.8/32".parse().unwrap(),
                ],
                endpoints: vec![
                    "1.2.3.4:51820".parse().unwrap(),
                    "5.6.7.8:51820".parse().unwrap(),
                ],
            }),
            ..Default::default()
        };
        merge_into(&mut base, &other);

        assert_eq!(base.hostname, "h1");
        assert_eq!(base.nodename, "n1");
        assert_eq!(base.machine_type, "worker");
        assert_eq!(base.operating_system, "Talos (v1.11.0)");
        let ks = base.kubespan.unwrap();
        assert_eq!(ks.public_key, "old");
        assert_eq!(ks.address, "fd00::1".parse::<Ipv6Addr>().unwrap());
        let s = |v: &[ipnet::IpNet]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(s(&ks.additional_addresses), ["10.0.0.0/24", "10.0.1.0/24"]);
        assert_eq!(
            s(&ks.exclude_advertised_networks),
            ["1.1.1.1/32", "8.8.8.8/32"]
        );
        assert_eq!(ks.endpoints.len(), 2);
    }

    #[test]
    fn machine_types_are_canonical_and_only_known_ones_override() {
        let rec = |raw_id: &str, machine_type: &str| {
            (
                raw_id.to_string(),
                AffiliateSpec {
                    node_id: "n".into(),
                    machine_type: machine_type.into(),
                    ..Default::default()
                },
            )
        };
        let merged = |records: &[(&str, &str)]| {
            let raw: BTreeMap<_, _> = records.iter().map(|(id, t)| rec(id, t)).collect();
            merge_affiliates(&raw)["n"].machine_type.clone()
        };
        assert_eq!(merged(&[("k8s/n", "join")]), "worker");
        assert_eq!(merged(&[("k8s/n", "bogus")]), "unknown");
        assert_eq!(
            merged(&[("k8s/n", "controlplane"), ("service/n", "unknown")]),
            "controlplane"
        );
        assert_eq!(
            merged(&[("k8s/n", "controlplane"), ("service/n", "bogus")]),
            "controlplane"
        );
        assert_eq!(
            merged(&[("k8s/n", "unknown"), ("service/n", "init")]),
            "init"
        );
        // Talos parses an empty machine type as worker, so it does override.
        assert_eq!(
            merged(&[("k8s/n", "controlplane"), ("service/n", "")]),
            "worker"
        );
    }

    #[test]
    fn kubespan_only_in_later_source_is_adopted() {
        let mut raw = talos_raw();
        // Move the KubeSpan data to the service record: k8s/… is still the base.
        let ks = raw
            .get_mut(&format!("k8s/{NODE_A}"))
            .unwrap()
            .kubespan
            .take();
        raw.get_mut(&format!("service/{NODE_A}")).unwrap().kubespan = ks.clone();
        assert_eq!(merge_affiliates(&raw)[NODE_A].kubespan, ks);
    }

    #[test]
    fn members_are_affiliates_with_nodename_keyed_by_it() {
        let mut raw = talos_raw();
        raw.insert(
            "service/nonamenode".into(),
            AffiliateSpec {
                node_id: "nonamenode".into(),
                hostname: "x".into(),
                ..Default::default()
            },
        );
        let local = AffiliateSpec {
            node_id: "localnode".into(),
            nodename: "me".into(),
            hostname: "me.example".into(),
            machine_type: "worker".into(),
            operating_system: "kubespan (0.1.0)".into(),
            addresses: vec!["10.5.0.9".parse().unwrap()],
            ..Default::default()
        };
        let all = cluster_affiliates(&raw, Some(&local));
        assert_eq!(all.len(), 4);
        let m = members(&all);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["bar", "me", "worker-1"]);
        assert_eq!(m["bar"].node_id, NODE_A);
        assert_eq!(m["bar"].machine_type, "controlplane");
        assert_eq!(
            m["bar"].control_plane.map(|c| c.api_server_port),
            Some(6443)
        );
        assert_eq!(m["me"].operating_system, "kubespan (0.1.0)");
        assert_eq!(m["me"].addresses, local.addresses);
    }

    #[test]
    fn raw_record_claiming_the_local_node_id_is_ignored() {
        let mut raw = talos_raw();
        let local = AffiliateSpec {
            node_id: NODE_B.into(),
            nodename: "me".into(),
            ..Default::default()
        };
        raw.insert(
            format!("k8s/{NODE_B}"),
            AffiliateSpec {
                node_id: NODE_B.into(),
                nodename: "impostor".into(),
                ..Default::default()
            },
        );
        let all = cluster_affiliates(&raw, Some(&local));
        assert_eq!(all[NODE_B], local);
    }
}
