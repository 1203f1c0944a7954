//! Worker ids leased through the `consensus` plugin, so that no two live nodes issue under
//! the same worker id, and ids stay unique when a worker id moves from one node to another.
//!
//! Keys in the consensus store:
//! * `idgen/worker/<w>`: the claim, attached to the holder's lease (TTL [`DEFAULT_TTL_MS`]);
//!   created with a create-if-absent transaction, so one holder per worker id at a time; it
//!   disappears when the lease expires or is revoked;
//! * `idgen/hw/<w>`: worker `w`'s high-water mark (Unix ms), not leased, so it outlives
//!   holders: the highest millisecond any holder of `w` may have put in an id. A holder only
//!   issues ids up to a mark it has written and seen committed, and writes it only with a
//!   compare on its own claim's create revision (so a holder whose claim is gone can no longer
//!   raise it). A new holder reads it in the claiming transaction and starts strictly after it;
//! * `idgen/node/<node>`: the same mark per node (and the worker id it last held), so a
//!   restarted node starts after everything it issued before, whatever worker id it gets.
//!
//! The renewal loop, every third of the TTL: keep the lease alive (the generator may issue
//! until the send time of the last successful keep-alive plus 90% of the TTL), then raise the
//! marks to the clock plus one TTL. A refused keep-alive, a failed compare
//! (the claim key is gone) or no successful keep-alive within the TTL stops the generator at
//! once; the node then acquires a worker id again before it issues anything.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_consensus::state::{
    Compare, CompareOp, CompareTarget, KeyValue, OpResult, Txn, TxnOp,
};
use dsys_plugin_lock::recipe::{transient, Consensus};
use dsys_runtime::{RpcError, Timeline};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::generator::{Clock, Idgen};
use crate::layout::{EPOCH_UNIX_MS, WORKERS};

/// Default lease TTL of a worker id.
pub const DEFAULT_TTL_MS: u64 = 5_000;
/// Prefix of the claim keys.
pub const WORKER_PREFIX: &str = "idgen/worker/";
/// Prefix of the per-worker high-water marks.
pub const HW_PREFIX: &str = "idgen/hw/";
/// Prefix of the per-node high-water marks.
pub const NODE_PREFIX: &str = "idgen/node/";
/// Claims tried in one round before the taken set is read again.
const CLAIM_TRIES: usize = 8;

/// What `idgen/node/<node>` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct NodeMark {
    worker: u16,
    hw_ms: u64,
}

/// Where the lease stands (dashboard, `dsys id status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// `acquiring`, `active`.
    pub state: String,
    /// Worker id held.
    pub worker: Option<u16>,
    /// Consensus lease id.
    pub lease: Option<u64>,
    /// Create revision of the claim key.
    pub claim_revision: Option<u64>,
    /// The committed high-water mark (Unix ms): no id of this holder goes past it.
    pub high_water_unix_ms: Option<u64>,
    /// The floor the current lease started after (Unix ms).
    pub floor_unix_ms: Option<u64>,
    /// Worker ids acquired since start.
    pub acquired: u64,
    /// Leases lost (or given up) since start.
    pub lost: u64,
    /// The last problem seen.
    pub last_error: Option<String>,
}

/// A held worker id.
#[derive(Debug, Clone, Copy)]
struct Held {
    worker: u16,
    lease: u64,
    claim_rev: u64,
    /// Committed high-water mark, Unix ms.
    hw: u64,
    valid_until: Instant,
}

/// Keeps one worker id leased for one generator.
pub(crate) struct Manager<C: Clock> {
    pub(crate) me: String,
    pub(crate) cx: Consensus,
    pub(crate) idgen: Arc<Idgen<C>>,
    pub(crate) ttl_ms: u64,
    pub(crate) info: Arc<Mutex<LeaseInfo>>,
    pub(crate) timeline: Arc<Timeline>,
}

fn claim_key(w: u16) -> String {
    format!("{WORKER_PREFIX}{w}")
}
fn hw_key(w: u16) -> String {
    format!("{HW_PREFIX}{w}")
}
fn node_key(me: &str) -> String {
    format!("{NODE_PREFIX}{me}")
}

fn get(key: String) -> TxnOp {
    TxnOp::Get { key, prefix: false }
}

fn first_kv(r: Option<&OpResult>) -> Option<&KeyValue> {
    match r {
        Some(OpResult::Get { kvs }) => kvs.first(),
        _ => None,
    }
}

fn parse_node_mark(kv: Option<&KeyValue>) -> Result<Option<NodeMark>, RpcError> {
    kv.map(|kv| {
        serde_json::from_str(&kv.value)
            .map_err(|e| RpcError::Internal(format!("`{}` holds `{}`: {e}", kv.key, kv.value)))
    })
    .transpose()
}

fn parse_hw(kv: Option<&KeyValue>) -> Result<u64, RpcError> {
    match kv {
        None => Ok(0),
        Some(kv) => kv
            .value
            .parse()
            .map_err(|e| RpcError::Internal(format!("`{}` holds `{}`: {e}", kv.key, kv.value))),
    }
}

