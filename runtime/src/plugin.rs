//! The plugin seam and its host. A plugin is a type implementing [`Plugin`] (start, handle,
//! cluster events, optional HTTP routes) with request/response types named by an [`Api`].
//! Each plugin runs as a ractor actor under the node's supervisor actor, which restarts only
//! the plugin that failed, with exponential backoff, up to a restart intensity (5 in 30 s)
//! after which the plugin is marked failed and stays down. Requests are served on spawned
//! tasks over the running instance, so hot paths never queue behind one mailbox; a panic in a
//! request task restarts the plugin like a panic in the actor does.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::codec;
use crate::config::{ClusterConfig, ConfigError};
use crate::dashboard::Panel;
use crate::membership::{keys, ClusterEvent, MembershipHandle};
use crate::metrics::Metrics;
use crate::ring::Ring;
use crate::rpc::{in_scope, Caller, Rpc, RpcError, Scope};
use crate::timeline::Timeline;

/// Names a plugin and its wire types; implemented by a marker type in the plugin's `api.rs`,
/// so other plugins can call it without depending on its implementation.
pub trait Api: Send + Sync + 'static {
    /// Plugin name, as used on the wire and in the CLI.
    const NAME: &'static str;
    /// Request type.
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Response type.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;
}

/// A design running on every node.
#[async_trait::async_trait]
pub trait Plugin: Sized + Send + Sync + 'static {
    /// The plugin's name and wire types.
    type Api: Api;

    /// Build a fresh instance (also after a restart).
    async fn start(ctx: PluginContext) -> Result<Self, String>;

    /// Serve one request. Runs on its own task; many run at once.
    async fn handle(
        &self,
        caller: Caller,
        req: <Self::Api as Api>::Request,
    ) -> Result<<Self::Api as Api>::Response, RpcError>;

    /// Whether `req` only reads: the one kind of request a client with the read-only
    /// certificate ([`Caller::Reader`]) is served. Everything else is refused for it.
    fn read_only(_req: &<Self::Api as Api>::Request) -> bool {
        false
    }

    /// React to a membership change.
    async fn on_cluster_event(&self, _event: ClusterEvent) {}

    /// HTTP routes served by the node's gateway; they reach the plugin through `client`.
    fn routes(_client: LocalClient<Self::Api>) -> Option<axum::Router> {
        None
    }

    /// This plugin's panel on the dashboard: a few figures and tables about its state on
    /// this node, built from its shared state (cheap, no I/O; asked about twice a second).
    fn panel(&self) -> Option<Panel> {
        None
    }

    /// Put this plugin's own counts into the node's registry just before `/metrics` is
    /// rendered (with [`Metrics::set_counter`] / [`Metrics::set`]); for counts kept in the
    /// plugin's state rather than added to the registry as they happen.
    fn export_metrics(&self, _metrics: &Metrics) {}
}

/// What a plugin gets from the runtime.
#[derive(Clone, Debug)]
pub struct PluginContext {
    /// This node's id.
    pub node_id: String,
    /// The cluster configuration.
    pub config: Arc<ClusterConfig>,
    /// Calls to plugins on any node.
    pub rpc: Rpc,
    /// Membership and the ring.
    pub membership: MembershipHandle,
    /// The node's metrics registry.
    pub metrics: Arc<Metrics>,
    /// This plugin's data folder (`<node data_dir>/<plugin>`), not created until used.
    pub data_dir: PathBuf,
    /// The node's timeline of events, shown on the dashboard; plugins may add their own.
    pub timeline: Arc<Timeline>,
}

impl PluginContext {
    /// The `[plugins.NAME]` section, typed.
    pub fn plugin_config<T: DeserializeOwned + Default>(
        &self,
        name: &str,
    ) -> Result<T, ConfigError> {
        self.config.plugin_section(name)
    }

    /// The current ring of alive members (see [`MembershipHandle::ring`]).
    pub fn ring(&self) -> Arc<Ring> {
        self.membership.ring()
    }

    /// The ring of owners, for durable data (see [`MembershipHandle::owners`]).
    pub fn owners(&self) -> Arc<Ring> {
        self.membership.owners()
    }
}

/// Calls a plugin on the local node (used by HTTP routes).
pub struct LocalClient<A: Api> {
    rpc: Rpc,
    _api: PhantomData<fn() -> A>,
}

