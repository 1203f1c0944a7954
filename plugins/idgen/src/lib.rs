//! dsys plugin 25, `idgen`: Snowflake-style unique ids (41-bit milliseconds since
//! 2024-01-01T00:00:00Z, 10-bit worker id, 12-bit sequence) made locally by every node, with
//! worker ids leased through the `consensus` plugin.
//!
//! Modules: [`layout`] (the bit layout, pure), [`generator`] (the generator core and its
//! clock seam), `worker` (leasing a worker id and its high-water marks through consensus),
//! [`api`] (wire types and the `dsys id` CLI), [`bench`] (`dsys bench id`). This file wires
//! them into the runtime: requests, the dashboard panel, `/metrics`.
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod bench;
pub mod generator;
pub mod layout;
mod worker;

use std::sync::{Arc, Mutex};

use dsys_plugin_lock::recipe::Consensus;
use dsys_runtime::{Caller, Metrics, Panel, Plugin, PluginContext, RpcError};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use api::{
    decode_arg, response_json, Decoded, IdBatch, IdCommand, IdRequest, IdResponse, IdStatus,
    IdgenApi, MAX_BATCH,
};
pub use generator::{
    Clock, GenError, GenStats, Generator, IdRun, Idgen, SystemClock, DEFAULT_CATCH_UP_MS,
    DEFAULT_MAX_BACKWARDS_MS,
};
pub use worker::{LeaseInfo, DEFAULT_TTL_MS, HW_PREFIX, NODE_PREFIX, WORKER_PREFIX};

/// `[plugins.idgen]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdgenConfig {
    /// Lease TTL of a worker id in ms (default 5000; 1000..=60000). A node whose keep-alives
    /// stop is out of ids within 90% of it, and its worker id is free again after it.
    pub ttl_ms: u64,
    /// Largest backwards clock step waited out, in ms (default 1000; at most 10000). A larger
    /// step refuses requests until the clock is back past the last id's millisecond.
    pub max_backwards_ms: Option<u64>,
    /// Catch-up window in ms (default 10; at most 100; 0 makes every id carry the clock's
    /// millisecond at issue): see [`generator::DEFAULT_CATCH_UP_MS`].
    pub catch_up_ms: Option<u64>,
}

impl IdgenConfig {
    fn resolved(mut self) -> Result<Self, String> {
        if self.ttl_ms == 0 {
            self.ttl_ms = DEFAULT_TTL_MS;
        }
        if !(1_000..=60_000).contains(&self.ttl_ms) {
            return Err(format!(
                "plugins.idgen.ttl_ms must be 1000..=60000, got {}",
                self.ttl_ms
            ));
        }
        let b = self.max_backwards_ms.unwrap_or(DEFAULT_MAX_BACKWARDS_MS);
        if b > 10_000 {
            return Err(format!(
                "plugins.idgen.max_backwards_ms must be at most 10000, got {b}"
            ));
        }
        self.max_backwards_ms = Some(b);
        let c = self.catch_up_ms.unwrap_or(DEFAULT_CATCH_UP_MS);
        if c > 100 {
            return Err(format!(
                "plugins.idgen.catch_up_ms must be at most 100, got {c}"
            ));
        }
        self.catch_up_ms = Some(c);
        Ok(self)
    }
}

/// The plugin.
pub struct IdgenPlugin {
    me: String,
    idgen: Arc<Idgen<SystemClock>>,
    info: Arc<Mutex<LeaseInfo>>,
    cx: Consensus,
    manager: JoinHandle<()>,
}

impl Drop for IdgenPlugin {
    fn drop(&mut self) {
        self.manager.abort();
        self.idgen.lock().stop();
        // Free the worker id at once rather than after its TTL (best effort).
        let lease = self.info().lease;
        if let (Some(lease), Ok(rt)) = (lease, tokio::runtime::Handle::try_current()) {
            let cx = self.cx.clone();
            rt.spawn(async move {
                let _ = cx.revoke(lease).await;
            });
        }
    }
}

impl IdgenPlugin {
    fn info(&self) -> LeaseInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn status(&self) -> IdStatus {
        let g = self.idgen.lock();
        let issuing_for_ms = g
            .window()
            .map(|w| {
                w.valid_until
                    .saturating_duration_since(Instant::now())
                    .as_millis() as u64
            })
            .unwrap_or(0);
        let stats = g.stats();
        drop(g);
        IdStatus {
            node: self.me.clone(),
            lease: self.info(),
            issuing_for_ms,
            stats,
        }
    }
}

fn to_rpc(me: &str, e: GenError) -> RpcError {
    match e {
        // Another node may well serve it: clients fail over on these.
        GenError::NoLease
        | GenError::LeaseExpired(_)
        | GenError::PastCeiling { .. }
        | GenError::BehindHighWater { .. } => RpcError::Unreachable(format!("idgen on {me}: {e}")),
        GenError::ClockBackwards { .. } | GenError::BeforeEpoch(_) | GenError::PastEnd => {
            RpcError::refused(format!("idgen on {me}: {e}"))
        }
    }
}

