//! The Snowflake generator: a pure core ([`Generator::take`], time passed in) and a small
//! async driver ([`Idgen::next`]) that reads a [`Clock`] under the generator's lock and waits
//! where the core says so.
//!
//! Invariants kept here:
//! * the ids one generator issues strictly increase (within a millisecond the sequence
//!   counts up; the millisecond never goes down; a new worker id starts a new millisecond);
//! * no id is issued without a lease window: a worker id, a monotonic deadline of the lease
//!   (`valid_until`), and a committed high-water promise (`ceiling`): no id carries a
//!   millisecond above the ceiling;
//! * a new lease starts strictly after its floor (the previous holders' high-water mark);
//! * an id's millisecond is never after the clock's reading when it was issued, and at most
//!   the catch-up window ([`DEFAULT_CATCH_UP_MS`]) before it.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::layout::{encode, Parts, EPOCH_UNIX_MS, MAX_TIME, SEQ_PER_MS};

/// Default catch-up window: when the generator runs flat out (every sequence of the last
/// millisecond used) and wakes up late, it may use the unused sequences of up to this many
/// milliseconds before the clock's, instead of losing them. An id's timestamp is then at most
/// this much older than the moment it was issued; no millisecond is used twice, and none
/// after the clock's.
pub const DEFAULT_CATCH_UP_MS: u64 = 10;

/// Default bound of a backwards clock step that is waited out (1 s); a larger step refuses
/// requests until the clock is back past the last id's millisecond.
pub const DEFAULT_MAX_BACKWARDS_MS: u64 = 1_000;

/// Wall-clock time, behind a trait so tests can step it backwards and hold it still.
pub trait Clock: Send + Sync + 'static {
    /// Unix time in milliseconds.
    fn now_unix_ms(&self) -> u64;
    /// Return once `now_unix_ms() >= ms` (or soon after; the caller reads the clock again).
    fn sleep_until_unix_ms(&self, ms: u64) -> impl Future<Output = ()> + Send;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        unix_us() / 1000
    }

    async fn sleep_until_unix_ms(&self, ms: u64) {
        // tokio's timer has 1 ms granularity and would often skip a whole millisecond (a
        // worker that waits for the next millisecond 4096 ids at a time loses throughput with
        // each one skipped), so the last stretch is a thread sleep, which the kernel ends
        // within tens of microseconds.
        let target = ms.saturating_mul(1000);
        loop {
            let now = unix_us();
            if now >= target {
                return;
            }
            let rem = target - now;
            if rem > 3_000 {
                tokio::time::sleep(Duration::from_micros(rem - 2_000)).await;
            } else {
                let d = Duration::from_micros(rem);
                if tokio::task::spawn_blocking(move || std::thread::sleep(d))
                    .await
                    .is_err()
                {
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// A run of consecutive ids: `first`, `first + 1`, ..., `first + count - 1` (one worker, one
/// millisecond). A batch travels as runs, one per millisecond it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRun {
    /// First id.
    pub first: u64,
    /// Ids in the run (1..=4096).
    pub count: u32,
}

impl IdRun {
    /// The ids of the run.
    pub fn ids(&self) -> impl Iterator<Item = u64> {
        self.first..self.first + u64::from(self.count)
    }
}

/// Why the generator gives no id now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    /// No worker id is held (starting, or re-acquiring after a lost lease). Retryable.
    #[error("no worker id lease yet: acquiring one through consensus; retry shortly")]
    NoLease,
    /// The lease was not renewed in time: the generator stopped. Retryable.
    #[error("the worker id lease of worker {0} could not be renewed in time; stopped issuing until a worker id is held again")]
    LeaseExpired(u16),
    /// The clock passed the last high-water promise committed to consensus. Retryable.
    #[error("the clock passed worker {worker}'s committed high-water mark ({ceiling_unix_ms} ms); waiting for consensus to record a new one")]
    PastCeiling {
        /// Worker id.
        worker: u16,
        /// The committed promise, Unix ms.
        ceiling_unix_ms: u64,
    },
    /// The clock stepped back further than the bound.
    #[error("clock moved backwards by {behind_ms} ms (more than the {bound_ms} ms waited out): refusing ids until it is past the last id's millisecond again")]
    ClockBackwards {
        /// How far behind the last id's millisecond the clock is.
        behind_ms: u64,
        /// The configured bound.
        bound_ms: u64,
    },
    /// The clock is behind the worker id's high-water mark (set by its previous holder, or by
    /// this node before a restart) by more than the bound. Retryable once the clock catches up.
    #[error("this node's clock is {behind_ms} ms behind worker {worker}'s high-water mark (its previous holder's promise); ids resume once the clock passes it")]
    BehindHighWater {
        /// Worker id.
        worker: u16,
        /// How far behind.
        behind_ms: u64,
    },
    /// The clock reads before the custom epoch.
    #[error("the clock reads {0} ms, before the id epoch 2024-01-01T00:00:00Z")]
    BeforeEpoch(u64),
    /// 41 bits of milliseconds are used up (after 2093-09-06).
    #[error("the 41-bit timestamp is exhausted (ids end at 2093-09-06T15:47:35.551Z)")]
    PastEnd,
}

impl GenError {
    /// Whether the same request may succeed later on this node without anyone acting.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            GenError::NoLease
                | GenError::LeaseExpired(_)
                | GenError::PastCeiling { .. }
                | GenError::BehindHighWater { .. }
                | GenError::ClockBackwards { .. }
        )
    }
}

