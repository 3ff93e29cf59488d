//! Linux data-plane adapters: the WireGuard device, the KubeSpan address, routing
//! table 180 and its fwmark rules, our nftables table, and `rp_filter`.
//!
//! Each adapter sits behind a small trait so the daemon's reconcile loop can run
//! against fakes. Everything is idempotent: applying the same desired state twice
//! changes nothing the second time.

pub mod key;
pub mod netlink;
pub mod nftables;
pub mod routing;
pub mod sysctl;
pub mod wireguard;

pub use key::{KeyError, PresharedKey, PrivateKey, PublicKey};
pub use netlink::{LinkState, Netlink};
pub use nftables::{FirewallBackend, Nft, NftError};
pub use routing::{NetlinkRouting, RoutingBackend, RoutingError, RoutingSpec, RoutingSummary};
pub use sysctl::{Forwarding, ProcSysctl, RpFilter, SysctlBackend, SysctlError};
pub use wireguard::{
    AnyBackend, ApplySummary, BackendChoice, BackendKind, DeviceConfig, DeviceState, KernelBackend,
    PeerConfig, PeerState, UserspaceBackend, WireGuardBackend, WireGuardError,
    detect_kernel_support,
};

/// Talos constants (spec §2, §4). Not configurable there, so not here either.
pub const DEFAULT_LINK_NAME: &str = "kubespan";
pub const DEFAULT_MTU: u32 = 1420;
pub const LISTEN_PORT: u16 = 51820;
/// Stamped by WireGuard on its own encrypted UDP packets.
pub const WIREGUARD_FWMARK: u32 = 0x20;
/// Set by our nftables chains on traffic that must go through the tunnel.
pub const FORCE_FWMARK: u32 = 0x40;
pub const FWMARK_MASK: u32 = 0x60;
pub const ROUTING_TABLE: u32 = 180;
pub const RULE_PRIORITY: u32 = 32500;
/// Metric of the table-180 default routes.
pub const ROUTE_METRIC: u32 = 1;
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "kubespan";
