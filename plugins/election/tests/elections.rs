//! The `election` plugin on real in-process nodes (QUIC + mTLS + gossip on loopback) running
//! `consensus` and `election`: one leader at a time among concurrent candidates on different
//! nodes, the leader's node killed and the next candidate winning with a higher term, resign
//! handing over, `observe` seeing every change in order, refusals.
//!
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_consensus::ConsensusPlugin;
use dsys_plugin_election::{
    ElectionApi, ElectionPlugin, ElectionRequest, ElectionResponse, LeaderInfo,
};
use dsys_runtime::testkit::{wait_for, TestNodes};
use dsys_runtime::{plugin_factory, Client, ClientError, RpcError};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(60);
/// Per-request deadline of the tests' clients: longer than the longest wait to be elected.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Lease TTL of every campaign here: short enough for a quick failover, long enough that a
/// loaded machine stalling keep-alives for a few seconds does not end a leadership.
const TTL_MS: u64 = 5_000;

/// Nodes running `consensus` and `election`, the first three Raft voters.
///
/// One cluster at a time in this test binary (each is 3-4 nodes with Raft and fsyncs; more
/// at once on a small shared machine only measures the machine): it is
/// [`TestNodesBuilder::exclusive`](dsys_runtime::testkit::TestNodesBuilder::exclusive).
struct Cluster {
    nodes: TestNodes,
}

impl Cluster {
    /// `n` nodes, the first three Raft voters.
    async fn new(n: usize) -> Cluster {
        let nodes = TestNodes::builder(n, || {
            vec![
                plugin_factory::<ConsensusPlugin>(),
                plugin_factory::<ElectionPlugin>(),
            ]
        })
        .exclusive()
        .converge_deadline(DEADLINE)
        .config(|c| c.cluster.rpc_timeout_ms = 8000)
        .plugin_config(
            "consensus",
            serde_json::json!({"voters": ["n1", "n2", "n3"]}),
        )
        .start()
        .await
        .expect("cluster");
        let c = Cluster { nodes };
        // Ready once every node reads through consensus.
        for id in c.nodes.ids() {
            wait_for(&format!("a leader read through {id}"), DEADLINE, || async {
                c.leader(&id, "warmup").await.ok()
            })
            .await;
        }
        c
    }

    /// `req` through node `id`, on that node's own client (so concurrent calls to different
    /// nodes do not share, and keep replacing, one connection).
    async fn call(&self, id: &str, req: ElectionRequest) -> Result<ElectionResponse, ClientError> {
        let client = self
            .nodes
            .node_client("cli", id, CALL_TIMEOUT)
            .expect("client");
        client
            .call_at::<ElectionApi>(self.nodes.node(id).rpc_addr(), &req)
            .await
    }

    async fn campaign(
        &self,
        id: &str,
        name: &str,
        value: &str,
        wait_ms: u64,
    ) -> Result<ElectionResponse, ClientError> {
        self.call(
            id,
            ElectionRequest::Campaign {
                name: name.into(),
                value: value.into(),
                ttl_ms: TTL_MS,
                wait_ms,
            },
        )
        .await
    }

    /// (leader, candidates waiting) as read through `id`.
    async fn leader(&self, id: &str, name: &str) -> Result<(Option<LeaderInfo>, u32), ClientError> {
        match self
            .call(id, ElectionRequest::Leader { name: name.into() })
            .await?
        {
            ElectionResponse::Leader {
                leader, candidates, ..
            } => Ok((leader, candidates)),
            other => panic!("unexpected answer to leader: {other:?}"),
        }
    }

    async fn resign(
        &self,
        id: &str,
        name: &str,
        term: u64,
    ) -> Result<ElectionResponse, ClientError> {
        self.call(
            id,
            ElectionRequest::Resign {
                name: name.into(),
                term,
            },
        )
        .await
    }

    /// Wait until `n` candidates wait behind the leader (as read through `id`).
    async fn wait_candidates(&self, id: &str, name: &str, n: u32) {
        wait_for(
            &format!("{n} candidates behind the leader of {name}"),
            DEADLINE,
            || async {
                let (_, c) = self.leader(id, name).await.ok()?;
                (c == n).then_some(())
            },
        )
        .await
    }

    /// A new client of node `id` alone (its own connection).
    fn client_to(&self, id: &str) -> Client {
        self.nodes.client_at(id, CALL_TIMEOUT).expect("client")
    }
}

