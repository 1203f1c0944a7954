//! Wire types of the `wal` plugin and the `dsys wal` subcommand that builds them.

use dsys_runtime::storage::{CheckpointInfo, WalRecovery, WalStats, WalVerify};
use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

dsys_runtime::plugin_api!(WalApi, "wal", WalRequest, WalResponse);

/// Longest text `dsys wal append` accepts.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Most records one `read` returns.
pub const MAX_READ_LIMIT: u32 = 10_000;
/// Record type of the texts appended from the CLI.
pub const KIND_TEXT: u8 = 1;

/// Requests. `node`: the node whose log to use (default: the node that receives the request,
/// which forwards to `node` otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalRequest {
    /// Append one text record; answered once it is durable.
    Append {
        /// Target node.
        node: Option<String>,
        /// The text.
        text: String,
    },
    /// Records from an LSN on.
    Read {
        /// Target node.
        node: Option<String>,
        /// First LSN (0: the first one kept).
        from: u64,
        /// Most records returned.
        limit: u32,
    },
    /// Re-read the whole log checking every CRC.
    Verify {
        /// Target node.
        node: Option<String>,
    },
    /// Record a checkpoint and delete the segments wholly below it.
    Checkpoint {
        /// Target node.
        node: Option<String>,
        /// Checkpoint LSN (default: the next LSN, releasing every closed segment).
        upto: Option<u64>,
    },
    /// Counters, positions, and what recovery did at start.
    Stats {
        /// Target node.
        node: Option<String>,
    },
}

impl WalRequest {
    /// The node this request targets, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            WalRequest::Append { node, .. }
            | WalRequest::Read { node, .. }
            | WalRequest::Verify { node }
            | WalRequest::Checkpoint { node, .. }
            | WalRequest::Stats { node } => node.as_deref(),
        }
    }

    /// The same request, to be served where it lands (forwarded form).
    pub fn local(self) -> Self {
        match self {
            WalRequest::Append { text, .. } => WalRequest::Append { node: None, text },
            WalRequest::Read { from, limit, .. } => WalRequest::Read {
                node: None,
                from,
                limit,
            },
            WalRequest::Verify { .. } => WalRequest::Verify { node: None },
            WalRequest::Checkpoint { upto, .. } => WalRequest::Checkpoint { node: None, upto },
            WalRequest::Stats { .. } => WalRequest::Stats { node: None },
        }
    }
}

/// One record as shown to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its LSN.
    pub lsn: u64,
    /// Its type.
    pub kind: u8,
    /// Payload length.
    pub bytes: usize,
    /// Payload as text (invalid UTF-8 replaced).
    pub text: String,
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalResponse {
    /// The record is durable.
    Appended {
        /// Node whose log holds it.
        node: String,
        /// Its LSN.
        lsn: u64,
    },
    /// Records read.
    Records {
        /// Node read.
        node: String,
        /// The records, in LSN order.
        entries: Vec<Entry>,
        /// LSN to continue from, if there may be more.
        next: Option<u64>,
    },
    /// Result of a full scan.
    Verify {
        /// Node checked.
        node: String,
        /// The scan.
        report: WalVerify,
    },
    /// A checkpoint was recorded.
    Checkpoint {
        /// Node.
        node: String,
        /// What it did.
        info: CheckpointInfo,
    },
    /// Counters.
    Stats {
        /// Node.
        node: String,
        /// The log's counters.
        stats: WalStats,
        /// What recovery did when the plugin started.
        recovery: WalRecovery,
    },
}

