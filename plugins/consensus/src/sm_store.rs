//! The state machine as openraft sees it: [`KvState`] behind a lock, the last applied log id
//! and membership, and snapshots.
//!
//! The state machine lives in memory; it is rebuilt at start from the last snapshot (a file,
//! written to a temporary name, fsynced, renamed, directory fsynced) and then by openraft
//! re-applying the committed log after it. A snapshot is durable before `build_snapshot`
//! returns, so openraft may purge the log it covers.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, EntryPayload, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{CmdResult, KvState};
use crate::types::{from_bytes, to_bytes, Entry, LogId, StorageError, TypeConfig};

const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.tmp";

type Meta = SnapshotMeta<u64, BasicNode>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: Meta,
    data: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct SmInner {
    pub(crate) state: KvState,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership<u64, BasicNode>,
}

/// The state machine store (cloned as its snapshot builder).
#[derive(Debug, Clone)]
pub(crate) struct SmStore {
    pub(crate) inner: Arc<RwLock<SmInner>>,
    dir: PathBuf,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// The applied revision, for watchers.
    revision_tx: Arc<watch::Sender<u64>>,
    snapshots_built: Arc<std::sync::atomic::AtomicU64>,
}

fn sm_err(e: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}
fn snap_err(e: impl ToString) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

fn write_file(dir: &Path, snap: &StoredSnapshot) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let bytes = to_bytes(snap)?;
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE)).map_err(|e| format!("rename snapshot: {e}"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))
}

impl SmStore {
    /// Open: load the last snapshot in `dir`, if any.
    pub(crate) fn open(dir: PathBuf, history: usize) -> Result<SmStore, String> {
        let path = dir.join(SNAPSHOT_FILE);
        let (inner, current) = match std::fs::read(&path) {
            Ok(b) => {
                let snap: StoredSnapshot =
                    from_bytes(&b).map_err(|e| format!("{}: {e}", path.display()))?;
                let state =
                    KvState::decode(&snap.data).map_err(|e| format!("{}: {e}", path.display()))?;
                (
                    SmInner {
                        state,
                        last_applied: snap.meta.last_log_id,
                        membership: snap.meta.last_membership.clone(),
                    },
                    Some(snap),
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                SmInner {
                    state: KvState::new(history),
                    last_applied: None,
                    membership: StoredMembership::default(),
                },
                None,
            ),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let (revision_tx, _) = watch::channel(inner.state.revision());
        Ok(SmStore {
            inner: Arc::new(RwLock::new(inner)),
            dir,
            current: Arc::new(Mutex::new(current)),
            revision_tx: Arc::new(revision_tx),
            snapshots_built: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// Read the state.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&SmInner) -> T) -> T {
        f(&self.inner.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Wait for revision changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    fn publish(&self) {
        let rev = self.read(|s| s.state.revision());
        self.revision_tx.send_replace(rev);
    }

    async fn save(&self, snap: StoredSnapshot) -> Result<(), StorageError> {
        let dir = self.dir.clone();
        let s2 = snap.clone();
        tokio::task::spawn_blocking(move || write_file(&dir, &s2))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) =
            self.read(|s| (to_bytes(&s.state), s.last_applied, s.membership.clone()));
        let data = data.map_err(snap_err)?;
        let n = self
            .snapshots_built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
            None => format!("0-0-{n}"),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = SmStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<u64, BasicNode>), StorageError> {
        Ok(self.read(|s| (s.last_applied, s.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CmdResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        {
            let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
            for e in entries {
                g.last_applied = Some(e.log_id);
                out.push(match e.payload {
                    EntryPayload::Blank => CmdResult::None,
                    EntryPayload::Normal(cmd) => g.state.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(e.log_id), m);
                        CmdResult::None
                    }
                });
            }
        }
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state = KvState::decode(&data).map_err(sm_err)?;
        self.save(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        {
            let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
            g.state = state;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
        }
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let cur = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(cur.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use openraft::CommittedLeaderId;

    #[tokio::test]
    async fn snapshot_survives_reopen_and_installs_elsewhere() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut sm = SmStore::open(dir.path().join("a"), 100).expect("open");
        let es: Vec<Entry> = (1..=5)
            .map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                payload: EntryPayload::Normal(Command::Put {
                    key: format!("k{i}"),
                    value: "v".into(),
                    lease: None,
                }),
            })
            .collect();
        let rs = sm.apply(es).await.expect("apply");
        assert_eq!(rs.len(), 5);
        let snap = sm.build_snapshot().await.expect("build");
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(5));
        let mut re = SmStore::open(dir.path().join("a"), 100).expect("reopen");
        let (applied, _) = re.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(5));
        assert_eq!(re.read(|s| s.state.len()), 5);
        // Install on another store.
        let mut other = SmStore::open(dir.path().join("b"), 100).expect("open b");
        let cur = re.get_current_snapshot().await.expect("cur").expect("some");
        other
            .install_snapshot(&cur.meta, cur.snapshot)
            .await
            .expect("install");
        assert_eq!(other.read(|s| s.state.revision()), 5);
        assert!(other.get_current_snapshot().await.expect("cur").is_some());
    }
}
