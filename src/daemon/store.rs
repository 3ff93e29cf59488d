//! The last known peer set, kept in the state directory so a node restarted
//! while the discovery service is unreachable still brings its mesh back.
//!
//! Stored in the wire format: a `WatchResponse` of affiliates sealed with the
//! cluster secret (the same AES-GCM/ECB as on the wire), so the file holds
//! nothing the discovery service could not see, and it is read back through
//! the client's own decoder.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::client::view::WatchView;
use crate::core::cipher::ClusterCipher;
use crate::core::types::AffiliateSpec;
use crate::discovery::snapshot::write_atomic;
use crate::proto::server::{Affiliate, WatchResponse};

pub const PEERS_FILE: &str = "known-peers.binpb";

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(PEERS_FILE)
}

/// Saves `affiliates` (mode 0600, atomically).
pub fn save<'a>(
    path: &Path,
    cipher: &ClusterCipher,
    affiliates: impl Iterator<Item = &'a AffiliateSpec>,
) -> anyhow::Result<()> {
    let mut msg = WatchResponse::default();
    for a in affiliates {
        let endpoints = a
            .kubespan
            .as_ref()
            .map(|k| {
                k.endpoints
                    .iter()
                    .map(|e| cipher.encrypt_endpoint(*e).into())
                    .collect()
            })
            .unwrap_or_default();
        msg.affiliates.push(Affiliate {
            id: a.node_id.clone(),
            data: cipher.encrypt_affiliate(a)?.into(),
            endpoints,
        });
    }
    write_atomic(path, &msg.encode_to_vec())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Loads the stored peer set; a missing file is an empty set, an unreadable one
/// is an error the caller logs (the service will provide the truth anyway).
pub fn load(
    path: &Path,
    cipher: &ClusterCipher,
    local_id: &str,
) -> anyhow::Result<Vec<AffiliateSpec>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    let msg = WatchResponse::decode(bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{} is not a peer store: {e}", path.display()))?;
    let mut view = WatchView::new(local_id);
    view.apply(&msg, true, cipher);
    Ok(view.affiliates().iter().map(|d| d.spec.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::KubeSpanInfo;

    #[test]
    fn round_trip_and_wrong_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let cipher = ClusterCipher::new(&[7; 32]).unwrap();
        let a = AffiliateSpec {
            node_id: "peer".into(),
            hostname: "h".into(),
            kubespan: Some(KubeSpanInfo {
                public_key: "k".into(),
                address: "fd00::1".parse().unwrap(),
                additional_addresses: vec![],
                exclude_advertised_networks: vec![],
                endpoints: vec!["10.0.0.1:51820".parse().unwrap()],
            }),
            ..Default::default()
        };
        let me = AffiliateSpec {
            node_id: "me".into(),
            ..Default::default()
        };
        save(&p, &cipher, [&a, &me].into_iter()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&p, &cipher, "me").unwrap(), vec![a]);
        // Another cluster secret reads nothing (and does not fail).
        let other = ClusterCipher::new(&[8; 32]).unwrap();
        assert!(load(&p, &other, "me").unwrap().is_empty());
        assert!(
            load(&dir.path().join("none"), &cipher, "me")
                .unwrap()
                .is_empty()
        );
    }
}
