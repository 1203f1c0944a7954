//! `cache` (design 30): a distributed in-memory cache that speaks RESP2, so `redis-cli`,
//! `redis-benchmark` and any Redis client work against any node.
//!
//! Every node listens for RESP on its port (`[plugins.cache] ports`). A command for a key is
//! executed by the key's owner on the consistent-hash ring (`preference_list(key, 2)`: a
//! primary and one replica); a node that receives a command for a key it does not own
//! forwards it with [`CacheRequest::Exec`]. A connection's pipelined commands are grouped per
//! primary; each group is a job for that primary's forwarder, which gathers the jobs of all
//! connections into one `Exec` while earlier ones are in flight (see `forward_loop`), and
//! slices the in-order replies back. Commands travel RESP-encoded, as the client sent them,
//! and replies come back RESP-encoded, as the client gets them: the forwarding node parses
//! arguments in place (borrowed from its read buffer) to find the owner, and copies the
//! owner's replies to the client without decoding them. Multi-key commands (MGET, MSET,
//! DEL, EXISTS) are split by owner and their replies merged.
//!
//! Replication is asynchronous, like Redis': after applying a write the primary queues the
//! new state of each written key for the replica, packed into a flat [`ReplBatch`]; one
//! ordered queue and sender task per target node ship batches with
//! [`CacheRequest::Replicate`]. A write acknowledged to the
//! client can therefore be lost if the primary dies before its batch left (the window is one
//! network round trip under load). When the primary does not answer, each command goes to
//! its key's replica, which serves it from its copy (and, once gossip declares the primary
//! dead, the ring makes the replica the primary anyway). When membership changes, each node
//! hands the keys it holds to the nodes that newly hold them (`Inner::hand_off`), so every
//! key again has two copies.
#![warn(missing_docs, unreachable_pub)]

mod api;
mod commands;
mod number;
mod resp;
mod store;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dsys_plugin_kv::{KvApi, KvRequest, KvResponse};
use dsys_runtime::{Caller, Metrics, Plugin, PluginContext, Ring, RpcError};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use commands::Name;

pub use api::{
    CacheApi, CacheCommand, CacheRequest, CacheResponse, CacheStats, ReplBatch, ReplItem,
    MAX_BATCH, MAX_KEY_BYTES,
};
pub use commands::{execute, info, merge, name as command_name, route, split, Env, Outcome, Route};
pub use resp::{
    encode, encode_command, frame_len, parse_command, parse_frame, Args, Frame, Limits, RespError,
    DEFAULT_MAX_ARRAY, DEFAULT_MAX_BULK, DEFAULT_MAX_LINE,
};
pub use store::{
    Policy, SetOptions, SetOutcome, Store, StoreConfig, StoreError, StoreStats, Ttl, ENTRY_OVERHEAD,
};

/// `[plugins.cache]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory limit per node in bytes (0: unlimited).
    pub maxmemory: u64,
    /// Eviction policy: `allkeys-lru`, `allkeys-lfu`, `volatile-ttl` or `noeviction`.
    pub policy: Policy,
    /// Keys sampled per eviction.
    pub samples: usize,
    /// RESP port of each node id; a missing entry or 0 lets the OS choose.
    pub ports: BTreeMap<String, u16>,
    /// Address the RESP listener binds.
    pub host: String,
    /// Most open RESP connections per node.
    pub max_connections: usize,
    /// Longest bulk string accepted (a value, a key).
    pub max_bulk_bytes: usize,
    /// Most bytes buffered for one connection's unfinished request.
    pub max_request_bytes: usize,
    /// Most commands taken from one connection's buffer before answering.
    pub max_pipeline: usize,
    /// Replicate writes to the key's second node.
    pub replicate: bool,
    /// Batches of forwarded commands in flight to one owner node at once; commands that
    /// arrive meanwhile (from any connection) wait and go together in the next batch.
    /// Default 1: against 2, redis-benchmark through 3 nodes did 3-11% more SET/s and
    /// 1-22% more GET/s in four interleaved pairs (bigger batches, fewer RPCs).
    pub forward_inflight: usize,
    /// Key prefixes whose misses on GET are loaded from the `kv` plugin (read-through).
    pub read_through: Vec<String>,
    /// TTL given to values loaded by read-through (none: they stay until evicted or
    /// invalidated).
    pub read_through_ttl_ms: Option<u64>,
    /// Key prefixes whose writes are also written to the `kv` plugin before the reply
    /// (write-through).
    pub write_through: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            maxmemory: 64 * 1024 * 1024,
            policy: Policy::AllkeysLru,
            samples: 5,
            ports: BTreeMap::new(),
            host: "127.0.0.1".into(),
            max_connections: 10_000,
            max_bulk_bytes: DEFAULT_MAX_BULK,
            max_request_bytes: 2 * DEFAULT_MAX_BULK,
            max_pipeline: 1024,
            replicate: true,
            forward_inflight: 1,
            read_through: Vec::new(),
            read_through_ttl_ms: None,
            write_through: Vec::new(),
        }
    }
}

impl CacheConfig {
    fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_pipeline == 0 || self.max_bulk_bytes == 0 {
            return Err(
                "plugins.cache.max_connections, max_pipeline and max_bulk_bytes must be > 0".into(),
            );
        }
        if self.max_request_bytes < self.max_bulk_bytes {
            return Err("plugins.cache.max_request_bytes must be >= max_bulk_bytes".into());
        }
        if self.max_pipeline > MAX_BATCH {
            return Err(format!("plugins.cache.max_pipeline must be <= {MAX_BATCH}"));
        }
        if self.forward_inflight == 0 || self.forward_inflight > 64 {
            return Err("plugins.cache.forward_inflight must be 1..=64".into());
        }
        if self.samples == 0 || self.samples > 1024 {
            return Err("plugins.cache.samples must be 1..=1024".into());
        }
        Ok(())
    }
}

/// Items queued per replica before new ones are dropped.
const REPL_QUEUE: usize = 65_536;

/// How long a replication sender waits for more items when it has fewer than
/// [`REPL_LINGER_ITEMS`]: each `Replicate` RPC costs ~100 µs of CPU on each side (QUIC,
/// syscalls, tasks), so without it a moderate write rate ships a handful of items per RPC
/// and replication costs more than the writes. It widens the window in which an
/// acknowledged write can be lost with its primary by at most this much.
const REPL_LINGER: Duration = Duration::from_millis(5);
/// Batches at least this large go at once.
const REPL_LINGER_ITEMS: usize = 512;

