//! `ratelimit` (design 7): a global rate limit per key. Whichever node a request hits, the
//! decision is made by the key's owner on the ring, where the key's limiter lives in memory;
//! so a client spreading requests over every node still gets exactly the rule's limit.
//! Four algorithms (token bucket, fixed window, sliding log, sliding counter) live in the
//! pure [`core`], driven by time passed in.
#![warn(missing_docs, unreachable_pub)]

mod api;
pub mod core;
mod http;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dsys_runtime::{Caller, Metrics, Panel, Plugin, PluginContext, RateMeter, RpcError};
use serde::{Deserialize, Serialize};

pub use api::{
    RatelimitApi, RatelimitCommand, RatelimitRequest, RatelimitResponse, MAX_COST, MAX_KEY_BYTES,
};

use crate::core::{Limiter, Rule};

/// `[plugins.ratelimit]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RatelimitConfig {
    /// Rules by name: `[plugins.ratelimit.rules.NAME]` with `algorithm`, `limit`, `window_ms`.
    #[serde(default)]
    pub rules: BTreeMap<String, Rule>,
    /// Most keys tracked at once on one node; idle limiters are dropped first.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    1_000_000
}

/// The plugin instance.
pub struct RatelimitPlugin {
    ctx: PluginContext,
    config: RatelimitConfig,
    limiters: Arc<DashMap<(String, String), Tracked>>,
    /// Decisions taken here per rule: (allowed, limited), for the dashboard and `/metrics`.
    decisions: BTreeMap<String, (RateMeter, RateMeter)>,
    epoch: tokio::time::Instant,
    sweeper: tokio::task::JoinHandle<()>,
}

/// A key's limiter and what it decided, for the dashboard's top keys.
struct Tracked {
    limiter: Limiter,
    allowed: u64,
    limited: u64,
}

/// Keys shown on the dashboard.
const TOP_KEYS: usize = 10;

impl std::fmt::Debug for RatelimitPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RatelimitPlugin({} keys)", self.limiters.len())
    }
}

