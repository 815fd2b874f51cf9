//! HTTP endpoints (contract §5) and the WebSocket upgrade (§4).

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;
use uuid::Uuid;

use crate::auth::Identity;
use crate::broker::{Publish, Stats};
use crate::error::ApiError;
use crate::framing::Format;
use crate::protocol::{close, Event, EventType, RoomKind};
use crate::registry::{CloseConnection, CloseUser, ListConnections};
use crate::session::{Session, SessionParams};
use crate::Shared;

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/ws", web::get().to(ws))
        .route("/ws/jobs/{job_id}", web::get().to(ws_job))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/", web::get().to(demo))
        .route("/demo/{file}", web::get().to(demo))
        .service(
            web::scope("/api/v1")
                .configure(crate::api_jobs::routes)
                .route("/auth/websocket-token", web::post().to(websocket_token))
                .route("/admin/stats", web::get().to(admin_stats))
                .route("/admin/connections", web::get().to(admin_connections))
                .route("/admin/connections/{id}", web::delete().to(admin_close_connection))
                .route("/admin/users/{user_id}/connections", web::delete().to(admin_close_user))
                .route("/admin/broadcast/{room}", web::post().to(admin_broadcast)),
        );
}

/// JSON body errors in the contract's error shape.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(1 << 20)
        .error_handler(|err, _| ApiError::BadRequest(format!("invalid JSON body: {err}")).into())
}

/// Path parameter errors in the contract's error shape.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|err, _| ApiError::NotFound(err.to_string()).into())
}

/// Unknown routes.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint".into()))
}

/// Access log line per request, with every query value redacted so no token reaches a log.
pub async fn access_log(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.path().to_string();
    let query = redact_query(req.query_string());
    let res = next.call(req).await?;
    info!(target: "access", %method, %path, query = %query, status = res.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    Ok(res)
}

/// `a=1&token=xyz` → `a=[redacted]&token=[redacted]`: keys stay, values never reach a log.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) => format!("{k}=[redacted]"),
            None => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The caller's identity from `Authorization: Bearer <access JWT>`.
pub(crate) fn bearer(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be Bearer".into()))?;
    shared.auth.verify_access(token.trim()).map_err(|e| {
        shared.metrics.auth_failed(e.reason());
        info!(target: "audit", event = "http_auth_failure", reason = e.reason(), path = %req.path(), "bearer refused");
        ApiError::from(e)
    })
}

fn admin(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    let id = bearer(req, shared)?;
    if !id.admin {
        return Err(ApiError::Forbidden("the admin role is required".into()));
    }
    Ok(id)
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    format: Option<String>,
    ack: Option<String>,
}

async fn ws(req: HttpRequest, body: web::Payload, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    upgrade(req, body, shared.get_ref().clone(), None)
}

async fn ws_job(
    req: HttpRequest,
    body: web::Payload,
    shared: web::Data<Shared>,
    job_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let room = format!("job:{}", job_id.into_inner());
    upgrade(req, body, shared.get_ref().clone(), Some(room))
}

fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    shared: Shared,
    auto_room: Option<String>,
) -> Result<HttpResponse, ApiError> {
    if let Some(allowed) = shared.config.origins() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            info!(target: "audit", event = "origin_refused", origin = ?origin, "upgrade refused");
            return Err(ApiError::Forbidden("this Origin is not allowed".into()));
        }
    }
    let q = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
    let format =
        Format::parse(q.format.as_deref()).ok_or_else(|| ApiError::BadRequest("format must be auto or json".into()))?;
    let ack = match q.ack.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(_) => return Err(ApiError::BadRequest("ack must be 1 or 0".into())),
    };
    let (response, session, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {e}")))?;
    let params = SessionParams {
        token: q.token.filter(|t| !t.is_empty()),
        format,
        ack,
        auto_room,
        remote: req.peer_addr().map(|a| a.to_string()),
    };
    Session::start(shared, params, session, stream);
    Ok(response)
}

async fn websocket_token(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    let id = bearer(&req, &shared)?;
    let (token, expires_in) = shared.auth.mint_ws_token(&id).map_err(|e| ApiError::Internal(e.to_string()))?;
    info!(target: "audit", event = "websocket_token", user = %id.user_id, tenant = %id.tenant, "minted");
    Ok(HttpResponse::Created().json(json!({ "token": token, "expires_in": expires_in })))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    let broker = shared.broker.send(Stats).await.is_ok();
    let store = matches!(shared.store.send(crate::store::Ping).await, Ok(Ok(())));
    let registry = shared.registry.send(crate::registry::Count).await.is_ok();
    let ok = broker && registry && store;
    let body = json!({ "status": if ok { "ready" } else { "unavailable" },
        "broker": broker, "registry": registry, "store": store });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(shared.metrics.render())
}

/// The demo page, embedded at build time (its sources are in `clients/demo`; no Node at run time).
const DEMO: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("../clients/demo/src/index.html")),
    ("/demo/app.js", "text/javascript; charset=utf-8", include_str!("demo/app.js")),
    ("/demo/app.css", "text/css; charset=utf-8", include_str!("../clients/demo/src/app.css")),
    ("/demo/sample.csv", "text/csv; charset=utf-8", include_str!("sample.csv")),
];

