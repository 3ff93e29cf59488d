//! What this client publishes: its own affiliate (encrypted once per change),
//! harvested endpoints of other affiliates, or a pending deletion.

use std::net::SocketAddr;

use bytes::Bytes;

use super::ClientError;
use crate::core::cipher::ClusterCipher;
use crate::core::types::AffiliateSpec;

/// Server limits (discovery-service v1.1.0): larger submissions are rejected and
/// the whole AffiliateUpdate fails, so we refuse them up front.
pub const MAX_DATA_LEN: usize = 2048;
pub const MAX_ENDPOINTS: usize = 64;
pub const MAX_ID_LEN: usize = 256;

/// One publish round, taken under the lock and sent without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No local data yet: nothing to send.
    Nothing,
    Update {
        data: Bytes,
        endpoints: Vec<Bytes>,
        /// Harvested endpoints, one AffiliateUpdate each, under the peer's ID.
        others: Vec<(String, Bytes)>,
    },
    Delete,
}

#[derive(Debug, Default)]
pub struct LocalState {
    spec: Option<AffiliateSpec>,
    data: Option<Bytes>,
    endpoints: Vec<Bytes>,
    others: Vec<(String, SocketAddr)>,
    other_blobs: Vec<(String, Bytes)>,
    deleted: bool,
    /// Bumped on every change; the client reports the last generation the
    /// server acknowledged so callers can wait for it.
    generation: u64,
}

impl LocalState {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Stores new local data. Returns `false` (and keeps the cached blob, so
    /// nothing is re-sent) when it equals the current data: re-encrypting would
    /// draw a new nonce, and every watcher would receive an update for nothing,
    /// including ourselves, which is how feedback loops start.
    pub fn set_local(
        &mut self,
        cipher: &ClusterCipher,
        spec: AffiliateSpec,
    ) -> Result<bool, ClientError> {
        if self.spec.as_ref() == Some(&spec) {
            return Ok(false);
        }
        let endpoints: &[SocketAddr] = spec
            .kubespan
            .as_ref()
            .map(|k| k.endpoints.as_slice())
            .unwrap_or_default();
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(ClientError::TooManyEndpoints(endpoints.len()));
        }
        let data = cipher.encrypt_affiliate(&spec)?;
        if data.len() > MAX_DATA_LEN {
            return Err(ClientError::DataTooLarge(data.len()));
        }
        self.endpoints = endpoints
            .iter()
            .map(|e| Bytes::from(cipher.encrypt_endpoint(*e)))
            .collect();
        self.data = Some(data.into());
        self.spec = Some(spec);
        self.deleted = false;
        self.generation += 1;
        Ok(true)
    }

    /// Replaces the harvested endpoints. Returns `false` when unchanged.
    pub fn set_others(
        &mut self,
        cipher: &ClusterCipher,
        others: Vec<(String, SocketAddr)>,
    ) -> Result<bool, ClientError> {
        if let Some((id, _)) = others
            .iter()
            .find(|(id, _)| id.is_empty() || id.len() > MAX_ID_LEN)
        {
            return Err(ClientError::AffiliateId(id.len()));
        }
        if self.others == others {
            return Ok(false);
        }
        // ECB is deterministic: equal endpoints give equal bytes, so nothing is
        // gained by caching per entry.
        self.other_blobs = others
            .iter()
            .map(|(id, e)| (id.clone(), Bytes::from(cipher.encrypt_endpoint(*e))))
            .collect();
        self.others = others;
        // Only worth a publish round while we have something to publish.
        if self.data.is_some() {
            self.generation += 1;
        }
        Ok(true)
    }

    /// Drops the local data and schedules an AffiliateDelete. Harvested
    /// endpoints are kept but not sent until local data is set again (the Go
    /// client never sends them without its own affiliate).
    pub fn delete(&mut self) {
        self.spec = None;
        self.data = None;
        self.endpoints.clear();
        self.deleted = true;
        self.generation += 1;
    }

