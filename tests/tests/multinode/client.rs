//! The CLI's client: with no live connection it dials every endpoint at once, so a dead
//! cluster is reported after one handshake timeout (not one per endpoint), naming each
//! address once; a live node among dead endpoints answers at once.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use dsys_runtime::testkit::TestNodes;
use dsys_runtime::ClientError;
use dsys_runtime::{SysApi, SysRequest, SysResponse};

/// Bound UDP sockets that never answer: a QUIC handshake to them times out (a closed port
/// might be refused at once, which would not show whether endpoints are tried in turn).
fn silent_endpoints(n: usize) -> (Vec<UdpSocket>, Vec<SocketAddr>) {
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind udp"))
        .collect();
    let addrs = socks
        .iter()
        .map(|s| s.local_addr().expect("addr"))
        .collect();
    (socks, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_is_reported_after_one_handshake_naming_each_address_once() -> anyhow::Result<()> {
    let c = TestNodes::builder(1, Vec::new).start().await?;
    let (_socks, dead) = silent_endpoints(5);
    let client = c.client_with("cli", dead.clone(), Duration::from_secs(10))?;
    let t = Instant::now();
    let err = client
        .call::<SysApi>(&SysRequest::Ping)
        .await
        .expect_err("nothing listens there");
    let took = t.elapsed();
    let ClientError::NoNode(failures) = &err else {
        panic!("not NoNode: {err}");
    };
    // Tried in turn, five 2 s handshakes would take 10 s; at once they take one.
    assert!(
        took < Duration::from_secs(6),
        "took {took:?}: endpoints tried in turn?"
    );
    assert_eq!(failures.len(), dead.len(), "{err}");
    let text = err.to_string();
    for a in &dead {
        assert_eq!(
            text.matches(&a.to_string()).count(),
            1,
            "{a} not named once: {text}"
        );
    }
    eprintln!("no node reachable after {} ms: {text}", took.as_millis());
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_among_dead_endpoints_answers() -> anyhow::Result<()> {
    let c = TestNodes::builder(1, Vec::new).start().await?;
    let (_socks, mut endpoints) = silent_endpoints(3);
    endpoints.push(c.node("n1").rpc_addr());
    let client = c.client_with("cli", endpoints, Duration::from_secs(10))?;
    let t = Instant::now();
    for _ in 0..3 {
        match client.call::<SysApi>(&SysRequest::Ping).await? {
            SysResponse::Pong { node, .. } => assert_eq!(node, "n1"),
            other => panic!("not a pong: {other:?}"),
        }
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the live node waited on dead ones: {:?}",
        t.elapsed()
    );
    c.shutdown().await;
    Ok(())
}
