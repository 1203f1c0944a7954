//! `GET /ratelimit/{rule}/{key}`: 200 when allowed, 429 when limited, with `Retry-After` and
//! the `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` headers (seconds,
//! rounded up). The seed's "API Gateway → Rate Limiter Middleware" hop.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dsys_runtime::{axum, LocalClient, RpcError};

use crate::api::{RatelimitApi, RatelimitRequest, RatelimitResponse};

fn secs_ceil(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

async fn check(
    State(client): State<LocalClient<RatelimitApi>>,
    Path((rule, key)): Path<(String, String)>,
) -> Response {
    let req = RatelimitRequest::Check { rule, key, cost: 1 };
    match client.call(&req).await {
        Ok(resp) => {
            let RatelimitResponse::Decision { decision: d, .. } = &resp else {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(resp)).into_response();
            };
            let mut h = HeaderMap::new();
            let num = |v: u64| {
                HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("0"))
            };
            h.insert("RateLimit-Limit", num(d.limit));
            h.insert("RateLimit-Remaining", num(d.remaining));
            h.insert("RateLimit-Reset", num(secs_ceil(d.reset_ms)));
            let status = if d.allowed {
                StatusCode::OK
            } else {
                h.insert("Retry-After", num(secs_ceil(d.retry_after_ms).max(1)));
                StatusCode::TOO_MANY_REQUESTS
            };
            (status, h, Json(resp)).into_response()
        }
        Err(e) => {
            let status = match e {
                RpcError::Refused(_) => StatusCode::BAD_REQUEST,
                RpcError::Unreachable(_)
                | RpcError::Timeout(_)
                | RpcError::PluginUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
        }
    }
}

pub(crate) fn routes(client: LocalClient<RatelimitApi>) -> Router {
    Router::new()
        .route("/ratelimit/{rule}/{key}", get(check))
        .with_state(client)
}
