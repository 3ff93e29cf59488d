//! The WireGuard device: kernel WireGuard (netlink) or embedded userspace
//! boringtun, both through `defguard_wireguard_rs`.
//!
//! The signal trap: boringtun's `Device::new` blocks SIGINT and SIGTERM with
//! `sigprocmask` in the calling thread and reads them from a `signalfd` to stop
//! itself; the event-loop threads it spawns inherit that mask. Created from a
//! runtime worker (or the main thread before the runtime starts), that mask
//! would leak into threads that must handle shutdown and the daemon would never
//! see SIGTERM. So the device is created on a short-lived dedicated thread: the
//! mask stays with that thread and boringtun's own threads, and the kernel
//! delivers a process-directed SIGTERM to a thread that does not block it
//! (ours), where tokio's handler runs.
//!
//! That alone is not enough: a signalfd also reports signals pending for the
//! whole process, so boringtun's event loop races our handler to dequeue every
//! SIGTERM and, when it wins, stops the device while the daemon never hears of
//! it. After creating the device we therefore empty the mask of every signalfd
//! in the process (only boringtun creates them; tokio uses a self-pipe): the
//! device then ignores signals and the daemon alone decides when it stops.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use defguard_wireguard_rs::host::Host;
use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use ipnet::IpNet;

use crate::daemon::plan::DesiredPeer;
use crate::kubespan::peerstate::WgObservation;

/// Persistent keepalive for every peer (Talos: 25 s).
pub const KEEPALIVE_SECS: u16 = 25;

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("cannot create WireGuard interface {ifname}: {reason}")]
    Create { ifname: String, reason: String },
    #[error("WireGuard interface {ifname}: {op}: {reason}")]
    Op {
        ifname: String,
        op: &'static str,
        reason: String,
    },
    #[error("invalid WireGuard key for {what}: {reason}")]
    Key { what: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        }
    }
}

enum Api {
    Kernel(WGApi<Kernel>),
    Userspace(WGApi<Userspace>),
}

/// One WireGuard interface we own.
pub struct WireGuard {
    ifname: String,
    api: Option<Api>,
    kind: BackendKind,
}

/// Where a userspace WireGuard device keeps its control socket.
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