/// What the core says to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// These ids are issued.
    Run(IdRun),
    /// Read the clock again once it shows this Unix millisecond.
    Wait(u64),
}

/// The lease window the generator issues under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Worker id.
    pub worker: u16,
    /// Highest millisecond (since the epoch) an id may carry: the last promise committed.
    pub ceiling: u64,
    /// The lease is believed alive until then (monotonic clock).
    pub valid_until: Instant,
}

/// Counts for the panel and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenStats {
    /// Ids issued.
    pub issued: u64,
    /// Times the clock read earlier than the previous reading.
    pub clock_backwards: u64,
    /// Times the 4096 sequences of a millisecond ran out and the generator waited.
    pub overflow_waits: u64,
    /// Requests refused because the clock was too far back.
    pub clock_refusals: u64,
}

/// The generator's state.
#[derive(Debug)]
pub struct Generator {
    window: Option<Window>,
    /// Millisecond (since the epoch) of the last id issued, or the floor of a new lease.
    last: u64,
    /// Next sequence in `last` (`SEQ_PER_MS`: used up).
    next_seq: u32,
    /// `last` was raised to a lease's floor and no id was issued since.
    at_floor: bool,
    /// The previous clock reading (since the epoch), to notice backwards steps.
    seen: u64,
    max_backwards_ms: u64,
    /// Every sequence of `last` was used (demand at least the layout's pace).
    saturated: bool,
    catch_up_ms: u64,
    stats: GenStats,
}

impl Generator {
    /// A generator with no lease that waits out backwards steps up to `max_backwards_ms`.
    pub fn new(max_backwards_ms: u64) -> Self {
        Generator {
            window: None,
            last: 0,
            next_seq: SEQ_PER_MS,
            at_floor: false,
            seen: 0,
            max_backwards_ms,
            saturated: false,
            catch_up_ms: DEFAULT_CATCH_UP_MS,
            stats: GenStats::default(),
        }
    }

    /// Set the catch-up window (0: every id carries the clock's millisecond at issue).
    pub fn with_catch_up(mut self, ms: u64) -> Self {
        self.catch_up_ms = ms;
        self
    }

    /// Start issuing under a new lease of `worker`: every id after this carries a millisecond
    /// above `floor` (and above every id issued before), and at most `ceiling`.
    pub fn start_lease(&mut self, worker: u16, floor: u64, ceiling: u64, valid_until: Instant) {
        if floor >= self.last {
            self.last = floor;
            self.at_floor = true;
        }
        // A new worker id in the same millisecond could sort below ids already issued.
        self.next_seq = SEQ_PER_MS;
        // No catching up into time before the lease.
        self.saturated = false;
        self.window = Some(Window {
            worker,
            ceiling,
            valid_until,
        });
    }

    /// A renewal of the current lease: a later deadline and/or a higher committed ceiling.
    pub fn renew(&mut self, ceiling: u64, valid_until: Instant) {
        if let Some(w) = &mut self.window {
            w.ceiling = w.ceiling.max(ceiling);
            w.valid_until = w.valid_until.max(valid_until);
        }
    }

    /// Stop issuing at once (the lease is lost or given up).
    pub fn stop(&mut self) {
        self.window = None;
    }

    /// The window in force.
    pub fn window(&self) -> Option<Window> {
        self.window
    }

    /// Counts so far.
    pub fn stats(&self) -> GenStats {
        self.stats
    }

