//! Test-only helpers (feature `testsuite`, never in the binary):
//!
//! * [`TestNodes`]: n real nodes in one process (QUIC + mTLS + gossip on 127.0.0.1 ephemeral
//!   ports) running whatever plugins the test names, with `kill`, `restart`, partitions and
//!   per-node clients. Plugin crates test themselves on it with just their own plugins; the
//!   workspace's multi-node tests wrap it with every plugin. Heavy clusters can ask to run
//!   one at a time per test process ([`TestNodesBuilder::exclusive`]).
//! * [`wait_for`] and [`eventually`]: wait on a condition with a deadline (never sleep and
//!   hope).
//! * [`raw_stream`] and [`decode_response`]: raw access to the wire for bad-input tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::{
    init_cluster_certs, Client, ClusterConfig, ClusterView, FaultCommand, MemberState, Node,
    NodeOptions, PluginFactory, RpcError, TlsIdentity, TransportOptions,
};

/// Held by every live [`TestNodesBuilder::exclusive`] cluster: one at a time per process.
static EXCLUSIVE: Semaphore = Semaphore::const_new(1);

/// Log to stderr once per test process when `DSYS_LOG` (an env-filter) is set.
pub fn init_logging() {
    if let Ok(f) = std::env::var("DSYS_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .with_test_writer()
            .try_init();
    }
}