#[async_trait::async_trait]
impl Plugin for IdgenPlugin {
    type Api = IdgenApi;

    async fn start(ctx: PluginContext) -> Result<Self, String> {
        let cfg: IdgenConfig = ctx.plugin_config("idgen").map_err(|e| e.to_string())?;
        let cfg = cfg.resolved()?;
        for (name, help) in [
            ("dsys_idgen_ids_total", "Ids issued by this node"),
            (
                "dsys_idgen_clock_backwards_total",
                "Steps of the clock backwards seen by the generator",
            ),
            (
                "dsys_idgen_clock_refusals_total",
                "Requests refused because the clock stepped back past the bound",
            ),
            (
                "dsys_idgen_sequence_waits_total",
                "Waits for the next millisecond after its 4096 sequences ran out",
            ),
            (
                "dsys_idgen_leases_acquired_total",
                "Worker id leases acquired through consensus",
            ),
            ("dsys_idgen_leases_lost_total", "Worker id leases lost"),
        ] {
            ctx.metrics.describe(name, "counter", help);
        }
        let idgen = Arc::new(Idgen::with_generator(
            SystemClock,
            Generator::new(cfg.max_backwards_ms.unwrap_or(DEFAULT_MAX_BACKWARDS_MS))
                .with_catch_up(cfg.catch_up_ms.unwrap_or(DEFAULT_CATCH_UP_MS)),
        ));
        let info = Arc::new(Mutex::new(LeaseInfo {
            state: "acquiring".into(),
            ..Default::default()
        }));
        let cx = Consensus::new(ctx.rpc.clone());
        let manager = worker::Manager {
            me: ctx.node_id.clone(),
            cx: cx.clone(),
            idgen: idgen.clone(),
            ttl_ms: cfg.ttl_ms,
            info: info.clone(),
            timeline: ctx.timeline.clone(),
        };
        let manager = tokio::spawn(manager.run());
        Ok(IdgenPlugin {
            me: ctx.node_id.clone(),
            idgen,
            info,
            cx,
            manager,
        })
    }

    /// Status only: issuing ids is reserved for clients that may change state.
    fn read_only(req: &IdRequest) -> bool {
        matches!(req, IdRequest::Status)
    }

    async fn handle(&self, _caller: Caller, req: IdRequest) -> Result<IdResponse, RpcError> {
        req.validate()?;
        match req {
            IdRequest::Next { n } => {
                let runs = self.idgen.next(n).await.map_err(|e| to_rpc(&self.me, e))?;
                Ok(IdResponse::Ids(IdBatch {
                    node: self.me.clone(),
                    runs,
                }))
            }
            IdRequest::Status => Ok(IdResponse::Status(self.status())),
        }
    }

    fn panel(&self) -> Option<Panel> {
        let s = self.status();
        let l = &s.lease;
        let dash = || "-".to_string();
        Some(
            Panel::new("Unique ids (Snowflake, worker ids leased via consensus)")
                .stat("state", &l.state)
                .stat(
                    "worker id",
                    l.worker.map(|w| w.to_string()).unwrap_or_else(dash),
                )
                .stat("lease", l.lease.map(|w| w.to_string()).unwrap_or_else(dash))
                .stat(
                    "issuing for",
                    format!("{:.1} s", s.issuing_for_ms as f64 / 1000.0),
                )
                .stat(
                    "high-water mark",
                    l.high_water_unix_ms
                        .map(api::rfc3339_ms)
                        .unwrap_or_else(dash),
                )
                .stat("ids issued", s.stats.issued)
                .stat("clock-backwards events", s.stats.clock_backwards)
                .stat("refused (clock too far back)", s.stats.clock_refusals)
                .stat("next-millisecond waits", s.stats.overflow_waits)
                .stat("worker ids acquired", l.acquired)
                .stat("leases lost", l.lost)
                .stat("last problem", l.last_error.clone().unwrap_or_else(dash)),
        )
    }

    fn export_metrics(&self, m: &Metrics) {
        let st = self.idgen.lock().stats();
        let info = self.info();
        m.set_counter("dsys_idgen_ids_total", &[], st.issued);
        m.set_counter("dsys_idgen_clock_backwards_total", &[], st.clock_backwards);
        m.set_counter("dsys_idgen_clock_refusals_total", &[], st.clock_refusals);
        m.set_counter("dsys_idgen_sequence_waits_total", &[], st.overflow_waits);
        m.set_counter("dsys_idgen_leases_acquired_total", &[], info.acquired);
        m.set_counter("dsys_idgen_leases_lost_total", &[], info.lost);
    }
}