/// Most bytes (keys and values) gathered into one forwarded or replicated batch, well under
/// the runtime's default frame cap (16 MiB); a single larger command is sent alone.
const BATCH_BYTES: usize = 4 * 1024 * 1024;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Inner {
    ctx: PluginContext,
    cfg: CacheConfig,
    limits: Limits,
    store: Mutex<Store>,
    expiry: Arc<Expiry>,
    port: AtomicU16,
    clients: AtomicUsize,
    repl_tx: Mutex<HashMap<String, ReplQueue>>,
    repl_dropped: Arc<AtomicU64>,
    forward_tx: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    /// The ring the last hand-off was computed for, and whether one is running.
    handoff_ring: Mutex<Option<Arc<Ring>>>,
    handing_off: AtomicBool,
    handed_off: AtomicU64,
    loads: AtomicU64,
}

/// The plugin instance.
pub struct CachePlugin {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _shutdown_tx: watch::Sender<()>,
}

impl std::fmt::Debug for CachePlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CachePlugin({} resp={})",
            self.inner.ctx.node_id,
            self.inner.port.load(Ordering::Relaxed)
        )
    }
}

impl Drop for CachePlugin {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn matches_prefix(prefixes: &[String], key: &[u8]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_bytes()))
}

/// A group of keys that go to the same primary and fall back to the same replica.
type Target = (String, Option<String>);

/// Keys written by one command, borrowed from it.
type Written<'a> = SmallVec<[&'a [u8]; 2]>;

/// Replies, RESP-encoded one after the other in a shared buffer: `ranges[i]` is the i-th.
/// Replies relayed from another node stay in the buffer they arrived in until they are
/// copied to the client.
#[derive(Debug, Clone)]
struct Encoded {
    buf: Arc<Vec<u8>>,
    ranges: Vec<Range<usize>>,
}

impl Encoded {
    fn frames(frames: impl IntoIterator<Item = Frame>) -> Encoded {
        let mut buf = Vec::new();
        let mut ranges = Vec::new();
        for f in frames {
            let start = buf.len();
            encode(&f, &mut buf);
            ranges.push(start..buf.len());
        }
        Encoded {
            buf: Arc::new(buf),
            ranges,
        }
    }

    fn errors(msg: &str, n: usize) -> Encoded {
        Encoded::frames(std::iter::repeat_n(Frame::err(msg), n))
    }

    /// Delimit the `count` replies another node sent; refused unless `buf` holds exactly
    /// that many well-formed frames.
    fn split(buf: Vec<u8>, count: usize, limits: &Limits) -> Result<Encoded, String> {
        let mut ranges = Vec::with_capacity(count.min(buf.len() / 3 + 1));
        let mut at = 0;
        for _ in 0..count {
            match frame_len(&buf[at..], limits) {
                Ok(Some(n)) => {
                    ranges.push(at..at + n);
                    at += n;
                }
                Ok(None) => return Err("truncated replies".into()),
                Err(e) => return Err(format!("malformed replies: {e}")),
            }
        }
        if at != buf.len() {
            return Err(format!("{} bytes after the replies", buf.len() - at));
        }
        Ok(Encoded {
            buf: Arc::new(buf),
            ranges,
        })
    }

    /// The replies `at..at + n`, sharing the buffer.
    fn slice(&self, at: usize, n: usize) -> Encoded {
        match self.ranges.get(at..at.saturating_add(n)) {
            Some(r) => Encoded {
                buf: self.buf.clone(),
                ranges: r.to_vec(),
            },
            None => Encoded::errors("ERR internal: missing reply", n),
        }
    }

    fn get(&self, i: usize) -> &[u8] {
        self.ranges
            .get(i)
            .and_then(|r| self.buf.get(r.clone()))
            .unwrap_or(b"-ERR internal: missing reply\r\n")
    }

    fn frame(&self, i: usize, limits: &Limits) -> Frame {
        match parse_frame(self.get(i), limits) {
            Ok(Some((f, _))) => f,
            _ => Frame::err("ERR internal: unreadable reply"),
        }
    }
}

/// Commands bound for one node, in order: the commands themselves when that node is this
/// one, or their RESP encoding when it is another (to be forwarded).
struct Group<'r, 'a> {
    node: &'r str,
    local: bool,
    count: usize,
    cmds: Vec<Args<'a>>,
    wire: Vec<u8>,
}

impl<'r, 'a> Group<'r, 'a> {
    fn new(node: &'r str, me: &str) -> Self {
        Group {
            node,
            local: node == me,
            count: 0,
            cmds: Vec::new(),
            // Room for a round of small commands without regrowing.
            wire: if node == me {
                Vec::new()
            } else {
                Vec::with_capacity(1024)
            },
        }
    }

    fn push(&mut self, cmd: &[&'a [u8]]) {
        self.count += 1;
        if self.local {
            self.cmds.push(Args::from_slice(cmd));
        } else {
            encode_command(cmd, &mut self.wire);
        }
    }
}

/// Commands of one connection's round bound for one primary, waiting in that primary's
/// forwarder to be sent in a batch with other connections' jobs (see `forward_loop`).
struct Job {
    /// `count` RESP-encoded commands.
    cmds: Vec<u8>,
    count: usize,
    reply_tx: oneshot::Sender<Encoded>,
}

/// The queue of replication batches bound for one node (see [`spawn_replicator`]).
struct ReplQueue {
    tx: mpsc::UnboundedSender<ReplBatch>,
    /// Items queued and not yet taken into a batch (bounded by [`REPL_QUEUE`]).
    queued: Arc<AtomicUsize>,
}

/// Replication items sorted by the node they go to, packed as they are produced; each
/// batch stays within [`MAX_BATCH`] items and about [`BATCH_BYTES`].
#[derive(Default)]
struct ReplOut<'r> {
    per_target: Vec<(&'r str, Vec<ReplBatch>)>,
}

impl<'r> ReplOut<'r> {
    /// Queue `item` for `target`.
    fn push(&mut self, target: &'r str, item: ReplItem<'_>) {
        let k = match self.per_target.iter().position(|(t, _)| *t == target) {
            Some(k) => k,
            None => {
                self.per_target.push((target, Vec::new()));
                self.per_target.len() - 1
            }
        };
        let batches = &mut self.per_target[k].1;
        match batches.last_mut() {
            Some(b) if b.len() < MAX_BATCH && b.bytes() < BATCH_BYTES => b.push(item),
            _ => {
                let mut b = ReplBatch::with_capacity(1024);
                b.push(item);
                batches.push(b);
            }
        }
    }

    /// Queue `item` for the other holders of its key in `ring`.
    fn add(&mut self, ring: &'r Ring, me: &str, item: ReplItem<'_>) {
        for target in ring.preference(item.key, 2) {
            if target != me {
                self.push(target, item);
            }
        }
    }

