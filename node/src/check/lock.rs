//! `lock`: mutual exclusion and fencing of the `lock` plugin, with holders that are separate
//! processes and are paused with SIGSTOP while they hold the lock.
//!
//! **Holders.** Each client of the run is a child process, `dsys lock-holder SPEC` (hidden
//! subcommand, [`holder_main`]), that loops: acquire the run's lock (anonymous, no node-side
//! keep-alive, waiting up to 3 TTL), keep it alive itself, write to the fenced resource a few
//! times, release. It prints every operation as a JSON line (invoke, then ok / fail / info)
//! stamped with its own reading of the machine's realtime clock; the parent records those lines
//! in the history ([`step`](Workload::step)), with `at_ns` converted to the run's timebase by one
//! constant offset. Every holder reads the same system clock, so on a local cluster the stamps
//! of different holders are comparable (an NTP step during a run would break that; slewing
//! does not matter at these scales).
//!
//! **What a holder may claim.** A lease lock cannot stop a paused process from *believing* it
//! holds the lock. A holder may honestly claim the lock from the moment its grant is
//! acknowledged until the earlier of its release and its lease deadline computed on its own
//! clock: the time it *sent* the last keep-alive that succeeded (or the acquire, whose lease
//! was created after it was sent) plus the TTL, minus a margin. The lease cannot end earlier:
//! the consensus leader sets the deadline to TTL after it *processed* the keep-alive. A grant
//! acknowledged after the deadline counted from its acquire is no claim until a keep-alive
//! succeeds (the lease, hence the key at the head of the queue, still existed then). A holder
//! checks its deadline before each action and gives the lock up once it passed; a holder
//! that wakes from SIGSTOP after its deadline therefore does not act, and releases.
//!
//! **Fencing.** The resource is one consensus key per lock holding the highest token written
//! (zero-padded): a write with token `t` is one transaction "if the key's value is greater than
//! `t`, refuse (and read it), else put `t`". A holder paused *between* its deadline check and
//! its write (the parent holds it at a handshake: the holder prints `stall`, the parent
//! SIGSTOPs it and answers `go`) sends its write late, after the lock moved on: the fence
//! refuses it. This is the case fencing tokens exist for.
//!
//! **The checker** ([`check`]) computes the claims from the recorded events, not from what the
//! holders say, and reports invalid when: two claims on one lock overlap; tokens of successive
//! claims do not strictly increase; a holder wrote outside its claim; writes accepted by the
//! fence, in their commit (revision) order, have a decreasing token; a refusal names no higher
//! token; or the fence's own history (read with a watch at the end) is out of token order,
//! misses an acknowledged write or holds a token nobody was granted. The workload pauses a
//! holder every few TTL (alternately at the write handshake and while idle), keeps it stopped
//! until the lock moved on (another grant, or another holder's accepted write) or 5 TTL
//! passed, and records each pause as a `holder-pause` fault.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dsys_plugin_consensus::state::{
    Compare, CompareOp, CompareTarget, EventKind, OpResult, Txn, TxnOp,
};
use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest, ConsensusResponse};
use dsys_plugin_lock::{LockApi, LockRequest, LockResponse};
use dsys_runtime::{Client, ClientError, RpcError, TlsIdentity};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::Instant;

use super::history::{EventType, History, Op};
use super::{Ctx, Verdict, Worker, Workload};

/// Lease TTL of every grant in a run.
const TTL_MS: u64 = 3_000;
/// A holder stops acting this long before its computed lease deadline.
const MARGIN_MS: u64 = 300;
/// How long an acquire waits behind other holders.
const WAIT_MS: u64 = 3 * TTL_MS;
/// Longest holder pause (then it is resumed even if the lock did not move on).
const PAUSE_CAP_MS: u64 = 5 * TTL_MS;
/// Quiet time after a holder pause before the next one.
const PAUSE_GAP_MS: u64 = 2 * TTL_MS;
/// How long one step waits for a holder's next line.
const STEP_READ: Duration = Duration::from_millis(500);
/// How long the holders get to release and exit at the end.
const DRAIN: Duration = Duration::from_secs(30);
/// Most nodes a holder is told about.
const MAX_NODES: usize = 16;
/// Longest fence key.
const MAX_KEY: usize = 256;

/// Nanoseconds since the Unix epoch on this machine's realtime clock (what holders stamp).
fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The fence's value for token `t`: zero-padded so that string order is number order.
fn pad(t: u64) -> String {
    format!("{t:020}")
}

// ---------------------------------------------------------------------------------------
// The holder process.
// ---------------------------------------------------------------------------------------

/// What one holder process is told (`dsys lock-holder SPEC`, SPEC as JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HolderSpec {
    /// Holder number (in every event it prints).
    pub holder: u64,
    /// Folder with ca.pem and cli.pem/cli.key.
    pub certs: PathBuf,
    /// Nodes: (name, RPC address).
    pub nodes: Vec<(String, SocketAddr)>,
    /// Lock name.
    pub lock: String,
    /// Consensus key of the fenced resource.
    pub fence_key: String,
    /// Lease TTL.
    pub ttl_ms: u64,
    /// Safety margin subtracted from the lease deadline.
    pub margin_ms: u64,
    /// Acquire wait.
    pub wait_ms: u64,
    /// Deadline of every other request.
    pub timeout_ms: u64,
    /// Seed of the holder's choices.
    pub seed: u64,
}

impl HolderSpec {
    fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() || self.nodes.len() > MAX_NODES {
            return Err(format!("1..={MAX_NODES} nodes expected"));
        }
        dsys_plugin_lock::check_name(&self.lock).map_err(|e| e.to_string())?;
        if !(dsys_plugin_lock::MIN_TTL_MS..=60_000).contains(&self.ttl_ms) {
            return Err("ttl_ms must be 1000..=60000".into());
        }
        if self.margin_ms >= self.ttl_ms / 2 {
            return Err("margin_ms must be under half the TTL".into());
        }
        if self.wait_ms > dsys_plugin_lock::MAX_WAIT_MS {
            return Err("wait_ms too long".into());
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err("timeout_ms must be 100..=60000".into());
        }
        if self.fence_key.is_empty() || self.fence_key.len() > MAX_KEY {
            return Err(format!("fence_key must be 1..={MAX_KEY} bytes"));
        }
        Ok(())
    }
}

/// One line a holder prints.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "line", rename_all = "lowercase")]
enum Line {
    /// An operation's invoke or completion.
    Event {
        f: String,
        kind: EventType,
        node: usize,
        at_ns: u64,
        value: Value,
        error: Option<String>,
    },
    /// About to send the write with this token: waiting for `go` on stdin.
    Stall { token: u64 },
}

struct Holder {
    spec: HolderSpec,
    ops: Client,
    acq: Client,
    node: usize,
    out: tokio::io::Stdout,
    rng: StdRng,
    stop: tokio::sync::watch::Receiver<bool>,
    go: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// How an attempt to hold the lock ended.
enum Held {
    /// Released (or gave up) normally.
    Done,
    /// Told to stop.
    Stop,
}

impl Holder {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn emit(&mut self, line: &Line) -> Result<(), String> {
        let mut s = serde_json::to_string(line).map_err(|e| e.to_string())?;
        s.push('\n');
        self.out
            .write_all(s.as_bytes())
            .await
            .map_err(|e| format!("stdout: {e}"))?;
        self.out.flush().await.map_err(|e| format!("stdout: {e}"))
    }

