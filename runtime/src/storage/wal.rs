//! The write-ahead log: a cheap-to-clone handle over one writer thread that does group commit.
//!
//! * **LSNs** are dense, from 1, assigned when a record is submitted, under the same short
//!   lock that queues it, so queue order is LSN order.
//! * **Group commit** (`SyncPolicy::Batch`, the default): the writer thread takes every record
//!   queued while the previous fsync ran, writes them with one `write`, makes them durable with
//!   one `fdatasync` (`File::sync_data`), and only then acknowledges each writer. An
//!   acknowledged append survives SIGKILL and power loss (given a disk that honours fsync).
//!   `Always` writes and fsyncs each record on its own; `Interval(d)` acknowledges after the
//!   write and fsyncs every `d`: a SIGKILL loses nothing (the bytes are in the kernel's page
//!   cache), a power loss loses up to `d` of acknowledged appends.
//! * **The writer** is a pair of OS threads (blocking file I/O never stalls tokio's workers)
//!   that relay one role between them: the one holding the queue gathers a batch and writes
//!   it, then hands the queue to the other and fsyncs outside the lock. So the next batch is
//!   gathered and written while the previous fsync is still running. A lone writer (two
//!   one-record batches in a row, nothing else queued) is fsynced in place instead: the
//!   thread keeps the queue and looks for the next append for up to `SPIN` (100 µs) before
//!   it sleeps, which saves two thread wake-ups per append. An acknowledgement
//!   is sent only once `durable_lsn` covers the record. Callers wait on oneshot channels.
//!   The threads exit when the log is closed or every handle is dropped. After any failed write or fsync the log is poisoned: every later call fails
//!   until it is reopened, because after a failed fsync the page cache cannot be trusted.
//! * **Pre-filled segments**: before small batches reach the end of the active segment's file,
//!   the writer extends it with zeros, [`PREFILL_BYTES`] at a time (up to the segment size).
//!   The records then overwrite blocks the file system has already allocated, so most
//!   `fdatasync`s flush data only, without a journal commit for the new file size (PostgreSQL
//!   pre-zeroes its WAL segments for the same reason). Batches of 64 KiB or more are appended
//!   as they are: their fsync is mostly data, and zeros would double it. Recovery reads an
//!   all-zero header as the end; a closed or rolled segment is trimmed to its records.
//! * **Checkpoints** record an LSN durably (`checkpoint` file, written then renamed) and delete
//!   the segments wholly below it; the active segment always stays.
//! * One open log per folder, enforced by an exclusive lock on `<dir>/LOCK`.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::crc32c::crc32c;
use super::error::WalError;
use super::record::{self, Record, MAX_RECORD_BYTES_LIMIT, RECORD_HEADER_BYTES};
use super::segment::{self, Next, SegmentMeta, WalRecovery};

/// When appends become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// One write and one fsync per record, no batching: slowest, durable on acknowledgement.
    Always,
    /// Group commit (the default, and safe): records queued together share one write and one
    /// fsync; each writer is acknowledged only after the fsync that covers its record.
    #[default]
    Batch,
    /// Acknowledge after the write, fsync on a timer. Survives SIGKILL (the data is in the
    /// page cache) but a power loss or kernel crash loses up to this interval of acknowledged
    /// appends.
    Interval(Duration),
}

/// How to open a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalConfig {
    /// Folder of the segment files (created if missing).
    pub dir: PathBuf,
    /// Size at which the active segment is closed and a new one started.
    pub segment_bytes: u64,
    /// Durability of appends.
    pub sync: SyncPolicy,
    /// Largest payload accepted, in bytes.
    pub max_record_bytes: u32,
}

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default payload cap: 4 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: u32 = 4 << 20;
/// Most payload bytes one `append_many` may carry.
pub const MAX_APPEND_MANY_BYTES: usize = 256 << 20;
/// The writer stops gathering a batch once this many bytes are queued.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Zeros written ahead of the records at a time (see the module docs).
pub(crate) const PREFILL_BYTES: u64 = 1 << 20;
/// The writer's batch buffer keeps at most this much capacity once a burst is over.
const KEEP_BUF_BYTES: usize = 64 << 10;

/// Batches of at least this many bytes are appended without pre-filling (see `prefill`).
const PREFILL_MAX_BATCH: u64 = 64 << 10;

impl WalConfig {
    /// Defaults (64 MiB segments, group commit, 4 MiB records) in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            sync: SyncPolicy::Batch,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }

    fn validate(&self) -> Result<(), WalError> {
        if self.max_record_bytes > MAX_RECORD_BYTES_LIMIT {
            return Err(WalError::Config(format!(
                "max_record_bytes {} is above the format's cap of {MAX_RECORD_BYTES_LIMIT}",
                self.max_record_bytes
            )));
        }
        let min_seg = (RECORD_HEADER_BYTES as u64) + u64::from(self.max_record_bytes);
        if self.segment_bytes < min_seg {
            return Err(WalError::Config(format!(
                "segment_bytes {} must hold one largest record ({min_seg} bytes)",
                self.segment_bytes
            )));
        }
        if let SyncPolicy::Interval(d) = self.sync {
            if d.is_zero() {
                return Err(WalError::Config("sync interval must be above zero".into()));
            }
        }
        Ok(())
    }
}

/// What a checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// The checkpoint LSN now recorded (records below it are no longer needed).
    pub upto_lsn: u64,
    /// Segment files deleted.
    pub segments_deleted: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// First LSN still in the log.
    pub first_lsn: u64,
}

/// Counters and positions of an open log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalStats {
    /// First LSN in the log.
    pub first_lsn: u64,
    /// Last acknowledged LSN (what readers see; 0 if none).
    pub last_lsn: u64,
    /// Last LSN known to be fsynced.
    pub durable_lsn: u64,
    /// LSN the next submitted record gets.
    pub next_lsn: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes in the segment files.
    pub bytes: u64,
    /// `append`/`append_many`/`enqueue` calls since open.
    pub appends: u64,
    /// Records written since open.
    pub records: u64,
    /// Writes of batched records (one per batch, plus one at each segment roll).
    pub batches: u64,
    /// fsyncs of segment data.
    pub fsyncs: u64,
    /// Average records per batch.
    pub avg_batch_records: f64,
    /// Bytes written since open.
    pub bytes_written: u64,
    /// Last recorded checkpoint LSN.
    pub checkpoint_lsn: u64,
    /// The sync policy, as text.
    pub sync: String,
    /// Set when the log is poisoned by an I/O error.
    pub poisoned: Option<String>,
}