    fn items(&self) -> usize {
        self.per_target
            .iter()
            .flat_map(|(_, b)| b.iter())
            .map(ReplBatch::len)
            .sum()
    }
}

/// The store, locked; on release it wakes the expiry loop if keys with a TTL have appeared
/// while the loop sleeps (it sleeps while there are none, so an idle cache has no timer).
struct StoreGuard<'a> {
    store: std::sync::MutexGuard<'a, Store>,
    expiry: &'a Expiry,
}

impl std::ops::Deref for StoreGuard<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl std::ops::DerefMut for StoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Store {
        &mut self.store
    }
}

impl Drop for StoreGuard<'_> {
    fn drop(&mut self) {
        if self.store.volatile_len() > 0 && self.expiry.asleep.load(Ordering::Relaxed) {
            self.expiry.asleep.store(false, Ordering::Relaxed);
            self.expiry.wake.notify_one();
        }
    }
}

/// Whether the active-expiry loop is waiting for keys with a TTL, and how to wake it.
#[derive(Default)]
struct Expiry {
    asleep: AtomicBool,
    wake: tokio::sync::Notify,
}

/// True when `ring` holds no node but `me`: every key is local, nothing to replicate.
fn alone(ring: &Ring, me: &str) -> bool {
    ring.nodes().iter().all(|n| n == me)
}

impl Inner {
    fn me(&self) -> &str {
        &self.ctx.node_id
    }

