//! `set`: every client adds unique elements to a set kept in `kv` (each element its own key
//! under the run's prefix, written with the default W). After healing, when no node holds
//! undelivered hints, the check measures convergence (time from the heal until every owner
//! of every written key holds the same version, by `KvRequest::Compare`), then the final
//! read gets every element with the configured R, through every node in turn: the path a
//! user reads through, not a scan of every node's copies. Every acknowledged add must be in
//! the final read.
//!
//! History shape: `add` with the element (integer) as value; `read` whose ok value is the
//! list of elements found. Lost = acknowledged adds not read; unexpected = elements read that
//! were never added or whose add definitely failed; recovered = adds of unknown outcome that
//! were read.

use std::collections::BTreeSet;

use async_trait::async_trait;
use std::time::Duration;

use dsys_plugin_kv::{KvApi, KvRequest, KvResponse, MAX_BATCH};
use serde_json::{json, Value};

use super::history::{EventType, History};
use super::{Ctx, Verdict, Worker, Workload};

/// Elements per key bucket (keeps a run's keys in groups a scan can list).
const BUCKET: u64 = 5000;
/// Concurrent final reads per node.
const READ_LANES_PER_NODE: u64 = 4;
/// How long one element's final get is retried before the read fails.
const READ_RETRY: Duration = Duration::from_secs(30);

