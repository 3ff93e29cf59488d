//! The daemon's reconcile loop: the thin async shell around the pure planner.
//!
//! Every input (discovery view, host addresses, WireGuard observations, the
//! clock) flows into one reconcile that computes the desired state and applies
//! it as a diff through the [`DataPlane`] port. Reconciles are triggered by
//! events (a new affiliate, an address change) and by the planner's own wake
//! time, never by a fixed 30 s tick.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ipnet::Ipv6Net;
use tokio::sync::{mpsc, watch};

use super::local::{HostAddress, LocalFacts, local_affiliate, node_addresses};
use super::plan::{DesiredPeer, Harvested, Plan, Polling, harvested_endpoints, plan};
use super::retain::Retained;
use super::store;
use crate::client::{ClientSnapshot, DiscoveryClient};
use crate::config::Settings;
use crate::core::cipher::ClusterCipher;
use crate::core::types::AffiliateSpec;
use crate::identity::KeyPair;
use crate::kubespan::merge::merge_affiliates;
use crate::kubespan::nft::render_ruleset;
use crate::kubespan::peerspec::{LocalNode, PeerSpec, build_peer_specs};
use crate::kubespan::peerstate::{PeerState, PeerStatus, Timing, WgObservation};
use crate::kubespan::routed::RoutedSet;

/// The WireGuard link as the daemon wants it.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkPlan {
    pub interface: String,
    pub private_key: String,
    /// The cluster secret, every peer's preshared key.
    pub preshared_key: String,
    pub listen_port: u16,
    pub fwmark: u32,
    pub mtu: u32,
    /// The KubeSpan address with its /64.
    pub address: Ipv6Net,
}

impl std::fmt::Debug for LinkPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPlan")
            .field("interface", &self.interface)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The data plane as the daemon sees it: implemented over real kernel state
/// (see `dataplane`) and by a fake in tests. Every call is idempotent.
#[allow(async_fn_in_trait)]
pub trait DataPlane {
    /// Creates or adopts the link, its address, table 180 and the rules.
    async fn setup(&mut self, link: &LinkPlan) -> anyhow::Result<()>;
    /// What WireGuard reports per peer public key.
    async fn observe(&mut self) -> anyhow::Result<BTreeMap<String, WgObservation>>;
    /// Makes the device's peers exactly `peers` (endpoint `None`: untouched).
    async fn apply_peers(&mut self, link: &LinkPlan, peers: &[DesiredPeer]) -> anyhow::Result<()>;
    /// Replaces our nftables table with `script`.
    async fn apply_ruleset(&mut self, script: &str) -> anyhow::Result<()>;
    /// Removes everything `setup` and the applies created.
    async fn teardown(&mut self) -> anyhow::Result<()>;
}

/// Host facts the loop needs, behind a port for tests.
#[allow(async_fn_in_trait)]
pub trait HostFacts {
    async fn addresses(&mut self) -> anyhow::Result<Vec<HostAddress>>;
}

/// What the daemon shows about itself (for `kubespan status` and tests).
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    pub node_id: String,
    pub public_key: String,
    pub kubespan_address: Option<Ipv6Addr>,
    pub local: Option<AffiliateSpec>,
    pub affiliates: BTreeMap<String, AffiliateSpec>,
    pub specs: BTreeMap<String, PeerSpec>,
    pub statuses: BTreeMap<String, PeerStatus>,
    pub routed: RoutedSet,
    pub discovery: Option<ClientSnapshot>,
    /// Peers kept although missing from a fresh discovery snapshot (grace).
    pub retained: Vec<String>,
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub rotations: u64,
    /// Which WireGuard implementation carries the link (`kernel`, `userspace`).
    pub backend: String,
    /// The KubeSpan address with its /64.
    pub kubespan_prefix: Option<Ipv6Net>,
    /// Raw affiliates by source (`service/<node id>`), before merging.
    pub raw_affiliates: BTreeMap<String, AffiliateSpec>,
    /// harvestExtraEndpoints: what this node publishes for its up peers.
    pub harvested: Vec<Harvested>,
    /// Endpoints tried per peer (public key) since it appeared.
    pub endpoint_attempts: BTreeMap<String, u64>,
    pub timing: Timing,
    pub last_reconcile: Option<SystemTime>,
    pub last_reconcile_duration: Duration,
    /// Total time spent reconciling.
    pub reconcile_seconds: f64,
}

