//! Token bucket: capacity `limit`, refilled continuously at `limit` tokens per
//! `window_ms`, starting full.
//!
//! Tokens are kept exactly as integers scaled by `window_ms`: one token is
//! `window_ms` units, and each millisecond adds `limit` units. So fractional
//! tokens never drift, and "1 ms refills `limit / window_ms` tokens" is exact.
//! Arithmetic is in `u128`, where `limit * window_ms` and
//! `elapsed * limit` cannot overflow for any `u64` inputs.

use super::{sat_u64, too_costly, Decision};

/// State of one token bucket (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    limit: u64,
    window_ms: u64,
    /// Tokens scaled by `window_ms`, as of `last_ms`. Invariant: `level <= capacity()`.
    level: u128,
    /// Latest time seen; earlier times are treated as this one.
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`; `window_ms` must be at least 1.
    pub(super) fn new(limit: u64, window_ms: u64, now_ms: u64) -> Self {
        let mut bucket = TokenBucket {
            limit,
            window_ms,
            level: 0,
            last_ms: now_ms,
        };
        bucket.level = bucket.capacity();
        bucket
    }

    /// Full capacity, in scaled units.
    fn capacity(&self) -> u128 {
        u128::from(self.limit) * u128::from(self.window_ms)
    }

    /// The level the bucket would have at `now_ms` (saturated to the latest time seen).
    fn level_at(&self, now_ms: u64) -> u128 {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        let refill = u128::from(elapsed) * u128::from(self.limit);
        self.level.saturating_add(refill).min(self.capacity())
    }

    /// Whole tokens available at `level`.
    fn tokens(&self, level: u128) -> u64 {
        sat_u64(level / u128::from(self.window_ms))
    }

    /// Ms until the bucket refills from `level` to capacity.
    fn reset_ms(&self, level: u128) -> u64 {
        if self.limit == 0 {
            return 0;
        }
        sat_u64((self.capacity() - level).div_ceil(u128::from(self.limit)))
    }

    /// See [`Limiter::check`](super::Limiter::check).
    pub(super) fn check(&mut self, now_ms: u64, cost: u64) -> Decision {
        self.level = self.level_at(now_ms);
        self.last_ms = self.last_ms.max(now_ms);
        if cost > self.limit {
            return too_costly(
                self.limit,
                self.window_ms,
                self.tokens(self.level),
                self.reset_ms(self.level),
            );
        }
        let need = u128::from(cost) * u128::from(self.window_ms);
        if need <= self.level {
            self.level -= need;
            Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.tokens(self.level),
                retry_after_ms: 0,
                reset_ms: self.reset_ms(self.level),
            }
        } else {
            // 0 < cost <= limit here, so limit > 0.
            let deficit = need - self.level;
            Decision {
                allowed: false,
                limit: self.limit,
                remaining: self.tokens(self.level),
                retry_after_ms: sat_u64(deficit.div_ceil(u128::from(self.limit))),
                reset_ms: self.reset_ms(self.level),
            }
        }
    }

    /// See [`Limiter::is_idle`](super::Limiter::is_idle).
    pub(super) fn is_idle(&self, now_ms: u64) -> bool {
        self.level_at(now_ms) == self.capacity()
    }
}
