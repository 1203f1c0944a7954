//! The `wal` plugin on two real in-process nodes (QUIC + mTLS + gossip on loopback): local
//! and forwarded (`--node`) appends, reads, verify, checkpoint, refusals of bad input, and a
//! node restart that recovers the log from its data folder.

use std::time::Duration;

use dsys_plugin_wal::{WalApi, WalPlugin, WalRequest, WalResponse, MAX_TEXT_BYTES};
use dsys_runtime::{
    init_cluster_certs, plugin_factory, Client, ClientError, ClusterConfig, MemberState, Node,
    NodeOptions, RpcError, TlsIdentity,
};

async fn start(cfg: &ClusterConfig, id: &str, seeds: Vec<std::net::SocketAddr>) -> Node {
    let n = Node::start(NodeOptions {
        config: cfg.clone(),
        node_id: id.into(),
        plugins: vec![plugin_factory::<WalPlugin>()],
        seed_addrs: seeds,
    })
    .await
    .expect("node start");
    assert!(n.host().wait_running("wal", Duration::from_secs(10)).await);
    n
}

async fn sees(n: &Node, other: &str) {
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let v = n.membership().view();
        if v.members.get(other).map(|m| m.state == MemberState::Alive) == Some(true) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never saw {other} alive", n.id());
}

fn refused(r: Result<WalResponse, ClientError>) -> String {
    match r {
        Err(ClientError::Rpc(RpcError::Refused(m))) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_verify_checkpoint_across_nodes() {
    let dir = tempfile::tempdir().expect("tmp");
    let certs = dir.path().join("certs");
    let cfg = ClusterConfig::local_ephemeral(2, &certs, &dir.path().join("data"));
    cfg.validate().expect("config");
    let ids: Vec<String> = cfg.nodes.keys().cloned().collect();
    init_cluster_certs(&certs, &ids).expect("certs");
    let n1 = start(&cfg, "n1", vec![]).await;
    let n2 = start(&cfg, "n2", vec![n1.gossip_addr()]).await;
    sees(&n1, "n2").await;
    let id = TlsIdentity::load(&certs, "cli").expect("cli identity");
    let client = Client::new(&id, vec![n1.rpc_addr()], Duration::from_secs(10)).expect("client");
    let call = |req: WalRequest| {
        let client = &client;
        async move { client.call::<WalApi>(&req).await }
    };

    // Local append on n1, forwarded appends to n2.
    let r = call(WalRequest::Append {
        node: None,
        text: "hello".into(),
    })
    .await
    .expect("append");
    assert_eq!(
        r,
        WalResponse::Appended {
            node: "n1".into(),
            lsn: 1
        }
    );
    for i in 1..=5u64 {
        let r = call(WalRequest::Append {
            node: Some("n2".into()),
            text: format!("remote {i}"),
        })
        .await
        .expect("forwarded append");
        assert_eq!(
            r,
            WalResponse::Appended {
                node: "n2".into(),
                lsn: i
            }
        );
    }
    let WalResponse::Records {
        node,
        entries,
        next,
    } = call(WalRequest::Read {
        node: Some("n2".into()),
        from: 2,
        limit: 3,
    })
    .await
    .expect("read")
    else {
        panic!("not records")
    };
    assert_eq!(node, "n2");
    let texts: Vec<&str> = entries.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, ["remote 2", "remote 3", "remote 4"]);
    assert_eq!(next, Some(5));
    let WalResponse::Verify { report, .. } = call(WalRequest::Verify {
        node: Some("n2".into()),
    })
    .await
    .expect("verify") else {
        panic!("not verify")
    };
    assert_eq!(
        (report.records, report.last_lsn, report.error),
        (5, 5, None)
    );

    // Bad input is refused with a clear message, and changes nothing.
    let m = refused(
        call(WalRequest::Append {
            node: None,
            text: "x".repeat(MAX_TEXT_BYTES + 1),
        })
        .await,
    );
    assert!(m.contains("exceeds"), "{m}");
    let m = refused(
        call(WalRequest::Append {
            node: Some("n9".into()),
            text: "x".into(),
        })
        .await,
    );
    assert!(m.contains("unknown node"), "{m}");
    refused(
        call(WalRequest::Read {
            node: None,
            from: 0,
            limit: 0,
        })
        .await,
    );
    refused(
        call(WalRequest::Checkpoint {
            node: None,
            upto: Some(1000),
        })
        .await,
    );
    let WalResponse::Stats { stats, .. } =
        call(WalRequest::Stats { node: None }).await.expect("stats")
    else {
        panic!("not stats")
    };
    assert_eq!(
        (stats.last_lsn, stats.next_lsn),
        (1, 2),
        "refusals wrote nothing"
    );

    // Checkpoint: everything released; the active segment stays; the next LSN goes on.
    let WalResponse::Checkpoint { info, .. } = call(WalRequest::Checkpoint {
        node: Some("n2".into()),
        upto: None,
    })
    .await
    .expect("checkpoint") else {
        panic!("not checkpoint")
    };
    assert_eq!(info.upto_lsn, 6);

    // Restart n1 (abruptly): its log comes back from disk.
    n1.kill().await;
    let n1 = start(&cfg, "n1", vec![n2.gossip_addr()]).await;
    let client = Client::new(&id, vec![n1.rpc_addr()], Duration::from_secs(10)).expect("client");
    let WalResponse::Stats {
        stats, recovery, ..
    } = client
        .call::<WalApi>(&WalRequest::Stats { node: None })
        .await
        .expect("stats")
    else {
        panic!("not stats")
    };
    assert_eq!((recovery.records, recovery.last_lsn), (1, 1));
    assert_eq!(stats.next_lsn, 2);
    let r = client
        .call::<WalApi>(&WalRequest::Append {
            node: None,
            text: "after restart".into(),
        })
        .await
        .expect("append");
    assert_eq!(
        r,
        WalResponse::Appended {
            node: "n1".into(),
            lsn: 2
        }
    );
    n1.shutdown().await;
    n2.shutdown().await;
}
