//! Shared harness for the process-level tests: real `dsys` agents as child processes on free
//! ports, killed (SIGKILL) and reaped on drop.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_dsys");

/// Children killed (SIGKILL) and reaped on drop, so a failing test leaves nothing behind.
pub(crate) struct Agents {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) children: Vec<(String, Child)>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> u16 {
    dsys_node::free_loopback_port().expect("free port")
}

pub(crate) fn write_config(dir: &Path, n: usize) -> (PathBuf, Vec<SocketAddr>) {
    write_config_with(dir, n, "")
}

/// Like [`write_config`] with extra TOML appended (plugin sections).
pub(crate) fn write_config_with(dir: &Path, n: usize, extra: &str) -> (PathBuf, Vec<SocketAddr>) {
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
    s.push_str(extra);
    let path = dir.join("cluster.toml");
    std::fs::write(&path, s).expect("write config");
    (path, eps)
}

pub(crate) fn dsys(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dsys")
}

impl Agents {
    pub(crate) fn start(n: usize) -> (Self, PathBuf, Vec<SocketAddr>) {
        Self::start_with(n, "")
    }

    /// Start `n` agents with extra TOML in their config.
    pub(crate) fn start_with(n: usize, extra: &str) -> (Self, PathBuf, Vec<SocketAddr>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, eps) = write_config_with(dir.path(), n, extra);
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

    pub(crate) fn spawn(&mut self, cfg: &Path, id: &str) {
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
    pub(crate) fn sigkill(&mut self, id: &str) {
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
pub(crate) fn status(cfg: &Path, ep: SocketAddr) -> Option<Vec<(String, String, u64)>> {
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

pub(crate) fn wait(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub(crate) fn state_of(st: &[(String, String, u64)], id: &str) -> Option<(String, u64)> {
    st.iter().find(|m| m.0 == id).map(|m| (m.1.clone(), m.2))
}

/// Wait until every endpoint reports exactly `n` members alive.
pub(crate) fn converged(cfg: &Path, eps: &[SocketAddr], n: usize, deadline: Duration) -> bool {
    let all_alive = |ep: SocketAddr| {
        status(cfg, ep)
            .map(|s| s.iter().filter(|m| m.1 == "alive").count() == n)
            .unwrap_or(false)
    };
    wait(deadline, || eps.iter().all(|e| all_alive(*e)))
}
