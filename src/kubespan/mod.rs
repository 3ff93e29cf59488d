//! KubeSpan policy core: pure functions from affiliates, configuration, WireGuard observations
//! and `now` to what the node should publish and program. No sockets, netlink, clocks or files.
//!
//! | module | spec | what |
//! | --- | --- | --- |
//! | [`endpoints`] | §3.2 | the endpoints this node advertises |
//! | [`merge`] | §6 | raw affiliates → merged affiliates; members |
//! | [`peerspec`] | §7 | merged affiliates → WireGuard peer specs (AllowedIPs, overlap resolution) |
//! | [`peerstate`] | §8.3, §8.4 | peer up/down state machine and endpoint rotation |
//! | [`routed`] | §4.4, §4.5 | the set of destinations steered into the tunnel |
//! | [`nft`] | §4.4 | the `inet kubespan` nftables script |
//! | [`ipset`] | §7, §4.4 | the IP set arithmetic they share |

pub mod endpoints;
pub mod ipset;
pub mod merge;
pub mod nft;
pub mod peerspec;
pub mod peerstate;
pub mod routed;

/// WireGuard's own fwmark, stamped on the encrypted UDP packets (spec §2, §4.4).
pub const WIREGUARD_FWMARK: u32 = 0x20;
/// Mark that steers a packet into routing table 180 (spec §2, §4.3).
pub const FORCE_FWMARK: u32 = 0x40;
/// The mark bits KubeSpan owns (spec §2).
pub const FWMARK_MASK: u32 = 0x60;
