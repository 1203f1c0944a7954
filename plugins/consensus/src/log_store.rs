//! The Raft log and vote, on the runtime's write-ahead log.
//!
//! The WAL is append-only, so the Raft log is kept as a sequence of WAL records that are
//! replayed at open: `ENTRY` (one log entry), `VOTE`, `COMMITTED`, `TRUNCATE` (drop entries
//! from an index on), `PURGE` (drop entries up to a log id) and `BASE` (a fresh start: vote,
//! committed and purged pointers, followed by `ENTRY` records for every live entry). Entries
//! are also kept in memory for the readers.
//!
//! Durability: appended entries are acknowledged to openraft (the `LogFlushed` callback)
//! only after the WAL has fsynced them; `save_vote` and `truncate` return only once their
//! record is fsynced. Callbacks run in append order from one task.
//!
//! Compaction: when openraft purges (after a snapshot is durable) and the WAL holds many
//! more records than live entries, the live log is rewritten after a `BASE` record and the
//! WAL is checkpointed at that record, which deletes the older segments. Replay starts at
//! the checkpoint.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use dsys_runtime::storage::{Wal, WalConfig, WalError};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::types::{from_bytes, to_bytes, Entry, LogId, StorageError, TypeConfig, Vote};

const REC_ENTRY: u8 = 1;
const REC_VOTE: u8 = 2;
const REC_COMMITTED: u8 = 3;
const REC_TRUNCATE: u8 = 4;
const REC_PURGE: u8 = 5;
const REC_BASE: u8 = 6;

/// Rewrite the log once the WAL holds this many records beyond twice the live entries.
const REWRITE_SLACK: u64 = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Base {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
}

fn wlog(e: impl ToString) -> StorageError {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}
fn wvote(e: impl ToString) -> StorageError {
    StorageIOError::write_vote(AnyError::error(e.to_string())).into()
}

#[derive(Debug)]
struct LogInner {
    wal: Wal,
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    /// WAL records since the last BASE (or since the start).
    records: u64,
}

impl LogInner {
    fn enqueue<T: Serialize>(&mut self, kind: u8, v: &T) -> Result<u64, String> {
        let b = to_bytes(v)?;
        let lsn = self.wal.enqueue(kind, b).map_err(|e| e.to_string())?;
        self.records += 1;
        Ok(lsn)
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(self.last_purged)
    }
}

/// The log store (and, cloned, its reader).
#[derive(Debug, Clone)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogInner>>,
    /// Flush acknowledgements, in order: (LSN to wait for, callback).
    flush_tx: mpsc::UnboundedSender<(u64, LogFlushed<TypeConfig>)>,
}

/// What replay found, for the status page and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecovery {
    /// WAL records replayed.
    pub records: u64,
    /// Entries in the log after replay.
    pub entries: u64,
    /// Last log index after replay.
    pub last_index: Option<u64>,
    /// Whether a vote was found.
    pub vote: bool,
}

