//! The discovery service state: clusters of affiliates with TTLs, and Watch
//! subscriptions.
//!
//! No clock reads: every operation takes `now`. Semantics follow
//! siderolabs/discovery-service v1.1.0 (spec `discovery-protocol.md` §4), with two
//! deliberate improvements that no client can tell apart from upstream except by
//! receiving fewer useless messages:
//! * a data refresh with identical bytes is not a change and notifies no watcher;
//! * when GC expires only some endpoints of a live affiliate, watchers receive the
//!   updated affiliate instead of a false deletion.
//!
//! Locking: the cluster map's lock is held (shared) for the whole of every cluster
//! operation, and GC takes it exclusively to drop empty clusters. So GC can never
//! drop a cluster between another call finding it and using it (the race of
//! upstream issue discovery-service#21).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::proto::server::{Affiliate, WatchResponse};

/// Server limits; the defaults are the upstream compile-time constants.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_cluster_id_len: usize,
    pub max_affiliate_id_len: usize,
    pub max_affiliate_data: usize,
    pub max_endpoint_size: usize,
    pub max_ttl: Duration,
    pub max_affiliates: usize,
    pub max_endpoints: usize,
    /// Notifications a watcher may fall behind before it is cut off.
    pub watch_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_cluster_id_len: 256,
            max_affiliate_id_len: 256,
            max_affiliate_data: 2048,
            max_endpoint_size: 32,
            max_ttl: Duration::from_secs(30 * 60),
            max_affiliates: 1024,
            max_endpoints: 64,
            watch_buffer: 32,
        }
    }
}

