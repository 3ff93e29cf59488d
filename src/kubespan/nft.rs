//! The `nft -f` script for our own `inet kubespan` table (spec §4.4).
//!
//! Talos puts two chains into its shared `inet talos` table and rewrites them on every
//! reconcile. We own a whole table instead and replace it in one `nft -f` transaction, so a
//! half-applied ruleset is never visible and nothing of `inet talos` is touched (spec §4.4:
//! a foreign daemon must not). The script starts with
//!
//! ```text
//! add table inet kubespan
//! delete table inet kubespan
//! table inet kubespan { ... }
//! ```
//!
//! `add` is a no-op if the table exists and creates it otherwise, so the `delete` never fails,
//! and the whole script is one atomic batch.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::{Ipv4Net, Ipv6Net};

use super::routed::RoutedSet;
use super::{FORCE_FWMARK, FWMARK_MASK, WIREGUARD_FWMARK};

/// Table family and name.
pub const TABLE: &str = "inet kubespan";

/// Smallest KubeSpan MTU Talos accepts (the IPv6 minimum link MTU).
pub const MIN_MTU: u32 = 1280;
/// Largest MTU whose MSS clamp still fits the 16-bit MSS option.
pub const MAX_MTU: u32 = 65535;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NftError {
    #[error(
        "KubeSpan MTU {mtu} is out of range; configure an MTU between {MIN_MTU} and {MAX_MTU} \
         (Talos default 1420)"
    )]
    MtuOutOfRange { mtu: u32 },
}

/// MSS for IPv4 destinations: MTU minus 20 (IP) + 20 (TCP) + 12 (options) bytes.
pub fn mss_clamp_v4(mtu: u32) -> u32 {
    mtu.saturating_sub(52)
}

/// MSS for IPv6 destinations: MTU minus 40 (IP) + 20 (TCP) + 12 (options) bytes.
pub fn mss_clamp_v6(mtu: u32) -> u32 {
    mtu.saturating_sub(72)
}

/// The mark rewrite Talos applies to routed packets, as nft syntax.
///
/// Talos programs the kernel bitwise op `mark = (mark & ~0x60) ^ 0x40`. After the AND, bits
/// 0x60 are zero, so the XOR just sets 0x40: the result always has `mark & 0x60 == 0x40`,
/// whatever the input, and every bit outside 0x60 is kept. We write that directly as
/// `& 0xffffff9f | 0x00000040` (clear the mask, set the mark). nft lists the same kernel
/// expression as `& 0xffffffdf | 0x00000040` (the form quoted in spec §4.4): it folds the set
/// bit 0x40 into the AND mask, because clearing a bit that is set right after is a no-op. Both
/// spellings are the same function, but only `& !mask | value` states the intent and stays
/// right for any mark value inside the mask.
fn set_mark_expr() -> String {
    format!(
        "meta mark set meta mark & {:#010x} | {:#010x}",
        !FWMARK_MASK, FORCE_FWMARK
    )
}

/// Packets WireGuard itself sent (and anything else already carrying its mark) are left alone;
/// this keeps the encrypted UDP to a peer's physical IP, which is also in the routed set, out
/// of the tunnel.
fn wireguard_mark_accept() -> String {
    format!(
        "meta mark & {:#010x} == {:#010x} accept",
        FWMARK_MASK, WIREGUARD_FWMARK
    )
}

fn host_or_prefix(addr: IpAddr, len: u8, host_len: u8) -> String {
    if len == host_len {
        addr.to_string()
    } else {
        format!("{addr}/{len}")
    }
}

/// `{ 10.0.0.0/24, 192.168.1.5 }`, or `None` when there is nothing to match.
fn v4_set(nets: &[Ipv4Net]) -> Option<String> {
    (!nets.is_empty()).then(|| {
        let items: Vec<String> = nets
            .iter()
            .map(|n| host_or_prefix(IpAddr::V4(n.network()), n.prefix_len(), 32))
            .collect();
        format!("{{ {} }}", items.join(", "))
    })
}

