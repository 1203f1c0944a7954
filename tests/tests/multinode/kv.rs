//! `kv` across in-process nodes: any node coordinates, quorums, deletes, bad input, and
//! anti-entropy bringing a partitioned replica back up to date with only the differences.

use std::time::{Duration, Instant};

use dsys_plugin_kv::{KvApi, KvRequest, KvResponse, Version};
use dsys_runtime::{ClientError, ClusterConfig, MemberState, RpcError};
use dsys_tests::{eventually, TestCluster};

fn fast_ae(c: &mut ClusterConfig) {
    c.plugins.insert(
        "kv".into(),
        serde_json::json!({ "n": 3, "w": 2, "r": 2, "anti_entropy_interval_ms": 1000, "hint_interval_ms": 200, "merkle_depth": 12 }),
    );
}

fn value(r: &KvResponse) -> Option<Vec<u8>> {
    match r {
        KvResponse::Value {
            version: Some(v), ..
        } => v.value.clone(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_on_one_node_get_from_another_then_delete() -> anyhow::Result<()> {
    let c = TestCluster::start_with(5, fast_ae).await?;
    let client = c.client()?;
    let eps = c.endpoints();
    let put = KvRequest::Put {
        key: "user:1".into(),
        value: b"alice".to_vec(),
        w: None,
    };
    let r = client.call_at::<KvApi>(eps[0], &put).await?;
    assert!(matches!(r, KvResponse::Written { acks: 2.., .. }), "{r:?}");
    let r = client
        .call_at::<KvApi>(
            eps[3],
            &KvRequest::Get {
                key: "user:1".into(),
                r: Some(3),
            },
        )
        .await?;
    assert_eq!(value(&r), Some(b"alice".to_vec()));
    // Three replicas hold it.
    let holders = eventually(Duration::from_secs(10), || async {
        matches!(client.call::<KvApi>(&KvRequest::Locate { key: "user:1".into() }).await, Ok(KvResponse::Located(h)) if h.len() == 3)
    })
    .await;
    assert!(holders);
    // A later write wins; a delete hides it.
    client
        .call_at::<KvApi>(
            eps[2],
            &KvRequest::Put {
                key: "user:1".into(),
                value: b"bob".to_vec(),
                w: Some(3),
            },
        )
        .await?;
    let r = client
        .call_at::<KvApi>(
            eps[4],
            &KvRequest::Get {
                key: "user:1".into(),
                r: Some(2),
            },
        )
        .await?;
    assert_eq!(value(&r), Some(b"bob".to_vec()));
    client
        .call_at::<KvApi>(
            eps[1],
            &KvRequest::Del {
                key: "user:1".into(),
                w: None,
            },
        )
        .await?;
    let r = client
        .call_at::<KvApi>(
            eps[0],
            &KvRequest::Get {
                key: "user:1".into(),
                r: None,
            },
        )
        .await?;
    assert_eq!(value(&r), None);
    // Scan sees live keys only.
    for i in 0..20 {
        client
            .call::<KvApi>(&KvRequest::Put {
                key: format!("scan:{i:02}"),
                value: vec![i],
                w: None,
            })
            .await?;
    }
    let KvResponse::Items(items) = client
        .call::<KvApi>(&KvRequest::Scan {
            prefix: "scan:".into(),
            limit: 100,
        })
        .await?
    else {
        anyhow::bail!("wrong answer")
    };
    assert_eq!(items.len(), 20);
    // Bad input is refused and changes nothing.
    for bad in [
        KvRequest::Put {
            key: "".into(),
            value: vec![],
            w: None,
        },
        KvRequest::Put {
            key: "k".repeat(2000),
            value: vec![],
            w: None,
        },
        KvRequest::Put {
            key: "k".into(),
            value: vec![0; 2 * 1024 * 1024],
            w: None,
        },
        KvRequest::Put {
            key: "k".into(),
            value: vec![],
            w: Some(9),
        },
        KvRequest::Get {
            key: "k".into(),
            r: Some(0),
        },
        KvRequest::Scan {
            prefix: "".into(),
            limit: 0,
        },
    ] {
        let r = client.call::<KvApi>(&bad).await;
        assert!(
            matches!(r, Err(ClientError::Rpc(RpcError::Refused(_)))),
            "{bad:?} gave {r:?}"
        );
    }
    c.shutdown().await;
    Ok(())
}

const BASE: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_entropy_repairs_a_partitioned_replica_with_only_the_differences() -> anyhow::Result<()>
{
    let c = TestCluster::start_with(4, fast_ae).await?;
    let client = c.client()?;
    // 2,000 keys everyone agrees on.
    // BASE keys everyone agrees on, written by 16 concurrent writers.
    let client = std::sync::Arc::new(client);
    let mut writers = Vec::new();
    for w in 0..16 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            for i in (w..BASE).step_by(16) {
                let put = KvRequest::Put {
                    key: format!("base:{i}"),
                    value: vec![1; 64],
                    w: Some(3),
                };
                client.call::<KvApi>(&put).await?;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    c.partition(&[&["n1", "n2", "n3"], &["n4"]]);
    let away = c
        .wait_view("n1", Duration::from_secs(15), |v| {
            v.members["n4"].state == MemberState::Dead
        })
        .await;
    assert!(away, "n4 not seen dead");
    let client = dsys_runtime::Client::new(
        &dsys_runtime::TlsIdentity::load(&c.config.cluster.certs_dir, "cli")?,
        vec![c.node("n1").rpc_addr(), c.node("n2").rpc_addr()],
        Duration::from_secs(10),
    )?;
    for i in 0..1000 {
        client
            .call::<KvApi>(&KvRequest::Put {
                key: format!("new:{i}"),
                value: vec![2; 64],
                w: None,
            })
            .await?;
    }
    // Let the re-replication caused by n4's death finish, so only the repair of n4 is
    // measured: wait until no anti-entropy bytes move for two intervals.
    let mut before: u64 = stats_sum(&c, |s| s.ae_bytes).await?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let now = stats_sum(&c, |s| s.ae_bytes).await?;
        let settled = now - before < 2048; // roots only
        before = now;
        if settled {
            break;
        }
    }
    let t = Instant::now();
    c.heal();
    assert!(c.wait_converged(Duration::from_secs(20)).await);
    // Every key n4 should replicate reaches it with the newest version.
    let ring = c.node("n1").membership().ring();
    let n4_keys: Vec<String> = (0..BASE)
        .map(|i| format!("base:{i}"))
        .chain((0..1000).map(|i| format!("new:{i}")))
        .filter(|k| {
            ring.preference_list(k.as_bytes(), 3)
                .iter()
                .any(|n| n == "n4")
        })
        .collect();
    let rpc = c.node("n1").rpc().clone();
    let done = eventually(Duration::from_secs(60), || async {
        for k in n4_keys.iter().filter(|k| k.starts_with("new:")) {
            match rpc.call::<KvApi>("n4", &KvRequest::Read(k.clone())).await {
                Ok(KvResponse::Local(Some(_))) => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    assert!(done, "n4 never received the keys written while it was away");
    let took = t.elapsed();
    let moved = stats_sum(&c, |s| s.ae_bytes).await? - before;
    // What a full copy of n4's share would have cost.
    let full: u64 = n4_keys
        .iter()
        .map(|k| {
            let v = Version {
                ts: Default::default(),
                origin: "n1".into(),
                value: Some(vec![0; 64]),
            };
            dsys_runtime::encode(&(k.clone(), v))
                .map(|b| b.len() as u64)
                .unwrap_or(0)
        })
        .sum();
    eprintln!(
        "anti-entropy: n4 converged {} ms after the heal; exchanges moved {moved} bytes vs {full} bytes for a full copy of its {} keys ({:.0}%)",
        took.as_millis(),
        n4_keys.len(),
        100.0 * moved as f64 / full.max(1) as f64
    );
    assert!(moved < full, "anti-entropy moved more than a full copy");
    c.shutdown().await;
    Ok(())
}

async fn stats_sum(
    c: &TestCluster,
    f: impl Fn(&dsys_plugin_kv::KvStats) -> u64,
) -> anyhow::Result<u64> {
    let mut sum = 0;
    for id in c.running() {
        if let KvResponse::Stats(s) = c
            .node(&id)
            .rpc()
            .call::<KvApi>(&id, &KvRequest::Stats)
            .await?
        {
            sum += f(&s);
        }
    }
    Ok(sum)
}
