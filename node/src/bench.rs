//! `dsys bench rpc`: request/response latency and throughput of the runtime's RPC between two
//! in-process nodes over loopback QUIC with mutual TLS, beside a plain length-prefixed TCP
//! echo over loopback measured in the same run, with the ratio printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dsys_runtime::{
    init_cluster_certs, percentile, ClusterConfig, Node, NodeOptions, SysApi, SysRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Latency summary of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    /// What was measured.
    pub name: String,
    /// Concurrent requests in flight.
    pub concurrency: usize,
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Failed requests (not counted in the latencies).
    pub errors: u64,
}

fn summarize(
    name: &str,
    concurrency: usize,
    mut lat: Vec<Duration>,
    wall: Duration,
    errors: u64,
) -> Figures {
    lat.sort();
    let pct = |p: f64| percentile(&lat, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    Figures {
        name: name.into(),
        concurrency,
        requests: lat.len() as u64,
        rps: lat.len() as f64 / wall.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

/// Run `op` from `concurrency` workers for `duration`, collecting the latency of each
/// success; failures are counted in `errors` and the run goes on (benchmarks run under chaos).
async fn drive<F, Fut>(
    concurrency: usize,
    duration: Duration,
    errors: Arc<std::sync::atomic::AtomicU64>,
    op: F,
) -> anyhow::Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let end = start + duration;
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (op, errors) = (op.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                match op(w).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    Ok((all, start.elapsed()))
}

async fn tcp_echo(
    concurrency: usize,
    duration: Duration,
    payload: usize,
) -> anyhow::Result<Figures> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                loop {
                    let Ok(n) = s.read_u32().await else { return };
                    buf.resize(n as usize, 0);
                    if s.read_exact(&mut buf).await.is_err() {
                        return;
                    }
                    if s.write_u32(n).await.is_err() || s.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut conns = Vec::new();
    for _ in 0..concurrency {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(Arc::new(tokio::sync::Mutex::new(s)));
    }
    let conns = Arc::new(conns);
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (lat, wall) = drive(concurrency, duration, errors.clone(), move |w| {
        let conns = conns.clone();
        async move {
            let mut s = conns[w].lock().await;
            let body = vec![7u8; payload];
            s.write_u32(body.len() as u32).await?;
            s.write_all(&body).await?;
            let n = s.read_u32().await? as usize;
            let mut back = vec![0u8; n];
            s.read_exact(&mut back).await?;
            Ok(())
        }
    })
    .await?;
    server.abort();
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    Ok(summarize(
        "tcp echo (plain, loopback)",
        concurrency,
        lat,
        wall,
        errors,
    ))
}

/// Measure RPC and TCP echo at concurrency 1 and 64; returns the figures.
pub async fn rpc(duration: Duration, payload: usize) -> anyhow::Result<Vec<Figures>> {
    let dir = tempfile::tempdir()?;
    let cfg =
        ClusterConfig::local_ephemeral(2, &dir.path().join("certs"), &dir.path().join("data"));
    init_cluster_certs(&cfg.cluster.certs_dir, &["n1".into(), "n2".into()])?;
    let n1 = Node::start(NodeOptions {
        config: cfg.clone(),
        node_id: "n1".into(),
        plugins: vec![],
        seed_addrs: vec![],
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let n2 = Node::start(NodeOptions {
        config: cfg,
        node_id: "n2".into(),
        plugins: vec![],
        seed_addrs: vec![n1.gossip_addr()],
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let joined = n1
        .membership()
        .wait_for(Duration::from_secs(20), |v| v.alive().len() == 2)
        .await;
    anyhow::ensure!(
        joined,
        "the two bench nodes did not see each other within 20 s"
    );
    let mut out = Vec::new();
    for c in [1usize, 64] {
        let rpc = n1.rpc().clone();
        // Warm the connection up.
        rpc.call::<SysApi>("n2", &SysRequest::Echo(vec![1; payload]))
            .await?;
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (lat, wall) = drive(c, duration, errors.clone(), move |_| {
            let rpc = rpc.clone();
            async move {
                rpc.call::<SysApi>("n2", &SysRequest::Echo(vec![7u8; payload]))
                    .await
                    .context("rpc")?;
                Ok(())
            }
        })
        .await?;
        let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
        out.push(summarize("dsys rpc (QUIC+mTLS)", c, lat, wall, errors));
        out.push(tcp_echo(c, duration, payload).await?);
    }
    n2.kill().await;
    n1.kill().await;
    Ok(out)
}

/// Drive `dsys ratelimit check` against a running cluster: `concurrency` workers spread over
/// every endpoint, keys drawn from `keys` distinct ones. Returns the figures and how many
/// decisions were allowed and limited.
pub async fn ratelimit(
    clients: Vec<dsys_runtime::Client>,
    rule: String,
    keys: u64,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(Figures, u64, u64)> {
    use dsys_plugin_ratelimit::{RatelimitApi, RatelimitRequest, RatelimitResponse};
    use std::sync::atomic::{AtomicU64, Ordering};
    anyhow::ensure!(!clients.is_empty(), "no endpoints");
    let clients = Arc::new(clients);
    let allowed = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let (a, l) = (allowed.clone(), limited.clone());
    let errors = Arc::new(AtomicU64::new(0));
    let (lat, wall) = drive(concurrency, duration, errors.clone(), move |w| {
        let (clients, rule, a, l, seq) = (
            clients.clone(),
            rule.clone(),
            a.clone(),
            l.clone(),
            seq.clone(),
        );
        async move {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let req = RatelimitRequest::Check {
                rule,
                key: format!("bench-{}", n % keys.max(1)),
                cost: 1,
            };
            let client = &clients[w % clients.len()];
            match client.call::<RatelimitApi>(&req).await? {
                RatelimitResponse::Decision { decision, .. } if decision.allowed => {
                    a.fetch_add(1, Ordering::Relaxed)
                }
                _ => l.fetch_add(1, Ordering::Relaxed),
            };
            Ok(())
        }
    })
    .await?;
    Ok((
        summarize(
            "ratelimit check",
            concurrency,
            lat,
            wall,
            errors.load(Ordering::Relaxed),
        ),
        allowed.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    ))
}

/// Settings of `dsys bench kv`.
#[derive(Debug, Clone)]
pub struct KvBench {
    /// Requests in flight.
    pub concurrency: usize,
    /// Percent of operations that are reads (the rest are writes).
    pub read_pct: u32,
    /// How long to run.
    pub duration: Duration,
    /// Distinct keys.
    pub keys: u64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Write quorum (None: the cluster's default).
    pub w: Option<u8>,
    /// Read quorum (None: the cluster's default).
    pub r: Option<u8>,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

/// Drive `kv` gets and puts against a running cluster, workers spread over every endpoint.
/// Returns (read figures, write figures).
pub async fn kv(
    clients: Vec<dsys_runtime::Client>,
    b: KvBench,
) -> anyhow::Result<(Figures, Figures)> {
    use dsys_plugin_kv::{KvApi, KvRequest};
    use std::sync::atomic::{AtomicU64, Ordering};
    anyhow::ensure!(!clients.is_empty(), "no endpoints");
    let clients = Arc::new(clients);
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + b.duration;
    let progress = progress_line(b.progress, b.duration, start, done.clone(), errors.clone());
    let mut workers = Vec::new();
    for w in 0..b.concurrency {
        let (clients, done, errors, b) = (clients.clone(), done.clone(), errors.clone(), b.clone());
        workers.push(tokio::spawn(async move {
            let client = &clients[w % clients.len()];
            let (mut reads, mut writes) = (Vec::new(), Vec::new());
            let mut i: u64 = w as u64;
            let value = vec![b'x'; b.value_size];
            while Instant::now() < end {
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = format!("bench-{}", (i >> 16) % b.keys.max(1));
                let is_read = ((i >> 40) % 100) < b.read_pct as u64;
                let req = if is_read {
                    KvRequest::Get { key, r: b.r }
                } else {
                    KvRequest::Put {
                        key,
                        value: value.clone(),
                        w: b.w,
                    }
                };
                let t = Instant::now();
                match client.call::<KvApi>(&req).await {
                    Ok(_) => {
                        let el = t.elapsed();
                        if is_read {
                            reads.push(el)
                        } else {
                            writes.push(el)
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("error (after {} ms): {e}", t.elapsed().as_millis());
                        }
                    }
                }
            }
            (reads, writes)
        }));
    }
    let (mut reads, mut writes) = (Vec::new(), Vec::new());
    for w in workers {
        let (r, wr) = w.await?;
        reads.extend(r);
        writes.extend(wr);
    }
    progress.finish();
    let wall = start.elapsed();
    let errs = errors.load(Ordering::Relaxed);
    Ok((
        summarize("kv get", b.concurrency, reads, wall, 0),
        summarize("kv put", b.concurrency, writes, wall, errs),
    ))
}

/// Settings of `dsys bench raft`. The defaults are those of `etcdctl check perf --load=l`
/// (etcd's `etcdctl/ctlv3/command/check.go`): 500 clients, puts of a fresh random key of
/// 256 bytes under a prefix with a 1024-byte value, 60 s, rate-limited to 8000 puts/s.
#[derive(Debug, Clone)]
pub struct RaftBench {
    /// Requests in flight (etcd: one client connection each; here spread over the endpoints).
    pub concurrency: usize,
    /// How long to issue requests.
    pub duration: Duration,
    /// Key bytes after the prefix.
    pub key_size: usize,
    /// Value bytes.
    pub value_size: usize,
    /// Most puts per second issued, over all workers (0: as fast as they complete).
    pub rate: u64,
    /// Key prefix; every key under it is deleted at the end (as `check perf` does).
    pub prefix: String,
    /// Show a progress line on stderr.
    pub progress: bool,
}

/// What `dsys bench raft` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RaftReport {
    /// Puts: writes/s, p50/p99, errors.
    pub writes: Figures,
    /// Slowest acknowledged put in seconds (etcd's check fails above 0.5 s).
    pub slowest_s: f64,
    /// Standard deviation of the latencies in seconds (etcd's check fails above 0.1 s).
    pub stddev_s: f64,
    /// The rate limit in force (0: none).
    pub rate: u64,
}

/// A running progress line (or none); [`Progress::finish`] clears it.
struct Progress(Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>);

impl Progress {
    fn finish(self) {
        if let Some((bar, ticker)) = self.0 {
            ticker.abort();
            bar.finish_and_clear();
        }
    }
}

/// If `show`, a progress line on stderr (elapsed/duration, operations, ops/s, errors)
/// refreshed every 200 ms until finished.
fn progress_line(
    show: bool,
    duration: Duration,
    start: Instant,
    done: Arc<std::sync::atomic::AtomicU64>,
    errors: Arc<std::sync::atomic::AtomicU64>,
) -> Progress {
    use std::sync::atomic::Ordering;
    if !show {
        return Progress(None);
    }
    let pb = indicatif::ProgressBar::new(duration.as_millis() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let bar = pb.clone();
    let h = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let el = start.elapsed();
            let ops = done.load(Ordering::Relaxed);
            bar.set_position(el.as_millis() as u64);
            bar.set_message(format!(
                "{ops} ops, {:.0} ops/s, {} errors",
                ops as f64 / el.as_secs_f64().max(0.001),
                errors.load(Ordering::Relaxed)
            ));
        }
    });
    Progress(Some((pb, h)))
}

/// Drive `consensus` puts against a running cluster the way `etcdctl check perf` drives etcd:
/// `concurrency` workers (spread over every endpoint, each sending its next put when the last
/// one is acknowledged), a fresh random key per put, an optional global rate limit. Every key
/// under the prefix is deleted at the end.
pub async fn raft(clients: Vec<dsys_runtime::Client>, b: RaftBench) -> anyhow::Result<RaftReport> {
    use dsys_plugin_consensus::{ConsensusApi, ConsensusRequest};
    use std::sync::atomic::{AtomicU64, Ordering};
    anyhow::ensure!(!clients.is_empty(), "no endpoints");
    anyhow::ensure!(b.concurrency > 0, "concurrency must be at least 1");
    let clients = Arc::new(clients);
    // Incompressible filler: keys and values are slices of random printable bytes, so a
    // transport that compresses gains nothing over etcd's (uncompressed) zero bytes.
    let filler: Arc<Vec<u8>> = Arc::new({
        use rand::Rng;
        let mut r = rand::thread_rng();
        (0..(64 << 10) + b.key_size.max(b.value_size))
            .map(|_| r.gen_range(b'a'..=b'z'))
            .collect()
    });
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // The rate limiter hands out send times 1/rate apart (a token bucket of burst 1, as
    // golang.org/x/time/rate with burst 1 in check perf), lock-free: the next free slot in
    // nanoseconds since `origin`.
    let origin = tokio::time::Instant::now();
    let next_slot = Arc::new(AtomicU64::new(0));
    let interval_ns = if b.rate > 0 {
        1_000_000_000 / b.rate
    } else {
        0
    };
    let start = Instant::now();
    let end = start + b.duration;
    let progress = progress_line(b.progress, b.duration, start, done.clone(), errors.clone());
    let mut workers = Vec::new();
    for w in 0..b.concurrency {
        let (clients, done, errors, b, filler, next_slot) = (
            clients.clone(),
            done.clone(),
            errors.clone(),
            b.clone(),
            filler.clone(),
            next_slot.clone(),
        );
        workers.push(tokio::spawn(async move {
            let client = &clients[w % clients.len()];
            let mut lat = Vec::new();
            let mut i: u64 = rand::random::<u64>() | 1;
            while Instant::now() < end {
                if b.rate > 0 {
                    let now = origin.elapsed().as_nanos() as u64;
                    let prev = next_slot
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some(n.max(now) + interval_ns)
                        })
                        .unwrap_or(now);
                    let at = prev.max(now);
                    if at > now {
                        tokio::time::sleep_until(origin + Duration::from_nanos(at)).await;
                    }
                    if Instant::now() >= end {
                        break;
                    }
                }
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (i >> 20) as usize % (64 << 10);
                let id = format!("{:016x}", i ^ (i >> 29));
                let mut key = String::with_capacity(b.prefix.len() + b.key_size);
                key.push_str(&b.prefix);
                key.push_str(&id[..id.len().min(b.key_size)]);
                let pad = b.key_size.saturating_sub(id.len());
                key.push_str(std::str::from_utf8(&filler[off..off + pad]).unwrap_or_default());
                let value = std::str::from_utf8(&filler[off..off + b.value_size])
                    .unwrap_or_default()
                    .to_string();
                let req = ConsensusRequest::Put {
                    key,
                    value,
                    lease: None,
                };
                let t = Instant::now();
                match client.call::<ConsensusApi>(&req).await {
                    Ok(_) => {
                        lat.push(t.elapsed());
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("error (after {} ms): {e}", t.elapsed().as_millis());
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await?);
    }
    let wall = start.elapsed();
    progress.finish();
    // Clean up like check perf (one delete of the prefix).
    let cleanup = clients[0]
        .call::<ConsensusApi>(&ConsensusRequest::Delete {
            key: b.prefix.clone(),
            prefix: true,
        })
        .await;
    if let Err(e) = cleanup {
        eprintln!("warning: deleting the bench keys under {}: {e}", b.prefix);
    }
    let secs: Vec<f64> = lat.iter().map(|d| d.as_secs_f64()).collect();
    let n = secs.len().max(1) as f64;
    let mean = secs.iter().sum::<f64>() / n;
    let stddev = (secs.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    let slowest = secs.iter().cloned().fold(0.0, f64::max);
    Ok(RaftReport {
        writes: summarize(
            "raft put",
            b.concurrency,
            lat,
            wall,
            errors.load(Ordering::Relaxed),
        ),
        slowest_s: slowest,
        stddev_s: stddev,
        rate: b.rate,
    })
}
