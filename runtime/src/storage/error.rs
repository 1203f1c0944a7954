//! The one error type of the WAL (and of the page store's log).

use std::path::PathBuf;

/// What went wrong with the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid WAL configuration: {0}")]
    Config(String),
    /// A payload above `max_record_bytes`.
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// A request that cannot be satisfied as asked (empty batch, LSN out of range...).
    #[error("{0}")]
    InvalidArgument(String),
    /// Reading from an LSN that a checkpoint already removed.
    #[error("LSN {requested} was removed by a checkpoint; the log starts at {first}")]
    Truncated {
        /// LSN asked for.
        requested: u64,
        /// First LSN still in the log.
        first: u64,
    },
    /// Bytes on disk that are not the expected record (found while reading, after open).
    #[error("corrupt record in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// Segment file.
        path: PathBuf,
        /// Byte offset of the record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Another process or another open handle holds the log's folder.
    #[error("WAL folder {0} is locked by another open log")]
    Locked(PathBuf),
    /// An earlier write or fsync failed; the log refuses further writes until reopened
    /// (after a failed fsync the page cache's state is unknown, so recovery must decide).
    #[error("WAL is failed after an I/O error ({0}); reopen it to recover")]
    Poisoned(String),
    /// The log was closed.
    #[error("WAL is closed")]
    Closed,
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WalError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
