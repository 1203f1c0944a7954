//! Wire types of the `election` plugin and the `dsys election` subcommand.

use std::time::Duration;

use dsys_runtime::{Render, RpcError};
use serde::{Deserialize, Serialize};

dsys_runtime::plugin_api!(ElectionApi, "election", ElectionRequest, ElectionResponse);

/// Longest candidate value.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Lease TTL bounds of a campaign.
pub const MIN_TTL_MS: u64 = 1_000;
/// Lease TTL bounds of a campaign.
pub const MAX_TTL_MS: u64 = 24 * 3600 * 1000;
/// Longest wait of one campaign or one observe poll.
pub const MAX_WAIT_MS: u64 = 600_000;

/// Requests (all from clients; any node serves them through its `consensus` plugin).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ElectionRequest {
    /// Stand in election `name` with `value`; answer once leader (or when `wait_ms` runs out,
    /// withdrawing). The serving node keeps the candidate's lease alive until `Resign` or
    /// until the node dies; leadership ends when the lease does.
    Campaign {
        /// Election name.
        name: String,
        /// What the leader announces (an address, an id).
        value: String,
        /// Lease TTL.
        ttl_ms: u64,
        /// How long to wait behind the leader and earlier candidates.
        wait_ms: u64,
    },
    /// The current leader (linearizable read).
    Leader {
        /// Election name.
        name: String,
    },
    /// Leader changes from revision `from_revision` on (0: the current leader, as a first
    /// change); waits up to `wait_ms` for one.
    Observe {
        /// Election name.
        name: String,
        /// First revision of interest (the `next_revision` of the previous answer).
        from_revision: u64,
        /// Long-poll wait.
        wait_ms: u64,
    },
    /// Give up leadership (or candidacy) of the term `term`.
    Resign {
        /// Election name.
        name: String,
        /// Term returned by the campaign.
        term: u64,
    },
}

/// A leader (or candidate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// Its value.
    pub value: String,
    /// Term: the create revision of its key. Strictly increasing from one leader to the
    /// next, so usable as a fencing token.
    pub term: u64,
    /// Node that campaigned for it.
    pub node: String,
    /// Lease holding it.
    pub lease: u64,
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ElectionResponse {
    /// This campaign leads.
    Elected {
        /// Election name.
        name: String,
        /// Term (fencing token).
        term: u64,
        /// Lease holding it.
        lease: u64,
    },
    /// The wait ended first; the candidacy was withdrawn.
    NotElected {
        /// Election name.
        name: String,
        /// Who leads.
        leader: Option<LeaderInfo>,
    },
    /// The leader.
    Leader {
        /// Election name.
        name: String,
        /// Leader, if any.
        leader: Option<LeaderInfo>,
        /// Candidates waiting behind it.
        candidates: u32,
    },
    /// Leader changes, oldest first (`None`: nobody led from then on).
    Observed {
        /// Changes.
        changes: Vec<Option<LeaderInfo>>,
        /// Ask from this revision next.
        next_revision: u64,
    },
    /// Resigned.
    Resigned {
        /// The term given up.
        term: u64,
    },
}

/// Refuse a bad election name.
pub fn check_name(name: &str) -> Result<(), RpcError> {
    if name.is_empty() || name.len() > 128 {
        return Err(RpcError::refused("election name must be 1..=128 bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(RpcError::refused(format!(
            "election name `{name}` has `{c}`: only ASCII letters, digits, `-`, `_`, `.` and `:` are allowed"
        )));
    }
    Ok(())
}

impl ElectionRequest {
    /// Refuse bad input before anything reaches consensus.
    pub fn validate(&self) -> Result<(), RpcError> {
        match self {
            ElectionRequest::Campaign {
                name,
                value,
                ttl_ms,
                wait_ms,
            } => {
                check_name(name)?;
                if value.len() > MAX_VALUE_BYTES {
                    return Err(RpcError::refused(format!(
                        "candidate value of {} bytes exceeds {MAX_VALUE_BYTES}",
                        value.len()
                    )));
                }
                if !(MIN_TTL_MS..=MAX_TTL_MS).contains(ttl_ms) {
                    return Err(RpcError::refused(format!(
                        "campaign TTL must be {MIN_TTL_MS}..={MAX_TTL_MS} ms, got {ttl_ms}"
                    )));
                }
                if *wait_ms > MAX_WAIT_MS {
                    return Err(RpcError::refused(format!(
                        "wait must be at most {MAX_WAIT_MS} ms, got {wait_ms}"
                    )));
                }
                Ok(())
            }
            ElectionRequest::Leader { name } => check_name(name),
            ElectionRequest::Observe { name, wait_ms, .. } => {
                check_name(name)?;
                if *wait_ms > dsys_plugin_consensus::api::MAX_WATCH_WAIT_MS {
                    return Err(RpcError::refused(format!(
                        "observe wait must be at most {} ms",
                        dsys_plugin_consensus::api::MAX_WATCH_WAIT_MS
                    )));
                }
                Ok(())
            }
            ElectionRequest::Resign { name, term } => {
                check_name(name)?;
                if *term == 0 {
                    return Err(RpcError::refused("a term is a revision, at least 1"));
                }
                Ok(())
            }
        }
    }
}

