//! Gossip membership over chitchat. Each node publishes its addresses, region, plugins and
//! restart counts as chitchat keys. A node seen through gossip becomes `Alive` (and a ring
//! member) only after an mTLS handshake with the id it claims has succeeded: gossip itself
//! is unauthenticated. Changes are published as a [`ClusterView`] and as [`ClusterEvent`]s.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chitchat::transport::{
    RecvOutcome, SendOutcome, Socket, Transport as GossipTransport, UdpTransport,
};
use chitchat::{
    ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, FailureDetectorConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::faults::{Faults, Verdict};
use crate::ring::Ring;

/// Keys each node publishes about itself.
pub(crate) mod keys {
    pub(crate) const RPC: &str = "rpc_addr";
    pub(crate) const HTTP: &str = "http_addr";
    pub(crate) const REGION: &str = "region";
    pub(crate) const PLUGINS: &str = "plugins";
    pub(crate) const RESTARTS: &str = "restarts";
    pub(crate) const FAILED: &str = "failed";
    pub(crate) const STATUS: &str = "status";
}

/// Where a member stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Seen through gossip, not yet proven by an mTLS handshake; not in the ring.
    Joining,
    /// Live and authenticated; in the ring.
    Alive,
    /// The failure detector stopped hearing from it.
    Dead,
    /// It announced that it is shutting down.
    Left,
}

/// One node as this node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// Generation (start time in ms); a restart gets a higher one.
    pub generation: u64,
    /// State.
    pub state: MemberState,
    /// Region label.
    pub region: String,
    /// Gossip address.
    pub gossip_addr: SocketAddr,
    /// QUIC address.
    pub rpc_addr: Option<SocketAddr>,
    /// HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// Plugins it runs.
    pub plugins: Vec<String>,
    /// Plugin restarts so far, by plugin.
    pub restarts: BTreeMap<String, u32>,
    /// Plugins that exceeded their restart intensity and stay down.
    pub failed: Vec<String>,
    /// Still live for the failure detector, but no new heartbeat has arrived for
    /// [`SUSPECT_AFTER_BEATS`] gossip intervals: it may be about to be declared dead.
    pub suspect: bool,
}

/// Gossip intervals without a new heartbeat after which a live member is shown as suspect.
pub(crate) const SUSPECT_AFTER_BEATS: u32 = 3;

/// A membership change, as delivered to plugins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClusterEvent {
    /// A node became alive for the first time.
    Joined(Member),
    /// A node stopped answering.
    Dead(Member),
    /// A node that was dead, left or restarted is alive again.
    Back(Member),
    /// A node announced it is leaving.
    Left(Member),
    /// The owner ring changed (a node joined, left, or was dead for longer than
    /// `cluster.owner_timeout_ms`): the members that own ring ranges now, sorted.
    Owners(Vec<String>),
}

/// Everything this node knows about the cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// This node's id.
    pub me: String,
    /// Members by id (latest generation of each).
    pub members: BTreeMap<String, Member>,
}

impl ClusterView {
    /// Ids of alive members, sorted.
    pub fn alive(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.id.clone())
            .collect()
    }
}

/// How to prove that a gossiped node is who it claims: an mTLS ping to its RPC address.
pub(crate) type Verifier = Arc<
    dyn Fn(String, SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

struct Inner {
    me: String,
    vnodes: u32,
    view_rx: watch::Receiver<Arc<ClusterView>>,
    events: broadcast::Sender<ClusterEvent>,
    ring: RwLock<Arc<Ring>>,
    owners: RwLock<Arc<Ring>>,
    chitchat: Mutex<Option<ChitchatHandle>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Membership({})", self.me)
    }
}

/// Shared handle on this node's membership. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MembershipHandle {
    inner: Arc<Inner>,
}

