//! Wire types of the `consensus` plugin and the `dsys raft` subcommand.

use dsys_runtime::Render;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::state::{
    Compare, CompareOp, CompareTarget, Event, EventKind, KeyValue, OpResult, RequestId, Txn, TxnOp,
};
use crate::types::TypeConfig;

dsys_runtime::plugin_api!(
    ConsensusApi,
    "consensus",
    ConsensusRequest,
    ConsensusResponse
);

/// Longest key.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most compares plus operations in one transaction.
pub const MAX_TXN_OPS: usize = 128;
/// Most key and value bytes in one transaction.
pub const MAX_TXN_BYTES: usize = 2 * 1024 * 1024;
/// Most keys one read returns.
pub const MAX_RANGE: u32 = 10_000;
/// Most events one watch poll returns.
pub const MAX_WATCH_EVENTS: u32 = 10_000;
/// Longest wait of one watch poll.
pub const MAX_WATCH_WAIT_MS: u64 = 30_000;
/// Lease TTL bounds.
pub const MIN_TTL_MS: u64 = 100;
/// Lease TTL bounds.
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

/// Requests. The first group is for clients (any node answers, forwarding to the leader);
/// the rest are between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ConsensusRequest {
    /// This node's view of the Raft group.
    Status,
    /// Put a key (optionally attached to a lease).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Lease id.
        lease: Option<u64>,
    },
    /// Read a key or a prefix.
    Get {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// Serve from this node's state machine without asking the leader (may be stale).
        serializable: bool,
        /// Most keys returned.
        limit: u32,
    },
    /// Delete a key or a prefix.
    Delete {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
    },
    /// Compare, then one branch, atomically.
    Txn(Txn),
    /// Events on a key/prefix from a revision on; waits up to `wait_ms` for the first one.
    Watch {
        /// Key or prefix.
        key: String,
        /// Treat `key` as a prefix.
        prefix: bool,
        /// First revision wanted (0: from the next revision).
        from_revision: u64,
        /// Long-poll wait.
        wait_ms: u64,
        /// Most events.
        limit: u32,
    },
    /// Grant a lease.
    LeaseGrant {
        /// TTL in milliseconds.
        ttl_ms: u64,
    },
    /// Keep a lease alive for another TTL.
    LeaseKeepAlive {
        /// Lease id.
        id: u64,
    },
    /// Revoke a lease, deleting its keys.
    LeaseRevoke {
        /// Lease id.
        id: u64,
    },
    /// Make a node a voter.
    AddVoter {
        /// Node id (as in cluster.toml).
        node: String,
    },
    /// Remove a voter.
    RemoveVoter {
        /// Node id.
        node: String,
    },
    /// A client's write carrying the client's own request id (`dsys raft` sends its writes
    /// so): sent again, to the same or another node, after a timeout whose outcome it cannot
    /// know, it is still applied at most once, and the repeat answers the first result.
    Tagged {
        /// The id, chosen by the client: a random `client`, `seq` and `floor` 1 for a
        /// one-shot client.
        id: RequestId,
        /// The write (put, delete, txn, lease grant or revoke).
        req: Box<ConsensusRequest>,
    },
    /// A client request forwarded by another node towards the leader.
    Forwarded {
        /// Forwarding hops so far.
        hops: u8,
        /// The request id the first node gave a write (kept across re-forwards, so a write
        /// sent again after a leader change is applied once).
        id: Option<RequestId>,
        /// The request.
        req: Box<ConsensusRequest>,
    },
    /// Raft pre-vote (between voters, before a real election): would the receiver vote for a
    /// candidate with this log? Yes only if it has not heard from a leader for a while and
    /// the log is at least as up to date as its own. Nothing changes on either side, so a
    /// node that cannot win (stale log, cut off, just restarted) never raises the term.
    PreVote {
        /// The candidate's last log id.
        last_log_id: Option<openraft::LogId<u64>>,
    },
    /// Raft: append entries (leader to follower).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft: request a vote.
    Vote(VoteRequest<u64>),
    /// Raft: one chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