/// Check a set history.
pub fn check(h: &History) -> Verdict {
    let ops = match h.ops() {
        Ok(o) => o,
        Err(e) => return Verdict::unknown(format!("malformed history: {e}")),
    };
    let mut attempted = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut failed = BTreeSet::new();
    let mut unsure = BTreeSet::new();
    let mut read: BTreeSet<u64> = BTreeSet::new();
    let mut reads = 0;
    for op in &ops {
        match op.invoke.f.as_str() {
            "add" => {
                let Some(e) = op.invoke.value.as_u64() else {
                    return Verdict::unknown(format!("event {}: bad element", op.invoke.index));
                };
                attempted.insert(e);
                match op.outcome() {
                    EventType::Ok => acked.insert(e),
                    EventType::Fail => failed.insert(e),
                    _ => unsure.insert(e),
                };
            }
            "read" if op.outcome() == EventType::Ok => {
                reads += 1;
                let Some(c) = op.complete else { continue };
                let Some(list) = c.value.as_array() else {
                    return Verdict::unknown(format!("event {}: read is not a list", c.index));
                };
                for v in list {
                    match v.as_u64() {
                        Some(e) => {
                            read.insert(e);
                        }
                        None => {
                            return Verdict::unknown(format!("event {}: bad element {v}", c.index))
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if reads == 0 {
        return Verdict::unknown("no final read succeeded".into());
    }
    let lost: Vec<u64> = acked.difference(&read).copied().collect();
    let unexpected: Vec<u64> = read
        .iter()
        .filter(|e| !attempted.contains(*e) || failed.contains(*e))
        .copied()
        .collect();
    let recovered = unsure.intersection(&read).count();
    let details = json!({
        "attempted": attempted.len(),
        "acknowledged": acked.len(),
        "failed": failed.len(),
        "unknown": unsure.len(),
        "read": read.len(),
        "lost": lost.len(),
        "unexpected": unexpected.len(),
        "recovered": recovered,
    });
    if lost.is_empty() && unexpected.is_empty() {
        return Verdict::valid(
            format!(
                "all {} acknowledged adds read back ({} of {} unknown adds recovered)",
                acked.len(),
                recovered,
                unsure.len()
            ),
            details,
        );
    }
    let mut violations = Vec::new();
    for e in lost.iter().take(10) {
        if let Some(op) = ops
            .iter()
            .find(|o| o.invoke.f == "add" && o.invoke.value.as_u64() == Some(*e))
        {
            violations.push(json!({
                "lost": e,
                "process": op.process,
                "node": op.invoke.node,
                "invoke_index": op.invoke.index,
                "invoke_s": op.invoke.time_ns as f64 / 1e9,
                "ack_index": op.complete.map(|c| c.index),
                "ack_s": op.complete.map(|c| c.time_ns as f64 / 1e9),
            }));
        }
    }
    for e in unexpected.iter().take(10) {
        violations.push(json!({
            "unexpected": e,
            "why": if failed.contains(e) { "its add failed definitely" } else { "never added" },
        }));
    }
    Verdict::invalid(
        format!(
            "{} acknowledged adds lost, {} unexpected elements",
            lost.len(),
            unexpected.len()
        ),
        details,
        violations,
    )
}

#[derive(Debug, Default)]
struct Set;

pub(crate) fn new() -> Box<dyn Workload> {
    Box::new(Set)
}

fn key(ctx: &Ctx, e: u64) -> String {
    format!("{}/set/{:05}/{e:09}", ctx.run_id, e / BUCKET)
}

#[async_trait]
impl Workload for Set {
    fn claim(&self) -> String {
        "every add kv acknowledged (W of N replicas, hints included) is in the final read after \
         healing: a get of every element at the configured R, through every node in turn"
            .into()
    }

    async fn ready(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        let req = KvRequest::Get {
            key: format!("{}/ready", ctx.run_id),
            r: None,
        };
        match w.send::<KvApi>(ctx, &req).await.1 {
            Ok(KvResponse::Value { .. }) => Ok(()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn step(&self, ctx: &Ctx, w: &mut Worker) {
        let e = ctx
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = KvRequest::Put {
            key: key(ctx, e),
            value: e.to_string().into_bytes(),
            w: None,
        };
        let node = w.invoke(ctx, "add", json!(e)).await;
        match w.send_to::<KvApi>(ctx, node, &req).await.1 {
            Ok(KvResponse::Written { .. }) => w.complete(ctx, EventType::Ok, "add", json!(e), None),
            Ok(other) => w.complete(
                ctx,
                EventType::Info,
                "add",
                json!(e),
                Some(format!("unexpected answer {other:?}")),
            ),
            Err(err) => {
                let kind = super::classify(&err, true);
                w.complete(ctx, kind, "add", json!(e), Some(err.to_string()))
            }
        }
    }

    async fn finish(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        // Hinted writes count as acknowledged: wait until every node has delivered its hints.
        let hints_done = super::wait_for(Duration::from_secs(60), || async {
            let mut held = 0;
            for (id, addr) in &ctx.nodes {
                match w.client.call_at::<KvApi>(*addr, &KvRequest::Stats).await {
                    Ok(KvResponse::Stats(s)) => held += s.hints,
                    Ok(other) => return Err(format!("{id}: unexpected answer {other:?}")),
                    Err(e) => return Err(format!("{id}: {e}")),
                }
            }
            if held == 0 {
                Ok(())
            } else {
                Err(format!("{held} hints still held"))
            }
        })
        .await;
        if let Err(e) = &hints_done {
            eprintln!("note: hints not all delivered within 60 s ({e}); reading anyway");
        }
        let total = ctx.counter.load(std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<String> = (0..total).map(|e| key(ctx, e)).collect();
        // Convergence: until every owner of every written key holds the same version.
        let converged = super::wait_for(Duration::from_secs(120), || async {
            let mut differ = 0;
            for chunk in keys.chunks(MAX_BATCH) {
                let req = KvRequest::Compare(chunk.to_vec());
                match w.client.call_at::<KvApi>(ctx.nodes[0].1, &req).await {
                    Ok(KvResponse::Keys(k)) => differ += k.len(),
                    Ok(other) => return Err(format!("unexpected answer {other:?}")),
                    Err(e) => return Err(e.to_string()),
                }
            }
            if differ == 0 {
                Ok(())
            } else {
                Err(format!("the owners of {differ} keys still disagree"))
            }
        })
        .await;
        let after = ctx
            .now_ns()
            .saturating_sub(ctx.healed_ns.load(std::sync::atomic::Ordering::Relaxed));
        ctx.measure(
            "convergence",
            match converged {
                Ok(()) => format!(
                    "every owner of all {total} keys holds the same version {:.1} s after the heal",
                    after as f64 / 1e9
                ),
                Err(e) => format!(
                    "not converged {:.0} s after the heal: {e}",
                    after as f64 / 1e9
                ),
            },
        );
        // The final read: every element with `get` at the configured R, the path a user
        // reads through, spread over every node.
        w.invoke(ctx, "read", Value::Null).await;
        let mut tasks = tokio::task::JoinSet::new();
        // Each lane reads through one node on its own connection; lanes cover every node.
        let lanes = READ_LANES_PER_NODE * ctx.nodes.len() as u64;
        for lane in 0..lanes {
            let addr = ctx.nodes[lane as usize % ctx.nodes.len()].1;
            let client = dsys_runtime::Client::new(&ctx.identity, vec![addr], ctx.timeout)
                .map_err(|e| format!("client: {e}"))?;
            let todo: Vec<(u64, String)> = (lane..total)
                .step_by(lanes as usize)
                .map(|e| (e, key(ctx, e)))
                .collect();
            tasks.spawn(async move {
                let mut found = Vec::new();
                for (e, key) in todo {
                    let req = KvRequest::Get { key, r: None };
                    // A get that finds too few replicas answering (a loaded machine, a node
                    // still catching up) is retried as a user would; only an answer counts.
                    let got = super::wait_for(READ_RETRY, || async {
                        match client.call_at::<KvApi>(addr, &req).await {
                            Ok(KvResponse::Value { version, .. }) => Ok(version),
                            other => Err(format!("get of {e} through {addr}: {other:?}")),
                        }
                    })
                    .await?;
                    if got.is_some_and(|v| v.value.is_some()) {
                        found.push(e);
                    }
                }
                Ok(found)
            });
        }
        let mut found = BTreeSet::new();
        let mut failure = None;
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(f)) => found.extend(f),
                Ok(Err(e)) => failure = Some(e),
                Err(e) => failure = Some(format!("a reader panicked: {e}")),
            }
        }
        if let Some(msg) = failure {
            w.complete(ctx, EventType::Fail, "read", Value::Null, Some(msg.clone()));
            return Err(msg);
        }
        let list: Vec<u64> = found.into_iter().collect();
        w.complete(ctx, EventType::Ok, "read", json!(list), None);
        Ok(())
    }

    fn check(&self, h: &History) -> Verdict {
        check(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::HistoryBuilder;

    #[test]
    fn all_acknowledged_adds_read_is_valid() {
        let h = HistoryBuilder::new()
            .invoke(0, "add", json!(1))
            .ok(0, "add", json!(1))
            .invoke(1, "add", json!(2))
            .info(1, "add", json!(2))
            .invoke(2, "add", json!(3))
            .fail(2, "add", json!(3))
            .invoke(0, "read", Value::Null)
            .ok(0, "read", json!([1, 2]))
            .build();
        let v = check(&h);
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["recovered"], json!(1));
    }

    #[test]
    fn lost_add_is_caught() {
        let h = HistoryBuilder::new()
            .invoke(0, "add", json!(1))
            .ok(0, "add", json!(1))
            .invoke(1, "add", json!(2))
            .ok(1, "add", json!(2))
            .invoke(0, "read", Value::Null)
            .ok(0, "read", json!([1]))
            .build();
        let v = check(&h);
        assert_eq!(v.valid, Some(false));
        assert_eq!(v.details["lost"], json!(1));
        assert_eq!(v.violations[0]["lost"], json!(2));
    }

    #[test]
    fn unexpected_and_failed_elements_are_caught() {
        let h = HistoryBuilder::new()
            .invoke(0, "add", json!(1))
            .fail(0, "add", json!(1))
            .invoke(0, "read", Value::Null)
            .ok(0, "read", json!([1, 7]))
            .build();
        let v = check(&h);
        assert_eq!(v.valid, Some(false));
        assert_eq!(v.details["unexpected"], json!(2));
    }

    #[test]
    fn no_final_read_is_unknown() {
        let h = HistoryBuilder::new()
            .invoke(0, "add", json!(1))
            .ok(0, "add", json!(1))
            .invoke(0, "read", Value::Null)
            .fail(0, "read", Value::Null)
            .build();
        assert_eq!(check(&h).valid, None);
    }
}
