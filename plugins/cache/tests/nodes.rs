//! The `cache` plugin on three real in-process nodes (QUIC + mTLS + gossip on loopback),
//! driven by a real Redis client (the `redis` crate) over each node's RESP port: writes on
//! one node read on another, pipelining, TTLs, multi-key commands across owners, the CLI
//! requests, garbage on a raw socket, and a killed primary whose replica keeps serving.

use std::time::Duration;

use dsys_plugin_cache::{CacheApi, CachePlugin, CacheRequest, CacheResponse};
use dsys_runtime::plugin_factory;
use dsys_runtime::testkit::TestNodes;
use redis::aio::MultiplexedConnection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Per-request deadline of the test's CLI clients.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Node `id`'s RESP port, from its cache stats.
async fn resp_port(c: &TestNodes, id: &str) -> u16 {
    let client = c.client_at(id, CALL_TIMEOUT).expect("client");
    match client
        .call::<CacheApi>(&CacheRequest::Stats)
        .await
        .expect("stats")
    {
        CacheResponse::Stats(s) => {
            assert_eq!(s.node, id);
            assert_ne!(s.resp_port, 0);
            s.resp_port
        }
        other => panic!("not stats: {other:?}"),
    }
}

/// How many keys node `id` holds (primary and replica copies).
async fn held(c: &TestNodes, id: &str) -> u64 {
    let client = c.client_at(id, CALL_TIMEOUT).expect("client");
    match client.call::<CacheApi>(&CacheRequest::Stats).await {
        Ok(CacheResponse::Stats(s)) => s.keys,
        other => panic!("stats: {other:?}"),
    }
}

async fn conn(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn cmd<T: redis::FromRedisValue>(c: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(c).await.expect("command")
}

async fn cmd_err(c: &mut MultiplexedConnection, args: &[&str]) -> String {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    match cmd.query_async::<redis::Value>(c).await {
        Err(e) => e.to_string(),
        Ok(v) => panic!("expected an error for {args:?}, got {v:?}"),
    }
}

/// DBSIZE, retried while it answers TRYAGAIN (a node did not answer: on a loaded machine
/// gossip can suspect a node for a moment and its connection is dropped), up to 30 s.
async fn dbsize(c: &mut MultiplexedConnection) -> i64 {
    let t0 = tokio::time::Instant::now();
    loop {
        match redis::cmd("DBSIZE").query_async::<i64>(c).await {
            Ok(n) => return n,
            Err(e)
                if e.kind() == redis::ErrorKind::TryAgain
                    && t0.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("DBSIZE: {e}"),
        }
    }
}

/// Send raw bytes, read until the server closes (or 2 s pass), return what came back.
async fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    raw_for(port, bytes, Duration::from_secs(2)).await
}

