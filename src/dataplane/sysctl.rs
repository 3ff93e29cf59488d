//! The two kernel settings KubeSpan on a non-Talos host cares about (spec §4.7).
//!
//! # Reverse-path filtering: off on the link, and why not loose
//!
//! Decrypted packets arrive on the WireGuard link with a peer's node or pod
//! address as source. The kernel filters with `max(all, <link>)` of
//! `net.ipv4.conf.*.rp_filter`. The obvious fix, loose mode (2) on the link, does
//! not work for KubeSpan: the link carries no IPv4 address (only the IPv6 ULA), and
//! for such an interface `__fib_validate_source` (net/ipv4/fib_frontend.c) rejects
//! every source whose route back is not the link itself, in loose mode as in strict
//! (`no_addr` -> `last_resort` -> `e_rpf`). Table 180 is only reached through the
//! fwmark, so no peer source routes back through the link, and every IPv4 packet
//! from a peer is dropped. `tests/dataplane_netns.rs` shows it with a real tunnel:
//! link at 2 -> no IPv4 ping; link at 0 -> pings pass.
//!
//! So the link gets 0, which is also what Talos runs with (it never touches
//! rp_filter; the kernel default is 0). That matters on distributions whose
//! `net.ipv4.conf.default.rp_filter` is 2 (systemd's `50-default.conf`, Ubuntu):
//! new links, ours included, start at 2. When `all` itself is non-zero, the link
//! value cannot win; we report it instead of loosening every interface on the host.
//!
//! IPv6 has no rp_filter sysctl.
//!
//! # Forwarding
//!
//! Reported, never changed: turning a host into a router is the operator's call,
//! but pod traffic over KubeSpan needs it.
//!
//! Synchronous on purpose: these are single small reads and writes on procfs.

use std::path::{Path, PathBuf};

/// What the link must have: no reverse-path filtering.
pub const RP_FILTER_OFF: i64 = 0;

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value} to {path}: {source} (are we root, and is /proc/sys writable?)")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("{path} holds {value:?}, not a number")]
    Parse { path: PathBuf, value: String },
    #[error("invalid interface name {0:?}")]
    InvalidLink(String),
}

/// Reverse-path filtering for the link, after we set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RpFilter {
    /// `net.ipv4.conf.all.rp_filter`
    pub all: i64,
    /// `net.ipv4.conf.<link>.rp_filter`
    pub link: i64,
    /// Whether we had to change the link's value.
    pub changed: bool,
}

impl RpFilter {
    /// What the kernel applies to packets arriving on the link.
    pub fn effective(&self) -> i64 {
        self.all.max(self.link)
    }

    /// `None` when IPv4 over the link works; otherwise what the operator must do.
    pub fn problem(&self, link: &str) -> Option<String> {
        (self.effective() != RP_FILTER_OFF).then(|| {
            format!(
                "reverse-path filtering is on for {link} (net.ipv4.conf.all.rp_filter={}, \
                 net.ipv4.conf.{link}.rp_filter={}; the kernel applies the larger): it drops \
                 every IPv4 packet from KubeSpan peers, because {link} has no IPv4 address. \
                 Set net.ipv4.conf.all.rp_filter=0 (interfaces that need filtering can keep \
                 their own value)",
                self.all, self.link
            )
        })
    }
}

/// Whether the host forwards packets, per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forwarding {
    /// `net.ipv4.ip_forward`
    pub ipv4: bool,
    /// `net.ipv6.conf.all.forwarding`
    pub ipv6: bool,
}

/// The sysctl adapter the data plane talks to.
pub trait SysctlBackend: Send + Sync {
    /// Sets `net.ipv4.conf.<link>.rp_filter` to 0 if it is not, and reports the
    /// values the kernel will combine.
    fn disable_rp_filter(&self, link: &str) -> Result<RpFilter, SysctlError>;

    fn forwarding(&self) -> Result<Forwarding, SysctlError>;
}

/// sysctls through `/proc/sys` (or another root, for tests).
#[derive(Clone, Debug)]
pub struct ProcSysctl {
    root: PathBuf,
}

impl Default for ProcSysctl {
    fn default() -> Self {
        Self::with_root("/proc/sys")
    }
}

impl ProcSysctl {
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn read_number(&self, path: &Path) -> Result<i64, SysctlError> {
        let text = std::fs::read_to_string(path).map_err(|source| SysctlError::Read {
            path: path.to_owned(),
            source,
        })?;
        text.trim().parse().map_err(|_| SysctlError::Parse {
            path: path.to_owned(),
            value: text.trim().to_owned(),
        })
    }

