//! Sliding log: at most `limit` units granted in any half-open interval
//! `(now - window_ms, now]`, exactly.
//!
//! Keeps the time of every granted unit still inside the window, oldest first.
//! Units granted at the same millisecond share one entry `(time, units)`, so the
//! log holds at most `limit` entries (and far fewer under bursts); this is why
//! [`Rule::validate`](super::Rule::validate) caps `limit` lower for this algorithm.

use std::collections::VecDeque;

use super::{sat_u64, too_costly, Decision};

/// State of one sliding log (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingLog {
    limit: u64,
    window_ms: u64,
    /// `(time, units)` of grants, times strictly increasing, all `units > 0`.
    /// Invariant: after [`SlidingLog::expire`], the units sum to `used <= limit`.
    log: VecDeque<(u64, u64)>,
    /// Sum of the units in `log`.
    used: u64,
    /// Latest time seen; earlier times are treated as this one.
    last_ms: u64,
}

impl SlidingLog {
    /// An empty log at `now_ms`; `window_ms` must be at least 1.
    pub(super) fn new(limit: u64, window_ms: u64, now_ms: u64) -> Self {
        SlidingLog {
            limit,
            window_ms,
            log: VecDeque::new(),
            used: 0,
            last_ms: now_ms,
        }
    }

    /// Whether a grant at `time` has left the window `(now_ms - window_ms, now_ms]`.
    fn expired(&self, time: u64, now_ms: u64) -> bool {
        now_ms >= self.window_ms && time <= now_ms - self.window_ms
    }

    /// Ms from `now_ms` until a grant at `time` (still in the window) leaves it.
    fn until_expired(&self, time: u64, now_ms: u64) -> u64 {
        // time > now_ms - window_ms, so this is at least 1; in u128 it cannot overflow.
        sat_u64(u128::from(time) + u128::from(self.window_ms) - u128::from(now_ms))
    }

    /// Drops grants that have left the window at `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while let Some(&(time, units)) = self.log.front() {
            if !self.expired(time, now_ms) {
                break;
            }
            self.log.pop_front();
            self.used -= units;
        }
    }

    /// Ms until every grant has left the window.
    fn reset_ms(&self, now_ms: u64) -> u64 {
        self.log
            .back()
            .map_or(0, |&(time, _)| self.until_expired(time, now_ms))
    }

    /// See [`Limiter::check`](super::Limiter::check).
    pub(super) fn check(&mut self, now_ms: u64, cost: u64) -> Decision {
        let now_ms = now_ms.max(self.last_ms);
        self.last_ms = now_ms;
        self.expire(now_ms);
        let remaining = self.limit - self.used;
        if cost > self.limit {
            return too_costly(self.limit, self.window_ms, remaining, self.reset_ms(now_ms));
        }
        if cost <= remaining {
            if cost > 0 {
                match self.log.back_mut() {
                    Some((time, units)) if *time == now_ms => *units += cost,
                    _ => self.log.push_back((now_ms, cost)),
                }
                self.used += cost;
            }
            Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.limit - self.used,
                retry_after_ms: 0,
                reset_ms: self.reset_ms(now_ms),
            }
        } else {
            // Wait for the oldest grants to expire until `cost` fits.
            let mut to_free = cost - remaining;
            let mut retry_after_ms = 0;
            for &(time, units) in &self.log {
                retry_after_ms = self.until_expired(time, now_ms);
                if units >= to_free {
                    break;
                }
                to_free -= units;
            }
            Decision {
                allowed: false,
                limit: self.limit,
                remaining,
                retry_after_ms,
                reset_ms: self.reset_ms(now_ms),
            }
        }
    }

    /// See [`Limiter::is_idle`](super::Limiter::is_idle).
    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        let now_ms = now_ms.max(self.last_ms);
        self.log
            .back()
            .is_none_or(|&(time, _)| self.expired(time, now_ms))
    }
}
