//! The Linux data plane: the WireGuard link, its address, table 180, the fwmark
//! rules, our nftables table and rp_filter, applied as idempotent diffs.

pub mod routing;
pub mod wireguard;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;
use rtnetlink::Handle;

use crate::daemon::plan::DesiredPeer;
use crate::daemon::run::{DataPlane, LinkPlan};
use crate::kubespan::peerstate::WgObservation;
use crate::kubespan::{FORCE_FWMARK, FWMARK_MASK};
use routing::RuleSpec;
use wireguard::{BackendKind, WireGuard};

const RULE: RuleSpec = RuleSpec {
    fwmark: FORCE_FWMARK,
    mask: FWMARK_MASK,
};

/// Runs `nft -f -` with `script`; the error carries nft's own message.
pub fn nft_apply(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (install the nftables package)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "nft -f failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes our nftables table; absent is fine.
pub fn nft_remove_table() -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", "kubespan"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run nft (install the nftables package)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("No such file") {
        return Ok(());
    }
    anyhow::bail!("nft delete table inet kubespan failed: {}", err.trim())
}

/// Turns reverse-path filtering off on our link. Decrypted packets arrive with
/// a peer's node IP as source, whose route back is the NIC. Even *loose* mode
/// (2) drops them: the kernel's `fib_validate_source` rejects packets arriving
/// on an interface without an IPv4 address (our link has none, as on Talos) for
/// any non-zero setting. IPv4 uses the larger of `all` and the interface, so a
/// non-zero `all` still breaks the mesh: that is reported, not changed behind
/// the administrator's back.
pub fn disable_rp_filter(ifname: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter");
    std::fs::write(&path, "0").with_context(|| format!("cannot write {path}"))?;
    let all = std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap_or_default();
    if all.trim() != "0" && !all.trim().is_empty() {
        tracing::warn!(
            "net.ipv4.conf.all.rp_filter is {}: IPv4 traffic from peers' node addresses will be \
             dropped on {ifname}; set it to 0 (sysctl -w net.ipv4.conf.all.rp_filter=0) and use \
             per-interface settings instead",
            all.trim()
        );
    }
    Ok(())
}

/// Warns when forwarding is off (pod traffic through the mesh needs it).
pub fn check_forwarding() {
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "0") {
            tracing::info!(
                "{what} is 0: this host does not forward traffic for pods or other hosts through the mesh"
            );
        }
    }
}

/// Makes WireGuard start a handshake with a peer now: kernel WireGuard sends
/// one when persistent keepalive is configured, boringtun only on traffic or at
/// the first keepalive (25 s later). One empty datagram to the peer's KubeSpan
/// address (discard port) goes through the tunnel and triggers it, for either.
fn poke(peer: &DesiredPeer) {
    let Some(target) = peer.allowed_ips.iter().find_map(|n| match n {
        ipnet::IpNet::V6(v6)
            if v6.prefix_len() == 128
                && crate::core::ula::is_ula(
                    v6.addr().into(),
                    crate::core::ula::UlaPurpose::KubeSpan,
                ) =>
        {
            Some(std::net::SocketAddr::new(v6.addr().into(), 9))
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

pub struct LinuxDataPlane {
    handle: Handle,
    kind: BackendKind,
    wg: Option<WireGuard>,
    ifname: String,
}

impl LinuxDataPlane {
    pub fn new(handle: Handle, kind: BackendKind, ifname: &str) -> Self {
        LinuxDataPlane {
            handle,
            kind,
            wg: None,
            ifname: ifname.to_owned(),
        }
    }

    fn wg(&self) -> anyhow::Result<&WireGuard> {
        self.wg
            .as_ref()
            .context("the WireGuard interface is not set up")
    }

    /// Removes what a previous run (crashed, or killed) may have left, so a
    /// restart converges to exactly one copy of everything.
    pub async fn clean_leftovers(handle: &Handle, ifname: &str) -> anyhow::Result<()> {
        routing::remove_rules(handle, RULE).await?;
        routing::remove_routes(handle).await?;
        nft_remove_table()?;
        let sock = wireguard::uapi_socket(ifname);
        if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
            let _ = std::fs::remove_file(&sock);
        }
        Ok(())
    }
}

impl DataPlane for LinuxDataPlane {
    async fn setup(&mut self, link: &LinkPlan) -> anyhow::Result<()> {
        let wg = WireGuard::create(self.kind, &link.interface)?;
        wg.configure(&link.private_key, link.listen_port, link.fwmark, link.mtu)?;
        self.wg = Some(wg);
        let index = routing::link_index(&self.handle, &link.interface)
            .await?
            .ok_or_else(|| routing::RoutingError::NoLink(link.interface.clone()))?;
        routing::ensure_address(&self.handle, index, link.address).await?;
        routing::ensure_routes(&self.handle, index, link.mtu).await?;
        routing::ensure_rules(&self.handle, RULE).await?;
        if let Err(e) = disable_rp_filter(&link.interface) {
            tracing::warn!(
                "{}; decrypted IPv4 traffic may be dropped by reverse-path filtering",
                crate::util::error_chain(&e)
            );
        }
        check_forwarding();
        tracing::info!(
            interface = %link.interface,
            backend = self.kind.as_str(),
            address = %link.address,
            port = link.listen_port,
            "WireGuard link up"
        );
        Ok(())
    }

    async fn observe(&mut self) -> anyhow::Result<BTreeMap<String, WgObservation>> {
        Ok(self.wg()?.observe()?)
    }

    async fn apply_peers(&mut self, link: &LinkPlan, peers: &[DesiredPeer]) -> anyhow::Result<()> {
        let (n, new_endpoints) = self.wg()?.apply_peers(&link.preshared_key, peers)?;
        if n > 0 {
            tracing::debug!(changed = n, total = peers.len(), "WireGuard peers applied");
        }
        for p in &new_endpoints {
            poke(p);
        }
        Ok(())
    }

    async fn apply_ruleset(&mut self, script: &str) -> anyhow::Result<()> {
        nft_apply(script)
    }

    async fn teardown(&mut self) -> anyhow::Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: anyhow::Result<()>| {
            if let Err(e) = r {
                tracing::warn!("teardown: {}", crate::util::error_chain(&e));
                first.get_or_insert(e);
            }
        };
        note(nft_remove_table());
        note(
            routing::remove_rules(&self.handle, RULE)
                .await
                .map_err(Into::into),
        );
        note(
            routing::remove_routes(&self.handle)
                .await
                .map_err(Into::into),
        );
        if let Some(mut wg) = self.wg.take() {
            note(wg.remove().map_err(Into::into));
        }
        // The kernel link outlives its API handle; a userspace TUN goes with
        // its device, but delete it if it is still there.
        note(
            routing::delete_link(&self.handle, &self.ifname)
                .await
                .map_err(Into::into),
        );
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}
