//! The WireGuard device: create it, program keys and peers as a diff, read it back,
//! remove it. Two backends behind [`WireGuardBackend`]: the kernel module (through
//! `defguard_wireguard_rs`' generic-netlink client) and boringtun embedded in this
//! process (through `defguard_wireguard_rs`' `Userspace` API).
//!
//! # Why the trait is async
//!
//! Link management (exists? kind? MTU, up, delete) goes through rtnetlink, which is
//! async, and the daemon's reconcile loop is a tokio task. The WireGuard calls
//! themselves are blocking (a Unix-socket round trip for userspace, a blocking
//! netlink socket inside defguard for the kernel); they run on `spawn_blocking` with
//! a deadline, so a wedged device can stall neither the runtime nor shutdown. The
//! methods return `impl Future + Send` so the daemon can drive them from
//! `tokio::spawn`; that makes the trait not object-safe, so the `auto` choice is the
//! [`AnyBackend`] enum (innernet does the same with its `Backend`).
//!
//! # How defguard starts boringtun, and the signal trap
//!
//! Read from `defguard_wireguard_rs` 0.12.4 (`wgapi_userspace.rs`) and
//! `defguard_boringtun` 0.7.1 (`device/{mod,api,epoll}.rs`):
//!
//! * `WGApi::<Userspace>::create_interface` calls `DeviceHandle::new(ifname,
//!   DeviceConfig::default())` (4 worker threads, connected sockets, multi-queue TUN,
//!   no inherited UAPI fd), then brings the link up over netlink. MTU is left at the
//!   TUN default (1500) unless set afterwards.
//! * `Device::new` opens the TUN queue (`IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`),
//!   binds the UAPI listener at `/var/run/wireguard/<ifname>.sock` (creating the
//!   directory, deleting whatever file was there), and registers a 1 s monitor that
//!   stops the device when that file disappears.
//! * It then registers SIGINT and SIGTERM handlers: `sigprocmask(SIG_BLOCK)` on the
//!   *calling thread* plus one `signalfd` per signal in the shared epoll set, whose
//!   handler stops the device. `DeviceHandle::new` spawns the worker threads *after*
//!   that, so they inherit the blocked mask. `open_listen_socket(0)` binds a random
//!   UDP port until a `listen_port` is set.
//! * Consequences: (1) creating the device on the main thread before the runtime
//!   starts makes every later thread block SIGTERM, so only boringtun ever sees it,
//!   and it stops itself but the daemon never tears anything down. We create it on
//!   a throwaway thread instead. (2) That alone is not enough: a worker sleeping in
//!   `epoll_wait` on the signalfd is woken when SIGTERM is *generated* and can
//!   dequeue it from the process-wide pending set before the kernel hands it to a
//!   tokio thread. Measured here: the very first SIGTERM after creation was eaten by
//!   boringtun, the device died, and the next UAPI read hung. So right after
//!   creation we re-arm boringtun's two signalfds with an empty mask
//!   ([`neutralize_boringtun_signalfds`]); they stay registered but never become
//!   readable, and SIGINT/SIGTERM reach the daemon's handlers.
//! * `DeviceHandle`'s `Drop` triggers the exit notifier and removes the socket file;
//!   the TUN goes away when the last worker thread has exited. It does not join.
//! * boringtun cannot update an existing peer: a `set` for a known public key hits
//!   `assert!(!self.peers.contains_key(..))` in a worker thread. Changing a peer
//!   therefore means remove + add (which resets that peer's session and counters),
//!   and we carry over the endpoint WireGuard has so a roamed endpoint survives.
//! * defguard's UAPI reader (`Host::parse_uapi`) retries forever on a read timeout,
//!   so a read against a dead device never returns; our calls have a deadline.
//! * defguard's device-level setter (`write_host`) always sends `replace_peers=true`
//!   (which drops every session), so device fields (key, port, fwmark) are written
//!   with a minimal UAPI `set` of our own; peers go through defguard.
//! * defguard's `remove_interface` also deletes fwmark rules and the main-table
//!   `suppress_prefixlength 0` rule that belong to wg-quick, and resets DNS through
//!   resolvectl/resolvconf. We never call it: removal is ours (drop the handle, or
//!   delete the kernel link).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, SystemTime};

use defguard_wireguard_rs::host::Host;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{
    InterfaceConfiguration, Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use ipnet::IpNet;

use super::key::{PresharedKey, PrivateKey, PublicKey};
use super::netlink::{self, LinkState, Netlink};

/// Where userspace WireGuard (boringtun, wireguard-go) serves its UAPI socket, and
/// where `wg` looks for it. Shared by every network namespace of a mount namespace.
pub const UAPI_SOCKET_DIR: &str = "/var/run/wireguard";

/// How long a single WireGuard call may take before we report the device as wedged.
const CALL_DEADLINE: Duration = Duration::from_secs(10);
/// How long a removed userspace device may take to release its TUN.
const REMOVE_DEADLINE: Duration = Duration::from_secs(5);

pub fn uapi_socket_path(link_name: &str) -> PathBuf {
    Path::new(UAPI_SOCKET_DIR).join(format!("{link_name}.sock"))
}

// ---------------------------------------------------------------------------
// Desired configuration and observed state
// ---------------------------------------------------------------------------

/// The whole desired device: what `apply` converges to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: PrivateKey,
    pub listen_port: u16,
    /// Mark on WireGuard's own UDP packets (KubeSpan: 0x20). 0 = none.
    pub fwmark: u32,
    /// The full peer list; peers on the device but not here are removed.
    pub peers: Vec<PeerConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// KubeSpan: the cluster secret, parsed as a WireGuard key.
    pub preshared_key: Option<PresharedKey>,
    /// Seconds; 0 = off. KubeSpan: 25.
    pub persistent_keepalive_secs: u16,
    /// Replace semantics: exactly these, nothing else.
    pub allowed_ips: Vec<IpNet>,
    /// `Some` sets the endpoint; `None` leaves whatever WireGuard has (possibly one it
    /// learned from the peer roaming or reaching us through NAT).
    pub endpoint: Option<SocketAddr>,
}

/// The device as WireGuard reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// `None` until a private key is set.
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    /// 0 = none.
    pub fwmark: u32,
    /// Sorted by public key (base64 text).
    pub peers: Vec<PeerState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    pub persistent_keepalive_secs: u16,
    /// Sorted.
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl DeviceState {
    pub fn peer(&self, key: &PublicKey) -> Option<&PeerState> {
        self.peers.iter().find(|p| &p.public_key == key)
    }
}

/// What an `apply` changed. Empty when the device already matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    /// Private key, listen port or fwmark were written.
    pub device_changed: bool,
    /// The backend had to replace the whole peer list (kernel device-level change):
    /// every session restarts.
    pub peers_replaced: bool,
    pub added: Vec<PublicKey>,
    pub updated: Vec<PublicKey>,
    pub removed: Vec<PublicKey>,
}