/// A node's view of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This node.
    pub node: String,
    /// Leader, follower, candidate or learner.
    pub state: String,
    /// The leader it knows.
    pub leader: Option<String>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Committed index.
    pub committed: Option<u64>,
    /// Applied index.
    pub applied: Option<u64>,
    /// Index covered by the last snapshot.
    pub snapshot: Option<u64>,
    /// Index up to which the log was purged.
    pub purged: Option<u64>,
    /// Voters.
    pub voters: Vec<String>,
    /// Learners (non-voting members).
    pub learners: Vec<String>,
    /// State-machine revision applied here.
    pub revision: u64,
    /// Keys here.
    pub keys: u64,
    /// Leases here.
    pub leases: u64,
    /// First LSN still in this node's consensus WAL (grows as segments are released).
    pub wal_first_lsn: u64,
    /// Last LSN in the WAL.
    pub wal_last_lsn: u64,
    /// The WAL checkpoint: replay at start begins here (set when the log is compacted).
    pub wal_checkpoint_lsn: u64,
    /// Pre-vote rounds this node started since it started (it heard from no leader for its
    /// election timeout).
    pub pre_votes: u64,
    /// Elections this node started (pre-votes it won).
    pub elections: u64,
}

/// Answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum ConsensusResponse {
    /// Status.
    Status(RaftStatus),
    /// A put, committed.
    Put {
        /// Revision of the put.
        revision: u64,
        /// The key before.
        prev: Option<KeyValue>,
    },
    /// Keys read.
    Range {
        /// Keys.
        kvs: Vec<KeyValue>,
        /// More keys matched than returned.
        more: bool,
        /// Revision of the state read.
        revision: u64,
    },
    /// A delete, committed.
    Deleted {
        /// Keys deleted.
        deleted: u64,
        /// Revision after it.
        revision: u64,
    },
    /// A transaction, committed.
    Txn {
        /// Whether the compares held.
        succeeded: bool,
        /// Revision after it.
        revision: u64,
        /// Results of the branch taken.
        results: Vec<OpResult>,
    },
    /// Watch events.
    Events {
        /// Events, in revision order.
        events: Vec<Event>,
        /// Ask from this revision next.
        next_revision: u64,
    },
    /// A lease granted.
    LeaseGranted {
        /// Id.
        id: u64,
        /// TTL in ms.
        ttl_ms: u64,
    },
    /// A lease kept alive.
    LeaseKept {
        /// Id.
        id: u64,
        /// It lives this long from now (ms).
        ttl_ms: u64,
    },
    /// A lease revoked.
    LeaseRevoked {
        /// Id.
        id: u64,
        /// Keys deleted.
        deleted: u64,
        /// Revision after it.
        revision: u64,
    },
    /// Membership after a change.
    Membership {
        /// Voters.
        voters: Vec<String>,
        /// Learners.
        learners: Vec<String>,
    },
    /// Pre-vote answer.
    PreVote {
        /// Whether the receiver would vote for the candidate.
        granted: bool,
    },
    /// Raft reply.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// Raft reply.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// Raft reply.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn kv_line(kv: &KeyValue) -> String {
    format!(
        "{} = {}  (create_rev {}, mod_rev {}, version {}{})",
        kv.key,
        kv.value,
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease.map(|l| format!(", lease {l}")).unwrap_or_default()
    )
}

/// One watch event as a line of text.
pub fn event_line(e: &Event) -> String {
    match e.kind {
        EventKind::Put => format!("[rev {}] PUT {} = {}", e.revision, e.kv.key, e.kv.value),
        EventKind::Delete => format!("[rev {}] DELETE {}", e.revision, e.kv.key),
    }
}