    /// Print an event stamped now; returns the stamp.
    async fn event(
        &mut self,
        f: &str,
        kind: EventType,
        value: Value,
        error: Option<String>,
    ) -> Result<u64, String> {
        self.event_at(f, kind, wall_ns(), value, error).await
    }

    /// Print an event stamped `at_ns` (an invoke stamped at the deadline check before it).
    async fn event_at(
        &mut self,
        f: &str,
        kind: EventType,
        at_ns: u64,
        value: Value,
        error: Option<String>,
    ) -> Result<u64, String> {
        let line = Line::Event {
            f: f.into(),
            kind,
            node: self.node,
            at_ns,
            value,
            error,
        };
        self.emit(&line).await?;
        Ok(at_ns)
    }

    fn addr(&self) -> SocketAddr {
        self.spec.nodes[self.node].1
    }

    /// After an error: move on to the next node when this one seems down or cut off.
    /// Record an answer `f` did not expect (as info) or its error (classified, then maybe
    /// move to another node).
    async fn record_other<T: std::fmt::Debug>(
        &mut self,
        f: &str,
        value: Value,
        r: Result<T, ClientError>,
    ) -> Result<(), String> {
        match r {
            Ok(other) => {
                self.event(
                    f,
                    EventType::Info,
                    value,
                    Some(format!("unexpected answer {other:?}")),
                )
                .await?;
            }
            Err(e) => {
                let kind = super::classify(&e, true);
                self.event(f, kind, value, Some(e.to_string())).await?;
                self.after_error(&e);
            }
        }
        Ok(())
    }

    fn after_error(&mut self, e: &ClientError) {
        if matches!(
            e,
            ClientError::Rpc(
                RpcError::Unreachable(_) | RpcError::Timeout(_) | RpcError::PluginUnavailable(_)
            )
        ) {
            self.node = (self.node + 1) % self.spec.nodes.len();
        }
    }

    /// Sleep `d`; true if told to stop meanwhile.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        if self.stopping() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopping(),
            _ = self.stop.changed() => true,
        }
    }

    async fn run(&mut self) -> Result<(), String> {
        let lock = self.spec.lock.clone();
        while !self.stopping() {
            let inv = self
                .event(
                    "acquire",
                    EventType::Invoke,
                    json!({"lock": lock, "ttl_ms": self.spec.ttl_ms,
                           "margin_ms": self.spec.margin_ms, "wait_ms": self.spec.wait_ms}),
                    None,
                )
                .await?;
            let req = LockRequest::Acquire {
                name: lock.clone(),
                ttl_ms: self.spec.ttl_ms,
                wait_ms: self.spec.wait_ms,
                holder: None,
                keepalive: false,
            };
            let r = self.acq.call_at::<LockApi>(self.addr(), &req).await;
            let held = match r {
                Ok(LockResponse::Granted { token, lease, .. }) => {
                    self.event(
                        "acquire",
                        EventType::Ok,
                        json!({"lock": lock, "token": token, "lease": lease}),
                        None,
                    )
                    .await?;
                    Some(self.hold(token, inv).await?)
                }
                Ok(LockResponse::NotAcquired { .. }) => {
                    self.event(
                        "acquire",
                        EventType::Fail,
                        json!({"lock": lock}),
                        Some("not acquired within the wait".into()),
                    )
                    .await?;
                    None
                }
                Ok(other) => {
                    self.event(
                        "acquire",
                        EventType::Info,
                        json!({"lock": lock}),
                        Some(format!("unexpected answer {other:?}")),
                    )
                    .await?;
                    None
                }
                Err(e) => {
                    let kind = super::classify(&e, true);
                    self.event("acquire", kind, json!({"lock": lock}), Some(e.to_string()))
                        .await?;
                    self.after_error(&e);
                    None
                }
            };
            if matches!(held, Some(Held::Stop)) {
                break;
            }
            let pause = Duration::from_millis(self.rng.gen_range(0..=self.spec.ttl_ms / 4));
            if self.sleep_or_stop(pause).await {
                break;
            }
        }
        Ok(())
    }

    /// Hold grant `token` (acquire sent at `acq_inv`): keep-alives every TTL/3, fenced writes
    /// in between, each only before the deadline; then release.
    async fn hold(&mut self, token: u64, acq_inv: u64) -> Result<Held, String> {
        let lock = self.spec.lock.clone();
        let ttl_ns = self.spec.ttl_ms * 1_000_000;
        let margin_ns = self.spec.margin_ms * 1_000_000;
        // The lease was created after the acquire was sent: it lives at least one TTL from then.
        let mut deadline = (acq_inv + ttl_ns).saturating_sub(margin_ns);
        let hold_ms = self
            .rng
            .gen_range(self.spec.ttl_ms / 5..=self.spec.ttl_ms * 3 / 2);
        let until = wall_ns() + hold_ms * 1_000_000;
        let mut last_ka: Option<u64> = None;
        let mut stopped = false;
        // A grant acknowledged after the deadline counted from the acquire (it queued long,
        // or the answer was slow) is no claim yet: a keep-alive that succeeds confirms it (the
        // lease, hence the key at the head of the queue, still existed when it was served).
        let mut confirmed = wall_ns() < deadline;
        loop {
            if self.stopping() {
                stopped = true;
                break;
            }
            let now = wall_ns();
            if now >= until || (confirmed && now >= deadline) {
                break; // done, or lost (paused, or keep-alives not getting through)
            }
            if !confirmed && last_ka.is_some() {
                break; // the confirming keep-alive did not succeed
            }
            let ka_due = !confirmed || last_ka.is_none_or(|t| now.saturating_sub(t) >= ttl_ns / 3);
            if ka_due {
                // Stamped with the time of the deadline check: it is sent after that.
                let inv = self
                    .event_at(
                        "keepalive",
                        EventType::Invoke,
                        now,
                        json!({"lock": lock, "token": token}),
                        None,
                    )
                    .await?;
                last_ka = Some(inv);
                let req = LockRequest::KeepAlive {
                    name: lock.clone(),
                    token,
                };
                match self.ops.call_at::<LockApi>(self.addr(), &req).await {
                    Ok(LockResponse::Kept { ttl_ms, .. }) => {
                        let d = (inv + ttl_ms.min(self.spec.ttl_ms) * 1_000_000)
                            .saturating_sub(margin_ns);
                        let acked = self
                            .event(
                                "keepalive",
                                EventType::Ok,
                                json!({"lock": lock, "token": token, "ttl_ms": ttl_ms}),
                                None,
                            )
                            .await?;
                        if confirmed {
                            deadline = deadline.max(d);
                        } else {
                            // The claim starts at this acknowledgement, if still before `d`.
                            deadline = d;
                            confirmed = acked < d;
                        }
                    }
                    Ok(other) => {
                        self.event(
                            "keepalive",
                            EventType::Info,
                            json!({"lock": lock, "token": token}),
                            Some(format!("unexpected answer {other:?}")),
                        )
                        .await?;
                    }
                    Err(e) => {
                        let kind = super::classify(&e, true);
                        let gone = kind == EventType::Fail;
                        self.event(
                            "keepalive",
                            kind,
                            json!({"lock": lock, "token": token}),
                            Some(e.to_string()),
                        )
                        .await?;
                        self.after_error(&e);
                        if gone {
                            break; // refused: the grant is gone
                        }
                    }
                }
            } else {
                // The decision to write, stamped with the deadline check it passed.
                self.event_at(
                    "write",
                    EventType::Invoke,
                    now,
                    json!({"lock": lock, "token": token}),
                    None,
                )
                .await?;
                // The handshake where the parent may pause this holder.
                self.emit(&Line::Stall { token }).await?;
                let go = tokio::select! {
                    g = self.go.recv() => g.is_some(),
                    _ = self.stop.changed() => false,
                };
                if !go {
                    self.event(
                        "write",
                        EventType::Fail,
                        json!({"lock": lock, "token": token}),
                        Some("not sent: the holder was told to stop".into()),
                    )
                    .await?;
                    stopped = true;
                    break;
                }
                self.fenced_write(token).await?;
            }
            let now = wall_ns();
            let gap = Duration::from_millis(self.rng.gen_range(50..=250));
            let left = Duration::from_nanos(deadline.saturating_sub(now));
            if self.sleep_or_stop(gap.min(left)).await {
                stopped = true;
                break;
            }
        }
        // Release in every case: when the claim lapsed the lease may still be alive, and a
        // release frees the lock sooner (it is refused if the grant is already gone).
        self.event(
            "release",
            EventType::Invoke,
            json!({"lock": lock, "token": token}),
            None,
        )
        .await?;
        let req = LockRequest::Release {
            name: lock.clone(),
            token,
        };
        match self.ops.call_at::<LockApi>(self.addr(), &req).await {
            Ok(LockResponse::Released { .. }) => {
                self.event(
                    "release",
                    EventType::Ok,
                    json!({"lock": lock, "token": token}),
                    None,
                )
                .await?;
            }
            other => {
                self.record_other("release", json!({"lock": lock, "token": token}), other)
                    .await?;
            }
        }
        Ok(if stopped { Held::Stop } else { Held::Done })
    }

    /// Write `token` to the fence unless it holds a higher one (one transaction).
    async fn fenced_write(&mut self, token: u64) -> Result<(), String> {
        let lock = self.spec.lock.clone();
        let key = self.spec.fence_key.clone();
        let txn = Txn {
            compares: vec![Compare {
                key: key.clone(),
                op: CompareOp::Greater,
                target: CompareTarget::Value(pad(token)),
            }],
            success: vec![TxnOp::Get {
                key: key.clone(),
                prefix: false,
            }],
            failure: vec![TxnOp::Put {
                key: key.clone(),
                value: pad(token),
                lease: None,
            }],
        };
        let r = self
            .ops
            .call_at::<ConsensusApi>(self.addr(), &ConsensusRequest::Txn(txn))
            .await;
        match r {
            Ok(ConsensusResponse::Txn {
                succeeded: false,
                revision,
                ..
            }) => {
                self.event(
                    "write",
                    EventType::Ok,
                    json!({"lock": lock, "token": token, "accepted": true, "revision": revision}),
                    None,
                )
                .await?;
            }
            Ok(ConsensusResponse::Txn {
                succeeded: true,
                results,
                ..
            }) => {
                let fence = results.iter().find_map(|r| match r {
                    OpResult::Get { kvs } => {
                        kvs.first().and_then(|kv| kv.value.parse::<u64>().ok())
                    }
                    _ => None,
                });
                self.event(
                    "write",
                    EventType::Ok,
                    json!({"lock": lock, "token": token, "accepted": false, "fence": fence}),
                    None,
                )
                .await?;
            }
            other => {
                self.record_other("write", json!({"lock": lock, "token": token}), other)
                    .await?;
            }
        }
        Ok(())
    }
}

