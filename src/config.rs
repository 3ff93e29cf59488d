//! `kubespan run` configuration: a YAML file using Talos's key names where they
//! exist. Parsing is strict (unknown keys are errors, so a typo never silently
//! falls back to a default) and every invalid value is reported as one message
//! naming the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ipnet::IpNet;
use serde::Deserialize;

use crate::kubespan::endpoints::EndpointFilters;

/// The public discovery service, Talos's default.
pub const DEFAULT_DISCOVERY_ENDPOINT: &str = "https://discovery.talos.dev/";
pub const DEFAULT_CONFIG_PATH: &str = "/etc/kubespan/config.yaml";
/// Loopback only: metrics name peers and addresses.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:2123";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Kernel WireGuard when the kernel has it, else embedded userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
    /// A userspace WireGuard started by something else (wireguard-go, say),
    /// driven over its UAPI socket; its link is never created or deleted.
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub kubespan: KubeSpanConfig,
    #[serde(default)]
    pub node: NodeConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClusterConfig {
    /// Discovery cluster ID (Talos `cluster.id`); also the ULA derivation input.
    #[serde(default)]
    pub id: String,
    /// Base64 of the 32-byte cluster secret (Talos `cluster.secret`): the AES key
    /// for discovery data and the WireGuard preshared key.
    #[serde(default)]
    pub secret: String,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DiscoveryConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub registries: Registries,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: true,
            registries: Registries::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Registries {
    #[serde(default)]
    pub service: ServiceRegistry,
    /// Accepted for compatibility with Talos configs; the Kubernetes registry is
    /// deprecated upstream and not implemented here.
    #[serde(default)]
    pub kubernetes: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceRegistry {
    #[serde(default)]
    pub disabled: bool,
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
}

impl Default for ServiceRegistry {
    fn default() -> Self {
        ServiceRegistry {
            disabled: false,
            endpoint: default_endpoint(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeSpanConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub advertise_kubernetes_networks: bool,
    #[serde(default)]
    pub allow_down_peer_bypass: bool,
    #[serde(default)]
    pub harvest_extra_endpoints: bool,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    #[serde(default)]
    pub filters: Filters,
    #[serde(default)]
    pub extra_announced_endpoints: Vec<String>,
    #[serde(default = "default_interface")]
    pub interface: String,
    #[serde(default = "default_port")]
    pub listen_port: u32,
    #[serde(default)]
    pub backend: Backend,
    /// The link whose MAC forms the EUI-64 part of the KubeSpan address.
    #[serde(default)]
    pub address_link: Option<String>,
    /// How long a chosen endpoint gets to complete a handshake before the next
    /// candidate is tried (Talos: 15s, fixed). Our handshakes start at once, so
    /// a LAN needs far less; keep it above the worst round-trip time.
    #[serde(default = "default_connect_timeout")]
    pub endpoint_connect_timeout: String,
}

impl Default for KubeSpanConfig {
    fn default() -> Self {
        // Same as an empty `kubespan:` block.
        serde_yaml_ng::from_str("{}").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Filters {
    #[serde(default)]
    pub endpoints: Option<Vec<String>>,
    #[serde(default)]
    pub exclude_advertised_networks: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Kubernetes node name; with it this node is a cluster member.
    #[serde(default)]
    pub nodename: Option<String>,
    /// Defaults to the system hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Pod CIDRs routed to this node; published only with
    /// `kubespan.advertiseKubernetesNetworks`.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    /// The local API socket (`kubespan get`, `kubespan status`).
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Prometheus metrics listener; empty disables it.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        serde_yaml_ng::from_str("{}").expect("defaults deserialize")
    }
}

fn yes() -> bool {
    true
}
fn default_endpoint() -> String {
    DEFAULT_DISCOVERY_ENDPOINT.into()
}
fn default_mtu() -> u32 {
    1420
}
fn default_interface() -> String {
    "kubespan".into()
}
fn default_connect_timeout() -> String {
    "15s".into()
}
fn default_port() -> u32 {
    51820
}
fn default_state_dir() -> PathBuf {
    "/var/lib/kubespan".into()
}
fn default_api_socket() -> PathBuf {
    crate::api::DEFAULT_SOCKET.into()
}
fn default_metrics_address() -> String {
    DEFAULT_METRICS_ADDRESS.into()
}

/// The validated, typed form the daemon works with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_id: String,
    /// The raw cluster secret text (PSK for WireGuard).
    pub cluster_secret: String,
    /// The decoded secret (AES key).
    pub cluster_key: Vec<u8>,
    /// `None` when discovery or the service registry is disabled.
    pub discovery_endpoint: Option<String>,
    pub kubespan_enabled: bool,
    pub advertise_kubernetes_networks: bool,
    pub force_routing: bool,
    pub harvest_extra_endpoints: bool,
    pub mtu: u32,
    pub endpoint_filters: Option<EndpointFilters>,
    pub exclude_advertised_networks: Vec<IpNet>,
    pub extra_announced_endpoints: Vec<SocketAddr>,
    pub interface: String,
    pub listen_port: u16,
    pub backend: Backend,
    pub address_link: Option<String>,
    pub endpoint_connect_timeout: std::time::Duration,
    pub state_dir: PathBuf,
    pub nodename: Option<String>,
    pub hostname: Option<String>,
    pub pod_cidrs: Vec<IpNet>,
    pub api_socket: PathBuf,
    /// `None`: no metrics listener.
    pub metrics_address: Option<SocketAddr>,
}

impl Settings {
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let cfg: Config = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate(path)
    }
}

impl Config {
    fn validate(self, path: &Path) -> Result<Settings, ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        let c = &self.cluster;
        if c.id.is_empty() {
            return Err(bad(
                "cluster.id",
                "missing: set the cluster ID (`kubespan gen cluster` makes one)".into(),
            ));
        }
        if c.id.len() > 256 {
            return Err(bad(
                "cluster.id",
                format!("{} bytes, at most 256", c.id.len()),
            ));
        }
        if c.secret.is_empty() {
            return Err(bad(
                "cluster.secret",
                "missing: set the cluster secret (`kubespan gen cluster` makes one)".into(),
            ));
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(c.secret.trim())
            .map_err(|e| bad("cluster.secret", format!("not valid base64: {e}")))?;
        let k = &self.kubespan;
        // The secret is also every peer's WireGuard preshared key: 32 bytes.
        let key_ok = if k.enabled {
            key.len() == 32
        } else {
            matches!(key.len(), 16 | 24 | 32)
        };
        if !key_ok {
            return Err(bad(
                "cluster.secret",
                format!(
                    "decodes to {} bytes; it must be 32 bytes (it is the AES-256 key and the WireGuard preshared key)",
                    key.len()
                ),
            ));
        }
        let discovery_endpoint = if c.discovery.enabled && !c.discovery.registries.service.disabled
        {
            let e = c.discovery.registries.service.endpoint.trim();
            crate::client::endpoint::ServiceEndpoint::parse(e).map_err(|err| {
                bad(
                    "cluster.discovery.registries.service.endpoint",
                    err.to_string(),
                )
            })?;
            Some(e.to_owned())
        } else {
            None
        };
        if !(1280..=65535).contains(&k.mtu) {
            return Err(bad(
                "kubespan.mtu",
                format!("{} is out of range: between 1280 and 65535", k.mtu),
            ));
        }
        if !(1..=65535).contains(&k.listen_port) {
            return Err(bad(
                "kubespan.listenPort",
                format!("{} is out of range: between 1 and 65535", k.listen_port),
            ));
        }
        validate_ifname(&k.interface).map_err(|r| bad("kubespan.interface", r))?;
        if let Some(l) = &k.address_link {
            validate_ifname(l).map_err(|r| bad("kubespan.addressLink", r))?;
        }
        let endpoint_filters = match &k.filters.endpoints {
            None => None,
            Some(list) => Some(
                EndpointFilters::parse(list)
                    .map_err(|e| bad("kubespan.filters.endpoints", e.to_string()))?,
            ),
        };
        let exclude_advertised_networks = parse_nets(&k.filters.exclude_advertised_networks)
            .map_err(|r| bad("kubespan.filters.excludeAdvertisedNetworks", r))?;
        let extra_announced_endpoints = k
            .extra_announced_endpoints
            .iter()
            .map(|s| {
                s.trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("{s:?} is not ip:port (IPv6 as [addr]:port)"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|r| bad("kubespan.extraAnnouncedEndpoints", r))?;
        let endpoint_connect_timeout = crate::util::parse_duration(&k.endpoint_connect_timeout)
            .map_err(|r| bad("kubespan.endpointConnectTimeout", r))?;
        if endpoint_connect_timeout < std::time::Duration::from_millis(100)
            || endpoint_connect_timeout > std::time::Duration::from_secs(270)
        {
            return Err(bad(
                "kubespan.endpointConnectTimeout",
                format!(
                    "{} is out of range: between 100ms and 270s (below the peer-down interval)",
                    k.endpoint_connect_timeout
                ),
            ));
        }
        let n = &self.node;
        if n.state_dir.as_os_str().is_empty() || !n.state_dir.is_absolute() {
            return Err(bad(
                "node.stateDir",
                format!("{:?} must be an absolute path", n.state_dir),
            ));
        }
        let nonempty = |v: &Option<String>| {
            v.as_ref()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        };
        let pod_cidrs = parse_nets(&n.pod_cidrs).map_err(|r| bad("node.podCIDRs", r))?;
        if !n.api_socket.is_absolute() {
            return Err(bad(
                "node.apiSocket",
                format!("{:?} must be an absolute path", n.api_socket),
            ));
        }
        let metrics = n.metrics_address.trim();
        let metrics_address = if metrics.is_empty() {
            None
        } else {
            Some(metrics.parse().map_err(|_| {
                bad(
                    "node.metricsAddress",
                    format!(
                        "{metrics:?} is not ip:port (like 127.0.0.1:2123); empty disables metrics"
                    ),
                )
            })?)
        };
        Ok(Settings {
            cluster_id: c.id.clone(),
            cluster_secret: c.secret.trim().to_owned(),
            cluster_key: key,
            discovery_endpoint,
            kubespan_enabled: k.enabled,
            advertise_kubernetes_networks: k.advertise_kubernetes_networks,
            force_routing: !k.allow_down_peer_bypass,
            harvest_extra_endpoints: k.harvest_extra_endpoints,
            mtu: k.mtu,
            endpoint_filters,
            exclude_advertised_networks,
            extra_announced_endpoints,
            interface: k.interface.clone(),
            listen_port: k.listen_port as u16,
            backend: k.backend,
            address_link: k.address_link.clone(),
            endpoint_connect_timeout,
            state_dir: n.state_dir.clone(),
            nodename: nonempty(&n.nodename),
            hostname: nonempty(&n.hostname),
            pod_cidrs,
            api_socket: n.api_socket.clone(),
            metrics_address,
        })
    }
}

fn parse_nets(list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is not a CIDR (like 10.0.0.0/8) or an IP address"))
        })
        .collect()
}

/// Linux interface names: 1–15 bytes, no `/`, no whitespace, not `.` or `..`.
fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("{name:?} must be 1 to 15 characters"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

/// The commented example printed by `kubespan gen config`.
pub fn example(cluster_id: &str, secret: &str) -> String {
    format!(
        r#"# kubespan configuration. Key names follow Talos where they exist.
cluster:
  # Discovery cluster ID and secret. To join a Talos cluster, copy them from its
  # machine config (cluster.id and cluster.secret). `kubespan gen cluster` makes new ones.
  id: {cluster_id}
  secret: {secret}
  discovery:
    enabled: true
    registries:
      service:
        disabled: false
        # The public Talos discovery service; or run your own with
        # `kubespan discovery-service` and use http://host:3000 (h2c) or https://.
        endpoint: {DEFAULT_DISCOVERY_ENDPOINT}
kubespan:
  enabled: true
  interface: kubespan          # WireGuard link name
  listenPort: 51820            # UDP; must be reachable from the other nodes
  backend: auto                # auto | kernel | userspace | external (drive an existing wireguard-go device)
  mtu: 1420
  # Route traffic to down peers outside the tunnel instead of dropping it.
  allowDownPeerBypass: false
  # Publish endpoints observed for other peers (helps with NAT; not above ~50 nodes).
  harvestExtraEndpoints: false
  # Publish node.podCIDRs as networks routed to this node.
  advertiseKubernetesNetworks: false
  # addressLink: eth0          # link whose MAC forms the KubeSpan address (default: first physical link)
  # How long each advertised endpoint of a peer gets to answer before the next is tried.
  # Talos uses 15s; on a LAN 2s finds a working endpoint much faster.
  endpointConnectTimeout: 15s
  filters:
    # Which own addresses to advertise as endpoints, in order; "!" excludes.
    # endpoints: ["0.0.0.0/0", "!192.168.0.0/16", "::/0"]
    # Networks peers must not route to this node through KubeSpan.
    excludeAdvertisedNetworks: []
  # Endpoints announced as they are (e.g. a port forward on a NAT router).
  extraAnnouncedEndpoints: []
node:
  stateDir: /var/lib/kubespan  # node-identity.yaml and kubespan-identity.yaml live here
  # nodename: worker-1         # with a nodename this node is listed as a cluster member
  # hostname: worker-1.example.com
  podCIDRs: []
  apiSocket: /run/kubespan/kubespan.sock  # `kubespan get` and `kubespan status` talk to it (root only)
  metricsAddress: 127.0.0.1:2123          # Prometheus /metrics; "" disables
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Bn0/rBSrPw87fdpGO+fjUTL4p5GqqmgNDmsw7bDMkF4=";

    fn parse(yaml: &str) -> Result<Settings, ConfigError> {
        Settings::parse(yaml, Path::new("test.yaml"))
    }

    fn minimal() -> String {
        format!("cluster:\n  id: abc\n  secret: {SECRET}\n")
    }

    #[test]
    fn minimal_config_gets_talos_defaults() {
        let s = parse(&minimal()).unwrap();
        assert_eq!(
            s.discovery_endpoint.as_deref(),
            Some(DEFAULT_DISCOVERY_ENDPOINT)
        );
        assert_eq!(s.interface, "kubespan");
        assert_eq!(s.listen_port, 51820);
        assert_eq!(s.mtu, 1420);
        assert_eq!(
            s.endpoint_connect_timeout,
            std::time::Duration::from_secs(15)
        );
        assert!(s.force_routing);
        assert!(!s.harvest_extra_endpoints);
        assert_eq!(s.backend, Backend::Auto);
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/kubespan"));
        assert_eq!(s.api_socket, PathBuf::from("/run/kubespan/kubespan.sock"));
        assert_eq!(s.metrics_address, Some("127.0.0.1:2123".parse().unwrap()));
        assert!(s.endpoint_filters.is_none());
        assert_eq!(s.cluster_key.len(), 32);
    }

    #[test]
    fn the_example_config_is_valid() {
        let s = parse(&example("abc", SECRET)).unwrap();
        assert!(s.kubespan_enabled);
        assert_eq!(
            s.discovery_endpoint.as_deref(),
            Some(DEFAULT_DISCOVERY_ENDPOINT)
        );
    }

    #[test]
    fn full_config_parses() {
        let s = parse(&format!(
            r#"
cluster:
  id: abc
  secret: {SECRET}
  discovery:
    registries:
      service:
        endpoint: http://127.0.0.1:3000
kubespan:
  allowDownPeerBypass: true
  harvestExtraEndpoints: true
  mtu: 1400
  backend: userspace
  interface: ks0
  listenPort: 51821
  addressLink: eth1
  filters:
    endpoints: ["0.0.0.0/0", "!10.0.0.0/8"]
    excludeAdvertisedNetworks: ["192.168.0.0/16", "10.1.2.3"]
  extraAnnouncedEndpoints: ["1.2.3.4:5678", "[2001:db8::1]:51820"]
node:
  stateDir: /tmp/ks
  nodename: n1
  podCIDRs: ["10.244.1.0/24"]
"#
        ))
        .unwrap();
        assert!(!s.force_routing);
        assert_eq!(s.backend, Backend::Userspace);
        let external = parse(&format!("{}kubespan:\n  backend: external\n", minimal())).unwrap();
        assert_eq!(external.backend, Backend::External);
        assert_eq!(s.listen_port, 51821);
        assert_eq!(s.exclude_advertised_networks.len(), 2);
        assert_eq!(s.extra_announced_endpoints[1].port(), 51820);
        assert_eq!(s.nodename.as_deref(), Some("n1"));
        assert_eq!(s.endpoint_filters.unwrap().entries().len(), 2);
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let base = minimal();
        for (extra, key) in [
            ("kubespan:\n  mtu: 1000\n", "kubespan.mtu"),
            ("kubespan:\n  listenPort: 70000\n", "kubespan.listenPort"),
            (
                "kubespan:\n  interface: this-name-is-too-long\n",
                "kubespan.interface",
            ),
            (
                "kubespan:\n  filters:\n    endpoints: [\"10.0.0.0/33\"]\n",
                "kubespan.filters.endpoints",
            ),
            (
                "kubespan:\n  filters:\n    excludeAdvertisedNetworks: [nope]\n",
                "kubespan.filters.excludeAdvertisedNetworks",
            ),
            (
                "kubespan:\n  extraAnnouncedEndpoints: [\"1.2.3.4\"]\n",
                "kubespan.extraAnnouncedEndpoints",
            ),
            ("node:\n  stateDir: relative/dir\n", "node.stateDir"),
            ("node:\n  podCIDRs: [\"x\"]\n", "node.podCIDRs"),
            ("node:\n  apiSocket: run/k.sock\n", "node.apiSocket"),
            (
                "node:\n  metricsAddress: localhost\n",
                "node.metricsAddress",
            ),
            ("kubespan:\n  backend: fast\n", "backend"),
            (
                "kubespan:\n  endpointConnectTimeout: 10ms\n",
                "kubespan.endpointConnectTimeout",
            ),
            (
                "kubespan:\n  endpointConnectTimeout: soon\n",
                "kubespan.endpointConnectTimeout",
            ),
            ("kubespan:\n  mtuu: 1400\n", "mtuu"),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra:?} -> {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
        let err = parse("cluster:\n  id: abc\n  secret: c2hvcnQ=\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster.secret") && err.contains("32 bytes"),
            "{err}"
        );
        let err = parse("cluster:\n  secret: x\n").unwrap_err().to_string();
        assert!(err.contains("cluster.id"), "{err}");
        let err = parse(&format!(
            "{base}  discovery:\n    registries:\n      service:\n        endpoint: 'ftp://x'\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cluster.discovery.registries.service.endpoint"),
            "{err}"
        );
    }

    #[test]
    fn discovery_can_be_disabled() {
        let s = parse(&format!("{}  discovery:\n    enabled: false\n", minimal())).unwrap();
        assert!(s.discovery_endpoint.is_none());
        let s = parse(&format!(
            "{}  discovery:\n    registries:\n      service:\n        disabled: true\n",
            minimal()
        ))
        .unwrap();
        assert!(s.discovery_endpoint.is_none());
    }
}