/// Everything the loop needs that is decided before it starts.
pub struct NodeSetup {
    pub settings: Settings,
    pub node_id: String,
    pub keys: KeyPair,
    pub kubespan_address: Ipv6Addr,
    pub hostname: String,
    pub operating_system: String,
    pub timing: Timing,
    pub polling: Polling,
    /// How long an affiliate missing from a fresh snapshot is kept.
    pub retain_grace: Duration,
    /// Which WireGuard implementation the data plane uses, for status output.
    pub backend: String,
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM/SIGINT: tear down, keep the affiliate published.
    Shutdown,
}

pub struct Node<D: DataPlane, H: HostFacts> {
    setup: NodeSetup,
    link: LinkPlan,
    dp: D,
    host: H,
    cipher: ClusterCipher,
    client: Option<DiscoveryClient>,
    retained: Retained,
    statuses: BTreeMap<String, PeerStatus>,
    addresses: Vec<IpAddr>,
    last_local: Option<AffiliateSpec>,
    applied_peers: Option<Vec<DesiredPeer>>,
    applied_routed: Option<RoutedSet>,
    harvested: Vec<(String, SocketAddr)>,
    endpoint_attempts: BTreeMap<String, u64>,
    view: watch::Sender<NodeView>,
    store_path: PathBuf,
}

impl<D: DataPlane, H: HostFacts> Node<D, H> {
    pub fn new(
        setup: NodeSetup,
        dp: D,
        host: H,
        client: Option<DiscoveryClient>,
    ) -> anyhow::Result<(Self, watch::Receiver<NodeView>)> {
        let s = &setup.settings;
        let cipher = ClusterCipher::new(&s.cluster_key)?;
        let subnet = crate::core::ula::kubespan_subnet(&s.cluster_id);
        let link = LinkPlan {
            interface: s.interface.clone(),
            private_key: setup.keys.private_key.clone(),
            preshared_key: s.cluster_secret.clone(),
            listen_port: s.listen_port,
            fwmark: crate::kubespan::WIREGUARD_FWMARK,
            mtu: s.mtu,
            address: Ipv6Net::new(setup.kubespan_address, subnet.prefix_len())
                .expect("a /64 prefix length is valid"),
        };
        let store_path = store::path(&s.state_dir);
        let mut retained = Retained::new(setup.retain_grace);
        match store::load(&store_path, &cipher, &setup.node_id) {
            Ok(stored) if !stored.is_empty() => {
                tracing::info!(
                    peers = stored.len(),
                    "restored the last known peers from the state directory"
                );
                retained.restore(stored);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "ignoring the stored peer set: {}",
                crate::util::error_chain(&e)
            ),
        }
        let (view, rx) = watch::channel(NodeView {
            node_id: setup.node_id.clone(),
            public_key: setup.keys.public_key.clone(),
            kubespan_address: Some(setup.kubespan_address),
            kubespan_prefix: Some(link.address),
            backend: setup.backend.clone(),
            timing: setup.timing,
            ..Default::default()
        });
        Ok((
            Node {
                setup,
                link,
                dp,
                host,
                cipher,
                client,
                retained,
                statuses: BTreeMap::new(),
                addresses: Vec::new(),
                last_local: None,
                applied_peers: None,
                applied_routed: None,
                harvested: Vec::new(),
                endpoint_attempts: BTreeMap::new(),
                view,
                store_path,
            },
            rx,
        ))
    }