/// Result of [`Wal::verify`]: a full re-read of the log with every CRC checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalVerify {
    /// Segment files read.
    pub segments: usize,
    /// Records whose CRC and LSN checked out.
    pub records: u64,
    /// Payload bytes read.
    pub payload_bytes: u64,
    /// First LSN read.
    pub first_lsn: u64,
    /// Last LSN read (0 if none).
    pub last_lsn: u64,
    /// The first problem met, if any (reading stops there).
    pub error: Option<String>,
}

type Ack<T> = oneshot::Sender<Result<T, WalError>>;

enum Msg {
    Append {
        first_lsn: u64,
        recs: Vec<(u8, Vec<u8>)>,
        ack: Option<Ack<u64>>,
    },
    Sync {
        lsn: u64,
        ack: Ack<()>,
    },
    Checkpoint {
        upto: u64,
        ack: Ack<CheckpointInfo>,
    },
    Tick,
    Close {
        ack: Ack<()>,
    },
}

impl Msg {
    fn bytes(&self) -> usize {
        match self {
            Msg::Append { recs, .. } => {
                recs.iter().map(|(_, p)| record::encoded_len(p.len())).sum()
            }
            _ => 0,
        }
    }
}

/// State shared by the handles and the writer thread.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    sync: SyncPolicy,
    written_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    checkpoint_lsn: AtomicU64,
    appends: AtomicU64,
    records: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
    segments: Mutex<Vec<SegmentMeta>>,
    poisoned: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Highest LSN acknowledged to writers, i.e. visible to readers.
    fn visible_lsn(&self) -> u64 {
        match self.sync {
            SyncPolicy::Interval(_) => self.written_lsn.load(Ordering::Acquire),
            _ => self.durable_lsn.load(Ordering::Acquire),
        }
    }
    fn poisoned(&self) -> Option<String> {
        lock(&self.poisoned).clone()
    }
}

#[derive(Debug)]
struct Submit {
    next_lsn: u64,
    tx: Option<mpsc::UnboundedSender<Msg>>,
}

#[derive(Debug)]
struct Inner {
    max_record_bytes: u32,
    submit: Mutex<Submit>,
    shared: Arc<Shared>,
}

/// Handle to an open write-ahead log. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const LOCK_FILE: &str = "LOCK";
/// How long `open` waits for a folder held by another log before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// Read the checkpoint LSN (8 bytes LE + CRC32C of them). A missing or damaged file reads as
/// 0, which is always safe: it only means no segment is known to be releasable.
fn read_checkpoint(dir: &Path) -> u64 {
    match std::fs::read(dir.join(CHECKPOINT_FILE)) {
        Ok(b) if b.len() == 12 => {
            let (l, c) = b.split_at(8);
            let lsn = u64::from_le_bytes(l.try_into().unwrap_or([0; 8]));
            let crc = u32::from_le_bytes(c.try_into().unwrap_or([0; 4]));
            if crc32c(l) == crc {
                lsn
            } else {
                0
            }
        }
        _ => 0,
    }
}

fn write_checkpoint(dir: &Path, lsn: u64) -> Result<(), WalError> {
    let tmp = dir.join(CHECKPOINT_TMP);
    let mut b = lsn.to_le_bytes().to_vec();
    b.extend_from_slice(&crc32c(&lsn.to_le_bytes()).to_le_bytes());
    let mut f = File::create(&tmp).map_err(|e| WalError::io("create", &tmp, e))?;
    f.write_all(&b)
        .and_then(|_| f.sync_all())
        .map_err(|e| WalError::io("write", &tmp, e))?;
    let dst = dir.join(CHECKPOINT_FILE);
    std::fs::rename(&tmp, &dst).map_err(|e| WalError::io("rename", &dst, e))?;
    segment::sync_dir(dir)
}

