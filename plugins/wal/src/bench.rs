//! `dsys bench wal`: appends per second, MB/s and latency of the runtime's WAL under group
//! commit, for several record sizes and numbers of concurrent writers, each beside a plain
//! loop of `write` + `fdatasync` on the same disk in the same run. The plain loop writes the
//! same number of bytes in batches of the size the group commit achieved (bytes per fsync),
//! so the ratio is the cost of the WAL's framing, CRC, queueing and acknowledgements over the
//! disk's own batched-fsync speed. Each case alternates WAL and plain-loop slices so that both
//! see the same disk conditions.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dsys_runtime::storage::{Wal, WalConfig, WalError, RECORD_HEADER_BYTES};
use serde::Serialize;
use tokio::time::Instant;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Folder on the disk to measure (a scratch subfolder is made and removed per case).
    pub dir: PathBuf,
    /// Time spent appending per case.
    pub duration: Duration,
    /// Payload sizes in bytes.
    pub record_sizes: Vec<usize>,
    /// Numbers of concurrent writers.
    pub writers: Vec<usize>,
}

impl BenchOptions {
    /// 100 B and 4 KiB records with 1, 8 and 64 writers, 3 s each, under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            dir: dir.into(),
            duration: Duration::from_secs(3),
            record_sizes: vec![100, 4096],
            writers: vec![1, 8, 64],
        }
    }
}

/// Figures of one case.
#[derive(Debug, Clone, Serialize)]
pub struct BenchFigures {
    /// Payload bytes per record.
    pub record_bytes: usize,
    /// Concurrent writers.
    pub writers: usize,
    /// Appends acknowledged.
    pub appends: u64,
    /// Acknowledged appends per second.
    pub appends_per_s: f64,
    /// Payload MB/s (10^6 bytes).
    pub payload_mb_per_s: f64,
    /// Disk MB/s (records with their headers).
    pub disk_mb_per_s: f64,
    /// fsyncs done by the WAL.
    pub fsyncs: u64,
    /// Records per fsync.
    pub records_per_fsync: f64,
    /// Median append latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile append latency, microseconds.
    pub p99_us: f64,
    /// Bytes per `write` + `fdatasync` of the plain loop (= the WAL's bytes per fsync,
    /// averaged over the slices).
    pub raw_batch_bytes: u64,
    /// The plain loop's speed, in the same records per second.
    pub raw_appends_per_s: f64,
    /// The plain loop's disk MB/s.
    pub raw_disk_mb_per_s: f64,
    /// WAL appends/s over raw appends/s.
    pub ratio: f64,
    /// The same loop over a file zero-filled (and fsynced) beforehand, as the WAL pre-fills
    /// its segments: the best a plain loop does on this disk, in records per second.
    pub raw_prefilled_appends_per_s: f64,
    /// WAL appends/s over the pre-filled loop's.
    pub ratio_prefilled: f64,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    dsys_runtime::percentile(sorted, p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

/// The plain loop: `total` bytes written as `write(batch)` + `fdatasync`, stopping early at
/// `limit`, into a new file, or over `total` zeros written and fsynced before the clock
/// starts when `prefilled`. Returns (bytes written, time taken).
fn raw_batched(
    path: &Path,
    total: u64,
    batch: usize,
    limit: Duration,
    prefilled: bool,
) -> Result<(u64, Duration), WalError> {
    let io = |op: &'static str| {
        move |e| WalError::Io {
            op,
            path: path.into(),
            source: e,
        }
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(io("create"))?;
    if prefilled {
        let zeros = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n]).map_err(io("pre-fill"))?;
            left -= n as u64;
        }
        f.sync_all().map_err(io("fsync"))?;
        f.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
    }
    let buf = vec![0xA5u8; batch.max(1)];
    let t0 = Instant::now();
    let mut done = 0u64;
    while done < total && t0.elapsed() < limit {
        f.write_all(&buf)
            .and_then(|_| f.sync_data())
            .map_err(io("write"))?;
        done += buf.len() as u64;
    }
    Ok((done, t0.elapsed()))
}

/// Slices per case: WAL and plain loop alternate, so both see the same disk conditions
/// (fsync latency on shared or virtual disks drifts by tens of percent within seconds).
const SLICES: u32 = 5;