    pub fn plan(&self) -> Plan {
        if self.deleted {
            return Plan::Delete;
        }
        match &self.data {
            None => Plan::Nothing,
            Some(data) => Plan::Update {
                data: data.clone(),
                endpoints: self.endpoints.clone(),
                others: self.other_blobs.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::KubeSpanInfo;

    fn cipher() -> ClusterCipher {
        ClusterCipher::new(&[1u8; 32]).unwrap()
    }

    fn spec(eps: &[&str]) -> AffiliateSpec {
        AffiliateSpec {
            node_id: "me".into(),
            hostname: "me.example".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "k".into(),
                address: "fd00::1".parse().unwrap(),
                additional_addresses: vec![],
                exclude_advertised_networks: vec![],
                endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
            }),
            ..Default::default()
        }
    }

    fn update(plan: Plan) -> (Bytes, Vec<Bytes>, Vec<(String, Bytes)>) {
        match plan {
            Plan::Update {
                data,
                endpoints,
                others,
            } => (data, endpoints, others),
            p => panic!("expected an update, got {p:?}"),
        }
    }

    #[test]
    fn encrypts_once_per_change() {
        let c = cipher();
        let mut l = LocalState::default();
        assert_eq!(l.plan(), Plan::Nothing);
        assert!(l.set_local(&c, spec(&["10.0.0.1:51820"])).unwrap());
        assert_eq!(l.generation(), 1);
        let (data, eps, others) = update(l.plan());
        assert_eq!(c.decrypt_affiliate(&data).unwrap(), {
            let mut s = spec(&[]);
            s.kubespan.as_mut().unwrap().endpoints.clear();
            s
        });
        assert_eq!(
            eps,
            [Bytes::from(
                c.encrypt_endpoint("10.0.0.1:51820".parse().unwrap())
            )]
        );
        assert!(others.is_empty());

        // Equal data: same cached bytes, no new generation.
        assert!(!l.set_local(&c, spec(&["10.0.0.1:51820"])).unwrap());
        assert_eq!(l.generation(), 1);
        assert_eq!(update(l.plan()).0, data, "identical cached blob");

        // A change draws a new nonce.
        assert!(l.set_local(&c, spec(&["10.0.0.2:51820"])).unwrap());
        assert_eq!(l.generation(), 2);
        let (data2, _, _) = update(l.plan());
        assert_ne!(data2[..12], data[..12]);
    }

    #[test]
    fn others_ride_along_with_local_data() {
        let c = cipher();
        let mut l = LocalState::default();
        let peer = vec![("peer".to_string(), "1.1.1.1:343".parse().unwrap())];
        assert!(l.set_others(&c, peer.clone()).unwrap());
        assert_eq!(l.generation(), 0, "nothing to publish without local data");
        assert_eq!(l.plan(), Plan::Nothing);
        assert!(!l.set_others(&c, peer.clone()).unwrap());
        l.set_local(&c, spec(&[])).unwrap();
        let (_, _, others) = update(l.plan());
        assert_eq!(
            others,
            [(
                "peer".to_string(),
                Bytes::from(c.encrypt_endpoint("1.1.1.1:343".parse().unwrap()))
            )]
        );
        let g = l.generation();
        assert!(l.set_others(&c, vec![]).unwrap());
        assert_eq!(l.generation(), g + 1);
        assert!(update(l.plan()).2.is_empty());
        assert!(matches!(
            l.set_others(&c, vec![(String::new(), "1.1.1.1:1".parse().unwrap())]),
            Err(ClientError::AffiliateId(0))
        ));
    }

    #[test]
    fn delete_then_set_again() {
        let c = cipher();
        let mut l = LocalState::default();
        l.set_local(&c, spec(&[])).unwrap();
        l.delete();
        assert_eq!(l.plan(), Plan::Delete);
        assert_eq!(l.generation(), 2);
        // The same data as before the delete is a change now.
        assert!(l.set_local(&c, spec(&[])).unwrap());
        assert!(matches!(l.plan(), Plan::Update { .. }));
    }

    #[test]
    fn refuses_what_the_server_would_reject() {
        let c = cipher();
        let mut l = LocalState::default();
        let many: Vec<String> = (0..65).map(|i| format!("10.0.0.{i}:1")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            l.set_local(&c, spec(&many)),
            Err(ClientError::TooManyEndpoints(65))
        ));
        let mut big = spec(&[]);
        big.hostname = "h".repeat(2100);
        assert!(matches!(
            l.set_local(&c, big),
            Err(ClientError::DataTooLarge(n)) if n > 2048
        ));
        assert_eq!(l.generation(), 0);
        assert_eq!(l.plan(), Plan::Nothing);
    }
}
