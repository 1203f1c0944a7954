//! The runtime's own service, `sys`, on every node: ping (used to prove identities), cluster
//! status, fault-injection rules, and an echo used by the RPC benchmark.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::ClusterConfig;
use crate::dashboard::NodeDashboard;
use crate::faults::{FaultCommand, FaultRules, Faults};
use crate::membership::{MemberState, MembershipHandle};
use crate::plugin::{PluginHost, PluginStatus};
use crate::process::Usage;
use crate::rpc::{Caller, Rpc, RpcError};
use crate::timeline::Timeline;

crate::plugin_api!(SysApi, "sys", SysRequest, SysResponse);

/// Requests to `sys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SysRequest {
    /// Who are you?
    Ping,
    /// This node's view of the cluster.
    Status,
    /// Change this node's fault rules.
    Chaos(FaultCommand),
    /// The fault rules in force on this node.
    ChaosRules,
    /// Send the bytes back (benchmarks).
    Echo(Vec<u8>),
    /// Counts, panels and fault rules for the dashboard.
    Dashboard,
    /// Put a line on this node's timeline (chaos scripts say what they do, e.g. "kill n3").
    Note(String),
    /// This process's resident memory and CPU time.
    Usage,
}

/// Answers from `sys`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SysResponse {
    /// Node id and generation.
    Pong {
        /// Node id.
        node: String,
        /// Generation.
        generation: u64,
    },
    /// Cluster status.
    Status(ClusterStatus),
    /// Fault rules.
    Rules(FaultRules),
    /// Echoed bytes.
    Echo(Vec<u8>),
    /// This node's dashboard figures.
    Dashboard(NodeDashboard),
    /// Done.
    Ok,
    /// Resident memory and CPU time (`None` without procfs).
    Usage(Option<Usage>),
}

/// One row of `dsys cluster status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: String,
    /// `alive`, `joining`, `dead`, `left`, or `unseen` (configured but never heard from).
    pub state: String,
    /// Region label.
    pub region: String,
    /// Generation (start time in ms), 0 when unseen.
    pub generation: u64,
    /// QUIC address.
    pub rpc_addr: Option<String>,
    /// HTTP address.
    pub http_addr: Option<String>,
    /// Plugins it runs.
    pub plugins: Vec<String>,
    /// Total plugin restarts.
    pub restarts: u32,
    /// Plugins marked failed.
    pub failed: Vec<String>,
    /// Its resident memory and CPU time, when it was asked (the answering node fills its
    /// own; `dsys cluster status` asks the others).
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// The answer to `dsys cluster status`, from one node's point of view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    /// Every member it knows of, plus configured nodes it never heard from.
    pub members: Vec<MemberStatus>,
    /// Ring members.
    pub ring: Vec<String>,
    /// The answering node's plugins: (name, status, restarts).
    pub plugins: Vec<(String, PluginStatus, u32)>,
}

pub(crate) struct SysService {
    pub(crate) me: String,
    pub(crate) generation: u64,
    pub(crate) config: Arc<ClusterConfig>,
    pub(crate) membership: MembershipHandle,
    pub(crate) faults: Arc<Faults>,
    pub(crate) host: Arc<PluginHost>,
    pub(crate) rpc: Rpc,
    pub(crate) timeline: Arc<Timeline>,
}

/// Longest timeline note accepted.
const MAX_NOTE: usize = 300;

impl SysService {
    pub(crate) fn handle(&self, caller: &Caller, req: SysRequest) -> Result<SysResponse, RpcError> {
        if !caller.may_write() && matches!(req, SysRequest::Chaos(_) | SysRequest::Note(_)) {
            return Err(RpcError::Unauthorized(
                "chaos and notes need the admin certificate".into(),
            ));
        }
        Ok(match req {
            SysRequest::Ping => SysResponse::Pong {
                node: self.me.clone(),
                generation: self.generation,
            },
            SysRequest::Status => {
                // Only here: the dashboard builds status() every second and does not use it.
                let mut st = self.status();
                if let Some(m) = st.members.iter_mut().find(|m| m.id == self.me) {
                    m.usage = crate::process::usage();
                }
                SysResponse::Status(st)
            }
            SysRequest::Chaos(cmd) => {
                tracing::warn!(?cmd, "fault injection changed");
                let what = format!("{cmd:?}");
                self.faults.apply(cmd).map_err(RpcError::Refused)?;
                self.timeline.record("chaos", &self.me, what);
                SysResponse::Rules(self.faults.rules())
            }
            SysRequest::ChaosRules => SysResponse::Rules(self.faults.rules()),
            SysRequest::Echo(b) => SysResponse::Echo(b),
            SysRequest::Dashboard => {
                let (requests, errors) = self.host.request_counts();
                SysResponse::Dashboard(NodeDashboard {
                    node: self.me.clone(),
                    requests,
                    errors,
                    panels: self.host.panels(),
                    faults: self.faults.rules(),
                    usage: crate::process::usage(),
                })
            }
            SysRequest::Note(text) => {
                if text.is_empty() || text.len() > MAX_NOTE {
                    return Err(RpcError::refused(format!("a note is 1..={MAX_NOTE} bytes")));
                }
                let who = match caller {
                    Caller::Node(n) => n.as_str(),
                    Caller::Client | Caller::Reader => "client",
                };
                self.timeline
                    .record("chaos", &self.me, format!("{who}: {text}"));
                SysResponse::Ok
            }
            SysRequest::Usage => SysResponse::Usage(crate::process::usage()),
        })
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let view = self.membership.view();
        let mut members: Vec<MemberStatus> = view
            .members
            .values()
            .map(|m| MemberStatus {
                id: m.id.clone(),
                state: match m.state {
                    MemberState::Alive => "alive",
                    MemberState::Joining => "joining",
                    MemberState::Dead => "dead",
                    MemberState::Left => "left",
                }
                .to_string(),
                region: m.region.clone(),
                generation: m.generation,
                rpc_addr: m.rpc_addr.map(|a| a.to_string()),
                http_addr: m.http_addr.map(|a| a.to_string()),
                plugins: m.plugins.clone(),
                restarts: m.restarts.values().sum(),
                failed: m.failed.clone(),
                usage: None,
            })
            .collect();
        for (id, n) in &self.config.nodes {
            if !view.members.contains_key(id) {
                members.push(MemberStatus {
                    id: id.clone(),
                    state: "unseen".into(),
                    region: n.region.clone(),
                    generation: 0,
                    rpc_addr: Some(n.rpc_addr().to_string()),
                    http_addr: Some(n.http_addr().to_string()),
                    plugins: vec![],
                    restarts: 0,
                    failed: vec![],
                    usage: None,
                });
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        ClusterStatus {
            node: self.me.clone(),
            members,
            ring: self.membership.ring().nodes().to_vec(),
            plugins: self.host.statuses(),
        }
    }
}
