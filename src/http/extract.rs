//! What several endpoints share: the bearer and admin checks, JSON bodies read only once the caller
//! is known, the `{type, data}` body of posted events, and the HTTP answer to a refused publish.

use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use crate::auth::Identity;
use crate::db::store::{JobChange, JobRecord, Refusal, UpdateJob};
use crate::error::ApiError;
use crate::http::shared::Shared;
use crate::protocol::{Event, EventType};
use crate::realtime::broker::PublishError;

/// The token of `Authorization: Bearer <token>`.
pub fn token_of(req: &HttpRequest) -> Result<&str, ApiError> {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be Bearer".into()))?;
    Ok(token.trim())
}

/// The caller's identity from `Authorization: Bearer <access JWT>`.
pub fn bearer(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    shared.auth.verify_access(token_of(req)?).map_err(|e| {
        shared.metrics.auth_failed(e.reason());
        info!(target: "audit", event = "http_auth_failure", reason = e.reason(), path = %req.path(), "bearer refused");
        ApiError::from(e)
    })
}

/// The caller's identity, which must hold the admin role.
pub fn admin(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    let id = bearer(req, shared)?;
    if !id.admin {
        return Err(ApiError::Forbidden("the admin role is required".into()));
    }
    Ok(id)
}

/// The largest JSON request body.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes. Handlers call it after their identity and
/// role checks, so a caller without a token is refused before a byte of the body is read.
pub async fn json_body<T: DeserializeOwned>(mut payload: web::Payload) -> Result<T, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("the body was interrupted: {e}")))?;
        if body.len() + chunk.len() > MAX_JSON_BODY {
            return Err(ApiError::PayloadTooLarge(format!("a JSON body may have at most {MAX_JSON_BODY} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
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
            return Err(ApiError::BadRequest(format!(
                "type \"{}\" cannot be published into a room",
                crate::protocol::excerpt(&self.kind)
            )));
        }
        let data = if self.data.is_null() { json!({}) } else { self.data };
        serde_json::from_value(json!({ "type": self.kind, "data": data }))
            .map_err(|e| ApiError::BadRequest(format!("invalid data for {}: {e}", self.kind)))
    }
}

/// A refused publish as an HTTP error: 503 when the server is stopping, 500 for a bug.
pub fn publish_failed(e: PublishError) -> ApiError {
    match e {
        PublishError::Stopped | PublishError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        PublishError::Encode(_) => ApiError::Internal(e.to_string()),
    }
}

/// Claims `record`'s job id for its tenant in one store step: free, or reserved by a subscription of
/// the same tenant (then `record` is saved). Anything else is taken, and the answer (409, naming the
/// id as the client's `field`) is the same whoever has it.
pub async fn claim_id(shared: &Shared, record: JobRecord, field: &str) -> Result<(), ApiError> {
    let (job_id, tenant) = (record.snapshot.job_id, record.snapshot.tenant.clone());
    let in_use = format!("{field} {job_id} is already in use");
    let taken = in_use.clone();
    let claim = move |current: Option<&JobRecord>| match current {
        None => JobChange::Save(Box::new(record)),
        Some(job) if job.snapshot.status == crate::protocol::JobStatus::Pending && job.snapshot.tenant == tenant => {
            JobChange::Save(Box::new(record))
        }
        Some(_) => JobChange::Refuse(Refusal::Conflict(taken)),
    };
    let claimed = shared.store.send(UpdateJob { id: job_id, change: Box::new(claim) }).await;
    claimed.map_err(|e| ApiError::Unavailable(e.to_string())).and_then(|r| {
        r.map_err(|e| ApiError::Unavailable(e.to_string()))?.map_err(|refusal| match refusal {
            Refusal::Conflict(why) => ApiError::Conflict(why),
            Refusal::Forbidden => ApiError::Conflict(in_use),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