impl Wal {
    /// Open (or create) the log in `cfg.dir`, recovering it first: the longest valid prefix
    /// of records is kept and a torn or corrupt tail is cut (see [`WalRecovery`]).
    pub async fn open(cfg: WalConfig) -> Result<(Wal, WalRecovery), WalError> {
        cfg.validate()?;
        // A writer thread of a handle just dropped may still hold the folder for a moment
        // (finishing its last fsync): wait for it, boundedly.
        let mut waited = Duration::ZERO;
        let (rep, writer, next_lsn, shared) = loop {
            let c = cfg.clone();
            match tokio::task::spawn_blocking(move || open_sync(&c))
                .await
                .map_err(|e| WalError::Poisoned(format!("open task failed: {e}")))?
            {
                Err(WalError::Locked(_)) if waited < LOCK_WAIT => {
                    tokio::time::sleep(LOCK_RETRY).await;
                    waited += LOCK_RETRY;
                }
                r => break r?,
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if let SyncPolicy::Interval(d) = cfg.sync {
            let weak = tx.downgrade();
            tokio::spawn(async move {
                let mut iv = tokio::time::interval(d);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    iv.tick().await;
                    let Some(tx) = weak.upgrade() else { return };
                    if tx.send(Msg::Tick).is_err() {
                        return;
                    }
                }
            });
        }
        let relay = Arc::new(Mutex::new(Some(Core {
            rx,
            w: writer,
            prev_batch: 0,
        })));
        for i in 0..WRITER_THREADS {
            let relay = relay.clone();
            std::thread::Builder::new()
                .name(format!("dsys-wal-writer-{i}"))
                .spawn(move || run_relay(&relay))
                .map_err(|e| WalError::io("spawn writer thread", &cfg.dir, e))?;
        }
        let wal = Wal {
            inner: Arc::new(Inner {
                max_record_bytes: cfg.max_record_bytes,
                submit: Mutex::new(Submit {
                    next_lsn,
                    tx: Some(tx),
                }),
                shared,
            }),
        };
        Ok((wal, rep))
    }

    fn check(&self, recs: &[(u8, Vec<u8>)]) -> Result<(), WalError> {
        let max = self.inner.max_record_bytes;
        if let Some((_, p)) = recs.iter().find(|(_, p)| p.len() > max as usize) {
            return Err(WalError::RecordTooLarge { len: p.len(), max });
        }
        if let Some(p) = self.inner.shared.poisoned() {
            return Err(WalError::Poisoned(p));
        }
        Ok(())
    }

    /// Queue records; returns their first LSN.
    fn submit(&self, recs: Vec<(u8, Vec<u8>)>, ack: Option<Ack<u64>>) -> Result<u64, WalError> {
        self.check(&recs)?;
        let n = recs.len() as u64;
        let sh = &self.inner.shared;
        sh.appends.fetch_add(1, Ordering::Relaxed);
        let mut s = lock(&self.inner.submit);
        let first_lsn = s.next_lsn;
        let tx = s.tx.as_ref().ok_or(WalError::Closed)?;
        tx.send(Msg::Append {
            first_lsn,
            recs,
            ack,
        })
        .map_err(|_| WalError::Closed)?;
        s.next_lsn += n;
        Ok(first_lsn)
    }

    /// Append one record; returns its LSN once it is durable per the sync policy.
    pub async fn append(&self, kind: u8, payload: Vec<u8>) -> Result<u64, WalError> {
        let (tx, rx) = oneshot::channel();
        self.submit(vec![(kind, payload)], Some(tx))?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Append records with consecutive LSNs, acknowledged together; returns the last LSN.
    /// Like any unacknowledged append, a prefix of them may survive a crash before the
    /// acknowledgement.
    pub async fn append_many(&self, recs: Vec<(u8, Vec<u8>)>) -> Result<u64, WalError> {
        if recs.is_empty() {
            return Err(WalError::InvalidArgument(
                "append_many of no records".into(),
            ));
        }
        let total: usize = recs.iter().map(|(_, p)| p.len()).sum();
        if total > MAX_APPEND_MANY_BYTES {
            return Err(WalError::InvalidArgument(format!(
                "append_many of {total} bytes exceeds {MAX_APPEND_MANY_BYTES}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.submit(recs, Some(tx))?;
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Queue one record without waiting and return the LSN it gets. It is durable only once
    /// [`Wal::sync_to`] for that LSN (or for a later one) has returned. This is how a page
    /// store logs updates cheaply and waits once, at commit or before flushing a page.
    pub fn enqueue(&self, kind: u8, payload: Vec<u8>) -> Result<u64, WalError> {
        self.submit(vec![(kind, payload)], None)
    }

    fn sync_request(
        &self,
        lsn: u64,
    ) -> Result<Option<oneshot::Receiver<Result<(), WalError>>>, WalError> {
        let sh = &self.inner.shared;
        if lsn <= sh.durable_lsn.load(Ordering::Acquire) {
            return Ok(None);
        }
        if let Some(p) = sh.poisoned() {
            return Err(WalError::Poisoned(p));
        }
        let s = lock(&self.inner.submit);
        if lsn >= s.next_lsn {
            return Err(WalError::InvalidArgument(format!(
                "sync_to({lsn}): LSN not yet submitted (next is {})",
                s.next_lsn
            )));
        }
        let (tx, rx) = oneshot::channel();
        s.tx.as_ref()
            .ok_or(WalError::Closed)?
            .send(Msg::Sync { lsn, ack: tx })
            .map_err(|_| WalError::Closed)?;
        Ok(Some(rx))
    }

    /// Wait until every record up to `lsn` is fsynced (forcing an fsync under
    /// `SyncPolicy::Interval`).
    pub async fn sync_to(&self, lsn: u64) -> Result<(), WalError> {
        match self.sync_request(lsn)? {
            None => Ok(()),
            Some(rx) => rx.await.map_err(|_| WalError::Closed)?,
        }
    }

    /// [`Wal::sync_to`] for blocking code (inside `spawn_blocking` or a plain thread; never
    /// call it on an async worker).
    pub fn sync_to_blocking(&self, lsn: u64) -> Result<(), WalError> {
        match self.sync_request(lsn)? {
            None => Ok(()),
            Some(rx) => rx.blocking_recv().map_err(|_| WalError::Closed)?,
        }
    }

    /// Last LSN known durable (fsynced).
    pub fn durable_lsn(&self) -> u64 {
        self.inner.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// LSN the next submitted record will get.
    pub fn next_lsn(&self) -> u64 {
        lock(&self.inner.submit).next_lsn
    }

    /// Read records from `lsn` (0 means from the first one kept) up to the last acknowledged
    /// one at the time of the call. Blocking file I/O: call it from `spawn_blocking` in async
    /// code. Fails with [`WalError::Truncated`] if a checkpoint removed `lsn`.
    pub fn read_from(&self, lsn: u64) -> Result<WalReader, WalError> {
        let sh = &self.inner.shared;
        let end = sh.visible_lsn();
        let segs = lock(&sh.segments).clone();
        let first = segs.first().map(|s| s.first_lsn).unwrap_or(end + 1);
        let start = if lsn == 0 { first } else { lsn };
        if start < first {
            return Err(WalError::Truncated {
                requested: start,
                first,
            });
        }
        // The segment holding `start`: the last one that begins at or before it.
        let idx = segs.iter().rposition(|s| s.first_lsn <= start).unwrap_or(0);
        let next_lsn = segs.get(idx).map(|s| s.first_lsn).unwrap_or(start);
        Ok(WalReader {
            segs,
            idx,
            cur: None,
            next_lsn,
            start,
            end,
            done: start > end,
            buf: Vec::new(),
        })
    }

    /// Re-read the whole log, checking every CRC and LSN. Blocking file I/O.
    pub fn verify(&self) -> Result<WalVerify, WalError> {
        let segs = lock(&self.inner.shared.segments).len();
        let mut v = WalVerify {
            segments: segs,
            records: 0,
            payload_bytes: 0,
            first_lsn: 0,
            last_lsn: 0,
            error: None,
        };
        let reader = match self.read_from(0) {
            Ok(r) => r,
            Err(e) => {
                v.error = Some(e.to_string());
                return Ok(v);
            }
        };
        for r in reader {
            match r {
                Ok(rec) => {
                    if v.records == 0 {
                        v.first_lsn = rec.lsn;
                    }
                    v.records += 1;
                    v.payload_bytes += rec.payload.len() as u64;
                    v.last_lsn = rec.lsn;
                }
                Err(e) => {
                    v.error = Some(e.to_string());
                    break;
                }
            }
        }
        Ok(v)
    }

    /// Record `upto_lsn` durably as the checkpoint (records below it are no longer needed) and
    /// delete every segment whose records are all below it. `upto_lsn` may be at most the next
    /// LSN. The active segment is never deleted.
    pub async fn checkpoint(&self, upto_lsn: u64) -> Result<CheckpointInfo, WalError> {
        let (tx, rx) = oneshot::channel();
        {
            let s = lock(&self.inner.submit);
            if upto_lsn > s.next_lsn {
                return Err(WalError::InvalidArgument(format!(
                    "checkpoint LSN {upto_lsn} is beyond the next LSN {}",
                    s.next_lsn
                )));
            }
            s.tx.as_ref()
                .ok_or(WalError::Closed)?
                .send(Msg::Checkpoint {
                    upto: upto_lsn,
                    ack: tx,
                })
                .map_err(|_| WalError::Closed)?;
        }
        rx.await.map_err(|_| WalError::Closed)?
    }

    /// Counters and positions.
    pub fn stats(&self) -> WalStats {
        let sh = &self.inner.shared;
        let segs = lock(&sh.segments);
        let records = sh.records.load(Ordering::Relaxed);
        let batches = sh.batches.load(Ordering::Relaxed);
        let next_lsn = self.next_lsn();
        WalStats {
            first_lsn: segs.first().map(|s| s.first_lsn).unwrap_or(next_lsn),
            last_lsn: sh.visible_lsn(),
            durable_lsn: sh.durable_lsn.load(Ordering::Acquire),
            next_lsn,
            segments: segs.len(),
            bytes: segs.iter().map(|s| s.len).sum(),
            appends: sh.appends.load(Ordering::Relaxed),
            records,
            batches,
            fsyncs: sh.fsyncs.load(Ordering::Relaxed),
            avg_batch_records: if batches == 0 {
                0.0
            } else {
                records as f64 / batches as f64
            },
            bytes_written: sh.bytes_written.load(Ordering::Relaxed),
            checkpoint_lsn: sh.checkpoint_lsn.load(Ordering::Relaxed),
            sync: match sh.sync {
                SyncPolicy::Always => "always".into(),
                SyncPolicy::Batch => "batch".into(),
                SyncPolicy::Interval(d) => format!("interval {} ms", d.as_millis()),
            },
            poisoned: sh.poisoned(),
        }
    }

    /// The log's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Flush and fsync what is queued, stop the writer and release the folder. Other clones
    /// of this handle get [`WalError::Closed`] from then on.
    pub async fn close(self) {
        let rx = {
            let mut s = lock(&self.inner.submit);
            let Some(tx) = s.tx.take() else { return };
            let (ack, rx) = oneshot::channel();
            if tx.send(Msg::Close { ack }).is_err() {
                return;
            }
            rx
        };
        let _ = rx.await;
    }
}

/// Blocking part of `open`: lock, read the checkpoint, recover, open the active segment.
fn open_sync(cfg: &WalConfig) -> Result<(WalRecovery, Writer, u64, Arc<Shared>), WalError> {
    let dir = &cfg.dir;
    std::fs::create_dir_all(dir).map_err(|e| WalError::io("create folder", dir, e))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| WalError::io("open", &lock_path, e))?;
    match lock_file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(WalError::Locked(dir.clone())),
        Err(std::fs::TryLockError::Error(e)) => return Err(WalError::io("lock", &lock_path, e)),
    }
    let ckpt = read_checkpoint(dir);
    let (rep, mut segs, next_lsn) = segment::recover(dir, ckpt)?;
    if segs.is_empty() {
        let path = dir.join(segment::segment_name(next_lsn));
        File::create(&path).map_err(|e| WalError::io("create", &path, e))?;
        segment::sync_dir(dir)?;
        segs.push(SegmentMeta {
            first_lsn: next_lsn,
            path,
            len: 0,
        });
    }
    let active = segs
        .last()
        .cloned()
        .ok_or_else(|| WalError::Poisoned("no active segment after recovery".into()))?;
    let mut file = OpenOptions::new()
        .write(true)
        .open(&active.path)
        .map_err(|e| WalError::io("open", &active.path, e))?;
    file.seek(SeekFrom::Start(active.len))
        .map_err(|e| WalError::io("seek", &active.path, e))?;
    // Recovery cut anything that was not a record or the zeros after them.
    let prefilled = file
        .metadata()
        .map_err(|e| WalError::io("stat", &active.path, e))?
        .len();
    // What survived recovery is what we build on: make sure it is on disk (it may have been
    // written under `Interval` and never fsynced before the crash).
    file.sync_data()
        .map_err(|e| WalError::io("fsync", &active.path, e))?;
    let last = next_lsn - 1;
    let shared = Arc::new(Shared {
        dir: dir.clone(),
        sync: cfg.sync,
        written_lsn: AtomicU64::new(last),
        durable_lsn: AtomicU64::new(last),
        checkpoint_lsn: AtomicU64::new(ckpt),
        appends: AtomicU64::new(0),
        records: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        fsyncs: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        segments: Mutex::new(segs),
        poisoned: Mutex::new(None),
    });
    let writer = Writer {
        shared: shared.clone(),
        segment_bytes: cfg.segment_bytes,
        file: Arc::new(file),
        seg_len: active.len,
        prefilled,
        buf: Vec::new(),
        buf_last: last,
        written: last,
        next_expected: next_lsn,
        buf_records: 0,
        _lock: lock_file,
    };
    Ok((rep, writer, next_lsn, shared))
}

/// The writer thread's state. Sole owner of the active segment's file descriptor.
struct Writer {
    shared: Arc<Shared>,
    segment_bytes: u64,
    /// Shared with a thread that fsyncs it outside the lock.
    file: Arc<File>,
    seg_len: u64,
    /// The active segment's file length: records, then zeros up to here.
    prefilled: u64,
    buf: Vec<u8>,
    buf_last: u64,
    written: u64,
    next_expected: u64,
    /// Records in `buf`.
    buf_records: u64,
    /// Holds the folder's lock for as long as the writer runs.
    _lock: File,
}

/// Threads that relay the writer role (see the module docs).
const WRITER_THREADS: usize = 2;

/// What the thread holding the queue owns: the queue and the writer state.
struct Core {
    rx: mpsc::UnboundedReceiver<Msg>,
    w: Writer,
    /// Messages in the batch before this one.
    prev_batch: usize,
}

/// `None` once the log is closed (or every handle dropped) and its folder released.
type Relay = Mutex<Option<Core>>;

/// Acknowledgements of one batch, sent once the fsync that covers them (if any) is done.
#[derive(Default)]
struct Pending {
    acks: Vec<(Ack<u64>, u64)>,
    syncs: Vec<(Ack<()>, u64)>,
    ckpts: Vec<(Ack<CheckpointInfo>, Result<CheckpointInfo, WalError>)>,
    /// fsync this file to make everything up to this LSN durable.
    fsync: Option<(Arc<File>, PathBuf, u64)>,
}

fn run_relay(relay: &Relay) {
    loop {
        let mut guard = lock(relay);
        // Set after an fsync done in place: the writers it acknowledged are about to append
        // again, so look for their next record for a moment before sleeping.
        let mut spin = false;
        loop {
            let Some(core) = guard.as_mut() else { return };
            let first = match spin.then(|| spin_recv(&mut core.rx)).flatten() {
                Some(m) => Some(m),
                None => core.rx.blocking_recv(),
            };
            let Some(first) = first else {
                // Every handle dropped: make what was written durable, then stop.
                if let Some(mut core) = guard.take() {
                    let _ = core.w.flush_and_sync(true).and_then(|()| core.w.trim());
                }
                return;
            };
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            if core.w.shared.sync != SyncPolicy::Always {
                while bytes < MAX_BATCH_BYTES {
                    match core.rx.try_recv() {
                        Ok(m) => {
                            bytes += m.bytes();
                            batch.push(m);
                        }
                        Err(_) => break,
                    }
                }
            }
            // A lone writer: this batch and the one before it are a single message each.
            let lone = batch.len() == 1 && core.prev_batch == 1;
            core.prev_batch = batch.len();
            let (pending, close) = core.w.gather(batch);
            let shared = core.w.shared.clone();
            if let Some(ack) = close {
                // Release the folder (file and lock) before telling the closer we are done, so
                // that a reopen right after `close` finds it free. The other thread sees `None`.
                let r = match core.w.flush_and_sync(true).and_then(|()| core.w.trim()) {
                    Ok(()) => shared
                        .poisoned()
                        .map_or(Ok(()), |p| Err(WalError::Poisoned(p))),
                    Err(e) => Err(e),
                };
                guard.take();
                drop(guard);
                pending.finish(&shared);
                let _ = ack.send(r);
                return;
            }
            if lone && core.rx.is_empty() {
                // A lone writer and nothing else queued: fsync here and keep
                // the queue. Handing it over would only add a wake-up of the other thread
                // before the fsync, and one more when the next append comes. With more
                // writers, the next batch is gathered and written during this fsync.
                pending.finish(&shared);
                spin = true;
                continue;
            }
            // Hand the queue to the other thread, then fsync while it gathers the next batch.
            drop(guard);
            pending.finish(&shared);
            break;
        }
    }
}

/// How long a writer thread looks for the next append after an fsync done in place before
/// it sleeps: about the time an acknowledged writer takes to wake up and append again here.
const SPIN: Duration = Duration::from_micros(100);

/// The next message if one arrives within [`SPIN`].
fn spin_recv(rx: &mut mpsc::UnboundedReceiver<Msg>) -> Option<Msg> {
    let t0 = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(m) => return Some(m),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if t0.elapsed() < SPIN => {
                std::thread::yield_now()
            }
            Err(mpsc::error::TryRecvError::Empty) => return None,
        }
    }
}

impl Pending {
    fn finish(self, shared: &Shared) {
        if let Some((file, path, upto)) = self.fsync {
            if shared.durable_lsn.load(Ordering::Acquire) < upto && shared.poisoned().is_none() {
                match file.sync_data() {
                    Ok(()) => {
                        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                        shared.durable_lsn.fetch_max(upto, Ordering::AcqRel);
                    }
                    Err(e) => poison(shared, &WalError::io("fsync", &path, e)),
                }
            }
        }
        let poisoned = shared.poisoned();
        let durable = shared.durable_lsn.load(Ordering::Acquire);
        let acked = match shared.sync {
            SyncPolicy::Interval(_) => shared.written_lsn.load(Ordering::Acquire),
            _ => durable,
        };
        for (a, lsn) in self.acks {
            let _ = a.send(match &poisoned {
                Some(p) => Err(WalError::Poisoned(p.clone())),
                None if lsn <= acked => Ok(lsn),
                None => Err(WalError::Poisoned("record not written".into())),
            });
        }
        for (a, lsn) in self.syncs {
            let _ = a.send(match &poisoned {
                Some(p) => Err(WalError::Poisoned(p.clone())),
                None if lsn <= durable => Ok(()),
                None => Err(WalError::Poisoned("sync did not cover the LSN".into())),
            });
        }
        for (a, r) in self.ckpts {
            let _ = a.send(r);
        }
    }
}

fn syncs_beyond(syncs: &[(Ack<()>, u64)], durable: u64) -> bool {
    syncs.iter().any(|(_, l)| *l > durable)
}

fn poison(shared: &Shared, e: &WalError) {
    let mut p = lock(&shared.poisoned);
    if p.is_none() {
        tracing::error!(error = %e, "WAL write failed; the log refuses writes until reopened");
        *p = Some(e.to_string());
    }
}

impl Writer {
    fn poisoned(&self) -> Option<String> {
        self.shared.poisoned()
    }

    fn poison(&mut self, e: &WalError) {
        poison(&self.shared, e);
    }

    /// Under the lock: encode and write one gathered batch, run its checkpoints, and say
    /// which fsync (done after the lock is released) its acknowledgements wait for. Returns
    /// the close acknowledgement when the log must stop.
    fn gather(&mut self, batch: Vec<Msg>) -> (Pending, Option<Ack<()>>) {
        let mut p = Pending::default();
        let mut ckpts: Vec<(Ack<CheckpointInfo>, u64)> = Vec::new();
        let mut close: Option<Ack<()>> = None;
        let mut tick = false;
        for m in batch {
            match m {
                Msg::Append {
                    first_lsn,
                    recs,
                    ack,
                } => {
                    let last = first_lsn + recs.len() as u64 - 1;
                    if self.poisoned().is_none() {
                        if let Err(e) = self.add(first_lsn, &recs) {
                            self.poison(&e);
                        }
                    }
                    if let Some(a) = ack {
                        p.acks.push((a, last));
                    }
                }
                Msg::Sync { lsn, ack } => p.syncs.push((ack, lsn)),
                Msg::Checkpoint { upto, ack } => ckpts.push((ack, upto)),
                Msg::Tick => tick = true,
                Msg::Close { ack } => close = Some(ack),
            }
        }
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        let want_sync = match self.shared.sync {
            SyncPolicy::Always | SyncPolicy::Batch => true,
            SyncPolicy::Interval(_) => tick || syncs_beyond(&p.syncs, durable),
        };
        if self.poisoned().is_none() {
            if let Err(e) = self.flush_and_sync(false) {
                self.poison(&e);
            }
        }
        if want_sync && self.written > durable && self.poisoned().is_none() {
            p.fsync = Some((self.file.clone(), self.active_path(), self.written));
        }
        for (a, upto) in ckpts {
            let r = match self.poisoned() {
                Some(e) => Err(WalError::Poisoned(e)),
                None => self.checkpoint(upto),
            };
            p.ckpts.push((a, r));
        }
        (p, close)
    }

    /// Encode records into the batch buffer, rolling segments at the size limit.
    fn add(&mut self, first_lsn: u64, recs: &[(u8, Vec<u8>)]) -> Result<(), WalError> {
        for (i, (kind, payload)) in recs.iter().enumerate() {
            let lsn = first_lsn + i as u64;
            if lsn != self.next_expected {
                return Err(WalError::Poisoned(format!(
                    "LSN sequence broken: got {lsn}, expected {}",
                    self.next_expected
                )));
            }
            let size = record::encoded_len(payload.len()) as u64;
            let used = self.seg_len + self.buf.len() as u64;
            if used > 0 && used + size > self.segment_bytes {
                self.flush_and_sync(true)?;
                self.roll(lsn)?;
            }
            record::encode_into(&mut self.buf, *kind, lsn, payload);
            self.buf_last = lsn;
            self.next_expected += 1;
            self.buf_records += 1;
            if self.shared.sync == SyncPolicy::Always {
                self.flush_and_sync(true)?;
            }
        }
        Ok(())
    }

    /// Before writing `batch` bytes at the end of the records: extend the active segment with
    /// zeros so that it holds them, a whole [`PREFILL_BYTES`] beyond its current length,
    /// capped at the segment size. Only for batches under [`PREFILL_MAX_BATCH`]: a large
    /// batch's fsync is dominated by its data, and zeros would double what reaches the disk.
    fn prefill(&mut self, batch: u64) -> Result<(), WalError> {
        let need = self.seg_len + batch;
        if need <= self.prefilled || batch >= PREFILL_MAX_BATCH {
            return Ok(());
        }
        let upto = (self.prefilled + PREFILL_BYTES)
            .min(self.segment_bytes)
            .max(need);
        let zeros = vec![0u8; (upto - self.prefilled).min(PREFILL_BYTES) as usize];
        let mut at = self.prefilled;
        while at < upto {
            let n = (upto - at).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], at)
                .map_err(|e| WalError::io("pre-fill", self.active_path(), e))?;
            at += n as u64;
        }
        self.prefilled = upto;
        Ok(())
    }

    /// Cut the active segment's zeros after its records (on close and before a roll). Not
    /// fsynced: if the new length is lost, recovery reads the zeros as the end.
    fn trim(&mut self) -> Result<(), WalError> {
        if self.prefilled > self.seg_len {
            self.file
                .set_len(self.seg_len)
                .map_err(|e| WalError::io("truncate", self.active_path(), e))?;
            self.prefilled = self.seg_len;
        }
        Ok(())
    }

    /// Write the buffer (one `write`), then fsync if asked and needed.
    fn flush_and_sync(&mut self, sync: bool) -> Result<(), WalError> {
        if !self.buf.is_empty() {
            let path = self.active_path();
            self.prefill(self.buf.len() as u64)?;
            (&*self.file)
                .write_all(&self.buf)
                .map_err(|e| WalError::io("write", &path, e))?;
            let n = self.buf.len() as u64;
            self.seg_len += n;
            self.prefilled = self.prefilled.max(self.seg_len);
            self.written = self.buf_last;
            self.buf.clear();
            // A burst grew the batch buffer; a small batch after it gives the memory back.
            if n < KEEP_BUF_BYTES as u64 && self.buf.capacity() > KEEP_BUF_BYTES {
                self.buf.shrink_to(KEEP_BUF_BYTES);
            }
            self.shared.bytes_written.fetch_add(n, Ordering::Relaxed);
            self.shared
                .records
                .fetch_add(self.buf_records, Ordering::Relaxed);
            self.shared.batches.fetch_add(1, Ordering::Relaxed);
            self.buf_records = 0;
            self.shared
                .written_lsn
                .store(self.written, Ordering::Release);
            if let Some(s) = lock(&self.shared.segments).last_mut() {
                s.len = self.seg_len;
            }
        }
        if sync && self.shared.durable_lsn.load(Ordering::Acquire) < self.written {
            let path = self.active_path();
            self.file
                .sync_data()
                .map_err(|e| WalError::io("fsync", &path, e))?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.shared
                .durable_lsn
                .fetch_max(self.written, Ordering::AcqRel);
        }
        Ok(())
    }

    fn active_path(&self) -> PathBuf {
        lock(&self.shared.segments)
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default()
    }

    /// Start a new segment whose first record is `first_lsn`. The previous one is fsynced.
    fn roll(&mut self, first_lsn: u64) -> Result<(), WalError> {
        self.trim()?;
        let path = self.shared.dir.join(segment::segment_name(first_lsn));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| WalError::io("create segment", &path, e))?;
        // The new file's name must survive a power loss before records in it are acknowledged.
        segment::sync_dir(&self.shared.dir)?;
        self.file = Arc::new(f);
        self.seg_len = 0;
        self.prefilled = 0;
        lock(&self.shared.segments).push(SegmentMeta {
            first_lsn,
            path,
            len: 0,
        });
        Ok(())
    }

    fn checkpoint(&mut self, upto: u64) -> Result<CheckpointInfo, WalError> {
        let dir = self.shared.dir.clone();
        let prev = self.shared.checkpoint_lsn.load(Ordering::Relaxed);
        let upto = upto.max(prev);
        if upto > prev {
            write_checkpoint(&dir, upto)?;
            self.shared.checkpoint_lsn.store(upto, Ordering::Relaxed);
        }
        let mut deleted = 0;
        let mut freed = 0;
        loop {
            let victim = {
                let segs = lock(&self.shared.segments);
                if segs.len() > 1 && segs[1].first_lsn <= upto {
                    Some(segs[0].clone())
                } else {
                    None
                }
            };
            let Some(v) = victim else { break };
            std::fs::remove_file(&v.path).map_err(|e| WalError::io("remove", &v.path, e))?;
            lock(&self.shared.segments).remove(0);
            deleted += 1;
            freed += v.len;
        }
        if deleted > 0 {
            segment::sync_dir(&dir)?;
        }
        let first_lsn = lock(&self.shared.segments)
            .first()
            .map(|s| s.first_lsn)
            .unwrap_or(self.next_expected);
        Ok(CheckpointInfo {
            upto_lsn: upto,
            segments_deleted: deleted,
            bytes_freed: freed,
            first_lsn,
        })
    }
}

/// Iterator over records from some LSN to the end the log had when the reader was made.
/// Every record's CRC and LSN are checked; after the first error the iterator ends.
#[derive(Debug)]
pub struct WalReader {
    segs: Vec<SegmentMeta>,
    idx: usize,
    /// Open segment: reader, bytes left in it, offset of the next record.
    cur: Option<(BufReader<File>, u64, u64)>,
    next_lsn: u64,
    start: u64,
    end: u64,
    done: bool,
    buf: Vec<u8>,
}

impl WalReader {
    fn open_current(&mut self) -> Result<(), WalError> {
        let Some(s) = self.segs.get(self.idx) else {
            return Err(WalError::Corrupt {
                path: PathBuf::new(),
                offset: 0,
                reason: format!("log ends before LSN {}", self.next_lsn),
            });
        };
        if s.first_lsn != self.next_lsn {
            return Err(WalError::Corrupt {
                path: s.path.clone(),
                offset: 0,
                reason: format!(
                    "segment starts at LSN {}, expected {}",
                    s.first_lsn, self.next_lsn
                ),
            });
        }
        let f = match File::open(&s.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(WalError::Truncated {
                    requested: self.next_lsn,
                    first: self
                        .segs
                        .get(self.idx + 1)
                        .map(|s| s.first_lsn)
                        .unwrap_or(0),
                })
            }
            Err(e) => return Err(WalError::io("open", &s.path, e)),
        };
        let len = f
            .metadata()
            .map_err(|e| WalError::io("stat", &s.path, e))?
            .len();
        self.cur = Some((BufReader::with_capacity(256 << 10, f), len, 0));
        Ok(())
    }