/// `dsys lock-holder SPEC`: one holder of `dsys check lock` (see the module docs). Prints its
/// operations as JSON lines on stdout; reads `go` lines on stdin (the write handshake); stops,
/// releasing what it holds, when stdin closes. Returns the exit code.
pub async fn holder_main(spec: &str) -> Result<u8, String> {
    let spec: HolderSpec =
        serde_json::from_str(spec).map_err(|e| format!("lock-holder: bad spec: {e}"))?;
    spec.validate()
        .map_err(|e| format!("lock-holder: bad spec: {e}"))?;
    let identity = TlsIdentity::load(&spec.certs, "cli").map_err(|e| e.to_string())?;
    let addrs: Vec<SocketAddr> = spec.nodes.iter().map(|n| n.1).collect();
    let timeout = Duration::from_millis(spec.timeout_ms);
    let ops = Client::new(&identity, addrs.clone(), timeout).map_err(|e| e.to_string())?;
    let acq = Client::new(
        &identity,
        addrs,
        timeout + Duration::from_millis(spec.wait_ms),
    )
    .map_err(|e| e.to_string())?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (go_tx, go) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if l.trim() == "go" && go_tx.send(()).is_err() {
                break;
            }
        }
        let _ = stop_tx.send(true);
    });
    let mut h = Holder {
        node: (spec.holder as usize) % spec.nodes.len(),
        rng: StdRng::seed_from_u64(spec.seed),
        spec,
        ops,
        acq,
        out: tokio::io::stdout(),
        stop,
        go,
    };
    h.run().await?;
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// The workload (parent side).
// ---------------------------------------------------------------------------------------

/// One running holder process as the parent sees it.
struct Proc {
    holder: u64,
    /// The history process id its events go under (a new one after an `info`).
    process: u64,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

#[derive(Debug, Default)]
struct PauseState {
    busy: bool,
    next: Option<Instant>,
    count: u64,
}

/// The workload.
#[derive(Default)]
struct LockWorkload {
    idle: Mutex<Vec<Proc>>,
    /// Number of the next holder started.
    next_holder: AtomicU64,
    /// Realtime minus run time, fixed at the first step.
    offset: OnceLock<i128>,
    max_granted: AtomicU64,
    max_accepted: AtomicU64,
    pause: Mutex<PauseState>,
}

impl std::fmt::Debug for LockWorkload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockWorkload").finish_non_exhaustive()
    }
}

pub(crate) fn new() -> Box<dyn Workload> {
    Box::new(LockWorkload::default())
}

fn lock_name(ctx: &Ctx) -> String {
    ctx.run_id.clone()
}

fn fence_key(ctx: &Ctx) -> String {
    format!("{}/fence/{}", ctx.run_id, lock_name(ctx))
}

