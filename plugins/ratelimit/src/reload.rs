//! Live reload of the rules from the `config` plugin (design 33).
//!
//! Rules are kept by `config` as one key per rule, `ratelimit/rules/NAME`, whose value is the
//! rule as JSON (validated by `config` with [`Rule::parse`] before it is stored). `config`
//! stores each key's current value in the consensus store under `config/kv/KEY`, so this
//! module reads and watches [`CONSENSUS_RULES_PREFIX`] there, through the consensus client
//! other plugins use (`dsys_plugin_lock::recipe::Consensus`); it does not depend on the
//! `config` crate (which depends on this one for the parser).
//!
//! The rules in force are cluster.toml's, overlaid rule by rule by those in config
//! ([`merge`]): a rule put in config replaces the cluster.toml rule of the same name or adds
//! one; deleting it from config brings cluster.toml's back (or removes the rule). A node
//! starts serving with cluster.toml's rules and converges on config's as soon as the
//! consensus plugin answers ([`run`]), normally within a second of its start; then every
//! change is applied when the watch long-poll returns it, well within a second of the put.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dsys_plugin_consensus::state::EventKind;
use dsys_plugin_lock::recipe::{transient, Consensus};
use serde::{Deserialize, Serialize};

use crate::core::Rule;

/// Prefix of the rule keys in `config` (`dsys config put ratelimit/rules/NAME JSON`).
pub const CONFIG_RULES_PREFIX: &str = "ratelimit/rules/";
/// Where `config` keeps their current values in the consensus store.
pub const CONSENSUS_RULES_PREFIX: &str = "config/kv/ratelimit/rules/";

/// Where a rule in force comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleSource {
    /// `[plugins.ratelimit.rules.NAME]` in cluster.toml (the default).
    ClusterToml,
    /// The `config` key `ratelimit/rules/NAME`, as written at this consensus revision.
    Config {
        /// Mod revision of the key.
        revision: u64,
    },
}

impl std::fmt::Display for RuleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleSource::ClusterToml => f.write_str("cluster.toml"),
            RuleSource::Config { revision } => write!(f, "config rev {revision}"),
        }
    }
}

/// A rule in force on a node, and its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRule {
    /// The rule.
    pub rule: Rule,
    /// Where it comes from.
    pub source: RuleSource,
}

/// cluster.toml's rules overlaid, name by name, by config's (`name -> (rule, revision)`).
pub fn merge(
    toml: &BTreeMap<String, Rule>,
    config: &BTreeMap<String, (Rule, u64)>,
) -> BTreeMap<String, ActiveRule> {
    let mut out: BTreeMap<String, ActiveRule> = toml
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                ActiveRule {
                    rule: r.clone(),
                    source: RuleSource::ClusterToml,
                },
            )
        })
        .collect();
    for (n, (r, rev)) in config {
        out.insert(
            n.clone(),
            ActiveRule {
                rule: r.clone(),
                source: RuleSource::Config { revision: *rev },
            },
        );
    }
    out
}

