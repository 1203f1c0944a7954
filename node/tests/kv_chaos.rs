//! Chaos test of `kv` on real processes: 5 agents, N=3 W=2 R=2; a writer records every
//! acknowledged put and delete while the nodes are SIGKILLed and restarted in turn. Then:
//! every acknowledged key reads back with its value or a later one, no deleted key comes
//! back, and every key has N replicas again.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dsys_plugin_kv::{KvApi, KvRequest, KvResponse};
use dsys_runtime::{Client, TlsIdentity};

const KV: &str = "\n[plugins.kv]\nn = 3\nw = 2\nr = 2\nanti_entropy_interval_ms = 2000\nhint_interval_ms = 300\n";

fn value_of(r: &KvResponse) -> Option<String> {
    match r {
        KvResponse::Value {
            version: Some(v), ..
        } => v
            .value
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).to_string()),
        _ => None,
    }
}

#[test]
fn acknowledged_writes_survive_sigkills() {
    let (agents, cfg, eps) = Agents::start_with(5, KV);
    assert!(
        converged(&cfg, &eps, 5, Duration::from_secs(60)),
        "5 agents did not converge"
    );
    let certs = agents.dir.path().join("certs");
    let agents = Arc::new(std::sync::Mutex::new(agents));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));

    // The killer: SIGKILL n1..n5 in turn, each restarted 2 s later.
    let killer = {
        let (agents, stop, cfg) = (agents.clone(), stop.clone(), cfg.clone());
        std::thread::spawn(move || {
            let mut kills = 0;
            for round in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1500));
                let id = format!("n{}", round % 5 + 1);
                agents.lock().expect("lock").sigkill(&id);
                kills += 1;
                eprintln!("[chaos] SIGKILL {id}");
                std::thread::sleep(Duration::from_millis(2000));
                agents.lock().expect("lock").spawn(&cfg, &id);
                eprintln!("[chaos] restarted {id}");
            }
            kills
        })
    };

    let (acked, deleted, errors, puts) = rt.block_on(async {
        let id = TlsIdentity::load(&certs, "cli").expect("cli cert");
        let client = Client::new(&id, eps.clone(), Duration::from_secs(5)).expect("client");
        let mut acked: BTreeMap<String, u64> = BTreeMap::new();
        let mut deleted: Vec<String> = Vec::new();
        let mut errors = 0u64;
        let mut puts = 0u64;
        let end = Instant::now() + Duration::from_secs(36);
        let mut i = 0u64;
        while Instant::now() < end {
            i += 1;
            if i % 10 == 0 {
                // Put then delete a key of its own; only an acknowledged delete counts.
                let key = format!("gone-{i}");
                let put = KvRequest::Put {
                    key: key.clone(),
                    value: b"doomed".to_vec(),
                    w: None,
                };
                if client.call::<KvApi>(&put).await.is_ok()
                    && client
                        .call::<KvApi>(&KvRequest::Del {
                            key: key.clone(),
                            w: None,
                        })
                        .await
                        .is_ok()
                {
                    deleted.push(key);
                }
                continue;
            }
            // 300 keys overwritten over and over: value v<i> with i increasing.
            let key = format!("key-{}", i % 300);
            let req = KvRequest::Put {
                key: key.clone(),
                value: format!("v{i}").into_bytes(),
                w: None,
            };
            match client.call::<KvApi>(&req).await {
                Ok(KvResponse::Written { .. }) => {
                    acked.insert(key, i);
                    puts += 1;
                }
                _ => errors += 1,
            }
        }
        (acked, deleted, errors, puts)
    });
    stop.store(true, Ordering::Relaxed);
    let kills = killer.join().expect("killer");
    // Everyone back and seeing everyone.
    assert!(
        converged(&cfg, &eps, 5, Duration::from_secs(60)),
        "cluster did not recover"
    );

    rt.block_on(async {
        let id = TlsIdentity::load(&certs, "cli").expect("cli cert");
        let client = Client::new(&id, eps.clone(), Duration::from_secs(5)).expect("client");
        let mut lost = Vec::new();
        for (key, i) in &acked {
            let r = client.call::<KvApi>(&KvRequest::Get { key: key.clone(), r: None }).await.expect("get");
            let ok = value_of(&r)
                .and_then(|v| v.strip_prefix('v').and_then(|n| n.parse::<u64>().ok()))
                .map(|j| j >= *i)
                .unwrap_or(false);
            if !ok {
                lost.push((key.clone(), *i, value_of(&r)));
            }
        }
        assert!(lost.is_empty(), "acknowledged writes lost or rolled back: {lost:?}");
        let mut resurrected = Vec::new();
        for key in &deleted {
            let r = client.call::<KvApi>(&KvRequest::Get { key: key.clone(), r: None }).await.expect("get");
            if value_of(&r).is_some() {
                resurrected.push(key.clone());
            }
        }
        assert!(resurrected.is_empty(), "deleted keys came back: {resurrected:?}");
        // Every key again has N = 3 replicas holding the same newest version.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut short: Vec<String> = acked.keys().chain(deleted.iter()).cloned().collect();
        while !short.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for key in short {
                let r = client.call::<KvApi>(&KvRequest::Locate { key: key.clone() }).await;
                let full = match r {
                    Ok(KvResponse::Located(h)) => {
                        let newest = h.iter().filter_map(|(_, v)| v.clone()).fold(None, |a, v| dsys_plugin_kv::newest(a, Some(v)));
                        h.iter().filter(|(_, v)| v.as_ref() == newest.as_ref()).count() >= 3
                    }
                    _ => false,
                };
                if !full {
                    still.push(key);
                }
            }
            short = still;
            if !short.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        assert!(short.is_empty(), "keys without 3 up-to-date replicas: {:?}", &short[..short.len().min(10)]);
        eprintln!(
            "kv chaos: {kills} SIGKILLs; {puts} puts acknowledged over {} keys (final values checked), {} deletes acknowledged, {errors} writes failed (not acknowledged); 0 lost, 0 resurrected, every key on 3 replicas",
            acked.len(),
            deleted.len()
        );
    });
}