impl LogStore {
    /// Open the log in `dir`, replaying the WAL.
    pub(crate) async fn open(dir: std::path::PathBuf) -> Result<(LogStore, LogRecovery), String> {
        let mut cfg = WalConfig::new(dir);
        // Entries are at most ~2 MiB (validated at the edge); small segments let
        // checkpoints release space soon after a purge.
        cfg.max_record_bytes = 4 << 20;
        cfg.segment_bytes = 8 << 20;
        let (wal, rec) = Wal::open(cfg).await.map_err(|e| e.to_string())?;
        let w = wal.clone();
        let start = rec.checkpoint_lsn;
        let mut inner = tokio::task::spawn_blocking(move || replay(w, start))
            .await
            .map_err(|e| format!("replay task: {e}"))??;
        let report = LogRecovery {
            records: inner.records,
            entries: inner.entries.len() as u64,
            last_index: inner.last_log_id().map(|l| l.index),
            vote: inner.vote.is_some(),
        };
        inner.records = inner.records.max(1);
        let (flush_tx, mut flush_rx) = mpsc::unbounded_channel::<(u64, LogFlushed<TypeConfig>)>();
        let flush_wal = wal.clone();
        tokio::spawn(async move {
            while let Some((lsn, cb)) = flush_rx.recv().await {
                let r = flush_wal
                    .sync_to(lsn)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()));
                cb.log_io_completed(r);
            }
        });
        Ok((
            LogStore {
                inner: Arc::new(Mutex::new(inner)),
                flush_tx,
            },
            report,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wal(&self) -> Wal {
        self.lock().wal.clone()
    }

    /// Rewrite the live log after a BASE record and checkpoint the WAL there.
    async fn rewrite(&self) -> Result<(), String> {
        let (wal, base_lsn, last) = {
            let mut g = self.lock();
            let base = Base {
                vote: g.vote,
                committed: g.committed,
                last_purged: g.last_purged,
            };
            g.records = 0;
            let base_lsn = g.enqueue(REC_BASE, &base)?;
            let mut last = base_lsn;
            let entries: Vec<Entry> = g.entries.values().cloned().collect();
            for e in &entries {
                last = g.enqueue(REC_ENTRY, e)?;
            }
            (g.wal.clone(), base_lsn, last)
        };
        wal.sync_to(last).await.map_err(|e| e.to_string())?;
        let info = wal.checkpoint(base_lsn).await.map_err(|e| e.to_string())?;
        tracing::debug!(?info, "consensus log rewritten and checkpointed");
        Ok(())
    }
}

/// Replay the WAL from `start` (the checkpoint LSN, 0 for all).
fn replay(wal: Wal, start: u64) -> Result<LogInner, String> {
    let mut inner = LogInner {
        wal: wal.clone(),
        entries: BTreeMap::new(),
        vote: None,
        committed: None,
        last_purged: None,
        records: 0,
    };
    let reader = match wal.read_from(start) {
        Ok(r) => r,
        Err(WalError::Truncated { .. }) if start == 0 => {
            wal.read_from(0).map_err(|e| e.to_string())?
        }
        Err(e) => return Err(format!("reading the consensus log: {e}")),
    };
    for r in reader {
        let rec = r.map_err(|e| format!("reading the consensus log: {e}"))?;
        inner.records += 1;
        let bad = |e: String| format!("consensus log record {} (kind {}): {e}", rec.lsn, rec.kind);
        match rec.kind {
            REC_ENTRY => {
                let e: Entry = from_bytes(&rec.payload).map_err(bad)?;
                // An entry replaces any later ones (a truncate is implied by Raft's rules).
                let idx = e.log_id.index;
                inner.entries.split_off(&idx);
                inner.entries.insert(idx, e);
            }
            REC_VOTE => inner.vote = Some(from_bytes(&rec.payload).map_err(bad)?),
            REC_COMMITTED => inner.committed = from_bytes(&rec.payload).map_err(bad)?,
            REC_TRUNCATE => {
                let idx: u64 = from_bytes(&rec.payload).map_err(bad)?;
                inner.entries.split_off(&idx);
            }
            REC_PURGE => {
                let id: LogId = from_bytes(&rec.payload).map_err(bad)?;
                inner.entries = inner.entries.split_off(&(id.index + 1));
                if inner.last_purged < Some(id) {
                    inner.last_purged = Some(id);
                }
            }
            REC_BASE => {
                let b: Base = from_bytes(&rec.payload).map_err(bad)?;
                inner.entries.clear();
                inner.vote = b.vote;
                inner.committed = b.committed;
                inner.last_purged = b.last_purged;
                inner.records = 1;
            }
            k => {
                return Err(format!(
                    "consensus log record {}: unknown kind {k}",
                    rec.lsn
                ))
            }
        }
    }
    Ok(inner)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let g = self.lock();
        Ok(g.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let g = self.lock();
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: g.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (wal, lsn) = {
            let mut g = self.lock();
            let lsn = g.enqueue(REC_VOTE, vote).map_err(wvote)?;
            g.vote = Some(*vote);
            (g.wal.clone(), lsn)
        };
        wal.sync_to(lsn).await.map_err(wvote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut g = self.lock();
        g.enqueue(REC_COMMITTED, &committed).map_err(wlog)?;
        g.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let last = {
            let mut g = self.lock();
            let mut last = None;
            for e in entries {
                last = Some(g.enqueue(REC_ENTRY, &e).map_err(wlog)?);
                g.entries.insert(e.log_id.index, e);
            }
            last
        };
        match last {
            Some(lsn) => self
                .flush_tx
                .send((lsn, callback))
                .map_err(|_| wlog("the log's flush task is gone"))?,
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let (wal, lsn) = {
            let mut g = self.lock();
            let lsn = g.enqueue(REC_TRUNCATE, &log_id.index).map_err(wlog)?;
            g.entries.split_off(&log_id.index);
            (g.wal.clone(), lsn)
        };
        wal.sync_to(lsn).await.map_err(wlog)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let rewrite = {
            let mut g = self.lock();
            g.enqueue(REC_PURGE, &log_id).map_err(wlog)?;
            g.entries = g.entries.split_off(&(log_id.index + 1));
            if g.last_purged < Some(log_id) {
                g.last_purged = Some(log_id);
            }
            g.records > 2 * g.entries.len() as u64 + REWRITE_SLACK
        };
        if rewrite {
            self.rewrite().await.map_err(wlog)?;
        }
        Ok(())
    }
}

impl LogStore {
    /// The last log id (entries, else the last purged one).
    pub(crate) fn last_log_id(&self) -> Option<LogId> {
        self.lock().last_log_id()
    }

    /// WAL figures (status).
    pub(crate) fn wal_stats(&self) -> dsys_runtime::storage::WalStats {
        self.wal().stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k{index}"),
                value: "v".into(),
                lease: None,
            }),
        }
    }

    async fn put(s: &mut LogStore, es: Vec<Entry>) {
        // Write directly (no openraft callback) and wait for durability.
        let lsn = {
            let mut g = s.lock();
            let mut last = 0;
            for e in es {
                last = g.enqueue(REC_ENTRY, &e).expect("enqueue");
                g.entries.insert(e.log_id.index, e);
            }
            last
        };
        s.wal().sync_to(lsn).await.expect("sync");
    }

    #[tokio::test]
    async fn replay_restores_entries_vote_truncate_purge_and_rewrite() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let (mut s, rep) = LogStore::open(dir.path().into()).await.expect("open");
            assert_eq!(rep.entries, 0);
            put(&mut s, (1..=10).map(|i| entry(1, i)).collect()).await;
            s.save_vote(&Vote::new(2, 1)).await.expect("vote");
            s.truncate(LogId::new(CommittedLeaderId::new(1, 1), 8))
                .await
                .expect("truncate");
            put(&mut s, vec![entry(2, 8)]).await;
            s.purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
                .await
                .expect("purge");
            let st = s.get_log_state().await.expect("state");
            assert_eq!(
                st.last_log_id.map(|l| (l.leader_id.term, l.index)),
                Some((2, 8))
            );
            s.wal().close().await;
        }
        let (mut s, rep) = LogStore::open(dir.path().into()).await.expect("reopen");
        assert_eq!(rep.entries, 5, "entries 4..=8 survive");
        assert_eq!(s.read_vote().await.expect("vote"), Some(Vote::new(2, 1)));
        let st = s.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(3));
        let es = s.try_get_log_entries(0..100).await.expect("read");
        assert_eq!(
            es.iter()
                .map(|e| (e.log_id.leader_id.term, e.log_id.index))
                .collect::<Vec<_>>(),
            [(1, 4), (1, 5), (1, 6), (1, 7), (2, 8)]
        );
        // A rewrite keeps exactly the live state and lets the WAL drop the rest.
        s.rewrite().await.expect("rewrite");
        put(&mut s, vec![entry(2, 9)]).await;
        s.wal().close().await;
        let (mut s, rep) = LogStore::open(dir.path().into()).await.expect("reopen");
        assert_eq!(rep.records, 7, "BASE + 5 entries + 1 new");
        let st = s.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(st.last_log_id.map(|l| l.index), Some(9));
        assert_eq!(s.read_vote().await.expect("vote"), Some(Vote::new(2, 1)));
    }

    #[tokio::test]
    async fn purge_of_everything_keeps_the_last_log_id() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut s, _) = LogStore::open(dir.path().into()).await.expect("open");
        put(&mut s, (1..=3).map(|i| entry(1, i)).collect()).await;
        s.purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
            .await
            .expect("purge");
        let st = s.get_log_state().await.expect("state");
        assert_eq!(st.last_log_id.map(|l| l.index), Some(3));
        assert!(s.try_get_log_entries(0..10).await.expect("read").is_empty());
    }
}
