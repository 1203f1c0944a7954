//! Read-through and write-through between `cache` and `kv` on two in-process nodes running
//! both plugins: a miss on a read-through prefix loads from kv, a write on a write-through
//! prefix lands in kv before the reply, other prefixes never touch kv.

use std::time::Duration;

use dsys_plugin_cache::{CacheApi, CachePlugin, CacheRequest, CacheResponse};
use dsys_plugin_kv::{KvApi, KvPlugin, KvRequest, KvResponse};
use dsys_runtime::{
    init_cluster_certs, plugin_factory, Client, ClusterConfig, MemberState, Node, NodeOptions,
    TlsIdentity,
};

async fn start(cfg: &ClusterConfig, id: &str, seeds: Vec<std::net::SocketAddr>) -> Node {
    let n = Node::start(NodeOptions {
        config: cfg.clone(),
        node_id: id.into(),
        plugins: vec![
            plugin_factory::<KvPlugin>(),
            plugin_factory::<CachePlugin>(),
        ],
        seed_addrs: seeds,
    })
    .await
    .expect("node start");
    assert!(
        n.host()
            .wait_running("cache", Duration::from_secs(10))
            .await
    );
    assert!(n.host().wait_running("kv", Duration::from_secs(10)).await);
    n
}

async fn sees(n: &Node, other: &str) {
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let v = n.membership().view();
        if v.members.get(other).map(|m| m.state == MemberState::Alive) == Some(true)
            && n.membership().ring().nodes().len() == 2
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never saw {other} alive", n.id());
}

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
    let dir = tempfile::tempdir().expect("tmp");
    let certs = dir.path().join("certs");
    let mut cfg = ClusterConfig::local_ephemeral(2, &certs, &dir.path().join("data"));
    cfg.plugins
        .insert("kv".into(), serde_json::json!({ "n": 2, "w": 2, "r": 2 }));
    cfg.plugins.insert(
        "cache".into(),
        serde_json::json!({ "read_through": ["db:"], "write_through": ["db:"] }),
    );
    cfg.validate().expect("config");
    let ids: Vec<String> = cfg.nodes.keys().cloned().collect();
    init_cluster_certs(&certs, &ids).expect("certs");
    let n1 = start(&cfg, "n1", vec![]).await;
    let n2 = start(&cfg, "n2", vec![n1.gossip_addr()]).await;
    sees(&n1, "n2").await;
    sees(&n2, "n1").await;
    let id = TlsIdentity::load(&certs, "cli").expect("cli identity");
    let client = Client::new(&id, vec![n1.rpc_addr()], Duration::from_secs(10)).expect("client");
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
    for n in [&n1, &n2] {
        let cl = Client::new(&id, vec![n.rpc_addr()], Duration::from_secs(10)).expect("client");
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
    n1.shutdown().await;
    n2.shutdown().await;
}