fn parse_key(what: &str, b64: &str) -> Result<Key, WgError> {
    Key::try_from(b64.trim()).map_err(|e| WgError::Key {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn mask(net: &IpNet) -> IpAddrMask {
    IpAddrMask::new(net.addr(), net.prefix_len())
}

impl WireGuard {
    /// Creates the interface. A userspace socket left by a crashed daemon is
    /// removed first; a live one means another daemon owns the name.
    pub fn create(kind: BackendKind, ifname: &str) -> Result<WireGuard, WgError> {
        let fail = |reason: String| WgError::Create {
            ifname: ifname.to_owned(),
            reason,
        };
        let api = match kind {
            BackendKind::Userspace => {
                let sock = uapi_socket(ifname);
                if sock.exists() {
                    if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                        return Err(fail(format!(
                            "{} is in use: is another kubespan (or wireguard-go) running for this interface?",
                            sock.display()
                        )));
                    }
                    tracing::info!(socket = %sock.display(), "removing a stale WireGuard socket left by a previous run");
                    let _ = std::fs::remove_file(&sock);
                }
                if let Some(dir) = sock.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
                }
                let name = ifname.to_owned();
                // See the module comment: never create the device on a thread
                // that must see SIGTERM.
                let api = std::thread::Builder::new()
                    .name("wg-create".into())
                    .spawn(move || {
                        let mut api = WGApi::<Userspace>::new(name)?;
                        api.create_interface()?;
                        Ok::<_, defguard_wireguard_rs::error::WireguardInterfaceError>(api)
                    })
                    .map_err(|e| fail(e.to_string()))?
                    .join()
                    .map_err(|_| fail("device creation thread panicked".into()))?
                    .map_err(|e| fail(format!("{e} (is /dev/net/tun available?)")))?;
                disarm_signalfds();
                Api::Userspace(api)
            }
            BackendKind::Kernel => {
                let mut api = WGApi::<Kernel>::new(ifname).map_err(|e| fail(e.to_string()))?;
                if let Err(e) = api.create_interface() {
                    // A link left by a crashed daemon is adopted; anything else fails.
                    if api.read_interface_data().is_err() {
                        return Err(fail(e.to_string()));
                    }
                    tracing::info!(ifname, "adopting an existing kernel WireGuard interface");
                }
                Api::Kernel(api)
            }
        };
        Ok(WireGuard {
            ifname: ifname.to_owned(),
            api: Some(api),
            kind,
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    fn op_err(&self, op: &'static str) -> impl FnOnce(String) -> WgError + '_ {
        move |reason| WgError::Op {
            ifname: self.ifname.clone(),
            op,
            reason,
        }
    }

    fn with_api<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(
            &dyn WireguardInterfaceApi,
        ) -> Result<T, defguard_wireguard_rs::error::WireguardInterfaceError>,
    ) -> Result<T, WgError> {
        let api: &dyn WireguardInterfaceApi = match self.api.as_ref() {
            Some(Api::Kernel(a)) => a,
            Some(Api::Userspace(a)) => a,
            None => return Err(self.op_err(op)("interface already removed".into())),
        };
        f(api).map_err(|e| self.op_err(op)(e.to_string()))
    }

    /// Sets the key, port, fwmark and MTU, and clears all peers (used once at
    /// start: the reconcile adds the peers).
    pub fn configure(
        &self,
        private_key: &str,
        port: u16,
        fwmark: u32,
        mtu: u32,
    ) -> Result<(), WgError> {
        // Validate the key here to give a clear error instead of a UAPI errno.
        parse_key("the interface private key", private_key)?;
        let cfg = InterfaceConfiguration {
            name: self.ifname.clone(),
            prvkey: private_key.trim().to_owned(),
            addresses: Vec::new(),
            port,
            peers: Vec::new(),
            mtu: Some(mtu),
            fwmark: Some(fwmark),
        };
        self.with_api("configure", |a| a.configure_interface(&cfg))
    }

    fn read(&self) -> Result<Host, WgError> {
        self.with_api("read", |a| a.read_interface_data())
    }

    /// Per peer public key (base64): endpoint, last handshake, counters.
    pub fn observe(&self) -> Result<BTreeMap<String, WgObservation>, WgError> {
        let host = self.read()?;
        Ok(host
            .peers
            .values()
            .map(|p| {
                (
                    p.public_key.to_string(),
                    WgObservation {
                        endpoint: p.endpoint,
                        // boringtun reports "never" as the epoch.
                        last_handshake: p.last_handshake.filter(|t| *t > SystemTime::UNIX_EPOCH),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    },
                )
            })
            .collect())
    }

    /// Makes the device's peer set exactly `desired`, touching only peers that
    /// differ (a re-applied peer would keep its session, but needless writes are
    /// noise). An endpoint of `None` leaves WireGuard's endpoint alone.
    /// Returns how many peers were written or removed, and the written peers
    /// that got a new endpoint.
    pub fn apply_peers(
        &self,
        psk: &str,
        desired: &[DesiredPeer],
    ) -> Result<(usize, Vec<DesiredPeer>), WgError> {
        let psk = parse_key("the preshared key (cluster.secret)", psk)?;
        let host = self.read()?;
        let mut changed = 0;
        let mut new_endpoints = Vec::new();
        let mut wanted = BTreeSet::new();
        for d in desired {
            let key = parse_key(&format!("peer {}", d.public_key), &d.public_key)?;
            wanted.insert(key.to_string());
            let current = host.peers.get(&key);
            if current.is_some_and(|c| peer_matches(c, &psk, d)) {
                continue;
            }
            // boringtun cannot modify a peer (a `set` for a known key trips an
            // assert in its worker thread): remove and re-add it, keeping the
            // endpoint WireGuard has when none is wanted, so a roamed endpoint
            // survives. Kernel WireGuard updates peers in place.
            let mut endpoint = d.endpoint;
            if let (Some(c), BackendKind::Userspace) = (current, self.kind) {
                endpoint = endpoint.or(c.endpoint);
                self.with_api("replace peer", |a| a.remove_peer(&key))?;
            }
            let peer = Peer {
                public_key: key,
                preshared_key: Some(psk.clone()),
                protocol_version: None,
                endpoint,
                last_handshake: None,
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive_interval: Some(KEEPALIVE_SECS),
                allowed_ips: d.allowed_ips.iter().map(mask).collect(),
            };
            self.with_api("configure peer", |a| a.configure_peer(&peer))?;
            changed += 1;
            if d.endpoint.is_some() && current.and_then(|c| c.endpoint) != d.endpoint {
                new_endpoints.push(d.clone());
            }
        }
        for key in host.peers.keys() {
            if !wanted.contains(&key.to_string()) {
                self.with_api("remove peer", |a| a.remove_peer(key))?;
                changed += 1;
            }
        }
        Ok((changed, new_endpoints))
    }

    /// Removes the interface. The userspace device stops when its handle is
    /// dropped; its socket is removed too.
    pub fn remove(&mut self) -> Result<(), WgError> {
        match self.api.take() {
            Some(Api::Userspace(api)) => {
                drop(api);
                let sock = uapi_socket(&self.ifname);
                if sock.exists() {
                    let _ = std::fs::remove_file(&sock);
                }
                Ok(())
            }
            Some(Api::Kernel(api)) => {
                // Not `remove_interface`: it also rewrites resolver settings.
                drop(api);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for WireGuard {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// Empties the signal mask of every signalfd in this process (see the module
/// comment). Returns how many it changed.
fn disarm_signalfds() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let mut n = 0;
    for entry in dir.flatten() {
        let is_signalfd = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str() == "anon_inode:[signalfd]");
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_signalfd {
            continue;
        }
        // SAFETY: `fd` is a live signalfd of this process; passing an existing
        // signalfd replaces its mask and creates nothing.
        let ok = unsafe {
            let mut empty: nix::libc::sigset_t = std::mem::zeroed();
            nix::libc::sigemptyset(&mut empty);
            nix::libc::signalfd(fd, &empty, 0) == fd
        };
        if ok {
            n += 1;
        }
    }
    tracing::debug!(signalfds = n, "boringtun signal handlers disarmed");
    n
}

fn peer_matches(current: &Peer, psk: &Key, d: &DesiredPeer) -> bool {
    let have: BTreeSet<(std::net::IpAddr, u8)> = current
        .allowed_ips
        .iter()
        .map(|m| (m.address, m.cidr))
        .collect();
    let want: BTreeSet<(std::net::IpAddr, u8)> = d
        .allowed_ips
        .iter()
        .map(|n| (n.addr(), n.prefix_len()))
        .collect();
    let endpoint_ok = match d.endpoint {
        None => true,
        Some(e) => current.endpoint == Some(e) || same_endpoint(current.endpoint, e),
    };
    have == want
        && current.preshared_key.as_ref() == Some(psk)
        && current.persistent_keepalive_interval == Some(KEEPALIVE_SECS)
        && endpoint_ok
}

/// IPv4 endpoints may be reported as IPv4-mapped IPv6 by some backends.
fn same_endpoint(have: Option<SocketAddr>, want: SocketAddr) -> bool {
    have.is_some_and(|h| {
        h.ip().to_canonical() == want.ip().to_canonical() && h.port() == want.port()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_comparison() {
        let psk = Key::new([1; 32]);
        let key = Key::new([2; 32]);
        let cur = Peer {
            public_key: key.clone(),
            preshared_key: Some(psk.clone()),
            protocol_version: None,
            endpoint: Some("[::ffff:10.0.0.1]:51820".parse().unwrap()),
            last_handshake: None,
            tx_bytes: 0,
            rx_bytes: 0,
            persistent_keepalive_interval: Some(KEEPALIVE_SECS),
            allowed_ips: vec![IpAddrMask::new("10.0.0.1".parse().unwrap(), 32)],
        };
        let mut d = DesiredPeer {
            public_key: key.to_string(),
            allowed_ips: vec!["10.0.0.1/32".parse().unwrap()],
            endpoint: Some("10.0.0.1:51820".parse().unwrap()),
        };
        assert!(peer_matches(&cur, &psk, &d));
        d.endpoint = None;
        assert!(
            peer_matches(&cur, &psk, &d),
            "no endpoint wanted: any is fine"
        );
        d.endpoint = Some("10.0.0.2:51820".parse().unwrap());
        assert!(!peer_matches(&cur, &psk, &d));
        d.endpoint = None;
        d.allowed_ips.push("10.0.0.9/32".parse().unwrap());
        assert!(!peer_matches(&cur, &psk, &d));
        d.allowed_ips.pop();
        assert!(!peer_matches(&cur, &Key::new([3; 32]), &d), "PSK differs");
    }
}
