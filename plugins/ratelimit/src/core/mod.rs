//! The pure rate-limiting core: four algorithms behind one [`Limiter`] enum.
//!
//! This module owns the arithmetic of "may this request pass, and if not, when?".
//! It does no I/O and never reads a clock: every call takes the current time as
//! `now_ms` (milliseconds since any fixed origin), so tests drive it
//! deterministically, the way `raft-rs` drives its core.
//!
//! Invariants kept by every algorithm (and checked by the property tests below):
//! - no input panics, including `u64::MAX` times, costs and unvalidated rules;
//! - time never goes backwards: a `now_ms` smaller than one already seen is
//!   treated as the latest time seen;
//! - a denied request consumes nothing, and `cost == 0` is a pure query;
//! - `retry_after_ms` is exact: waiting that long (with no other traffic) makes a
//!   request of the same cost pass, one millisecond less does not;
//! - `reset_ms` is exact: after that long the limiter [`is_idle`](Limiter::is_idle).
//!
//! A rule should be checked with [`Rule::validate`] first; an unvalidated rule is
//! still safe to use (a `window_ms` of 0 is treated as 1, a `limit` of 0 denies
//! every request of nonzero cost).

mod fixed_window;
mod sliding_counter;
mod sliding_log;
mod token_bucket;

pub use fixed_window::FixedWindow;
pub use sliding_counter::SlidingCounter;
pub use sliding_log::SlidingLog;
pub use token_bucket::TokenBucket;

use std::fmt;
use std::str::FromStr;

/// Largest `limit` accepted by [`Rule::validate`].
const MAX_LIMIT: u64 = 1_000_000;
/// Largest `limit` accepted by [`Rule::validate`] for [`Algorithm::SlidingLog`],
/// which stores one timestamp per granted request.
const MAX_SLIDING_LOG_LIMIT: u64 = 100_000;
/// Largest `window_ms` accepted by [`Rule::validate`]: one day.
const MAX_WINDOW_MS: u64 = 86_400_000;

/// Which rate-limiting algorithm a [`Rule`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Capacity `limit`, refilled continuously at `limit` per `window_ms`.
    TokenBucket,
    /// At most `limit` per window aligned to multiples of `window_ms`.
    FixedWindow,
    /// At most `limit` in any interval `(now - window_ms, now]`, exactly.
    SlidingLog,
    /// Current window count plus the overlapping fraction of the previous one.
    SlidingCounter,
}

impl Algorithm {
    /// Every algorithm, in declaration order.
    pub const ALL: [Algorithm; 4] = [
        Algorithm::TokenBucket,
        Algorithm::FixedWindow,
        Algorithm::SlidingLog,
        Algorithm::SlidingCounter,
    ];

    /// The snake_case name used in configuration, serde and [`fmt::Display`].
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::SlidingCounter => "sliding_counter",
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;

    /// Parses the snake_case name (`"token_bucket"`, `"fixed_window"`,
    /// `"sliding_log"`, `"sliding_counter"`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown algorithm {s:?}: expected one of token_bucket, fixed_window, \
                     sliding_log, sliding_counter"
                )
            })
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rate limit: at most `limit` units per `window_ms` milliseconds, enforced by
/// `algorithm`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// The algorithm enforcing the limit.
    pub algorithm: Algorithm,
    /// Units allowed per window (also the token bucket's capacity).
    pub limit: u64,
    /// Window length in milliseconds (for the token bucket: time to refill fully).
    pub window_ms: u64,
}

impl Rule {
    /// The one parser of a rule written as text (a `config` value of type `ratelimit-rule`,
    /// e.g. `{"algorithm":"token_bucket","limit":10,"window_ms":60000}`): the same serde form
    /// as a `[plugins.ratelimit.rules.NAME]` table of cluster.toml (unknown fields refused),
    /// then [`Rule::validate`].
    pub fn parse(text: &str) -> Result<Rule, String> {
        let rule: Rule = serde_json::from_str(text.trim()).map_err(|e| {
            format!(
                "not a rate-limit rule ({e}); expected JSON like \
                 {{\"algorithm\":\"token_bucket\",\"limit\":10,\"window_ms\":60000}}"
            )
        })?;
        rule.validate()?;
        Ok(rule)
    }