fn elected(r: Result<ElectionResponse, ClientError>) -> u64 {
    match r {
        Ok(ElectionResponse::Elected { term, .. }) => term,
        other => panic!("expected to be elected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_leader_failover_on_kill_resign_hands_over_and_observe_sees_each_change() {
    let mut c = Cluster::new(4).await;

    // Concurrent candidates on three nodes, none willing to wait: exactly one wins.
    let (r1, r2, r3) = tokio::join!(
        c.campaign("n1", "race", "x1", 0),
        c.campaign("n2", "race", "x2", 0),
        c.campaign("n4", "race", "x4", 0),
    );
    let results = [r1, r2, r3];
    let winners: Vec<u64> = results
        .iter()
        .filter_map(|r| match r {
            Ok(ElectionResponse::Elected { term, .. }) => Some(*term),
            _ => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in &results {
        assert!(
            matches!(
                r,
                Ok(ElectionResponse::Elected { .. } | ElectionResponse::NotElected { .. })
            ),
            "{r:?}"
        );
    }
    let (l, waiting) = c.leader("n3", "race").await.expect("leader");
    assert_eq!(l.map(|l| l.term), Some(winners[0]));
    assert_eq!(waiting, 0, "losers that did not wait left the queue");

    // An observer, started before anyone campaigns in "e".
    let seen: Arc<Mutex<Vec<Option<LeaderInfo>>>> = Arc::default();
    let observer = {
        let (client, seen) = (c.client_to("n3"), seen.clone());
        tokio::spawn(async move {
            dsys_plugin_election::observe(&client, "e", 2000, |l| {
                seen.lock().expect("seen").push(l.clone())
            })
            .await
        })
    };
    wait_for("the observer's first answer", DEADLINE, || async {
        (!seen.lock().expect("seen").is_empty()).then_some(())
    })
    .await;

    // n4 (not a Raft voter) leads; b and c queue behind it, b first.
    let ta = elected(c.campaign("n4", "e", "a", 0).await);
    let b = {
        let client = c.client_to("n1");
        tokio::spawn(async move {
            let r = client
                .call::<ElectionApi>(&ElectionRequest::Campaign {
                    name: "e".into(),
                    value: "b".into(),
                    ttl_ms: TTL_MS,
                    wait_ms: 50_000,
                })
                .await;
            elected(r)
        })
    };
    c.wait_candidates("n2", "e", 1).await;
    let cc = {
        let client = c.client_to("n2");
        tokio::spawn(async move {
            let r = client
                .call::<ElectionApi>(&ElectionRequest::Campaign {
                    name: "e".into(),
                    value: "c".into(),
                    ttl_ms: TTL_MS,
                    wait_ms: 50_000,
                })
                .await;
            elected(r)
        })
    };
    c.wait_candidates("n1", "e", 2).await;
    for id in ["n1", "n2", "n3", "n4"] {
        let (l, _) = c.leader(id, "e").await.expect("leader");
        let l = l.expect("a leader");
        assert_eq!((l.value.as_str(), l.term, l.node.as_str()), ("a", ta, "n4"));
    }
    assert!(!b.is_finished() && !cc.is_finished(), "two leaders at once");

    // Kill the leader's node: its lease expires and b, next in line, wins with a higher term.
    let killed = Instant::now();
    c.nodes.kill("n4").await;
    let tb = tokio::time::timeout(DEADLINE, b)
        .await
        .expect("b elected within the deadline")
        .expect("b");
    // Failover time: bounded below by the lease (renewed every third of its TTL).
    let failover = killed.elapsed();
    eprintln!("failover after the leader's node was killed: {failover:?} (TTL {TTL_MS} ms)");
    assert!(
        failover >= Duration::from_millis(TTL_MS * 2 / 3 - 100),
        "{failover:?}"
    );
    assert!(tb > ta);
    let (l, waiting) = c.leader("n3", "e").await.expect("leader");
    assert_eq!(l.map(|l| (l.value, l.term)), Some(("b".to_string(), tb)));
    assert_eq!(waiting, 1);
    assert!(!cc.is_finished(), "c leads while b does");

    // b resigns: c takes over at once.
    assert!(matches!(
        c.resign("n3", "e", tb).await,
        Ok(ElectionResponse::Resigned { term }) if term == tb
    ));
    let tc = tokio::time::timeout(DEADLINE, cc)
        .await
        .expect("c elected within the deadline")
        .expect("c");
    assert!(tc > tb);
    let (l, _) = c.leader("n1", "e").await.expect("leader");
    assert_eq!(l.map(|l| (l.value, l.term)), Some(("c".to_string(), tc)));
    c.resign("n1", "e", tc).await.expect("resign c");
    let (l, waiting) = c.leader("n2", "e").await.expect("leader");
    assert!(l.is_none() && waiting == 0);

    // The observer saw: nobody, a, b, c, nobody; each once, in order, with rising terms.
    let want: Vec<Option<(String, u64)>> = vec![
        None,
        Some(("a".into(), ta)),
        Some(("b".into(), tb)),
        Some(("c".into(), tc)),
        None,
    ];
    let got = wait_for("the observer sees every change", DEADLINE, || async {
        let s = seen.lock().expect("seen").clone();
        (s.len() >= want.len()).then_some(s)
    })
    .await;
    let got: Vec<Option<(String, u64)>> = got
        .into_iter()
        .map(|l| l.map(|l| (l.value, l.term)))
        .collect();
    assert_eq!(got, want);
    observer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_and_a_lost_term_cannot_resign() {
    let c = Cluster::new(3).await;
    let refused = |r: Result<ElectionResponse, ClientError>, what: &str| match r {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains(what), "{m}"),
        other => panic!("expected a refusal about {what}, got {other:?}"),
    };
    refused(c.campaign("n1", "a/b", "v", 0).await, "election name");
    refused(c.campaign("n1", "", "v", 0).await, "election name");
    refused(
        c.campaign(
            "n1",
            "e",
            &"v".repeat(dsys_plugin_election::MAX_VALUE_BYTES + 1),
            0,
        )
        .await,
        "exceeds",
    );
    refused(
        c.call(
            "n1",
            ElectionRequest::Campaign {
                name: "e".into(),
                value: "v".into(),
                ttl_ms: 10,
                wait_ms: 0,
            },
        )
        .await,
        "TTL",
    );
    refused(c.resign("n2", "e", 0).await, "term");
    refused(c.resign("n2", "e", 999_999).await, "no candidate");
    let t = elected(c.campaign("n2", "e", "v", 0).await);
    c.resign("n3", "e", t).await.expect("resign");
    refused(c.resign("n3", "e", t).await, "no candidate");
}