impl ApplySummary {
    pub fn is_noop(&self) -> bool {
        !self.device_changed
            && !self.peers_replaced
            && self.added.is_empty()
            && self.updated.is_empty()
            && self.removed.is_empty()
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("cannot create WireGuard interface {name}: {reason} (is another kubespan running?)")]
    Create { name: String, reason: String },
    #[error(
        "a link named {name} already exists ({kind}) and is not a device this process created: another kubespan or WireGuard is using it; stop it, or remove the link with `ip link del {name}`"
    )]
    LinkConflict { name: String, kind: String },
    #[error(
        "{path} is served by another running WireGuard device (another kubespan, possibly in another network namespace: that directory is shared by every namespace with the same mounts); stop it, give each node a private mount namespace with its own /var/run/wireguard, or use another interface name"
    )]
    SocketInUse { path: PathBuf },
    #[error(
        "kernel WireGuard is not available: {reason} (load the module with `modprobe wireguard`, or choose the userspace backend)"
    )]
    KernelUnsupported { reason: String },
    #[error("WireGuard interface {name} does not exist: ensure_link must create it before {op}")]
    NoDevice { name: String, op: &'static str },
    #[error("invalid WireGuard configuration for {name}: {reason}")]
    InvalidConfig { name: String, reason: String },
    #[error("cannot configure WireGuard interface {name}: {reason}")]
    Configure { name: String, reason: String },
    #[error("cannot read WireGuard interface {name}: {reason}")]
    Read { name: String, reason: String },
    #[error("cannot remove WireGuard interface {name}: {reason}")]
    Remove { name: String, reason: String },
    #[error("netlink {op} for link {name} failed: {source} (are we root, with CAP_NET_ADMIN?)")]
    Netlink {
        name: String,
        op: &'static str,
        source: rtnetlink::Error,
    },
    #[error(
        "WireGuard interface {name} did not answer within {secs} s during {op}; the device is wedged: restart kubespan"
    )]
    Timeout {
        name: String,
        op: &'static str,
        secs: u64,
    },
}

fn netlink_err(name: &str, op: &'static str) -> impl FnOnce(rtnetlink::Error) -> WireGuardError {
    let name = name.to_owned();
    move |source| WireGuardError::Netlink { name, op, source }
}

// ---------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------

/// One WireGuard interface, named at construction.
pub trait WireGuardBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    fn link_name(&self) -> &str;

    /// Creates the interface if needed (adopting a leftover one where the backend
    /// can), sets the MTU and brings it up. Idempotent.
    fn ensure_link(
        &self,
        mtu: u32,
    ) -> impl Future<Output = Result<LinkState, WireGuardError>> + Send;

    /// Converges the device to `config` with the smallest change: untouched peers
    /// keep their sessions, endpoints and counters.
    fn apply(
        &self,
        config: &DeviceConfig,
    ) -> impl Future<Output = Result<ApplySummary, WireGuardError>> + Send;

    fn read(&self) -> impl Future<Output = Result<DeviceState, WireGuardError>> + Send;

    /// Removes the interface (and the userspace UAPI socket). Succeeds when there is
    /// nothing to remove; never removes a link it does not own.
    fn remove_link(&self) -> impl Future<Output = Result<(), WireGuardError>> + Send;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Kernel,
    Userspace,
    /// Someone else's userspace WireGuard, driven over its UAPI socket.
    External,
}

/// The `--wireguard-backend` setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Kernel when [`detect_kernel_support`] says so, else userspace.
    #[default]
    Auto,
    Kernel,
    Userspace,
    External,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kernel" => Ok(Self::Kernel),
            "userspace" => Ok(Self::Userspace),
            "external" => Ok(Self::External),
            other => Err(format!(
                "unknown WireGuard backend {other:?} (expected auto, kernel, userspace or external)"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// The pure part: what to change
// ---------------------------------------------------------------------------

/// A peer whose configuration differs from the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub desired: PeerConfig,
    /// The endpoint WireGuard has now; a backend that must re-create the peer uses
    /// it when `desired.endpoint` is `None`.
    pub current_endpoint: Option<SocketAddr>,
}

impl PeerUpdate {
    /// The endpoint the peer must end up with.
    pub fn effective_endpoint(&self) -> Option<SocketAddr> {
        self.desired.endpoint.or(self.current_endpoint)
    }
}

/// The difference between the device and the desired configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Device fields to write: `(private key?, listen port?, fwmark?)`, each only when it differs.
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub remove: Vec<PublicKey>,
    pub add: Vec<PeerConfig>,
    pub update: Vec<PeerUpdate>,
}

impl Plan {
    pub fn device_changed(&self) -> bool {
        self.private_key.is_some() || self.listen_port.is_some() || self.fwmark.is_some()
    }

    pub fn is_noop(&self) -> bool {
        !self.device_changed()
            && self.remove.is_empty()
            && self.add.is_empty()
            && self.update.is_empty()
    }
}

fn normalized(ips: &[IpNet]) -> BTreeSet<IpNet> {
    ips.iter().map(IpNet::trunc).collect()
}

/// Rejects configurations WireGuard would silently mangle.
pub fn validate(config: &DeviceConfig) -> Result<(), String> {
    let own = config.private_key.public_key();
    let mut seen = BTreeSet::new();
    for peer in &config.peers {
        if peer.public_key == own {
            return Err(format!("peer {} is this device's own key", peer.public_key));
        }
        if !seen.insert(peer.public_key) {
            return Err(format!("peer {} is listed twice", peer.public_key));
        }
    }
    Ok(())
}

/// Computes the smallest change from `current` to `desired`. Pure.
pub fn plan(current: &DeviceState, desired: &DeviceConfig) -> Plan {
    let mut plan = Plan::default();
    if current.public_key != Some(desired.private_key.public_key()) {
        plan.private_key = Some(desired.private_key.clone());
    }
    if current.listen_port != desired.listen_port {
        plan.listen_port = Some(desired.listen_port);
    }
    if current.fwmark != desired.fwmark {
        plan.fwmark = Some(desired.fwmark);
    }

    let current_peers: BTreeMap<PublicKey, &PeerState> =
        current.peers.iter().map(|p| (p.public_key, p)).collect();
    let desired_keys: BTreeSet<PublicKey> = desired.peers.iter().map(|p| p.public_key).collect();

    plan.remove = current_peers
        .keys()
        .filter(|k| !desired_keys.contains(k))
        .copied()
        .collect();

    let mut desired_peers: Vec<&PeerConfig> = desired.peers.iter().collect();
    desired_peers.sort_by_key(|p| p.public_key);
    for want in desired_peers {
        let mut want = want.clone();
        let mut ips: Vec<IpNet> = normalized(&want.allowed_ips).into_iter().collect();
        ips.sort();
        want.allowed_ips = ips;
        match current_peers.get(&want.public_key) {
            None => plan.add.push(want),
            Some(have) => {
                let differs = normalized(&have.allowed_ips) != normalized(&want.allowed_ips)
                    || have.preshared_key != want.preshared_key
                    || have.persistent_keepalive_secs != want.persistent_keepalive_secs
                    || want.endpoint.is_some_and(|e| have.endpoint != Some(e));
                if differs {
                    plan.update.push(PeerUpdate {
                        desired: want,
                        current_endpoint: have.endpoint,
                    });
                }
            }
        }
    }
    plan
}

