//! `unique-ids`: clients ask random nodes of the `idgen` plugin for ids, one at a time or in
//! batches, while faults run. The checker verifies that every acknowledged id is unique
//! across the whole history, and that the ids each node acknowledged increase in real time:
//! an operation invoked on a node after another one on that node completed got only larger
//! ids (also across a restart of the node in between); within one answer ids increase.
//!
//! History shape: `next` with `{"n": N}` as invoke value and the list of ids (integers) as
//! ok value; the node is the event's `node` (the plugin never forwards: a node serves ids
//! from its own generator or refuses).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use dsys_plugin_idgen::layout::decode;
use dsys_plugin_idgen::{IdRequest, IdResponse, IdgenApi};
use dsys_runtime::{ClientError, RpcError};
use rand::Rng;
use serde_json::{json, Value};

use super::history::{EventType, History};
use super::{Ctx, Verdict, Worker, Workload};

/// Where an id was acknowledged.
#[derive(Clone, Debug)]
struct Seen {
    index: usize,
    process: u64,
    node: String,
}

/// Check a unique-ids history.
pub fn check(h: &History) -> Verdict {
    if let Err(e) = h.ops() {
        return Verdict::unknown(format!("malformed history: {e}"));
    }
    let mut seen: HashMap<u64, Seen> = HashMap::new();
    // Per node: the largest id of the operations completed so far, and where it came from.
    let mut done_max: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    // Open operations: process -> (node, the node's largest completed id at invoke).
    let mut open: HashMap<u64, (String, Option<(u64, usize)>)> = HashMap::new();
    let mut workers: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let (mut ok_ops, mut ids, mut failed, mut unknown) = (0u64, 0u64, 0u64, 0u64);
    let mut duplicates = Vec::new();
    let mut decreasing = Vec::new();
    let mut malformed = Vec::new();
    for e in &h.events {
        if e.f != "next" {
            continue;
        }
        let node = e.node.clone().unwrap_or_default();
        match e.kind {
            EventType::Invoke => {
                let floor = done_max.get(&node).copied();
                open.insert(e.process, (node, floor));
            }
            EventType::Fail => {
                failed += 1;
                open.remove(&e.process);
            }
            EventType::Info => {
                unknown += 1;
                open.remove(&e.process);
            }
            EventType::Ok => {
                let Some((inv_node, floor)) = open.remove(&e.process) else {
                    continue;
                };
                let node = if node.is_empty() { inv_node } else { node };
                let Some(list) = e.value.as_array() else {
                    return Verdict::unknown(format!("event {}: ids are not a list", e.index));
                };
                let mut got = Vec::with_capacity(list.len());
                for v in list {
                    match v.as_u64() {
                        Some(id) => got.push(id),
                        None => return Verdict::unknown(format!("event {}: bad id {v}", e.index)),
                    }
                }
                ok_ops += 1;
                ids += got.len() as u64;
                for (i, id) in got.iter().enumerate() {
                    match decode(*id) {
                        Ok(p) => {
                            workers.entry(node.clone()).or_default().insert(p.worker);
                        }
                        Err(err) => malformed.push(json!({
                            "id": id, "index": e.index, "node": node, "why": err.to_string(),
                        })),
                    }
                    if i > 0 && got[i - 1] >= *id {
                        decreasing.push(json!({
                            "node": node,
                            "index": e.index,
                            "why": "ids within one answer do not increase",
                            "id": id,
                            "after": got[i - 1],
                        }));
                    }
                    let here = Seen {
                        index: e.index,
                        process: e.process,
                        node: node.clone(),
                    };
                    if let Some(first) = seen.get(id) {
                        duplicates.push(json!({
                            "duplicate": id,
                            "first": {"index": first.index, "process": first.process, "node": first.node},
                            "again": {"index": here.index, "process": here.process, "node": here.node},
                        }));
                    } else {
                        seen.insert(*id, here);
                    }
                }
                if let (Some((max, from)), Some(min)) = (floor, got.iter().min()) {
                    if *min <= max {
                        decreasing.push(json!({
                            "node": node,
                            "index": e.index,
                            "why": "an operation invoked after another completed on the same node returned a smaller or equal id",
                            "id": min,
                            "earlier_max": max,
                            "earlier_index": from,
                        }));
                    }
                }
                if let Some(max) = got.iter().max() {
                    let slot = done_max.entry(node).or_insert((*max, e.index));
                    if *max > slot.0 {
                        *slot = (*max, e.index);
                    }
                }
            }
        }
    }
    let details = json!({
        "acknowledged_ops": ok_ops,
        "ids": ids,
        "failed_ops": failed,
        "unknown_ops": unknown,
        "duplicates": duplicates.len(),
        "decreasing": decreasing.len(),
        "malformed": malformed.len(),
        "worker_ids_per_node": workers,
    });
    if ok_ops == 0 {
        return Verdict::unknown("no id request was acknowledged".into());
    }
    if duplicates.is_empty() && decreasing.is_empty() && malformed.is_empty() {
        return Verdict::valid(
            format!("{ids} acknowledged ids in {ok_ops} answers: all unique, increasing per node"),
            details,
        );
    }
    let summary = format!(
        "{} duplicate ids, {} decreasing ids on a node, {} values that are not ids",
        duplicates.len(),
        decreasing.len(),
        malformed.len()
    );
    let violations = duplicates
        .into_iter()
        .take(10)
        .chain(decreasing.into_iter().take(10))
        .chain(malformed.into_iter().take(10))
        .collect();
    Verdict::invalid(summary, details, violations)
}

