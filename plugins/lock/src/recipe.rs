//! The recipe shared by locks and elections (etcd `concurrency`, ZooKeeper's lock and leader
//! recipes): each contender creates one key under a common prefix, attached to its own lease;
//! the key with the lowest `create_revision` is at the head of the queue; every other
//! contender watches only the key just before its own (no herd effect) and looks again when
//! that key goes. A lease whose keep-alives stop expires, and the consensus state machine
//! deletes its key, which is what frees a crashed holder's place.
//!
//! This module owns three things: [`Consensus`], a thin typed client of the `consensus`
//! plugin (every call goes to this node's instance, which forwards to the Raft leader);
//! [`queue`]/[`predecessor`], the pure ordering; and [`Sessions`], the keep-alive tasks of
//! the leases this node holds for its contenders.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_consensus::state::{
    Compare, CompareOp, CompareTarget, Event, KeyValue, OpResult, Txn, TxnOp,
};
use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest, ConsensusResponse};
use dsys_runtime::{Rpc, RpcError};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Longest single watch long-poll while waiting for a predecessor (then the queue is read
/// again, so a lost wake-up costs at most this long).
const WATCH_SLICE_MS: u64 = 5_000;

/// A consensus call slower than this is logged (a watch long-poll is slow on purpose).
const SLOW: Duration = Duration::from_millis(6_000);

/// A typed client of this node's `consensus` plugin.
#[derive(Clone, Debug)]
pub struct Consensus {
    rpc: Rpc,
}

fn unexpected(what: &str, r: &ConsensusResponse) -> RpcError {
    RpcError::Internal(format!("unexpected consensus answer to {what}: {r:?}"))
}

impl Consensus {
    /// Calls go to the `consensus` plugin of the node `rpc` belongs to.
    pub fn new(rpc: Rpc) -> Self {
        Consensus { rpc }
    }

    async fn call(&self, req: ConsensusRequest) -> Result<ConsensusResponse, RpcError> {
        let me = self.rpc.node_id().to_string();
        let t0 = Instant::now();
        let r = self.rpc.call::<ConsensusApi>(&me, &req).await;
        if t0.elapsed() > SLOW {
            let what = format!("{req:?}");
            tracing::warn!(
                took = ?t0.elapsed(),
                ok = r.is_ok(),
                "slow consensus call: {}",
                &what[..what.len().min(120)]
            );
        }
        r
    }

    /// Grant a lease of `ttl_ms`; its id.
    pub async fn grant(&self, ttl_ms: u64) -> Result<u64, RpcError> {
        match self.call(ConsensusRequest::LeaseGrant { ttl_ms }).await? {
            ConsensusResponse::LeaseGranted { id, .. } => Ok(id),
            r => Err(unexpected("lease grant", &r)),
        }
    }

    /// Keep a lease alive for another TTL (refused once it is gone).
    pub async fn keep_alive(&self, id: u64) -> Result<u64, RpcError> {
        match self.call(ConsensusRequest::LeaseKeepAlive { id }).await? {
            ConsensusResponse::LeaseKept { ttl_ms, .. } => Ok(ttl_ms),
            r => Err(unexpected("lease keep-alive", &r)),
        }
    }

    /// Revoke a lease, deleting its keys.
    pub async fn revoke(&self, id: u64) -> Result<(), RpcError> {
        match self.call(ConsensusRequest::LeaseRevoke { id }).await? {
            ConsensusResponse::LeaseRevoked { .. } => Ok(()),
            r => Err(unexpected("lease revoke", &r)),
        }
    }

    /// Every key under `prefix` (linearizable unless `serializable`) and the revision read.
    pub async fn range(
        &self,
        prefix: &str,
        serializable: bool,
    ) -> Result<(Vec<KeyValue>, u64), RpcError> {
        let req = ConsensusRequest::Get {
            key: prefix.to_string(),
            prefix: true,
            serializable,
            limit: dsys_plugin_consensus::api::MAX_RANGE,
        };
        match self.call(req).await? {
            ConsensusResponse::Range {
                kvs,
                more: false,
                revision,
            } => Ok((kvs, revision)),
            ConsensusResponse::Range { more: true, .. } => Err(RpcError::refused(format!(
                "more than {} keys under `{prefix}`: too many contenders",
                dsys_plugin_consensus::api::MAX_RANGE
            ))),
            r => Err(unexpected("range", &r)),
        }
    }

    /// Put `key` (attached to `lease`) if it does not exist; the revision of the put (its
    /// create revision), or `None` if the key was there already.
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: u64,
    ) -> Result<Option<u64>, RpcError> {
        let txn = Txn {
            compares: vec![Compare {
                key: key.to_string(),
                op: CompareOp::Equal,
                target: CompareTarget::CreateRevision(0),
            }],
            success: vec![TxnOp::Put {
                key: key.to_string(),
                value: value.to_string(),
                lease: Some(lease),
            }],
            failure: vec![],
        };
        let (ok, rev, _) = self.txn(txn).await?;
        Ok(ok.then_some(rev))
    }

    /// Overwrite `key` with `value` if its mod revision is still `mod_revision` (the lease
    /// stays); whether it was.
    pub async fn update(
        &self,
        key: &str,
        mod_revision: u64,
        value: &str,
        lease: Option<u64>,
    ) -> Result<bool, RpcError> {
        let txn = Txn {
            compares: vec![Compare {
                key: key.to_string(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(mod_revision),
            }],
            success: vec![TxnOp::Put {
                key: key.to_string(),
                value: value.to_string(),
                lease,
            }],
            failure: vec![],
        };
        Ok(self.txn(txn).await?.0)
    }

    /// Run a transaction: (succeeded, revision, results).
    pub async fn txn(&self, t: Txn) -> Result<(bool, u64, Vec<OpResult>), RpcError> {
        match self.call(ConsensusRequest::Txn(t)).await? {
            ConsensusResponse::Txn {
                succeeded,
                revision,
                results,
            } => Ok((succeeded, revision, results)),
            r => Err(unexpected("txn", &r)),
        }
    }

    /// Events on `key` (or under it, with `prefix`) from revision `from`, waiting up to
    /// `wait_ms` for the first; (events, next revision to ask from).
    pub async fn watch(
        &self,
        key: &str,
        prefix: bool,
        from: u64,
        wait_ms: u64,
    ) -> Result<(Vec<Event>, u64), RpcError> {
        let req = ConsensusRequest::Watch {
            key: key.to_string(),
            prefix,
            from_revision: from,
            wait_ms,
            limit: 1000,
        };
        match self.call(req).await? {
            ConsensusResponse::Events {
                events,
                next_revision,
            } => Ok((events, next_revision)),
            r => Err(unexpected("watch", &r)),
        }
    }

    /// Wait until `key` is at the head of the queue under `prefix`, watching only its
    /// predecessor. `Ok(Some(kv))`: it is (the key as read then); `Ok(None)`: `deadline`
    /// passed first; `Err(Refused)`: the key is gone (its lease expired or was revoked).
    pub async fn wait_head(
        &self,
        prefix: &str,
        key: &str,
        deadline: Instant,
    ) -> Result<Option<KeyValue>, RpcError> {
        loop {
            let (kvs, revision) = match self.range(prefix, false).await {
                Ok(r) => r,
                Err(e) if transient(&e) && Instant::now() < deadline => {
                    tracing::debug!("reading the queue under `{prefix}`: {e}; again");
                    // Back off a little: an unreachable leader may answer at once, again.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let q = queue(kvs);
            let Some(mine) = q.iter().find(|kv| kv.key == key).cloned() else {
                return Err(RpcError::refused(format!(
                    "`{key}` is gone while waiting (its lease expired or was revoked)"
                )));
            };
            let Some(pred) = predecessor(&q, key) else {
                return Ok(Some(mine));
            };
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).as_millis().min(WATCH_SLICE_MS as u128) as u64;
            // Any event on the predecessor (normally its delete) or the end of the slice:
            // read the queue again. Nothing else can put us at the head.
            match self
                .watch(&pred.key, false, revision + 1, wait.max(1))
                .await
            {
                Ok(_) => {}
                Err(e) if transient(&e) => {
                    tracing::debug!("watching `{}`: {e}; reading the queue again", pred.key)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// An error after which the same read may well succeed (no leader yet, a slow or lost
/// peer): waits retry those until their deadline instead of giving up.
pub fn transient(e: &RpcError) -> bool {
    matches!(
        e,
        RpcError::Timeout(_) | RpcError::Unreachable(_) | RpcError::PluginUnavailable(_)
    )
}

/// Keys under `prefix` grouped by the name that follows it (`<prefix><name>/<contender>`).
pub fn group_by_name(prefix: &str, kvs: Vec<KeyValue>) -> BTreeMap<String, Vec<KeyValue>> {
    let mut by: BTreeMap<String, Vec<KeyValue>> = BTreeMap::new();
    for kv in kvs {
        let name = kv
            .key
            .get(prefix.len()..)
            .unwrap_or_default()
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        by.entry(name).or_default().push(kv);
    }
    by
}

/// Contenders in queue order: ascending create revision.
pub fn queue(mut kvs: Vec<KeyValue>) -> Vec<KeyValue> {
    kvs.sort_by_key(|kv| (kv.create_revision, kv.key.clone()));
    kvs
}

/// The contender just before `key` in `q` (what `key` watches), `None` at the head or when
/// `key` is not queued.
pub fn predecessor<'a>(q: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
    let i = q.iter().position(|kv| kv.key == key)?;
    i.checked_sub(1).map(|p| &q[p])
}

struct Session<T> {
    info: T,
    task: JoinHandle<()>,
}

/// The leases this node keeps alive for its contenders, each with a caller-defined `info`
/// (shown on the dashboard). A keep-alive is sent every third of the TTL; a lease the
/// state machine no longer knows ends its session.
pub struct Sessions<T> {
    map: Arc<Mutex<HashMap<u64, Session<T>>>>,
}

impl<T> Default for Sessions<T> {
    fn default() -> Self {
        Sessions {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<T: Clone + Send + 'static> Sessions<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Session<T>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start keeping `lease` (of `ttl_ms`) alive.
    pub fn start(&self, cx: &Consensus, lease: u64, ttl_ms: u64, info: T) {
        let cx = cx.clone();
        let map = Arc::downgrade(&self.map);
        let every = Duration::from_millis((ttl_ms / 3).max(50));
        let task = tokio::spawn(async move {
            let mut next = Instant::now() + every;
            loop {
                tokio::time::sleep_until(next).await;
                match cx.keep_alive(lease).await {
                    Ok(_) => next = Instant::now() + every,
                    Err(RpcError::Refused(m)) => {
                        tracing::info!(lease, "lease gone, session ends: {m}");
                        if let Some(map) = map.upgrade() {
                            map.lock().unwrap_or_else(|p| p.into_inner()).remove(&lease);
                        }
                        return;
                    }
                    // Transient (no leader, timeout): try again soon, the lease may still live.
                    Err(e) => {
                        tracing::debug!(lease, "keep-alive failed: {e}");
                        next = Instant::now() + every / 2;
                    }
                }
            }
        });
        if let Some(old) = self.lock().insert(lease, Session { info, task }) {
            old.task.abort();
        }
    }

    /// Replace the info of a session.
    pub fn set_info(&self, lease: u64, info: T) {
        if let Some(s) = self.lock().get_mut(&lease) {
            s.info = info;
        }
    }

    /// Stop keeping `lease` alive (it then expires after its TTL unless revoked).
    pub fn stop(&self, lease: u64) -> Option<T> {
        self.lock().remove(&lease).map(|s| {
            s.task.abort();
            s.info
        })
    }

    /// Whether `lease` is kept alive here.
    pub fn contains(&self, lease: u64) -> bool {
        self.lock().contains_key(&lease)
    }

    /// Every session: (lease, info).
    pub fn list(&self) -> Vec<(u64, T)> {
        let mut v: Vec<(u64, T)> = self
            .lock()
            .iter()
            .map(|(l, s)| (*l, s.info.clone()))
            .collect();
        v.sort_by_key(|(l, _)| *l);
        v
    }
}

impl<T> Drop for Sessions<T> {
    fn drop(&mut self) {
        for (_, s) in self.map.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            s.task.abort();
        }
    }
}

/// A contender's lease that is revoked (and its keep-alive stopped) unless disarmed: the
/// request that created it may be dropped mid-wait (client gone, deadline), and a waiter
/// nobody waits for must leave the queue at once rather than after its TTL.
pub struct Abandon<'a, T: Clone + Send + 'static> {
    cx: &'a Consensus,
    sessions: &'a Sessions<T>,
    lease: Option<u64>,
}

impl<'a, T: Clone + Send + 'static> Abandon<'a, T> {
    /// Guard `lease`.
    pub fn new(cx: &'a Consensus, sessions: &'a Sessions<T>, lease: u64) -> Self {
        Abandon {
            cx,
            sessions,
            lease: Some(lease),
        }
    }

    /// Keep the lease: the contender won.
    pub fn disarm(mut self) {
        self.lease = None;
    }

    /// Leave the queue now: revoke the lease before answering, so whoever hears "not
    /// acquired" / "not elected" no longer finds this contender queued. (Dropping the guard
    /// does the same in the background, for requests cancelled mid-wait.) A failed revoke
    /// is logged; the lease then dies at its TTL, its keep-alive being stopped already.
    pub async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            self.sessions.stop(lease);
            if let Err(e) = self.cx.revoke(lease).await {
                tracing::info!(lease, "revoking a contender's lease: {e}");
            }
        }
    }
}

impl<T: Clone + Send + 'static> Drop for Abandon<'_, T> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.sessions.stop(lease);
            let cx = self.cx.clone();
            tokio::spawn(async move {
                if let Err(e) = cx.revoke(lease).await {
                    tracing::info!(lease, "revoking an abandoned contender's lease: {e}");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, create: u64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: String::new(),
            create_revision: create,
            mod_revision: create,
            version: 1,
            lease: Some(1),
        }
    }

    #[test]
    fn queue_orders_by_create_revision_and_each_watches_its_predecessor() {
        let q = queue(vec![kv("c", 9), kv("a", 3), kv("b", 5)]);
        let keys: Vec<&str> = q.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert!(predecessor(&q, "a").is_none());
        assert_eq!(predecessor(&q, "b").map(|k| k.key.as_str()), Some("a"));
        assert_eq!(predecessor(&q, "c").map(|k| k.key.as_str()), Some("b"));
        assert!(predecessor(&q, "zz").is_none());
    }
}
