//! One full node: transport, gateway, membership, plugin host and the `sys` service, wired
//! together. The `dsys agent` command and the in-process test cluster both start nodes here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::codec;
use crate::config::ClusterConfig;
use crate::faults::Faults;
use crate::membership::{
    free_udp_port, keys, ClusterEvent, MembershipConfig, MembershipHandle, Verifier,
};
use crate::metrics::Metrics;
use crate::plugin::{PluginContext, PluginFactory, PluginHost};
use crate::rpc::{Caller, Handler, Rpc, RpcError, RpcRequest};
use crate::sys::{SysRequest, SysResponse, SysService};
use crate::timeline::Timeline;
use crate::tls::{install_crypto_provider, TlsIdentity};
use crate::transport::{Transport, TransportOptions};

/// What to start.
#[derive(Debug)]
pub struct NodeOptions {
    /// The cluster configuration (already validated).
    pub config: ClusterConfig,
    /// Which node of it this is.
    pub node_id: String,
    /// The plugins to run.
    pub plugins: Vec<PluginFactory>,
    /// Gossip seed addresses; when empty, the configured seeds' addresses are used.
    pub seed_addrs: Vec<SocketAddr>,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    id: String,
    generation: u64,
    gossip_addr: SocketAddr,
    http_addr: SocketAddr,
    transport: Arc<Transport>,
    membership: MembershipHandle,
    host: Arc<PluginHost>,
    faults: Arc<Faults>,
    rpc: Rpc,
    tasks: Vec<JoinHandle<()>>,
    _handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for dyn Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handler")
    }
}

struct NodeHandler {
    sys: Arc<SysService>,
    host: Arc<PluginHost>,
}

#[async_trait::async_trait]
impl Handler for NodeHandler {
    async fn handle(&self, caller: Caller, req: RpcRequest) -> Result<Vec<u8>, RpcError> {
        if req.plugin == "sys" {
            let r: SysRequest = codec::decode(&req.body)?;
            let resp = self.sys.handle(&caller, r)?;
            return Ok(codec::encode(&resp)?);
        }
        self.host.dispatch(caller, &req.plugin, req.body).await
    }
}

