//! A small Prometheus registry: counters, gauges and fixed-bucket histograms keyed by name and
//! labels, rendered in the text exposition format by [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use dashmap::DashMap;

/// Histogram bucket upper bounds in seconds.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `p` quantile (0 to 1) of `sorted` (ascending), by nearest rank, as every benchmark
/// and check report prints its p50/p99; `None` when empty.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    let i = (last as f64 * p.clamp(0.0, 1.0)).round() as usize;
    Some(sorted[i.min(last)])
}

/// A latency histogram with Prometheus' cumulative buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, secs: f64) {
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }
}

/// A series: its name, a newline, its rendered labels (a newline never appears in a name
/// and is escaped in label values). One string, so an update can look the series up from a
/// reused buffer without allocating.
type Key = String;

/// The registry of one node.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: DashMap<Key, AtomicU64>,
    gauges: DashMap<Key, AtomicU64>,
    histograms: DashMap<Key, Histogram>,
    help: Mutex<BTreeMap<&'static str, (&'static str, &'static str)>>,
}

/// Append `l` as Prometheus labels (`k="v",...`, values escaped) to `s`.
fn write_labels(s: &mut String, l: &[(&str, &str)]) {
    for (i, (k, v)) in l.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
}

/// Run `f` with the key of series (`name`, `l`), built in a per-thread buffer: updates on
/// hot paths (every RPC records several) cost no allocation once the series exists.
fn with_key<R>(name: &str, l: &[(&str, &str)], f: impl FnOnce(&str) -> R) -> R {
    thread_local! {
        static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    }
    BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => {
            b.clear();
            b.push_str(name);
            b.push('\n');
            write_labels(&mut b, l);
            f(&b)
        }
        // Only if `f` itself recorded a metric: fall back to a fresh string.
        Err(_) => {
            let mut s = format!("{name}\n");
            write_labels(&mut s, l);
            f(&s)
        }
    })
}

/// Find the series `key` in `map`, creating it on first use, and run `f` on it.
fn update<V: Default>(map: &DashMap<Key, V>, key: &str, f: impl FnOnce(&V)) {
    if let Some(v) = map.get(key) {
        f(v.value());
        return;
    }
    f(map.entry(key.to_string()).or_default().value());
}

/// A series key split back into its name and rendered labels.
fn split_key(k: &str) -> (&str, &str) {
    k.split_once('\n').unwrap_or((k, ""))
}

