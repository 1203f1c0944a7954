//! Raft's network over the runtime's RPC: each Raft message is a [`ConsensusRequest`] sent
//! with `Rpc::call` to the consensus plugin on the target node (QUIC, mutual TLS, the
//! transport's fault injection applies). A node's Raft id maps to its name through the
//! membership's `BasicNode { addr: name }`.

use dsys_runtime::{Rpc, RpcError};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
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
/// the transport's frame cap). openraft 0.9 gives an AppendEntries the heartbeat interval
/// (100 ms) to be sent, written and fsynced by the follower; 8 MiB payloads missed it on a
/// loaded machine, were sent again in full, and the follower never caught up (replication
/// livelock, then elections). 256 KiB keeps one round well inside the deadline.
pub(crate) const MAX_APPEND_BYTES: usize = 256 << 10;

/// Builds connections.
#[derive(Debug, Clone)]
pub(crate) struct Network {
    pub(crate) rpc: Rpc,
}

/// A "connection" to one peer: its name, and the RPC handle.
#[derive(Debug)]
pub(crate) struct Conn {
    rpc: Rpc,
    target: u64,
    name: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Conn {
        Conn {
            rpc: self.rpc.clone(),
            target,
            name: node.addr.clone(),
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

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcErr> {
        // Too big for one frame: tell openraft how many entries fit, and it splits.
        let mut total = 0;
        for (i, e) in rpc.entries.iter().enumerate() {
            total += approx_size(e);
            if total > MAX_APPEND_BYTES && i > 0 {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(i as u64),
                ));
            }
        }
        let r = self
            .rpc
            .call_with_timeout::<ConsensusApi>(
                &self.name,
                &ConsensusRequest::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(net_err)?;
        match r {
            ConsensusResponse::AppendEntries(Ok(r)) => Ok(r),
            ConsensusResponse::AppendEntries(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(RPCError::Network(NetworkError::new(&RpcError::Malformed(
                format!("unexpected answer to append_entries: {other:?}"),
            )))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcErr<InstallSnapshotError>> {
        let r = self
            .rpc
            .call_with_timeout::<ConsensusApi>(
                &self.name,
                &ConsensusRequest::InstallSnapshot(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(net_err)?;
        match r {
            ConsensusResponse::InstallSnapshot(Ok(r)) => Ok(r),
            ConsensusResponse::InstallSnapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(RPCError::Network(NetworkError::new(&RpcError::Malformed(
                format!("unexpected answer to install_snapshot: {other:?}"),
            )))),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcErr> {
        let r = self
            .rpc
            .call_with_timeout::<ConsensusApi>(
                &self.name,
                &ConsensusRequest::Vote(rpc),
                option.hard_ttl(),
            )
            .await
            .map_err(net_err)?;
        match r {
            ConsensusResponse::Vote(Ok(r)) => Ok(r),
            ConsensusResponse::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(RPCError::Network(NetworkError::new(&RpcError::Malformed(
                format!("unexpected answer to vote: {other:?}"),
            )))),
        }
    }
}
