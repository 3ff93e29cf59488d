//! Which discovered affiliates the daemon acts on. Pure.
//!
//! The discovery client's view is the truth while its Watch stream lives: an
//! affiliate that disappears there was deleted (`kubespan leave`, Talos reset)
//! or expired, and is dropped at once. But an affiliate that is merely absent
//! from a *new snapshot* (after a reconnect) may be absent because the service
//! restarted without its state: live nodes republish within seconds of
//! reconnecting, so such an affiliate is kept for a grace period instead of
//! tearing down a working tunnel. The same holds for affiliates restored from
//! the state directory at start-up while the service is unreachable.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::core::types::AffiliateSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    spec: AffiliateSpec,
    /// When it stopped being in the client's view without a deletion.
    missing_since: Option<SystemTime>,
}

#[derive(Debug, Clone, Default)]
pub struct Retained {
    entries: BTreeMap<String, Entry>,
    /// The client's snapshot count at the last update.
    snapshots: Option<u64>,
    grace: Duration,
}

impl Retained {
    pub fn new(grace: Duration) -> Self {
        Retained {
            grace,
            ..Default::default()
        }
    }

    /// Seeds from the state directory: kept until the service confirms them or
    /// the grace period passes after the first snapshot.
    pub fn restore(&mut self, stored: Vec<AffiliateSpec>) {
        for spec in stored {
            self.entries.insert(
                spec.node_id.clone(),
                Entry {
                    spec,
                    missing_since: None,
                },
            );
        }
    }

    /// Applies the client's current view. `snapshots` is how many Watch
    /// snapshots the client has received; 0 means it has not seen the service
    /// yet, and the view says nothing. Returns true when the effective set
    /// changed.
    pub fn update(&mut self, view: &[AffiliateSpec], snapshots: u64, now: SystemTime) -> bool {
        if snapshots == 0 {
            return false;
        }
        let new_snapshot = self.snapshots != Some(snapshots);
        self.snapshots = Some(snapshots);
        let before: Vec<AffiliateSpec> = self.affiliates().cloned().collect();
        let present: BTreeMap<&str, &AffiliateSpec> =
            view.iter().map(|a| (a.node_id.as_str(), a)).collect();
        self.entries.retain(|id, e| {
            if present.contains_key(id.as_str()) {
                return true;
            }
            if !new_snapshot && e.missing_since.is_none() {
                // Gone from a live stream: deleted or expired on the service.
                return false;
            }
            e.missing_since.get_or_insert(now);
            true
        });
        for (id, spec) in present {
            self.entries.insert(
                id.to_owned(),
                Entry {
                    spec: spec.clone(),
                    missing_since: None,
                },
            );
        }
        self.expire(now);
        !self.affiliates().eq(before.iter())
    }

    /// Drops retained entries whose grace period is over; true if any went.
    pub fn expire(&mut self, now: SystemTime) -> bool {
        let grace = self.grace;
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            e.missing_since
                .is_none_or(|t| now.duration_since(t).unwrap_or_default() < grace)
        });
        before != self.entries.len()
    }

    /// When the next retained entry runs out of grace.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.entries
            .values()
            .filter_map(|e| e.missing_since.map(|t| t + self.grace))
            .min()
    }

    pub fn affiliates(&self) -> impl Iterator<Item = &AffiliateSpec> {
        self.entries.values().map(|e| &e.spec)
    }

    /// Node IDs kept only because of the grace period.
    pub fn retained_ids(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.missing_since.is_some())
            .map(|(id, _)| id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(id: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: id.into(),
            ..Default::default()
        }
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn ids(r: &Retained) -> Vec<&str> {
        r.affiliates().map(|a| a.node_id.as_str()).collect()
    }

    #[test]
    fn live_deletion_drops_at_once() {
        let mut r = Retained::new(Duration::from_secs(300));
        assert!(r.update(&[a("x"), a("y")], 1, t(0)));
        assert!(r.update(&[a("x")], 1, t(1)));
        assert_eq!(ids(&r), ["x"]);
    }

    #[test]
    fn absence_from_a_new_snapshot_is_retained_for_the_grace_period() {
        let mut r = Retained::new(Duration::from_secs(300));
        r.update(&[a("x"), a("y")], 1, t(0));
        // Service restarted empty: the new snapshot has nobody.
        assert!(!r.update(&[], 2, t(10)), "effective set unchanged");
        assert_eq!(ids(&r), ["x", "y"]);
        assert_eq!(r.retained_ids().count(), 2);
        assert_eq!(r.next_expiry(), Some(t(310)));
        // x republishes; y never does.
        r.update(&[a("x")], 2, t(20));
        assert_eq!(r.retained_ids().collect::<Vec<_>>(), ["y"]);
        assert!(r.expire(t(311)));
        assert_eq!(ids(&r), ["x"]);
    }

    #[test]
    fn deletion_after_a_restart_and_republish_drops_at_once() {
        let mut r = Retained::new(Duration::from_secs(300));
        r.update(&[a("b"), a("c")], 1, t(0));
        r.update(&[], 2, t(1));
        r.update(&[a("b")], 2, t(2));
        r.update(&[a("b"), a("c")], 2, t(3));
        assert!(r.update(&[a("b")], 2, t(4)));
        assert_eq!(ids(&r), ["b"]);
    }

    #[test]
    fn restored_entries_wait_for_the_service() {
        let mut r = Retained::new(Duration::from_secs(300));
        r.restore(vec![a("x"), a("y")]);
        assert!(!r.update(&[], 0, t(0)), "no snapshot yet: nothing known");
        assert_eq!(ids(&r), ["x", "y"]);
        r.update(&[a("y")], 1, t(5));
        assert_eq!(ids(&r), ["x", "y"]);
        assert!(r.expire(t(306)));
        assert_eq!(ids(&r), ["y"]);
    }
}