fn v6_set(nets: &[Ipv6Net]) -> Option<String> {
    (!nets.is_empty()).then(|| {
        let items: Vec<String> = nets
            .iter()
            .map(|n| host_or_prefix(IpAddr::V6(n.network()), n.prefix_len(), 128))
            .collect();
        format!("{{ {} }}", items.join(", "))
    })
}

/// The full script replacing `inet kubespan` with the chains for `routed` (spec §4.4):
///
/// * `prerouting` (filter, prerouting, priority filter): WireGuard-marked packets accepted;
///   packets to routed destinations get mark 0x40 (→ rule 32500 → table 180 → `kubespan`).
/// * `output` (type route, so the kernel re-routes after the mark changes): the same, plus
///   loopback traffic accepted, and TCP SYNs (not RSTs) to routed destinations get their MSS
///   clamped to fit the tunnel.
///
/// A family without routed prefixes gets no rules.
pub fn render_ruleset(routed: &RoutedSet, mtu: u32) -> Result<String, NftError> {
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(NftError::MtuOutOfRange { mtu });
    }
    let sets = [
        ("ip", v4_set(&routed.v4), mss_clamp_v4(mtu)),
        ("ip6", v6_set(&routed.v6), mss_clamp_v6(mtu)),
    ];
    let mark = set_mark_expr();
    let wg_accept = wireguard_mark_accept();

    let mut s = String::new();
    // `write!` into a String cannot fail.
    let _ = writeln!(s, "add table {TABLE}");
    let _ = writeln!(s, "delete table {TABLE}");
    let _ = writeln!(s, "table {TABLE} {{");

    let _ = writeln!(s, "\tchain prerouting {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook prerouting priority filter; policy accept;"
    );
    let _ = writeln!(s, "\t\t{wg_accept}");
    for (family, set, _) in &sets {
        if let Some(set) = set {
            let _ = writeln!(s, "\t\t{family} daddr {set} {mark} accept");
        }
    }
    let _ = writeln!(s, "\t}}");

    let _ = writeln!(s, "\tchain output {{");
    let _ = writeln!(
        s,
        "\t\ttype route hook output priority filter; policy accept;"
    );
    let _ = writeln!(s, "\t\t{wg_accept}");
    let _ = writeln!(s, "\t\toifname \"lo\" accept");
    for (family, set, mss) in &sets {
        if let Some(set) = set {
            let _ = writeln!(
                s,
                "\t\t{family} daddr {set} tcp flags & (syn | rst) == syn \
                 tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
            );
        }
    }
    for (family, set, _) in &sets {
        if let Some(set) = set {
            let _ = writeln!(s, "\t\t{family} daddr {set} {mark} accept");
        }
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    Ok(s)
}

