//! HTTP endpoints for jobs that run elsewhere (contract §7): a publisher creates a job and gets a
//! job token; the worker holding it reports, completes or fails that one job, and learns from every
//! answer whether someone asked to cancel it.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::info;
use uuid::Uuid;

use crate::auth::JobClaim;
use crate::db::store::{JobChange, JobRecord, UpdateJob};
use crate::error::ApiError;
use crate::http::extract::{bearer, json_body, token_of};
use crate::http::shared::Shared;
use crate::jobs::external::{Discard, End, ExternalError, Report, Step, StepStatus, MAX_METADATA_BYTES};
use crate::jobs::lookup::WorkerRefused;
use crate::jobs::scheduler::{StartExternal, StartRefused};
use crate::protocol::{excerpt, now_rfc3339, JobSnapshot, JobStatus, RoomKind, StageSpec};

/// Registers the worker routes under `/api/v1/jobs/{id}` (`POST /api/v1/jobs`, [`create`], shares
/// its resource with the listing and is registered with it).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/report", web::post().to(report))
        .route("/complete", web::post().to(complete))
        .route("/fail", web::post().to(fail));
}

/// The most stages a job may have.
pub const MAX_STAGES: usize = 32;
/// The longest `message` of a report.
pub const MAX_MESSAGE_CHARS: usize = 1000;
/// The longest `error` of a `/fail`.
pub const MAX_ERROR_CHARS: usize = 4000;

/// `POST /api/v1/jobs`.
#[derive(Debug, Deserialize)]
struct Create {
    kind: String,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    stages: Option<Vec<StageSpec>>,
    #[serde(default)]
    total: Option<u64>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// A name a client chose: 1 to 64 characters, letters, digits and `_ . - :`.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'));
    if ok {
        Ok(())
    } else {
        Err(bad(format!("{what} {:?} must be 1 to 64 letters, digits, '_', '.', '-' or ':'", excerpt(name))))
    }
}

fn check_metadata(metadata: &Map<String, Value>) -> Result<(), ApiError> {
    let size = serde_json::to_vec(metadata).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(ApiError::PayloadTooLarge(format!("metadata takes {size} bytes; at most {MAX_METADATA_BYTES}")));
    }
    Ok(())
}

/// `POST /api/v1/jobs`: a job for a worker, and its job token.
pub async fn create(req: HttpRequest, shared: web::Data<Shared>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, &shared)?;
    if !who.publisher && !who.admin {
        return Err(ApiError::Forbidden("the publisher role is required".into()));
    }
    let c: Create = json_body(body).await?;
    check_name("kind", &c.kind)?;
    if let Some(title) = &c.title {
        if title.chars().count() > 200 {
            return Err(bad("title may have at most 200 characters"));
        }
    }
    let stages = c.stages.unwrap_or_default();
    if stages.len() > MAX_STAGES {
        return Err(bad(format!("at most {MAX_STAGES} stages")));
    }
    for (i, s) in stages.iter().enumerate() {
        check_name("stage", &s.name)?;
        if !s.weight.is_finite() || s.weight < 0.0 {
            return Err(bad(format!("stage {:?}: weight must be a number of at least 0", s.name)));
        }
        if stages[..i].iter().any(|o| o.name == s.name) {
            return Err(bad(format!("stage {:?} is listed twice", s.name)));
        }
    }
    if let Some(m) = &c.metadata {
        check_metadata(m)?;
    }
    let job_id = Uuid::new_v4();
    let snapshot = JobSnapshot {
        user_id: Some(who.user_id.clone()),
        kind: Some(c.kind.clone()),
        title: c.title,
        status: JobStatus::Queued,
        progress: Some(0.0),
        total: c.total,
        stages: Some(stages),
        metadata: c.metadata.map(Value::Object),
        created_at: Some(now_rfc3339()),
        ..JobSnapshot::reservation(job_id, &who.tenant)
    };
    // The actor first (it checks the tenant's limit), then the record before the answer: nobody
    // knows the job's id before it is stored.
    let unavailable = |e: String| ApiError::Unavailable(e);
    let addr = shared
        .scheduler
        .send(StartExternal { snapshot: snapshot.clone(), fresh: true })
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .map_err(start_refused)?;
    let record = JobRecord { snapshot, spec: None };
    let save = UpdateJob {
        id: job_id,
        change: Box::new(move |current: Option<&JobRecord>| match current {
            None => JobChange::Save(Box::new(record)),
            Some(_) => JobChange::Keep,
        }),
    };
    let saved = shared.store.send(save).await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(e) = saved {
        addr.do_send(Discard);
        return Err(unavailable(e));
    }
    let token = shared.auth.mint_job_token(&who, job_id).map_err(|e| ApiError::Internal(e.to_string()))?;
    info!(target: "audit", event = "job_created", user = %who.user_id, tenant = %who.tenant, job = %job_id, kind = %c.kind, "external job created");
    Ok(HttpResponse::Created().json(json!({
        "job_id": job_id,
        "room": RoomKind::Job(job_id).name(),
        "token": token,
        "status_url": format!("/api/v1/jobs/{job_id}"),
    })))
}

