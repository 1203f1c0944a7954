//! `config` (design 33): a distributed configuration service. Versioned keys with history and
//! rollback, typed values validated on write, watches streamed to subscribers, writes only
//! from the admin certificate; all stored through the `consensus` plugin (Raft), of which
//! this plugin is a thin client ([`store`](crate::store), key layout in [`layout`]).
//! Nodes reload their own live settings from it: the `ratelimit` plugin follows
//! `ratelimit/rules/NAME` (see `dsys_plugin_ratelimit`'s reload module).
#![warn(missing_docs, unreachable_pub)]

mod api;
pub mod layout;
pub mod schema;
mod store;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsys_plugin_lock::recipe::transient;
use dsys_runtime::{Caller, Client, ClientError, Metrics, Panel, Plugin, PluginContext, RpcError};
use serde::Deserialize;

pub use api::{
    change_line, time_text, Change, ConfigApi, ConfigCommand, ConfigRequest, ConfigResponse, Item,
    SchemaCommand, SchemaEntry, MAX_LIST, MAX_WATCH_WAIT_MS,
};
pub use layout::{Entry, Op};
pub use schema::ValueType;

use crate::store::Store;

/// Default history entries kept per key.
const DEFAULT_HISTORY: u64 = 1000;
/// Most history entries kept per key (a key's history is read in one consensus range).
const MAX_HISTORY: u64 = 10_000;
/// Changes shown on the dashboard.
const RECENT: usize = 10;

/// `[plugins.config]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigConfig {
    /// History entries kept per key, 1..=10000 (default 1000): rollback reaches this far.
    pub history: u64,
}

/// What the dashboard shows, kept up to date by a watch of every change.
#[derive(Default)]
struct View {
    keys_written: u64,
    keys_more: bool,
    revision: u64,
    changes_seen: u64,
    recent: VecDeque<Change>,
    status: String,
}

/// The plugin instance.
pub struct ConfigPlugin {
    ctx: PluginContext,
    store: Store,
    view: Arc<Mutex<View>>,
    follower: tokio::task::JoinHandle<()>,
    writes: AtomicU64,
    refused: AtomicU64,
}

impl std::fmt::Debug for ConfigPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigPlugin({})", self.ctx.node_id)
    }
}