// ---------------------------------------------------------------------------
// Conversions to and from defguard's types
// ---------------------------------------------------------------------------

fn to_mask(net: &IpNet) -> IpAddrMask {
    IpAddrMask::new(net.addr(), net.prefix_len())
}

fn from_mask(mask: &IpAddrMask) -> Option<IpNet> {
    IpNet::new(mask.address, mask.cidr).ok().map(|n| n.trunc())
}

fn state_from_host(host: &Host) -> DeviceState {
    let mut peers: Vec<PeerState> = host
        .peers
        .values()
        .map(|p| {
            let mut allowed_ips: Vec<IpNet> = p.allowed_ips.iter().filter_map(from_mask).collect();
            allowed_ips.sort();
            allowed_ips.dedup();
            PeerState {
                public_key: PublicKey::from_wg(&p.public_key),
                preshared_key: p.preshared_key.as_ref().and_then(PresharedKey::from_wg),
                persistent_keepalive_secs: p.persistent_keepalive_interval.unwrap_or(0),
                allowed_ips,
                endpoint: p.endpoint,
                // The kernel reports "never" as the epoch.
                last_handshake: p.last_handshake.filter(|t| *t > SystemTime::UNIX_EPOCH),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
            }
        })
        .collect();
    peers.sort_by_key(|p| p.public_key);
    DeviceState {
        public_key: host
            .private_key
            .as_ref()
            .filter(|k| k.as_array() != [0; 32])
            .map(|k| PublicKey::from_wg(&k.public_key())),
        listen_port: host.listen_port,
        fwmark: host.fwmark.unwrap_or(0),
        peers,
    }
}

/// A defguard peer for a full (re)creation: nothing set means "WireGuard default".
fn new_peer(config: &PeerConfig, endpoint: Option<SocketAddr>) -> Peer {
    let mut peer = Peer::new(config.public_key.to_wg());
    peer.preshared_key = config.preshared_key.as_ref().map(PresharedKey::to_wg);
    peer.persistent_keepalive_interval =
        (config.persistent_keepalive_secs > 0).then_some(config.persistent_keepalive_secs);
    peer.allowed_ips = config.allowed_ips.iter().map(to_mask).collect();
    peer.endpoint = endpoint;
    peer
}

/// A defguard peer for an in-place kernel update: every field explicit (zero PSK and
/// zero keepalive clear them), endpoint only when we choose one.
fn update_peer_in_place(config: &PeerConfig) -> Peer {
    let mut peer = new_peer(config, config.endpoint);
    peer.preshared_key = Some(config.preshared_key.as_ref().map_or(
        defguard_wireguard_rs::key::Key::new([0; 32]),
        PresharedKey::to_wg,
    ));
    peer.persistent_keepalive_interval = Some(config.persistent_keepalive_secs);
    peer
}

/// Runs a blocking WireGuard call off the runtime, with a deadline.
async fn blocking<T: Send + 'static>(
    name: &str,
    op: &'static str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<Result<T, String>, WireGuardError> {
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(CALL_DEADLINE, task).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(join)) => Ok(Err(format!("worker panicked: {join}"))),
        Err(_) => Err(WireGuardError::Timeout {
            name: name.to_owned(),
            op,
            secs: CALL_DEADLINE.as_secs(),
        }),
    }
}

fn log_summary(name: &str, summary: &ApplySummary) {
    if summary.is_noop() {
        tracing::debug!(link = name, "WireGuard device already up to date");
        return;
    }
    let keys = |v: &[PublicKey]| v.iter().map(PublicKey::to_base64).collect::<Vec<_>>();
    tracing::info!(
        link = name,
        device_changed = summary.device_changed,
        peers_replaced = summary.peers_replaced,
        added = ?keys(&summary.added),
        updated = ?keys(&summary.updated),
        removed = ?keys(&summary.removed),
        "WireGuard device updated"
    );
}

// ---------------------------------------------------------------------------
// Userspace (embedded boringtun)
// ---------------------------------------------------------------------------

