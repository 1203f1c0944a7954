//! Config operations as consensus transactions (the key layout is in [`crate::layout`]).
//!
//! Every write reads the key and its write counter, then commits one transaction that
//! compares both (the key's mod revision, the counter's version) and, if they still hold,
//! sets the value, bumps the counter and adds the history entry, all at one revision. So
//! writes to one key are serialized, the history holds every write in order, and a
//! compare-and-set (`--if-revision`) is exact. A transaction that loses a race with another
//! writer is read and tried again (a few times).

use std::collections::BTreeMap;
use std::time::Duration;

use dsys_plugin_consensus::api::MAX_RANGE;
use dsys_plugin_consensus::state::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, OpResult, Txn, TxnOp,
};
use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest, ConsensusResponse};
use dsys_plugin_lock::recipe::Consensus;

use dsys_runtime::{Rpc, RpcError};

use crate::api::{Change, Item, SchemaEntry};
use crate::layout::{self, Entry, Op};
use crate::schema::{self, ValueType};

/// Tries of one write against concurrent writers of the same key. Writers that lose the
/// compare wait a random while, up to [`WRITE_BACKOFF_MAX`] (doubling from 2 ms), before
/// reading again: concurrent transactions land in the same Raft batch, where exactly one
/// wins, and without the jitter the same writers raced again at once (8 tries without it
/// ran out with 3 writers on one key on a loaded machine).
const WRITE_TRIES: u32 = 24;
/// Longest wait between two tries of one write.
const WRITE_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// The consensus-backed config store, as seen from one node.
#[derive(Clone, Debug)]
pub(crate) struct Store {
    cx: Consensus,
    rpc: Rpc,
    /// History entries kept per key.
    keep: u64,
}

