//! One node's share of the data ("Data Node" in the seed): the newest version of each key in
//! memory, every change appended to the node's write-ahead log and fsynced before it is
//! acknowledged, hints for unreachable replicas kept the same way, and periodic snapshots
//! that let the log be truncated (compaction). On start the snapshot is loaded and the log
//! replayed after it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use dsys_runtime::storage::{write_atomically, SyncPolicy, Wal, WalConfig};
use serde::{Deserialize, Serialize};

use crate::version::Version;

/// WAL record kind used by the store (the payload says which change it is).
const KIND: u8 = 1;

#[derive(Debug, Serialize, Deserialize)]
enum LogRec {
    Apply(Vec<(String, Version)>),
    Hints(Vec<(u64, Hint)>),
    HintsDone(Vec<u64>),
    /// Keys handed to their owners: dropped when the stored version still has this digest.
    Forget(Vec<(String, u64)>),
}

/// A version kept for a replica that did not answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Hint {
    pub(crate) target: String,
    pub(crate) key: String,
    pub(crate) version: Version,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    lsn: u64,
    data: Vec<(String, Version)>,
    hints: Vec<(u64, Hint)>,
    next_hint: u64,
}

/// Errors of the local store.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("wal: {0}")]
    Wal(String),
    #[error("snapshot {path}: {msg}")]
    Snapshot { path: PathBuf, msg: String },
}

pub(crate) struct Store {
    data: RwLock<BTreeMap<String, Version>>,
    hints: Mutex<BTreeMap<u64, Hint>>,
    next_hint: AtomicU64,
    wal: Wal,
    /// Appends hold it shared; a snapshot holds it exclusively while it copies the state, so
    /// every record up to the snapshot's LSN is in the copy.
    gate: tokio::sync::RwLock<()>,
    dir: PathBuf,
    since_snapshot: AtomicU64,
    pub(crate) snapshots: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.dir.display())
    }
}

fn wal_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Wal(e.to_string())
}