impl Render for ConsensusResponse {
    fn human(&self) -> String {
        match self {
            ConsensusResponse::Status(s) => format!(
                "node        {}\nstate       {}\nleader      {}\nterm        {}\nlast index  {}\ncommitted   {}\napplied     {}\nsnapshot    {}\npurged      {}\nvoters      {}\nlearners    {}\nrevision    {}\nkeys        {}\nleases      {}\nwal         LSN {}..={}, checkpoint {}\nelections   {} started, after {} pre-votes\n",
                s.node,
                s.state,
                s.leader.as_deref().unwrap_or("-"),
                s.term,
                opt(s.last_log_index),
                opt(s.committed),
                opt(s.applied),
                opt(s.snapshot),
                opt(s.purged),
                s.voters.join(", "),
                if s.learners.is_empty() { "-".into() } else { s.learners.join(", ") },
                s.revision,
                s.keys,
                s.leases,
                s.wal_first_lsn,
                s.wal_last_lsn,
                s.wal_checkpoint_lsn,
                s.elections,
                s.pre_votes,
            ),
            ConsensusResponse::Put { revision, prev } => match prev {
                Some(p) => format!("OK revision {revision} (was {})", p.value),
                None => format!("OK revision {revision}"),
            },
            ConsensusResponse::Range {
                kvs,
                more,
                revision,
            } => {
                if kvs.is_empty() {
                    return format!("(not found) at revision {revision}");
                }
                let mut s: String = kvs.iter().map(|kv| kv_line(kv) + "\n").collect();
                if *more {
                    s.push_str("... more keys match (raise --limit)\n");
                }
                s
            }
            ConsensusResponse::Deleted { deleted, revision } => {
                format!("deleted {deleted} key(s), revision {revision}")
            }
            ConsensusResponse::Txn {
                succeeded,
                revision,
                results,
            } => {
                let mut s = format!(
                    "{} at revision {revision}\n",
                    if *succeeded { "SUCCESS" } else { "FAILURE" }
                );
                for r in results {
                    match r {
                        OpResult::Put { .. } => s.push_str("put OK\n"),
                        OpResult::Delete { deleted } => {
                            s.push_str(&format!("deleted {deleted}\n"))
                        }
                        OpResult::Get { kvs } if kvs.is_empty() => s.push_str("(not found)\n"),
                        OpResult::Get { kvs } => {
                            for kv in kvs {
                                s.push_str(&kv_line(kv));
                                s.push('\n');
                            }
                        }
                    }
                }
                s
            }
            ConsensusResponse::Events { events, .. } => {
                events.iter().map(|e| event_line(e) + "\n").collect()
            }
            ConsensusResponse::LeaseGranted { id, ttl_ms } => {
                format!("lease {id} granted with TTL {} ms", ttl_ms)
            }
            ConsensusResponse::LeaseKept { id, ttl_ms } => {
                format!("lease {id} kept alive for {ttl_ms} ms")
            }
            ConsensusResponse::LeaseRevoked { id, deleted, .. } => {
                format!("lease {id} revoked, {deleted} key(s) deleted")
            }
            ConsensusResponse::Membership { voters, learners } => format!(
                "voters: {}\nlearners: {}",
                voters.join(", "),
                if learners.is_empty() { "-".into() } else { learners.join(", ") }
            ),
            other => format!("{other:?}"),
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            // A failed compare is an answer, but scripts want to branch on it.
            ConsensusResponse::Txn {
                succeeded: false, ..
            } => 1,
            _ => 0,
        }
    }
}

/// `dsys raft ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum RaftCommand {
    /// Leader, term, commit/applied index and members, as this node sees them.
    Status,
    /// Put a key (committed through the leader).
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
        /// Attach to this lease.
        #[arg(long)]
        lease: Option<u64>,
    },
    /// Read a key (linearizable unless --serializable).
    Get {
        /// Key.
        key: String,
        /// Read this node's state machine, without asking the leader (may be stale).
        #[arg(long)]
        serializable: bool,
        /// Read every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Most keys returned.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Delete a key.
    Del {
        /// Key.
        key: String,
        /// Delete every key starting with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// A transaction: if every --if-* holds, run the --then-* operations, else the --else-* ones.
    Txn(TxnArgs),
    /// Stream events on a key until Ctrl-C.
    Watch {
        /// Key.
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (default: from now).
        #[arg(long, default_value_t = 0)]
        from_rev: u64,
    },
    /// Leases: keys attached to one are deleted when it expires or is revoked.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Make a node a voter (it is added as a learner and caught up first).
    AddVoter {
        /// Node id.
        node: String,
    },
    /// Remove a voter.
    RemoveVoter {
        /// Node id.
        node: String,
    },
}

/// `dsys raft lease ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum LeaseCommand {
    /// Grant a lease of TTL seconds.
    Grant {
        /// Seconds.
        ttl: u64,
    },
    /// Keep a lease alive for another TTL.
    Keepalive {
        /// Lease id.
        id: u64,
    },
    /// Revoke a lease and delete its keys.
    Revoke {
        /// Lease id.
        id: u64,
    },
}