/// Why a request was refused; maps onto a gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// `InvalidArgument`.
    #[error("{0}")]
    Invalid(&'static str),
    /// `ResourceExhausted`.
    #[error("{0}")]
    Exhausted(&'static str),
}

/// One AffiliateUpdate, already decoded.
#[derive(Debug, Clone, Default)]
pub struct Update {
    pub affiliate_id: String,
    /// `None` or empty: the stored data is left as it is.
    pub data: Option<Bytes>,
    pub endpoints: Vec<Bytes>,
    pub ttl: Duration,
}

#[derive(Debug)]
struct Endpoint {
    data: Bytes,
    expiration: Instant,
}

#[derive(Debug)]
struct AffiliateEntry {
    data: Bytes,
    expiration: Instant,
    endpoints: Vec<Endpoint>,
}

impl AffiliateEntry {
    fn to_proto(&self, id: &str) -> Affiliate {
        Affiliate {
            id: id.to_owned(),
            data: self.data.clone(),
            endpoints: self.endpoints.iter().map(|e| e.data.clone()).collect(),
        }
    }
}

struct Subscriber {
    id: u64,
    tx: mpsc::Sender<WatchResponse>,
    lost: Arc<AtomicBool>,
}

#[derive(Default)]
struct Cluster {
    affiliates: HashMap<String, AffiliateEntry>,
    subscribers: Vec<Subscriber>,
}

impl Cluster {
    /// Queues `msg` for every watcher; a watcher whose buffer is full is cut off
    /// (its stream then ends with `Aborted`) so it cannot slow the others down.
    fn notify(&mut self, msg: WatchResponse) {
        self.subscribers
            .retain(|s| match s.tx.try_send(msg.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    s.lost.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    fn notify_update(&mut self, id: &str) {
        if self.subscribers.is_empty() {
            return;
        }
        if let Some(entry) = self.affiliates.get(id) {
            let msg = WatchResponse {
                affiliates: vec![entry.to_proto(id)],
                deleted: false,
            };
            self.notify(msg);
        }
    }

    fn notify_delete(&mut self, id: &str) {
        if self.subscribers.is_empty() {
            return;
        }
        let msg = WatchResponse {
            affiliates: vec![Affiliate {
                id: id.to_owned(),
                ..Default::default()
            }],
            deleted: true,
        };
        self.notify(msg);
    }
}

/// Counts of what the state holds, for metrics and `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
    pub subscriptions: usize,
}

/// What one GC pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
}

/// The whole service state. Cheap to share: wrap it in an `Arc`.
pub struct State {
    clusters: RwLock<HashMap<String, Arc<Mutex<Cluster>>>>,
    limits: Limits,
    next_subscriber: AtomicU64,
}

/// A live Watch subscription. Dropping it unsubscribes.
pub struct Subscription {
    pub snapshot: Vec<Affiliate>,
    pub rx: mpsc::Receiver<WatchResponse>,
    lost: Arc<AtomicBool>,
    cluster: Arc<Mutex<Cluster>>,
    id: u64,
}

impl Subscription {
    /// True when the server cut this watcher off because it fell behind.
    pub fn lost_update(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut cluster = lock(&self.cluster);
        cluster.subscribers.retain(|s| s.id != self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a cluster lock leaves consistent data (every mutation
    // is a single map/vec operation), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Validates a cluster ID the way every RPC does.
pub fn validate_cluster_id(limits: &Limits, id: &str) -> Result<(), StateError> {
    if id.is_empty() {
        return Err(StateError::Invalid("cluster ID can't be empty"));
    }
    if id.len() > limits.max_cluster_id_len {
        return Err(StateError::Invalid("cluster ID is too long"));
    }
    Ok(())
}

/// Validates an affiliate ID (AffiliateUpdate, AffiliateDelete).
pub fn validate_affiliate_id(limits: &Limits, id: &str) -> Result<(), StateError> {
    if id.is_empty() {
        return Err(StateError::Invalid("affiliate ID can't be empty"));
    }
    if id.len() > limits.max_affiliate_id_len {
        return Err(StateError::Invalid("affiliate ID is too long"));
    }
    Ok(())
}

impl State {
    pub fn new(limits: Limits) -> Self {
        State {
            clusters: RwLock::new(HashMap::new()),
            limits,
            next_subscriber: AtomicU64::new(1),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `f` on the cluster, creating it if needed, with the map lock held so
    /// GC cannot remove the cluster meanwhile.
    fn with_cluster<R>(&self, id: &str, f: impl FnOnce(&Arc<Mutex<Cluster>>) -> R) -> R {
        {
            let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = map.get(id) {
                return f(c);
            }
        }
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        let c = map.entry(id.to_owned()).or_default();
        f(c)
    }

    /// AffiliateUpdate. Input validation (IDs, sizes, TTL) comes first; then the
    /// state limits. As upstream, exceeding the endpoint limit still applies the
    /// data and the endpoints up to the limit before reporting the error, so a
    /// node whose record was stuffed with junk endpoints keeps its data fresh.
    pub fn update(&self, cluster_id: &str, u: Update, now: Instant) -> Result<(), StateError> {
        let l = &self.limits;
        validate_cluster_id(l, cluster_id)?;
        validate_affiliate_id(l, &u.affiliate_id)?;
        if u.data
            .as_ref()
            .is_some_and(|d| d.len() > l.max_affiliate_data)
        {
            return Err(StateError::Invalid("affiliate data is too big"));
        }
        if u.endpoints.iter().any(|e| e.len() > l.max_endpoint_size) {
            return Err(StateError::Invalid("affiliate endpoint is too big"));
        }
        if u.ttl > l.max_ttl {
            return Err(StateError::Invalid("ttl is too large"));
        }
        let exp = now + u.ttl;
        self.with_cluster(cluster_id, |c| {
            let mut cluster = lock(c);
            let mut changed = false;
            if !cluster.affiliates.contains_key(&u.affiliate_id) {
                if cluster.affiliates.len() >= l.max_affiliates {
                    return Err(StateError::Exhausted("too many affiliates in the cluster"));
                }
                cluster.affiliates.insert(
                    u.affiliate_id.clone(),
                    AffiliateEntry {
                        data: Bytes::new(),
                        expiration: exp,
                        endpoints: Vec::new(),
                    },
                );
                changed = true;
            }
            let entry = cluster
                .affiliates
                .get_mut(&u.affiliate_id)
                .expect("inserted above");
            if let Some(data) = u.data.filter(|d| !d.is_empty()) {
                // Upstream sets (not raises) the expiration on a data update.
                entry.expiration = exp;
                if entry.data != data {
                    // A decoded `Bytes` is a view into the whole receive buffer:
                    // keep a compact copy so stored data pins nothing else.
                    entry.data = Bytes::copy_from_slice(&data);
                    changed = true;
                }
            }
            let mut result = Ok(());
            for ep in u.endpoints {
                if let Some(existing) = entry.endpoints.iter_mut().find(|e| e.data == ep) {
                    existing.expiration = existing.expiration.max(exp);
                    continue;
                }
                if entry.endpoints.len() >= l.max_endpoints {
                    result = Err(StateError::Exhausted("too many endpoints in the affiliate"));
                    break;
                }
                entry.endpoints.push(Endpoint {
                    data: Bytes::copy_from_slice(&ep),
                    expiration: exp,
                });
                changed = true;
            }
            entry.expiration = entry.expiration.max(exp);
            if changed {
                cluster.notify_update(&u.affiliate_id);
            }
            result
        })
    }

    /// AffiliateDelete; deleting a missing affiliate succeeds.
    pub fn delete(&self, cluster_id: &str, affiliate_id: &str) -> Result<(), StateError> {
        validate_cluster_id(&self.limits, cluster_id)?;
        validate_affiliate_id(&self.limits, affiliate_id)?;
        self.with_cluster(cluster_id, |c| {
            let mut cluster = lock(c);
            if cluster.affiliates.remove(affiliate_id).is_some() {
                cluster.notify_delete(affiliate_id);
            }
        });
        Ok(())
    }

    /// List: every affiliate of the cluster, in no particular order.
    pub fn list(&self, cluster_id: &str) -> Result<Vec<Affiliate>, StateError> {
        validate_cluster_id(&self.limits, cluster_id)?;
        Ok(self.with_cluster(cluster_id, |c| {
            let cluster = lock(c);
            cluster
                .affiliates
                .iter()
                .map(|(id, e)| e.to_proto(id))
                .collect()
        }))
    }

    /// Watch: the snapshot and the subscription are taken under one lock, so no
    /// change falls between them.
    pub fn subscribe(&self, cluster_id: &str) -> Result<Subscription, StateError> {
        validate_cluster_id(&self.limits, cluster_id)?;
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.limits.watch_buffer.max(1));
        let lost = Arc::new(AtomicBool::new(false));
        Ok(self.with_cluster(cluster_id, |c| {
            let mut cluster = lock(c);
            let snapshot = cluster
                .affiliates
                .iter()
                .map(|(id, e)| e.to_proto(id))
                .collect();
            cluster.subscribers.push(Subscriber {
                id,
                tx,
                lost: lost.clone(),
            });
            Subscription {
                snapshot,
                rx,
                lost,
                cluster: c.clone(),
                id,
            }
        }))
    }

    /// One GC pass: drops expired affiliates and endpoints, then clusters that
    /// hold neither affiliates nor watchers.
    pub fn gc(&self, now: Instant) -> GcReport {
        let mut report = GcReport::default();
        let mut map = self.clusters.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, c| {
            let mut cluster = lock(c);
            let mut expired = Vec::new();
            let mut trimmed = Vec::new();
            for (id, entry) in cluster.affiliates.iter_mut() {
                if entry.expiration < now {
                    expired.push(id.clone());
                    continue;
                }
                let before = entry.endpoints.len();
                entry.endpoints.retain(|e| e.expiration > now);
                if entry.endpoints.len() != before {
                    report.endpoints += before - entry.endpoints.len();
                    trimmed.push(id.clone());
                }
            }
            for id in &expired {
                cluster.affiliates.remove(id);
                cluster.notify_delete(id);
            }
            for id in &trimmed {
                cluster.notify_update(id);
            }
            report.affiliates += expired.len();
            let keep = !cluster.affiliates.is_empty() || !cluster.subscribers.is_empty();
            if !keep {
                report.clusters += 1;
            }
            keep
        });
        report
    }

    /// Counts for metrics.
    pub fn stats(&self) -> Stats {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let mut s = Stats {
            clusters: map.len(),
            ..Default::default()
        };
        for c in map.values() {
            let cluster = lock(c);
            s.affiliates += cluster.affiliates.len();
            s.endpoints += cluster
                .affiliates
                .values()
                .map(|a| a.endpoints.len())
                .sum::<usize>();
            s.subscriptions += cluster.subscribers.len();
        }
        s
    }

    /// Ends every Watch stream cleanly (status OK): used on shutdown.
    pub fn close_subscriptions(&self) {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        for c in map.values() {
            lock(c).subscribers.clear();
        }
    }

    /// Everything the state holds with remaining lifetimes, for snapshots.
    pub fn export(&self, now: Instant) -> Vec<ExportedCluster> {
        let map = self.clusters.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<ExportedCluster> = map
            .iter()
            .filter_map(|(id, c)| {
                let cluster = lock(c);
                if cluster.affiliates.is_empty() {
                    return None;
                }
                let mut affiliates: Vec<ExportedAffiliate> = cluster
                    .affiliates
                    .iter()
                    .map(|(aid, e)| ExportedAffiliate {
                        id: aid.clone(),
                        data: e.data.clone(),
                        ttl: e.expiration.saturating_duration_since(now),
                        endpoints: e
                            .endpoints
                            .iter()
                            .map(|ep| {
                                (
                                    ep.data.clone(),
                                    ep.expiration.saturating_duration_since(now),
                                )
                            })
                            .collect(),
                    })
                    .collect();
                affiliates.sort_by(|a, b| a.id.cmp(&b.id));
                Some(ExportedCluster {
                    id: id.clone(),
                    affiliates,
                })
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Loads exported clusters (from a snapshot) with lifetimes counted from
    /// `now`. The state limits apply: a cluster over them is an error naming it.
    pub fn import(&self, clusters: Vec<ExportedCluster>, now: Instant) -> Result<(), String> {
        let l = &self.limits;
        for c in clusters {
            validate_cluster_id(l, &c.id).map_err(|e| format!("cluster {:?}: {e}", c.id))?;
            if c.affiliates.len() > l.max_affiliates {
                return Err(format!(
                    "cluster {:?}: {} affiliates, more than the limit of {}",
                    c.id,
                    c.affiliates.len(),
                    l.max_affiliates
                ));
            }
            for a in &c.affiliates {
                validate_affiliate_id(l, &a.id)
                    .map_err(|e| format!("cluster {:?} affiliate {:?}: {e}", c.id, a.id))?;
                if a.endpoints.len() > l.max_endpoints {
                    return Err(format!(
                        "cluster {:?} affiliate {:?}: {} endpoints, more than the limit of {}",
                        c.id,
                        a.id,
                        a.endpoints.len(),
                        l.max_endpoints
                    ));
                }
            }
            self.with_cluster(&c.id, |cl| {
                let mut cluster = lock(cl);
                for a in c.affiliates {
                    let entry = AffiliateEntry {
                        data: a.data,
                        expiration: now + a.ttl,
                        endpoints: a
                            .endpoints
                            .into_iter()
                            .map(|(data, ttl)| Endpoint {
                                data,
                                expiration: now + ttl,
                            })
                            .collect(),
                    };
                    cluster.affiliates.insert(a.id, entry);
                }
            });
        }
        Ok(())
    }
}

/// A cluster as exported for (and imported from) a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedCluster {
    pub id: String,
    pub affiliates: Vec<ExportedAffiliate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedAffiliate {
    pub id: String,
    pub data: Bytes,
    /// Remaining lifetime.
    pub ttl: Duration,
    /// Endpoint bytes with their remaining lifetimes, in order.
    pub endpoints: Vec<(Bytes, Duration)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(id: &str, data: Option<&[u8]>, eps: &[&[u8]], ttl: u64) -> Update {
        Update {
            affiliate_id: id.into(),
            data: data.map(Bytes::copy_from_slice),
            endpoints: eps.iter().map(|e| Bytes::copy_from_slice(e)).collect(),
            ttl: Duration::from_secs(ttl),
        }
    }

    fn eps(a: &Affiliate) -> Vec<&[u8]> {
        a.endpoints.iter().map(|e| e.as_ref()).collect()
    }

    #[test]
    fn update_merges_endpoints_in_order_without_duplicates() {
        let s = State::new(Limits::default());
        let now = Instant::now();
        s.update("c", upd("a", Some(b"d1"), &[b"e1", b"e2"], 60), now)
            .unwrap();
        s.update("c", upd("a", None, &[b"e3", b"e2"], 60), now)
            .unwrap();
        let l = s.list("c").unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].data.as_ref(), b"d1");
        assert_eq!(eps(&l[0]), vec![&b"e1"[..], b"e2", b"e3"]);
    }

    #[tokio::test]
    async fn identical_refresh_does_not_notify_but_changes_do() {
        let s = State::new(Limits::default());
        let now = Instant::now();
        s.update("c", upd("a", Some(b"d1"), &[b"e1"], 60), now)
            .unwrap();
        let mut sub = s.subscribe("c").unwrap();
        assert_eq!(sub.snapshot.len(), 1);
        s.update("c", upd("a", Some(b"d1"), &[b"e1"], 60), now)
            .unwrap();
        assert!(sub.rx.try_recv().is_err(), "identical refresh notified");
        s.update("c", upd("a", Some(b"d2"), &[], 60), now).unwrap();
        let m = sub.rx.try_recv().unwrap();
        assert!(!m.deleted);
        assert_eq!(m.affiliates[0].data.as_ref(), b"d2");
        assert_eq!(eps(&m.affiliates[0]), vec![&b"e1"[..]]);
    }

    #[test]
    fn limits_and_validation() {
        let s = State::new(Limits::default());
        let now = Instant::now();
        let long = "x".repeat(257);
        let inv = |r: Result<(), StateError>| matches!(r, Err(StateError::Invalid(_)));
        assert!(inv(s.update("", upd("a", None, &[], 1), now)));
        assert!(inv(s.update(&long, upd("a", None, &[], 1), now)));
        assert!(inv(s.update("c", upd(&long, None, &[], 1), now)));
        assert!(inv(s.update("c", upd("", None, &[], 1), now)));
        assert!(inv(s.update("c", upd("a", Some(&[0; 2049]), &[], 1), now)));
        assert!(inv(s.update("c", upd("a", None, &[&[0; 33]], 1), now)));
        assert!(inv(s.update("c", upd("a", None, &[], 1801), now)));
        s.update("c", upd("a", Some(&[0; 2048]), &[&[0; 32]], 1800), now)
            .unwrap();
        for i in 1..1024 {
            s.update("c", upd(&format!("a{i}"), None, &[], 60), now)
                .unwrap();
        }
        assert_eq!(
            s.update("c", upd("one-too-many", None, &[], 60), now),
            Err(StateError::Exhausted("too many affiliates in the cluster"))
        );
        // An existing affiliate can still be updated at the limit.
        s.update("c", upd("a1", Some(b"x"), &[], 60), now).unwrap();
    }

    #[test]
    fn endpoint_limit_applies_data_and_endpoints_up_to_the_limit() {
        let s = State::new(Limits::default());
        let now = Instant::now();
        let many: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i]).collect();
        let refs: Vec<&[u8]> = many.iter().map(|v| v.as_slice()).collect();
        s.update("c", upd("a", Some(b"d"), &refs, 60), now).unwrap();
        let r = s.update("c", upd("a", Some(b"d2"), &[b"new1"], 60), now);
        assert_eq!(
            r,
            Err(StateError::Exhausted("too many endpoints in the affiliate"))
        );
        let l = s.list("c").unwrap();
        assert_eq!(l[0].data.as_ref(), b"d2", "data update still applied");
        assert_eq!(l[0].endpoints.len(), 64);
    }

    #[tokio::test]
    async fn gc_expires_affiliates_then_endpoints_and_empty_clusters() {
        let s = State::new(Limits::default());
        let t0 = Instant::now();
        s.update("c", upd("a", Some(b"d"), &[b"e1"], 100), t0)
            .unwrap();
        // A later endpoint-only update extends the affiliate, not the old endpoint.
        s.update("c", upd("a", None, &[b"e2"], 200), t0).unwrap();
        s.update("c", upd("b", Some(b"d"), &[], 10), t0).unwrap();
        s.update("empty", upd("x", None, &[], 0), t0).unwrap();
        let mut sub = s.subscribe("c").unwrap();

        let r = s.gc(t0 + Duration::from_secs(50));
        assert_eq!(r.affiliates, 2, "b and the zero-TTL x");
        assert_eq!(r.clusters, 1);
        let m = sub.rx.try_recv().unwrap();
        assert!(m.deleted);
        assert_eq!(m.affiliates[0].id, "b");
        assert!(m.affiliates[0].data.is_empty());

        let r = s.gc(t0 + Duration::from_secs(150));
        assert_eq!(r.affiliates, 0);
        assert_eq!(r.endpoints, 1);
        let m = sub.rx.try_recv().unwrap();
        assert!(!m.deleted, "endpoint expiry sends the updated affiliate");
        assert_eq!(eps(&m.affiliates[0]), vec![&b"e2"[..]]);

        s.gc(t0 + Duration::from_secs(250));
        assert!(s.list("c").unwrap().is_empty());
        // The cluster has a watcher, so it survives GC even when empty.
        let r = s.gc(t0 + Duration::from_secs(260));
        assert_eq!(r.clusters, 0);
        drop(sub);
        assert_eq!(s.gc(t0 + Duration::from_secs(270)).clusters, 1);
        assert_eq!(s.stats(), Stats::default());
    }

    #[tokio::test]
    async fn slow_watcher_is_cut_off_others_get_everything() {
        let s = State::new(Limits {
            watch_buffer: 1,
            ..Limits::default()
        });
        let now = Instant::now();
        let mut slow = s.subscribe("c").unwrap();
        let mut fast = s.subscribe("c").unwrap();
        let mut got = Vec::new();
        for i in 0..4 {
            s.update("c", upd(&format!("a{i}"), Some(b"d"), &[], 60), now)
                .unwrap();
            got.push(fast.rx.try_recv().unwrap().affiliates[0].id.clone());
        }
        assert_eq!(got, ["a0", "a1", "a2", "a3"]);
        assert!(slow.lost_update());
        assert!(!fast.lost_update());
        // The slow one got what fit, then its channel closed.
        assert_eq!(slow.rx.recv().await.unwrap().affiliates[0].id, "a0");
        assert!(slow.rx.recv().await.is_none());
        assert_eq!(s.stats().subscriptions, 1);
    }

    #[test]
    fn export_import_round_trip_keeps_remaining_ttls() {
        let s = State::new(Limits::default());
        let t0 = Instant::now();
        s.update("c1", upd("a", Some(b"d"), &[b"e1"], 100), t0)
            .unwrap();
        s.update("c1", upd("a", None, &[b"e2"], 300), t0).unwrap();
        s.update("c2", upd("b", Some(b"x"), &[], 50), t0).unwrap();
        let t1 = t0 + Duration::from_secs(20);
        let exported = s.export(t1);
        assert_eq!(exported.len(), 2);
        assert_eq!(exported[0].affiliates[0].ttl, Duration::from_secs(280));
        assert_eq!(
            exported[0].affiliates[0].endpoints,
            vec![
                (Bytes::from_static(b"e1"), Duration::from_secs(80)),
                (Bytes::from_static(b"e2"), Duration::from_secs(280)),
            ]
        );
        let s2 = State::new(Limits::default());
        let t2 = t1 + Duration::from_secs(1000);
        s2.import(exported.clone(), t2).unwrap();
        assert_eq!(s2.export(t2), exported);
    }
}