/// One leader as a line of text.
pub fn leader_line(name: &str, l: &Option<LeaderInfo>) -> String {
    match l {
        Some(l) => format!(
            "{name}: leader {} (term {}, node {}, lease {})",
            l.value, l.term, l.node, l.lease
        ),
        None => format!("{name}: no leader"),
    }
}

impl Render for ElectionResponse {
    fn human(&self) -> String {
        match self {
            // The term alone on the first line, so scripts can read it.
            ElectionResponse::Elected { name, term, lease } => {
                format!("{term}\n(elected leader of {name}: term {term}, lease {lease})")
            }
            ElectionResponse::NotElected { name, leader } => {
                format!("not elected; {}", leader_line(name, leader))
            }
            ElectionResponse::Leader {
                name,
                leader,
                candidates,
            } => format!(
                "{} ({candidates} candidate(s) waiting)",
                leader_line(name, leader)
            ),
            ElectionResponse::Observed { changes, .. } => changes
                .iter()
                .map(|l| leader_line("", l).trim_start_matches(": ").to_string() + "\n")
                .collect(),
            ElectionResponse::Resigned { term } => format!("resigned term {term}"),
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            ElectionResponse::NotElected { .. } => 1,
            ElectionResponse::Leader { leader: None, .. } => 1,
            _ => 0,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e} (e.g. 10s, 500ms, 2m)"))
}

/// `dsys election ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ElectionCommand {
    /// Stand in election NAME; blocks until leader and prints the term (a fencing token).
    /// The answering node keeps the leadership's lease alive until `resign` or its death.
    Campaign {
        /// Election name.
        name: String,
        /// Value announced while leading.
        #[arg(long)]
        value: String,
        /// Lease TTL: leadership ends this long after the last keep-alive.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        ttl: Duration,
        /// Give up (withdraw) after this long without winning.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// The current leader of NAME (exit 1 if none).
    Leader {
        /// Election name.
        name: String,
    },
    /// Print each leader of NAME as it changes, until Ctrl-C.
    Observe {
        /// Election name.
        name: String,
    },
    /// Give up the leadership (or candidacy) of TERM.
    Resign {
        /// Election name.
        name: String,
        /// Term printed by campaign.
        #[arg(long)]
        term: u64,
    },
}

impl ElectionCommand {
    /// The request this command sends (`observe` sends many: see
    /// [`ElectionCommand::observe_name`] and [`crate::observe`]).
    pub fn request(&self) -> Result<ElectionRequest, String> {
        let req = match self {
            ElectionCommand::Campaign {
                name,
                value,
                ttl,
                wait,
            } => ElectionRequest::Campaign {
                name: name.clone(),
                value: value.clone(),
                ttl_ms: ttl.as_millis() as u64,
                wait_ms: wait.as_millis() as u64,
            },
            ElectionCommand::Leader { name } => ElectionRequest::Leader { name: name.clone() },
            ElectionCommand::Observe { name } => ElectionRequest::Observe {
                name: name.clone(),
                from_revision: 0,
                wait_ms: 0,
            },
            ElectionCommand::Resign { name, term } => ElectionRequest::Resign {
                name: name.clone(),
                term: *term,
            },
        };
        req.validate().map_err(|e| e.to_string())?;
        Ok(req)
    }

    /// For `observe`: the election name.
    pub fn observe_name(&self) -> Option<&str> {
        match self {
            ElectionCommand::Observe { name } => Some(name),
            _ => None,
        }
    }

    /// The client deadline this command needs (a campaign may wait `--wait`).
    pub fn client_timeout(&self, default: Duration) -> Duration {
        match self {
            ElectionCommand::Campaign { wait, .. } => default.max(*wait + Duration::from_secs(10)),
            _ => default,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_builds_checked_requests() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(subcommand)]
            cmd: ElectionCommand,
        }
        let c =
            Cli::try_parse_from(["dsys", "campaign", "db", "--value", "n1:5432"]).expect("parse");
        assert!(matches!(
            c.cmd.request(),
            Ok(ElectionRequest::Campaign {
                ttl_ms: 10_000,
                wait_ms: 60_000,
                ..
            })
        ));
        assert!(c.cmd.client_timeout(Duration::from_secs(5)) >= Duration::from_secs(70));
        assert!(Cli::try_parse_from(["dsys", "campaign", "db"]).is_err());
        let c = Cli::try_parse_from(["dsys", "campaign", "a/b", "--value", "x"]).expect("parse");
        assert!(c.cmd.request().is_err());
        let c = Cli::try_parse_from(["dsys", "resign", "db", "--term", "0"]).expect("parse");
        assert!(c.cmd.request().is_err());
        let c = Cli::try_parse_from(["dsys", "observe", "db"]).expect("parse");
        assert_eq!(c.cmd.observe_name(), Some("db"));
        let big = ElectionRequest::Campaign {
            name: "x".into(),
            value: "v".repeat(MAX_VALUE_BYTES + 1),
            ttl_ms: 5000,
            wait_ms: 0,
        };
        assert!(big.validate().is_err());
    }
}
