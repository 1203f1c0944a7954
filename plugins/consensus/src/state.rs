//! The replicated state machine, pure: etcd-like keys with revisions, leases, a bounded event
//! history for watches, and transactions. No I/O and no clock: Raft feeds it committed
//! [`Command`]s in log order and every replica computes the same state and the same results.
//!
//! Invariants kept here:
//! * `revision` is the global revision: it grows by exactly one per command that changes at
//!   least one key or lease, and never otherwise;
//! * a key's `create_revision <= mod_revision <= revision`, `version >= 1` while it exists;
//! * a key attached to a lease is in that lease's key set and vice versa;
//! * `history` holds every event with revision `> compacted`, in revision order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// Revision of the put that created this incarnation of the key.
    pub create_revision: u64,
    /// Revision of the last put.
    pub mod_revision: u64,
    /// Puts since creation (1 on creation).
    pub version: u64,
    /// Lease the key is attached to.
    pub lease: Option<u64>,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (by a delete, a lease revoke or a lease expiry).
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// Revision of the change.
    pub revision: u64,
    /// The key after a put; for a delete, the key as it was before it.
    pub kv: KeyValue,
}

/// A lease: keys attached to it are deleted when it is revoked or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Id (assigned by the state machine, dense from 1).
    pub id: u64,
    /// Time to live granted, in milliseconds.
    pub ttl_ms: u64,
    /// Attached keys.
    pub keys: BTreeSet<String>,
}

/// What a compare looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value (a missing key never matches).
    Value(String),
    /// The mod revision (0 for a missing key).
    ModRevision(u64),
    /// The create revision (0 for a missing key).
    CreateRevision(u64),
    /// The version (0 for a missing key).
    Version(u64),
}

/// How a compare compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's field is greater than the given one.
    Greater,
    /// The key's field is less than the given one.
    Less,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// Key.
    pub key: String,
    /// Operator.
    pub op: CompareOp,
    /// Field and the value to compare it with.
    pub target: CompareTarget,
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Put a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Lease to attach to.
        lease: Option<u64>,
    },
    /// Delete a key or every key under a prefix.
    Delete {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
    /// Read a key or a prefix (as of the transaction).
    Get {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
}

/// A transaction: if every compare holds, run `success`, else `failure`; atomically, with one
/// revision for all its changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions (all must hold).
    pub compares: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<TxnOp>,
    /// Operations otherwise.
    pub failure: Vec<TxnOp>,
}

/// A state-machine command: what a Raft log entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Put a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Lease to attach to.
        lease: Option<u64>,
    },
    /// Delete a key or a prefix.
    Delete {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
    /// A transaction.
    Txn(Txn),
    /// Grant a lease.
    LeaseGrant {
        /// Time to live in ms.
        ttl_ms: u64,
    },
    /// Revoke a lease (refused if unknown).
    LeaseRevoke {
        /// Lease id.
        id: u64,
    },
    /// The leader saw these leases expire: revoke those still present (unknown ids are
    /// ignored, since a client may have revoked one meanwhile).
    LeaseExpire {
        /// Lease ids.
        ids: Vec<u64>,
    },
    /// A client command tagged with its request id: applied at most once however many times
    /// it reaches the log (a request re-sent after a leader change may be appended twice).
    /// A repeat answers the first application's result.
    Once {
        /// Who sent it and which of its requests this is.
        id: RequestId,
        /// The command.
        cmd: Box<Command>,
    },
    /// Several client commands in one log entry (the leader batches concurrent writes so
    /// that one append and one fsync carry many); applied in order as if one by one. Shared:
    /// openraft clones every entry it replicates (once per follower and AppendEntries), and a
    /// deep copy of a full batch (up to 1024 commands, 256 KiB) cost tens of milliseconds per
    /// probe of a new leader. Encoded as a plain sequence (the log's format is unchanged).
    Batch(#[serde(with = "shared_commands")] Arc<Vec<Command>>),
}

/// `Arc<Vec<Command>>` encoded exactly as `Vec<Command>`.
mod shared_commands {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Command;

    pub(super) fn serialize<S: Serializer>(v: &Arc<Vec<Command>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<Vec<Command>>, D::Error> {
        Vec::<Command>::deserialize(d).map(Arc::new)
    }
}

/// The identity of one client request, for at-most-once application: the client (a random
/// id per sender incarnation), its request sequence number, and `floor`, the lowest sequence
/// number the client still has in flight. Everything below the floor has been answered or
/// given up on, so the state machine forgets those results and ignores late copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    /// Client incarnation.
    pub client: u64,
    /// Request number (grows by one per request of this client).
    pub seq: u64,
    /// Lowest request number of this client still in flight when this one was sent.
    pub floor: u64,
}

/// Results kept for one client's requests still in flight.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Requests below this number are answered or abandoned: copies are ignored.
    floor: u64,
    /// Results of requests at or above the floor, for repeats.
    results: BTreeMap<u64, CmdResult>,
    /// Logical time of the last request (for evicting idle clients).
    last_used: u64,
}

