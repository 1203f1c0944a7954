//! The in-process `TestCluster`: n full nodes (every plugin, real QUIC + mTLS + gossip on
//! 127.0.0.1 ephemeral ports) with `kill`, `restart`, `partition` and `heal`, plus helpers to
//! wait on conditions with a deadline. Used by the multi-node tests in `tests/`.
#![warn(missing_docs, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dsys_runtime::{
    init_cluster_certs, Client, ClusterConfig, ClusterView, FaultCommand, MemberState, Node,
    NodeOptions, TlsIdentity,
};

/// Log to stderr once per test process when `DSYS_LOG` is set.
pub fn init_logging() {
    if let Ok(f) = std::env::var("DSYS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

/// A cluster of in-process nodes.
pub struct TestCluster {
    dir: tempfile::TempDir,
    /// The configuration every node was started with.
    pub config: ClusterConfig,
    nodes: BTreeMap<String, Option<Node>>,
}

impl TestCluster {
    /// Start `n` nodes (`n1`..`nN`) with every plugin and wait until all see each other.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, |_| {}).await
    }

    /// Like [`TestCluster::start`], editing the configuration first.
    pub async fn start_with(
        n: usize,
        edit: impl FnOnce(&mut ClusterConfig),
    ) -> anyhow::Result<Self> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let mut config =
            ClusterConfig::local_ephemeral(n, &dir.path().join("certs"), &dir.path().join("data"));
        edit(&mut config);
        config.validate()?;
        let ids: Vec<String> = config.nodes.keys().cloned().collect();
        init_cluster_certs(&config.cluster.certs_dir, &ids)?;
        let mut c = TestCluster {
            dir,
            config,
            nodes: BTreeMap::new(),
        };
        for id in ids {
            c.start_node(&id).await?;
        }
        anyhow::ensure!(
            c.wait_converged(Duration::from_secs(30)).await,
            "cluster of {n} did not converge within 30 s"
        );
        Ok(c)
    }

    async fn start_node(&mut self, id: &str) -> anyhow::Result<()> {
        let seeds: Vec<SocketAddr> = self
            .nodes
            .values()
            .flatten()
            .map(|n| n.gossip_addr())
            .collect();
        let node = Node::start(NodeOptions {
            config: self.config.clone(),
            node_id: id.to_string(),
            plugins: dsys_node::plugins(),
            seed_addrs: seeds,
        })
        .await
        .map_err(anyhow::Error::msg)?;
        for p in node.host().names() {
            anyhow::ensure!(
                node.host().wait_running(p, Duration::from_secs(10)).await,
                "{id}: plugin {p} did not start"
            );
        }
        self.nodes.insert(id.to_string(), Some(node));
        Ok(())
    }

    /// The running node `id` (panics if it is down: a test bug).
    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .get(id)
            .and_then(Option::as_ref)
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// Ids of running nodes.
    pub fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stop `id` abruptly: gossip and transport vanish without a goodbye.
    pub async fn kill(&mut self, id: &str) {
        if let Some(n) = self.nodes.get_mut(id).and_then(Option::take) {
            n.kill().await;
        }
    }

    /// Start `id` again (new generation, new ephemeral ports).
    pub async fn restart(&mut self, id: &str) -> anyhow::Result<()> {
        self.kill(id).await;
        self.start_node(id).await
    }

    /// Apply a fault command on every running node.
    pub fn fault(&self, cmd: FaultCommand) {
        for n in self.nodes.values().flatten() {
            n.faults().apply(cmd.clone()).expect("valid fault command");
        }
    }

    /// Cut the cluster into `groups`.
    pub fn partition(&self, groups: &[&[&str]]) {
        self.fault(FaultCommand::Partition(
            groups
                .iter()
                .map(|g| g.iter().map(|s| s.to_string()).collect())
                .collect(),
        ));
    }

    /// Remove every fault.
    pub fn heal(&self) {
        self.fault(FaultCommand::Heal);
    }

    /// Wait until `observer`'s view satisfies `pred`.
    pub async fn wait_view(
        &self,
        observer: &str,
        deadline: Duration,
        pred: impl Fn(&ClusterView) -> bool,
    ) -> bool {
        self.node(observer)
            .membership()
            .wait_for(deadline, pred)
            .await
    }

    /// Wait until every running node sees exactly the running nodes alive, and returns how long it took.
    pub async fn wait_converged(&self, deadline: Duration) -> bool {
        let want = self.running();
        let end = Instant::now() + deadline;
        for id in &want {
            let left = end.saturating_duration_since(Instant::now());
            let ok = self
                .wait_view(id, left, |v| {
                    want.iter().all(|w| {
                        v.members
                            .get(w)
                            .map(|m| m.state == MemberState::Alive)
                            .unwrap_or(false)
                    }) && v.alive().len() == want.len()
                })
                .await;
            if !ok {
                return false;
            }
        }
        true
    }

    /// RPC addresses of running nodes, in id order.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.nodes
            .values()
            .flatten()
            .map(|n| n.rpc_addr())
            .collect()
    }

    /// A CLI client (certificate `cli`) over every running node.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_as("cli")
    }

    /// A client presenting the certificate file `name` (`cli`, `n1`...).
    pub fn client_as(&self, name: &str) -> anyhow::Result<Client> {
        let id = TlsIdentity::load(&self.config.cluster.certs_dir, name)?;
        Ok(Client::new(&id, self.endpoints(), Duration::from_secs(10))?)
    }

    /// The cluster's temporary folder.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stop every node.
    pub async fn shutdown(mut self) {
        let ids = self.running();
        for id in ids {
            self.kill(&id).await;
        }
    }
}

/// Poll `f` every 20 ms until it returns true or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
