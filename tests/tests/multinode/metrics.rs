//! `/metrics` on a node: Prometheus text whose names follow the conventions (a `dsys_` prefix,
//! counters ending in `_total`, histograms in `_seconds`, labels not baked into names), and
//! covering the runtime (RPC by plugin and peer, latency histograms, membership, restarts,
//! faults in force) and the plugins' own counts.

use std::collections::BTreeMap;
use std::time::Duration;

use dsys_plugin_kv::{KvApi, KvRequest};
use dsys_runtime::FaultCommand;
use dsys_tests::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await??;
    anyhow::ensure!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string())
}

/// (family -> type) from the `# TYPE` lines, and every sample line.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for l in text.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                types.insert(n.to_string(), k.to_string());
            }
        } else if !l.starts_with('#') && !l.trim().is_empty() {
            samples.push(l.to_string());
        }
    }
    (types, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions_and_cover_runtime_and_plugins() -> anyhow::Result<()>
{
    let c = TestCluster::start(3).await?;
    // Through n1, the node scraped below, so n1 is the coordinator that calls its peers (the
    // client otherwise takes whichever node answers first).
    let client = c.client_at("n1", Duration::from_secs(10))?;
    for i in 0..20 {
        client
            .call::<KvApi>(&KvRequest::Put {
                key: format!("m{i}"),
                value: b"v".to_vec(),
                w: None,
            })
            .await?;
    }
    c.fault(FaultCommand::Delay {
        node: "n3".into(),
        ms: 1,
    });
    let text = scrape(c.node("n1").http_addr()).await?;
    let (types, samples) = parse(&text);
    for (name, kind) in &types {
        assert!(name.starts_with("dsys_"), "{name}");
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name}"),
            "histogram" => assert!(name.ends_with("_seconds"), "histogram {name}"),
            "gauge" => assert!(!name.ends_with("_total"), "gauge {name}"),
            k => panic!("{name}: unknown type {k}"),
        }
        assert!(
            !name.contains("n1") && !name.contains("n2") && !name.contains("n3"),
            "node id baked into {name}"
        );
    }
    for s in &samples {
        let name = s.split(['{', ' ']).next().unwrap_or("");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                name.strip_suffix(suf)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample without # TYPE: {s}");
    }
    let has = |prefix: &str| samples.iter().any(|s| s.starts_with(prefix));
    for want in [
        "dsys_rpc_requests_total{plugin=\"kv\",peer=",
        "dsys_rpc_client_requests_total{plugin=\"kv\",peer=",
        "dsys_rpc_client_seconds_bucket{plugin=\"kv\",peer=",
        "dsys_rpc_server_seconds_bucket{plugin=",
        "dsys_plugin_requests_total{plugin=\"kv\",outcome=\"ok\"}",
        "dsys_members{state=\"alive\"} 3",
        "dsys_faults_active{kind=\"delay\"} 1",
        "dsys_kv_keys",
        "dsys_raft_term",
        "dsys_process_resident_bytes ",
        "dsys_process_anon_bytes ",
        "dsys_process_cpu_milliseconds_total ",
    ] {
        assert!(has(want), "missing {want}");
    }
    // Counters that have not moved yet have no sample, but are declared.
    for declared in ["dsys_plugin_restarts_total", "dsys_wal_appends_total"] {
        assert_eq!(
            types.get(declared).map(String::as_str),
            Some("counter"),
            "{declared}"
        );
    }
    c.shutdown().await;
    Ok(())
}
