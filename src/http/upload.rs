//! `POST /api/v1/uploads`: a multipart CSV upload becomes a queued job.
//!
//! The body is read through [`Bounded`], a counting stream in front of the multipart parser, so
//! what a client can make the server buffer or search is bounded whatever its headers claim: the
//! whole body (`max_upload_bytes` plus room for the form around the file), each part's header block
//! ([`MAX_PART_HEADER_BYTES`]), the number of parts ([`MAX_PARTS`]) and the time the body may take
//! (`upload_timeout_s`). The file is streamed to disk, never held in memory. The tenant's quotas
//! (`quota.rs`) and the free disk are checked before the body is read and again as the file arrives
//! (429 / 507); the upload's [`Admission`] then goes with its job. The job id is claimed in one store
//! step, so two uploads with one `batch_id` cannot both win.

use std::cell::Cell;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_multipart::Multipart;
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::info;
use uuid::Uuid;

use crate::db::pg_store::{SaveUpload, Unclaim};
use crate::db::store::JobSpec;
use crate::error::ApiError;
use crate::http::extract::{bearer, claim_id};
use crate::http::shared::Shared;
use crate::jobs::job;
use crate::jobs::scheduler::Submit;
use crate::metrics::Metrics;
use crate::protocol::{excerpt, RoomKind};
use crate::quota::{Admission, Exceeded};
use crate::realtime::redis::{QuotaPassed, RedisEngine};

/// Bytes of the form around the file (boundaries, part headers, `batch_id`) allowed beyond
/// `max_upload_bytes`.
pub const FORM_OVERHEAD_BYTES: u64 = 64 * 1024;
/// The largest header block of one part (its `Content-Disposition`, `Content-Type`, ...).
pub const MAX_PART_HEADER_BYTES: u64 = 8 * 1024;
/// The most parts one upload may have.
pub const MAX_PARTS: usize = 16;

/// Which bound a body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    Body,
    PartHeader,
}

/// What the receiving loop and the counting stream share (one task, so plain cells).
#[derive(Default)]
struct Meter {
    /// Bytes read from the client so far.
    read: Cell<u64>,
    /// Where the header block being waited for began, while the parser looks for a part's header.
    header_from: Cell<Option<u64>>,
    broken: Cell<Option<Broken>>,
}

/// The request body, counted: fails the stream (and so the parser) once a bound is broken.
///
/// The multipart parser reads every chunk that is ready before it parses; this stream hands it one
/// chunk per poll (answering `Pending`, with an immediate wake, in between), so the parser looks at
/// each chunk as it comes and its buffer holds at most a chunk more than the part it is in.
struct Bounded {
    inner: web::Payload,
    meter: Rc<Meter>,
    max: u64,
    /// A chunk was just handed over: yield once before the next.
    handed: bool,
}

impl Stream for Bounded {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.handed {
            self.handed = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &item {
            self.handed = true;
            let m = &self.meter;
            let before = m.read.get();
            m.read.set(before + chunk.len() as u64);
            let broken = if before + chunk.len() as u64 > self.max {
                Some(Broken::Body)
            } else if m.header_from.get().is_some_and(|from| before - from > MAX_PART_HEADER_BYTES) {
                // The parser had every byte since the header began and found no end to it.
                Some(Broken::PartHeader)
            } else {
                None
            };
            if let Some(b) = broken {
                m.broken.set(Some(b));
                return Poll::Ready(Some(Err(PayloadError::Overflow)));
            }
        }
        item
    }
}

/// Whether an uploaded part looks like CSV text: a CSV name or text content type, and no NUL bytes.
pub(crate) fn looks_like_csv(filename: &str, content_type: Option<&str>) -> bool {
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

/// Received bytes between two checks of the free disk space while a file arrives.
const DISK_CHECK_EVERY: u64 = 4 << 20;

/// Counts an upload body in `jobcast_uploads_in_progress` while it lives.
struct Receiving(Arc<Metrics>);

impl Receiving {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.uploads_in_progress.fetch_add(1, Relaxed);
        Receiving(metrics.clone())
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.uploads_in_progress.fetch_sub(1, Relaxed);
    }
}

/// What a file part is checked against as it arrives: the tenant's upload-bytes quota and the
/// free-disk floor.
struct Budget<'a> {
    admission: &'a mut Admission,
    dir: PathBuf,
    min_free: u64,
    /// Bytes at the last disk check.
    checked_at: u64,
}

impl Budget<'_> {
    async fn received(&mut self, size: u64) -> Result<(), ApiError> {
        self.admission.grow_to(size)?;
        if size - self.checked_at >= DISK_CHECK_EVERY {
            self.checked_at = size;
            disk_check(self.dir.clone(), 0, self.min_free).await?;
        }
        Ok(())
    }
}

/// Cluster mode: the upload's share of its tenant's quotas across every node (`redis.rs`), one field
/// per upload, given back with its [`Admission`].
pub(crate) struct ClusterShare {
    redis: RedisEngine,
    tenant: String,
    upload: String,
}

