//! HTTP endpoints for jobs (contract §5): uploads, listing, snapshots, cancel, publisher events.

use actix_multipart::Multipart;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::info;
use uuid::Uuid;

use crate::auth::Identity;
use crate::db::store::{GetJob, JobChange, JobRecord, JobSpec, Refusal, SaveJob, UpdateJob};
use crate::error::ApiError;
use crate::http::extract::{bearer, publish_failed, PostedEvent};
use crate::http::shared::Shared;
use crate::jobs::job;
use crate::jobs::lookup::Refused;
use crate::jobs::scheduler::{CancelOutcome, Submit};
use crate::protocol::{now_rfc3339, Event, JobError, JobSnapshot, JobStatus, RoomKind};
use crate::realtime::broker::Publish;

/// Registers the job routes under `/api/v1`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/uploads", web::post().to(upload))
        .route("/jobs", web::get().to(list))
        .route("/jobs/{id}", web::get().to(get))
        .route("/jobs/{id}/cancel", web::post().to(cancel))
        .route("/jobs/{id}/events", web::post().to(publish_event));
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

/// The job if `who` may see it; 404 otherwise (another tenant's job, or a reservation, does not
/// exist as far as the caller can tell).
async fn visible_job(shared: &Shared, who: &Identity, id: &str) -> Result<JobRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("no job {id}"));
    let job_id = Uuid::parse_str(id).map_err(|_| not_found())?;
    shared.jobs.find(who, job_id, false).await.map_err(|e| refused(e, id))
}

/// A refused lookup as HTTP answers it: 404 whether the job is unknown or another tenant's.
fn refused(e: Refused, id: &str) -> ApiError {
    match e {
        Refused::Unknown | Refused::Forbidden => ApiError::NotFound(format!("no job {id}")),
        Refused::Unavailable(e) => ApiError::Unavailable(e),
    }
}

/// Whether an uploaded part looks like CSV text: a CSV name or text content type, and no NUL bytes.
fn looks_like_csv(filename: &str, content_type: Option<&str>) -> bool {
    let name_ok = filename.to_ascii_lowercase().ends_with(".csv") || filename.to_ascii_lowercase().ends_with(".txt");
    let type_ok = match content_type.map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase()) {
        None => true,
        Some(t) => {
            matches!(
                t.as_str(),
                "text/csv"
                    | "text/plain"
                    | "application/csv"
                    | "text/comma-separated-values"
                    | "application/vnd.ms-excel"
            ) || (t == "application/octet-stream" && name_ok)
        }
    };
    type_ok && (name_ok || content_type.is_some_and(|t| t.starts_with("text/")))
}

async fn upload(req: HttpRequest, shared: web::Data<Shared>, mut form: Multipart) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let max = shared.config.max_upload_bytes;
    let too_large = || ApiError::PayloadTooLarge(format!("the upload is larger than {max} bytes"));
    let declared =
        req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max + 64 * 1024) {
        return Err(too_large());
    }
    let dir = shared.config.data_dir.join("uploads");
    let dir_made = dir.clone();
    tokio::task::spawn_blocking(move || crate::files::private_dir(&dir_made))
        .await
        .map_err(|e| ApiError::Internal(format!("cannot store uploads: {e}")))?
        .map_err(|e| ApiError::Internal(format!("cannot store uploads: {e}")))?;
    let part = dir.join(format!("{}.part", Uuid::new_v4()));
    let result = receive(&mut form, &part, max).await;
    let (batch_id, file) = match result {
        Ok(ok) => ok,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(match e {
                Received::TooLarge => too_large(),
                Received::Error(e) => e,
            });
        }
    };
    let Some((filename, size)) = file else {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ApiError::BadRequest("the multipart field \"file\" is required".into()));
    };
    let job_id = batch_id.unwrap_or_else(Uuid::new_v4);
    // A batch id may be reserved by a subscription of the same tenant; anything else is taken.
    let existing = shared.store.send(GetJob(job_id)).await.map_err(unavailable)?.map_err(unavailable)?;
    if let Some(job) = existing {
        if job.snapshot.status != JobStatus::Pending || job.snapshot.tenant != who.tenant {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(ApiError::Conflict(format!("batch_id {job_id} is already in use")));
        }
    }
    let path = dir.join(format!("{job_id}.csv"));
    tokio::fs::rename(&part, &path).await.map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
    let spec =
        JobSpec { job_id, tenant: who.tenant.clone(), user_id: who.user_id.clone(), filename, path, size_bytes: size };
    shared.store.send(SaveJob(job::queued(spec.clone()))).await.map_err(unavailable)?.map_err(unavailable)?;
    info!(target: "audit", event = "upload", user = %who.user_id, tenant = %who.tenant, job = %job_id, size, "job created");
    shared.scheduler.do_send(Submit { spec, resume: None });
    Ok(HttpResponse::Accepted().json(json!({
        "job_id": job_id,
        "room": RoomKind::Job(job_id).name(),
        "status_url": format!("/api/v1/jobs/{job_id}"),
        "ws_url": format!("/ws/jobs/{job_id}"),
    })))
}

