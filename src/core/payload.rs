//! Conversions between the domain types and the `sidero.discovery.client` protobuf.
//!
//! Encoding is prost's canonical output (ascending field numbers, proto3 defaults
//! omitted), which is byte-identical to what Talos' vtprotobuf marshaler writes.
//! Decoding ignores unknown fields, so newer Talos payloads still parse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use prost::Message;

use crate::core::types::{AffiliateSpec, ControlPlaneInfo, KubeSpanInfo};
use crate::proto::client as pb;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not a valid protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("{field}: IP address must be 4 or 16 bytes, got {len}")]
    IpLength { field: &'static str, len: usize },
    #[error("kubespan.address must be a 16-byte IPv6 address, got {len} bytes")]
    KubeSpanAddressLength { len: usize },
    #[error("{field}: prefix length {bits} is too long for {ip}")]
    PrefixBits {
        field: &'static str,
        ip: IpAddr,
        bits: u32,
    },
    #[error("{field}: port {port} is outside {min}..=65535")]
    Port {
        field: &'static str,
        port: u32,
        min: u16,
    },
}

/// Marshals an affiliate. `kubespan.endpoints` is not part of this message: each
/// endpoint travels on its own (see [`encode_endpoint`]).
pub fn encode_affiliate(spec: &AffiliateSpec) -> Vec<u8> {
    affiliate_to_proto(spec).encode_to_vec()
}

/// Unmarshals and validates an affiliate; `kubespan.endpoints` comes back empty.
pub fn decode_affiliate(bytes: &[u8]) -> Result<AffiliateSpec, PayloadError> {
    affiliate_from_proto(pb::Affiliate::decode(bytes)?)
}

/// Marshals one endpoint (`Endpoint{ip, port}`).
pub fn encode_endpoint(addr: SocketAddr) -> Vec<u8> {
    endpoint_to_proto(addr).encode_to_vec()
}

/// Unmarshals and validates one endpoint.
pub fn decode_endpoint(bytes: &[u8]) -> Result<SocketAddr, PayloadError> {
    endpoint_from_proto(&pb::Endpoint::decode(bytes)?)
}

pub fn affiliate_to_proto(spec: &AffiliateSpec) -> pb::Affiliate {
    pb::Affiliate {
        node_id: spec.node_id.clone(),
        addresses: spec.addresses.iter().map(|ip| ip_bytes(*ip)).collect(),
        hostname: spec.hostname.clone(),
        nodename: spec.nodename.clone(),
        machine_type: spec.machine_type.clone(),
        operating_system: spec.operating_system.clone(),
        kubespan: spec.kubespan.as_ref().map(|ks| pb::KubeSpan {
            public_key: ks.public_key.clone(),
            address: ks.address.octets().to_vec(),
            additional_addresses: ks
                .additional_addresses
                .iter()
                .map(prefix_to_proto)
                .collect(),
            exclude_advertised_addresses: ks
                .exclude_advertised_networks
                .iter()
                .map(prefix_to_proto)
                .collect(),
        }),
        control_plane: spec.control_plane.map(|cp| pb::ControlPlane {
            api_server_port: u32::from(cp.api_server_port),
        }),
    }
}

/// Validates a decoded affiliate. Stricter than Talos, which silently drops
/// malformed addresses: here any malformed field rejects the whole affiliate.
pub fn affiliate_from_proto(msg: pb::Affiliate) -> Result<AffiliateSpec, PayloadError> {
    let addresses = msg
        .addresses
        .iter()
        .map(|raw| ip_from_bytes("addresses", raw))
        .collect::<Result<_, _>>()?;
    let kubespan = msg.kubespan.map(kubespan_from_proto).transpose()?;
    let control_plane = msg
        .control_plane
        .map(|cp| {
            port_from_u32("control_plane.api_server_port", cp.api_server_port, 0)
                .map(|api_server_port| ControlPlaneInfo { api_server_port })
        })
        .transpose()?;
    Ok(AffiliateSpec {
        node_id: msg.node_id,
        addresses,
        hostname: msg.hostname,
        nodename: msg.nodename,
        machine_type: msg.machine_type,
        operating_system: msg.operating_system,
        kubespan,
        control_plane,
    })
}