#[derive(Debug, Default)]
struct UniqueIds;

pub(crate) fn new() -> Box<dyn Workload> {
    Box::new(UniqueIds)
}

/// A refusal that certainly issued nothing: bad input, or a node without a worker id lease.
fn definitely_nothing(e: &ClientError) -> bool {
    match e {
        ClientError::Rpc(RpcError::Refused(_)) => true,
        ClientError::Rpc(RpcError::Unreachable(m)) => m.starts_with("idgen on "),
        _ => false,
    }
}

#[async_trait]
impl Workload for UniqueIds {
    fn claim(&self) -> String {
        "every id idgen acknowledged is unique across the run, and the ids each node \
         acknowledged increase in real-time order (also across its restarts)"
            .into()
    }

    async fn ready(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        match w.send::<IdgenApi>(ctx, &IdRequest::Next { n: 1 }).await.1 {
            Ok(IdResponse::Ids(_)) => Ok(()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn step(&self, ctx: &Ctx, w: &mut Worker) {
        // Another random node one time in five (each switch costs the client a new QUIC
        // connection), unless the last one was unreachable (then it probes).
        if !w.probe && w.rng.gen_range(0..5) == 0 {
            w.node = w.rng.gen_range(0..ctx.nodes.len());
        }
        let roll = w.rng.gen_range(0..100);
        let n: u32 = if roll < 60 {
            1
        } else if roll < 90 {
            w.rng.gen_range(2..=50)
        } else {
            w.rng.gen_range(51..=500)
        };
        let node = w.invoke(ctx, "next", json!({ "n": n })).await;
        let want = ctx.nodes[node].0.clone();
        match w
            .send_to::<IdgenApi>(ctx, node, &IdRequest::Next { n })
            .await
            .1
        {
            Ok(IdResponse::Ids(b)) if b.node == want && b.len() == u64::from(n) => {
                let ids: Vec<u64> = b.ids().collect();
                w.complete(ctx, EventType::Ok, "next", json!(ids), None)
            }
            Ok(other) => w.complete(
                ctx,
                EventType::Info,
                "next",
                Value::Null,
                Some(format!("unexpected answer {other:?}")),
            ),
            Err(err) => {
                let kind = if definitely_nothing(&err) {
                    EventType::Fail
                } else {
                    super::classify(&err, true)
                };
                w.complete(ctx, kind, "next", Value::Null, Some(err.to_string()))
            }
        }
    }

    fn check(&self, h: &History) -> Verdict {
        check(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::{Event, HistoryBuilder};
    use dsys_plugin_idgen::layout::{encode, Parts};

    fn id(time: u64, worker: u16, seq: u32) -> u64 {
        encode(Parts { time, worker, seq }).expect("id")
    }

    /// Put `node` on every event of `h` listed in `at` (the builder leaves it empty).
    fn on(mut h: History, at: &[(usize, &str)]) -> History {
        for (i, n) in at {
            let e: &mut Event = &mut h.events[*i];
            e.node = Some(n.to_string());
        }
        h
    }

    #[test]
    fn unique_and_increasing_is_valid_concurrent_overlap_allowed() {
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 2}))
            .invoke(1, "next", json!({"n": 1}))
            // Concurrent on n1: process 1's id is below process 0's; they overlap, so fine.
            .ok(0, "next", json!([id(10, 1, 0), id(10, 1, 1)]))
            .ok(1, "next", json!([id(9, 1, 5)]))
            .invoke(2, "next", json!({"n": 1}))
            .ok(2, "next", json!([id(11, 1, 0)]))
            .invoke(3, "next", json!({"n": 1}))
            .ok(3, "next", json!([id(5, 2, 0)]))
            .invoke(4, "next", json!({"n": 1}))
            .fail(4, "next", Value::Null)
            .build();
        let h = on(
            h,
            &[
                (0, "n1"),
                (1, "n1"),
                (2, "n1"),
                (3, "n1"),
                (4, "n1"),
                (5, "n1"),
                (6, "n2"),
                (7, "n2"),
                (8, "n1"),
                (9, "n1"),
            ],
        );
        let v = check(&h);
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["ids"], json!(5));
        assert_eq!(v.details["failed_ops"], json!(1));
    }

    #[test]
    fn a_duplicate_id_across_nodes_is_invalid() {
        let dup = id(20, 3, 7);
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 2}))
            .ok(0, "next", json!([id(19, 3, 0), dup]))
            .invoke(1, "next", json!({"n": 1}))
            .ok(1, "next", json!([dup]))
            .build();
        let h = on(h, &[(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")]);
        let v = check(&h);
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert_eq!(v.details["duplicates"], json!(1));
        assert_eq!(v.violations[0]["duplicate"], json!(dup));
        assert_eq!(v.violations[0]["first"]["node"], json!("n1"));
        assert_eq!(v.violations[0]["again"]["node"], json!("n2"));
    }

    #[test]
    fn a_decreasing_id_on_one_node_is_invalid() {
        // Process 1 asks n1 after process 0's answer from n1 came back, and gets a smaller id
        // (as a node restarted with a clock behind its previous run would).
        let answers = || {
            HistoryBuilder::new()
                .invoke(0, "next", json!({"n": 1}))
                .ok(0, "next", json!([id(100, 4, 0)]))
                .invoke(1, "next", json!({"n": 1}))
                .ok(1, "next", json!([id(99, 6, 0)]))
                .build()
        };
        let h = on(answers(), &[(0, "n1"), (1, "n1"), (2, "n1"), (3, "n1")]);
        let v = check(&h);
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert_eq!(v.details["decreasing"], json!(1));
        assert_eq!(v.violations[0]["earlier_max"], json!(id(100, 4, 0)));
        // The same two answers from different nodes are fine.
        let h = on(answers(), &[(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")]);
        assert_eq!(check(&h).valid, Some(true));
    }

    #[test]
    fn a_batch_out_of_order_and_a_non_id_are_invalid() {
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 2}))
            .ok(0, "next", json!([id(8, 1, 1), id(8, 1, 0)]))
            .build();
        assert_eq!(check(&h).valid, Some(false));
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 1}))
            .ok(0, "next", json!([u64::MAX]))
            .build();
        let v = check(&h);
        assert_eq!(v.valid, Some(false));
        assert_eq!(v.details["malformed"], json!(1));
    }

    #[test]
    fn nothing_acknowledged_or_malformed_is_unknown() {
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 1}))
            .info(0, "next", Value::Null)
            .build();
        assert_eq!(check(&h).valid, None);
        let h = HistoryBuilder::new()
            .invoke(0, "next", json!({"n": 1}))
            .ok(0, "next", json!("x"))
            .build();
        assert_eq!(check(&h).valid, None);
    }
}
