//! `ratelimit` (design 7): a global rate limit per key. Whichever node a request hits, the
//! decision is made by the key's owner on the ring, where the key's limiter lives in memory;
//! so a client spreading requests over every node still gets exactly the rule's limit.
//! Four algorithms (token bucket, fixed window, sliding log, sliding counter) live in the
//! pure [`core`], driven by time passed in. Rules come from cluster.toml and, live, from
//! the `config` plugin ([`reload`](crate::reload)): a `dsys config put ratelimit/rules/NAME`
//! changes every node's rules within a second.
#![warn(missing_docs, unreachable_pub)]

mod api;
pub mod core;
mod http;
mod reload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use dsys_runtime::{Caller, Metrics, Panel, Plugin, PluginContext, RateMeter, RpcError};
use serde::{Deserialize, Serialize};

pub use api::{
    RatelimitApi, RatelimitCommand, RatelimitRequest, RatelimitResponse, MAX_COST, MAX_KEY_BYTES,
};
pub use reload::{merge, ActiveRule, RuleSource, CONFIG_RULES_PREFIX, CONSENSUS_RULES_PREFIX};

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
    /// Follow the rules kept in the `config` plugin (`ratelimit/rules/NAME`), which overlay
    /// these ones name by name (default true).
    #[serde(default = "default_live_reload")]
    pub live_reload: bool,
}

fn default_live_reload() -> bool {
    true
}

fn default_max_keys() -> usize {
    1_000_000
}

/// The plugin instance.
pub struct RatelimitPlugin {
    ctx: PluginContext,
    max_keys: usize,
    /// The rules in force (cluster.toml's overlaid by config's), swapped by the reload task.
    rules: Arc<reload::Shared>,
    limiters: Arc<DashMap<(String, String), Tracked>>,
    /// Decisions taken here per rule name: (allowed, limited), for the dashboard and
    /// `/metrics`; kept when the rule changes or goes.
    decisions: DashMap<String, Arc<(RateMeter, RateMeter)>>,
    epoch: tokio::time::Instant,
    sweeper: tokio::task::JoinHandle<()>,
    reloader: Option<tokio::task::JoinHandle<()>>,
}

/// A key's limiter, the rule it was made for, and what it decided (dashboard's top keys).
struct Tracked {
    limiter: Limiter,
    /// A limiter whose rule changed since is started afresh under the new rule.
    rule: Rule,
    allowed: u64,
    limited: u64,
}

/// Counts of one rule's decisions: (allowed, limited).
type Meters = Arc<(RateMeter, RateMeter)>;

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
        if let Some(r) = &self.reloader {
            r.abort();
        }
    }
}

