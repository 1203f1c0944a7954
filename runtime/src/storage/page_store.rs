//! A small page store that obeys the WAL rule: the seed diagram's buffer cache, data file and
//! write-ahead log, with transactions.
//!
//! * **Data file** `pages.db`: fixed 4 KiB pages. Each page starts with a 16-byte header:
//!   `pageLSN: u64 | crc32c: u32 | reserved: u32`; the CRC covers the rest of the page, so a
//!   torn page write is detected. An all-zero page is a valid, never-written page.
//! * **Buffer cache**: at most `cache_pages` frames, replaced by the clock algorithm.
//! * **Log**: its own [`Wal`] in `<dir>/wal`, with records BEGIN (the transaction id is its
//!   LSN), UPDATE (page, offset, before image, after image), CLR (an undo step: page,
//!   offset, image restored), COMMIT and ABORT.
//! * **The WAL rule**, kept in `Inner::flush`: before any dirty page is written to the data
//!   file, the log is made durable up to that page's pageLSN.
//! * **Commit** appends COMMIT and returns once it is fsynced (group commit shared with other
//!   committing transactions); the transaction's pages are *not* written (no force).
//! * **Steal**: the cache may evict a page dirtied by a transaction that has not committed;
//!   the WAL rule makes its before images durable first, so it can be undone.
//! * **Torn pages**: every batch of page writes goes first to the doublewrite file
//!   `pages.dwb` (fsynced), then to the data file (fsynced). Recovery restores any data page
//!   whose CRC fails from the doublewrite copy.
//! * **Isolation**: strict two-phase locking at page granularity, no wait: a transaction
//!   writing a page that another active transaction wrote gets [`StoreError::Conflict`].
//!   Locks are held until the COMMIT is durable. Readers outside the writing transaction see
//!   the last committed bytes (the writer's before images are applied to a copy).
//! * **Recovery** (ARIES without the analysis-pass refinements): (1) repair torn pages from the
//!   doublewrite file; (2) *redo* every UPDATE and CLR in LSN order whose LSN is above the
//!   page's pageLSN ("repeat history", winners and losers alike); (3) *undo* the losers
//!   (transactions with no COMMIT or ABORT) in reverse LSN order, logging a CLR for each
//!   step, then an ABORT per loser, and fsync the log. A crash during recovery is safe: the
//!   next recovery redoes the CLRs and undoes again with the same before images.
//! * **Checkpoint**: flush every dirty page (WAL rule first), fsync the data file, then
//!   checkpoint the log at the oldest LSN still needed (the next LSN, or the BEGIN of the
//!   oldest active transaction), which deletes the segments below it.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::crc32c::Crc32c;
use super::error::WalError;
use super::wal::{CheckpointInfo, SyncPolicy, Wal, WalConfig, WalStats};
use super::WalRecovery;

/// Bytes in a page, header included.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of the page header (pageLSN, CRC, reserved).
pub const PAGE_HEADER_BYTES: usize = 16;
/// Bytes a page holds for the caller.
pub const PAGE_DATA_BYTES: usize = PAGE_SIZE - PAGE_HEADER_BYTES;

/// A transaction id: the LSN of its BEGIN record, so unique for the life of the store.
pub type TxnId = u64;

const K_BEGIN: u8 = 1;
const K_UPDATE: u8 = 2;
const K_COMMIT: u8 = 3;
const K_ABORT: u8 = 4;
const K_CLR: u8 = 5;

const DWB_MAGIC: u32 = 0x4457_4231; // "DWB1"

/// What went wrong in the page store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The log failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A data-file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another active transaction holds the page.
    #[error("page {page} is locked by active transaction {holder}")]
    Conflict {
        /// The page.
        page: u64,
        /// The transaction holding it.
        holder: TxnId,
    },
    /// No active transaction by that id (never begun, already committed or aborted).
    #[error("no active transaction {0}")]
    NoSuchTxn(TxnId),
    /// A page number, offset or length out of range, or a transaction too large.
    #[error("{0}")]
    OutOfRange(String),
    /// Bytes on disk that fail their check, or a log record that does not parse.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The configuration is unusable.
    #[error("invalid page store configuration: {0}")]
    Config(String),
    /// A blocking task failed (the runtime is shutting down).
    #[error("page store task failed: {0}")]
    Task(String),
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How to open a page store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageStoreConfig {
    /// Folder of `pages.db`, `pages.dwb` and the `wal/` log.
    pub dir: PathBuf,
    /// Frames in the buffer cache.
    pub cache_pages: usize,
    /// Highest page number + 1 accepted.
    pub max_pages: u64,
    /// Most updates one transaction may make (its undo list lives in memory).
    pub max_txn_updates: usize,
    /// The log's segment size.
    pub wal_segment_bytes: u64,
    /// The log's sync policy (commit waits for the fsync under every policy).
    pub sync: SyncPolicy,
}