impl<A: Api> Clone for LocalClient<A> {
    fn clone(&self) -> Self {
        LocalClient {
            rpc: self.rpc.clone(),
            _api: PhantomData,
        }
    }
}

impl<A: Api> LocalClient<A> {
    /// Send a request to this node's instance of plugin `A`.
    pub async fn call(&self, req: &A::Request) -> Result<A::Response, RpcError> {
        let me = self.rpc.node_id().to_string();
        self.rpc.call::<A>(&me, req).await
    }
}

/// A running plugin, type-erased.
#[async_trait::async_trait]
trait Instance: Send + Sync {
    async fn handle(&self, caller: Caller, body: &[u8]) -> Result<Vec<u8>, RpcError>;
    async fn on_event(&self, ev: ClusterEvent);
    fn panel(&self) -> Option<Panel>;
    fn export_metrics(&self, m: &Metrics);
}

#[async_trait::async_trait]
impl<P: Plugin> Instance for P {
    async fn handle(&self, caller: Caller, body: &[u8]) -> Result<Vec<u8>, RpcError> {
        let req = codec::decode(body)?;
        if !caller.may_write() && !P::read_only(&req) {
            return Err(RpcError::Unauthorized(format!(
                "`{}`: the read-only certificate may only read",
                P::Api::NAME
            )));
        }
        let resp = Plugin::handle(self, caller, req).await?;
        Ok(codec::encode(&resp)?)
    }
    async fn on_event(&self, ev: ClusterEvent) {
        self.on_cluster_event(ev).await
    }
    fn panel(&self) -> Option<Panel> {
        Plugin::panel(self)
    }
    fn export_metrics(&self, m: &Metrics) {
        Plugin::export_metrics(self, m)
    }
}

type StartFn = Box<
    dyn Fn(
            PluginContext,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Arc<dyn Instance>, String>> + Send>,
        > + Send
        + Sync,
>;

/// How the host makes (and remakes) one plugin. Build it with [`plugin_factory`].
pub struct PluginFactory {
    name: &'static str,
    start: StartFn,
    routes: Box<dyn Fn(Rpc) -> Option<axum::Router> + Send + Sync>,
}

impl std::fmt::Debug for PluginFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginFactory({})", self.name)
    }
}

impl PluginFactory {
    /// The plugin's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    pub(crate) fn routes(&self, rpc: Rpc) -> Option<axum::Router> {
        (self.routes)(rpc)
    }
}

/// The factory of plugin `P`.
pub fn plugin_factory<P: Plugin>() -> PluginFactory {
    PluginFactory {
        name: <P::Api as Api>::NAME,
        start: Box::new(|ctx| {
            Box::pin(async move {
                P::start(ctx)
                    .await
                    .map(|p| Arc::new(p) as Arc<dyn Instance>)
            })
        }),
        routes: Box::new(|rpc| {
            P::routes(LocalClient {
                rpc,
                _api: PhantomData,
            })
        }),
    }
}

/// Lifecycle state of one plugin on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PluginStatus {
    /// Being started.
    Starting,
    /// Serving.
    Running,
    /// Crashed, waiting for its backoff before the next start.
    Restarting,
    /// Exceeded its restart intensity; stays down.
    Failed,
}

struct Slot {
    factory: PluginFactory,
    instance: RwLock<Option<Arc<dyn Instance>>>,
    /// Status and restart count under one lock, so readers never see a half-updated pair.
    status: Mutex<(PluginStatus, u32)>,
    actor: Mutex<Option<ActorRef<PluginMsg>>>,
    /// Requests served (local and remote callers) by outcome, in [`OUTCOMES`] order; kept
    /// across restarts. Refusals of bad input are not failures.
    served: [AtomicU64; 3],
}

impl Slot {
    fn set_status(&self, s: PluginStatus) {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).0 = s;
    }
    fn status(&self) -> (PluginStatus, u32) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Count one crash and move to `next` in the same step; returns the new restart count.
    fn count_crash(&self, next: PluginStatus) -> u32 {
        let mut g = self.status.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = next;
        g.1 += 1;
        g.1
    }
    fn instance(&self) -> Option<Arc<dyn Instance>> {
        self.instance
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_instance(&self, i: Option<Arc<dyn Instance>>) {
        *self.instance.write().unwrap_or_else(|p| p.into_inner()) = i;
    }
    fn crash(&self, why: String) {
        let actor = self.actor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(a) = actor {
            let _ = a.cast(PluginMsg::Crash(why));
        }
    }
}

