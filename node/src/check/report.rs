//! The report of a run: counts, availability, latency, faults with times, the verdict.

use std::path::Path;

use serde::Serialize;

use super::history::{EventType, History};
use super::{CheckOptions, Verdict};

#[derive(Debug, Serialize)]
pub(crate) struct FaultLine {
    kind: String,
    detail: String,
    start_s: f64,
    end_s: Option<f64>,
    recovered_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    workload: String,
    claim: String,
    nodes: usize,
    duration_s: f64,
    seed: u64,
    concurrency: usize,
    faults_requested: Vec<String>,
    ops: usize,
    ok: usize,
    failed: usize,
    unknown: usize,
    availability_pct: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    faults: Vec<FaultLine>,
    /// Nodes that exited without being killed by the nemesis.
    crashed: Vec<(String, String)>,
    recovery_s: f64,
    /// Figures the workload measured after healing (name, value).
    measures: Vec<(String, String)>,
    pub(crate) verdict: Verdict,
    run_dir: String,
}

pub(crate) struct ReportInput<'a> {
    pub(crate) workload: &'a str,
    pub(crate) claim: String,
    pub(crate) opts: &'a CheckOptions,
    pub(crate) history: &'a History,
    pub(crate) verdict: Verdict,
    pub(crate) started_ns: u64,
    pub(crate) ended_ns: u64,
    pub(crate) recovered_ns: u64,
    pub(crate) crashed: Vec<(String, String)>,
    pub(crate) measures: Vec<(String, String)>,
    pub(crate) run_dir: &'a Path,
}

fn secs(ns: u64, base: u64) -> f64 {
    ns.saturating_sub(base) as f64 / 1e9
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    dsys_runtime::percentile(sorted, p).map_or(0.0, |ns| ns as f64 / 1e6)
}

impl Report {
    pub(crate) fn new(i: ReportInput<'_>) -> Self {
        let (mut ok, mut failed, mut unknown) = (0, 0, 0);
        let mut lat = Vec::new();
        // Client operations during the run (final reads after healing are not counted).
        if let Ok(ops) = i.history.ops() {
            for op in ops.iter().filter(|o| o.invoke.time_ns <= i.ended_ns) {
                match op.outcome() {
                    EventType::Ok => {
                        ok += 1;
                        if let Some(c) = op.complete {
                            lat.push(c.time_ns - op.invoke.time_ns);
                        }
                    }
                    EventType::Fail => failed += 1,
                    _ => unknown += 1,
                }
            }
        }
        lat.sort_unstable();
        let ops = ok + failed + unknown;
        let base = i.started_ns;
        Report {
            workload: i.workload.to_string(),
            claim: i.claim,
            nodes: i.opts.nodes,
            duration_s: i.opts.duration.as_secs_f64(),
            seed: i.opts.seed,
            concurrency: i.opts.concurrency,
            faults_requested: i
                .opts
                .faults
                .iter()
                .map(|f| format!("{f:?}").to_lowercase())
                .collect(),
            ops,
            ok,
            failed,
            unknown,
            availability_pct: if ops == 0 {
                0.0
            } else {
                100.0 * ok as f64 / ops as f64
            },
            latency_p50_ms: pct(&lat, 0.50),
            latency_p99_ms: pct(&lat, 0.99),
            faults: i
                .history
                .faults
                .iter()
                .map(|f| FaultLine {
                    kind: f.kind.clone(),
                    detail: f.detail.clone(),
                    start_s: secs(f.start_ns, base),
                    end_s: f.end_ns.map(|t| secs(t, base)),
                    recovered_s: f.recovered_ns.map(|t| secs(t, base)),
                })
                .collect(),
            crashed: i.crashed,
            recovery_s: secs(i.recovered_ns, i.ended_ns),
            measures: i.measures,
            verdict: i.verdict,
            run_dir: i.run_dir.display().to_string(),
        }
    }

    pub(crate) fn human(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "dsys check {}: {} nodes, {:.0} s, {} clients, seed {}, faults [{}]\n",
            self.workload,
            self.nodes,
            self.duration_s,
            self.concurrency,
            self.seed,
            self.faults_requested.join(",")
        ));
        s.push_str(&format!("claim: {}\n\n", self.claim));
        s.push_str(&format!(
            "ops {}   ok {}   failed {}   unknown {}   availability {:.1}%\n",
            self.ops, self.ok, self.failed, self.unknown, self.availability_pct
        ));
        s.push_str(&format!(
            "latency of ok ops: p50 {:.1} ms   p99 {:.1} ms\n\n",
            self.latency_p50_ms, self.latency_p99_ms
        ));
        if self.faults.is_empty() {
            s.push_str("faults: none\n");
        } else {
            s.push_str(&format!("faults ({}):\n", self.faults.len()));
            for f in &self.faults {
                let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}s")).unwrap_or("-".into());
                s.push_str(&format!(
                    "  {:>6.1}s .. {:>7}  {:<9} {}  (recovered {})\n",
                    f.start_s,
                    opt(f.end_s),
                    f.kind,
                    f.detail,
                    opt(f.recovered_s)
                ));
            }
        }
        for (id, st) in &self.crashed {
            s.push_str(&format!(
                "  !! {id} exited on its own ({st}); see its log\n"
            ));
        }
        s.push_str(&format!(
            "healed and recovered in {:.1} s after the run\n",
            self.recovery_s
        ));
        for (name, value) in &self.measures {
            s.push_str(&format!("{name}: {value}\n"));
        }
        s.push('\n');
        let word = match self.verdict.valid {
            Some(true) => "VALID",
            Some(false) => "INVALID",
            None => "UNKNOWN",
        };
        s.push_str(&format!("verdict: {word}: {}\n", self.verdict.summary));
        if !self.verdict.details.is_null() {
            s.push_str(&format!("details: {}\n", self.verdict.details));
        }
        for v in self.verdict.violations.iter().take(5) {
            s.push_str(&format!(
                "violation: {}\n",
                serde_json::to_string_pretty(v).unwrap_or_default()
            ));
        }
        s.push_str(&format!(
            "history.json and report.json in {}\n",
            self.run_dir
        ));
        s
    }
}