fn unexpected(what: &str) -> RpcError {
    RpcError::Internal(format!("unexpected consensus answer to {what}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn cmp(key: String, target: CompareTarget) -> Compare {
    Compare {
        key,
        op: CompareOp::Equal,
        target,
    }
}

fn put(key: String, value: String) -> TxnOp {
    TxnOp::Put {
        key,
        value,
        lease: None,
    }
}

/// A history entry's consensus key-value as a [`Change`] (`None` if it is not one).
pub(crate) fn change_of(kv: &KeyValue) -> Option<Change> {
    let (key, _) = layout::parse_history_key(&kv.key)?;
    let e: Entry = serde_json::from_str(&kv.value).ok()?;
    Some(Change {
        revision: kv.create_revision,
        key: key.to_string(),
        entry: e,
    })
}

impl Store {
    pub(crate) fn new(rpc: Rpc, keep: u64) -> Self {
        Store {
            cx: Consensus::new(rpc.clone()),
            rpc,
            keep,
        }
    }

    /// Up to `limit` keys under `prefix` (linearizable), whether more matched, and the
    /// revision read.
    async fn range(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<(Vec<KeyValue>, bool, u64), RpcError> {
        self.read_keys(prefix, true, limit).await
    }

    async fn read_keys(
        &self,
        key: &str,
        prefix: bool,
        limit: u32,
    ) -> Result<(Vec<KeyValue>, bool, u64), RpcError> {
        let req = ConsensusRequest::Get {
            key: key.to_string(),
            prefix,
            serializable: false,
            limit,
        };
        let me = self.rpc.node_id().to_string();
        match self.rpc.call::<ConsensusApi>(&me, &req).await? {
            ConsensusResponse::Range {
                kvs,
                more,
                revision,
            } => Ok((kvs, more, revision)),
            _ => Err(unexpected("get")),
        }
    }

    /// Keys ever written (their write counters; tiny values), whether there are more than
    /// one range returns, and the revision read.
    pub(crate) async fn count_keys_written(&self) -> Result<(u64, bool, u64), RpcError> {
        let (kvs, more, revision) = self.range(layout::SEQ, MAX_RANGE).await?;
        Ok((kvs.len() as u64, more, revision))
    }

    /// The declared types: the stored ones and the built-in ones (which win).
    pub(crate) async fn schemas(&self) -> Result<BTreeMap<String, ValueType>, RpcError> {
        let (kvs, _, _) = self.range(layout::SCHEMA, MAX_RANGE).await?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            let prefix = &kv.key[layout::SCHEMA.len()..];
            match kv.value.parse::<ValueType>() {
                Ok(t) => {
                    out.insert(prefix.to_string(), t);
                }
                Err(e) => tracing::warn!("config: ignoring schema of `{prefix}`: {e}"),
            }
        }
        out.extend(schema::builtin());
        Ok(out)
    }

    pub(crate) async fn schema_list(&self) -> Result<Vec<SchemaEntry>, RpcError> {
        Ok(self
            .schemas()
            .await?
            .into_iter()
            .map(|(prefix, t)| SchemaEntry {
                builtin: schema::is_builtin(&prefix),
                prefix,
                value_type: t.to_string(),
            })
            .collect())
    }

    /// Refuse `value` for `key` unless the type of its longest declared prefix accepts it.
    pub(crate) async fn validate(&self, key: &str, value: &str) -> Result<(), RpcError> {
        schema::check_builtin_key(key).map_err(RpcError::refused)?;
        let declared = self.schemas().await?;
        if let Some((prefix, t)) = schema::resolve(&declared, key) {
            t.validate(value).map_err(|e| {
                RpcError::refused(format!(
                    "`{key}` refused: not a valid {t} (the type of prefix `{prefix}`): {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// Declare `t` for `prefix`, after checking every value already under it that the new
    /// declaration would govern.
    pub(crate) async fn schema_set(&self, prefix: &str, t: ValueType) -> Result<u64, RpcError> {
        if schema::is_builtin(prefix) {
            return Err(RpcError::refused(format!(
                "`{prefix}` is typed by the system (see `dsys config schema list`)"
            )));
        }
        let mut declared = self.schemas().await?;
        declared.insert(prefix.to_string(), t.clone());
        let (kvs, more, _) = self.range(&layout::value_key(prefix), MAX_RANGE).await?;
        if more {
            return Err(RpcError::refused(format!(
                "more than {MAX_RANGE} keys under `{prefix}`: declare a narrower prefix"
            )));
        }
        let mut bad = Vec::new();
        for kv in &kvs {
            let key = &kv.key[layout::VALUES.len()..];
            if schema::resolve(&declared, key).map(|(p, _)| p) == Some(prefix) {
                if let Err(e) = t.validate(&kv.value) {
                    bad.push(format!("{key}: {e}"));
                }
            }
        }
        if !bad.is_empty() {
            let n = bad.len();
            bad.truncate(5);
            return Err(RpcError::refused(format!(
                "{n} value(s) under `{prefix}` are not valid {t}; fix them first:\n  {}",
                bad.join("\n  ")
            )));
        }
        let txn = Txn {
            compares: vec![],
            success: vec![put(layout::schema_key(prefix), t.to_string())],
            failure: vec![],
        };
        let (_, rev, _) = self.cx.txn(txn).await?;
        Ok(rev)
    }

    pub(crate) async fn schema_delete(&self, prefix: &str) -> Result<u64, RpcError> {
        if schema::is_builtin(prefix) {
            return Err(RpcError::refused(format!(
                "`{prefix}` is typed by the system and stays"
            )));
        }
        let txn = Txn {
            compares: vec![],
            success: vec![TxnOp::Delete {
                key: layout::schema_key(prefix),
                prefix: false,
            }],
            failure: vec![],
        };
        match self.cx.txn(txn).await? {
            (_, rev, r) if matches!(r.first(), Some(OpResult::Delete { deleted: 1 })) => Ok(rev),
            _ => Err(RpcError::refused(format!(
                "no type is declared for `{prefix}`"
            ))),
        }
    }

    /// The current value of `key` with its mod revision, and the key's write counter
    /// version, read at one revision.
    async fn read(&self, key: &str) -> Result<(Option<KeyValue>, u64), RpcError> {
        let get = |k: String| TxnOp::Get {
            key: k,
            prefix: false,
        };
        let txn = Txn {
            compares: vec![],
            success: vec![get(layout::value_key(key)), get(layout::seq_key(key))],
            failure: vec![],
        };
        let (_, _, results) = self.cx.txn(txn).await?;
        let mut it = results.into_iter().map(|r| match r {
            OpResult::Get { kvs } => kvs.into_iter().next(),
            _ => None,
        });
        let value = it.next().flatten();
        let seq = it.next().flatten().map(|kv| kv.version).unwrap_or(0);
        Ok((value, seq))
    }

    /// Current value and its revision.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Item>, RpcError> {
        let (kvs, _, _) = self.read_keys(&layout::value_key(key), false, 1).await?;
        Ok(kvs.into_iter().next().map(|kv| Item {
            key: key.to_string(),
            value: kv.value,
            revision: kv.mod_revision,
        }))
    }

    /// The value `key` had at revision `at` (from its history).
    pub(crate) async fn get_at(&self, key: &str, at: u64) -> Result<Option<String>, RpcError> {
        let (changes, complete) = self.history(key).await?;
        let first = changes.first().map(|c| c.revision);
        match changes.iter().rev().find(|c| c.revision <= at) {
            Some(c) => Ok(c.entry.value.clone()),
            None if complete => Ok(None),
            None => Err(RpcError::refused(format!(
                "the history of `{key}` kept here starts at revision {}; {at} is older",
                first.unwrap_or(0)
            ))),
        }
    }

    /// Every kept history entry of `key`, oldest first, and whether that is its whole
    /// history (nothing trimmed yet).
    pub(crate) async fn history(&self, key: &str) -> Result<(Vec<Change>, bool), RpcError> {
        let (kvs, _) = self.cx.range(&layout::history_prefix(key), false).await?;
        let complete = kvs
            .first()
            .and_then(|kv| layout::parse_history_key(&kv.key))
            .map(|(_, n)| n == 1)
            .unwrap_or(true);
        let mut changes: Vec<Change> = kvs.iter().filter_map(change_of).collect();
        changes.sort_by_key(|c| c.revision);
        Ok((changes, complete))
    }

    /// Up to `limit` current keys under `prefix`.
    pub(crate) async fn list(
        &self,
        prefix: &str,
        limit: u32,
    ) -> Result<(Vec<Item>, bool, u64), RpcError> {
        let (kvs, more, revision) = self.range(&layout::value_key(prefix), limit).await?;
        let items = kvs
            .into_iter()
            .map(|kv| Item {
                key: kv.key[layout::VALUES.len()..].to_string(),
                value: kv.value,
                revision: kv.mod_revision,
            })
            .collect();
        Ok((items, more, revision))
    }

    /// Set (`Some`) or delete (`None`) `key`; the revision written and the previous value.
    /// The value must have been validated already.
    pub(crate) async fn write(
        &self,
        key: &str,
        value: Option<String>,
        if_revision: Option<u64>,
        by: String,
        rollback_of: Option<u64>,
    ) -> Result<(u64, Option<String>), RpcError> {
        for attempt in 0..WRITE_TRIES {
            if attempt > 0 {
                let cap = Duration::from_millis(2 << attempt.min(6)).min(WRITE_BACKOFF_MAX);
                tokio::time::sleep(cap.mul_f64(rand::random::<f64>())).await;
            }
            let (cur, seq) = self.read(key).await?;
            let cur_rev = cur.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
            if let Some(want) = if_revision {
                if want != cur_rev {
                    return Err(RpcError::refused(format!(
                        "`{key}` is at revision {cur_rev}, not {want}: nothing written"
                    )));
                }
            }
            if value.is_none() && cur.is_none() {
                return Err(RpcError::refused(format!("`{key}` does not exist")));
            }
            let prev = cur.map(|kv| kv.value);
            let n = seq + 1;
            let entry = Entry {
                op: if value.is_some() { Op::Put } else { Op::Delete },
                value: value.clone(),
                prev: prev.clone(),
                time_ms: now_ms(),
                by: by.clone(),
                rollback_of,
            };
            let entry = serde_json::to_string(&entry)
                .map_err(|e| RpcError::Internal(format!("history entry: {e}")))?;
            let mut ops = vec![
                match &value {
                    Some(v) => put(layout::value_key(key), v.clone()),
                    None => TxnOp::Delete {
                        key: layout::value_key(key),
                        prefix: false,
                    },
                },
                put(layout::seq_key(key), n.to_string()),
                put(layout::history_key(key, n), entry),
            ];
            if n > self.keep {
                ops.push(TxnOp::Delete {
                    key: layout::history_key(key, n - self.keep),
                    prefix: false,
                });
            }
            let txn = Txn {
                compares: vec![
                    cmp(layout::value_key(key), CompareTarget::ModRevision(cur_rev)),
                    cmp(layout::seq_key(key), CompareTarget::Version(seq)),
                ],
                success: ops,
                failure: vec![],
            };
            let (ok, revision, _) = self.cx.txn(txn).await?;
            if ok {
                return Ok((revision, prev));
            }
            // Another writer got there first: read again (an --if-revision write is then
            // refused with the revision it lost to).
        }
        Err(RpcError::refused(format!(
            "`{key}` kept changing under concurrent writes; nothing written, try again"
        )))
    }

    /// Changes to keys under `prefix` from revision `from` (0: from now), waiting up to
    /// `wait_ms` for the first; and the revision to ask from next.
    pub(crate) async fn watch(
        &self,
        prefix: &str,
        from: u64,
        wait_ms: u64,
    ) -> Result<(Vec<Change>, u64), RpcError> {
        let (events, next) = self
            .cx
            .watch(&layout::history_watch_prefix(prefix), true, from, wait_ms)
            .await
            .map_err(|e| match e {
                RpcError::Refused(m) => RpcError::Refused(format!(
                    "{m} (the consensus event history is bounded by plugins.consensus.history; \
                     `dsys config history KEY` keeps older changes)"
                )),
                e => e,
            })?;
        // Trimming old history entries shows up as deletes: not changes of the config.
        let changes = events
            .iter()
            .filter(|e| e.kind == EventKind::Put)
            .filter_map(|e| change_of(&e.kv))
            .collect();
        Ok((changes, next))
    }
}
