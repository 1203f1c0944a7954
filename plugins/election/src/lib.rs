//! dsys plugin 35, `election`: named leader elections as a thin client of the `consensus`
//! plugin, like etcd's `concurrency.Election` and ZooKeeper's leader recipe.
//!
//! A candidate of election `NAME` owns `election/NAME/<lease>`, attached to its own lease,
//! whose value names it; the key with the lowest create revision leads, and that revision is
//! the term (a fencing token). Candidates queue with the lock plugin's recipe
//! ([`dsys_plugin_lock::recipe`]): each watches only its predecessor. Modules: [`observe`]
//! (leader changes from watch events, pure), [`api`] (wire types and the CLI). This file
//! wires them: campaign, leader, observe, resign, the dashboard panel.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod observe;

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dsys_plugin_consensus::state::{Event, KeyValue};
use dsys_plugin_lock::recipe::{self, queue, Abandon, Consensus, Sessions};
use dsys_runtime::{Caller, Client, ClientError, Panel, Plugin, PluginContext, RpcError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use api::{
    check_name, leader_line, ElectionApi, ElectionCommand, ElectionRequest, ElectionResponse,
    LeaderInfo, MAX_VALUE_BYTES,
};
pub use observe::Observer;

/// Prefix of every election key.
pub const PREFIX: &str = "election/";
/// How often the dashboard's view of all elections is refreshed.
const VIEW_REFRESH: Duration = Duration::from_secs(2);
/// Longest wait for a lagging replica while collecting the events an observe replays.
const CATCH_UP: Duration = Duration::from_secs(5);

/// The keys of election `name` start with this.
pub fn election_prefix(name: &str) -> String {
    format!("{PREFIX}{name}/")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    value: String,
    node: String,
}

fn info(kv: &KeyValue) -> LeaderInfo {
    let e: Entry = serde_json::from_str(&kv.value).unwrap_or(Entry {
        value: kv.value.clone(),
        node: "?".into(),
    });
    LeaderInfo {
        value: e.value,
        term: kv.create_revision,
        node: e.node,
        lease: kv.lease.unwrap_or(0),
    }
}

/// A campaign this node keeps alive (dashboard).
#[derive(Debug, Clone)]
struct Campaign {
    name: String,
    value: String,
    term: u64,
    leading: bool,
}

struct Inner {
    me: String,
    timeline: Arc<dsys_runtime::Timeline>,
    cx: Consensus,
    sessions: Sessions<Campaign>,
    /// Every election as this node last read it: (name, leader, candidates).
    view: Mutex<Vec<(String, Option<LeaderInfo>, usize)>>,
    /// The panel was asked for: the view is refreshed while someone looks (see
    /// [`refresh_view`]), not read from consensus every 2 s by every idle node.
    watched: Arc<tokio::sync::Notify>,
}

/// The plugin.
pub struct ElectionPlugin {
    inner: Arc<Inner>,
}

impl Drop for ElectionPlugin {
    fn drop(&mut self) {
        // Ends a `refresh_view` waiting for a look: it finds the plugin gone.
        self.inner.watched.notify_one();
    }
}

impl Inner {
    async fn leader(&self, name: &str) -> Result<ElectionResponse, RpcError> {
        let (kvs, _) = self.cx.range(&election_prefix(name), false).await?;
        let q = queue(kvs);
        Ok(ElectionResponse::Leader {
            name: name.to_string(),
            leader: q.first().map(info),
            candidates: q.len().saturating_sub(1) as u32,
        })
    }

    async fn campaign(
        &self,
        name: &str,
        value: String,
        ttl_ms: u64,
        wait_ms: u64,
    ) -> Result<ElectionResponse, RpcError> {
        let prefix = election_prefix(name);
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        let lease = self.cx.grant(ttl_ms).await?;
        let mut c = Campaign {
            name: name.to_string(),
            value: value.clone(),
            term: 0,
            leading: false,
        };
        self.sessions.start(&self.cx, lease, ttl_ms, c.clone());
        let guard = Abandon::new(&self.cx, &self.sessions, lease);
        let key = format!("{prefix}{lease:016x}");
        let entry = Entry {
            value,
            node: self.me.clone(),
        };
        let value = serde_json::to_string(&entry)
            .map_err(|e| RpcError::Internal(format!("encoding a candidate: {e}")))?;
        let Some(term) = self.cx.create(&key, &value, lease).await? else {
            return Err(RpcError::Internal(format!("`{key}` exists already")));
        };
        c.term = term;
        self.sessions.set_info(lease, c.clone());
        match self.cx.wait_head(&prefix, &key, deadline).await? {
            Some(_) => {
                guard.disarm();
                c.leading = true;
                self.sessions.set_info(lease, c);
                self.timeline.record(
                    "election",
                    &self.me,
                    format!("elected leader of {name} (term {term})"),
                );
                Ok(ElectionResponse::Elected {
                    name: name.to_string(),
                    term,
                    lease,
                })
            }
            None => {
                guard.release().await;
                let ElectionResponse::Leader { leader, .. } = self.leader(name).await? else {
                    return Err(RpcError::Internal("leader read".into()));
                };
                Ok(ElectionResponse::NotElected {
                    name: name.to_string(),
                    leader,
                })
            }
        }
    }

    async fn resign(&self, name: &str, term: u64) -> Result<ElectionResponse, RpcError> {
        let (kvs, _) = self.cx.range(&election_prefix(name), false).await?;
        let Some(kv) = kvs.into_iter().find(|kv| kv.create_revision == term) else {
            return Err(RpcError::refused(format!(
                "election {name} has no candidate with term {term} (resigned, or its lease expired)"
            )));
        };
        let lease = kv.lease.unwrap_or(0);
        self.sessions.stop(lease);
        self.cx.revoke(lease).await.map_err(|e| match e {
            RpcError::Refused(m) => RpcError::refused(format!(
                "term {term} of election {name} was already over: {m}"
            )),
            e => e,
        })?;
        Ok(ElectionResponse::Resigned { term })
    }

    /// Every event under `prefix` with revision in `from..=to`, paging and waiting
    /// (boundedly) for a replica that has not applied `to` yet.
    async fn events_between(
        &self,
        prefix: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Event>, RpcError> {
        let end = Instant::now() + CATCH_UP;
        let mut out = Vec::new();
        let mut at = from;
        let mut wait = 0;
        while at <= to {
            let (events, next) = self.cx.watch(prefix, true, at, wait).await?;
            out.extend(events.into_iter().filter(|e| e.revision <= to));
            if next <= at {
                if Instant::now() >= end {
                    return Err(RpcError::Unreachable(format!(
                        "the replica serving this watch did not reach revision {to}"
                    )));
                }
                wait = 500;
            }
            at = next.max(at);
        }
        Ok(out)
    }

    async fn observe(
        &self,
        name: &str,
        from: u64,
        wait_ms: u64,
    ) -> Result<ElectionResponse, RpcError> {
        let prefix = election_prefix(name);
        if from == 0 {
            let (kvs, revision) = self.cx.range(&prefix, false).await?;
            return Ok(ElectionResponse::Observed {
                changes: vec![queue(kvs).first().map(info)],
                next_revision: revision + 1,
            });
        }
        // The candidates now, stepped back to just before `from`, then replayed: every
        // change since `from`, none skipped.
        let (kvs, revision) = self.cx.range(&prefix, true).await?;
        let mut obs = Observer::new(kvs);
        let mut changes = Vec::new();
        if revision >= from {
            let events = self.events_between(&prefix, from, revision).await?;
            obs.undo(&events);
            changes = obs.apply(&events);
        } else if revision + 1 < from {
            // This replica is behind the caller: bring it up to `from - 1` silently.
            let events = self.events_between(&prefix, revision + 1, from - 1).await?;
            obs.apply(&events);
        }
        let mut next = from.max(revision + 1);
        if changes.is_empty() && wait_ms > 0 {
            let (events, n) = self.cx.watch(&prefix, true, next, wait_ms).await?;
            changes = obs.apply(&events);
            next = n.max(next);
        }
        Ok(ElectionResponse::Observed {
            changes: changes.iter().map(|l| l.as_ref().map(info)).collect(),
            next_revision: next,
        })
    }
}

/// Follow election `name` through `client`, calling `on_change` with each leader in turn
/// (the current one first); returns only on an error. For `dsys election observe`.
pub async fn observe(
    client: &Client,
    name: &str,
    wait_ms: u64,
    mut on_change: impl FnMut(&Option<LeaderInfo>),
) -> Result<(), ClientError> {
    let mut from = 0;
    loop {
        let req = ElectionRequest::Observe {
            name: name.to_string(),
            from_revision: from,
            wait_ms: if from == 0 { 0 } else { wait_ms },
        };
        match client.call::<ElectionApi>(&req).await? {
            ElectionResponse::Observed {
                changes,
                next_revision,
            } => {
                for c in &changes {
                    on_change(c);
                }
                from = next_revision;
            }
            other => {
                return Err(ClientError::Rpc(RpcError::Internal(format!(
                    "unexpected answer to observe: {other:?}"
                ))))
            }
        }
    }
}

/// Re-read every election for the panel every [`VIEW_REFRESH`] while the panel is being
/// asked for (the dashboard asks twice a second while it is open); asleep otherwise. The
/// first look after a quiet time shows the view of the last refresh and starts a new one.
async fn refresh_view(weak: Weak<Inner>) {
    loop {
        // Wait for a look (the permit of one made during the last sleep counts). The task
        // holds the `Notify`, not the plugin, so a stopped plugin is still dropped; its
        // last look ends the wait and the upgrade below ends the task.
        let Some(watched) = weak.upgrade().map(|i| i.watched.clone()) else {
            return;
        };
        watched.notified().await;
        let Some(inner) = weak.upgrade() else { return };
        let Ok((kvs, _)) = inner.cx.range(PREFIX, true).await else {
            continue;
        };
        let view = recipe::group_by_name(PREFIX, kvs)
            .into_iter()
            .map(|(name, kvs)| {
                let q = queue(kvs);
                (name, q.first().map(info), q.len().saturating_sub(1))
            })
            .collect();
        *inner.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
        drop(inner);
        tokio::time::sleep(VIEW_REFRESH).await;
    }
}

#[async_trait::async_trait]
impl Plugin for ElectionPlugin {
    type Api = ElectionApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let inner = Arc::new(Inner {
            me: ctx.node_id.clone(),
            timeline: ctx.timeline.clone(),
            cx: Consensus::new(ctx.rpc.clone()),
            sessions: Sessions::default(),
            view: Mutex::new(Vec::new()),
            watched: Arc::default(),
        });
        tokio::spawn(refresh_view(Arc::downgrade(&inner)));
        Ok(ElectionPlugin { inner })
    }

    async fn handle(
        &self,
        _caller: Caller,
        req: ElectionRequest,
    ) -> Result<ElectionResponse, RpcError> {
        req.validate()?;
        let i = &self.inner;
        match req {
            ElectionRequest::Campaign {
                name,
                value,
                ttl_ms,
                wait_ms,
            } => i.campaign(&name, value, ttl_ms, wait_ms).await,
            ElectionRequest::Leader { name } => i.leader(&name).await,
            ElectionRequest::Observe {
                name,
                from_revision,
                wait_ms,
            } => i.observe(&name, from_revision, wait_ms).await,
            ElectionRequest::Resign { name, term } => i.resign(&name, term).await,
        }
    }

    fn panel(&self) -> Option<Panel> {
        let i = &self.inner;
        i.watched.notify_one();
        let view = i.view.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mine = i.sessions.list();
        let leading = mine.iter().filter(|(_, c)| c.leading).count();
        let rows = view.iter().map(|(name, l, waiting)| {
            vec![
                name.clone(),
                l.as_ref().map_or("-".into(), |l| l.value.clone()),
                l.as_ref().map_or("-".into(), |l| l.node.clone()),
                l.as_ref().map_or("-".into(), |l| l.term.to_string()),
                waiting.to_string(),
            ]
        });
        let own = mine.iter().map(|(lease, c)| {
            vec![
                c.name.clone(),
                if c.leading { "leader" } else { "candidate" }.to_string(),
                c.value.clone(),
                c.term.to_string(),
                lease.to_string(),
            ]
        });
        Some(
            Panel::new("Elections (lease-backed, term = fencing token)")
                .stat("elections known", view.len())
                .stat("leading via this node", leading)
                .stat("campaigning via this node", mine.len() - leading)
                .table(
                    "Elections (this replica, refreshed every 2 s)",
                    &["election", "leader", "node", "term", "waiting"],
                    rows,
                )
                .table(
                    "Campaigns kept alive by this node",
                    &["election", "state", "value", "term", "lease"],
                    own,
                ),
        )
    }
}
