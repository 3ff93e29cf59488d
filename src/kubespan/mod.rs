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

use std::net::IpAddr;

pub mod endpoints;
pub mod ipset;
pub mod merge;
pub mod nft;
pub mod peerspec;
pub mod peerstate;
pub mod routed;

/// ULA purpose byte of KubeSpan addresses (spec §1.2).
pub const ULA_KUBESPAN: u8 = 0x02;
/// ULA purpose byte of SideroLink addresses (spec §1.2).
pub const ULA_SIDEROLINK: u8 = 0x03;

/// WireGuard's own fwmark, stamped on the encrypted UDP packets (spec §2, §4.4).
pub const WIREGUARD_FWMARK: u32 = 0x20;
/// Mark that steers a packet into routing table 180 (spec §2, §4.3).
pub const FORCE_FWMARK: u32 = 0x40;
/// The mark bits KubeSpan owns (spec §2).
pub const FWMARK_MASK: u32 = 0x60;

/// Talos `IsULA`: an IPv6 address with first byte `0xfd` and byte 7 equal to `purpose`.
pub fn is_ula(ip: IpAddr, purpose: u8) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => {
            let o = v6.octets();
            o[0] == 0xfd && o[7] == purpose
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ula_purpose_is_byte_seven() {
        let ks: IpAddr = "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap();
        let sidero: IpAddr = "fdae:41e4:649b:9303:60be:7e36:c270:3238".parse().unwrap();
        assert!(is_ula(ks, ULA_KUBESPAN));
        assert!(!is_ula(ks, ULA_SIDEROLINK));
        assert!(is_ula(sidero, ULA_SIDEROLINK));
        // fc00::/8 is ULA space too, but Talos only ever generates fd.
        assert!(!is_ula(
            "fc7f:175a:b97c:5602::1".parse().unwrap(),
            ULA_KUBESPAN
        ));
        assert!(!is_ula("10.0.0.2".parse().unwrap(), ULA_KUBESPAN));
    }
}
