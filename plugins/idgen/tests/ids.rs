//! The `idgen` plugin on real in-process nodes (QUIC + mTLS + gossip on loopback) running
//! `consensus` and `idgen`: ids from every node unique, worker ids distinct; a node cut off
//! from consensus stops issuing within its lease; a worker id that moves to another node and
//! a restarted node both continue strictly after the ids issued before.
//!
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dsys_plugin_consensus::{ConsensusApi, ConsensusPlugin, ConsensusRequest, ConsensusResponse};
use dsys_plugin_idgen::layout::decode;
use dsys_plugin_idgen::{IdBatch, IdRequest, IdResponse, IdStatus, IdgenApi, IdgenPlugin};
use dsys_runtime::testkit::TestNodes;
use dsys_runtime::{plugin_factory, Client, ClientError, FaultCommand, RpcError};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(60);
/// Worker id lease TTL in these tests (generous: a loaded machine may stall keep-alives).
const TTL_MS: u64 = 10_000;

/// Poll `f` until it returns `Some`, or panic after [`DEADLINE`].
async fn wait_for<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    dsys_runtime::testkit::wait_for(what, DEADLINE, f).await
}

struct Cluster {
    nodes: TestNodes,
    client: Arc<Client>,
}

impl Cluster {
    /// A config for `n` nodes (n1..n3 Raft voters); `start` of them are started. One
    /// cluster at a time in this test binary (each is 4-5 nodes with Raft and fsyncs).
    async fn new(n: usize, start: usize) -> Cluster {
        let nodes = TestNodes::builder(n, || {
            vec![
                plugin_factory::<ConsensusPlugin>(),
                plugin_factory::<IdgenPlugin>(),
            ]
        })
        .exclusive()
        .start_only(start)
        .converge_deadline(DEADLINE)
        .config(|cfg| cfg.cluster.rpc_timeout_ms = 8000)
        .plugin_config(
            "consensus",
            serde_json::json!({"voters": ["n1", "n2", "n3"]}),
        )
        .plugin_config("idgen", serde_json::json!({"ttl_ms": TTL_MS}))
        .start()
        .await
        .expect("cluster");
        // One client; each call names its node (`call_at`).
        let client = Arc::new(
            nodes
                .client_with("cli", vec![], Duration::from_secs(30))
                .expect("client"),
        );
        let c = Cluster { nodes, client };
        for id in c.nodes.running() {
            c.wait_active(&id).await;
        }
        c
    }

    async fn start(&mut self, id: &str) {
        self.nodes.start_node(id).await.expect("node start");
        assert!(
            self.nodes.wait_converged(DEADLINE).await,
            "{id} and the others did not see each other alive"
        );
    }

    async fn kill(&mut self, id: &str) {
        self.nodes.kill(id).await;
    }

    fn addr(&self, id: &str) -> SocketAddr {
        self.nodes.node(id).rpc_addr()
    }

    async fn call(&self, id: &str, req: IdRequest) -> Result<IdResponse, ClientError> {
        self.client.call_at::<IdgenApi>(self.addr(id), &req).await
    }

