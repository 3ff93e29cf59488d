//! Linux data-plane adapters: the WireGuard device, the KubeSpan address, routing
//! table 180 and its fwmark rules, our nftables table, and `rp_filter`.
//!
//! Each adapter sits behind a small trait ([`WireGuardBackend`], [`RoutingBackend`],
//! [`FirewallBackend`], [`SysctlBackend`]) so the daemon's reconcile loop can run
//! against fakes; [`DataPlane`] composes them into the two calls the daemon makes:
//! [`DataPlane::apply`] and [`DataPlane::teardown`]. Everything is idempotent:
//! applying the same desired state twice changes nothing the second time.

pub mod key;
pub mod netlink;
pub mod nftables;
pub mod routing;
pub mod sysctl;
pub mod wireguard;

use std::net::Ipv6Addr;
use std::sync::{Mutex, PoisonError};

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
/// The marks are KubeSpan policy; the data plane only programs them.
pub use crate::kubespan::{FORCE_FWMARK, FWMARK_MASK, WIREGUARD_FWMARK};

pub const DEFAULT_LINK_NAME: &str = "kubespan";
pub const DEFAULT_MTU: u32 = 1420;
pub const LISTEN_PORT: u16 = 51820;
pub const ROUTING_TABLE: u32 = 180;
pub const RULE_PRIORITY: u32 = 32500;
/// Metric of the table-180 default routes.
pub const ROUTE_METRIC: u32 = 1;
pub const PERSISTENT_KEEPALIVE_SECS: u16 = 25;
pub const NFT_FAMILY: &str = "inet";
pub const NFT_TABLE: &str = "kubespan";

/// Everything the data plane converges to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredDataPlane {
    /// Link MTU, and route MTU in table 180.
    pub mtu: u32,
    pub device: DeviceConfig,
    /// This node's KubeSpan ULA (assigned as /64).
    pub address: Ipv6Addr,
    /// A complete, self-replacing `nft -f` script for our table.
    pub nftables: String,
}

/// What one `apply` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPlaneReport {
    pub link: LinkState,
    pub wireguard: ApplySummary,
    pub routing: RoutingSummary,
    /// `None` when it could not be set or read (see `warnings`).
    pub rp_filter: Option<RpFilter>,
    /// `None` when it could not be read (see `warnings`).
    pub forwarding: Option<Forwarding>,
    /// Problems that did not stop the apply, already logged.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    WireGuard(#[from] WireGuardError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Firewall(#[from] NftError),
    #[error("teardown left things behind: {}", .0.join("; "))]
    Teardown(Vec<String>),
}

/// The adapters, composed.
#[derive(Debug)]
pub struct DataPlane<W, R, F, S> {
    wireguard: W,
    routing: R,
    firewall: F,
    sysctl: S,
    /// The address we last assigned, so teardown removes exactly it.
    address: Mutex<Option<Ipv6Addr>>,
    /// Warnings of the last apply, so a standing problem is logged once.
    warned: Mutex<Vec<String>>,
}

/// The production composition.
pub type SystemDataPlane = DataPlane<AnyBackend, NetlinkRouting, Nft, ProcSysctl>;

impl SystemDataPlane {
    /// Real adapters for `link_name`, in the calling thread's network namespace.
    /// Needs a tokio runtime (for the netlink socket's driver).
    pub fn system(choice: BackendChoice, link_name: &str) -> std::io::Result<Self> {
        let nl = Netlink::connect()?;
        Ok(DataPlane::new(
            AnyBackend::new(choice, link_name, nl.clone()),
            NetlinkRouting::new(nl),
            Nft::default(),
            ProcSysctl::default(),
        ))
    }
}

