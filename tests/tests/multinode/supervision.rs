//! The plugin host: a panicking plugin is restarted alone, counted, and marked failed past its
//! restart intensity, while the node and its other plugins keep serving.

use std::time::Duration;

use dsys_plugin_ratelimit::{RatelimitApi, RatelimitRequest};
use dsys_plugin_ring::{RingApi, RingRequest};
use dsys_runtime::{PluginStatus, SysApi, SysRequest, SysResponse};
use dsys_tests::{eventually, TestCluster};

fn status_of(c: &TestCluster, node: &str, plugin: &str) -> (PluginStatus, u32) {
    c.node(node)
        .host()
        .statuses()
        .into_iter()
        .find(|(n, _, _)| n == plugin)
        .map(|(_, s, r)| (s, r))
        .expect("plugin exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_restarts_only_that_plugin() -> anyhow::Result<()> {
    let c = TestCluster::start(2).await?;
    let rpc = c.node("n1").rpc().clone();
    assert!(c.node("n1").host().inject_panic("ratelimit"));
    // The other plugin and the node keep serving while ratelimit restarts.
    rpc.call::<RingApi>(
        "n1",
        &RingRequest::Lookup {
            key: "k".into(),
            replicas: 1,
        },
    )
    .await?;
    rpc.call::<SysApi>("n1", &SysRequest::Ping).await?;
    let restarted = eventually(Duration::from_secs(10), || async {
        status_of(&c, "n1", "ratelimit") == (PluginStatus::Running, 1)
    })
    .await;
    assert!(
        restarted,
        "ratelimit was not restarted: {:?}",
        c.node("n1").host().statuses()
    );
    assert_eq!(status_of(&c, "n1", "ring"), (PluginStatus::Running, 0));
    // The restarted plugin serves again (it reports an unknown rule: no rules configured).
    let r = rpc
        .call::<RatelimitApi>("n1", &RatelimitRequest::Rules)
        .await;
    assert!(r.is_ok(), "{r:?}");
    // The restart count reaches the other node through gossip, and `cluster status`.
    let client = c.client()?;
    let seen = eventually(Duration::from_secs(10), || async {
        match client
            .call_at::<SysApi>(c.node("n2").rpc_addr(), &SysRequest::Status)
            .await
        {
            Ok(SysResponse::Status(st)) => {
                st.members.iter().any(|m| m.id == "n1" && m.restarts == 1)
            }
            _ => false,
        }
    })
    .await;
    assert!(seen, "n2 never saw n1's restart count");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_restarts_mark_the_plugin_failed() -> anyhow::Result<()> {
    let c = TestCluster::start(1).await?;
    for i in 1..=6u32 {
        let running = eventually(Duration::from_secs(20), || async {
            status_of(&c, "n1", "ratelimit") == (PluginStatus::Running, i - 1)
        })
        .await;
        assert!(
            running,
            "not running before panic {i}: {:?}",
            c.node("n1").host().statuses()
        );
        assert!(c.node("n1").host().inject_panic("ratelimit"));
    }
    let failed = eventually(Duration::from_secs(10), || async {
        status_of(&c, "n1", "ratelimit") == (PluginStatus::Failed, 6)
    })
    .await;
    assert!(failed, "{:?}", c.node("n1").host().statuses());
    let r = c
        .node("n1")
        .rpc()
        .call::<RatelimitApi>("n1", &RatelimitRequest::Rules)
        .await;
    assert!(
        matches!(r, Err(dsys_runtime::RpcError::PluginUnavailable(_))),
        "{r:?}"
    );
    assert_eq!(status_of(&c, "n1", "ring").0, PluginStatus::Running);
    c.shutdown().await;
    Ok(())
}