/// Most clients whose results are kept (the least recently active is forgotten first).
pub const MAX_SESSIONS: usize = 1024;
/// Most results kept per client (the oldest go first and raise its floor).
pub const MAX_RESULTS_PER_SESSION: usize = 16_384;

/// The result of one operation inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// A put: the key as it was before, if it existed.
    Put {
        /// Previous key.
        prev: Option<KeyValue>,
    },
    /// A delete: how many keys went.
    Delete {
        /// Keys deleted.
        deleted: u64,
    },
    /// A read.
    Get {
        /// Keys found.
        kvs: Vec<KeyValue>,
    },
}

/// The result of applying one command. `Refused` results are deterministic (every replica
/// refuses the same command) and change nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CmdResult {
    /// A put.
    Put {
        /// Revision after the command.
        revision: u64,
        /// The key as it was before.
        prev: Option<KeyValue>,
    },
    /// A delete.
    Delete {
        /// Revision after the command.
        revision: u64,
        /// Keys deleted.
        deleted: u64,
    },
    /// A transaction.
    Txn {
        /// Revision after the command.
        revision: u64,
        /// Whether the compares held.
        succeeded: bool,
        /// One result per operation of the branch taken.
        results: Vec<OpResult>,
    },
    /// A lease granted.
    LeaseGranted {
        /// Revision after the command.
        revision: u64,
        /// Lease id.
        id: u64,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// Leases revoked (by a client or by expiry).
    LeaseRevoked {
        /// Revision after the command.
        revision: u64,
        /// Leases removed.
        ids: Vec<u64>,
        /// Keys deleted with them.
        deleted: u64,
    },
    /// The command was refused; nothing changed.
    Refused(String),
    /// A membership or blank entry (no state-machine effect).
    None,
    /// The results of a [`Command::Batch`], in order.
    Batch(Vec<CmdResult>),
}

/// What a watch poll returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchBatch {
    /// Matching events, in revision order.
    pub events: Vec<Event>,
    /// Revision to ask from next time.
    pub next_revision: u64,
}

/// Why a watch cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The history no longer holds events that old.
    #[error("revision {asked} is compacted: the oldest revision still watchable is {oldest}")]
    Compacted {
        /// Revision asked for.
        asked: u64,
        /// Oldest revision available.
        oldest: u64,
    },
}

/// Default number of events kept for watches.
pub const DEFAULT_HISTORY: usize = 100_000;

/// The state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    kv: BTreeMap<String, KeyValue>,
    revision: u64,
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    history: VecDeque<Event>,
    history_cap: usize,
    /// Every event with revision `<= compacted` has been dropped from `history`.
    compacted: u64,
    /// Request deduplication: results of in-flight requests by client (in snapshots).
    sessions: BTreeMap<u64, Session>,
    /// Counts tagged requests applied (the sessions' logical clock).
    session_clock: u64,
}

/// [`KvState`] as snapshots before request deduplication stored it (no sessions).
#[derive(Deserialize)]
struct KvStateV1 {
    kv: BTreeMap<String, KeyValue>,
    revision: u64,
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    history: VecDeque<Event>,
    history_cap: usize,
    compacted: u64,
}

impl KvState {
    /// Read a state written by [`dsys_runtime::encode`], also in the layout of snapshots
    /// taken before request deduplication (they start with no sessions).
    pub fn decode(bytes: &[u8]) -> Result<KvState, String> {
        match dsys_runtime::decode::<KvState>(bytes) {
            Ok(s) => Ok(s),
            Err(e) => match dsys_runtime::decode::<KvStateV1>(bytes) {
                Ok(v) => Ok(KvState {
                    kv: v.kv,
                    revision: v.revision,
                    leases: v.leases,
                    next_lease: v.next_lease,
                    history: v.history,
                    history_cap: v.history_cap,
                    compacted: v.compacted,
                    sessions: BTreeMap::new(),
                    session_clock: 0,
                }),
                Err(_) => Err(e.to_string()),
            },
        }
    }
}

impl Default for KvState {
    fn default() -> Self {
        KvState::new(DEFAULT_HISTORY)
    }
}

fn matches(k: &str, key: &str, prefix: bool) -> bool {
    if prefix {
        k.starts_with(key)
    } else {
        k == key
    }
}

impl KvState {
    /// An empty state keeping up to `history_cap` events for watches (at least 1).
    pub fn new(history_cap: usize) -> Self {
        KvState {
            kv: BTreeMap::new(),
            revision: 0,
            leases: BTreeMap::new(),
            next_lease: 1,
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            compacted: 0,
            sessions: BTreeMap::new(),
            session_clock: 0,
        }
    }

