//! The `config` plugin on real in-process nodes (QUIC + mutual TLS + gossip on loopback)
//! running `consensus`, `config` and `ratelimit`: a rate-limit rule put through config
//! changes `ratelimit check` on every node (and on a restarted one); history and rollback;
//! typed values refused and never stored; the read-only certificate reads and watches but
//! every write is refused; a watch from a revision sees every change, in order.
//!
//! Every wait is on a condition with a deadline; nothing sleeps and hopes. Reload latencies
//! are printed (`--nocapture`), not asserted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dsys_plugin_config::{Change, ConfigApi, ConfigPlugin, ConfigRequest, ConfigResponse, Op};
use dsys_plugin_consensus::ConsensusPlugin;
use dsys_plugin_lock::recipe::transient;
use dsys_plugin_ratelimit::{
    RatelimitApi, RatelimitPlugin, RatelimitRequest, RatelimitResponse, RuleSource,
};
use dsys_runtime::testkit::{wait_for, TestNodes};
use dsys_runtime::{plugin_factory, Client, ClientError, RpcError};
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(90);
/// Per-request deadline of the tests' clients.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

const RULE_API_TOML: &str = r#"{"algorithm":"token_bucket","limit":100,"window_ms":60000}"#;

/// Three nodes running `ratelimit`, `consensus` and `config`, all Raft voters.
///
/// One cluster at a time in this binary (3 Raft nodes with fsyncs each, on a small machine):
/// it is [`TestNodesBuilder::exclusive`](dsys_runtime::testkit::TestNodesBuilder::exclusive).
struct Cluster {
    nodes: TestNodes,
}

impl Cluster {
    async fn new() -> Cluster {
        let api: serde_json::Value = serde_json::from_str(RULE_API_TOML).expect("json");
        let nodes = TestNodes::builder(3, || {
            vec![
                plugin_factory::<RatelimitPlugin>(),
                plugin_factory::<ConsensusPlugin>(),
                plugin_factory::<ConfigPlugin>(),
            ]
        })
        .exclusive()
        .converge_deadline(DEADLINE)
        .config(|c| c.cluster.rpc_timeout_ms = 8000)
        // Slower Raft timers than the defaults: this machine is shared and often loaded,
        // and RPC deadlines of one heartbeat (100 ms) kept a first cluster from electing.
        .plugin_config(
            "consensus",
            serde_json::json!({
                "voters": ["n1", "n2", "n3"],
                "heartbeat_ms": 300,
                "election_min_ms": 2000,
                "election_max_ms": 4000,
            }),
        )
        .plugin_config(
            "ratelimit",
            serde_json::json!({"rules": {
                "api": api,
                "login": {"algorithm": "sliding_log", "limit": 5, "window_ms": 600000},
            }}),
        )
        .start()
        .await
        .expect("cluster");
        let c = Cluster { nodes };
        // Ready once config answers a linearizable read through every node.
        for id in c.nodes.ids() {
            wait_for(&format!("config through {id}"), DEADLINE, || async {
                c.config(&id, ConfigRequest::SchemaList).await.ok()
            })
            .await;
        }
        c
    }

    /// A new client presenting `identity`, trying every node.
    fn client(&self, identity: &str) -> Client {
        self.nodes
            .client_with(identity, self.nodes.endpoints(), CALL_TIMEOUT)
            .expect("client")
    }

    /// The client of node `id` presenting `identity` (made once: each keeps its connection).
    fn client_at(&self, identity: &str, id: &str) -> Arc<Client> {
        self.nodes
            .node_client(identity, id, CALL_TIMEOUT)
            .expect("client")
    }

    fn addr(&self, id: &str) -> SocketAddr {
        self.nodes.node(id).rpc_addr()
    }

    /// A config request through node `id` with the admin certificate, retrying errors after
    /// which the same request may succeed (a leader change on a loaded machine).
    async fn config(&self, id: &str, req: ConfigRequest) -> Result<ConfigResponse, ClientError> {
        self.config_as("cli", id, req).await
    }