impl Metrics {
    /// Describe a metric (type is "counter", "gauge" or "histogram").
    pub fn describe(&self, name: &'static str, kind: &'static str, help: &'static str) {
        self.help
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, (kind, help));
    }

    /// Add `n` to a counter.
    pub fn add(&self, name: &str, l: &[(&str, &str)], n: u64) {
        with_key(name, l, |k| {
            update(&self.counters, k, |c| {
                c.fetch_add(n, Ordering::Relaxed);
            })
        });
    }

    /// Set a counter to `v`: for a plugin exporting a count it keeps itself (see
    /// [`crate::Plugin::export_metrics`]). It may go down only when the plugin restarts,
    /// which Prometheus reads as a counter reset.
    pub fn set_counter(&self, name: &str, l: &[(&str, &str)], v: u64) {
        with_key(name, l, |k| {
            update(&self.counters, k, |c| c.store(v, Ordering::Relaxed))
        });
    }

    /// Set a gauge.
    pub fn set(&self, name: &str, l: &[(&str, &str)], v: u64) {
        with_key(name, l, |k| {
            update(&self.gauges, k, |g| g.store(v, Ordering::Relaxed))
        });
    }

    /// Record a latency in seconds.
    pub fn observe(&self, name: &str, l: &[(&str, &str)], secs: f64) {
        with_key(name, l, |k| {
            update(&self.histograms, k, |h| h.observe(secs))
        });
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let help = self.help.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = String::new();
        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let sel = |name: &str, l: &str| {
            if l.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{l}}}")
            }
        };
        for e in self.counters.iter() {
            let ((n, l), v) = (split_key(e.key()), e.value().load(Ordering::Relaxed));
            by_name
                .entry(n.to_string())
                .or_default()
                .push(format!("{} {v}", sel(n, l)));
        }
        for e in self.gauges.iter() {
            let ((n, l), v) = (split_key(e.key()), e.value().load(Ordering::Relaxed));
            by_name
                .entry(n.to_string())
                .or_default()
                .push(format!("{} {v}", sel(n, l)));
        }
        for e in self.histograms.iter() {
            let ((n, l), h) = (split_key(e.key()), e.value());
            let lines = by_name.entry(n.to_string()).or_default();
            let mut cum = 0;
            let sep = if l.is_empty() { "" } else { "," };
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += h.counts[i].load(Ordering::Relaxed);
                lines.push(format!("{n}_bucket{{{l}{sep}le=\"{b}\"}} {cum}"));
            }
            let count = h.count.load(Ordering::Relaxed);
            lines.push(format!("{n}_bucket{{{l}{sep}le=\"+Inf\"}} {count}"));
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            lines.push(format!("{} {sum}", sel(&format!("{n}_sum"), l)));
            lines.push(format!("{} {count}", sel(&format!("{n}_count"), l)));
        }
        for (name, mut lines) in by_name {
            if let Some((kind, text)) = help.get(name.as_str()) {
                let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} {kind}");
            }
            lines.sort();
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn percentile_is_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 7.0), Some(100));
        assert_eq!(percentile(&[5u64], 0.99), Some(5));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
    }
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.describe("dsys_x_total", "counter", "x");
        m.add("dsys_x_total", &[("plugin", "a\"b")], 2);
        m.observe("dsys_lat_seconds", &[("p", "q")], 0.003);
        m.set("dsys_members", &[("state", "alive")], 5);
        let t = m.render();
        assert!(t.contains("# TYPE dsys_x_total counter"), "{t}");
        assert!(t.contains("dsys_x_total{plugin=\"a\\\"b\"} 2"), "{t}");
        assert!(
            t.contains("dsys_lat_seconds_bucket{p=\"q\",le=\"0.005\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("dsys_lat_seconds_bucket{p=\"q\",le=\"0.0025\"} 0"),
            "{t}"
        );
        assert!(t.contains("dsys_lat_seconds_count{p=\"q\"} 1"), "{t}");
        assert!(t.contains("dsys_members{state=\"alive\"} 5"), "{t}");
    }
}

/// A counter that also tells its recent rate, for dashboard panels. `mark` is one atomic add;
/// the rate is worked out from samples taken when it is read, over the last
/// [`RateMeter::WINDOW`].
#[derive(Debug, Default)]
pub struct RateMeter {
    total: AtomicU64,
    samples: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

impl RateMeter {
    /// Span the rate is averaged over.
    pub const WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

    /// Count `n` more.
    pub fn mark(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// Total so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Per second over the window, from the samples taken by earlier calls (`None` until
    /// one is old enough to measure against).
    pub fn rate(&self) -> Option<f64> {
        self.rate_at(std::time::Instant::now())
    }

    fn rate_at(&self, now: std::time::Instant) -> Option<f64> {
        let total = self.total();
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        while s.len() > 1 && s.get(1).is_some_and(|(t, _)| now - *t >= Self::WINDOW) {
            s.pop_front();
        }
        let rate = s.front().and_then(|(t, v)| {
            let dt = (now - *t).as_secs_f64();
            (dt >= 0.2).then(|| total.saturating_sub(*v) as f64 / dt)
        });
        if s.back()
            .is_none_or(|(t, _)| now - *t >= std::time::Duration::from_millis(200))
        {
            s.push_back((now, total));
        }
        if s.len() > 64 {
            s.pop_front();
        }
        rate
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rate_is_measured_over_the_window_from_read_time_samples() {
        let m = RateMeter::default();
        let t0 = Instant::now();
        assert_eq!(m.rate_at(t0), None);
        m.mark(100);
        assert_eq!(m.rate_at(t0 + Duration::from_millis(100)), None);
        let r = m.rate_at(t0 + Duration::from_secs(1)).expect("measurable");
        assert!((r - 100.0).abs() < 1e-6, "{r}");
        // Quiet for a while: the old samples leave the window and the rate falls to zero.
        for s in 2..=12 {
            m.rate_at(t0 + Duration::from_secs(s));
        }
        assert_eq!(m.rate_at(t0 + Duration::from_secs(13)), Some(0.0));
        assert_eq!(m.total(), 100);
    }
}
