//! `dsys check` end to end: usage errors, known-bad histories judged invalid through the CLI,
//! a short real run with a partition that reports valid and leaves no process behind, a run
//! interrupted with Ctrl-C (SIGINT) that kills its cluster, one SIGKILLed whose agents stop
//! on their own, and output into a closed pipe.

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dsys");

fn dsys(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dsys")
}

/// The gossip ports of a run's nodes, from its cluster file.
fn gossip_ports(dir: &Path) -> Vec<u16> {
    let cfg = std::fs::read_to_string(dir.join("cluster.toml")).expect("cluster.toml");
    cfg.lines()
        .filter_map(|l| l.strip_prefix("gossip_port = "))
        .map(|p| p.trim().parse().expect("port"))
        .collect()
}

/// Every node process is gone once its gossip (UDP) port can be bound again.
fn all_ports_free(dir: &Path) -> bool {
    let ports = gossip_ports(dir);
    assert!(!ports.is_empty());
    ports
        .iter()
        .all(|p| UdpSocket::bind(("127.0.0.1", *p)).is_ok())
}

#[test]
fn bad_input_is_refused_with_exit_2() {
    for args in [
        &["check", "nope"][..],
        &["check", "lock", "--nodes", "10"],
        &["check", "register", "--faults", "kill,boom"],
        &["check", "register", "--nodes", "2"],
        &["check", "register", "--concurrency", "0"],
        &["check", "register", "--duration", "0s"],
    ] {
        let out = dsys(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error:"),
            "{args:?}"
        );
    }
}

#[test]
fn known_bad_histories_are_invalid_through_the_cli() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/histories");
    for (wl, file) in [
        ("register", "register-stale-read.json"),
        ("set", "set-lost-add.json"),
        ("ratelimit", "ratelimit-over-grant.json"),
        ("lock", "lock-overlap.json"),
        ("lock", "lock-token-decrease.json"),
        ("lock", "lock-fence-out-of-order.json"),
    ] {
        let path = dir.join(file);
        let out = dsys(&["check", wl, "--history", path.to_str().expect("utf8")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{wl}: {text}");
        assert!(text.contains("INVALID"), "{wl}: {text}");
    }
}

/// `dsys check ... | head`: a reader that has gone ends the CLI quietly (141, as a SIGPIPE
/// death would), where `println!` used to panic.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/histories/register-stale-read.json");
    // The read end is closed before dsys starts, so its first write fails, every time.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args([
            "check",
            "register",
            "--history",
            path.to_str().expect("utf8"),
        ])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run dsys");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

#[test]
fn short_run_is_valid_and_cleans_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let out = dsys(&[
        "check",
        "register",
        "--nodes",
        "3",
        "--duration",
        "6s",
        "--faults",
        "partition",
        "--seed",
        "11",
        "--concurrency",
        "3",
        "--out",
        run.to_str().expect("utf8"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verdict: VALID"), "{text}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).expect("report"))
            .expect("json");
    assert_eq!(report["verdict"]["valid"], serde_json::json!(true));
    assert!(report["ok"].as_u64().expect("ok") > 0, "{report}");
    let history: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("history.json")).expect("history"))
            .expect("json");
    assert!(history["events"].as_array().expect("events").len() >= 2);
    // The same history judged again from the file gives the same verdict.
    let again = dsys(&[
        "check",
        "register",
        "--history",
        run.join("history.json").to_str().expect("utf8"),
    ]);
    assert_eq!(again.status.code(), Some(0));
    assert!(all_ports_free(&run), "a node outlived the run");
}

/// Start `dsys check set` on 3 nodes for long, and wait until every node listens.
fn start_long_check(run: &Path) -> std::process::Child {
    let child = Command::new(BIN)
        .args([
            "check",
            "set",
            "--nodes",
            "3",
            "--duration",
            "120s",
            "--out",
            run.to_str().expect("utf8"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // Wait until every node is listening (its gossip port taken).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < end, "the cluster never came up");
        if run.join("cluster.toml").exists()
            && gossip_ports(run)
                .iter()
                .all(|p| UdpSocket::bind(("127.0.0.1", *p)).is_err())
        {
            return child;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Wait up to 30 s for every node of the run to be gone.
fn nodes_gone_within_30s(run: &Path) -> bool {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if all_ports_free(run) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn ctrl_c_kills_the_cluster() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let mut child = start_long_check(&run);
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let end = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("dsys check did not exit within 30 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3));
    assert!(all_ports_free(&run), "a node outlived the interrupted run");
}

#[test]
fn a_check_killed_with_sigkill_leaves_no_agent_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = tmp.path().join("run");
    let mut child = start_long_check(&run);
    // No chance to clean up: the agents must notice on their own that their parent is gone.
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(
        nodes_gone_within_30s(&run),
        "an agent outlived its SIGKILLed dsys check"
    );
}
