//! The introspection resources (spec §9), Talos's seven types: how they are
//! named, which columns `kubespan get` prints, how each is built from the
//! daemon's [`NodeView`], and a store that versions them. Pure: no I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use ipnet::{IpNet, Ipv6Net};
use serde_json::{Value, json};

use crate::core::types::AffiliateSpec;
use crate::daemon::run::NodeView;

pub const NS_CLUSTER: &str = "cluster";
pub const NS_CLUSTER_RAW: &str = "cluster-raw";
pub const NS_KUBESPAN: &str = "kubespan";

/// A column of `kubespan get`'s table: a header and a JSON pointer into the spec.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub pointer: &'static str,
}

const fn col(header: &'static str, pointer: &'static str) -> Column {
    Column { header, pointer }
}

/// One resource type.
#[derive(Debug)]
pub struct ResourceType {
    /// The Talos type name, e.g. `KubeSpanPeerStatuses.kubespan.talos.dev`.
    pub name: &'static str,
    /// What talosctl's TYPE column shows, e.g. `KubeSpanPeerStatus`.
    pub kind: &'static str,
    /// What `kubespan get` accepts: the talosctl name first, then aliases.
    pub aliases: &'static [&'static str],
    pub default_namespace: &'static str,
    /// Namespaces resources of this type live in.
    pub namespaces: &'static [&'static str],
    pub columns: &'static [Column],
    /// Spec fields left out unless the caller asks for secrets.
    pub secret_fields: &'static [&'static str],
}

pub const IDENTITIES: &str = "Identities.cluster.talos.dev";
pub const AFFILIATES: &str = "Affiliates.cluster.talos.dev";
pub const MEMBERS: &str = "Members.cluster.talos.dev";
pub const KUBESPAN_IDENTITIES: &str = "KubeSpanIdentities.kubespan.talos.dev";
pub const PEER_SPECS: &str = "KubeSpanPeerSpecs.kubespan.talos.dev";
pub const PEER_STATUSES: &str = "KubeSpanPeerStatuses.kubespan.talos.dev";
pub const ENDPOINTS: &str = "KubeSpanEndpoints.kubespan.talos.dev";

pub static TYPES: &[ResourceType] = &[
    ResourceType {
        name: IDENTITIES,
        kind: "Identity",
        aliases: &["identities", "identity"],
        default_namespace: NS_CLUSTER,
        namespaces: &[NS_CLUSTER],
        columns: &[col("ID", "/nodeId")],
        secret_fields: &[],
    },
    ResourceType {
        name: AFFILIATES,
        kind: "Affiliate",
        aliases: &["affiliates", "affiliate"],
        default_namespace: NS_CLUSTER,
        namespaces: &[NS_CLUSTER, NS_CLUSTER_RAW],
        columns: &[
            col("HOSTNAME", "/hostname"),
            col("MACHINE TYPE", "/machineType"),
            col("ADDRESSES", "/addresses"),
        ],
        secret_fields: &[],
    },
    ResourceType {
        name: MEMBERS,
        kind: "Member",
        aliases: &["members", "member"],
        default_namespace: NS_CLUSTER,
        namespaces: &[NS_CLUSTER],
        columns: &[
            col("HOSTNAME", "/hostname"),
            col("MACHINE TYPE", "/machineType"),
            col("OS", "/operatingSystem"),
            col("ADDRESSES", "/addresses"),
        ],
        secret_fields: &[],
    },
    ResourceType {
        name: KUBESPAN_IDENTITIES,
        kind: "KubeSpanIdentity",
        aliases: &["kubespanidentities", "kubespanidentity", "ksi"],
        default_namespace: NS_KUBESPAN,
        namespaces: &[NS_KUBESPAN],
        columns: &[col("ADDRESS", "/address"), col("PUBLICKEY", "/publicKey")],
        secret_fields: &["privateKey"],
    },
    ResourceType {
        name: PEER_SPECS,
        kind: "KubeSpanPeerSpec",
        aliases: &["kubespanpeerspecs", "kubespanpeerspec", "ksps", "peerspecs"],
        default_namespace: NS_KUBESPAN,
        namespaces: &[NS_KUBESPAN],
        columns: &[col("LABEL", "/label"), col("ENDPOINTS", "/endpoints")],
        secret_fields: &[],
    },
    ResourceType {
        name: PEER_STATUSES,
        kind: "KubeSpanPeerStatus",
        aliases: &[
            "kubespanpeerstatuses",
            "kubespanpeerstatus",
            "kspst",
            "peerstatuses",
            "peers",
        ],
        default_namespace: NS_KUBESPAN,
        namespaces: &[NS_KUBESPAN],
        columns: &[
            col("LABEL", "/label"),
            col("ENDPOINT", "/endpoint"),
            col("STATE", "/state"),
            col("RX", "/receiveBytes"),
            col("TX", "/transmitBytes"),
        ],
        secret_fields: &[],
    },
    ResourceType {
        name: ENDPOINTS,
        kind: "KubeSpanEndpoint",
        aliases: &["kubespanendpoints", "kubespanendpoint", "kse"],
        default_namespace: NS_KUBESPAN,
        namespaces: &[NS_KUBESPAN],
        columns: &[
            col("ENDPOINT", "/endpoint"),
            col("AFFILIATE ID", "/affiliateID"),
        ],
        secret_fields: &[],
    },
];

