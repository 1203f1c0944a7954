//! dsys plugin 26, `lock`: distributed locks as a thin client of the `consensus` plugin, the
//! way etcd's `concurrency.Mutex` uses etcd and ZooKeeper's lock recipe uses ZooKeeper.
//!
//! Keys: a contender for lock `NAME` owns `lock/NAME/l/<lease>` (anonymous) or
//! `lock/NAME/h/<holder id>` (a holder id, reentrant), attached to its own lease. The key
//! with the lowest create revision holds the lock; its create revision is the fencing token.
//! Modules: [`recipe`] (queue order, predecessor watch, lease sessions; shared with the
//! `election` plugin), [`api`] (wire types and the CLI), `run` (`dsys lock run`). This file
//! wires them: acquire, release, keep-alive, status, the dashboard panel.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod recipe;
mod run;

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dsys_plugin_consensus::state::KeyValue;
use dsys_runtime::{Caller, Panel, Plugin, PluginContext, RpcError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use api::{
    check_holder, check_name, Contender, LockApi, LockCommand, LockRequest, LockResponse,
    LockStatus, RunArgs, MAX_TTL_MS, MAX_WAIT_MS, MIN_TTL_MS,
};
pub use recipe::{Consensus, Sessions};
pub use run::{run_locked, RunError};

use recipe::{queue, Abandon};

/// Prefix of every lock key.
pub const PREFIX: &str = "lock/";
/// How often the dashboard's view of all locks is refreshed.
const VIEW_REFRESH: Duration = Duration::from_secs(2);
/// Most attempts of a reentrant acquire that races with itself.
const MAX_RACES: usize = 16;

/// The keys of lock `name` start with this.
pub fn lock_prefix(name: &str) -> String {
    format!("{PREFIX}{name}/")
}

/// What a contender's key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    holder: Option<String>,
    node: String,
    count: u32,
}

impl Entry {
    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn contender(kv: &KeyValue) -> Contender {
    let e: Entry = serde_json::from_str(&kv.value).unwrap_or(Entry {
        holder: None,
        node: "?".into(),
        count: 1,
    });
    Contender {
        key: kv.key.clone(),
        token: kv.create_revision,
        holder: e.holder,
        node: e.node,
        lease: kv.lease.unwrap_or(0),
        count: e.count.max(1),
    }
}

fn status_of(name: &str, kvs: Vec<KeyValue>, revision: u64) -> LockStatus {
    let mut q = queue(kvs)
        .iter()
        .map(contender)
        .collect::<Vec<_>>()
        .into_iter();
    LockStatus {
        name: name.to_string(),
        holder: q.next(),
        waiters: q.collect(),
        revision,
    }
}

/// A contender this node keeps alive (dashboard).
#[derive(Debug, Clone)]
struct Held {
    name: String,
    token: u64,
    holder: Option<String>,
    granted: bool,
}

struct Inner {
    me: String,
    cx: Consensus,
    sessions: Sessions<Held>,
    /// Every lock as this node last read it (for the dashboard).
    view: Mutex<Vec<LockStatus>>,
    grants: std::sync::atomic::AtomicU64,
}

/// The plugin.
pub struct LockPlugin {
    inner: Arc<Inner>,
}

impl Inner {
    async fn status(&self, name: &str) -> Result<LockStatus, RpcError> {
        let (kvs, revision) = self.cx.range(&lock_prefix(name), false).await?;
        Ok(status_of(name, kvs, revision))
    }

