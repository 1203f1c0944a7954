//! Anti-entropy (design 31n) between the replicas of each key range. For every pair of nodes
//! that should both hold some keys (both on those keys' preference lists of the owner ring),
//! each side builds a Merkle tree over exactly those keys; the two trees are compared and only
//! the items in differing leaves cross the network, in both directions, newest version
//! winning. Each round also hands the keys this node no longer owns to their owners
//! (`Inner::hand_off`). It runs after a node joins, comes back or leaves, after the owner
//! ring changes, and periodically.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dsys_runtime::{MerkleTree, Ring, RpcError};
use tokio::sync::Notify;

use crate::api::{KvApi, KvRequest, KvResponse};
use crate::version::{Hlc, Version};
use crate::Inner;

/// Anti-entropy bookkeeping of one node.
#[derive(Debug, Default)]
pub(crate) struct State {
    wake: Arc<Notify>,
    /// Bytes received and sent by exchanges this node started.
    pub(crate) bytes: AtomicU64,
    /// Exchanges completed.
    pub(crate) exchanges: AtomicU64,
    /// Last exchange with each peer: (wall-clock ms, what came of it), for the dashboard.
    pub(crate) last: std::sync::Mutex<std::collections::BTreeMap<String, (u64, String)>>,
}

impl State {
    /// Run a round soon (membership changed).
    pub(crate) fn trigger(&self) {
        self.wake.notify_one();
    }
}

/// A fingerprint of the ring's member set.
pub(crate) fn fingerprint(ring: &Ring) -> u64 {
    dsys_runtime::hash_key(ring.nodes().join(",").as_bytes())
}

fn shared(ring: &Ring, n: usize, me: &str, peer: &str, key: &str) -> bool {
    let prefs = ring.preference_list(key.as_bytes(), n);
    prefs.iter().any(|p| p == me) && prefs.iter().any(|p| p == peer)
}

/// The Merkle tree over the keys this node and `peer` both replicate.
pub(crate) fn tree(inner: &Inner, peer: &str, depth: u32) -> MerkleTree {
    let ring = inner.ctx.owners();
    let (me, n) = (inner.me(), inner.cfg.n as usize);
    let items = inner.store.select(|k| shared(&ring, n, me, peer, k));
    MerkleTree::build(depth, items.iter().map(|(k, v)| (k.as_bytes(), v.digest())))
}

/// Hashes at `level` of that tree: the positions in `indices`, or the whole level.
pub(crate) fn nodes(
    inner: &Inner,
    peer: &str,
    depth: u32,
    level: u32,
    indices: &[u32],
) -> Vec<u64> {
    let t = tree(inner, peer, depth);
    let row = t.level(level);
    if indices.is_empty() {
        return row.to_vec();
    }
    indices
        .iter()
        .map(|i| row.get(*i as usize).copied().unwrap_or(0))
        .collect()
}

/// The items of those keys that fall into `leaves`.
pub(crate) fn leaf_items(
    inner: &Inner,
    peer: &str,
    depth: u32,
    leaves: &[u32],
) -> Vec<(String, Version)> {
    let ring = inner.ctx.owners();
    let (me, n) = (inner.me(), inner.cfg.n as usize);
    let want: HashSet<usize> = leaves.iter().map(|l| *l as usize).collect();
    inner.store.select(|k| {
        want.contains(&MerkleTree::leaf_of(k.as_bytes(), depth)) && shared(&ring, n, me, peer, k)
    })
}

fn size<T: serde::Serialize>(v: &T) -> u64 {
    dsys_runtime::encode(v).map(|b| b.len() as u64).unwrap_or(0)
}

/// Level at which the descent looks for differing subtrees before reading their leaves.
const PROBE_LEVEL: u32 = 6;

async fn hashes(
    inner: &Inner,
    peer: &str,
    depth: u32,
    level: u32,
    indices: Vec<u32>,
) -> Result<Vec<u64>, RpcError> {
    let req = KvRequest::MerkleNodes {
        peer: inner.me().to_string(),
        depth,
        level,
        indices,
        ring: fingerprint(&inner.ctx.owners()),
    };
    match inner.ctx.rpc.call::<KvApi>(peer, &req).await? {
        KvResponse::Hashes(h) => {
            inner
                .ae
                .bytes
                .fetch_add(size(&req) + size(&h), Ordering::Relaxed);
            Ok(h)
        }
        other => Err(RpcError::Internal(format!("unexpected {other:?}"))),
    }
}