    /// Millisecond (since the epoch) of the last id issued or of the current floor.
    pub fn last_ms(&self) -> u64 {
        self.last
    }

    /// Up to `want` ids at wall-clock time `now_unix_ms` (monotonic time `mono`), or when to
    /// look again, or why not.
    pub fn take(&mut self, now_unix_ms: u64, mono: Instant, want: u32) -> Result<Step, GenError> {
        let Some(w) = self.window else {
            return Err(GenError::NoLease);
        };
        if mono >= w.valid_until {
            return Err(GenError::LeaseExpired(w.worker));
        }
        let Some(now) = now_unix_ms.checked_sub(EPOCH_UNIX_MS) else {
            return Err(GenError::BeforeEpoch(now_unix_ms));
        };
        if now > MAX_TIME {
            return Err(GenError::PastEnd);
        }
        if now < self.seen {
            self.stats.clock_backwards += 1;
            tracing::warn!(
                back_ms = self.seen - now,
                "wall clock moved backwards (worker {})",
                w.worker
            );
        }
        self.seen = now;
        if now < self.last {
            let behind_ms = self.last - now;
            if behind_ms > self.max_backwards_ms {
                self.stats.clock_refusals += 1;
                return Err(if self.at_floor {
                    GenError::BehindHighWater {
                        worker: w.worker,
                        behind_ms,
                    }
                } else {
                    GenError::ClockBackwards {
                        behind_ms,
                        bound_ms: self.max_backwards_ms,
                    }
                });
            }
            return Ok(Step::Wait(self.last + EPOCH_UNIX_MS));
        }
        if now > self.last {
            // Running flat out and late: use the milliseconds skipped since, within the window.
            self.last = if self.saturated {
                (self.last + 1).max(now.saturating_sub(self.catch_up_ms))
            } else {
                now
            };
            self.next_seq = 0;
            self.saturated = false;
            self.at_floor = false;
        }
        if self.last > w.ceiling {
            return Err(GenError::PastCeiling {
                worker: w.worker,
                ceiling_unix_ms: w.ceiling + EPOCH_UNIX_MS,
            });
        }
        if self.next_seq >= SEQ_PER_MS {
            self.stats.overflow_waits += 1;
            return Ok(Step::Wait(self.last + 1 + EPOCH_UNIX_MS));
        }
        let count = want.min(SEQ_PER_MS - self.next_seq);
        let first = encode(Parts {
            time: self.last,
            worker: w.worker,
            seq: self.next_seq,
        })
        .map_err(|_| GenError::PastEnd)?;
        self.next_seq += count;
        self.saturated = self.next_seq >= SEQ_PER_MS;
        self.at_floor = false;
        self.stats.issued += u64::from(count);
        Ok(Step::Run(IdRun { first, count }))
    }
}

/// A generator shared by concurrent requests, with its clock.
#[derive(Debug)]
pub struct Idgen<C: Clock> {
    gen: Mutex<Generator>,
    clock: C,
}

impl<C: Clock> Idgen<C> {
    /// A generator with no lease yet.
    pub fn new(clock: C, max_backwards_ms: u64) -> Self {
        Self::with_generator(clock, Generator::new(max_backwards_ms))
    }

    /// Around a configured generator.
    pub fn with_generator(clock: C, gen: Generator) -> Self {
        Idgen {
            gen: Mutex::new(gen),
            clock,
        }
    }