impl ClusterShare {
    async fn claim(
        redis: &RedisEngine,
        shared: &Shared,
        tenant: &str,
        admission: &mut Admission,
    ) -> Result<ClusterShare, ApiError> {
        let share =
            ClusterShare { redis: redis.clone(), tenant: tenant.into(), upload: Uuid::new_v4().simple().to_string() };
        // Before the claim, so that one whose answer is lost is given back all the same.
        redis.release_with(admission, tenant, &share.upload);
        share.count(shared, admission.bytes()).await?;
        Ok(share)
    }

    /// Counts the upload at `bytes`, refusing past the tenant's limits.
    async fn count(&self, shared: &Shared, bytes: u64) -> Result<(), ApiError> {
        let limits = shared.quotas.limits();
        let passed = self
            .redis
            .claim_quota(&self.tenant, &self.upload, limits.jobs, limits.upload_bytes, bytes)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        match passed {
            Some(QuotaPassed::Jobs) => Err(Exceeded::Jobs { tenant: self.tenant.clone(), max: limits.jobs }.into()),
            Some(QuotaPassed::Bytes) => {
                Err(Exceeded::UploadBytes { tenant: self.tenant.clone(), max: limits.upload_bytes }.into())
            }
            None => Ok(()),
        }
    }

    /// The file is in: the cluster counts its size instead of the declared length.
    async fn settle(&self, shared: &Shared, size: u64) -> Result<(), ApiError> {
        self.count(shared, size).await
    }
}

/// `quota::check_disk` off the arbiter.
async fn disk_check(dir: PathBuf, more: u64, min_free: u64) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || crate::quota::check_disk(&dir, more, min_free))
        .await
        .map_err(|e| ApiError::Internal(format!("cannot check the free disk space: {e}")))?
        .map_err(ApiError::from)
}

/// The upload endpoint.
pub async fn upload(req: HttpRequest, shared: web::Data<Shared>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let answer = accept(req, &shared, body).await;
    if let Err(ApiError::QuotaExceeded(why) | ApiError::InsufficientStorage(why)) = &answer {
        shared.metrics.quota_refusals.fetch_add(1, Relaxed);
        info!(target: "audit", event = "upload_refused", reason = %why, "upload refused");
    }
    answer
}

async fn accept(req: HttpRequest, shared: &Shared, body: web::Payload) -> Result<HttpResponse, ApiError> {
    let who = bearer(&req, shared)?;
    let max = shared.config.max_upload_bytes;
    let too_large = || ApiError::PayloadTooLarge(format!("the upload is larger than {max} bytes"));
    let declared =
        req.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max + FORM_OVERHEAD_BYTES) {
        return Err(too_large());
    }
    // In cluster mode with Redis away, a new job could not report anything: refused until it is back.
    if shared.redis.as_ref().is_some_and(|r| r.is_down()) {
        return Err(ApiError::Unavailable("the cluster's Redis is not answering; try again shortly".into()));
    }
    // Quotas and the disk before a byte of the body is read; both are checked again as it arrives.
    let _receiving = Receiving::new(&shared.metrics);
    let (mut admission, cluster) = admit(shared, &who.tenant, declared.unwrap_or(0)).await?;
    let dir = uploads_dir(shared).await?;
    let min_free = shared.quotas.limits().min_free_disk;
    disk_check(dir.clone(), declared.unwrap_or(0), min_free).await?;
    let part = dir.join(format!("{}.part", Uuid::new_v4()));
    let meter = Rc::new(Meter::default());
    let mut form = Multipart::new(
        req.headers(),
        Bounded { inner: body, meter: meter.clone(), max: max + FORM_OVERHEAD_BYTES, handed: false },
    );
    let limit = Duration::from_secs(shared.config.upload_timeout_s);
    let mut budget = Budget { admission: &mut admission, dir: dir.clone(), min_free, checked_at: 0 };
    let received = match tokio::time::timeout(limit, receive(&mut form, &meter, &part, max, &mut budget)).await {
        Ok(received) => received,
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the upload took longer than {} s (upload_timeout_s)",
            limit.as_secs()
        ))),
    };
    let (batch_id, file) = match received {
        Ok(ok) => ok,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(match meter.broken.get() {
                Some(Broken::Body) => too_large(),
                Some(Broken::PartHeader) => ApiError::BadRequest(format!(
                    "a multipart part header is longer than {MAX_PART_HEADER_BYTES} bytes"
                )),
                None => e,
            });
        }
    };
    let Some((filename, size)) = file else {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(ApiError::BadRequest("the multipart field \"file\" is required".into()));
    };
    admission.settle(size);
    if let Some(share) = &cluster {
        if let Err(e) = share.settle(shared, size).await {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
    }
    let job_id = start_job(shared, &who.tenant, &who.user_id, batch_id, filename, &part, size, admission).await?;
    Ok(HttpResponse::Accepted().json(json!({
        "job_id": job_id,
        "room": RoomKind::Job(job_id).name(),
        "status_url": format!("/api/v1/jobs/{job_id}"),
        "ws_url": format!("/ws/jobs/{job_id}"),
    })))
}

