//! The `consensus` plugin on real in-process nodes (QUIC + mTLS + gossip on loopback): leader
//! election, forwarding from followers and non-voters, linearizable reads, leader kill with no
//! acknowledged write lost, restart recovering the log from the WAL, a partition whose
//! minority cannot commit, lease expiry, watches, transactions, membership change, snapshots
//! with log compaction and a learner catching up from a snapshot.
//!
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use dsys_plugin_consensus::state::{Compare, CompareOp, CompareTarget, EventKind, Txn, TxnOp};
use dsys_plugin_consensus::{
    ConsensusApi, ConsensusPlugin, ConsensusRequest, ConsensusResponse, RaftStatus,
};
use dsys_runtime::{
    init_cluster_certs, plugin_factory, Client, ClientError, ClusterConfig, FaultCommand,
    MemberState, Node, NodeOptions, RpcError, TlsIdentity,
};

const DEADLINE: Duration = Duration::from_secs(60);

struct Cluster {
    _dir: tempfile::TempDir,
    cfg: ClusterConfig,
    nodes: BTreeMap<String, Node>,
    client: Client,
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn start_node(cfg: &ClusterConfig, id: &str, seeds: Vec<SocketAddr>) -> Node {
    let n = Node::start(NodeOptions {
        config: cfg.clone(),
        node_id: id.into(),
        plugins: vec![plugin_factory::<ConsensusPlugin>()],
        seed_addrs: seeds,
    })
    .await
    .expect("node start");
    assert!(
        n.host()
            .wait_running("consensus", Duration::from_secs(20))
            .await,
        "consensus plugin did not start on {id}"
    );
    n
}

/// Poll `f` until it returns `Some`, or panic after the deadline.
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let t0 = tokio::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if t0.elapsed() > DEADLINE {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Cluster {
    async fn new(n: usize, start: usize, plugin: serde_json::Value) -> Cluster {
        init_tracing();
        let dir = tempfile::tempdir().expect("tmp");
        let certs = dir.path().join("certs");
        let mut cfg = ClusterConfig::local_ephemeral(n, &certs, &dir.path().join("data"));
        cfg.cluster.rpc_timeout_ms = 8000;
        cfg.plugins.insert("consensus".into(), plugin);
        cfg.validate().expect("config");
        let ids: Vec<String> = cfg.nodes.keys().cloned().collect();
        init_cluster_certs(&certs, &ids).expect("certs");
        let mut nodes = BTreeMap::new();
        let mut seeds = Vec::new();
        for id in ids.iter().take(start) {
            let node = start_node(&cfg, id, seeds.clone()).await;
            seeds.push(node.gossip_addr());
            nodes.insert(id.clone(), node);
        }
        let cli = TlsIdentity::load(&certs, "cli").expect("cli identity");
        let addrs = nodes.values().map(|n| n.rpc_addr()).collect();
        let client = Client::new(&cli, addrs, Duration::from_secs(20)).expect("client");
        let c = Cluster {
            _dir: dir,
            cfg,
            nodes,
            client,
        };
        c.wait_all_see_each_other().await;
        c
    }

    async fn wait_all_see_each_other(&self) {
        for (id, n) in &self.nodes {
            for other in self.nodes.keys().filter(|o| *o != id) {
                let n = n.membership().clone();
                let other = other.clone();
                wait_for(&format!("{id} sees {other} alive"), || {
                    let v = n.view();
                    let ok =
                        v.members.get(&other).map(|m| m.state == MemberState::Alive) == Some(true);
                    async move { ok.then_some(()) }
                })
                .await;
            }
        }
    }

    async fn start(&mut self, id: &str) {
        let seeds = self.nodes.values().map(|n| n.gossip_addr()).collect();
        let node = start_node(&self.cfg, id, seeds).await;
        self.nodes.insert(id.to_string(), node);
        self.wait_all_see_each_other().await;
    }

    async fn kill(&mut self, id: &str) {
        let n = self.nodes.remove(id).expect("running node");
        n.kill().await;
    }

    async fn call(
        &self,
        id: &str,
        req: ConsensusRequest,
    ) -> Result<ConsensusResponse, ClientError> {
        let Some(node) = self.nodes.get(id) else {
            return Err(ClientError::Rpc(RpcError::Unreachable(format!(
                "{id} is not running"
            ))));
        };
        self.client
            .call_at::<ConsensusApi>(node.rpc_addr(), &req)
            .await
    }

    /// A counter or gauge from `id`'s `/metrics` (0 when absent).
    async fn metric(&self, id: &str, series: &str) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.nodes[id].http_addr())
            .await
            .expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request /metrics");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read /metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    async fn status(&self, id: &str) -> Option<RaftStatus> {
        match self.call(id, ConsensusRequest::Status).await {
            Ok(ConsensusResponse::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// Wait until every node in `among` names the same leader, which says it leads.
    async fn leader(&self, among: &[&str]) -> String {
        wait_for(&format!("one leader among {among:?}"), || async {
            let mut leader = None;
            for id in among {
                let s = self.status(id).await?;
                let l = s.leader?;
                if leader.get_or_insert(l.clone()) != &l {
                    return None;
                }
            }
            let l = leader?;
            let s = self.status(&l).await?;
            (s.state == "leader").then_some(l)
        })
        .await
    }

    async fn put(&self, id: &str, k: &str, v: &str) -> Result<u64, ClientError> {
        match self
            .call(
                id,
                ConsensusRequest::Put {
                    key: k.into(),
                    value: v.into(),
                    lease: None,
                },
            )
            .await?
        {
            ConsensusResponse::Put { revision, .. } => Ok(revision),
            other => panic!("unexpected answer to put: {other:?}"),
        }
    }

    /// A linearizable read of `k` through `id`: the key's version (0 when absent) and the
    /// revision of the state read.
    async fn version_at(&self, id: &str, k: &str) -> (u64, u64) {
        let get = ConsensusRequest::Get {
            key: k.into(),
            prefix: false,
            serializable: false,
            limit: 1,
        };
        match self.call(id, get).await.expect("get") {
            ConsensusResponse::Range { kvs, revision, .. } => {
                (kvs.first().map_or(0, |kv| kv.version), revision)
            }
            other => panic!("unexpected answer to get: {other:?}"),
        }
    }

    async fn get(
        &self,
        id: &str,
        k: &str,
        serializable: bool,
    ) -> Result<Option<String>, ClientError> {
        match self
            .call(
                id,
                ConsensusRequest::Get {
                    key: k.into(),
                    prefix: false,
                    serializable,
                    limit: 10,
                },
            )
            .await?
        {
            ConsensusResponse::Range { kvs, .. } => Ok(kvs.into_iter().next().map(|kv| kv.value)),
            other => panic!("unexpected answer to get: {other:?}"),
        }
    }

    async fn shutdown(self) {
        for (_, n) in self.nodes {
            n.shutdown().await;
        }
    }
}

fn voters3() -> serde_json::Value {
    serde_json::json!({ "voters": ["n1", "n2", "n3"] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elect_forward_read_txn_watch_lease_membership() {
    let mut c = Cluster::new(4, 4, voters3()).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    let follower = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    let st = c.status("n4").await.expect("status");
    assert_eq!(st.voters, ["n1", "n2", "n3"]);

    // Writes through a follower and through the non-voter n4; linearizable reads elsewhere.
    let r1 = c.put(follower, "a", "1").await.expect("put via follower");
    let r2 = c.put("n4", "b", "2").await.expect("put via non-voter");
    assert!(r2 > r1);
    for id in ["n1", "n2", "n3", "n4"] {
        assert_eq!(
            c.get(id, "a", false).await.expect("get").as_deref(),
            Some("1")
        );
        assert_eq!(
            c.get(id, "b", false).await.expect("get").as_deref(),
            Some("2")
        );
    }
    // Serializable reads converge on every member.
    for id in ["n1", "n2", "n3"] {
        let c = &c;
        wait_for("serializable read converges", || async move {
            (c.get(id, "b", true).await.ok()?.as_deref() == Some("2")).then_some(())
        })
        .await;
    }

    // Bad input is refused with a clear message and writes nothing.
    let big = "x".repeat(dsys_plugin_consensus::MAX_VALUE_BYTES + 1);
    match c.put("n4", "big", &big).await {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("exceeds"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    match c.put("n1", "", "v").await {
        Err(ClientError::Rpc(RpcError::Refused(_))) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
    match c
        .call("n2", ConsensusRequest::LeaseGrant { ttl_ms: 1 })
        .await
    {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("TTL"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    match c.call("n2", ConsensusRequest::Vote(openraft_vote())).await {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("cluster nodes"), "{m}"),
        other => panic!("a client must not speak Raft, got {other:?}"),
    }

    // Txn CAS: succeeds on the right mod revision, fails (reading the value) on a stale one.
    let cas = |rev: u64, v: &str| {
        ConsensusRequest::Txn(Txn {
            compares: vec![Compare {
                key: "a".into(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(rev),
            }],
            success: vec![TxnOp::Put {
                key: "a".into(),
                value: v.into(),
                lease: None,
            }],
            failure: vec![TxnOp::Get {
                key: "a".into(),
                prefix: false,
            }],
        })
    };
    let ConsensusResponse::Txn {
        succeeded: true,
        revision: r3,
        ..
    } = c.call("n3", cas(r1, "cas1")).await.expect("txn")
    else {
        panic!("CAS on the current revision must succeed")
    };
    let ConsensusResponse::Txn {
        succeeded: false,
        results,
        ..
    } = c.call("n4", cas(r1, "cas2")).await.expect("txn")
    else {
        panic!("CAS on a stale revision must fail")
    };
    assert!(format!("{results:?}").contains("cas1"));
    assert_eq!(
        c.get("n1", "a", false).await.expect("get").as_deref(),
        Some("cas1")
    );

    // Watch from revision r1 sees every event on `a` in order; a long poll wakes on a put.
    let ConsensusResponse::Events {
        events,
        next_revision,
    } = c
        .call(
            "n2",
            ConsensusRequest::Watch {
                key: "a".into(),
                prefix: false,
                from_revision: r1,
                wait_ms: 0,
                limit: 100,
            },
        )
        .await
        .expect("watch")
    else {
        panic!("not events")
    };
    assert_eq!(
        events
            .iter()
            .map(|e| (e.revision, e.kv.value.as_str()))
            .collect::<Vec<_>>(),
        [(r1, "1"), (r3, "cas1")]
    );
    let poll = {
        let req = ConsensusRequest::Watch {
            key: "w/".into(),
            prefix: true,
            from_revision: next_revision,
            wait_ms: 20_000,
            limit: 100,
        };
        let addr = c.nodes["n4"].rpc_addr();
        let client = &c.client;
        async move { client.call_at::<ConsensusApi>(addr, &req).await }
    };
    let writer = async {
        // Started together with the poll; the poll must return this event, not time out.
        c.put("n1", "w/x", "hello").await.expect("put")
    };
    let (polled, wrev) = tokio::join!(poll, writer);
    let ConsensusResponse::Events { events, .. } = polled.expect("long poll") else {
        panic!("not events")
    };
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].kind, events[0].revision), (EventKind::Put, wrev));

    // Leases: a kept-alive lease survives past its TTL; an abandoned one expires and its
    // keys are deleted on every node (the expiry is replicated).
    let grant = |ttl_ms| ConsensusRequest::LeaseGrant { ttl_ms };
    let ConsensusResponse::LeaseGranted { id: short, .. } =
        c.call("n4", grant(1500)).await.expect("grant")
    else {
        panic!("not granted")
    };
    let ConsensusResponse::LeaseGranted { id: kept, .. } =
        c.call("n2", grant(1500)).await.expect("grant")
    else {
        panic!("not granted")
    };
    for (k, l) in [("l/short", short), ("l/kept", kept)] {
        c.call(
            "n3",
            ConsensusRequest::Put {
                key: k.into(),
                value: "v".into(),
                lease: Some(l),
            },
        )
        .await
        .expect("put with lease");
    }
    match c
        .call(
            "n3",
            ConsensusRequest::Put {
                key: "l/none".into(),
                value: "v".into(),
                lease: Some(9999),
            },
        )
        .await
    {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("lease 9999"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let t0 = tokio::time::Instant::now();
    let gone = wait_for("the short lease's key is deleted", || async {
        // Keep `kept` alive meanwhile.
        c.call("n1", ConsensusRequest::LeaseKeepAlive { id: kept })
            .await
            .ok()?;
        c.get("n4", "l/short", false)
            .await
            .ok()?
            .is_none()
            .then(|| t0.elapsed())
    })
    .await;
    assert!(
        gone >= Duration::from_millis(1000),
        "expired too early: {gone:?}"
    );
    assert_eq!(
        c.get("n2", "l/kept", false).await.expect("get").as_deref(),
        Some("v")
    );
    match c
        .call("n1", ConsensusRequest::LeaseKeepAlive { id: short })
        .await
    {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("not found"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let ConsensusResponse::LeaseRevoked { deleted: 1, .. } = c
        .call("n4", ConsensusRequest::LeaseRevoke { id: kept })
        .await
        .expect("revoke")
    else {
        panic!("revoke deletes the kept key")
    };
    assert_eq!(c.get("n3", "l/kept", false).await.expect("get"), None);
    // The deletion by expiry is an event too.
    let ConsensusResponse::Events { events, .. } = c
        .call(
            "n1",
            ConsensusRequest::Watch {
                key: "l/".into(),
                prefix: true,
                from_revision: 1,
                wait_ms: 0,
                limit: 100,
            },
        )
        .await
        .expect("watch")
    else {
        panic!("not events")
    };
    let kinds: Vec<(EventKind, &str)> =
        events.iter().map(|e| (e.kind, e.kv.key.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::Put, "l/short"),
            (EventKind::Put, "l/kept"),
            (EventKind::Delete, "l/short"),
            (EventKind::Delete, "l/kept"),
        ]
    );

    // Membership: n4 becomes a voter, then is removed again.
    let ConsensusResponse::Membership { voters, .. } = c
        .call("n2", ConsensusRequest::AddVoter { node: "n4".into() })
        .await
        .expect("add voter")
    else {
        panic!("not membership")
    };
    assert_eq!(voters, ["n1", "n2", "n3", "n4"]);
    assert_eq!(
        c.get("n4", "b", true).await.expect("get").as_deref(),
        Some("2")
    );
    let ConsensusResponse::Membership { voters, .. } = c
        .call("n4", ConsensusRequest::RemoveVoter { node: "n4".into() })
        .await
        .expect("remove voter")
    else {
        panic!("not membership")
    };
    assert_eq!(voters, ["n1", "n2", "n3"]);
    match c
        .call("n1", ConsensusRequest::AddVoter { node: "n9".into() })
        .await
    {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains("n9"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    c.put("n4", "after", "membership").await.expect("put");
    c.kill("n4").await;
    c.shutdown().await;
}

fn openraft_vote() -> openraft::raft::VoteRequest<u64> {
    openraft::raft::VoteRequest::new(openraft::Vote::new(99, 1), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_loses_nothing_and_restart_recovers_from_the_wal() {
    let mut c = Cluster::new(3, 3, voters3()).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let via = ["n1", "n2", "n3"][i % 3];
        // A write whose answer was lost is not acknowledged; try again until it is.
        let c = &c;
        wait_for("put acknowledged", || async move {
            c.put(via, &format!("k{i}"), &format!("v{i}")).await.ok()
        })
        .await;
        acked.push(i);
    }
    c.kill(&leader).await;
    let rest: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let new_leader = c.leader(&rest).await;
    assert_ne!(new_leader, leader);
    // Every acknowledged write is there, read linearizably through both survivors.
    for i in &acked {
        let via = rest[i % 2];
        assert_eq!(
            c.get(via, &format!("k{i}"), false).await.expect("get"),
            Some(format!("v{i}")),
            "acknowledged write k{i} lost"
        );
    }
    // Writes go on with one voter down.
    for i in 30..40 {
        let (c, via) = (&c, rest[i % 2]);
        wait_for("put acknowledged", || async move {
            c.put(via, &format!("k{i}"), &format!("v{i}")).await.ok()
        })
        .await;
    }
    // The new leader found the old entries already on the surviving follower instead of
    // sending them again: only this term's (a blank entry and the ten writes) reached the
    // wire. Each write is an entry; the first probe of the leader's search for the matching
    // point carries the newer half of the 30 old ones, which made 27 or more.
    let sent = r#"dsys_raft_replicated_entries_total{how="sent"}"#;
    let by_ref = r#"dsys_raft_replicated_entries_total{how="by_reference"}"#;
    let (sent, by_ref) = (
        c.metric(&new_leader, sent).await,
        c.metric(&new_leader, by_ref).await,
    );
    assert!(
        by_ref > 0 && sent < 20,
        "new leader replicated {sent} entries by sending them and {by_ref} by reference"
    );
    // The killed node comes back: its log is replayed from its WAL, then it catches up.
    c.start(&leader).await;
    let st = c.status(&leader).await.expect("status");
    assert!(
        st.last_log_index.unwrap_or(0) >= 30,
        "restarted node recovered only {:?} log entries from its WAL",
        st.last_log_index
    );
    let c = c;
    wait_for("restarted node catches up", || async {
        (c.get(&leader, "k39", true).await.ok()?.as_deref() == Some("v39")).then_some(())
    })
    .await;
    for i in 0..40 {
        assert_eq!(
            c.get(&leader, &format!("k{i}"), true).await.expect("get"),
            Some(format!("v{i}"))
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_cannot_commit_majority_can() {
    let c = Cluster::new(3, 3, voters3()).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    c.put(&leader, "before", "1").await.expect("put");
    let majority: Vec<String> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != leader)
        .map(String::from)
        .collect();
    let cut = FaultCommand::Partition(vec![vec![leader.clone()], majority.clone()]);
    for n in c.nodes.values() {
        n.faults().apply(cut.clone()).expect("partition");
    }
    // The old leader, alone, cannot commit: its write is not acknowledged.
    match c.put(&leader, "minority", "x").await {
        Ok(rev) => panic!("the minority acknowledged a write at revision {rev}"),
        Err(e) => eprintln!("minority write refused as expected: {e}"),
    }
    // Nor can it serve a linearizable read.
    assert!(c.get(&leader, "before", false).await.is_err());
    // The majority elects a leader and commits.
    let m: Vec<&str> = majority.iter().map(String::as_str).collect();
    let new_leader = c.leader(&m).await;
    assert_ne!(new_leader, leader);
    c.put(m[0], "majority", "y").await.expect("majority put");
    assert_eq!(
        c.get(m[1], "majority", false)
            .await
            .expect("get")
            .as_deref(),
        Some("y")
    );
    // Heal: the old leader follows, sees the majority's write, and its own write never
    // appears (it was never committed).
    for n in c.nodes.values() {
        n.faults().apply(FaultCommand::Heal).expect("heal");
    }
    let l = c.leader(&["n1", "n2", "n3"]).await;
    assert_ne!(l, leader, "the isolated node's stale log cannot win");
    let c = &c;
    let old = leader.clone();
    wait_for("old leader catches up", || {
        let old = old.clone();
        async move { (c.get(&old, "majority", true).await.ok()?.as_deref() == Some("y")).then_some(()) }
    })
    .await;
    assert_eq!(c.get(&leader, "minority", false).await.expect("get"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_compact_the_log_and_a_new_voter_catches_up_from_one() {
    let cfg = serde_json::json!({
        "voters": ["n1", "n2", "n3"],
        "snapshot_every": 50,
        "keep_logs": 10,
    });
    let mut c = Cluster::new(4, 3, cfg).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    for i in 0..300 {
        c.put(&leader, &format!("s{i:03}"), &i.to_string())
            .await
            .expect("put");
    }
    let st = wait_for("a snapshot and a purge on the leader", || async {
        let s = c.status(&leader).await?;
        (s.snapshot.unwrap_or(0) >= 200 && s.purged.unwrap_or(0) >= 150).then_some(s)
    })
    .await;
    assert!(
        st.wal_checkpoint_lsn > 1,
        "the WAL was never checkpointed: {st:?}"
    );
    // A new node joins after the log it would need was purged: it gets a snapshot.
    c.start("n4").await;
    let ConsensusResponse::Membership { voters, .. } = c
        .call("n4", ConsensusRequest::AddVoter { node: "n4".into() })
        .await
        .expect("add voter")
    else {
        panic!("not membership")
    };
    assert_eq!(voters.len(), 4);
    let c = c;
    wait_for("n4 has every key", || async {
        let st = c.status("n4").await?;
        (st.keys == 300).then_some(())
    })
    .await;
    assert_eq!(
        c.get("n4", "s123", true).await.expect("get").as_deref(),
        Some("123")
    );
    // And a voter restarted after compaction recovers from snapshot + WAL.
    let mut c = c;
    let follower = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("follower");
    c.kill(follower).await;
    c.put(&leader, "late", "1").await.expect("put");
    c.start(follower).await;
    let c = c;
    wait_for("restarted follower catches up", || async {
        (c.get(follower, "late", true).await.ok()?.as_deref() == Some("1")).then_some(())
    })
    .await;
    let st = c.status(follower).await.expect("status");
    assert_eq!(st.keys, 301);
    c.shutdown().await;
}

/// Pre-vote: a voter cut off from the others (as a node that restarted while the leader was
/// fine, or sits behind a flaky link) keeps timing out, but cannot win a pre-vote, so it
/// never raises the term and, once back, does not make the working leader step down. Without
/// it, each timeout was a real election at a higher term and the leader lost its post on
/// contact with the higher term (term churn under chaos).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_voter_does_not_raise_the_term_or_depose_the_leader() {
    let c = Cluster::new(3, 3, voters3()).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    c.put(&leader, "before", "1").await.expect("put");
    let before = c.status(&leader).await.expect("status");
    let lonely = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower")
        .to_string();
    let others: Vec<String> = c.nodes.keys().filter(|n| **n != lonely).cloned().collect();
    let cut = FaultCommand::Partition(vec![vec![lonely.clone()], others]);
    for n in c.nodes.values() {
        n.faults().apply(cut.clone()).expect("partition");
    }
    // Let it time out and ask for pre-votes several times.
    let c = &c;
    let st = wait_for("the cut-off voter tries pre-votes three times", || {
        let lonely = lonely.clone();
        async move { c.status(&lonely).await.filter(|s| s.pre_votes >= 3) }
    })
    .await;
    assert_eq!(
        st.elections, 0,
        "a lost pre-vote must not start an election"
    );
    assert_eq!(st.term, before.term, "the cut-off voter raised its term");
    // The majority side is undisturbed meanwhile.
    c.put(&leader, "during", "2").await.expect("majority put");
    for n in c.nodes.values() {
        n.faults().apply(FaultCommand::Heal).expect("heal");
    }
    // Back in touch: it follows the same leader, at the same term.
    wait_for("the cut-off voter catches up", || {
        let lonely = lonely.clone();
        async move {
            (c.get(&lonely, "during", true).await.ok()?.as_deref() == Some("2")).then_some(())
        }
    })
    .await;
    let after = c.status(&leader).await.expect("status");
    assert_eq!(after.state, "leader", "the leader was deposed");
    assert_eq!(after.term, before.term, "the term moved");
    assert_eq!(
        c.status(&lonely).await.expect("status").leader.as_deref(),
        Some(leader.as_str())
    );
}

/// At-most-once writes: the same tagged write delivered twice (as when a node re-sends it to
/// a new leader after the old one had already appended it) is applied once; both deliveries
/// get the first application's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_delivered_twice_is_applied_once() {
    use dsys_plugin_consensus::state::RequestId;
    let c = Cluster::new(3, 3, voters3()).await;
    let leader = c.leader(&["n1", "n2", "n3"]).await;
    let follower = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| *n != leader)
        .expect("a follower");
    let rev0 = c.put(&leader, "other", "x").await.expect("put");
    let id = RequestId {
        client: 0xfeed,
        seq: 1,
        floor: 1,
    };
    let tagged = |hops| ConsensusRequest::Forwarded {
        hops,
        id: Some(id),
        req: Box::new(ConsensusRequest::Put {
            key: "once".into(),
            value: "v".into(),
            lease: None,
        }),
    };
    // First copy through a follower (forwarded to the leader), the second straight to the
    // leader, as a re-send after a leader change would arrive.
    let rpc = c.nodes[follower].rpc();
    let a = rpc
        .call::<ConsensusApi>(follower, &tagged(0))
        .await
        .expect("first delivery");
    let b = rpc
        .call::<ConsensusApi>(&leader, &tagged(1))
        .await
        .expect("second delivery");
    let (ConsensusResponse::Put { revision: ra, .. }, ConsensusResponse::Put { revision: rb, .. }) =
        (&a, &b)
    else {
        panic!("unexpected answers {a:?} / {b:?}");
    };
    assert_eq!(ra, rb, "the repeat must answer the first application");
    assert_eq!(*ra, rev0 + 1);
    // A linearizable read: the revision of the state read counts every applied change.
    let (version, revision) = c.version_at(follower, "once").await;
    assert_eq!(version, 1, "applied more than once");
    assert_eq!(revision, rev0 + 1, "the write was applied twice");
    // Clients cannot send tagged (forwarded) requests themselves.
    assert!(c.call(&leader, tagged(0)).await.is_err());
    // But a client may tag its own write, as the CLI does: its retry on another endpoint
    // (after a timeout) answers the first result and changes nothing.
    let mine = ConsensusRequest::Tagged {
        id: RequestId {
            client: 0xbeef,
            seq: 1,
            floor: 1,
        },
        req: Box::new(ConsensusRequest::Put {
            key: "mine".into(),
            value: "v".into(),
            lease: None,
        }),
    };
    let a = c.call(follower, mine.clone()).await.expect("first send");
    let b = c.call(&leader, mine).await.expect("retry elsewhere");
    let (ConsensusResponse::Put { revision: ra, .. }, ConsensusResponse::Put { revision: rb, .. }) =
        (&a, &b)
    else {
        panic!("unexpected answers {a:?} / {b:?}");
    };
    assert_eq!(ra, rb, "the retry must answer the first application");
    let (version, revision) = c.version_at(&leader, "mine").await;
    assert_eq!(version, 1, "a client's retry was applied twice");
    assert_eq!(revision, *ra);
    // Only writes carry an id.
    let tagged_read = ConsensusRequest::Tagged {
        id: RequestId {
            client: 0xbeef,
            seq: 2,
            floor: 1,
        },
        req: Box::new(ConsensusRequest::Status),
    };
    assert!(c.call(&leader, tagged_read).await.is_err());
}