/// Poll `f` every 20 ms until it returns true or `deadline` passes; says which.
pub async fn eventually<F, Fut>(deadline: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
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

/// Poll `f` every 50 ms until it returns `Some`; panics naming `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The plugins every node of a [`TestNodes`] runs (called once per node start).
pub type PluginSet = Arc<dyn Fn() -> Vec<PluginFactory> + Send + Sync>;

/// How to start a [`TestNodes`].
pub struct TestNodesBuilder {
    n: usize,
    start: usize,
    plugins: PluginSet,
    edits: Vec<Box<dyn FnOnce(&mut ClusterConfig) + Send>>,
    plugin_start: Duration,
    converge: Duration,
    exclusive: bool,
}

impl TestNodesBuilder {
    /// Start only the first `k` nodes (the others can be started later with
    /// [`TestNodes::start_node`]).
    pub fn start_only(mut self, k: usize) -> Self {
        self.start = k;
        self
    }

    /// Edit the configuration before anything starts.
    pub fn config(mut self, edit: impl FnOnce(&mut ClusterConfig) + Send + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Set `plugins.<name>` in the configuration.
    pub fn plugin_config(self, name: &str, value: serde_json::Value) -> Self {
        let name = name.to_string();
        self.config(move |c| {
            c.plugins.insert(name, value);
        })
    }

    /// How long each plugin may take to start (default 20 s).
    pub fn plugin_start_deadline(mut self, d: Duration) -> Self {
        self.plugin_start = d;
        self
    }

    /// How long [`TestNodesBuilder::start`] waits until every started node sees every other
    /// alive (default 30 s).
    pub fn converge_deadline(mut self, d: Duration) -> Self {
        self.converge = d;
        self
    }

    /// Run this cluster alone among the exclusive clusters of this test process:
    /// [`TestNodesBuilder::start`] first waits until the previous one is shut down or
    /// dropped. For clusters that are heavy (Raft with fsyncs on every node), where several
    /// at once on a small shared machine only measure the machine. Tests of one binary run
    /// in parallel by default, so this is what keeps them apart.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Start the nodes and wait until all of them see each other alive (see
    /// [`TestNodesBuilder::converge_deadline`]).
    pub async fn start(self) -> anyhow::Result<TestNodes> {
        init_logging();
        let exclusive = if self.exclusive {
            Some(EXCLUSIVE.acquire().await?)
        } else {
            None
        };
        let dir = tempfile::tempdir()?;
        let mut config = ClusterConfig::local_ephemeral(
            self.n,
            &dir.path().join("certs"),
            &dir.path().join("data"),
        );
        for e in self.edits {
            e(&mut config);
        }
        config.validate()?;
        let ids: Vec<String> = config.nodes.keys().cloned().collect();
        init_cluster_certs(&config.cluster.certs_dir, &ids)?;
        let mut c = TestNodes {
            dir,
            config,
            plugins: self.plugins,
            plugin_start: self.plugin_start,
            nodes: ids.iter().map(|id| (id.clone(), None)).collect(),
            clients: Mutex::default(),
            _exclusive: exclusive,
        };
        for id in ids.iter().take(self.start) {
            c.start_node(id).await?;
        }
        anyhow::ensure!(
            c.wait_converged(self.converge).await,
            "cluster of {} did not converge within {:?}",
            self.start,
            self.converge
        );
        Ok(c)
    }
}

/// A cluster of in-process nodes (see the module docs).
pub struct TestNodes {
    dir: tempfile::TempDir,
    /// The configuration every node was started with.
    pub config: ClusterConfig,
    plugins: PluginSet,
    plugin_start: Duration,
    /// Every node of the configuration; `None` while it is not running.
    nodes: BTreeMap<String, Option<Node>>,
    /// [`TestNodes::node_client`]'s clients by (certificate, node address, deadline).
    clients: Mutex<BTreeMap<(String, SocketAddr, Duration), Arc<Client>>>,
    /// Last, so that it is released after the nodes are gone.
    _exclusive: Option<SemaphorePermit<'static>>,
}

impl TestNodes {
    /// `n` nodes (`n1`..`nN`), each running the plugins `plugins` returns.
    pub fn builder(
        n: usize,
        plugins: impl Fn() -> Vec<PluginFactory> + Send + Sync + 'static,
    ) -> TestNodesBuilder {
        TestNodesBuilder {
            n,
            start: n,
            plugins: Arc::new(plugins),
            edits: Vec::new(),
            plugin_start: Duration::from_secs(20),
            converge: Duration::from_secs(30),
            exclusive: false,
        }
    }

    /// Start node `id` (not running now), seeded by the running ones, and wait until its
    /// plugins run.
    pub async fn start_node(&mut self, id: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.nodes.contains_key(id),
            "no node {id} in the configuration"
        );
        let seeds: Vec<SocketAddr> = self
            .nodes
            .values()
            .flatten()
            .map(|n| n.gossip_addr())
            .collect();
        let node = Node::start(NodeOptions {
            config: self.config.clone(),
            node_id: id.to_string(),
            plugins: (self.plugins)(),
            seed_addrs: seeds,
        })
        .await
        .map_err(anyhow::Error::msg)?;
        for p in node.host().names() {
            anyhow::ensure!(
                node.host().wait_running(p, self.plugin_start).await,
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

    /// Ids of running nodes, in id order.
    pub fn running(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of every node of the configuration, running or not.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// Stop `id` abruptly: gossip and transport vanish without a goodbye.
    pub async fn kill(&mut self, id: &str) {
        if let Some(n) = self.nodes.get_mut(id).and_then(Option::take) {
            n.kill().await;
        }
    }

    /// Start `id` again (new generation, new ephemeral ports, same data folder).
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

    /// Wait until every running node sees exactly the running nodes alive, and its hash ring
    /// holds them all (the ring is rebuilt just before each view is published).
    pub async fn wait_converged(&self, deadline: Duration) -> bool {
        let want = self.running();
        let end = Instant::now() + deadline;
        for id in &want {
            let left = end.saturating_duration_since(Instant::now());
            let membership = self.node(id).membership();
            let ok = self
                .wait_view(id, left, |v| {
                    want.iter().all(|w| {
                        v.members
                            .get(w)
                            .map(|m| m.state == MemberState::Alive)
                            .unwrap_or(false)
                    }) && v.alive().len() == want.len()
                        && membership.ring().nodes().len() == want.len()
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

    /// A CLI client (certificate `cli`) over every running node, 10 s per request.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_as("cli")
    }

    /// A client presenting the certificate file `name` (`cli`, `reader`, `n1`...) over every
    /// running node.
    pub fn client_as(&self, name: &str) -> anyhow::Result<Client> {
        self.client_with(name, self.endpoints(), Duration::from_secs(10))
    }

    /// A CLI client that talks to node `id` only, with this deadline per request.
    pub fn client_at(&self, id: &str, timeout: Duration) -> anyhow::Result<Client> {
        self.client_with("cli", vec![self.node(id).rpc_addr()], timeout)
    }

    /// The client presenting certificate `name` that talks to node `id` only, with this
    /// deadline per request: made on first use, then the same one (per certificate, node
    /// address and deadline; a restarted node has a new address, so a new client). Concurrent
    /// calls through different nodes thus each keep their own connection instead of sharing,
    /// and replacing, one. Call it with [`Client::call_at`] and the node's RPC address to get
    /// the node's own errors (`call` folds an unreachable node into `NoNode`).
    pub fn node_client(
        &self,
        name: &str,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Client>> {
        let addr = self.node(id).rpc_addr();
        let key = (name.to_string(), addr, timeout);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(self.client_with(name, vec![addr], timeout)?);
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// A client presenting certificate `name` to `endpoints`, with this deadline per request.
    pub fn client_with(
        &self,
        name: &str,
        endpoints: Vec<SocketAddr>,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let id = TlsIdentity::load(&self.config.cluster.certs_dir, name)?;
        Ok(Client::new(&id, endpoints, timeout)?)
    }

    /// The cluster's temporary folder.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Stop every node.
    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.kill(&id).await;
        }
    }
}

/// Open a raw bi-stream to the node at `addr` presenting `id`, to write arbitrary bytes.
pub async fn raw_stream(
    addr: SocketAddr,
    id: &TlsIdentity,
) -> Result<(quinn::Endpoint, quinn::SendStream, quinn::RecvStream), RpcError> {
    crate::tls::install_crypto_provider();
    let cfg = crate::transport::client_config(id, &TransportOptions::default())
        .map_err(|e| RpcError::Internal(e.to_string()))?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))
        .map_err(|e| RpcError::Internal(e.to_string()))?;
    let conn = crate::transport::connect(
        &ep,
        cfg,
        addr,
        crate::tls::ANY_NODE_NAME,
        Duration::from_secs(5),
    )
    .await?;
    let (s, r) = conn
        .open_bi()
        .await
        .map_err(|e| RpcError::Unreachable(e.to_string()))?;
    Ok((ep, s, r))
}

/// Decode a response frame body as the transport does.
pub fn decode_response(buf: &[u8]) -> Result<Result<Vec<u8>, RpcError>, RpcError> {
    Ok(crate::codec::decode::<Result<Vec<u8>, RpcError>>(buf)?)
}