/// What membership needs to start.
pub(crate) struct MembershipConfig {
    pub(crate) me: String,
    pub(crate) cluster: String,
    pub(crate) generation: u64,
    pub(crate) gossip_addr: SocketAddr,
    pub(crate) seeds: Vec<SocketAddr>,
    pub(crate) gossip_interval: Duration,
    pub(crate) phi_threshold: f64,
    pub(crate) vnodes: u32,
    pub(crate) owner_timeout: Duration,
    /// Where the owner set is kept across restarts (`None`: not kept).
    pub(crate) owners_file: Option<std::path::PathBuf>,
    pub(crate) initial_keys: Vec<(String, String)>,
}

impl MembershipHandle {
    /// The latest view.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view_rx.borrow().clone()
    }

    /// A receiver that changes whenever the view does.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.inner.view_rx.clone()
    }

    /// Membership events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.events.subscribe()
    }

    /// The ring of alive members: who answers now. Work that may move freely (a cache
    /// entry, a rate-limit bucket) is placed on it.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner
            .ring
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The ring of owners: members that have been alive, have not left, and have not been
    /// dead for longer than `cluster.owner_timeout_ms`. Durable data is placed on it, so a
    /// failure suspicion or a partition does not move a key's replicas (Dynamo's separation
    /// of ownership from liveness); it changes on join, leave and long outages only. The set
    /// is kept in the node's data dir, so a node restarted during a partition still knows
    /// the owners it cannot see.
    pub fn owners(&self) -> Arc<Ring> {
        self.inner
            .owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// True when `id` is alive in the latest view.
    pub fn is_alive(&self, id: &str) -> bool {
        self.view()
            .members
            .get(id)
            .is_some_and(|m| m.state == MemberState::Alive)
    }

    /// This node's id.
    pub fn me(&self) -> &str {
        &self.inner.me
    }

    /// RPC address of a known, not-dead member.
    pub fn rpc_addr(&self, id: &str) -> Option<SocketAddr> {
        self.view().members.get(id).and_then(|m| m.rpc_addr)
    }

    /// Publish a key about this node.
    pub async fn set_key(&self, key: &str, value: &str) {
        let handle = self
            .inner
            .chitchat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| h.chitchat());
        if let Some(cc) = handle {
            cc.lock().await.self_node_state().set(key, value);
        }
    }

    /// Wait until `pred` holds for the view, or the deadline passes.
    pub async fn wait_for<F: Fn(&ClusterView) -> bool>(&self, deadline: Duration, pred: F) -> bool {
        let mut rx = self.watch();
        let f = async {
            loop {
                if pred(&rx.borrow_and_update()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(deadline, f).await.is_ok() && pred(&self.view())
    }

    /// Announce leaving, let it spread, then stop gossiping.
    pub(crate) async fn leave(&self, grace: Duration) {
        self.set_key(keys::STATUS, "leaving").await;
        tokio::time::sleep(grace).await;
        self.stop().await;
    }

    /// Stop gossip at once (what a crash looks like to the others).
    pub(crate) async fn stop(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let h = self
            .inner
            .chitchat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.shutdown().await;
        }
    }

    pub(crate) async fn start(
        cfg: MembershipConfig,
        faults: Arc<Faults>,
        verify: Verifier,
    ) -> Result<Self, String> {
        let id = ChitchatId::new(cfg.me.clone(), cfg.generation, cfg.gossip_addr);
        let cc_cfg = ChitchatConfig {
            chitchat_id: id,
            cluster_id: cfg.cluster.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.gossip_addr,
            seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                // Seeded with the gossip interval so a silent node is noticed in about a
                // second instead of the default's tens of seconds.
                initial_interval: cfg.gossip_interval,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let transport = FaultyGossip {
            faults: faults.clone(),
        };
        let handle = chitchat::spawn_chitchat(cc_cfg, cfg.initial_keys.clone(), &transport)
            .await
            .map_err(|e| format!("gossip on {}: {e:#}", cfg.gossip_addr))?;
        let chitchat = handle.chitchat();
        let (view_tx, view_rx) = watch::channel(Arc::new(ClusterView {
            me: cfg.me.clone(),
            members: BTreeMap::new(),
        }));
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            me: cfg.me.clone(),
            vnodes: cfg.vnodes,
            view_rx,
            events,
            ring: RwLock::new(Arc::new(Ring::new(
                std::slice::from_ref(&cfg.me),
                cfg.vnodes,
            ))),
            owners: RwLock::new(Arc::new(Ring::new(
                std::slice::from_ref(&cfg.me),
                cfg.vnodes,
            ))),
            chitchat: Mutex::new(Some(handle)),
            tasks: Mutex::new(Vec::new()),
        });
        let this = MembershipHandle { inner };
        let weak = Arc::downgrade(&this.inner);
        let me = cfg.me.clone();
        let interval = cfg.gossip_interval;
        let mut owners = Owners::load(&cfg.me, cfg.owner_timeout, cfg.owners_file.clone());
        *this.inner.owners.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Ring::new(&owners.names(), cfg.vnodes));
        let task = tokio::spawn(async move {
            let mut tracker = Tracker {
                me,
                verified: HashMap::new(),
                verify,
                prev: BTreeMap::new(),
                ever_alive: Default::default(),
                beats: HashMap::new(),
            };
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let snapshot = {
                    let cc = chitchat.lock().await;
                    let live: std::collections::HashSet<ChitchatId> =
                        cc.live_nodes().cloned().collect();
                    cc.node_states()
                        .iter()
                        .map(|(id, st)| {
                            let kv: HashMap<String, String> = st
                                .key_values()
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .collect();
                            let beat = u64::from(st.heartbeat());
                            (id.clone(), live.contains(id), kv, beat)
                        })
                        .collect::<Vec<_>>()
                };
                for (id, _, _, _) in &snapshot {
                    faults.learn_gossip_peer(id.gossip_advertise_addr, &id.node_id);
                }
                let members = tracker.members(snapshot, interval * SUSPECT_AFTER_BEATS);
                let mut events = tracker.diff(&members);
                if let Some(names) = owners.update(&members, tokio::time::Instant::now()) {
                    *inner.owners.write().unwrap_or_else(|p| p.into_inner()) =
                        Arc::new(Ring::new(&names, inner.vnodes));
                    events.push(ClusterEvent::Owners(names));
                }
                let changed = view_tx.borrow().members != members;
                if changed {
                    let alive: Vec<String> = members
                        .values()
                        .filter(|m| m.state == MemberState::Alive)
                        .map(|m| m.id.clone())
                        .collect();
                    let ring = Arc::new(Ring::new(&alive, inner.vnodes));
                    *inner.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
                    let _ = view_tx.send(Arc::new(ClusterView {
                        me: inner.me.clone(),
                        members,
                    }));
                }
                for e in events {
                    tracing::info!(event = ?e, "membership");
                    let _ = inner.events.send(e);
                }
            }
        });
        this.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(this)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Proof {
    Pending,
    Ok,
    Failed(tokio::time::Instant),
}

