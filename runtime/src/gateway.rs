//! HTTP on each node (axum): `/health`, `/cluster` (JSON status), `/metrics` (Prometheus
//! text), and the routes each plugin contributes.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::task::JoinHandle;

use crate::membership::MemberState;
use crate::metrics::Metrics;
use crate::sys::SysService;

struct GatewayState {
    sys: Arc<SysService>,
    metrics: Arc<Metrics>,
}

async fn health(State(s): State<Arc<GatewayState>>) -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "node": s.sys.me, "generation": s.sys.generation }))
}

async fn cluster(State(s): State<Arc<GatewayState>>) -> impl IntoResponse {
    Json(s.sys.status())
}

async fn metrics_page(State(s): State<Arc<GatewayState>>) -> impl IntoResponse {
    let view = s.sys.membership.view();
    for (state, name) in [
        (MemberState::Alive, "alive"),
        (MemberState::Joining, "joining"),
        (MemberState::Dead, "dead"),
        (MemberState::Left, "left"),
    ] {
        let n = view.members.values().filter(|m| m.state == state).count();
        s.metrics.set("dsys_members", &[("state", name)], n as u64);
    }
    for (name, _, restarts) in s.sys.host.statuses() {
        s.metrics.set(
            "dsys_plugin_restarts",
            &[("plugin", &name)],
            restarts as u64,
        );
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

/// Serve the gateway on `listener` with the plugins' routes merged in.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    sys: Arc<SysService>,
    metrics: Arc<Metrics>,
    plugin_routes: Vec<Router>,
) -> JoinHandle<()> {
    metrics.describe(
        "dsys_members",
        "gauge",
        "Members by state, as this node sees them",
    );
    metrics.describe(
        "dsys_plugin_restarts",
        "gauge",
        "Restarts of each plugin on this node",
    );
    let state = Arc::new(GatewayState { sys, metrics });
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics_page))
        .with_state(state);
    for r in plugin_routes {
        app = app.merge(r);
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("gateway stopped: {e}");
        }
    })
}