async fn demo(req: HttpRequest) -> HttpResponse {
    match DEMO.iter().find(|(path, _, _)| *path == req.path()) {
        Some((_, content_type, body)) => {
            HttpResponse::Ok().content_type(*content_type).insert_header(("Cache-Control", "no-cache")).body(*body)
        }
        None => HttpResponse::NotFound().finish(),
    }
}

async fn admin_stats(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let b = shared.broker.send(Stats).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let (queued, running) =
        shared.scheduler.send(crate::scheduler::Load).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let m = &shared.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    Ok(HttpResponse::Ok().json(json!({
        "connections": m.connections.load(Relaxed),
        "connections_total": m.connections_total.load(Relaxed),
        "rooms": b.rooms,
        "subscriptions": b.subscriptions,
        "events_published": b.published,
        "messages_sent": m.messages_sent(),
        "bytes_sent": m.bytes_sent(),
        "messages_dropped": m.dropped.load(Relaxed),
        "acknowledged": m.acknowledged.load(Relaxed),
        "redelivered": m.redelivered.load(Relaxed),
        "slow_consumer_closes": m.slow_consumers.load(Relaxed),
        "ack_timeout_closes": m.ack_timeouts.load(Relaxed),
        "auth_failures": m.auth_failures_total(),
        "jobs_queued": queued,
        "jobs_running": running,
        "uptime_s": shared.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

async fn admin_connections(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let list = shared.registry.send(ListConnections).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({ "connections": list })))
}

async fn admin_close_connection(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such connection".into()))?;
    let msg = CloseConnection { id, code: close::ADMIN, reason: "disconnected by an admin".into() };
    let found = shared.registry.send(msg).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    info!(target: "audit", event = "admin_disconnect", admin = %who.user_id, conn = %id, found, "admin action");
    if !found {
        return Err(ApiError::NotFound("no such connection".into()));
    }
    Ok(HttpResponse::Ok().json(json!({ "closed": 1 })))
}

async fn admin_close_user(
    req: HttpRequest,
    shared: web::Data<Shared>,
    user_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let user_id = user_id.into_inner();
    let msg = CloseUser { user_id: user_id.clone(), code: close::ADMIN, reason: "disconnected by an admin".into() };
    let closed = shared.registry.send(msg).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    info!(target: "audit", event = "admin_disconnect_user", admin = %who.user_id, user = %user_id, closed, "admin action");
    Ok(HttpResponse::Ok().json(json!({ "closed": closed })))
}

/// `{type, data}` as admins and publishers post it.
#[derive(Deserialize)]
pub struct PostedEvent {
    /// An event type name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its data.
    #[serde(default)]
    pub data: Value,
}

impl PostedEvent {
    /// The typed event, or why it is not one that may be published into a room.
    pub fn into_event(self) -> Result<Event, ApiError> {
        let allowed = EventType::ALL.iter().any(|t| t.is_room_event() && t.as_str() == self.kind);
        if !allowed {
            return Err(ApiError::BadRequest(format!("type {:?} cannot be published into a room", self.kind)));
        }
        let data = if self.data.is_null() { json!({}) } else { self.data };
        serde_json::from_value(json!({ "type": self.kind, "data": data }))
            .map_err(|e| ApiError::BadRequest(format!("invalid data for {}: {e}", self.kind)))
    }
}

async fn admin_broadcast(
    req: HttpRequest,
    shared: web::Data<Shared>,
    room: web::Path<String>,
    body: web::Json<PostedEvent>,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let room = room.into_inner();
    if RoomKind::parse(&room).is_none() {
        return Err(ApiError::BadRequest(format!("unknown room {room:?}: use job:<uuid>, user:<id> or tenant:<id>")));
    }
    let event = body.into_inner().into_event()?;
    let kind = event.kind();
    let published = shared
        .broker
        .send(Publish { room: room.clone(), event })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .map_err(crate::error::publish_failed)?;
    info!(target: "audit", event = "admin_broadcast", admin = %who.user_id, room = %room, kind = kind.as_str(),
        seq = published.seq, "admin action");
    Ok(HttpResponse::Ok().json(published))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_redacted() {
        assert_eq!(redact_query("token=abc.def&format=json"), "token=[redacted]&format=[redacted]");
        assert_eq!(redact_query(""), "");
        assert_eq!(redact_query("flag"), "flag");
    }

    #[test]
    fn posted_events_are_typed() {
        let ok = PostedEvent { kind: "info".into(), data: json!({"message": "hi"}) };
        assert_eq!(ok.into_event().unwrap().kind(), EventType::Info);
        let conn_level = PostedEvent { kind: "authenticated".into(), data: json!({}) };
        assert!(conn_level.into_event().is_err());
        let bad = PostedEvent { kind: "zone_completed".into(), data: json!({"job_id": 1}) };
        assert!(bad.into_event().is_err());
    }
}
