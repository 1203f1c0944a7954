//! `dsys check WORKLOAD`: Jepsen-style checks of the designs' promises. A run starts its own
//! local cluster ([`cluster`]), drives client processes through the CLI's client library
//! while recording every operation ([`history`]), applies a seeded fault schedule
//! ([`nemesis`]), heals and waits for recovery, then hands the history to the workload's
//! checker and prints a report ([`report`]).
//!
//! A workload is one file implementing [`Workload`] plus one line in [`REGISTRY`].

mod cluster;
pub mod history;
pub mod lock;
mod nemesis;
pub mod ratelimit;
pub mod register;
mod report;
pub mod set;
pub mod unique_ids;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use dsys_runtime::{
    Api, Client, ClientError, RpcError, SysApi, SysRequest, SysResponse, TlsIdentity,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use cluster::LocalCluster;
use history::{EventType, History, Recorder};

/// A workload's entry in the registry.
#[derive(Debug)]
pub struct WorkloadEntry {
    /// Name on the command line.
    pub name: &'static str,
    /// One line for `--help` and the report.
    pub about: &'static str,
    make: fn() -> Box<dyn Workload>,
}

/// Every workload. Adding one: a file in `node/src/check/` and a line here.
pub const REGISTRY: &[WorkloadEntry] = &[
    WorkloadEntry {
        name: "register",
        about: "read/write/compare-and-set registers on consensus; linearizable per key",
        make: register::new,
    },
    WorkloadEntry {
        name: "set",
        about: "unique adds to kv; every acknowledged add is in the final read",
        make: set::new,
    },
    WorkloadEntry {
        name: "ratelimit",
        about: "fixed-window checks on ratelimit; never more grants than the limit",
        make: ratelimit::new,
    },
    WorkloadEntry {
        name: "lock",
        about: "holder processes (some SIGSTOPped) on lock; no overlapping claims, increasing fencing tokens",
        make: lock::new,
    },
    WorkloadEntry {
        name: "unique-ids",
        about: "single and batch id requests to random nodes of idgen; ids unique, increasing per node",
        make: unique_ids::new,
    },
];

/// The checker's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verdict {
    /// true valid, false invalid, None unknown (the checker could not decide).
    pub valid: Option<bool>,
    /// One line.
    pub summary: String,
    /// Workload-specific counts.
    pub details: serde_json::Value,
    /// The first violating operations, when invalid.
    pub violations: Vec<serde_json::Value>,
}

impl Verdict {
    /// Valid.
    pub fn valid(summary: String, details: serde_json::Value) -> Self {
        Verdict {
            valid: Some(true),
            summary,
            details,
            violations: vec![],
        }
    }
    /// Invalid, with evidence.
    pub fn invalid(
        summary: String,
        details: serde_json::Value,
        violations: Vec<serde_json::Value>,
    ) -> Self {
        Verdict {
            valid: Some(false),
            summary,
            details,
            violations,
        }
    }
    /// Undecided.
    pub fn unknown(summary: String) -> Self {
        Verdict {
            valid: None,
            summary,
            details: serde_json::Value::Null,
            violations: vec![],
        }
    }
}

/// A workload: what clients do, and what the history must satisfy.
#[async_trait]
pub trait Workload: Send + Sync {
    /// Extra TOML appended to the generated cluster file (e.g. a rate-limit rule).
    fn config(&self) -> String {
        String::new()
    }
    /// What the checker claims, in one line (printed in the report).
    fn claim(&self) -> String;
    /// Quiet time between two faults, in ms (a random value in this range).
    fn quiet_ms(&self) -> (u64, u64) {
        (1000, 3000)
    }
    /// Ok once the cluster serves this workload (called repeatedly until a deadline).
    async fn ready(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String>;
    /// One operation of one client process: invoke, send, complete.
    async fn step(&self, ctx: &Ctx, w: &mut Worker);
    /// After healing and recovery: final reads, recorded in the history.
    async fn finish(&self, _ctx: &Ctx, _w: &mut Worker) -> Result<(), String> {
        Ok(())
    }
    /// Judge the history.
    fn check(&self, h: &History) -> Verdict;
}

/// Fault kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// SIGKILL a minority of nodes, restart them at the end of the fault.
    Kill,
    /// SIGSTOP a minority, SIGCONT at the end.
    Pause,
    /// Cut the network: majority/minority, one node isolated, or random halves.
    Partition,
    /// Delay every message to or from one node (transport fault injection).
    Delay,
}