    async fn config_as(
        &self,
        identity: &str,
        id: &str,
        req: ConfigRequest,
    ) -> Result<ConfigResponse, ClientError> {
        let client = self.client_at(identity, id);
        let t0 = Instant::now();
        loop {
            match client.call_at::<ConfigApi>(self.addr(id), &req).await {
                Err(ClientError::Rpc(e)) if transient(&e) && t0.elapsed() < DEADLINE => {
                    eprintln!("config through {id}: {e}; again")
                }
                r => return r,
            }
        }
    }

    async fn put(&self, id: &str, key: &str, value: &str) -> u64 {
        self.put_if(id, key, value, None).await.expect("put")
    }

    async fn put_if(
        &self,
        id: &str,
        key: &str,
        value: &str,
        if_revision: Option<u64>,
    ) -> Result<u64, ClientError> {
        let req = ConfigRequest::Put {
            key: key.into(),
            value: value.into(),
            if_revision,
        };
        match self.config(id, req).await? {
            ConfigResponse::Written { revision, op, .. } => {
                assert_eq!(op, Op::Put);
                Ok(revision)
            }
            other => panic!("unexpected answer to put: {other:?}"),
        }
    }

    async fn get(&self, id: &str, key: &str, revision: Option<u64>) -> Option<String> {
        match self
            .config(
                id,
                ConfigRequest::Get {
                    key: key.into(),
                    revision,
                },
            )
            .await
            .expect("get")
        {
            ConfigResponse::Value { value, .. } => value,
            other => panic!("unexpected answer to get: {other:?}"),
        }
    }

    async fn history(&self, id: &str, key: &str) -> Vec<Change> {
        match self
            .config(
                id,
                ConfigRequest::History {
                    key: key.into(),
                    limit: 1000,
                },
            )
            .await
            .expect("history")
        {
            ConfigResponse::History { changes, .. } => changes,
            other => panic!("unexpected answer to history: {other:?}"),
        }
    }

    async fn ratelimit(
        &self,
        id: &str,
        req: RatelimitRequest,
    ) -> Result<RatelimitResponse, ClientError> {
        self.client_at("cli", id)
            .call_at::<RatelimitApi>(self.addr(id), &req)
            .await
    }

    /// Whether a check of `key` under `rule` through node `id` is allowed.
    async fn check(&self, id: &str, rule: &str, key: &str) -> bool {
        let req = RatelimitRequest::Check {
            rule: rule.into(),
            key: key.into(),
            cost: 1,
        };
        match self.ratelimit(id, req).await.expect("check") {
            RatelimitResponse::Decision { decision, .. } => decision.allowed,
            other => panic!("unexpected answer to check: {other:?}"),
        }
    }

    /// The limit and source of `rule` on node `id` (`None`: no such rule there).
    async fn rule_on(&self, id: &str, rule: &str) -> Option<(u64, RuleSource)> {
        match self.ratelimit(id, RatelimitRequest::Rules).await {
            Ok(RatelimitResponse::Rules(r)) => {
                r.get(rule).map(|a| (a.rule.limit, a.source.clone()))
            }
            other => panic!("unexpected answer to rules: {other:?}"),
        }
    }

    async fn shutdown(self) {
        self.nodes.shutdown().await
    }
}

fn refused(r: &Result<impl std::fmt::Debug, ClientError>, needle: &str) -> bool {
    matches!(r, Err(ClientError::Rpc(RpcError::Refused(m))) if m.contains(needle))
}

fn unauthorized<T>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Rpc(RpcError::Unauthorized(_))))
}