    /// Clients with request results kept for deduplication.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Apply a tagged command at most once (see [`Command::Once`]).
    fn apply_once(&mut self, id: &RequestId, cmd: &Command) -> CmdResult {
        self.session_clock += 1;
        let clock = self.session_clock;
        let s = self.sessions.entry(id.client).or_default();
        s.last_used = clock;
        if id.seq < s.floor {
            return CmdResult::Refused(format!(
                "request {} of client {:016x} was already answered or abandoned",
                id.seq, id.client
            ));
        }
        if let Some(r) = s.results.get(&id.seq) {
            return r.clone();
        }
        if id.floor > s.floor {
            s.floor = id.floor;
            s.results = s.results.split_off(&id.floor);
        }
        let r = match cmd {
            Command::Once { .. } | Command::Batch(_) => {
                CmdResult::Refused("nested request ids".into())
            }
            c => self.apply(c),
        };
        if let Some(s) = self.sessions.get_mut(&id.client) {
            s.results.insert(id.seq, r.clone());
            while s.results.len() > MAX_RESULTS_PER_SESSION {
                if let Some((seq, _)) = s.results.pop_first() {
                    s.floor = seq + 1;
                }
            }
        }
        if self.sessions.len() > MAX_SESSIONS {
            let idle = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(c, _)| *c);
            if let Some(c) = idle {
                self.sessions.remove(&c);
            }
        }
        r
    }

    /// The global revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// True when there is no key.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// The leases, by id.
    pub fn leases(&self) -> &BTreeMap<u64, Lease> {
        &self.leases
    }

    /// Oldest revision a watch may start from.
    pub fn oldest_watchable(&self) -> u64 {
        self.compacted + 1
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kv.get(key)
    }

    /// A key, or the keys under a prefix in key order, at most `limit` of them; and whether
    /// more were left out.
    pub fn range(&self, key: &str, prefix: bool, limit: usize) -> (Vec<KeyValue>, bool) {
        if !prefix {
            return (self.kv.get(key).cloned().into_iter().collect(), false);
        }
        let mut it = self
            .kv
            .range(key.to_string()..)
            .take_while(|(k, _)| k.starts_with(key))
            .map(|(_, v)| v.clone());
        let out: Vec<KeyValue> = it.by_ref().take(limit).collect();
        let more = it.next().is_some();
        (out, more)
    }

    /// Events on `key` (or under it, as a prefix) from revision `from` on, at most about
    /// `limit` of them (all events of the last revision returned are included, so a batch
    /// never splits a revision). `from == 0` means "from the next revision".
    pub fn watch(
        &self,
        key: &str,
        prefix: bool,
        from: u64,
        limit: usize,
    ) -> Result<WatchBatch, WatchError> {
        let from = if from == 0 { self.revision + 1 } else { from };
        if from <= self.compacted {
            return Err(WatchError::Compacted {
                asked: from,
                oldest: self.oldest_watchable(),
            });
        }
        // History is in revision order: skip to the first event at or after `from`.
        let start = self.history.partition_point(|e| e.revision < from);
        let mut events = Vec::new();
        let mut next = self.revision.max(from - 1) + 1;
        for e in self.history.range(start..) {
            if events.len() >= limit.max(1)
                && events.last().map(|l: &Event| l.revision) != Some(e.revision)
            {
                next = e.revision;
                break;
            }
            if matches(&e.kv.key, key, prefix) {
                events.push(e.clone());
            }
        }
        Ok(WatchBatch {
            events,
            next_revision: next,
        })
    }

    fn record(&mut self, kind: EventKind, kv: KeyValue) {
        self.history.push_back(Event {
            kind,
            revision: self.revision,
            kv,
        });
        // Drop whole revisions only, so `compacted` is exact.
        while self.history.len() > self.history_cap {
            let Some(first) = self.history.front().map(|e| e.revision) else {
                break;
            };
            if first == self.revision {
                break; // never drop the revision being written
            }
            while self.history.front().map(|e| e.revision) == Some(first) {
                self.history.pop_front();
            }
            self.compacted = first;
        }
    }

    fn check_op(&self, op: &TxnOp) -> Result<(), String> {
        if let TxnOp::Put {
            lease: Some(id), ..
        } = op
        {
            if !self.leases.contains_key(id) {
                return Err(format!("lease {id} not found"));
            }
        }
        Ok(())
    }

    fn put(&mut self, key: &str, value: &str, lease: Option<u64>) -> Option<KeyValue> {
        let prev = self.kv.get(key).cloned();
        if let Some(old) = prev.as_ref().and_then(|p| p.lease) {
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.remove(key);
            }
        }
        if let Some(id) = lease {
            if let Some(l) = self.leases.get_mut(&id) {
                l.keys.insert(key.to_string());
            }
        }
        let kv = KeyValue {
            key: key.to_string(),
            value: value.to_string(),
            create_revision: prev
                .as_ref()
                .map(|p| p.create_revision)
                .unwrap_or(self.revision),
            mod_revision: self.revision,
            version: prev.as_ref().map(|p| p.version + 1).unwrap_or(1),
            lease,
        };
        self.kv.insert(key.to_string(), kv.clone());
        self.record(EventKind::Put, kv);
        prev
    }

    fn keys_matching(&self, key: &str, prefix: bool) -> Vec<String> {
        if prefix {
            self.kv
                .range(key.to_string()..)
                .take_while(|(k, _)| k.starts_with(key))
                .map(|(k, _)| k.clone())
                .collect()
        } else if self.kv.contains_key(key) {
            vec![key.to_string()]
        } else {
            Vec::new()
        }
    }

    fn delete_keys(&mut self, keys: Vec<String>) -> u64 {
        let mut n = 0;
        for k in keys {
            if let Some(old) = self.kv.remove(&k) {
                if let Some(l) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
                    l.keys.remove(&k);
                }
                self.record(EventKind::Delete, old);
                n += 1;
            }
        }
        n
    }

    fn compare(&self, c: &Compare) -> bool {
        use std::cmp::Ordering;
        let kv = self.kv.get(&c.key);
        let ord: Option<Ordering> = match &c.target {
            CompareTarget::Value(v) => kv.map(|kv| kv.value.as_str().cmp(v.as_str())),
            CompareTarget::ModRevision(r) => Some(kv.map(|k| k.mod_revision).unwrap_or(0).cmp(r)),
            CompareTarget::CreateRevision(r) => {
                Some(kv.map(|k| k.create_revision).unwrap_or(0).cmp(r))
            }
            CompareTarget::Version(v) => Some(kv.map(|k| k.version).unwrap_or(0).cmp(v)),
        };
        match ord {
            None => false,
            Some(o) => match c.op {
                CompareOp::Equal => o == Ordering::Equal,
                CompareOp::NotEqual => o != Ordering::Equal,
                CompareOp::Greater => o == Ordering::Greater,
                CompareOp::Less => o == Ordering::Less,
            },
        }
    }

    /// Would this command change anything? Used to bump the revision only for real changes.
    fn changes(&self, ops: &[TxnOp]) -> bool {
        ops.iter().any(|op| match op {
            TxnOp::Put { .. } => true,
            TxnOp::Delete { key, prefix } => !self.keys_matching(key, *prefix).is_empty(),
            TxnOp::Get { .. } => false,
        })
    }

    /// Apply one committed command.
    pub fn apply(&mut self, cmd: &Command) -> CmdResult {
        match cmd {
            Command::Put { key, value, lease } => {
                let op = TxnOp::Put {
                    key: key.clone(),
                    value: value.clone(),
                    lease: *lease,
                };
                if let Err(e) = self.check_op(&op) {
                    return CmdResult::Refused(e);
                }
                self.revision += 1;
                let prev = self.put(key, value, *lease);
                CmdResult::Put {
                    revision: self.revision,
                    prev,
                }
            }
            Command::Delete { key, prefix } => {
                let keys = self.keys_matching(key, *prefix);
                if keys.is_empty() {
                    return CmdResult::Delete {
                        revision: self.revision,
                        deleted: 0,
                    };
                }
                self.revision += 1;
                let deleted = self.delete_keys(keys);
                CmdResult::Delete {
                    revision: self.revision,
                    deleted,
                }
            }
            Command::Txn(t) => self.txn(t),
            Command::LeaseGrant { ttl_ms } => {
                self.revision += 1;
                let id = self.next_lease;
                self.next_lease += 1;
                self.leases.insert(
                    id,
                    Lease {
                        id,
                        ttl_ms: *ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                CmdResult::LeaseGranted {
                    revision: self.revision,
                    id,
                    ttl_ms: *ttl_ms,
                }
            }
            Command::LeaseRevoke { id } => {
                if !self.leases.contains_key(id) {
                    return CmdResult::Refused(format!("lease {id} not found"));
                }
                self.revoke(&[*id])
            }
            Command::LeaseExpire { ids } => {
                let present: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| self.leases.contains_key(id))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if present.is_empty() {
                    return CmdResult::LeaseRevoked {
                        revision: self.revision,
                        ids: Vec::new(),
                        deleted: 0,
                    };
                }
                self.revoke(&present)
            }
            Command::Once { id, cmd } => self.apply_once(id, cmd),
            Command::Batch(cmds) => CmdResult::Batch(
                cmds.iter()
                    .map(|c| match c {
                        Command::Batch(_) => CmdResult::Refused("nested batch".into()),
                        c => self.apply(c),
                    })
                    .collect(),
            ),
        }
    }

    fn revoke(&mut self, ids: &[u64]) -> CmdResult {
        self.revision += 1;
        let mut deleted = 0;
        for id in ids {
            if let Some(l) = self.leases.remove(id) {
                deleted += self.delete_keys(l.keys.into_iter().collect());
            }
        }
        CmdResult::LeaseRevoked {
            revision: self.revision,
            ids: ids.to_vec(),
            deleted,
        }
    }

    fn txn(&mut self, t: &Txn) -> CmdResult {
        let succeeded = t.compares.iter().all(|c| self.compare(c));
        let ops = if succeeded { &t.success } else { &t.failure };
        // Validate the whole branch first: a transaction is all or nothing.
        for op in ops {
            if let Err(e) = self.check_op(op) {
                return CmdResult::Refused(e);
            }
        }
        if self.changes(ops) {
            self.revision += 1;
        }
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                TxnOp::Put { key, value, lease } => OpResult::Put {
                    prev: self.put(key, value, *lease),
                },
                TxnOp::Delete { key, prefix } => {
                    let keys = self.keys_matching(key, *prefix);
                    OpResult::Delete {
                        deleted: self.delete_keys(keys),
                    }
                }
                TxnOp::Get { key, prefix } => OpResult::Get {
                    kvs: self.range(key, *prefix, usize::MAX).0,
                },
            });
        }
        CmdResult::Txn {
            revision: self.revision,
            succeeded,
            results,
        }
    }

    /// Check the invariants listed in the module doc (tests and debug checks).
    pub fn check_invariants(&self) -> Result<(), String> {
        for (k, kv) in &self.kv {
            if &kv.key != k {
                return Err(format!("key {k} stored as {}", kv.key));
            }
            if !(kv.create_revision <= kv.mod_revision && kv.mod_revision <= self.revision) {
                return Err(format!("revisions out of order on {k}: {kv:?}"));
            }
            if kv.version == 0 {
                return Err(format!("version 0 on {k}"));
            }
            if let Some(id) = kv.lease {
                if !self
                    .leases
                    .get(&id)
                    .map(|l| l.keys.contains(k))
                    .unwrap_or(false)
                {
                    return Err(format!("{k} on lease {id} missing from the lease"));
                }
            }
        }
        for (id, l) in &self.leases {
            for k in &l.keys {
                if self.kv.get(k).and_then(|kv| kv.lease) != Some(*id) {
                    return Err(format!("lease {id} lists {k} which is not attached"));
                }
            }
        }
        let mut last = self.compacted;
        for e in &self.history {
            if e.revision < last || e.revision <= self.compacted || e.revision > self.revision {
                return Err(format!("history out of order at {e:?}"));
            }
            last = e.revision;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.into(),
            value: v.into(),
            lease: None,
        }
    }

    #[test]
    fn revisions_and_versions() {
        let mut s = KvState::new(100);
        assert_eq!(
            s.apply(&put("a", "1")),
            CmdResult::Put {
                revision: 1,
                prev: None
            }
        );
        s.apply(&put("b", "1"));
        let CmdResult::Put { revision, prev } = s.apply(&put("a", "2")) else {
            panic!()
        };
        assert_eq!(revision, 3);
        assert_eq!(prev.map(|p| p.value), Some("1".into()));
        let a = s.get("a").cloned().expect("a");
        assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
        // Deleting nothing does not bump the revision.
        assert_eq!(
            s.apply(&Command::Delete {
                key: "zz".into(),
                prefix: false
            }),
            CmdResult::Delete {
                revision: 3,
                deleted: 0
            }
        );
        s.apply(&Command::Delete {
            key: "a".into(),
            prefix: false,
        });
        assert_eq!(s.revision(), 4);
        // Recreated: a new incarnation.
        s.apply(&put("a", "3"));
        let a = s.get("a").cloned().expect("a");
        assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
        s.check_invariants().expect("invariants");
    }

    #[test]
    fn prefix_range_and_delete() {
        let mut s = KvState::new(100);
        for k in ["a/1", "a/2", "a/3", "b/1", "a"] {
            s.apply(&put(k, "x"));
        }
        let (kvs, more) = s.range("a/", true, 2);
        assert_eq!(
            kvs.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        assert!(more);
        let r = s.apply(&Command::Delete {
            key: "a/".into(),
            prefix: true,
        });
        assert_eq!(
            r,
            CmdResult::Delete {
                revision: 6,
                deleted: 3
            }
        );
        assert_eq!(s.len(), 2);
        // One revision for the three deletions.
        let w = s.watch("a/", true, 6, 100).expect("watch");
        assert_eq!(w.events.len(), 3);
        assert!(w.events.iter().all(|e| e.revision == 6));
        assert_eq!(w.next_revision, 7);
    }

    #[test]
    fn leases_attach_and_revoke() {
        let mut s = KvState::new(100);
        let CmdResult::LeaseGranted { id, .. } = s.apply(&Command::LeaseGrant { ttl_ms: 1000 })
        else {
            panic!()
        };
        assert_eq!(
            s.apply(&Command::Put {
                key: "k".into(),
                value: "v".into(),
                lease: Some(id + 7)
            }),
            CmdResult::Refused(format!("lease {} not found", id + 7))
        );
        s.apply(&Command::Put {
            key: "k".into(),
            value: "v".into(),
            lease: Some(id),
        });
        s.apply(&Command::Put {
            key: "k2".into(),
            value: "v".into(),
            lease: Some(id),
        });
        // Re-put without a lease detaches k2.
        s.apply(&put("k2", "w"));
        s.check_invariants().expect("invariants");
        let r = s.apply(&Command::LeaseExpire { ids: vec![id, 99] });
        assert_eq!(
            r,
            CmdResult::LeaseRevoked {
                revision: 5,
                ids: vec![id],
                deleted: 1
            }
        );
        assert!(s.get("k").is_none());
        assert!(s.get("k2").is_some());
        // Expiring again is a no-op; revoking again is refused.
        let before = s.revision();
        s.apply(&Command::LeaseExpire { ids: vec![id] });
        assert_eq!(s.revision(), before);
        assert!(matches!(
            s.apply(&Command::LeaseRevoke { id }),
            CmdResult::Refused(_)
        ));
        s.check_invariants().expect("invariants");
    }

    #[test]
    fn txn_compare_and_swap() {
        let mut s = KvState::new(100);
        s.apply(&put("k", "v1"));
        let cas = |rev: u64, v: &str| {
            Command::Txn(Txn {
                compares: vec![Compare {
                    key: "k".into(),
                    op: CompareOp::Equal,
                    target: CompareTarget::ModRevision(rev),
                }],
                success: vec![TxnOp::Put {
                    key: "k".into(),
                    value: v.into(),
                    lease: None,
                }],
                failure: vec![TxnOp::Get {
                    key: "k".into(),
                    prefix: false,
                }],
            })
        };
        let CmdResult::Txn {
            succeeded,
            revision,
            ..
        } = s.apply(&cas(1, "v2"))
        else {
            panic!()
        };
        assert!(succeeded);
        assert_eq!(revision, 2);
        // Stale revision: fails, reads the current value, no revision bump.
        let CmdResult::Txn {
            succeeded,
            revision,
            results,
        } = s.apply(&cas(1, "v3"))
        else {
            panic!()
        };
        assert!(!succeeded);
        assert_eq!(revision, 2);
        let OpResult::Get { kvs } = &results[0] else {
            panic!()
        };
        assert_eq!(kvs[0].value, "v2");
        // Missing key: version 0 compares, value never matches.
        let create_if_absent = Command::Txn(Txn {
            compares: vec![Compare {
                key: "new".into(),
                op: CompareOp::Equal,
                target: CompareTarget::Version(0),
            }],
            success: vec![TxnOp::Put {
                key: "new".into(),
                value: "1".into(),
                lease: None,
            }],
            failure: vec![],
        });
        assert!(matches!(
            s.apply(&create_if_absent),
            CmdResult::Txn {
                succeeded: true,
                ..
            }
        ));
        assert!(matches!(
            s.apply(&create_if_absent),
            CmdResult::Txn {
                succeeded: false,
                ..
            }
        ));
        let value_missing = Compare {
            key: "nope".into(),
            op: CompareOp::NotEqual,
            target: CompareTarget::Value("x".into()),
        };
        assert!(!s.compare(&value_missing));
        // A branch with a bad lease is refused as a whole: the put before it is not applied.
        let bad = Command::Txn(Txn {
            compares: vec![],
            success: vec![
                TxnOp::Put {
                    key: "a".into(),
                    value: "1".into(),
                    lease: None,
                },
                TxnOp::Put {
                    key: "b".into(),
                    value: "1".into(),
                    lease: Some(42),
                },
            ],
            failure: vec![],
        });
        let rev = s.revision();
        assert!(matches!(s.apply(&bad), CmdResult::Refused(_)));
        assert_eq!(s.revision(), rev);
        assert!(s.get("a").is_none());
    }

    #[test]
    fn watch_history_is_bounded_and_compaction_reported() {
        let mut s = KvState::new(3);
        for i in 0..10 {
            s.apply(&put("k", &i.to_string()));
        }
        assert_eq!(s.oldest_watchable(), 8);
        assert_eq!(
            s.watch("k", false, 2, 10),
            Err(WatchError::Compacted {
                asked: 2,
                oldest: 8
            })
        );
        let w = s.watch("k", false, 8, 10).expect("watch");
        assert_eq!(
            w.events.iter().map(|e| e.revision).collect::<Vec<_>>(),
            [8, 9, 10]
        );
        assert_eq!(w.next_revision, 11);
        // From "now": nothing yet, next is the coming revision.
        let w = s.watch("k", false, 0, 10).expect("watch");
        assert!(w.events.is_empty());
        assert_eq!(w.next_revision, 11);
        // A limit that cuts the batch resumes exactly where it stopped.
        let w = s.watch("k", false, 8, 1).expect("watch");
        assert_eq!(w.events.len(), 1);
        assert_eq!(w.next_revision, 9);
    }

    fn tagged(client: u64, seq: u64, floor: u64, cmd: Command) -> Command {
        Command::Once {
            id: RequestId { client, seq, floor },
            cmd: Box::new(cmd),
        }
    }

    /// A request that reaches the log twice (re-sent after a leader change) is applied once,
    /// and the repeat answers what the first application answered, even across a snapshot
    /// (the sessions are part of the state that snapshots carry).
    #[test]
    fn a_tagged_request_is_applied_at_most_once() {
        let mut s = KvState::new(100);
        let first = s.apply(&tagged(7, 1, 1, put("k", "v1")));
        assert_eq!(
            first,
            CmdResult::Put {
                revision: 1,
                prev: None
            }
        );
        // Another client's write in between.
        s.apply(&tagged(8, 1, 1, put("other", "x")));
        // The duplicate: same answer, no new revision, version still 1.
        assert_eq!(s.apply(&tagged(7, 1, 1, put("k", "v1"))), first);
        assert_eq!(s.revision(), 2);
        assert_eq!(s.get("k").map(|kv| kv.version), Some(1));
        // Through a snapshot (the codec the plugin uses on disk).
        let bytes = dsys_runtime::encode(&s).expect("encode");
        let mut back: KvState = dsys_runtime::decode(&bytes).expect("decode");
        assert_eq!(back, s);
        assert_eq!(back.apply(&tagged(7, 1, 1, put("k", "v1"))), first);
        assert_eq!(back.revision(), 2);
        // The same payload under a new sequence number is a new request.
        let again = back.apply(&tagged(7, 2, 1, put("k", "v1")));
        assert_eq!(
            again,
            CmdResult::Put {
                revision: 3,
                prev: s.get("k").cloned()
            }
        );
        // Once the client's floor passes a request, its result is forgotten and a late copy
        // of it is ignored rather than applied again.
        back.apply(&tagged(7, 3, 3, put("z", "1")));
        assert!(matches!(
            back.apply(&tagged(7, 1, 1, put("k", "v1"))),
            CmdResult::Refused(_)
        ));
        assert_eq!(back.revision(), 4);
        assert_eq!(back.get("k").map(|kv| kv.version), Some(2));
        back.check_invariants().expect("invariants");
    }

    /// A batch applies its commands in order, each with its own revision and result, and
    /// deduplicates tagged ones like single commands.
    #[test]
    fn a_batch_applies_in_order() {
        let mut s = KvState::new(100);
        let r = s.apply(&Command::Batch(Arc::new(vec![
            tagged(1, 1, 1, put("a", "1")),
            put("a", "2"),
            Command::LeaseRevoke { id: 9 },
            tagged(1, 1, 1, put("a", "1")),
        ])));
        let CmdResult::Batch(rs) = r else {
            panic!("not a batch result: {r:?}")
        };
        assert_eq!(rs.len(), 4);
        assert_eq!(
            rs[0],
            CmdResult::Put {
                revision: 1,
                prev: None
            }
        );
        assert!(matches!(rs[1], CmdResult::Put { revision: 2, .. }));
        assert!(matches!(rs[2], CmdResult::Refused(_)));
        assert_eq!(
            rs[3], rs[0],
            "the repeat inside the batch answers the first"
        );
        assert_eq!(s.get("a").map(|kv| kv.value.as_str()), Some("2"));
        assert_eq!(s.revision(), 2);
    }

    /// A snapshot written before sessions existed still loads.
    #[test]
    fn snapshots_without_sessions_still_load() {
        #[derive(Serialize)]
        struct V1<'a> {
            kv: &'a BTreeMap<String, KeyValue>,
            revision: u64,
            leases: &'a BTreeMap<u64, Lease>,
            next_lease: u64,
            history: &'a VecDeque<Event>,
            history_cap: usize,
            compacted: u64,
        }
        let mut s = KvState::new(100);
        s.apply(&put("a", "1"));
        s.apply(&Command::LeaseGrant { ttl_ms: 1000 });
        let old = dsys_runtime::encode(&V1 {
            kv: &s.kv,
            revision: s.revision,
            leases: &s.leases,
            next_lease: s.next_lease,
            history: &s.history,
            history_cap: s.history_cap,
            compacted: s.compacted,
        })
        .expect("encode");
        assert_eq!(KvState::decode(&old).expect("decode v1"), s);
        let new = dsys_runtime::encode(&s).expect("encode");
        assert_eq!(KvState::decode(&new).expect("decode"), s);
        assert!(KvState::decode(b"garbage").is_err());
    }

    /// Results kept per client and the number of clients are bounded.
    #[test]
    fn dedup_state_is_bounded() {
        let mut s = KvState::new(10);
        for c in 0..(MAX_SESSIONS as u64 + 10) {
            s.apply(&tagged(c, 1, 1, put("k", "v")));
        }
        assert_eq!(s.sessions(), MAX_SESSIONS);
        // A client that never raises its floor keeps at most MAX_RESULTS_PER_SESSION.
        let mut s = KvState::new(10);
        for seq in 1..=(MAX_RESULTS_PER_SESSION as u64 + 5) {
            s.apply(&tagged(1, seq, 1, put("k", "v")));
        }
        let kept = s.sessions.get(&1).map(|x| x.results.len());
        assert_eq!(kept, Some(MAX_RESULTS_PER_SESSION));
        // The oldest went first: a late copy of request 1 is not applied again.
        let rev = s.revision();
        assert!(matches!(
            s.apply(&tagged(1, 1, 1, put("k", "v"))),
            CmdResult::Refused(_)
        ));
        assert_eq!(s.revision(), rev);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop::sample::select(vec!["a", "a/b", "a/c", "b", "c/d"]).prop_map(String::from)
        }

        fn op() -> impl Strategy<Value = TxnOp> {
            prop_oneof![
                (key(), "[a-c]", prop::option::of(1u64..4))
                    .prop_map(|(key, value, lease)| { TxnOp::Put { key, value, lease } }),
                (key(), any::<bool>()).prop_map(|(key, prefix)| TxnOp::Delete { key, prefix }),
                (key(), any::<bool>()).prop_map(|(key, prefix)| TxnOp::Get { key, prefix }),
            ]
        }

        fn command() -> impl Strategy<Value = Command> {
            prop_oneof![
                (key(), "[a-c]", prop::option::of(1u64..4))
                    .prop_map(|(key, value, lease)| Command::Put { key, value, lease }),
                (key(), any::<bool>()).prop_map(|(key, prefix)| Command::Delete { key, prefix }),
                (1u64..5000).prop_map(|ttl_ms| Command::LeaseGrant { ttl_ms }),
                (1u64..4).prop_map(|id| Command::LeaseRevoke { id }),
                prop::collection::vec(1u64..4, 0..3).prop_map(|ids| Command::LeaseExpire { ids }),
                (
                    key(),
                    0u64..6,
                    prop::collection::vec(op(), 0..4),
                    prop::collection::vec(op(), 0..4)
                )
                    .prop_map(|(key, rev, success, failure)| Command::Txn(Txn {
                        compares: vec![Compare {
                            key,
                            op: CompareOp::Equal,
                            target: CompareTarget::ModRevision(rev),
                        }],
                        success,
                        failure,
                    })),
            ]
        }

        proptest! {
            /// Invariants hold after every command; the revision moves by 0 or 1; replaying the
            /// same commands gives the same state (determinism, which replication relies on);
            /// replaying the watch history from revision 1 onto the empty map gives the keys.
            #[test]
            fn invariants_determinism_and_history(cmds in prop::collection::vec(command(), 0..60)) {
                let mut s = KvState::new(10_000);
                let mut t = KvState::new(10_000);
                for c in &cmds {
                    let before = s.revision();
                    let r1 = s.apply(c);
                    let r2 = t.apply(c);
                    prop_assert_eq!(&r1, &r2);
                    prop_assert!(s.revision() == before || s.revision() == before + 1);
                    if matches!(r1, CmdResult::Refused(_)) {
                        prop_assert_eq!(s.revision(), before);
                    }
                    s.check_invariants().map_err(TestCaseError::fail)?;
                }
                prop_assert_eq!(&s, &t);
                let w = s.watch("", true, 1, usize::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut replay: BTreeMap<String, KeyValue> = BTreeMap::new();
                for e in w.events {
                    match e.kind {
                        EventKind::Put => { replay.insert(e.kv.key.clone(), e.kv); }
                        EventKind::Delete => { replay.remove(&e.kv.key); }
                    }
                }
                let (all, _) = s.range("", true, usize::MAX);
                prop_assert_eq!(replay.into_values().collect::<Vec<_>>(), all);
            }

            /// Paging through a watch with any limit yields exactly the unpaged events.
            #[test]
            fn watch_paging(cmds in prop::collection::vec(command(), 0..60), limit in 1usize..5) {
                let mut s = KvState::new(10_000);
                for c in &cmds { s.apply(c); }
                let all = s.watch("a", true, 1, usize::MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut got = Vec::new();
                let mut from = 1;
                loop {
                    let b = s.watch("a", true, from, limit).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(b.next_revision > from - 1);
                    got.extend(b.events);
                    if b.next_revision > s.revision() { break; }
                    prop_assert!(b.next_revision > from);
                    from = b.next_revision;
                }
                prop_assert_eq!(got, all.events);
            }
        }
    }
}