/// The job token's claim, which must be for job `id`.
fn job_bearer(req: &HttpRequest, shared: &Shared, id: &str) -> Result<JobClaim, ApiError> {
    let claim = shared.auth.verify_job(token_of(req)?).map_err(|e| {
        shared.metrics.auth_failed(e.reason());
        ApiError::from(e)
    })?;
    if claim.job_id.to_string() != id {
        return Err(ApiError::Forbidden("this job token is for another job".into()));
    }
    Ok(claim)
}

fn start_refused(e: StartRefused) -> ApiError {
    match e {
        StartRefused::Ended => ended(),
        StartRefused::Quota(why) => ApiError::QuotaExceeded(why),
        StartRefused::Stopping => ApiError::Unavailable("this node is stopping; try again".into()),
    }
}

fn ended() -> ApiError {
    ApiError::Unauthorized("the job ended, and its job token with it".into())
}

fn refused(e: WorkerRefused) -> ApiError {
    match e {
        WorkerRefused::NotFound => ApiError::NotFound("no such job".into()),
        WorkerRefused::Quota(why) => ApiError::QuotaExceeded(why),
        WorkerRefused::Job(ExternalError::Ended) => ended(),
        WorkerRefused::Job(ExternalError::Invalid(why)) => ApiError::BadRequest(why),
        WorkerRefused::Job(ExternalError::Unavailable(why)) => ApiError::Unavailable(why),
    }
}

/// `POST /api/v1/jobs/{id}/report`.
#[derive(Debug, Deserialize)]
struct ReportBody {
    #[serde(default)]
    stage: Option<String>,
    #[serde(default)]
    progress: Option<f64>,
    #[serde(default)]
    done: Option<u64>,
    #[serde(default)]
    total: Option<u64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    step: Option<StepBody>,
}

#[derive(Debug, Deserialize)]
struct StepBody {
    id: String,
    index: u64,
    status: String,
    #[serde(default)]
    duration_ms: Option<u64>,
}

async fn report(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let claim = job_bearer(&req, &shared, &id)?;
    let r: ReportBody = json_body(body).await?;
    if let Some(p) = r.progress {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad("progress must be a fraction from 0 to 1"));
        }
    }
    if let (Some(done), Some(total)) = (r.done, r.total) {
        if done > total {
            return Err(bad(format!("done ({done}) is more than total ({total})")));
        }
    }
    if let Some(m) = &r.metadata {
        check_metadata(m)?;
    }
    if let Some(stage) = &r.stage {
        check_name("stage", stage)?;
    }
    let step = match r.step {
        Some(s) => {
            if s.id.is_empty() || s.id.chars().count() > 128 {
                return Err(bad("step.id must have 1 to 128 characters"));
            }
            let status = match s.status.as_str() {
                "processing" => StepStatus::Processing,
                "completed" => StepStatus::Completed,
                "failed" => StepStatus::Failed,
                other => return Err(bad(format!("step.status {:?}: processing, completed or failed", excerpt(other)))),
            };
            Some(Step { id: s.id, index: s.index, status, duration_ms: s.duration_ms })
        }
        None => None,
    };
    if r.message.as_ref().is_some_and(|m| m.chars().count() > MAX_MESSAGE_CHARS) {
        return Err(bad(format!("message may have at most {MAX_MESSAGE_CHARS} characters")));
    }
    let message = r.message;
    let report = Report {
        stage: r.stage,
        fraction: r.progress,
        done: r.done,
        total: r.total,
        message,
        metadata: r.metadata,
        step,
    };
    let answer = shared.jobs.report(claim.job_id, report).await.map_err(refused)?;
    Ok(HttpResponse::Ok().json(json!({ "seq": answer.seq, "cancel_requested": answer.cancel_requested })))
}

#[derive(Debug, Deserialize)]
struct CompleteBody {
    #[serde(default)]
    results: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct FailBody {
    error: String,
    #[serde(default)]
    recoverable: bool,
}

async fn complete(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let claim = job_bearer(&req, &shared, &id)?;
    let c: CompleteBody = json_body(body).await?;
    end(&shared, &claim, End::Complete(c.results.unwrap_or(Value::Null))).await
}

async fn fail(
    req: HttpRequest,
    shared: web::Data<Shared>,
    id: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let claim = job_bearer(&req, &shared, &id)?;
    let f: FailBody = json_body(body).await?;
    if f.error.trim().is_empty() {
        return Err(bad("error must say what went wrong"));
    }
    if f.error.chars().count() > MAX_ERROR_CHARS {
        return Err(bad(format!("error may have at most {MAX_ERROR_CHARS} characters")));
    }
    let error = f.error;
    end(&shared, &claim, End::Fail { error, recoverable: f.recoverable }).await
}

async fn end(shared: &Shared, claim: &JobClaim, end: End) -> Result<HttpResponse, ApiError> {
    let ended = shared.jobs.end(claim.job_id, end).await.map_err(refused)?;
    info!(target: "audit", event = "job_ended", user = %claim.user_id, job = %claim.job_id, status = ended.status.as_str(), "external job ended");
    Ok(HttpResponse::Ok().json(json!({ "seq": ended.seq, "status": ended.status.as_str() })))
}