/// Start times in ms, strictly increasing within a process (restarts get a new generation).
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut prev = LAST.load(Ordering::SeqCst);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange(prev, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

impl Node {
    /// Start the node; returns once every listener is bound and plugins are starting.
    pub async fn start(opts: NodeOptions) -> Result<Node, String> {
        install_crypto_provider();
        let cfg = Arc::new(opts.config);
        let me = opts.node_id.clone();
        let ncfg = cfg.node(&me).map_err(|e| e.to_string())?.clone();
        let identity = TlsIdentity::load(&cfg.cluster.certs_dir, &me).map_err(|e| e.to_string())?;
        let generation = next_generation();
        let faults = Arc::new(Faults::new(&me));
        let metrics = Arc::new(Metrics::default());
        let topts = TransportOptions {
            max_frame_bytes: cfg.cluster.max_frame_bytes,
            ..TransportOptions::default()
        };
        let transport = Transport::bind(
            &me,
            ncfg.rpc_addr(),
            &identity,
            faults.clone(),
            topts,
            metrics.clone(),
        )
        .map_err(|e| format!("rpc_port: {e}"))?;
        let listener = tokio::net::TcpListener::bind(ncfg.http_addr())
            .await
            .map_err(|e| format!("http_port: cannot bind {}: {e}", ncfg.http_addr()))?;
        let http_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let gossip_port = if ncfg.gossip_port == 0 {
            free_udp_port(ncfg.host).map_err(|e| format!("gossip_port: {e}"))?
        } else {
            ncfg.gossip_port
        };
        let gossip_addr = SocketAddr::new(ncfg.host, gossip_port);
        let seeds = if opts.seed_addrs.is_empty() {
            cfg.cluster
                .seeds
                .iter()
                .filter_map(|s| cfg.nodes.get(s))
                .map(|n| n.gossip_addr())
                .collect()
        } else {
            opts.seed_addrs.clone()
        };
        let names: Vec<&str> = opts.plugins.iter().map(|p| p.name()).collect();
        let initial_keys = vec![
            (keys::RPC.to_string(), transport.local_addr().to_string()),
            (keys::HTTP.to_string(), http_addr.to_string()),
            (keys::REGION.to_string(), ncfg.region.clone()),
            (keys::PLUGINS.to_string(), names.join(",")),
        ];
        let verify: Verifier = {
            let t = transport.clone();
            let me = me.clone();
            Arc::new(move |peer: String, addr: SocketAddr| {
                let t = t.clone();
                let me = me.clone();
                Box::pin(async move {
                    let Ok(body) = codec::encode(&SysRequest::Ping) else {
                        return false;
                    };
                    let req = RpcRequest {
                        plugin: "sys".into(),
                        caller: me,
                        timeout_ms: 2000,
                        traceparent: crate::rpc::next_traceparent(),
                        body,
                    };
                    match t.request(&peer, addr, req, Duration::from_secs(2)).await {
                        Ok(b) => matches!(
                            codec::decode::<SysResponse>(&b),
                            Ok(SysResponse::Pong { node, .. }) if node == peer
                        ),
                        Err(_) => false,
                    }
                })
            })
        };
        let membership = MembershipHandle::start(
            MembershipConfig {
                me: me.clone(),
                cluster: cfg.cluster.name.clone(),
                generation,
                gossip_addr,
                seeds,
                gossip_interval: Duration::from_millis(cfg.cluster.gossip_interval_ms),
                phi_threshold: cfg.cluster.phi_threshold,
                vnodes: cfg.cluster.vnodes,
                owner_timeout: Duration::from_millis(cfg.cluster.owner_timeout_ms),
                owners_file: Some(ncfg.data_dir.join("owners")),
                initial_keys,
            },
            faults.clone(),
            verify,
        )
        .await?;
        let rpc = Rpc::new(
            &me,
            transport.clone(),
            membership.clone(),
            Duration::from_millis(cfg.cluster.rpc_timeout_ms),
        );
        let timeline = Arc::new(Timeline::default());
        timeline.record("member", &me, format!("started, generation {generation}"));
        let ctx = PluginContext {
            node_id: me.clone(),
            config: cfg.clone(),
            rpc: rpc.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            data_dir: ncfg.data_dir.clone(),
            timeline: timeline.clone(),
        };
        let routes: Vec<axum::Router> = opts
            .plugins
            .iter()
            .filter_map(|p| p.routes(rpc.clone()))
            .collect();
        let host = Arc::new(PluginHost::start(opts.plugins, ctx).await?);
        let sys = Arc::new(SysService {
            me: me.clone(),
            generation,
            config: cfg.clone(),
            membership: membership.clone(),
            faults: faults.clone(),
            host: host.clone(),
            rpc: rpc.clone(),
            timeline: timeline.clone(),
        });
        let handler: Arc<dyn Handler> = Arc::new(NodeHandler {
            sys: sys.clone(),
            host: host.clone(),
        });
        rpc.set_local(Arc::downgrade(&handler));
        let forget = {
            let (t, mut events) = (transport.clone(), membership.subscribe());
            let timeline = timeline.clone();
            let me_owners = me.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(ev) => {
                            let (m, what) = match &ev {
                                ClusterEvent::Owners(names) => {
                                    timeline.record(
                                        "member",
                                        &me_owners,
                                        format!("ring owners now {}", names.join(",")),
                                    );
                                    continue;
                                }
                                ClusterEvent::Joined(m) => (m, "joined"),
                                ClusterEvent::Dead(m) => (m, "dead"),
                                ClusterEvent::Back(m) => (m, "back"),
                                ClusterEvent::Left(m) => (m, "left"),
                            };
                            timeline.record(
                                "member",
                                &m.id,
                                format!("{what} (generation {})", m.generation),
                            );
                            if what != "joined" {
                                t.drop_peer(&m.id);
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        let tasks = vec![
            forget,
            transport.serve(handler.clone()),
            crate::gateway::serve(listener, sys, metrics, routes),
        ];
        tracing::info!(node = %me, generation, rpc = %transport.local_addr(), %http_addr, %gossip_addr, "node started");
        Ok(Node {
            id: me,
            generation,
            gossip_addr,
            http_addr,
            transport,
            membership,
            host,
            faults,
            rpc,
            tasks,
            _handler: handler,
        })
    }

    /// Node id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Generation (start time in ms).
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// QUIC address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.transport.local_addr()
    }
    /// HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    /// Gossip address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }
    /// Membership.
    pub fn membership(&self) -> &MembershipHandle {
        &self.membership
    }
    /// Plugin host.
    pub fn host(&self) -> &PluginHost {
        &self.host
    }
    /// Fault injection.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }
    /// RPC from this node.
    pub fn rpc(&self) -> &Rpc {
        &self.rpc
    }

    /// Leave politely: announce it, stop plugins, stop listening.
    pub async fn shutdown(self) {
        self.membership.leave(Duration::from_millis(500)).await;
        self.host.stop().await;
        self.stop_io();
    }

    /// Stop at once without a word, as a crash would (in-process tests).
    pub async fn kill(self) {
        self.membership.stop().await;
        self.stop_io();
        self.host.stop().await;
    }

    fn stop_io(&self) {
        self.transport.close();
        for t in &self.tasks {
            t.abort();
        }
    }
}
