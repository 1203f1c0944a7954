//! Wire types of the `ring` plugin and the `dsys ring` subcommand that builds them.

use std::collections::BTreeMap;

use dsys_runtime::{Render, RingStats};
use serde::{Deserialize, Serialize};

dsys_runtime::plugin_api!(RingApi, "ring", RingRequest, RingResponse);

/// Longest key accepted.
pub const MAX_KEY_BYTES: usize = 4096;
/// Most keys sampled by `stats`.
pub const MAX_SAMPLE: u64 = 10_000_000;

/// Requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RingRequest {
    /// Owner and preference list of a key.
    Lookup {
        /// The key.
        key: String,
        /// Length of the preference list.
        replicas: usize,
    },
    /// Load spread over a sample of keys.
    Stats {
        /// Keys to sample.
        sample: u64,
    },
}

/// Answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RingResponse {
    /// Where a key lives.
    Lookup {
        /// The key.
        key: String,
        /// Its position on the ring.
        hash: u64,
        /// The preference list, owner first (distinct nodes).
        preference: Vec<String>,
        /// Region of each node in the list.
        regions: BTreeMap<String, String>,
        /// The node that answered.
        answered_by: String,
    },
    /// Spread statistics.
    Stats {
        /// The statistics.
        stats: RingStats,
        /// The node that answered.
        answered_by: String,
    },
}

/// `dsys ring ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RingCommand {
    /// Show which nodes own KEY (owner first).
    Lookup {
        /// The key.
        key: String,
        /// How many distinct replicas to list.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
    },
    /// Keys per node over a sample, max/min load ratio, vnode count.
    Stats {
        /// Number of synthetic keys to place.
        #[arg(long, default_value_t = 100_000)]
        sample: u64,
    },
}

impl RingCommand {
    /// The request this command sends.
    pub fn request(&self) -> RingRequest {
        match self {
            RingCommand::Lookup { key, replicas } => RingRequest::Lookup {
                key: key.clone(),
                replicas: *replicas,
            },
            RingCommand::Stats { sample } => RingRequest::Stats { sample: *sample },
        }
    }
}

impl Render for RingResponse {
    fn human(&self) -> String {
        match self {
            RingResponse::Lookup {
                key,
                hash,
                preference,
                regions,
                answered_by,
            } => {
                let mut s = format!("key {key:?} hash {hash:#018x} (answered by {answered_by})\n");
                for (i, n) in preference.iter().enumerate() {
                    let role = if i == 0 { "owner" } else { "replica" };
                    let region = regions.get(n).map(String::as_str).unwrap_or("?");
                    s.push_str(&format!(
                        "  {:>2}. {n:<8} {role:<8} region {region}\n",
                        i + 1
                    ));
                }
                s
            }
            RingResponse::Stats { stats, answered_by } => {
                let mut s = format!(
                    "{} nodes x {} vnodes, {} keys sampled (answered by {answered_by})\n",
                    stats.nodes, stats.vnodes_per_node, stats.sample
                );
                for (n, k) in &stats.keys_per_node {
                    let own = stats.ownership.get(n).copied().unwrap_or(0.0) * 100.0;
                    s.push_str(&format!("  {n:<8} {k:>9} keys  {own:5.1}% of the ring\n"));
                }
                s.push_str(&format!(
                    "  max/min load ratio: {:.3}\n",
                    stats.max_min_ratio
                ));
                s
            }
        }
    }
}