impl PageStoreConfig {
    /// Defaults: 256 cached pages (1 MiB), up to 262,144 pages (1 GiB), 64 MiB log segments.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PageStoreConfig {
            dir: dir.into(),
            cache_pages: 256,
            max_pages: 1 << 18,
            max_txn_updates: 1 << 16,
            wal_segment_bytes: 64 << 20,
            sync: SyncPolicy::Batch,
        }
    }
}

/// What recovery did when the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecovery {
    /// The log's own recovery.
    pub wal: WalRecovery,
    /// Torn data pages restored from the doublewrite file.
    pub torn_pages_repaired: u64,
    /// Log records read.
    pub records_scanned: u64,
    /// UPDATE/CLR records re-applied (their page was older than them).
    pub redone: u64,
    /// UPDATE/CLR records already on their page.
    pub skipped: u64,
    /// Transactions found committed.
    pub committed: u64,
    /// Transactions found aborted.
    pub aborted: u64,
    /// Transactions without an outcome, rolled back.
    pub losers: Vec<TxnId>,
    /// Updates of losers undone.
    pub undone: u64,
}

/// What a store checkpoint did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCheckpoint {
    /// Dirty pages written.
    pub pages_flushed: u64,
    /// The log's checkpoint.
    pub wal: CheckpointInfo,
}

/// Counters of an open store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageStoreStats {
    /// Pages in the cache.
    pub cached_pages: usize,
    /// Dirty pages in the cache.
    pub dirty_pages: usize,
    /// Active transactions.
    pub active_txns: usize,
    /// Transactions committed since open.
    pub commits: u64,
    /// Transactions aborted since open.
    pub aborts: u64,
    /// Cache misses.
    pub misses: u64,
    /// Evictions of dirty pages.
    pub dirty_evictions: u64,
    /// Pages written to the data file.
    pub page_writes: u64,
    /// Page flushes that had to wait for the log first (the WAL rule at work).
    pub wal_rule_waits: u64,
    /// The log.
    pub wal: WalStats,
}

/// Handle to an open page store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PageStore {
    store: Arc<Store>,
}

#[derive(Debug)]
struct Store {
    wal: Wal,
    state: Mutex<Inner>,
}

#[derive(Debug)]
enum TxnPhase {
    Active,
    /// COMMIT queued, waiting for its fsync; still holds its locks.
    Committing,
}

#[derive(Debug)]
struct Txn {
    phase: TxnPhase,
    undo: Vec<Undo>,
    pages: HashSet<u64>,
}

#[derive(Debug, Clone)]
struct Undo {
    lsn: u64,
    page: u64,
    offset: usize,
    before: Vec<u8>,
}

#[derive(Debug)]
struct Frame {
    page: Option<u64>,
    data: Box<[u8]>,
    dirty: bool,
    referenced: bool,
}

#[derive(Debug)]
struct Inner {
    data: File,
    data_path: PathBuf,
    dwb: File,
    dwb_path: PathBuf,
    cache_pages: usize,
    max_pages: u64,
    max_txn_updates: usize,
    frames: Vec<Frame>,
    map: HashMap<u64, usize>,
    hand: usize,
    txns: HashMap<TxnId, Txn>,
    locks: HashMap<u64, TxnId>,
    commits: u64,
    aborts: u64,
    misses: u64,
    dirty_evictions: u64,
    page_writes: u64,
    wal_rule_waits: u64,
}

fn page_lsn(p: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[0..8]);
    u64::from_le_bytes(b)
}

fn set_page_lsn(p: &mut [u8], lsn: u64) {
    p[0..8].copy_from_slice(&lsn.to_le_bytes());
}

fn page_crc(p: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(&p[0..8]);
    c.update(&p[12..PAGE_SIZE]);
    c.finish()
}

/// A page is valid when its CRC matches, or when it was never written (all zero).
fn page_ok(p: &[u8]) -> bool {
    let stored = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    stored == page_crc(p) || p.iter().all(|&b| b == 0)
}

/// UPDATE: txn u64 | page u64 | offset u16 | len u16 | before | after.
fn enc_update(txn: u64, page: u64, offset: usize, before: &[u8], after: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + before.len() + after.len());
    v.extend_from_slice(&txn.to_le_bytes());
    v.extend_from_slice(&page.to_le_bytes());
    v.extend_from_slice(&(offset as u16).to_le_bytes());
    v.extend_from_slice(&(after.len() as u16).to_le_bytes());
    v.extend_from_slice(before);
    v.extend_from_slice(after);
    v
}

/// CLR: txn u64 | page u64 | offset u16 | len u16 | image.
fn enc_clr(txn: u64, page: u64, offset: usize, image: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + image.len());
    v.extend_from_slice(&txn.to_le_bytes());
    v.extend_from_slice(&page.to_le_bytes());
    v.extend_from_slice(&(offset as u16).to_le_bytes());
    v.extend_from_slice(&(image.len() as u16).to_le_bytes());
    v.extend_from_slice(image);
    v
}