/// Removes the table if present (spec §4.6 cleanup); also fine when it does not exist.
pub fn render_teardown() -> String {
    format!("add table {TABLE}\ndelete table {TABLE}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(v4: &[&str], v6: &[&str]) -> RoutedSet {
        RoutedSet {
            v4: v4.iter().map(|s| s.parse().unwrap()).collect(),
            v6: v6.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn renders_both_families_exactly() {
        let script = render_ruleset(
            &routed(
                &["10.0.0.0/24", "192.168.1.5/32"],
                &["2001:db8::/64", "2001:db8:1::1/128"],
            ),
            1420,
        )
        .unwrap();
        let want = "\
add table inet kubespan
delete table inet kubespan
table inet kubespan {
\tchain prerouting {
\t\ttype filter hook prerouting priority filter; policy accept;
\t\tmeta mark & 0x00000060 == 0x00000020 accept
\t\tip daddr { 10.0.0.0/24, 192.168.1.5 } meta mark set meta mark & 0xffffff9f | 0x00000040 accept
\t\tip6 daddr { 2001:db8::/64, 2001:db8:1::1 } meta mark set meta mark & 0xffffff9f | 0x00000040 accept
\t}
\tchain output {
\t\ttype route hook output priority filter; policy accept;
\t\tmeta mark & 0x00000060 == 0x00000020 accept
\t\toifname \"lo\" accept
\t\tip daddr { 10.0.0.0/24, 192.168.1.5 } tcp flags & (syn | rst) == syn tcp option maxseg size > 1368 tcp option maxseg size set 1368
\t\tip6 daddr { 2001:db8::/64, 2001:db8:1::1 } tcp flags & (syn | rst) == syn tcp option maxseg size > 1348 tcp option maxseg size set 1348
\t\tip daddr { 10.0.0.0/24, 192.168.1.5 } meta mark set meta mark & 0xffffff9f | 0x00000040 accept
\t\tip6 daddr { 2001:db8::/64, 2001:db8:1::1 } meta mark set meta mark & 0xffffff9f | 0x00000040 accept
\t}
}
";
        assert_eq!(script, want);
    }

    #[test]
    fn family_without_prefixes_gets_no_rules() {
        let script = render_ruleset(&routed(&["10.0.0.0/24"], &[]), 1280).unwrap();
        assert!(!script.contains("ip6 daddr"));
        assert!(script.contains("maxseg size set 1228"));

        let empty = render_ruleset(&RoutedSet::default(), 1420).unwrap();
        assert!(!empty.contains("daddr"));
        assert!(!empty.contains("maxseg"));
        // The WireGuard and loopback accepts stay.
        assert_eq!(empty.matches("== 0x00000020 accept").count(), 2);
        assert!(empty.contains("oifname \"lo\" accept"));
    }

    #[test]
    fn mark_rewrite_forces_the_mark_bits_for_every_input() {
        // Simulate the kernel op the rendered expression compiles to: (m & 0xffffff9f) | 0x40.
        let and = !FWMARK_MASK;
        assert!(set_mark_expr().contains(&format!("& {and:#010x} | {FORCE_FWMARK:#010x}")));
        for m in [
            0u32,
            0x20,
            0x40,
            0x60,
            0xffff_ffff,
            0x1234_5620,
            0x4000,
            0xf00,
        ] {
            let out = (m & and) | FORCE_FWMARK;
            assert_eq!(out & FWMARK_MASK, FORCE_FWMARK, "{m:#x}");
            assert_eq!(out & !FWMARK_MASK, m & !FWMARK_MASK, "{m:#x}");
            // nft's listing form is the same function.
            assert_eq!(out, (m & 0xffff_ffdf) | 0x40, "{m:#x}");
        }
    }

    #[test]
    fn mss_values() {
        assert_eq!((mss_clamp_v4(1420), mss_clamp_v6(1420)), (1368, 1348));
        assert_eq!(
            render_ruleset(&RoutedSet::default(), 1279),
            Err(NftError::MtuOutOfRange { mtu: 1279 })
        );
        assert!(render_ruleset(&RoutedSet::default(), 65536).is_err());
        let msg = NftError::MtuOutOfRange { mtu: 9 }.to_string();
        assert!(msg.contains("between 1280 and 65535"), "{msg}");
    }

    #[test]
    fn teardown_script() {
        assert_eq!(
            render_teardown(),
            "add table inet kubespan\ndelete table inet kubespan\n"
        );
    }

    /// Feeds the scripts to the real `nft` inside a throwaway network namespace: syntax check
    /// (`nft -c`), apply twice (table absent, then present), list, tear down.
    #[test]
    fn real_nft_accepts_the_script() {
        let Some(env) = nft_env::NftEnv::new() else {
            return;
        };
        let full = render_ruleset(
            &routed(
                &[
                    "10.0.0.0/24",
                    "10.0.1.0/31",
                    "10.0.1.2/32",
                    "192.168.1.5/32",
                ],
                &["2001:db8::/64", "2001:db8:1::1/128"],
            ),
            1420,
        )
        .unwrap();
        let empty = render_ruleset(&RoutedSet::default(), 1420).unwrap();
        let v4_only = render_ruleset(&routed(&["0.0.0.0/0"], &[]), 1420).unwrap();

        for script in [&full, &empty, &v4_only] {
            env.nft_script(&["-c"], script);
        }
        env.nft_script(&[], &full);
        env.nft_script(&[], &full);
        let listing = env.nft(&["list", "table", "inet", "kubespan"]);
        // nft's own rendering of our mark rewrite: the same function (see set_mark_expr).
        assert!(
            listing.contains("meta mark set meta mark & 0xffffffdf | 0x00000040 accept"),
            "{listing}"
        );
        assert!(
            listing.contains("tcp option maxseg size set 1368"),
            "{listing}"
        );
        assert!(
            listing.contains("tcp option maxseg size set 1348"),
            "{listing}"
        );
        assert!(listing.contains("type route hook output"), "{listing}");

        env.nft_script(&[], &empty);
        assert!(
            !env.nft(&["list", "table", "inet", "kubespan"])
                .contains("daddr")
        );

        env.nft_script(&[], &render_teardown());
        assert!(!env.nft(&["list", "tables"]).contains("kubespan"));
        // Teardown of an absent table succeeds too.
        env.nft_script(&[], &render_teardown());
    }

    /// Root-only test plumbing: a network namespace that is always deleted again.
    mod nft_env {
        use std::io::Write as _;
        use std::process::Command;
        use std::sync::atomic::{AtomicUsize, Ordering};

        static NEXT: AtomicUsize = AtomicUsize::new(0);

        pub struct NftEnv {
            netns: String,
            nft: &'static str,
        }

        fn is_root() -> bool {
            std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2))
                    == Some("0")
            })
        }

        fn works(program: &str, args: &[&str]) -> bool {
            Command::new(program)
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        }

        impl NftEnv {
            /// `None` (with the reason printed) when the test cannot run here.
            pub fn new() -> Option<Self> {
                if !is_root() {
                    eprintln!("skipping real nft check: needs root (network namespaces)");
                    return None;
                }
                let Some(nft) = ["nft", "/usr/sbin/nft", "/sbin/nft"]
                    .into_iter()
                    .find(|p| works(p, &["--version"]))
                else {
                    eprintln!("skipping real nft check: nft not found (apt-get install nftables)");
                    return None;
                };
                let netns = format!(
                    "ks-nft-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                );
                if !works("ip", &["netns", "add", &netns]) {
                    eprintln!("skipping real nft check: `ip netns add {netns}` failed");
                    return None;
                }
                Some(Self { netns, nft })
            }

            fn run(&self, args: &[&str], stdin: Option<&str>) -> String {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.netns, self.nft])
                    .args(args);
                let output = match stdin {
                    None => cmd.output(),
                    Some(input) => {
                        let mut file = tempfile::NamedTempFile::new().expect("temp file");
                        file.write_all(input.as_bytes()).expect("write script");
                        let path = file.path().to_string_lossy().into_owned();
                        cmd.args(["-f", &path]).output()
                    }
                }
                .expect("run nft");
                assert!(
                    output.status.success(),
                    "nft {args:?} failed: {}\n--- script ---\n{}",
                    String::from_utf8_lossy(&output.stderr),
                    stdin.unwrap_or("")
                );
                String::from_utf8_lossy(&output.stdout).into_owned()
            }

            pub fn nft(&self, args: &[&str]) -> String {
                self.run(args, None)
            }

            pub fn nft_script(&self, flags: &[&str], script: &str) {
                self.run(flags, Some(script));
            }
        }

        impl Drop for NftEnv {
            fn drop(&mut self) {
                let deleted = Command::new("ip")
                    .args(["netns", "del", &self.netns])
                    .status()
                    .is_ok_and(|s| s.success());
                if !deleted {
                    eprintln!("warning: could not delete network namespace {}", self.netns);
                }
            }
        }
    }
}
