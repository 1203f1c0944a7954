//! Wire types of the `cache` plugin and the `dsys cache` subcommand.

use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

use crate::resp::Frame;

dsys_runtime::plugin_api!(CacheApi, "cache", CacheRequest, CacheResponse);

/// Longest key accepted from the CLI and between nodes.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Most commands in one node-to-node batch.
pub const MAX_BATCH: usize = 4096;

/// One replicated key state: the value and absolute expiry (ms since the epoch), or a
/// deletion (`value: None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplItem {
    /// Key.
    pub key: Vec<u8>,
    /// New value, or `None` when the key was deleted.
    pub value: Option<Vec<u8>>,
    /// Absolute expiry.
    pub expire_at: Option<u64>,
    /// A hand-off after a membership change: applied only when the receiver does not hold
    /// the key, so it never overwrites a newer write.
    pub if_absent: bool,
}

/// Requests. The first five are for clients (any node answers); the rest are between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CacheRequest {
    /// Read KEY.
    Get {
        /// Key.
        key: String,
    },
    /// Write KEY = VALUE, with an optional TTL.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Time to live in milliseconds.
        ttl_ms: Option<u64>,
    },
    /// Delete KEY.
    Del {
        /// Key.
        key: String,
    },
    /// This node's figures.
    Stats,
    /// Delete every key starting with PREFIX on every node.
    Invalidate {
        /// Prefix.
        prefix: String,
    },
    /// Run these RESP commands here, in order (the sender found this node to be their
    /// owner, or, with `replica`, the owner was unreachable and this node holds the copy).
    Exec {
        /// Commands (each a list of arguments).
        cmds: Vec<Vec<Vec<u8>>>,
        /// Executed by the replica because the primary did not answer.
        replica: bool,
    },
    /// Replica copy: apply these key states.
    Replicate(Vec<ReplItem>),
    /// Delete keys with this prefix on this node only.
    LocalInvalidate {
        /// Prefix.
        prefix: String,
    },
    /// How many keys this node holds as their primary (for a cluster-wide DBSIZE).
    CountPrimary,
}

/// A node's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Node.
    pub node: String,
    /// The RESP port it listens on.
    pub resp_port: u16,
    /// Keys held (primary and replica copies).
    pub keys: u64,
    /// Approximate bytes used.
    pub used_memory: u64,
    /// Memory limit.
    pub maxmemory: u64,
    /// Eviction policy.
    pub policy: String,
    /// Reads that found the key.
    pub hits: u64,
    /// Reads that did not.
    pub misses: u64,
    /// Keys evicted.
    pub evictions: u64,
    /// Keys expired.
    pub expired: u64,
    /// Open RESP connections.
    pub clients: u64,
    /// Replication items that could not be delivered.
    pub repl_dropped: u64,
    /// Values loaded from `kv` by read-through.
    pub loads: u64,
}

/// Answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CacheResponse {
    /// A read.
    Value {
        /// Key.
        key: String,
        /// The value, if present.
        value: Option<Vec<u8>>,
    },
    /// A write or delete was done; how many keys it changed.
    Done(u64),
    /// Figures.
    Stats(CacheStats),
    /// Keys deleted by an invalidation, summed over the nodes that answered, and those nodes.
    Invalidated {
        /// Keys deleted.
        keys: u64,
        /// Nodes that answered.
        nodes: Vec<String>,
    },
    /// Replies to [`CacheRequest::Exec`], in order.
    Replies(Vec<Frame>),
}

/// `dsys cache ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CacheCommand {
    /// Read KEY (exit 1 when missing).
    Get {
        /// Key.
        key: String,
    },
    /// Write KEY = VALUE.
    Set {
        /// Key.
        key: String,
        /// Value (UTF-8 text).
        value: String,
        /// Time to live in milliseconds.
        #[arg(long)]
        ttl_ms: Option<u64>,
    },
    /// Delete KEY.
    Del {
        /// Key.
        key: String,
    },
    /// Figures of the answering node (hits, misses, evictions, keys, memory, RESP port).
    Stats,
    /// Delete every key starting with PREFIX, on all nodes.
    Invalidate {
        /// Prefix.
        prefix: String,
    },
}

impl CacheCommand {
    /// The request this command sends.
    pub fn request(&self) -> CacheRequest {
        match self {
            CacheCommand::Get { key } => CacheRequest::Get { key: key.clone() },
            CacheCommand::Set { key, value, ttl_ms } => CacheRequest::Set {
                key: key.clone(),
                value: value.clone().into_bytes(),
                ttl_ms: *ttl_ms,
            },
            CacheCommand::Del { key } => CacheRequest::Del { key: key.clone() },
            CacheCommand::Stats => CacheRequest::Stats,
            CacheCommand::Invalidate { prefix } => CacheRequest::Invalidate {
                prefix: prefix.clone(),
            },
        }
    }
}

impl Render for CacheResponse {
    fn human(&self) -> String {
        match self {
            CacheResponse::Value { key, value } => match value {
                Some(v) => String::from_utf8_lossy(v).into_owned(),
                None => format!("not found: {key}"),
            },
            CacheResponse::Done(n) => format!("ok ({n})"),
            CacheResponse::Stats(s) => format!(
                "node {}: resp port {}, {} keys, {} / {} bytes ({}), {} hits, {} misses, {} evictions, {} expired, {} clients",
                s.node,
                s.resp_port,
                s.keys,
                s.used_memory,
                s.maxmemory,
                s.policy,
                s.hits,
                s.misses,
                s.evictions,
                s.expired,
                s.clients
            ),
            CacheResponse::Invalidated { keys, nodes } => {
                format!("invalidated {keys} keys on {} nodes ({})", nodes.len(), nodes.join(","))
            }
            CacheResponse::Replies(r) => format!("{} replies", r.len()),
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            CacheResponse::Value { value: None, .. } => 1,
            _ => 0,
        }
    }
}