/// One exchange with `peer`: compare roots; if they differ, compare one level of subtrees,
/// then the leaves under the differing subtrees only; then swap the items of differing
/// leaves, newest version winning on each side.
async fn exchange(inner: &Inner, peer: &str) -> Result<u64, RpcError> {
    let depth = inner.cfg.merkle_depth;
    let me = inner.me().to_string();
    let rpc = &inner.ctx.rpc;
    let mine = tree(inner, peer, depth);
    if hashes(inner, peer, depth, 0, vec![0]).await? == [mine.root()] {
        return Ok(0);
    }
    let probe = PROBE_LEVEL.min(depth);
    let theirs = hashes(inner, peer, depth, probe, Vec::new()).await?;
    let subtrees = MerkleTree::diff_leaves(mine.level(probe), &theirs);
    let span = 1u32 << (depth - probe);
    let candidates: Vec<u32> = subtrees
        .iter()
        .flat_map(|s| (*s as u32 * span)..((*s as u32 + 1) * span))
        .collect();
    let mut diff: Vec<u32> = Vec::new();
    for chunk in candidates.chunks(4096) {
        let theirs = hashes(inner, peer, depth, depth, chunk.to_vec()).await?;
        let leaves = mine.leaves();
        diff.extend(
            chunk
                .iter()
                .zip(theirs)
                .filter(|(i, h)| leaves.get(**i as usize) != Some(h))
                .map(|(i, _)| *i),
        );
    }
    let mut repaired = 0u64;
    for chunk in diff.chunks(256) {
        // Summaries first: full items travel only for keys that really differ.
        let req = KvRequest::LeafSummaries {
            peer: me.clone(),
            depth,
            leaves: chunk.to_vec(),
        };
        let summaries = match rpc.call::<KvApi>(peer, &req).await? {
            KvResponse::Summaries(s) => s,
            other => return Err(RpcError::Internal(format!("unexpected {other:?}"))),
        };
        inner
            .ae
            .bytes
            .fetch_add(size(&req) + size(&summaries), Ordering::Relaxed);
        let theirs: BTreeMap<String, (Hlc, u64)> =
            summaries.into_iter().map(|(k, t, d)| (k, (t, d))).collect();
        let mine: BTreeMap<String, Version> =
            leaf_items(inner, peer, depth, chunk).into_iter().collect();
        let mut fetch: Vec<String> = Vec::new();
        let mut push: Vec<(String, Version)> = Vec::new();
        for (k, (ts, digest)) in &theirs {
            match mine.get(k) {
                None => fetch.push(k.clone()),
                Some(m) if m.digest() == *digest => {}
                Some(m) if *ts > m.ts => fetch.push(k.clone()),
                Some(m) if m.ts > *ts => push.push((k.clone(), m.clone())),
                // Same timestamp, different content: get theirs, newest wins on both sides.
                Some(m) => {
                    fetch.push(k.clone());
                    push.push((k.clone(), m.clone()));
                }
            }
        }
        push.extend(mine.into_iter().filter(|(k, _)| !theirs.contains_key(k)));
        for keys in fetch.chunks(512) {
            let req = KvRequest::Fetch(keys.to_vec());
            let items = match rpc.call::<KvApi>(peer, &req).await? {
                KvResponse::Items(items) => items,
                other => return Err(RpcError::Internal(format!("unexpected {other:?}"))),
            };
            inner
                .ae
                .bytes
                .fetch_add(size(&req) + size(&items), Ordering::Relaxed);
            repaired += items.len() as u64;
            inner.observe(&items);
            inner
                .store
                .apply(items)
                .await
                .map_err(|e| RpcError::Internal(e.to_string()))?;
        }
        repaired += push.len() as u64;
        for batch in push.chunks(512) {
            let req = KvRequest::Replicate(batch.to_vec());
            inner.ae.bytes.fetch_add(size(&req), Ordering::Relaxed);
            rpc.call::<KvApi>(peer, &req).await?;
        }
    }
    Ok(repaired)
}

fn note(inner: &Inner, peer: &str, what: String) {
    inner
        .ae
        .last
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(peer.to_string(), (crate::wall_ms(), what));
}

/// One round: exchange with every alive owner whose id sorts after ours (each pair once),
/// then hand off what this node no longer owns.
pub(crate) async fn round(inner: &Inner) {
    let me = inner.me().to_string();
    let peers: Vec<String> = inner
        .ctx
        .owners()
        .nodes()
        .iter()
        .filter(|p| **p > me && inner.ctx.membership.is_alive(p))
        .cloned()
        .collect();
    let mut retry = false;
    for p in peers {
        match exchange(inner, &p).await {
            Ok(n) => {
                inner.ae.exchanges.fetch_add(1, Ordering::Relaxed);
                inner.counters.rebalanced.fetch_add(n, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(peer = %p, repaired = n, "anti-entropy repaired items");
                    inner.ctx.timeline.record(
                        "kv",
                        &me,
                        format!("anti-entropy with {p} repaired {n} items"),
                    );
                }
                note(inner, &p, format!("in sync ({n} repaired)"));
            }
            Err(e) => {
                tracing::debug!(peer = %p, "anti-entropy exchange failed: {e}");
                note(inner, &p, format!("failed: {e}"));
                retry = true;
            }
        }
    }
    inner.hand_off().await;
    if retry {
        // Membership is probably still settling: try again soon rather than at the next
        // period.
        let wake = inner.ae.wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            wake.notify_one();
        });
    }
}

/// The background loop: a round after each membership change (once it settles) and every
/// `anti_entropy_interval_ms`.
pub(crate) fn spawn(weak: Weak<Inner>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let every = Duration::from_millis(inner.cfg.anti_entropy_interval_ms.max(100));
            let wake = inner.ae.wake.clone();
            // Do not keep the plugin alive while waiting.
            drop(inner);
            let woken = tokio::select! {
                _ = wake.notified() => true,
                _ = tokio::time::sleep(every) => false,
            };
            if woken {
                // Let membership settle (several events often arrive together), and stagger
                // the nodes so two replicas do not push the same items to a third at once.
                let rank = weak
                    .upgrade()
                    .map(|i| {
                        i.ctx
                            .owners()
                            .nodes()
                            .iter()
                            .position(|n| n.as_str() == i.me())
                            .unwrap_or(0)
                    })
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(300 + 400 * rank as u64)).await;
            }
            let Some(inner) = weak.upgrade() else { return };
            round(&inner).await;
        }
    })
}