struct HostShared {
    slots: HashMap<&'static str, Arc<Slot>>,
    ctx: PluginContext,
    stopping: AtomicBool,
}

/// Outcomes of the requests a plugin served, counted as they finish.
const OUTCOMES: [&str; 3] = ["ok", "refused", "error"];

/// Restart policy.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The node's supervisor of plugins, and the dispatcher of requests to them.
pub struct PluginHost {
    shared: Arc<HostShared>,
    supervisor: ActorRef<SupMsg>,
    sup_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PluginHost({:?})",
            self.shared.slots.keys().collect::<Vec<_>>()
        )
    }
}

impl PluginHost {
    /// Start every plugin under a new supervisor; `ctx` is the template context.
    pub(crate) async fn start(
        factories: Vec<PluginFactory>,
        ctx: PluginContext,
    ) -> Result<Self, String> {
        let slots = factories
            .into_iter()
            .map(|f| {
                (
                    f.name,
                    Arc::new(Slot {
                        factory: f,
                        instance: RwLock::new(None),
                        status: Mutex::new((PluginStatus::Starting, 0)),
                        actor: Mutex::new(None),
                        served: Default::default(),
                    }),
                )
            })
            .collect();
        let shared = Arc::new(HostShared {
            slots,
            ctx,
            stopping: AtomicBool::new(false),
        });
        let (supervisor, task) = Actor::spawn(None, Supervisor, shared.clone())
            .await
            .map_err(|e| format!("plugin supervisor: {e}"))?;
        Ok(PluginHost {
            shared,
            supervisor,
            sup_task: Mutex::new(Some(task)),
        })
    }