/// Parse `kill,pause,partition,delay` (or `none`).
pub fn parse_faults(s: &str) -> Result<Vec<FaultKind>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let k = match part {
            "none" => continue,
            "kill" => FaultKind::Kill,
            "pause" => FaultKind::Pause,
            "partition" => FaultKind::Partition,
            "delay" => FaultKind::Delay,
            other => {
                return Err(format!(
                    "--faults: unknown fault `{other}`; expected a comma-separated list of kill, pause, partition, delay (or none)"
                ))
            }
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Options of one run.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// Workload name (see [`REGISTRY`]).
    pub workload: String,
    /// Nodes (3..=9).
    pub nodes: usize,
    /// How long clients run.
    pub duration: Duration,
    /// Faults to schedule.
    pub faults: Vec<FaultKind>,
    /// Seed of the fault schedule and the clients' choices.
    pub seed: u64,
    /// Client processes.
    pub concurrency: usize,
    /// Run folder (default: target/dsys-check/... when ./target exists, else the temp dir).
    pub out: Option<PathBuf>,
    /// Deadline of each client request.
    pub timeout: Duration,
    /// Print the report as JSON.
    pub json: bool,
    /// Multi-host mode: nodes in the namespaces of `scripts/netns-cluster.sh`, partitions
    /// cut with nft.
    pub netns: bool,
}

impl CheckOptions {
    /// Refuse nonsense before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if !REGISTRY.iter().any(|w| w.name == self.workload) {
            return Err(format!(
                "unknown workload `{}`; available: {}",
                self.workload,
                REGISTRY
                    .iter()
                    .map(|w| w.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !(3..=9).contains(&self.nodes) {
            return Err("--nodes must be 3..=9".into());
        }
        if self.duration < Duration::from_secs(1) || self.duration > Duration::from_secs(86_400) {
            return Err("--duration must be 1s..=24h".into());
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err("--concurrency must be 1..=64".into());
        }
        if self.timeout < Duration::from_millis(100) || self.timeout > Duration::from_secs(60) {
            return Err("--timeout must be 100ms..=60s".into());
        }
        if self.netns {
            cluster::netns_ready(self.nodes)?;
        }
        Ok(())
    }
}

/// What workers share.
#[derive(Debug)]
pub struct Ctx {
    rec: Recorder,
    nodes: Vec<(String, SocketAddr)>,
    identity: TlsIdentity,
    /// The cluster's certificate folder (for client processes the workload starts).
    certs: PathBuf,
    timeout: Duration,
    /// Shared operation counter (workloads derive keys and elements from it).
    pub counter: AtomicU64,
    next_process: AtomicU64,
    /// Unique per run; prefixes every key.
    pub run_id: String,
    ping: Client,
    /// The run's seed.
    pub seed: u64,
    /// When the final heal was done (ns since the run started; 0 before).
    pub healed_ns: AtomicU64,
    /// Figures a workload measured (name, value), printed in the report.
    pub measures: Mutex<Vec<(String, String)>>,
}

impl Ctx {
    /// Node names in order.
    pub fn node_ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.0.clone()).collect()
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.rec.now_ns()
    }

    /// Add a figure to the report.
    pub fn measure(&self, name: &str, value: String) {
        eprintln!("{name}: {value}");
        self.measures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), value));
    }

    fn new_worker(&self, slot: usize) -> anyhow::Result<Worker> {
        let client = Client::new(&self.identity, vec![self.nodes[0].1], self.timeout)
            .map_err(|e| anyhow!("client: {e}"))?;
        Ok(Worker {
            process: self.next_process.fetch_add(1, Ordering::Relaxed),
            rng: StdRng::seed_from_u64(self.seed.wrapping_mul(1_000_003).wrapping_add(slot as u64)),
            client,
            home: slot % self.nodes.len(),
            node: slot % self.nodes.len(),
            probe: false,
            errored: false,
        })
    }
}