/// Finds a type by talosctl name, alias or full Talos type name (any case).
pub fn lookup(name: &str) -> Option<&'static ResourceType> {
    let lower = name.to_ascii_lowercase();
    TYPES.iter().find(|t| {
        t.name.eq_ignore_ascii_case(&lower)
            || t.name
                .split('.')
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case(&lower))
            || t.aliases.contains(&lower.as_str())
    })
}

/// The talosctl names of every type, for error messages and help.
pub fn type_names() -> Vec<&'static str> {
    TYPES.iter().map(|t| t.aliases[0]).collect()
}

/// What identifies a resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub namespace: String,
    pub type_name: String,
    pub id: String,
}

impl Key {
    fn new(namespace: &str, type_name: &str, id: impl Into<String>) -> Self {
        Key {
            namespace: namespace.into(),
            type_name: type_name.into(),
            id: id.into(),
        }
    }
}

/// A resource as served: metadata and spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub key: Key,
    pub version: u64,
    pub spec: Value,
}

impl Resource {
    /// The spec without the type's secret fields unless `include_secrets`.
    pub fn redacted(&self, include_secrets: bool) -> Resource {
        let mut r = self.clone();
        if !include_secrets
            && let Some(t) = lookup(&r.key.type_name)
            && let Value::Object(map) = &mut r.spec
        {
            for f in t.secret_fields {
                map.remove(*f);
            }
        }
        r
    }
}

/// Secrets a resource may carry but the [`NodeView`] does not.
pub struct Secrets<'a> {
    pub private_key: &'a str,
}

fn time(t: Option<SystemTime>) -> Value {
    match t {
        Some(t) => Value::String(humantime::format_rfc3339_seconds(t).to_string()),
        None => Value::Null,
    }
}

fn strings<T: ToString>(items: &[T]) -> Value {
    Value::Array(items.iter().map(|i| Value::String(i.to_string())).collect())
}

fn affiliate_spec(a: &AffiliateSpec) -> Value {
    let mut spec = json!({
        "nodeId": a.node_id,
        "addresses": strings(&a.addresses),
        "hostname": a.hostname,
        "nodename": a.nodename,
        "operatingSystem": a.operating_system,
        "machineType": a.machine_type,
    });
    if let Some(k) = &a.kubespan {
        spec["kubespan"] = json!({
            "publicKey": k.public_key,
            "address": k.address.to_string(),
            "additionalAddresses": strings(&k.additional_addresses),
            "endpoints": strings(&k.endpoints),
            "excludeAdvertisedNetworks": strings(&k.exclude_advertised_networks),
        });
    }
    if let Some(cp) = &a.control_plane {
        spec["controlPlane"] = json!({ "port": cp.api_server_port });
    }
    spec
}

/// A member is its affiliate without the nodename (its ID) and KubeSpan data.
fn member_spec(a: &AffiliateSpec) -> Value {
    let mut spec = affiliate_spec(a);
    if let Value::Object(map) = &mut spec {
        map.remove("nodename");
        map.remove("kubespan");
    }
    spec
}

