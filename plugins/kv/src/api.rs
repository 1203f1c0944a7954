//! Wire types of the `kv` plugin and the `dsys kv` subcommand.

use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

use crate::version::Version;

dsys_runtime::plugin_api!(KvApi, "kv", KvRequest, KvResponse);

/// Longest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most items in one replication batch.
pub const MAX_BATCH: usize = 4096;
/// Most results of one scan.
pub const MAX_SCAN: usize = 10_000;

/// Requests. The first four are for clients (any node coordinates); the rest are between
/// nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KvRequest {
    /// Write `value` under `key`, acknowledged by `w` replicas (default from config).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Write quorum.
        w: Option<u8>,
    },
    /// Read `key` from `r` replicas (default from config), newest version wins.
    Get {
        /// Key.
        key: String,
        /// Read quorum.
        r: Option<u8>,
    },
    /// Delete `key` (a tombstone, replicated like a write).
    Del {
        /// Key.
        key: String,
        /// Write quorum.
        w: Option<u8>,
    },
    /// Keys starting with `prefix`, newest version of each across alive nodes.
    Scan {
        /// Prefix ("" for all).
        prefix: String,
        /// Most results.
        limit: usize,
    },
    /// Which nodes hold `key` and which version each has.
    Locate {
        /// Key.
        key: String,
    },
    /// This node's store figures.
    Stats,
    /// Replica write: store these versions durably (newest wins), then acknowledge.
    Replicate(Vec<(String, Version)>),
    /// Replica read of one key.
    Read(String),
    /// Replica read of several keys (anti-entropy); absent keys are left out.
    Fetch(Vec<String>),
    /// Replica scan of this node's store.
    LocalScan {
        /// Prefix.
        prefix: String,
        /// Most results.
        limit: usize,
    },
    /// Keep these versions for `target`, which did not answer, and deliver them later.
    StoreHints {
        /// The replica they belong to.
        target: String,
        /// The versions.
        items: Vec<(String, Version)>,
    },
    /// Hashes of some nodes of the Merkle tree over the keys this node and `peer` both
    /// replicate (anti-entropy): level `level`, positions `indices` (empty: the whole level).
    MerkleNodes {
        /// The other replica.
        peer: String,
        /// Tree depth.
        depth: u32,
        /// Level (0 is the root).
        level: u32,
        /// Positions within the level.
        indices: Vec<u32>,
        /// Fingerprint of the asker's ring: trees are only comparable when both sides place
        /// keys on the same members.
        ring: u64,
    },
    /// Which of these keys' owners (the N nodes of each key's preference list on the owner
    /// ring) do not all hold the same version: what a convergence check polls after a heal.
    /// Fails when an owner cannot be asked.
    Compare(Vec<String>),
    /// Summaries (key, timestamp, digest) of the items in some leaves of that tree.
    LeafSummaries {
        /// The other replica.
        peer: String,
        /// Tree depth.
        depth: u32,
        /// Leaf indices.
        leaves: Vec<u32>,
    },
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum KvResponse {
    /// A write was acknowledged by `acks` replicas (`hinted` of them as hints).
    Written {
        /// The version written.
        version: Version,
        /// Acknowledgements received before answering.
        acks: u8,
        /// How many of those were hints held for an unreachable replica.
        hinted: u8,
    },
    /// A read.
    Value {
        /// Key.
        key: String,
        /// Newest version among the replies (a tombstone reads as not found).
        version: Option<Version>,
        /// Replies received before answering.
        replies: u8,
    },
    /// Scan results.
    Items(Vec<(String, Version)>),
    /// Item summaries: key, timestamp, digest of the version.
    Summaries(Vec<(String, crate::version::Hlc, u64)>),
    /// Holders of a key: (node, version it has).
    Located(Vec<(String, Option<Version>)>),
    /// Store figures.
    Stats(KvStats),
    /// Replica acknowledgement: how many items were newer than what it had.
    Applied(usize),
    /// Replica read.
    Local(Option<Version>),
    /// Merkle node hashes, in the order asked.
    Hashes(Vec<u64>),
    /// Keys (the answer to `Compare`: those whose owners disagree).
    Keys(Vec<String>),
}