/// The worker id a node tries first: the one it held last, else one derived from its name
/// (so nodes starting together rarely race for the same one).
fn preferred(me: &str, last: Option<NodeMark>) -> u16 {
    if let Some(m) = last {
        if m.worker < WORKERS {
            return m.worker;
        }
    }
    let h = me.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h % u64::from(WORKERS)) as u16
}

impl<C: Clock> Manager<C> {
    fn margin(&self) -> Duration {
        Duration::from_millis(self.ttl_ms / 10)
    }

    /// How far ahead of the clock a high-water mark is set: one TTL, about as long as the
    /// generator may issue after the keep-alive that preceded the mark. Further would make a
    /// later holder (or this node after a restart) wait longer; shorter would stop the
    /// generator before its lease whenever one write of the mark is slow.
    fn horizon_ms(&self) -> u64 {
        self.ttl_ms
    }

    fn set_info(&self, f: impl FnOnce(&mut LeaseInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn note_error(&self, e: impl std::fmt::Display) {
        let msg = e.to_string();
        self.set_info(|i| i.last_error = Some(msg));
    }

    /// Hold a worker id for as long as this task lives, re-acquiring after every loss.
    pub(crate) async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            self.set_info(|i| {
                i.state = "acquiring".into();
                i.worker = None;
                i.lease = None;
                i.claim_revision = None;
                i.high_water_unix_ms = None;
            });
            match self.acquire().await {
                Ok(held) => {
                    backoff = Duration::from_millis(100);
                    let why = self.keep(held).await;
                    self.idgen.lock().stop();
                    tracing::warn!(worker = held.worker, "worker id lease lost: {why}");
                    self.timeline.record(
                        "idgen",
                        &self.me,
                        format!("stopped issuing as worker {}: {why}", held.worker),
                    );
                    self.set_info(|i| {
                        i.lost += 1;
                        i.last_error = Some(why);
                    });
                    // Free the worker id now if the lease still exists (best effort).
                    if let Err(e) = self.cx.revoke(held.lease).await {
                        tracing::debug!(lease = held.lease, "revoking a lost lease: {e}");
                    }
                }
                Err(e) => {
                    tracing::debug!("acquiring a worker id: {e}");
                    self.note_error(&e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Grant a lease, claim a free worker id with it, commit a first high-water mark and open
    /// the generator's window.
    async fn acquire(&self) -> Result<Held, RpcError> {
        let t0 = Instant::now();
        let lease = self.cx.grant(self.ttl_ms).await?;
        let valid_until = t0 + Duration::from_millis(self.ttl_ms) - self.margin();
        match self.claim(lease, valid_until).await {
            Ok(h) => Ok(h),
            Err(e) => {
                // Whatever was created with this lease goes with it.
                if let Err(r) = self.cx.revoke(lease).await {
                    tracing::debug!(lease, "revoking an unused lease: {r}");
                }
                Err(e)
            }
        }
    }

    async fn claim(&self, lease: u64, valid_until: Instant) -> Result<Held, RpcError> {
        let (kvs, _) = self.cx.range(WORKER_PREFIX, false).await?;
        let taken: std::collections::BTreeSet<u16> = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(WORKER_PREFIX)?.parse().ok())
            .collect();
        let (_, _, r) = self
            .cx
            .txn(Txn {
                compares: vec![],
                success: vec![get(node_key(&self.me))],
                failure: vec![],
            })
            .await?;
        let last = parse_node_mark(first_kv(r.first()))?;
        let start = preferred(&self.me, last);
        let candidates = (0..WORKERS)
            .map(|k| ((u32::from(start) + u32::from(k)) % u32::from(WORKERS)) as u16)
            .filter(|w| !taken.contains(w))
            .take(CLAIM_TRIES);
        let value = serde_json::json!({ "node": self.me, "lease": lease }).to_string();
        for w in candidates {
            let key = claim_key(w);
            let txn = Txn {
                compares: vec![Compare {
                    key: key.clone(),
                    op: CompareOp::Equal,
                    target: CompareTarget::CreateRevision(0),
                }],
                success: vec![
                    TxnOp::Put {
                        key,
                        value: value.clone(),
                        lease: Some(lease),
                    },
                    get(hw_key(w)),
                    get(node_key(&self.me)),
                ],
                failure: vec![],
            };
            let (ok, claim_rev, results) = self.cx.txn(txn).await?;
            if !ok {
                continue; // someone took it meanwhile
            }
            let worker_hw = parse_hw(first_kv(results.get(1)))?;
            let node_hw = parse_node_mark(first_kv(results.get(2)))?
                .map(|m| m.hw_ms)
                .unwrap_or(0);
            let floor = worker_hw.max(node_hw);
            let now = self.idgen.clock().now_unix_ms();
            let hw = now.max(floor) + self.horizon_ms();
            if !self.promise(w, claim_rev, hw).await? {
                return Err(RpcError::Unreachable(format!(
                    "worker {w}: the claim vanished before its first high-water mark"
                )));
            }
            let held = Held {
                worker: w,
                lease,
                claim_rev,
                hw,
                valid_until,
            };
            self.idgen.lock().start_lease(
                w,
                floor.saturating_sub(EPOCH_UNIX_MS),
                hw.saturating_sub(EPOCH_UNIX_MS),
                valid_until,
            );
            tracing::info!(
                worker = w,
                lease,
                claim_rev,
                floor,
                hw,
                "worker id acquired"
            );
            self.timeline.record(
                "idgen",
                &self.me,
                format!("acquired worker id {w} (lease {lease}); ids start after {floor} ms"),
            );
            self.set_info(|i| {
                i.state = "active".into();
                i.worker = Some(w);
                i.lease = Some(lease);
                i.claim_revision = Some(claim_rev);
                i.high_water_unix_ms = Some(hw);
                i.floor_unix_ms = Some(floor);
                i.acquired += 1;
            });
            return Ok(held);
        }
        Err(RpcError::Unreachable(format!(
            "no free worker id among the {CLAIM_TRIES} tried ({} of {WORKERS} taken)",
            taken.len()
        )))
    }

    /// Write `hw` as worker `w`'s and this node's high-water mark if the claim with create
    /// revision `claim_rev` still stands; whether it did.
    async fn promise(&self, w: u16, claim_rev: u64, hw: u64) -> Result<bool, RpcError> {
        let mark = serde_json::to_string(&NodeMark {
            worker: w,
            hw_ms: hw,
        })
        .map_err(|e| RpcError::Internal(e.to_string()))?;
        let txn = Txn {
            compares: vec![Compare {
                key: claim_key(w),
                op: CompareOp::Equal,
                target: CompareTarget::CreateRevision(claim_rev),
            }],
            success: vec![
                TxnOp::Put {
                    key: hw_key(w),
                    value: hw.to_string(),
                    lease: None,
                },
                TxnOp::Put {
                    key: node_key(&self.me),
                    value: mark,
                    lease: None,
                },
            ],
            failure: vec![],
        };
        Ok(self.cx.txn(txn).await?.0)
    }

    /// Renew until the lease is lost; why it was.
    async fn keep(&self, mut held: Held) -> String {
        let every = Duration::from_millis((self.ttl_ms / 3).max(50));
        // The first renewal at once: claiming took several consensus round trips, which under
        // load may be a good part of the TTL granted before them.
        let mut next = Instant::now();
        loop {
            tokio::time::sleep_until(next).await;
            let t0 = Instant::now();
            let now_ms = self.idgen.clock().now_unix_ms();
            match self.cx.keep_alive(held.lease).await {
                Ok(_) => {
                    held.valid_until = t0 + Duration::from_millis(self.ttl_ms) - self.margin();
                    self.idgen.lock().renew(0, held.valid_until);
                }
                Err(RpcError::Refused(m)) => return format!("lease {} is gone: {m}", held.lease),
                Err(e) => {
                    if Instant::now() >= held.valid_until {
                        return format!("no keep-alive got through within the TTL ({e})");
                    }
                    self.note_error(format!("keep-alive: {e}"));
                    next = Instant::now() + every / 4;
                    continue;
                }
            }
            let hw = held.hw.max(now_ms + self.horizon_ms());
            match self.promise(held.worker, held.claim_rev, hw).await {
                Ok(true) => {
                    held.hw = hw;
                    self.idgen
                        .lock()
                        .renew(hw.saturating_sub(EPOCH_UNIX_MS), held.valid_until);
                    self.set_info(|i| i.high_water_unix_ms = Some(hw));
                    next = t0 + every;
                }
                Ok(false) => {
                    return format!(
                        "claim key {} is gone (its lease expired or was revoked)",
                        claim_key(held.worker)
                    )
                }
                Err(e) => {
                    // The old mark still bounds the ids; a late commit of this one only raises it.
                    self.note_error(format!("high-water mark: {e}"));
                    next = Instant::now() + if transient(&e) { every / 4 } else { every };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_worker_is_the_last_held_else_from_the_name() {
        let m = NodeMark {
            worker: 17,
            hw_ms: 5,
        };
        assert_eq!(preferred("n1", Some(m)), 17);
        let a = preferred("n1", None);
        assert!(a < WORKERS);
        assert_eq!(a, preferred("n1", None));
        assert_ne!(preferred("n1", None), preferred("n2", None));
    }

    #[test]
    fn marks_parse_or_refuse() {
        let kv = |v: &str| KeyValue {
            key: "k".into(),
            value: v.into(),
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: None,
        };
        assert_eq!(parse_hw(None).expect("none"), 0);
        assert_eq!(parse_hw(Some(&kv("123"))).expect("num"), 123);
        assert!(parse_hw(Some(&kv("x"))).is_err());
        let m = parse_node_mark(Some(&kv(r#"{"worker":3,"hw_ms":9}"#))).expect("mark");
        assert_eq!(
            m,
            Some(NodeMark {
                worker: 3,
                hw_ms: 9
            })
        );
        assert!(parse_node_mark(Some(&kv("{}"))).is_err());
    }
}