/// A parsed UPDATE or CLR. For a CLR, `before` is empty and `after` is the image restored.
#[derive(Debug, PartialEq, Eq)]
struct Change<'a> {
    txn: u64,
    page: u64,
    offset: usize,
    before: &'a [u8],
    after: &'a [u8],
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn dec_change(b: &[u8], with_before: bool) -> Option<Change<'_>> {
    let txn = u64_at(b, 0)?;
    let page = u64_at(b, 8)?;
    let offset = u16_at(b, 16)? as usize;
    let len = u16_at(b, 18)? as usize;
    if offset + len > PAGE_DATA_BYTES {
        return None;
    }
    let body = b.get(20..)?;
    let (before, after) = if with_before {
        if body.len() != 2 * len {
            return None;
        }
        body.split_at(len)
    } else {
        if body.len() != len {
            return None;
        }
        (&body[..0], body)
    };
    Some(Change {
        txn,
        page,
        offset,
        before,
        after,
    })
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The frame holding `page`, loading it (and evicting another) if needed.
    fn frame(&mut self, wal: &Wal, page: u64) -> Result<usize, StoreError> {
        if let Some(&i) = self.map.get(&page) {
            self.frames[i].referenced = true;
            return Ok(i);
        }
        self.misses += 1;
        let i = if self.frames.len() < self.cache_pages {
            self.frames.push(Frame {
                page: None,
                data: vec![0u8; PAGE_SIZE].into_boxed_slice(),
                dirty: false,
                referenced: false,
            });
            self.frames.len() - 1
        } else {
            // Clock: pass over referenced frames once, clearing their bit.
            let n = self.frames.len();
            let mut v = self.hand % n;
            for _ in 0..2 * n {
                if !self.frames[v].referenced {
                    break;
                }
                self.frames[v].referenced = false;
                v = (v + 1) % n;
            }
            self.hand = (v + 1) % n;
            if self.frames[v].dirty {
                self.dirty_evictions += 1;
                self.flush(wal, &[v])?;
            }
            if let Some(old) = self.frames[v].page.take() {
                self.map.remove(&old);
            }
            v
        };
        let path = self.data_path.clone();
        let f = &mut self.frames[i];
        read_page(&self.data, &path, page, &mut f.data)?;
        if !page_ok(&f.data) {
            return Err(StoreError::Corrupt(format!(
                "page {page} of {} fails its CRC",
                path.display()
            )));
        }
        f.page = Some(page);
        f.dirty = false;
        f.referenced = true;
        self.map.insert(page, i);
        Ok(i)
    }

    /// Write frames to the data file, obeying the WAL rule, through the doublewrite file.
    fn flush(&mut self, wal: &Wal, idxs: &[usize]) -> Result<(), StoreError> {
        let idxs: Vec<usize> = idxs
            .iter()
            .copied()
            .filter(|&i| self.frames[i].dirty && self.frames[i].page.is_some())
            .collect();
        if idxs.is_empty() {
            return Ok(());
        }
        // The WAL rule: the log must be durable up to every page's LSN before the page is.
        let max_lsn = idxs
            .iter()
            .map(|&i| page_lsn(&self.frames[i].data))
            .max()
            .unwrap_or(0);
        if wal.durable_lsn() < max_lsn {
            self.wal_rule_waits += 1;
            wal.sync_to_blocking(max_lsn)?;
        }
        // Doublewrite: the whole batch, checksummed, fsynced, before touching the data file.
        let mut dwb = Vec::with_capacity(12 + idxs.len() * (8 + PAGE_SIZE));
        dwb.extend_from_slice(&DWB_MAGIC.to_le_bytes());
        dwb.extend_from_slice(&(idxs.len() as u32).to_le_bytes());
        for &i in &idxs {
            let f = &mut self.frames[i];
            let crc = page_crc(&f.data);
            f.data[8..12].copy_from_slice(&crc.to_le_bytes());
            dwb.extend_from_slice(&f.page.unwrap_or(0).to_le_bytes());
            dwb.extend_from_slice(&f.data);
        }
        let crc = super::crc32c::crc32c(&dwb);
        dwb.extend_from_slice(&crc.to_le_bytes());
        self.dwb
            .write_all_at(&dwb, 0)
            .and_then(|_| self.dwb.set_len(dwb.len() as u64))
            .and_then(|_| self.dwb.sync_data())
            .map_err(|e| io_err("write", &self.dwb_path, e))?;
        for &i in &idxs {
            let f = &self.frames[i];
            let off = f.page.unwrap_or(0) * PAGE_SIZE as u64;
            self.data
                .write_all_at(&f.data, off)
                .map_err(|e| io_err("write", &self.data_path, e))?;
        }
        self.data
            .sync_data()
            .map_err(|e| io_err("fsync", &self.data_path, e))?;
        for &i in &idxs {
            self.frames[i].dirty = false;
        }
        self.page_writes += idxs.len() as u64;
        Ok(())
    }

    fn flush_all(&mut self, wal: &Wal) -> Result<u64, StoreError> {
        let dirty: Vec<usize> = (0..self.frames.len())
            .filter(|&i| self.frames[i].dirty)
            .collect();
        self.flush(wal, &dirty)?;
        Ok(dirty.len() as u64)
    }

    /// Apply `bytes` at `offset` of `page` under LSN `lsn`.
    fn apply(
        &mut self,
        wal: &Wal,
        page: u64,
        offset: usize,
        bytes: &[u8],
        lsn: u64,
    ) -> Result<(), StoreError> {
        let i = self.frame(wal, page)?;
        let f = &mut self.frames[i];
        let at = PAGE_HEADER_BYTES + offset;
        f.data[at..at + bytes.len()].copy_from_slice(bytes);
        set_page_lsn(&mut f.data, lsn);
        f.dirty = true;
        Ok(())
    }

    fn active(&mut self, txn: TxnId) -> Result<&mut Txn, StoreError> {
        match self.txns.get_mut(&txn) {
            Some(t) if matches!(t.phase, TxnPhase::Active) => Ok(t),
            _ => Err(StoreError::NoSuchTxn(txn)),
        }
    }

    /// Undo `undo` (newest last) of `txn`, logging a CLR per step, then ABORT.
    fn rollback(&mut self, wal: &Wal, txn: TxnId, undo: &[Undo]) -> Result<u64, StoreError> {
        for u in undo.iter().rev() {
            let lsn = wal.enqueue(K_CLR, enc_clr(txn, u.page, u.offset, &u.before))?;
            self.apply(wal, u.page, u.offset, &u.before, lsn)?;
        }
        Ok(wal.enqueue(K_ABORT, txn.to_le_bytes().to_vec())?)
    }

    fn release(&mut self, txn: TxnId) {
        if let Some(t) = self.txns.remove(&txn) {
            for p in t.pages {
                self.locks.remove(&p);
            }
        }
    }
}