/// The done-when of design 33: a `config put` of a rate-limit rule changes `ratelimit check`
/// on every node; counters of unchanged rules are kept; a restarted node converges; deleting
/// the key brings cluster.toml's rule back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_rule_put_through_config_changes_every_node() {
    let mut c = Cluster::new().await;
    let ids = c.nodes.ids();
    for id in &ids {
        let (limit, source) = c.rule_on(id, "api").await.expect("api rule");
        assert_eq!((limit, source), (100, RuleSource::ClusterToml), "on {id}");
    }
    // Two units of the unchanged `login` rule, counted before the reload.
    assert!(c.check("n1", "login", "keeper").await);
    assert!(c.check("n2", "login", "keeper").await);

    // `api` down to 2 per minute, and a new rule, through n1.
    let rule2 = r#"{"algorithm":"token_bucket","limit":2,"window_ms":60000}"#;
    let t0 = Instant::now();
    let rev = c.put("n1", "ratelimit/rules/api", rule2).await;
    let acked = t0.elapsed();
    let mut seen = Vec::new();
    for id in &ids {
        wait_for(&format!("{id} enforces api limit 2"), DEADLINE, || async {
            let r = c.rule_on(id, "api").await?;
            (r == (2, RuleSource::Config { revision: rev })).then_some(())
        })
        .await;
        seen.push((id.clone(), t0.elapsed()));
    }
    println!("put acked after {acked:?}; rule in force on (node, since put): {seen:?}");
    for id in &ids {
        let key = format!("user-via-{id}");
        assert!(c.check(id, "api", &key).await, "1st through {id}");
        assert!(c.check(id, "api", &key).await, "2nd through {id}");
        assert!(
            !c.check(id, "api", &key).await,
            "3rd through {id} must be limited"
        );
    }
    // The unchanged rule kept its count: 2 used, so 3 more, then limited.
    for i in 0..3 {
        assert!(c.check(&ids[i % 3], "login", "keeper").await, "login {i}");
    }
    assert!(
        !c.check("n3", "login", "keeper").await,
        "login counter was reset"
    );

    // A rule that only config has, added through n2.
    let rev_new = c
        .put(
            "n2",
            "ratelimit/rules/burst",
            r#"{"algorithm":"fixed_window","limit":1,"window_ms":600000}"#,
        )
        .await;
    for id in &ids {
        wait_for(&format!("{id} knows burst"), DEADLINE, || async {
            let r = c.rule_on(id, "burst").await?;
            (r == (1, RuleSource::Config { revision: rev_new })).then_some(())
        })
        .await;
    }
    assert!(c.check("n3", "burst", "b").await);
    assert!(!c.check("n1", "burst", "b").await);

    // A node that restarts serves cluster.toml's rules at first, then converges on config's.
    c.nodes.restart("n3").await.expect("restart n3");
    assert!(
        c.nodes.wait_converged(DEADLINE).await,
        "restarted n3 and the others did not see each other alive"
    );
    wait_for(
        "restarted n3 enforces config's api rule",
        DEADLINE,
        || async {
            let r = c.rule_on("n3", "api").await?;
            (r == (2, RuleSource::Config { revision: rev })).then_some(())
        },
    )
    .await;

    // Deleting the config key brings cluster.toml's rule back everywhere.
    let del = c
        .config(
            "n3",
            ConfigRequest::Delete {
                key: "ratelimit/rules/api".into(),
                if_revision: None,
            },
        )
        .await
        .expect("delete");
    assert!(
        matches!(del, ConfigResponse::Written { op: Op::Delete, .. }),
        "{del:?}"
    );
    for id in &ids {
        wait_for(
            &format!("{id} back on cluster.toml's api"),
            DEADLINE,
            || async {
                let r = c.rule_on(id, "api").await?;
                (r == (100, RuleSource::ClusterToml)).then_some(())
            },
        )
        .await;
        // The rule changed, so the limited key starts afresh under the old limit.
        assert!(c.check(id, "api", &format!("user-via-{id}")).await, "{id}");
    }
    c.shutdown().await;
}

