//! `cache` (design 30): a distributed in-memory cache that speaks RESP2, so `redis-cli`,
//! `redis-benchmark` and any Redis client work against any node.
//!
//! Every node listens for RESP on its port (`[plugins.cache] ports`). A command for a key is
//! executed by the key's owner on the consistent-hash ring (`preference_list(key, 2)`: a
//! primary and one replica); a node that receives a command for a key it does not own
//! forwards it with [`CacheRequest::Exec`]. Pipelined commands are grouped per (primary,
//! replica) pair and sent as one batch per pair, the batches running concurrently; replies
//! are written back in order. Multi-key commands (MGET, MSET, DEL, EXISTS) are split by owner
//! and their replies merged.
//!
//! Replication is asynchronous, like Redis': after applying a write the primary queues the
//! new state of each written key for the replica; one ordered queue and sender task per
//! target node ship batches with [`CacheRequest::Replicate`]. A write acknowledged to the
//! client can therefore be lost if the primary dies before its batch left (the window is one
//! network round trip under load). When the primary does not answer, the command goes to the
//! replica, which serves it from its copy (and, once gossip declares the primary dead, the
//! ring makes the replica the primary anyway).
#![warn(missing_docs, unreachable_pub)]

mod api;
mod commands;
mod resp;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_kv::{KvApi, KvRequest, KvResponse};
use dsys_runtime::{Caller, Plugin, PluginContext, RpcError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

pub use api::{
    CacheApi, CacheCommand, CacheRequest, CacheResponse, CacheStats, ReplItem, MAX_BATCH,
    MAX_KEY_BYTES,
};
pub use commands::{execute, info, merge, name as command_name, route, split, Env, Outcome, Route};
pub use resp::{
    encode, encode_command, parse_command, parse_frame, Frame, Limits, RespError,
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
        if self.samples == 0 || self.samples > 1024 {
            return Err("plugins.cache.samples must be 1..=1024".into());
        }
        Ok(())
    }
}

/// Items queued per replica before new ones are dropped.
const REPL_QUEUE: usize = 65_536;

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
    port: AtomicU16,
    clients: AtomicUsize,
    repl_tx: Mutex<HashMap<String, mpsc::Sender<ReplItem>>>,
    repl_dropped: Arc<AtomicU64>,
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

/// A group of commands that go to the same primary and fall back to the same replica.
type Target = (String, Option<String>);

/// Commands waiting to be sent, per target, with their positions in the pipeline.
type Pending = BTreeMap<Target, (Vec<usize>, Vec<Vec<Vec<u8>>>)>;