/// The tenant's quotas for an upload of `bytes` (so far): on this node, and across the cluster
/// when there is one (that share is given back with the [`Admission`]).
pub(crate) async fn admit(
    shared: &Shared,
    tenant: &str,
    bytes: u64,
) -> Result<(Admission, Option<ClusterShare>), ApiError> {
    let mut admission = shared.quotas.admit(tenant, bytes)?;
    let cluster = match &shared.redis {
        Some(redis) => Some(ClusterShare::claim(redis, shared, tenant, &mut admission).await?),
        None => None,
    };
    Ok((admission, cluster))
}

/// `data_dir/uploads`, made private when it is not there.
pub(crate) async fn uploads_dir(shared: &Shared) -> Result<PathBuf, ApiError> {
    let dir = shared.config.data_dir.join("uploads");
    let made = dir.clone();
    tokio::task::spawn_blocking(move || crate::files::private_dir(&made))
        .await
        .map_err(|e| ApiError::Internal(format!("cannot store uploads: {e}")))?
        .map_err(|e| ApiError::Internal(format!("cannot store uploads: {e}")))?;
    Ok(dir)
}

/// A received file (`part`, `size` bytes, its quotas settled in `admission`) becomes a queued job of
/// `tenant`, as `batch_id` when given; the file is removed when that fails. Answers the job id.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_job(
    shared: &Shared,
    tenant: &str,
    user_id: &str,
    batch_id: Option<Uuid>,
    filename: String,
    part: &std::path::Path,
    size: u64,
    admission: Admission,
) -> Result<Uuid, ApiError> {
    let part = part.to_path_buf();
    let job_id = batch_id.unwrap_or_else(Uuid::new_v4);
    let path = shared.config.data_dir.join("uploads").join(format!("{job_id}.csv"));
    let spec = JobSpec {
        job_id,
        tenant: tenant.to_string(),
        user_id: user_id.to_string(),
        filename,
        path,
        size_bytes: size,
        resumes: 0,
    };
    let claimed = claim_id(shared, job::queued(spec.clone()), "batch_id").await;
    if let Err(e) = claimed {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    // With a shared store the file is kept in the database too: a node that takes the job over
    // reads it from there.
    if let Some(store) = shared.store.shared() {
        let kept = store.send(SaveUpload { job_id, path: part.clone() }).await;
        if let Err(e) = kept.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            let _ = tokio::fs::remove_file(&part).await;
            // Best effort: when the database is away this fails too, and the job, taken over once
            // its lease runs out, fails for want of its upload.
            let unclaim = store.send(Unclaim { job_id, tenant: spec.tenant.clone() }).await;
            if let Err(e) = unclaim.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::warn!(job = %job_id, error = %e, "an upload that was not kept still claims its job id");
            }
            return Err(ApiError::Unavailable(format!("the upload could not be kept in the database: {e}")));
        }
    }
    tokio::fs::rename(&part, &spec.path)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
    info!(target: "audit", event = "upload", user = %spec.user_id, tenant = %spec.tenant, job = %job_id, size, "job created");
    shared.scheduler.do_send(Submit { spec, resume: None, admission });
    Ok(job_id)
}

fn invalid(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("invalid multipart body: {e}"))
}

/// Reads the form: `batch_id` and `file` (streamed to `part`). Other fields are read and dropped.
async fn receive(
    form: &mut Multipart,
    meter: &Meter,
    part: &std::path::Path,
    max: u64,
    budget: &mut Budget<'_>,
) -> Result<(Option<Uuid>, Option<(String, u64)>), ApiError> {
    let mut batch_id = None;
    let mut file = None;
    let mut parts = 0;
    loop {
        meter.header_from.set(Some(meter.read.get()));
        let Some(field) = form.next().await else { break };
        meter.header_from.set(None);
        let mut field = field.map_err(invalid)?;
        parts += 1;
        if parts > MAX_PARTS {
            return Err(ApiError::BadRequest(format!("a multipart upload may have at most {MAX_PARTS} parts")));
        }
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "batch_id" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.next().await {
                    text.extend_from_slice(&chunk.map_err(invalid)?);
                    if text.len() > 64 {
                        return Err(ApiError::BadRequest("batch_id must be a UUID".into()));
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
                        "{} ({}) is not a CSV file",
                        excerpt(&filename),
                        excerpt(content_type.as_deref().unwrap_or("no content type"))
                    )));
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
                            "{} holds binary data, not CSV text",
                            excerpt(&filename)
                        )));
                    }
                    size += chunk.len() as u64;
                    if size > max {
                        return Err(ApiError::PayloadTooLarge(format!("the upload is larger than {max} bytes")));
                    }
                    budget.received(size).await?;
                    out.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
                }
                out.flush().await.map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
                file = Some((filename, size));
            }
            _ => {
                while let Some(chunk) = field.next().await {
                    chunk.map_err(invalid)?;
                }
            }
        }
    }
    Ok((batch_id, file))
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