/// Every write is a revision in the key's history (value, previous value, time); reads in
/// the past; rollback writes an old value as a new revision; compare-and-set is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rollback_and_compare_and_set() {
    let c = Cluster::new().await;
    let r1 = c.put("n1", "app/db/url", "postgres://a").await;
    let r2 = c.put("n2", "app/db/url", "postgres://b").await;
    let r3 = c.put("n3", "app/db/url", "postgres://c").await;
    assert!(r1 < r2 && r2 < r3);
    let h = c.history("n2", "app/db/url").await;
    let got: Vec<(u64, Option<&str>, Option<&str>)> = h
        .iter()
        .map(|c| {
            (
                c.revision,
                c.entry.prev.as_deref(),
                c.entry.value.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (r1, None, Some("postgres://a")),
            (r2, Some("postgres://a"), Some("postgres://b")),
            (r3, Some("postgres://b"), Some("postgres://c")),
        ]
    );
    assert!(
        h.iter().all(|c| c.entry.time_ms > 1_600_000_000_000),
        "{h:?}"
    );
    assert_eq!(
        c.get("n3", "app/db/url", Some(r1)).await.as_deref(),
        Some("postgres://a")
    );
    assert_eq!(
        c.get("n3", "app/db/url", Some(r3 - 1)).await.as_deref(),
        Some("postgres://b")
    );
    assert_eq!(c.get("n3", "app/db/url", Some(r1 - 1)).await, None);

    // Rollback to r1: a new revision holding r1's value.
    let rb = c
        .config(
            "n1",
            ConfigRequest::Rollback {
                key: "app/db/url".into(),
                to_revision: r1,
            },
        )
        .await
        .expect("rollback");
    let ConfigResponse::Written {
        revision: r4, prev, ..
    } = rb
    else {
        panic!("unexpected answer to rollback: {rb:?}")
    };
    assert!(r4 > r3);
    assert_eq!(prev.as_deref(), Some("postgres://c"));
    assert_eq!(
        c.get("n2", "app/db/url", None).await.as_deref(),
        Some("postgres://a")
    );
    let h = c.history("n1", "app/db/url").await;
    assert_eq!(h.len(), 4);
    assert_eq!(h[3].entry.rollback_of, Some(r1));
    assert_eq!(h[3].revision, r4);
    // Rolling back to before the key existed is refused, and changes nothing.
    let r = c
        .config(
            "n1",
            ConfigRequest::Rollback {
                key: "app/db/url".into(),
                to_revision: r1 - 1,
            },
        )
        .await;
    assert!(refused(&r, "did not exist"), "{r:?}");

    // Compare-and-set: a stale revision is refused and nothing is written.
    let stale = c.put_if("n2", "app/db/url", "postgres://x", Some(r3)).await;
    assert!(
        refused(&stale, &format!("at revision {r4}, not {r3}")),
        "{stale:?}"
    );
    assert_eq!(
        c.get("n3", "app/db/url", None).await.as_deref(),
        Some("postgres://a")
    );
    let r5 = c
        .put_if("n2", "app/db/url", "postgres://y", Some(r4))
        .await
        .expect("cas at the current revision");
    assert!(r5 > r4);
    // --if-revision 0: create only.
    let exists = c.put_if("n1", "app/db/url", "z", Some(0)).await;
    assert!(refused(&exists, "not 0"), "{exists:?}");
    c.put_if("n1", "app/new", "1", Some(0))
        .await
        .expect("create");

    // Concurrent writers of one key from every node: every write is in the history once,
    // each entry's previous value is the one before it.
    let mut tasks = Vec::new();
    for (i, id) in ["n1", "n2", "n3"].into_iter().enumerate() {
        let client = c.client("cli");
        let addr = c.addr(id);
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for j in 0..5 {
                let req = ConfigRequest::Put {
                    key: "app/hot".into(),
                    value: format!("w{i}-{j}"),
                    if_revision: None,
                };
                match client.call_at::<ConfigApi>(addr, &req).await {
                    Ok(ConfigResponse::Written { revision, .. }) => revs.push(revision),
                    other => panic!("concurrent put: {other:?}"),
                }
            }
            revs
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("writer"));
    }
    acked.sort();
    let h = c.history("n1", "app/hot").await;
    let revs: Vec<u64> = h.iter().map(|c| c.revision).collect();
    assert_eq!(revs, acked);
    for w in h.windows(2) {
        assert_eq!(w[1].entry.prev, w[0].entry.value, "{w:?}");
    }
    c.shutdown().await;
}