/// Every resource the daemon shows, from its current view.
pub fn build(view: &NodeView, secrets: &Secrets<'_>) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    out.insert(
        Key::new(NS_CLUSTER, IDENTITIES, "local"),
        json!({ "nodeId": view.node_id }),
    );
    if let (Some(addr), Some(prefix)) = (view.kubespan_address, view.kubespan_prefix) {
        out.insert(
            Key::new(NS_KUBESPAN, KUBESPAN_IDENTITIES, "local"),
            json!({
                "address": IpNet::from(IpAddr::V6(addr)).to_string(),
                "subnet": Ipv6Net::new(prefix.network(), prefix.prefix_len())
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                "privateKey": secrets.private_key,
                "publicKey": view.public_key,
            }),
        );
    }
    // Merged affiliates include this node, as on Talos.
    let merged = view
        .local
        .iter()
        .chain(view.affiliates.values())
        .map(|a| (a.node_id.clone(), a));
    for (id, a) in merged {
        out.insert(Key::new(NS_CLUSTER, AFFILIATES, id), affiliate_spec(a));
        if !a.nodename.is_empty() {
            out.insert(
                Key::new(NS_CLUSTER, MEMBERS, a.nodename.clone()),
                member_spec(a),
            );
        }
    }
    for (id, a) in &view.raw_affiliates {
        out.insert(
            Key::new(NS_CLUSTER_RAW, AFFILIATES, id.clone()),
            affiliate_spec(a),
        );
    }
    for (key, spec) in &view.specs {
        out.insert(
            Key::new(NS_KUBESPAN, PEER_SPECS, key.clone()),
            json!({
                "address": spec.address.to_string(),
                "allowedIPs": strings(&spec.allowed_ips),
                "endpoints": strings(&spec.endpoints),
                "label": spec.label,
            }),
        );
        let Some(st) = view.statuses.get(key) else {
            continue;
        };
        out.insert(
            Key::new(NS_KUBESPAN, PEER_STATUSES, key.clone()),
            json!({
                "endpoint": st.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                "label": spec.label,
                "state": st.state.as_str(),
                "receiveBytes": st.rx_bytes,
                "transmitBytes": st.tx_bytes,
                "lastHandshakeTime": time(st.last_handshake),
                "lastUsedEndpoint": st.last_used_endpoint.map(|e| e.to_string()).unwrap_or_default(),
                "lastEndpointChange": time(st.last_endpoint_change),
            }),
        );
    }
    for h in &view.harvested {
        out.insert(
            Key::new(NS_KUBESPAN, ENDPOINTS, h.public_key.clone()),
            json!({ "affiliateID": h.affiliate_id, "endpoint": h.endpoint.to_string() }),
        );
    }
    out
}

/// What happened to a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Updated,
    Destroyed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub resource: Resource,
}

/// The current resources with their versions. A resource's version starts at 1
/// and increases by one on every change of its spec; one that is destroyed and
/// created again starts over, as in Talos.
#[derive(Debug, Default)]
pub struct Store {
    resources: BTreeMap<Key, Resource>,
}

impl Store {
    /// Makes the store hold exactly `next`; returns what changed, in key order.
    pub fn update(&mut self, next: BTreeMap<Key, Value>) -> Vec<Event> {
        let mut events = Vec::new();
        let old = std::mem::take(&mut self.resources);
        let mut old = old.into_iter().peekable();
        for (key, spec) in next {
            // Everything in `old` before `key` is gone.
            while let Some((k, _)) = old.peek() {
                if *k >= key {
                    break;
                }
                let (_, r) = old.next().expect("peeked");
                events.push(Event {
                    kind: EventKind::Destroyed,
                    resource: r,
                });
            }
            let previous = match old.peek() {
                Some((k, _)) if *k == key => old.next().map(|(_, r)| r),
                _ => None,
            };
            let resource = match previous {
                Some(r) if r.spec == spec => r,
                Some(r) => {
                    let r = Resource {
                        key: key.clone(),
                        version: r.version + 1,
                        spec,
                    };
                    events.push(Event {
                        kind: EventKind::Updated,
                        resource: r.clone(),
                    });
                    r
                }
                None => {
                    let r = Resource {
                        key: key.clone(),
                        version: 1,
                        spec,
                    };
                    events.push(Event {
                        kind: EventKind::Created,
                        resource: r.clone(),
                    });
                    r
                }
            };
            self.resources.insert(key, resource);
        }
        events.extend(old.map(|(_, r)| Event {
            kind: EventKind::Destroyed,
            resource: r,
        }));
        events
    }

