//! Sets of IP addresses as sorted interval lists, with minimal-CIDR output.
//!
//! This is the set arithmetic behind peer AllowedIPs (spec §7: union, exclusion, overlap
//! resolution, "minimal CIDR list, IPv4 first, then IPv6, ascending") and the nftables routed
//! set (§4.4). Talos uses `netipx.IPSet`; this is the same model: IPv4 and IPv6 are separate
//! spaces, and an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is an IPv6 address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Sorted, disjoint, non-adjacent inclusive ranges of one address family.
///
/// Both families are stored as `u128` so one implementation serves both; the family's bit
/// width only matters when splitting into CIDR blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RangeSet {
    ranges: Vec<(u128, u128)>,
}

impl RangeSet {
    /// Sorts and coalesces overlapping or adjacent ranges.
    fn normalized(mut ranges: Vec<(u128, u128)>) -> Self {
        ranges.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match out.last_mut() {
                // `last.1 == MAX` means everything after is covered already; otherwise
                // `start <= last.1 + 1` catches both overlap and adjacency.
                Some(last) if last.1 == u128::MAX || start <= last.1 + 1 => {
                    last.1 = last.1.max(end);
                }
                _ => out.push((start, end)),
            }
        }
        Self { ranges: out }
    }

    fn union(&self, other: &Self) -> Self {
        let mut all = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        all.extend_from_slice(&self.ranges);
        all.extend_from_slice(&other.ranges);
        Self::normalized(all)
    }

    fn difference(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        // Ranges of `other` that end before the current position can never matter again,
        // because `self` is sorted.
        let mut skip = 0;
        for &(start, end) in &self.ranges {
            while skip < other.ranges.len() && other.ranges[skip].1 < start {
                skip += 1;
            }
            let mut cursor = Some(start);
            for &(cut_start, cut_end) in &other.ranges[skip..] {
                let Some(pos) = cursor else { break };
                if cut_start > end {
                    break;
                }
                if cut_start > pos {
                    out.push((pos, cut_start - 1));
                }
                cursor = if cut_end >= end {
                    None
                } else {
                    Some(pos.max(cut_end + 1))
                };
            }
            if let Some(pos) = cursor {
                out.push((pos, end));
            }
        }
        Self { ranges: out }
    }

    fn intersection(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a_start, a_end) = self.ranges[i];
            let (b_start, b_end) = other.ranges[j];
            let lo = a_start.max(b_start);
            let hi = a_end.min(b_end);
            if lo <= hi {
                out.push((lo, hi));
            }
            if a_end < b_end {
                i += 1;
            } else {
                j += 1;
            }
        }
        Self { ranges: out }
    }

    fn contains(&self, value: u128) -> bool {
        // Index of the first range starting after `value`; the one before it is the candidate.
        let idx = self.ranges.partition_point(|&(start, _)| start <= value);
        idx > 0 && self.ranges[idx - 1].1 >= value
    }

    /// Splits every range into the fewest aligned CIDR blocks, ascending.
    ///
    /// Because ranges are disjoint and non-adjacent, no block of one range can merge with a
    /// block of another, so this is also the minimal CIDR cover of the whole set.
    fn cidr_blocks(&self, width: u32) -> Vec<(u128, u8)> {
        let mut out = Vec::new();
        for &(start, end) in &self.ranges {
            let mut lo = start;
            loop {
                // Largest block allowed by the alignment of `lo`...
                let align = if lo == 0 {
                    width
                } else {
                    lo.trailing_zeros().min(width)
                };
                // ...and by the room left: floor(log2(end - lo + 1)).
                let span = end - lo;
                let fit = if span == u128::MAX {
                    128
                } else {
                    127 - (span + 1).leading_zeros()
                };
                let bits = align.min(fit);
                // `bits <= width <= 128`, so the prefix length fits in a u8.
                out.push((lo, (width - bits) as u8));
                if bits >= 128 {
                    break;
                }
                match lo.checked_add(1u128 << bits) {
                    Some(next) if next <= end => lo = next,
                    _ => break,
                }
            }
        }
        out
    }
}

/// An arbitrary set of IPv4 and IPv6 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpSet {
    v4: RangeSet,
    v6: RangeSet,
}

fn v4_range(net: &Ipv4Net) -> (u128, u128) {
    (
        u128::from(u32::from(net.network())),
        u128::from(u32::from(net.broadcast())),
    )
}

fn v6_range(net: &Ipv6Net) -> (u128, u128) {
    (u128::from(net.network()), u128::from(net.broadcast()))
}