    fn next_record(&mut self) -> Result<Option<Record>, WalError> {
        loop {
            if self.next_lsn > self.end {
                return Ok(None);
            }
            if self.cur.is_none() {
                self.open_current()?;
            }
            let path = self
                .segs
                .get(self.idx)
                .map(|s| s.path.clone())
                .unwrap_or_default();
            let Some((r, remaining, offset)) = self.cur.as_mut() else {
                return Ok(None);
            };
            match segment::read_next(r, *remaining, self.next_lsn, &mut self.buf)
                .map_err(|e| WalError::io("read", &path, e))?
            {
                Next::Record(h) => {
                    let n = record::encoded_len(h.len as usize) as u64;
                    *remaining -= n;
                    *offset += n;
                    self.next_lsn += 1;
                    if h.lsn < self.start {
                        continue;
                    }
                    return Ok(Some(Record {
                        lsn: h.lsn,
                        kind: h.kind,
                        payload: std::mem::take(&mut self.buf),
                    }));
                }
                Next::End | Next::Zeros => {
                    self.cur = None;
                    self.idx += 1;
                }
                Next::Invalid(why) => {
                    return Err(WalError::Corrupt {
                        path,
                        offset: *offset,
                        reason: why.to_string(),
                    })
                }
            }
        }
    }
}