/// Values are validated against the type of the longest declared prefix; a refused value is
/// never stored (no value, no history); types that existing values break are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_refuses_bad_values_and_stores_nothing() {
    let c = Cluster::new().await;
    let schema = |prefix: &str, t: &str| ConfigRequest::SchemaSet {
        prefix: prefix.into(),
        value_type: t.into(),
    };
    c.config("n1", schema("svc/", "json"))
        .await
        .expect("svc/ json");
    c.config("n2", schema("svc/db/port", "int:1..65535"))
        .await
        .expect("port int");
    c.config("n3", schema("svc/feature/", "bool"))
        .await
        .expect("bool");
    c.config("n1", schema("svc/timeout", "duration"))
        .await
        .expect("duration");

    let bad: &[(&str, &str, &str)] = &[
        ("svc/db/port", "70000", "out of range 1..65535"),
        ("svc/db/port", "eighty", "not an integer"),
        ("svc/feature/dark", "yes", "not a bool"),
        ("svc/timeout", "5", "not a duration"),
        ("svc/other", "{not json", "not JSON"),
        (
            "ratelimit/rules/bad",
            r#"{"algorithm":"token_bucket","limit":0,"window_ms":1000}"#,
            "limit must be between 1",
        ),
        (
            "ratelimit/rules/worse",
            "100 per second",
            "not a rate-limit rule",
        ),
        (
            "ratelimit/rules/a/b",
            r#"{"algorithm":"token_bucket","limit":1,"window_ms":1000}"#,
            "one segment",
        ),
        ("bad#key", "1", "holds '#'"),
    ];
    for (key, value, why) in bad {
        let r = c.put_if("n2", key, value, None).await;
        assert!(refused(&r, why), "{key}={value}: {r:?}");
    }
    // Nothing of them was stored, in values or in history.
    for (key, _, _) in bad.iter().filter(|(k, _, _)| !k.contains('#')) {
        assert_eq!(c.get("n3", key, None).await, None, "{key}");
        assert!(c.history("n1", key).await.is_empty(), "{key}");
    }
    let list = c
        .config(
            "n1",
            ConfigRequest::List {
                prefix: "".into(),
                limit: 100,
            },
        )
        .await
        .expect("list");
    assert!(
        matches!(&list, ConfigResponse::List { items, .. } if items.is_empty()),
        "{list:?}"
    );

    // Good values pass; the longest prefix wins (svc/db/port is an int, not JSON... which an
    // int also is, so check the other way round too).
    c.put("n1", "svc/db/port", "5432").await;
    c.put("n1", "svc/feature/dark", "true").await;
    c.put("n1", "svc/timeout", "1s 500ms").await;
    c.put("n1", "svc/other", r#"{"replicas":3}"#).await;
    c.put(
        "n1",
        "ratelimit/rules/good",
        r#"{"algorithm":"sliding_counter","limit":50,"window_ms":1000}"#,
    )
    .await;

    // A type that a stored value breaks is refused; bad type specs and the system's prefix too.
    let r = c.config("n2", schema("svc/", "bool")).await;
    assert!(refused(&r, "svc/other"), "{r:?}");
    // ... but a key governed by a longer declared prefix does not count against it.
    c.config("n2", schema("svc/db/", "bool"))
        .await
        .expect("svc/db/ bool");
    let r = c.config("n2", schema("svc/x", "integer")).await;
    assert!(refused(&r, "unknown type"), "{r:?}");
    let r = c.config("n2", schema("ratelimit/rules/", "string")).await;
    assert!(refused(&r, "typed by the system"), "{r:?}");
    let r = c
        .config(
            "n2",
            ConfigRequest::SchemaDelete {
                prefix: "ratelimit/rules/".into(),
            },
        )
        .await;
    assert!(refused(&r, "typed by the system"), "{r:?}");
    // After removing the bool type, the prefix falls back to svc/'s json.
    c.config(
        "n2",
        ConfigRequest::SchemaDelete {
            prefix: "svc/feature/".into(),
        },
    )
    .await
    .expect("schema del");
    let r = c.put_if("n3", "svc/feature/dark", "maybe", None).await;
    assert!(refused(&r, "not JSON"), "{r:?}");
    c.put("n3", "svc/feature/dark", "false").await;
    c.shutdown().await;
}