impl IpSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from prefixes and single addresses in one pass.
    ///
    /// Prefixes are taken as the whole network they denote: host bits are ignored, so a
    /// non-canonical `10.244.3.1/24` adds `10.244.3.0/24` (spec §7 step 2).
    pub fn from_parts<P, A>(prefixes: P, addrs: A) -> Self
    where
        P: IntoIterator<Item = IpNet>,
        A: IntoIterator<Item = IpAddr>,
    {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in prefixes {
            match net {
                IpNet::V4(n) => v4.push(v4_range(&n)),
                IpNet::V6(n) => v6.push(v6_range(&n)),
            }
        }
        for addr in addrs {
            match addr {
                IpAddr::V4(a) => {
                    let v = u128::from(u32::from(a));
                    v4.push((v, v));
                }
                IpAddr::V6(a) => {
                    let v = u128::from(a);
                    v6.push((v, v));
                }
            }
        }
        Self {
            v4: RangeSet::normalized(v4),
            v6: RangeSet::normalized(v6),
        }
    }

    /// The set covered by `prefixes` (host bits ignored).
    pub fn from_prefixes<P: IntoIterator<Item = IpNet>>(prefixes: P) -> Self {
        Self::from_parts(prefixes, std::iter::empty())
    }

    /// The set of exactly these addresses.
    pub fn from_addrs<A: IntoIterator<Item = IpAddr>>(addrs: A) -> Self {
        Self::from_parts(std::iter::empty(), addrs)
    }

    pub fn insert_prefix(&mut self, net: IpNet) {
        *self = self.union(&Self::from_prefixes([net]));
    }

    pub fn insert_addr(&mut self, addr: IpAddr) {
        *self = self.union(&Self::from_addrs([addr]));
    }

    pub fn union(&self, other: &Self) -> Self {
        Self {
            v4: self.v4.union(&other.v4),
            v6: self.v6.union(&other.v6),
        }
    }

    /// Addresses in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        Self {
            v4: self.v4.difference(&other.v4),
            v6: self.v6.difference(&other.v6),
        }
    }

    pub fn intersection(&self, other: &Self) -> Self {
        Self {
            v4: self.v4.intersection(&other.v4),
            v6: self.v6.intersection(&other.v6),
        }
    }

    pub fn overlaps(&self, other: &Self) -> bool {
        !self.intersection(other).is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.v4.ranges.is_empty() && self.v6.ranges.is_empty()
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.v4.contains(u128::from(u32::from(a))),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }

    /// Minimal CIDR cover of the IPv4 part, ascending.
    pub fn v4_prefixes(&self) -> Vec<Ipv4Net> {
        self.v4
            .cidr_blocks(32)
            .into_iter()
            .filter_map(|(start, len)| {
                // Blocks come from u32 values, so the conversion cannot fail; filter_map keeps
                // this free of panics anyway.
                let addr = Ipv4Addr::from(u32::try_from(start).ok()?);
                Ipv4Net::new(addr, len).ok()
            })
            .collect()
    }

    /// Minimal CIDR cover of the IPv6 part, ascending.
    pub fn v6_prefixes(&self) -> Vec<Ipv6Net> {
        self.v6
            .cidr_blocks(128)
            .into_iter()
            .filter_map(|(start, len)| Ipv6Net::new(Ipv6Addr::from(start), len).ok())
            .collect()
    }

    /// Minimal CIDR cover: IPv4 ascending, then IPv6 ascending (the order of
    /// `netipx.IPSet.Prefixes()`, which Talos uses for AllowedIPs).
    pub fn prefixes(&self) -> Vec<IpNet> {
        self.v4_prefixes()
            .into_iter()
            .map(IpNet::V4)
            .chain(self.v6_prefixes().into_iter().map(IpNet::V6))
            .collect()
    }
}

