//! `kv` across a majority/minority partition and across ownership changes: the owner ring
//! does not shrink when gossip declares the other side dead, so writes on the minority side
//! land on their real replicas or as hints naming them, and every acknowledged write reads
//! back through every node after the heal (issue: writes acknowledged on the minority side
//! could not be read after it healed). When nodes join, the keys they now own move to them
//! and the old holders drop them.

use std::time::{Duration, Instant};

use dsys_plugin_kv::{KvApi, KvPlugin, KvRequest, KvResponse};
use dsys_runtime::testkit::TestNodes;
use dsys_runtime::{plugin_factory, Client, MemberState, TlsIdentity};
use dsys_tests::eventually;

fn kv_only() -> Vec<dsys_runtime::PluginFactory> {
    vec![plugin_factory::<KvPlugin>()]
}

async fn cluster(n: usize, start: usize, hint_delivery: bool) -> anyhow::Result<TestNodes> {
    TestNodes::builder(n, kv_only)
        .start_only(start)
        .plugin_config(
            "kv",
            serde_json::json!({ "n": 3, "w": 2, "r": 2, "hint_interval_ms": 200,
                                "anti_entropy_interval_ms": 1000, "hint_delivery": hint_delivery }),
        )
        .start()
        .await
}

fn client_of(c: &TestNodes, ids: &[&str]) -> anyhow::Result<Client> {
    Ok(Client::new(
        &TlsIdentity::load(&c.config.cluster.certs_dir, "cli")?,
        ids.iter().map(|id| c.node(id).rpc_addr()).collect(),
        Duration::from_secs(10),
    )?)
}

async fn put(client: &Client, key: &str, value: &str) -> anyhow::Result<()> {
    let r = client
        .call::<KvApi>(&KvRequest::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            w: None,
        })
        .await?;
    anyhow::ensure!(
        matches!(r, KvResponse::Written { acks: 2.., .. }),
        "put {key}: {r:?}"
    );
    Ok(())
}

async fn get(client: &Client, key: &str) -> anyhow::Result<Option<String>> {
    match client
        .call::<KvApi>(&KvRequest::Get {
            key: key.into(),
            r: None,
        })
        .await?
    {
        KvResponse::Value { version, .. } => Ok(version
            .and_then(|v| v.value)
            .map(|b| String::from_utf8_lossy(&b).into_owned())),
        other => anyhow::bail!("get {key}: {other:?}"),
    }
}

async fn hints_pending(c: &TestNodes) -> u64 {
    let mut held = 0;
    for id in c.running() {
        match c
            .node(&id)
            .rpc()
            .call::<KvApi>(&id, &KvRequest::Stats)
            .await
        {
            Ok(KvResponse::Stats(s)) => held += s.hints,
            _ => return u64::MAX,
        }
    }
    held
}

/// Keys written during a 2|3 partition: `minority` through n1, `majority` through n3,
/// `both` through n1 first and then n3 (the later write wins). `remote` are keys whose three
/// owners are all on the majority side, so a write through n1 lives only in hints until
/// the heal.
struct Written {
    expect: Vec<(String, String)>,
    remote: Vec<String>,
}

