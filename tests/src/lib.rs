//! The workspace's `TestCluster`: [`dsys_runtime::testkit::TestNodes`] with every plugin a
//! real node runs ([`dsys_node::plugins`]), so the multi-node tests in `tests/` exercise the
//! same node as the `dsys` binary. Kill, restart, partition, heal and the per-node clients
//! come from `TestNodes` (through `Deref`).
#![warn(missing_docs, unreachable_pub)]

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use dsys_runtime::testkit::TestNodes;
use dsys_runtime::ClusterConfig;

pub use dsys_runtime::testkit::{eventually, init_logging, wait_for};

/// A cluster of in-process nodes running every plugin.
pub struct TestCluster(TestNodes);

impl TestCluster {
    /// Start `n` nodes (`n1`..`nN`) with every plugin and wait until all see each other.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        Self::start_with(n, |_| {}).await
    }

    /// Like [`TestCluster::start`], editing the configuration first.
    pub async fn start_with(
        n: usize,
        edit: impl FnOnce(&mut ClusterConfig) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let nodes = TestNodes::builder(n, dsys_node::plugins)
            .plugin_start_deadline(Duration::from_secs(10))
            .config(edit)
            .start()
            .await?;
        Ok(TestCluster(nodes))
    }

    /// Stop every node.
    pub async fn shutdown(self) {
        self.0.shutdown().await
    }
}

impl Deref for TestCluster {
    type Target = TestNodes;
    fn deref(&self) -> &TestNodes {
        &self.0
    }
}

impl DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut TestNodes {
        &mut self.0
    }
}
