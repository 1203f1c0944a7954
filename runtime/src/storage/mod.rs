//! Durable storage (design 40): the segmented write-ahead log used by durable plugins, and a
//! small page store that obeys the WAL rule.
//!
//! * [`Wal`]: records framed with length + CRC32C in segment files, group-commit fsync,
//!   checkpoints that delete released segments, recovery that cuts a torn or corrupt tail.
//! * [`PageStore`]: fixed-size pages in a data file behind a bounded buffer cache, with
//!   transactions logged in their own [`Wal`] (BEGIN / UPDATE with before and after images /
//!   COMMIT / ABORT); a dirty page reaches the data file only once the log is durable up to
//!   its page LSN; recovery redoes history and then undoes the losers.

mod crc32c;
mod error;
mod page_store;
mod record;
mod segment;
mod wal;

pub use error::WalError;
pub use page_store::{
    PageStore, PageStoreConfig, PageStoreStats, StoreCheckpoint, StoreError, StoreRecovery, TxnId,
    PAGE_DATA_BYTES, PAGE_HEADER_BYTES, PAGE_SIZE,
};
pub use record::{Record, MAX_RECORD_BYTES_LIMIT, RECORD_HEADER_BYTES};
pub use segment::WalRecovery;
pub use wal::{
    CheckpointInfo, SyncPolicy, Wal, WalConfig, WalReader, WalStats, WalVerify,
    DEFAULT_MAX_RECORD_BYTES, DEFAULT_SEGMENT_BYTES, MAX_APPEND_MANY_BYTES,
};

/// Replace the file at `path` with `bytes` durably: write a temporary file beside it, fsync
/// it, rename it over `path`, fsync the folder (created if missing). A crash leaves either
/// the old file or the new one, never a mix.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
