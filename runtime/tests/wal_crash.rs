//! Crash tests of the write-ahead log and the page store.
//!
//! * SIGKILL: this test binary re-executes itself as a child (`--exact child`, with
//!   `DSYS_WAL_CHILD=<dir>` and `DSYS_WAL_CHILD_MODE=wal|store`). The child writes from many
//!   tasks and prints each acknowledgement; the parent kills it with SIGKILL at a random
//!   moment, recovers the folder in-process and checks that every acknowledged write is there,
//!   intact and in order (WAL), or that committed transactions survived and uncommitted ones
//!   were undone (page store). The folder is reused across rounds, so recovery after recovery
//!   is exercised too.
//! * Damage: a pristine log is copied, then its last segment is truncated at random lengths, or
//!   bytes are flipped at random offsets in any segment, or garbage is appended; recovery must
//!   never panic and must keep exactly the valid prefix.
//!
//! Randomness comes from a seed printed at the start (`DSYS_TEST_SEED` replays one).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_runtime::storage::{
    PageStore, PageStoreConfig, Record, SyncPolicy, Wal, WalConfig, RECORD_HEADER_BYTES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DIR: &str = "DSYS_WAL_CHILD";
const CHILD_MODE: &str = "DSYS_WAL_CHILD_MODE";
const CHILD_SYNC: &str = "DSYS_WAL_CHILD_SYNC";

fn seed() -> u64 {
    let s = std::env::var("DSYS_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed {s} (set DSYS_TEST_SEED={s} to replay)");
    s
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The payload writer `w` sends as its `seq`-th record: self-describing and checkable.
fn payload(w: u32, seq: u64) -> Vec<u8> {
    let mut p = format!("{w}:{seq}:").into_bytes();
    let fill = ((seq * 37 + w as u64 * 11) % 300) as usize;
    p.extend(std::iter::repeat_n((seq % 251) as u8, fill));
    p
}

fn wal_cfg(dir: &Path) -> WalConfig {
    let mut c = WalConfig::new(dir);
    if std::env::var(CHILD_SYNC).as_deref() == Ok("interval") {
        c.sync = SyncPolicy::Interval(Duration::from_millis(50));
    }
    c.segment_bytes = 64 << 10;
    c.max_record_bytes = 4096;
    c
}

fn store_cfg(dir: &Path) -> PageStoreConfig {
    let mut c = PageStoreConfig::new(dir);
    c.cache_pages = 6; // small: pages of uncommitted transactions get stolen to disk
    c.wal_segment_bytes = 64 << 10;
    c
}

// ---------------------------------------------------------------------------------------------
// The child.

/// Runs only when re-executed by a parent test; otherwise returns at once.
#[test]
fn child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let mode = std::env::var(CHILD_MODE).unwrap_or_default();
    rt().block_on(async move {
        match mode.as_str() {
            "wal" => child_wal(&dir).await,
            "store" => child_store(&dir).await,
            other => panic!("unknown child mode {other:?}"),
        }
    });
}

fn say(line: String) {
    let out = std::io::stdout();
    let mut o = out.lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

async fn child_wal(dir: &Path) {
    let (wal, _) = Wal::open(wal_cfg(dir)).await.expect("child open");
    say("READY".into());
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let wal = wal.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0.. {
                if seq % 10 == 9 {
                    let recs: Vec<(u8, Vec<u8>)> = (0..3)
                        .map(|k| (w as u8, payload(w, seq * 10 + k)))
                        .collect();
                    let last = wal.append_many(recs).await.expect("append_many");
                    for k in 0..3 {
                        say(format!("A {} {w} {}", last - 2 + k, seq * 10 + k));
                    }
                } else {
                    let lsn = wal
                        .append(w as u8, payload(w, seq * 10))
                        .await
                        .expect("append");
                    say(format!("A {lsn} {w} {}", seq * 10));
                }
            }
        }));
    }
    // A checkpointer: releases old segments while writers run.
    let w = wal.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(15)).await;
            let upto = w.stats().last_lsn.saturating_sub(200);
            let ck = w.checkpoint(upto).await.expect("checkpoint");
            say(format!("C {}", ck.upto_lsn));
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