enum Received {
    TooLarge,
    Error(ApiError),
}

impl From<ApiError> for Received {
    fn from(e: ApiError) -> Self {
        Received::Error(e)
    }
}

/// Reads the form: `batch_id` and `file` (streamed to `part`, never held in memory).
async fn receive(
    form: &mut Multipart,
    part: &std::path::Path,
    max: u64,
) -> Result<(Option<Uuid>, Option<(String, u64)>), Received> {
    let mut batch_id = None;
    let mut file = None;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {e}")))?;
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "batch_id" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.next().await {
                    let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {e}")))?;
                    text.extend_from_slice(&chunk);
                    if text.len() > 64 {
                        return Err(ApiError::BadRequest("batch_id must be a UUID".into()).into());
                    }
                }
                let text = String::from_utf8_lossy(&text);
                batch_id = Some(
                    Uuid::parse_str(text.trim()).map_err(|_| ApiError::BadRequest("batch_id must be a UUID".into()))?,
                );
            }
            "file" if file.is_none() => {
                let filename =
                    field.content_disposition().and_then(|d| d.get_filename()).unwrap_or("upload.csv").to_string();
                let content_type = field.content_type().map(|m| m.to_string());
                if !looks_like_csv(&filename, content_type.as_deref()) {
                    return Err(ApiError::UnsupportedMediaType(format!(
                        "{filename} ({}) is not a CSV file",
                        content_type.as_deref().unwrap_or("no content type")
                    ))
                    .into());
                }
                let mut out = tokio::fs::OpenOptions::from(crate::files::private_options())
                    .write(true)
                    .create_new(true)
                    .open(part)
                    .await
                    .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
                let mut size = 0u64;
                while let Some(chunk) = field.next().await {
                    let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("the upload was interrupted: {e}")))?;
                    if size == 0 && chunk.iter().take(8192).any(|b| *b == 0) {
                        return Err(ApiError::UnsupportedMediaType(format!(
                            "{filename} holds binary data, not CSV text"
                        ))
                        .into());
                    }
                    size += chunk.len() as u64;
                    if size > max {
                        return Err(Received::TooLarge);
                    }
                    out.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
                }
                out.flush().await.map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
                file = Some((filename, size));
            }
            _ => {
                while let Some(chunk) = field.next().await {
                    chunk.map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {e}")))?;
                }
            }
        }
    }
    Ok((batch_id, file))
}

async fn list(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let jobs = shared.jobs.list(&who, 500).await.map_err(|e| refused(e, ""))?;
    Ok(HttpResponse::Ok().json(json!({ "jobs": jobs })))
}

async fn get(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let job = visible_job(&shared, &who, &id).await?;
    Ok(HttpResponse::Ok().json(job.snapshot))
}

async fn cancel(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let job = visible_job(&shared, &who, &id).await?;
    let job_id = job.snapshot.job_id;
    let outcome = shared.jobs.cancel(&job, &who.user_id).await.map_err(|e| refused(e, &id))?;
    info!(target: "audit", event = "cancel", user = %who.user_id, job = %job_id, ?outcome, "cancel requested");
    match outcome {
        CancelOutcome::Cancelling => {
            Ok(HttpResponse::Accepted().json(json!({ "job_id": job_id, "status": "cancelling" })))
        }
        CancelOutcome::NotRunning => {
            Err(ApiError::Conflict(format!("job {job_id} is not running (status {})", job.snapshot.status.as_str())))
        }
    }
}