fn read_page(data: &File, path: &Path, page: u64, buf: &mut [u8]) -> Result<(), StoreError> {
    let off = page * PAGE_SIZE as u64;
    let mut n = 0;
    while n < buf.len() {
        match data.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path, e)),
        }
    }
    buf[n..].fill(0);
    Ok(())
}

/// Restore torn data pages from the doublewrite file. Returns the pages restored.
fn repair_from_dwb(data: &File, data_path: &Path, dwb_path: &Path) -> Result<u64, StoreError> {
    let Ok(b) = std::fs::read(dwb_path) else {
        return Ok(0);
    };
    let entry = 8 + PAGE_SIZE;
    let (Some(magic), Some(count)) = (b.get(0..4), b.get(4..8)) else {
        return Ok(0);
    };
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let Some(expected_len) = count.checked_mul(entry).and_then(|x| x.checked_add(12)) else {
        return Ok(0);
    };
    if magic != DWB_MAGIC.to_le_bytes() || b.len() != expected_len {
        return Ok(0); // torn doublewrite: the data file was not touched for that batch
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if super::crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Ok(0);
    }
    let mut repaired = 0;
    let mut cur = vec![0u8; PAGE_SIZE];
    for e in body[8..].chunks_exact(entry) {
        let page = u64::from_le_bytes(e[0..8].try_into().unwrap_or([0; 8]));
        let copy = &e[8..];
        read_page(data, data_path, page, &mut cur)?;
        if !page_ok(&cur) && page_ok(copy) {
            data.write_all_at(copy, page * PAGE_SIZE as u64)
                .map_err(|e| io_err("write", data_path, e))?;
            repaired += 1;
        }
    }
    if repaired > 0 {
        data.sync_data()
            .map_err(|e| io_err("fsync", data_path, e))?;
    }
    Ok(repaired)
}

impl PageStore {
    /// Open (or create) the store in `cfg.dir` and recover it: torn pages, redo, undo.
    pub async fn open(cfg: PageStoreConfig) -> Result<(PageStore, StoreRecovery), StoreError> {
        if cfg.cache_pages == 0 {
            return Err(StoreError::Config("cache_pages must be at least 1".into()));
        }
        if cfg.max_pages == 0 || cfg.max_pages > u64::MAX / PAGE_SIZE as u64 {
            return Err(StoreError::Config("max_pages out of range".into()));
        }
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io_err("create folder", &dir, e))?;
        let mut wcfg = WalConfig::new(dir.join("wal"));
        wcfg.segment_bytes = cfg.wal_segment_bytes;
        wcfg.sync = cfg.sync;
        // An UPDATE carries two images of at most one page's data.
        wcfg.max_record_bytes = (20 + 2 * PAGE_DATA_BYTES) as u32;
        let (wal, wal_rep) = Wal::open(wcfg).await?;
        let w = wal.clone();
        let (inner, rep) = tokio::task::spawn_blocking(move || recover(&cfg, &w, wal_rep))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let store = PageStore {
            store: Arc::new(Store {
                wal,
                state: Mutex::new(inner),
            }),
        };
        Ok((store, rep))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Wal, &mut Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let s = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = lock(&s.state);
            f(&s.wal, &mut g)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Start a transaction.
    pub async fn begin(&self) -> Result<TxnId, StoreError> {
        self.blocking(|wal, g| {
            let id = wal.enqueue(K_BEGIN, Vec::new())?;
            g.txns.insert(
                id,
                Txn {
                    phase: TxnPhase::Active,
                    undo: Vec::new(),
                    pages: HashSet::new(),
                },
            );
            Ok(id)
        })
        .await
    }

