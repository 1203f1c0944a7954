//! Fixed window: at most `limit` units per window, windows aligned to multiples
//! of `window_ms` since time 0 (`[k * window_ms, (k + 1) * window_ms)`).
//!
//! Cheap (two integers) but bursty: up to `2 * limit` can pass around a window
//! boundary.

use super::{too_costly, Decision};

/// State of one fixed-window counter (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedWindow {
    limit: u64,
    window_ms: u64,
    /// Index (`time / window_ms`) of the window `count` belongs to.
    window: u64,
    /// Units granted in `window`. Invariant: `count <= limit`.
    count: u64,
    /// Latest time seen; earlier times are treated as this one.
    last_ms: u64,
}

impl FixedWindow {
    /// An empty counter at `now_ms`; `window_ms` must be at least 1.
    pub(super) fn new(limit: u64, window_ms: u64, now_ms: u64) -> Self {
        FixedWindow {
            limit,
            window_ms,
            window: now_ms / window_ms,
            count: 0,
            last_ms: now_ms,
        }
    }

    /// Units granted in the window containing `now_ms` (at least the latest time seen).
    fn count_at(&self, now_ms: u64) -> u64 {
        if now_ms / self.window_ms == self.window {
            self.count
        } else {
            0
        }
    }

    /// Ms from `now_ms` until the next window starts (always at least 1).
    fn until_next_window(&self, now_ms: u64) -> u64 {
        self.window_ms - now_ms % self.window_ms
    }

    /// The decision's `reset_ms`: the window must end if anything was granted in it.
    fn reset_ms(&self, now_ms: u64) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.until_next_window(now_ms)
        }
    }

    /// See [`Limiter::check`](super::Limiter::check).
    pub(super) fn check(&mut self, now_ms: u64, cost: u64) -> Decision {
        let now_ms = now_ms.max(self.last_ms);
        self.last_ms = now_ms;
        self.count = self.count_at(now_ms);
        self.window = now_ms / self.window_ms;
        let remaining = self.limit - self.count;
        if cost > self.limit {
            return too_costly(self.limit, self.window_ms, remaining, self.reset_ms(now_ms));
        }
        if cost <= remaining {
            self.count += cost;
            Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.limit - self.count,
                retry_after_ms: 0,
                reset_ms: self.reset_ms(now_ms),
            }
        } else {
            Decision {
                allowed: false,
                limit: self.limit,
                remaining,
                retry_after_ms: self.until_next_window(now_ms),
                reset_ms: self.reset_ms(now_ms),
            }
        }
    }

    /// See [`Limiter::is_idle`](super::Limiter::is_idle).
    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        self.count_at(now_ms.max(self.last_ms)) == 0
    }
}
