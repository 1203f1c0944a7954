//! HTTP on each node (axum): `/health`, `/cluster` (JSON status), `/metrics` (Prometheus
//! text), the dashboard (`/`, fed by `/api/stream`; see [`crate::dashboard`]), `/api/state`
//! (one snapshot), `/api/lookup?key=K` (where K lives on the ring), and the routes each plugin
//! contributes.

use std::sync::Arc;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
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

async fn index() -> impl IntoResponse {
    Html(crate::dashboard::INDEX_HTML)
}

/// Longest key `/api/lookup` accepts.
const MAX_LOOKUP_KEY: usize = 512;
/// How often the dashboard stream sends a snapshot when nothing happens.
const STREAM_EVERY: Duration = Duration::from_millis(500);

async fn state_once(
    State(s): State<Arc<GatewayState>>,
    Query(q): Query<HashMap<String, String>>,
) -> impl IntoResponse {
    Json(crate::dashboard::snapshot(&s.sys, q.get("node").map(String::as_str), 0).await)
}

async fn lookup(
    State(s): State<Arc<GatewayState>>,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    let bad = |msg: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": msg })),
        )
            .into_response()
    };
    let Some(key) = q.get("key").filter(|k| !k.is_empty()) else {
        return bad("give ?key=".into());
    };
    if key.len() > MAX_LOOKUP_KEY {
        return bad(format!("key longer than {MAX_LOOKUP_KEY} bytes"));
    }
    let n = match q.get("n").map(|v| v.parse::<usize>()) {
        None => 3,
        Some(Ok(n)) if (1..=16).contains(&n) => n,
        Some(_) => return bad("n must be 1..=16".into()),
    };
    let ring = s.sys.membership.ring();
    Json(serde_json::json!({
        "key": key,
        "position": crate::ring::Ring::position(key.as_bytes()),
        "preference_list": ring.preference_list(key.as_bytes(), n),
    }))
    .into_response()
}

/// Server-sent events: a `state` event at once, then every [`STREAM_EVERY`] and right after
/// each timeline event, each carrying only the timeline entries the page has not had yet.
async fn stream(
    State(s): State<Arc<GatewayState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let sys = s.sys.clone();
    let node = q.get("node").cloned();
    let events = sys.timeline.subscribe();
    let st = (sys, node, events, 0u64, true);
    let stream =
        futures_util::stream::unfold(st, |(sys, node, mut events, after, first)| async move {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep(STREAM_EVERY) => {}
                    r = events.recv() => {
                        if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return None;
                        }
                        // Let a burst of events (a partition touches every node) land together.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            let snap = crate::dashboard::snapshot(&sys, node.as_deref(), after).await;
            let after = snap.timeline.last().map(|e| e.seq).unwrap_or(after);
            let ev = Event::default()
                .event("state")
                .json_data(&snap)
                .unwrap_or_else(|_| Event::default().event("error").data("encode failed"));
            Some((Ok(ev), (sys, node, events, after, false)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
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
    let rules = s.sys.faults.rules();
    for (kind, n) in [
        ("partition", usize::from(!rules.partition.is_empty())),
        ("delay", rules.delay_ms.len()),
        ("drop", rules.drop.len()),
    ] {
        s.metrics
            .set("dsys_faults_active", &[("kind", kind)], n as u64);
    }
    if let Some(u) = crate::process::usage() {
        s.metrics
            .set("dsys_process_resident_bytes", &[], u.rss_bytes);
        s.metrics.set("dsys_process_anon_bytes", &[], u.anon_bytes);
        s.metrics
            .set_counter("dsys_process_cpu_milliseconds_total", &[], u.cpu_ms);
    }
    s.sys.host.export_metrics(&s.metrics);
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
        "dsys_faults_active",
        "gauge",
        "Fault-injection rules in force on this node (partition: 0/1; delay, drop: peers affected)",
    );
    metrics.describe(
        "dsys_plugin_requests_total",
        "counter",
        "Requests served by this node's plugins (local and remote callers), by outcome",
    );
    metrics.describe(
        "dsys_process_resident_bytes",
        "gauge",
        "Resident memory of this node's process (VmRSS, the mapped binary included)",
    );
    metrics.describe(
        "dsys_process_anon_bytes",
        "gauge",
        "Private anonymous resident memory of this node's process (RssAnon: heap and stacks)",
    );
    metrics.describe(
        "dsys_process_cpu_milliseconds_total",
        "counter",
        "User plus system CPU time of this node's process since it started, in milliseconds",
    );
    metrics.describe(
        "dsys_plugin_restarts",
        "gauge",
        "Restarts of each plugin on this node",
    );
    let state = Arc::new(GatewayState { sys, metrics });
    let mut app = Router::new()
        .route("/", get(index))
        .route("/api/state", get(state_once))
        .route("/api/stream", get(stream))
        .route("/api/lookup", get(lookup))
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