/// Send SIGSTOP/SIGCONT (`-STOP`, `-CONT`) to `pid`.
async fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = tokio::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .await
        .map_err(|e| format!("kill {sig} {pid}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill {sig} {pid}: {st}"))
    }
}

/// Which pause a holder line allows.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PauseKind {
    /// At the write handshake: the write goes out late.
    Stall,
    /// After a keep-alive, holding and idle: it must notice it lost the lock.
    Idle,
}

impl LockWorkload {
    fn offset(&self, ctx: &Ctx) -> i128 {
        *self
            .offset
            .get_or_init(|| wall_ns() as i128 - ctx.now_ns() as i128)
    }

    fn spawn(&self, ctx: &Ctx) -> Result<Proc, String> {
        let holder = self.next_holder.fetch_add(1, Ordering::Relaxed);
        let certs = ctx.certs.clone();
        let run_dir = certs.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        let spec = HolderSpec {
            holder,
            certs,
            nodes: ctx.nodes.clone(),
            lock: lock_name(ctx),
            fence_key: fence_key(ctx),
            ttl_ms: TTL_MS,
            margin_ms: MARGIN_MS,
            wait_ms: WAIT_MS,
            timeout_ms: ctx.timeout.as_millis() as u64,
            seed: ctx.seed.wrapping_mul(7919).wrapping_add(holder),
        };
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let log = std::fs::File::create(run_dir.join(format!("holder-{holder}.log")))
            .map_err(|e| format!("holder log: {e}"))?;
        let spec_json = serde_json::to_string(&spec).map_err(|e| e.to_string())?;
        let mut child = tokio::process::Command::new(exe)
            .arg("lock-holder")
            .arg(spec_json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting holder {holder}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| "holder without stdout".to_string())?;
        Ok(Proc {
            holder,
            process: ctx.next_process.fetch_add(1, Ordering::Relaxed),
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// Record one holder line; answers a stall (after a pause, if one is due).
    async fn handle(&self, ctx: &Ctx, p: &mut Proc, text: &str, pauses: bool) {
        let line: Line = match serde_json::from_str(text) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("lock: holder {} printed `{text}`: {e}", p.holder);
                return;
            }
        };
        match line {
            Line::Stall { token } => {
                if pauses && self.pause_due(PauseKind::Stall) {
                    self.pause(ctx, p, token, PauseKind::Stall).await;
                }
                if let Some(stdin) = p.stdin.as_mut() {
                    let _ = stdin.write_all(b"go\n").await;
                    let _ = stdin.flush().await;
                }
            }
            Line::Event {
                f,
                kind,
                node,
                at_ns,
                mut value,
                error,
            } => {
                let at = (at_ns as i128 - self.offset(ctx)).max(0) as u64;
                if let Some(o) = value.as_object_mut() {
                    o.insert("holder".into(), json!(p.holder));
                    o.insert("at_ns".into(), json!(at));
                }
                let token = value["token"].as_u64().unwrap_or(0);
                if kind == EventType::Ok {
                    if f == "acquire" {
                        self.max_granted.fetch_max(token, Ordering::Relaxed);
                    }
                    if f == "write" && value["accepted"] == json!(true) {
                        self.max_accepted.fetch_max(token, Ordering::Relaxed);
                    }
                }
                let node_name = ctx.nodes.get(node).map(|n| n.0.as_str());
                ctx.rec.event(p.process, kind, &f, value, node_name, error);
                if kind == EventType::Info {
                    p.process = ctx.next_process.fetch_add(1, Ordering::Relaxed);
                }
                if pauses
                    && f == "keepalive"
                    && kind == EventType::Ok
                    && self.pause_due(PauseKind::Idle)
                {
                    self.pause(ctx, p, token, PauseKind::Idle).await;
                }
            }
        }
    }

    /// Claim the pause slot if a pause of `kind` is due (pauses alternate kinds).
    fn pause_due(&self, kind: PauseKind) -> bool {
        let mut s = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let next = *s.next.get_or_insert(now + Duration::from_millis(TTL_MS));
        let want = if s.count.is_multiple_of(2) {
            PauseKind::Stall
        } else {
            PauseKind::Idle
        };
        if s.busy || now < next || want != kind {
            return false;
        }
        s.busy = true;
        true
    }

    /// SIGSTOP holder `p` (holding `token`) until the lock moved on or the cap, then SIGCONT.
    async fn pause(&self, ctx: &Ctx, p: &mut Proc, token: u64, kind: PauseKind) {
        let Some(pid) = p.child.id() else {
            self.pause_done();
            return;
        };
        if let Err(e) = signal(pid, "-STOP").await {
            eprintln!("lock: {e}");
            self.pause_done();
            return;
        }
        let what = match kind {
            PauseKind::Stall => "at its write handshake (the write goes out after SIGCONT)",
            PauseKind::Idle => "while idle between keep-alives",
        };
        let f = ctx.rec.fault(
            "holder-pause",
            vec![format!("holder-{}", p.holder)],
            format!(
                "SIGSTOP holder {} (pid {pid}) holding token {token}, {what}",
                p.holder
            ),
        );
        let started = Instant::now();
        let min = Duration::from_millis(TTL_MS);
        let cap = Duration::from_millis(PAUSE_CAP_MS);
        loop {
            let moved = match kind {
                PauseKind::Stall => self.max_accepted.load(Ordering::Relaxed) > token,
                PauseKind::Idle => self.max_granted.load(Ordering::Relaxed) > token,
            };
            let e = started.elapsed();
            if (moved && e >= min) || e >= cap {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = signal(pid, "-CONT").await {
            eprintln!("lock: {e}");
        }
        ctx.rec.fault_ended(f);
        self.pause_done();
    }

    fn pause_done(&self) {
        let mut s = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        s.busy = false;
        s.count += 1;
        s.next = Some(Instant::now() + Duration::from_millis(PAUSE_GAP_MS));
    }

    /// Stop every holder (close stdin: it finishes its operation, releases, exits), record
    /// what they print meanwhile, and kill any still running at the deadline.
    async fn drain(&self, ctx: &Ctx) {
        let procs: Vec<Proc> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        let end = Instant::now() + DRAIN;
        for mut p in procs {
            p.stdin = None;
            if let Some(pid) = p.child.id() {
                let _ = signal(pid, "-CONT").await;
            }
            loop {
                match tokio::time::timeout_at(end, p.lines.next_line()).await {
                    Ok(Ok(Some(text))) => self.handle(ctx, &mut p, &text, false).await,
                    Ok(_) => break,
                    Err(_) => {
                        eprintln!("lock: holder {} did not stop in time; killed", p.holder);
                        break;
                    }
                }
            }
            let _ = p.child.kill().await;
        }
    }
}

#[async_trait]
impl Workload for LockWorkload {
    fn claim(&self) -> String {
        format!(
            "no two claims on the lock overlap and tokens of successive claims strictly increase \
             (a claim: from the grant's acknowledgement to the earlier of release and last \
             successful keep-alive sent + TTL {TTL_MS} ms - {MARGIN_MS} ms, on the holders' shared \
             clock); writes the token fence accepted are in token order, including late writes \
             of holders SIGSTOPped past their lease"
        )
    }

    fn quiet_ms(&self) -> (u64, u64) {
        (2000, 4000)
    }

    async fn ready(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        let req = LockRequest::Status {
            name: lock_name(ctx),
        };
        match w.send::<LockApi>(ctx, &req).await.1 {
            Ok(LockResponse::Status(_)) => Ok(()),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn step(&self, ctx: &Ctx, _w: &mut Worker) {
        self.offset(ctx);
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut p = match taken {
            Some(p) => p,
            None => match self.spawn(ctx) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("lock: {e}");
                    tokio::time::sleep(STEP_READ).await;
                    return;
                }
            },
        };
        match tokio::time::timeout(STEP_READ, p.lines.next_line()).await {
            Err(_) => {}
            Ok(Ok(Some(text))) => self.handle(ctx, &mut p, &text, true).await,
            Ok(Ok(None)) | Ok(Err(_)) => {
                // The holder exited on its own: say why, and let a new one take its place.
                let st = p.child.wait().await;
                eprintln!("lock: holder {} exited: {st:?}", p.holder);
                return;
            }
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(p);
    }

    async fn finish(&self, ctx: &Ctx, w: &mut Worker) -> Result<(), String> {
        self.drain(ctx).await;
        // The fence's own history: every put of its key, in revision order.
        let key = fence_key(ctx);
        let lock = lock_name(ctx);
        let node = w.invoke(ctx, "fence-history", json!({"lock": lock})).await;
        let mut writes: Vec<(u64, u64)> = Vec::new();
        let mut from = 1;
        loop {
            let req = ConsensusRequest::Watch {
                key: key.clone(),
                prefix: false,
                from_revision: from,
                wait_ms: 1,
                limit: 1000,
            };
            match w.send_to::<ConsensusApi>(ctx, node, &req).await.1 {
                Ok(ConsensusResponse::Events {
                    events,
                    next_revision,
                }) => {
                    if events.is_empty() {
                        break;
                    }
                    for e in events {
                        if e.kind == EventKind::Put {
                            let t = e.kv.value.parse::<u64>().unwrap_or(0);
                            writes.push((e.revision, t));
                        }
                    }
                    if next_revision <= from {
                        break;
                    }
                    from = next_revision;
                }
                Ok(other) => {
                    let msg = format!("unexpected answer {other:?}");
                    w.complete(
                        ctx,
                        EventType::Fail,
                        "fence-history",
                        json!({"lock": lock}),
                        Some(msg.clone()),
                    );
                    return Err(msg);
                }
                Err(e) => {
                    w.complete(
                        ctx,
                        EventType::Fail,
                        "fence-history",
                        json!({"lock": lock}),
                        Some(e.to_string()),
                    );
                    return Err(format!("reading the fence's history: {e}"));
                }
            }
        }
        w.complete(
            ctx,
            EventType::Ok,
            "fence-history",
            json!({"lock": lock, "writes": writes}),
            None,
        );
        Ok(())
    }

    fn check(&self, h: &History) -> Verdict {
        check(h)
    }
}

// ---------------------------------------------------------------------------------------
// The checker.
// ---------------------------------------------------------------------------------------

/// One claim: a holder's honest interval of holding one grant.
#[derive(Clone, Debug, Serialize)]
struct Claim {
    lock: String,
    holder: u64,
    token: u64,
    start_ns: u64,
    end_ns: u64,
    acquire_event: usize,
}

/// A grant being walked through.
#[derive(Clone, Debug)]
struct Open {
    lock: String,
    token: u64,
    /// None until confirmed: a grant acknowledged after the deadline counted from its
    /// acquire claims nothing until a keep-alive succeeds.
    start: Option<u64>,
    deadline: u64,
    ttl_ns: u64,
    margin_ns: u64,
    lapsed: bool,
    acquire_event: usize,
}

impl Open {
    fn close(self, holder: u64, end: u64) -> Claim {
        Claim {
            lock: self.lock,
            holder,
            token: self.token,
            // An unconfirmed grant is an empty claim (start = end).
            start_ns: self.start.unwrap_or(end.min(self.deadline)),
            end_ns: end.min(self.deadline),
            acquire_event: self.acquire_event,
        }
    }
}

/// A completed write.
#[derive(Clone, Debug)]
struct Write {
    lock: String,
    holder: u64,
    token: u64,
    done_ns: u64,
    /// `Some(revision)` accepted, `None` refused.
    revision: Option<u64>,
    fence: Option<u64>,
    event: usize,
}

fn num(v: &Value, k: &str, at: usize) -> Result<u64, String> {
    v[k].as_u64()
        .ok_or_else(|| format!("event {at}: no `{k}` in {v}"))
}

fn text(v: &Value, k: &str, at: usize) -> Result<String, String> {
    v[k].as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("event {at}: no `{k}` in {v}"))
}

#[derive(Default)]
struct Walk {
    claims: Vec<Claim>,
    writes: Vec<Write>,
    grants: Vec<(u64, u64, u64)>, // (holder, token, start)
    violations: Vec<Value>,
    writes_unknown: usize,
    keepalives_ok: usize,
    fence_history: BTreeMap<String, Vec<(u64, u64)>>,
}

fn walk(ops: &[Op<'_>]) -> Result<Walk, String> {
    let mut w = Walk::default();
    let mut open: HashMap<u64, Open> = HashMap::new();
    for op in ops {
        let inv = op.invoke;
        let v = &inv.value;
        if inv.f == "fence-history" {
            if let Some(c) = op.complete.filter(|c| c.kind == EventType::Ok) {
                let lock = text(&c.value, "lock", c.index)?;
                let list = c.value["writes"]
                    .as_array()
                    .ok_or_else(|| format!("event {}: no `writes`", c.index))?;
                let mut out = Vec::new();
                for x in list {
                    let (Some(r), Some(t)) = (x[0].as_u64(), x[1].as_u64()) else {
                        return Err(format!("event {}: bad fence entry {x}", c.index));
                    };
                    out.push((r, t));
                }
                w.fence_history.insert(lock, out);
            }
            continue;
        }
        let holder = num(v, "holder", inv.index)?;
        let at = num(v, "at_ns", inv.index)?;
        let lock = text(v, "lock", inv.index)?;
        let ok = op.complete.filter(|c| c.kind == EventType::Ok);
        match inv.f.as_str() {
            "acquire" => {
                let Some(c) = ok else { continue };
                let token = num(&c.value, "token", c.index)?;
                let acked = num(&c.value, "at_ns", c.index)?;
                let ttl_ns = num(v, "ttl_ms", inv.index)? * 1_000_000;
                let margin_ns = num(v, "margin_ms", inv.index)? * 1_000_000;
                let deadline = (at + ttl_ns).saturating_sub(margin_ns);
                if let Some(prev) = open.remove(&holder) {
                    let d = prev.deadline;
                    w.claims.push(prev.close(holder, d));
                }
                w.grants.push((holder, token, acked));
                open.insert(
                    holder,
                    Open {
                        lock,
                        token,
                        start: (acked < deadline).then_some(acked),
                        deadline,
                        ttl_ns,
                        margin_ns,
                        lapsed: false,
                        acquire_event: c.index,
                    },
                );
            }
            "keepalive" => {
                let token = num(v, "token", inv.index)?;
                let Some(o) = open.get_mut(&holder).filter(|o| o.token == token) else {
                    continue;
                };
                let d = (at + o.ttl_ns).saturating_sub(o.margin_ns);
                match (o.start, ok) {
                    // Unconfirmed: a keep-alive acknowledged before `d` starts the claim.
                    (None, Some(c)) => {
                        let acked = num(&c.value, "at_ns", c.index)?;
                        if acked < d {
                            w.keepalives_ok += 1;
                            o.start = Some(acked);
                            o.deadline = d;
                        }
                    }
                    (None, None) => {}
                    // Sent after the claim ended: it revives nothing (the holder gave up).
                    (Some(_), _) if at > o.deadline => o.lapsed = true,
                    (Some(_), Some(_)) if !o.lapsed => {
                        w.keepalives_ok += 1;
                        o.deadline = o.deadline.max(d);
                    }
                    (Some(_), _) => {}
                }
            }
            "write" => {
                let token = num(v, "token", inv.index)?;
                match open.get(&holder).filter(|o| o.token == token) {
                    None => w.violations.push(json!({
                        "kind": "write without a grant",
                        "detail": format!("holder {holder} wrote with token {token}, which it was not granted (or had released)"),
                        "event": inv.index,
                    })),
                    Some(o)
                        if o.start.is_none_or(|s| at < s) || at > o.deadline || o.lapsed =>
                    {
                        w.violations.push(json!({
                            "kind": "write outside the holder's claim",
                            "detail": format!(
                                "holder {holder} decided to write with token {token} at {at} ns, outside its claim [{:?}, {}] ns",
                                o.start, o.deadline
                            ),
                            "event": inv.index,
                        }))
                    }
                    Some(_) => {}
                }
                match ok {
                    Some(c) => {
                        let accepted = c.value["accepted"].as_bool().ok_or_else(|| {
                            format!("event {}: no `accepted` in {}", c.index, c.value)
                        })?;
                        w.writes.push(Write {
                            lock,
                            holder,
                            token,
                            done_ns: num(&c.value, "at_ns", c.index)?,
                            revision: if accepted {
                                Some(num(&c.value, "revision", c.index)?)
                            } else {
                                None
                            },
                            fence: c.value["fence"].as_u64(),
                            event: c.index,
                        });
                    }
                    None if op.outcome() == EventType::Info => w.writes_unknown += 1,
                    None => {}
                }
            }
            "release" => {
                let token = num(v, "token", inv.index)?;
                if open.get(&holder).is_some_and(|o| o.token == token) {
                    if let Some(o) = open.remove(&holder) {
                        w.claims.push(o.close(holder, at));
                    }
                }
            }
            other => return Err(format!("event {}: unknown op `{other}`", inv.index)),
        }
    }
    for (holder, o) in open {
        let d = o.deadline;
        w.claims.push(o.close(holder, d));
    }
    Ok(w)
}

/// Judge a lock history (see the module docs for what is checked).
pub fn check(h: &History) -> Verdict {
    let ops = match h.ops() {
        Ok(o) => o,
        Err(e) => return Verdict::unknown(format!("malformed history: {e}")),
    };
    let mut w = match walk(&ops) {
        Ok(w) => w,
        Err(e) => return Verdict::unknown(format!("malformed history: {e}")),
    };
    if w.grants.is_empty() {
        return Verdict::unknown("no grant in the history: nothing to check".into());
    }
    let mut violations = std::mem::take(&mut w.violations);
    let claim_json = |c: &Claim| serde_json::to_value(c).unwrap_or(Value::Null);

    // Claims of each lock: no overlap, tokens strictly increasing in time order.
    let mut by_lock: BTreeMap<&str, Vec<&Claim>> = BTreeMap::new();
    let mut empty = 0;
    for c in &w.claims {
        if c.end_ns <= c.start_ns {
            empty += 1; // acknowledged after its own deadline: never a claim
            continue;
        }
        by_lock.entry(c.lock.as_str()).or_default().push(c);
    }
    for claims in by_lock.values_mut() {
        claims.sort_by_key(|c| (c.start_ns, c.token));
        let mut latest: Option<&Claim> = None; // the claim ending last so far
        let mut prev: Option<&Claim> = None;
        for c in claims.iter() {
            if let Some(l) = latest {
                if c.start_ns < l.end_ns {
                    violations.push(json!({
                        "kind": "overlapping claims",
                        "detail": format!(
                            "token {} (holder {}) was acknowledged at {} ns, before the claim of token {} (holder {}) ended at {} ns",
                            c.token, c.holder, c.start_ns, l.token, l.holder, l.end_ns
                        ),
                        "earlier": claim_json(l),
                        "later": claim_json(c),
                    }));
                }
            }
            if let Some(p) = prev {
                if c.token <= p.token {
                    violations.push(json!({
                        "kind": "token not increasing",
                        "detail": format!(
                            "the claim of token {} (holder {}) follows the claim of token {} (holder {})",
                            c.token, c.holder, p.token, p.holder
                        ),
                        "earlier": claim_json(p),
                        "later": claim_json(c),
                    }));
                }
            }
            prev = Some(c);
            if latest.is_none_or(|l| c.end_ns > l.end_ns) {
                latest = Some(c);
            }
        }
    }

    // The fence: accepted writes in revision order have non-decreasing tokens; a refusal
    // names a higher token.
    let mut accepted: BTreeMap<&str, Vec<&Write>> = BTreeMap::new();
    let (mut refused, mut late_refused, mut late_accepted) = (0, 0, 0);
    let ends: HashMap<(&str, u64, u64), u64> = w
        .claims
        .iter()
        .map(|c| ((c.lock.as_str(), c.holder, c.token), c.end_ns))
        .collect();
    for x in &w.writes {
        let late = ends
            .get(&(x.lock.as_str(), x.holder, x.token))
            .is_some_and(|end| x.done_ns > *end);
        match x.revision {
            Some(_) => {
                accepted.entry(x.lock.as_str()).or_default().push(x);
                late_accepted += late as usize;
            }
            None => {
                refused += 1;
                late_refused += late as usize;
                if x.fence.is_none_or(|f| f <= x.token) {
                    violations.push(json!({
                        "kind": "refused without a higher token",
                        "detail": format!(
                            "the fence refused token {} but holds {:?}",
                            x.token, x.fence
                        ),
                        "event": x.event,
                    }));
                }
            }
        }
    }
    let granted: std::collections::HashSet<u64> = w.grants.iter().map(|g| g.1).collect();
    for (lock, list) in accepted.iter_mut() {
        list.sort_by_key(|x| x.revision);
        for pair in list.windows(2) {
            if pair[1].token < pair[0].token {
                violations.push(json!({
                    "kind": "fenced write out of order",
                    "detail": format!(
                        "lock {lock}: the fence accepted token {} at revision {:?} after token {} at revision {:?}",
                        pair[1].token, pair[1].revision, pair[0].token, pair[0].revision
                    ),
                    "events": [pair[0].event, pair[1].event],
                }));
            }
        }
        if let Some(hist) = w.fence_history.get(*lock) {
            for x in list.iter() {
                if let Some(r) = x.revision {
                    if !hist.contains(&(r, x.token)) {
                        violations.push(json!({
                            "kind": "acknowledged write missing from the fence",
                            "detail": format!("token {} at revision {r} is not in the fence's history", x.token),
                            "event": x.event,
                        }));
                    }
                }
            }
        }
    }
    for (lock, hist) in &w.fence_history {
        for pair in hist.windows(2) {
            if pair[1].1 < pair[0].1 {
                violations.push(json!({
                    "kind": "fence history out of order",
                    "detail": format!(
                        "lock {lock}: the fence holds token {} at revision {} after token {} at revision {}",
                        pair[1].1, pair[1].0, pair[0].1, pair[0].0
                    ),
                }));
            }
        }
        for (r, t) in hist {
            if !granted.contains(t) {
                violations.push(json!({
                    "kind": "fence holds a token nobody was granted",
                    "detail": format!("lock {lock}: token {t} at revision {r}"),
                }));
            }
        }
    }

    // Holder pauses: did the lock move on while the holder was stopped?
    let mut pauses = 0;
    let mut pauses_moved_on = 0;
    for f in h.faults.iter().filter(|f| f.kind == "holder-pause") {
        pauses += 1;
        let who: Option<u64> = f
            .nodes
            .first()
            .and_then(|n| n.strip_prefix("holder-"))
            .and_then(|n| n.parse().ok());
        let end = f.end_ns.unwrap_or(u64::MAX);
        if w.grants
            .iter()
            .any(|(h, _, s)| Some(*h) != who && *s >= f.start_ns && *s <= end)
        {
            pauses_moved_on += 1;
        }
    }

    let n_accepted: usize = accepted.values().map(Vec::len).sum();
    let details = json!({
        "grants": w.grants.len(),
        "claims": w.claims.len() - empty,
        "empty_claims": empty,
        "keepalives_ok": w.keepalives_ok,
        "writes_accepted": n_accepted,
        "writes_refused": refused,
        "writes_unknown": w.writes_unknown,
        "late_writes_refused": late_refused,
        "late_writes_accepted": late_accepted,
        "holder_pauses": pauses,
        "holder_pauses_lock_moved_on": pauses_moved_on,
        "fence_history_entries": w.fence_history.values().map(Vec::len).sum::<usize>(),
        "max_token": w.grants.iter().map(|g| g.1).max().unwrap_or(0),
    });
    if violations.is_empty() {
        Verdict::valid(
            format!(
                "{} grants, no overlapping claims, tokens strictly increasing; {} fenced writes accepted in token order, {} refused ({} late writes after the claim ended refused); {} holder pauses, {} with a new grant meanwhile",
                w.grants.len(),
                n_accepted,
                refused,
                late_refused,
                pauses,
                pauses_moved_on
            ),
            details,
        )
    } else {
        let mut kinds: Vec<String> = violations
            .iter()
            .filter_map(|v| v["kind"].as_str().map(str::to_string))
            .collect();
        kinds.dedup();
        Verdict::invalid(
            format!("{} violations: {}", violations.len(), kinds.join(", ")),
            details,
            violations,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::history::HistoryBuilder;

    const MS: u64 = 1_000_000;

    /// Hand-written histories: times are `at_ns` in the values (the holders' clock), in ms.
    struct H {
        b: HistoryBuilder,
    }

    impl H {
        fn new() -> Self {
            H {
                b: HistoryBuilder::new(),
            }
        }
        fn v(holder: u64, at_ms: u64, extra: Value) -> Value {
            let mut v = json!({"lock": "L", "holder": holder, "at_ns": at_ms * MS});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                for (k, x) in e {
                    o.insert(k.clone(), x.clone());
                }
            }
            v
        }
        /// Acquire sent at `sent`, granted at `granted` with `token` (TTL 2000, margin 200).
        fn grant(&mut self, p: u64, sent: u64, granted: u64, token: u64) -> &mut Self {
            let inv = json!({"ttl_ms": 2000, "margin_ms": 200, "wait_ms": 6000});
            self.b.invoke(p, "acquire", Self::v(p, sent, inv));
            self.b
                .ok(p, "acquire", Self::v(p, granted, json!({"token": token})));
            self
        }
        fn keepalive(&mut self, p: u64, sent: u64, token: u64, ok: bool) -> &mut Self {
            let t = json!({"token": token});
            self.b.invoke(p, "keepalive", Self::v(p, sent, t.clone()));
            if ok {
                self.b.ok(p, "keepalive", Self::v(p, sent + 5, t));
            } else {
                self.b.fail(p, "keepalive", Self::v(p, sent + 5, t));
            }
            self
        }
        /// A write decided at `sent`, answered at `done`: accepted at `rev`, or refused
        /// (`rev` None) with the fence at `fence`.
        fn write(
            &mut self,
            p: u64,
            sent: u64,
            done: u64,
            token: u64,
            rev: Option<u64>,
            fence: u64,
        ) -> &mut Self {
            self.b
                .invoke(p, "write", Self::v(p, sent, json!({"token": token})));
            let out = match rev {
                Some(r) => json!({"token": token, "accepted": true, "revision": r}),
                None => json!({"token": token, "accepted": false, "fence": fence}),
            };
            self.b.ok(p, "write", Self::v(p, done, out));
            self
        }
        fn release(&mut self, p: u64, sent: u64, token: u64) -> &mut Self {
            let t = json!({"token": token});
            self.b.invoke(p, "release", Self::v(p, sent, t.clone()));
            self.b.ok(p, "release", Self::v(p, sent + 5, t));
            self
        }
        fn fence(&mut self, writes: &[(u64, u64)]) -> &mut Self {
            self.b.invoke(99, "fence-history", json!({"lock": "L"}));
            self.b
                .ok(99, "fence-history", json!({"lock": "L", "writes": writes}));
            self
        }
        fn build(&self) -> History {
            self.b.build()
        }
    }

    fn kinds(v: &Verdict) -> Vec<String> {
        v.violations
            .iter()
            .filter_map(|x| x["kind"].as_str().map(str::to_string))
            .collect()
    }

    /// Holder 1 holds token 5 from 10 to its release at 500; holder 2 waited and gets token
    /// 9 at 520.
    fn two_holders() -> H {
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .keepalive(1, 12, 5, true)
            .write(1, 100, 110, 5, Some(7), 0)
            .release(1, 500, 5)
            .grant(2, 20, 520, 9)
            .keepalive(2, 521, 9, true)
            .write(2, 600, 610, 9, Some(12), 0)
            .release(2, 700, 9);
        h
    }

    #[test]
    fn sequential_grants_with_fenced_writes_are_valid() {
        let h = two_holders().fence(&[(7, 5), (12, 9)]).build();
        let v = check(&h);
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["grants"], json!(2));
        assert_eq!(v.details["writes_accepted"], json!(2));
    }

    #[test]
    fn overlapping_grants_are_invalid() {
        // Holder 2 is acknowledged at 300, while holder 1 holds until its release at 500.
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .keepalive(1, 12, 5, true)
            .grant(2, 20, 300, 9)
            .release(1, 500, 5)
            .release(2, 700, 9);
        let v = check(&h.build());
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert_eq!(kinds(&v), ["overlapping claims"]);
    }

    #[test]
    fn a_decreasing_token_is_invalid() {
        // No overlap in time, but the later grant has the lower token.
        let mut h = H::new();
        h.grant(1, 0, 10, 9)
            .release(1, 500, 9)
            .grant(2, 20, 520, 5)
            .release(2, 700, 5);
        let v = check(&h.build());
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert_eq!(kinds(&v), ["token not increasing"]);
    }

    #[test]
    fn a_fenced_write_out_of_order_is_invalid() {
        // Holder 1's write with token 5 is accepted at revision 15, after token 9 at 12.
        let mut h = two_holders();
        h.write(1, 800, 2000, 5, Some(15), 0);
        let v = check(&h.build());
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert!(
            kinds(&v).contains(&"fenced write out of order".to_string()),
            "{v:?}"
        );
        // ...and the same seen only in the fence's own history (the write's answer lost).
        let h = two_holders().fence(&[(7, 5), (12, 9), (15, 5)]).build();
        let v = check(&h);
        assert_eq!(v.valid, Some(false), "{v:?}");
        assert_eq!(kinds(&v), ["fence history out of order"]);
    }

    #[test]
    fn the_lease_deadline_counts_from_the_last_keepalive_sent() {
        // Holder 1: acquire sent at 0, keep-alive sent at 1000 succeeds, so it may claim the
        // lock until 1000 + 2000 - 200 = 2800 ms. A grant to holder 2 at 2500 overlaps...
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .keepalive(1, 1000, 5, true)
            .grant(2, 2400, 2500, 9);
        let v = check(&h.build());
        assert_eq!(kinds(&v), ["overlapping claims"], "{v:?}");
        // ...a grant at 2900 does not.
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .keepalive(1, 1000, 5, true)
            .grant(2, 2800, 2900, 9);
        assert_eq!(check(&h.build()).valid, Some(true));
        // A failed keep-alive extends nothing: the claim ends at 1800, a grant at 2000 is fine.
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .keepalive(1, 1000, 5, false)
            .grant(2, 1900, 2000, 9);
        assert_eq!(check(&h.build()).valid, Some(true));
        // A grant acknowledged after the deadline counted from its acquire (it queued for
        // 2.5 s) is no claim unless a keep-alive confirms it...
        let mut h = H::new();
        h.grant(1, 0, 2500, 5)
            .keepalive(1, 2510, 5, false)
            .grant(2, 2550, 2600, 9);
        let v = check(&h.build());
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["empty_claims"], json!(1));
        // ...and once one does, the claim runs from its acknowledgement (2515) on.
        let mut h = H::new();
        h.grant(1, 0, 2500, 5)
            .keepalive(1, 2510, 5, true)
            .grant(2, 2550, 2600, 9);
        let v = check(&h.build());
        assert_eq!(kinds(&v), ["overlapping claims"], "{v:?}");
    }

    #[test]
    fn a_paused_holders_late_write_must_be_refused_and_it_must_not_act_after_waking() {
        // Holder 1 decides to write at 500 (inside its claim, which ends at 1800), is paused,
        // holder 2 gets token 9 at 2100 and writes; holder 1's write arrives at 4000 and is
        // refused by the fence: valid, and counted as a late write refused.
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .write(1, 200, 210, 5, Some(7), 0)
            .b
            .invoke(1, "write", H::v(1, 500, json!({"token": 5})));
        h.grant(2, 2000, 2100, 9)
            .write(2, 2200, 2210, 9, Some(12), 0)
            .b
            .ok(
                1,
                "write",
                H::v(1, 4000, json!({"token": 5, "accepted": false, "fence": 9})),
            );
        h.release(1, 4001, 5).release(2, 2300, 9);
        h.b.fault("holder-pause", &["holder-1"], 0, u64::MAX);
        let v = check(&h.fence(&[(7, 5), (12, 9)]).build());
        assert_eq!(v.valid, Some(true), "{v:?}");
        assert_eq!(v.details["late_writes_refused"], json!(1));
        assert_eq!(v.details["holder_pauses_lock_moved_on"], json!(1));
        // A holder that wakes after its deadline and writes anyway is caught, even though the
        // fence refused it.
        let mut h = H::new();
        h.grant(1, 0, 10, 5)
            .grant(2, 2000, 2100, 9)
            .write(1, 4000, 4010, 5, None, 9);
        let v = check(&h.build());
        assert_eq!(kinds(&v), ["write outside the holder's claim"], "{v:?}");
        // A refusal must name a higher token.
        let mut h = H::new();
        h.grant(1, 0, 10, 5).write(1, 100, 110, 5, None, 5);
        let v = check(&h.build());
        assert_eq!(kinds(&v), ["refused without a higher token"], "{v:?}");
    }

    #[test]
    fn the_fence_history_must_hold_what_was_acknowledged_and_only_granted_tokens() {
        let h = two_holders().fence(&[(12, 9)]).build();
        let v = check(&h);
        assert_eq!(
            kinds(&v),
            ["acknowledged write missing from the fence"],
            "{v:?}"
        );
        let h = two_holders().fence(&[(7, 5), (12, 9), (13, 11)]).build();
        let v = check(&h);
        assert_eq!(
            kinds(&v),
            ["fence holds a token nobody was granted"],
            "{v:?}"
        );
    }

    #[test]
    fn no_grant_or_a_malformed_history_is_unknown_not_valid() {
        assert_eq!(check(&History::default()).valid, None);
        let mut b = HistoryBuilder::new();
        b.invoke(1, "acquire", json!({"lock": "L", "holder": 1}));
        b.ok(1, "acquire", json!({"lock": "L", "holder": 1, "token": 3}));
        assert_eq!(check(&b.build()).valid, None);
    }

    #[test]
    fn holder_specs_are_checked() {
        let ok = HolderSpec {
            holder: 0,
            certs: PathBuf::from("c"),
            nodes: vec![("n1".into(), "127.0.0.1:1".parse().expect("addr"))],
            lock: "L".into(),
            fence_key: "k".into(),
            ttl_ms: TTL_MS,
            margin_ms: MARGIN_MS,
            wait_ms: WAIT_MS,
            timeout_ms: 5000,
            seed: 1,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            HolderSpec {
                nodes: vec![],
                ..ok.clone()
            },
            HolderSpec {
                lock: "a/b".into(),
                ..ok.clone()
            },
            HolderSpec {
                ttl_ms: 10,
                ..ok.clone()
            },
            HolderSpec {
                margin_ms: TTL_MS,
                ..ok.clone()
            },
            HolderSpec {
                fence_key: String::new(),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