    /// Plugin names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.shared.slots.keys().copied().collect();
        v.sort();
        v
    }

    /// Status and restart count of each plugin.
    pub fn statuses(&self) -> Vec<(String, PluginStatus, u32)> {
        let mut v: Vec<_> = self
            .shared
            .slots
            .iter()
            .map(|(n, s)| {
                let (status, restarts) = s.status();
                (n.to_string(), status, restarts)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Wait until plugin `name` is running (or the deadline passes).
    pub async fn wait_running(&self, name: &str, deadline: Duration) -> bool {
        let end = tokio::time::Instant::now() + deadline;
        while tokio::time::Instant::now() < end {
            if let Some(s) = self.shared.slots.get(name) {
                if s.instance().is_some() {
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Panels of the running plugins, by plugin name.
    pub fn panels(&self) -> Vec<Panel> {
        let mut v: Vec<Panel> = self
            .shared
            .slots
            .iter()
            .filter_map(|(name, s)| {
                let mut p = s.instance()?.panel()?;
                p.plugin = name.to_string();
                Some(p)
            })
            .collect();
        v.sort_by(|a, b| a.plugin.cmp(&b.plugin));
        v
    }

    /// Let every running plugin export its own counts into `m` (before `/metrics` renders).
    pub fn export_metrics(&self, m: &Metrics) {
        for (name, s) in &self.shared.slots {
            for (outcome, n) in OUTCOMES.iter().zip(&s.served) {
                m.set_counter(
                    "dsys_plugin_requests_total",
                    &[("plugin", name), ("outcome", outcome)],
                    n.load(Ordering::Relaxed),
                );
            }
            if let Some(i) = s.instance() {
                i.export_metrics(m);
            }
        }
    }

    /// (requests served, requests failed) by this node's plugins since it started.
    pub fn request_counts(&self) -> (u64, u64) {
        self.shared.slots.values().fold((0, 0), |(all, failed), s| {
            let n = |i: usize| s.served[i].load(Ordering::Relaxed);
            (all + n(0) + n(1) + n(2), failed + n(2))
        })
    }

    /// Serve one request for plugin `plugin`.
    pub(crate) async fn dispatch(
        &self,
        caller: Caller,
        plugin: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        let r = self.dispatch_inner(caller, plugin, body).await;
        if let Some(slot) = self.shared.slots.get(plugin) {
            let i = match &r {
                Ok(_) => 0,
                Err(RpcError::Refused(_)) => 1,
                Err(_) => 2,
            };
            slot.served[i].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn dispatch_inner(
        &self,
        caller: Caller,
        plugin: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, RpcError> {
        let slot = self
            .shared
            .slots
            .get(plugin)
            .ok_or_else(|| RpcError::UnknownPlugin(plugin.to_string()))?
            .clone();
        let inst = slot
            .instance()
            .ok_or_else(|| RpcError::PluginUnavailable(plugin.to_string()))?;
        let fut = async move { inst.handle(caller, &body).await };
        // The request's trace and deadline follow it onto its task.
        let task = match Scope::current() {
            Some(scope) => tokio::spawn(in_scope(scope, fut)),
            None => tokio::spawn(fut),
        };
        match task.await {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                tracing::error!(plugin, "request handler panicked; restarting the plugin");
                slot.crash("a request handler panicked".into());
                Err(RpcError::Internal(format!(
                    "plugin `{plugin}` panicked; it is being restarted"
                )))
            }
            Err(_) => Err(RpcError::Internal("request task cancelled".into())),
        }
    }

    /// Test hook: make plugin `name` panic inside its actor.
    #[cfg(feature = "testsuite")]
    pub fn inject_panic(&self, name: &str) -> bool {
        let Some(slot) = self.shared.slots.get(name) else {
            return false;
        };
        let actor = slot.actor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        actor
            .map(|a| a.cast(PluginMsg::Panic).is_ok())
            .unwrap_or(false)
    }

    /// Stop every plugin.
    pub(crate) async fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.supervisor.stop(None);
        let task = self
            .sup_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        for s in self.shared.slots.values() {
            s.set_instance(None);
        }
    }
}

enum SupMsg {
    Start(&'static str),
}

struct SupState {
    shared: Arc<HostShared>,
    by_actor: HashMap<ActorId, &'static str>,
    history: HashMap<&'static str, VecDeque<tokio::time::Instant>>,
}

struct Supervisor;

impl Supervisor {
    async fn publish(shared: &HostShared) {
        let mut restarts = Vec::new();
        let mut failed = Vec::new();
        let mut names: Vec<_> = shared.slots.keys().copied().collect();
        names.sort();
        for n in names {
            let (status, count) = shared.slots[n].status();
            restarts.push(format!("{n}={count}"));
            if status == PluginStatus::Failed {
                failed.push(n);
            }
        }
        shared
            .ctx
            .membership
            .set_key(keys::RESTARTS, &restarts.join(","))
            .await;
        shared
            .ctx
            .membership
            .set_key(keys::FAILED, &failed.join(","))
            .await;
    }

    async fn crashed(
        &self,
        myself: &ActorRef<SupMsg>,
        state: &mut SupState,
        name: &'static str,
        why: String,
    ) {
        let Some(slot) = state.shared.slots.get(name).cloned() else {
            return;
        };
        slot.set_instance(None);
        *slot.actor.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if state.shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        state
            .shared
            .ctx
            .metrics
            .add("dsys_plugin_restarts_total", &[("plugin", name)], 1);
        let now = tokio::time::Instant::now();
        let h = state.history.entry(name).or_default();
        h.push_back(now);
        while h
            .front()
            .map(|t| now.duration_since(*t) > RESTART_WINDOW)
            .unwrap_or(false)
        {
            h.pop_front();
        }
        let timeline = &state.shared.ctx.timeline;
        let me = &state.shared.ctx.node_id;
        if h.len() > MAX_RESTARTS {
            let n = slot.count_crash(PluginStatus::Failed);
            timeline.record(
                "plugin",
                me,
                format!("{name} failed after {n} restarts: {why}"),
            );
            tracing::error!(plugin = name, restarts = n, %why, "plugin exceeded its restart intensity; marked failed");
        } else {
            let n = slot.count_crash(PluginStatus::Restarting);
            let backoff =
                (BACKOFF_BASE * 2u32.pow(h.len().saturating_sub(1) as u32)).min(BACKOFF_MAX);
            timeline.record(
                "plugin",
                me,
                format!("{name} crashed (restart {n} in {backoff:?}): {why}"),
            );
            tracing::warn!(plugin = name, restarts = n, %why, ?backoff, "plugin crashed; restarting");
            myself.send_after(backoff, move || SupMsg::Start(name));
        }
        Self::publish(&state.shared).await;
    }
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = Arc<HostShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<SupMsg>,
        shared: Arc<HostShared>,
    ) -> Result<SupState, ActorProcessingErr> {
        shared.ctx.metrics.describe(
            "dsys_plugin_restarts_total",
            "counter",
            "Plugin restarts by the supervisor",
        );
        for name in shared.slots.keys() {
            // Present from the start (at 0), so a scrape sees every plugin's series.
            shared
                .ctx
                .metrics
                .add("dsys_plugin_restarts_total", &[("plugin", name)], 0);
            myself.cast(SupMsg::Start(name))?;
        }
        Ok(SupState {
            shared,
            by_actor: HashMap::new(),
            history: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupMsg>,
        msg: SupMsg,
        state: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        let SupMsg::Start(name) = msg;
        if state.shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(slot) = state.shared.slots.get(name).cloned() else {
            return Ok(());
        };
        slot.set_status(PluginStatus::Starting);
        let mut ctx = state.shared.ctx.clone();
        ctx.data_dir = ctx.data_dir.join(name);
        let args = PluginArgs {
            slot: slot.clone(),
            ctx,
        };
        match Actor::spawn_linked(None, PluginActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                state.by_actor.insert(actor.get_id(), name);
                *slot.actor.lock().unwrap_or_else(|p| p.into_inner()) = Some(actor);
                slot.set_status(PluginStatus::Running);
                if slot.status().1 > 0 {
                    let ctx = &state.shared.ctx;
                    ctx.timeline
                        .record("plugin", &ctx.node_id, format!("{name} running again"));
                }
                Self::publish(&state.shared).await;
            }
            Err(e) => {
                self.crashed(&myself, state, name, format!("start failed: {e}"))
                    .await
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupMsg>,
        evt: SupervisionEvent,
        state: &mut SupState,
    ) -> Result<(), ActorProcessingErr> {
        // Overridden: ractor's default stops the supervisor when a child fails.
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if let Some(name) = state.by_actor.remove(&cell.get_id()) {
            self.crashed(&myself, state, name, why).await;
        }
        Ok(())
    }
}

enum PluginMsg {
    /// A request task panicked: fail the actor so the supervisor restarts the plugin.
    Crash(String),
    /// Test hook: panic inside the actor.
    #[cfg_attr(not(feature = "testsuite"), allow(dead_code))]
    Panic,
}

struct PluginArgs {
    slot: Arc<Slot>,
    ctx: PluginContext,
}

/// Aborts the task when dropped, i.e. whenever the actor's state goes away.
struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct PluginActor;

impl Actor for PluginActor {
    type Msg = PluginMsg;
    type State = AbortOnDrop;
    type Arguments = PluginArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<PluginMsg>,
        args: PluginArgs,
    ) -> Result<AbortOnDrop, ActorProcessingErr> {
        let mut events = args.ctx.membership.subscribe();
        let inst = (args.slot.factory.start)(args.ctx)
            .await
            .map_err(|e| -> ActorProcessingErr { e.into() })?;
        args.slot.set_instance(Some(inst.clone()));
        let task = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => inst.on_event(ev).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            }
        });
        Ok(AbortOnDrop(task))
    }

    async fn handle(
        &self,
        _myself: ActorRef<PluginMsg>,
        msg: PluginMsg,
        _state: &mut AbortOnDrop,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PluginMsg::Crash(why) => Err(why.into()),
            PluginMsg::Panic => panic!("test hook: plugin panic injected on purpose"),
        }
    }
}

/// How a plugin's response is shown by the CLI: a human text and an exit code (0 ok, 1 when
/// the answer is a refusal such as "rate limited"). `--json` prints the serde form instead.
pub trait Render {
    /// Text for a terminal.
    fn human(&self) -> String;
    /// Process exit code for this answer.
    fn exit_code(&self) -> i32 {
        0
    }
}

/// Declare a plugin's [`Api`] marker: `plugin_api!(KvApi, "kv", KvRequest, KvResponse);`
/// makes a unit struct `KvApi` naming the plugin on the wire and its request/response types.
#[macro_export]
macro_rules! plugin_api {
    ($name:ident, $wire:literal, $req:ty, $resp:ty) => {
        #[doc = concat!("Marker naming the `", $wire, "` plugin and its wire types.")]
        #[derive(Debug)]
        pub struct $name;

        impl $crate::Api for $name {
            const NAME: &'static str = $wire;
            type Request = $req;
            type Response = $resp;
        }
    };
}
