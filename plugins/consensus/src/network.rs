//! Raft's network over the runtime's RPC: each Raft message is a [`ConsensusRequest`] sent
//! with `Rpc::call` to the consensus plugin on the target node (QUIC, mutual TLS, the
//! transport's fault injection applies). A node's Raft id maps to its name through the
//! membership's `BasicNode { addr: name }`.

use dsys_runtime::{Metrics, Rpc, RpcError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, EntryPayload};

use crate::api::{ConsensusApi, ConsensusRequest, ConsensusResponse};
use crate::state::{Command, TxnOp};
use crate::types::{Entry, TypeConfig};

/// Most estimated bytes of entries in one AppendEntries (the first entry always goes, up to
/// the transport's frame cap); a longer range is sent in parts (`PartialSuccess`). openraft 0.9
/// gives an AppendEntries the heartbeat interval (100 ms) to be sent, written and fsynced by the
/// follower; 8 MiB payloads missed it on a loaded machine, were sent again in full, and the
/// follower never caught up (replication livelock, then elections). 256 KiB keeps one round
/// well inside the deadline.
pub(crate) const MAX_APPEND_BYTES: usize = 256 << 10;

/// Counter of the entries a leader replicated, by how (`sent` / `by_reference`).
pub(crate) const REPLICATED: &str = "dsys_raft_replicated_entries_total";

/// Builds connections.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub(crate) rpc: Rpc,
    pub(crate) metrics: Arc<Metrics>,
}

