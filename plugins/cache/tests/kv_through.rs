//! Read-through and write-through between `cache` and `kv` on two in-process nodes running
//! both plugins: a miss on a read-through prefix loads from kv, a write on a write-through
//! prefix lands in kv before the reply, other prefixes never touch kv.

use std::time::Duration;

use dsys_plugin_cache::{CacheApi, CachePlugin, CacheRequest, CacheResponse};
use dsys_plugin_kv::{KvApi, KvPlugin, KvRequest, KvResponse};
use dsys_runtime::plugin_factory;
use dsys_runtime::testkit::TestNodes;

/// Per-request deadline of the test's CLI clients.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn kv_value(r: KvResponse) -> Option<Vec<u8>> {
    match r {
        KvResponse::Value { version, .. } => version.and_then(|v| v.value),
        other => panic!("not a value: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_through_and_write_through() {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .expect("test took too long");
}

async fn scenario() {
    // 30 s for each node to see the other alive, and to have it in its ring.
    let cluster = TestNodes::builder(2, || {
        vec![
            plugin_factory::<KvPlugin>(),
            plugin_factory::<CachePlugin>(),
        ]
    })
    .converge_deadline(Duration::from_secs(60))
    .plugin_config("kv", serde_json::json!({ "n": 2, "w": 2, "r": 2 }))
    .plugin_config(
        "cache",
        serde_json::json!({ "read_through": ["db:"], "write_through": ["db:"] }),
    )
    .start()
    .await
    .expect("cluster");
    let client = cluster.client_at("n1", CALL_TIMEOUT).expect("client");
    let port = match client
        .call::<CacheApi>(&CacheRequest::Stats)
        .await
        .expect("stats")
    {
        CacheResponse::Stats(s) => s.resp_port,
        other => panic!("{other:?}"),
    };
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");

    // Write-through: the value is in kv when SET returns.
    let _: () = redis::cmd("SET")
        .arg("db:1")
        .arg("one")
        .query_async(&mut c)
        .await
        .expect("set");
    let got = client
        .call::<KvApi>(&KvRequest::Get {
            key: "db:1".into(),
            r: None,
        })
        .await
        .expect("kv get");
    assert_eq!(kv_value(got).as_deref(), Some(&b"one"[..]));

    // A prefix without write-through stays out of kv.
    let _: () = redis::cmd("SET")
        .arg("tmp:1")
        .arg("x")
        .query_async(&mut c)
        .await
        .expect("set");
    let got = client
        .call::<KvApi>(&KvRequest::Get {
            key: "tmp:1".into(),
            r: None,
        })
        .await
        .expect("kv get");
    assert_eq!(kv_value(got), None);

    // Read-through: a value only in kv is loaded on the first GET, then served from cache.
    client
        .call::<KvApi>(&KvRequest::Put {
            key: "db:2".into(),
            value: b"two".to_vec(),
            w: None,
        })
        .await
        .expect("kv put");
    for _ in 0..2 {
        let v: Option<String> = redis::cmd("GET")
            .arg("db:2")
            .query_async(&mut c)
            .await
            .expect("get");
        assert_eq!(v.as_deref(), Some("two"));
    }
    let v: Option<String> = redis::cmd("GET")
        .arg("db:none")
        .query_async(&mut c)
        .await
        .expect("get");
    assert_eq!(v, None);

    // DEL on a write-through key deletes it in kv too.
    let n: i64 = redis::cmd("DEL")
        .arg("db:1")
        .query_async(&mut c)
        .await
        .expect("del");
    assert_eq!(n, 1);
    let got = client
        .call::<KvApi>(&KvRequest::Get {
            key: "db:1".into(),
            r: None,
        })
        .await
        .expect("kv get");
    assert_eq!(kv_value(got), None);

    // Invalidation drops cached copies; read-through brings db:2 back from kv.
    client
        .call::<CacheApi>(&CacheRequest::Invalidate {
            prefix: "db:".into(),
        })
        .await
        .expect("invalidate");
    let v: Option<String> = redis::cmd("GET")
        .arg("db:2")
        .query_async(&mut c)
        .await
        .expect("get");
    assert_eq!(v.as_deref(), Some("two"));
    let mut loads = 0;
    for id in ["n1", "n2"] {
        let cl = cluster.client_at(id, CALL_TIMEOUT).expect("client");
        if let CacheResponse::Stats(s) = cl
            .call::<CacheApi>(&CacheRequest::Stats)
            .await
            .expect("stats")
        {
            loads += s.loads;
        }
    }
    assert_eq!(
        loads, 2,
        "db:2 loaded twice (first read, after invalidation)"
    );
    cluster.shutdown().await;
}
