//! The admin API of webhooks (contract §7): register, list and delete a tenant's endpoints, and read
//! each one's delivery log. Delivery itself is `jobs::webhooks`.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use tracing::info;
use uuid::Uuid;

use crate::db::outbox::{CreateWebhook, DeleteWebhook, Deliveries, ListWebhooks, Webhook};
use crate::db::sqlite::now_ms;
use crate::error::ApiError;
use crate::http::extract::{admin, json_body};
use crate::http::shared::Shared;
use crate::jobs::webhooks::{check_target, new_secret, PrivateAllow, EVENTS};
use crate::protocol::{excerpt, valid_id};

/// Registers the webhook routes under `/api/v1/admin`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/webhooks").get(list).post(create))
        .route("/webhooks/{id}", web::delete().to(delete))
        .route("/webhooks/{id}/deliveries", web::get().to(deliveries));
}

/// The longest webhook URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Webhooks of one tenant at most.
pub const MAX_PER_TENANT: usize = 100;

#[derive(Debug, Deserialize)]
struct Create {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    secret: Option<String>,
    /// Whose jobs: the admin's own tenant when absent.
    #[serde(default)]
    tenant: Option<String>,
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

async fn create(req: HttpRequest, shared: web::Data<Shared>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let c: Create = json_body(body).await?;
    let url = c.url.trim();
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok
        || url.len() > MAX_URL_BYTES
        || url.parse::<awc::http::Uri>().map(|u| u.host().is_none()).unwrap_or(true)
    {
        return Err(bad(format!(
            "url {:?} must be an http or https URL of at most {MAX_URL_BYTES} bytes",
            excerpt(url)
        )));
    }
    let allow = PrivateAllow::parse(&shared.config.webhook_private_allow).map_err(ApiError::Internal)?;
    check_target(url, &allow).await.map_err(|e| bad(format!("url {:?} refused: {e}", excerpt(url))))?;
    if c.events.is_empty() {
        return Err(bad(format!("events must name at least one of {EVENTS:?}")));
    }
    if let Some(e) = c.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
        return Err(bad(format!("unknown event {:?}: one of {EVENTS:?}", excerpt(e))));
    }
    let secret = match c.secret {
        Some(s) if (16..=256).contains(&s.len()) => s,
        Some(_) => return Err(bad("secret must have 16 to 256 bytes (or be left out, and one is made)")),
        None => new_secret(),
    };
    let tenant = c.tenant.unwrap_or_else(|| who.tenant.clone());
    if !valid_id(&tenant) {
        return Err(bad(format!("tenant {:?} is not a valid tenant id", excerpt(&tenant))));
    }
    let existing = shared.store.send(ListWebhooks { tenant: Some(tenant.clone()) }).await.map_err(unavailable)?;
    if existing.map_err(unavailable)?.len() >= MAX_PER_TENANT {
        return Err(ApiError::QuotaExceeded(format!(
            "tenant {tenant} has {MAX_PER_TENANT} webhooks, the most allowed"
        )));
    }
    let mut events = c.events;
    events.sort();
    events.dedup();
    let hook = Webhook {
        id: Uuid::new_v4(),
        tenant,
        url: url.to_string(),
        events,
        secret: secret.clone(),
        created_ms: now_ms(),
    };
    let id = hook.id;
    shared.store.send(CreateWebhook(hook.clone())).await.map_err(unavailable)?.map_err(unavailable)?;
    info!(target: "audit", event = "webhook_created", user = %who.user_id, tenant = %hook.tenant, webhook = %id, "webhook registered");
    Ok(HttpResponse::Created().json(json!({
        "id": id, "secret": secret, "url": hook.url, "events": hook.events, "tenant": hook.tenant,
    })))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    tenant: Option<String>,
}

async fn list(req: HttpRequest, shared: web::Data<Shared>, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let hooks = shared.store.send(ListWebhooks { tenant: q.into_inner().tenant }).await.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(json!({ "webhooks": hooks.map_err(unavailable)? })))
}

fn webhook_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound(format!("no webhook {}", excerpt(id))))
}

async fn delete(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let who = admin(&req, &shared)?;
    let id = webhook_id(&id)?;
    if !shared.store.send(DeleteWebhook(id)).await.map_err(unavailable)?.map_err(unavailable)? {
        return Err(ApiError::NotFound(format!("no webhook {id}")));
    }
    info!(target: "audit", event = "webhook_deleted", user = %who.user_id, webhook = %id, "webhook removed");
    Ok(HttpResponse::Ok().json(json!({ "deleted": id })))
}

async fn deliveries(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    admin(&req, &shared)?;
    let id = webhook_id(&id)?;
    let hooks = shared.store.send(ListWebhooks { tenant: None }).await.map_err(unavailable)?.map_err(unavailable)?;
    if !hooks.iter().any(|h| h.id == id) {
        return Err(ApiError::NotFound(format!("no webhook {id}")));
    }
    let log = shared.store.send(Deliveries(id)).await.map_err(unavailable)?.map_err(unavailable)?;
    Ok(HttpResponse::Ok().json(json!({ "deliveries": log })))
}