async fn write_across_partition(c: &TestNodes) -> anyhow::Result<Written> {
    let owners = c.node("n1").membership().owners();
    anyhow::ensure!(owners.nodes().len() == 5, "owners {:?}", owners.nodes());
    let far = |k: &str| {
        owners
            .preference_list(k.as_bytes(), 3)
            .iter()
            .all(|n| ["n3", "n4", "n5"].contains(&n.as_str()))
    };
    c.partition(&[&["n1", "n2"], &["n3", "n4", "n5"]]);
    let sides: [(&str, &[&str]); 2] = [("n1", &["n3", "n4", "n5"]), ("n3", &["n1", "n2"])];
    for (me, them) in sides {
        let apart = c
            .wait_view(me, Duration::from_secs(20), |v| {
                them.iter()
                    .all(|t| v.members[*t].state == MemberState::Dead)
            })
            .await;
        anyhow::ensure!(apart, "{me} never saw the other side dead");
    }
    // The owner ring stays whole on both sides.
    for id in ["n1", "n3"] {
        anyhow::ensure!(c.node(id).membership().owners().nodes().len() == 5);
    }
    let (minority, majority) = (client_of(c, &["n1"])?, client_of(c, &["n3"])?);
    let mut expect = Vec::new();
    let mut remote = Vec::new();
    for i in 0..40 {
        let k = format!("zk{i}");
        put(&minority, &k, &format!("a{i}")).await?;
        if far(&k) {
            remote.push(k.clone());
        }
        expect.push((k, format!("a{i}")));
    }
    // Keys whose replicas are all out of the minority's reach: each is hints only.
    let mut i = 0;
    while remote.len() < 12 {
        let k = format!("far{i}");
        i += 1;
        if far(&k) {
            put(&minority, &k, "far").await?;
            remote.push(k.clone());
            expect.push((k, "far".into()));
        }
    }
    for i in 0..20 {
        let k = format!("zm{i}");
        put(&majority, &k, &format!("m{i}")).await?;
        expect.push((k, format!("m{i}")));
    }
    for i in 0..10 {
        let k = format!("both{i}");
        put(&minority, &k, "old").await?;
        put(&majority, &k, "new").await?;
        expect.push((k, "new".into()));
    }
    Ok(Written { expect, remote })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_both_sides_of_a_partition_read_back_through_every_node() -> anyhow::Result<()> {
    let c = cluster(5, 5, true).await?;
    let w = write_across_partition(&c).await?;
    let healed = Instant::now();
    c.heal();
    anyhow::ensure!(c.wait_converged(Duration::from_secs(30)).await);
    let delivered = eventually(Duration::from_secs(30), || async {
        hints_pending(&c).await == 0
    })
    .await;
    anyhow::ensure!(
        delivered,
        "hints not delivered: {}",
        hints_pending(&c).await
    );
    for id in c.running() {
        let client = client_of(&c, &[&id])?;
        for (k, v) in &w.expect {
            let got = get(&client, k).await?;
            anyhow::ensure!(
                got.as_deref() == Some(v.as_str()),
                "through {id}: {k} = {got:?}, want {v}"
            );
        }
    }
    // Convergence: every owner of every key holds the same version.
    let keys: Vec<String> = w.expect.iter().map(|(k, _)| k.clone()).collect();
    let client = client_of(&c, &["n4"])?;
    let converged = eventually(Duration::from_secs(30), || async {
        matches!(client.call::<KvApi>(&KvRequest::Compare(keys.clone())).await,
                 Ok(KvResponse::Keys(k)) if k.is_empty())
    })
    .await;
    anyhow::ensure!(converged, "owners still disagree 30 s after the heal");
    eprintln!(
        "kv partition: {} keys ({} only in hints), every owner agreed {} ms after the heal",
        keys.len(),
        w.remote.len(),
        healed.elapsed().as_millis()
    );
    c.shutdown().await;
    Ok(())
}

/// The same run with hint delivery off: keys whose every replica was out of reach are lost
/// to readers, which is what the test above would catch if hints were not delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hint_delivery_the_minoritys_remote_writes_stay_unreadable() -> anyhow::Result<()> {
    let c = cluster(5, 5, false).await?;
    let w = write_across_partition(&c).await?;
    c.heal();
    anyhow::ensure!(c.wait_converged(Duration::from_secs(30)).await);
    let client = client_of(&c, &["n3"])?;
    // Anti-entropy runs between owners after the heal; it cannot bring these back.
    let keys = w.remote.clone();
    let settled = eventually(Duration::from_secs(30), || async {
        matches!(client.call::<KvApi>(&KvRequest::Compare(keys.clone())).await,
                 Ok(KvResponse::Keys(k)) if k.is_empty())
    })
    .await;
    anyhow::ensure!(settled, "owners of the remote keys never agreed");
    for k in &w.remote {
        anyhow::ensure!(
            get(&client, k).await?.is_none(),
            "{k} read back without hints"
        );
    }
    anyhow::ensure!(hints_pending(&c).await >= w.remote.len() as u64);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_nodes_take_over_their_keys_and_old_holders_drop_them() -> anyhow::Result<()> {
    let mut c = cluster(5, 3, true).await?;
    let client = client_of(&c, &["n1", "n2", "n3"])?;
    let keys: Vec<String> = (0..300).map(|i| format!("join:{i}")).collect();
    for k in &keys {
        put(&client, k, k).await?;
    }
    // A delete before the join: its tombstone must move too, or the key comes back.
    client
        .call::<KvApi>(&KvRequest::Del {
            key: "join:0".into(),
            w: Some(3),
        })
        .await?;
    c.start_node("n4").await?;
    c.start_node("n5").await?;
    anyhow::ensure!(c.wait_converged(Duration::from_secs(30)).await);
    let owners = c.node("n1").membership().owners();
    anyhow::ensure!(owners.nodes().len() == 5, "owners {:?}", owners.nodes());
    // Every key ends up on exactly its three owners.
    let settled = eventually(Duration::from_secs(60), || async {
        for k in &keys {
            let Ok(KvResponse::Located(h)) = client
                .call::<KvApi>(&KvRequest::Locate { key: k.clone() })
                .await
            else {
                return false;
            };
            let mut holders: Vec<String> = h.into_iter().map(|(n, _)| n).collect();
            holders.sort();
            let mut want = owners.preference_list(k.as_bytes(), 3);
            want.sort();
            if holders != want {
                return false;
            }
        }
        true
    })
    .await;
    anyhow::ensure!(settled, "keys did not move to exactly their owners");
    let all = client_of(&c, &["n1", "n2", "n3", "n4", "n5"])?;
    for id in ["n4", "n5"] {
        let one = client_of(&c, &[id])?;
        for k in &keys[1..] {
            anyhow::ensure!(get(&one, k).await?.as_deref() == Some(k.as_str()));
        }
        anyhow::ensure!(get(&one, "join:0").await?.is_none(), "deleted key is back");
    }
    let mut handed = 0;
    for id in c.running() {
        if let KvResponse::Stats(s) = all
            .call_at::<KvApi>(c.node(&id).rpc_addr(), &KvRequest::Stats)
            .await?
        {
            handed += s.handed_over;
        }
    }
    anyhow::ensure!(handed > 0, "no key was handed over");
    c.shutdown().await;
    Ok(())
}