/// One client process. Each operation goes to one node only (no retry elsewhere, so an
/// operation is never applied twice by the client); after an unreachable or timed-out node it
/// probes the nodes with a ping, starting from its home node, before the next operation.
#[derive(Debug)]
pub struct Worker {
    /// Current process id (changes after an unknown outcome, as in Jepsen).
    pub process: u64,
    /// This worker's seeded randomness.
    pub rng: StdRng,
    client: Client,
    home: usize,
    node: usize,
    probe: bool,
    errored: bool,
}

/// Whether a failed call definitely had no effect (`Fail`) or may have (`Info`). Reads have
/// no effect either way.
pub(crate) fn classify(e: &ClientError, mutates: bool) -> EventType {
    if !mutates {
        return EventType::Fail;
    }
    match e {
        ClientError::Rpc(
            RpcError::Refused(_)
            | RpcError::UnknownPlugin(_)
            | RpcError::Unauthorized(_)
            | RpcError::Malformed(_)
            | RpcError::FrameTooLarge { .. }
            | RpcError::PluginUnavailable(_),
        )
        | ClientError::Tls(_) => EventType::Fail,
        _ => EventType::Info,
    }
}

impl Worker {
    async fn pick_node(&mut self, ctx: &Ctx) -> usize {
        if self.probe {
            let n = ctx.nodes.len();
            for k in 0..n {
                let i = (self.home + k) % n;
                if let Ok(SysResponse::Pong { .. }) = ctx
                    .ping
                    .call_at::<SysApi>(ctx.nodes[i].1, &SysRequest::Ping)
                    .await
                {
                    self.node = i;
                    self.probe = false;
                    break;
                }
            }
        }
        self.node
    }

    /// Record the invoke of `f` and return the node it will be sent to.
    pub async fn invoke(&mut self, ctx: &Ctx, f: &str, value: serde_json::Value) -> usize {
        let node = self.pick_node(ctx).await;
        ctx.rec.event(
            self.process,
            EventType::Invoke,
            f,
            value,
            Some(&ctx.nodes[node].0),
            None,
        );
        node
    }

    /// Send to node `node` only.
    pub async fn send_to<A: Api>(
        &mut self,
        ctx: &Ctx,
        node: usize,
        req: &A::Request,
    ) -> (usize, Result<A::Response, ClientError>) {
        let r = self.client.call_at::<A>(ctx.nodes[node].1, req).await;
        if let Err(ClientError::Rpc(RpcError::Unreachable(_) | RpcError::Timeout(_))) = &r {
            self.probe = true;
        }
        (node, r)
    }

    /// Pick a node and send (for requests that are not recorded, e.g. readiness probes).
    pub async fn send<A: Api>(
        &mut self,
        ctx: &Ctx,
        req: &A::Request,
    ) -> (usize, Result<A::Response, ClientError>) {
        let node = self.pick_node(ctx).await;
        self.send_to::<A>(ctx, node, req).await
    }