/// Pages of transfer task `t`: two pages that every transaction of `t` writes together.
fn task_pages(t: u64) -> (u64, u64) {
    (t * 2, t * 2 + 1)
}

const LOSER_PAGES: (u64, u64) = (100, 101);

/// Marks a value written by a transaction that aborts.
const ABORTED: u64 = 1 << 63;

async fn child_store(dir: &Path) {
    let (store, _) = PageStore::open(store_cfg(dir)).await.expect("child open");
    say("READY".into());
    let mut tasks = Vec::new();
    for t in 0..6u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            let (a, b) = task_pages(t);
            let cur = s.read(None, a, 0, 8).await.expect("read");
            let mut seq = u64::from_le_bytes(cur.try_into().expect("8 bytes"));
            for attempt in 1u64.. {
                // Every 7th transaction is aborted: it writes a marker value (high bit set)
                // that must never be seen after recovery.
                let abort = attempt % 7 == 0;
                let v = if abort { (seq + 1) | ABORTED } else { seq + 1 };
                let x = s.begin().await.expect("begin");
                s.write(x, a, 0, v.to_le_bytes().to_vec())
                    .await
                    .expect("write a");
                // Some filler so pages are really dirty in several places.
                s.write(
                    x,
                    a,
                    100 + (attempt as usize % 50) * 8,
                    vec![attempt as u8; 8],
                )
                .await
                .expect("write a2");
                s.write(x, b, 0, v.to_le_bytes().to_vec())
                    .await
                    .expect("write b");
                if abort {
                    s.abort(x).await.expect("abort");
                    continue;
                }
                s.commit(x).await.expect("commit");
                seq += 1;
                say(format!("T {t} {seq}"));
            }
        }));
    }
    // A loser: commits a known value, then overwrites it in a transaction that never ends.
    let s = store.clone();
    tasks.push(tokio::spawn(async move {
        let (a, b) = LOSER_PAGES;
        let x = s.begin().await.expect("begin");
        s.write(x, a, 0, b"LOSER-0!".to_vec()).await.expect("w");
        s.write(x, b, 0, b"LOSER-0!".to_vec()).await.expect("w");
        s.commit(x).await.expect("commit");
        say("L committed".into());
        let x = s.begin().await.expect("begin");
        s.write(x, a, 0, b"UNCOMMIT".to_vec()).await.expect("w");
        s.write(x, b, 0, b"UNCOMMIT".to_vec()).await.expect("w");
        say("L pending".into());
        std::future::pending::<()>().await;
    }));
    // A checkpointer.
    let s = store.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            s.checkpoint().await.expect("checkpoint");
        }
    }));
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------
// The parent side.

/// Start a child on `dir`, wait for it to be writing, SIGKILL it after `delay`; returns the
/// lines it printed (each printed only after the acknowledgement it reports).
fn run_and_kill(dir: &Path, mode: &str, sync: &str, delay: Duration) -> Vec<String> {
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .env(CHILD_SYNC, sync)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let l2 = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            l2.lock().expect("lines").push(line);
        }
    });
    // Wait until the child has recovered and acknowledged something, boundedly.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let n = lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.starts_with('A') || l.starts_with('T'))
            .count();
        if n > 0 {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("child exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(delay);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let _ = reader.join();
    let v = lines.lock().expect("lines").clone();
    v
}

#[test]
fn sigkill_never_loses_an_acknowledged_append() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    wal_sigkill_rounds("batch", 60);
}

/// `SyncPolicy::Interval` acknowledges before the fsync: still nothing lost on SIGKILL,
/// because the bytes are in the kernel's page cache (only a power loss can lose them).
#[test]
fn sigkill_interval_policy_loses_nothing_acknowledged() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    wal_sigkill_rounds("interval", 20);
}

