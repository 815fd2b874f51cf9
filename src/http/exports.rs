//! Export jobs and downloads (contract §8): `POST /api/v1/exports` starts an export of the caller's
//! tenant's stored rows; `GET /api/v1/downloads/{token}` serves a job's file to whoever holds its
//! signed, expiring link (no header needed, so a browser link works).

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tracing::info;
use uuid::Uuid;

use crate::db::row_store::ExportFilters;
use crate::db::store::{GetJob, JobRecord};
use crate::error::ApiError;
use crate::http::extract::{bearer, claim_id, json_body};
use crate::http::shared::Shared;
use crate::jobs::export::{job_dir, spec_metadata, Format, EXPORT};
use crate::jobs::scheduler::{StartExport, StartRefused};
use crate::protocol::{excerpt, now_rfc3339, JobSnapshot, JobStatus, RoomKind};

/// Registers `POST /exports` and `GET /downloads/{token}` under `/api/v1`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/exports", web::post().to(create)).route("/downloads/{token}", web::get().to(download));
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filters {
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    job_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Create {
    format: String,
    #[serde(default)]
    filters: Option<Filters>,
    #[serde(default)]
    id: Option<String>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// `YYYY-MM-DD`, a real date.
fn check_date(what: &str, value: &str) -> Result<(), ApiError> {
    let b = value.as_bytes();
    let shaped =
        b.len() == 10 && b[4] == b'-' && b[7] == b'-' && value.chars().filter(|c| c.is_ascii_digit()).count() == 8;
    let (m, d) =
        (value.get(5..7).and_then(|m| m.parse::<u32>().ok()), value.get(8..10).and_then(|d| d.parse::<u32>().ok()));
    if shaped && m.is_some_and(|m| (1..=12).contains(&m)) && d.is_some_and(|d| (1..=31).contains(&d)) {
        Ok(())
    } else {
        Err(bad(format!("filters.{what} {:?} must be a date, YYYY-MM-DD", excerpt(value))))
    }
}

/// `POST /api/v1/exports` {format, filters?, id?} → 202 {job_id, room, status_url}.
async fn create(req: HttpRequest, shared: web::Data<Shared>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let c: Create = json_body(body).await?;
    let format =
        Format::parse(&c.format).ok_or_else(|| bad(format!("format {:?}: csv or jsonl", excerpt(&c.format))))?;
    let f = c.filters.unwrap_or(Filters { from: None, to: None, category: None, job_id: None });
    for (what, value) in [("from", &f.from), ("to", &f.to)] {
        if let Some(v) = value {
            check_date(what, v)?;
        }
    }
    if let (Some(from), Some(to)) = (&f.from, &f.to) {
        if from > to {
            return Err(bad(format!("filters.from ({from}) is after filters.to ({to})")));
        }
    }
    if f.category.as_ref().is_some_and(|c| c.is_empty() || c.chars().count() > 64) {
        return Err(bad("filters.category must have 1 to 64 characters"));
    }
    let source = match &f.job_id {
        Some(id) => Some(Uuid::parse_str(id).map_err(|_| bad("filters.job_id must be a UUID"))?.to_string()),
        None => None,
    };
    let filters = ExportFilters { from: f.from, to: f.to, category: f.category, job_id: source };
    let job_id = match &c.id {
        Some(id) => Uuid::parse_str(id).map_err(|_| bad("id must be a UUID"))?,
        None => Uuid::new_v4(),
    };
    let snapshot = JobSnapshot {
        user_id: Some(who.user_id.clone()),
        kind: Some(EXPORT.into()),
        status: JobStatus::Queued,
        progress: Some(0.0),
        metadata: Some(spec_metadata(format, &filters)),
        created_at: Some(now_rfc3339()),
        ..JobSnapshot::reservation(job_id, &who.tenant)
    };
    // The id is claimed as an upload's `batch_id` is.
    claim_id(&shared, JobRecord { snapshot: snapshot.clone(), spec: None }, "id").await?;
    let started =
        shared.scheduler.send(StartExport { snapshot }).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if let Err(e) = started {
        return Err(match e {
            StartRefused::Quota(why) => ApiError::QuotaExceeded(why),
            other => ApiError::Unavailable(format!("the export was not started ({other:?}); try again")),
        });
    }
    info!(target: "audit", event = "export", user = %who.user_id, tenant = %who.tenant, job = %job_id, format = format.as_str(), "export job created");
    Ok(HttpResponse::Accepted().json(json!({
        "job_id": job_id,
        "room": RoomKind::Job(job_id).name(),
        "status_url": format!("/api/v1/jobs/{job_id}"),
    })))
}

/// `GET /api/v1/downloads/{token}`: the file, streamed.
async fn download(shared: web::Data<Shared>, token: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let claim = shared.auth.verify_download(&token).map_err(|e| {
        shared.metrics.auth_failed(e.reason());
        ApiError::from(e)
    })?;
    let gone = || ApiError::NotFound("no such file: it was removed after retention_s, or never made".into());
    // The job must still be its tenant's (the link names both).
    let job = shared.store.send(GetJob(claim.job_id)).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let job = job.map_err(|e| ApiError::Unavailable(e.to_string()))?.ok_or_else(gone)?;
    if job.snapshot.tenant != claim.tenant {
        return Err(gone());
    }
    let path = job_dir(&shared.config.data_dir.join("downloads"), claim.job_id).join(&claim.file);
    let file = tokio::fs::File::open(&path).await.map_err(|_| gone())?;
    let size = file.metadata().await.map(|m| m.len()).map_err(|_| gone())?;
    let content_type = if claim.file.ends_with(".csv") { "text/csv; charset=utf-8" } else { "application/x-ndjson" };
    let name = format!("{}-{}", claim.job_id, claim.file);
    let body = stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(web::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{name}\"")))
        .insert_header(("Cache-Control", "private, no-store"))
        .no_chunking(size)
        .streaming(body))
}