/// A node's store figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KvStats {
    /// Node.
    pub node: String,
    /// Live keys.
    pub keys: u64,
    /// Tombstones kept.
    pub tombstones: u64,
    /// Hints waiting for delivery.
    pub hints: u64,
    /// Hints delivered since start.
    pub hints_delivered: u64,
    /// Read repairs sent since start.
    pub read_repairs: u64,
    /// Items pushed to new replicas after membership changes, since start.
    pub rebalanced: u64,
    /// Items handed to their owners and dropped here (this node stopped owning them).
    pub handed_over: u64,
    /// Last WAL sequence number.
    pub wal_lsn: u64,
    /// Snapshots written since start.
    pub snapshots: u64,
    /// Anti-entropy exchanges this node started.
    pub ae_exchanges: u64,
    /// Bytes those exchanges moved (trees, leaf items, pushed items).
    pub ae_bytes: u64,
}

/// `dsys kv ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KvCommand {
    /// Write KEY = VALUE.
    Put {
        /// Key.
        key: String,
        /// Value (UTF-8 text).
        value: String,
        /// Replicas that must acknowledge (default: plugins.kv.w).
        #[arg(long)]
        w: Option<u8>,
    },
    /// Read KEY (exit 1 when not found).
    Get {
        /// Key.
        key: String,
        /// Replicas that must answer (default: plugins.kv.r).
        #[arg(long)]
        r: Option<u8>,
    },
    /// Delete KEY.
    Del {
        /// Key.
        key: String,
        /// Replicas that must acknowledge.
        #[arg(long)]
        w: Option<u8>,
    },
    /// List keys with PREFIX.
    Scan {
        /// Prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Most results.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show which nodes hold KEY and their versions.
    Locate {
        /// Key.
        key: String,
    },
    /// Store figures of the answering node.
    Stats,
}

impl KvCommand {
    /// The request this command sends.
    pub fn request(&self) -> KvRequest {
        match self {
            KvCommand::Put { key, value, w } => KvRequest::Put {
                key: key.clone(),
                value: value.clone().into_bytes(),
                w: *w,
            },
            KvCommand::Get { key, r } => KvRequest::Get {
                key: key.clone(),
                r: *r,
            },
            KvCommand::Del { key, w } => KvRequest::Del {
                key: key.clone(),
                w: *w,
            },
            KvCommand::Scan { prefix, limit } => KvRequest::Scan {
                prefix: prefix.clone(),
                limit: *limit,
            },
            KvCommand::Locate { key } => KvRequest::Locate { key: key.clone() },
            KvCommand::Stats => KvRequest::Stats,
        }
    }
}

fn show(v: &Version) -> String {
    match &v.value {
        Some(b) => format!("{:?}", String::from_utf8_lossy(b)),
        None => "(deleted)".into(),
    }
}

impl Render for KvResponse {
    fn human(&self) -> String {
        match self {
            KvResponse::Written { version, acks, hinted } => {
                format!("ok: {acks} acks ({hinted} hinted), version {}", version.stamp())
            }
            KvResponse::Value { key, version, replies } => match version {
                Some(v) if v.value.is_some() => format!("{}\n({key}: version {}, {replies} replies)", show(v).trim_matches('"'), v.stamp()),
                _ => format!("not found: {key} ({replies} replies)"),
            },
            KvResponse::Items(items) => {
                let mut s = String::new();
                for (k, v) in items {
                    s.push_str(&format!("{k}\t{}\n", show(v)));
                }
                s.push_str(&format!("({} keys)", items.len()));
                s
            }
            KvResponse::Located(h) => {
                let mut s = String::new();
                for (n, v) in h {
                    let v = v.as_ref().map(|v| format!("{} {}", v.stamp(), show(v))).unwrap_or_else(|| "-".into());
                    s.push_str(&format!("{n:<8} {v}\n"));
                }
                s
            }
            KvResponse::Stats(st) => format!(
                "node {}: {} keys, {} tombstones, {} hints waiting ({} delivered), {} read repairs, {} items repaired by anti-entropy ({} exchanges, {} bytes), {} handed over to new owners, wal lsn {}, {} snapshots",
                st.node, st.keys, st.tombstones, st.hints, st.hints_delivered, st.read_repairs, st.rebalanced, st.ae_exchanges, st.ae_bytes, st.handed_over, st.wal_lsn, st.snapshots
            ),
            KvResponse::Applied(n) => format!("applied {n}"),
            KvResponse::Local(v) => v.as_ref().map(show).unwrap_or_else(|| "-".into()),
            KvResponse::Hashes(h) => format!("{} hashes", h.len()),
            KvResponse::Summaries(s) => format!("{} summaries", s.len()),
            KvResponse::Keys(k) => format!("{} keys whose owners disagree", k.len()),
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            KvResponse::Value { version, .. }
                if version.as_ref().map(|v| v.value.is_none()).unwrap_or(true) =>
            {
                1
            }
            _ => 0,
        }
    }
}
