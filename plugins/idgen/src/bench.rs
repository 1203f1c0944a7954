//! `dsys bench id`: ids per second per node through the real RPC path (QUIC + mTLS, the
//! plugin's request handler, the generator), with `concurrency` batch requests in flight per
//! node. Every id received is expanded and checked to increase along each worker's stream.
//! The ceiling is the layout's: 4096 ids per millisecond per worker, 4,096,000 ids/s.

use std::sync::Arc;
use std::time::Duration;

use dsys_runtime::Client;
use serde::Serialize;
use tokio::time::Instant;

use crate::api::{IdRequest, IdResponse, IdgenApi, MAX_BATCH};
use crate::layout::MAX_IDS_PER_SEC;

/// Settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How long to measure.
    pub duration: Duration,
    /// Batch requests in flight per node.
    pub concurrency: usize,
    /// Ids per request.
    pub batch: u32,
}

impl BenchOptions {
    /// Refuse nonsense.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.concurrency) {
            return Err("--concurrency must be 1..=256".into());
        }
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(format!("--batch must be 1..={MAX_BATCH}"));
        }
        if self.duration < Duration::from_millis(100) || self.duration > Duration::from_secs(3600) {
            return Err("--duration must be 100ms..=1h".into());
        }
        Ok(())
    }
}

/// What one node did.
#[derive(Debug, Clone, Serialize)]
pub struct NodeFigures {
    /// Endpoint measured.
    pub endpoint: String,
    /// Node that answered.
    pub node: String,
    /// Batch requests answered.
    pub batches: u64,
    /// Ids received.
    pub ids: u64,
    /// Failed requests.
    pub errors: u64,
    /// Ids that did not increase along a worker's stream (must be 0).
    pub out_of_order: u64,
    /// Ids per second.
    pub ids_per_sec: f64,
    /// Median latency of a batch request, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of a batch request, ms.
    pub p99_ms: f64,
    /// `ids_per_sec` / 4,096,000 (what one worker id allows).
    pub ratio: f64,
}

#[derive(Default)]
struct Tally {
    node: String,
    lat: Vec<Duration>,
    ids: u64,
    errors: u64,
    out_of_order: u64,
}

async fn ready(client: &Client, deadline: Duration) -> Result<(), String> {
    let addr = client.endpoints().first().copied().ok_or("no endpoint")?;
    let end = Instant::now() + deadline;
    loop {
        match client
            .call_at::<IdgenApi>(addr, &IdRequest::Next { n: 1 })
            .await
        {
            Ok(IdResponse::Ids(_)) => return Ok(()),
            Ok(other) => return Err(format!("{addr}: unexpected answer {other:?}")),
            Err(e) if Instant::now() >= end => return Err(format!("{addr}: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Measure every client's first endpoint at once (one client per node).
pub async fn bench(clients: Vec<Client>, o: &BenchOptions) -> Result<Vec<NodeFigures>, String> {
    o.validate()?;
    if clients.is_empty() {
        return Err("no endpoints".into());
    }
    for c in &clients {
        ready(c, Duration::from_secs(30)).await?;
    }
    let clients: Vec<Arc<Client>> = clients.into_iter().map(Arc::new).collect();
    let start = Instant::now();
    let end = start + o.duration;
    let mut tasks = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for _ in 0..o.concurrency {
            let (c, batch) = (c.clone(), o.batch);
            tasks.push((
                i,
                tokio::spawn(async move {
                    let mut t = Tally::default();
                    let Some(addr) = c.endpoints().first().copied() else {
                        return t;
                    };
                    let mut prev = 0u64;
                    while Instant::now() < end {
                        let t0 = Instant::now();
                        match c
                            .call_at::<IdgenApi>(addr, &IdRequest::Next { n: batch })
                            .await
                        {
                            Ok(IdResponse::Ids(b)) => {
                                t.lat.push(t0.elapsed());
                                for id in b.ids() {
                                    if id <= prev {
                                        t.out_of_order += 1;
                                    }
                                    prev = id;
                                    t.ids += 1;
                                }
                                t.node = b.node;
                            }
                            _ => t.errors += 1,
                        }
                    }
                    t
                }),
            ));
        }
    }
    let mut per: Vec<Tally> = (0..clients.len()).map(|_| Tally::default()).collect();
    for (i, h) in tasks {
        let t = h.await.map_err(|e| format!("a bench task failed: {e}"))?;
        let p = &mut per[i];
        if p.node.is_empty() {
            p.node = t.node;
        }
        p.lat.extend(t.lat);
        p.ids += t.ids;
        p.errors += t.errors;
        p.out_of_order += t.out_of_order;
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(per
        .into_iter()
        .zip(&clients)
        .map(|(mut t, c)| {
            t.lat.sort();
            let pct = |p: f64| {
                dsys_runtime::percentile(&t.lat, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
            };
            let ids_per_sec = t.ids as f64 / wall;
            NodeFigures {
                endpoint: c
                    .endpoints()
                    .first()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                node: t.node.clone(),
                batches: t.lat.len() as u64,
                ids: t.ids,
                errors: t.errors,
                out_of_order: t.out_of_order,
                ids_per_sec,
                p50_ms: pct(0.5),
                p99_ms: pct(0.99),
                ratio: ids_per_sec / MAX_IDS_PER_SEC as f64,
            }
        })
        .collect())
}

/// The figures as a table.
pub fn table(figs: &[NodeFigures], o: &BenchOptions) -> String {
    let mut out = format!(
        "{} batch requests of {} ids in flight per node, {:?}\n{:<6} {:<16} {:>8} {:>11} {:>12} {:>9} {:>9} {:>7} {:>6} {:>6}\n",
        o.concurrency,
        o.batch,
        o.duration,
        "node",
        "endpoint",
        "batches",
        "ids",
        "ids/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "errors",
        "order"
    );
    for f in figs {
        out.push_str(&format!(
            "{:<6} {:<16} {:>8} {:>11} {:>12.0} {:>9.2} {:>9.2} {:>6.2}x {:>6} {:>6}\n",
            f.node,
            f.endpoint,
            f.batches,
            f.ids,
            f.ids_per_sec,
            f.p50_ms,
            f.p99_ms,
            f.ratio,
            f.errors,
            f.out_of_order
        ));
    }
    let total: f64 = figs.iter().map(|f| f.ids_per_sec).sum();
    out.push_str(&format!(
        "total {total:.0} ids/s; ratio = ids/s per node / {MAX_IDS_PER_SEC} (4096 per ms, what one worker id allows)\n"
    ));
    out
}