/// `dsys raft txn` arguments: conditions `K=V` and operations.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TxnArgs {
    /// Condition: KEY's mod revision is REV (KEY=REV; 0 means absent).
    #[arg(long = "if-mod-rev", value_name = "KEY=REV")]
    pub if_mod_rev: Vec<String>,
    /// Condition: KEY's create revision is REV.
    #[arg(long = "if-create-rev", value_name = "KEY=REV")]
    pub if_create_rev: Vec<String>,
    /// Condition: KEY's version is N (0 means absent).
    #[arg(long = "if-version", value_name = "KEY=N")]
    pub if_version: Vec<String>,
    /// Condition: KEY's value is V.
    #[arg(long = "if-value", value_name = "KEY=V")]
    pub if_value: Vec<String>,
    /// On success: put KEY=V.
    #[arg(long = "then-put", value_name = "KEY=V")]
    pub then_put: Vec<String>,
    /// On success: delete KEY.
    #[arg(long = "then-del", value_name = "KEY")]
    pub then_del: Vec<String>,
    /// On success: read KEY.
    #[arg(long = "then-get", value_name = "KEY")]
    pub then_get: Vec<String>,
    /// On failure: put KEY=V.
    #[arg(long = "else-put", value_name = "KEY=V")]
    pub else_put: Vec<String>,
    /// On failure: delete KEY.
    #[arg(long = "else-del", value_name = "KEY")]
    pub else_del: Vec<String>,
    /// On failure: read KEY.
    #[arg(long = "else-get", value_name = "KEY")]
    pub else_get: Vec<String>,
}

fn split_kv(s: &str, what: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{what}: expected KEY=VALUE, got `{s}`")),
    }
}

fn split_num(s: &str, what: &str) -> Result<(String, u64), String> {
    let (k, v) = split_kv(s, what)?;
    let n = v
        .parse::<u64>()
        .map_err(|_| format!("{what}: `{v}` is not a non-negative integer"))?;
    Ok((k, n))
}

impl TxnArgs {
    /// The transaction these arguments describe.
    pub fn to_txn(&self) -> Result<Txn, String> {
        let mut t = Txn::default();
        let cmp = |key: String, target: CompareTarget| Compare {
            key,
            op: CompareOp::Equal,
            target,
        };
        for s in &self.if_mod_rev {
            let (k, n) = split_num(s, "--if-mod-rev")?;
            t.compares.push(cmp(k, CompareTarget::ModRevision(n)));
        }
        for s in &self.if_create_rev {
            let (k, n) = split_num(s, "--if-create-rev")?;
            t.compares.push(cmp(k, CompareTarget::CreateRevision(n)));
        }
        for s in &self.if_version {
            let (k, n) = split_num(s, "--if-version")?;
            t.compares.push(cmp(k, CompareTarget::Version(n)));
        }
        for s in &self.if_value {
            let (k, v) = split_kv(s, "--if-value")?;
            t.compares.push(cmp(k, CompareTarget::Value(v)));
        }
        let ops = |puts: &[String], dels: &[String], gets: &[String], flag: &str| {
            let mut v = Vec::new();
            for s in puts {
                let (key, value) = split_kv(s, &format!("--{flag}-put"))?;
                v.push(TxnOp::Put {
                    key,
                    value,
                    lease: None,
                });
            }
            for k in dels {
                v.push(TxnOp::Delete {
                    key: k.clone(),
                    prefix: false,
                });
            }
            for k in gets {
                v.push(TxnOp::Get {
                    key: k.clone(),
                    prefix: false,
                });
            }
            Ok::<_, String>(v)
        };
        t.success = ops(&self.then_put, &self.then_del, &self.then_get, "then")?;
        t.failure = ops(&self.else_put, &self.else_del, &self.else_get, "else")?;
        if t.success.is_empty() && t.failure.is_empty() {
            return Err("a transaction needs at least one --then-* or --else-* operation".into());
        }
        Ok(t)
    }
}

