//! The local affiliate: what this node publishes. Pure: host facts come in as
//! values.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

use crate::config::Settings;
use crate::core::types::{AffiliateSpec, KubeSpanInfo};
use crate::kubespan::endpoints::{EndpointInputs, advertised_endpoints};

/// An address configured on a host link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddress {
    pub ip: IpAddr,
    /// The link is administratively and operationally up.
    pub link_up: bool,
}

/// Talos's "current" node addresses: addresses on up links, without loopback,
/// multicast, link-local or unspecified ones; deduplicated, IPv4 first, each
/// family in ascending order (a stable order, so an unchanged host publishes an
/// unchanged affiliate).
pub fn node_addresses(host: &[HostAddress]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = host
        .iter()
        .filter(|a| a.link_up)
        .map(|a| a.ip.to_canonical())
        .filter(|ip| !ip.is_loopback() && !ip.is_multicast() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        })
        .collect();
    out.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    out.dedup();
    out
}

/// Everything about this node that is not in the settings.
#[derive(Debug, Clone)]
pub struct LocalFacts<'a> {
    pub node_id: &'a str,
    pub public_key: &'a str,
    pub kubespan_address: Ipv6Addr,
    pub addresses: &'a [IpAddr],
    /// Public IPs from the discovery service's Hello.
    pub public_ips: &'a [IpAddr],
    pub hostname: &'a str,
    pub operating_system: &'a str,
}

/// The affiliate this node publishes (spec `kubespan.md` §3): always a
/// `worker` without a control-plane port, so Talos nodes never route
/// Kubernetes API traffic to it.
pub fn local_affiliate(s: &Settings, f: &LocalFacts<'_>) -> AffiliateSpec {
    let endpoints = advertised_endpoints(&EndpointInputs {
        node_addresses: f.addresses,
        kubespan_address: Some(f.kubespan_address),
        public_ips: f.public_ips,
        filters: s.endpoint_filters.as_ref(),
        listen_port: s.listen_port,
        extra_endpoints: &s.extra_announced_endpoints,
    });
    let additional: Vec<IpNet> = if s.advertise_kubernetes_networks {
        s.pod_cidrs.clone()
    } else {
        Vec::new()
    };
    AffiliateSpec {
        node_id: f.node_id.to_owned(),
        addresses: f.addresses.to_vec(),
        hostname: f.hostname.to_owned(),
        nodename: s.nodename.clone().unwrap_or_default(),
        machine_type: "worker".into(),
        operating_system: f.operating_system.to_owned(),
        kubespan: s.kubespan_enabled.then(|| KubeSpanInfo {
            public_key: f.public_key.to_owned(),
            address: f.kubespan_address,
            additional_addresses: additional,
            exclude_advertised_networks: s.exclude_advertised_networks.clone(),
            endpoints,
        }),
        control_plane: None,
    }
}

/// `PRETTY_NAME` from os-release text, else `NAME`, else "Linux".
pub fn operating_system(os_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').trim_matches('\'').to_owned())
                .filter(|v| !v.is_empty())
        })
    };
    field("PRETTY_NAME")
        .or_else(|| field("NAME"))
        .unwrap_or_else(|| "Linux".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(extra: &str) -> Settings {
        Settings::parse(
            &format!(
                "cluster:\n  id: abc\n  secret: Bn0/rBSrPw87fdpGO+fjUTL4p5GqqmgNDmsw7bDMkF4=\n{extra}"
            ),
            Path::new("t.yaml"),
        )
        .unwrap()
    }

    fn up(ip: &str) -> HostAddress {
        HostAddress {
            ip: ip.parse().unwrap(),
            link_up: true,
        }
    }

    #[test]
    fn node_addresses_filter_and_order() {
        let host = [
            up("fd7f:175a:b97c:5602::1"),
            up("10.5.0.2"),
            up("127.0.0.1"),
            up("::1"),
            up("fe80::1"),
            up("169.254.1.1"),
            up("172.20.0.2"),
            up("10.5.0.2"),
            HostAddress {
                ip: "192.168.9.9".parse().unwrap(),
                link_up: false,
            },
            up("2001:db8::5"),
        ];
        let got: Vec<String> = node_addresses(&host)
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "10.5.0.2",
                "172.20.0.2",
                "2001:db8::5",
                "fd7f:175a:b97c:5602::1"
            ]
        );
    }

    #[test]
    fn local_affiliate_is_a_worker_with_endpoints_minus_kubespan_address() {
        let s = settings(
            "kubespan:\n  extraAnnouncedEndpoints: [\"1.2.3.4:5678\"]\nnode:\n  nodename: n1\n  podCIDRs: [\"10.244.0.0/24\"]\n",
        );
        let ks: Ipv6Addr = "fd7f:175a:b97c:5602::1".parse().unwrap();
        let addrs: Vec<IpAddr> = vec!["10.5.0.2".parse().unwrap(), IpAddr::V6(ks)];
        let public = ["203.0.113.7".parse().unwrap()];
        let a = local_affiliate(
            &s,
            &LocalFacts {
                node_id: "node",
                public_key: "pk",
                kubespan_address: ks,
                addresses: &addrs,
                public_ips: &public,
                hostname: "host",
                operating_system: "Debian GNU/Linux 12 (bookworm)",
            },
        );
        assert_eq!(a.machine_type, "worker");
        assert!(a.control_plane.is_none());
        assert_eq!(a.nodename, "n1");
        assert_eq!(
            a.addresses, addrs,
            "the KubeSpan address is a node address, as on Talos"
        );
        let k = a.kubespan.unwrap();
        let eps: Vec<String> = k.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(eps, ["10.5.0.2:51820", "203.0.113.7:51820", "1.2.3.4:5678"]);
        assert!(
            k.additional_addresses.is_empty(),
            "pod CIDRs only when advertised"
        );

        let s = settings(
            "kubespan:\n  advertiseKubernetesNetworks: true\nnode:\n  podCIDRs: [\"10.244.0.0/24\"]\n",
        );
        let a = local_affiliate(
            &s,
            &LocalFacts {
                node_id: "node",
                public_key: "pk",
                kubespan_address: ks,
                addresses: &addrs,
                public_ips: &[],
                hostname: "host",
                operating_system: "x",
            },
        );
        assert_eq!(a.kubespan.unwrap().additional_addresses.len(), 1);
    }

    #[test]
    fn os_release_parsing() {
        assert_eq!(
            operating_system(
                "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"
            ),
            "Debian GNU/Linux 12 (bookworm)"
        );
        assert_eq!(operating_system("NAME=Alpine\n"), "Alpine");
        assert_eq!(operating_system(""), "Linux");
    }
}
