//! State snapshots in the upstream storage format (`sidero.discovery.storage`),
//! so a snapshot moves between our server and the upstream one either way.
//!
//! Writes are atomic (temporary file, fsync, rename, fsync of the directory). A
//! snapshot that cannot be read is renamed aside and reported, never silently
//! discarded or overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::time::Instant;

use super::state::{ExportedAffiliate, ExportedCluster, State};
use crate::proto::storage::{AffiliateSnapshot, ClusterSnapshot, EndpointSnapshot, StateSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path} is corrupt ({reason}); moved aside to {moved}")]
    Corrupt {
        path: PathBuf,
        reason: String,
        moved: PathBuf,
    },
}

/// What a save or load handled, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    pub clusters: usize,
    pub affiliates: usize,
    pub endpoints: usize,
    pub bytes: usize,
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    // Upstream truncates the remaining TTL to whole seconds.
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

fn proto_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Remaining lifetime of a snapshot record: `ttl` wins, else the legacy absolute
/// `expiration` relative to `wall_now`; anything negative or missing is zero.
fn remaining(
    ttl: Option<&prost_types::Duration>,
    expiration: Option<&prost_types::Timestamp>,
    wall_now: SystemTime,
) -> Duration {
    if let Some(t) = ttl {
        return Duration::try_from(*t).unwrap_or_default();
    }
    if let Some(e) = expiration {
        let at = UNIX_EPOCH
            + Duration::new(
                e.seconds.max(0) as u64,
                e.nanos.clamp(0, 999_999_999) as u32,
            );
        return at.duration_since(wall_now).unwrap_or_default();
    }
    Duration::ZERO
}