fn now_ms(epoch: tokio::time::Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

impl RatelimitPlugin {
    fn rule(&self, name: &str) -> Result<Rule, RpcError> {
        let rules = self.rules.rules();
        match rules.get(name) {
            Some(a) => Ok(a.rule.clone()),
            None => Err(RpcError::Refused(format!(
                "unknown rule `{name}`; configured: {}",
                rules.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    fn meters(&self, rule: &str) -> Meters {
        if let Some(m) = self.decisions.get(rule) {
            return m.clone();
        }
        self.decisions.entry(rule.to_string()).or_default().clone()
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
        self.rule(rule)
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
        if !self.limiters.contains_key(&k) && self.limiters.len() >= self.max_keys {
            self.limiters.retain(|_, t| !t.limiter.is_idle(now));
            if self.limiters.len() >= self.max_keys {
                return Err(RpcError::Refused(format!(
                    "this node already tracks {} keys (plugins.ratelimit.max_keys)",
                    self.max_keys
                )));
            }
        }
        // The entry holds its shard's lock: check-and-consume is atomic per key.
        let decision = {
            let mut t = self.limiters.entry(k).or_insert_with(|| Tracked {
                limiter: Limiter::new(rule, now),
                rule: rule.clone(),
                allowed: 0,
                limited: 0,
            });
            if t.rule != *rule {
                // The rule was changed (config reload) since this limiter was made.
                t.limiter = Limiter::new(rule, now);
                t.rule = rule.clone();
            }
            let d = t.limiter.check(now, cost);
            if d.allowed {
                t.allowed += 1;
            } else {
                t.limited += 1;
            }
            d
        };
        let m = self.meters(&rule_name);
        if decision.allowed { &m.0 } else { &m.1 }.mark(1);
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
        ctx.metrics.describe(
            "dsys_config_reloads_total",
            "counter",
            "Times a plugin's live settings changed because the config plugin's did",
        );
        let decisions: DashMap<String, Meters> = config
            .rules
            .keys()
            .map(|r| (r.clone(), Default::default()))
            .collect();
        let rules = Arc::new(reload::Shared::new(config.rules.clone()));
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
        let reloader = config.live_reload.then(|| {
            let cx = dsys_plugin_lock::recipe::Consensus::new(ctx.rpc.clone());
            // A long poll that always answers well within the RPC deadline.
            let wait_ms = (ctx.config.cluster.rpc_timeout_ms / 2).clamp(100, 5_000);
            let (limiters, in_force, timeline, me) = (
                limiters.clone(),
                rules.clone(),
                ctx.timeline.clone(),
                ctx.node_id.clone(),
            );
            let on_change = move |changed: &[String]| {
                // Limiters of unchanged rules keep their counts; the others start afresh.
                let now = in_force.rules();
                limiters.retain(|(r, _), t| now.get(r).map(|a| &a.rule) == Some(&t.rule));
                let what = changed.join(", ");
                tracing::info!("ratelimit: rules reloaded from config: {what}");
                timeline.record(
                    "ratelimit",
                    &me,
                    format!("rules reloaded from config: {what}"),
                );
            };
            tokio::spawn(reload::run(cx, rules.clone(), wait_ms, on_change))
        });
        Ok(RatelimitPlugin {
            ctx,
            max_keys: config.max_keys,
            rules,
            limiters,
            decisions,
            epoch,
            sweeper,
            reloader,
        })
    }

    async fn handle(
        &self,
        _caller: Caller,
        req: RatelimitRequest,
    ) -> Result<RatelimitResponse, RpcError> {
        match req {
            RatelimitRequest::Rules => Ok(RatelimitResponse::Rules(
                self.rules.rules().as_ref().clone(),
            )),
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
        for e in self.decisions.iter() {
            let (a, l) = e.value().as_ref();
            for (outcome, meter) in [("allowed", a), ("limited", l)] {
                m.set_counter(
                    "dsys_ratelimit_decisions_total",
                    &[("rule", e.key()), ("outcome", outcome)],
                    meter.total(),
                );
            }
        }
        m.set_counter(
            "dsys_config_reloads_total",
            &[("plugin", "ratelimit")],
            self.rules.reloads(),
        );
    }

    fn panel(&self) -> Option<Panel> {
        let rate = |m: &RateMeter| m.rate().map_or("-".to_string(), |r| format!("{r:.1}/s"));
        let in_force = self.rules.rules();
        let rules: Vec<Vec<String>> = in_force
            .iter()
            .map(|(name, active)| {
                let r = &active.rule;
                let policy = format!("{} {} per {} ms", r.algorithm, r.limit, r.window_ms);
                let m = self
                    .decisions
                    .get(name)
                    .map(|m| m.clone())
                    .unwrap_or_default();
                let (a, l) = m.as_ref();
                vec![
                    name.clone(),
                    policy,
                    active.source.to_string(),
                    a.total().to_string(),
                    rate(a),
                    l.total().to_string(),
                    rate(l),
                ]
            })
            .collect();
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
                .stat("rules from", self.rules.status())
                .stat("reloads", self.rules.reloads())
                .table(
                    "Rules",
                    &[
                        "rule",
                        "policy",
                        "source",
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
