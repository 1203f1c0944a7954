//! `dsys check lock` end to end (issue 5 item 6, issue 6): holder *processes* on a fresh
//! 3-node cluster, some SIGSTOPped while they hold the lock for longer than its lease, first
//! without node faults, then with node kills, pauses and partitions. Each run must be judged
//! valid by the checker, the pauses must have happened with the lock passing to another
//! holder meanwhile, a paused holder's late write must have been refused by the token fence,
//! and no node or holder process may outlive the run. The checker itself is tested on
//! hand-written histories in `node/src/check/lock.rs` and through the CLI in `tests/check.rs`.

use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_dsys");

fn run_check(dir: &Path, faults: &str, seed: &str) -> serde_json::Value {
    let out = Command::new(BIN)
        .args([
            "check",
            "lock",
            "--nodes",
            "3",
            "--duration",
            "20s",
            "--concurrency",
            "3",
            "--faults",
            faults,
            "--seed",
            seed,
            "--out",
            dir.to_str().expect("utf8"),
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run dsys check lock");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "faults {faults}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verdict: VALID"), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(
        report["verdict"]["valid"],
        serde_json::json!(true),
        "{report}"
    );
    report["verdict"]["details"].clone()
}

/// Every process whose command line names `dir` (nodes and holders of that run).
fn processes_of(dir: &Path) -> Vec<String> {
    let needle = dir.to_str().expect("utf8").as_bytes().to_vec();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd.windows(needle.len()).any(|w| w == needle.as_slice()) {
                found.push(format!("{name}: {}", String::from_utf8_lossy(&cmd)));
            }
        }
    }
    found
}

fn n(d: &serde_json::Value, k: &str) -> u64 {
    d[k].as_u64().unwrap_or_else(|| panic!("no {k} in {d}"))
}

#[test]
fn lock_safety_with_paused_holders_and_node_faults() {
    let tmp = tempfile::tempdir().expect("tempdir");

    // Holders paused past their lease, no node faults.
    let run = tmp.path().join("pauses");
    let d = run_check(&run, "none", "5");
    assert!(n(&d, "grants") >= 3, "{d}");
    assert!(n(&d, "writes_accepted") >= 1, "{d}");
    assert!(n(&d, "holder_pauses") >= 1, "{d}");
    // The lock passed to another holder while one was stopped...
    assert!(n(&d, "holder_pauses_lock_moved_on") >= 1, "{d}");
    // ...and the stopped holder's write, sent after it woke, was refused by the fence.
    assert!(n(&d, "late_writes_refused") >= 1, "{d}");
    assert!(
        processes_of(&run).is_empty(),
        "{:?} outlived the run",
        processes_of(&run)
    );

    // The same with nodes killed, paused and partitioned meanwhile.
    let run = tmp.path().join("faults");
    let d = run_check(&run, "kill,pause,partition", "6");
    assert!(n(&d, "grants") >= 1, "{d}");
    assert!(
        processes_of(&run).is_empty(),
        "{:?} outlived the run",
        processes_of(&run)
    );
}
