//! Identity: mutual TLS on every connection, certificates bound to node ids, and gossip
//! (unauthenticated) never enough to enter the ring.

use std::collections::HashSet;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig};
use dsys_runtime::{
    init_cluster_certs, Client, ClientError, MemberState, RpcError, SysApi, SysRequest, TlsIdentity,
};
use dsys_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_a_foreign_ca_is_refused() -> anyhow::Result<()> {
    let c = TestCluster::start(2).await?;
    let other = tempfile::tempdir()?;
    init_cluster_certs(other.path(), &["n1".into()])?;
    let id = TlsIdentity::load(other.path(), "cli")?;
    let client = Client::new(&id, c.endpoints(), Duration::from_secs(5))?;
    let r = client.call::<SysApi>(&SysRequest::Ping).await;
    assert!(r.is_err(), "foreign certificate accepted: {r:?}");
    // A node certificate of the right CA is refused when it claims to be the CLI...
    let as_node = c.client_as("n2")?;
    let r = as_node.call::<SysApi>(&SysRequest::Ping).await;
    assert!(
        matches!(r, Err(ClientError::Rpc(RpcError::Unauthorized(_)))),
        "{r:?}"
    );
    // ...and the real CLI certificate works.
    assert!(c.client()?.call::<SysApi>(&SysRequest::Ping).await.is_ok());
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_certificate_reads_but_never_writes() -> anyhow::Result<()> {
    use dsys_plugin_kv::{KvApi, KvRequest, KvResponse};
    let value_of = |r: &KvResponse| match r {
        KvResponse::Value {
            version: Some(v), ..
        } => v.value.clone(),
        _ => None,
    };
    let c = TestCluster::start(2).await?;
    let admin = c.client()?;
    let reader = c.client_as("reader")?;
    let put = |value: &str| KvRequest::Put {
        key: "ro-k".into(),
        value: value.as_bytes().to_vec(),
        w: Some(1),
    };
    admin.call::<KvApi>(&put("v1")).await?;
    let get = KvRequest::Get {
        key: "ro-k".into(),
        r: Some(1),
    };
    let read = reader.call::<KvApi>(&get).await?;
    assert_eq!(value_of(&read), Some(b"v1".to_vec()), "reader got {read:?}");
    // Writes and chaos are refused for the reader, on every node, and change nothing.
    let w = reader.call::<KvApi>(&put("v2")).await;
    assert!(
        matches!(w, Err(ClientError::Rpc(RpcError::Unauthorized(_)))),
        "{w:?}"
    );
    let chaos = reader
        .call::<SysApi>(&SysRequest::Note("reader was here".into()))
        .await;
    assert!(
        matches!(chaos, Err(ClientError::Rpc(RpcError::Unauthorized(_)))),
        "{chaos:?}"
    );
    let after = admin.call::<KvApi>(&get).await?;
    assert_eq!(value_of(&after), Some(b"v1".to_vec()), "after: {after:?}");
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_only_impostor_never_enters_the_ring() -> anyhow::Result<()> {
    let c = TestCluster::start(2).await?;
    // An impostor speaks chitchat and claims to be n9 with n1's RPC address: gossip accepts
    // it, but n1's certificate does not name n9, so the identity check must fail.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let cfg = ChitchatConfig {
        chitchat_id: ChitchatId::new("n9", 1, addr),
        cluster_id: c.config.cluster.name.clone(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: addr,
        seed_nodes: vec![c.node("n1").gossip_addr().to_string()],
        failure_detector_config: FailureDetectorConfig {
            initial_interval: Duration::from_millis(100),
            ..Default::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    };
    let keys = vec![
        ("rpc_addr".to_string(), c.node("n1").rpc_addr().to_string()),
        ("region".to_string(), "eu".to_string()),
    ];
    let impostor = chitchat::spawn_chitchat(cfg, keys, &UdpTransport).await?;
    let seen = c
        .wait_view("n1", Duration::from_secs(10), |v| {
            v.members.contains_key("n9")
        })
        .await;
    assert!(seen, "the impostor should at least be gossiped");
    // Give verification several attempts (it retries every second).
    let mut states = HashSet::new();
    for _ in 0..40 {
        let v = c.node("n1").membership().view();
        states.insert(v.members["n9"].state);
        assert!(!c
            .node("n1")
            .membership()
            .ring()
            .nodes()
            .contains(&"n9".to_string()));
        assert!(!c
            .node("n2")
            .membership()
            .ring()
            .nodes()
            .contains(&"n9".to_string()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !states.contains(&MemberState::Alive),
        "impostor became alive: {states:?}"
    );
    impostor.shutdown().await?;
    c.shutdown().await;
    Ok(())
}