/// A "connection" to one peer (one per replication stream): its name, the RPC handle, and
/// whether entries are still offered by reference (see [`Conn::append_entries`]).
#[derive(Debug)]
pub(crate) struct Conn {
    rpc: Rpc,
    metrics: Arc<Metrics>,
    target: u64,
    name: String,
    by_reference: bool,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Conn {
        Conn {
            rpc: self.rpc.clone(),
            metrics: self.metrics.clone(),
            target,
            name: node.addr.clone(),
            by_reference: true,
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

fn net_err<E: std::error::Error>(e: RpcError) -> RpcErr<E> {
    match e {
        RpcError::Unreachable(_) | RpcError::PluginUnavailable(_) => {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

/// Rough encoded size of a command (keys and values dominate).
pub(crate) fn cmd_size(c: &Command) -> usize {
    let ops = |ops: &[TxnOp]| -> usize {
        ops.iter()
            .map(|o| match o {
                TxnOp::Put { key, value, .. } => key.len() + value.len() + 16,
                TxnOp::Delete { key, .. } | TxnOp::Get { key, .. } => key.len() + 8,
            })
            .sum()
    };
    match c {
        Command::Put { key, value, .. } => key.len() + value.len(),
        Command::Delete { key, .. } => key.len(),
        Command::Txn(t) => {
            ops(&t.success)
                + ops(&t.failure)
                + t.compares
                    .iter()
                    .map(|c| {
                        c.key.len()
                            + 32
                            + match &c.target {
                                crate::state::CompareTarget::Value(v) => v.len(),
                                _ => 0,
                            }
                    })
                    .sum::<usize>()
        }
        Command::LeaseExpire { ids } => ids.len() * 8,
        Command::Once { cmd, .. } => 24 + cmd_size(cmd),
        Command::Batch(cmds) => cmds.iter().map(|c| 8 + cmd_size(c)).sum(),
        _ => 16,
    }
}

/// Rough encoded size of an entry.
pub(crate) fn approx_size(e: &Entry) -> usize {
    64 + match &e.payload {
        EntryPayload::Normal(c) => cmd_size(c),
        EntryPayload::Membership(m) => m.nodes().map(|(_, n)| n.addr.len() + 16).sum(),
        EntryPayload::Blank => 0,
    }
}

impl Conn {
    /// Send one Raft message (`what`, for errors) and unpack the answer `pick` expects; it
    /// hands any other answer back, which is refused as malformed.
    async fn call<T, E: std::error::Error>(
        &self,
        what: &str,
        req: ConsensusRequest,
        ttl: Duration,
        pick: impl FnOnce(ConsensusResponse) -> Result<Result<T, RaftError<u64, E>>, ConsensusResponse>,
    ) -> Result<T, RpcErr<E>> {
        let r = self
            .rpc
            .call_with_timeout::<ConsensusApi>(&self.name, &req, ttl)
            .await
            .map_err(net_err)?;
        match pick(r) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(other) => Err(RPCError::Network(NetworkError::new(&RpcError::Malformed(
                format!("unexpected answer to {what}: {other:?}"),
            )))),
        }
    }

    async fn send_append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let req = ConsensusRequest::AppendEntries(rpc);
        self.call("append_entries", req, ttl, |r| match r {
            ConsensusResponse::AppendEntries(r) => Ok(r),
            other => Err(other),
        })
        .await
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    /// A new leader finds where a follower's log matches its own by a binary search whose
    /// every probe carries up to `max_payload_entries` entries, in parts of
    /// [`MAX_APPEND_BYTES`]: after a write-heavy run, thousands of 256 KiB batches crossed
    /// the network, all of which the follower already had, and the first commit of the new
    /// term (the failover) waited seconds for them. So entries of earlier terms are first
    /// offered by reference: an AppendEntries whose `prev_log_id` is the last of them and that
    /// carries none. A follower that holds that log id holds every entry before it, identical
    /// to the leader's (Raft's log matching property); then only the entries of this term
    /// are sent. A follower that declines gets them all, and this stream offers no more
    /// (it is catching up). Entries of the leader's own term, the steady state, are never
    /// offered: a follower can only have them from this stream.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        let deadline = Instant::now() + option.hard_ttl();
        let term = rpc.vote.leader_id().term;
        let old = rpc
            .entries
            .iter()
            .take_while(|e| e.log_id.leader_id.term < term)
            .count();
        let mut offered = false;
        if self.by_reference && old > 0 {
            let have = rpc.entries[old - 1].log_id;
            let offer = AppendEntriesRequest {
                vote: rpc.vote,
                prev_log_id: Some(have),
                leader_commit: rpc.leader_commit,
                entries: Vec::new(),
            };
            let t0 = Instant::now();
            let r = self.send_append(offer, option.hard_ttl()).await?;
            tracing::debug!(to = %self.name, entries = old, answer = ?r, elapsed = ?t0.elapsed(), "entries offered by reference");
            match r {
                AppendEntriesResponse::Success => {
                    self.metrics
                        .add(REPLICATED, &[("how", "by_reference")], old as u64);
                    if old == rpc.entries.len() {
                        return Ok(AppendEntriesResponse::Success);
                    }
                    rpc.entries.drain(..old);
                    rpc.prev_log_id = Some(have);
                    offered = true;
                }
                r @ AppendEntriesResponse::HigherVote(_) => return Ok(r),
                AppendEntriesResponse::Conflict | AppendEntriesResponse::PartialSuccess(_) => {
                    self.by_reference = false
                }
            }
        }
        // Too big for one frame: send the entries that fit and answer `PartialSuccess`, and
        // openraft sends the rest next.
        let mut total = 0;
        let fits = rpc
            .entries
            .iter()
            .enumerate()
            .position(|(i, e)| {
                total += approx_size(e);
                total > MAX_APPEND_BYTES && i > 0
            })
            .unwrap_or(rpc.entries.len());
        let partial = fits < rpc.entries.len();
        rpc.entries.truncate(fits);
        let last = rpc.entries.last().map(|e| e.log_id);
        let ttl = deadline.saturating_duration_since(Instant::now());
        let r = self.send_append(rpc, ttl).await?;
        if fits > 0 {
            self.metrics
                .add(REPLICATED, &[("how", "sent")], fits as u64);
        }
        match r {
            AppendEntriesResponse::Success if partial => {
                Ok(AppendEntriesResponse::PartialSuccess(last))
            }
            // The follower had just confirmed the offered entry: a conflict right after it
            // would be a conflict at a later point than the request's own `prev_log_id`,
            // which openraft must not take as one. Let it retry.
            AppendEntriesResponse::Conflict if offered => {
                Err(RPCError::Network(NetworkError::new(&RpcError::Malformed(
                    "follower lost an entry it had just confirmed".into(),
                ))))
            }
            r => Ok(r),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let req = ConsensusRequest::InstallSnapshot(rpc);
        self.call("install_snapshot", req, option.hard_ttl(), |r| match r {
            ConsensusResponse::InstallSnapshot(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        let req = ConsensusRequest::Vote(rpc);
        self.call("vote", req, option.hard_ttl(), |r| match r {
            ConsensusResponse::Vote(r) => Ok(r),
            other => Err(other),
        })
        .await
    }
}