impl FromIterator<IpNet> for IpSet {
    fn from_iter<T: IntoIterator<Item = IpNet>>(iter: T) -> Self {
        Self::from_prefixes(iter)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn strs(set: &IpSet) -> Vec<String> {
        set.prefixes().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn masks_non_canonical_prefixes_and_merges() {
        let set = IpSet::from_parts(
            [net("10.244.3.1/24"), net("10.244.3.0/32")],
            ["192.168.3.4".parse().unwrap()],
        );
        assert_eq!(strs(&set), ["10.244.3.0/24", "192.168.3.4/32"]);
    }

    #[test]
    fn orders_v4_before_v6_and_ascending() {
        let set = IpSet::from_prefixes([
            net("fd00::1/128"),
            net("10.0.0.0/8"),
            net("2001:db8::/32"),
            net("1.2.3.4/32"),
        ]);
        assert_eq!(
            strs(&set),
            ["1.2.3.4/32", "10.0.0.0/8", "2001:db8::/32", "fd00::1/128"]
        );
    }

    #[test]
    fn adjacent_blocks_merge_into_parent() {
        let set = IpSet::from_prefixes([net("10.0.0.0/25"), net("10.0.0.128/25")]);
        assert_eq!(strs(&set), ["10.0.0.0/24"]);
    }

    #[test]
    fn unaligned_range_splits_minimally() {
        // 10.0.0.1 .. 10.0.0.6 = .1/32 .2/31 .4/31 .6/32
        let set = IpSet::from_prefixes([net("10.0.0.0/29")])
            .difference(&IpSet::from_addrs(["10.0.0.0".parse().unwrap()]))
            .difference(&IpSet::from_addrs(["10.0.0.7".parse().unwrap()]));
        assert_eq!(
            strs(&set),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
    }

    #[test]
    fn whole_spaces_and_top_end_do_not_overflow() {
        let all = IpSet::from_prefixes([net("0.0.0.0/0"), net("::/0")]);
        assert_eq!(strs(&all), ["0.0.0.0/0", "::/0"]);

        let top = IpSet::from_prefixes([
            net("255.255.255.255/32"),
            net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"),
        ]);
        assert_eq!(
            strs(&top),
            [
                "255.255.255.255/32",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
            ]
        );

        // Everything but the last address: 127 + 32 blocks, and no overflow on the way.
        let v6_but_last = all.difference(&top);
        assert_eq!(v6_but_last.v6_prefixes().len(), 128);
        assert_eq!(v6_but_last.v4_prefixes().len(), 32);
        assert!(!v6_but_last.contains("255.255.255.255".parse().unwrap()));
        assert!(v6_but_last.contains("255.255.255.254".parse().unwrap()));
        assert!(v6_but_last.contains("::".parse().unwrap()));
        assert_eq!(v6_but_last.union(&top), all);
    }

    #[test]
    fn v4_mapped_v6_is_a_v6_address() {
        let set = IpSet::from_prefixes([net("10.0.0.0/8")]);
        assert!(!set.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(set.contains("10.1.2.3".parse().unwrap()));
    }

    // --- property tests against a brute-force model on a small corner of the IPv4 space ---

    const BASE: u32 = 0x0a00_0000; // 10.0.0.0; the model lives in 10.0.0.0/24

    fn small_net() -> impl Strategy<Value = Ipv4Net> {
        (0u32..256, 24u8..=32)
            .prop_map(|(offset, len)| Ipv4Net::new(Ipv4Addr::from(BASE + offset), len).unwrap())
    }

    fn model_of(nets: &[Ipv4Net]) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        for n in nets {
            let lo = u32::from(n.network());
            let hi = u32::from(n.broadcast());
            out.extend(lo..=hi);
        }
        out
    }

    fn set_of(nets: &[Ipv4Net]) -> IpSet {
        IpSet::from_prefixes(nets.iter().copied().map(IpNet::V4))
    }

    fn expand(set: &IpSet) -> BTreeSet<u32> {
        model_of(&set.v4_prefixes())
    }

    /// Greedy minimal cover: from the lowest uncovered member, take the largest aligned block
    /// that lies entirely inside the set. This is the textbook optimum, computed naively.
    fn brute_force_cover(members: &BTreeSet<u32>) -> Vec<Ipv4Net> {
        let mut out = Vec::new();
        let mut iter = members.iter().copied().peekable();
        while let Some(lo) = iter.next() {
            let mut len = 32u8;
            while len > 0 {
                let size = 1u64 << (32 - (len - 1));
                let parent_lo = u64::from(lo) & !(size - 1);
                if parent_lo != u64::from(lo) {
                    break;
                }
                let all_in = (parent_lo..parent_lo + size)
                    .all(|a| u32::try_from(a).is_ok_and(|a| members.contains(&a)));
                if !all_in {
                    break;
                }
                len -= 1;
            }
            let block_hi = u64::from(lo) + (1u64 << (32 - len)) - 1;
            while iter.peek().is_some_and(|&a| u64::from(a) <= block_hi) {
                iter.next();
            }
            out.push(Ipv4Net::new(Ipv4Addr::from(lo), len).unwrap());
        }
        out
    }

    proptest! {
        #[test]
        fn union_matches_model(a in prop::collection::vec(small_net(), 0..6),
                               b in prop::collection::vec(small_net(), 0..6)) {
            let got = expand(&set_of(&a).union(&set_of(&b)));
            let want: BTreeSet<u32> = model_of(&a).union(&model_of(&b)).copied().collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn difference_matches_model(a in prop::collection::vec(small_net(), 0..6),
                                    b in prop::collection::vec(small_net(), 0..6)) {
            let got = expand(&set_of(&a).difference(&set_of(&b)));
            let want: BTreeSet<u32> = model_of(&a).difference(&model_of(&b)).copied().collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn intersection_and_overlap_match_model(a in prop::collection::vec(small_net(), 0..6),
                                                b in prop::collection::vec(small_net(), 0..6)) {
            let (sa, sb) = (set_of(&a), set_of(&b));
            let want: BTreeSet<u32> =
                model_of(&a).intersection(&model_of(&b)).copied().collect();
            prop_assert_eq!(expand(&sa.intersection(&sb)), want.clone());
            prop_assert_eq!(sa.overlaps(&sb), !want.is_empty());
        }

        #[test]
        fn cover_is_the_minimal_cover(a in prop::collection::vec(small_net(), 0..8),
                                      b in prop::collection::vec(small_net(), 0..4)) {
            let set = set_of(&a).difference(&set_of(&b));
            let members = expand(&set);
            prop_assert_eq!(set.v4_prefixes(), brute_force_cover(&members));
        }

        #[test]
        fn contains_matches_model(a in prop::collection::vec(small_net(), 0..6),
                                  probe in 0u32..300) {
            let addr = BASE + probe;
            prop_assert_eq!(
                set_of(&a).contains(IpAddr::V4(Ipv4Addr::from(addr))),
                model_of(&a).contains(&addr)
            );
        }
    }
}