    /// Write `bytes` at `offset` of `page`'s data area in transaction `txn`: log an UPDATE
    /// with the before and after images, then change the cached page. Returns the record's
    /// LSN (now the page's pageLSN). The page is locked for `txn` until it ends.
    pub async fn write(
        &self,
        txn: TxnId,
        page: u64,
        offset: usize,
        bytes: Vec<u8>,
    ) -> Result<u64, StoreError> {
        self.blocking(move |wal, g| {
            if page >= g.max_pages {
                return Err(StoreError::OutOfRange(format!(
                    "page {page} beyond max_pages {}",
                    g.max_pages
                )));
            }
            if bytes.is_empty() || offset + bytes.len() > PAGE_DATA_BYTES {
                return Err(StoreError::OutOfRange(format!(
                    "write of {} bytes at {offset} does not fit in a page's {PAGE_DATA_BYTES} bytes",
                    bytes.len()
                )));
            }
            let max_updates = g.max_txn_updates;
            let t = g.active(txn)?;
            if t.undo.len() >= max_updates {
                return Err(StoreError::OutOfRange(format!(
                    "transaction {txn} reached max_txn_updates ({max_updates})"
                )));
            }
            if let Some(&holder) = g.locks.get(&page) {
                if holder != txn {
                    return Err(StoreError::Conflict { page, holder });
                }
            }
            let i = g.frame(wal, page)?;
            let at = PAGE_HEADER_BYTES + offset;
            let before = g.frames[i].data[at..at + bytes.len()].to_vec();
            let lsn = wal.enqueue(K_UPDATE, enc_update(txn, page, offset, &before, &bytes))?;
            g.apply(wal, page, offset, &bytes, lsn)?;
            g.locks.insert(page, txn);
            let t = g.active(txn)?;
            t.pages.insert(page);
            t.undo.push(Undo {
                lsn,
                page,
                offset,
                before,
            });
            Ok(lsn)
        })
        .await
    }

    /// Commit: append COMMIT and return its LSN once it is durable. The transaction's pages
    /// stay in the cache (they reach the data file on eviction or checkpoint).
    pub async fn commit(&self, txn: TxnId) -> Result<u64, StoreError> {
        let lsn = self
            .blocking(move |wal, g| {
                g.active(txn)?;
                let lsn = wal.enqueue(K_COMMIT, txn.to_le_bytes().to_vec())?;
                if let Some(t) = g.txns.get_mut(&txn) {
                    t.phase = TxnPhase::Committing;
                }
                Ok(lsn)
            })
            .await?;
        self.store.wal.sync_to(lsn).await?;
        self.blocking(move |_, g| {
            g.release(txn);
            g.commits += 1;
            Ok(lsn)
        })
        .await
    }

    /// Roll back: restore every before image (newest first, one CLR each), log ABORT.
    pub async fn abort(&self, txn: TxnId) -> Result<(), StoreError> {
        self.blocking(move |wal, g| {
            let undo = std::mem::take(&mut g.active(txn)?.undo);
            g.rollback(wal, txn, &undo)?;
            g.release(txn);
            g.aborts += 1;
            Ok(())
        })
        .await
    }

    /// Read `len` bytes at `offset` of `page`. Inside transaction `txn` its own writes are
    /// seen; otherwise the last committed bytes are.
    pub async fn read(
        &self,
        txn: Option<TxnId>,
        page: u64,
        offset: usize,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.blocking(move |wal, g| {
            if page >= g.max_pages || offset + len > PAGE_DATA_BYTES {
                return Err(StoreError::OutOfRange(format!(
                    "read of {len} bytes at {offset} of page {page} is out of range"
                )));
            }
            let i = g.frame(wal, page)?;
            let mut copy = g.frames[i].data[PAGE_HEADER_BYTES..].to_vec();
            if let Some(&holder) = g.locks.get(&page) {
                if Some(holder) != txn {
                    if let Some(t) = g.txns.get(&holder) {
                        for u in t.undo.iter().rev().filter(|u| u.page == page) {
                            copy[u.offset..u.offset + u.before.len()].copy_from_slice(&u.before);
                        }
                    }
                }
            }
            Ok(copy[offset..offset + len].to_vec())
        })
        .await
    }

    /// Flush every dirty page (after the log, per the WAL rule), then checkpoint the log at
    /// the oldest LSN still needed, deleting the segments below it.
    pub async fn checkpoint(&self) -> Result<StoreCheckpoint, StoreError> {
        let (pages_flushed, upto) = self
            .blocking(|wal, g| {
                let oldest_active = g.txns.keys().copied().min();
                let upto = oldest_active
                    .map(|b| b.min(wal.next_lsn()))
                    .unwrap_or_else(|| wal.next_lsn());
                let n = g.flush_all(wal)?;
                Ok((n, upto))
            })
            .await?;
        let wal = self.store.wal.checkpoint(upto).await?;
        Ok(StoreCheckpoint { pages_flushed, wal })
    }