    /// Record the completion of this process's open operation.
    pub fn complete(
        &mut self,
        ctx: &Ctx,
        kind: EventType,
        f: &str,
        value: serde_json::Value,
        error: Option<String>,
    ) {
        ctx.rec.event(
            self.process,
            kind,
            f,
            value,
            Some(&ctx.nodes[self.node].0),
            error,
        );
        self.errored = kind != EventType::Ok;
        if kind == EventType::Info {
            // Its operation may still be in flight: continue as a new process.
            self.process = ctx.next_process.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn default_run_dir(workload: &str) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("{workload}-{stamp}-{}", std::process::id());
    if std::path::Path::new("target").is_dir() {
        PathBuf::from("target").join("dsys-check").join(name)
    } else {
        std::env::temp_dir().join("dsys-check").join(name)
    }
}

/// Wait until `f` succeeds or `deadline` passes; the last error otherwise.
async fn wait_for<T, F, Fut>(deadline: Duration, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let end = Instant::now() + deadline;
    loop {
        let e = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if Instant::now() >= end {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Judge a saved history (e.g. a run's history.json, or a hand-written one) with a workload's
/// checker; prints the verdict, returns the exit code (0 valid, 1 invalid, 3 unknown).
pub fn check_file(workload: &str, path: &std::path::Path, json: bool) -> anyhow::Result<u8> {
    let entry = REGISTRY
        .iter()
        .find(|w| w.name == workload)
        .ok_or_else(|| anyhow!("unknown workload `{workload}`"))?;
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let h: History = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a history (events, faults)", path.display()))?;
    let v = (entry.make)().check(&h);
    if json {
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let word = match v.valid {
            Some(true) => "VALID",
            Some(false) => "INVALID",
            None => "UNKNOWN",
        };
        outln!("verdict: {word}: {}", v.summary);
        if !v.details.is_null() {
            outln!("details: {}", v.details);
        }
        for x in v.violations.iter().take(5) {
            outln!("violation: {}", serde_json::to_string_pretty(x)?);
        }
    }
    Ok(match v.valid {
        Some(true) => 0,
        Some(false) => 1,
        None => 3,
    })
}

/// Wait until the workload's readiness probe passes, or the last error at the deadline.
async fn ready_within(
    wl: &dyn Workload,
    ctx: &Ctx,
    w: &mut Worker,
    deadline: Duration,
) -> Result<(), String> {
    let end = Instant::now() + deadline;
    loop {
        let e = match wl.ready(ctx, w).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= end {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Run a check; returns the exit code (0 valid, 1 invalid, 3 unknown). Every child process
/// is killed before this returns, also on error and on Ctrl-C / SIGTERM.
pub async fn run(opts: CheckOptions) -> anyhow::Result<u8> {
    opts.validate().map_err(|e| anyhow!(e))?;
    let entry = REGISTRY
        .iter()
        .find(|w| w.name == opts.workload)
        .ok_or_else(|| anyhow!("unknown workload"))?;
    let workload: Arc<dyn Workload> = Arc::from((entry.make)());
    let dir = opts
        .out
        .clone()
        .unwrap_or_else(|| default_run_dir(&opts.workload));
    if dir.join("cluster.toml").exists() {
        bail!(
            "{} already holds a run; choose another --out",
            dir.display()
        );
    }
    eprintln!("run folder: {}", dir.display());
    let cluster = Arc::new(Mutex::new(LocalCluster::create(
        &dir,
        opts.nodes,
        &workload.config(),
        opts.netns,
    )?));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    let res = tokio::select! {
        r = run_inner(&opts, entry, workload, cluster.clone(), dir.clone()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C); every node was killed")),
        _ = term.recv() => Err(anyhow!("terminated (SIGTERM); every node was killed")),
    };
    cluster.lock().unwrap_or_else(|p| p.into_inner()).kill_all();
    res
}

async fn run_inner(
    opts: &CheckOptions,
    entry: &WorkloadEntry,
    workload: Arc<dyn Workload>,
    cluster: Arc<Mutex<LocalCluster>>,
    dir: PathBuf,
) -> anyhow::Result<u8> {
    let (nodes, certs) = {
        let mut c = cluster.lock().unwrap_or_else(|p| p.into_inner());
        for i in 0..c.nodes.len() {
            c.spawn(i)?;
        }
        let nodes: Vec<(String, SocketAddr)> =
            c.nodes.iter().map(|n| (n.id.clone(), n.rpc)).collect();
        (nodes, c.certs())
    };
    let identity = TlsIdentity::load(&certs, "cli").map_err(|e| anyhow!("{e}"))?;
    let ping = Client::new(&identity, vec![nodes[0].1], Duration::from_millis(500))
        .map_err(|e| anyhow!("client: {e}"))?;
    let rec = Recorder::new();
    let ctx = Arc::new(Ctx {
        rec: rec.clone(),
        nodes: nodes.clone(),
        identity,
        certs,
        timeout: opts.timeout,
        counter: AtomicU64::new(0),
        next_process: AtomicU64::new(0),
        run_id: format!("check-{}-{}", opts.workload, opts.seed),
        ping,
        seed: opts.seed,
        healed_ns: AtomicU64::new(0),
        measures: Mutex::new(Vec::new()),
    });
    let nem = nemesis::Nemesis::new(
        cluster.clone(),
        ctx.clone(),
        opts.faults.clone(),
        opts.seed,
        workload.quiet_ms(),
    )?;
    eprintln!(
        "starting {} nodes ({}), waiting for them to see each other...",
        nodes.len(),
        nodes
            .iter()
            .map(|n| n.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    nem.wait_converged(Duration::from_secs(60))
        .await
        .map_err(|e| anyhow!("the cluster did not form within 60 s: {e}"))?;
    let mut probe = ctx.new_worker(0)?;
    ready_within(workload.as_ref(), &ctx, &mut probe, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow!("{} was not ready within 60 s: {e}", opts.workload))?;
    drop(probe);

    eprintln!(
        "running {} for {:?}: {} clients, faults [{}], seed {}",
        opts.workload,
        opts.duration,
        opts.concurrency,
        opts.faults
            .iter()
            .map(|f| format!("{f:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(","),
        opts.seed
    );
    let started_ns = ctx.now_ns();
    let end = Instant::now() + opts.duration;
    let mut tasks = Vec::new();
    for slot in 0..opts.concurrency {
        let (ctx, wl) = (ctx.clone(), workload.clone());
        let mut w = ctx.new_worker(slot)?;
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                wl.step(&ctx, &mut w).await;
                if w.errored {
                    // Do not spin on a node that is down or cut off.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    let nem_task = tokio::spawn(nem.run(end));
    for t in tasks {
        t.await.context("a client task panicked")?;
    }
    let nem = nem_task.await.context("the nemesis panicked")?;
    let ended_ns = ctx.now_ns();

    eprintln!("healing: every node resumed or restarted, every fault rule removed...");
    let crashed = nem.heal_all().await;
    ctx.healed_ns.store(ctx.now_ns(), Ordering::Relaxed);
    nem.wait_converged(Duration::from_secs(60))
        .await
        .map_err(|e| anyhow!("the cluster did not recover within 60 s of healing: {e}"))?;
    let mut fin = ctx.new_worker(0)?;
    let ready = ready_within(workload.as_ref(), &ctx, &mut fin, Duration::from_secs(60)).await;
    // Recovery ends when the workload is ready again, not after its final reads.
    let recovered_ns = ctx.now_ns();
    let finish = match ready {
        Ok(()) => workload.finish(&ctx, &mut fin).await,
        Err(e) => Err(format!("not ready after healing: {e}")),
    };
    let history = rec.snapshot();
    // The cluster's work is done: free the CPU for the checker, and keep the history even
    // if the checker is interrupted.
    cluster.lock().unwrap_or_else(|p| p.into_inner()).kill_all();
    std::fs::write(
        dir.join("history.json"),
        serde_json::to_vec_pretty(&history)?,
    )
    .context("writing history.json")?;
    eprintln!(
        "checking {} events (history in {})...",
        history.events.len(),
        dir.join("history.json").display()
    );
    let wl = workload.clone();
    let h2 = history.clone();
    // A plain thread, not spawn_blocking: on Ctrl-C the runtime must not wait for it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(wl.check(&h2));
    });
    let mut verdict = rx.await.context("the checker panicked")?;
    if let Err(e) = finish {
        if verdict.valid == Some(true) {
            verdict = Verdict::unknown(format!("final reads failed ({e}); {}", verdict.summary));
        }
    }
    let report = report::Report::new(report::ReportInput {
        workload: entry.name,
        claim: workload.claim(),
        opts,
        history: &history,
        verdict,
        started_ns,
        ended_ns,
        recovered_ns,
        crashed,
        measures: ctx
            .measures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        run_dir: &dir,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)
        .context("writing report.json")?;
    if opts.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{}", report.human());
    }
    Ok(match report.verdict.valid {
        Some(true) => 0,
        Some(false) => 1,
        None => 3,
    })
}