    /// Refuses nonsense with a message naming the field: `limit` must be in
    /// `1..=1_000_000` (`1..=100_000` for `sliding_log`, which stores one
    /// timestamp per granted request) and `window_ms` in `1..=86_400_000` (one day).
    pub fn validate(&self) -> Result<(), String> {
        let max_limit = match self.algorithm {
            Algorithm::SlidingLog => MAX_SLIDING_LOG_LIMIT,
            _ => MAX_LIMIT,
        };
        if !(1..=max_limit).contains(&self.limit) {
            return Err(format!(
                "limit must be between 1 and {max_limit} for {}, got {}",
                self.algorithm, self.limit
            ));
        }
        if !(1..=MAX_WINDOW_MS).contains(&self.window_ms) {
            return Err(format!(
                "window_ms must be between 1 and {MAX_WINDOW_MS} (one day), got {}",
                self.window_ms
            ));
        }
        Ok(())
    }
}

/// The answer to one [`Limiter::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// Whether the request may proceed (its cost was consumed).
    pub allowed: bool,
    /// The rule's limit (for the `RateLimit-Limit` header).
    pub limit: u64,
    /// Requests of cost 1 that would still be allowed right now, after this decision.
    pub remaining: u64,
    /// 0 when allowed; otherwise ms until a request of the same cost could be allowed.
    pub retry_after_ms: u64,
    /// Ms until the limiter is back to full capacity (for the `RateLimit-Reset` header).
    pub reset_ms: u64,
}

/// The state of one rate-limited key: one variant per [`Algorithm`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Limiter {
    /// See [`TokenBucket`].
    TokenBucket(TokenBucket),
    /// See [`FixedWindow`].
    FixedWindow(FixedWindow),
    /// See [`SlidingLog`].
    SlidingLog(SlidingLog),
    /// See [`SlidingCounter`].
    SlidingCounter(SlidingCounter),
}

impl Limiter {
    /// A limiter for `rule` at full capacity, created at `now_ms`.
    pub fn new(rule: &Rule, now_ms: u64) -> Limiter {
        let (limit, window_ms) = (rule.limit, rule.window_ms.max(1));
        match rule.algorithm {
            Algorithm::TokenBucket => {
                Limiter::TokenBucket(TokenBucket::new(limit, window_ms, now_ms))
            }
            Algorithm::FixedWindow => {
                Limiter::FixedWindow(FixedWindow::new(limit, window_ms, now_ms))
            }
            Algorithm::SlidingLog => Limiter::SlidingLog(SlidingLog::new(limit, window_ms, now_ms)),
            Algorithm::SlidingCounter => {
                Limiter::SlidingCounter(SlidingCounter::new(limit, window_ms, now_ms))
            }
        }
    }

    /// Consumes `cost` units if allowed (a denied request consumes nothing);
    /// `cost == 0` is a pure query. A cost larger than the limit is always denied
    /// with `retry_after_ms = window_ms`.
    pub fn check(&mut self, now_ms: u64, cost: u64) -> Decision {
        match self {
            Limiter::TokenBucket(l) => l.check(now_ms, cost),
            Limiter::FixedWindow(l) => l.check(now_ms, cost),
            Limiter::SlidingLog(l) => l.check(now_ms, cost),
            Limiter::SlidingCounter(l) => l.check(now_ms, cost),
        }
    }