    /// Runs until `stop` fires, then tears the data plane down. `host_events`
    /// yields on any link or address change.
    pub async fn run(
        mut self,
        mut host_events: mpsc::Receiver<()>,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> anyhow::Result<()> {
        self.dp.setup(&self.link).await?;
        self.refresh_addresses().await;
        let mut client_rx = self.client.as_ref().map(|c| c.subscribe());
        let mut host_open = true;
        loop {
            let wake = self.reconcile().await;
            let sleep = wake
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = async { stop.wait_for(|s| s.is_some()).await.map(|_| ()) } => break,
                r = async { client_rx.as_mut().expect("guarded").changed().await }, if client_rx.is_some() => {
                    if r.is_err() {
                        client_rx = None;
                    }
                }
                ev = host_events.recv(), if host_open => {
                    match ev {
                        Some(()) => self.refresh_addresses().await,
                        None => host_open = false,
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        tracing::info!("shutting down: removing the data plane (the affiliate stays published)");
        let result = self.dp.teardown().await;
        if let Some(c) = self.client.take() {
            c.shutdown().await;
        }
        result
    }

    async fn refresh_addresses(&mut self) {
        match self.host.addresses().await {
            Ok(a) => {
                let new = node_addresses(&a);
                if new != self.addresses {
                    tracing::info!(addresses = ?new, "node addresses");
                    self.addresses = new;
                }
            }
            Err(e) => tracing::warn!(
                "cannot read host addresses: {}",
                crate::util::error_chain(&e)
            ),
        }
    }

    /// One reconcile; returns when to run the next one without new input.
    async fn reconcile(&mut self) -> SystemTime {
        let started = std::time::Instant::now();
        let now = SystemTime::now();
        let snapshot = self.client.as_ref().map(|c| c.snapshot());
        self.publish_local(snapshot.as_ref());

        if let Some(snap) = &snapshot {
            let view: Vec<AffiliateSpec> = snap.affiliates.iter().map(|d| d.spec.clone()).collect();
            if self
                .retained
                .update(&view, snap.counters.watch_snapshots, now)
            {
                self.save_store();
            }
        }
        if self.retained.expire(now) {
            self.save_store();
        }
        let raw: BTreeMap<String, AffiliateSpec> = self
            .retained
            .affiliates()
            .map(|a| (format!("service/{}", a.node_id), a.clone()))
            .collect();
        let merged = merge_affiliates(&raw);
        let specs = build_peer_specs(
            &merged,
            &LocalNode {
                node_id: &self.setup.node_id,
                addresses: &self.addresses,
                kubespan_address: Some(self.setup.kubespan_address),
            },
        );
        let mut errors = 0;
        let observed = match self.dp.observe().await {
            Ok(o) => o,
            Err(e) => {
                errors += 1;
                tracing::warn!(
                    "cannot read the WireGuard device: {}",
                    crate::util::error_chain(&e)
                );
                BTreeMap::new()
            }
        };
        let p: Plan = plan(
            &mut self.statuses,
            &specs.specs,
            &observed,
            self.setup.settings.force_routing,
            &self.setup.timing,
            self.setup.polling,
            now,
        );
        for t in &p.transitions {
            match (t.to, t.new_endpoint) {
                (_, Some(e)) => {
                    tracing::info!(peer = %t.label, key = %t.public_key, endpoint = %e, state = t.to.as_str(), "trying endpoint")
                }
                (PeerState::Up, None) => {
                    tracing::info!(peer = %t.label, key = %t.public_key, "peer up")
                }
                (s, None) => {
                    tracing::info!(peer = %t.label, key = %t.public_key, state = s.as_str(), "peer state")
                }
            }
        }
        if self.applied_peers.as_ref() != Some(&p.peers) {
            match self.dp.apply_peers(&self.link, &p.peers).await {
                Ok(()) => self.applied_peers = Some(p.peers.clone()),
                Err(e) => {
                    errors += 1;
                    tracing::warn!(
                        "cannot configure WireGuard peers (retrying): {}",
                        crate::util::error_chain(&e)
                    );
                }
            }
        }
        if self.applied_routed.as_ref() != Some(&p.routed) {
            let applied = match render_ruleset(&p.routed, self.setup.settings.mtu) {
                Ok(script) => self.dp.apply_ruleset(&script).await,
                Err(e) => Err(e.into()),
            };
            match applied {
                Ok(()) => self.applied_routed = Some(p.routed.clone()),
                Err(e) => {
                    errors += 1;
                    tracing::warn!(
                        "cannot apply the nftables ruleset (retrying): {}",
                        crate::util::error_chain(&e)
                    );
                }
            }
        }
        let harvested = if self.setup.settings.harvest_extra_endpoints {
            harvested_endpoints(&specs.specs, &self.statuses)
        } else {
            Vec::new()
        };
        self.publish_harvested(&harvested);
        for t in &p.transitions {
            if t.new_endpoint.is_some() {
                *self
                    .endpoint_attempts
                    .entry(t.public_key.clone())
                    .or_default() += 1;
            }
        }
        self.endpoint_attempts
            .retain(|k, _| specs.specs.contains_key(k));
        let mut wake = p.next_wake;
        if let Some(t) = self.retained.next_expiry() {
            wake = wake.min(t);
        }
        if errors > 0 {
            // Retry failed applies soon, whatever the planner says.
            wake = wake.min(now + Duration::from_secs(2));
        }
        let elapsed = started.elapsed();
        self.view.send_modify(|v| {
            v.local = self.last_local.clone();
            v.raw_affiliates = raw;
            v.affiliates = merged;
            v.harvested = harvested;
            v.endpoint_attempts = self.endpoint_attempts.clone();
            v.last_reconcile = Some(now);
            v.reconcile_seconds += elapsed.as_secs_f64();
            v.last_reconcile_duration = elapsed;
            v.specs = specs.specs;
            v.statuses = self.statuses.clone();
            v.routed = p.routed;
            v.discovery = snapshot;
            v.retained = self.retained.retained_ids().map(str::to_owned).collect();
            v.reconciles += 1;
            v.reconcile_errors += errors;
            v.rotations += p.rotations as u64;
        });
        wake
    }

    fn publish_local(&mut self, snapshot: Option<&ClientSnapshot>) {
        let public_ips: Vec<IpAddr> = snapshot.and_then(|s| s.public_ip).into_iter().collect();
        let local = local_affiliate(
            &self.setup.settings,
            &LocalFacts {
                node_id: &self.setup.node_id,
                public_key: &self.setup.keys.public_key,
                kubespan_address: self.setup.kubespan_address,
                addresses: &self.addresses,
                public_ips: &public_ips,
                hostname: &self.setup.hostname,
                operating_system: &self.setup.operating_system,
            },
        );
        if self.last_local.as_ref() == Some(&local) {
            return;
        }
        if let Some(c) = &self.client {
            match c.set_local(local.clone()) {
                Ok(_) => tracing::info!(
                    endpoints = ?local.kubespan.as_ref().map(|k| &k.endpoints),
                    "publishing this node"
                ),
                Err(e) => tracing::error!("cannot publish this node: {e}"),
            }
        }
        self.last_local = Some(local);
    }

    /// harvestExtraEndpoints: publish the endpoints WireGuard uses for up peers
    /// under those peers' affiliate IDs, as Talos does.
    fn publish_harvested(&mut self, harvested: &[Harvested]) {
        let Some(client) = &self.client else { return };
        let list: Vec<(String, SocketAddr)> = harvested
            .iter()
            .map(|h| (h.affiliate_id.clone(), h.endpoint))
            .collect();
        if list != self.harvested {
            if let Err(e) = client.set_other_endpoints(list.clone()) {
                tracing::warn!("cannot publish harvested endpoints: {e}");
            }
            self.harvested = list;
        }
    }

    fn save_store(&self) {
        if let Err(e) = store::save(&self.store_path, &self.cipher, self.retained.affiliates()) {
            tracing::warn!(
                "cannot save the peer set to the state directory: {}",
                crate::util::error_chain(&e)
            );
        }
    }
}
