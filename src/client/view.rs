//! The set of discovered affiliates, built from Watch messages (spec §1 "Watch
//! semantics", §5 "Watch processing"). Pure: the caller supplies the messages and
//! the decryption.

use std::net::SocketAddr;

use crate::core::cipher::{CipherError, ClusterCipher};
use crate::core::types::AffiliateSpec;
use crate::proto::server::WatchResponse;

/// One affiliate seen through the discovery service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredAffiliate {
    /// The affiliate ID the service stores it under (the node ID for Talos).
    pub id: String,
    /// Decrypted data. When it carries KubeSpan, `kubespan.endpoints` holds the
    /// decoded endpoints in server order; without KubeSpan they are dropped, as
    /// Talos only uses discovered endpoints for KubeSpan peers.
    pub spec: AffiliateSpec,
}

/// Opens the encrypted parts of an affiliate.
pub trait Decrypt {
    fn affiliate(&self, data: &[u8]) -> Result<AffiliateSpec, CipherError>;
    fn endpoint(&self, blob: &[u8]) -> Result<SocketAddr, CipherError>;
}

impl Decrypt for ClusterCipher {
    fn affiliate(&self, data: &[u8]) -> Result<AffiliateSpec, CipherError> {
        self.decrypt_affiliate(data)
    }

    fn endpoint(&self, blob: &[u8]) -> Result<SocketAddr, CipherError> {
        self.decrypt_endpoint(blob)
    }
}

/// What one message did to the view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The set of affiliates or their content changed.
    pub changed: bool,
    /// Affiliates skipped because their data did not authenticate (another
    /// cluster secret, or tampering).
    pub skipped_decrypt: u64,
    /// Affiliates whose data authenticated but did not decode.
    pub skipped_decode: u64,
    /// Endpoints dropped because they did not decrypt or decode.
    pub endpoints_dropped: u64,
}

/// Discovered affiliates keyed by ID, kept in server order.
#[derive(Debug, Clone, Default)]
pub struct WatchView {
    local_id: String,
    // A Vec keeps server order; at most 1024 affiliates per cluster makes the
    // linear lookups cheap.
    entries: Vec<DiscoveredAffiliate>,
}

impl WatchView {
    /// `local_id` is this client's own affiliate ID: the server echoes our own
    /// updates, and we are not our own peer.
    pub fn new(local_id: impl Into<String>) -> Self {
        WatchView {
            local_id: local_id.into(),
            entries: Vec::new(),
        }
    }

    pub fn affiliates(&self) -> &[DiscoveredAffiliate] {
        &self.entries
    }

    pub fn get(&self, id: &str) -> Option<&DiscoveredAffiliate> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Applies one Watch message. `snapshot` is true for the first message of a
    /// stream, which replaces everything.
    pub fn apply(&mut self, msg: &WatchResponse, snapshot: bool, dec: &impl Decrypt) -> Applied {
        let mut out = Applied::default();
        let before = snapshot.then(|| std::mem::take(&mut self.entries));

        for affiliate in &msg.affiliates {
            if affiliate.id == self.local_id {
                continue;
            }
            if msg.deleted {
                if let Some(i) = self.position(&affiliate.id) {
                    self.entries.remove(i);
                    out.changed = true;
                }
                continue;
            }
            // Created by endpoint-only updates, no data yet: nothing to show. On an
            // incremental update a previous entry stays as it was.
            if affiliate.data.is_empty() {
                continue;
            }
            let mut spec = match dec.affiliate(&affiliate.data) {
                Ok(spec) => spec,
                Err(err) => {
                    if matches!(err, CipherError::Payload(_)) {
                        out.skipped_decode += 1;
                        tracing::warn!(affiliate_id = %affiliate.id, error = %err, "affiliate data does not decode; skipping it");
                    } else {
                        out.skipped_decrypt += 1;
                        tracing::warn!(affiliate_id = %affiliate.id, error = %err, "decryption failure; skipping affiliate");
                    }
                    continue;
                }
            };
            let mut endpoints = Vec::with_capacity(affiliate.endpoints.len());
            for blob in &affiliate.endpoints {
                match dec.endpoint(blob) {
                    Ok(addr) => endpoints.push(addr),
                    Err(err) => {
                        out.endpoints_dropped += 1;
                        tracing::warn!(affiliate_id = %affiliate.id, error = %err, "dropping undecodable endpoint");
                    }
                }
            }
            if let Some(ks) = spec.kubespan.as_mut() {
                ks.endpoints = endpoints;
            }
            let entry = DiscoveredAffiliate {
                id: affiliate.id.clone(),
                spec,
            };
            match self.position(&entry.id) {
                Some(i) if self.entries[i] == entry => {}
                Some(i) => {
                    self.entries[i] = entry;
                    out.changed = true;
                }
                None => {
                    self.entries.push(entry);
                    out.changed = true;
                }
            }
        }

        if let Some(before) = before {
            out.changed = before != self.entries;
        }
        out
    }