/// The read-only certificate, through the real transport: reads and watches are served,
/// every write is refused on every node and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_reads_and_watches_but_every_write_is_refused() {
    let c = Cluster::new().await;
    let r1 = c.put("n1", "app/mode", "blue").await;
    let reads = [
        ConfigRequest::Get {
            key: "app/mode".into(),
            revision: None,
        },
        ConfigRequest::Get {
            key: "app/mode".into(),
            revision: Some(r1),
        },
        ConfigRequest::List {
            prefix: "app/".into(),
            limit: 10,
        },
        ConfigRequest::History {
            key: "app/mode".into(),
            limit: 10,
        },
        ConfigRequest::SchemaList,
        ConfigRequest::Watch {
            prefix: "app/".into(),
            from_revision: r1,
            wait_ms: 1000,
        },
    ];
    for id in ["n1", "n2", "n3"] {
        for req in &reads {
            let r = c.config_as("reader", id, req.clone()).await;
            assert!(r.is_ok(), "reader {req:?} through {id}: {r:?}");
        }
    }
    let watched = c
        .config_as(
            "reader",
            "n2",
            ConfigRequest::Watch {
                prefix: "app/".into(),
                from_revision: r1,
                wait_ms: 1000,
            },
        )
        .await
        .expect("watch");
    assert!(
        matches!(&watched, ConfigResponse::Changes { changes, .. }
            if changes.len() == 1 && changes[0].entry.value.as_deref() == Some("blue")),
        "{watched:?}"
    );
    let writes = [
        ConfigRequest::Put {
            key: "app/mode".into(),
            value: "green".into(),
            if_revision: None,
        },
        ConfigRequest::Put {
            key: "app/new".into(),
            value: "x".into(),
            if_revision: None,
        },
        ConfigRequest::Delete {
            key: "app/mode".into(),
            if_revision: None,
        },
        ConfigRequest::Rollback {
            key: "app/mode".into(),
            to_revision: r1,
        },
        ConfigRequest::SchemaSet {
            prefix: "app/".into(),
            value_type: "int".into(),
        },
        ConfigRequest::SchemaDelete {
            prefix: "app/".into(),
        },
    ];
    for id in ["n1", "n2", "n3"] {
        for req in &writes {
            let r = c.config_as("reader", id, req.clone()).await;
            assert!(unauthorized(&r), "reader {req:?} through {id}: {r:?}");
        }
    }
    assert_eq!(c.get("n3", "app/mode", None).await.as_deref(), Some("blue"));
    assert_eq!(c.get("n3", "app/new", None).await, None);
    assert_eq!(c.history("n2", "app/mode").await.len(), 1);
    let schemas = c
        .config("n1", ConfigRequest::SchemaList)
        .await
        .expect("schemas");
    assert!(
        matches!(&schemas, ConfigResponse::Schemas(v) if v.iter().all(|s| s.builtin)),
        "{schemas:?}"
    );
    c.shutdown().await;
}

