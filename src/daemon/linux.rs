//! The daemon's [`DataPlane`] port over the real Linux data plane
//! (`crate::dataplane`): keeps the last desired peers and ruleset and converges
//! the whole data plane when either changes (the facade's `apply` is an
//! idempotent diff, so unchanged parts cost a read, not a write).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;

use super::plan::DesiredPeer;
use super::run::{DataPlane, LinkPlan};
use crate::core::ula::{UlaPurpose, is_ula};
use crate::dataplane::wireguard::{
    BackendChoice, BackendKind, DeviceConfig, PeerConfig, WireGuardBackend,
};
use crate::dataplane::{
    DesiredDataPlane, PERSISTENT_KEEPALIVE_SECS, PresharedKey, PrivateKey, PublicKey,
    SystemDataPlane,
};
use crate::kubespan::nft::render_ruleset;
use crate::kubespan::peerstate::WgObservation;
use crate::kubespan::routed::RoutedSet;

pub struct LinuxDataPlane {
    dp: SystemDataPlane,
    link: Option<LinkPlan>,
    peers: Vec<DesiredPeer>,
    ruleset: Option<String>,
    warnings: Vec<String>,
}

impl LinuxDataPlane {
    /// Needs a tokio runtime. `Auto` probes kernel WireGuard support.
    pub fn new(choice: BackendChoice, ifname: &str) -> anyhow::Result<Self> {
        let dp = SystemDataPlane::system(choice, ifname)
            .context("cannot open a netlink socket for the data plane")?;
        Ok(LinuxDataPlane {
            dp,
            link: None,
            peers: Vec::new(),
            ruleset: None,
            warnings: Vec::new(),
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.dp.wireguard().kind()
    }

    fn desired(&self, link: &LinkPlan) -> anyhow::Result<DesiredDataPlane> {
        let psk = PresharedKey::from_base64(&link.preshared_key)
            .context("cluster.secret is not a WireGuard key (32 bytes, base64)")?;
        let peers = self
            .peers
            .iter()
            .map(|p| {
                Ok(PeerConfig {
                    public_key: PublicKey::from_base64(&p.public_key)
                        .with_context(|| format!("peer public key {:?}", p.public_key))?,
                    preshared_key: Some(psk.clone()),
                    persistent_keepalive_secs: PERSISTENT_KEEPALIVE_SECS,
                    allowed_ips: p.allowed_ips.clone(),
                    endpoint: p.endpoint,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let nftables = match &self.ruleset {
            Some(s) => s.clone(),
            // Until the first reconcile: our table with an empty routed set.
            None => render_ruleset(&RoutedSet::default(), link.mtu)?,
        };
        Ok(DesiredDataPlane {
            mtu: link.mtu,
            device: DeviceConfig {
                private_key: PrivateKey::from_base64(&link.private_key)
                    .context("the KubeSpan private key is not a WireGuard key")?,
                listen_port: link.listen_port,
                fwmark: link.fwmark,
                peers,
            },
            address: link.address.addr(),
            nftables,
        })
    }

    async fn converge(&mut self) -> anyhow::Result<Vec<PublicKey>> {
        let link = self.link.clone().context("the data plane is not set up")?;
        let desired = self.desired(&link)?;
        let report = self.dp.apply(&desired).await?;
        // The facade logs its warnings; keep them so a caller can show them.
        self.warnings = report.warnings;
        let mut changed = report.wireguard.added;
        changed.extend(report.wireguard.updated);
        Ok(changed)
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Makes WireGuard start a handshake with a peer now: kernel WireGuard sends
/// one when persistent keepalive is configured, boringtun only on traffic or at
/// the first keepalive (25 s later). One empty datagram to the peer's KubeSpan
/// address (discard port) goes through the tunnel and triggers it, for either.
fn poke(peer: &DesiredPeer) {
    let Some(target) = peer.allowed_ips.iter().find_map(|n| match n {
        ipnet::IpNet::V6(v6)
            if v6.prefix_len() == 128 && is_ula(v6.addr().into(), UlaPurpose::KubeSpan) =>
        {
            Some(SocketAddr::new(v6.addr().into(), 9))
        }
        _ => None,
    }) else {
        return;
    };
    match std::net::UdpSocket::bind("[::]:0").and_then(|s| s.send_to(&[], target)) {
        Ok(_) => tracing::debug!(peer = %peer.public_key, %target, "handshake poke"),
        Err(e) => tracing::debug!(peer = %peer.public_key, %target, "handshake poke failed: {e}"),
    }
}

impl DataPlane for LinuxDataPlane {
    async fn setup(&mut self, link: &LinkPlan) -> anyhow::Result<()> {
        self.link = Some(link.clone());
        self.converge().await?;
        tracing::info!(
            interface = %link.interface,
            backend = ?self.backend(),
            address = %link.address,
            port = link.listen_port,
            "WireGuard link up"
        );
        Ok(())
    }

    async fn observe(&mut self) -> anyhow::Result<BTreeMap<String, WgObservation>> {
        let state = self.dp.read_device().await?;
        Ok(state
            .peers
            .into_iter()
            .map(|p| {
                (
                    p.public_key.to_base64(),
                    WgObservation {
                        endpoint: p.endpoint,
                        last_handshake: p.last_handshake,
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    },
                )
            })
            .collect())
    }

    async fn apply_peers(&mut self, link: &LinkPlan, peers: &[DesiredPeer]) -> anyhow::Result<()> {
        self.link = Some(link.clone());
        let before: BTreeMap<&str, Option<SocketAddr>> = self
            .peers
            .iter()
            .map(|p| (p.public_key.as_str(), p.endpoint))
            .collect();
        let new_endpoint: Vec<DesiredPeer> = peers
            .iter()
            .filter(|p| {
                p.endpoint.is_some() && before.get(p.public_key.as_str()) != Some(&p.endpoint)
            })
            .cloned()
            .collect();
        self.peers = peers.to_vec();
        let written = self.converge().await?;
        for p in new_endpoint {
            if written.iter().any(|k| k.to_base64() == p.public_key) {
                poke(&p);
            }
        }
        Ok(())
    }

    async fn apply_ruleset(&mut self, script: &str) -> anyhow::Result<()> {
        self.ruleset = Some(script.to_owned());
        self.converge().await.map(|_| ())
    }

    async fn repair(&mut self) -> anyhow::Result<()> {
        // `converge` is an idempotent diff, except nftables: our table is
        // replaced in one transaction, which also brings it back after a flush.
        self.converge().await.map(|_| ())
    }

    async fn teardown(&mut self) -> anyhow::Result<()> {
        Ok(self.dp.teardown().await?)
    }
}

/// The config's backend setting in the data plane's terms.
pub fn backend_choice(b: crate::config::Backend) -> BackendChoice {
    match b {
        crate::config::Backend::Auto => BackendChoice::Auto,
        crate::config::Backend::Kernel => BackendChoice::Kernel,
        crate::config::Backend::Userspace => BackendChoice::Userspace,
        crate::config::Backend::External => BackendChoice::External,
    }
}