    fn lock(&self) -> StoreGuard<'_> {
        StoreGuard {
            store: self.store.lock().unwrap_or_else(|p| p.into_inner()),
            expiry: &self.expiry,
        }
    }

    /// Primary and replica of `key` in `ring` (this node when the ring is empty).
    fn target(&self, ring: &Ring, key: &[u8]) -> Target {
        let mut prefs = ring.preference_list(key, 2).into_iter();
        let primary = prefs.next().unwrap_or_else(|| self.me().to_string());
        (primary, prefs.next())
    }

    /// Run commands on this node's store, in order, then apply the read-through and
    /// write-through rules of their keys' prefixes.
    async fn exec_local<'a, C: AsRef<[&'a [u8]]>>(&self, cmds: &[C]) -> Vec<(Frame, bool)> {
        let mut out = self.exec_store(cmds);
        if self.cfg.read_through.is_empty() && self.cfg.write_through.is_empty() {
            return out.into_iter().map(|(f, q, _)| (f, q)).collect();
        }
        for (cmd, (reply, _, written)) in cmds.iter().zip(out.iter_mut()) {
            let cmd = cmd.as_ref();
            if matches!(reply, Frame::Error(_)) {
                continue;
            }
            for key in written.iter() {
                if matches_prefix(&self.cfg.write_through, key) {
                    if let Err(e) = self.kv_store(key).await {
                        *reply = Frame::err(format!("ERR write-through to kv failed: {e}"));
                    }
                }
            }
            if *reply == Frame::Null
                && commands::name(cmd) == "GET"
                && matches_prefix(&self.cfg.read_through, cmd[1])
            {
                if let Some(v) = self.kv_load(cmd[1]).await {
                    *reply = Frame::Bulk(v);
                }
            }
        }
        out.into_iter().map(|(f, q, _)| (f, q)).collect()
    }

    /// Write-through: copy the cache's state of `key` to `kv` (a put, or a delete when the
    /// key is gone). When `kv` refuses, the cache copy is dropped so the cache is never
    /// ahead of the store of record.
    async fn kv_store(&self, key: &[u8]) -> Result<(), RpcError> {
        let Ok(k) = std::str::from_utf8(key) else {
            return Err(RpcError::refused("write-through keys must be UTF-8"));
        };
        let state = self.lock().peek(key, wall_ms()).map(|(v, _)| v.to_vec());
        let req = match state {
            Some(value) => KvRequest::Put {
                key: k.to_string(),
                value,
                w: None,
            },
            None => KvRequest::Del {
                key: k.to_string(),
                w: None,
            },
        };
        let r = self.ctx.rpc.call::<KvApi>(self.me(), &req).await;
        if r.is_err() {
            self.lock().del(key, wall_ms());
            self.replicate_one(ReplItem {
                key,
                value: None,
                expire_at: None,
                if_absent: false,
            });
        }
        r.map(|_| ())
    }

    /// Read-through: load a missing key from `kv`, keep it (with the configured TTL), return
    /// it.
    async fn kv_load(&self, key: &[u8]) -> Option<Vec<u8>> {
        let k = std::str::from_utf8(key).ok()?;
        let req = KvRequest::Get {
            key: k.to_string(),
            r: None,
        };
        let value = match self.ctx.rpc.call::<KvApi>(self.me(), &req).await {
            Ok(KvResponse::Value {
                version: Some(v), ..
            }) => v.value?,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!("cache: read-through of {k} failed: {e}");
                return None;
            }
        };
        let now = wall_ms();
        let expire_at = self.cfg.read_through_ttl_ms.map(|t| now.saturating_add(t));
        let stored = self.lock().put(key, &value, expire_at, now).is_ok();
        if stored {
            self.loads.fetch_add(1, Ordering::Relaxed);
            if self.cfg.replicate {
                self.replicate_one(ReplItem {
                    key,
                    value: Some(&value),
                    expire_at,
                    if_absent: false,
                });
            }
        }
        Some(value)
    }

    /// Run commands on this node's store, in order, and queue the new state of the keys
    /// written for their other holder. Returns each reply, whether to close, and the keys
    /// written.
    fn exec_store<'a, C: AsRef<[&'a [u8]]>>(&self, cmds: &[C]) -> Vec<(Frame, bool, Written<'a>)> {
        let ring = self.ctx.ring();
        let env = Env {
            node_id: self.me(),
            port: self.port.load(Ordering::Relaxed),
            cluster_size: ring.nodes().len(),
            clients: self.clients.load(Ordering::Relaxed),
        };
        // With no other node there is no copy to make: skip reading back what was written.
        let replicate = self.cfg.replicate && !alone(&ring, self.me());
        let now = wall_ms();
        let mut out = Vec::with_capacity(cmds.len());
        let mut repl = ReplOut::default();
        {
            let mut store = self.lock();
            for cmd in cmds {
                let o = execute(&mut store, cmd.as_ref(), now, &env);
                if replicate {
                    for &key in &o.written {
                        let (value, expire_at) = match store.peek(key, now) {
                            Some((v, t)) => (Some(v), t),
                            None => (None, None),
                        };
                        let item = ReplItem {
                            key,
                            value,
                            expire_at,
                            if_absent: false,
                        };
                        repl.add(&ring, self.me(), item);
                    }
                }
                out.push((o.reply, o.quit, o.written));
            }
        }
        self.send_repl(repl);
        out
    }

    /// Queue one item for the other holders of its key.
    fn replicate_one(&self, item: ReplItem<'_>) {
        let ring = self.ctx.ring();
        let mut out = ReplOut::default();
        out.add(&ring, self.me(), item);
        self.send_repl(out);
    }

    /// Put replication batches on their target's queue, one lock for all of them.
    fn send_repl(&self, out: ReplOut<'_>) {
        if out.per_target.is_empty() {
            return;
        }
        let mut queues = self.repl_tx.lock().unwrap_or_else(|p| p.into_inner());
        for (target, batches) in out.per_target {
            for b in batches {
                self.enqueue(&mut queues, target, b);
            }
        }
    }

    /// Put a batch on `target`'s replication queue (started on first use); count it as
    /// dropped when the queue is full.
    fn enqueue(&self, queues: &mut HashMap<String, ReplQueue>, target: &str, batch: ReplBatch) {
        if !queues.contains_key(target) {
            let q = spawn_replicator(
                self.ctx.rpc.clone(),
                target.to_string(),
                self.repl_dropped.clone(),
            );
            queues.insert(target.to_string(), q);
        }
        let Some(q) = queues.get_mut(target) else {
            return;
        };
        let n = batch.len();
        if q.queued.load(Ordering::Relaxed) + n > REPL_QUEUE {
            self.repl_dropped.fetch_add(n as u64, Ordering::Relaxed);
            return;
        }
        q.queued.fetch_add(n, Ordering::Relaxed);
        if q.tx.send(batch).is_err() {
            q.queued.fetch_sub(n, Ordering::Relaxed);
            self.repl_dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Items waiting in the replication queues.
    fn repl_backlog(&self) -> usize {
        let queues = self.repl_tx.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .values()
            .map(|q| q.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// No hand-off running or due for the current ring, and the replication queues empty.
    fn settled(&self) -> bool {
        let ring = self.ctx.ring();
        let done = self
            .handoff_ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|l| l.nodes() == ring.nodes());
        done && !self.handing_off.load(Ordering::Acquire) && self.repl_backlog() == 0
    }

    /// Start a hand-off if the ring changed since the last one (and none is running).
    fn maybe_hand_off(self: &Arc<Self>) {
        let ring = self.ctx.ring();
        let old = {
            let mut last = self.handoff_ring.lock().unwrap_or_else(|p| p.into_inner());
            match last.as_ref() {
                Some(l) if l.nodes() == ring.nodes() => return,
                _ => {}
            }
            if self.handing_off.swap(true, Ordering::AcqRel) {
                return;
            }
            last.replace(ring.clone())
        };
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(old) = old {
                this.hand_off(&old, &ring).await;
            }
            this.handing_off.store(false, Ordering::Release);
        });
    }

    /// Membership changed from `old` to `new`: send every key held here to the nodes that
    /// hold it under `new` but did not under `old` (a new primary or replica), so each key
    /// again has two copies; drop the keys this node no longer holds. The copies go through
    /// the replication queues (so they stay ordered with later writes) as `if_absent`
    /// items, which never overwrite a newer value. Runs in chunks, releasing the store
    /// between them, and waits for the queues to drain rather than dropping items.
    async fn hand_off(&self, old: &Ring, new: &Ring) {
        let me = self.me();
        let keys = self.lock().keys();
        for chunk in keys.chunks(512) {
            while self.repl_backlog() > REPL_QUEUE / 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let now = wall_ms();
            let mut out = ReplOut::default();
            {
                let mut store = self.lock();
                for key in chunk {
                    let now_holders = new.preference(key, 2);
                    let before = old.preference(key, 2);
                    let keep = now_holders.contains(&me);
                    let mut gained = now_holders
                        .iter()
                        .filter(|n| **n != me && !before.contains(n))
                        .peekable();
                    if gained.peek().is_some() {
                        if let Some((value, expire_at)) = store.peek(key, now) {
                            for t in gained {
                                let item = ReplItem {
                                    key,
                                    value: Some(value),
                                    expire_at,
                                    if_absent: true,
                                };
                                out.push(t, item);
                            }
                        }
                    }
                    if !keep {
                        store.del(key, now);
                    }
                }
            }
            self.handed_off
                .fetch_add(out.items() as u64, Ordering::Relaxed);
            self.send_repl(out);
        }
    }

    fn apply_replica(&self, items: &[ReplItem<'_>]) -> u64 {
        let now = wall_ms();
        let mut store = self.lock();
        let mut n = 0;
        for it in items {
            if it.if_absent && store.exists(it.key, now) {
                continue;
            }
            match it.value {
                Some(v) => {
                    if store.put(it.key, v, it.expire_at, now).is_ok() {
                        n += 1;
                    }
                }
                None => {
                    store.del(it.key, now);
                    n += 1;
                }
            }
        }
        n
    }

    /// The forwarder of primary `node`, started on first use.
    fn forwarder(self: &Arc<Self>, node: &str) -> mpsc::UnboundedSender<Job> {
        let mut fwd = self.forward_tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = fwd.get(node) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward_loop(
            Arc::downgrade(self),
            node.to_string(),
            rx,
            self.cfg.forward_inflight,
        ));
        fwd.insert(node.to_string(), tx.clone());
        tx
    }

    /// Send one batch of jobs to `primary` as one [`CacheRequest::Exec`] and hand each job
    /// its replies. When the primary does not answer, each command goes to its key's
    /// replica instead (see [`Inner::fail_over`]).
    async fn send_jobs(self: Arc<Self>, primary: String, jobs: Vec<Job>) {
        let total: usize = jobs.iter().map(|j| j.count).sum();
        let bytes: usize = jobs.iter().map(|j| j.cmds.len()).sum();
        let mut cmds = Vec::new();
        let mut metas = Vec::with_capacity(jobs.len());
        for j in jobs {
            metas.push((j.count, j.reply_tx));
            if cmds.is_empty() {
                // The first job's buffer becomes the batch's.
                cmds = j.cmds;
                cmds.reserve(bytes - cmds.len());
            } else {
                cmds.extend_from_slice(&j.cmds);
            }
        }
        let req = CacheRequest::Exec {
            cmds,
            count: total as u32,
            replica: false,
        };
        let replies = match self.exec_call(&primary, &req, total).await {
            Ok(r) => r,
            Err(err) => {
                let CacheRequest::Exec { cmds, .. } = req else {
                    return;
                };
                self.fail_over(&primary, &err, &cmds, total).await
            }
        };
        let mut at = 0;
        for (n, tx) in metas {
            let _ = tx.send(replies.slice(at, n));
            at += n;
        }
    }

    /// Send an `Exec` of `count` commands to `node`; its replies, delimited, or why not.
    async fn exec_call(
        &self,
        node: &str,
        req: &CacheRequest,
        count: usize,
    ) -> Result<Encoded, String> {
        match self.ctx.rpc.call::<CacheApi>(node, req).await {
            Ok(CacheResponse::Replies { resp, count: n }) if n as usize == count => {
                Encoded::split(resp, count, &self.limits)
            }
            Ok(_) => Err("unexpected answer".to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The primary of these `count` RESP-encoded commands did not answer: run each on its
    /// key's replica (the first other node of the key's preference list in the current
    /// ring; by the time gossip has declared the primary dead, that is the new primary),
    /// the commands with the same replica in one request, in order. Replies in the order
    /// of `cmds`.
    async fn fail_over(&self, primary: &str, err: &str, cmds: &[u8], count: usize) -> Encoded {
        let ring = self.ctx.ring();
        let mut parsed = Vec::with_capacity(count);
        let mut rest = cmds;
        while let Ok(Some((cmd, k))) = parse_command(rest, &self.limits) {
            parsed.push(cmd);
            rest = &rest[k..];
        }
        // (replica, positions in `cmds`, commands)
        type ByReplica<'c, 'a> = (Option<String>, Vec<usize>, Vec<&'c [&'a [u8]]>);
        let mut groups: Vec<ByReplica> = Vec::new();
        for (i, cmd) in parsed.iter().enumerate() {
            // Every key of a forwarded command has the same primary and replica (multi-key
            // commands are split by both), so the first key decides.
            let key = match route(cmd) {
                Route::Key(k) => Some(k),
                Route::Multi => split(cmd).into_iter().next().map(|(k, _)| k),
                Route::Local => None,
            };
            let replica = key.and_then(|k| {
                ring.preference(k, 3)
                    .into_iter()
                    .find(|node| *node != primary)
                    .map(str::to_string)
            });
            match groups.iter_mut().find(|(r, _, _)| *r == replica) {
                Some((_, idx, c)) => {
                    idx.push(i);
                    c.push(cmd);
                }
                None => groups.push((replica, vec![i], vec![cmd])),
            }
        }
        let mut slots: Vec<Option<(usize, usize)>> = vec![None; count];
        let mut answers = Vec::with_capacity(groups.len());
        for (replica, idx, cmds) in groups {
            let m = cmds.len();
            let second = match replica.as_deref() {
                Some(r) if r == self.me() => Ok(Encoded::frames(
                    self.exec_local(&cmds).await.into_iter().map(|(f, _)| f),
                )),
                Some(r) => {
                    let mut wire = Vec::new();
                    for c in &cmds {
                        encode_command(c, &mut wire);
                    }
                    let req = CacheRequest::Exec {
                        cmds: wire,
                        count: m as u32,
                        replica: true,
                    };
                    self.exec_call(r, &req, m).await
                }
                None => Err("no replica".to_string()),
            };
            let answer = second.unwrap_or_else(|why| {
                Encoded::errors(
                    &format!("TRYAGAIN owner {primary} unreachable ({err}); replica: {why}"),
                    m,
                )
            });
            for (k, i) in idx.into_iter().enumerate() {
                if let Some(slot) = slots.get_mut(i) {
                    *slot = Some((answers.len(), k));
                }
            }
            answers.push(answer);
        }
        let mut buf = Vec::new();
        let mut ranges = Vec::with_capacity(count);
        for slot in slots {
            let start = buf.len();
            match slot.and_then(|(a, k)| answers.get(a).map(|e| e.get(k))) {
                Some(reply) => buf.extend_from_slice(reply),
                None => encode(&Frame::err("ERR internal: command not forwarded"), &mut buf),
            }
            ranges.push(start..buf.len());
        }
        Encoded {
            buf: Arc::new(buf),
            ranges,
        }
    }

    /// Run groups of commands, each on its node: the remote ones are handed to their
    /// node's forwarder first, then the local one runs here, then the remote replies are
    /// collected. Results in the order of `groups`.
    async fn run_groups(self: &Arc<Self>, groups: Vec<Group<'_, '_>>) -> Vec<Encoded> {
        enum Slot<'a> {
            Local(Vec<Args<'a>>),
            Remote(oneshot::Receiver<Encoded>, usize),
        }
        let mut slots = Vec::with_capacity(groups.len());
        for g in groups {
            if g.local {
                slots.push(Slot::Local(g.cmds));
                continue;
            }
            let (reply_tx, reply_rx) = oneshot::channel();
            let job = Job {
                cmds: g.wire,
                count: g.count,
                reply_tx,
            };
            if let Err(mpsc::error::SendError(job)) = self.forwarder(g.node).send(job) {
                // The forwarder just stopped (shutting down): tell the caller.
                let _ = job
                    .reply_tx
                    .send(Encoded::errors("ERR cache is shutting down", g.count));
            }
            slots.push(Slot::Remote(reply_rx, g.count));
        }
        let mut done: Vec<Option<Encoded>> = Vec::with_capacity(slots.len());
        for slot in &slots {
            done.push(match slot {
                Slot::Local(cmds) => Some(Encoded::frames(
                    self.exec_local(cmds).await.into_iter().map(|(f, _)| f),
                )),
                Slot::Remote(..) => None,
            });
        }
        let mut out = Vec::with_capacity(slots.len());
        for (slot, done) in slots.into_iter().zip(done) {
            out.push(match (slot, done) {
                (_, Some(e)) => e,
                (Slot::Remote(rx, n), None) => rx
                    .await
                    .unwrap_or_else(|_| Encoded::errors("ERR internal: forwarder stopped", n)),
                (Slot::Local(_), None) => Encoded::errors("ERR internal: no reply", 0),
            });
        }
        out
    }

    /// A multi-key command, split by owner and merged.
    async fn multi(self: &Arc<Self>, ring: &Ring, cmd: &[&[u8]]) -> Frame {
        let parts = split(cmd);
        let nkeys = parts.len();
        let mut by_target: BTreeMap<Target, (Vec<usize>, Args<'_>)> = BTreeMap::new();
        for (i, (key, args)) in parts.into_iter().enumerate() {
            let e = by_target
                .entry(self.target(ring, key))
                .or_insert_with(|| (Vec::new(), Args::from_slice(&cmd[..1])));
            e.0.push(i);
            e.1.extend_from_slice(args);
        }
        let mut idx = Vec::with_capacity(by_target.len());
        let mut groups = Vec::with_capacity(by_target.len());
        for ((primary, _), (i, sub)) in &by_target {
            let mut g = Group::new(primary, self.me());
            g.push(sub);
            groups.push(g);
            idx.push(i.clone());
        }
        let replies = self.run_groups(groups).await;
        let parts = idx
            .into_iter()
            .zip(replies)
            .map(|(i, r)| (i, r.frame(0, &self.limits)))
            .collect();
        merge(cmd, nkeys, parts)
    }

    /// DBSIZE of the whole cluster: each alive node counts the keys it is the primary of.
    async fn cluster_dbsize(&self) -> Frame {
        let mut total: u64 = 0;
        for node in self.ctx.ring().nodes() {
            match self
                .ctx
                .rpc
                .call::<CacheApi>(node, &CacheRequest::CountPrimary)
                .await
            {
                Ok(CacheResponse::Done(k)) => total = total.saturating_add(k),
                Ok(_) => return Frame::err(format!("ERR DBSIZE: unexpected answer from {node}")),
                Err(e) => {
                    return Frame::err(format!("TRYAGAIN DBSIZE: {node} did not answer ({e})"))
                }
            }
        }
        Frame::Integer(total.min(i64::MAX as u64) as i64)
    }

    /// Keys held here whose primary is this node (in this node's ring).
    fn count_primary(&self) -> u64 {
        let ring = self.ctx.ring();
        let me = self.me();
        if alone(&ring, me) {
            return self.lock().len() as u64;
        }
        self.lock()
            .count_keys(|k| ring.owner(k).is_none_or(|o| o == me)) as u64
    }

    /// Run client commands (one pipeline round) and append their replies, in order, to
    /// `out`. True when the connection must close (QUIT: nothing after it runs).
    async fn run(self: &Arc<Self>, cmds: &[Args<'_>], out: &mut Vec<u8>) -> bool {
        let ring = self.ctx.ring();
        let me = self.me();
        if alone(&ring, me) {
            // Every key lives here: run the round as it came, in one pass over the store.
            let n = cmds
                .iter()
                .position(|c| Name::of(c).as_str() == "QUIT")
                .map_or(cmds.len(), |q| q + 1);
            for (f, quit) in self.exec_local(&cmds[..n]).await {
                encode(&f, out);
                if quit {
                    return true;
                }
            }
            return false;
        }
        /// Where a command's reply comes from.
        enum Reply {
            Now(Frame),
            /// The next reply of group `g` (in the order the groups were flushed).
            Group(usize),
        }
        let mut replies = Vec::with_capacity(cmds.len());
        let mut done: Vec<Encoded> = Vec::new();
        let mut pending: Vec<Group> = Vec::new();
        let mut quit = false;
        for cmd in cmds {
            match route(cmd) {
                Route::Key(key) => {
                    let primary = ring.owner(key).unwrap_or(me);
                    let k = match pending.iter().position(|g| g.node == primary) {
                        Some(k) => k,
                        None => {
                            pending.push(Group::new(primary, me));
                            pending.len() - 1
                        }
                    };
                    pending[k].push(cmd);
                    replies.push(Reply::Group(done.len() + k));
                }
                Route::Local => {
                    let name = Name::of(cmd);
                    if name.as_str() == "QUIT" {
                        // Nothing after QUIT runs; what came before is answered first.
                        self.flush(&mut pending, &mut done).await;
                        replies.push(Reply::Now(Frame::ok()));
                        quit = true;
                        break;
                    }
                    let reply = if name.as_str() == "DBSIZE" && cmd.len() == 1 {
                        self.cluster_dbsize().await
                    } else {
                        let mut r = self.exec_local(std::slice::from_ref(cmd)).await;
                        r.pop()
                            .map_or_else(|| Frame::err("ERR no reply"), |(f, _)| f)
                    };
                    replies.push(Reply::Now(reply));
                }
                Route::Multi => {
                    self.flush(&mut pending, &mut done).await;
                    replies.push(Reply::Now(self.multi(&ring, cmd).await));
                }
            }
        }
        self.flush(&mut pending, &mut done).await;
        let mut next = vec![0usize; done.len()];
        for r in replies {
            match r {
                Reply::Now(f) => encode(&f, out),
                Reply::Group(g) => match (done.get(g), next.get_mut(g)) {
                    (Some(e), Some(k)) => {
                        out.extend_from_slice(e.get(*k));
                        *k += 1;
                    }
                    _ => encode(&Frame::err("ERR internal: no reply"), out),
                },
            }
        }
        quit
    }

    /// Run the groups waiting in `pending`; their results go to the end of `done`.
    async fn flush(self: &Arc<Self>, pending: &mut Vec<Group<'_, '_>>, done: &mut Vec<Encoded>) {
        if !pending.is_empty() {
            done.extend(self.run_groups(std::mem::take(pending)).await);
        }
    }

    async fn one(self: &Arc<Self>, cmd: &[&[u8]]) -> Result<Frame, RpcError> {
        let mut out = Vec::new();
        self.run(&[Args::from_slice(cmd)], &mut out).await;
        match parse_frame(&out, &self.limits) {
            Ok(Some((Frame::Error(e), _))) => Err(RpcError::refused(String::from_utf8_lossy(&e))),
            Ok(Some((f, _))) => Ok(f),
            _ => Err(RpcError::Internal("no reply".into())),
        }
    }

    fn stats(&self) -> CacheStats {
        let store = self.lock();
        let st = store.stats();
        CacheStats {
            node: self.me().to_string(),
            resp_port: self.port.load(Ordering::Relaxed),
            keys: store.len() as u64,
            used_memory: store.used_memory() as u64,
            maxmemory: store.config().maxmemory as u64,
            policy: store.config().policy.as_str().to_string(),
            hits: st.hits,
            misses: st.misses,
            evictions: st.evictions,
            expired: st.expired,
            clients: self.clients.load(Ordering::Relaxed) as u64,
            repl_dropped: self.repl_dropped.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
            settled: self.settled(),
        }
    }

    fn export_metrics(&self, m: &Metrics) {
        let s = self.stats();
        m.set_counter("dsys_cache_hits_total", &[], s.hits);
        m.set_counter("dsys_cache_misses_total", &[], s.misses);
        m.set_counter("dsys_cache_evictions_total", &[], s.evictions);
        m.set_counter("dsys_cache_expired_total", &[], s.expired);
        m.set_counter("dsys_cache_loads_total", &[], s.loads);
        m.set("dsys_cache_keys", &[], s.keys);
        m.set("dsys_cache_used_memory_bytes", &[], s.used_memory);
        m.set("dsys_cache_clients", &[], s.clients);
    }
}

/// The forwarder of one primary node: gathers the jobs of all connections bound for it
/// into one [`CacheRequest::Exec`] while earlier batches are in flight (at most `inflight`
/// at once), so many clients cost one RPC per round trip instead of one each. Jobs are
/// taken whole and in arrival order, so a connection's commands for this node stay together
/// and in order; they are answered in order by the primary, which runs a batch in one pass.
async fn forward_loop(
    inner: Weak<Inner>,
    node: String,
    mut jobs_rx: mpsc::UnboundedReceiver<Job>,
    inflight: usize,
) {
    let slots = Arc::new(Semaphore::new(inflight.max(1)));
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match jobs_rx.recv().await {
                Some(j) => waiting.push_back(j),
                None => return,
            }
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Let the tasks that can run now go first (connections whose requests have arrived
        // and are being read): their jobs join this batch instead of waiting for the next
        // round trip. Costs one turn of the scheduler, no timer: a lone client is not
        // delayed, and many clients share one RPC.
        tokio::task::yield_now().await;
        // Everything that arrived while the slots were busy goes in this batch.
        while let Ok(j) = jobs_rx.try_recv() {
            waiting.push_back(j);
        }
        let (mut n, mut bytes) = (0, 0);
        let mut batch = Vec::new();
        while let Some(j) = waiting.front() {
            if !batch.is_empty() && (n + j.count > MAX_BATCH || bytes + j.cmds.len() > BATCH_BYTES)
            {
                break;
            }
            n += j.count;
            bytes += j.cmds.len();
            batch.extend(waiting.pop_front());
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let node = node.clone();
        tokio::spawn(async move {
            inner.send_jobs(node, batch).await;
            drop(permit);
        });
    }
}

/// One ordered queue and sender task per replica target. Writers push packed batches (one
/// per executed round); the task sends what is queued in one [`CacheRequest::Replicate`]
/// (whole batches, up to [`MAX_BATCH`] items, after lingering up to [`REPL_LINGER`] for a
/// small backlog to grow), one RPC at a time, so the order per key is kept.
fn spawn_replicator(rpc: dsys_runtime::Rpc, target: String, dropped: Arc<AtomicU64>) -> ReplQueue {
    let (tx, mut rx) = mpsc::unbounded_channel::<ReplBatch>();
    let queued = Arc::new(AtomicUsize::new(0));
    let q = queued.clone();
    tokio::spawn(async move {
        let mut buf: VecDeque<ReplBatch> = VecDeque::new();
        loop {
            if buf.is_empty() {
                match rx.recv().await {
                    Some(b) => buf.push_back(b),
                    None => return,
                }
            }
            while let Ok(b) = rx.try_recv() {
                buf.push_back(b);
            }
            if buf.iter().map(ReplBatch::len).sum::<usize>() < REPL_LINGER_ITEMS {
                tokio::time::sleep(REPL_LINGER).await;
                while let Ok(b) = rx.try_recv() {
                    buf.push_back(b);
                }
            }
            let Some(mut batch) = buf.pop_front() else {
                continue;
            };
            while let Some(b) = buf.front() {
                if batch.len() + b.len() > MAX_BATCH || batch.bytes() + b.bytes() > BATCH_BYTES {
                    break;
                }
                batch.append(b);
                buf.pop_front();
            }
            q.fetch_sub(batch.len(), Ordering::Relaxed);
            let n = batch.len() as u64;
            if let Err(e) = rpc
                .call::<CacheApi>(&target, &CacheRequest::Replicate(batch))
                .await
            {
                dropped.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(%target, "cache replication failed: {e}");
            }
        }
    });
    ReplQueue { tx, queued }
}

/// Serve one RESP connection: parse every complete command buffered, run them, write all
/// replies at once, read more.
async fn serve_conn(inner: Arc<Inner>, mut sock: TcpStream, mut stop_rx: watch::Receiver<()>) {
    let _ = sock.set_nodelay(true);
    let limits = inner.limits;
    let max_pipeline = inner.cfg.max_pipeline;
    let max_request = inner.cfg.max_request_bytes;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        let mut used = 0;
        let mut error = None;
        let mut quit = false;
        let more;
        {
            // The commands borrow their arguments from `buf`, which is drained after.
            let mut cmds = Vec::new();
            while cmds.len() < max_pipeline {
                match parse_command(&buf[used..], &limits) {
                    Ok(Some((cmd, n))) => {
                        used += n;
                        if !cmd.is_empty() {
                            cmds.push(cmd);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            more = cmds.len() >= max_pipeline;
            if !cmds.is_empty() {
                quit = inner.run(&cmds, &mut out).await;
            }
        }
        buf.drain(..used);
        if let Some(e) = &error {
            encode(&Frame::err(format!("ERR {e}")), &mut out);
            quit = true;
        }
        if !quit && !more && buf.len() > max_request {
            encode(
                &Frame::err("ERR Protocol error: request too large"),
                &mut out,
            );
            quit = true;
        }
        if !out.is_empty() {
            if sock.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if out.capacity() > 1024 * 1024 {
                out.shrink_to(16 * 1024);
            }
        }
        if quit {
            let _ = sock.shutdown().await;
            return;
        }
        if more {
            continue;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            r = sock.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = stop_rx.changed() => return,
        }
        if buf.is_empty() && buf.capacity() > 1024 * 1024 {
            buf.shrink_to(16 * 1024);
        }
    }
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, stop_rx: watch::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(inner.cfg.max_connections));
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cache: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = sock
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
            });
            continue;
        };
        let (inner, stop_rx) = (inner.clone(), stop_rx.clone());
        tokio::spawn(async move {
            inner.clients.fetch_add(1, Ordering::Relaxed);
            serve_conn(inner.clone(), sock, stop_rx).await;
            inner.clients.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[async_trait::async_trait]
impl Plugin for CachePlugin {
    type Api = CacheApi;

    fn export_metrics(&self, m: &Metrics) {
        self.inner.export_metrics(m);
    }

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let cfg: CacheConfig = ctx.plugin_config("cache").map_err(|e| e.to_string())?;
        cfg.validate()?;
        let port = cfg.ports.get(&ctx.node_id).copied().unwrap_or(0);
        let listener = TcpListener::bind((cfg.host.as_str(), port))
            .await
            .map_err(|e| format!("cache: binding RESP {}:{port}: {e}", cfg.host))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("cache: {e}"))?
            .port();
        let store = Store::new(StoreConfig {
            maxmemory: usize::try_from(cfg.maxmemory).unwrap_or(usize::MAX),
            policy: cfg.policy,
            samples: cfg.samples,
            max_value: cfg.max_bulk_bytes,
            ..StoreConfig::default()
        });
        let limits = Limits {
            max_bulk: cfg.max_bulk_bytes,
            ..Limits::default()
        };
        for (name, kind, help) in [
            (
                "dsys_cache_hits_total",
                "counter",
                "Cache reads that found the key",
            ),
            (
                "dsys_cache_misses_total",
                "counter",
                "Cache reads that did not find the key",
            ),
            (
                "dsys_cache_evictions_total",
                "counter",
                "Keys evicted to stay under maxmemory",
            ),
            (
                "dsys_cache_expired_total",
                "counter",
                "Keys removed because their TTL passed",
            ),
            (
                "dsys_cache_loads_total",
                "counter",
                "Values loaded from kv by read-through",
            ),
            ("dsys_cache_keys", "gauge", "Keys held by this node"),
            (
                "dsys_cache_used_memory_bytes",
                "gauge",
                "Approximate bytes used by the cache",
            ),
            ("dsys_cache_clients", "gauge", "Open RESP connections"),
        ] {
            ctx.metrics.describe(name, kind, help);
        }
        tracing::info!(node = %ctx.node_id, port = bound, "cache: RESP listening");
        let inner = Arc::new(Inner {
            ctx,
            cfg,
            limits,
            store: Mutex::new(store),
            expiry: Arc::default(),
            port: AtomicU16::new(bound),
            clients: AtomicUsize::new(0),
            repl_tx: Mutex::new(HashMap::new()),
            repl_dropped: Arc::new(AtomicU64::new(0)),
            forward_tx: Mutex::new(HashMap::new()),
            handoff_ring: Mutex::new(None),
            handing_off: AtomicBool::new(false),
            handed_off: AtomicU64::new(0),
            loads: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        let mut tasks = vec![tokio::spawn(accept_loop(inner.clone(), listener, stop_rx))];
        // Hand-off follows every change of the membership view, including the ones no
        // cluster event reports (a restarting member is out of the ring while it proves
        // itself, and comes back with an empty cache).
        inner.maybe_hand_off();
        let weak = Arc::downgrade(&inner);
        let mut view = inner.ctx.membership.watch();
        tasks.push(tokio::spawn(async move {
            while view.changed().await.is_ok() {
                let Some(inner) = weak.upgrade() else { return };
                inner.maybe_hand_off();
            }
        }));
        let weak = Arc::downgrade(&inner);
        let expiry = inner.expiry.clone();
        tasks.push(tokio::spawn(async move {
            // Active expiry at Redis' 10 Hz while keys with a TTL exist; otherwise no timer:
            // the loop sleeps until a TTL is set (see `StoreGuard`).
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let expiring = {
                    let Some(inner) = weak.upgrade() else { return };
                    // The bare lock: the guard's wake-up is for this loop's sleep.
                    let store = inner.store.lock().unwrap_or_else(|p| p.into_inner());
                    let expiring = store.volatile_len() > 0;
                    expiry.asleep.store(!expiring, Ordering::Relaxed);
                    expiring
                };
                if expiring {
                    tick.tick().await;
                } else {
                    expiry.wake.notified().await;
                }
                let Some(inner) = weak.upgrade() else { return };
                // Redis' active expiry: repeat while a quarter of the sample was expired.
                for _ in 0..16 {
                    let removed = inner.lock().active_expire(wall_ms(), 20);
                    if removed < 5 {
                        break;
                    }
                }
            }
        }));
        Ok(CachePlugin {
            inner,
            tasks,
            _shutdown_tx: stop_tx,
        })
    }

    async fn handle(&self, _caller: Caller, req: CacheRequest) -> Result<CacheResponse, RpcError> {
        let i = &self.inner;
        match req {
            CacheRequest::Get { key } => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                match i.one(&[b"GET", key.as_bytes()]).await? {
                    Frame::Bulk(v) => Ok(CacheResponse::Value {
                        key,
                        value: Some(v),
                    }),
                    _ => Ok(CacheResponse::Value { key, value: None }),
                }
            }
            CacheRequest::Set { key, value, ttl_ms } => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                let ttl = ttl_ms.map(|t| t.to_string());
                let mut cmd: Vec<&[u8]> = vec![b"SET", key.as_bytes(), &value];
                if let Some(t) = &ttl {
                    cmd.extend([&b"PX"[..], t.as_bytes()]);
                }
                i.one(&cmd).await?;
                Ok(CacheResponse::Done(1))
            }
            CacheRequest::Del { key } => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                match i.one(&[b"DEL", key.as_bytes()]).await? {
                    Frame::Integer(n) => Ok(CacheResponse::Done(n.max(0) as u64)),
                    _ => Ok(CacheResponse::Done(0)),
                }
            }
            CacheRequest::Stats => Ok(CacheResponse::Stats(i.stats())),
            CacheRequest::Invalidate { prefix } => {
                if prefix.len() > MAX_KEY_BYTES {
                    return Err(RpcError::refused("prefix too long"));
                }
                let mut keys = 0;
                let mut nodes = Vec::new();
                for n in i.ctx.ring().nodes().to_vec() {
                    let req = CacheRequest::LocalInvalidate {
                        prefix: prefix.clone(),
                    };
                    if let Ok(CacheResponse::Done(k)) = i.ctx.rpc.call::<CacheApi>(&n, &req).await {
                        keys += k;
                        nodes.push(n);
                    }
                }
                Ok(CacheResponse::Invalidated { keys, nodes })
            }
            CacheRequest::LocalInvalidate { prefix } => {
                if prefix.len() > MAX_KEY_BYTES {
                    return Err(RpcError::refused("prefix too long"));
                }
                Ok(CacheResponse::Done(
                    i.lock().remove_prefix(prefix.as_bytes()) as u64,
                ))
            }
            CacheRequest::Exec {
                cmds,
                count,
                replica: _,
            } => {
                let n = count as usize;
                if n > MAX_BATCH {
                    return Err(RpcError::refused(format!(
                        "at most {MAX_BATCH} commands per batch"
                    )));
                }
                let mut parsed = Vec::with_capacity(n);
                let mut rest = cmds.as_slice();
                while parsed.len() < n {
                    match parse_command(rest, &i.limits) {
                        Ok(Some((cmd, k))) => {
                            parsed.push(cmd);
                            rest = &rest[k..];
                        }
                        Ok(None) => return Err(RpcError::refused("truncated command batch")),
                        Err(e) => return Err(RpcError::refused(format!("command batch: {e}"))),
                    }
                }
                if !rest.is_empty() {
                    return Err(RpcError::refused("bytes after the command batch"));
                }
                let mut resp = Vec::with_capacity(n * 8);
                for (f, _) in i.exec_local(&parsed).await {
                    encode(&f, &mut resp);
                }
                Ok(CacheResponse::Replies { resp, count })
            }
            CacheRequest::CountPrimary => Ok(CacheResponse::Done(i.count_primary())),
            CacheRequest::Replicate(batch) => {
                if batch.len() > MAX_BATCH {
                    return Err(RpcError::refused(format!(
                        "at most {MAX_BATCH} items per batch"
                    )));
                }
                let items = batch.items().map_err(RpcError::refused)?;
                Ok(CacheResponse::Done(i.apply_replica(&items)))
            }
        }
    }
}