impl<W, R, F, S> DataPlane<W, R, F, S>
where
    W: WireGuardBackend,
    R: RoutingBackend,
    F: FirewallBackend,
    S: SysctlBackend,
{
    pub fn new(wireguard: W, routing: R, firewall: F, sysctl: S) -> Self {
        Self {
            wireguard,
            routing,
            firewall,
            sysctl,
            address: Mutex::new(None),
            warned: Mutex::new(Vec::new()),
        }
    }

    pub fn wireguard(&self) -> &W {
        &self.wireguard
    }

    /// Converges everything to `desired`.
    ///
    /// Order: link (it must exist for the rest), rp_filter off on it (before the
    /// first decrypted packet), WireGuard keys and peers, address/routes/rules, and the
    /// nftables marking last, so traffic is steered into the tunnel only once the
    /// tunnel can carry it.
    pub async fn apply(
        &self,
        desired: &DesiredDataPlane,
    ) -> Result<DataPlaneReport, DataPlaneError> {
        let link_name = self.wireguard.link_name().to_owned();
        let mut warnings = Vec::new();

        let link = self.wireguard.ensure_link(desired.mtu).await?;

        let rp_filter = match self.sysctl.disable_rp_filter(&link_name) {
            Ok(rp) => {
                if let Some(problem) = rp.problem(&link_name) {
                    warnings.push(problem);
                }
                Some(rp)
            }
            Err(e) => {
                warnings.push(format!(
                    "{e}; reverse-path filtering on {link_name} would drop IPv4 traffic from peers"
                ));
                None
            }
        };
        let forwarding = match self.sysctl.forwarding() {
            Ok(f) => {
                if !f.ipv4 || !f.ipv6 {
                    warnings.push(format!(
                        "packet forwarding is off (ipv4: {}, ipv6: {}); pod traffic over KubeSpan needs net.ipv4.ip_forward=1 and net.ipv6.conf.all.forwarding=1",
                        f.ipv4, f.ipv6
                    ));
                }
                Some(f)
            }
            Err(e) => {
                warnings.push(format!("cannot read forwarding sysctls: {e}"));
                None
            }
        };

        let wireguard = self.wireguard.apply(&desired.device).await?;

        let spec = RoutingSpec {
            link_name: link_name.clone(),
            address: desired.address,
            mtu: desired.mtu,
        };
        let previous = *self.address.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = previous.filter(|old| *old != desired.address) {
            // The ULA changed (new MAC or cluster ID): the old one must not linger.
            self.routing.remove_address(&link_name, old).await?;
        }
        // Recorded before `ensure`, so a teardown after a half-done ensure removes it.
        *self.address.lock().unwrap_or_else(PoisonError::into_inner) = Some(desired.address);
        let routing = self.routing.ensure(&spec).await?;

        self.firewall.apply(&desired.nftables).await?;

        // Every apply re-checks, but a standing problem is logged once.
        {
            let mut last = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
            for w in warnings.iter().filter(|w| !last.contains(w)) {
                tracing::warn!("{w}");
            }
            last.clone_from(&warnings);
        }

        Ok(DataPlaneReport {
            link,
            wireguard,
            routing,
            rp_filter,
            forwarding,
            warnings,
        })
    }

    /// Reads the WireGuard device (peer endpoints, handshakes, counters).
    pub async fn read_device(&self) -> Result<DeviceState, WireGuardError> {
        self.wireguard.read().await
    }

    /// Removes everything `apply` created. Every step runs even when an earlier one
    /// fails; the error lists all failures.
    pub async fn teardown(&self) -> Result<(), DataPlaneError> {
        let link_name = self.wireguard.link_name().to_owned();
        let address = *self.address.lock().unwrap_or_else(PoisonError::into_inner);
        let mut failures = Vec::new();
        if let Err(e) = self.firewall.remove_table(NFT_FAMILY, NFT_TABLE).await {
            failures.push(e.to_string());
        }
        if let Err(e) = self.routing.remove(&link_name, address).await {
            failures.push(e.to_string());
        }
        if let Err(e) = self.wireguard.remove_link().await {
            failures.push(e.to_string());
        }
        if failures.is_empty() {
            *self.address.lock().unwrap_or_else(PoisonError::into_inner) = None;
            tracing::info!(link = %link_name, "data plane torn down");
            Ok(())
        } else {
            Err(DataPlaneError::Teardown(failures))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Every adapter call, in order.
    type Log = Arc<Mutex<Vec<String>>>;

    fn record(log: &Log, entry: impl Into<String>) {
        log.lock().unwrap().push(entry.into());
    }

    struct FakeWg {
        log: Log,
        fail_remove: bool,
    }

    impl WireGuardBackend for FakeWg {
        fn kind(&self) -> BackendKind {
            BackendKind::Userspace
        }

        fn link_name(&self) -> &str {
            "kubespan"
        }

        async fn ensure_link(&self, mtu: u32) -> Result<LinkState, WireGuardError> {
            record(&self.log, format!("wg.ensure_link {mtu}"));
            Ok(LinkState {
                index: 7,
                name: "kubespan".into(),
                kind: Some("tun".into()),
                mtu,
                up: true,
            })
        }

        async fn apply(&self, config: &DeviceConfig) -> Result<ApplySummary, WireGuardError> {
            record(&self.log, format!("wg.apply {} peers", config.peers.len()));
            Ok(ApplySummary::default())
        }

        async fn read(&self) -> Result<DeviceState, WireGuardError> {
            record(&self.log, "wg.read");
            Ok(DeviceState::default())
        }

        async fn remove_link(&self) -> Result<(), WireGuardError> {
            record(&self.log, "wg.remove_link");
            if self.fail_remove {
                return Err(WireGuardError::Remove {
                    name: "kubespan".into(),
                    reason: "stuck".into(),
                });
            }
            Ok(())
        }
    }

    struct FakeRouting(Log);

    impl RoutingBackend for FakeRouting {
        async fn ensure(&self, spec: &RoutingSpec) -> Result<RoutingSummary, RoutingError> {
            record(
                &self.0,
                format!("routing.ensure {} mtu {}", spec.address, spec.mtu),
            );
            Ok(RoutingSummary::default())
        }

        async fn remove_address(
            &self,
            _link: &str,
            address: Ipv6Addr,
        ) -> Result<RoutingSummary, RoutingError> {
            record(&self.0, format!("routing.remove_address {address}"));
            Ok(RoutingSummary::default())
        }

        async fn remove(
            &self,
            _link: &str,
            address: Option<Ipv6Addr>,
        ) -> Result<RoutingSummary, RoutingError> {
            record(&self.0, format!("routing.remove {address:?}"));
            Ok(RoutingSummary::default())
        }
    }

    struct FakeNft {
        log: Log,
        fail: bool,
    }

    impl FirewallBackend for FakeNft {
        async fn apply(&self, script: &str) -> Result<(), NftError> {
            record(&self.log, format!("nft.apply {} bytes", script.len()));
            Ok(())
        }

        async fn remove_table(&self, family: &str, name: &str) -> Result<(), NftError> {
            record(&self.log, format!("nft.remove_table {family} {name}"));
            if self.fail {
                return Err(NftError::Rejected {
                    status: "exit status: 1".into(),
                    stderr: "Error: Could not process rule".into(),
                });
            }
            Ok(())
        }
    }

    struct FakeSysctl {
        log: Log,
        all: i64,
    }

    impl SysctlBackend for FakeSysctl {
        fn disable_rp_filter(&self, link: &str) -> Result<RpFilter, SysctlError> {
            record(&self.log, format!("sysctl.rp_filter {link}"));
            Ok(RpFilter {
                all: self.all,
                link: 0,
                changed: false,
            })
        }

        fn forwarding(&self) -> Result<Forwarding, SysctlError> {
            Ok(Forwarding {
                ipv4: true,
                ipv6: false,
            })
        }
    }

    fn plane(
        log: &Log,
        all: i64,
        fail_teardown: bool,
    ) -> DataPlane<FakeWg, FakeRouting, FakeNft, FakeSysctl> {
        DataPlane::new(
            FakeWg {
                log: log.clone(),
                fail_remove: fail_teardown,
            },
            FakeRouting(log.clone()),
            FakeNft {
                log: log.clone(),
                fail: fail_teardown,
            },
            FakeSysctl {
                log: log.clone(),
                all,
            },
        )
    }

    fn desired(address: &str) -> DesiredDataPlane {
        DesiredDataPlane {
            mtu: DEFAULT_MTU,
            device: DeviceConfig {
                private_key: PrivateKey::from_bytes([1; 32]),
                listen_port: LISTEN_PORT,
                fwmark: WIREGUARD_FWMARK,
                peers: vec![],
            },
            address: address.parse().unwrap(),
            nftables: "table inet kubespan {}\n".into(),
        }
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    #[tokio::test]
    async fn apply_order_is_link_sysctl_wireguard_routing_firewall() {
        let log = Log::default();
        let p = plane(&log, 0, false);
        let report = p.apply(&desired("fd00::1")).await.unwrap();
        assert_eq!(
            take(&log),
            [
                "wg.ensure_link 1420",
                "sysctl.rp_filter kubespan",
                "wg.apply 0 peers",
                "routing.ensure fd00::1 mtu 1420",
                "nft.apply 23 bytes",
            ]
        );
        assert_eq!(report.link.index, 7);
        // Forwarding off for IPv6 is reported; a clean rp_filter is not.
        assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
        assert!(report.warnings[0].contains("forwarding is off"));
    }

    #[tokio::test]
    async fn a_changed_address_removes_the_old_one_first() {
        let log = Log::default();
        let p = plane(&log, 0, false);
        p.apply(&desired("fd00::1")).await.unwrap();
        take(&log);
        p.apply(&desired("fd00::2")).await.unwrap();
        let calls = take(&log);
        let removed = calls
            .iter()
            .position(|c| c == "routing.remove_address fd00::1");
        let ensured = calls
            .iter()
            .position(|c| c == "routing.ensure fd00::2 mtu 1420");
        assert!(removed.unwrap() < ensured.unwrap(), "{calls:?}");
        p.apply(&desired("fd00::2")).await.unwrap();
        assert!(!take(&log).iter().any(|c| c.starts_with("routing.remove")));
    }

    #[tokio::test]
    async fn a_filtering_all_is_a_warning_not_an_error() {
        let log = Log::default();
        let report = plane(&log, 2, false)
            .apply(&desired("fd00::1"))
            .await
            .unwrap();
        assert!(
            report
                .warnings
                .iter()
                .any(|w| w.contains("net.ipv4.conf.all.rp_filter=0")),
            "{:?}",
            report.warnings
        );
    }

    #[tokio::test]
    async fn teardown_runs_every_step_and_reports_every_failure() {
        let log = Log::default();
        let p = plane(&log, 0, true);
        p.apply(&desired("fd00::1")).await.unwrap();
        take(&log);
        let err = p.teardown().await.unwrap_err();
        assert_eq!(
            take(&log),
            [
                "nft.remove_table inet kubespan",
                "routing.remove Some(fd00::1)",
                "wg.remove_link",
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains("Could not process rule") && text.contains("stuck"),
            "{text}"
        );
    }
}
