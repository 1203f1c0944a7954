//! `kv` (design 21): a Dynamo-style replicated key-value store. Any node coordinates a
//! request: it hashes the key onto the ring, sends it to the key's N replicas (the preference
//! list) and answers after W acknowledgements (writes) or R replies (reads). Replicas fsync
//! to their WAL before acknowledging. A replica that does not answer gets a durable hint kept
//! by another node and delivered when it is back; reads repair stale replicas; concurrent
//! writes resolve by last-write-wins on hybrid logical clock timestamps; deletes are
//! tombstones; anti-entropy (Merkle trees, `anti_entropy.rs`) runs on every membership change
//! and periodically, so every key again has N replicas after nodes come and go.
#![warn(missing_docs, unreachable_pub)]

mod anti_entropy;
mod api;
mod batcher;
mod quorum;
mod store;
mod version;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_runtime::{Caller, ClusterEvent, Metrics, Panel, Plugin, PluginContext, Ring, RpcError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use api::{
    KvApi, KvCommand, KvRequest, KvResponse, KvStats, MAX_BATCH, MAX_KEY_BYTES, MAX_SCAN,
    MAX_VALUE_BYTES,
};
pub use version::{newest, Hlc, HlcClock, Version};

use quorum::{Outcome, Quorum};
use store::Store;

/// `[plugins.kv]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Replicas per key.
    pub n: u8,
    /// Default write quorum.
    pub w: u8,
    /// Default read quorum.
    pub r: u8,
    /// How often hints are offered to their targets (and right after a target is back).
    pub hint_interval_ms: u64,
    /// Deliver hints at all. Only for showing that `dsys check set` catches writes that
    /// live only in hints (it must fail with this off); never turn it off otherwise.
    pub hint_delivery: bool,
    /// How often anti-entropy runs besides membership changes.
    pub anti_entropy_interval_ms: u64,
    /// Merkle tree depth (2^depth leaves).
    pub merkle_depth: u32,
    /// Snapshot (and truncate the WAL) after this many records.
    pub snapshot_every: u64,
    /// Tombstones older than this are dropped at the next snapshot. A replica that is away
    /// longer than this can bring a deleted key back, so keep it above the longest outage.
    pub tombstone_grace_ms: u64,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            n: 3,
            w: 2,
            r: 2,
            hint_interval_ms: 1000,
            hint_delivery: true,
            anti_entropy_interval_ms: 10_000,
            merkle_depth: 12,
            snapshot_every: 50_000,
            tombstone_grace_ms: 3_600_000,
        }
    }
}