fn kubespan_from_proto(msg: pb::KubeSpan) -> Result<KubeSpanInfo, PayloadError> {
    let address = <[u8; 16]>::try_from(msg.address.as_slice())
        .map(Ipv6Addr::from)
        .map_err(|_| PayloadError::KubeSpanAddressLength {
            len: msg.address.len(),
        })?;
    let prefixes = |field, list: &[pb::IpPrefix]| {
        list.iter()
            .map(|p| prefix_from_proto(field, p))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(KubeSpanInfo {
        public_key: msg.public_key,
        address,
        additional_addresses: prefixes("kubespan.additional_addresses", &msg.additional_addresses)?,
        exclude_advertised_networks: prefixes(
            "kubespan.exclude_advertised_addresses",
            &msg.exclude_advertised_addresses,
        )?,
        endpoints: Vec::new(),
    })
}

pub fn endpoint_to_proto(addr: SocketAddr) -> pb::Endpoint {
    pb::Endpoint {
        ip: ip_bytes(addr.ip()),
        port: u32::from(addr.port()),
    }
}

/// Port 0 is rejected: WireGuard cannot send to it.
pub fn endpoint_from_proto(msg: &pb::Endpoint) -> Result<SocketAddr, PayloadError> {
    let ip = ip_from_bytes("endpoint.ip", &msg.ip)?;
    let port = port_from_u32("endpoint.port", msg.port, 1)?;
    Ok(SocketAddr::new(ip, port))
}

fn prefix_to_proto(net: &IpNet) -> pb::IpPrefix {
    pb::IpPrefix {
        // The address as given, host bits included: Talos does not mask either.
        ip: ip_bytes(net.addr()),
        bits: u32::from(net.prefix_len()),
    }
}

fn prefix_from_proto(field: &'static str, msg: &pb::IpPrefix) -> Result<IpNet, PayloadError> {
    let ip = ip_from_bytes(field, &msg.ip)?;
    let bad_bits = PayloadError::PrefixBits {
        field,
        ip,
        bits: msg.bits,
    };
    let bits = u8::try_from(msg.bits).map_err(|_| bad_bits.clone())?;
    // IpNet::new keeps host bits (no truncation); peer-spec code masks later.
    IpNet::new(ip, bits).map_err(|_| bad_bits)
}

/// Binary IP as Go's `netip.Addr.MarshalBinary` writes it (no zone): 4 or 16 bytes.
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// 16 bytes always decode as IPv6, IPv4-mapped ones included, as in Go's netip.
fn ip_from_bytes(field: &'static str, raw: &[u8]) -> Result<IpAddr, PayloadError> {
    if let Ok(v4) = <[u8; 4]>::try_from(raw) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(raw) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(PayloadError::IpLength {
            field,
            len: raw.len(),
        })
    }
}