fn wal_sigkill_rounds(sync: &str, rounds: usize) {
    let mut rng = StdRng::seed_from_u64(seed() ^ sync.len() as u64);
    let d = tempfile::tempdir().expect("tmp");
    let rt = rt();
    // (lsn -> (writer, seq)) of every acknowledged append over all rounds.
    let mut acked: BTreeMap<u64, (u32, u64)> = BTreeMap::new();
    let mut max_ckpt = 0u64;
    let t0 = std::time::Instant::now();
    for round in 0..rounds {
        let delay = Duration::from_millis(rng.gen_range(0..40));
        let lines = run_and_kill(d.path(), "wal", sync, delay);
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["A", lsn, w, seq] => {
                    let lsn: u64 = lsn.parse().expect("lsn");
                    let prev =
                        acked.insert(lsn, (w.parse().expect("w"), seq.parse().expect("seq")));
                    assert!(prev.is_none(), "LSN {lsn} acknowledged twice");
                }
                ["C", upto] => max_ckpt = max_ckpt.max(upto.parse().expect("ckpt")),
                _ => {}
            }
        }
        rt.block_on(async {
            let (wal, rep) = Wal::open(wal_cfg(d.path())).await.expect("recover");
            // Nothing acknowledged is missing: the log runs at least to the last ack...
            let max_acked = acked.keys().next_back().copied().unwrap_or(0);
            assert!(
                rep.last_lsn >= max_acked,
                "round {round}: lost acked tail: {rep:?}"
            );
            // ...a checkpoint the child saw completed is durable, and segments were only
            // removed below the recorded checkpoint.
            assert!(
                rep.checkpoint_lsn >= max_ckpt,
                "round {round}: {rep:?} vs {max_ckpt}"
            );
            assert!(
                rep.checkpoint_lsn <= rep.last_lsn + 1,
                "round {round}: {rep:?}"
            );
            assert!(
                rep.first_lsn <= rep.checkpoint_lsn.max(1),
                "round {round}: {rep:?}"
            );
            let recs: Vec<Record> = wal
                .read_from(0)
                .expect("reader")
                .collect::<Result<_, _>>()
                .expect("every record reads back");
            let first = recs.first().map(|r| r.lsn).unwrap_or(rep.first_lsn);
            for (i, r) in recs.iter().enumerate() {
                assert_eq!(r.lsn, first + i as u64, "dense, in order");
            }
            for (&lsn, &(w, seq)) in acked.range(first..) {
                let r = &recs[(lsn - first) as usize];
                assert_eq!(r.kind, w as u8, "round {round} lsn {lsn}");
                assert_eq!(
                    r.payload,
                    payload(w, seq),
                    "round {round} lsn {lsn}: payload intact"
                );
            }
            let v = wal.verify().expect("verify");
            assert_eq!(v.error, None);
            wal.close().await;
        });
    }
    eprintln!(
        "{rounds} SIGKILL rounds ({sync}), {} acknowledged appends checked, {:?}",
        acked.len(),
        t0.elapsed()
    );
    assert!(acked.len() > rounds, "children got work done");
}