    pub fn get(&self, namespace: &str, type_name: &str, id: &str) -> Option<&Resource> {
        self.resources.get(&Key::new(namespace, type_name, id))
    }

    /// The resources of one type in one namespace, sorted by ID.
    pub fn list<'a>(
        &'a self,
        namespace: &'a str,
        type_name: &'a str,
    ) -> impl Iterator<Item = &'a Resource> + 'a {
        self.resources
            .values()
            .filter(move |r| r.key.namespace == namespace && r.key.type_name == type_name)
    }
}

/// The text of one table cell: strings as they are, lists as JSON (as
/// talosctl prints them), nothing for a missing field.
pub fn cell(spec: &Value, pointer: &str) -> String {
    match spec.pointer(pointer) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::KubeSpanInfo;
    use crate::daemon::plan::Harvested;
    use crate::kubespan::peerspec::PeerSpec;
    use crate::kubespan::peerstate::{PeerState, PeerStatus};

    fn affiliate(id: &str, nodename: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: id.into(),
            addresses: vec!["10.5.0.3".parse().unwrap()],
            hostname: format!("{nodename}.example"),
            nodename: nodename.into(),
            machine_type: "worker".into(),
            operating_system: "Talos (v1.11.0)".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: format!("key-{id}"),
                address: "fd00::2".parse().unwrap(),
                additional_addresses: vec![],
                exclude_advertised_networks: vec![],
                endpoints: vec!["10.5.0.3:51820".parse().unwrap()],
            }),
            control_plane: None,
        }
    }

    fn view() -> NodeView {
        let mut v = NodeView {
            node_id: "self".into(),
            public_key: "selfkey".into(),
            kubespan_address: Some("fd7f::1".parse().unwrap()),
            kubespan_prefix: Some("fd7f::1/64".parse().unwrap()),
            local: Some(affiliate("self", "me")),
            ..Default::default()
        };
        v.affiliates.insert("n1".into(), affiliate("n1", "node-1"));
        v.affiliates.insert("n2".into(), affiliate("n2", ""));
        v.raw_affiliates
            .insert("service/n1".into(), affiliate("n1", "node-1"));
        v.specs.insert(
            "key-n1".into(),
            PeerSpec {
                node_id: "n1".into(),
                address: "fd00::2".parse().unwrap(),
                allowed_ips: vec!["10.5.0.3/32".parse().unwrap()],
                endpoints: vec!["10.5.0.3:51820".parse().unwrap()],
                label: "node-1".into(),
            },
        );
        v.statuses.insert(
            "key-n1".into(),
            PeerStatus {
                endpoint: Some("10.5.0.3:51820".parse().unwrap()),
                state: PeerState::Up,
                rx_bytes: 15043220,
                tx_bytes: 17869488,
                ..Default::default()
            },
        );
        v.harvested.push(Harvested {
            affiliate_id: "n1".into(),
            endpoint: "10.5.0.3:51820".parse().unwrap(),
            public_key: "key-n1".into(),
        });
        v
    }

    const SECRETS: Secrets<'static> = Secrets {
        private_key: "PRIVATE",
    };

    #[test]
    fn builds_every_type_with_talos_ids() {
        let r = build(&view(), &SECRETS);
        let ids = |ns: &str, t: &str| -> Vec<String> {
            r.keys()
                .filter(|k| k.namespace == ns && k.type_name == t)
                .map(|k| k.id.clone())
                .collect()
        };
        assert_eq!(ids(NS_CLUSTER, IDENTITIES), ["local"]);
        assert_eq!(ids(NS_CLUSTER, AFFILIATES), ["n1", "n2", "self"]);
        assert_eq!(ids(NS_CLUSTER_RAW, AFFILIATES), ["service/n1"]);
        // Only affiliates with a nodename are members, keyed by nodename.
        assert_eq!(ids(NS_CLUSTER, MEMBERS), ["me", "node-1"]);
        assert_eq!(ids(NS_KUBESPAN, KUBESPAN_IDENTITIES), ["local"]);
        assert_eq!(ids(NS_KUBESPAN, PEER_SPECS), ["key-n1"]);
        assert_eq!(ids(NS_KUBESPAN, PEER_STATUSES), ["key-n1"]);
        assert_eq!(ids(NS_KUBESPAN, ENDPOINTS), ["key-n1"]);

        let ksi = &r[&Key::new(NS_KUBESPAN, KUBESPAN_IDENTITIES, "local")];
        assert_eq!(ksi["address"], "fd7f::1/128");
        assert_eq!(ksi["subnet"], "fd7f::/64");
        let st = &r[&Key::new(NS_KUBESPAN, PEER_STATUSES, "key-n1")];
        assert_eq!(st["state"], "up");
        assert_eq!(st["label"], "node-1");
        assert_eq!(st["receiveBytes"], 15043220);
        assert_eq!(st["lastHandshakeTime"], Value::Null);
        let m = &r[&Key::new(NS_CLUSTER, MEMBERS, "node-1")];
        assert_eq!(cell(m, "/addresses"), r#"["10.5.0.3"]"#);
        assert_eq!(cell(m, "/operatingSystem"), "Talos (v1.11.0)");
    }

    #[test]
    fn the_private_key_needs_asking() {
        let mut store = Store::default();
        store.update(build(&view(), &SECRETS));
        let ksi = store
            .get(NS_KUBESPAN, KUBESPAN_IDENTITIES, "local")
            .unwrap();
        assert!(ksi.redacted(false).spec.get("privateKey").is_none());
        assert_eq!(ksi.redacted(true).spec["privateKey"], "PRIVATE");
        assert_eq!(ksi.redacted(false).spec["publicKey"], "selfkey");
    }

    #[test]
    fn versions_increase_on_every_change_only() {
        let mut store = Store::default();
        let mut v = view();
        let first = store.update(build(&v, &SECRETS));
        assert!(first.iter().all(|e| e.kind == EventKind::Created));
        assert!(first.iter().all(|e| e.resource.version == 1));
        assert!(
            store.update(build(&v, &SECRETS)).is_empty(),
            "no change, no event"
        );

        v.statuses.get_mut("key-n1").unwrap().rx_bytes += 1;
        let ev = store.update(build(&v, &SECRETS));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, EventKind::Updated);
        assert_eq!(ev[0].resource.key.type_name, PEER_STATUSES);
        assert_eq!(ev[0].resource.version, 2);
        v.statuses.get_mut("key-n1").unwrap().rx_bytes += 1;
        store.update(build(&v, &SECRETS));
        let st = store.get(NS_KUBESPAN, PEER_STATUSES, "key-n1").unwrap();
        assert_eq!(st.version, 3);

        // The peer goes away: its spec, status and endpoint are destroyed.
        v.specs.clear();
        v.statuses.clear();
        v.harvested.clear();
        let ev = store.update(build(&v, &SECRETS));
        let destroyed: Vec<_> = ev
            .iter()
            .filter(|e| e.kind == EventKind::Destroyed)
            .map(|e| e.resource.key.type_name.as_str())
            .collect();
        assert_eq!(destroyed, [ENDPOINTS, PEER_SPECS, PEER_STATUSES]);
        assert_eq!(store.list(NS_KUBESPAN, PEER_STATUSES).count(), 0);
    }

    #[test]
    fn lookup_accepts_talosctl_names_aliases_and_type_names() {
        assert_eq!(lookup("members").unwrap().name, MEMBERS);
        assert_eq!(lookup("ksi").unwrap().name, KUBESPAN_IDENTITIES);
        assert_eq!(lookup("KubeSpanPeerStatuses").unwrap().name, PEER_STATUSES);
        assert_eq!(
            lookup("kubespanpeerstatuses.kubespan.talos.dev")
                .unwrap()
                .name,
            PEER_STATUSES
        );
        assert!(lookup("pods").is_none());
        // Every alias names exactly one type.
        let mut all: Vec<&str> = TYPES
            .iter()
            .flat_map(|t| t.aliases.iter().copied())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