    /// Counters. Takes the store's lock, which a page flush holds for its fsyncs.
    pub fn stats(&self) -> PageStoreStats {
        let g = lock(&self.store.state);
        PageStoreStats {
            cached_pages: g.map.len(),
            dirty_pages: g.frames.iter().filter(|f| f.dirty).count(),
            active_txns: g.txns.len(),
            commits: g.commits,
            aborts: g.aborts,
            misses: g.misses,
            dirty_evictions: g.dirty_evictions,
            page_writes: g.page_writes,
            wal_rule_waits: g.wal_rule_waits,
            wal: self.store.wal.stats(),
        }
    }

    /// The store's log.
    pub fn wal(&self) -> &Wal {
        &self.store.wal
    }

    /// Checkpoint (flushing every page), then close the log.
    pub async fn close(self) -> Result<(), StoreError> {
        self.checkpoint().await?;
        self.store.wal.clone().close().await;
        Ok(())
    }

    /// Test hook: stop as a crash would, losing every cached page; the log keeps what was
    /// queued (as the kernel would after SIGKILL).
    #[cfg(test)]
    async fn crash(self) {
        self.store.wal.clone().close().await;
    }
}

/// Blocking part of `open`: data files, torn-page repair, redo, undo.
fn recover(
    cfg: &PageStoreConfig,
    wal: &Wal,
    wal_rep: WalRecovery,
) -> Result<(Inner, StoreRecovery), StoreError> {
    let data_path = cfg.dir.join("pages.db");
    let dwb_path = cfg.dir.join("pages.dwb");
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(|e| io_err("open", p, e))
    };
    let data = open(&data_path)?;
    let dwb = open(&dwb_path)?;
    super::segment::sync_dir(&cfg.dir)?;
    let mut rep = StoreRecovery {
        wal: wal_rep,
        torn_pages_repaired: repair_from_dwb(&data, &data_path, &dwb_path)?,
        ..StoreRecovery::default()
    };
    let mut g = Inner {
        data,
        data_path,
        dwb,
        dwb_path,
        cache_pages: cfg.cache_pages,
        max_pages: cfg.max_pages,
        max_txn_updates: cfg.max_txn_updates,
        frames: Vec::new(),
        map: HashMap::new(),
        hand: 0,
        txns: HashMap::new(),
        locks: HashMap::new(),
        commits: 0,
        aborts: 0,
        misses: 0,
        dirty_evictions: 0,
        page_writes: 0,
        wal_rule_waits: 0,
    };
    // Redo: repeat history. In-flight transactions keep their undo lists.
    let mut inflight: HashMap<TxnId, Vec<Undo>> = HashMap::new();
    for r in wal.read_from(0)? {
        let r = r?;
        rep.records_scanned += 1;
        let bad = |what: &str| StoreError::Corrupt(format!("{what} record at LSN {}", r.lsn));
        match r.kind {
            K_BEGIN => {
                inflight.insert(r.lsn, Vec::new());
            }
            K_UPDATE | K_CLR => {
                let c = dec_change(&r.payload, r.kind == K_UPDATE).ok_or_else(|| bad("bad"))?;
                if c.page >= cfg.max_pages {
                    return Err(bad("page beyond max_pages in"));
                }
                let i = g.frame(wal, c.page)?;
                if page_lsn(&g.frames[i].data) < r.lsn {
                    g.apply(wal, c.page, c.offset, c.after, r.lsn)?;
                    rep.redone += 1;
                } else {
                    rep.skipped += 1;
                }
                if r.kind == K_UPDATE {
                    inflight.entry(c.txn).or_default().push(Undo {
                        lsn: r.lsn,
                        page: c.page,
                        offset: c.offset,
                        before: c.before.to_vec(),
                    });
                }
            }
            K_COMMIT | K_ABORT => {
                let txn = u64_at(&r.payload, 0).ok_or_else(|| bad("bad end"))?;
                inflight.remove(&txn);
                if r.kind == K_COMMIT {
                    rep.committed += 1;
                } else {
                    rep.aborted += 1;
                }
            }
            _ => return Err(bad("unknown")),
        }
    }
    // Undo the losers, newest change first across all of them.
    let mut losers: Vec<TxnId> = inflight.keys().copied().collect();
    losers.sort_unstable();
    let mut all: Vec<(TxnId, Undo)> = inflight
        .into_iter()
        .flat_map(|(t, v)| v.into_iter().map(move |u| (t, u)))
        .collect();
    all.sort_by_key(|(_, u)| std::cmp::Reverse(u.lsn));
    for (t, u) in &all {
        let lsn = wal.enqueue(K_CLR, enc_clr(*t, u.page, u.offset, &u.before))?;
        g.apply(wal, u.page, u.offset, &u.before, lsn)?;
        rep.undone += 1;
    }
    let mut last = None;
    for &t in &losers {
        last = Some(wal.enqueue(K_ABORT, t.to_le_bytes().to_vec())?);
    }
    if let Some(l) = last {
        wal.sync_to_blocking(l)?;
    }
    rep.losers = losers;
    Ok((g, rep))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, cache: usize) -> PageStoreConfig {
        let mut c = PageStoreConfig::new(dir);
        c.cache_pages = cache;
        c.wal_segment_bytes = 64 << 10;
        c
    }

    async fn open(dir: &Path, cache: usize) -> (PageStore, StoreRecovery) {
        PageStore::open(cfg(dir, cache)).await.expect("open")
    }

    fn raw_page(dir: &Path, page: u64) -> Vec<u8> {
        let b = std::fs::read(dir.join("pages.db")).unwrap_or_default();
        let at = page as usize * PAGE_SIZE;
        b.get(at..at + PAGE_SIZE)
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| vec![0; PAGE_SIZE])
    }

    #[test]
    fn change_records_round_trip_and_refuse_garbage() {
        let u = enc_update(7, 3, 10, b"old", b"new");
        let c = dec_change(&u, true).expect("update");
        assert_eq!(
            (c.txn, c.page, c.offset, c.before, c.after),
            (7, 3, 10, &b"old"[..], &b"new"[..])
        );
        let r = enc_clr(7, 3, 10, b"old");
        let c = dec_change(&r, false).expect("clr");
        assert_eq!((c.after, c.before.len()), (&b"old"[..], 0));
        assert!(dec_change(&u[..u.len() - 1], true).is_none());
        assert!(dec_change(&[0u8; 5], true).is_none());
        let mut far = enc_update(1, 1, PAGE_DATA_BYTES - 1, b"ab", b"cd");
        far[16..18].copy_from_slice(&((PAGE_DATA_BYTES - 1) as u16).to_le_bytes());
        assert!(dec_change(&far, true).is_none());
    }

    #[test]
    fn page_checksum_detects_torn_pages() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(page_ok(&p));
        p[100] = 1;
        set_page_lsn(&mut p, 5);
        let crc = page_crc(&p);
        p[8..12].copy_from_slice(&crc.to_le_bytes());
        assert!(page_ok(&p));
        p[2000] ^= 0x40;
        assert!(!page_ok(&p));
    }

    #[tokio::test]
    async fn commit_survives_crash_before_any_page_flush() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path(), 64).await;
        let t = s.begin().await.expect("begin");
        s.write(t, 3, 0, b"committed".to_vec())
            .await
            .expect("write");
        s.commit(t).await.expect("commit");
        assert_eq!(
            s.stats().page_writes,
            0,
            "no force: the page is not written at commit"
        );
        s.crash().await;
        assert_eq!(
            raw_page(d.path(), 3),
            vec![0u8; PAGE_SIZE],
            "data file untouched"
        );
        let (s, rep) = open(d.path(), 64).await;
        assert_eq!(rep.redone, 1);
        assert!(rep.losers.is_empty());
        assert_eq!(s.read(None, 3, 0, 9).await.expect("read"), b"committed");
    }

    #[tokio::test]
    async fn uncommitted_stolen_pages_are_undone() {
        let d = tempfile::tempdir().expect("tmp");
        // The log syncs only when asked, so that every steal of a dirty page must first wait
        // for the log (under the default policy its own fsync may already have covered it).
        let mut c = cfg(d.path(), 2);
        c.sync = SyncPolicy::Interval(std::time::Duration::from_secs(3600));
        let (s, _) = PageStore::open(c).await.expect("open");
        let t0 = s.begin().await.expect("begin");
        for p in 0..6 {
            s.write(t0, p, 0, format!("base{p}").into_bytes())
                .await
                .expect("w");
        }
        s.commit(t0).await.expect("commit");
        let t = s.begin().await.expect("begin");
        for p in 0..6 {
            s.write(t, p, 0, format!("LOSR{p}").into_bytes())
                .await
                .expect("w");
        }
        // With 2 frames, pages of the uncommitted transaction were evicted (steal)...
        let st = s.stats();
        assert!(st.dirty_evictions > 0);
        assert!(st.wal_rule_waits > 0, "each steal waited for the log first");
        // ...and the WAL rule held: every page on disk has its LSN durable in the log.
        for p in 0..6 {
            assert!(page_lsn(&raw_page(d.path(), p)) <= s.wal().durable_lsn());
        }
        assert!((0..6).any(|p| raw_page(d.path(), p)[16..21] == *b"LOSR0"
            || raw_page(d.path(), p)[16..20] == *b"LOSR"));
        s.crash().await;
        let (s, rep) = open(d.path(), 2).await;
        assert_eq!(rep.losers, vec![t]);
        assert_eq!(rep.undone, 6);
        for p in 0..6 {
            assert_eq!(
                s.read(None, p, 0, 5).await.expect("read"),
                format!("base{p}").into_bytes()
            );
        }
        // Recovery wrote CLRs and ABORT: a second crash and recovery finds no loser.
        s.crash().await;
        let (s, rep) = open(d.path(), 2).await;
        assert!(rep.losers.is_empty());
        assert_eq!(s.read(None, 5, 0, 5).await.expect("read"), b"base5");
    }

    #[tokio::test]
    async fn abort_restores_and_conflicts_are_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path(), 8).await;
        let a = s.begin().await.expect("begin");
        s.write(a, 1, 10, b"AAAA".to_vec()).await.expect("w");
        s.write(a, 1, 12, b"BB".to_vec()).await.expect("w");
        let b = s.begin().await.expect("begin");
        assert!(matches!(
            s.write(b, 1, 0, b"x".to_vec()).await,
            Err(StoreError::Conflict { page: 1, holder }) if holder == a
        ));
        // Others see the committed bytes; `a` sees its own.
        assert_eq!(s.read(None, 1, 10, 4).await.expect("r"), vec![0; 4]);
        assert_eq!(s.read(Some(a), 1, 10, 4).await.expect("r"), b"AABB");
        s.abort(a).await.expect("abort");
        assert_eq!(s.read(None, 1, 10, 4).await.expect("r"), vec![0; 4]);
        assert!(matches!(s.commit(a).await, Err(StoreError::NoSuchTxn(_))));
        s.write(b, 1, 0, b"x".to_vec())
            .await
            .expect("lock free now");
        s.commit(b).await.expect("commit");
        // Bad input.
        let c = s.begin().await.expect("begin");
        assert!(matches!(
            s.write(c, 0, PAGE_DATA_BYTES, b"x".to_vec()).await,
            Err(StoreError::OutOfRange(_))
        ));
        assert!(matches!(
            s.write(c, 1 << 40, 0, b"x".to_vec()).await,
            Err(StoreError::OutOfRange(_))
        ));
        assert!(matches!(
            s.write(c, 0, 0, Vec::new()).await,
            Err(StoreError::OutOfRange(_))
        ));
        assert!(matches!(
            s.read(None, 0, PAGE_DATA_BYTES, 1).await,
            Err(StoreError::OutOfRange(_))
        ));
        s.close().await.expect("close");
        let (s, rep) = open(d.path(), 8).await;
        assert_eq!(rep.losers, vec![c]);
        assert_eq!(s.read(None, 1, 0, 1).await.expect("r"), b"x");
        assert_eq!(s.read(None, 1, 10, 4).await.expect("r"), vec![0; 4]);
    }

    #[tokio::test]
    async fn checkpoint_flushes_then_truncates_the_log() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path(), 16).await;
        for i in 0..400u64 {
            let t = s.begin().await.expect("begin");
            s.write(t, i % 10, 0, vec![i as u8; 2000]).await.expect("w");
            s.commit(t).await.expect("commit");
        }
        let before = s.wal().stats();
        assert!(before.segments > 5, "{before:?}");
        let ck = s.checkpoint().await.expect("checkpoint");
        assert_eq!(ck.pages_flushed, 10);
        assert!(ck.wal.segments_deleted > 0);
        assert_eq!(s.stats().dirty_pages, 0);
        s.crash().await;
        let (s, rep) = open(d.path(), 16).await;
        assert_eq!(rep.redone, 0);
        for p in 0..10u64 {
            let last = (390..400).find(|i| i % 10 == p).expect("exists");
            assert_eq!(s.read(None, p, 0, 1).await.expect("r"), vec![last as u8]);
        }
    }

    #[tokio::test]
    async fn active_transaction_holds_back_checkpoint_truncation() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path(), 4).await;
        let old = s.begin().await.expect("begin");
        s.write(old, 0, 0, b"old!".to_vec()).await.expect("w");
        for i in 0..200u64 {
            let t = s.begin().await.expect("begin");
            s.write(t, 1 + i % 3, 0, vec![1; 2000]).await.expect("w");
            s.commit(t).await.expect("commit");
        }
        let ck = s.checkpoint().await.expect("checkpoint");
        assert!(ck.wal.upto_lsn <= old);
        s.crash().await;
        // The loser's page was flushed by the checkpoint; its UPDATE is still in the log.
        assert_eq!(&raw_page(d.path(), 0)[16..20], b"old!");
        let (s, rep) = open(d.path(), 4).await;
        assert_eq!(rep.losers, vec![old]);
        assert_eq!(s.read(None, 0, 0, 4).await.expect("r"), vec![0; 4]);
    }

    #[tokio::test]
    async fn torn_page_is_repaired_from_the_doublewrite_file() {
        let d = tempfile::tempdir().expect("tmp");
        let (s, _) = open(d.path(), 4).await;
        let t = s.begin().await.expect("begin");
        s.write(t, 2, 0, vec![7; 3000]).await.expect("w");
        s.commit(t).await.expect("commit");
        s.checkpoint().await.expect("checkpoint");
        s.crash().await;
        // Tear page 2: its second half reverts to zeros, as after a power cut mid-write.
        let path = d.path().join("pages.db");
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(&[0u8; 2048], 2 * PAGE_SIZE as u64 + 2048)
            .expect("tear");
        drop(f);
        let (s, rep) = open(d.path(), 4).await;
        assert_eq!(rep.torn_pages_repaired, 1);
        assert_eq!(s.read(None, 2, 0, 3000).await.expect("r"), vec![7; 3000]);
    }
}