/// Turns chitchat snapshots into members and events; owns mTLS verification state.
struct Tracker {
    me: String,
    verified: HashMap<(String, u64), Arc<Mutex<Proof>>>,
    verify: Verifier,
    prev: BTreeMap<String, (u64, MemberState)>,
    ever_alive: std::collections::HashSet<String>,
    /// Last heartbeat seen per (node, generation), and when it changed.
    beats: HashMap<(String, u64), (u64, tokio::time::Instant)>,
}

impl Tracker {
    fn members(
        &mut self,
        snapshot: Vec<(ChitchatId, bool, HashMap<String, String>, u64)>,
        suspect_after: Duration,
    ) -> BTreeMap<String, Member> {
        type Latest = (ChitchatId, bool, HashMap<String, String>, u64);
        let mut latest: BTreeMap<String, Latest> = BTreeMap::new();
        for (id, live, kv, beat) in snapshot {
            let key = id.node_id.to_string();
            match latest.get(&key) {
                Some((old, _, _, _)) if old.generation_id >= id.generation_id => {}
                _ => {
                    latest.insert(key, (id, live, kv, beat));
                }
            }
        }
        let now = tokio::time::Instant::now();
        self.beats
            .retain(|(n, g), _| latest.get(n).is_some_and(|l| l.0.generation_id == *g));
        let mut out = BTreeMap::new();
        for (node, (id, live, kv, beat)) in latest {
            let seen = self
                .beats
                .entry((node.clone(), id.generation_id))
                .or_insert((beat, now));
            if seen.0 != beat {
                *seen = (beat, now);
            }
            let stale = now.duration_since(seen.1) > suspect_after;
            let parse = |k: &str| kv.get(k).and_then(|v| v.parse::<SocketAddr>().ok());
            let rpc_addr = parse(keys::RPC);
            let is_me = node == self.me;
            let state = if kv.get(keys::STATUS).map(String::as_str) == Some("leaving") {
                MemberState::Left
            } else if !(live || is_me) {
                MemberState::Dead
            } else if is_me || self.proven(&node, id.generation_id, rpc_addr) {
                MemberState::Alive
            } else {
                MemberState::Joining
            };
            let list = |k: &str| -> Vec<String> {
                kv.get(k)
                    .map(|v| {
                        v.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let restarts = list(keys::RESTARTS)
                .iter()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            out.insert(
                node.clone(),
                Member {
                    id: node,
                    generation: id.generation_id,
                    state,
                    region: kv.get(keys::REGION).cloned().unwrap_or_default(),
                    gossip_addr: id.gossip_advertise_addr,
                    rpc_addr,
                    http_addr: parse(keys::HTTP),
                    plugins: list(keys::PLUGINS),
                    restarts,
                    failed: list(keys::FAILED),
                    suspect: state == MemberState::Alive && stale && !is_me,
                },
            );
        }
        out
    }

    /// True once an mTLS ping to `node` at `addr` has succeeded for this generation; starts
    /// (or, a second after a failure, retries) the ping otherwise.
    fn proven(&mut self, node: &str, generation: u64, addr: Option<SocketAddr>) -> bool {
        let Some(addr) = addr else { return false };
        let slot = self
            .verified
            .entry((node.to_string(), generation))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Proof::Failed(
                    tokio::time::Instant::now() - Duration::from_secs(10),
                )))
            })
            .clone();
        let state = *slot.lock().unwrap_or_else(|p| p.into_inner());
        match state {
            Proof::Ok => true,
            Proof::Pending => false,
            Proof::Failed(at) => {
                if at.elapsed() >= Duration::from_secs(1) {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Proof::Pending;
                    let fut = (self.verify)(node.to_string(), addr);
                    let node = node.to_string();
                    tokio::spawn(async move {
                        let ok = fut.await;
                        if !ok {
                            tracing::warn!(%node, %addr, "gossiped node failed the mTLS identity check");
                        }
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = if ok {
                            Proof::Ok
                        } else {
                            Proof::Failed(tokio::time::Instant::now())
                        };
                    });
                }
                false
            }
        }
    }

    fn diff(&mut self, members: &BTreeMap<String, Member>) -> Vec<ClusterEvent> {
        use MemberState::*;
        let mut events = Vec::new();
        for (id, m) in members {
            let prev = self.prev.insert(id.clone(), (m.generation, m.state));
            let ev = match (prev, m.state) {
                (Some((g, Alive)), Alive) if g != m.generation => {
                    Some(ClusterEvent::Back(m.clone()))
                }
                (Some((_, Alive)), Alive) => None,
                (_, Alive) if self.ever_alive.contains(id) => Some(ClusterEvent::Back(m.clone())),
                (_, Alive) => Some(ClusterEvent::Joined(m.clone())),
                (Some((_, Alive | Joining)), Dead) => Some(ClusterEvent::Dead(m.clone())),
                (Some((_, Alive | Joining | Dead)), Left) => Some(ClusterEvent::Left(m.clone())),
                _ => None,
            };
            if m.state == Alive {
                self.ever_alive.insert(id.clone());
            }
            events.extend(ev);
        }
        events
    }
}