/// `dsys wal ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WalCommand {
    /// Append TEXT as one record; prints its LSN once it is fsynced.
    Append {
        /// The text (at most 64 KiB).
        text: String,
        /// Use this node's log instead of the answering node's.
        #[arg(long)]
        node: Option<String>,
    },
    /// Print records from an LSN on.
    Read {
        /// First LSN (default: the first one kept).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Most records to print.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Use this node's log.
        #[arg(long)]
        node: Option<String>,
    },
    /// Re-read every segment, checking each record's CRC and LSN.
    Verify {
        /// Use this node's log.
        #[arg(long)]
        node: Option<String>,
    },
    /// Record a checkpoint and delete the segments wholly below it.
    Checkpoint {
        /// Checkpoint LSN (default: everything written so far).
        #[arg(long)]
        upto: Option<u64>,
        /// Use this node's log.
        #[arg(long)]
        node: Option<String>,
    },
    /// Positions, segment count, appends, fsyncs, average batch, last recovery.
    Stats {
        /// Use this node's log.
        #[arg(long)]
        node: Option<String>,
    },
}

impl WalCommand {
    /// The request this command sends.
    pub fn request(&self) -> WalRequest {
        match self.clone() {
            WalCommand::Append { text, node } => WalRequest::Append { node, text },
            WalCommand::Read { from, limit, node } => WalRequest::Read { node, from, limit },
            WalCommand::Verify { node } => WalRequest::Verify { node },
            WalCommand::Checkpoint { upto, node } => WalRequest::Checkpoint { node, upto },
            WalCommand::Stats { node } => WalRequest::Stats { node },
        }
    }
}

impl Render for WalResponse {
    fn human(&self) -> String {
        match self {
            WalResponse::Appended { node, lsn } => format!("appended at LSN {lsn} on {node}"),
            WalResponse::Records {
                node,
                entries,
                next,
            } => {
                let mut s = format!("{} records from {node}\n", entries.len());
                for e in entries {
                    s.push_str(&format!(
                        "{:>10}  type {:<3} {:>6} B  {}\n",
                        e.lsn,
                        e.kind,
                        e.bytes,
                        e.text.escape_debug()
                    ));
                }
                if let Some(n) = next {
                    s.push_str(&format!("more: --from {n}\n"));
                }
                s
            }
            WalResponse::Verify { node, report } => {
                let head = match &report.error {
                    None => "OK".to_string(),
                    Some(e) => format!("DAMAGED: {e}"),
                };
                format!(
                    "{head} ({node}): {} segments, {} records (LSN {}..={}), {} payload bytes, every CRC checked",
                    report.segments,
                    report.records,
                    report.first_lsn,
                    report.last_lsn,
                    report.payload_bytes
                )
            }
            WalResponse::Checkpoint { node, info } => format!(
                "checkpoint at LSN {} on {node}: {} segments deleted, {} bytes freed, log now starts at LSN {}",
                info.upto_lsn, info.segments_deleted, info.bytes_freed, info.first_lsn
            ),
            WalResponse::Stats {
                node,
                stats,
                recovery,
            } => {
                let mut s = format!(
                    "{node}: LSN {}..={} (durable {}), {} segments, {} bytes, sync {}\n",
                    stats.first_lsn,
                    stats.last_lsn,
                    stats.durable_lsn,
                    stats.segments,
                    stats.bytes,
                    stats.sync
                );
                s.push_str(&format!(
                    "since start: {} appends, {} records, {} fsyncs, {:.1} records per batch, checkpoint {}\n",
                    stats.appends,
                    stats.records,
                    stats.fsyncs,
                    stats.avg_batch_records,
                    stats.checkpoint_lsn
                ));
                s.push_str(&format!(
                    "recovery at start: {} records in {} segments, {} bytes cut{}\n",
                    recovery.records,
                    recovery.segments,
                    recovery.truncated_bytes,
                    recovery
                        .cut
                        .as_ref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default()
                ));
                if let Some(p) = &stats.poisoned {
                    s.push_str(&format!("FAILED: {p}\n"));
                }
                s
            }
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            WalResponse::Verify { report, .. } if report.error.is_some() => 1,
            WalResponse::Stats { stats, .. } if stats.poisoned.is_some() => 1,
            _ => 0,
        }
    }
}