impl KvConfig {
    fn validate(&self) -> Result<(), String> {
        if !(1..=7).contains(&self.n) {
            return Err("plugins.kv.n must be 1..=7".into());
        }
        if self.w == 0 || self.w > self.n || self.r == 0 || self.r > self.n {
            return Err("plugins.kv.w and plugins.kv.r must be 1..=n".into());
        }
        if self.merkle_depth > dsys_runtime::MerkleTree::MAX_DEPTH {
            return Err("plugins.kv.merkle_depth must be <= 16".into());
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Counters {
    hints_delivered: AtomicU64,
    read_repairs: AtomicU64,
    rebalanced: AtomicU64,
    handed_over: AtomicU64,
}

struct Inner {
    ctx: PluginContext,
    batcher: Arc<batcher::Batcher>,
    cfg: KvConfig,
    store: Store,
    hlc: Mutex<HlcClock>,
    counters: Counters,
    ae: anti_entropy::State,
    /// Wakes the hint loop early (a target is back).
    hints_wake: Arc<tokio::sync::Notify>,
}

/// The plugin instance.
pub struct KvPlugin {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KvPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPlugin({})", self.inner.ctx.node_id)
    }
}

impl Drop for KvPlugin {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn check_items(items: &[(String, Version)]) -> Result<(), RpcError> {
    if items.len() > MAX_BATCH {
        return Err(RpcError::refused(format!(
            "at most {MAX_BATCH} items per batch"
        )));
    }
    for (k, v) in items {
        RpcError::check_key(k, MAX_KEY_BYTES)?;
        if v.value.as_ref().map(Vec::len).unwrap_or(0) > MAX_VALUE_BYTES {
            return Err(RpcError::refused(format!(
                "value larger than {MAX_VALUE_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

impl Inner {
    fn me(&self) -> &str {
        &self.ctx.node_id
    }

    fn observe(&self, items: &[(String, Version)]) {
        let mut c = self.hlc.lock().unwrap_or_else(|p| p.into_inner());
        for (_, v) in items {
            c.observe(v.ts);
        }
    }

    /// Coordinate a write (a put, or a delete when `value` is None).
    async fn write(
        &self,
        key: String,
        value: Option<Vec<u8>>,
        w: Option<u8>,
    ) -> Result<KvResponse, RpcError> {
        RpcError::check_key(&key, MAX_KEY_BYTES)?;
        if value.as_ref().map(Vec::len).unwrap_or(0) > MAX_VALUE_BYTES {
            return Err(RpcError::refused(format!(
                "value larger than {MAX_VALUE_BYTES} bytes"
            )));
        }
        let w = w.unwrap_or(self.cfg.w);
        if w == 0 || w > self.cfg.n {
            return Err(RpcError::refused(format!("--w must be 1..={}", self.cfg.n)));
        }
        // Replicas come from the owner ring, which a failure or a partition does not
        // change: a key's N replicas stay the same nodes, and the ones that cannot be reached
        // get hints instead (sloppy quorum).
        let owners = self.ctx.owners();
        let all = owners.preference_list(key.as_bytes(), owners.nodes().len());
        let n = (self.cfg.n as usize).min(all.len());
        let (prefs, rest) = all.split_at(n);
        if (w as usize) > all.len() {
            return Err(RpcError::Unreachable(format!(
                "W={w} but the ring has only {} owners",
                all.len()
            )));
        }
        // Hint holders: the next healthy nodes after the preference list, then this
        // coordinator.
        let mut holders: Vec<String> = rest
            .iter()
            .filter(|h| self.ctx.membership.is_alive(h))
            .cloned()
            .collect();
        if !holders.iter().any(|h| h == self.me()) {
            holders.push(self.me().to_string());
        }
        let version = Version {
            ts: self
                .hlc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .now(wall_ms()),
            origin: self.me().to_string(),
            value,
        };
        // Each replica's write answers with the node that stored it (the replica itself,
        // or the holder of its hint), or None.
        let (tx, mut rx) = mpsc::channel::<Option<(String, bool)>>(prefs.len().max(1));
        for (i, target) in prefs.iter().enumerate() {
            let alive = self.ctx.membership.is_alive(target);
            let mut order = holders.clone();
            let turn = i % order.len().max(1);
            order.rotate_left(turn);
            let (rpc, tx, target) = (self.ctx.rpc.clone(), tx.clone(), target.clone());
            let item = vec![(key.clone(), version.clone())];
            let batcher = self.batcher.clone();
            tokio::spawn(async move {
                if alive && batcher.replicate(&target, item.clone()).await {
                    let _ = tx.send(Some((target, false))).await;
                    return;
                }
                for holder in order.into_iter().filter(|h| *h != target) {
                    let req = KvRequest::StoreHints {
                        target: target.clone(),
                        items: item.clone(),
                    };
                    if rpc.call::<KvApi>(&holder, &req).await.is_ok() {
                        let _ = tx.send(Some((holder, true))).await;
                        return;
                    }
                }
                let _ = tx.send(None).await;
            });
        }
        drop(tx);
        // W counts distinct nodes that have the version on disk: two hints on one holder
        // are one copy.
        let mut q = Quorum::new(w as usize, prefs.len());
        let mut stored: Vec<String> = Vec::new();
        let mut hinted = 0u8;
        while let Some(got) = rx.recv().await {
            let fresh = match got {
                Some((node, via_hint)) if !stored.contains(&node) => {
                    hinted += via_hint as u8;
                    stored.push(node);
                    true
                }
                _ => false,
            };
            match q.record(fresh) {
                Outcome::Reached => {
                    return Ok(KvResponse::Written {
                        version,
                        acks: q.ok() as u8,
                        hinted,
                    })
                }
                Outcome::Impossible => break,
                Outcome::Pending => {}
            }
        }
        Err(RpcError::Unreachable(format!(
            "write acknowledged by {} of the W={w} replicas needed (it may still be applied on those)",
            q.ok()
        )))
    }

    /// Coordinate a read: newest of R replies; stale replicas are repaired afterwards.
    async fn read(self: &Arc<Self>, key: String, r: Option<u8>) -> Result<KvResponse, RpcError> {
        RpcError::check_key(&key, MAX_KEY_BYTES)?;
        let r = r.unwrap_or(self.cfg.r);
        if r == 0 || r > self.cfg.n {
            return Err(RpcError::refused(format!("--r must be 1..={}", self.cfg.n)));
        }
        // R counts replies of the key's owners only: a hint holder is not asked.
        let prefs = self
            .ctx
            .owners()
            .preference_list(key.as_bytes(), self.cfg.n as usize);
        if (r as usize) > prefs.len() {
            return Err(RpcError::Unreachable(format!(
                "R={r} but the ring has only {} owners",
                prefs.len()
            )));
        }
        let (tx, mut rx) = mpsc::channel::<(String, Option<Option<Version>>)>(prefs.len());
        for target in &prefs {
            let (rpc, tx, target, key) = (
                self.ctx.rpc.clone(),
                tx.clone(),
                target.clone(),
                key.clone(),
            );
            let alive = self.ctx.membership.is_alive(&target);
            tokio::spawn(async move {
                let got = if !alive {
                    None
                } else {
                    match rpc.call::<KvApi>(&target, &KvRequest::Read(key)).await {
                        Ok(KvResponse::Local(v)) => Some(v),
                        _ => None,
                    }
                };
                let _ = tx.send((target, got)).await;
            });
        }
        drop(tx);
        let mut q = Quorum::new(r as usize, prefs.len());
        let mut replies: Vec<(String, Option<Version>)> = Vec::new();
        let mut outcome = Outcome::Pending;
        while outcome == Outcome::Pending {
            let Some((node, got)) = rx.recv().await else {
                break;
            };
            if let Some(v) = got.clone() {
                replies.push((node, v));
            }
            outcome = q.record(got.is_some());
        }
        if outcome != Outcome::Reached {
            return Err(RpcError::Unreachable(format!(
                "read answered by {} of the R={r} replicas needed",
                q.ok()
            )));
        }
        let best = replies
            .iter()
            .fold(None, |acc, (_, v)| newest(acc, v.clone()));
        // Read repair, after answering: wait for the slower replicas too, then bring every
        // replica that answered with an older version (or none) up to the newest.
        let this = self.clone();
        let n_replies = replies.len() as u8;
        let key2 = key.clone();
        tokio::spawn(async move {
            while let Ok(Some((node, got))) =
                tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
            {
                if let Some(v) = got {
                    replies.push((node, v));
                }
            }
            let Some(best) = replies
                .iter()
                .fold(None, |acc, (_, v)| newest(acc, v.clone()))
            else {
                return;
            };
            for (node, v) in replies {
                let stale = v.map(|v| best.newer_than(&v)).unwrap_or(true);
                if stale {
                    let req = KvRequest::Replicate(vec![(key2.clone(), best.clone())]);
                    if this.ctx.rpc.call::<KvApi>(&node, &req).await.is_ok() {
                        this.counters.read_repairs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(KvResponse::Value {
            key,
            version: best,
            replies: n_replies,
        })
    }

    async fn scan(&self, prefix: String, limit: usize) -> Result<KvResponse, RpcError> {
        if limit == 0 || limit > MAX_SCAN {
            return Err(RpcError::refused(format!("--limit must be 1..={MAX_SCAN}")));
        }
        if prefix.len() > MAX_KEY_BYTES {
            return Err(RpcError::refused("prefix too long"));
        }
        let nodes = self.ctx.ring().nodes().to_vec();
        let mut tasks = Vec::new();
        for n in nodes {
            let (rpc, p) = (self.ctx.rpc.clone(), prefix.clone());
            tasks.push(tokio::spawn(async move {
                rpc.call::<KvApi>(&n, &KvRequest::LocalScan { prefix: p, limit })
                    .await
            }));
        }
        let mut merged: std::collections::BTreeMap<String, Version> = Default::default();
        for t in tasks {
            if let Ok(Ok(KvResponse::Items(items))) = t.await {
                for (k, v) in items {
                    let cur = merged.remove(&k);
                    if let Some(v) = newest(cur, Some(v)) {
                        merged.insert(k, v);
                    }
                }
            }
        }
        Ok(KvResponse::Items(
            merged
                .into_iter()
                .filter(|(_, v)| v.value.is_some())
                .take(limit)
                .collect(),
        ))
    }

    async fn locate(&self, key: String) -> Result<KvResponse, RpcError> {
        RpcError::check_key(&key, MAX_KEY_BYTES)?;
        let mut out = Vec::new();
        for n in self.ctx.ring().nodes().to_vec() {
            if let Ok(KvResponse::Local(v)) = self
                .ctx
                .rpc
                .call::<KvApi>(&n, &KvRequest::Read(key.clone()))
                .await
            {
                if v.is_some() {
                    out.push((n, v));
                }
            }
        }
        Ok(KvResponse::Located(out))
    }

    fn stats(&self) -> KvStats {
        let (keys, tombstones) = self.store.counts();
        KvStats {
            node: self.me().to_string(),
            keys,
            tombstones,
            hints: self.store.hint_count(),
            hints_delivered: self.counters.hints_delivered.load(Ordering::Relaxed),
            read_repairs: self.counters.read_repairs.load(Ordering::Relaxed),
            rebalanced: self.counters.rebalanced.load(Ordering::Relaxed),
            handed_over: self.counters.handed_over.load(Ordering::Relaxed),
            wal_lsn: self.store.wal_lsn(),
            snapshots: self.store.snapshots.load(Ordering::Relaxed),
            ae_exchanges: self.ae.exchanges.load(Ordering::Relaxed),
            ae_bytes: self.ae.bytes.load(Ordering::Relaxed),
        }
    }

    /// Offer waiting hints to targets that are alive. A hint whose target no longer owns
    /// any ranges (it left, or was down past `cluster.owner_timeout_ms`) goes to the key's
    /// owners now instead.
    async fn deliver_hints(&self) {
        if !self.cfg.hint_delivery {
            return;
        }
        let owners = self.ctx.owners();
        for (target, hints) in self.store.hints_by_target() {
            let owner = owners.nodes().contains(&target);
            if owner && !self.ctx.membership.is_alive(&target) {
                continue;
            }
            for chunk in hints.chunks(512) {
                let items: Vec<(String, Version)> = chunk
                    .iter()
                    .map(|(_, k, v)| (k.clone(), v.clone()))
                    .collect();
                let ids: Vec<u64> = if owner {
                    let req = KvRequest::Replicate(items);
                    if self.ctx.rpc.call::<KvApi>(&target, &req).await.is_err() {
                        break;
                    }
                    chunk.iter().map(|(id, _, _)| *id).collect()
                } else {
                    let done = self.hand_over(&items).await;
                    chunk
                        .iter()
                        .zip(done)
                        .filter(|(_, d)| *d)
                        .map(|((id, _, _), _)| *id)
                        .collect()
                };
                let n = ids.len() as u64;
                if let Err(e) = self.store.hints_done(ids).await {
                    tracing::warn!("kv: recording delivered hints: {e}");
                    return;
                }
                self.counters
                    .hints_delivered
                    .fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The positions of `keys`, grouped under each of their N owners.
    fn by_owner<'k>(
        &self,
        owners: &Ring,
        keys: impl Iterator<Item = &'k str>,
    ) -> std::collections::BTreeMap<String, Vec<usize>> {
        let mut by_node: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
        for (i, k) in keys.enumerate() {
            for o in owners.preference(k.as_bytes(), self.cfg.n as usize) {
                by_node.entry(o.to_string()).or_default().push(i);
            }
        }
        by_node
    }

    /// Send each item to every owner of its key; true for the items all N owners stored.
    async fn hand_over(&self, items: &[(String, Version)]) -> Vec<bool> {
        let owners = self.ctx.owners();
        let n = self.cfg.n as usize;
        let by_node = self.by_owner(&owners, items.iter().map(|(k, _)| k.as_str()));
        let mut acks = vec![0usize; items.len()];
        for (node, idx) in by_node {
            if !self.ctx.membership.is_alive(&node) {
                continue;
            }
            let batch = idx.iter().map(|i| items[*i].clone()).collect();
            let req = KvRequest::Replicate(batch);
            if self.ctx.rpc.call::<KvApi>(&node, &req).await.is_ok() {
                for i in idx {
                    acks[i] += 1;
                }
            }
        }
        let want = n.min(owners.nodes().len());
        acks.into_iter().map(|a| a >= want).collect()
    }

    /// Hand the keys this node no longer owns (the owner ring changed) to their owners, and
    /// drop them here once every owner has them on disk. Tombstones travel too, so a delete
    /// is not undone; the owners keep them for `tombstone_grace_ms`.
    async fn hand_off(&self) {
        let owners = self.ctx.owners();
        let (me, n) = (self.me(), self.cfg.n as usize);
        let foreign = self
            .store
            .select(|k| !owners.preference(k.as_bytes(), n).contains(&me));
        for chunk in foreign.chunks(512) {
            let done = self.hand_over(chunk).await;
            let drop: Vec<(String, u64)> = chunk
                .iter()
                .zip(done)
                .filter(|(_, d)| *d)
                .map(|((k, v), _)| (k.clone(), v.digest()))
                .collect();
            let moved = drop.len() as u64;
            if let Err(e) = self.store.forget(drop).await {
                tracing::warn!("kv: dropping handed-over keys: {e}");
                return;
            }
            self.counters
                .handed_over
                .fetch_add(moved, Ordering::Relaxed);
        }
    }

    /// Keys whose owners do not all hold the same version.
    async fn compare(&self, keys: Vec<String>) -> Result<KvResponse, RpcError> {
        if keys.len() > MAX_BATCH {
            return Err(RpcError::refused(format!(
                "at most {MAX_BATCH} keys per compare"
            )));
        }
        for k in &keys {
            RpcError::check_key(k, MAX_KEY_BYTES)?;
        }
        let owners = self.ctx.owners();
        // Per key, the digest each owner holds (None where it holds nothing).
        let mut seen: Vec<Vec<Option<u64>>> = vec![Vec::new(); keys.len()];
        for (node, idx) in self.by_owner(&owners, keys.iter().map(String::as_str)) {
            let ks: Vec<String> = idx.iter().map(|i| keys[*i].clone()).collect();
            let got = match self
                .ctx
                .rpc
                .call::<KvApi>(&node, &KvRequest::Fetch(ks))
                .await?
            {
                KvResponse::Items(items) => items,
                other => return Err(RpcError::Internal(format!("unexpected {other:?}"))),
            };
            let got: std::collections::HashMap<String, u64> =
                got.into_iter().map(|(k, v)| (k, v.digest())).collect();
            for i in idx {
                seen[i].push(got.get(&keys[i]).copied());
            }
        }
        Ok(KvResponse::Keys(
            keys.into_iter()
                .zip(seen)
                .filter(|(_, d)| d.is_empty() || d.iter().any(|x| *x != d[0]))
                .map(|(k, _)| k)
                .collect(),
        ))
    }

    async fn maybe_snapshot(&self) {
        if self.store.since_snapshot() >= self.cfg.snapshot_every {
            let before = wall_ms().saturating_sub(self.cfg.tombstone_grace_ms);
            if let Err(e) = self.store.snapshot(before).await {
                tracing::error!("kv snapshot failed: {e}");
            }
        }
    }
}

#[async_trait::async_trait]
impl Plugin for KvPlugin {
    type Api = KvApi;

    fn read_only(req: &KvRequest) -> bool {
        matches!(req, KvRequest::Get { .. } | KvRequest::Scan { .. })
    }

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let cfg: KvConfig = ctx.plugin_config("kv").map_err(|e| e.to_string())?;
        for (name, kind, help) in [
            ("dsys_kv_keys", "gauge", "Live keys stored on this node"),
            (
                "dsys_kv_tombstones",
                "gauge",
                "Tombstones kept on this node",
            ),
            (
                "dsys_kv_hints_pending",
                "gauge",
                "Hinted-handoff writes waiting for their replica",
            ),
            (
                "dsys_kv_hints_delivered_total",
                "counter",
                "Hints delivered to their replica",
            ),
            (
                "dsys_kv_read_repairs_total",
                "counter",
                "Stale replicas repaired by reads",
            ),
            (
                "dsys_kv_rereplicated_items_total",
                "counter",
                "Items pushed to replicas by anti-entropy",
            ),
            (
                "dsys_kv_snapshots_total",
                "counter",
                "Store snapshots written",
            ),
            (
                "dsys_kv_anti_entropy_exchanges_total",
                "counter",
                "Merkle exchanges this node started",
            ),
            (
                "dsys_kv_anti_entropy_bytes_total",
                "counter",
                "Bytes those exchanges moved",
            ),
            ("dsys_kv_wal_lsn", "gauge", "Last LSN of this node's kv WAL"),
        ] {
            ctx.metrics.describe(name, kind, help);
        }
        cfg.validate()?;
        tokio::fs::create_dir_all(&ctx.data_dir)
            .await
            .map_err(|e| format!("{}: {e}", ctx.data_dir.display()))?;
        let store = Store::open(&ctx.data_dir)
            .await
            .map_err(|e| e.to_string())?;
        let inner = Arc::new(Inner {
            ae: anti_entropy::State::default(),
            batcher: Arc::new(batcher::Batcher::new(ctx.rpc.clone())),
            ctx,
            cfg,
            store,
            hlc: Mutex::new(HlcClock::default()),
            counters: Counters::default(),
            hints_wake: Arc::new(tokio::sync::Notify::new()),
        });
        let mut tasks = Vec::new();
        let weak = Arc::downgrade(&inner);
        let every = Duration::from_millis(inner.cfg.hint_interval_ms.max(50));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                let Some(wake) = weak.upgrade().map(|i| i.hints_wake.clone()) else {
                    return;
                };
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = wake.notified() => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.deliver_hints().await;
                inner.maybe_snapshot().await;
            }
        }));
        tasks.push(anti_entropy::spawn(Arc::downgrade(&inner)));
        Ok(KvPlugin { inner, tasks })
    }

    async fn handle(&self, _caller: Caller, req: KvRequest) -> Result<KvResponse, RpcError> {
        let i = &self.inner;
        match req {
            KvRequest::Put { key, value, w } => i.write(key, Some(value), w).await,
            KvRequest::Del { key, w } => i.write(key, None, w).await,
            KvRequest::Get { key, r } => i.read(key, r).await,
            KvRequest::Scan { prefix, limit } => i.scan(prefix, limit).await,
            KvRequest::Locate { key } => i.locate(key).await,
            KvRequest::Stats => Ok(KvResponse::Stats(i.stats())),
            KvRequest::Compare(keys) => i.compare(keys).await,
            KvRequest::Replicate(items) => {
                check_items(&items)?;
                i.observe(&items);
                let n = i
                    .store
                    .apply(items)
                    .await
                    .map_err(|e| RpcError::Internal(e.to_string()))?;
                Ok(KvResponse::Applied(n))
            }
            KvRequest::Read(key) => {
                RpcError::check_key(&key, MAX_KEY_BYTES)?;
                Ok(KvResponse::Local(i.store.get(&key)))
            }
            KvRequest::LocalScan { prefix, limit } => {
                if limit == 0 || limit > MAX_SCAN {
                    return Err(RpcError::refused(format!("limit must be 1..={MAX_SCAN}")));
                }
                Ok(KvResponse::Items(i.store.scan(&prefix, limit)))
            }
            KvRequest::StoreHints { target, items } => {
                check_items(&items)?;
                let n = items.len();
                i.store
                    .add_hints(&target, items)
                    .await
                    .map_err(|e| RpcError::Internal(e.to_string()))?;
                Ok(KvResponse::Applied(n))
            }
            KvRequest::MerkleNodes {
                peer,
                depth,
                level,
                indices,
                ring,
            } => {
                if depth > dsys_runtime::MerkleTree::MAX_DEPTH
                    || level > depth
                    || indices.len() > (1 << depth)
                {
                    return Err(RpcError::refused("bad merkle request"));
                }
                if ring != anti_entropy::fingerprint(&i.ctx.owners()) {
                    return Err(RpcError::Unreachable(
                        "ring views differ; retry when membership settles".into(),
                    ));
                }
                Ok(KvResponse::Hashes(anti_entropy::nodes(
                    i, &peer, depth, level, &indices,
                )))
            }
            KvRequest::LeafSummaries {
                peer,
                depth,
                leaves,
            } => {
                if depth > dsys_runtime::MerkleTree::MAX_DEPTH || leaves.len() > (1 << depth) {
                    return Err(RpcError::refused("bad leaf request"));
                }
                let items = anti_entropy::leaf_items(i, &peer, depth, &leaves);
                Ok(KvResponse::Summaries(
                    items
                        .into_iter()
                        .map(|(k, v)| (k, v.ts, v.digest()))
                        .collect(),
                ))
            }
            KvRequest::Fetch(keys) => {
                if keys.len() > MAX_BATCH {
                    return Err(RpcError::refused(format!(
                        "at most {MAX_BATCH} keys per fetch"
                    )));
                }
                Ok(KvResponse::Items(
                    keys.into_iter()
                        .filter_map(|k| i.store.get(&k).map(|v| (k, v)))
                        .collect(),
                ))
            }
        }
    }

    async fn on_cluster_event(&self, event: ClusterEvent) {
        match event {
            // A replica is back: its hints can go now, and replica pairs compare trees.
            ClusterEvent::Joined(_) | ClusterEvent::Back(_) => {
                self.inner.hints_wake.notify_one();
                self.inner.ae.trigger();
            }
            // Ownership moved: keys go to their new owners (anti-entropy hands them off).
            ClusterEvent::Owners(_) | ClusterEvent::Left(_) => self.inner.ae.trigger(),
            ClusterEvent::Dead(_) => {}
        }
    }

    fn export_metrics(&self, m: &Metrics) {
        let st = self.inner.stats();
        m.set("dsys_kv_keys", &[], st.keys);
        m.set("dsys_kv_tombstones", &[], st.tombstones);
        m.set("dsys_kv_hints_pending", &[], st.hints);
        m.set_counter("dsys_kv_hints_delivered_total", &[], st.hints_delivered);
        m.set_counter("dsys_kv_read_repairs_total", &[], st.read_repairs);
        m.set_counter("dsys_kv_rereplicated_items_total", &[], st.rebalanced);
        m.set_counter("dsys_kv_snapshots_total", &[], st.snapshots);
        m.set_counter("dsys_kv_anti_entropy_exchanges_total", &[], st.ae_exchanges);
        m.set_counter("dsys_kv_anti_entropy_bytes_total", &[], st.ae_bytes);
        m.set("dsys_kv_wal_lsn", &[], st.wal_lsn);
    }

    fn panel(&self) -> Option<Panel> {
        let i = &self.inner;
        let st = i.stats();
        let view = i.ctx.membership.view();
        let hints = i.store.hint_counts();
        let last = i.ae.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = wall_ms();
        let replicas = view.members.values().filter(|m| m.id != i.me()).map(|m| {
            let (at, what) = last
                .get(&m.id)
                .map(|(t, w)| {
                    (
                        format!("{} s ago", now.saturating_sub(*t) / 1000),
                        w.clone(),
                    )
                })
                .unwrap_or_else(|| ("-".into(), "-".into()));
            vec![
                m.id.clone(),
                format!("{:?}", m.state).to_lowercase(),
                hints.get(&m.id).copied().unwrap_or(0).to_string(),
                at,
                what,
            ]
        });
        Some(
            Panel::new(format!(
                "Dynamo KV (N={} W={} R={})",
                i.cfg.n, i.cfg.w, i.cfg.r
            ))
            .stat("keys", st.keys)
            .stat("tombstones", st.tombstones)
            .stat("hints pending", st.hints)
            .stat("hints delivered", st.hints_delivered)
            .stat("read repairs", st.read_repairs)
            .stat("items re-replicated", st.rebalanced)
            .stat("WAL LSN", st.wal_lsn)
            .stat("anti-entropy exchanges", st.ae_exchanges)
            .table(
                "Replica health (as this node sees its peers)",
                &[
                    "peer",
                    "state",
                    "hints waiting",
                    "last anti-entropy",
                    "result",
                ],
                replicas,
            ),
        )
    }
}