/// A publisher reports progress of work it runs itself. An unknown job id becomes an external job of
/// the publisher's tenant, so its room can be joined; the snapshot follows the posted events.
async fn publish_event(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Json<PostedEvent>,
) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    if !who.publisher && !who.admin {
        return Err(ApiError::Forbidden("the publisher role is required".into()));
    }
    let job_id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no job {id}")))?;
    let event = body.into_inner().into_event()?;
    let (posted, publisher) = (event.clone(), who.clone());
    // Read, follow and save in one step of the store, so concurrent posts for one job cannot undo
    // each other's changes.
    let change = move |current: Option<&JobRecord>| {
        let (mut job, new) = match current {
            Some(job) if publisher.may_access(&job.snapshot.tenant) => (job.clone(), false),
            Some(_) => return JobChange::Refuse(Refusal::Forbidden),
            None => (JobRecord { snapshot: external(job_id, &publisher), spec: None }, true),
        };
        // A job jobcast runs reports its own lifecycle: a publisher may add `info` and `warning`
        // to its room, never a status, progress, zone or terminal event.
        if job.spec.is_some() && !matches!(posted, Event::Info(_) | Event::Warning(_)) {
            return JobChange::Refuse(Refusal::Conflict(format!(
                "job {job_id} is run by jobcast: only info and warning events may be posted into its room, not {}",
                posted.kind().as_str()
            )));
        }
        // A CSV job's snapshot is its own; an external one is written when it is new or the event
        // changes it (an `info` is only published: no store write for it).
        if job.spec.is_some() || !(new || changes_snapshot(&posted)) {
            return JobChange::Keep;
        }
        follow(&mut job.snapshot, &posted);
        JobChange::Save(Box::new(job))
    };
    let update = UpdateJob { id: job_id, change: Box::new(change) };
    match shared.store.send(update).await.map_err(unavailable)?.map_err(unavailable)? {
        Ok(()) => {}
        Err(Refusal::Forbidden) => return Err(ApiError::NotFound(format!("no job {job_id}"))),
        Err(Refusal::Conflict(why)) => return Err(ApiError::Conflict(why)),
    }
    let kind = event.kind();
    let published = shared
        .broker
        .send(Publish { room: RoomKind::Job(job_id).name(), event })
        .await
        .map_err(unavailable)?
        .map_err(publish_failed)?;
    info!(target: "audit", event = "publisher_event", user = %who.user_id, job = %job_id, kind = kind.as_str(), seq = published.seq, "published");
    Ok(HttpResponse::Created().json(json!({ "seq": published.seq })))
}

/// Whether [`follow`] changes a snapshot for this event.
fn changes_snapshot(event: &Event) -> bool {
    matches!(
        event,
        Event::Status(_)
            | Event::ProcessingProgress(_)
            | Event::ProcessingCompleted(_)
            | Event::ProcessingFailed(_)
            | Event::JobCancelled(_)
    )
}

/// A new external job of the publisher's tenant: a job jobcast does not run, reported by its events.
fn external(job_id: Uuid, publisher: &Identity) -> JobSnapshot {
    JobSnapshot {
        user_id: Some(publisher.user_id.clone()),
        kind: Some("external".into()),
        status: JobStatus::Processing,
        progress: Some(0.0),
        created_at: Some(now_rfc3339()),
        ..JobSnapshot::reservation(job_id, &publisher.tenant)
    }
}

/// Updates an external job's snapshot from an event posted into its room.
fn follow(snapshot: &mut JobSnapshot, event: &Event) {
    snapshot.updated_at = Some(now_rfc3339());
    match event {
        Event::Status(s) => snapshot.status = s.status.clone(),
        Event::ProcessingProgress(p) => {
            let old = snapshot.progress.unwrap_or(0.0);
            snapshot.progress = Some(p.progress.max(old).min(99.9));
            snapshot.stage = Some(p.stage.clone());
            snapshot.eta_seconds = Some(p.eta_seconds);
        }
        Event::ProcessingCompleted(c) => {
            snapshot.status = JobStatus::Completed;
            snapshot.progress = Some(100.0);
            snapshot.results = Some(c.results.clone());
        }
        Event::ProcessingFailed(f) => {
            snapshot.status = JobStatus::Failed;
            snapshot.error = Some(Some(JobError { message: f.error.clone(), recoverable: f.recoverable }));
        }
        Event::JobCancelled(_) => snapshot.status = JobStatus::Cancelled,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_detection() {
        assert!(looks_like_csv("a.csv", Some("text/csv")));
        assert!(looks_like_csv("a.csv", Some("application/octet-stream")));
        assert!(looks_like_csv("a.csv", None));
        assert!(looks_like_csv("data", Some("text/plain")));
        assert!(!looks_like_csv("a.png", Some("image/png")));
        assert!(!looks_like_csv("a.csv", Some("image/png")));
        assert!(!looks_like_csv("a.exe", Some("application/octet-stream")));
    }
}