/// boringtun embedded in this process, one device per backend value.
pub struct UserspaceBackend {
    name: String,
    netlink: Netlink,
    /// The device belongs to another process (wireguard-go, say): we only
    /// configure it over its UAPI socket, never create or delete it.
    external: bool,
    device: Arc<Mutex<Option<WGApi<Userspace>>>>,
    /// Serializes ensure/apply/remove so a diff is never computed against a device
    /// another call is changing.
    op: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for UserspaceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceBackend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl UserspaceBackend {
    pub fn new(link_name: impl Into<String>, netlink: Netlink) -> Self {
        Self {
            name: link_name.into(),
            netlink,
            external: false,
            device: Arc::new(Mutex::new(None)),
            op: tokio::sync::Mutex::new(()),
        }
    }

    /// The device slot, without ever blocking the runtime. Every operation holds
    /// `op`, so finding this lock taken means an earlier call is stuck inside the
    /// device (its deadline passed, its thread still waits).
    fn slot(&self) -> Result<MutexGuard<'_, Option<WGApi<Userspace>>>, WireGuardError> {
        match self.device.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => Err(WireGuardError::Timeout {
                name: self.name.clone(),
                op: "an earlier call",
                secs: CALL_DEADLINE.as_secs(),
            }),
        }
    }

    /// A backend for a device another process created and serves on
    /// `/var/run/wireguard/<link>.sock`.
    pub fn external(link_name: impl Into<String>, netlink: Netlink) -> Self {
        Self {
            external: true,
            ..Self::new(link_name, netlink)
        }
    }

    fn has_device(&self) -> Result<bool, WireGuardError> {
        Ok(self.slot()?.is_some())
    }

    /// Attaches to the external device: its link and a live UAPI socket must
    /// exist. The handle only talks to the socket (it never starts boringtun).
    fn attach_external(&self, link_exists: bool) -> Result<(), WireGuardError> {
        let path = uapi_socket_path(&self.name);
        if !link_exists || !socket_is_live(&path) {
            let missing = if link_exists {
                format!("nothing answers on {}", path.display())
            } else {
                format!("there is no link {}", self.name)
            };
            return Err(WireGuardError::Create {
                name: self.name.clone(),
                reason: format!(
                    "kubespan.backend is external, but {missing} (start the WireGuard implementation first, for example `wireguard-go {}`)",
                    self.name
                ),
            });
        }
        let mut slot = self.slot()?;
        if slot.is_none() {
            let api =
                WGApi::<Userspace>::new(self.name.clone()).map_err(|e| WireGuardError::Create {
                    name: self.name.clone(),
                    reason: e.to_string(),
                })?;
            *slot = Some(api);
            tracing::info!(link = %self.name, socket = %path.display(), "attached to an external userspace WireGuard device");
        }
        Ok(())
    }

    /// Creates our boringtun device, or re-creates it when its link vanished.
    async fn ensure_own_device(&self, existing: Option<LinkState>) -> Result<(), WireGuardError> {
        match (self.has_device()?, existing) {
            (true, Some(_)) => {}
            (true, None) => {
                // Someone deleted our TUN; the old device is useless.
                tracing::warn!(link = %self.name, "userspace WireGuard link vanished; recreating it");
                self.drop_device().await?;
                self.create().await?;
            }
            (false, Some(link)) => {
                return Err(WireGuardError::LinkConflict {
                    name: self.name.clone(),
                    kind: link.kind.unwrap_or_else(|| "no kind".into()),
                });
            }
            (false, None) => self.create().await?,
        }
        Ok(())
    }

    /// Runs `f` against our device on a blocking thread.
    async fn with_device<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WGApi<Userspace>) -> Result<T, String> + Send + 'static,
    ) -> Result<Result<T, String>, WireGuardError> {
        let device = Arc::clone(&self.device);
        let name = self.name.clone();
        blocking(&self.name, op, move || {
            let guard = device.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref() {
                Some(api) => f(api),
                None => Err(format!("no device {name}")),
            }
        })
        .await
    }

    async fn read_locked(&self) -> Result<DeviceState, WireGuardError> {
        if !self.has_device()? {
            return Err(WireGuardError::NoDevice {
                name: self.name.clone(),
                op: "reading it",
            });
        }
        self.with_device("read", |api| {
            api.read_interface_data()
                .map(|host| state_from_host(&host))
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(|reason| WireGuardError::Read {
            name: self.name.clone(),
            reason,
        })
    }

    async fn create(&self) -> Result<(), WireGuardError> {
        let path = uapi_socket_path(&self.name);
        if socket_is_live(&path) {
            return Err(WireGuardError::SocketInUse { path });
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err(WireGuardError::Create {
                name: self.name.clone(),
                reason: "/dev/net/tun does not exist (load the tun module: modprobe tun)".into(),
            });
        }
        let name = self.name.clone();
        let created = blocking(&self.name, "create", move || create_userspace_device(&name))
            .await?
            .map_err(|reason| WireGuardError::Create {
                name: self.name.clone(),
                reason,
            })?;
        *self.slot()? = Some(created);
        tracing::info!(link = %self.name, socket = %path.display(), "created userspace WireGuard device");
        Ok(())
    }

    /// Leaves the external device as we found it, less what we added: our
    /// peers go; the link, its key and port stay with their owner.
    async fn detach_external(&self) -> Result<(), WireGuardError> {
        if !self.has_device()? {
            return Ok(());
        }
        let state = self.read_locked().await?;
        let keys: Vec<PublicKey> = state.peers.iter().map(|p| p.public_key).collect();
        let removed = keys.len();
        self.with_device("remove peers", move |api| {
            for key in &keys {
                api.remove_peer(&key.to_wg()).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await?
        .map_err(|reason| WireGuardError::Remove {
            name: self.name.clone(),
            reason,
        })?;
        // The handle owns no device: dropping it only forgets the socket path.
        self.slot()?.take();
        tracing::info!(link = %self.name, peers = removed, "detached from the external WireGuard device (its link stays)");
        Ok(())
    }

    async fn drop_device(&self) -> Result<(), WireGuardError> {
        let api = self.slot()?.take();
        if let Some(api) = api {
            // DeviceHandle's Drop signals its workers to exit and deletes the socket.
            blocking(&self.name, "remove", move || {
                drop(api);
                Ok(())
            })
            .await?
            .map_err(|reason| WireGuardError::Remove {
                name: self.name.clone(),
                reason,
            })?;
        }
        Ok(())
    }
}

/// Whether a WireGuard process answers on this UAPI socket. A file nobody listens on
/// (left by a crash) is not live; boringtun replaces it.
fn socket_is_live(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Creates the boringtun device on a dedicated thread (its blocked SIGINT/SIGTERM
/// mask dies with that thread) and disarms boringtun's signalfds. See the module
/// documentation.
fn create_userspace_device(name: &str) -> Result<WGApi<Userspace>, String> {
    // Serializes our creations so the signalfds that appear belong to this device.
    static CREATE: Mutex<()> = Mutex::new(());
    let name = name.to_owned();
    let thread = std::thread::Builder::new()
        .name("kubespan-wg-init".into())
        .spawn(move || {
            let _serial = CREATE.lock().unwrap_or_else(PoisonError::into_inner);
            let before = signalfds();
            let mut api = WGApi::<Userspace>::new(name).map_err(|e| e.to_string())?;
            api.create_interface().map_err(|e| e.to_string())?;
            let new: Vec<i32> = signalfds().difference(&before).copied().collect();
            neutralize_boringtun_signalfds(&new)?;
            Ok(api)
        })
        .map_err(|e| format!("cannot start the device thread: {e}"))?;
    thread
        .join()
        .map_err(|_| "the device thread panicked".to_owned())?
}

/// The process's open signalfd descriptors.
fn signalfds() -> BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.as_os_str() == "anon_inode:[signalfd]")
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// The signal mask of a signalfd, from `/proc/self/fdinfo`.
fn signalfd_mask(fd: i32) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("sigmask:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Re-arms boringtun's SIGINT/SIGTERM signalfds with an empty mask so they can never
/// consume a termination signal meant for the daemon. Only descriptors whose mask is
/// a subset of {SIGINT, SIGTERM} are touched.
pub(crate) fn neutralize_boringtun_signalfds(fds: &[i32]) -> Result<(), String> {
    let termination: u64 =
        (1 << (nix::libc::SIGINT as u64 - 1)) | (1 << (nix::libc::SIGTERM as u64 - 1));
    let empty = nix::sys::signal::SigSet::empty();
    let mut disarmed = 0;
    for &fd in fds {
        match signalfd_mask(fd) {
            Some(mask) if mask != 0 && mask & !termination == 0 => {
                // SAFETY: `fd` is an open signalfd (checked through /proc just now,
                // under the creation lock); signalfd(2) with an existing descriptor only
                // replaces its mask and returns the same descriptor, so no ownership moves.
                let rc = unsafe { nix::libc::signalfd(fd, empty.as_ref(), 0) };
                if rc < 0 {
                    return Err(format!(
                        "cannot disarm boringtun's signal handler (fd {fd}): {}",
                        std::io::Error::last_os_error()
                    ));
                }
                disarmed += 1;
            }
            _ => {}
        }
    }
    tracing::debug!(disarmed, "disarmed boringtun termination signalfds");
    Ok(())
}

/// Writes device-level fields with one UAPI `set`, without `replace_peers`.
fn uapi_set_device(path: &Path, plan: &Plan, fwmark: u32) -> Result<(), String> {
    let mut request = String::from("set=1\n");
    // Order matters to boringtun: peers need the key, so it goes first.
    if let Some(key) = &plan.private_key {
        request.push_str(&format!("private_key={}\n", key.to_wg().to_lower_hex()));
    }
    if let Some(port) = plan.listen_port {
        request.push_str(&format!("listen_port={port}\n"));
    }
    // boringtun opens fresh, unmarked sockets on a port change, so the mark is
    // written after every port change too.
    if plan.fwmark.is_some() || plan.listen_port.is_some() {
        request.push_str(&format!("fwmark={fwmark}\n"));
    }
    request.push('\n');

    let mut stream =
        UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(3))))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("the device closed the UAPI socket without an answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        }
        if let Some(code) = line.trim().strip_prefix("errno=") {
            return match code.parse::<i32>() {
                Ok(0) => Ok(()),
                Ok(errno) if errno == nix::libc::EADDRINUSE && plan.listen_port.is_some() => {
                    Err(format!(
                        "cannot listen on UDP port {} (EADDRINUSE: is another WireGuard using it?)",
                        plan.listen_port.unwrap_or_default()
                    ))
                }
                Ok(errno) => Err(format!(
                    "the device rejected the settings: {}",
                    std::io::Error::from_raw_os_error(errno)
                )),
                Err(_) => Err(format!("unparseable UAPI answer {line:?}")),
            };
        }
    }
}

impl WireGuardBackend for UserspaceBackend {
    fn kind(&self) -> BackendKind {
        if self.external {
            BackendKind::External
        } else {
            BackendKind::Userspace
        }
    }

    fn link_name(&self) -> &str {
        &self.name
    }

    async fn ensure_link(&self, mtu: u32) -> Result<LinkState, WireGuardError> {
        let _op = self.op.lock().await;
        let existing = netlink::get_link(&self.netlink, &self.name)
            .await
            .map_err(netlink_err(&self.name, "link lookup"))?;
        if self.external {
            self.attach_external(existing.is_some())?;
        } else {
            self.ensure_own_device(existing).await?;
        }
        let link = netlink::get_link(&self.netlink, &self.name)
            .await
            .map_err(netlink_err(&self.name, "link lookup"))?
            .ok_or_else(|| WireGuardError::Create {
                name: self.name.clone(),
                reason: "the TUN link disappeared right after creation".into(),
            })?;
        if netlink::ensure_mtu_up(&self.netlink, &link, mtu)
            .await
            .map_err(netlink_err(&self.name, "set MTU and up"))?
        {
            tracing::info!(link = %self.name, mtu, "set link MTU and brought it up");
        }
        Ok(LinkState {
            mtu,
            up: true,
            ..link
        })
    }

    async fn apply(&self, config: &DeviceConfig) -> Result<ApplySummary, WireGuardError> {
        validate(config).map_err(|reason| WireGuardError::InvalidConfig {
            name: self.name.clone(),
            reason,
        })?;
        let _op = self.op.lock().await;
        let current = self.read_locked().await?;
        let plan = plan(&current, config);
        let mut summary = ApplySummary {
            device_changed: plan.device_changed(),
            ..ApplySummary::default()
        };
        if plan.is_noop() {
            log_summary(&self.name, &summary);
            return Ok(summary);
        }

        let configure_err = |reason: String| WireGuardError::Configure {
            name: self.name.clone(),
            reason,
        };
        if plan.device_changed() {
            let path = uapi_socket_path(&self.name);
            let device_plan = plan.clone();
            let fwmark = config.fwmark;
            self.with_device("set device", move |_| {
                uapi_set_device(&path, &device_plan, fwmark)
            })
            .await?
            .map_err(configure_err)?;
        }

        // boringtun cannot modify a peer in place (it asserts); re-create changed ones.
        let mut removals: Vec<PublicKey> = plan.remove.clone();
        removals.extend(plan.update.iter().map(|u| u.desired.public_key));
        let mut additions: Vec<Peer> = plan.add.iter().map(|p| new_peer(p, p.endpoint)).collect();
        additions.extend(
            plan.update
                .iter()
                .map(|u| new_peer(&u.desired, u.effective_endpoint())),
        );
        self.with_device("set peers", move |api| {
            for key in &removals {
                api.remove_peer(&key.to_wg()).map_err(|e| e.to_string())?;
            }
            for peer in &additions {
                api.configure_peer(peer).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await?
        .map_err(configure_err)?;

        summary.added = plan.add.iter().map(|p| p.public_key).collect();
        summary.updated = plan.update.iter().map(|u| u.desired.public_key).collect();
        summary.removed = plan.remove;
        log_summary(&self.name, &summary);
        Ok(summary)
    }

    async fn read(&self) -> Result<DeviceState, WireGuardError> {
        let _op = self.op.lock().await;
        self.read_locked().await
    }

    async fn remove_link(&self) -> Result<(), WireGuardError> {
        let _op = self.op.lock().await;
        if self.external {
            return self.detach_external().await;
        }
        let owned = self.has_device()?;
        self.drop_device().await?;
        let path = uapi_socket_path(&self.name);
        if owned {
            let gone = netlink::wait_link_gone(&self.netlink, &self.name, REMOVE_DEADLINE)
                .await
                .map_err(netlink_err(&self.name, "link lookup"))?;
            if !gone {
                return Err(WireGuardError::Remove {
                    name: self.name.clone(),
                    reason: format!(
                        "the TUN link is still there {} s after stopping the device",
                        REMOVE_DEADLINE.as_secs()
                    ),
                });
            }
            tracing::info!(link = %self.name, "removed userspace WireGuard device");
        }
        // Ours is gone by now (boringtun deletes it on drop); a file nobody answers on
        // is a crash leftover. A live one belongs to someone else and stays.
        if path.exists() && !socket_is_live(&path) {
            std::fs::remove_file(&path).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(WireGuardError::Remove {
                        name: self.name.clone(),
                        reason: format!("cannot delete {}: {e}", path.display()),
                    })
                }
            })?;
            tracing::info!(socket = %path.display(), "removed stale WireGuard UAPI socket");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------

/// The Linux kernel's WireGuard, configured over generic netlink (by defguard).
#[derive(Debug)]
pub struct KernelBackend {
    name: String,
    netlink: Netlink,
    op: tokio::sync::Mutex<()>,
}

impl KernelBackend {
    pub fn new(link_name: impl Into<String>, netlink: Netlink) -> Self {
        Self {
            name: link_name.into(),
            netlink,
            op: tokio::sync::Mutex::new(()),
        }
    }

    async fn wg<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&WGApi<Kernel>) -> Result<T, String> + Send + 'static,
    ) -> Result<Result<T, String>, WireGuardError> {
        let name = self.name.clone();
        blocking(&self.name, op, move || {
            let api = WGApi::<Kernel>::new(name).map_err(|e| e.to_string())?;
            f(&api)
        })
        .await
    }

    async fn read_unlocked(&self) -> Result<DeviceState, WireGuardError> {
        self.wg("read", |api| {
            api.read_interface_data()
                .map(|host| state_from_host(&host))
                .map_err(|e| e.to_string())
        })
        .await?
        .map_err(|reason| WireGuardError::Read {
            name: self.name.clone(),
            reason,
        })
    }
}

/// The one device-level setter defguard has for the kernel: it flushes the link's
/// addresses and sets `ReplacePeers`, so every desired peer goes back with it
/// (endpoints WireGuard learned are carried over). Used only when the key, port or
/// fwmark differ: first configuration, or a key rotation.
fn kernel_full_config(
    name: &str,
    config: &DeviceConfig,
    current: &DeviceState,
) -> InterfaceConfiguration {
    let peers = config
        .peers
        .iter()
        .map(|p| {
            let endpoint = p
                .endpoint
                .or_else(|| current.peer(&p.public_key).and_then(|c| c.endpoint));
            new_peer(p, endpoint)
        })
        .collect();
    InterfaceConfiguration {
        name: name.to_owned(),
        prvkey: config.private_key.to_wg().to_lower_hex(),
        addresses: Vec::new(),
        port: config.listen_port,
        peers,
        mtu: None,
        fwmark: Some(config.fwmark),
    }
}

impl WireGuardBackend for KernelBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }

    fn link_name(&self) -> &str {
        &self.name
    }

    async fn ensure_link(&self, mtu: u32) -> Result<LinkState, WireGuardError> {
        let _op = self.op.lock().await;
        let lookup = netlink_err(&self.name, "link lookup");
        let link = match netlink::get_link(&self.netlink, &self.name)
            .await
            .map_err(lookup)?
        {
            // A kernel link survives a crash of the daemon: adopt it.
            Some(link) if link.is_wireguard() => link,
            Some(link) => {
                return Err(WireGuardError::LinkConflict {
                    name: self.name.clone(),
                    kind: link.kind.unwrap_or_else(|| "no kind".into()),
                });
            }
            None => {
                netlink::create_wireguard_link(&self.netlink, &self.name, mtu)
                    .await
                    .map_err(|e| {
                        if netlink::errno(&e) == Some(nix::libc::EOPNOTSUPP) {
                            WireGuardError::KernelUnsupported {
                                reason: format!("creating {} failed: {e}", self.name),
                            }
                        } else {
                            WireGuardError::Create {
                                name: self.name.clone(),
                                reason: e.to_string(),
                            }
                        }
                    })?;
                tracing::info!(link = %self.name, mtu, "created kernel WireGuard link");
                netlink::get_link(&self.netlink, &self.name)
                    .await
                    .map_err(netlink_err(&self.name, "link lookup"))?
                    .ok_or_else(|| WireGuardError::Create {
                        name: self.name.clone(),
                        reason: "the link disappeared right after creation".into(),
                    })?
            }
        };
        netlink::ensure_mtu_up(&self.netlink, &link, mtu)
            .await
            .map_err(netlink_err(&self.name, "set MTU and up"))?;
        Ok(LinkState {
            mtu,
            up: true,
            ..link
        })
    }

    async fn apply(&self, config: &DeviceConfig) -> Result<ApplySummary, WireGuardError> {
        validate(config).map_err(|reason| WireGuardError::InvalidConfig {
            name: self.name.clone(),
            reason,
        })?;
        let _op = self.op.lock().await;
        let current = self.read_unlocked().await?;
        let plan = plan(&current, config);
        let configure_err = |reason: String| WireGuardError::Configure {
            name: self.name.clone(),
            reason,
        };
        let mut summary = ApplySummary::default();
        if plan.device_changed() {
            let full = kernel_full_config(&self.name, config, &current);
            self.wg("configure", move |api| {
                api.configure_interface(&full).map_err(|e| e.to_string())
            })
            .await?
            .map_err(configure_err)?;
            summary.device_changed = true;
            summary.peers_replaced = true;
            summary.added = config.peers.iter().map(|p| p.public_key).collect();
            summary.removed = plan.remove;
            log_summary(&self.name, &summary);
            return Ok(summary);
        }
        if plan.is_noop() {
            log_summary(&self.name, &summary);
            return Ok(summary);
        }
        let removals = plan.remove.clone();
        let mut sets: Vec<Peer> = plan.add.iter().map(|p| new_peer(p, p.endpoint)).collect();
        // The kernel updates peers in place: sessions and counters survive.
        sets.extend(plan.update.iter().map(|u| update_peer_in_place(&u.desired)));
        self.wg("set peers", move |api| {
            for key in &removals {
                api.remove_peer(&key.to_wg()).map_err(|e| e.to_string())?;
            }
            for peer in &sets {
                api.configure_peer(peer).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
        .await?
        .map_err(configure_err)?;
        summary.added = plan.add.iter().map(|p| p.public_key).collect();
        summary.updated = plan.update.iter().map(|u| u.desired.public_key).collect();
        summary.removed = plan.remove;
        log_summary(&self.name, &summary);
        Ok(summary)
    }

    async fn read(&self) -> Result<DeviceState, WireGuardError> {
        self.read_unlocked().await
    }

    async fn remove_link(&self) -> Result<(), WireGuardError> {
        let _op = self.op.lock().await;
        match netlink::get_link(&self.netlink, &self.name)
            .await
            .map_err(netlink_err(&self.name, "link lookup"))?
        {
            None => Ok(()),
            Some(link) if link.is_wireguard() => {
                netlink::delete_link(&self.netlink, link.index)
                    .await
                    .map_err(netlink_err(&self.name, "link delete"))?;
                tracing::info!(link = %self.name, "removed kernel WireGuard link");
                Ok(())
            }
            Some(link) => {
                tracing::warn!(
                    link = %self.name,
                    kind = ?link.kind,
                    "not removing a link that is not a WireGuard link"
                );
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Choosing a backend
// ---------------------------------------------------------------------------

/// Whether this kernel can run WireGuard. Blocking (a few milliseconds).
///
/// `/sys/module/wireguard` exists when the module is loaded or built in. Otherwise
/// the only reliable question is the one the daemon will ask later: can a link of
/// kind `wireguard` be created? (That also lets the kernel auto-load the module, as
/// `ip link add` would.) We ask it inside a fresh network namespace entered by a
/// throwaway thread: the probe link lives and dies with that namespace when the
/// thread exits, so nothing appears in (or is announced to) the host's namespace.
pub fn detect_kernel_support() -> bool {
    if Path::new("/sys/module/wireguard").exists() {
        return true;
    }
    let probe = std::thread::Builder::new()
        .name("kubespan-wg-probe".into())
        .spawn(|| -> Result<(), String> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot enter a scratch network namespace: {e}"))?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let nl = Netlink::connect().map_err(|e| e.to_string())?;
                netlink::create_wireguard_link(&nl, "kubespan-probe", 1420)
                    .await
                    .map_err(|e| e.to_string())
            })
        });
    let result = match probe {
        Ok(handle) => handle
            .join()
            .unwrap_or_else(|_| Err("probe thread panicked".into())),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(()) => true,
        Err(reason) => {
            tracing::debug!(%reason, "kernel WireGuard not available");
            false
        }
    }
}

/// Either backend, for the `auto` choice.
#[derive(Debug)]
pub enum AnyBackend {
    Kernel(KernelBackend),
    Userspace(UserspaceBackend),
}

impl AnyBackend {
    /// Builds the chosen backend; `Auto` probes the kernel.
    pub fn new(choice: BackendChoice, link_name: impl Into<String>, netlink: Netlink) -> Self {
        let name = link_name.into();
        let kernel = match choice {
            BackendChoice::Kernel => true,
            BackendChoice::Userspace | BackendChoice::External => false,
            BackendChoice::Auto => detect_kernel_support(),
        };
        let backend = if choice == BackendChoice::External {
            Self::Userspace(UserspaceBackend::external(name, netlink))
        } else if kernel {
            Self::Kernel(KernelBackend::new(name, netlink))
        } else {
            Self::Userspace(UserspaceBackend::new(name, netlink))
        };
        tracing::info!(?choice, backend = ?backend.kind(), "WireGuard backend selected");
        backend
    }
}

impl WireGuardBackend for AnyBackend {
    fn kind(&self) -> BackendKind {
        match self {
            Self::Kernel(b) => b.kind(),
            Self::Userspace(b) => b.kind(),
        }
    }

    fn link_name(&self) -> &str {
        match self {
            Self::Kernel(b) => b.link_name(),
            Self::Userspace(b) => b.link_name(),
        }
    }

    async fn ensure_link(&self, mtu: u32) -> Result<LinkState, WireGuardError> {
        match self {
            Self::Kernel(b) => b.ensure_link(mtu).await,
            Self::Userspace(b) => b.ensure_link(mtu).await,
        }
    }

    async fn apply(&self, config: &DeviceConfig) -> Result<ApplySummary, WireGuardError> {
        match self {
            Self::Kernel(b) => b.apply(config).await,
            Self::Userspace(b) => b.apply(config).await,
        }
    }

    async fn read(&self) -> Result<DeviceState, WireGuardError> {
        match self {
            Self::Kernel(b) => b.read().await,
            Self::Userspace(b) => b.read().await,
        }
    }

    async fn remove_link(&self) -> Result<(), WireGuardError> {
        match self {
            Self::Kernel(b) => b.remove_link().await,
            Self::Userspace(b) => b.remove_link().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn psk() -> PresharedKey {
        PresharedKey::from_bytes([9; 32])
    }

    fn desired_peer(n: u8, ips: &[&str], endpoint: Option<&str>) -> PeerConfig {
        PeerConfig {
            public_key: key(n),
            preshared_key: Some(psk()),
            persistent_keepalive_secs: 25,
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
        }
    }

    /// The device state WireGuard would report after applying `peer` cleanly.
    fn as_state(peer: &PeerConfig) -> PeerState {
        let mut allowed_ips: Vec<IpNet> = peer.allowed_ips.iter().map(IpNet::trunc).collect();
        allowed_ips.sort();
        PeerState {
            public_key: peer.public_key,
            preshared_key: peer.preshared_key.clone(),
            persistent_keepalive_secs: peer.persistent_keepalive_secs,
            allowed_ips,
            endpoint: peer.endpoint,
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            rx_bytes: 1234,
            tx_bytes: 5678,
        }
    }

    fn config(peers: Vec<PeerConfig>) -> DeviceConfig {
        DeviceConfig {
            private_key: PrivateKey::from_bytes([7; 32]),
            listen_port: 51820,
            fwmark: 0x20,
            peers,
        }
    }

    fn state_of(config: &DeviceConfig) -> DeviceState {
        DeviceState {
            public_key: Some(config.private_key.public_key()),
            listen_port: config.listen_port,
            fwmark: config.fwmark,
            peers: config.peers.iter().map(as_state).collect(),
        }
    }

    #[test]
    fn fresh_device_gets_everything() {
        let want = config(vec![
            desired_peer(1, &["10.0.0.1/32"], Some("192.0.2.1:51820")),
            desired_peer(2, &["10.0.0.2/32"], None),
        ]);
        let p = plan(&DeviceState::default(), &want);
        assert_eq!(p.private_key, Some(want.private_key.clone()));
        assert_eq!(p.listen_port, Some(51820));
        assert_eq!(p.fwmark, Some(0x20));
        assert_eq!(p.add.len(), 2);
        assert!(p.remove.is_empty() && p.update.is_empty());
    }

    #[test]
    fn identical_state_is_a_noop() {
        let want = config(vec![
            desired_peer(1, &["10.0.0.1/32", "fd00::1/128"], Some("192.0.2.1:51820")),
            desired_peer(2, &["10.0.0.2/32"], None),
        ]);
        assert!(plan(&state_of(&want), &want).is_noop());
    }

    #[test]
    fn allowed_ip_order_and_host_bits_do_not_matter() {
        let have = config(vec![desired_peer(
            1,
            &["10.244.1.0/24", "10.0.0.1/32"],
            None,
        )]);
        let want = config(vec![desired_peer(
            1,
            &["10.0.0.1/32", "10.244.1.7/24"],
            None,
        )]);
        assert!(plan(&state_of(&have), &want).is_noop());
    }

    #[test]
    fn endpoint_none_never_causes_a_change() {
        let mut have = state_of(&config(vec![desired_peer(
            1,
            &["10.0.0.1/32"],
            Some("198.51.100.7:4500"), // learned from the peer roaming
        )]));
        let want = config(vec![desired_peer(1, &["10.0.0.1/32"], None)]);
        assert!(plan(&have, &want).is_noop());
        have.peers[0].endpoint = None;
        assert!(plan(&have, &want).is_noop());
    }

    #[test]
    fn a_chosen_endpoint_is_pushed_only_when_different() {
        let have = state_of(&config(vec![desired_peer(
            1,
            &["10.0.0.1/32"],
            Some("192.0.2.1:51820"),
        )]));
        let same = config(vec![desired_peer(
            1,
            &["10.0.0.1/32"],
            Some("192.0.2.1:51820"),
        )]);
        assert!(plan(&have, &same).is_noop());
        let other = config(vec![desired_peer(
            1,
            &["10.0.0.1/32"],
            Some("192.0.2.9:51820"),
        )]);
        let p = plan(&have, &other);
        assert_eq!(p.update.len(), 1);
        assert_eq!(
            p.update[0].effective_endpoint(),
            Some("192.0.2.9:51820".parse().unwrap())
        );
    }

    #[test]
    fn changed_allowed_ips_update_only_that_peer_and_keep_its_endpoint() {
        let have_cfg = config(vec![
            desired_peer(1, &["10.0.0.1/32"], Some("192.0.2.1:51820")),
            desired_peer(2, &["10.0.0.2/32"], Some("192.0.2.2:51820")),
        ]);
        let want = config(vec![
            desired_peer(1, &["10.0.0.1/32", "10.244.1.0/24"], None),
            desired_peer(2, &["10.0.0.2/32"], None),
        ]);
        let p = plan(&state_of(&have_cfg), &want);
        assert!(!p.device_changed() && p.add.is_empty() && p.remove.is_empty());
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].desired.public_key, key(1));
        assert_eq!(
            p.update[0].effective_endpoint(),
            Some("192.0.2.1:51820".parse().unwrap()),
            "a re-created peer keeps the endpoint WireGuard had"
        );
    }

    #[test]
    fn psk_and_keepalive_changes_are_updates() {
        let have = state_of(&config(vec![desired_peer(1, &["10.0.0.1/32"], None)]));
        let mut no_psk = desired_peer(1, &["10.0.0.1/32"], None);
        no_psk.preshared_key = None;
        assert_eq!(plan(&have, &config(vec![no_psk])).update.len(), 1);
        let mut no_keepalive = desired_peer(1, &["10.0.0.1/32"], None);
        no_keepalive.persistent_keepalive_secs = 0;
        assert_eq!(plan(&have, &config(vec![no_keepalive])).update.len(), 1);
    }

    #[test]
    fn undesired_peers_are_removed_and_new_ones_added() {
        let have = state_of(&config(vec![
            desired_peer(1, &["10.0.0.1/32"], None),
            desired_peer(2, &["10.0.0.2/32"], None),
        ]));
        let want = config(vec![
            desired_peer(2, &["10.0.0.2/32"], None),
            desired_peer(3, &["10.0.0.3/32"], None),
        ]);
        let p = plan(&have, &want);
        assert_eq!(p.remove, vec![key(1)]);
        assert_eq!(
            p.add.iter().map(|a| a.public_key).collect::<Vec<_>>(),
            vec![key(3)]
        );
        assert!(p.update.is_empty());
    }

    #[test]
    fn device_fields_are_compared_one_by_one() {
        let want = config(vec![]);
        let mut have = state_of(&want);
        have.listen_port = 40000; // boringtun's random port before configuration
        let p = plan(&have, &want);
        assert_eq!(
            (p.private_key.is_some(), p.listen_port, p.fwmark),
            (false, Some(51820), None)
        );
        have.listen_port = 51820;
        have.public_key = Some(key(5));
        let p = plan(&have, &want);
        assert!(p.private_key.is_some() && p.listen_port.is_none());
    }

    #[test]
    fn validation_rejects_duplicates_and_self() {
        let dup = config(vec![desired_peer(1, &[], None), desired_peer(1, &[], None)]);
        assert!(validate(&dup).unwrap_err().contains("listed twice"));
        let mut own = config(vec![]);
        own.peers.push(PeerConfig {
            public_key: own.private_key.public_key(),
            ..desired_peer(1, &[], None)
        });
        assert!(validate(&own).unwrap_err().contains("own key"));
    }

    #[test]
    fn reads_defguard_hosts_with_kernel_conventions() {
        // The kernel reports "no PSK" as zeroes, "no keepalive" as 0 and "never" as
        // the epoch; all of them mean "unset" to us.
        let private = PrivateKey::from_bytes([7; 32]);
        let mut host = Host::new(51820, private.to_wg());
        host.fwmark = Some(0x20);
        let mut peer = Peer::new(key(1).to_wg());
        peer.preshared_key = Some(defguard_wireguard_rs::key::Key::new([0; 32]));
        peer.persistent_keepalive_interval = Some(0);
        peer.last_handshake = Some(SystemTime::UNIX_EPOCH);
        peer.allowed_ips = vec![
            IpAddrMask::new("10.244.1.5".parse().unwrap(), 24),
            IpAddrMask::new("10.0.0.1".parse().unwrap(), 32),
        ];
        host.peers.insert(peer.public_key.clone(), peer);
        let state = state_from_host(&host);
        assert_eq!(state.public_key, Some(private.public_key()));
        assert_eq!(state.fwmark, 0x20);
        let p = &state.peers[0];
        assert_eq!(p.preshared_key, None);
        assert_eq!(p.persistent_keepalive_secs, 0);
        assert_eq!(p.last_handshake, None);
        assert_eq!(
            p.allowed_ips,
            vec![net("10.0.0.1/32"), net("10.244.1.0/24")]
        );
    }

    #[test]
    fn kernel_in_place_updates_clear_psk_and_keepalive_explicitly() {
        let mut cfg = desired_peer(1, &["10.0.0.1/32"], None);
        cfg.preshared_key = None;
        cfg.persistent_keepalive_secs = 0;
        let peer = update_peer_in_place(&cfg);
        assert_eq!(peer.preshared_key.map(|k| k.as_array()), Some([0; 32]));
        assert_eq!(peer.persistent_keepalive_interval, Some(0));
        assert_eq!(
            peer.endpoint, None,
            "no endpoint attribute: the kernel keeps its own"
        );
    }

    #[test]
    fn kernel_full_configuration_carries_learned_endpoints() {
        let want = config(vec![
            desired_peer(1, &["10.0.0.1/32"], None),
            desired_peer(2, &["10.0.0.2/32"], Some("192.0.2.2:51820")),
        ]);
        let mut have = state_of(&want);
        have.peers[0].endpoint = Some("198.51.100.7:4500".parse().unwrap());
        let full = kernel_full_config("kubespan", &want, &have);
        assert_eq!(full.fwmark, Some(0x20));
        assert_eq!(full.mtu, None);
        assert!(full.addresses.is_empty());
        let endpoint_of = |n: u8| {
            full.peers
                .iter()
                .find(|p| p.public_key.as_array() == [n; 32])
                .and_then(|p| p.endpoint)
        };
        assert_eq!(endpoint_of(1), Some("198.51.100.7:4500".parse().unwrap()));
        assert_eq!(endpoint_of(2), Some("192.0.2.2:51820".parse().unwrap()));
    }

    #[test]
    fn backend_choice_parses() {
        assert_eq!("auto".parse(), Ok(BackendChoice::Auto));
        assert_eq!("kernel".parse(), Ok(BackendChoice::Kernel));
        assert_eq!("userspace".parse(), Ok(BackendChoice::Userspace));
        assert!("boringtun".parse::<BackendChoice>().is_err());
    }

    #[test]
    fn uapi_socket_lives_in_the_shared_directory() {
        assert_eq!(
            uapi_socket_path("kubespan"),
            PathBuf::from("/var/run/wireguard/kubespan.sock")
        );
    }

    #[test]
    fn only_termination_signalfds_are_disarmed() {
        use nix::sys::signal::{SigSet, Signal};
        use nix::sys::signalfd::{SfdFlags, SignalFd};
        let mut term = SigSet::empty();
        term.add(Signal::SIGTERM);
        let mut usr1 = SigSet::empty();
        usr1.add(Signal::SIGUSR1);
        let term_fd = SignalFd::with_flags(&term, SfdFlags::SFD_NONBLOCK).unwrap();
        let usr1_fd = SignalFd::with_flags(&usr1, SfdFlags::SFD_NONBLOCK).unwrap();
        use std::os::fd::AsRawFd;
        let fds = [term_fd.as_raw_fd(), usr1_fd.as_raw_fd()];
        assert!(fds.iter().all(|fd| signalfds().contains(fd)));
        assert_eq!(signalfd_mask(fds[0]), Some(1 << 14));
        neutralize_boringtun_signalfds(&fds).unwrap();
        assert_eq!(signalfd_mask(fds[0]), Some(0), "SIGTERM signalfd disarmed");
        assert_eq!(
            signalfd_mask(fds[1]),
            Some(1 << 9),
            "SIGUSR1 signalfd untouched"
        );
    }
}