impl Iterator for WalReader {
    type Item = Result<Record, WalError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> WalConfig {
        let mut c = WalConfig::new(dir);
        c.segment_bytes = 4096;
        c.max_record_bytes = 1024;
        c
    }

    fn all(w: &Wal, from: u64) -> Vec<Record> {
        w.read_from(from)
            .expect("reader")
            .collect::<Result<Vec<_>, _>>()
            .expect("records")
    }

    #[tokio::test]
    async fn lsns_are_dense_from_one_and_survive_reopen() {
        let d = tempfile::tempdir().expect("tmp");
        let (w, rep) = Wal::open(cfg(d.path())).await.expect("open");
        assert_eq!((rep.first_lsn, rep.last_lsn, rep.records), (1, 0, 0));
        for i in 1..=300u64 {
            assert_eq!(
                w.append(2, format!("rec {i:096}").into_bytes())
                    .await
                    .expect("append"),
                i
            );
        }
        assert_eq!(
            w.append_many(vec![(3, b"a".to_vec()), (4, b"b".to_vec())])
                .await
                .expect("many"),
            302
        );
        let st = w.stats();
        assert!(st.segments > 3, "rolled at 4 KiB: {st:?}");
        assert_eq!((st.last_lsn, st.durable_lsn, st.next_lsn), (302, 302, 303));
        w.close().await;
        let (w, rep) = Wal::open(cfg(d.path())).await.expect("reopen");
        assert_eq!((rep.first_lsn, rep.last_lsn, rep.records), (1, 302, 302));
        assert_eq!(rep.truncated_bytes, 0);
        let recs = all(&w, 0);
        assert_eq!(recs.len(), 302);
        for (i, r) in recs.iter().enumerate().take(300) {
            assert_eq!(r.lsn, i as u64 + 1);
            assert_eq!(r.payload, format!("rec {:096}", i + 1).into_bytes());
        }
        assert_eq!((recs[301].kind, &recs[301].payload[..]), (4, &b"b"[..]));
        // From the middle, across segment boundaries.
        let tail = all(&w, 150);
        assert_eq!(tail.first().map(|r| r.lsn), Some(150));
        assert_eq!(tail.len(), 153);
        assert!(all(&w, 303).is_empty());
        assert_eq!(w.append(1, vec![]).await.expect("append"), 303);
    }

