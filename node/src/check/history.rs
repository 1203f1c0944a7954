//! The history of a check run: every client operation as an `invoke` event followed by its
//! completion (`ok`, `fail` = definitely had no effect, `info` = outcome unknown), stamped
//! with a monotonic clock, plus the faults the nemesis applied. Checkers read only this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What an event says about an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The client is about to send the operation.
    Invoke,
    /// It took effect, with this result.
    Ok,
    /// It definitely did not take effect.
    Fail,
    /// Unknown: it may or may not have taken effect (timeout, lost connection).
    Info,
}

/// One event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the history (real-time order).
    pub index: usize,
    /// The logical client process; a process that saw an `info` continues under a new id.
    pub process: u64,
    /// Invoke or completion.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The operation's name (`read`, `write`, `cas`, `add`, `check`...).
    pub f: String,
    /// Arguments (invoke) or result (completion); the workload defines the shape.
    pub value: serde_json::Value,
    /// Nanoseconds since the run started (monotonic clock).
    pub time_ns: u64,
    /// The node the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Why it failed or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One fault the nemesis applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// `kill`, `pause`, `partition` or `delay`.
    pub kind: String,
    /// Nodes it hit.
    pub nodes: Vec<String>,
    /// Human description (e.g. the partition's groups).
    pub detail: String,
    /// When it was applied (ns since start).
    pub start_ns: u64,
    /// When it was undone.
    pub end_ns: Option<u64>,
    /// When every node again saw every other alive after it was undone.
    pub recovered_ns: Option<u64>,
}

/// A whole run's history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Client events, in real-time order.
    pub events: Vec<Event>,
    /// Faults, in the order applied.
    pub faults: Vec<Fault>,
}

/// One operation: an invoke and, unless the run ended first, its completion.
#[derive(Clone, Debug)]
pub struct Op<'a> {
    /// Process.
    pub process: u64,
    /// The invoke event.
    pub invoke: &'a Event,
    /// The completion (None: still pending at the end, treated as unknown).
    pub complete: Option<&'a Event>,
}

impl Op<'_> {
    /// The completion type (`Info` when pending).
    pub fn outcome(&self) -> EventType {
        self.complete.map(|c| c.kind).unwrap_or(EventType::Info)
    }

    /// Latest time the operation could have taken effect (end of run when pending).
    pub fn end_ns(&self) -> u64 {
        self.complete.map(|c| c.time_ns).unwrap_or(u64::MAX)
    }
}

impl History {
    /// Pair invokes with completions. A history where a process invokes twice without a
    /// completion in between, or completes without an invoke, is malformed.
    pub fn ops(&self) -> Result<Vec<Op<'_>>, String> {
        let mut open: BTreeMap<u64, usize> = BTreeMap::new();
        let mut ops: Vec<Op<'_>> = Vec::new();
        let mut last_time = 0;
        for e in &self.events {
            if e.time_ns < last_time {
                return Err(format!("event {} goes back in time", e.index));
            }
            last_time = e.time_ns;
            match e.kind {
                EventType::Invoke => {
                    if open.contains_key(&e.process) {
                        return Err(format!(
                            "process {} invokes at event {} with an operation still open",
                            e.process, e.index
                        ));
                    }
                    open.insert(e.process, ops.len());
                    ops.push(Op {
                        process: e.process,
                        invoke: e,
                        complete: None,
                    });
                }
                _ => {
                    let Some(i) = open.remove(&e.process) else {
                        return Err(format!(
                            "process {} completes at event {} without an invoke",
                            e.process, e.index
                        ));
                    };
                    if ops[i].invoke.f != e.f {
                        return Err(format!(
                            "event {}: completion `{}` of invoke `{}`",
                            e.index, e.f, ops[i].invoke.f
                        ));
                    }
                    ops[i].complete = Some(e);
                }
            }
        }
        Ok(ops)
    }
}

/// The live recorder: events get their index and timestamp under one lock, so index order is
/// time order.
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    start: Instant,
    inner: Arc<Mutex<History>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Recorder {
            start: Instant::now(),
            inner: Arc::new(Mutex::new(History::default())),
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn event(
        &self,
        process: u64,
        kind: EventType,
        f: &str,
        value: serde_json::Value,
        node: Option<&str>,
        error: Option<String>,
    ) {
        let mut h = self.lock();
        let index = h.events.len();
        let time_ns = self.now_ns();
        h.events.push(Event {
            index,
            process,
            kind,
            f: f.to_string(),
            value,
            time_ns,
            node: node.map(str::to_string),
            error,
        });
    }

    /// Record a fault; returns its index for [`Recorder::fault_ended`].
    pub(crate) fn fault(&self, kind: &str, nodes: Vec<String>, detail: String) -> usize {
        let mut h = self.lock();
        let start_ns = self.now_ns();
        h.faults.push(Fault {
            kind: kind.to_string(),
            nodes,
            detail,
            start_ns,
            end_ns: None,
            recovered_ns: None,
        });
        h.faults.len() - 1
    }

    pub(crate) fn fault_ended(&self, i: usize) {
        let t = self.now_ns();
        if let Some(f) = self.lock().faults.get_mut(i) {
            f.end_ns = Some(t);
        }
    }

    pub(crate) fn fault_recovered(&self, i: usize) {
        let t = self.now_ns();
        if let Some(f) = self.lock().faults.get_mut(i) {
            f.recovered_ns = Some(t);
        }
    }

    pub(crate) fn snapshot(&self) -> History {
        self.lock().clone()
    }
}

/// Build histories by hand (checker tests): `b.invoke(p, f, v)`, `b.ok(p, f, v)`...; each
/// event one microsecond after the previous.
#[derive(Debug, Default)]
pub struct HistoryBuilder {
    h: History,
}

impl HistoryBuilder {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, process: u64, kind: EventType, f: &str, value: serde_json::Value) {
        let index = self.h.events.len();
        self.h.events.push(Event {
            index,
            process,
            kind,
            f: f.to_string(),
            value,
            time_ns: (index as u64 + 1) * 1000,
            node: None,
            error: None,
        });
    }

    /// An invoke.
    pub fn invoke(&mut self, p: u64, f: &str, v: serde_json::Value) -> &mut Self {
        self.push(p, EventType::Invoke, f, v);
        self
    }
    /// An ok completion.
    pub fn ok(&mut self, p: u64, f: &str, v: serde_json::Value) -> &mut Self {
        self.push(p, EventType::Ok, f, v);
        self
    }
    /// A fail completion.
    pub fn fail(&mut self, p: u64, f: &str, v: serde_json::Value) -> &mut Self {
        self.push(p, EventType::Fail, f, v);
        self
    }
    /// An info (unknown) completion.
    pub fn info(&mut self, p: u64, f: &str, v: serde_json::Value) -> &mut Self {
        self.push(p, EventType::Info, f, v);
        self
    }
    /// A fault over the events so far from `from_event` (times as in the builder).
    pub fn fault(
        &mut self,
        kind: &str,
        nodes: &[&str],
        start_ns: u64,
        recovered_ns: u64,
    ) -> &mut Self {
        self.h.faults.push(Fault {
            kind: kind.into(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            detail: String::new(),
            start_ns,
            end_ns: Some(recovered_ns),
            recovered_ns: Some(recovered_ns),
        });
        self
    }
    /// The time of the next event.
    pub fn next_time_ns(&self) -> u64 {
        (self.h.events.len() as u64 + 1) * 1000
    }
    /// The history.
    pub fn build(&self) -> History {
        self.h.clone()
    }
}