impl Drop for ConfigPlugin {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

fn refuse(e: String) -> RpcError {
    RpcError::Refused(e)
}

/// Refuse bad keys, prefixes, values and limits at the edge.
fn check(req: &ConfigRequest) -> Result<(), RpcError> {
    use ConfigRequest as R;
    match req {
        R::Get { key, .. } | R::Rollback { key, .. } | R::Delete { key, .. } => {
            layout::check_key(key).map_err(refuse)
        }
        R::History { key, limit } => {
            layout::check_key(key).map_err(refuse)?;
            if *limit == 0 || u64::from(*limit) > MAX_HISTORY {
                return Err(refuse(format!("--limit must be 1..={MAX_HISTORY}")));
            }
            Ok(())
        }
        R::Put { key, value, .. } => {
            layout::check_key(key).map_err(refuse)?;
            layout::check_value(value).map_err(refuse)
        }
        R::List { prefix, limit } => {
            layout::check_prefix(prefix).map_err(refuse)?;
            if *limit == 0 || *limit > MAX_LIST {
                return Err(refuse(format!("--limit must be 1..={MAX_LIST}")));
            }
            Ok(())
        }
        R::Watch {
            prefix, wait_ms, ..
        } => {
            layout::check_prefix(prefix).map_err(refuse)?;
            if *wait_ms > MAX_WATCH_WAIT_MS {
                return Err(refuse(format!(
                    "wait_ms must be at most {MAX_WATCH_WAIT_MS}"
                )));
            }
            Ok(())
        }
        R::SchemaSet { prefix, .. } | R::SchemaDelete { prefix } => {
            layout::check_prefix(prefix).map_err(refuse)
        }
        R::SchemaList => Ok(()),
    }
}

fn who(me: &str, caller: &Caller) -> String {
    match caller {
        Caller::Client => format!("{me}/admin"),
        Caller::Node(n) if n == me => format!("{me}/node"),
        Caller::Node(n) => format!("{me}/node {n}"),
        Caller::Reader => format!("{me}/reader"),
    }
}

impl ConfigPlugin {
    async fn serve(&self, caller: Caller, req: ConfigRequest) -> Result<ConfigResponse, RpcError> {
        check(&req)?;
        let by = || who(&self.ctx.node_id, &caller);
        match req {
            ConfigRequest::Get {
                key,
                revision: None,
            } => Ok(match self.store.get(&key).await? {
                Some(i) => ConfigResponse::Value {
                    key,
                    value: Some(i.value),
                    revision: i.revision,
                    at: None,
                },
                None => ConfigResponse::Value {
                    key,
                    value: None,
                    revision: 0,
                    at: None,
                },
            }),
            ConfigRequest::Get {
                key,
                revision: Some(at),
            } => {
                let value = self.store.get_at(&key, at).await?;
                Ok(ConfigResponse::Value {
                    key,
                    value,
                    revision: 0,
                    at: Some(at),
                })
            }
            ConfigRequest::List { prefix, limit } => {
                let (items, more, revision) = self.store.list(&prefix, limit).await?;
                Ok(ConfigResponse::List {
                    items,
                    more,
                    revision,
                })
            }
            ConfigRequest::History { key, limit } => {
                let (mut changes, complete) = self.store.history(&key).await?;
                let skip = changes.len().saturating_sub(limit as usize);
                changes.drain(..skip);
                Ok(ConfigResponse::History {
                    key,
                    changes,
                    trimmed: !complete || skip > 0,
                })
            }
            ConfigRequest::Watch {
                prefix,
                from_revision,
                wait_ms,
            } => {
                let (changes, next_revision) =
                    self.store.watch(&prefix, from_revision, wait_ms).await?;
                Ok(ConfigResponse::Changes {
                    changes,
                    next_revision,
                })
            }
            ConfigRequest::SchemaList => {
                Ok(ConfigResponse::Schemas(self.store.schema_list().await?))
            }
            ConfigRequest::Put {
                key,
                value,
                if_revision,
            } => {
                self.store.validate(&key, &value).await?;
                let (revision, prev) = self
                    .store
                    .write(&key, Some(value), if_revision, by(), None)
                    .await?;
                Ok(ConfigResponse::Written {
                    key,
                    op: Op::Put,
                    revision,
                    prev,
                })
            }
            ConfigRequest::Delete { key, if_revision } => {
                let (revision, prev) = self
                    .store
                    .write(&key, None, if_revision, by(), None)
                    .await?;
                Ok(ConfigResponse::Written {
                    key,
                    op: Op::Delete,
                    revision,
                    prev,
                })
            }
            ConfigRequest::Rollback { key, to_revision } => {
                let Some(value) = self.store.get_at(&key, to_revision).await? else {
                    return Err(refuse(format!(
                        "`{key}` did not exist at revision {to_revision}; to remove it use `dsys config del`"
                    )));
                };
                // The schema may have changed since: the old value must still be valid.
                self.store.validate(&key, &value).await?;
                let (revision, prev) = self
                    .store
                    .write(&key, Some(value), None, by(), Some(to_revision))
                    .await?;
                Ok(ConfigResponse::Written {
                    key,
                    op: Op::Put,
                    revision,
                    prev,
                })
            }
            ConfigRequest::SchemaSet { prefix, value_type } => {
                let t: ValueType = value_type.parse().map_err(refuse)?;
                let revision = self.store.schema_set(&prefix, t.clone()).await?;
                Ok(ConfigResponse::SchemaChanged {
                    prefix,
                    value_type: Some(t.to_string()),
                    revision,
                })
            }
            ConfigRequest::SchemaDelete { prefix } => {
                let revision = self.store.schema_delete(&prefix).await?;
                Ok(ConfigResponse::SchemaChanged {
                    prefix,
                    value_type: None,
                    revision,
                })
            }
        }
    }
}

/// Keep the dashboard's view: count the keys ever written, then follow every change.
async fn follow(store: Store, view: Arc<Mutex<View>>, wait_ms: u64) {
    let set = |f: &dyn Fn(&mut View)| f(&mut view.lock().unwrap_or_else(|p| p.into_inner()));
    let mut backoff = Duration::from_millis(100);
    loop {
        let (n, more, revision) = match store.count_keys_written().await {
            Ok(r) => r,
            Err(e) => {
                set(&|v| v.status = format!("consensus not reachable yet: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        set(&|v| {
            v.keys_written = n;
            v.keys_more = more;
            v.revision = v.revision.max(revision);
            v.status = "following".into();
        });
        let mut from = revision + 1;
        loop {
            match store.watch("", from, wait_ms).await {
                Ok((changes, next)) => {
                    set(&|v| {
                        for c in &changes {
                            v.revision = v.revision.max(c.revision);
                            v.changes_seen += 1;
                            v.recent.push_front(c.clone());
                            v.recent.truncate(RECENT);
                        }
                    });
                    if changes.iter().any(|c| c.entry.prev.is_none()) {
                        // Possibly a new key: count again (cheap: counters are tiny).
                        if let Ok((n, more, _)) = store.count_keys_written().await {
                            set(&|v| {
                                v.keys_written = n;
                                v.keys_more = more;
                            });
                        }
                    }
                    from = next;
                }
                Err(e) if transient(&e) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    set(&|v| v.status = format!("watch: {e}; reading again"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Plugin for ConfigPlugin {
    type Api = ConfigApi;

    fn read_only(req: &ConfigRequest) -> bool {
        req.is_read()
    }

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let mut cfg: ConfigConfig = ctx.plugin_config("config").map_err(|e| e.to_string())?;
        if cfg.history == 0 {
            cfg.history = DEFAULT_HISTORY;
        }
        if cfg.history > MAX_HISTORY {
            return Err(format!(
                "plugins.config.history must be 1..={MAX_HISTORY}, got {}",
                cfg.history
            ));
        }
        for (name, help) in [
            (
                "dsys_config_writes_total",
                "Config writes committed through this node",
            ),
            (
                "dsys_config_refused_writes_total",
                "Config writes refused by this node (invalid value, failed compare, bad input)",
            ),
        ] {
            ctx.metrics.describe(name, "counter", help);
        }
        let store = Store::new(ctx.rpc.clone(), cfg.history);
        let view = Arc::new(Mutex::new(View {
            status: "starting".into(),
            ..View::default()
        }));
        let wait_ms = (ctx.config.cluster.rpc_timeout_ms / 2).clamp(100, 5_000);
        let follower = tokio::spawn(follow(store.clone(), view.clone(), wait_ms));
        Ok(ConfigPlugin {
            ctx,
            store,
            view,
            follower,
            writes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    async fn handle(&self, caller: Caller, req: ConfigRequest) -> Result<ConfigResponse, RpcError> {
        let write = !req.is_read();
        let r = self.serve(caller, req).await;
        if write {
            match &r {
                Ok(_) => self.writes.fetch_add(1, Ordering::Relaxed),
                Err(RpcError::Refused(_)) => self.refused.fetch_add(1, Ordering::Relaxed),
                Err(_) => 0,
            };
        }
        r
    }

    fn export_metrics(&self, m: &Metrics) {
        m.set_counter(
            "dsys_config_writes_total",
            &[],
            self.writes.load(Ordering::Relaxed),
        );
        m.set_counter(
            "dsys_config_refused_writes_total",
            &[],
            self.refused.load(Ordering::Relaxed),
        );
    }

    fn panel(&self) -> Option<Panel> {
        let v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let keys = format!("{}{}", v.keys_written, if v.keys_more { "+" } else { "" });
        Some(
            Panel::new("Configuration service")
                .stat("keys written", keys)
                .stat("last change revision", v.revision)
                .stat("changes seen here", v.changes_seen)
                .stat("writes through here", self.writes.load(Ordering::Relaxed))
                .stat("refused writes", self.refused.load(Ordering::Relaxed))
                .stat("watch", &v.status)
                .table(
                    "Last changes",
                    &["revision", "time", "key", "old", "new", "by"],
                    v.recent.iter().map(|c| {
                        let short = |s: &Option<String>| match s {
                            None => "-".to_string(),
                            Some(s) if s.chars().count() > 40 => {
                                format!("{}...", s.chars().take(40).collect::<String>())
                            }
                            Some(s) => s.clone(),
                        };
                        vec![
                            c.revision.to_string(),
                            time_text(c.entry.time_ms),
                            c.key.clone(),
                            short(&c.entry.prev),
                            short(&c.entry.value),
                            c.entry.by.clone(),
                        ]
                    }),
                ),
        )
    }
}

/// `dsys config watch`: long-poll for changes under `prefix` from revision `from` on (0: from
/// now), calling `each` for every change in revision order; returns only on an error.
pub async fn watch(
    client: &Client,
    prefix: &str,
    mut from: u64,
    wait_ms: u64,
    mut each: impl FnMut(&Change),
) -> Result<(), ClientError> {
    loop {
        let req = ConfigRequest::Watch {
            prefix: prefix.to_string(),
            from_revision: from,
            wait_ms,
        };
        match client.call::<ConfigApi>(&req).await? {
            ConfigResponse::Changes {
                changes,
                next_revision,
            } => {
                changes.iter().for_each(&mut each);
                from = next_revision;
            }
            other => {
                return Err(ClientError::Rpc(RpcError::Internal(format!(
                    "unexpected answer to watch: {other:?}"
                ))))
            }
        }
    }
}
