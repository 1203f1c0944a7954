//! `ratelimit`: clients on every node check one fixed-window key at a time (a fresh key every
//! second, window of a day so each key lives in one window), cost 1, rule `check` with limit
//! [`LIMIT`], configured by the run.
//!
//! What the plugin promises (plugins/ratelimit/README.md) and so what is checked:
//! - counts live in the owner's memory: one owner never grants more than the limit per key
//!   and window, unless it restarted (a restarted owner starts from an empty window). Checked
//!   for every key and owner, except owners killed while that key was in use.
//! - the global limit (all nodes together) holds while membership is stable; while a node is
//!   down, paused, cut off or just restarted, two nodes can each own the key and grant up to
//!   a limit each. The global bound is checked only for keys used entirely outside any fault
//!   (from the fault's start until every node saw every other alive again); keys that
//!   overlap a fault are counted and reported, not judged.
//!
//! History shape: `check` with `{"key": K}`; ok value `{"key", "allowed", "owner"}`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use dsys_plugin_ratelimit::{RatelimitApi, RatelimitRequest, RatelimitResponse};
use serde_json::json;

use super::history::{EventType, History};
use super::{Ctx, Verdict, Worker, Workload};

/// Grants per key and window.
pub const LIMIT: u64 = 5;
/// A new key every this many nanoseconds.
const SLOT_NS: u64 = 1_000_000_000;

#[derive(Default, Debug)]
struct KeyStats {
    first_ns: u64,
    last_ns: u64,
    grants: u64,
    by_owner: BTreeMap<String, u64>,
    grant_events: Vec<usize>,
}

/// Check a ratelimit history against `limit`.
pub fn check(h: &History, limit: u64) -> Verdict {
    let ops = match h.ops() {
        Ok(o) => o,
        Err(e) => return Verdict::unknown(format!("malformed history: {e}")),
    };
    let mut keys: BTreeMap<String, KeyStats> = BTreeMap::new();
    for op in &ops {
        if op.invoke.f != "check" {
            continue;
        }
        let Some(key) = op.invoke.value["key"].as_str() else {
            return Verdict::unknown(format!("event {}: no key", op.invoke.index));
        };
        let k = keys.entry(key.to_string()).or_insert_with(|| KeyStats {
            first_ns: op.invoke.time_ns,
            ..Default::default()
        });
        k.first_ns = k.first_ns.min(op.invoke.time_ns);
        k.last_ns = k.last_ns.max(op.end_ns());
        if let Some(c) = op.complete.filter(|c| c.kind == EventType::Ok) {
            if c.value["allowed"].as_bool() == Some(true) {
                let Some(owner) = c.value["owner"].as_str() else {
                    return Verdict::unknown(format!("event {}: no owner", c.index));
                };
                k.grants += 1;
                *k.by_owner.entry(owner.to_string()).or_default() += 1;
                k.grant_events.push(c.index);
            }
        }
    }
    let overlaps = |f: &super::history::Fault, a: u64, b: u64| {
        let end = f.recovered_ns.unwrap_or(u64::MAX);
        f.start_ns <= b && a <= end
    };
    let (mut strict, mut excluded, mut excluded_over) = (0, 0, 0);
    let mut violations = Vec::new();
    let mut max_grants = 0;
    for (key, k) in &keys {
        max_grants = max_grants.max(k.grants);
        let faulted = h.faults.iter().any(|f| overlaps(f, k.first_ns, k.last_ns));
        if faulted {
            excluded += 1;
            if k.grants > limit {
                excluded_over += 1;
            }
        } else {
            strict += 1;
            if k.grants > limit {
                violations.push(json!({
                    "key": key,
                    "check": "global limit with stable membership",
                    "grants": k.grants,
                    "limit": limit,
                    "by_owner": k.by_owner,
                    "grant_events": k.grant_events,
                }));
            }
        }
        for (owner, n) in &k.by_owner {
            let restarted = h.faults.iter().any(|f| {
                f.kind == "kill" && f.nodes.contains(owner) && overlaps(f, k.first_ns, k.last_ns)
            });
            if !restarted && *n > limit {
                violations.push(json!({
                    "key": key,
                    "check": "one owner's count",
                    "owner": owner,
                    "grants": n,
                    "limit": limit,
                    "grant_events": k.grant_events,
                }));
            }
        }
    }
    let details = json!({
        "keys": keys.len(),
        "limit": limit,
        "keys_checked_globally": strict,
        "keys_during_faults": excluded,
        "keys_during_faults_over_limit": excluded_over,
        "max_grants_per_key": max_grants,
    });
    if violations.is_empty() {
        Verdict::valid(
            format!(
                "no owner granted more than {limit} per key; the global limit held on all {strict} keys used with stable membership ({excluded_over} of {excluded} keys used during faults went over, as the plugin documents)"
            ),
            details,
        )
    } else {
        Verdict::invalid(
            format!("{} over-grants", violations.len()),
            details,
            violations,
        )
    }
}

#[derive(Debug, Default)]
struct Ratelimit;

pub(crate) fn new() -> Box<dyn Workload> {
    Box::new(Ratelimit)
}

#[async_trait]
impl Workload for Ratelimit {
    fn config(&self) -> String {
        format!(
            "[plugins.ratelimit.rules.check]\nalgorithm = \"fixed_window\"\nlimit = {LIMIT}\nwindow_ms = 86400000\n"
        )
    }

