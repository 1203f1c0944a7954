//! Wire types of the `cache` plugin and the `dsys cache` subcommand.

use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

dsys_runtime::plugin_api!(CacheApi, "cache", CacheRequest, CacheResponse);

/// Longest key accepted from the CLI and between nodes.
pub const MAX_KEY_BYTES: usize = 64 * 1024;
/// Most commands in one node-to-node batch.
pub const MAX_BATCH: usize = 4096;

/// One replicated key state, borrowed from a [`ReplBatch`]: the value and absolute expiry
/// (ms since the epoch), or a deletion (`value: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplItem<'a> {
    /// Key.
    pub key: &'a [u8],
    /// New value, or `None` when the key was deleted.
    pub value: Option<&'a [u8]>,
    /// Absolute expiry.
    pub expire_at: Option<u64>,
    /// A hand-off after a membership change: applied only when the receiver does not hold
    /// the key, so it never overwrites a newer write.
    pub if_absent: bool,
}

/// Replication items packed into one buffer: per item a flags byte (value, expiry,
/// if-absent), the key's length (u32 LE) and bytes, the expiry (u64 LE) if any, the value's
/// length and bytes if any. Writing an item is a few copies into the buffer, reading one
/// borrows from it: a replicated write costs no allocation until the replica stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplBatch {
    #[serde(with = "dsys_runtime::codec::bytes")]
    buf: Vec<u8>,
    count: u32,
}

const HAS_VALUE: u8 = 1;
const HAS_EXPIRY: u8 = 2;
const IF_ABSENT: u8 = 4;

impl ReplBatch {
    /// An empty batch with room for `bytes` of items.
    pub fn with_capacity(bytes: usize) -> Self {
        ReplBatch {
            buf: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Append an item.
    pub fn push(&mut self, item: ReplItem<'_>) {
        let flags = if item.value.is_some() { HAS_VALUE } else { 0 }
            | if item.expire_at.is_some() {
                HAS_EXPIRY
            } else {
                0
            }
            | if item.if_absent { IF_ABSENT } else { 0 };
        self.buf.push(flags);
        self.buf
            .extend_from_slice(&(item.key.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(item.key);
        if let Some(t) = item.expire_at {
            self.buf.extend_from_slice(&t.to_le_bytes());
        }
        if let Some(v) = item.value {
            self.buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(v);
        }
        self.count += 1;
    }

    /// Append every item of `other`.
    pub fn append(&mut self, other: &ReplBatch) {
        self.buf.extend_from_slice(&other.buf);
        self.count += other.count;
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when it holds no item.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The items, in order; `Err` when the buffer does not hold exactly `len()` well-formed
    /// items (a peer's bytes are checked before anything is applied).
    pub fn items(&self) -> Result<Vec<ReplItem<'_>>, String> {
        fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if buf.len() < n {
                return Err("replication batch truncated".into());
            }
            let (head, rest) = buf.split_at(n);
            *buf = rest;
            Ok(head)
        }
        fn u32_at(buf: &mut &[u8]) -> Result<usize, String> {
            let b = take(buf, 4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        }
        let mut rest = self.buf.as_slice();
        let mut out = Vec::with_capacity(self.len().min(rest.len() / 5));
        for _ in 0..self.count {
            let flags = take(&mut rest, 1)?[0];
            if flags & !(HAS_VALUE | HAS_EXPIRY | IF_ABSENT) != 0 {
                return Err(format!("replication item with unknown flags {flags:#x}"));
            }
            let n = u32_at(&mut rest)?;
            let key = take(&mut rest, n)?;
            let expire_at = if flags & HAS_EXPIRY != 0 {
                let b = take(&mut rest, 8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Some(u64::from_le_bytes(a))
            } else {
                None
            };
            let value = if flags & HAS_VALUE != 0 {
                let n = u32_at(&mut rest)?;
                Some(take(&mut rest, n)?)
            } else {
                None
            };
            out.push(ReplItem {
                key,
                value,
                expire_at,
                if_absent: flags & IF_ABSENT != 0,
            });
        }
        if !rest.is_empty() {
            return Err(format!(
                "{} bytes after the last replication item",
                rest.len()
            ));
        }
        Ok(out)
    }
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
        /// `count` commands, RESP-encoded one after the other as clients send them.
        #[serde(with = "dsys_runtime::codec::bytes")]
        cmds: Vec<u8>,
        /// How many commands `cmds` holds.
        count: u32,
        /// Executed by the replica because the primary did not answer.
        replica: bool,
    },
    /// Replica copy: apply these key states.
    Replicate(ReplBatch),
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
    /// This node has handed off its keys for the ring it sees now, and nothing it sent is
    /// still queued: a key deleted from now on cannot be brought back by a hand-off of the
    /// ring change just before (tests wait for it before they start).
    pub settled: bool,
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
    /// Replies to [`CacheRequest::Exec`], in order, RESP-encoded as the client will get them
    /// (the node that forwarded the commands copies them out unparsed).
    Replies {
        /// The replies, one after the other.
        #[serde(with = "dsys_runtime::codec::bytes")]
        resp: Vec<u8>,
        /// How many.
        count: u32,
    },
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
            CacheResponse::Replies { count, .. } => format!("{count} replies"),
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            CacheResponse::Value { value: None, .. } => 1,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repl_batches_roundtrip_and_refuse_garbage() {
        let items = [
            ReplItem {
                key: b"a",
                value: Some(b"1"),
                expire_at: None,
                if_absent: false,
            },
            ReplItem {
                key: b"",
                value: None,
                expire_at: Some(u64::MAX),
                if_absent: true,
            },
            ReplItem {
                key: b"k\r\n",
                value: Some(b""),
                expire_at: Some(7),
                if_absent: false,
            },
        ];
        let mut b = ReplBatch::default();
        for it in items {
            b.push(it);
        }
        let mut two = ReplBatch::default();
        two.append(&b);
        two.append(&b);
        assert_eq!(b.items().expect("items"), items);
        assert_eq!(two.len(), 6);
        assert_eq!(two.items().expect("items")[3..], items);
        let bytes = dsys_runtime::encode(&two).expect("encode");
        let back: ReplBatch = dsys_runtime::decode(&bytes).expect("decode");
        assert_eq!(back, two);
        // Every truncation, a count that lies, and unknown flags are refused.
        for cut in 0..b.buf.len() {
            let t = ReplBatch {
                buf: b.buf[..cut].to_vec(),
                count: b.count,
            };
            assert!(t.items().is_err(), "cut at {cut}");
        }
        let more = ReplBatch {
            buf: b.buf.clone(),
            count: b.count - 1,
        };
        assert!(more.items().is_err());
        let flags = ReplBatch {
            buf: vec![0x80, 0, 0, 0, 0],
            count: 1,
        };
        assert!(flags.items().is_err());
        let huge = ReplBatch {
            buf: vec![1, 0xff, 0xff, 0xff, 0xff],
            count: 1,
        };
        assert!(huge.items().is_err());
    }
}
