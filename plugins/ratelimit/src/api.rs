//! Wire types of the `ratelimit` plugin and the `dsys ratelimit` subcommand.

use std::collections::BTreeMap;

use dsys_runtime::Render;
use serde::{Deserialize, Serialize};

use crate::core::Decision;
use crate::reload::ActiveRule;

dsys_runtime::plugin_api!(
    RatelimitApi,
    "ratelimit",
    RatelimitRequest,
    RatelimitResponse
);

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest cost of one request.
pub const MAX_COST: u64 = 1_000_000;

/// Requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RatelimitRequest {
    /// Check (and consume) `cost` units of `rule` for `key`, on whichever node owns the key.
    Check {
        /// Rule name from `[plugins.ratelimit.rules.NAME]`.
        rule: String,
        /// The limited identity (user id, API key, IP...).
        key: String,
        /// Units to consume (0 only queries).
        cost: u64,
    },
    /// Node-to-node: decide here; the sender computed that this node owns the key.
    Decide {
        /// Rule name.
        rule: String,
        /// Key.
        key: String,
        /// Units.
        cost: u64,
    },
    /// The rules this node enforces (cluster.toml's overlaid by config's).
    Rules,
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RatelimitResponse {
    /// The decision, made by `owner`.
    Decision {
        /// Rule name.
        rule: String,
        /// Key.
        key: String,
        /// The node that holds this key's counter and decided.
        owner: String,
        /// The decision.
        decision: Decision,
    },
    /// Rules in force on the node that answered, by name, with their source.
    Rules(BTreeMap<String, ActiveRule>),
}

/// `dsys ratelimit ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RatelimitCommand {
    /// Count one request of KEY against RULE; exit 0 when allowed, 1 when limited.
    Check {
        /// The limited identity.
        key: String,
        /// Rule name (see `dsys ratelimit rules`).
        #[arg(long)]
        rule: String,
        /// Units this request costs.
        #[arg(long, default_value_t = 1)]
        cost: u64,
    },
    /// List the rules in force on the node that answers, and where each comes from.
    Rules,
}

impl RatelimitCommand {
    /// The request this command sends.
    pub fn request(&self) -> RatelimitRequest {
        match self {
            RatelimitCommand::Check { key, rule, cost } => RatelimitRequest::Check {
                rule: rule.clone(),
                key: key.clone(),
                cost: *cost,
            },
            RatelimitCommand::Rules => RatelimitRequest::Rules,
        }
    }
}

impl Render for RatelimitResponse {
    fn human(&self) -> String {
        match self {
            RatelimitResponse::Decision {
                rule,
                key,
                owner,
                decision: d,
            } => {
                let verdict = if d.allowed { "allowed" } else { "limited" };
                let mut s = format!(
                    "{verdict}: rule {rule} key {key:?} (decided by {owner})\nremaining {} of {}, full again in {} ms",
                    d.remaining, d.limit, d.reset_ms
                );
                if !d.allowed {
                    s.push_str(&format!("\nretry after {} ms", d.retry_after_ms));
                }
                s
            }
            RatelimitResponse::Rules(rules) => {
                let mut s =
                    String::from("rule             algorithm        limit   window_ms  source\n");
                for (n, a) in rules {
                    let r = &a.rule;
                    s.push_str(&format!(
                        "{n:<16} {:<16} {:>6} {:>11}  {}\n",
                        r.algorithm.to_string(),
                        r.limit,
                        r.window_ms,
                        a.source
                    ));
                }
                s
            }
        }
    }

    fn exit_code(&self) -> i32 {
        match self {
            RatelimitResponse::Decision { decision, .. } if !decision.allowed => 1,
            _ => 0,
        }
    }
}
