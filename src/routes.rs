//! Local routes every relay serves itself: echo for load balancers, the relay error list,
//! health, readiness and metrics, and the 569 answer for requests that belong to no role.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::json;

use crate::error::{RelayCode, RelayError};
use crate::server::RelayState;

/// Registers the local routes and the fallback.
pub fn local(config: &mut web::ServiceConfig) {
    config
        .route("/api/mte-echo/{message}", web::get().to(echo))
        .route("/api/mte-errors", web::get().to(errors))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(missing_relay_header));
}

/// `{"echo": message, "time": "<RFC 3339 UTC>"}`.
async fn echo(message: web::Path<String>) -> HttpResponse {
    let now = time::OffsetDateTime::now_utc();
    let time = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(json!({ "echo": message.into_inner(), "time": time }))
}

/// The relay error statuses and their meaning.
async fn errors() -> HttpResponse {
    let list: Vec<_> = RelayCode::ALL
        .iter()
        .map(|(code, meaning)| json!({ "code": *code as u16, "name": code.name(), "meaning": meaning }))
        .collect();
    HttpResponse::Ok().json(json!({ "errors": list }))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// 200 while the listener is up and the state store answers; 503 otherwise.
async fn readyz(state: web::Data<RelayState>) -> HttpResponse {
    let store = state.registry.store();
    let store_ok = store.ping().await.is_ok();
    let ready = state.is_ready() && store_ok;
    let body = json!({ "ready": ready, "listener": state.is_ready(), "store": store.kind(), "storeReachable": store_ok });
    match ready {
        true => HttpResponse::Ok().json(body),
        false => HttpResponse::ServiceUnavailable().json(body),
    }
}

async fn metrics(state: web::Data<RelayState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body({
        state.metrics.observe_store(state.registry.store().health().as_deref());
        state.metrics.render(state.registry.len())
    })
}

async fn missing_relay_header(
    _request: HttpRequest,
    state: web::Data<RelayState>,
) -> Result<HttpResponse, RelayError> {
    state.metrics.relay_error(RelayCode::MissingRelayHeader);
    Err(RelayError::relay(RelayCode::MissingRelayHeader, RelayCode::ALL[10].1))
}
