//! The `lock` plugin on real in-process nodes (QUIC + mTLS + gossip on loopback) running
//! `consensus` and `lock`: mutual exclusion with strictly increasing fencing tokens under many
//! concurrent acquirers on different nodes, FIFO waiters, a killed holder's lock passing on
//! after its TTL, a minority partition that cannot grant, reentrancy, refusals, `run_locked`.
//!
//! Every wait is on a condition with a deadline; nothing sleeps and hopes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_consensus::ConsensusPlugin;
use dsys_plugin_lock::recipe::transient;
use dsys_plugin_lock::{LockApi, LockPlugin, LockRequest, LockResponse, LockStatus, RunArgs};
use dsys_runtime::testkit::{wait_for, TestNodes};
use dsys_runtime::{plugin_factory, ClientError, RpcError};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(60);
/// Per-request deadline of the tests' clients: longer than the longest wait for a lock.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Lease TTL of the tests' grants.
const TTL_MS: u64 = 10_000;
/// Lease TTL where expiry is what the test checks.
const SHORT_TTL_MS: u64 = 3_000;

/// Nodes running `consensus` and `lock`, the first three Raft voters.
///
/// One cluster at a time in this test binary (each is 3-4 nodes with Raft and fsyncs; more
/// at once on a small shared machine only measures the machine): it is
/// [`TestNodesBuilder::exclusive`](dsys_runtime::testkit::TestNodesBuilder::exclusive).
/// Leases in these tests are 10 s ([`TTL_MS`]) except where the TTL itself is under test, so
/// a loaded machine that stalls keep-alives for a few seconds does not expire them.
struct Cluster {
    nodes: TestNodes,
}