/// A watch from a revision sees every change under its prefix, in revision order, with the
/// right old and new values; nothing from outside the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_revision_sees_every_change_in_order() {
    let c = Cluster::new().await;
    let ids = ["n1", "n2", "n3"];
    let mut written: Vec<(u64, String, Option<String>)> = Vec::new();
    for i in 0..24usize {
        let id = ids[i % 3];
        let key = format!("app/k{}", i % 4);
        if i % 7 == 6 {
            let r = c
                .config(
                    id,
                    ConfigRequest::Delete {
                        key: key.clone(),
                        if_revision: None,
                    },
                )
                .await
                .expect("delete");
            let ConfigResponse::Written { revision, .. } = r else {
                panic!("{r:?}")
            };
            written.push((revision, key, None));
        } else {
            let value = format!("v{i}");
            let revision = c.put(id, &key, &value).await;
            written.push((revision, key, Some(value)));
        }
        // Changes outside the prefix are not seen.
        c.put(id, &format!("other/k{i}"), "x").await;
    }
    let first = written[0].0;
    let client = c.client("reader");
    let mut seen: Vec<Change> = Vec::new();
    let mut from = first;
    let t0 = Instant::now();
    while seen.len() < written.len() {
        assert!(t0.elapsed() < DEADLINE, "saw only {seen:?}");
        let req = ConfigRequest::Watch {
            prefix: "app/".into(),
            from_revision: from,
            wait_ms: 1000,
        };
        match client.call::<ConfigApi>(&req).await {
            Ok(ConfigResponse::Changes {
                changes,
                next_revision,
            }) => {
                seen.extend(changes);
                from = next_revision;
            }
            Err(ClientError::Rpc(e)) if transient(&e) => eprintln!("watch: {e}; again"),
            other => panic!("unexpected answer to watch: {other:?}"),
        }
    }
    let got: Vec<(u64, String, Option<String>)> = seen
        .iter()
        .map(|c| (c.revision, c.key.clone(), c.entry.value.clone()))
        .collect();
    assert_eq!(got, written);
    // Old -> new: each change's old value is the previous new value of its key.
    let mut last: BTreeMap<String, Option<String>> = BTreeMap::new();
    for ch in &seen {
        assert_eq!(&ch.entry.prev, last.get(&ch.key).unwrap_or(&None), "{ch:?}");
        last.insert(ch.key.clone(), ch.entry.value.clone());
    }
    c.shutdown().await;
}

/// Not a test: how long after a `config put` every node enforces the new rule. Prints
/// p50/p99 over 30 puts (polling each node's rules every 5 ms, so figures are that coarse).
/// `cargo test -p dsys-plugin-config --test config -- --ignored --nocapture reload_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn reload_latency() {
    let c = Cluster::new().await;
    let ids = c.nodes.ids();
    let (mut acks, mut all) = (Vec::new(), Vec::new());
    for i in 0..30u64 {
        let rule = format!(
            r#"{{"algorithm":"token_bucket","limit":{},"window_ms":1000}}"#,
            10 + i
        );
        let t0 = Instant::now();
        let rev = c
            .put(&ids[i as usize % 3], "ratelimit/rules/bench", &rule)
            .await;
        acks.push(t0.elapsed());
        for id in &ids {
            let t = Instant::now();
            loop {
                let r = c.rule_on(id, "bench").await;
                if r == Some((10 + i, RuleSource::Config { revision: rev })) {
                    break;
                }
                assert!(t.elapsed() < DEADLINE, "{id} never saw rev {rev}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        all.push(t0.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        dsys_runtime::percentile(v, p as f64 / 100.0).unwrap_or_default()
    };
    println!(
        "config put acked: p50 {:?} p99 {:?}; rule in force on all {} nodes after the put: p50 {:?} p99 {:?} (n = {})",
        pct(&mut acks, 50),
        pct(&mut acks, 99),
        ids.len(),
        pct(&mut all, 50),
        pct(&mut all, 99),
        all.len()
    );
    c.shutdown().await;
}
