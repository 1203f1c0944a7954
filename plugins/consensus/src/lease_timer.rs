//! The leader's lease clock, pure: which leases are due. Time is passed in (tokio's
//! `Instant` in the plugin, so tests can pause it).
//!
//! As in etcd, lease deadlines live only in the leader's memory: keep-alives reach the leader
//! and push a deadline back without a log entry; expiry is proposed through the log, so every
//! replica deletes the same keys at the same revision. A new leader gives every lease a full
//! TTL from the moment it takes over, so a lease may outlive its last keep-alive by up to
//! one TTL plus the election time; it never expires early.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// Deadlines of the leases the leader knows.
#[derive(Debug, Default)]
pub(crate) struct LeaseTimer {
    deadlines: HashMap<u64, Instant>,
    /// Term the deadlines were set in; a new term resets them all.
    term: Option<u64>,
}

impl LeaseTimer {
    /// Forget everything (this node is not the leader).
    pub(crate) fn clear(&mut self) {
        self.deadlines.clear();
        self.term = None;
    }

    /// Bring the deadlines in line with the leases in the state machine (`id -> ttl_ms`) as
    /// leader of `term`: a new term restarts every lease's TTL; new leases get a full TTL;
    /// leases gone from the state machine are dropped.
    pub(crate) fn sync(&mut self, term: u64, now: Instant, leases: &BTreeMap<u64, u64>) {
        if self.term != Some(term) {
            self.deadlines.clear();
            self.term = Some(term);
        }
        self.deadlines.retain(|id, _| leases.contains_key(id));
        for (id, ttl) in leases {
            self.deadlines
                .entry(*id)
                .or_insert_with(|| now + Duration::from_millis(*ttl));
        }
    }

    /// A keep-alive: the lease lives `ttl_ms` from `now`.
    pub(crate) fn keep_alive(&mut self, id: u64, ttl_ms: u64, now: Instant) {
        self.deadlines
            .insert(id, now + Duration::from_millis(ttl_ms));
    }

    /// A client's keep-alive, as etcd judges it: refused (false) once the lease's deadline
    /// has passed, even if its expiry is not applied yet, because the leader has then
    /// already decided (or is about to propose) that it is gone. Otherwise the lease lives
    /// `ttl_ms` from `now`. A lease without a deadline yet (a leader that has not synced it)
    /// gets one.
    pub(crate) fn renew(&mut self, id: u64, ttl_ms: u64, now: Instant) -> bool {
        match self.deadlines.get(&id) {
            Some(d) if *d <= now => false,
            _ => {
                self.keep_alive(id, ttl_ms, now);
                true
            }
        }
    }

    /// The earliest deadline, if any lease has one.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }

    /// Leases whose deadline has passed, sorted.
    pub(crate) fn expired(&self, now: Instant) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(id, _)| *id)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keepalive_after_the_deadline_is_refused_and_does_not_revive() {
        let mut t = LeaseTimer::default();
        let t0 = Instant::now();
        t.sync(1, t0, &[(7, 1000)].into());
        assert!(t.renew(7, 1000, t0 + Duration::from_millis(999)));
        let late = t0 + Duration::from_millis(999 + 1000);
        assert!(!t.renew(7, 1000, late), "renewed a lease past its deadline");
        assert_eq!(t.expired(late), [7]);
        // A lease the leader has no deadline for yet gets a full TTL.
        assert!(t.renew(8, 500, t0));
        assert!(t
            .expired(t0 + Duration::from_millis(499))
            .iter()
            .all(|id| *id != 8));
    }

    #[test]
    fn keepalive_expiry_and_new_term() {
        let mut t = LeaseTimer::default();
        let leases: BTreeMap<u64, u64> = [(1, 1000), (2, 3000)].into();
        let t0 = Instant::now();
        t.sync(5, t0, &leases);
        assert!(t.expired(t0).is_empty());
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(t.expired(t1), [1]);
        // A keep-alive at 900 ms pushes lease 1 to 1900 ms.
        t.keep_alive(1, 1000, t0 + Duration::from_millis(900));
        assert!(t.expired(t1).is_empty());
        assert_eq!(t.expired(t0 + Duration::from_millis(3000)), [1, 2]);
        // Same term: sync keeps deadlines; a new term restarts them.
        t.sync(5, t1, &leases);
        assert_eq!(t.expired(t0 + Duration::from_millis(1900)), [1]);
        t.sync(6, t1, &leases);
        assert!(t.expired(t0 + Duration::from_millis(1900)).is_empty());
        assert_eq!(t.expired(t1 + Duration::from_millis(1000)), [1]);
        // Revoked leases disappear.
        t.sync(6, t1, &[(2, 3000)].into());
        assert!(t.expired(t1 + Duration::from_millis(1000)).is_empty());
        t.clear();
        assert!(t.expired(t1 + Duration::from_secs(100)).is_empty());
    }
}