    /// True when the limiter is back at full capacity at `now_ms`, so the caller
    /// may drop it to free memory (a fresh [`Limiter::new`] behaves the same).
    pub fn is_idle(&self, now_ms: u64) -> bool {
        match self {
            Limiter::TokenBucket(l) => l.is_idle(now_ms),
            Limiter::FixedWindow(l) => l.is_idle(now_ms),
            Limiter::SlidingLog(l) => l.is_idle(now_ms),
            Limiter::SlidingCounter(l) => l.is_idle(now_ms),
        }
    }
}

/// Narrows a `u128` to `u64`, saturating.
fn sat_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// The decision for a request whose `cost` exceeds `limit`: denied, nothing consumed.
fn too_costly(limit: u64, window_ms: u64, remaining: u64, reset_ms: u64) -> Decision {
    Decision {
        allowed: false,
        limit,
        remaining,
        retry_after_ms: window_ms,
        reset_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(algorithm: Algorithm, limit: u64, window_ms: u64) -> Rule {
        Rule {
            algorithm,
            limit,
            window_ms,
        }
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.to_string().parse::<Algorithm>(), Ok(a));
            let json = serde_json::to_string(&a).expect("serialize");
            assert_eq!(json, format!("\"{a}\""));
        }
        assert!("TokenBucket".parse::<Algorithm>().is_err());
        assert!("".parse::<Algorithm>().is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let err = |r: Rule| r.validate().expect_err("should be refused");
        assert!(err(rule(Algorithm::TokenBucket, 0, 1000)).contains("limit"));
        assert!(err(rule(Algorithm::FixedWindow, 1_000_001, 1000)).contains("limit"));
        assert!(err(rule(Algorithm::SlidingLog, 100_001, 1000)).contains("limit"));
        assert!(err(rule(Algorithm::SlidingCounter, 1, 0)).contains("window_ms"));
        assert!(err(rule(Algorithm::SlidingCounter, 1, 86_400_001)).contains("window_ms"));
        assert_eq!(
            rule(Algorithm::SlidingLog, 100_000, 86_400_000).validate(),
            Ok(())
        );
        assert_eq!(
            rule(Algorithm::TokenBucket, 1_000_000, 1).validate(),
            Ok(())
        );
    }

    #[test]
    fn parse_is_serde_then_validate() {
        let r = Rule::parse(r#" {"algorithm":"sliding_log","limit":5,"window_ms":1000} "#);
        assert_eq!(r, Ok(rule(Algorithm::SlidingLog, 5, 1000)));
        let err = |s: &str| Rule::parse(s).expect_err(s);
        assert!(err(r#"{"algorithm":"sliding_log","limit":0,"window_ms":1000}"#).contains("limit"));
        assert!(err(r#"{"algorithm":"leaky","limit":1,"window_ms":1000}"#)
            .contains("not a rate-limit rule"));
        assert!(err(r#"{"algorithm":"fixed_window","limit":1}"#).contains("window_ms"));
        assert!(
            err(r#"{"algorithm":"fixed_window","limit":1,"window_ms":5,"burst":2}"#)
                .contains("burst")
        );
        assert!(err("").contains("not a rate-limit rule"));
        assert!(err("10/60s").contains("expected JSON"));
    }

    /// Found by `never_panics`: the sliding counter's weighted sum overflowed `u128`.
    #[test]
    fn absurd_rule_does_not_overflow() {
        for a in Algorithm::ALL {
            let mut limiter = Limiter::new(&rule(a, u64::MAX, u64::MAX), 0);
            assert!(limiter.check(0, u64::MAX).allowed);
            let d = limiter.check(0, u64::MAX);
            assert!(!d.allowed && d.retry_after_ms > 0);
        }
    }

    fn any_algorithm() -> impl Strategy<Value = Algorithm> {
        prop::sample::select(Algorithm::ALL.to_vec())
    }

    /// Valid rules, small enough that limits are actually reached.
    fn small_rule() -> impl Strategy<Value = Rule> {
        (any_algorithm(), 1u64..=8, 1u64..=50).prop_map(|(a, l, w)| rule(a, l, w))
    }

    /// (time step, cost) pairs: mostly small steps and costs, sometimes zero.
    fn steps() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..=30, 0u64..=4), 0..120)
    }

    /// Runs `steps` from time `start`, returning `(time, cost)` of every grant.
    fn run(limiter: &mut Limiter, start: u64, steps: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut now = start;
        let mut granted = Vec::new();
        for &(dt, cost) in steps {
            now = now.saturating_add(dt);
            let d = limiter.check(now, cost);
            if d.allowed && cost > 0 {
                granted.push((now, cost));
            }
        }
        granted
    }

    /// Checks the invariants of one decision, and the exactness of its
    /// `retry_after_ms` and `reset_ms` on clones of the limiter.
    fn check_decision(before: &Limiter, after: &Limiter, now: u64, cost: u64, d: Decision) {
        assert!(d.remaining <= d.limit, "{d:?}");
        // A denied request and a query leave the same state as a query would.
        let mut queried = before.clone();
        queried.check(now, 0);
        if d.allowed {
            assert_eq!(d.retry_after_ms, 0, "{d:?}");
        } else {
            assert!(cost > 0 && d.retry_after_ms > 0, "{d:?}");
            assert_eq!(&queried, after, "a denied request consumed something");
        }
        if cost == 0 {
            assert!(d.allowed);
            assert_eq!(&queried, after, "a query is not idempotent");
        }
        let mut probe = after.clone();
        let query = probe.check(now, 0);
        assert_eq!(query.remaining, d.remaining);
        assert_eq!(after.is_idle(now), d.remaining == d.limit, "{d:?}");
        // retry_after_ms: one ms early is still denied, on time is allowed.
        if !d.allowed && cost <= d.limit {
            if let Some(t) = now.checked_add(d.retry_after_ms) {
                let mut early = after.clone();
                assert!(
                    !early.check(t - 1, cost).allowed,
                    "allowed before retry_after {d:?}"
                );
                let mut on_time = after.clone();
                assert!(
                    on_time.check(t, cost).allowed,
                    "denied at retry_after {d:?}"
                );
            }
        }
        // reset_ms: idle on time, not idle one ms early.
        if let Some(t) = now.checked_add(d.reset_ms) {
            assert!(after.is_idle(t), "not idle at reset {d:?}");
            if d.reset_ms > 0 {
                assert!(!after.is_idle(t - 1), "idle before reset {d:?}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Every decision is self-consistent; retry_after and reset are exact.
        #[test]
        fn decisions_are_consistent(
            r in small_rule(),
            start in prop_oneof![0u64..1000, u64::MAX - 2000..=u64::MAX],
            s in steps(),
        ) {
            let mut limiter = Limiter::new(&r, start);
            let mut now = start;
            for (dt, cost) in s {
                now = now.saturating_add(dt);
                let before = limiter.clone();
                let d = limiter.check(now, cost);
                prop_assert_eq!(d.limit, r.limit);
                check_decision(&before, &limiter, now, cost, d);
            }
        }

        /// Fixed window: at most `limit` units granted in each aligned window.
        #[test]
        fn fixed_window_bounds_each_aligned_window(
            limit in 1u64..=8, window in 1u64..=50, start in 0u64..1000, s in steps()
        ) {
            let mut limiter = Limiter::new(&rule(Algorithm::FixedWindow, limit, window), start);
            let granted = run(&mut limiter, start, &s);
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for (t, c) in granted {
                *per_window.entry(t / window).or_default() += c;
            }
            for (w, n) in per_window {
                prop_assert!(n <= limit, "window {} granted {} > {}", w, n, limit);
            }
        }

        /// Sliding counter: never more than the fixed window's bound per aligned
        /// window, nor more than `2 * limit` in any `window_ms`-long interval.
        #[test]
        fn sliding_counter_bounds(
            limit in 1u64..=8, window in 1u64..=50, start in 0u64..1000, s in steps()
        ) {
            let mut limiter = Limiter::new(&rule(Algorithm::SlidingCounter, limit, window), start);
            let granted = run(&mut limiter, start, &s);
            let mut per_window = std::collections::HashMap::<u64, u64>::new();
            for &(t, c) in &granted {
                *per_window.entry(t / window).or_default() += c;
            }
            for (w, n) in per_window {
                prop_assert!(n <= limit, "window {} granted {} > {}", w, n, limit);
            }
            for &(end, _) in &granted {
                let n: u64 = granted
                    .iter()
                    .filter(|&&(t, _)| t <= end && t + window > end)
                    .map(|&(_, c)| c)
                    .sum();
                prop_assert!(n <= 2 * limit);
            }
        }

        /// Sliding log: at most `limit` units in any interval `(end - window, end]`.
        #[test]
        fn sliding_log_bounds_every_interval(
            limit in 1u64..=8, window in 1u64..=50, start in 0u64..1000, s in steps()
        ) {
            let mut limiter = Limiter::new(&rule(Algorithm::SlidingLog, limit, window), start);
            let granted = run(&mut limiter, start, &s);
            for &(end, _) in &granted {
                let n: u64 = granted
                    .iter()
                    .filter(|&&(t, _)| t <= end && t + window > end)
                    .map(|&(_, c)| c)
                    .sum();
                prop_assert!(n <= limit, "interval ending {} granted {} > {}", end, n, limit);
            }
        }

        /// Token bucket: units granted at times in `[a, b]` never exceed the
        /// capacity plus the refill over `b - a`: `limit + (b - a) * limit / window`.
        #[test]
        fn token_bucket_bounds_every_interval(
            limit in 1u64..=8, window in 1u64..=50, start in 0u64..1000, s in steps()
        ) {
            let mut limiter = Limiter::new(&rule(Algorithm::TokenBucket, limit, window), start);
            let granted = run(&mut limiter, start, &s);
            for i in 0..granted.len() {
                let mut n = 0;
                for &(t, c) in &granted[i..] {
                    n += c;
                    let bound = limit + (t - granted[i].0) * limit / window;
                    prop_assert!(n <= bound, "granted {} in [{}, {}] > {}", n, granted[i].0, t, bound);
                }
            }
        }

        /// No input panics: any rule (even invalid), any times (forwards,
        /// backwards, near `u64::MAX`), any costs.
        #[test]
        fn never_panics(
            a in any_algorithm(),
            limit in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>(), 0u64..10],
            window in prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>(), 0u64..100],
            start in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
            calls in prop::collection::vec(
                (
                    prop_oneof![Just(0u64), Just(u64::MAX), Just(u64::MAX - 1), any::<u64>(), 0u64..100],
                    prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>(), 0u64..10],
                ),
                0..40,
            ),
        ) {
            let mut limiter = Limiter::new(&rule(a, limit, window), start);
            for (now, cost) in calls {
                let d = limiter.check(now, cost);
                prop_assert!(d.remaining <= limit);
                prop_assert_eq!(d.allowed, d.retry_after_ms == 0);
                let _ = limiter.is_idle(now);
                let _ = limiter.is_idle(now.wrapping_add(d.reset_ms));
            }
        }

        /// Time going backwards is treated as the latest time seen.
        #[test]
        fn backwards_time_is_latest_seen(
            r in small_rule(), start in 0u64..1000, s in steps(), back in 0u64..2000, cost in 0u64..4
        ) {
            let mut limiter = Limiter::new(&r, start);
            let mut now = start;
            for (dt, c) in s {
                now += dt;
                limiter.check(now, c);
            }
            let mut twin = limiter.clone();
            prop_assert_eq!(
                limiter.check(now.saturating_sub(back), cost),
                twin.check(now, cost)
            );
            prop_assert_eq!(limiter, twin);
        }
    }
}