fn port_from_u32(field: &'static str, port: u32, min: u16) -> Result<u16, PayloadError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p >= min)
        .ok_or(PayloadError::Port { field, port, min })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn unhex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A control-plane node with KubeSpan, every field set.
    pub(crate) fn small_affiliate() -> AffiliateSpec {
        AffiliateSpec {
            node_id: "sou7yy34ykX3n373Zw1DXKb8zD7UnyKT6HT3QDsGH6L".into(),
            addresses: vec!["10.0.0.2".parse().unwrap()],
            hostname: "n1".into(),
            nodename: "n1".into(),
            machine_type: "worker".into(),
            operating_system: "Linux".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
                address: "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap(),
                additional_addresses: vec!["10.244.3.0/24".parse().unwrap()],
                exclude_advertised_networks: vec!["192.168.0.0/16".parse().unwrap()],
                endpoints: Vec::new(),
            }),
            control_plane: Some(ControlPlaneInfo {
                api_server_port: 6443,
            }),
        }
    }

    /// `protoc --encode=sidero.discovery.client.Affiliate proto/client/affiliate.proto`
    /// (libprotoc 36.2) of the same message in text format.
    const SMALL_AFFILIATE_HEX: &str = "
        0a2b736f753779793334796b58336e3337335a773144584b62387a4437556e794b54364854335144734748364c
        12040a000002 1a026e31 22026e31 2a06776f726b6572 32054c696e7578
        3a54 0a2c504c504e4264646d5467484a6874773076786c7471315a4264505039524e4f455564354a6a4a5a7a4252593d
             1210fd7f175ab97c56022c1ab6fffe538169
             1a08 0a040af40300 1018
             2208 0a04c0a80000 1010
        4203 08ab32";

    #[test]
    fn small_affiliate_encodes_like_protoc() {
        assert_eq!(
            encode_affiliate(&small_affiliate()),
            unhex(SMALL_AFFILIATE_HEX)
        );
    }

    #[test]
    fn small_affiliate_decodes() {
        assert_eq!(
            decode_affiliate(&unhex(SMALL_AFFILIATE_HEX)).unwrap(),
            small_affiliate()
        );
    }

    #[test]
    fn defaults_are_omitted() {
        // protoc: `node_id: "a" kubespan { public_key: "k" address: ... }`: empty
        // repeated fields and a missing control plane produce no bytes.
        let spec = AffiliateSpec {
            node_id: "a".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "k".into(),
                address: "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169".parse().unwrap(),
                additional_addresses: Vec::new(),
                exclude_advertised_networks: Vec::new(),
                endpoints: Vec::new(),
            }),
            ..AffiliateSpec::default()
        };
        let want = unhex("0a0161 3a15 0a016b 1210fd7f175ab97c56022c1ab6fffe538169");
        assert_eq!(encode_affiliate(&spec), want);
        assert_eq!(decode_affiliate(&want).unwrap(), spec);
        assert_eq!(
            encode_affiliate(&AffiliateSpec::default()),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn empty_control_plane_is_42_00() {
        let spec = AffiliateSpec {
            control_plane: Some(ControlPlaneInfo { api_server_port: 0 }),
            ..AffiliateSpec::default()
        };
        assert_eq!(encode_affiliate(&spec), [0x42, 0x00]);
        assert_eq!(decode_affiliate(&[0x42, 0x00]).unwrap(), spec);
    }

    #[test]
    fn kubespan_endpoints_are_not_in_the_affiliate() {
        let mut spec = small_affiliate();
        if let Some(ks) = spec.kubespan.as_mut() {
            ks.endpoints = vec!["10.0.0.2:51820".parse().unwrap()];
        }
        assert_eq!(encode_affiliate(&spec), unhex(SMALL_AFFILIATE_HEX));
    }

    #[test]
    fn non_canonical_prefix_is_preserved() {
        let mut spec = small_affiliate();
        let sloppy: IpNet = "10.244.3.7/24".parse().unwrap();
        if let Some(ks) = spec.kubespan.as_mut() {
            ks.additional_addresses = vec![sloppy];
        }
        let decoded = decode_affiliate(&encode_affiliate(&spec)).unwrap();
        let ks = decoded.kubespan.unwrap();
        assert_eq!(ks.additional_addresses, vec![sloppy]);
        assert_eq!(
            ks.additional_addresses[0].addr(),
            "10.244.3.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_stays_ipv6() {
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let spec = AffiliateSpec {
            addresses: vec![mapped],
            ..AffiliateSpec::default()
        };
        let bytes = encode_affiliate(&spec);
        assert_eq!(bytes.len(), 2 + 16);
        assert_eq!(decode_affiliate(&bytes).unwrap().addresses, vec![mapped]);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut bytes = unhex(SMALL_AFFILIATE_HEX);
        // field 9 varint 1, field 15 bytes "hi", field 100 fixed32.
        bytes.extend(unhex("4801 7a026869 a5060100 0000"));
        assert_eq!(decode_affiliate(&bytes).unwrap(), small_affiliate());

        // An unknown field 5 inside KubeSpan (what an older decoder sees of a newer one).
        let nested = unhex("3a16 1210fd7f175ab97c56022c1ab6fffe538169 2a026869");
        let ks = decode_affiliate(&nested).unwrap().kubespan.unwrap();
        assert_eq!(
            ks.address,
            "fd7f:175a:b97c:5602:2c1a:b6ff:fe53:8169"
                .parse::<Ipv6Addr>()
                .unwrap()
        );

        // Endpoint with an unknown field 3.
        let endpoint = unhex("0a040a000002 10ec9403 1801");
        assert_eq!(
            decode_endpoint(&endpoint).unwrap(),
            "10.0.0.2:51820".parse().unwrap()
        );
    }

    #[test]
    fn endpoint_matches_the_spec_example() {
        let addr: SocketAddr = "10.0.0.2:51820".parse().unwrap();
        let bytes = unhex("0a 04 0a 00 00 02 10 ec 94 03");
        assert_eq!(encode_endpoint(addr), bytes);
        assert_eq!(decode_endpoint(&bytes).unwrap(), addr);
        let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(encode_endpoint(v6).len(), 22);
        assert_eq!(decode_endpoint(&encode_endpoint(v6)).unwrap(), v6);
    }

    #[test]
    fn malformed_fields_are_errors() {
        // addresses: 5 bytes.
        assert_eq!(
            decode_affiliate(&unhex("1205 0102030405")),
            Err(PayloadError::IpLength {
                field: "addresses",
                len: 5
            })
        );
        // addresses: empty bytes (Go would decode a zero netip.Addr).
        assert!(matches!(
            decode_affiliate(&unhex("1200")),
            Err(PayloadError::IpLength { len: 0, .. })
        ));
        // kubespan.address: 4 bytes, and missing.
        assert_eq!(
            decode_affiliate(&unhex("3a06 12040a000002")),
            Err(PayloadError::KubeSpanAddressLength { len: 4 })
        );
        assert_eq!(
            decode_affiliate(&unhex("3a03 0a016b")),
            Err(PayloadError::KubeSpanAddressLength { len: 0 })
        );
        // control_plane.api_server_port 70000 (0x011170).
        assert!(matches!(
            decode_affiliate(&unhex("4204 08f0a204")),
            Err(PayloadError::Port { port: 70000, .. })
        ));
        // Truncated message.
        assert!(matches!(
            decode_affiliate(&unhex("0a05 6162")),
            Err(PayloadError::Protobuf(_))
        ));
    }

    /// An affiliate whose KubeSpan has one additional prefix; `bits` is the raw
    /// varint so out-of-range values can be written.
    fn kubespan_with_prefix(ip_hex: &str, bits_varint_hex: &str) -> Vec<u8> {
        let ip = unhex(ip_hex);
        let mut prefix = vec![0x0a, u8::try_from(ip.len()).unwrap()];
        prefix.extend(ip);
        prefix.push(0x10);
        prefix.extend(unhex(bits_varint_hex));
        let mut ks = unhex("1210fd7f175ab97c56022c1ab6fffe538169");
        ks.extend([0x1a, u8::try_from(prefix.len()).unwrap()]);
        ks.extend(prefix);
        let mut out = vec![0x3a, u8::try_from(ks.len()).unwrap()];
        out.extend(ks);
        out
    }

    #[test]
    fn prefix_bits_are_checked() {
        let v4 = "0a000000";
        let v6 = "fd000000000000000000000000000000";
        assert!(decode_affiliate(&kubespan_with_prefix(v4, "20")).is_ok());
        assert!(decode_affiliate(&kubespan_with_prefix(v6, "8001")).is_ok());
        for (ip, varint, bits) in [
            (v4, "21", 33),
            (v6, "8101", 129),
            // 256 and 2^32-1 must not wrap into a valid u8 prefix length.
            (v4, "8002", 256),
            (v4, "ffffffff0f", u32::MAX),
        ] {
            assert_eq!(
                decode_affiliate(&kubespan_with_prefix(ip, varint)),
                Err(PayloadError::PrefixBits {
                    field: "kubespan.additional_addresses",
                    ip: ip_from_bytes("test", &unhex(ip)).unwrap(),
                    bits
                }),
                "{ip}/{bits}"
            );
        }
        assert!(matches!(
            decode_affiliate(&kubespan_with_prefix("0a00", "08")),
            Err(PayloadError::IpLength { len: 2, .. })
        ));
    }

    #[test]
    fn endpoint_ports_are_checked() {
        // port 0: field omitted.
        assert_eq!(
            decode_endpoint(&unhex("0a040a000002")),
            Err(PayloadError::Port {
                field: "endpoint.port",
                port: 0,
                min: 1
            })
        );
        // port 65536 (0x10000) must not truncate to 0 like Go's uint16() cast.
        assert!(matches!(
            decode_endpoint(&unhex("0a040a000002 10808004")),
            Err(PayloadError::Port { port: 65536, .. })
        ));
        assert_eq!(
            decode_endpoint(&unhex("0a040a000002 10ffff03")).unwrap(),
            "10.0.0.2:65535".parse().unwrap()
        );
        assert!(matches!(
            decode_endpoint(&unhex("0a030a0000 10ec9403")),
            Err(PayloadError::IpLength { len: 3, .. })
        ));
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<Ipv4Addr>(), 0u8..=32)
                .prop_map(|(ip, bits)| IpNet::new(ip.into(), bits).unwrap()),
            (any::<Ipv6Addr>(), 0u8..=128)
                .prop_map(|(ip, bits)| IpNet::new(ip.into(), bits).unwrap()),
        ]
    }

    pub(crate) fn arb_affiliate() -> impl Strategy<Value = AffiliateSpec> {
        let kubespan = (
            ".{0,48}",
            any::<Ipv6Addr>(),
            proptest::collection::vec(arb_net(), 0..4),
            proptest::collection::vec(arb_net(), 0..3),
        )
            .prop_map(|(public_key, address, additional, exclude)| KubeSpanInfo {
                public_key,
                address,
                additional_addresses: additional,
                exclude_advertised_networks: exclude,
                endpoints: Vec::new(),
            });
        (
            (".{0,48}", proptest::collection::vec(any::<IpAddr>(), 0..5)),
            (".{0,20}", ".{0,20}", ".{0,12}", ".{0,24}"),
            proptest::option::of(kubespan),
            proptest::option::of(any::<u16>()),
        )
            .prop_map(
                |((node_id, addresses), (hostname, nodename, machine_type, os), kubespan, cp)| {
                    AffiliateSpec {
                        node_id,
                        addresses,
                        hostname,
                        nodename,
                        machine_type,
                        operating_system: os,
                        kubespan,
                        control_plane: cp
                            .map(|api_server_port| ControlPlaneInfo { api_server_port }),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn affiliate_round_trip(spec in arb_affiliate()) {
            prop_assert_eq!(decode_affiliate(&encode_affiliate(&spec))?, spec);
        }

        #[test]
        fn endpoint_round_trip(ip in any::<IpAddr>(), port in 1u16..=65535) {
            let addr = SocketAddr::new(ip, port);
            prop_assert_eq!(decode_endpoint(&encode_endpoint(addr))?, addr);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_affiliate(&bytes);
            let _ = decode_endpoint(&bytes);
        }
    }
}