async fn raw_for(port: u16, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_against_three_nodes() {
    tokio::time::timeout(Duration::from_secs(180), scenario())
        .await
        .expect("test took too long");
}

async fn scenario() {
    // 30 s for each node to see the two others alive, and to have them in its ring.
    let mut cluster = TestNodes::builder(3, || vec![plugin_factory::<CachePlugin>()])
        .converge_deadline(Duration::from_secs(90))
        .start()
        .await
        .expect("cluster");
    let (p1, p2, p3) = (
        resp_port(&cluster, "n1").await,
        resp_port(&cluster, "n2").await,
        resp_port(&cluster, "n3").await,
    );
    let (mut c1, mut c2, mut c3) = (conn(p1).await, conn(p2).await, conn(p3).await);

    // Basics, and writes on one node read on every other.
    assert_eq!(cmd::<String>(&mut c1, &["PING"]).await, "PONG");
    for i in 0..60 {
        let k = format!("key:{i}");
        let _: () = cmd(&mut c1, &["SET", &k, &format!("v{i}")]).await;
    }
    for i in 0..60 {
        let k = format!("key:{i}");
        let v: Option<String> = cmd(&mut c2, &["GET", &k]).await;
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()), "{k} on n2");
        let v: Option<String> = cmd(&mut c3, &["GET", &k]).await;
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()), "{k} on n3");
    }
    assert_eq!(cmd::<Option<String>>(&mut c2, &["GET", "nope"]).await, None);

    // DBSIZE counts the cluster (each key once, at its primary), whichever node answers.
    for c in [&mut c1, &mut c2, &mut c3] {
        assert_eq!(dbsize(c).await, 60);
    }

    // Many connections at once: their commands for one owner share forwarded batches, and
    // each connection still gets its own replies, in order.
    let ring = cluster.node("n1").membership().ring();
    let mut tasks = Vec::new();
    for t in 0..16 {
        tasks.push(tokio::spawn(async move {
            let mut c = conn(p1).await;
            for i in 0..40 {
                let k = format!("conc:{t}:{i}");
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(&k).arg(i).ignore();
                pipe.cmd("INCRBY").arg(&k).arg(t);
                pipe.cmd("GET").arg(&k);
                let (n, v): (i64, String) = pipe.query_async(&mut c).await.expect("pipeline");
                assert_eq!(n, i + t);
                assert_eq!(v, (i + t).to_string());
            }
        }));
    }
    for t in tasks {
        t.await.expect("connection task");
    }

    // One pipeline over keys of all three owners, interleaved: replies come back in order.
    let owners: std::collections::BTreeSet<String> = (0..150)
        .filter_map(|i| ring.preference_list(format!("o:{i}").as_bytes(), 1).pop())
        .collect();
    assert_eq!(owners.len(), 3, "the keys span every owner");
    let mut pipe = redis::pipe();
    for i in 0..150 {
        pipe.cmd("SET").arg(format!("o:{i}")).arg(i * 10).ignore();
        pipe.cmd("INCR").arg(format!("o:{i}"));
        pipe.cmd("APPEND").arg(format!("o:{i}")).arg("x");
        pipe.cmd("GET").arg(format!("o:{i}"));
    }
    let out: Vec<redis::Value> = pipe.query_async(&mut c2).await.expect("pipeline");
    assert_eq!(out.len(), 450);
    for i in 0..150 {
        let v = i as i64 * 10 + 1;
        assert_eq!(out[3 * i], redis::Value::Int(v), "INCR o:{i}");
        assert_eq!(
            out[3 * i + 1],
            redis::Value::Int(v.to_string().len() as i64 + 1),
            "APPEND o:{i}"
        );
        assert_eq!(
            out[3 * i + 2],
            redis::Value::BulkString(format!("{v}x").into_bytes()),
            "GET o:{i}"
        );
    }

    // Pipelining: 300 commands in one write, answered in order.
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.cmd("SET").arg(format!("p:{i}")).arg(i).ignore();
        pipe.cmd("INCR").arg(format!("p:{i}"));
    }
    for i in 0..100 {
        pipe.cmd("GET").arg(format!("p:{i}"));
    }
    let out: Vec<redis::Value> = pipe.query_async(&mut c3).await.expect("pipeline");
    assert_eq!(out.len(), 200);
    for i in 0..100 {
        assert_eq!(out[i], redis::Value::Int(i as i64 + 1));
        let want = (i + 1).to_string();
        assert_eq!(out[100 + i], redis::Value::BulkString(want.into_bytes()));
    }

    // TTL: lazy and active expiry, through a non-owner too.
    let _: () = cmd(&mut c1, &["SET", "ttl:a", "x", "PX", "300"]).await;
    let _: () = cmd(&mut c1, &["SET", "ttl:b", "x", "EX", "100"]).await;
    let pttl: i64 = cmd(&mut c2, &["PTTL", "ttl:a"]).await;
    assert!(pttl > 0 && pttl <= 300, "{pttl}");
    assert_eq!(cmd::<i64>(&mut c3, &["TTL", "ttl:b"]).await, 100);
    assert_eq!(cmd::<i64>(&mut c3, &["PERSIST", "ttl:b"]).await, 1);
    assert_eq!(cmd::<i64>(&mut c2, &["TTL", "ttl:b"]).await, -1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        cmd::<Option<String>>(&mut c2, &["GET", "ttl:a"]).await,
        None
    );
    assert_eq!(cmd::<i64>(&mut c3, &["TTL", "ttl:a"]).await, -2);

    // Multi-key commands across owners.
    let mut mset = vec!["MSET".to_string()];
    for i in 0..30 {
        mset.push(format!("m:{i}"));
        mset.push(format!("mv{i}"));
    }
    let refs: Vec<&str> = mset.iter().map(String::as_str).collect();
    let _: () = cmd(&mut c2, &refs).await;
    let mut mget = vec!["MGET".to_string()];
    for i in 0..30 {
        mget.push(format!("m:{i}"));
    }
    mget.push("m:missing".into());
    let refs: Vec<&str> = mget.iter().map(String::as_str).collect();
    let got: Vec<Option<String>> = cmd(&mut c1, &refs).await;
    assert_eq!(got.len(), 31);
    for (i, v) in got.iter().take(30).enumerate() {
        assert_eq!(v.as_deref(), Some(format!("mv{i}").as_str()));
    }
    assert_eq!(got[30], None);
    assert_eq!(
        cmd::<i64>(&mut c3, &["EXISTS", "m:0", "m:1", "m:2", "zz"]).await,
        3
    );
    assert_eq!(cmd::<i64>(&mut c3, &["DEL", "m:0", "m:1", "zz"]).await, 2);
    assert_eq!(
        cmd::<i64>(&mut c1, &["EXISTS", "m:0", "m:1", "m:2"]).await,
        1
    );

    // Errors come back Redis-style and the connection stays usable.
    let _: () = cmd(&mut c1, &["SET", "s", "abc"]).await;
    let e = cmd_err(&mut c2, &["INCR", "s"]).await;
    assert!(e.contains("not an integer"), "{e}");
    let e = cmd_err(&mut c2, &["NOSUCH", "a"]).await;
    assert!(e.contains("unknown command"), "{e}");
    let e = cmd_err(&mut c2, &["GET"]).await;
    assert!(e.contains("wrong number of arguments"), "{e}");
    assert_eq!(cmd::<i64>(&mut c2, &["APPEND", "s", "de"]).await, 5);
    let info: String = cmd(&mut c1, &["INFO"]).await;
    assert!(info.contains("keyspace_hits:"), "{info}");
    let cfg_get: Vec<String> = cmd(&mut c1, &["CONFIG", "GET", "save"]).await;
    assert_eq!(cfg_get, vec!["save".to_string(), String::new()]);

    // Garbage on a raw socket: an error reply and a closed connection, never a crash.
    let r = raw(p1, b"*abc\r\n").await;
    assert!(
        r.starts_with(b"-ERR Protocol error"),
        "{:?}",
        String::from_utf8_lossy(&r)
    );
    let r = raw(p1, b"*1\r\n$99999999999\r\n").await;
    assert!(
        r.starts_with(b"-ERR Protocol error"),
        "{:?}",
        String::from_utf8_lossy(&r)
    );
    let r = raw(p2, &[0xff; 70_000]).await;
    assert!(
        r.starts_with(b"-ERR Protocol error"),
        "{:?}",
        String::from_utf8_lossy(&r)
    );
    let r = raw(p2, b"PING\r\nECHO hi\r\nQUIT\r\nPING\r\n").await;
    assert_eq!(r, b"+PONG\r\n$2\r\nhi\r\n+OK\r\n");
    let mut seed = 7u64;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed & 0xff) as u8
            })
            .collect();
        let _ = raw_for(p3, &junk, Duration::from_millis(20)).await;
    }
    assert_eq!(cmd::<String>(&mut c3, &["PING"]).await, "PONG");

    // The CLI requests.
    let client = cluster.client_at("n2", CALL_TIMEOUT).expect("client");
    let r = client
        .call::<CacheApi>(&CacheRequest::Set {
            key: "cli:1".into(),
            value: b"one".to_vec(),
            ttl_ms: None,
        })
        .await
        .expect("set");
    assert_eq!(r, CacheResponse::Done(1));
    assert_eq!(
        cmd::<Option<String>>(&mut c1, &["GET", "cli:1"])
            .await
            .as_deref(),
        Some("one")
    );
    let r = client
        .call::<CacheApi>(&CacheRequest::Get {
            key: "key:1".into(),
        })
        .await
        .expect("get");
    assert_eq!(
        r,
        CacheResponse::Value {
            key: "key:1".into(),
            value: Some(b"v1".to_vec())
        }
    );
    let r = client
        .call::<CacheApi>(&CacheRequest::Invalidate {
            prefix: "key:".into(),
        })
        .await
        .expect("invalidate");
    match r {
        // 60 keys, each on its primary and its replica.
        CacheResponse::Invalidated { keys, nodes } => {
            assert_eq!(nodes.len(), 3);
            assert_eq!(keys, 120, "primary + replica copies");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        cmd::<Option<String>>(&mut c3, &["GET", "key:7"]).await,
        None
    );

    // Kill the primary of some keys: their replicas serve them.
    let ring = cluster.node("n1").membership().ring();
    let keys: Vec<String> = (0..200)
        .map(|i| format!("ha:{i}"))
        .filter(|k| {
            ring.preference_list(k.as_bytes(), 2)
                .first()
                .map(String::as_str)
                == Some("n3")
        })
        .take(10)
        .collect();
    assert!(!keys.is_empty());
    // Their copies are on n1 and n2 (one each): wait until both hold them all.
    let before = held(&cluster, "n1").await + held(&cluster, "n2").await;
    for k in &keys {
        let _: () = cmd(&mut c1, &["SET", k, &format!("val-{k}")]).await;
    }
    let t0 = tokio::time::Instant::now();
    while held(&cluster, "n1").await + held(&cluster, "n2").await < before + keys.len() as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "replica copies never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keys of the survivors, to mix into batches with the dead owner's.
    let others: Vec<String> = (0..200)
        .map(|i| format!("alive:{i}"))
        .filter(|k| {
            ring.preference_list(k.as_bytes(), 1)
                .first()
                .map(String::as_str)
                != Some("n3")
        })
        .take(10)
        .collect();
    for k in &others {
        let _: () = cmd(&mut c2, &["SET", k, &format!("val-{k}")]).await;
    }
    cluster.kill("n3").await;
    // A pipeline mixing the dead owner's keys with the others': the batch bound for n3
    // fails over to the replicas, and every reply comes back in order.
    let t0 = tokio::time::Instant::now();
    loop {
        let mut pipe = redis::pipe();
        for (a, b) in keys.iter().zip(others.iter().cycle()) {
            pipe.cmd("GET").arg(a);
            pipe.cmd("GET").arg(b);
        }
        let got: redis::RedisResult<Vec<Option<String>>> = pipe.query_async(&mut c1).await;
        match got {
            Ok(vals) => {
                let want: Vec<Option<String>> = keys
                    .iter()
                    .zip(others.iter().cycle())
                    .flat_map(|(a, b)| [Some(format!("val-{a}")), Some(format!("val-{b}"))])
                    .collect();
                assert_eq!(vals, want);
                break;
            }
            Err(e) => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "mixed pipeline not served after the primary died: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for k in &keys {
        let t0 = tokio::time::Instant::now();
        loop {
            let got: redis::RedisResult<Option<String>> =
                redis::cmd("GET").arg(k).query_async(&mut c1).await;
            match got {
                Ok(Some(v)) => {
                    assert_eq!(v, format!("val-{k}"));
                    break;
                }
                other => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(30),
                        "{k} not served after the primary died: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    // Writes keep working on the survivors.
    let _: () = cmd(&mut c2, &["SET", "after", "kill"]).await;
    assert_eq!(
        cmd::<Option<String>>(&mut c1, &["GET", "after"])
            .await
            .as_deref(),
        Some("kill")
    );

    // Hand-off: once both survivors see n3 gone, every key again has two copies, which on
    // two nodes means each holds all of them (DBSIZE counts each key once).
    let t0 = tokio::time::Instant::now();
    loop {
        let gone = ["n1", "n2"]
            .iter()
            .all(|id| cluster.node(id).membership().ring().nodes().len() == 2);
        let total = dbsize(&mut c1).await;
        let (k1, k2) = (held(&cluster, "n1").await, held(&cluster, "n2").await);
        if gone && total > 0 && k1 == total as u64 && k2 == total as u64 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "keys not handed off: DBSIZE {total}, n1 holds {k1}, n2 holds {k2}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for k in &keys {
        let v: Option<String> = cmd(&mut c2, &["GET", k]).await;
        assert_eq!(v, Some(format!("val-{k}")));
    }
    cluster.shutdown().await;
}