    /// Forgets everything (the client shut down or discovery was disabled).
    pub fn clear(&mut self) -> bool {
        let changed = !self.entries.is_empty();
        self.entries.clear();
        changed
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::KubeSpanInfo;
    use crate::proto::server::Affiliate;
    use bytes::Bytes;

    fn cipher() -> ClusterCipher {
        ClusterCipher::new(&[42u8; 32]).unwrap()
    }

    fn spec(id: &str, endpoints: &[&str]) -> AffiliateSpec {
        AffiliateSpec {
            node_id: id.into(),
            hostname: format!("{id}.example"),
            nodename: id.into(),
            machine_type: "worker".into(),
            operating_system: "kubespan".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyMDA=".into(),
                address: "fd00::1".parse().unwrap(),
                additional_addresses: vec![],
                exclude_advertised_networks: vec![],
                endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
            }),
            ..Default::default()
        }
    }

    /// What the server would send for an affiliate published by `s`.
    fn wire(c: &ClusterCipher, s: &AffiliateSpec) -> Affiliate {
        Affiliate {
            id: s.node_id.clone(),
            data: c.encrypt_affiliate(s).unwrap().into(),
            endpoints: s
                .kubespan
                .iter()
                .flat_map(|k| &k.endpoints)
                .map(|e| Bytes::from(c.encrypt_endpoint(*e)))
                .collect(),
        }
    }

    fn msg(affiliates: Vec<Affiliate>) -> WatchResponse {
        WatchResponse {
            affiliates,
            deleted: false,
        }
    }

    fn deleted(id: &str) -> WatchResponse {
        WatchResponse {
            affiliates: vec![Affiliate {
                id: id.into(),
                ..Default::default()
            }],
            deleted: true,
        }
    }

    fn ids(v: &WatchView) -> Vec<&str> {
        v.affiliates().iter().map(|a| a.id.as_str()).collect()
    }

    #[test]
    fn snapshot_replaces_and_keeps_server_order() {
        let c = cipher();
        let mut v = WatchView::new("me");
        let (a, b, me) = (
            spec("a", &["10.0.0.1:51820"]),
            spec("b", &[]),
            spec("me", &[]),
        );
        let r = v.apply(
            &msg(vec![wire(&c, &b), wire(&c, &me), wire(&c, &a)]),
            true,
            &c,
        );
        assert_eq!(
            r,
            Applied {
                changed: true,
                ..Default::default()
            }
        );
        assert_eq!(ids(&v), ["b", "a"], "own ID skipped, server order kept");
        assert_eq!(v.get("a").unwrap().spec, a, "full data and endpoints");

        // The same content again (a refresh re-encrypted with a new nonce) is no change.
        let r = v.apply(&msg(vec![wire(&c, &b), wire(&c, &a)]), true, &c);
        assert!(!r.changed);
        // A new snapshot drops what it does not list.
        let r = v.apply(&msg(vec![wire(&c, &a)]), true, &c);
        assert!(r.changed);
        assert_eq!(ids(&v), ["a"]);
        // An empty snapshot empties the view.
        assert!(v.apply(&msg(vec![]), true, &c).changed);
        assert!(v.affiliates().is_empty());
        assert!(!v.apply(&msg(vec![]), true, &c).changed);
    }

    #[test]
    fn incremental_upsert_and_delete() {
        let c = cipher();
        let mut v = WatchView::new("me");
        v.apply(&msg(vec![wire(&c, &spec("a", &[]))]), true, &c);
        assert!(
            v.apply(&msg(vec![wire(&c, &spec("b", &[]))]), false, &c)
                .changed
        );
        assert_eq!(ids(&v), ["a", "b"]);
        // Update in place keeps the position.
        let a2 = spec("a", &["192.0.2.1:51820", "[2001:db8::1]:51820"]);
        assert!(v.apply(&msg(vec![wire(&c, &a2)]), false, &c).changed);
        assert_eq!(ids(&v), ["a", "b"]);
        assert_eq!(v.get("a").unwrap().spec, a2);
        // Unchanged content: no change.
        assert!(!v.apply(&msg(vec![wire(&c, &a2)]), false, &c).changed);
        // Deletion.
        assert!(v.apply(&deleted("a"), false, &c).changed);
        assert_eq!(ids(&v), ["b"]);
        assert!(!v.apply(&deleted("a"), false, &c).changed, "unknown ID");
        // Our own echo is ignored in every form.
        assert!(
            !v.apply(&msg(vec![wire(&c, &spec("me", &[]))]), false, &c)
                .changed
        );
        assert!(!v.apply(&deleted("me"), false, &c).changed);
        assert_eq!(ids(&v), ["b"]);
    }

    #[test]
    fn empty_data_is_skipped_but_keeps_a_previous_entry() {
        let c = cipher();
        let mut v = WatchView::new("me");
        let a = spec("a", &[]);
        v.apply(&msg(vec![wire(&c, &a)]), true, &c);
        let dataless = Affiliate {
            id: "a".into(),
            data: Bytes::new(),
            endpoints: vec![c.encrypt_endpoint("1.1.1.1:343".parse().unwrap()).into()],
        };
        let r = v.apply(&msg(vec![dataless.clone()]), false, &c);
        assert_eq!(r, Applied::default());
        assert_eq!(v.get("a").unwrap().spec, a);
        // ... but a data-less affiliate does not appear on its own, and a snapshot
        // holding only its data-less form removes it.
        let r = v.apply(&msg(vec![dataless]), true, &c);
        assert!(r.changed);
        assert!(v.affiliates().is_empty());
    }

    #[test]
    fn undecryptable_affiliate_is_skipped_alone_and_counted() {
        let c = cipher();
        let other = ClusterCipher::new(&[7u8; 32]).unwrap();
        let mut v = WatchView::new("me");
        let a = spec("a", &[]);
        let foreign = wire(&other, &spec("x", &["10.9.9.9:1"]));
        let junk = Affiliate {
            id: "junk".into(),
            data: Bytes::from_static(&[1, 2, 3]),
            endpoints: vec![],
        };
        let r = v.apply(&msg(vec![foreign.clone(), wire(&c, &a), junk]), true, &c);
        assert_eq!(
            r,
            Applied {
                changed: true,
                skipped_decrypt: 2,
                ..Default::default()
            }
        );
        assert_eq!(ids(&v), ["a"]);

        // On an incremental update, a bad update keeps the previous good entry.
        let mut bad_a = wire(&other, &spec("a", &["10.0.0.9:1"]));
        bad_a.id = "a".into();
        let r = v.apply(&msg(vec![bad_a.clone()]), false, &c);
        assert_eq!(r.skipped_decrypt, 1);
        assert!(!r.changed);
        assert_eq!(v.get("a").unwrap().spec, a);
        // After a snapshot it is absent.
        let r = v.apply(&msg(vec![bad_a]), true, &c);
        assert_eq!(r.skipped_decrypt, 1);
        assert!(r.changed);
        assert!(v.affiliates().is_empty());
    }

    #[test]
    fn undecodable_affiliate_is_counted_separately() {
        let c = cipher();
        let mut v = WatchView::new("me");
        v.apply(&msg(vec![wire(&c, &spec("a", &[]))]), true, &c);
        // Authenticates, but is not an Affiliate message (field 1 as a varint).
        let garbage = Affiliate {
            id: "a".into(),
            data: c.seal(&[0x08, 0x01]).unwrap().into(),
            endpoints: vec![],
        };
        let r = v.apply(&msg(vec![garbage]), false, &c);
        assert_eq!(
            r,
            Applied {
                skipped_decode: 1,
                ..Default::default()
            }
        );
        assert_eq!(ids(&v), ["a"], "previous good entry kept");
    }

    #[test]
    fn bad_endpoints_are_dropped_one_by_one() {
        let c = cipher();
        let mut v = WatchView::new("me");
        let a = spec("a", &["10.0.0.1:51820", "[2001:db8::2]:51820"]);
        let mut w = wire(&c, &a);
        // Wrong size, a foreign key's endpoint and plain zeros around the good ones.
        let other = ClusterCipher::new(&[7u8; 32]).unwrap();
        w.endpoints.insert(0, Bytes::from_static(&[0u8; 17]));
        w.endpoints.insert(
            2,
            Bytes::from(other.encrypt_endpoint("10.6.6.6:6".parse().unwrap())),
        );
        w.endpoints.push(Bytes::new());
        let foreign_ok = c
            .decrypt_endpoint(&other.encrypt_endpoint("10.6.6.6:6".parse().unwrap()))
            .is_ok();
        let r = v.apply(&msg(vec![w]), true, &c);
        assert!(r.changed);
        // ECB has no integrity: a foreign blob is only caught when its plaintext
        // does not parse, which holds for this key pair.
        assert!(!foreign_ok);
        assert_eq!(r.endpoints_dropped, 3);
        assert_eq!(r.skipped_decrypt + r.skipped_decode, 0);
        assert_eq!(v.get("a").unwrap().spec, a, "good endpoints kept in order");
    }

    #[test]
    fn endpoints_without_kubespan_are_not_kept() {
        let c = cipher();
        let mut v = WatchView::new("me");
        let mut s = spec("a", &[]);
        s.kubespan = None;
        let mut w = wire(&c, &s);
        w.endpoints = vec![c.encrypt_endpoint("10.0.0.1:1".parse().unwrap()).into()];
        v.apply(&msg(vec![w]), true, &c);
        assert_eq!(v.get("a").unwrap().spec, s);
    }

    #[test]
    fn clear() {
        let c = cipher();
        let mut v = WatchView::new("me");
        assert!(!v.clear());
        v.apply(&msg(vec![wire(&c, &spec("a", &[]))]), true, &c);
        assert!(v.clear());
        assert!(v.affiliates().is_empty());
    }
}