impl RaftCommand {
    /// The request this command sends (`watch` sends it repeatedly; see
    /// [`RaftCommand::watch_args`]).
    pub fn request(&self) -> Result<ConsensusRequest, String> {
        let req = self.plain_request()?;
        // A write carries its own id, so the CLI's retry on the next endpoint (after a
        // timeout) cannot apply it twice.
        Ok(if crate::is_tagged_write(&req) {
            ConsensusRequest::Tagged {
                id: RequestId {
                    client: rand::random(),
                    seq: 1,
                    floor: 1,
                },
                req: Box::new(req),
            }
        } else {
            req
        })
    }

    fn plain_request(&self) -> Result<ConsensusRequest, String> {
        Ok(match self {
            RaftCommand::Status => ConsensusRequest::Status,
            RaftCommand::Put { key, value, lease } => ConsensusRequest::Put {
                key: key.clone(),
                value: value.clone(),
                lease: *lease,
            },
            RaftCommand::Get {
                key,
                serializable,
                prefix,
                limit,
            } => ConsensusRequest::Get {
                key: key.clone(),
                prefix: *prefix,
                serializable: *serializable,
                limit: *limit,
            },
            RaftCommand::Del { key, prefix } => ConsensusRequest::Delete {
                key: key.clone(),
                prefix: *prefix,
            },
            RaftCommand::Txn(a) => ConsensusRequest::Txn(a.to_txn()?),
            RaftCommand::Watch {
                key,
                prefix,
                from_rev,
            } => ConsensusRequest::Watch {
                key: key.clone(),
                prefix: *prefix,
                from_revision: *from_rev,
                wait_ms: 0,
                limit: 1000,
            },
            RaftCommand::Lease(LeaseCommand::Grant { ttl }) => ConsensusRequest::LeaseGrant {
                ttl_ms: ttl.saturating_mul(1000),
            },
            RaftCommand::Lease(LeaseCommand::Keepalive { id }) => {
                ConsensusRequest::LeaseKeepAlive { id: *id }
            }
            RaftCommand::Lease(LeaseCommand::Revoke { id }) => {
                ConsensusRequest::LeaseRevoke { id: *id }
            }
            RaftCommand::AddVoter { node } => ConsensusRequest::AddVoter { node: node.clone() },
            RaftCommand::RemoveVoter { node } => {
                ConsensusRequest::RemoveVoter { node: node.clone() }
            }
        })
    }

    /// For `watch`: key, prefix flag and starting revision.
    pub fn watch_args(&self) -> Option<(String, bool, u64)> {
        match self {
            RaftCommand::Watch {
                key,
                prefix,
                from_rev,
            } => Some((key.clone(), *prefix, *from_rev)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txn_args_parse_and_refuse() {
        let a = TxnArgs {
            if_mod_rev: vec!["k=3".into()],
            if_value: vec!["x=a=b".into()],
            then_put: vec!["k=v".into()],
            else_get: vec!["k".into()],
            ..TxnArgs::default()
        };
        let t = a.to_txn().expect("txn");
        assert_eq!(t.compares.len(), 2);
        assert_eq!(t.compares[1].target, CompareTarget::Value("a=b".into()));
        assert_eq!(t.success.len(), 1);
        assert_eq!(t.failure.len(), 1);
        let bad = TxnArgs {
            if_mod_rev: vec!["k=abc".into()],
            then_put: vec!["k=v".into()],
            ..TxnArgs::default()
        };
        assert!(matches!(bad.to_txn(), Err(e) if e.contains("not a non-negative integer")));
        let bad = TxnArgs {
            then_put: vec!["=v".into()],
            ..TxnArgs::default()
        };
        assert!(bad.to_txn().is_err());
        assert!(TxnArgs::default().to_txn().is_err());
    }
}