    async fn next(&self, id: &str, n: u32) -> Result<IdBatch, ClientError> {
        match self.call(id, IdRequest::Next { n }).await? {
            IdResponse::Ids(b) => Ok(b),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    async fn status(&self, id: &str) -> IdStatus {
        match self.call(id, IdRequest::Status).await {
            Ok(IdResponse::Status(s)) => s,
            other => panic!("status of {id}: {other:?}"),
        }
    }

    /// Wait until `id` holds a worker id; it.
    async fn wait_active(&self, id: &str) -> u16 {
        let t0 = Instant::now();
        loop {
            let s = self.status(id).await;
            if s.lease.state == "active" && s.issuing_for_ms > 0 {
                if let Some(w) = s.lease.worker {
                    return w;
                }
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "{id} holds no worker id after {DEADLINE:?}: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A batch from `id`, retrying while it has no lease (the retryable answer).
    async fn next_when_ready(&self, id: &str, n: u32) -> IdBatch {
        wait_for(&format!("ids from {id}"), || async {
            match self.next(id, n).await {
                Ok(b) => Some(b),
                Err(e) => {
                    assert_retryable(&e);
                    None
                }
            }
        })
        .await
    }

    async fn consensus(&self, via: &str, req: ConsensusRequest) -> ConsensusResponse {
        self.client
            .call_at::<ConsensusApi>(self.addr(via), &req)
            .await
            .expect("consensus call")
    }

    fn fault(&self, cmd: FaultCommand) {
        self.nodes.fault(cmd);
    }
}

/// A node without a valid lease answers with the retryable (fail-over) error.
fn assert_retryable(e: &ClientError) {
    match e {
        ClientError::Rpc(RpcError::Unreachable(m)) if m.contains("idgen on") => {}
        other => panic!("expected the retryable no-lease answer, got {other:?}"),
    }
}

fn workers_of(b: &IdBatch) -> BTreeSet<u16> {
    b.ids()
        .map(|id| decode(id).expect("an id").worker)
        .collect()
}

fn strictly_increasing(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_from_all_nodes_are_unique_and_worker_ids_distinct() {
    let c = Cluster::new(4, 4).await;
    let mut workers = BTreeMap::new();
    for id in &c.nodes.running() {
        workers.insert(id.clone(), c.wait_active(id).await);
    }
    let distinct: BTreeSet<u16> = workers.values().copied().collect();
    assert_eq!(distinct.len(), 4, "worker ids shared: {workers:?}");

    // Every node at once, batches of mixed sizes, several requests in flight per node.
    let sizes = [1u32, 7, 4096, 4097, 20_000, 1, 100_000, 3];
    let mut tasks = Vec::new();
    for id in &c.nodes.running() {
        for k in 0..3 {
            let (client, addr, id) = (c.client.clone(), c.addr(id), id.clone());
            tasks.push(tokio::spawn(async move {
                let mut stream = Vec::new();
                for i in 0..sizes.len() {
                    let req = IdRequest::Next {
                        n: sizes[(i + k) % sizes.len()],
                    };
                    // A loaded machine may stall consensus past a lease renewal: the node
                    // then answers with the retryable error, which is retried here.
                    let t0 = Instant::now();
                    let b = loop {
                        match client.call_at::<IdgenApi>(addr, &req).await {
                            Ok(IdResponse::Ids(b)) => break b,
                            Err(e) if t0.elapsed() < DEADLINE => {
                                assert_retryable(&e);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            other => panic!("ids from {id}: {other:?}"),
                        }
                    };
                    assert_eq!(b.len(), u64::from(sizes[(i + k) % sizes.len()]));
                    assert_eq!(b.node, id);
                    stream.push(b);
                }
                (id, stream)
            }));
        }
    }
    let mut all = BTreeSet::new();
    let mut total = 0u64;
    for t in tasks {
        let (id, stream) = t.await.expect("task");
        // One client's successive requests to one node: each batch above the one before.
        let flat: Vec<u64> = stream.iter().flat_map(|b| b.ids()).collect();
        assert!(strictly_increasing(&flat), "ids from {id} did not increase");
        total += flat.len() as u64;
        all.extend(flat);
    }
    assert_eq!(all.len() as u64, total, "duplicate ids across nodes");
    // Live nodes still hold distinct worker ids (a node that lost its lease under load may
    // hold another one by now).
    let mut now_held = BTreeMap::new();
    for id in &c.nodes.running() {
        now_held.insert(id.clone(), c.wait_active(id).await);
    }
    let distinct: BTreeSet<u16> = now_held.values().copied().collect();
    assert_eq!(distinct.len(), 4, "worker ids shared: {now_held:?}");
    // The counts reach the status (and so the panel and /metrics).
    let issued: u64 = {
        let mut s = 0;
        for id in &c.nodes.running() {
            s += c.status(id).await.stats.issued;
        }
        s
    };
    assert!(issued >= total, "issued {issued} < received {total}");
    // Bad input is refused, not served.
    match c.next("n1", 100_001).await {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("1..=100000"), "{m}"),
        other => panic!("a batch over the limit was not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_and_restarted_nodes_stop_then_continue_strictly_after() {
    // n5 is configured but started later.
    let mut c = Cluster::new(5, 4).await;
    c.wait_active("n4").await;
    let mut before: Vec<u64> = Vec::new();
    for _ in 0..5 {
        before.extend(c.next("n4", 5000).await.expect("ids").ids());
    }

    // Cut n4 (not a voter) off from consensus: it must stop issuing within its TTL.
    c.fault(FaultCommand::Partition(vec![
        vec!["n4".into()],
        vec!["n1".into(), "n2".into(), "n3".into()],
    ]));
    let cut = Instant::now();
    let stopped = loop {
        match c.next("n4", 1).await {
            Ok(b) => before.extend(b.ids()),
            Err(e) => {
                assert_retryable(&e);
                break cut.elapsed();
            }
        }
        assert!(cut.elapsed() < DEADLINE, "n4 never stopped issuing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        stopped <= Duration::from_millis(TTL_MS),
        "n4 issued ids {stopped:?} after it was cut off (TTL {TTL_MS} ms)"
    );
    c.fault(FaultCommand::Heal);
    let b = c.next_when_ready("n4", 1000).await;
    assert!(
        b.ids().next() > before.last().copied(),
        "n4 went back after healing"
    );
    before.extend(b.ids());
    // It may have come back with another worker id.
    let w4 = c.wait_active("n4").await;

    // Kill n4; once its claim has expired, hand its worker id to a new node n5 (by making
    // it n5's preferred one): n5's ids with that worker id must all be above n4's.
    c.kill("n4").await;
    let claim = format!("idgen/worker/{w4}");
    wait_for("n4's claim expires", || async {
        match c
            .consensus(
                "n1",
                ConsensusRequest::Get {
                    key: claim.clone(),
                    prefix: false,
                    serializable: false,
                    limit: 1,
                },
            )
            .await
        {
            ConsensusResponse::Range { kvs, .. } => kvs.is_empty().then_some(()),
            _ => None,
        }
    })
    .await;
    let mark = serde_json::json!({"worker": w4, "hw_ms": 0}).to_string();
    c.consensus(
        "n1",
        ConsensusRequest::Put {
            key: "idgen/node/n5".into(),
            value: mark,
            lease: None,
        },
    )
    .await;
    c.start("n5").await;
    let b5 = c.next_when_ready("n5", 5000).await;
    assert_eq!(
        workers_of(&b5),
        BTreeSet::from([w4]),
        "n5 did not take n4's worker id"
    );
    let max_before = before.iter().copied().max().expect("ids");
    assert!(
        b5.ids().next() > Some(max_before),
        "worker {w4} on n5 issued below its previous holder's ids"
    );

    // Restart n4: it gets a lease (another worker id: n5 holds its old one) before issuing,
    // and its ids continue above everything it issued before.
    c.start("n4").await;
    let b4 = c.next_when_ready("n4", 5000).await;
    let s4 = c.status("n4").await;
    assert_eq!(s4.lease.state, "active");
    assert!(s4.lease.acquired >= 1);
    assert_ne!(s4.lease.worker, Some(w4));
    assert!(b4.ids().next() > Some(max_before), "restarted n4 went back");
    let ids4: Vec<u64> = b4.ids().collect();
    assert!(strictly_increasing(&ids4));

    let mut all: BTreeSet<u64> = before.iter().copied().collect();
    let n = all.len() + b5.len() as usize + ids4.len();
    all.extend(b5.ids());
    all.extend(ids4);
    assert_eq!(all.len(), n, "duplicate ids");
}