/// Builds the snapshot message from exported state.
pub fn to_snapshot(clusters: &[ExportedCluster], wall_now: SystemTime) -> StateSnapshot {
    StateSnapshot {
        clusters: clusters
            .iter()
            .map(|c| ClusterSnapshot {
                id: c.id.clone(),
                affiliates: c
                    .affiliates
                    .iter()
                    .map(|a| AffiliateSnapshot {
                        id: a.id.clone(),
                        expiration: Some(proto_timestamp(wall_now + a.ttl)),
                        data: a.data.to_vec(),
                        endpoints: a
                            .endpoints
                            .iter()
                            .map(|(data, ttl)| EndpointSnapshot {
                                expiration: Some(proto_timestamp(wall_now + *ttl)),
                                data: data.to_vec(),
                                ttl: Some(proto_duration(*ttl)),
                            })
                            .collect(),
                        ttl: Some(proto_duration(a.ttl)),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Converts a decoded snapshot back into importable state.
pub fn from_snapshot(s: StateSnapshot, wall_now: SystemTime) -> Vec<ExportedCluster> {
    s.clusters
        .into_iter()
        .map(|c| ExportedCluster {
            id: c.id,
            affiliates: c
                .affiliates
                .into_iter()
                .map(|a| ExportedAffiliate {
                    ttl: remaining(a.ttl.as_ref(), a.expiration.as_ref(), wall_now),
                    endpoints: a
                        .endpoints
                        .into_iter()
                        .map(|e| {
                            let ttl = remaining(e.ttl.as_ref(), e.expiration.as_ref(), wall_now);
                            (e.data.into(), ttl)
                        })
                        .collect(),
                    id: a.id,
                    data: a.data.into(),
                })
                .collect(),
        })
        .collect()
}

fn summary(clusters: &[ExportedCluster], bytes: usize) -> SnapshotSummary {
    SnapshotSummary {
        clusters: clusters.len(),
        affiliates: clusters.iter().map(|c| c.affiliates.len()).sum(),
        endpoints: clusters
            .iter()
            .flat_map(|c| &c.affiliates)
            .map(|a| a.endpoints.len())
            .sum(),
        bytes,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Saves the whole state to `path`.
pub fn save(
    state: &State,
    path: &Path,
    now: Instant,
    wall_now: SystemTime,
) -> Result<SnapshotSummary, SnapshotError> {
    let clusters = state.export(now);
    let bytes = to_snapshot(&clusters, wall_now).encode_to_vec();
    write_atomic(path, &bytes)?;
    Ok(summary(&clusters, bytes.len()))
}

/// Loads `path` into `state`. A missing file is an empty start (`Ok(None)`); an
/// unreadable or invalid one is moved aside and reported as `Corrupt`.
pub fn load(
    state: &State,
    path: &Path,
    now: Instant,
    wall_now: SystemTime,
) -> Result<Option<SnapshotSummary>, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let decoded = StateSnapshot::decode(bytes.as_slice())
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let clusters = from_snapshot(s, wall_now);
            let sum = summary(&clusters, bytes.len());
            state.import(clusters, now).map(|()| sum)
        });
    match decoded {
        Ok(sum) => Ok(Some(sum)),
        Err(reason) => {
            let stamp = wall_now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let mut moved = path.as_os_str().to_owned();
            moved.push(format!(".corrupt-{stamp}"));
            let moved = PathBuf::from(moved);
            std::fs::rename(path, &moved).map_err(io_err(path))?;
            Err(SnapshotError::Corrupt {
                path: path.to_owned(),
                reason,
                moved,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::state::{Limits, Update};
    use bytes::Bytes;

    fn fill(s: &State, clusters: usize, now: Instant) {
        for c in 0..clusters {
            for a in 0..3 {
                s.update(
                    &format!("cluster-{c}"),
                    Update {
                        affiliate_id: format!("aff-{a}"),
                        data: Some(Bytes::from(vec![a as u8; 100])),
                        endpoints: vec![Bytes::from(vec![c as u8; 16]), Bytes::from(vec![7; 32])],
                        ttl: Duration::from_secs(600 + a as u64),
                    },
                    now,
                )
                .unwrap();
            }
        }
    }

    #[test]
    fn save_load_round_trips_0_2_and_100_clusters() {
        for n in [0, 2, 100] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.binpb");
            let s = State::new(Limits::default());
            let now = Instant::now();
            let wall = SystemTime::now();
            fill(&s, n, now);
            let saved = save(&s, &path, now, wall).unwrap();
            assert_eq!(saved.clusters, n);
            assert_eq!(saved.affiliates, 3 * n);
            let s2 = State::new(Limits::default());
            let loaded = load(&s2, &path, now, wall).unwrap().unwrap();
            assert_eq!(loaded, saved);
            assert_eq!(s2.export(now), s.export(now));
            assert!(!dir.path().join("state.binpb.tmp").exists());
        }
    }

    #[test]
    fn legacy_absolute_expiration_becomes_remaining_ttl() {
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let snap = StateSnapshot {
            clusters: vec![ClusterSnapshot {
                id: "c".into(),
                affiliates: vec![AffiliateSnapshot {
                    id: "a".into(),
                    expiration: Some(proto_timestamp(wall + Duration::from_secs(90))),
                    data: b"d".to_vec(),
                    endpoints: vec![EndpointSnapshot {
                        expiration: Some(proto_timestamp(wall - Duration::from_secs(5))),
                        data: b"e".to_vec(),
                        ttl: None,
                    }],
                    ttl: None,
                }],
            }],
        };
        let c = from_snapshot(snap, wall);
        assert_eq!(c[0].affiliates[0].ttl, Duration::from_secs(90));
        assert_eq!(c[0].affiliates[0].endpoints[0].1, Duration::ZERO);
    }

    #[test]
    fn corrupt_snapshot_is_moved_aside_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.binpb");
        std::fs::write(&path, b"\xff\xff\xff not a protobuf").unwrap();
        let s = State::new(Limits::default());
        let err = load(&s, &path, Instant::now(), SystemTime::now()).unwrap_err();
        let SnapshotError::Corrupt { moved, .. } = &err else {
            panic!("unexpected {err}");
        };
        assert!(moved.exists());
        assert!(!path.exists());
        assert!(err.to_string().contains("moved aside"));
        // A missing file is simply an empty start.
        assert_eq!(
            load(&s, &path, Instant::now(), SystemTime::now()).unwrap(),
            None
        );
    }

    #[test]
    fn import_accepts_a_full_cluster_and_rejects_one_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.binpb");
        let limits = Limits::default();
        let mk = |n: usize| {
            vec![ExportedCluster {
                id: "c".into(),
                affiliates: (0..n)
                    .map(|i| ExportedAffiliate {
                        id: format!("a{i}"),
                        data: Bytes::from_static(b"d"),
                        ttl: Duration::from_secs(60),
                        endpoints: vec![],
                    })
                    .collect(),
            }]
        };
        let wall = SystemTime::now();
        let full = to_snapshot(&mk(limits.max_affiliates), wall).encode_to_vec();
        write_atomic(&path, &full).unwrap();
        let s = State::new(limits.clone());
        assert!(load(&s, &path, Instant::now(), wall).unwrap().is_some());
        let over = to_snapshot(&mk(limits.max_affiliates + 1), wall).encode_to_vec();
        write_atomic(&path, &over).unwrap();
        let err = load(&State::new(limits), &path, Instant::now(), wall).unwrap_err();
        assert!(err.to_string().contains("more than the limit"), "{err}");
    }
}