impl Drop for RatelimitPlugin {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

fn now_ms(epoch: tokio::time::Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

impl RatelimitPlugin {
    fn rule(&self, name: &str) -> Result<&Rule, RpcError> {
        self.config.rules.get(name).ok_or_else(|| {
            RpcError::Refused(format!(
                "unknown rule `{name}`; configured: {}",
                self.config
                    .rules
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    fn check_input(&self, rule: &str, key: &str, cost: u64) -> Result<Rule, RpcError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(RpcError::Refused(format!(
                "key must be 1..={MAX_KEY_BYTES} bytes"
            )));
        }
        if cost > MAX_COST {
            return Err(RpcError::Refused(format!("cost must be 0..={MAX_COST}")));
        }
        self.rule(rule).cloned()
    }

    /// Decide locally: this node holds the key's limiter.
    fn decide(
        &self,
        rule_name: String,
        key: String,
        cost: u64,
        rule: &Rule,
    ) -> Result<RatelimitResponse, RpcError> {
        let now = now_ms(self.epoch);
        let k = (rule_name.clone(), key.clone());
        if !self.limiters.contains_key(&k) && self.limiters.len() >= self.config.max_keys {
            self.limiters.retain(|_, t| !t.limiter.is_idle(now));
            if self.limiters.len() >= self.config.max_keys {
                return Err(RpcError::Refused(format!(
                    "this node already tracks {} keys (plugins.ratelimit.max_keys)",
                    self.config.max_keys
                )));
            }
        }
        // The entry holds its shard's lock: check-and-consume is atomic per key.
        let decision = {
            let mut t = self.limiters.entry(k).or_insert_with(|| Tracked {
                limiter: Limiter::new(rule, now),
                allowed: 0,
                limited: 0,
            });
            let d = t.limiter.check(now, cost);
            if d.allowed {
                t.allowed += 1;
            } else {
                t.limited += 1;
            }
            d
        };
        if let Some((a, l)) = self.decisions.get(&rule_name) {
            if decision.allowed { a } else { l }.mark(1);
        }
        Ok(RatelimitResponse::Decision {
            rule: rule_name,
            key,
            owner: self.ctx.node_id.clone(),
            decision,
        })
    }
}

#[async_trait::async_trait]
impl Plugin for RatelimitPlugin {
    type Api = RatelimitApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let config: RatelimitConfig = ctx.plugin_config("ratelimit").map_err(|e| e.to_string())?;
        for (name, r) in &config.rules {
            r.validate()
                .map_err(|e| format!("plugins.ratelimit.rules.{name}: {e}"))?;
        }
        let limiters: Arc<DashMap<(String, String), Tracked>> = Arc::new(DashMap::new());
        ctx.metrics.describe(
            "dsys_ratelimit_decisions_total",
            "counter",
            "Rate-limit decisions taken on this node (as the key's owner), by rule and outcome",
        );
        let decisions = config
            .rules
            .keys()
            .map(|r| (r.clone(), Default::default()))
            .collect();
        let epoch = tokio::time::Instant::now();
        // Full limiters carry no information: drop them so memory follows active keys only.
        let sweeper = {
            let limiters = limiters.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tick.tick().await;
                    let now = now_ms(epoch);
                    limiters.retain(|_, t| !t.limiter.is_idle(now));
                }
            })
        };
        Ok(RatelimitPlugin {
            ctx,
            config,
            limiters,
            decisions,
            epoch,
            sweeper,
        })
    }

    async fn handle(
        &self,
        _caller: Caller,
        req: RatelimitRequest,
    ) -> Result<RatelimitResponse, RpcError> {
        match req {
            RatelimitRequest::Rules => Ok(RatelimitResponse::Rules(self.config.rules.clone())),
            RatelimitRequest::Decide { rule, key, cost } => {
                let r = self.check_input(&rule, &key, cost)?;
                self.decide(rule, key, cost, &r)
            }
            RatelimitRequest::Check { rule, key, cost } => {
                let r = self.check_input(&rule, &key, cost)?;
                let owner = self
                    .ctx
                    .ring()
                    .owner(format!("{rule}/{key}").as_bytes())
                    .map(str::to_string)
                    .unwrap_or_else(|| self.ctx.node_id.clone());
                if owner == self.ctx.node_id {
                    return self.decide(rule, key, cost, &r);
                }
                self.ctx
                    .rpc
                    .call::<RatelimitApi>(&owner, &RatelimitRequest::Decide { rule, key, cost })
                    .await
            }
        }
    }

    fn export_metrics(&self, m: &Metrics) {
        for (rule, (a, l)) in &self.decisions {
            for (outcome, meter) in [("allowed", a), ("limited", l)] {
                m.set_counter(
                    "dsys_ratelimit_decisions_total",
                    &[("rule", rule), ("outcome", outcome)],
                    meter.total(),
                );
            }
        }
    }

    fn panel(&self) -> Option<Panel> {
        let rate = |m: &RateMeter| m.rate().map_or("-".to_string(), |r| format!("{r:.1}/s"));
        let rules = self.decisions.iter().map(|(name, (a, l))| {
            let policy = self.config.rules.get(name).map_or(String::new(), |r| {
                format!("{:?} {} per {} ms", r.algorithm, r.limit, r.window_ms)
            });
            vec![
                name.clone(),
                policy,
                a.total().to_string(),
                rate(a),
                l.total().to_string(),
                rate(l),
            ]
        });
        let mut top: Vec<(String, String, u64, u64)> = self
            .limiters
            .iter()
            .map(|e| (e.key().0.clone(), e.key().1.clone(), e.allowed, e.limited))
            .collect();
        top.sort_by_key(|t| std::cmp::Reverse(t.2 + t.3));
        top.truncate(TOP_KEYS);
        Some(
            Panel::new("Rate limiter (keys owned here)")
                .stat("keys tracked", self.limiters.len())
                .table(
                    "Rules",
                    &[
                        "rule",
                        "policy",
                        "allowed",
                        "allowed rate",
                        "limited",
                        "limited rate",
                    ],
                    rules,
                )
                .table(
                    "Top keys",
                    &["rule", "key", "allowed", "limited"],
                    top.into_iter()
                        .map(|(r, k, a, l)| vec![r, k, a.to_string(), l.to_string()]),
                ),
        )
    }

    fn routes(
        client: dsys_runtime::LocalClient<RatelimitApi>,
    ) -> Option<dsys_runtime::axum::Router> {
        Some(http::routes(client))
    }
}