impl Cluster {
    /// `n` nodes, the first three Raft voters.
    async fn new(n: usize) -> Cluster {
        let nodes = TestNodes::builder(n, || {
            vec![
                plugin_factory::<ConsensusPlugin>(),
                plugin_factory::<LockPlugin>(),
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
        // Ready once a lock can be taken and given back through every node.
        for id in c.nodes.ids() {
            wait_for(&format!("a lock through {id}"), DEADLINE, || async {
                let r = c.acquire(&id, "warmup", 0, None, false).await.ok()?;
                let t = token(&r)?;
                c.release(&id, "warmup", t).await.ok()
            })
            .await;
        }
        c
    }

    /// `req` through node `id`, on that node's own client (so concurrent calls to different
    /// nodes do not share, and keep replacing, one connection).
    async fn call(&self, id: &str, req: LockRequest) -> Result<LockResponse, ClientError> {
        let client = self
            .nodes
            .node_client("cli", id, CALL_TIMEOUT)
            .expect("client");
        client
            .call_at::<LockApi>(self.nodes.node(id).rpc_addr(), &req)
            .await
    }

    async fn acquire(
        &self,
        id: &str,
        name: &str,
        wait_ms: u64,
        holder: Option<&str>,
        keepalive: bool,
    ) -> Result<LockResponse, ClientError> {
        self.acquire_ttl(id, name, TTL_MS, wait_ms, holder, keepalive)
            .await
    }

    async fn acquire_ttl(
        &self,
        id: &str,
        name: &str,
        ttl_ms: u64,
        wait_ms: u64,
        holder: Option<&str>,
        keepalive: bool,
    ) -> Result<LockResponse, ClientError> {
        self.call(
            id,
            LockRequest::Acquire {
                name: name.into(),
                ttl_ms,
                wait_ms,
                holder: holder.map(String::from),
                keepalive,
            },
        )
        .await
    }

    async fn release(&self, id: &str, name: &str, token: u64) -> Result<u32, ClientError> {
        match self
            .call(
                id,
                LockRequest::Release {
                    name: name.into(),
                    token,
                },
            )
            .await?
        {
            LockResponse::Released { remaining, .. } => Ok(remaining),
            other => panic!("unexpected answer to release: {other:?}"),
        }
    }

    /// Status, retrying errors after which a read may succeed (a leader change).
    async fn status(&self, id: &str, name: &str) -> Result<LockStatus, ClientError> {
        let t0 = Instant::now();
        loop {
            match self
                .call(id, LockRequest::Status { name: name.into() })
                .await
            {
                Ok(LockResponse::Status(s)) => return Ok(s),
                Ok(other) => panic!("unexpected answer to status: {other:?}"),
                Err(ClientError::Rpc(e)) if transient(&e) && t0.elapsed() < DEADLINE => {
                    eprintln!("status through {id}: {e}; again")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Acquire (waiting), retrying errors after which the same request may succeed (a
    /// leader change on a loaded machine): what a real client does.
    async fn acquire_retrying(&self, id: &str, name: &str) -> u64 {
        let t0 = Instant::now();
        loop {
            match self.acquire(id, name, 50_000, None, true).await {
                Ok(LockResponse::Granted { token, .. }) => return token,
                Err(ClientError::Rpc(e)) if transient(&e) && t0.elapsed() < DEADLINE => {
                    eprintln!("acquire through {id}: {e}; again")
                }
                other => panic!("acquire through {id}: {other:?}"),
            }
        }
    }

    /// Release, retrying transient errors; a grant that is gone after a failed attempt was
    /// released by that attempt.
    async fn release_retrying(&self, id: &str, name: &str, token: u64) {
        let t0 = Instant::now();
        let mut failed = false;
        loop {
            match self.release(id, name, token).await {
                Ok(0) => return,
                Ok(n) => panic!("release of an anonymous grant left {n} holds"),
                Err(ClientError::Rpc(RpcError::Refused(m))) if failed && m.contains("no grant") => {
                    return
                }
                Err(ClientError::Rpc(e)) if transient(&e) && t0.elapsed() < DEADLINE => {
                    eprintln!("release through {id}: {e}; again");
                    failed = true;
                }
                Err(e) => panic!("release through {id}: {e}"),
            }
        }
    }

    /// Wait until lock `name` has `n` waiters (as read through `id`).
    async fn wait_waiters(&self, id: &str, name: &str, n: usize) -> LockStatus {
        wait_for(&format!("{n} waiters on {name}"), DEADLINE, || async {
            let s = self.status(id, name).await.ok()?;
            (s.waiters.len() == n).then_some(s)
        })
        .await
    }
}

fn token(r: &LockResponse) -> Option<u64> {
    match r {
        LockResponse::Granted { token, .. } => Some(*token),
        _ => None,
    }
}

fn granted(r: Result<LockResponse, ClientError>) -> (u64, u32) {
    match r {
        Ok(LockResponse::Granted { token, count, .. }) => (token, count),
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// A resource guarded by fencing tokens: it accepts a write only with a token higher than
/// every token it saw, and checks that no two writers are inside at once.
#[derive(Default)]
struct Fenced {
    inside: AtomicBool,
    tokens: Mutex<Vec<u64>>,
}

impl Fenced {
    fn enter(&self, token: u64) {
        assert!(
            !self.inside.swap(true, Ordering::SeqCst),
            "two holders inside at once (token {token})"
        );
        let mut t = self.tokens.lock().expect("lock");
        if let Some(last) = t.last() {
            assert!(token > *last, "token {token} after {last}: not increasing");
        }
        t.push(token);
    }

    fn leave(&self) {
        assert!(self.inside.swap(false, Ordering::SeqCst));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_with_increasing_tokens_across_nodes() {
    let c = Arc::new(Cluster::new(4).await);
    let res = Arc::new(Fenced::default());
    let ids = c.nodes.ids();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (c, res, id) = (c.clone(), res.clone(), ids[w % ids.len()].clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..3 {
                let t = c.acquire_retrying(&id, "m").await;
                res.enter(t);
                // Hold it a little, so others pile up behind.
                tokio::time::sleep(Duration::from_millis(20)).await;
                res.leave();
                c.release_retrying(&id, "m", t).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("acquirer");
    }
    let tokens = res.tokens.lock().expect("lock").clone();
    assert_eq!(tokens.len(), 24);
    let s = c.status("n1", "m").await.expect("status");
    assert!(s.holder.is_none() && s.waiters.is_empty(), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waiters_are_served_in_fifo_order() {
    let c = Arc::new(Cluster::new(3).await);
    let (t1, _) = granted(c.acquire("n1", "q", 0, None, true).await);
    let mut waiting = Vec::new();
    for (i, id) in ["n2", "n3", "n1"].into_iter().enumerate() {
        let c2 = c.clone();
        waiting.push(tokio::spawn(async move {
            granted(c2.acquire(id, "q", 50_000, None, true).await)
        }));
        // Queue them one after another so their order is known.
        c.wait_waiters("n1", "q", i + 1).await;
    }
    let s = c.status("n2", "q").await.expect("status");
    assert_eq!(s.holder.as_ref().map(|h| h.token), Some(t1));
    let order: Vec<u64> = s.waiters.iter().map(|w| w.token).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    // The dashboard panel of a node shows the lock, its holder's token and the waiters.
    let host = c.nodes.node("n3").host();
    wait_for("n3's lock panel shows q", DEADLINE, || async {
        let p = host.panels().into_iter().find(|p| p.plugin == "lock")?;
        let row = p.tables.first()?.rows.iter().find(|r| r[0] == "q")?.clone();
        (row[3] == t1.to_string() && row[4] == "3").then_some(())
    })
    .await;
    // Release the holder; each waiter in turn becomes the holder, in queue order.
    let mut prev = t1;
    c.release("n1", "q", t1).await.expect("release");
    for (i, task) in waiting.into_iter().enumerate() {
        let (t, _) = task.await.expect("waiter");
        assert_eq!(t, order[i], "waiter {i} got the lock out of order");
        assert!(t > prev);
        let s = c.status("n3", "q").await.expect("status");
        assert_eq!(s.holder.as_ref().map(|h| h.token), Some(t));
        assert_eq!(s.waiters.len(), order.len() - i - 1);
        prev = t;
        c.release("n2", "q", t).await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_holders_lock_passes_on_after_its_ttl() {
    let mut c = Cluster::new(4).await;
    // n4 is not a Raft voter: killing it leaves consensus untouched.
    let (t1, _) = granted(c.acquire_ttl("n4", "k", SHORT_TTL_MS, 0, None, true).await);
    let addr = c.nodes.node("n1").rpc_addr();
    let client = c.nodes.client_at("n1", CALL_TIMEOUT).expect("client");
    let waiter = tokio::spawn(async move {
        let r = client
            .call_at::<LockApi>(
                addr,
                &LockRequest::Acquire {
                    name: "k".into(),
                    ttl_ms: TTL_MS,
                    wait_ms: 50_000,
                    holder: None,
                    keepalive: true,
                },
            )
            .await;
        (granted(r), Instant::now())
    });
    c.wait_waiters("n1", "k", 1).await;
    // Longer than a TTL with n4 alive: its keep-alives hold the lock.
    let held_until = Instant::now() + Duration::from_millis(SHORT_TTL_MS * 3 / 2);
    while Instant::now() < held_until {
        assert!(!waiter.is_finished(), "granted while the holder was alive");
        // A read that fails tells nothing; one that answers must name the holder.
        if let Ok(s) = c.status("n2", "k").await {
            assert_eq!(s.holder.map(|h| h.token), Some(t1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed = Instant::now();
    c.nodes.kill("n4").await;
    let ((t2, _), at) = tokio::time::timeout(DEADLINE, waiter)
        .await
        .expect("waiter granted within the deadline")
        .expect("waiter");
    assert!(t2 > t1);
    // Not before the lease could have expired (a TTL from the last keep-alive, which was
    // about a third of it before the kill at most).
    assert!(
        at - killed >= Duration::from_millis(SHORT_TTL_MS * 2 / 3 - 100),
        "granted {:?} after the kill",
        at - killed
    );
    let s = c.status("n1", "k").await.expect("status");
    assert_eq!(s.holder.map(|h| h.token), Some(t2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_minority_side_of_a_partition_cannot_acquire() {
    let c = Cluster::new(3).await;
    // Cut n1 off from n2 and n3, whoever leads.
    c.nodes.partition(&[&["n1"], &["n2", "n3"]]);
    let r = c.acquire("n1", "p", 0, None, true).await;
    assert!(
        !matches!(r, Ok(LockResponse::Granted { .. })),
        "the minority granted: {r:?}"
    );
    eprintln!("minority acquire refused as expected: {r:?}");
    // The majority elects a leader if it must, and grants.
    let (t, _) = wait_for("the majority grants", DEADLINE, || async {
        let r = c.acquire("n2", "p", 0, None, true).await.ok()?;
        token(&r).map(|t| (t, ()))
    })
    .await;
    let s = c.status("n3", "p").await.expect("status");
    assert_eq!(s.holder.as_ref().map(|h| h.token), Some(t));
    assert!(s.waiters.is_empty(), "{s:?}");
    c.nodes.heal();
    // After healing, the minority's attempt never shows up as a holder or a waiter.
    let s = wait_for("n1 reads the lock again", DEADLINE, || async {
        c.status("n1", "p").await.ok()
    })
    .await;
    assert_eq!(s.holder.map(|h| h.token), Some(t));
    assert!(s.waiters.is_empty(), "{:?}", s.waiters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reentrancy_per_holder_id_and_refusals() {
    let c = Cluster::new(3).await;
    let (t, n) = granted(c.acquire("n1", "r", 0, Some("alice"), true).await);
    assert_eq!(n, 1);
    // Same holder, through another node: the same grant, one level deeper.
    let (t2, n2) = granted(c.acquire("n2", "r", 0, Some("alice"), true).await);
    assert_eq!((t2, n2), (t, 2));
    // Another holder cannot get it.
    match c.acquire("n3", "r", 0, Some("bob"), true).await {
        Ok(LockResponse::NotAcquired { holder, .. }) => {
            assert_eq!(holder.and_then(|h| h.holder).as_deref(), Some("alice"))
        }
        other => panic!("bob got {other:?}"),
    }
    // Anonymous acquirers are never reentrant.
    assert!(matches!(
        c.acquire("n1", "r", 0, None, true).await,
        Ok(LockResponse::NotAcquired { .. })
    ));
    assert_eq!(c.release("n3", "r", t).await.expect("release"), 1);
    assert!(matches!(
        c.acquire("n3", "r", 0, Some("bob"), true).await,
        Ok(LockResponse::NotAcquired { .. })
    ));
    assert_eq!(c.release("n1", "r", t).await.expect("release"), 0);
    let (tb, _) = granted(c.acquire("n3", "r", 0, Some("bob"), true).await);
    assert!(tb > t);
    // A holder that waits cannot queue a second time.
    let c = Arc::new(c);
    let c2 = c.clone();
    let alice =
        tokio::spawn(async move { c2.acquire("n1", "r", 50_000, Some("alice"), true).await });
    c.wait_waiters("n2", "r", 1).await;
    match c.acquire("n2", "r", 0, Some("alice"), true).await {
        Err(ClientError::Rpc(RpcError::Refused(m))) => {
            assert!(m.contains("already waiting"), "{m}")
        }
        other => panic!("a waiting holder queued twice: {other:?}"),
    }
    c.release("n2", "r", tb).await.expect("release");
    let (ta, _) = granted(alice.await.expect("alice"));
    assert!(ta > tb);

    // Bad input is refused at the edge with a message.
    let refused = |r: Result<LockResponse, ClientError>, what: &str| match r {
        Err(ClientError::Rpc(RpcError::Refused(m))) => assert!(m.contains(what), "{m}"),
        other => panic!("expected a refusal about {what}, got {other:?}"),
    };
    refused(c.acquire("n1", "a/b", 0, None, true).await, "lock name");
    refused(c.acquire("n1", "", 0, None, true).await, "lock name");
    refused(
        c.acquire("n1", "x", 0, Some("a b"), true).await,
        "holder id",
    );
    let acq = |ttl_ms, wait_ms| LockRequest::Acquire {
        name: "x".into(),
        ttl_ms,
        wait_ms,
        holder: None,
        keepalive: true,
    };
    refused(c.call("n1", acq(10, 0)).await, "TTL");
    refused(c.call("n1", acq(5000, 10_000_000)).await, "wait");
    let release = |token| LockRequest::Release {
        name: "x".into(),
        token,
    };
    refused(c.call("n1", release(0)).await, "token");
    refused(c.call("n1", release(999_999)).await, "no grant");
    refused(
        c.call(
            "n1",
            LockRequest::KeepAlive {
                name: "x".into(),
                token: 999_999,
            },
        )
        .await,
        "no grant",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_locked_holds_the_lock_while_the_command_runs() {
    let c = Cluster::new(3).await;
    let flag = c.nodes.dir().join("release-me");
    // The command waits (boundedly) for a file the test writes, and reports its token.
    let script = format!(
        "i=0; while [ ! -e {f} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         echo $DSYS_LOCK_TOKEN > {f}.token; exit 7",
        f = flag.display()
    );
    let args = RunArgs {
        name: "job".into(),
        ttl: Duration::from_millis(SHORT_TTL_MS),
        wait: Duration::from_secs(10),
        holder: None,
        cmd: vec!["sh".into(), "-c".into(), script],
    };
    let client = c
        .nodes
        .client_with("cli", c.nodes.endpoints(), Duration::from_secs(30))
        .expect("client");
    let run = tokio::spawn(async move { dsys_plugin_lock::run_locked(&client, &args).await });
    let held = wait_for("the command holds the lock", DEADLINE, || async {
        c.status("n2", "job").await.ok()?.holder
    })
    .await;
    // Well past the TTL, the client's keep-alives still hold it.
    let until = Instant::now() + Duration::from_millis(SHORT_TTL_MS * 2);
    while Instant::now() < until {
        if let Ok(s) = c.status("n3", "job").await {
            assert_eq!(
                s.holder.map(|h| h.token),
                Some(held.token),
                "lock lost while the command ran (run finished: {})",
                run.is_finished()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    std::fs::write(&flag, b"").expect("flag");
    let code = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("run ends")
        .expect("task")
        .expect("run_locked");
    assert_eq!(code, 7, "the command's exit code is passed on");
    let seen = std::fs::read_to_string(c.nodes.dir().join("release-me.token")).expect("token file");
    assert_eq!(seen.trim(), held.token.to_string());
    // Released at the end: free at once, not after a TTL.
    let s = c.status("n1", "job").await.expect("status");
    assert!(s.holder.is_none(), "{s:?}");
}
