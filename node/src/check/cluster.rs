//! A fresh local cluster for one check run: N `dsys agent` child processes of this same
//! executable on free loopback ports, with their own certificates and data under the run
//! folder. Every child is SIGKILLed and reaped when the cluster is dropped, including on
//! errors and Ctrl-C.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

/// One node's process.
#[derive(Debug)]
pub(crate) struct NodeProc {
    pub(crate) id: String,
    pub(crate) rpc: SocketAddr,
    child: Option<Child>,
    paused: bool,
}

/// Multi-host mode (`scripts/netns-cluster.sh up N`): node nK runs in namespace `dsys-nK`
/// with address 10.77.0.K; the check process runs in the hub namespace.
pub(crate) const NETNS_NET: &str = "10.77.0";
/// nft table holding a partition's drop rules inside each node namespace.
const NFT_TABLE: &str = "dsys_check";

/// Ok when this process runs in the hub namespace and namespaces dsys-n1..dsys-nN exist.
pub(crate) fn netns_ready(n: usize) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(|e| format!("--netns: running `ip netns list`: {e}"))?;
    let list = String::from_utf8_lossy(&out.stdout);
    let have: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for i in 1..=n {
        if !have.contains(&format!("dsys-n{i}").as_str()) {
            return Err(format!(
                "--netns: namespace dsys-n{i} does not exist; run `scripts/netns-cluster.sh up {n}` first"
            ));
        }
    }
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map_err(|e| format!("--netns: running `ip addr`: {e}"))?;
    if !String::from_utf8_lossy(&addrs.stdout).contains(&format!("{NETNS_NET}.254/")) {
        return Err(format!(
            "--netns: this process must run in the hub namespace ({NETNS_NET}.254); use `scripts/netns-cluster.sh check WORKLOAD ...`"
        ));
    }
    Ok(())
}

/// The cluster.
#[derive(Debug)]
pub(crate) struct LocalCluster {
    netns: bool,
    exe: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    pub(crate) nodes: Vec<NodeProc>,
}

fn free_port() -> anyhow::Result<u16> {
    crate::free_loopback_port().context("picking a port for a node")
}

impl LocalCluster {
    /// Write the cluster file and certificates for `n` nodes into `dir`; start nothing yet.
    pub(crate) fn create(
        dir: &Path,
        n: usize,
        extra_toml: &str,
        netns: bool,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut s = format!(
            "# written by `dsys check`\n[cluster]\nname = \"dsys-check\"\nseeds = [\"n1\", \"n2\"]\n\
             certs_dir = \"{}\"\ngossip_interval_ms = 100\nrpc_timeout_ms = 2000\n\n",
            dir.join("certs").display()
        );
        let mut nodes = Vec::new();
        for i in 1..=n {
            // Each namespace has its own ports: fixed ones there, free loopback ones here.
            let (host, g, r, h) = if netns {
                (format!("{NETNS_NET}.{i}"), 7101, 7201, 7301)
            } else {
                (
                    "127.0.0.1".to_string(),
                    free_port()?,
                    free_port()?,
                    free_port()?,
                )
            };
            let id = format!("n{i}");
            s.push_str(&format!(
                "[nodes.{id}]\nhost = \"{host}\"\ngossip_port = {g}\nrpc_port = {r}\nhttp_port = {h}\nregion = \"{}\"\ndata_dir = \"{}\"\n\n",
                if i % 2 == 0 { "b" } else { "a" },
                dir.join("data").join(&id).display()
            ));
            nodes.push(NodeProc {
                id,
                rpc: SocketAddr::new(host.parse()?, r),
                child: None,
                paused: false,
            });
        }
        // The cache plugin's RESP ports: none configured, so the OS picks free ones.
        s.push_str(extra_toml);
        let config = dir.join("cluster.toml");
        std::fs::write(&config, s).with_context(|| format!("writing {}", config.display()))?;
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        dsys_runtime::init_cluster_certs(&dir.join("certs"), &ids)
            .map_err(|e| anyhow::anyhow!("certificates: {e}"))?;
        Ok(LocalCluster {
            netns,
            exe,
            dir: dir.to_path_buf(),
            config,
            nodes,
        })
    }

    pub(crate) fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    pub(crate) fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some() && !self.nodes[i].paused
    }

    /// Start node `i` (its log is appended to `logs/<id>.log`).
    pub(crate) fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let nd = &mut self.nodes[i];
        if nd.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("{}.log", nd.id)))?;
        let mut cmd = if self.netns {
            let mut c = Command::new("ip");
            // `ip netns exec` execs the program, so the child's pid is the agent's.
            c.args(["netns", "exec", &format!("dsys-{}", nd.id)])
                .arg(&self.exe);
            c
        } else {
            Command::new(&self.exe)
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .args(["agent", "--exit-with-parent", "--node", &nd.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", nd.id))?;
        nd.child = Some(child);
        nd.paused = false;
        Ok(())
    }

    /// SIGKILL node `i` and reap it.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    fn signal(&self, i: usize, sig: &str) -> anyhow::Result<()> {
        let Some(c) = &self.nodes[i].child else {
            bail!("{} is not running", self.nodes[i].id);
        };
        let st = Command::new("kill")
            .args([sig, &c.id().to_string()])
            .status()
            .context("running kill(1)")?;
        if !st.success() {
            bail!("kill {sig} {} failed", c.id());
        }
        Ok(())
    }

    /// SIGSTOP node `i`.
    pub(crate) fn pause(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-STOP")?;
        self.nodes[i].paused = true;
        Ok(())
    }

    /// SIGCONT node `i`.
    pub(crate) fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "-CONT")?;
        self.nodes[i].paused = false;
        Ok(())
    }

    /// Nodes whose process exited on its own (not killed by us): (id, status).
    pub(crate) fn exited(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for nd in &mut self.nodes {
            if let Some(c) = &mut nd.child {
                if let Ok(Some(st)) = c.try_wait() {
                    out.push((nd.id.clone(), st.to_string()));
                    nd.child = None;
                }
            }
        }
        out
    }

    /// Multi-host mode only: cut `a` from `b` with nft drop rules in every node namespace.
    pub(crate) fn nft_partition(&self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        let addr = |i: &usize| format!("{NETNS_NET}.{}", i + 1);
        for (mine, other) in [(a, b), (b, a)] {
            let set = other.iter().map(addr).collect::<Vec<_>>().join(", ");
            for i in mine {
                let script = format!(
                    "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n\
                     table inet {NFT_TABLE} {{\n\
                     chain input {{ type filter hook input priority 0; policy accept; ip saddr {{ {set} }} drop; }}\n\
                     chain output {{ type filter hook output priority 0; policy accept; ip daddr {{ {set} }} drop; }}\n}}\n"
                );
                self.nft(*i, &script)?;
            }
        }
        Ok(())
    }

    /// Multi-host mode only: remove the drop rules from every node namespace.
    pub(crate) fn nft_heal(&self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.nft(
                i,
                &format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"),
            )?;
        }
        Ok(())
    }

    fn nft(&self, i: usize, script: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let ns = format!("dsys-{}", self.nodes[i].id);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (install nftables, or use scripts/netns-cluster.sh up)")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub(crate) fn netns(&self) -> bool {
        self.netns
    }

    /// Kill every child.
    pub(crate) fn kill_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
