//! Sliding counter: the classic approximation of a sliding window from two
//! aligned fixed windows.
//!
//! With `e = now % window_ms` the time into the current window, the estimate is
//! `current + previous * (window_ms - e) / window_ms`, and a request passes when
//! `estimate + cost <= limit`. The comparison is done multiplied through by
//! `window_ms`, in `u128`, so it is exact (no floats, no rounding).
//!
//! As cheap as the fixed window, without its double burst at boundaries; it
//! assumes the previous window's grants were spread evenly, so it may grant
//! somewhat more than `limit` in a sliding interval (never more in one aligned
//! window, and never more than `2 * limit` in any `window_ms`).

use super::{sat_u64, too_costly, Decision};

/// State of one sliding counter (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlidingCounter {
    limit: u64,
    window_ms: u64,
    /// Index (`time / window_ms`) of the current window.
    window: u64,
    /// Units granted in `window`. Invariant: `current <= limit`.
    current: u64,
    /// Units granted in window `window - 1`. Invariant: `previous <= limit`.
    previous: u64,
    /// Latest time seen; earlier times are treated as this one.
    last_ms: u64,
}

impl SlidingCounter {
    /// Empty counters at `now_ms`; `window_ms` must be at least 1.
    pub(super) fn new(limit: u64, window_ms: u64, now_ms: u64) -> Self {
        SlidingCounter {
            limit,
            window_ms,
            window: now_ms / window_ms,
            current: 0,
            previous: 0,
            last_ms: now_ms,
        }
    }

    /// `(window, current, previous)` as of `now_ms` (at least the latest time seen).
    fn counts_at(&self, now_ms: u64) -> (u64, u64, u64) {
        let window = now_ms / self.window_ms;
        if window == self.window {
            (window, self.current, self.previous)
        } else if Some(window) == self.window.checked_add(1) {
            (window, 0, self.current)
        } else {
            (window, 0, 0)
        }
    }

    /// The estimate times `window_ms`, at `e` ms into the current window.
    fn weighted(&self, e: u64) -> u128 {
        let w = u128::from(self.window_ms);
        // Each product is below 2^128; only their sum can overflow, for absurd
        // unvalidated rules, and saturating there only makes the limiter stricter.
        (u128::from(self.current) * w)
            .saturating_add(u128::from(self.previous) * (w - u128::from(e)))
    }

    /// Units of cost 1 still allowed at `e` ms into the current window.
    fn remaining(&self, e: u64) -> u64 {
        let w = u128::from(self.window_ms);
        let capacity = u128::from(self.limit) * w;
        sat_u64(capacity.saturating_sub(self.weighted(e)) / w)
    }

    /// Ms until the estimate is back to 0, at `e` ms into the current window.
    fn reset_ms(&self, e: u64) -> u64 {
        let to_next = u128::from(self.window_ms - e);
        if self.current > 0 {
            sat_u64(to_next + u128::from(self.window_ms))
        } else if self.previous > 0 {
            sat_u64(to_next)
        } else {
            0
        }
    }

    /// Ms until `0 < cost <= limit` would pass, at `e` ms into the current window,
    /// given that it does not pass now.
    fn retry_after_ms(&self, e: u64, cost: u64) -> u64 {
        let w = u128::from(self.window_ms);
        let to_next = w - u128::from(e);
        // Still in this window: the previous window's weight `w - e - d` must
        // fall to `slack / previous`. Denied now, so `previous > 0` here.
        if let Some(left) = self.limit.checked_sub(self.current.saturating_add(cost)) {
            let slack = u128::from(left) * w;
            let weight = slack / u128::from(self.previous.max(1));
            let wait = to_next.saturating_sub(weight);
            if wait < to_next {
                return sat_u64(wait);
            }
        }
        // In the next window, `current` becomes the previous count, and its
        // weight `w - d` must fall to `(limit - cost) * w / current`.
        let wait_there = if self.current == 0 {
            0
        } else {
            let slack = u128::from(self.limit - cost) * w;
            w.saturating_sub(slack / u128::from(self.current))
        };
        sat_u64(to_next + wait_there)
    }

    /// See [`Limiter::check`](super::Limiter::check).
    pub(super) fn check(&mut self, now_ms: u64, cost: u64) -> Decision {
        let now_ms = now_ms.max(self.last_ms);
        self.last_ms = now_ms;
        (self.window, self.current, self.previous) = self.counts_at(now_ms);
        let e = now_ms % self.window_ms;
        if cost > self.limit {
            return too_costly(
                self.limit,
                self.window_ms,
                self.remaining(e),
                self.reset_ms(e),
            );
        }
        let w = u128::from(self.window_ms);
        let wanted = self.weighted(e).saturating_add(u128::from(cost) * w);
        if wanted <= u128::from(self.limit) * w {
            // wanted <= limit * w implies current + cost <= limit.
            self.current += cost;
            Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.remaining(e),
                retry_after_ms: 0,
                reset_ms: self.reset_ms(e),
            }
        } else {
            Decision {
                allowed: false,
                limit: self.limit,
                remaining: self.remaining(e),
                retry_after_ms: self.retry_after_ms(e, cost),
                reset_ms: self.reset_ms(e),
            }
        }
    }

    /// See [`Limiter::is_idle`](super::Limiter::is_idle).
    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        let (_, current, previous) = self.counts_at(now_ms.max(self.last_ms));
        current == 0 && previous == 0
    }
}
