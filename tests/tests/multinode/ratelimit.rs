//! The global rate limit: whichever node a request hits, the key's owner decides, so a client
//! spreading requests over every node gets exactly the rule's limit.

use std::time::Duration;

use dsys_plugin_ratelimit::{RatelimitApi, RatelimitRequest, RatelimitResponse};
use dsys_runtime::{ClientError, RpcError};
use dsys_tests::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rules(c: &mut dsys_runtime::ClusterConfig) {
    c.plugins.insert(
        "ratelimit".into(),
        serde_json::json!({ "rules": {
            "tb": { "algorithm": "token_bucket", "limit": 7, "window_ms": 600000 },
            "fw": { "algorithm": "fixed_window", "limit": 5, "window_ms": 3600000 },
            "sl": { "algorithm": "sliding_log", "limit": 6, "window_ms": 600000 },
            "sc": { "algorithm": "sliding_counter", "limit": 4, "window_ms": 600000 },
        }}),
    );
}

async fn check(
    client: &dsys_runtime::Client,
    addr: std::net::SocketAddr,
    rule: &str,
    key: &str,
) -> anyhow::Result<bool> {
    let r = client
        .call_at::<RatelimitApi>(
            addr,
            &RatelimitRequest::Check {
                rule: rule.into(),
                key: key.into(),
                cost: 1,
            },
        )
        .await?;
    let RatelimitResponse::Decision { decision, .. } = r else {
        anyhow::bail!("wrong answer")
    };
    Ok(decision.allowed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_all_nodes_gets_exactly_the_limit() -> anyhow::Result<()> {
    let c = TestCluster::start_with(5, rules).await?;
    let client = c.client()?;
    let eps = c.endpoints();
    // The guarantee holds while every node sees the same members (so the same owner per
    // key). A machine starved of CPU can make gossip suspect a live node for a moment; a
    // round during which any node saw a membership change is not evidence either way, so it
    // is repeated with a fresh key (and a round without churn must be exact).
    let ids = c.running();
    for (rule, limit) in [("tb", 7), ("fw", 5), ("sl", 6), ("sc", 4)] {
        for key in ["alice", "bob"] {
            let mut exact = false;
            for attempt in 0..5 {
                assert!(c.wait_converged(Duration::from_secs(30)).await);
                let mut events: Vec<_> = ids
                    .iter()
                    .map(|id| c.node(id).membership().subscribe())
                    .collect();
                let key = format!("{key}-{attempt}");
                let mut allowed = 0;
                let mut lost = None;
                for i in 0..(limit * 3) {
                    match check(&client, eps[i % eps.len()], rule, &key).await {
                        Ok(true) => allowed += 1,
                        Ok(false) => {}
                        // An answer lost in transit leaves the count unknown.
                        Err(e) => lost = Some(e),
                    }
                }
                if let Some(e) = lost {
                    eprintln!("a check of rule {rule} key {key} failed ({e}); repeating");
                    continue;
                }
                if events.iter_mut().any(|e| {
                    !matches!(
                        e.try_recv(),
                        Err(tokio::sync::broadcast::error::TryRecvError::Empty)
                    )
                }) {
                    eprintln!("membership changed during rule {rule} key {key}; repeating");
                    continue;
                }
                assert_eq!(allowed, limit, "rule {rule} key {key}");
                exact = true;
                break;
            }
            assert!(
                exact,
                "rule {rule}: no round without membership churn or lost answers"
            );
        }
    }
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_http_answers_429() -> anyhow::Result<()> {
    let c = TestCluster::start_with(2, rules).await?;
    let client = c.client()?;
    for req in [
        RatelimitRequest::Check {
            rule: "nope".into(),
            key: "k".into(),
            cost: 1,
        },
        RatelimitRequest::Check {
            rule: "tb".into(),
            key: "x".repeat(10_000),
            cost: 1,
        },
        RatelimitRequest::Check {
            rule: "tb".into(),
            key: "".into(),
            cost: 1,
        },
        RatelimitRequest::Check {
            rule: "tb".into(),
            key: "k".into(),
            cost: u64::MAX,
        },
    ] {
        let r = client.call::<RatelimitApi>(&req).await;
        assert!(
            matches!(r, Err(ClientError::Rpc(RpcError::Refused(_)))),
            "{r:?}"
        );
    }
    // HTTP on a node that is not necessarily the owner: 200 x5 then 429 with headers.
    let http = c.node("n2").http_addr();
    let mut codes = Vec::new();
    let mut last = String::new();
    for _ in 0..6 {
        let mut s = tokio::net::TcpStream::connect(http).await?;
        s.write_all(b"GET /ratelimit/fw/carol HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await??;
        codes.push(buf[9..12].to_string());
        last = buf;
    }
    assert_eq!(codes, ["200", "200", "200", "200", "200", "429"]);
    let lower = last.to_ascii_lowercase();
    for h in [
        "retry-after:",
        "ratelimit-limit: 5",
        "ratelimit-remaining: 0",
        "ratelimit-reset:",
    ] {
        assert!(lower.contains(h), "missing {h} in {last}");
    }
    c.shutdown().await;
    Ok(())
}
