//! The endpoints this node advertises to its peers (spec §3.2).
//!
//! Talos builds them in `LocalAffiliateController`: node addresses minus the KubeSpan and
//! SideroLink addresses, plus the public IP(s) the discovery service saw, filtered by
//! `filters.endpoints` with siderolabs/net `FilterIPs`, paired with the listen port, plus the
//! `extraAnnouncedEndpoints` (unfiltered, deduplicated).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::core::ula::{UlaPurpose, is_ula};

/// One parsed `filters.endpoints` entry: a network, and whether it includes or excludes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointFilter {
    /// `true` for a `!`-prefixed (excluding) entry.
    pub negative: bool,
    /// The address as written; host bits are kept, like Go's `netip.Prefix`.
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl EndpointFilter {
    /// Go `netip.Prefix.Contains`: same family (an IPv4-mapped IPv6 address is IPv6) and equal
    /// leading `prefix_len` bits.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => leading_bits_equal(
                u32::from(net).into(),
                u32::from(ip).into(),
                32,
                self.prefix_len,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                leading_bits_equal(u128::from(net), u128::from(ip), 128, self.prefix_len)
            }
            _ => false,
        }
    }
}

fn leading_bits_equal(a: u128, b: u128, width: u32, len: u8) -> bool {
    let len = u32::from(len).min(width);
    if len == 0 {
        return true;
    }
    let shift = width - len;
    (a >> shift) == (b >> shift)
}

impl fmt::Display for EndpointFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bang = if self.negative { "!" } else { "" };
        write!(f, "{bang}{}/{}", self.addr, self.prefix_len)
    }
}

/// Why a filter entry did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointFilterError {
    #[error(
        "KubeSpan endpoint filter #{index} {entry:?} is invalid: {reason}; write a CIDR \
         (10.0.0.0/8, 2001:db8::/32) or a bare IP, prefixed with ! to exclude it"
    )]
    Invalid {
        /// Position in the configured list, from 0.
        index: usize,
        entry: String,
        reason: &'static str,
    },
}

impl FromStr for EndpointFilter {
    type Err = &'static str;

    /// Parses like siderolabs/net `ParseSubnetOrAddress` after stripping `!`: a Go
    /// `netip.ParsePrefix` (no zone, decimal prefix length without sign or leading zeros), or
    /// else a bare address (zone allowed and dropped) as /32 or /128.
    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let (negative, body) = match entry.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, entry),
        };
        let (addr, prefix_len) = match body.rsplit_once('/') {
            Some((addr, bits)) => {
                if addr.contains('%') {
                    return Err("a zone (%...) is not allowed in a CIDR");
                }
                let addr: IpAddr = addr.parse().map_err(|_| "not an IP address before '/'")?;
                (addr, parse_prefix_len(bits, addr)?)
            }
            None => {
                let addr = parse_bare_addr(body)?;
                let len = if addr.is_ipv4() { 32 } else { 128 };
                (addr, len)
            }
        };
        Ok(Self {
            negative,
            addr,
            prefix_len,
        })
    }
}

fn parse_prefix_len(bits: &str, addr: IpAddr) -> Result<u8, &'static str> {
    const BAD: &str = "the prefix length must be a decimal number without sign or leading zeros";
    if bits.is_empty() || !bits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    if bits.len() > 1 && bits.starts_with('0') {
        return Err(BAD);
    }
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    match bits.parse::<u8>() {
        Ok(len) if len <= max => Ok(len),
        _ => Err("the prefix length is too long for the address family"),
    }
}

fn parse_bare_addr(s: &str) -> Result<IpAddr, &'static str> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    // Go's netip.ParseAddr accepts `fe80::1%eth0`; the zone does not survive into the prefix.
    match s.split_once('%') {
        Some((addr, zone)) if !zone.is_empty() => addr
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| "only an IPv6 address may carry a zone"),
        Some(_) => Err("the zone after % is empty"),
        None => Err("not a CIDR or an IP address"),
    }
}

/// An ordered `filters.endpoints` list (spec §2, §3.2 step 4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointFilters(Vec<EndpointFilter>);