/// The rule name of a consensus key under [`CONSENSUS_RULES_PREFIX`] (`None` for a nested or
/// empty name, which `config` refuses to store).
fn rule_name(key: &str) -> Option<&str> {
    let name = key.strip_prefix(CONSENSUS_RULES_PREFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Rules in force, shared by the request path (reads) and the reload task (swaps).
pub(crate) struct Shared {
    toml: BTreeMap<String, Rule>,
    rules: RwLock<Arc<BTreeMap<String, ActiveRule>>>,
    status: Mutex<String>,
    reloads: AtomicU64,
}

impl Shared {
    pub(crate) fn new(toml: BTreeMap<String, Rule>) -> Self {
        let rules = merge(&toml, &BTreeMap::new());
        Shared {
            toml,
            rules: RwLock::new(Arc::new(rules)),
            status: Mutex::new("cluster.toml (config not read yet)".into()),
            reloads: AtomicU64::new(0),
        }
    }

    /// The rules in force now.
    pub(crate) fn rules(&self) -> Arc<BTreeMap<String, ActiveRule>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the rules come from, as the dashboard shows it.
    pub(crate) fn status(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_status(&self, s: String) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Times the rules in force changed because config changed.
    pub(crate) fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Put `config`'s rules in force; the names whose rule changed (added, changed or gone),
    /// empty when nothing did.
    fn apply(&self, config: &BTreeMap<String, (Rule, u64)>) -> Vec<String> {
        let next = merge(&self.toml, config);
        let mut g = self.rules.write().unwrap_or_else(|p| p.into_inner());
        let mut changed: Vec<String> = next
            .iter()
            .filter(|(n, a)| g.get(*n).map(|o| &o.rule) != Some(&a.rule))
            .map(|(n, _)| n.clone())
            .collect();
        changed.extend(g.keys().filter(|n| !next.contains_key(*n)).cloned());
        let sources_moved = g
            .iter()
            .any(|(n, a)| next.get(n).map(|b| &b.source) != Some(&a.source));
        if !changed.is_empty() || sources_moved {
            *g = Arc::new(next);
        }
        changed
    }
}

/// Read config's rules, then follow every change, forever (the plugin aborts the task when
/// it stops). `on_change` gets the names of the rules that changed after each swap.
pub(crate) async fn run(
    cx: Consensus,
    shared: Arc<Shared>,
    wait_ms: u64,
    on_change: impl Fn(&[String]) + Send + 'static,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // A linearizable read: the rules as of a revision at least as new as any put acked.
        let (kvs, revision) = match cx.range(CONSENSUS_RULES_PREFIX, false).await {
            Ok(r) => r,
            Err(e) => {
                shared.set_status(format!(
                    "cluster.toml (config not reachable yet: {e}; retrying)"
                ));
                tracing::debug!("ratelimit: reading rules from config: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut config = BTreeMap::new();
        for kv in kvs {
            put_rule(&mut config, &kv.key, &kv.value, kv.mod_revision);
        }
        let mut seen = revision;
        swap(&shared, &config, seen, &on_change);
        let mut from = revision + 1;
        loop {
            match cx.watch(CONSENSUS_RULES_PREFIX, true, from, wait_ms).await {
                Ok((events, next)) => {
                    for e in &events {
                        match e.kind {
                            EventKind::Put => {
                                put_rule(&mut config, &e.kv.key, &e.kv.value, e.revision)
                            }
                            EventKind::Delete => {
                                if let Some(n) = rule_name(&e.kv.key) {
                                    config.remove(n);
                                }
                            }
                        }
                        seen = seen.max(e.revision);
                    }
                    if !events.is_empty() {
                        swap(&shared, &config, seen, &on_change);
                    }
                    from = next;
                }
                Err(e) if transient(&e) => {
                    tracing::debug!("ratelimit: watching rules: {e}; again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Compacted past `from`, or anything else: read everything again.
                Err(e) => {
                    tracing::info!("ratelimit: watching rules: {e}; reading them again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

fn put_rule(config: &mut BTreeMap<String, (Rule, u64)>, key: &str, value: &str, revision: u64) {
    let Some(name) = rule_name(key) else {
        tracing::warn!("ratelimit: ignoring config key `{key}`: not ratelimit/rules/NAME");
        return;
    };
    match Rule::parse(value) {
        Ok(r) => {
            config.insert(name.to_string(), (r, revision));
        }
        // Only a write that bypassed `config` (a raw `dsys raft put`) can get here: the rule
        // falls back to cluster.toml's rather than keep a value nobody can see any more.
        Err(e) => {
            tracing::warn!("ratelimit: ignoring invalid rule `{name}` in config: {e}");
            config.remove(name);
        }
    }
}

fn swap(
    shared: &Shared,
    config: &BTreeMap<String, (Rule, u64)>,
    revision: u64,
    on_change: &impl Fn(&[String]),
) {
    let changed = shared.apply(config);
    shared.set_status(if config.is_empty() {
        format!("cluster.toml (config holds no rules, revision {revision})")
    } else {
        format!(
            "config ({} rule(s), revision {revision}) over cluster.toml",
            config.len()
        )
    });
    if !changed.is_empty() {
        shared.reloads.fetch_add(1, Ordering::Relaxed);
        on_change(&changed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Algorithm;

    fn rule(limit: u64) -> Rule {
        Rule {
            algorithm: Algorithm::TokenBucket,
            limit,
            window_ms: 1000,
        }
    }

    #[test]
    fn config_overlays_cluster_toml_rule_by_rule() {
        let toml = BTreeMap::from([("api".to_string(), rule(10)), ("login".into(), rule(5))]);
        let cfg = BTreeMap::from([
            ("api".to_string(), (rule(3), 7)),
            ("new".into(), (rule(1), 9)),
        ]);
        let m = merge(&toml, &cfg);
        assert_eq!(m.len(), 3);
        assert_eq!(m["api"].rule, rule(3));
        assert_eq!(m["api"].source, RuleSource::Config { revision: 7 });
        assert_eq!(m["login"].source, RuleSource::ClusterToml);
        assert_eq!(m["new"].source, RuleSource::Config { revision: 9 });
        assert_eq!(merge(&toml, &BTreeMap::new()).len(), 2);
    }

    #[test]
    fn apply_reports_exactly_the_changed_rules() {
        let toml = BTreeMap::from([("api".to_string(), rule(10))]);
        let s = Shared::new(toml);
        assert!(s.apply(&BTreeMap::new()).is_empty());
        let cfg = BTreeMap::from([
            ("api".to_string(), (rule(3), 7)),
            ("x".into(), (rule(1), 8)),
        ]);
        assert_eq!(s.apply(&cfg), ["api", "x"]);
        // Same rules at a new revision: nothing changed, but the source is updated.
        let cfg2 = BTreeMap::from([
            ("api".to_string(), (rule(3), 9)),
            ("x".into(), (rule(1), 8)),
        ]);
        assert!(s.apply(&cfg2).is_empty());
        assert_eq!(s.rules()["api"].source, RuleSource::Config { revision: 9 });
        // Deleting api from config brings cluster.toml's back; x goes.
        assert_eq!(s.apply(&BTreeMap::new()), ["api", "x"]);
        assert_eq!(s.rules()["api"].rule, rule(10));
        assert!(!s.rules().contains_key("x"));
    }

    #[test]
    fn rule_names_are_one_segment() {
        assert_eq!(rule_name("config/kv/ratelimit/rules/api"), Some("api"));
        assert_eq!(rule_name("config/kv/ratelimit/rules/"), None);
        assert_eq!(rule_name("config/kv/ratelimit/rules/a/b"), None);
        assert_eq!(rule_name("config/kv/other"), None);
    }
}
