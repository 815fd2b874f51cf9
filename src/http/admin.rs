//! The admin endpoints (role `admin`): stats, connections, disconnects and broadcasts.

use std::sync::atomic::Ordering::Relaxed;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use tracing::info;
use uuid::Uuid;

use crate::error::ApiError;
use crate::http::extract::{admin, json_body, publish_failed, PostedEvent};
use crate::http::shared::Shared;
use crate::jobs::scheduler::Load;
use crate::protocol::{close, excerpt, valid_id, RoomKind};
use crate::realtime::broker::{Publish, Published, Stats, UserRooms};
use crate::realtime::presence::Presence;
use crate::realtime::redis::Control;
use crate::realtime::registry::{CloseConnection, CloseUser, ListConnections};

pub async fn admin_stats(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let b = shared.broker.send(Stats).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let (queued, running) = shared.scheduler.send(Load).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let (nodes, totals) = nodes_and_totals(&shared).await?;
    let m = &shared.metrics;
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
        "node_id": node_id(&shared),
        "nodes": nodes,
        "totals": totals,
    })))
}

/// This node's id: its cluster id, or `local` on its own.
fn node_id(shared: &Shared) -> &str {
    shared.redis.as_ref().map_or("local", |r| r.node())
}

/// Every node's counts (in cluster mode, from their heartbeats, so a node that died drops out within
/// a few seconds), and their sums.
async fn nodes_and_totals(shared: &Shared) -> Result<(Vec<Value>, Value), ApiError> {
    let nodes = match &shared.redis {
        Some(redis) => redis.nodes().await.map_err(|e| ApiError::Unavailable(e.to_string()))?,
        None => vec![Presence::counts("local", &shared.addr, &shared.metrics, shared.started)],
    };
    let sum = |field: &str| nodes.iter().filter_map(|n| n[field].as_u64()).sum::<u64>();
    let totals = json!({
        "nodes": nodes.len(),
        "connections": sum("connections"),
        "rooms": sum("rooms"),
        "subscriptions": sum("subscriptions"),
        "events_published": sum("events_published"),
    });
    Ok((nodes, totals))
}

pub async fn admin_connections(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let list = shared.registry.send(ListConnections).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({ "connections": list })))
}

pub async fn admin_close_connection(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound("no such connection".into()))?;
    let (code, reason) = close::BY_ADMIN;
    let found = match &shared.redis {
        // On whichever node holds it.
        Some(redis) => {
            let control =
                Control { id: Uuid::new_v4().simple().to_string(), connection: Some(id), ..Default::default() };
            redis.control(&control).await.map_err(|e| ApiError::Unavailable(e.to_string()))? > 0
        }
        None => {
            let msg = CloseConnection { id, code, reason: reason.into() };
            shared.registry.send(msg).await.map_err(|e| ApiError::Unavailable(e.to_string()))?
        }
    };
    info!(target: "audit", event = "admin_disconnect", admin = %who.user_id, conn = %id, found, "admin action");
    if !found {
        return Err(ApiError::NotFound("no such connection".into()));
    }
    Ok(HttpResponse::Ok().json(json!({ "closed": 1 })))
}

pub async fn admin_close_user(
    req: HttpRequest,
    shared: web::Data<Shared>,
    user_id: web::Path<String>,
    query: web::Query<BroadcastQuery>,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let user_id = user_id.into_inner();
    let (code, reason) = close::BY_ADMIN;
    let tenant = query.into_inner().tenant;
    let closed = match &shared.redis {
        // On every node.
        Some(redis) => {
            let id = Uuid::new_v4().simple().to_string();
            let control = Control { id, user: Some(user_id.clone()), tenant, ..Default::default() };
            redis.control(&control).await.map_err(|e| ApiError::Unavailable(e.to_string()))? as usize
        }
        None => {
            let msg = CloseUser { user_id: user_id.clone(), tenant, code, reason: reason.into() };
            shared.registry.send(msg).await.map_err(|e| ApiError::Unavailable(e.to_string()))?
        }
    };
    info!(target: "audit", event = "admin_disconnect_user", admin = %who.user_id, user = %user_id, closed, "admin action");
    Ok(HttpResponse::Ok().json(json!({ "closed": closed })))
}

/// `?tenant=` of a broadcast or a user disconnect: which tenant's user is meant.
#[derive(serde::Deserialize)]
pub struct BroadcastQuery {
    tenant: Option<String>,
}

/// Publishes an admin event. A `user:<id>` room belongs to one tenant's user: `?tenant=` names it;
/// without it the event goes to the live `user:<id>` room of every tenant (none: nothing is published).
pub async fn admin_broadcast(
    req: HttpRequest,
    shared: web::Data<Shared>,
    room: web::Path<String>,
    query: web::Query<BroadcastQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let room = room.into_inner();
    let Some(kind) = RoomKind::parse(&room) else {
        return Err(ApiError::BadRequest(format!(
            "unknown room \"{}\": use job:<uuid>, user:<id> or tenant:<id>",
            excerpt(&room)
        )));
    };
    let event = json_body::<PostedEvent>(body).await?.into_event()?;
    let keys = match (&kind, query.into_inner().tenant) {
        (RoomKind::User(_), Some(tenant)) if valid_id(&tenant) => vec![kind.key(&tenant)],
        (RoomKind::User(_), Some(tenant)) => {
            return Err(ApiError::BadRequest(format!("not a tenant id: \"{}\"", excerpt(&tenant))))
        }
        (RoomKind::User(user_id), None) => {
            let ask = UserRooms { user_id: user_id.clone() };
            shared.broker.send(ask).await.map_err(|e| ApiError::Unavailable(e.to_string()))?
        }
        _ => vec![kind.key(&who.tenant)],
    };
    let mut answer = Published { seq: 0, delivered_to: 0 };
    for key in keys {
        let published = shared
            .broker
            .send(Publish::api(key, event.clone()))
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .map_err(publish_failed)?;
        answer = Published { seq: published.seq, delivered_to: answer.delivered_to + published.delivered_to };
    }
    info!(target: "audit", event = "admin_broadcast", admin = %who.user_id, room = %room, kind = event.kind().as_str(),
        seq = answer.seq, "admin action");
    Ok(HttpResponse::Ok().json(answer))
}