impl Inner {
    fn me(&self) -> &str {
        &self.ctx.node_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn env(&self) -> Env {
        Env {
            node_id: self.ctx.node_id.clone(),
            port: self.port.load(Ordering::Relaxed),
            cluster_size: self.ctx.ring().nodes().len(),
            clients: self.clients.load(Ordering::Relaxed),
        }
    }

    /// Primary and replica of `key` in the current ring (this node when the ring is empty).
    fn target(&self, key: &[u8]) -> Target {
        let mut prefs = self.ctx.ring().preference_list(key, 2).into_iter();
        let primary = prefs.next().unwrap_or_else(|| self.me().to_string());
        (primary, prefs.next())
    }

    /// Run commands on this node's store, in order, then apply the read-through and
    /// write-through rules of their keys' prefixes.
    async fn exec_local(&self, cmds: &[Vec<Vec<u8>>]) -> Vec<(Frame, bool)> {
        let mut out = self.exec_store(cmds);
        if self.cfg.read_through.is_empty() && self.cfg.write_through.is_empty() {
            return out.into_iter().map(|(f, q, _)| (f, q)).collect();
        }
        for (cmd, (reply, _, written)) in cmds.iter().zip(out.iter_mut()) {
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
                && matches_prefix(&self.cfg.read_through, &cmd[1])
            {
                if let Some(v) = self.kv_load(&cmd[1]).await {
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
        let state = self.lock().peek(key, wall_ms());
        let req = match state {
            Some((value, _)) => KvRequest::Put {
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
            self.replicate(vec![ReplItem {
                key: key.to_vec(),
                value: None,
                expire_at: None,
            }]);
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
        let stored = self.lock().put(key, value.clone(), expire_at, now).is_ok();
        if stored {
            self.loads.fetch_add(1, Ordering::Relaxed);
            if self.cfg.replicate {
                self.replicate(vec![ReplItem {
                    key: key.to_vec(),
                    value: Some(value.clone()),
                    expire_at,
                }]);
            }
        }
        Some(value)
    }

    /// Run commands on this node's store, in order, and queue the written keys for their
    /// other holder. Returns each reply, whether to close, and the keys written.
    fn exec_store(&self, cmds: &[Vec<Vec<u8>>]) -> Vec<(Frame, bool, Vec<Vec<u8>>)> {
        let env = self.env();
        let now = wall_ms();
        let mut out = Vec::with_capacity(cmds.len());
        let mut items = Vec::new();
        {
            let mut store = self.lock();
            for cmd in cmds {
                let o = execute(&mut store, cmd, now, &env);
                if self.cfg.replicate {
                    for key in &o.written {
                        let (value, expire_at) = match store.peek(key, now) {
                            Some((v, t)) => (Some(v), t),
                            None => (None, None),
                        };
                        items.push(ReplItem {
                            key: key.clone(),
                            value,
                            expire_at,
                        });
                    }
                }
                out.push((o.reply, o.quit, o.written));
            }
        }
        if !items.is_empty() {
            self.replicate(items);
        }
        out
    }

    /// Queue items for the other node of each key's preference list.
    fn replicate(&self, items: Vec<ReplItem>) {
        let ring = self.ctx.ring();
        let mut txs = self.repl_tx.lock().unwrap_or_else(|p| p.into_inner());
        for item in items {
            for target in ring.preference_list(&item.key, 2) {
                if target == self.me() {
                    continue;
                }
                let tx = txs.entry(target.clone()).or_insert_with(|| {
                    spawn_replicator(
                        self.ctx.rpc.clone(),
                        target.clone(),
                        self.repl_dropped.clone(),
                    )
                });
                if tx.try_send(item.clone()).is_err() {
                    self.repl_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn apply_replica(&self, items: Vec<ReplItem>) -> u64 {
        let now = wall_ms();
        let mut store = self.lock();
        let mut n = 0;
        for it in items {
            match it.value {
                Some(v) => {
                    if store.put(&it.key, v, it.expire_at, now).is_ok() {
                        n += 1;
                    }
                }
                None => {
                    store.del(&it.key, now);
                    n += 1;
                }
            }
        }
        n
    }

    /// Send a group to its primary, or to its replica when the primary does not answer.
    async fn send_group(self: Arc<Self>, target: Target, cmds: Vec<Vec<Vec<u8>>>) -> Vec<Frame> {
        let (primary, replica) = target;
        let n = cmds.len();
        let plain = |v: Vec<(Frame, bool)>| v.into_iter().map(|(f, _)| f).collect::<Vec<_>>();
        if primary == self.me() {
            return plain(self.exec_local(&cmds).await);
        }
        let first = self
            .ctx
            .rpc
            .call::<CacheApi>(
                &primary,
                &CacheRequest::Exec {
                    cmds: cmds.clone(),
                    replica: false,
                },
            )
            .await;
        let err = match first {
            Ok(CacheResponse::Replies(r)) if r.len() == n => return r,
            Ok(_) => "unexpected answer".to_string(),
            Err(e) => e.to_string(),
        };
        let second = match replica {
            Some(r) if r == self.me() => return plain(self.exec_local(&cmds).await),
            Some(r) => {
                self.ctx
                    .rpc
                    .call::<CacheApi>(
                        &r,
                        &CacheRequest::Exec {
                            cmds,
                            replica: true,
                        },
                    )
                    .await
            }
            None => Err(RpcError::Unreachable("no replica".into())),
        };
        match second {
            Ok(CacheResponse::Replies(r)) if r.len() == n => r,
            other => {
                let why = other.err().map(|e| e.to_string()).unwrap_or_default();
                vec![
                    Frame::err(format!(
                        "TRYAGAIN owner {primary} unreachable ({err}); replica: {why}"
                    ));
                    n
                ]
            }
        }
    }

    /// Run a batch of groups concurrently; results in the order of `groups`.
    async fn run_groups(
        self: &Arc<Self>,
        groups: Vec<(Target, Vec<Vec<Vec<u8>>>)>,
    ) -> Vec<Vec<Frame>> {
        let mut handles = Vec::with_capacity(groups.len());
        for (target, cmds) in groups {
            let this = self.clone();
            if target.0 == self.me() {
                handles.push(Err(this.send_group(target, cmds).await));
            } else {
                handles.push(Ok(tokio::spawn(this.send_group(target, cmds))));
            }
        }
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(match h {
                Err(done) => done,
                Ok(task) => task
                    .await
                    .unwrap_or_else(|e| vec![Frame::err(format!("ERR internal: {e}"))]),
            });
        }
        out
    }

    /// A multi-key command, split by owner and merged.
    async fn multi(self: &Arc<Self>, cmd: &[Vec<u8>]) -> Frame {
        let parts = split(cmd);
        let nkeys = parts.len();
        let mut by_target: BTreeMap<Target, (Vec<usize>, Vec<Vec<u8>>)> = BTreeMap::new();
        for (i, (key, args)) in parts.into_iter().enumerate() {
            let e = by_target
                .entry(self.target(&key))
                .or_insert_with(|| (Vec::new(), vec![cmd[0].clone()]));
            e.0.push(i);
            e.1.extend(args);
        }
        let (idx, groups): (Vec<_>, Vec<_>) = by_target
            .into_iter()
            .map(|(t, (idx, sub))| (idx, (t, vec![sub])))
            .unzip();
        let replies = self.run_groups(groups).await;
        let parts = idx
            .into_iter()
            .zip(replies)
            .map(|(i, mut r)| (i, r.pop().unwrap_or(Frame::err("ERR no reply"))))
            .collect();
        merge(cmd, nkeys, parts)
    }

    /// Run client commands (one pipeline round) and return their replies in order, with
    /// whether the connection must close after each.
    async fn run(self: &Arc<Self>, cmds: Vec<Vec<Vec<u8>>>) -> Vec<(Frame, bool)> {
        let n = cmds.len();
        let mut replies: Vec<Option<(Frame, bool)>> = vec![None; n];
        let mut pending = Pending::new();
        for (i, cmd) in cmds.into_iter().enumerate() {
            match route(&cmd) {
                Route::Key(key) => {
                    let e = pending.entry(self.target(&key)).or_default();
                    e.0.push(i);
                    e.1.push(cmd);
                }
                Route::Local => {
                    let quit = commands::name(&cmd) == "QUIT";
                    if quit {
                        // Nothing after QUIT runs; what came before is answered first.
                        self.flush(&mut pending, &mut replies).await;
                    }
                    let mut r = self.exec_local(std::slice::from_ref(&cmd)).await;
                    replies[i] = r.pop();
                    if quit {
                        replies.truncate(i + 1);
                        return replies.into_iter().flatten().collect();
                    }
                }
                Route::Multi => {
                    self.flush(&mut pending, &mut replies).await;
                    replies[i] = Some((self.multi(&cmd).await, false));
                }
            }
        }
        self.flush(&mut pending, &mut replies).await;
        replies
            .into_iter()
            .map(|r| r.unwrap_or((Frame::err("ERR no reply"), false)))
            .collect()
    }

    async fn flush(self: &Arc<Self>, pending: &mut Pending, replies: &mut [Option<(Frame, bool)>]) {
        if pending.is_empty() {
            return;
        }
        let (idx, groups): (Vec<_>, Vec<_>) = std::mem::take(pending)
            .into_iter()
            .map(|(t, (idx, cmds))| (idx, (t, cmds)))
            .unzip();
        for (idx, frames) in idx.into_iter().zip(self.run_groups(groups).await) {
            for (i, f) in idx.into_iter().zip(frames) {
                if let Some(slot) = replies.get_mut(i) {
                    *slot = Some((f, false));
                }
            }
        }
    }

    async fn one(self: &Arc<Self>, cmd: Vec<Vec<u8>>) -> Result<Frame, RpcError> {
        match self.run(vec![cmd]).await.pop() {
            Some((Frame::Error(e), _)) => Err(RpcError::refused(e)),
            Some((f, _)) => Ok(f),
            None => Err(RpcError::Internal("no reply".into())),
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
        }
    }

    fn publish_metrics(&self) {
        let s = self.stats();
        let m = &self.ctx.metrics;
        m.set("dsys_cache_hits", &[], s.hits);
        m.set("dsys_cache_misses", &[], s.misses);
        m.set("dsys_cache_evictions", &[], s.evictions);
        m.set("dsys_cache_expired", &[], s.expired);
        m.set("dsys_cache_keys", &[], s.keys);
        m.set("dsys_cache_used_memory_bytes", &[], s.used_memory);
        m.set("dsys_cache_clients", &[], s.clients);
        m.set("dsys_cache_loads", &[], s.loads);
    }
}

/// One ordered queue and sender task per replica target.
fn spawn_replicator(
    rpc: dsys_runtime::Rpc,
    target: String,
    dropped: Arc<AtomicU64>,
) -> mpsc::Sender<ReplItem> {
    let (tx, mut rx) = mpsc::channel::<ReplItem>(REPL_QUEUE);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(it) => batch.push(it),
                    Err(_) => break,
                }
            }
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
    tx
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
        let mut cmds = Vec::new();
        let mut used = 0;
        let mut error = None;
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
        let more = cmds.len() >= max_pipeline;
        buf.drain(..used);
        let mut quit = false;
        if !cmds.is_empty() {
            for (frame, q) in inner.run(cmds).await {
                encode(&frame, &mut out);
                if q {
                    quit = true;
                    break;
                }
            }
        }
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
        for (name, help) in [
            ("dsys_cache_hits", "Cache reads that found the key"),
            ("dsys_cache_misses", "Cache reads that did not find the key"),
            (
                "dsys_cache_evictions",
                "Keys evicted to stay under maxmemory",
            ),
            (
                "dsys_cache_expired",
                "Keys removed because their TTL passed",
            ),
            ("dsys_cache_keys", "Keys held by this node"),
            (
                "dsys_cache_used_memory_bytes",
                "Approximate bytes used by the cache",
            ),
            ("dsys_cache_clients", "Open RESP connections"),
            ("dsys_cache_loads", "Values loaded from kv by read-through"),
        ] {
            ctx.metrics.describe(name, "gauge", help);
        }
        tracing::info!(node = %ctx.node_id, port = bound, "cache: RESP listening");
        let inner = Arc::new(Inner {
            ctx,
            cfg,
            limits,
            store: Mutex::new(store),
            port: AtomicU16::new(bound),
            clients: AtomicUsize::new(0),
            repl_tx: Mutex::new(HashMap::new()),
            repl_dropped: Arc::new(AtomicU64::new(0)),
            loads: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        let mut tasks = vec![tokio::spawn(accept_loop(inner.clone(), listener, stop_rx))];
        let weak = Arc::downgrade(&inner);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                // Redis' active expiry: repeat while a quarter of the sample was expired.
                for _ in 0..16 {
                    let removed = inner.lock().active_expire(wall_ms(), 20);
                    if removed < 5 {
                        break;
                    }
                }
                inner.publish_metrics();
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
                match i
                    .one(vec![b"GET".to_vec(), key.clone().into_bytes()])
                    .await?
                {
                    Frame::Bulk(v) => Ok(CacheResponse::Value {
                        key,
                        value: Some(v),
                    }),
                    _ => Ok(CacheResponse::Value { key, value: None }),
                }
            }
            CacheRequest::Set { key, value, ttl_ms } => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                let mut cmd = vec![b"SET".to_vec(), key.into_bytes(), value];
                if let Some(t) = ttl_ms {
                    cmd.push(b"PX".to_vec());
                    cmd.push(t.to_string().into_bytes());
                }
                i.one(cmd).await?;
                Ok(CacheResponse::Done(1))
            }
            CacheRequest::Del { key } => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                match i.one(vec![b"DEL".to_vec(), key.into_bytes()]).await? {
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
            CacheRequest::Exec { cmds, replica: _ } => {
                if cmds.len() > MAX_BATCH {
                    return Err(RpcError::refused(format!(
                        "at most {MAX_BATCH} commands per batch"
                    )));
                }
                Ok(CacheResponse::Replies(
                    i.exec_local(&cmds)
                        .await
                        .into_iter()
                        .map(|(f, _)| f)
                        .collect(),
                ))
            }
            CacheRequest::Replicate(items) => {
                if items.len() > MAX_BATCH {
                    return Err(RpcError::refused(format!(
                        "at most {MAX_BATCH} items per batch"
                    )));
                }
                Ok(CacheResponse::Done(i.apply_replica(items)))
            }
        }
    }
}
