//! What happened on the cluster, as one node saw it: membership changes, chaos actions,
//! plugin restarts and whatever plugins choose to record (a new Raft leader, say). A bounded
//! ring of recent events for the dashboard's timeline, and a broadcast of new ones so the
//! page updates as they happen.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Events kept for the dashboard.
const KEEP: usize = 500;
/// Longest detail text kept.
const MAX_DETAIL: usize = 300;

/// One entry of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEvent {
    /// Number of this event on this node, from 1.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the UNIX epoch.
    pub at_ms: u64,
    /// `member`, `chaos`, `plugin`, or a plugin's own name.
    pub kind: String,
    /// Node it is about.
    pub node: String,
    /// What happened.
    pub detail: String,
}

/// A node's recent events.
#[derive(Debug)]
pub struct Timeline {
    inner: Mutex<(u64, VecDeque<TimelineEvent>)>,
    tx: broadcast::Sender<TimelineEvent>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline {
            inner: Mutex::new((0, VecDeque::with_capacity(KEEP))),
            tx: broadcast::channel(256).0,
        }
    }
}

/// Milliseconds since the UNIX epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Timeline {
    /// Record an event.
    pub fn record(&self, kind: &str, node: &str, detail: impl Into<String>) {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        let ev = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.0 += 1;
            let ev = TimelineEvent {
                seq: g.0,
                at_ms: now_ms(),
                kind: kind.to_string(),
                node: node.to_string(),
                detail,
            };
            if g.1.len() == KEEP {
                g.1.pop_front();
            }
            g.1.push_back(ev.clone());
            ev
        };
        let _ = self.tx.send(ev);
    }

    /// Events with a sequence number above `after`, oldest first.
    pub fn since(&self, after: u64) -> Vec<TimelineEvent> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().filter(|e| e.seq > after).cloned().collect()
    }

    /// New events as they are recorded.
    pub fn subscribe(&self) -> broadcast::Receiver<TimelineEvent> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_in_order_and_cuts_long_details() {
        let t = Timeline::default();
        let mut rx = t.subscribe();
        t.record("member", "n1", "first");
        assert_eq!(rx.try_recv().map(|e| e.seq).ok(), Some(1));
        for i in 1..(KEEP + 10) {
            t.record("member", "n1", format!("event {i}"));
        }
        let all = t.since(0);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all[0].seq, 11);
        assert_eq!(all.last().map(|e| e.seq), Some((KEEP + 10) as u64));
        assert!(all.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        assert_eq!(t.since((KEEP + 8) as u64).len(), 2);
        t.record("chaos", "n2", "é".repeat(400));
        let last = t.since(0).pop().expect("recorded");
        assert!(last.detail.len() <= MAX_DETAIL && last.detail.chars().all(|c| c == 'é'));
    }
}