    async fn acquire(
        &self,
        name: &str,
        ttl_ms: u64,
        wait_ms: u64,
        holder: Option<String>,
        keepalive: bool,
    ) -> Result<LockResponse, RpcError> {
        let prefix = lock_prefix(name);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let entry = Entry {
            holder: holder.clone(),
            node: self.me.clone(),
            count: 1,
        };
        for _ in 0..MAX_RACES {
            let (key, lease) = match &holder {
                Some(h) => {
                    let key = format!("{prefix}h/{h}");
                    let (kvs, _) = self.cx.range(&prefix, false).await?;
                    let q = queue(kvs);
                    if let Some(mine) = q.iter().find(|kv| kv.key == key) {
                        // Reentrancy: the holder acquires again; one more level on its grant.
                        if q[0].key != key {
                            return Err(RpcError::refused(format!(
                                "holder `{h}` is already waiting for lock {name} (token {})",
                                mine.create_revision
                            )));
                        }
                        let mut e = contender(mine);
                        e.count += 1;
                        let value = Entry {
                            holder: holder.clone(),
                            node: e.node.clone(),
                            count: e.count,
                        };
                        if self
                            .cx
                            .update(&key, mine.mod_revision, &value.encode(), mine.lease)
                            .await?
                        {
                            // Renew the grant's lease (the first acquire's) and report its TTL.
                            let ttl_ms = match self.cx.keep_alive(e.lease).await {
                                Ok(t) => t,
                                Err(err) => {
                                    tracing::info!("renewing a reentrant grant of {name}: {err}");
                                    ttl_ms
                                }
                            };
                            return Ok(LockResponse::Granted {
                                name: name.to_string(),
                                token: mine.create_revision,
                                lease: e.lease,
                                count: e.count,
                                ttl_ms,
                            });
                        }
                        continue; // it changed under us: read again
                    }
                    let lease = self.cx.grant(ttl_ms).await?;
                    (key, lease)
                }
                None => {
                    let lease = self.cx.grant(ttl_ms).await?;
                    (format!("{prefix}l/{lease:016x}"), lease)
                }
            };
            let info = Held {
                name: name.to_string(),
                token: 0,
                holder: holder.clone(),
                granted: false,
            };
            self.sessions.start(&self.cx, lease, ttl_ms, info.clone());
            let guard = Abandon::new(&self.cx, &self.sessions, lease);
            let Some(token) = self.cx.create(&key, &entry.encode(), lease).await? else {
                continue; // the same holder id raced in: the guard revokes our lease
            };
            self.sessions.set_info(
                lease,
                Held {
                    token,
                    ..info.clone()
                },
            );
            let Some(mine) = self.cx.wait_head(&prefix, &key, deadline).await? else {
                guard.release().await;
                let st = self.status(name).await?;
                return Ok(LockResponse::NotAcquired {
                    name: name.to_string(),
                    holder: st.holder,
                });
            };
            guard.disarm();
            if keepalive {
                self.sessions.set_info(
                    lease,
                    Held {
                        token,
                        granted: true,
                        ..info
                    },
                );
            } else {
                // The caller keeps it alive from now on; it gets one full TTL from the grant.
                self.sessions.stop(lease);
                // Best effort: the grant stands either way (the lease then lives out the rest
                // of the TTL its session last renewed).
                if let Err(e) = self.cx.keep_alive(lease).await {
                    tracing::info!(lease, "keep-alive at the grant of lock {name}: {e}");
                }
            }
            self.grants
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(LockResponse::Granted {
                name: name.to_string(),
                token: mine.create_revision,
                lease,
                count: 1,
                ttl_ms,
            });
        }
        Err(RpcError::Unreachable(format!(
            "lock {name}: lost {MAX_RACES} races with the same holder id; try again"
        )))
    }

    async fn find(&self, name: &str, token: u64) -> Result<KeyValue, RpcError> {
        let (kvs, _) = self.cx.range(&lock_prefix(name), false).await?;
        kvs.into_iter()
            .find(|kv| kv.create_revision == token)
            .ok_or_else(|| {
                RpcError::refused(format!(
                    "lock {name} has no grant or waiter with token {token} (released, or its lease expired)"
                ))
            })
    }

    async fn release(&self, name: &str, token: u64) -> Result<LockResponse, RpcError> {
        for _ in 0..MAX_RACES {
            let kv = self.find(name, token).await?;
            let c = contender(&kv);
            if c.count > 1 {
                let value = Entry {
                    holder: c.holder.clone(),
                    node: c.node.clone(),
                    count: c.count - 1,
                };
                if self
                    .cx
                    .update(&kv.key, kv.mod_revision, &value.encode(), kv.lease)
                    .await?
                {
                    return Ok(LockResponse::Released {
                        token,
                        remaining: c.count - 1,
                    });
                }
                continue;
            }
            self.sessions.stop(c.lease);
            match self.cx.revoke(c.lease).await {
                Ok(()) => {}
                // Gone meanwhile (expired): the lock is free all the same, but say so.
                Err(RpcError::Refused(m)) => {
                    return Err(RpcError::refused(format!(
                        "grant {token} of lock {name} was already gone: {m}"
                    )))
                }
                Err(e) => return Err(e),
            }
            return Ok(LockResponse::Released {
                token,
                remaining: 0,
            });
        }
        Err(RpcError::Unreachable(format!(
            "lock {name}: grant {token} kept changing; try again"
        )))
    }

