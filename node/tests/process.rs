//! Process-level tests of the real `dsys` binary: three agents started as child processes,
//! one SIGKILLed and restarted; and the CLI's exit codes and messages for bad input.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dsys");

/// Children killed (SIGKILL) and reaped on drop, so a failing test leaves nothing behind.
struct Agents {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    // UDP and TCP ports are separate spaces; a port free for UDP is checked for TCP too.
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let p = u.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn write_config(dir: &Path, n: usize) -> (PathBuf, Vec<SocketAddr>) {
    let mut s = String::from(
        "[cluster]\nname = \"proc-test\"\nseeds = [\"n1\"]\ncerts_dir = \"CERTS\"\n\n\
         [plugins.ratelimit.rules.api]\nalgorithm = \"fixed_window\"\nlimit = 3\nwindow_ms = 3600000\n\n",
    )
    .replace("CERTS", &dir.join("certs").display().to_string());
    let mut eps = Vec::new();
    for i in 1..=n {
        let (g, r, h) = (free_port(), free_port(), free_port());
        eps.push(SocketAddr::from(([127, 0, 0, 1], r)));
        s.push_str(&format!(
            "[nodes.n{i}]\ngossip_port = {g}\nrpc_port = {r}\nhttp_port = {h}\nregion = \"{}\"\ndata_dir = \"{}\"\n\n",
            if i % 2 == 0 { "us" } else { "eu" },
            dir.join(format!("data/n{i}")).display()
        ));
    }
    let path = dir.join("cluster.toml");
    std::fs::write(&path, s).expect("write config");
    (path, eps)
}

fn dsys(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dsys")
}

impl Agents {
    fn start(n: usize) -> (Self, PathBuf, Vec<SocketAddr>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, eps) = write_config(dir.path(), n);
        let out = dsys(&cfg, &["cluster", "init"]);
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut a = Agents {
            dir,
            children: Vec::new(),
        };
        for i in 1..=n {
            a.spawn(&cfg, &format!("n{i}"));
        }
        (a, cfg, eps)
    }

    fn spawn(&mut self, cfg: &Path, id: &str) {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).expect("log");
        let child = Command::new(BIN)
            .arg("--config")
            .arg(cfg)
            .args(["agent", "--node", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        self.children.push((id.to_string(), child));
    }

    /// SIGKILL (std's `Child::kill` sends SIGKILL on Unix).
    fn sigkill(&mut self, id: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == id)
            .expect("known child");
        let (_, mut c) = self.children.remove(i);
        c.kill().expect("kill");
        c.wait().expect("reap");
    }
}

/// `cluster status --json` as seen by the node at `ep`: (id -> (state, generation)).
fn status(cfg: &Path, ep: SocketAddr) -> Option<Vec<(String, String, u64)>> {
    let out = dsys(
        cfg,
        &[
            "--json",
            "--timeout",
            "2s",
            "--endpoints",
            &ep.to_string(),
            "cluster",
            "status",
        ],
    );
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or("").to_string(),
                    m["state"].as_str().unwrap_or("").to_string(),
                    m["generation"].as_u64().unwrap_or(0),
                )
            })
            .collect(),
    )
}

fn wait(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn state_of(st: &[(String, String, u64)], id: &str) -> Option<(String, u64)> {
    st.iter().find(|m| m.0 == id).map(|m| (m.1.clone(), m.2))
}

#[test]
fn sigkilled_agent_is_seen_dead_then_back() {
    let (mut agents, cfg, eps) = Agents::start(3);
    let all_alive = |ep| {
        status(&cfg, ep)
            .map(|s| s.iter().filter(|m| m.1 == "alive").count() == 3)
            .unwrap_or(false)
    };
    assert!(
        wait(Duration::from_secs(60), || eps
            .iter()
            .all(|e| all_alive(*e))),
        "3 agents did not converge"
    );
    let old_gen = state_of(&status(&cfg, eps[0]).expect("status"), "n2")
        .expect("n2")
        .1;

    let t = Instant::now();
    agents.sigkill("n2");
    for ep in [eps[0], eps[2]] {
        let dead = wait(Duration::from_secs(20), || {
            status(&cfg, ep)
                .and_then(|s| state_of(&s, "n2"))
                .map(|s| s.0 == "dead")
                .unwrap_or(false)
        });
        assert!(dead, "node at {ep} did not see n2 dead");
    }
    eprintln!(
        "SIGKILLed n2 seen dead by n1 and n3 after {} ms",
        t.elapsed().as_millis()
    );

    agents.spawn(&cfg, "n2");
    let back = wait(Duration::from_secs(30), || {
        [eps[0], eps[2]].iter().all(|ep| {
            status(&cfg, *ep)
                .and_then(|s| state_of(&s, "n2"))
                .map(|(st, g)| st == "alive" && g > old_gen)
                .unwrap_or(false)
        })
    });
    assert!(back, "n2 did not come back with a new generation");

    // The global limit holds across processes: round-robin over the three agents.
    let mut allowed = 0;
    for i in 0..9 {
        let ep = eps[i % 3].to_string();
        let out = dsys(
            &cfg,
            &[
                "--endpoints",
                &ep,
                "ratelimit",
                "check",
                "dave",
                "--rule",
                "api",
            ],
        );
        match out.status.code() {
            Some(0) => allowed += 1,
            Some(1) => {}
            other => panic!(
                "unexpected exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    assert_eq!(allowed, 3);
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn cli_errors_have_clear_messages_and_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = write_config(dir.path(), 2);

    // Usage errors: exit 2.
    let o = dsys(&cfg, &["ratelimit", "check"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = dsys(&cfg, &["chaos", "delay", "n1", "soon"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // Unknown node, port clash, missing field: exit 2 naming the field.
    let o = dsys(&cfg, &["agent", "--node", "n7"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--node"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&cfg).expect("read");
    let n2_rpc = text
        .split("[nodes.n2]")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.starts_with("rpc_port")))
        .expect("n2 rpc")
        .to_string();
    let n1_rpc = text
        .split("[nodes.n1]")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.starts_with("rpc_port")))
        .expect("n1 rpc")
        .to_string();
    let clash = dir.path().join("clash.toml");
    std::fs::write(&clash, text.replacen(&n2_rpc, &n1_rpc, 1)).expect("write");
    let o = dsys(&clash, &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nodes.n2.rpc_port"), "{}", stderr(&o));
    let missing = dir.path().join("missing.toml");
    std::fs::write(&missing, text.replacen("region = \"us\"\n", "", 1)).expect("write");
    let o = dsys(&missing, &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("region"), "{}", stderr(&o));
    let o = dsys(&dir.path().join("nope.toml"), &["agent", "--node", "n1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));

    // No certificates yet: exit 2 and a hint.
    let o = dsys(&cfg, &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("dsys cluster init"), "{}", stderr(&o));

    // Certificates but no node running: exit 3.
    assert!(dsys(&cfg, &["cluster", "init"]).status.success());
    let o = dsys(&cfg, &["--timeout", "1s", "cluster", "status"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("no node reachable"), "{}", stderr(&o));
}
