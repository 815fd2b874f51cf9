//! HTTP endpoints for jobs (contract §5): listing, snapshots, cancel, publisher events (uploads are
//! in `upload.rs`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use tracing::info;
use uuid::Uuid;

use crate::auth::Identity;
use crate::db::store::{JobChange, JobRecord, Refusal, UpdateJob};
use crate::error::ApiError;
use crate::http::extract::{bearer, json_body, publish_failed, PostedEvent};
use crate::http::shared::Shared;
use crate::jobs::lookup::Refused;
use crate::jobs::scheduler::CancelOutcome;
use crate::protocol::{excerpt, now_rfc3339, Event, JobError, JobSnapshot, JobStatus, RoomKind};
use crate::realtime::broker::Publish;

/// Registers the job routes under `/api/v1/jobs/{id}` (`/jobs` itself, listing and creating, is
/// registered by `http::routes`).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("", web::get().to(get))
        .route("/cancel", web::post().to(cancel))
        .route("/events", web::post().to(publish_event));
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
        // The HTTP API does not reserve, so it never meets `TooManyReservations`.
        Refused::Unknown | Refused::Forbidden | Refused::TooManyReservations => {
            ApiError::NotFound(format!("no job {id}"))
        }
        Refused::Unavailable(e) => ApiError::Unavailable(e),
    }
}

/// `GET /api/v1/jobs`.
pub async fn list(req: HttpRequest, shared: web::Data<Shared>) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let jobs = shared.jobs.list(&who, 500).await.map_err(|e| refused(e, ""))?;
    Ok(HttpResponse::Ok().json(json!({ "jobs": jobs })))
}

async fn get(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    let mut job = visible_job(&shared, &who, &id).await?;
    crate::jobs::export::fresh_link(&shared.auth, shared.config.download_ttl_s, &mut job.snapshot);
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
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    if !who.publisher && !who.admin {
        return Err(ApiError::Forbidden("the publisher role is required".into()));
    }
    let job_id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no job {}", excerpt(&id))))?;
    let event = json_body::<PostedEvent>(body).await?.into_event()?;
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
        // A worker's job (created with `POST /api/v1/jobs`) is reported through its job token.
        if job.snapshot.stages.is_some() && !matches!(posted, Event::Info(_) | Event::Warning(_)) {
            return JobChange::Refuse(Refusal::Conflict(format!(
                "job {job_id} is reported by its worker (its job token): only info and warning events may be posted into its room, not {}",
                posted.kind().as_str()
            )));
        }
        if job.snapshot.stages.is_some() {
            return JobChange::Keep;
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
        .send(Publish::api(RoomKind::Job(job_id).name(), event))
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