#[test]
fn sigkill_keeps_committed_transactions_and_undoes_the_rest() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed() ^ 0x5157);
    let d = tempfile::tempdir().expect("tmp");
    let rt = rt();
    let mut committed: HashMap<u64, u64> = HashMap::new();
    let mut loser_committed = false;
    let mut losers_seen = 0usize;
    let rounds = 30;
    let t0 = std::time::Instant::now();
    for round in 0..rounds {
        let delay = Duration::from_millis(rng.gen_range(0..60));
        let lines = run_and_kill(d.path(), "store", "batch", delay);
        for l in &lines {
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["T", t, seq] => {
                    let (t, seq): (u64, u64) = (t.parse().expect("t"), seq.parse().expect("s"));
                    let e = committed.entry(t).or_insert(0);
                    assert!(seq > *e, "commits of one task are increasing");
                    *e = seq;
                }
                ["L", "committed"] => loser_committed = true,
                _ => {}
            }
        }
        rt.block_on(async {
            let (s, rep) = PageStore::open(store_cfg(d.path())).await.expect("recover");
            losers_seen += rep.losers.len();
            for t in 0..6u64 {
                let (a, b) = task_pages(t);
                let va = u64::from_le_bytes(
                    s.read(None, a, 0, 8)
                        .await
                        .expect("r")
                        .try_into()
                        .expect("8"),
                );
                let vb = u64::from_le_bytes(
                    s.read(None, b, 0, 8)
                        .await
                        .expect("r")
                        .try_into()
                        .expect("8"),
                );
                assert_eq!(
                    va, vb,
                    "round {round} task {t}: a transaction is all or nothing"
                );
                let c = committed.get(&t).copied().unwrap_or(0);
                // Durable: at least the last acknowledged commit. At most one more (committed,
                // killed before it printed). Never an aborted value (multiples of 7).
                assert!(
                    va >= c && va <= c + 1,
                    "round {round} task {t}: {va} vs acked {c}"
                );
                assert_eq!(
                    va & ABORTED,
                    0,
                    "round {round} task {t}: aborted value {va:#x} seen"
                );
                // Whatever the recovered value, the next round continues from it.
                committed.insert(t, va);
            }
            let (a, b) = LOSER_PAGES;
            let la = s.read(None, a, 0, 8).await.expect("r");
            let lb = s.read(None, b, 0, 8).await.expect("r");
            assert_ne!(la, b"UNCOMMIT".to_vec(), "round {round}: loser undone");
            assert_ne!(lb, b"UNCOMMIT".to_vec(), "round {round}: loser undone");
            if loser_committed {
                assert_eq!(la, b"LOSER-0!".to_vec());
                assert_eq!(lb, b"LOSER-0!".to_vec());
            }
            s.close().await.expect("close");
        });
    }
    eprintln!(
        "{rounds} SIGKILL rounds of the page store, {losers_seen} losers undone, {:?}",
        t0.elapsed()
    );
    assert!(losers_seen >= rounds / 2, "losers were actually exercised");
}

// ---------------------------------------------------------------------------------------------
// Damage to the files.

/// A closed log of `n` records with known payloads; returns its folder.
fn pristine(n: u64) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    rt().block_on(async {
        let mut c = wal_cfg(d.path());
        c.segment_bytes = 8 << 10;
        let (wal, _) = Wal::open(c).await.expect("open");
        for i in 1..=n {
            assert_eq!(
                wal.append((i % 7) as u8, payload(0, i))
                    .await
                    .expect("append"),
                i
            );
        }
        wal.close().await;
    });
    d
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().map(|x| x == "log").unwrap_or(false))
        .collect();
    v.sort();
    v
}

/// (first lsn, record end offsets) of each segment of a pristine log.
fn layout(dir: &Path) -> Vec<(u64, Vec<u64>)> {
    let mut out = Vec::new();
    let mut lsn = 1u64;
    for p in segments(dir) {
        let len = std::fs::metadata(&p).expect("stat").len();
        let first = lsn;
        let mut ends = Vec::new();
        let mut off = 0u64;
        while off < len {
            off += (RECORD_HEADER_BYTES + payload(0, lsn).len()) as u64;
            ends.push(off);
            lsn += 1;
        }
        assert_eq!(off, len, "layout matches the file");
        out.push((first, ends));
    }
    out
}

/// Open the damaged copy and check that it holds exactly records 1..=`keep`.
fn check_prefix(rt: &tokio::runtime::Runtime, dir: &Path, keep: u64, what: &str) {
    rt.block_on(async {
        let mut c = wal_cfg(dir);
        c.segment_bytes = 8 << 10;
        let (wal, rep) = Wal::open(c).await.expect("open never fails on damage");
        assert_eq!(rep.last_lsn, keep, "{what}: {rep:?}");
        let recs: Vec<Record> = wal
            .read_from(0)
            .expect("reader")
            .collect::<Result<_, _>>()
            .expect("valid prefix reads back");
        assert_eq!(recs.len() as u64, keep, "{what}");
        for r in &recs {
            assert_eq!(r.payload, payload(0, r.lsn), "{what}: lsn {}", r.lsn);
            assert_eq!(r.kind, (r.lsn % 7) as u8);
        }
        // The log goes on from the cut.
        assert_eq!(
            wal.append(1, b"after".to_vec()).await.expect("append"),
            keep + 1
        );
        wal.close().await;
        // And a second recovery finds nothing more to cut.
        let mut c = wal_cfg(dir);
        c.segment_bytes = 8 << 10;
        let (wal, rep) = Wal::open(c).await.expect("reopen");
        assert_eq!((rep.last_lsn, rep.truncated_bytes), (keep + 1, 0), "{what}");
        wal.close().await;
    });
}