impl Store {
    /// Open (or create) the store in `dir`: load the snapshot, replay the log after it.
    pub(crate) async fn open(dir: &Path) -> Result<Store, StoreError> {
        let snap_path = dir.join("snapshot.bin");
        let snap: Snapshot = match tokio::fs::read(&snap_path).await {
            Ok(buf) => dsys_runtime::decode(&buf).map_err(|e| StoreError::Snapshot {
                path: snap_path.clone(),
                msg: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => {
                return Err(StoreError::Snapshot {
                    path: snap_path,
                    msg: e.to_string(),
                })
            }
        };
        let (wal, recovery) = Wal::open(WalConfig {
            sync: SyncPolicy::Batch,
            ..WalConfig::new(dir.join("wal"))
        })
        .await
        .map_err(wal_err)?;
        tracing::info!(
            ?recovery,
            snapshot_lsn = snap.lsn,
            keys = snap.data.len(),
            "kv store opened"
        );
        let mut data: BTreeMap<String, Version> = snap.data.into_iter().collect();
        let mut hints: BTreeMap<u64, Hint> = snap.hints.into_iter().collect();
        let mut next_hint = snap.next_hint;
        for rec in wal.read_from(snap.lsn + 1).map_err(wal_err)? {
            let rec = rec.map_err(wal_err)?;
            if rec.kind != KIND {
                continue;
            }
            match dsys_runtime::decode::<LogRec>(&rec.payload) {
                Ok(LogRec::Apply(items)) => {
                    for (k, v) in items {
                        merge(&mut data, k, v);
                    }
                }
                Ok(LogRec::Hints(hs)) => {
                    for (id, h) in hs {
                        next_hint = next_hint.max(id + 1);
                        hints.insert(id, h);
                    }
                }
                Ok(LogRec::HintsDone(ids)) => {
                    for id in ids {
                        hints.remove(&id);
                    }
                }
                Ok(LogRec::Forget(keys)) => forget(&mut data, keys),
                Err(e) => {
                    return Err(StoreError::Wal(format!(
                        "record {} does not decode: {e}",
                        rec.lsn
                    )))
                }
            }
        }
        Ok(Store {
            data: RwLock::new(data),
            hints: Mutex::new(hints),
            next_hint: AtomicU64::new(next_hint),
            wal,
            gate: tokio::sync::RwLock::new(()),
            dir: dir.to_path_buf(),
            since_snapshot: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
        })
    }

    async fn log(&self, rec: &LogRec) -> Result<(), StoreError> {
        let payload = dsys_runtime::encode(rec).map_err(wal_err)?;
        self.wal.append(KIND, payload).await.map_err(wal_err)?;
        self.since_snapshot.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Store the versions that are newer than ours, durably; returns how many were newer.
    pub(crate) async fn apply(&self, items: Vec<(String, Version)>) -> Result<usize, StoreError> {
        let _g = self.gate.read().await;
        let fresh: Vec<(String, Version)> = {
            let d = self.data.read().unwrap_or_else(|p| p.into_inner());
            items
                .into_iter()
                .filter(|(k, v)| d.get(k).map(|cur| v.newer_than(cur)).unwrap_or(true))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(0);
        }
        // Durable first (the WAL rule), visible second.
        self.log(&LogRec::Apply(fresh.clone())).await?;
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        Ok(fresh
            .into_iter()
            .filter(|(k, v)| merge(&mut d, k.clone(), v.clone()))
            .count())
    }

    /// Drop keys this node no longer owns, durably, unless another version arrived since
    /// they were handed over (`keys` carries the digest of the version handed over).
    pub(crate) async fn forget(&self, keys: Vec<(String, u64)>) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let _g = self.gate.read().await;
        self.log(&LogRec::Forget(keys.clone())).await?;
        forget(
            &mut self.data.write().unwrap_or_else(|p| p.into_inner()),
            keys,
        );
        Ok(())
    }

    pub(crate) fn get(&self, key: &str) -> Option<Version> {
        self.data
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Up to `limit` versions (tombstones included) of keys starting with `prefix`.
    pub(crate) fn scan(&self, prefix: &str, limit: usize) -> Vec<(String, Version)> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        d.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every (key, version) for which `pred(key)` holds.
    pub(crate) fn select(&self, mut pred: impl FnMut(&str) -> bool) -> Vec<(String, Version)> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        d.iter()
            .filter(|(k, _)| pred(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// (live keys, tombstones).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let tomb = d.values().filter(|v| v.value.is_none()).count() as u64;
        (d.len() as u64 - tomb, tomb)
    }

    pub(crate) async fn add_hints(
        &self,
        target: &str,
        items: Vec<(String, Version)>,
    ) -> Result<(), StoreError> {
        let _g = self.gate.read().await;
        let hs: Vec<(u64, Hint)> = items
            .into_iter()
            .map(|(key, version)| {
                (
                    self.next_hint.fetch_add(1, Ordering::Relaxed),
                    Hint {
                        target: target.to_string(),
                        key,
                        version,
                    },
                )
            })
            .collect();
        self.log(&LogRec::Hints(hs.clone())).await?;
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(hs);
        Ok(())
    }

    /// Waiting hints grouped by target.
    pub(crate) fn hints_by_target(&self) -> BTreeMap<String, Vec<(u64, String, Version)>> {
        let mut out: BTreeMap<String, Vec<(u64, String, Version)>> = BTreeMap::new();
        for (id, h) in self.hints.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.entry(h.target.clone())
                .or_default()
                .push((*id, h.key.clone(), h.version.clone()));
        }
        out
    }

    /// Number of waiting hints per target.
    pub(crate) fn hint_counts(&self) -> BTreeMap<String, usize> {
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for h in self
            .hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            *out.entry(h.target.clone()).or_default() += 1;
        }
        out
    }

    pub(crate) fn hint_count(&self) -> u64 {
        self.hints.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    pub(crate) async fn hints_done(&self, ids: Vec<u64>) -> Result<(), StoreError> {
        let _g = self.gate.read().await;
        self.log(&LogRec::HintsDone(ids.clone())).await?;
        let mut h = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            h.remove(&id);
        }
        Ok(())
    }

    pub(crate) fn wal_lsn(&self) -> u64 {
        self.wal.stats().last_lsn
    }

    /// Records appended since the last snapshot.
    pub(crate) fn since_snapshot(&self) -> u64 {
        self.since_snapshot.load(Ordering::Relaxed)
    }

    /// Write a snapshot (dropping tombstones older than `tombstone_before_ms`), then truncate
    /// the log before it. The snapshot is written to a temporary file, fsynced and renamed,
    /// so a crash leaves either the old or the new one.
    pub(crate) async fn snapshot(&self, tombstone_before_ms: u64) -> Result<(), StoreError> {
        let snap = {
            let _g = self.gate.write().await;
            let lsn = self.wal.stats().last_lsn;
            let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
            d.retain(|_, v| v.value.is_some() || v.ts.ms >= tombstone_before_ms);
            self.since_snapshot.store(0, Ordering::Relaxed);
            Snapshot {
                lsn,
                data: d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                hints: self
                    .hints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(i, h)| (*i, h.clone()))
                    .collect(),
                next_hint: self.next_hint.load(Ordering::Relaxed),
            }
        };
        let lsn = snap.lsn;
        let bytes = dsys_runtime::encode(&snap).map_err(wal_err)?;
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || write_atomically(&dir.join("snapshot.bin"), &bytes))
            .await
            .map_err(wal_err)?
            .map_err(|e| StoreError::Snapshot {
                path: self.dir.join("snapshot.bin"),
                msg: e.to_string(),
            })?;
        self.wal.checkpoint(lsn + 1).await.map_err(wal_err)?;
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn forget(d: &mut BTreeMap<String, Version>, keys: Vec<(String, u64)>) {
    for (k, digest) in keys {
        if d.get(&k).is_some_and(|v| v.digest() == digest) {
            d.remove(&k);
        }
    }
}

/// Insert `v` unless the current version is newer; true when inserted.
fn merge(d: &mut BTreeMap<String, Version>, k: String, v: Version) -> bool {
    match d.get(&k) {
        Some(cur) if !v.newer_than(cur) => false,
        _ => {
            d.insert(k, v);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Hlc;

    fn v(ms: u64, val: Option<&str>) -> Version {
        Version {
            ts: Hlc { ms, logical: 0 },
            origin: "n1".into(),
            value: val.map(|s| s.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn survives_reopen_through_wal_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).await.unwrap();
            assert_eq!(
                s.apply(vec![
                    ("a".into(), v(10, Some("1"))),
                    ("b".into(), v(10, Some("2")))
                ])
                .await
                .unwrap(),
                2
            );
            // Older versions are not applied; newer ones are.
            assert_eq!(
                s.apply(vec![("a".into(), v(5, Some("old")))])
                    .await
                    .unwrap(),
                0
            );
            s.apply(vec![
                ("gone".into(), v(20, None)),
                ("old-tomb".into(), v(1, None)),
            ])
            .await
            .unwrap();
            s.add_hints("n3", vec![("h".into(), v(30, Some("x")))])
                .await
                .unwrap();
            // Snapshot drops tombstones older than 15 and truncates the log behind it.
            s.snapshot(15).await.unwrap();
            s.apply(vec![("a".into(), v(40, Some("3")))]).await.unwrap();
            let ids: Vec<u64> = s.hints_by_target()["n3"].iter().map(|h| h.0).collect();
            s.add_hints("n4", vec![("i".into(), v(50, Some("y")))])
                .await
                .unwrap();
            s.hints_done(ids).await.unwrap();
        }
        let s = Store::open(dir.path()).await.unwrap();
        assert_eq!(s.get("a").unwrap().value.as_deref(), Some(&b"3"[..]));
        assert_eq!(s.get("b").unwrap().value.as_deref(), Some(&b"2"[..]));
        assert!(
            s.get("gone").unwrap().value.is_none(),
            "recent tombstone kept"
        );
        assert!(
            s.get("old-tomb").is_none(),
            "old tombstone dropped by the snapshot"
        );
        let hints = s.hints_by_target();
        assert!(!hints.contains_key("n3"), "delivered hints stay delivered");
        assert_eq!(hints["n4"].len(), 1);
        assert_eq!(s.counts(), (2, 1));
        assert_eq!(s.scan("", 10).len(), 3);
    }
}