    #[tokio::test]
    async fn concurrent_writers_share_fsyncs() {
        let d = tempfile::tempdir().expect("tmp");
        let mut c = cfg(d.path());
        c.segment_bytes = 1 << 20;
        let (w, _) = Wal::open(c).await.expect("open");
        let mut tasks = Vec::new();
        for t in 0..32u8 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..20u8 {
                    got.push(w.append(t, vec![t, i]).await.expect("append"));
                }
                got
            }));
        }
        let mut lsns = Vec::new();
        for t in tasks {
            lsns.extend(t.await.expect("task"));
        }
        lsns.sort_unstable();
        assert_eq!(lsns, (1..=640).collect::<Vec<u64>>());
        let st = w.stats();
        assert_eq!(st.records, 640);
        assert!(st.fsyncs < 640, "group commit batched: {st:?}");
        // A relay thread skips its fsync when the other thread's later fsync of the same
        // file already covered its batch, so there may be fewer fsyncs than batches, never
        // more, and everything acknowledged is durable.
        assert!(st.fsyncs <= st.batches, "{st:?}");
        assert_eq!(st.durable_lsn, 640, "{st:?}");
        // Each writer's records are in its own order.
        let recs = all(&w, 0);
        for t in 0..32u8 {
            let mine: Vec<u8> = recs
                .iter()
                .filter(|r| r.kind == t)
                .map(|r| r.payload[1])
                .collect();
            assert_eq!(mine, (0..20).collect::<Vec<u8>>());
        }
    }

    #[tokio::test]
    async fn always_policy_fsyncs_every_record() {
        let d = tempfile::tempdir().expect("tmp");
        let mut c = cfg(d.path());
        c.sync = SyncPolicy::Always;
        let (w, _) = Wal::open(c).await.expect("open");
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
                    w.append(1, vec![0; 10]).await.expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        w.append_many(vec![(1, vec![1]); 5]).await.expect("many");
        let st = w.stats();
        assert_eq!(st.records, 45);
        assert_eq!(st.fsyncs, 45, "{st:?}");
    }

    #[tokio::test]
    async fn interval_policy_acks_before_fsync_and_syncs_on_timer() {
        let d = tempfile::tempdir().expect("tmp");
        let mut c = cfg(d.path());
        c.sync = SyncPolicy::Interval(Duration::from_millis(20));
        let (w, _) = Wal::open(c).await.expect("open");
        let lsn = w.append(1, b"x".to_vec()).await.expect("append");
        assert_eq!(w.stats().last_lsn, lsn, "visible once written");
        tokio::time::timeout(Duration::from_secs(5), async {
            while w.durable_lsn() < lsn {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("timer fsync");
        let lsn = w.append(1, b"y".to_vec()).await.expect("append");
        w.sync_to(lsn).await.expect("forced sync");
        assert!(w.durable_lsn() >= lsn);
    }

    #[tokio::test]
    async fn enqueue_then_sync_to() {
        let d = tempfile::tempdir().expect("tmp");
        let (w, _) = Wal::open(cfg(d.path())).await.expect("open");
        let a = w.enqueue(1, b"a".to_vec()).expect("enqueue");
        let b = w.enqueue(1, b"b".to_vec()).expect("enqueue");
        assert_eq!((a, b), (1, 2));
        w.sync_to(b).await.expect("sync");
        assert!(w.durable_lsn() >= 2);
        assert!(matches!(
            w.sync_to(99).await,
            Err(WalError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn limits_and_bad_arguments_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let (w, _) = Wal::open(cfg(d.path())).await.expect("open");
        assert!(matches!(
            w.append(1, vec![0; 1025]).await,
            Err(WalError::RecordTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        assert!(matches!(
            w.append_many(vec![]).await,
            Err(WalError::InvalidArgument(_))
        ));
        assert!(matches!(
            w.append_many(vec![(1, vec![]), (1, vec![0; 2000])]).await,
            Err(WalError::RecordTooLarge { .. })
        ));
        assert!(matches!(
            w.checkpoint(5).await,
            Err(WalError::InvalidArgument(_))
        ));
        assert_eq!(w.next_lsn(), 1, "refused appends used no LSN");
        let mut bad = cfg(d.path());
        bad.segment_bytes = 100;
        assert!(matches!(Wal::open(bad).await, Err(WalError::Config(_))));
        let mut bad = cfg(d.path());
        bad.sync = SyncPolicy::Interval(Duration::ZERO);
        assert!(matches!(Wal::open(bad).await, Err(WalError::Config(_))));
        let w2 = w.clone();
        w.close().await;
        assert!(matches!(w2.append(1, vec![]).await, Err(WalError::Closed)));
    }

    #[tokio::test]
    async fn one_open_log_per_folder() {
        let d = tempfile::tempdir().expect("tmp");
        let (_w, _) = Wal::open(cfg(d.path())).await.expect("open");
        assert!(matches!(
            Wal::open(cfg(d.path())).await,
            Err(WalError::Locked(_))
        ));
    }

    #[tokio::test]
    async fn checkpoint_deletes_whole_segments_below_and_is_durable() {
        let d = tempfile::tempdir().expect("tmp");
        let (w, _) = Wal::open(cfg(d.path())).await.expect("open");
        for _ in 0..100 {
            w.append(1, vec![9; 200]).await.expect("append");
        }
        let segs_before = w.stats().segments;
        let ck = w.checkpoint(60).await.expect("checkpoint");
        assert!(ck.segments_deleted > 0);
        assert!(
            ck.first_lsn <= 60,
            "never deletes a record at or above the checkpoint"
        );
        assert_eq!(w.stats().segments, segs_before - ck.segments_deleted);
        assert!(matches!(w.read_from(1), Err(WalError::Truncated { .. })));
        assert_eq!(all(&w, 60).len(), 41);
        // A lower checkpoint later does not move it back.
        assert_eq!(w.checkpoint(10).await.expect("checkpoint").upto_lsn, 60);
        // Everything released: only the active segment is left.
        let ck = w.checkpoint(101).await.expect("checkpoint");
        assert_eq!(w.stats().segments, 1);
        w.close().await;
        let (w, rep) = Wal::open(cfg(d.path())).await.expect("reopen");
        assert_eq!(rep.checkpoint_lsn, 101);
        assert_eq!(rep.first_lsn, ck.first_lsn);
        assert_eq!(w.append(1, vec![]).await.expect("append"), 101);
        let v = w.verify().expect("verify");
        assert_eq!(v.error, None);
        assert_eq!(v.last_lsn, 101);
    }

    #[tokio::test]
    async fn the_active_segment_is_prefilled_and_a_crash_copy_recovers_cleanly() {
        let d = tempfile::tempdir().expect("tmp");
        let mut c = cfg(d.path());
        c.segment_bytes = 1 << 20;
        let (w, _) = Wal::open(c.clone()).await.expect("open");
        for i in 1..=20u64 {
            w.append(1, i.to_le_bytes().to_vec()).await.expect("append");
        }
        let (_, path) = segment::list_segments(d.path()).expect("list")[0].clone();
        let records = 20 * record::encoded_len(8) as u64;
        let len = std::fs::metadata(&path).expect("stat").len();
        assert!(len > records, "zeros ahead of the records: {len} bytes");
        // What a SIGKILL leaves: records, then the zeros.
        let copy = tempfile::tempdir().expect("tmp");
        std::fs::copy(&path, copy.path().join(path.file_name().expect("name"))).expect("copy");
        let mut cc = c.clone();
        cc.dir = copy.path().into();
        let (w2, rep) = Wal::open(cc).await.expect("open copy");
        assert_eq!((rep.last_lsn, rep.truncated_bytes, rep.cut), (20, 0, None));
        assert_eq!(w2.append(1, b"next".to_vec()).await.expect("append"), 21);
        assert_eq!(all(&w2, 0).len(), 21);
        assert!(w2.verify().expect("verify").error.is_none());
        w2.close().await;
        // A clean close leaves exactly the records.
        w.close().await;
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), records);
    }

    #[tokio::test]
    async fn corrupt_tail_is_cut_on_open_and_verify_reports_later_damage() {
        let d = tempfile::tempdir().expect("tmp");
        let (w, _) = Wal::open(cfg(d.path())).await.expect("open");
        for i in 0..50u64 {
            w.append(1, i.to_le_bytes().to_vec()).await.expect("append");
        }
        w.close().await;
        let segs = segment::list_segments(d.path()).expect("list");
        let (first, path) = segs[0].clone();
        // Flip a byte inside the 10th record of the first segment.
        let mut b = std::fs::read(&path).expect("read");
        let rec = record::encoded_len(8);
        b[9 * rec + RECORD_HEADER_BYTES + 3] ^= 0xff;
        std::fs::write(&path, &b).expect("write");
        let (w, rep) = Wal::open(cfg(d.path())).await.expect("reopen");
        assert_eq!(first, 1);
        assert_eq!(rep.last_lsn, 9);
        assert_eq!(rep.segments, 1);
        assert_eq!(rep.dropped_segments.len(), segs.len() - 1);
        assert!(rep.cut.as_deref().unwrap_or("").contains("CRC"), "{rep:?}");
        assert_eq!(w.append(1, b"new".to_vec()).await.expect("append"), 10);
        // Damage after open is found by verify, not hidden.
        w.close().await;
        let (w, _) = Wal::open(cfg(d.path())).await.expect("reopen");
        let mut b = std::fs::read(&path).expect("read");
        b[RECORD_HEADER_BYTES] ^= 1;
        std::fs::write(&path, &b).expect("write");
        let v = w.verify().expect("verify");
        assert!(v.error.is_some());
        assert_eq!(v.records, 0);
    }
}