    fn rp_filter_path(&self, link: &str) -> Result<PathBuf, SysctlError> {
        // Interface names cannot contain '/', and "." / ".." would escape the directory.
        if link.is_empty() || link.contains('/') || link == "." || link == ".." {
            return Err(SysctlError::InvalidLink(link.to_owned()));
        }
        Ok(self.root.join("net/ipv4/conf").join(link).join("rp_filter"))
    }
}

impl SysctlBackend for ProcSysctl {
    fn disable_rp_filter(&self, link: &str) -> Result<RpFilter, SysctlError> {
        let path = self.rp_filter_path(link)?;
        let before = self.read_number(&path)?;
        let changed = before != RP_FILTER_OFF;
        if changed {
            let value = RP_FILTER_OFF.to_string();
            std::fs::write(&path, format!("{value}\n")).map_err(|source| SysctlError::Write {
                path: path.clone(),
                value,
                source,
            })?;
            tracing::info!(
                link,
                from = before,
                to = RP_FILTER_OFF,
                "turned rp_filter off on the link"
            );
        }
        Ok(RpFilter {
            all: self.read_number(&self.root.join("net/ipv4/conf/all/rp_filter"))?,
            link: RP_FILTER_OFF,
            changed,
        })
    }

    fn forwarding(&self) -> Result<Forwarding, SysctlError> {
        Ok(Forwarding {
            ipv4: self.read_number(&self.root.join("net/ipv4/ip_forward"))? != 0,
            ipv6: self.read_number(&self.root.join("net/ipv6/conf/all/forwarding"))? != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(all: &str, link: &str, v4: &str, v6: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in [
            "net/ipv4/conf/kubespan",
            "net/ipv4/conf/all",
            "net/ipv6/conf/all",
        ] {
            std::fs::create_dir_all(p.join(d)).unwrap();
        }
        std::fs::write(p.join("net/ipv4/conf/all/rp_filter"), all).unwrap();
        std::fs::write(p.join("net/ipv4/conf/kubespan/rp_filter"), link).unwrap();
        std::fs::write(p.join("net/ipv4/ip_forward"), v4).unwrap();
        std::fs::write(p.join("net/ipv6/conf/all/forwarding"), v6).unwrap();
        dir
    }

    #[test]
    fn turns_the_link_off_once() {
        let dir = fake_root("0\n", "2\n", "0\n", "0\n");
        let sysctl = ProcSysctl::with_root(dir.path());
        let rp = sysctl.disable_rp_filter("kubespan").unwrap();
        assert_eq!(
            rp,
            RpFilter {
                all: 0,
                link: 0,
                changed: true
            }
        );
        assert_eq!(rp.problem("kubespan"), None);
        let written =
            std::fs::read_to_string(dir.path().join("net/ipv4/conf/kubespan/rp_filter")).unwrap();
        assert_eq!(written.trim(), "0");
        assert!(
            !sysctl.disable_rp_filter("kubespan").unwrap().changed,
            "second run changes nothing"
        );
        let all = std::fs::read_to_string(dir.path().join("net/ipv4/conf/all/rp_filter")).unwrap();
        assert_eq!(all.trim(), "0", "`all` is never written");
    }

    #[test]
    fn a_filtering_all_is_reported_with_the_remedy() {
        let dir = fake_root("2\n", "2\n", "1\n", "1\n");
        let rp = ProcSysctl::with_root(dir.path())
            .disable_rp_filter("kubespan")
            .unwrap();
        assert_eq!(rp.effective(), 2);
        let problem = rp.problem("kubespan").unwrap();
        assert!(
            problem.contains("net.ipv4.conf.all.rp_filter=0"),
            "{problem}"
        );
        assert!(problem.contains("no IPv4 address"), "{problem}");
    }

    #[test]
    fn reports_forwarding_per_family() {
        let dir = fake_root("0\n", "0\n", "1\n", "0\n");
        let fwd = ProcSysctl::with_root(dir.path()).forwarding().unwrap();
        assert_eq!(
            fwd,
            Forwarding {
                ipv4: true,
                ipv6: false
            }
        );
    }

    #[test]
    fn missing_link_and_bad_names_are_errors() {
        let dir = fake_root("0\n", "0\n", "0\n", "0\n");
        let sysctl = ProcSysctl::with_root(dir.path());
        let err = sysctl.disable_rp_filter("nosuchlink").unwrap_err();
        assert!(matches!(err, SysctlError::Read { .. }), "{err:?}");
        for bad in ["", "..", "a/b"] {
            assert!(matches!(
                sysctl.disable_rp_filter(bad),
                Err(SysctlError::InvalidLink(_))
            ));
        }
    }
}
