//! The WebSocket upgrade (`/ws`, `/ws/jobs/{job_id}`: Origin, query, then a session) and the
//! single-use WebSocket token endpoint.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use crate::error::ApiError;
use crate::framing::Format;
use crate::http::extract::bearer;
use crate::http::shared::Shared;
use crate::realtime::echo::Echo;
use crate::realtime::session::{Session, SessionParams};

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    format: Option<String>,
    ack: Option<String>,
}

pub async fn ws(req: HttpRequest, body: web::Payload, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    upgrade(req, body, shared.get_ref().clone(), None)
}

pub async fn ws_job(
    req: HttpRequest,
    body: web::Payload,
    shared: web::Data<Shared>,
    job_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let room = format!("job:{}", job_id.into_inner());
    upgrade(req, body, shared.get_ref().clone(), Some(room))
}

/// With `allowed_origins` set, an upgrade must come from one of them (browsers send `Origin`; CORS
/// does not cover WebSockets).
fn check_origin(req: &HttpRequest, shared: &Shared) -> Result<(), ApiError> {
    if let Some(allowed) = shared.config.origins() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            info!(target: "audit", event = "origin_refused", origin = ?origin, "upgrade refused");
            return Err(ApiError::Forbidden("this Origin is not allowed".into()));
        }
    }
    Ok(())
}

fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    shared: Shared,
    auto_room: Option<String>,
) -> Result<HttpResponse, ApiError> {
    check_origin(&req, &shared)?;
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
        ip: req.peer_addr().map(|a| a.ip()),
    };
    Session::start(shared.session_deps(), params, session, stream);
    Ok(response)
}

/// `GET /ws/echo` (routed by `serve --conformance-echo` only): every message sent back as it came,
/// through `/ws`'s frame handling; no authentication.
pub async fn echo(req: HttpRequest, body: web::Payload, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    check_origin(&req, &shared)?;
    let (response, session, stream) =
        actix_ws::handle(&req, body).map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {e}")))?;
    Echo::start(
        shared.config.clone(),
        shared.metrics.clone(),
        shared.registry.clone(),
        req.peer_addr(),
        session,
        stream,
    );
    Ok(response)
}

/// `POST /api/v1/auth/websocket-token`: a single-use token for the WebSocket URL.
pub async fn websocket_token(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    let id = bearer(&req, &shared)?;
    // Cluster mode: the token carries the cluster's generation as Redis has it now (read here, so a
    // token minted right after a start or a Redis loss is good on every node).
    let minted = match &shared.redis {
        Some(redis) => {
            let generation = redis.generation().await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
            shared.auth.mint_ws_token_in(&id, &generation)
        }
        None => shared.auth.mint_ws_token(&id),
    };
    let (token, expires_in) = minted.map_err(|e| ApiError::Internal(e.to_string()))?;
    info!(target: "audit", event = "websocket_token", user = %id.user_id, tenant = %id.tenant, "minted");
    Ok(HttpResponse::Created().json(json!({ "token": token, "expires_in": expires_in })))
}