impl EndpointFilters {
    /// Parses every entry, failing on the first bad one (Talos fails the whole affiliate
    /// update too, so a typo is never silently ignored).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, EndpointFilterError> {
        entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                let entry = entry.as_ref();
                entry
                    .parse()
                    .map_err(|reason| EndpointFilterError::Invalid {
                        index,
                        entry: entry.to_owned(),
                        reason,
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn entries(&self) -> &[EndpointFilter] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// siderolabs/net `FilterIPs`: for each entry in order, a positive entry appends every
    /// matching address not yet in the result (in `ips` order), a negative entry removes
    /// matching addresses added so far. Addresses no positive entry matched are dropped, so
    /// an empty or all-negative list yields nothing.
    pub fn apply(&self, ips: &[IpAddr]) -> Vec<IpAddr> {
        let mut result: Vec<IpAddr> = Vec::new();
        for filter in &self.0 {
            for &ip in ips {
                if !filter.contains(ip) {
                    continue;
                }
                if filter.negative {
                    if let Some(pos) = result.iter().position(|&r| r == ip) {
                        result.remove(pos);
                    }
                } else if !result.contains(&ip) {
                    result.push(ip);
                }
            }
        }
        result
    }
}

/// Everything the advertised-endpoint computation looks at.
#[derive(Clone, Copy, Debug)]
pub struct EndpointInputs<'a> {
    /// "current" node addresses (no-k8s filtered), in Talos address order.
    pub node_addresses: &'a [IpAddr],
    /// This node's KubeSpan address; it sits on an UP link but is never an endpoint.
    pub kubespan_address: Option<Ipv6Addr>,
    /// Public IPs reported by discovery services in their Hello replies, in order.
    pub public_ips: &'a [IpAddr],
    /// `filters.endpoints`; `None` when not configured. `Some` of an empty list is a
    /// configured filter that matches nothing (Talos checks the list for nil, not empty).
    pub filters: Option<&'a EndpointFilters>,
    /// WireGuard listen port paired with every computed address (51820 on Talos).
    pub listen_port: u16,
    /// `extraAnnouncedEndpoints`: appended after filtering, with their own ports.
    pub extra_endpoints: &'a [SocketAddr],
}

/// The endpoint list to publish, in order (spec §3.2).
pub fn advertised_endpoints(inputs: &EndpointInputs<'_>) -> Vec<SocketAddr> {
    let ks = inputs.kubespan_address.map(IpAddr::V6);

    // Steps 1-2. Talos reads addresses through NodeAddress.IPs(), which is deduplicated.
    let mut ips: Vec<IpAddr> = Vec::with_capacity(inputs.node_addresses.len() + 1);
    for &ip in inputs.node_addresses {
        if Some(ip) == ks || is_ula(ip, UlaPurpose::SideroLink) || ips.contains(&ip) {
            continue;
        }
        ips.push(ip);
    }

    // Step 3: public IPs are added before filtering, so filters apply to them too.
    for &ip in inputs.public_ips {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }

    // Step 4.
    if let Some(filters) = inputs.filters {
        ips = filters.apply(&ips);
    }

    // Step 5.
    let mut endpoints: Vec<SocketAddr> = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip, inputs.listen_port))
        .collect();

    // Step 6: deduplicated against the computed list and against each other.
    for &extra in inputs.extra_endpoints {
        if !endpoints.contains(&extra) {
            endpoints.push(extra);
        }
    }

    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn eps(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn filters(list: &[&str]) -> EndpointFilters {
        EndpointFilters::parse(list).unwrap()
    }

    fn talos_addresses() -> Vec<IpAddr> {
        // Talos local_affiliate_test: the /64 and /128 of 2001:123:4567::1 both appear in
        // the current addresses; the KubeSpan address was added to them.
        ips(&[
            "172.20.0.2",
            "10.5.0.1",
            "192.168.192.168",
            "2001:123:4567::1",
            "2001:123:4567::1",
            "fdae:41e4:649b:9303:60be:7e36:c270:3238", // SideroLink
            "fd7f:175a:b97c:5602:e871:1bff:feb2:ccee", // own KubeSpan address
        ])
    }

    fn ks() -> Option<Ipv6Addr> {
        Some("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee".parse().unwrap())
    }

    #[test]
    fn talos_example() {
        let addrs = talos_addresses();
        let public = ips(&["1.1.1.1", "2001:123:4567::1"]);
        let f = filters(&["0.0.0.0/0", "!192.168.0.0/16", "2001::/16"]);
        let extras = eps(&["10.5.0.1:51820", "1.2.3.4:5678"]);
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &addrs,
            kubespan_address: ks(),
            public_ips: &public,
            filters: Some(&f),
            listen_port: 51820,
            extra_endpoints: &extras,
        });
        assert_eq!(
            got,
            eps(&[
                "172.20.0.2:51820",
                "10.5.0.1:51820",
                "1.1.1.1:51820",
                "[2001:123:4567::1]:51820",
                "1.2.3.4:5678",
            ])
        );
    }

    #[test]
    fn no_filters_keeps_address_order_and_skips_ks_and_siderolink() {
        let addrs = talos_addresses();
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &addrs,
            kubespan_address: ks(),
            public_ips: &[],
            filters: None,
            listen_port: 51820,
            extra_endpoints: &[],
        });
        assert_eq!(
            got,
            eps(&[
                "172.20.0.2:51820",
                "10.5.0.1:51820",
                "192.168.192.168:51820",
                "[2001:123:4567::1]:51820",
            ])
        );
    }

    #[test]
    fn only_negative_filters_publish_nothing_but_extras() {
        let addrs = ips(&["10.0.0.1", "192.168.1.1"]);
        let f = filters(&["!192.168.0.0/16"]);
        let extras = eps(&["1.2.3.4:5678"]);
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &addrs,
            kubespan_address: None,
            public_ips: &ips(&["8.8.8.8"]),
            filters: Some(&f),
            listen_port: 51820,
            extra_endpoints: &extras,
        });
        assert_eq!(got, extras);
    }

    #[test]
    fn configured_empty_filter_list_publishes_nothing() {
        let empty = EndpointFilters::default();
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &ips(&["10.0.0.1"]),
            kubespan_address: None,
            public_ips: &[],
            filters: Some(&empty),
            listen_port: 51820,
            extra_endpoints: &[],
        });
        assert!(got.is_empty());
    }

    #[test]
    fn duplicate_public_ip_is_ignored_and_new_one_appended() {
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &ips(&["10.0.0.1", "2001:db8::1"]),
            kubespan_address: None,
            public_ips: &ips(&["10.0.0.1", "203.0.113.7", "203.0.113.7"]),
            filters: None,
            listen_port: 4000,
            extra_endpoints: &[],
        });
        assert_eq!(
            got,
            eps(&["10.0.0.1:4000", "[2001:db8::1]:4000", "203.0.113.7:4000"])
        );
    }

    #[test]
    fn public_ip_is_subject_to_filters() {
        let f = filters(&["10.0.0.0/8"]);
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &ips(&["10.0.0.1"]),
            kubespan_address: None,
            public_ips: &ips(&["203.0.113.7"]),
            filters: Some(&f),
            listen_port: 51820,
            extra_endpoints: &[],
        });
        assert_eq!(got, eps(&["10.0.0.1:51820"]));
    }

    #[test]
    fn extras_dedup_against_computed_and_each_other_keeping_their_ports() {
        let extras = eps(&[
            "10.0.0.1:51820",
            "10.0.0.1:51821",
            "[2001:db8::9]:1",
            "10.0.0.1:51821",
        ]);
        let got = advertised_endpoints(&EndpointInputs {
            node_addresses: &ips(&["10.0.0.1"]),
            kubespan_address: None,
            public_ips: &[],
            filters: None,
            listen_port: 51820,
            extra_endpoints: &extras,
        });
        assert_eq!(
            got,
            eps(&["10.0.0.1:51820", "10.0.0.1:51821", "[2001:db8::9]:1"])
        );
    }

    #[test]
    fn filter_output_follows_filter_order() {
        let list = ips(&["10.0.0.1", "192.168.1.1", "10.0.0.2", "2001:db8::1"]);
        assert_eq!(
            filters(&["2001:db8::/32", "192.168.0.0/16", "0.0.0.0/0"]).apply(&list),
            ips(&["2001:db8::1", "192.168.1.1", "10.0.0.1", "10.0.0.2"])
        );
    }

    #[test]
    fn negative_removes_only_what_was_added_so_far() {
        let list = ips(&["10.0.0.1", "10.3.4.1", "172.20.0.1"]);
        // A later positive entry adds an address back after a negative one removed it; it
        // goes back in `ips` order relative to the other newly added addresses.
        assert_eq!(
            filters(&["10.0.0.0/8", "!10.3.4.1", "0.0.0.0/0"]).apply(&list),
            ips(&["10.0.0.1", "10.3.4.1", "172.20.0.1"])
        );
        assert_eq!(
            filters(&["10.0.0.0/8", "!10.3.4.1", "172.16.0.0/12", "10.3.4.1"]).apply(&list),
            ips(&["10.0.0.1", "172.20.0.1", "10.3.4.1"])
        );
        // siderolabs/net test cases.
        assert_eq!(
            filters(&["10.0.0.0/8", "!10.3.4.1/32"]).apply(&ips(&[
                "10.3.4.6",
                "10.3.4.1",
                "172.20.0.1"
            ])),
            ips(&["10.3.4.6"])
        );
        assert_eq!(
            filters(&["10.0.0.0/8", "0.0.0.0/0"]).apply(&ips(&["10.3.4.6", "172.20.0.1"])),
            ips(&["10.3.4.6", "172.20.0.1"])
        );
        assert_eq!(
            filters(&["0.0.0.0/0", "::/0"]).apply(&ips(&["10.3.4.6", "2001:db8::1"])),
            ips(&["10.3.4.6", "2001:db8::1"])
        );
    }

    #[test]
    fn families_do_not_cross_match() {
        let list = ips(&["10.0.0.1", "::ffff:10.0.0.2", "2001:db8::1"]);
        assert_eq!(filters(&["0.0.0.0/0"]).apply(&list), ips(&["10.0.0.1"]));
        assert_eq!(
            filters(&["::/0"]).apply(&list),
            ips(&["::ffff:10.0.0.2", "2001:db8::1"])
        );
    }

    #[test]
    fn parses_cidrs_bare_ips_and_non_canonical_prefixes() {
        let f = filters(&[
            "10.1.2.3/8",
            "!192.168.1.5",
            "2001:db8::1",
            "fe80::1%eth0",
            "::/0",
        ]);
        let e = f.entries();
        assert_eq!(e[0].to_string(), "10.1.2.3/8");
        assert!(e[0].contains("10.200.0.1".parse().unwrap()));
        assert!(e[1].negative);
        assert_eq!(e[1].to_string(), "!192.168.1.5/32");
        assert_eq!(e[2].prefix_len, 128);
        assert_eq!(e[3].to_string(), "fe80::1/128");
        assert_eq!(e[4].prefix_len, 0);
    }

    #[test]
    fn rejects_bad_entries_naming_them() {
        for (bad, idx) in [
            ("10.0.0.0/33", 1),
            ("10.0.0.0/08", 1),
            ("10.0.0.0/+8", 1),
            ("10.0.0.0/", 1),
            ("010.0.0.1", 1),
            ("!", 1),
            ("example.com", 1),
            (" 10.0.0.0/8", 1),
            ("fe80::1%eth0/64", 1),
            ("10.0.0.1%eth0", 1),
            ("fe80::1%", 1),
            ("2001:db8::/129", 1),
            ("1.2.3.4:80", 1),
        ] {
            let err = EndpointFilters::parse(&["0.0.0.0/0", bad]).unwrap_err();
            let EndpointFilterError::Invalid { index, entry, .. } = &err;
            assert_eq!((*index, entry.as_str()), (idx, bad), "{bad}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains("prefixed with !"), "{msg}");
        }
    }
}
