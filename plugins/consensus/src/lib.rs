//! dsys plugin 27, `consensus`: a Raft group (openraft 0.9) whose log lives in the runtime's
//! WAL and whose messages travel over the runtime's RPC, driving an etcd-like state machine
//! (keys with revisions, leases, watches, transactions). Every node runs the plugin; the
//! voters come from `[plugins.consensus] voters` (default: the first three nodes) and any
//! node, voter or not, accepts any request and forwards it to the leader.
//!
//! Modules: [`state`] (the pure state machine), `lease_timer` (the leader's lease clock,
//! pure), `log_store` (Raft log + vote on the WAL), `sm_store` (state machine and snapshots),
//! `network` (Raft RPCs over `Rpc::call`), [`api`] (wire types and the CLI). This file wires
//! them: start, request routing, cluster initialization, lease expiry.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
mod lease_timer;
mod log_store;
mod network;
mod sm_store;
pub mod state;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dsys_runtime::{Caller, MemberState, Metrics, Panel, Plugin, PluginContext, RpcError};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use serde::Deserialize;
use tokio::time::Instant;

pub use api::{
    event_line, ConsensusApi, ConsensusRequest, ConsensusResponse, LeaseCommand, RaftCommand,
    RaftStatus, TxnArgs, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
pub use log_store::LogRecovery;
pub use types::{raft_id, TypeConfig};

use lease_timer::LeaseTimer;
use log_store::LogStore;
use network::Network;
use sm_store::SmStore;
use state::{CmdResult, Command, RequestId, TxnOp};
use types::Raft;

/// Most forwarding hops of one request (a leader change mid-flight costs one or two).
const MAX_HOPS: u8 = 4;
/// How often the leader checks leases.
/// The longest the leader's lease clock sleeps without looking at the state machine's leases
/// (a lease granted through another path than this node's `LeaseGrant` is seen this late).
const LEASE_RESYNC: Duration = Duration::from_secs(1);
/// Most client commands in one batch entry.
const MAX_BATCH: usize = 1024;
/// Most estimated bytes of commands in one batch entry (the WAL takes records to 4 MiB and
/// one command is at most about 2 MiB); as `network::MAX_APPEND_BYTES`, so that one batch
/// fits one AppendEntries.
const MAX_BATCH_BYTES: usize = network::MAX_APPEND_BYTES;
/// Batches proposed and not yet applied at a time. openraft 0.9 appends (and fsyncs) one
/// entry after the other, so while these are in flight the next batch fills up: the batch
/// size follows the load (group commit), one fsync and one replication round per batch.
const BATCHES_IN_FLIGHT: usize = 2;

/// A client command waiting for its batch, and where its result goes.
type Pending = (
    Command,
    tokio::sync::oneshot::Sender<Result<CmdResult, Route>>,
);

/// `[plugins.consensus]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ConsensusConfig {
    /// Initial voters (node ids); default: the first three nodes of the cluster file.
    pub voters: Vec<String>,
    /// Leader heartbeat interval (default 200 ms).
    pub heartbeat_ms: u64,
    /// Election timeout range (default 500..900 ms): a voter that hears from no leader for
    /// a random time in this range (drawn again after every attempt) asks for pre-votes.
    pub election_min_ms: u64,
    /// Election timeout range.
    pub election_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one (default 100000, as
    /// etcd's `--snapshot-count`: a snapshot serializes the whole state).
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for slow followers (default 1000).
    pub keep_logs: u64,
    /// Events kept for watches (default 100000).
    pub history: usize,
}

impl ConsensusConfig {
    /// The leader lease: a voter refuses pre-votes and votes for this long after it last
    /// heard from a leader (half the shortest election timeout, so that by the time any
    /// candidate's timeout runs out the other voters' leases have too).
    fn lease_ms(&self) -> u64 {
        (self.election_min_ms / 2).max(self.heartbeat_ms + 2)
    }

    fn with_defaults(mut self, nodes: &[String]) -> Result<Self, String> {
        if self.voters.is_empty() {
            self.voters = nodes.iter().take(3).cloned().collect();
        }
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        self.heartbeat_ms = or(self.heartbeat_ms, 200);
        self.election_min_ms = or(self.election_min_ms, 500);
        self.election_max_ms = or(self.election_max_ms, 900);
        self.snapshot_every = or(self.snapshot_every, 100_000);
        self.keep_logs = or(self.keep_logs, 1000);
        if self.history == 0 {
            self.history = state::DEFAULT_HISTORY;
        }
        let mut ids = BTreeSet::new();
        for v in &self.voters {
            if !nodes.contains(v) {
                return Err(format!(
                    "plugins.consensus.voters: `{v}` is not a node of the cluster"
                ));
            }
            if !ids.insert(raft_id(v)) {
                return Err(format!(
                    "plugins.consensus.voters: `{v}` is listed twice (or its id collides)"
                ));
            }
        }
        if self.election_min_ms < 2 * self.heartbeat_ms
            || self.election_max_ms <= self.election_min_ms
        {
            return Err(
                "plugins.consensus: need 2 * heartbeat_ms <= election_min_ms < election_max_ms"
                    .into(),
            );
        }
        Ok(self)
    }
}

struct Inner {
    ctx: PluginContext,
    me: String,
    my_id: u64,
    cfg: ConsensusConfig,
    raft: Raft,
    log: LogStore,
    sm: SmStore,
    leases: Mutex<LeaseTimer>,
    /// Wakes the lease clock when a lease is granted.
    lease_wake: Arc<tokio::sync::Notify>,
    recovery: LogRecovery,
    /// Ids for the writes this node receives from clients.
    tagger: Tagger,
    /// When this node last heard from a leader (or granted a vote, or led): the election
    /// clock of `election_loop` and the pre-vote's "is the leader gone?" test.
    contact: Mutex<Instant>,
    /// Pre-vote rounds and elections started here.
    pre_votes: AtomicU64,
    elections: AtomicU64,
    /// Client commands to batch into log entries (`batch_loop`).
    batch_tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

/// Gives each client write received here a [`RequestId`]: this incarnation's random client
/// id, a growing sequence number, and the lowest number still in flight here (the floor).
struct Tagger {
    client: u64,
    next: AtomicU64,
    inflight: Mutex<BTreeSet<u64>>,
}

/// A write in flight; dropping it (answered or given up) lets the floor move past it.
struct InFlight<'a> {
    tagger: &'a Tagger,
    id: RequestId,
}

impl Tagger {
    fn new() -> Self {
        Tagger {
            client: rand::random(),
            next: AtomicU64::new(1),
            inflight: Mutex::new(BTreeSet::new()),
        }
    }

    fn tag(&self) -> InFlight<'_> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(seq);
        let floor = g.first().copied().unwrap_or(seq);
        InFlight {
            tagger: self,
            id: RequestId {
                client: self.client,
                seq,
                floor,
            },
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.tagger
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id.seq);
    }
}

