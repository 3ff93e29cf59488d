//! Talos ULA prefixes (RFC 4193-like) and modified EUI-64 addresses.
//!
//! Talos derives its per-cluster /64s from SHA-256 of the cluster ID text and puts a
//! purpose byte into the last byte of the global ID + subnet part, so the KubeSpan,
//! SideroLink and bootstrap subnets of one cluster never collide.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::Ipv6Net;
use sha2::{Digest, Sha256};

/// The Talos ULA purpose byte (byte 7 of the address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum UlaPurpose {
    Bootstrap = 0x01,
    KubeSpan = 0x02,
    SideroLink = 0x03,
    VirtualSideroLink = 0x04,
}

impl From<UlaPurpose> for u8 {
    fn from(purpose: UlaPurpose) -> u8 {
        purpose as u8
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UlaError {
    #[error("MAC address must be 6 (EUI-48) or 8 (EUI-64) bytes, got {0}")]
    MacLength(usize),
    #[error("subnet {0} is longer than /64: no room for a 64-bit interface identifier")]
    SubnetTooLong(Ipv6Net),
}

/// The Talos ULA /64 for `purpose`: SHA-256 of the literal cluster ID text (not
/// base64-decoded), last 16 bytes, byte 0 = 0xfd, byte 7 = purpose.
pub fn ula_prefix(cluster_id: &str, purpose: UlaPurpose) -> Ipv6Net {
    let hash = Sha256::digest(cluster_id.as_bytes());
    let mut octets = [0u8; 16];
    // Only bytes 0..8 survive the /64 mask; take them from the hash's last 16 bytes.
    octets[..8].copy_from_slice(&hash[16..24]);
    octets[0] = 0xfd;
    octets[7] = u8::from(purpose);
    // The low half is already zero, so this is the masked /64.
    Ipv6Net::new_assert(Ipv6Addr::from(octets), 64)
}

/// The cluster's KubeSpan subnet (`fdXX:XXXX:XXXX:XX02::/64`).
pub fn kubespan_subnet(cluster_id: &str) -> Ipv6Net {
    ula_prefix(cluster_id, UlaPurpose::KubeSpan)
}

/// A modified EUI-64 address in `subnet` (RFC 4291 §2.5.1), as mdlayher/netx
/// `eui64.ParseMAC` builds it: a 6-byte MAC gets `ff:fe` in the middle, an 8-byte
/// one is copied; either way the universal/local bit (0x02 of the first byte) flips.
pub fn eui64_address(subnet: Ipv6Net, mac: &[u8]) -> Result<Ipv6Addr, UlaError> {
    if subnet.prefix_len() > 64 {
        return Err(UlaError::SubnetTooLong(subnet));
    }
    let mut octets = subnet.network().octets();
    match *mac {
        [a, b, c, d, e, f] => octets[8..].copy_from_slice(&[a, b, c, 0xff, 0xfe, d, e, f]),
        [a, b, c, d, e, f, g, h] => octets[8..].copy_from_slice(&[a, b, c, d, e, f, g, h]),
        _ => return Err(UlaError::MacLength(mac.len())),
    }
    octets[8] ^= 0x02;
    Ok(Ipv6Addr::from(octets))
}

/// Whether `ip` is a Talos ULA of `purpose`: IPv6 with byte 0 = 0xfd and byte 7 = purpose.
pub fn is_ula(ip: IpAddr, purpose: UlaPurpose) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(v6) => {
            let octets = v6.octets();
            octets[0] == 0xfd && octets[7] == u8::from(purpose)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Talos unit test vectors (spec/kubespan.md §1.2).
    const CLUSTER_ID: &str = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo=";

    fn net(text: &str) -> Ipv6Net {
        text.parse().unwrap()
    }

    fn addr(text: &str) -> Ipv6Addr {
        text.parse().unwrap()
    }

    #[test]
    fn talos_kubespan_subnet_vector() {
        assert_eq!(kubespan_subnet(CLUSTER_ID), net("fd7f:175a:b97c:5602::/64"));
    }

    #[test]
    fn purpose_byte_only_changes_byte_7() {
        assert_eq!(
            ula_prefix(CLUSTER_ID, UlaPurpose::SideroLink),
            net("fd7f:175a:b97c:5603::/64")
        );
        assert_eq!(
            ula_prefix(CLUSTER_ID, UlaPurpose::Bootstrap),
            net("fd7f:175a:b97c:5601::/64")
        );
        assert_eq!(
            ula_prefix(CLUSTER_ID, UlaPurpose::VirtualSideroLink),
            net("fd7f:175a:b97c:5604::/64")
        );
    }

    #[test]
    fn cluster_id_is_hashed_as_text() {
        // A different spelling of the same bytes (no padding) is a different subnet.
        assert_ne!(
            kubespan_subnet(CLUSTER_ID),
            kubespan_subnet(CLUSTER_ID.trim_end_matches('='))
        );
    }

    #[test]
    fn talos_kubespan_address_vectors() {
        let subnet = kubespan_subnet(CLUSTER_ID);
        assert_eq!(
            eui64_address(subnet, &[0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69]).unwrap(),
            addr("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169")
        );
        assert_eq!(
            eui64_address(subnet, &[0xea, 0x71, 0x1b, 0xb2, 0xcc, 0xee]).unwrap(),
            addr("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee")
        );
    }

    /// mdlayher/netx eui64 `TestParseMAC` vectors.
    #[test]
    fn netx_eui64_vectors() {
        let cases: &[(&str, &[u8], &str)] = &[
            (
                "2002:db8::/64",
                &[0x02, 0, 0, 0, 0, 0x01],
                "2002:db8::ff:fe00:1",
            ),
            (
                "fe80::/64",
                &[0x00, 0x12, 0x7f, 0xeb, 0x6b, 0x40],
                "fe80::212:7fff:feeb:6b40",
            ),
            (
                "fe80::/64",
                &[0x22, 0xac, 0x9e, 0x18, 0xbe, 0x80],
                "fe80::20ac:9eff:fe18:be80",
            ),
            (
                "2002:db8::/64",
                &[0, 0, 0, 0xff, 0xfe, 0, 0, 0x01],
                "2002:db8::200:ff:fe00:1",
            ),
            (
                "fe80::/64",
                &[0x00, 0x12, 0x7f, 0xff, 0xfe, 0xeb, 0x6b, 0x40],
                "fe80::212:7fff:feeb:6b40",
            ),
        ];
        for (subnet, mac, want) in cases {
            assert_eq!(
                eui64_address(net(subnet), mac).unwrap(),
                addr(want),
                "{mac:02x?}"
            );
        }
    }

    #[test]
    fn eui64_rejects_bad_mac_lengths() {
        let subnet = kubespan_subnet(CLUSTER_ID);
        for len in [0usize, 5, 7, 9, 20] {
            assert_eq!(
                eui64_address(subnet, &vec![0; len]),
                Err(UlaError::MacLength(len))
            );
        }
    }

    #[test]
    fn eui64_uses_the_network_and_rejects_long_prefixes() {
        // Host bits in the given prefix are masked off, like Talos' Masked() prefix.
        let sloppy = net("fd7f:175a:b97c:5602:dead::1/64");
        assert_eq!(
            eui64_address(sloppy, &[0x2e, 0x1a, 0xb6, 0x53, 0x81, 0x69]).unwrap(),
            addr("fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169")
        );
        let too_long = net("fd00::/80");
        assert_eq!(
            eui64_address(too_long, &[0; 6]),
            Err(UlaError::SubnetTooLong(too_long))
        );
    }

    #[test]
    fn is_ula_checks_prefix_and_purpose() {
        let kubespan: IpAddr = "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap();
        assert!(is_ula(kubespan, UlaPurpose::KubeSpan));
        assert!(!is_ula(kubespan, UlaPurpose::SideroLink));
        let siderolink: IpAddr = "fdae:41e4:649b:9303::1".parse().unwrap();
        assert!(is_ula(siderolink, UlaPurpose::SideroLink));
        assert!(!is_ula(
            "fc7f:175a:b97c:5602::1".parse().unwrap(),
            UlaPurpose::KubeSpan
        ));
        assert!(!is_ula(
            "2001:db8:0:2::1".parse().unwrap(),
            UlaPurpose::KubeSpan
        ));
        assert!(!is_ula("10.0.0.2".parse().unwrap(), UlaPurpose::KubeSpan));
        // IPv4-mapped addresses are IPv6 but never ULAs.
        assert!(!is_ula(
            "::ffff:10.0.0.2".parse().unwrap(),
            UlaPurpose::KubeSpan
        ));
    }
}
