//! The `wal` plugin on two real in-process nodes (QUIC + mTLS + gossip on loopback): local
//! and forwarded (`--node`) appends, reads, verify, checkpoint, refusals of bad input, and a
//! node restart that recovers the log from its data folder.

use std::time::Duration;

use dsys_plugin_wal::{WalApi, WalPlugin, WalRequest, WalResponse, MAX_TEXT_BYTES};
use dsys_runtime::testkit::TestNodes;
use dsys_runtime::{plugin_factory, ClientError, RpcError};

/// Per-request deadline of the test's client.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn refused(r: Result<WalResponse, ClientError>) -> String {
    match r {
        Err(ClientError::Rpc(RpcError::Refused(m))) => m,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_read_verify_checkpoint_across_nodes() {
    // 30 s for each node to see the other alive.
    let mut c = TestNodes::builder(2, || vec![plugin_factory::<WalPlugin>()])
        .converge_deadline(Duration::from_secs(60))
        .start()
        .await
        .expect("cluster");
    let client = c.client_at("n1", CALL_TIMEOUT).expect("client");
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
    c.restart("n1").await.expect("restart n1");
    let client = c.client_at("n1", CALL_TIMEOUT).expect("client");
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
    c.shutdown().await;
}