/// Which members own ring ranges, and since when each owner has been dead.
struct Owners {
    me: String,
    timeout: Duration,
    file: Option<std::path::PathBuf>,
    /// Owner -> `None` while up, `Some(since)` while dead (or not yet seen since a restart).
    set: BTreeMap<String, Option<tokio::time::Instant>>,
}

impl Owners {
    /// The owners this node knew before it restarted (each counted dead from now until it is
    /// seen), plus itself.
    fn load(me: &str, timeout: Duration, file: Option<std::path::PathBuf>) -> Self {
        let now = tokio::time::Instant::now();
        let mut set: BTreeMap<String, Option<tokio::time::Instant>> = BTreeMap::new();
        if let Some(f) = &file {
            match std::fs::read_to_string(f) {
                Ok(text) => {
                    for id in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                        set.insert(id.to_string(), Some(now));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("reading {}: {e}", f.display()),
            }
        }
        set.insert(me.to_string(), None);
        Owners {
            me: me.to_string(),
            timeout,
            file,
            set,
        }
    }

    fn names(&self) -> Vec<String> {
        self.set.keys().cloned().collect()
    }

    /// Apply one view; the new owner set when it changed.
    fn update(
        &mut self,
        members: &BTreeMap<String, Member>,
        now: tokio::time::Instant,
    ) -> Option<Vec<String>> {
        // Runs every gossip round: note whether the set changed rather than compare copies.
        let mut changed = false;
        for (id, m) in members {
            match m.state {
                MemberState::Alive => {
                    changed |= self.set.insert(id.clone(), None).is_none();
                }
                // A restarting owner (new generation, not yet proven) keeps its ranges.
                MemberState::Joining => {
                    if let Some(since) = self.set.get_mut(id) {
                        *since = None;
                    }
                }
                MemberState::Dead => {
                    if let Some(since) = self.set.get_mut(id) {
                        since.get_or_insert(now);
                    }
                }
                MemberState::Left => {
                    changed |= self.set.remove(id).is_some();
                }
            }
        }
        for (id, since) in self.set.iter_mut() {
            if !members.contains_key(id) && *id != self.me {
                since.get_or_insert(now);
            }
        }
        let (timeout, len) = (self.timeout, self.set.len());
        self.set
            .retain(|_, since| since.is_none_or(|t| now.duration_since(t) < timeout));
        changed |= self.set.len() != len;
        match self.set.get_mut(&self.me) {
            Some(since) => *since = None,
            None => changed |= self.set.insert(self.me.clone(), None).is_none(),
        }
        if !changed {
            return None;
        }
        let after = self.names();
        if let Some(f) = &self.file {
            if let Err(e) = crate::storage::write_atomically(f, after.join("\n").as_bytes()) {
                tracing::warn!("keeping the owner set in {}: {e}", f.display());
            }
        }
        Some(after)
    }
}

/// chitchat's UDP transport with the node's fault rules applied to every datagram.
struct FaultyGossip {
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl GossipTransport for FaultyGossip {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = UdpTransport.open(listen_addr).await?;
        Ok(Box::new(FaultySocket {
            inner,
            faults: self.faults.clone(),
        }))
    }
}

struct FaultySocket {
    inner: Box<dyn Socket>,
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl Socket for FaultySocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        if self.faults.gossip_verdict(&to) == Verdict::Drop {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        self.inner.send(to, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let r = self.inner.recv().await?;
            if self.faults.gossip_verdict(&r.from_addr) != Verdict::Drop {
                return Ok(r);
            }
        }
    }
}

/// Pick a free UDP port on `host` for gossip (chitchat binds by address, not by socket).
pub(crate) fn free_udp_port(host: std::net::IpAddr) -> std::io::Result<u16> {
    let s = std::net::UdpSocket::bind((host, 0))?;
    Ok(s.local_addr()?.port())
}