    async fn keep_alive(&self, name: &str, token: u64) -> Result<LockResponse, RpcError> {
        let kv = self.find(name, token).await?;
        let ttl_ms = self.cx.keep_alive(kv.lease.unwrap_or(0)).await?;
        Ok(LockResponse::Kept { token, ttl_ms })
    }
}

/// Read every lock (this node's replica, serializable) for the dashboard.
async fn refresh_view(weak: Weak<Inner>) {
    loop {
        tokio::time::sleep(VIEW_REFRESH).await;
        let Some(inner) = weak.upgrade() else { return };
        let Ok((kvs, revision)) = inner.cx.range(PREFIX, true).await else {
            continue;
        };
        let view = recipe::group_by_name(PREFIX, kvs)
            .into_iter()
            .map(|(name, kvs)| status_of(&name, kvs, revision))
            .collect();
        *inner.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

#[async_trait::async_trait]
impl Plugin for LockPlugin {
    type Api = LockApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let inner = Arc::new(Inner {
            me: ctx.node_id.clone(),
            cx: Consensus::new(ctx.rpc.clone()),
            sessions: Sessions::default(),
            view: Mutex::new(Vec::new()),
            grants: Default::default(),
        });
        tokio::spawn(refresh_view(Arc::downgrade(&inner)));
        Ok(LockPlugin { inner })
    }

    async fn handle(&self, _caller: Caller, req: LockRequest) -> Result<LockResponse, RpcError> {
        req.validate()?;
        let i = &self.inner;
        match req {
            LockRequest::Acquire {
                name,
                ttl_ms,
                wait_ms,
                holder,
                keepalive,
            } => i.acquire(&name, ttl_ms, wait_ms, holder, keepalive).await,
            LockRequest::KeepAlive { name, token } => i.keep_alive(&name, token).await,
            LockRequest::Release { name, token } => i.release(&name, token).await,
            LockRequest::Status { name } => Ok(LockResponse::Status(i.status(&name).await?)),
        }
    }

    fn panel(&self) -> Option<Panel> {
        let i = &self.inner;
        let sessions = i.sessions.list();
        let view = i.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let held_here = sessions.iter().filter(|(_, h)| h.granted).count();
        let rows = view.iter().map(|s| {
            let h = s.holder.as_ref();
            vec![
                s.name.clone(),
                h.map(|h| h.holder.clone().unwrap_or_else(|| "anonymous".into()))
                    .unwrap_or_else(|| "-".into()),
                h.map(|h| h.node.clone()).unwrap_or_else(|| "-".into()),
                h.map(|h| h.token.to_string()).unwrap_or_else(|| "-".into()),
                s.waiters.len().to_string(),
            ]
        });
        let mine = sessions.iter().map(|(lease, h)| {
            vec![
                h.name.clone(),
                if h.granted { "holds" } else { "waits" }.to_string(),
                h.holder.clone().unwrap_or_else(|| "anonymous".into()),
                h.token.to_string(),
                lease.to_string(),
            ]
        });
        Some(
            Panel::new("Locks (lease-backed, fencing tokens)")
                .stat("locks known", view.len())
                .stat("held via this node", held_here)
                .stat("waiting via this node", sessions.len() - held_here)
                .stat(
                    "grants since start",
                    i.grants.load(std::sync::atomic::Ordering::Relaxed),
                )
                .table(
                    "Locks (this replica, refreshed every 2 s)",
                    &["lock", "holder", "node", "token", "waiters"],
                    rows,
                )
                .table(
                    "Leases kept alive by this node",
                    &["lock", "state", "holder", "token", "lease"],
                    mine,
                ),
        )
    }
}
