//! The HTTP layer (contract §5): routes and the access log here; the WebSocket upgrade (`ws.rs`),
//! uploads (`upload.rs`), the jobs API (`jobs.rs`), the admin endpoints (`admin.rs`), the extractors they share
//! (`extract.rs`) and the state every handler is handed (`shared.rs`).
//!
//! This is the top layer: it may use every other one, and nothing but `lib.rs` uses it. Within it,
//! handlers use `extract` and `shared`, and only this file knows every route.

pub mod admin;
pub mod exports;
pub mod extract;
pub mod jobs;
pub mod shared;
pub mod tus;
pub mod upload;
pub mod webhooks;
pub mod workers;
pub mod ws;

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use tracing::info;

use crate::db::store::Ping;
use crate::error::ApiError;
use crate::realtime::broker::Stats;
use crate::realtime::registry::Count;
use shared::Shared;

/// Registers every route; `/ws/echo` only with `conformance_echo`.
pub fn routes(cfg: &mut web::ServiceConfig, conformance_echo: bool) {
    if conformance_echo {
        cfg.route("/ws/echo", web::get().to(ws::echo));
    }
    // Matched in this order; a path with a `{segment}` is matched by a regex (actix-router), so
    // the API comes first, and the hot routes (a worker's report, an admin broadcast) are found
    // after as few regexes as possible: one for `/jobs/{id}`, one for `/admin/broadcast/{room}`.
    cfg.service(
        web::scope("/api/v1")
            .wrap(actix_web::middleware::from_fn(refuse_encoded_bodies))
            .route("/uploads", web::post().to(upload::upload))
            .configure(tus::routes)
            .configure(exports::routes)
            .service(web::resource("/jobs").get(jobs::list).post(workers::create))
            .service(web::scope("/jobs/{id}").configure(workers::routes).configure(jobs::routes))
            .route("/auth/websocket-token", web::post().to(ws::websocket_token))
            .service(
                web::scope("/admin")
                    .route("/broadcast/{room}", web::post().to(admin::admin_broadcast))
                    .route("/stats", web::get().to(admin::admin_stats))
                    .route("/connections", web::get().to(admin::admin_connections))
                    .route("/connections/{id}", web::delete().to(admin::admin_close_connection))
                    .route("/users/{user_id}/connections", web::delete().to(admin::admin_close_user))
                    .configure(webhooks::routes),
            ),
    )
    .route("/ws", web::get().to(ws::ws))
    .route("/ws/jobs/{job_id}", web::get().to(ws::ws_job))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(readyz))
    .route("/metrics", web::get().to(metrics))
    .route("/", web::get().to(demo))
    .route("/demo/{file}", web::get().to(demo));
}

/// Request bodies are read as sent: a compressed one (any `Content-Encoding` but `identity`) is 415
/// before anything is read, so no body can inflate past the limits it was checked against.
async fn refuse_encoded_bodies(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let encoding = req.headers().get(actix_web::http::header::CONTENT_ENCODING);
    if let Some(value) = encoding.filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity")) {
        let named = crate::protocol::excerpt(&String::from_utf8_lossy(value.as_bytes()));
        let err = ApiError::UnsupportedMediaType(format!(
            "request bodies must not be compressed (Content-Encoding: {named}); send them as they are"
        ));
        return Ok(req.error_response(err));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
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

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn readyz(shared: web::Data<Shared>) -> HttpResponse {
    let broker = shared.broker.send(Stats).await.is_ok();
    let store = matches!(shared.store.send(Ping).await, Ok(Ok(())));
    let registry = shared.registry.send(Count).await.is_ok();
    let redis = match &shared.redis {
        Some(r) => Some(r.ping().await),
        None => None,
    };
    let ok = broker && registry && store && redis != Some(false);
    let mut body = json!({ "status": if ok { "ready" } else { "unavailable" },
        "broker": broker, "registry": registry, "store": store });
    if let Some(up) = redis {
        body["redis"] = json!(up);
    }
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
    ("/", "text/html; charset=utf-8", include_str!("../../clients/demo/src/index.html")),
    ("/demo/app.js", "text/javascript; charset=utf-8", include_str!("../demo/app.js")),
    ("/demo/app.css", "text/css; charset=utf-8", include_str!("../../clients/demo/src/app.css")),
    ("/demo/sample.csv", "text/csv; charset=utf-8", include_str!("../sample.csv")),
];

async fn demo(req: HttpRequest) -> HttpResponse {
    match DEMO.iter().find(|(path, _, _)| *path == req.path()) {
        Some((_, content_type, body)) => {
            HttpResponse::Ok().content_type(*content_type).insert_header(("Cache-Control", "no-cache")).body(*body)
        }
        None => HttpResponse::NotFound().finish(),
    }
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
}