    fn claim(&self) -> String {
        format!(
            "fixed window, limit {LIMIT}, a fresh key every second: no owner grants more than the limit \
             (unless killed meanwhile); all nodes together grant at most the limit on keys used \
             while no fault was active and membership had converged (the plugin documents \
             over-grants during membership churn, so keys overlapping faults are only counted)"
        )
    }

    fn quiet_ms(&self) -> (u64, u64) {
        // Longer quiet periods, so that keys (one per second) are used with stable membership
        // and the global bound gets checked, not only the per-owner one.
        (4000, 8000)
    }

    async fn ready(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        let req = RatelimitRequest::Check {
            rule: "check".into(),
            key: format!("{}-ready", ctx.run_id),
            cost: 0,
        };
        match w.send::<RatelimitApi>(ctx, &req).await.1 {
            Ok(RatelimitResponse::Decision { .. }) => Ok(()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn step(&self, ctx: &Ctx, w: &mut Worker) {
        let key = format!("{}-{}", ctx.run_id, ctx.now_ns() / SLOT_NS);
        let req = RatelimitRequest::Check {
            rule: "check".into(),
            key: key.clone(),
            cost: 1,
        };
        let node = w.invoke(ctx, "check", json!({"key": key})).await;
        match w.send_to::<RatelimitApi>(ctx, node, &req).await.1 {
            Ok(RatelimitResponse::Decision {
                owner, decision, ..
            }) => w.complete(
                ctx,
                EventType::Ok,
                "check",
                json!({"key": key, "allowed": decision.allowed, "owner": owner}),
                None,
            ),
            Ok(other) => w.complete(
                ctx,
                EventType::Info,
                "check",
                json!({"key": key}),
                Some(format!("unexpected answer {other:?}")),
            ),
            Err(e) => {
                let kind = super::classify(&e, true);
                w.complete(ctx, kind, "check", json!({"key": key}), Some(e.to_string()))
            }
        }
        // Pace the clients: a few hundred checks per key are plenty.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    fn check(&self, h: &History) -> Verdict {
        check(h, LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::HistoryBuilder;
    use serde_json::Value;

    fn grant(b: &mut HistoryBuilder, p: u64, key: &str, allowed: bool, owner: &str) {
        b.invoke(p, "check", json!({"key": key}));
        b.ok(
            p,
            "check",
            json!({"key": key, "allowed": allowed, "owner": owner}),
        );
    }

    #[test]
    fn within_the_limit_is_valid() {
        let mut b = HistoryBuilder::new();
        for p in 0..3 {
            grant(&mut b, p, "a", true, "n1");
        }
        grant(&mut b, 0, "a", false, "n1");
        grant(&mut b, 1, "b", true, "n2");
        let v = check(&b.build(), 3);
        assert_eq!(v.valid, Some(true), "{v:?}");
    }

    #[test]
    fn over_grant_is_caught() {
        let mut b = HistoryBuilder::new();
        for p in 0..4 {
            grant(&mut b, p, "a", true, "n1");
        }
        let v = check(&b.build(), 3);
        assert_eq!(v.valid, Some(false));
    }

    #[test]
    fn two_owners_over_the_global_limit_without_faults_is_caught() {
        let mut b = HistoryBuilder::new();
        for p in 0..3 {
            grant(&mut b, p, "a", true, "n1");
        }
        for p in 3..5 {
            grant(&mut b, p, "a", true, "n2");
        }
        let v = check(&b.build(), 3);
        assert_eq!(v.valid, Some(false));
        assert_eq!(v.violations.len(), 1);
    }

    #[test]
    fn two_owners_during_a_partition_are_excused_but_one_owner_is_not() {
        let mut b = HistoryBuilder::new();
        let t = b.next_time_ns();
        for p in 0..3 {
            grant(&mut b, p, "a", true, "n1");
        }
        for p in 3..5 {
            grant(&mut b, p, "a", true, "n2");
        }
        let end = b.next_time_ns();
        b.fault("partition", &["n2"], t, end);
        let v = check(&b.build(), 3);
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["keys_during_faults_over_limit"], json!(1));
        // One owner over the limit is never excused, partition or not.
        let mut b = HistoryBuilder::new();
        let t = b.next_time_ns();
        for p in 0..4 {
            grant(&mut b, p, "a", true, "n1");
        }
        let end = b.next_time_ns();
        b.fault("partition", &["n2"], t, end);
        assert_eq!(check(&b.build(), 3).valid, Some(false));
        // ...unless that owner was killed (and so restarted) while the key was in use.
        let mut b = HistoryBuilder::new();
        let t = b.next_time_ns();
        for p in 0..4 {
            grant(&mut b, p, "a", true, "n1");
        }
        let end = b.next_time_ns();
        b.fault("kill", &["n1"], t, end);
        assert_eq!(check(&b.build(), 3).valid, Some(true));
    }

    #[test]
    fn unknown_checks_are_not_counted_as_grants() {
        let mut b = HistoryBuilder::new();
        for p in 0..3 {
            grant(&mut b, p, "a", true, "n1");
        }
        b.invoke(9, "check", json!({"key": "a"}));
        b.info(9, "check", json!({"key": "a"}));
        let _ = Value::Null;
        assert_eq!(check(&b.build(), 3).valid, Some(true));
    }
}