/// Writes that go through the log and get a request id (membership changes are not tagged:
/// openraft refuses a second change while one is in progress).
pub(crate) fn is_tagged_write(req: &ConsensusRequest) -> bool {
    matches!(
        req,
        ConsensusRequest::Put { .. }
            | ConsensusRequest::Delete { .. }
            | ConsensusRequest::Txn(_)
            | ConsensusRequest::LeaseGrant { .. }
            | ConsensusRequest::LeaseRevoke { .. }
    )
}

/// The command, wrapped with its request id if it has one.
fn once(cmd: Command, id: Option<RequestId>) -> Command {
    match id {
        Some(id) => Command::Once {
            id,
            cmd: Box::new(cmd),
        },
        None => cmd,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Stop the Raft core so it releases the WAL (a restarted instance reopens it).
        let raft = self.raft.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = raft.shutdown().await;
            });
        }
    }
}

/// The plugin.
pub struct ConsensusPlugin {
    inner: Arc<Inner>,
}

/// Why the leader path could not serve a request here.
#[derive(Clone)]
enum Route {
    /// Another node leads (or none is known): try again through it.
    Forward(Option<u64>),
    /// A transient failure (no quorum heard yet): try again until the deadline.
    Retry(RpcError),
    /// A final answer.
    Fail(RpcError),
}

impl From<RpcError> for Route {
    fn from(e: RpcError) -> Self {
        Route::Fail(e)
    }
}

fn check_key(k: &str) -> Result<(), RpcError> {
    RpcError::check_key(k, MAX_KEY_BYTES)
}

fn check_prefix(k: &str, prefix: bool) -> Result<(), RpcError> {
    if prefix && k.len() <= MAX_KEY_BYTES {
        return Ok(()); // an empty prefix means every key
    }
    check_key(k)
}

fn check_value(v: &str) -> Result<(), RpcError> {
    if v.len() > MAX_VALUE_BYTES {
        return Err(RpcError::refused(format!(
            "value of {} bytes exceeds the limit of {MAX_VALUE_BYTES}",
            v.len()
        )));
    }
    Ok(())
}