#[test]
fn truncating_the_last_segment_keeps_exactly_the_whole_records() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed() ^ 0x7a);
    let src = pristine(400);
    let lay = layout(src.path());
    let (first, ends) = lay.last().cloned().expect("segments");
    let last_len = ends.last().copied().unwrap_or(0);
    let rt = rt();
    let mut cuts: Vec<u64> = (0..150).map(|_| rng.gen_range(0..=last_len)).collect();
    cuts.extend([
        0,
        1,
        RECORD_HEADER_BYTES as u64 - 1,
        RECORD_HEADER_BYTES as u64,
        last_len - 1,
        last_len,
    ]);
    cuts.extend(ends.iter().copied());
    for cut in cuts {
        let d = tempfile::tempdir().expect("tmp");
        copy_dir(src.path(), d.path());
        let seg = segments(d.path()).pop().expect("last");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open");
        f.set_len(cut).expect("truncate");
        drop(f);
        let whole = ends.iter().filter(|&&e| e <= cut).count() as u64;
        check_prefix(&rt, d.path(), first - 1 + whole, &format!("cut at {cut}"));
    }
}

#[test]
fn flipped_bytes_anywhere_keep_exactly_the_prefix_before_them() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed() ^ 0xf11b);
    let src = pristine(400);
    let lay = layout(src.path());
    let rt = rt();
    for i in 0..200 {
        let d = tempfile::tempdir().expect("tmp");
        copy_dir(src.path(), d.path());
        let segs = segments(d.path());
        let si = rng.gen_range(0..segs.len());
        let (first, ends) = &lay[si];
        let len = *ends.last().expect("records");
        let off = rng.gen_range(0..len);
        let mut b = std::fs::read(&segs[si]).expect("read");
        let flips = if i % 4 == 0 { rng.gen_range(2..20) } else { 1 };
        // Damage starting at `off` (further flips land after it, within the file).
        b[off as usize] ^= rng.gen_range(1..=255u8);
        for _ in 1..flips {
            let o = rng.gen_range(off..len) as usize;
            b[o] ^= rng.gen_range(1..=255u8);
        }
        std::fs::write(&segs[si], &b).expect("write");
        // The damaged record is the one whose span holds `off`: keep everything before it.
        let k = ends.iter().filter(|&&e| e <= off).count() as u64;
        check_prefix(
            &rt,
            d.path(),
            first - 1 + k,
            &format!("flip #{i} in segment {si} at {off}"),
        );
    }
}

#[test]
fn garbage_after_the_tail_and_garbage_segments_are_cut() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(seed() ^ 0x9a7b);
    let src = pristine(120);
    let rt = rt();
    for i in 0..60 {
        let d = tempfile::tempdir().expect("tmp");
        copy_dir(src.path(), d.path());
        let seg = segments(d.path()).pop().expect("last");
        let n = rng.gen_range(1..5000);
        let junk: Vec<u8> = match i % 3 {
            0 => vec![0u8; n],                        // zero-filled tail
            1 => (0..n).map(|_| rng.gen()).collect(), // random bytes
            _ => {
                // A plausible header claiming a huge or bogus record.
                let mut h = vec![0u8; RECORD_HEADER_BYTES];
                h[0..4].copy_from_slice(&rng.gen::<u32>().to_le_bytes());
                h[9..17].copy_from_slice(&121u64.to_le_bytes());
                h
            }
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .expect("open");
        f.write_all(&junk).expect("append junk");
        drop(f);
        // And sometimes a whole bogus segment after it.
        if i % 2 == 0 {
            let junk: Vec<u8> = (0..rng.gen_range(0..3000)).map(|_| rng.gen()).collect();
            std::fs::write(d.path().join(format!("wal-{:020}.log", 121 + i)), junk).expect("w");
        }
        check_prefix(&rt, d.path(), 120, &format!("junk #{i}"));
    }
}
