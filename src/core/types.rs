//! Domain types shared by the protocol core and the KubeSpan policy modules.
//!
//! These are the decoded, validated form of the `sidero.discovery.client` payload:
//! plain Rust network types instead of raw byte strings.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// One node's published data, as Talos models its `Affiliate` resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AffiliateSpec {
    /// Node ID (base62, Talos encoding); also the discovery affiliate ID.
    pub node_id: String,
    /// Routed node addresses, in published order.
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    /// Kubernetes node name; an affiliate with a nodename is a cluster member.
    pub nodename: String,
    /// `controlplane`, `worker`, `init` or `unknown`.
    pub machine_type: String,
    pub operating_system: String,
    /// Present only when the node runs KubeSpan.
    pub kubespan: Option<KubeSpanInfo>,
    /// Present only on control-plane nodes with an API server.
    pub control_plane: Option<ControlPlaneInfo>,
}

/// The KubeSpan part of an affiliate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeSpanInfo {
    /// WireGuard public key, standard base64 (44 characters).
    pub public_key: String,
    /// The node's KubeSpan ULA address.
    pub address: Ipv6Addr,
    /// Extra networks routed to this node (pod CIDRs with advertiseKubernetesNetworks).
    pub additional_addresses: Vec<IpNet>,
    /// Networks this node asks its peers not to route to it through KubeSpan.
    pub exclude_advertised_networks: Vec<IpNet>,
    /// WireGuard endpoint candidates, in published order. On the wire they travel
    /// separately from the affiliate blob (one AES-ECB blob each).
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPlaneInfo {
    pub api_server_port: u16,
}