    /// The generator, locked.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Generator> {
        self.gen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// `n` ids as runs, in increasing order. The clock is read under the lock, so concurrent
    /// callers never see each other's readings out of order. On an error, ids taken so far
    /// are dropped (never handed out, so never duplicated).
    pub async fn next(&self, n: u32) -> Result<Vec<IdRun>, GenError> {
        let mut runs = Vec::new();
        let mut left = n;
        while left > 0 {
            let step = {
                let mut g = self.lock();
                let now = self.clock.now_unix_ms();
                g.take(now, Instant::now(), left)?
            };
            match step {
                Step::Run(r) => {
                    left -= r.count;
                    runs.push(r);
                }
                Step::Wait(ms) => self.clock.sleep_until_unix_ms(ms).await,
            }
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::decode;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock the test sets; sleeping jumps it forward to the wake-up time.
    #[derive(Debug)]
    struct ManualClock(AtomicU64);

    impl ManualClock {
        fn set(&self, ms: u64) {
            self.0.store(ms, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now_unix_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
        async fn sleep_until_unix_ms(&self, ms: u64) {
            self.0.fetch_max(ms, Ordering::SeqCst);
        }
    }

    const T0: u64 = EPOCH_UNIX_MS + 1_000_000;

    fn idgen_at(ms: u64, bound: u64) -> Idgen<ManualClock> {
        let g = Idgen::new(ManualClock(AtomicU64::new(ms)), bound);
        g.lock()
            .start_lease(7, 0, MAX_TIME, Instant::now() + Duration::from_secs(3600));
        g
    }

    fn ids(runs: &[IdRun]) -> Vec<u64> {
        runs.iter().flat_map(|r| r.ids()).collect()
    }

    fn strictly_increasing(v: &[u64]) -> bool {
        v.windows(2).all(|w| w[0] < w[1])
    }

    #[tokio::test]
    async fn overflow_waits_for_the_next_millisecond() {
        let g = idgen_at(T0, DEFAULT_MAX_BACKWARDS_MS);
        let runs = g.next(5000).await.expect("ids");
        let v = ids(&runs);
        assert_eq!(v.len(), 5000);
        assert!(strictly_increasing(&v));
        let first = decode(v[0]).expect("id");
        let last = decode(v[4999]).expect("id");
        assert_eq!((first.time, first.worker, first.seq), (1_000_000, 7, 0));
        assert_eq!(decode(v[4095]).expect("id").seq, 4095);
        // The 4097th id had to wait for the next millisecond.
        assert_eq!((last.time, last.seq), (1_000_001, 5000 - 4096 - 1));
        assert_eq!(g.clock().now_unix_ms(), T0 + 1);
        assert_eq!(g.lock().stats().overflow_waits, 1);
        assert_eq!(g.lock().stats().issued, 5000);
    }

    #[tokio::test]
    async fn flat_out_and_late_it_catches_up_within_the_window_only() {
        let g = idgen_at(T0, 1_000);
        // T0 used up, then the clock is 30 ms further on the next look (a late wake-up).
        let mut all = ids(&g.next(4096).await.expect("ids"));
        g.clock().set(T0 + 31);
        let v = ids(&g.next(4096 * 12).await.expect("ids"));
        let times: BTreeSet<u64> = v.iter().map(|i| decode(*i).expect("id").time).collect();
        // T0+21..=T0+31 without waiting (the 10 ms window; T0+1..=T0+20 are lost), then T0+32
        // after a wait: nothing older than the window, nothing ahead of the clock.
        assert_eq!(times, (1_000_021..=1_000_032).collect::<BTreeSet<u64>>());
        all.extend(v);
        // After a used-up millisecond, even one id may take the window's oldest one...
        g.clock().set(T0 + 100);
        all.extend(ids(&g.next(2).await.expect("ids")));
        assert_eq!(decode(all[all.len() - 1]).expect("id").time, 1_000_090);
        // ...but not after a millisecond with sequences left: the clock's millisecond.
        g.clock().set(T0 + 200);
        all.extend(ids(&g.next(1).await.expect("id")));
        assert_eq!(decode(all[all.len() - 1]).expect("id").time, 1_000_200);
        assert!(strictly_increasing(&all));
        // Window 0: strict.
        let strict = Idgen::with_generator(
            ManualClock(AtomicU64::new(T0)),
            Generator::new(1_000).with_catch_up(0),
        );
        strict
            .lock()
            .start_lease(1, 0, MAX_TIME, Instant::now() + Duration::from_secs(60));
        strict.next(4096).await.expect("ids");
        strict.clock().set(T0 + 50);
        let v = ids(&strict.next(4097).await.expect("ids"));
        assert_eq!(decode(v[0]).expect("id").time, 1_000_050);
    }

    #[tokio::test]
    async fn a_small_backwards_step_is_waited_out() {
        let g = idgen_at(T0, 1_000);
        let a = ids(&g.next(10).await.expect("ids"));
        g.clock().set(T0 - 800);
        let b = ids(&g.next(10).await.expect("ids after a step back"));
        // It waited until the clock was back at the last id's millisecond.
        assert!(g.clock().now_unix_ms() >= T0);
        let all: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert!(strictly_increasing(&all));
        assert_eq!(g.lock().stats().clock_backwards, 1);
        assert_eq!(g.lock().stats().clock_refusals, 0);
    }

    #[tokio::test]
    async fn a_large_backwards_step_is_refused_until_the_clock_catches_up() {
        let g = idgen_at(T0, 1_000);
        let a = ids(&g.next(3).await.expect("ids"));
        g.clock().set(T0 - 1_001);
        let e = g.next(1).await.expect_err("refused");
        assert_eq!(
            e,
            GenError::ClockBackwards {
                behind_ms: 1_001,
                bound_ms: 1_000
            }
        );
        assert!(e.to_string().contains("backwards by 1001 ms"), "{e}");
        assert_eq!(g.lock().stats().clock_backwards, 1);
        // Within the bound again: waited out, and still increasing.
        g.clock().set(T0 - 5);
        let b = ids(&g.next(3).await.expect("ids"));
        assert!(a[2] < b[0]);
    }

    #[tokio::test]
    async fn ids_of_one_generator_strictly_increase_across_leases() {
        let g = idgen_at(T0, 1_000);
        let mut all = ids(&g.next(100).await.expect("ids"));
        // A new worker id in the same millisecond starts a new millisecond.
        g.lock()
            .start_lease(3, 0, MAX_TIME, Instant::now() + Duration::from_secs(60));
        all.extend(ids(&g.next(100).await.expect("ids")));
        assert_eq!(decode(all[100]).expect("id").worker, 3);
        // A floor from a previous holder: strictly after it.
        let floor = T0 + 500 - EPOCH_UNIX_MS;
        g.lock()
            .start_lease(9, floor, MAX_TIME, Instant::now() + Duration::from_secs(60));
        all.extend(ids(&g.next(100).await.expect("ids")));
        assert!(decode(all[200]).expect("id").time > floor);
        assert!(strictly_increasing(&all));
    }

    #[tokio::test]
    async fn no_ids_without_a_lease_past_its_deadline_or_above_the_ceiling() {
        let g = Idgen::new(ManualClock(AtomicU64::new(T0)), 1_000);
        assert_eq!(g.next(1).await, Err(GenError::NoLease));
        g.lock().start_lease(
            1,
            0,
            T0 - EPOCH_UNIX_MS,
            Instant::now() + Duration::from_secs(60),
        );
        assert!(g.next(1).await.is_ok());
        g.clock().set(T0 + 1);
        assert!(matches!(
            g.next(1).await,
            Err(GenError::PastCeiling { worker: 1, .. })
        ));
        // A renewal raises the ceiling; it never shortens the deadline.
        let until = g.lock().window().expect("window").valid_until;
        g.lock().renew(T0 + 10 - EPOCH_UNIX_MS, Instant::now());
        assert_eq!(g.lock().window().expect("window").valid_until, until);
        assert!(g.next(1).await.is_ok());
        // Past the lease's deadline: nothing.
        g.lock().start_lease(1, 0, MAX_TIME, Instant::now());
        assert_eq!(g.next(1).await, Err(GenError::LeaseExpired(1)));
        g.lock().stop();
        assert_eq!(g.next(1).await, Err(GenError::NoLease));
    }

    #[tokio::test]
    async fn a_floor_far_ahead_of_the_clock_is_refused_as_such() {
        let g = Idgen::new(ManualClock(AtomicU64::new(T0)), 1_000);
        let floor = T0 + 5_000 - EPOCH_UNIX_MS;
        g.lock()
            .start_lease(2, floor, MAX_TIME, Instant::now() + Duration::from_secs(60));
        assert!(matches!(
            g.next(1).await,
            Err(GenError::BehindHighWater { worker: 2, .. })
        ));
        g.clock().set(T0 + 4_500);
        let v = ids(&g.next(1).await.expect("waited out"));
        assert_eq!(decode(v[0]).expect("id").time, floor + 1);
    }

    #[test]
    fn before_the_epoch_is_refused() {
        let mut g = Generator::new(1_000);
        g.start_lease(0, 0, MAX_TIME, Instant::now() + Duration::from_secs(60));
        assert_eq!(g.take(5, Instant::now(), 1), Err(GenError::BeforeEpoch(5)));
    }

    #[tokio::test]
    async fn the_system_clock_gives_unique_increasing_ids() {
        let g = Idgen::new(SystemClock, DEFAULT_MAX_BACKWARDS_MS);
        g.lock()
            .start_lease(5, 0, MAX_TIME, Instant::now() + Duration::from_secs(3600));
        let v = ids(&g.next(20_000).await.expect("ids"));
        assert_eq!(v.len(), 20_000);
        assert!(strictly_increasing(&v));
    }
}