async fn one_case(
    root: &Path,
    size: usize,
    writers: usize,
    duration: Duration,
) -> Result<BenchFigures, WalError> {
    let dir = root.join(format!("wal-{size}-{writers}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (wal, _) = Wal::open(WalConfig::new(&dir)).await?;
    let raw_path = root.join(format!("raw-{size}-{writers}.dat"));
    let payload = Arc::new(vec![0x5Au8; size]);
    let rec = (RECORD_HEADER_BYTES + size) as f64;
    let slice = duration / SLICES;
    let mut lat = Vec::new();
    let (mut wal_time, mut raw_time, mut pre_time) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut raw_bytes, mut pre_bytes, mut batch_sum) = (0u64, 0u64, 0u64);
    let first = wal.stats();
    for _ in 0..SLICES {
        let before = wal.stats();
        let deadline = Instant::now() + slice;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let wal = wal.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let s = Instant::now();
                    wal.append(1, payload.to_vec()).await?;
                    lat.push(s.elapsed());
                }
                Ok::<_, WalError>(lat)
            }));
        }
        for t in tasks {
            lat.extend(
                t.await
                    .map_err(|e| WalError::InvalidArgument(format!("bench task: {e}")))??,
            );
        }
        wal_time += t0.elapsed();
        let after = wal.stats();
        let bytes = after.bytes_written - before.bytes_written;
        let batch = (bytes / (after.fsyncs - before.fsyncs).max(1)).max(1);
        batch_sum += batch;
        // The plain loop: the same bytes, in batches of the size the group commit achieved,
        // appended to a new file and then written over a pre-filled one.
        for prefilled in [false, true] {
            let (b, t) = tokio::task::spawn_blocking({
                let p = raw_path.clone();
                move || raw_batched(&p, bytes, batch as usize, slice * 3, prefilled)
            })
            .await
            .map_err(|e| WalError::InvalidArgument(format!("bench task: {e}")))??;
            if prefilled {
                (pre_bytes, pre_time) = (pre_bytes + b, pre_time + t);
            } else {
                (raw_bytes, raw_time) = (raw_bytes + b, raw_time + t);
            }
        }
    }
    let st = wal.stats();
    wal.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&raw_path);
    lat.sort_unstable();
    let appends = lat.len() as u64;
    let appends_per_s = appends as f64 / wal_time.as_secs_f64().max(1e-9);
    let fsyncs = (st.fsyncs - first.fsyncs).max(1);
    let raw_bps = raw_bytes as f64 / raw_time.as_secs_f64().max(1e-9);
    let raw_appends_per_s = raw_bps / rec;
    let raw_prefilled_appends_per_s = pre_bytes as f64 / pre_time.as_secs_f64().max(1e-9) / rec;
    Ok(BenchFigures {
        record_bytes: size,
        writers,
        appends,
        appends_per_s,
        payload_mb_per_s: appends_per_s * size as f64 / 1e6,
        disk_mb_per_s: appends_per_s * rec / 1e6,
        fsyncs,
        records_per_fsync: (st.records - first.records) as f64 / fsyncs as f64,
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        raw_batch_bytes: batch_sum / u64::from(SLICES),
        raw_appends_per_s,
        raw_disk_mb_per_s: raw_bps / 1e6,
        ratio: appends_per_s / raw_appends_per_s,
        raw_prefilled_appends_per_s,
        ratio_prefilled: appends_per_s / raw_prefilled_appends_per_s,
    })
}

/// Run every case of `opts` in turn.
pub async fn bench(opts: &BenchOptions) -> Result<Vec<BenchFigures>, WalError> {
    if opts.duration.is_zero() || opts.duration > Duration::from_secs(600) {
        return Err(WalError::InvalidArgument(
            "duration must be above 0 and at most 10 min".into(),
        ));
    }
    if opts.writers.iter().any(|&w| w == 0 || w > 4096) {
        return Err(WalError::InvalidArgument("writers must be 1..=4096".into()));
    }
    if opts.record_sizes.iter().any(|&s| s > 1 << 20) {
        return Err(WalError::InvalidArgument(
            "record sizes are capped at 1 MiB".into(),
        ));
    }
    std::fs::create_dir_all(&opts.dir).map_err(|e| WalError::Io {
        op: "create folder",
        path: opts.dir.clone(),
        source: e,
    })?;
    let mut out = Vec::new();
    for &size in &opts.record_sizes {
        for &w in &opts.writers {
            out.push(one_case(&opts.dir, size, w, opts.duration).await?);
        }
    }
    Ok(out)
}

/// The figures as a text table.
pub fn table(figs: &[BenchFigures]) -> String {
    let mut s = format!(
        "{:>7} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10} {:>6} {:>11} {:>6}\n",
        "record",
        "wrtrs",
        "appends/s",
        "MB/s",
        "rec/fsync",
        "p50 µs",
        "p99 µs",
        "raw batch",
        "raw rec/s",
        "raw MB/s",
        "ratio",
        "pre rec/s",
        "ratio"
    );
    for f in figs {
        s.push_str(&format!(
            "{:>6}B {:>5} {:>10.0} {:>9.2} {:>9.1} {:>9.0} {:>9.0} {:>8}B {:>11.0} {:>10.2} {:>5.2}x {:>11.0} {:>5.2}x\n",
            f.record_bytes,
            f.writers,
            f.appends_per_s,
            f.disk_mb_per_s,
            f.records_per_fsync,
            f.p50_us,
            f.p99_us,
            f.raw_batch_bytes,
            f.raw_appends_per_s,
            f.raw_disk_mb_per_s,
            f.ratio,
            f.raw_prefilled_appends_per_s,
            f.ratio_prefilled
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_run_produces_sane_figures() {
        let d = tempfile::tempdir().expect("tmp");
        let mut o = BenchOptions::new(d.path());
        o.duration = Duration::from_millis(200);
        o.record_sizes = vec![100];
        o.writers = vec![4];
        let f = bench(&o).await.expect("bench");
        assert_eq!(f.len(), 1);
        assert!(f[0].appends > 0 && f[0].raw_appends_per_s > 0.0, "{f:?}");
        assert!(f[0].raw_prefilled_appends_per_s > 0.0, "{f:?}");
        assert!(table(&f).contains("100B"));
        o.writers = vec![0];
        assert!(bench(&o).await.is_err());
    }
}