/// Refuse bad input at the edge, before anything reaches the log.
fn validate(req: &ConsensusRequest) -> Result<(), RpcError> {
    use ConsensusRequest as R;
    match req {
        R::Put { key, value, .. } => {
            check_key(key)?;
            check_value(value)
        }
        R::Get {
            key, prefix, limit, ..
        } => {
            check_prefix(key, *prefix)?;
            if *limit == 0 || *limit > api::MAX_RANGE {
                return Err(RpcError::refused(format!(
                    "limit must be 1..={}",
                    api::MAX_RANGE
                )));
            }
            Ok(())
        }
        R::Delete { key, prefix } => check_prefix(key, *prefix),
        R::Txn(t) => {
            let n = t.compares.len() + t.success.len() + t.failure.len();
            if n > api::MAX_TXN_OPS {
                return Err(RpcError::refused(format!(
                    "a transaction may hold at most {} compares and operations",
                    api::MAX_TXN_OPS
                )));
            }
            if t.success.is_empty() && t.failure.is_empty() {
                return Err(RpcError::refused(
                    "a transaction needs at least one operation",
                ));
            }
            let mut bytes = 0;
            for c in &t.compares {
                check_key(&c.key)?;
                bytes += c.key.len();
                if let state::CompareTarget::Value(v) = &c.target {
                    check_value(v)?;
                    bytes += v.len();
                }
            }
            for op in t.success.iter().chain(&t.failure) {
                match op {
                    TxnOp::Put { key, value, .. } => {
                        check_key(key)?;
                        check_value(value)?;
                        bytes += key.len() + value.len();
                    }
                    TxnOp::Delete { key, prefix } | TxnOp::Get { key, prefix } => {
                        check_prefix(key, *prefix)?;
                        bytes += key.len();
                    }
                }
            }
            if bytes > api::MAX_TXN_BYTES {
                return Err(RpcError::refused(format!(
                    "a transaction may carry at most {} bytes of keys and values",
                    api::MAX_TXN_BYTES
                )));
            }
            Ok(())
        }
        R::Watch {
            key,
            prefix,
            wait_ms,
            limit,
            ..
        } => {
            check_prefix(key, *prefix)?;
            if *wait_ms > api::MAX_WATCH_WAIT_MS {
                return Err(RpcError::refused(format!(
                    "wait_ms is capped at {}",
                    api::MAX_WATCH_WAIT_MS
                )));
            }
            if *limit == 0 || *limit > api::MAX_WATCH_EVENTS {
                return Err(RpcError::refused(format!(
                    "limit must be 1..={}",
                    api::MAX_WATCH_EVENTS
                )));
            }
            Ok(())
        }
        R::LeaseGrant { ttl_ms } => {
            if !(api::MIN_TTL_MS..=api::MAX_TTL_MS).contains(ttl_ms) {
                return Err(RpcError::refused(format!(
                    "lease TTL must be {}..={} ms",
                    api::MIN_TTL_MS,
                    api::MAX_TTL_MS
                )));
            }
            Ok(())
        }
        R::AddVoter { node } | R::RemoveVoter { node } => check_key(node),
        _ => Ok(()),
    }
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Inner {
    /// Heard from a leader (or granted a vote, or leads): restart the election clock.
    fn touch(&self) {
        *self.contact.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn quiet_for(&self) -> Duration {
        self.contact
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Pre-vote: yes when this node is not the leader, has heard from no leader for the
    /// leader lease, and the candidate's log is at least as up to date as its own.
    fn grant_pre_vote(&self, candidate_last: Option<openraft::LogId<u64>>) -> bool {
        let m = self.metrics();
        m.state != ServerState::Leader
            && self.quiet_for() >= Duration::from_millis(self.cfg.lease_ms())
            && candidate_last >= self.log.last_log_id()
    }

    /// Ask the other voters whether they would vote for this node; true when a majority of
    /// every voter set (joint consensus has two) would, counting this node.
    async fn pre_vote(&self, m: &openraft::RaftMetrics<u64, BasicNode>) -> bool {
        let mem = m.membership_config.membership();
        let configs: Vec<BTreeSet<u64>> = mem.get_joint_config().to_vec();
        let others: BTreeSet<u64> = configs
            .iter()
            .flatten()
            .copied()
            .filter(|id| *id != self.my_id)
            .collect();
        let req = ConsensusRequest::PreVote {
            last_log_id: self.log.last_log_id(),
        };
        let ttl = Duration::from_millis(self.cfg.lease_ms());
        let mut asks = tokio::task::JoinSet::new();
        for id in others {
            let Some(name) = mem.get_node(&id).map(|n| n.addr.clone()) else {
                continue;
            };
            let (rpc, req) = (self.ctx.rpc.clone(), req.clone());
            asks.spawn(async move {
                let r = rpc
                    .call_with_timeout::<ConsensusApi>(&name, &req, ttl)
                    .await;
                (
                    id,
                    matches!(r, Ok(ConsensusResponse::PreVote { granted: true })),
                )
            });
        }
        let mut yes: BTreeSet<u64> = [self.my_id].into();
        let won = |yes: &BTreeSet<u64>| {
            configs
                .iter()
                .all(|c| c.iter().filter(|v| yes.contains(v)).count() * 2 > c.len())
        };
        while let Some(r) = asks.join_next().await {
            if let Ok((id, true)) = r {
                yes.insert(id);
                if won(&yes) {
                    return true;
                }
            }
        }
        won(&yes)
    }

    fn metrics(&self) -> openraft::RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// Name of a Raft member by id, from the membership this node knows.
    fn name_of(&self, id: u64) -> Option<String> {
        let m = self.metrics();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .or_else(|| self.cfg.voters.iter().find(|v| raft_id(v) == id).cloned())
    }

    fn is_member(&self) -> bool {
        self.metrics()
            .membership_config
            .membership()
            .get_node(&self.my_id)
            .is_some()
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.ctx.rpc.default_timeout()
    }

    async fn status(&self) -> RaftStatus {
        let m = self.metrics();
        let committed = self
            .raft
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .ok()
            .flatten();
        let mem = m.membership_config.membership();
        let name = |id: u64| {
            mem.get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_else(|| format!("#{id}"))
        };
        let (revision, keys, leases) = self.sm.read(|s| {
            (
                s.state.revision(),
                s.state.len() as u64,
                s.state.leases().len() as u64,
            )
        });
        let wal = self.log.wal_stats();
        let mut voters: Vec<String> = mem.voter_ids().map(name).collect();
        voters.sort();
        let mut learners: Vec<String> = mem.learner_ids().map(name).collect();
        learners.sort();
        RaftStatus {
            node: self.me.clone(),
            state: state_name(m.state).into(),
            leader: m.current_leader.map(name),
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed,
            applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            voters,
            learners,
            revision,
            keys,
            leases,
            wal_first_lsn: wal.first_lsn,
            wal_last_lsn: wal.last_lsn,
            wal_checkpoint_lsn: wal.checkpoint_lsn,
            pre_votes: self.pre_votes.load(Ordering::Relaxed),
            elections: self.elections.load(Ordering::Relaxed),
        }
    }

    /// Propose a command and wait for it to be committed and applied.
    async fn write(&self, cmd: Command) -> Result<CmdResult, Route> {
        let budget = self.ctx.rpc.default_timeout();
        match tokio::time::timeout(budget, self.raft.client_write(cmd)).await {
            Err(_) => Err(Route::Fail(RpcError::Timeout(budget.as_millis() as u64))),
            Ok(Ok(r)) => match r.data {
                CmdResult::Refused(m) => Err(Route::Fail(RpcError::Refused(m))),
                d => Ok(d),
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Route::Forward(f.leader_id))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Route::Fail(RpcError::refused(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(Route::Fail(RpcError::Internal(format!(
                "raft stopped: {e}"
            )))),
        }
    }

    /// Propose a client command through the batcher: it shares a log entry with the
    /// commands that arrive while earlier batches are in flight.
    async fn propose(&self, cmd: Command) -> Result<CmdResult, Route> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.batch_tx.send((cmd, tx)).is_err() {
            return Err(Route::Fail(RpcError::Internal(
                "the consensus batcher stopped".into(),
            )));
        }
        rx.await.unwrap_or_else(|_| {
            Err(Route::Fail(RpcError::Internal(
                "the consensus batcher dropped a request".into(),
            )))
        })
    }

    /// Write one batch and hand each command its own result.
    async fn write_batch(&self, mut batch: Vec<Pending>) {
        if batch.len() == 1 {
            if let Some((cmd, tx)) = batch.pop() {
                let _ = tx.send(self.write(cmd).await);
            }
            return;
        }
        let (cmds, txs): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
        let n = txs.len();
        match self.write(Command::Batch(Arc::new(cmds))).await {
            Ok(CmdResult::Batch(rs)) if rs.len() == n => {
                for (r, tx) in rs.into_iter().zip(txs) {
                    let _ = tx.send(match r {
                        CmdResult::Refused(m) => Err(Route::Fail(RpcError::Refused(m))),
                        r => Ok(r),
                    });
                }
            }
            Ok(_) => {
                for tx in txs {
                    let _ = tx.send(Err(Route::Fail(RpcError::Internal(
                        "unexpected state-machine result for a batch".into(),
                    ))));
                }
            }
            Err(route) => {
                for tx in txs {
                    let _ = tx.send(Err(route.clone()));
                }
            }
        }
    }

    /// Confirm leadership with a quorum (read index) and wait until it is applied here.
    async fn linearize(&self) -> Result<(), Route> {
        let budget = self.ctx.rpc.default_timeout();
        match tokio::time::timeout(budget, self.raft.ensure_linearizable()).await {
            Err(_) => Err(Route::Fail(RpcError::Timeout(budget.as_millis() as u64))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(Route::Forward(f.leader_id))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(Route::Retry(RpcError::Unreachable(format!(
                    "leader cannot reach a quorum: {e}"
                ))))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(Route::Fail(RpcError::Internal(format!(
                "raft stopped: {e}"
            )))),
        }
    }

    fn read_range(&self, key: &str, prefix: bool, limit: u32) -> ConsensusResponse {
        self.sm.read(|s| {
            let (kvs, more) = s.state.range(key, prefix, limit as usize);
            ConsensusResponse::Range {
                kvs,
                more,
                revision: s.state.revision(),
            }
        })
    }

    /// Serve a request as the leader.
    async fn serve_as_leader(
        &self,
        req: &ConsensusRequest,
        id: Option<RequestId>,
    ) -> Result<ConsensusResponse, Route> {
        use ConsensusRequest as R;
        let resp = |r: CmdResult| -> Result<ConsensusResponse, Route> {
            Ok(match r {
                CmdResult::Put { revision, prev } => ConsensusResponse::Put { revision, prev },
                CmdResult::Delete { revision, deleted } => {
                    ConsensusResponse::Deleted { deleted, revision }
                }
                CmdResult::Txn {
                    revision,
                    succeeded,
                    results,
                } => ConsensusResponse::Txn {
                    succeeded,
                    revision,
                    results,
                },
                CmdResult::LeaseGranted { id, ttl_ms, .. } => {
                    ConsensusResponse::LeaseGranted { id, ttl_ms }
                }
                CmdResult::LeaseRevoked {
                    revision,
                    ids,
                    deleted,
                } => ConsensusResponse::LeaseRevoked {
                    id: ids.first().copied().unwrap_or(0),
                    deleted,
                    revision,
                },
                other => {
                    return Err(Route::Fail(RpcError::Internal(format!(
                        "unexpected state-machine result {other:?}"
                    ))))
                }
            })
        };
        match req {
            R::Put { key, value, lease } => resp(
                self.propose(once(
                    Command::Put {
                        key: key.clone(),
                        value: value.clone(),
                        lease: *lease,
                    },
                    id,
                ))
                .await?,
            ),
            R::Delete { key, prefix } => resp(
                self.propose(once(
                    Command::Delete {
                        key: key.clone(),
                        prefix: *prefix,
                    },
                    id,
                ))
                .await?,
            ),
            R::Txn(t) => resp(self.propose(once(Command::Txn(t.clone()), id)).await?),
            R::LeaseGrant { ttl_ms } => {
                let r = resp(
                    self.propose(once(Command::LeaseGrant { ttl_ms: *ttl_ms }, id))
                        .await?,
                )?;
                if let ConsensusResponse::LeaseGranted { id, ttl_ms } = &r {
                    self.leases
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .keep_alive(*id, *ttl_ms, Instant::now());
                    // Its deadline may be earlier than the one the lease clock sleeps until.
                    self.lease_wake.notify_one();
                }
                Ok(r)
            }
            R::LeaseRevoke { id: lease } => resp(
                self.propose(once(Command::LeaseRevoke { id: *lease }, id))
                    .await?,
            ),
            R::LeaseKeepAlive { id } => {
                self.linearize().await?;
                let ttl = self
                    .sm
                    .read(|s| s.state.leases().get(id).map(|l| l.ttl_ms))
                    .ok_or_else(|| RpcError::refused(format!("lease {id} not found")))?;
                let renewed = self.leases.lock().unwrap_or_else(|p| p.into_inner()).renew(
                    *id,
                    ttl,
                    Instant::now(),
                );
                if !renewed {
                    // Its expiry is decided (maybe not applied yet): saying "kept" now would
                    // let a holder believe in a lease that is about to vanish.
                    return Err(RpcError::refused(format!("lease {id} expired")).into());
                }
                Ok(ConsensusResponse::LeaseKept {
                    id: *id,
                    ttl_ms: ttl,
                })
            }
            R::Get {
                key, prefix, limit, ..
            } => {
                self.linearize().await?;
                Ok(self.read_range(key, *prefix, *limit))
            }
            R::AddVoter { node } => {
                if !self.ctx.config.nodes.contains_key(node) {
                    return Err(RpcError::refused(format!(
                        "`{node}` is not a node of the cluster"
                    ))
                    .into());
                }
                let id = raft_id(node);
                let map = |e: RaftError<u64, ClientWriteError<u64, BasicNode>>| match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                        Route::Forward(f.leader_id)
                    }
                    other => Route::Fail(RpcError::refused(other.to_string())),
                };
                self.raft
                    .add_learner(id, BasicNode::new(node), true)
                    .await
                    .map_err(map)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
                    .await
                    .map_err(map)?;
                Ok(self.membership_resp())
            }
            R::RemoveVoter { node } => {
                let id = raft_id(node);
                let m = self.metrics();
                let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
                if !voters.contains(&id) {
                    return Err(RpcError::refused(format!("`{node}` is not a voter")).into());
                }
                if voters.len() == 1 {
                    return Err(RpcError::refused("cannot remove the last voter").into());
                }
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters([id].into()), false)
                    .await
                    .map_err(|e| match e {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                            Route::Forward(f.leader_id)
                        }
                        other => Route::Fail(RpcError::refused(other.to_string())),
                    })?;
                Ok(self.membership_resp())
            }
            _ => Err(RpcError::Internal("not a leader request".into()).into()),
        }
    }

    fn membership_resp(&self) -> ConsensusResponse {
        let m = self.metrics();
        let mem = m.membership_config.membership();
        let name = |id: u64| {
            mem.get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_else(|| format!("#{id}"))
        };
        let mut voters: Vec<String> = mem.voter_ids().map(name).collect();
        voters.sort();
        let mut learners: Vec<String> = mem.learner_ids().map(name).collect();
        learners.sort();
        ConsensusResponse::Membership { voters, learners }
    }

    async fn forward(
        &self,
        node: &str,
        req: &ConsensusRequest,
        hops: u8,
        id: Option<RequestId>,
    ) -> Result<ConsensusResponse, RpcError> {
        if hops >= MAX_HOPS {
            return Err(RpcError::Unreachable(
                "no stable leader: the request was forwarded too many times".into(),
            ));
        }
        self.ctx
            .rpc
            .call::<ConsensusApi>(
                node,
                &ConsensusRequest::Forwarded {
                    hops: hops + 1,
                    id,
                    req: Box::new(req.clone()),
                },
            )
            .await
    }

    /// A node not in the Raft membership knows no leader: hand the request to a voter.
    async fn forward_to_voters(
        &self,
        req: &ConsensusRequest,
        hops: u8,
        id: Option<RequestId>,
    ) -> Result<ConsensusResponse, RpcError> {
        let view = self.ctx.membership.view();
        let mut last = RpcError::Unreachable("no voter is alive".into());
        for v in &self.cfg.voters {
            if *v == self.me
                || view.members.get(v).map(|m| m.state != MemberState::Alive) != Some(false)
            {
                continue;
            }
            match self.forward(v, req, hops, id).await {
                Err(e @ (RpcError::Unreachable(_) | RpcError::PluginUnavailable(_))) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// Route a request that needs the leader: serve it here if this node leads, else forward
    /// it to the leader, waiting (boundedly) for one to be elected. A request that may be
    /// sent twice (a read, or a write with a request id) is sent again to the new leader
    /// when the leader changes while it is in flight, instead of waiting on the old one.
    async fn via_leader(
        &self,
        req: &ConsensusRequest,
        hops: u8,
        id: Option<RequestId>,
    ) -> Result<ConsensusResponse, RpcError> {
        let end = self.deadline();
        let mut rx = self.raft.metrics();
        let mut hint: Option<u64> = None;
        let mut last: Option<RpcError> = None;
        let resendable = id.is_some()
            || matches!(
                req,
                ConsensusRequest::Get { .. } | ConsensusRequest::LeaseKeepAlive { .. }
            );
        loop {
            let m = rx.borrow_and_update().clone();
            let leader = hint.take().or(m.current_leader);
            match leader {
                Some(l) if l == self.my_id => match self.serve_as_leader(req, id).await {
                    Ok(r) => return Ok(r),
                    Err(Route::Fail(e)) => return Err(e),
                    Err(Route::Retry(e)) => last = Some(e),
                    Err(Route::Forward(h)) => {
                        hint = h.filter(|h| *h != self.my_id);
                        if hint.is_some() {
                            continue;
                        }
                    }
                },
                Some(l) => {
                    let Some(name) = self.name_of(l) else {
                        return Err(RpcError::Internal(format!("leader #{l} has no known name")));
                    };
                    // A leader that gossip already knows is dead is stale: wait for the next
                    // one rather than send a request into the void.
                    let dead = self
                        .ctx
                        .membership
                        .view()
                        .members
                        .get(&name)
                        .map(|m| m.state != MemberState::Alive)
                        .unwrap_or(true);
                    if !dead {
                        if !resendable {
                            return self.forward(&name, req, hops, id).await;
                        }
                        let fwd = self.forward(&name, req, hops, id);
                        tokio::pin!(fwd);
                        let moved = loop {
                            tokio::select! {
                                r = &mut fwd => match r {
                                    Err(e @ (RpcError::Unreachable(_)
                                    | RpcError::PluginUnavailable(_))) => {
                                        last = Some(e);
                                        break false;
                                    }
                                    r => return r,
                                },
                                c = rx.changed() => {
                                    if c.is_err() {
                                        return fwd.await;
                                    }
                                    let now = rx.borrow().current_leader;
                                    if now.is_some() && now != Some(l) {
                                        break true;
                                    }
                                }
                            }
                        };
                        if moved {
                            tracing::debug!(
                                ?id,
                                "consensus: leader changed mid-request; resending"
                            );
                            continue;
                        }
                    }
                }
                None if !self.is_member() => return self.forward_to_voters(req, hops, id).await,
                None => {}
            }
            let now = Instant::now();
            if now >= end {
                return Err(last.unwrap_or_else(|| {
                    RpcError::Unreachable(
                        "no leader elected within the deadline (is a majority of voters up?)"
                            .into(),
                    )
                }));
            }
            let wait = (end - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
    }

    async fn watch(
        &self,
        key: &str,
        prefix: bool,
        mut from: u64,
        wait_ms: u64,
        limit: u32,
    ) -> Result<ConsensusResponse, RpcError> {
        let end = Instant::now() + Duration::from_millis(wait_ms);
        let mut rx = self.sm.subscribe();
        loop {
            rx.borrow_and_update();
            let batch = self
                .sm
                .read(|s| s.state.watch(key, prefix, from, limit as usize))
                .map_err(|e| RpcError::refused(e.to_string()))?;
            let now = Instant::now();
            if !batch.events.is_empty() || now >= end {
                return Ok(ConsensusResponse::Events {
                    events: batch.events,
                    next_revision: batch.next_revision,
                });
            }
            from = batch.next_revision;
            let _ = tokio::time::timeout(end - now, rx.changed()).await;
        }
    }

    async fn client(
        &self,
        req: ConsensusRequest,
        hops: u8,
        id: Option<RequestId>,
    ) -> Result<ConsensusResponse, RpcError> {
        validate(&req)?;
        match &req {
            // A node outside the Raft group has no view of it: a voter answers instead (the
            // status names the node that answered).
            ConsensusRequest::Status if !self.is_member() && hops == 0 => {
                match self.forward_to_voters(&req, hops, None).await {
                    Ok(r) => Ok(r),
                    Err(_) => Ok(ConsensusResponse::Status(self.status().await)),
                }
            }
            ConsensusRequest::Status => Ok(ConsensusResponse::Status(self.status().await)),
            ConsensusRequest::Get {
                key,
                prefix,
                serializable: true,
                limit,
            } if self.is_member() => Ok(self.read_range(key, *prefix, *limit)),
            ConsensusRequest::Watch {
                key,
                prefix,
                from_revision,
                wait_ms,
                limit,
            } if self.is_member() => {
                self.watch(key, *prefix, *from_revision, *wait_ms, *limit)
                    .await
            }
            ConsensusRequest::Get {
                serializable: true, ..
            }
            | ConsensusRequest::Watch { .. } => self.forward_to_voters(&req, hops, None).await,
            _ => {
                // The first node to see a write gives it its id; forwards keep it.
                let tag =
                    (id.is_none() && hops == 0 && is_tagged_write(&req)).then(|| self.tagger.tag());
                let id = id.or(tag.as_ref().map(|t| t.id));
                self.via_leader(&req, hops, id).await
            }
        }
    }
}

/// Start the Raft group once: the lowest-named voter initializes it when a majority of the
/// voters is alive and none of them has a log or a vote yet. Idempotent: an initialized
/// node (e.g. after a restart) never initializes again.
async fn initializer(weak: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(inner) = weak.upgrade() else { return };
        match inner.raft.is_initialized().await {
            Ok(true) | Err(_) => return,
            Ok(false) => {}
        }
        let view = inner.ctx.membership.view();
        let alive: Vec<&String> = inner
            .cfg
            .voters
            .iter()
            .filter(|v| {
                **v == inner.me
                    || view.members.get(*v).map(|m| m.state == MemberState::Alive) == Some(true)
            })
            .collect();
        if alive.len() * 2 <= inner.cfg.voters.len() {
            continue;
        }
        // Does any alive voter already have Raft state? Then a cluster exists: do nothing.
        let mut existing = false;
        for v in alive.iter().filter(|v| ***v != inner.me) {
            let r = inner
                .ctx
                .rpc
                .call_with_timeout::<ConsensusApi>(
                    v,
                    &ConsensusRequest::Status,
                    Duration::from_secs(2),
                )
                .await;
            if let Ok(ConsensusResponse::Status(s)) = r {
                if s.term > 0 || s.last_log_index.is_some() {
                    existing = true;
                }
            }
        }
        if existing {
            tracing::info!("consensus: a voter already has Raft state; not initializing");
            return;
        }
        let members: BTreeMap<u64, BasicNode> = inner
            .cfg
            .voters
            .iter()
            .map(|v| (raft_id(v), BasicNode::new(v)))
            .collect();
        match inner.raft.initialize(members).await {
            Ok(()) => {
                tracing::info!(voters = ?inner.cfg.voters, "consensus: cluster initialized");
                return;
            }
            Err(RaftError::APIError(e)) => {
                tracing::info!("consensus: initialize refused ({e}); already initialized");
                return;
            }
            Err(e) => tracing::warn!("consensus: initialize failed: {e}"),
        }
    }
}

/// The leader's lease clock: propose the expiry of leases whose TTL ran out. On the leader
/// it sleeps until the earliest deadline (at most [`LEASE_RESYNC`]; a grant wakes it); a
/// follower waits for a change of Raft's metrics instead. No fixed tick: an idle cluster's
/// leader wakes about once per keep-alive period, not ten times a second.
async fn lease_loop(weak: Weak<Inner>) {
    let Some(mut rx) = weak.upgrade().map(|i| i.raft.metrics()) else {
        return;
    };
    let mut next = Instant::now();
    loop {
        {
            let Some(inner) = weak.upgrade() else { return };
            let wake = inner.lease_wake.clone();
            drop(inner);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = wake.notified() => {}
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let m = inner.metrics();
        if m.state != ServerState::Leader || m.current_leader != Some(inner.my_id) {
            inner
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            let me = inner.my_id;
            drop(inner);
            loop {
                if rx.changed().await.is_err() {
                    return;
                }
                let m = rx.borrow_and_update();
                if m.state == ServerState::Leader && m.current_leader == Some(me) {
                    break;
                }
            }
            next = Instant::now();
            continue;
        }
        let leases: BTreeMap<u64, u64> = inner.sm.read(|s| {
            s.state
                .leases()
                .iter()
                .map(|(id, l)| (*id, l.ttl_ms))
                .collect()
        });
        let now = Instant::now();
        let expired = {
            let mut t = inner.leases.lock().unwrap_or_else(|p| p.into_inner());
            t.sync(m.current_term, now, &leases);
            // A deadline already past is being proposed below: look again in 100 ms.
            next = match t.next_deadline() {
                Some(d) if d <= now => now + Duration::from_millis(100),
                Some(d) => d.min(now + LEASE_RESYNC),
                None => now + LEASE_RESYNC,
            };
            t.expired(now)
        };
        if expired.is_empty() {
            continue;
        }
        tracing::debug!(?expired, "consensus: leases expired");
        if let Err(Route::Fail(e)) = inner.write(Command::LeaseExpire { ids: expired }).await {
            tracing::warn!("consensus: proposing lease expiry failed: {e}");
        }
    }
}

#[async_trait::async_trait]
impl Plugin for ConsensusPlugin {
    type Api = ConsensusApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let nodes: Vec<String> = ctx.config.nodes.keys().cloned().collect();
        let cfg = ctx
            .plugin_config::<ConsensusConfig>("consensus")
            .map_err(|e| e.to_string())?
            .with_defaults(&nodes)?;
        for (name, help) in [
            ("dsys_raft_term", "Current Raft term on this node"),
            (
                "dsys_raft_is_leader",
                "1 while this node is the Raft leader",
            ),
            (
                "dsys_raft_last_log_index",
                "Last index in this node's Raft log",
            ),
            (
                "dsys_raft_applied_index",
                "Last index applied to this node's state machine",
            ),
            ("dsys_raft_revision", "State-machine revision applied here"),
            ("dsys_raft_keys", "Keys in this node's state machine"),
        ] {
            ctx.metrics.describe(name, "gauge", help);
        }
        ctx.metrics.describe(
            network::REPLICATED,
            "counter",
            "Log entries a leader replicated: how=sent carried them, how=by_reference found \
             them already on the follower (see the consensus README)",
        );
        let me = ctx.node_id.clone();
        let my_id = raft_id(&me);
        let (log, recovery) = LogStore::open(ctx.data_dir.join("log")).await?;
        let sm = SmStore::open(ctx.data_dir.join("sm"), cfg.history)?;
        let rcfg = openraft::Config {
            cluster_name: ctx.config.cluster.name.clone(),
            heartbeat_interval: cfg.heartbeat_ms,
            // openraft's own election timer is off (`election_loop` drives elections with a
            // pre-vote); its `election_timeout_max` is the leader lease within which a voter
            // refuses votes, and `election_timeout_min` bounds a vote RPC.
            enable_elect: false,
            election_timeout_min: cfg.lease_ms() - 1,
            election_timeout_max: cfg.lease_ms(),
            install_snapshot_timeout: 5000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            snapshot_max_chunk_size: 4 << 20,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("plugins.consensus: {e}"))?;
        let raft = Raft::new(
            my_id,
            Arc::new(rcfg),
            Network {
                rpc: ctx.rpc.clone(),
                metrics: ctx.metrics.clone(),
            },
            log.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| format!("starting raft: {e}"))?;
        tracing::info!(node = %me, ?recovery, "consensus: started");
        let (batch_tx, batch_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            ctx,
            me,
            my_id,
            cfg,
            raft,
            log,
            sm,
            leases: Mutex::new(LeaseTimer::default()),
            lease_wake: Arc::default(),
            recovery,
            tagger: Tagger::new(),
            contact: Mutex::new(Instant::now()),
            pre_votes: AtomicU64::new(0),
            elections: AtomicU64::new(0),
            batch_tx,
        });
        tokio::spawn(batch_loop(Arc::downgrade(&inner), batch_rx));
        tokio::spawn(election_loop(Arc::downgrade(&inner)));
        if inner.cfg.voters.iter().min() == Some(&inner.me) {
            tokio::spawn(initializer(Arc::downgrade(&inner)));
        }
        tokio::spawn(lease_loop(Arc::downgrade(&inner)));
        tokio::spawn(leader_watch(Arc::downgrade(&inner)));
        Ok(ConsensusPlugin { inner })
    }

    fn export_metrics(&self, out: &Metrics) {
        let i = &self.inner;
        let m = i.metrics();
        out.set("dsys_raft_term", &[], m.current_term);
        out.set(
            "dsys_raft_is_leader",
            &[],
            u64::from(m.state == ServerState::Leader),
        );
        out.set(
            "dsys_raft_last_log_index",
            &[],
            m.last_log_index.unwrap_or(0),
        );
        out.set(
            "dsys_raft_applied_index",
            &[],
            m.last_applied.map_or(0, |l| l.index),
        );
        let (revision, keys) = i.sm.read(|s| (s.state.revision(), s.state.len() as u64));
        out.set("dsys_raft_revision", &[], revision);
        out.set("dsys_raft_keys", &[], keys);
    }

    fn panel(&self) -> Option<Panel> {
        let i = &self.inner;
        let m = i.metrics();
        let idx =
            |l: Option<openraft::LogId<u64>>| l.map_or("-".to_string(), |l| l.index.to_string());
        let mem = m.membership_config.membership();
        let name = |id: &u64| {
            mem.get_node(id)
                .map(|n| n.addr.clone())
                .unwrap_or_else(|| format!("#{id}"))
        };
        let (revision, keys, leases) = i.sm.read(|s| {
            (
                s.state.revision(),
                s.state.len() as u64,
                s.state.leases().len() as u64,
            )
        });
        // The leader knows how far each member's log matches its own.
        let progress = m.replication.as_ref().map(|r| {
            let mut rows: Vec<Vec<String>> = r
                .iter()
                .map(|(id, matched)| {
                    vec![
                        name(id),
                        if mem.voter_ids().any(|v| v == *id) {
                            "voter"
                        } else {
                            "learner"
                        }
                        .to_string(),
                        idx(*matched),
                    ]
                })
                .collect();
            rows.sort();
            rows
        });
        let mut p = Panel::new("Raft (etcd-like state machine)")
            .stat("role", state_name(m.state))
            .stat(
                "leader",
                m.current_leader.as_ref().map_or("none".to_string(), name),
            )
            .stat("term", m.current_term)
            .stat(
                "last log index",
                m.last_log_index.map_or("-".to_string(), |i| i.to_string()),
            )
            .stat("applied", idx(m.last_applied))
            .stat("snapshot", idx(m.snapshot))
            .stat("revision", revision)
            .stat("keys", keys)
            .stat("leases", leases);
        if let Some(rows) = progress {
            p = p.table(
                "Replication (matched log index per member)",
                &["member", "role", "matched"],
                rows,
            );
        }
        Some(p)
    }

    async fn handle(
        &self,
        caller: Caller,
        req: ConsensusRequest,
    ) -> Result<ConsensusResponse, RpcError> {
        let i = &self.inner;
        let from_node = matches!(caller, Caller::Node(_));
        match req {
            ConsensusRequest::AppendEntries(r) if from_node => {
                let r = i.raft.append_entries(r).await;
                // Any answer but "your vote is stale" means the sender is the leader.
                if matches!(&r, Ok(a) if !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                    i.touch();
                }
                Ok(ConsensusResponse::AppendEntries(r))
            }
            ConsensusRequest::Vote(r) if from_node => {
                let r = i.raft.vote(r).await;
                if matches!(&r, Ok(v) if v.vote_granted) {
                    i.touch(); // Raft: granting a vote restarts the election clock
                }
                Ok(ConsensusResponse::Vote(r))
            }
            ConsensusRequest::InstallSnapshot(r) if from_node => Ok(
                ConsensusResponse::InstallSnapshot(i.raft.install_snapshot(r).await),
            ),
            ConsensusRequest::PreVote { last_log_id } if from_node => {
                Ok(ConsensusResponse::PreVote {
                    granted: i.grant_pre_vote(last_log_id),
                })
            }
            ConsensusRequest::Forwarded { hops, id, req } if from_node => {
                if matches!(*req, ConsensusRequest::Forwarded { .. }) || hops > MAX_HOPS {
                    return Err(RpcError::refused("malformed forwarded request"));
                }
                i.client(*req, hops, id).await
            }
            ConsensusRequest::AppendEntries(_)
            | ConsensusRequest::Vote(_)
            | ConsensusRequest::InstallSnapshot(_)
            | ConsensusRequest::PreVote { .. }
            | ConsensusRequest::Forwarded { .. } => Err(RpcError::refused(
                "Raft messages are accepted from cluster nodes only",
            )),
            ConsensusRequest::Tagged { id, req } => {
                if !is_tagged_write(&req) {
                    return Err(RpcError::refused(
                        "only a put, delete, txn, lease grant or lease revoke carries a request id",
                    ));
                }
                i.client(*req, 0, Some(id)).await
            }
            req => i.client(req, 0, None).await,
        }
    }
}

/// Elections, driven here instead of by openraft's timer (`enable_elect` is off): a voter
/// that has heard from no leader for its election timeout (drawn again at random from
/// `election_min_ms..election_max_ms` after every attempt, so two candidates that collided
/// do not collide again) first asks the other voters for a pre-vote and starts a real
/// election only if a majority would vote for it. A node that cannot win (cut off, stale
/// log, just restarted while the leader is fine) thus never raises the term and never makes
/// a working leader step down.
///
/// No fixed tick: a follower sleeps until its timeout would run out (each message from the
/// leader pushes that back, so it wakes about once per timeout, not every few ms), and the
/// leader, a learner or a non-voter waits for a change of Raft's metrics.
async fn election_loop(weak: Weak<Inner>) {
    let Some((min, max, mut rx)) = weak.upgrade().map(|i| {
        (
            i.cfg.election_min_ms,
            i.cfg.election_max_ms,
            i.raft.metrics(),
        )
    }) else {
        return;
    };
    let draw = || Duration::from_millis(rand::Rng::gen_range(&mut rand::thread_rng(), min..max));
    let mut timeout = draw();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let m = inner.metrics();
        let mem = m.membership_config.membership();
        let voter = mem.voter_ids().any(|v| v == inner.my_id);
        if !voter || m.state == ServerState::Leader || m.state == ServerState::Shutdown {
            drop(inner);
            if rx.changed().await.is_err() {
                return;
            }
            rx.borrow_and_update();
            if let Some(inner) = weak.upgrade() {
                // Leading or not voting until now: the timeout counts from this change.
                inner.touch();
            }
            continue;
        }
        let quiet = inner.quiet_for();
        if quiet < timeout {
            drop(inner);
            // Also wake on a metrics change: this node may have become leader or left.
            tokio::select! {
                _ = tokio::time::sleep(timeout - quiet) => {}
                r = rx.changed() => if r.is_err() { return },
            }
            continue;
        }
        inner.touch();
        timeout = draw();
        let alone = mem.voter_ids().all(|v| v == inner.my_id);
        inner.pre_votes.fetch_add(1, Ordering::Relaxed);
        if alone || inner.pre_vote(&m).await {
            inner.elections.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                term = m.current_term,
                "consensus: pre-vote won; starting an election"
            );
            if let Err(e) = inner.raft.trigger().elect().await {
                tracing::warn!("consensus: starting an election failed: {e}");
            }
        } else {
            tracing::debug!("consensus: pre-vote lost; no election");
        }
    }
}

/// Group commit: collect the client commands that queued up while `BATCHES_IN_FLIGHT`
/// batches were in flight into one `Command::Batch` entry.
async fn batch_loop(weak: Weak<Inner>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = network::cmd_size(&first.0);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => {
                    let b = network::cmd_size(&p.0);
                    if bytes + b > MAX_BATCH_BYTES {
                        carry = Some(p);
                        break;
                    }
                    bytes += b;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        tokio::spawn(async move {
            let _permit = permit;
            inner.write_batch(batch).await;
        });
    }
}

/// Put leader changes on the node's timeline.
async fn leader_watch(weak: std::sync::Weak<Inner>) {
    let Some(mut rx) = weak.upgrade().map(|i| i.raft.metrics()) else {
        return;
    };
    let mut last: Option<(Option<u64>, u64)> = None;
    loop {
        let (leader, term) = {
            let m = rx.borrow_and_update();
            (m.current_leader, m.current_term)
        };
        if last != Some((leader, term)) && (leader.is_some() || last.is_some()) {
            let Some(inner) = weak.upgrade() else { return };
            let who = leader
                .and_then(|l| inner.name_of(l))
                .unwrap_or_else(|| "none".into());
            if last.map(|l| l.0) != Some(leader) {
                inner.ctx.timeline.record(
                    "consensus",
                    &inner.me,
                    format!("leader is {who} (term {term})"),
                );
            }
            last = Some((leader, term));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl ConsensusPlugin {
    /// What the log replay found at start.
    pub fn recovery(&self) -> &LogRecovery {
        &self.inner.recovery
    }
}
