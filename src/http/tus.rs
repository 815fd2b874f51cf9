//! Resumable uploads (contract §11): the tus 1.0 core protocol with its creation extension on
//! `/api/v1/uploads/tus`. `POST` creates an upload of `Upload-Length` bytes (`Upload-Metadata`:
//! `filename`, optional `batch_id` and `kind`), `HEAD` answers how much arrived (`Upload-Offset`),
//! and `PATCH` appends at that offset. A dropped `PATCH` keeps what it delivered, so the client asks
//! `HEAD` and goes on from there. The `PATCH` that completes the file makes it a job exactly as a
//! multipart upload would (`http::upload::start_job`) and answers its id in `Jobcast-Job-Id`.
//!
//! An upload is two files in `data_dir/uploads/tus`: `<id>.json` (who, how long, the metadata) and
//! `<id>.bin` (the bytes so far; its length is the offset), so it survives a restart. One `PATCH` at
//! a time per upload (another is 409); an upload not finished within [`EXPIRES_AFTER`] is removed
//! (`Upload-Expires` says when). Every request needs the bearer token of the upload's tenant (an
//! upload of another tenant is 404); every answer carries `Tus-Resumable: 1.0.0`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use actix_web::http::header::HeaderMap;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use base64::Engine;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::io::Write;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::auth::Identity;
use crate::error::ApiError;
use crate::http::extract::bearer;
use crate::http::shared::Shared;
use crate::http::upload::{admit, looks_like_csv, start_job, uploads_dir};
use crate::jobs::job::CSV_IMPORT;
use crate::protocol::excerpt;

/// The protocol version spoken.
const TUS_VERSION: &str = "1.0.0";
/// How long an unfinished upload is kept.
pub const EXPIRES_AFTER: Duration = Duration::from_secs(24 * 3600);
/// The longest `Upload-Metadata` header read.
const MAX_METADATA_BYTES: usize = 4096;
/// The longest a PATCH may go without a byte arriving (a half-open connection holds the upload's
/// lock no longer).
const CHUNK_IDLE: Duration = Duration::from_secs(30);
/// Unfinished uploads one tenant may hold at once.
const MAX_PENDING_PER_TENANT: usize = 100;

/// Registers the tus routes under `/api/v1`.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/uploads/tus").route(web::post().to(create)).route(web::method(OPTIONS).to(options)))
        .service(
            web::resource("/uploads/tus/{id}")
                .route(web::head().to(head))
                .route(web::patch().to(patch))
                .route(web::delete().to(delete))
                .route(web::method(OPTIONS).to(options)),
        );
}

const OPTIONS: actix_web::http::Method = actix_web::http::Method::OPTIONS;

/// What is kept of an upload besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    tenant: String,
    user_id: String,
    length: u64,
    filename: String,
    batch_id: Option<Uuid>,
    /// Seconds since the Unix epoch.
    created_s: u64,
}

impl Upload {
    fn expires_s(&self) -> u64 {
        self.created_s + EXPIRES_AFTER.as_secs()
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `Upload-Expires`: an RFC 9110 date.
fn http_date(unix_s: u64) -> String {
    httpdate(SystemTime::UNIX_EPOCH + Duration::from_secs(unix_s))
}

fn httpdate(t: SystemTime) -> String {
    actix_web::http::header::HttpDate::from(t).to_string()
}

/// Every answer says which protocol it speaks.
fn tus(mut res: HttpResponse) -> HttpResponse {
    res.headers_mut().insert(
        actix_web::http::header::HeaderName::from_static("tus-resumable"),
        actix_web::http::header::HeaderValue::from_static(TUS_VERSION),
    );
    res
}

fn answer(result: Result<HttpResponse, ApiError>) -> HttpResponse {
    tus(result.unwrap_or_else(|e| e.error_response()))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The caller, and a request in the protocol version spoken.
fn checked(req: &HttpRequest, shared: &Shared) -> Result<Identity, ApiError> {
    let who = bearer(req, shared)?;
    match header(req.headers(), "tus-resumable") {
        Some(TUS_VERSION) => Ok(who),
        other => Err(ApiError::PreconditionFailed(format!(
            "Tus-Resumable must be {TUS_VERSION} (got {})",
            other.map(excerpt).unwrap_or_else(|| "none".into())
        ))),
    }
}

fn number(headers: &HeaderMap, name: &str) -> Result<u64, ApiError> {
    let value = header(headers, name).ok_or_else(|| ApiError::BadRequest(format!("{name} is required")))?;
    value
        .trim()
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{name} must be a number of bytes, not {:?}", excerpt(value))))
}

/// `Upload-Metadata`: `key base64value` pairs, comma-separated (a key alone has an empty value).
fn metadata(value: &str) -> Result<Vec<(String, String)>, ApiError> {
    if value.len() > MAX_METADATA_BYTES {
        return Err(ApiError::BadRequest(format!("Upload-Metadata may have at most {MAX_METADATA_BYTES} bytes")));
    }
    let mut out = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, encoded) = pair.split_once(' ').unwrap_or((pair, ""));
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| {
            ApiError::BadRequest(format!("Upload-Metadata {:?}: the value is not base64", excerpt(key)))
        })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| ApiError::BadRequest(format!("Upload-Metadata {:?}: the value is not UTF-8", excerpt(key))))?;
        out.push((key.to_string(), text));
    }
    Ok(out)
}

fn tus_dir(uploads: &Path) -> PathBuf {
    uploads.join("tus")
}

fn paths(dir: &Path, id: Uuid) -> (PathBuf, PathBuf) {
    (dir.join(format!("{id}.json")), dir.join(format!("{id}.bin")))
}

/// The upload `id` of `who`'s tenant (another tenant's is not found).
async fn load(dir: &Path, id: &str, who: &Identity) -> Result<(Uuid, Upload), ApiError> {
    let not_found = || ApiError::NotFound(format!("no upload {}", excerpt(id)));
    let id = Uuid::parse_str(id).map_err(|_| not_found())?;
    let (meta, _) = paths(dir, id);
    let text = tokio::fs::read(&meta).await.map_err(|_| not_found())?;
    let upload: Upload = serde_json::from_slice(&text).map_err(|_| not_found())?;
    if upload.tenant != who.tenant {
        return Err(not_found());
    }
    if upload.expires_s() <= now_s() {
        remove(dir, id).await;
        return Err(not_found());
    }
    Ok((id, upload))
}

async fn remove(dir: &Path, id: Uuid) {
    let (meta, data) = paths(dir, id);
    let _ = tokio::fs::remove_file(meta).await;
    let _ = tokio::fs::remove_file(data).await;
}

async fn offset(dir: &Path, id: Uuid) -> Result<u64, ApiError> {
    let (_, data) = paths(dir, id);
    tokio::fs::metadata(&data)
        .await
        .map(|m| m.len())
        .map_err(|e| ApiError::Internal(format!("the upload's bytes are missing: {e}")))
}

/// Removes expired uploads; answers how many unfinished ones the tenant has, and their lengths in
/// all (off the arbiter).
async fn sweep(dir: PathBuf, tenant: String) -> Result<(usize, u64), ApiError> {
    tokio::task::spawn_blocking(move || {
        let (mut pending, mut bytes) = (0, 0u64);
        let now = now_s();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let upload = std::fs::read(&path).ok().and_then(|t| serde_json::from_slice::<Upload>(&t).ok());
            match upload {
                Some(u) if u.expires_s() > now => {
                    if u.tenant == tenant {
                        pending += 1;
                        bytes += u.length;
                    }
                }
                _ => {
                    let _ = std::fs::remove_file(path.with_extension("bin"));
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok::<(usize, u64), std::io::Error>((pending, bytes))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("cannot read the uploads: {e}")))
}

async fn options(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    answer(bearer(&req, &shared).map(|_| {
        HttpResponse::NoContent()
            .insert_header(("Tus-Version", TUS_VERSION))
            .insert_header(("Tus-Extension", "creation,termination,expiration"))
            .insert_header(("Tus-Max-Size", shared.config.max_upload_bytes.to_string()))
            .finish()
    }))
}

/// `POST /api/v1/uploads/tus`.
async fn create(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    answer(create_upload(&req, &shared).await)
}

async fn create_upload(req: &HttpRequest, shared: &Shared) -> Result<HttpResponse, ApiError> {
    let who = checked(req, shared)?;
    if req.headers().contains_key("upload-defer-length") {
        return Err(ApiError::BadRequest("Upload-Defer-Length is not supported: give Upload-Length".into()));
    }
    let length = number(req.headers(), "upload-length")?;
    let max = shared.config.max_upload_bytes;
    if length > max {
        return Err(ApiError::PayloadTooLarge(format!("the upload is larger than {max} bytes")));
    }
    if length == 0 {
        return Err(ApiError::BadRequest("Upload-Length must be at least 1 byte".into()));
    }
    let pairs = metadata(header(req.headers(), "upload-metadata").unwrap_or(""))?;
    let value = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let filename = value("filename").unwrap_or("upload.csv").to_string();
    if filename.chars().count() > 255 {
        return Err(ApiError::BadRequest("filename may have at most 255 characters".into()));
    }
    let batch_id = match value("batch_id") {
        Some(text) => {
            Some(Uuid::parse_str(text.trim()).map_err(|_| ApiError::BadRequest("batch_id must be a UUID".into()))?)
        }
        None => None,
    };
    match value("kind") {
        None | Some(CSV_IMPORT) => {}
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "kind {:?}: this server runs csv_import jobs only",
                excerpt(other)
            )))
        }
    }
    let content_type = value("filetype").or(value("content_type"));
    if !looks_like_csv(&filename, content_type) {
        return Err(ApiError::UnsupportedMediaType(format!(
            "{} ({}) is not a CSV file",
            excerpt(&filename),
            excerpt(content_type.unwrap_or("no content type"))
        )));
    }
    // The tenant's quotas and the disk, as for a multipart upload of that length (held again when
    // the upload completes).
    drop(admit(shared, &who.tenant, length).await?);
    let dir = tus_dir(&uploads_dir(shared).await?);
    let made = dir.clone();
    tokio::task::spawn_blocking(move || crate::files::private_dir(&made))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("cannot store uploads: {e}")))?;
    let min_free = shared.quotas.limits().min_free_disk;
    let (dir_checked, more) = (dir.clone(), length);
    tokio::task::spawn_blocking(move || crate::quota::check_disk(&dir_checked, more, min_free))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let (pending, pending_bytes) = sweep(dir.clone(), who.tenant.clone()).await?;
    if pending >= MAX_PENDING_PER_TENANT {
        return Err(ApiError::QuotaExceeded(format!(
            "tenant {} has {MAX_PENDING_PER_TENANT} unfinished resumable uploads; finish or delete one",
            who.tenant
        )));
    }
    // Unfinished uploads hold the disk they will need: they count against the tenant's upload bytes.
    let max_bytes = shared.quotas.limits().upload_bytes;
    if pending_bytes + length > max_bytes {
        return Err(ApiError::QuotaExceeded(format!(
            "tenant {} would hold more than {max_bytes} bytes of uploads not yet processed \
             (max_upload_bytes_per_tenant, unfinished resumable uploads included)",
            who.tenant
        )));
    }
    let id = Uuid::new_v4();
    let upload = Upload {
        tenant: who.tenant.clone(),
        user_id: who.user_id.clone(),
        length,
        filename,
        batch_id,
        created_s: now_s(),
    };
    let (meta, data) = paths(&dir, id);
    let text = serde_json::to_vec(&upload).map_err(|e| ApiError::Internal(e.to_string()))?;
    let written = async {
        let mut out = tokio::fs::OpenOptions::from(crate::files::private_options())
            .write(true)
            .create_new(true)
            .open(&data)
            .await?;
        out.flush().await?;
        let mut m = tokio::fs::OpenOptions::from(crate::files::private_options())
            .write(true)
            .create_new(true)
            .open(&meta)
            .await?;
        m.write_all(&text).await?;
        m.flush().await
    };
    if let Err(e) = written.await {
        remove(&dir, id).await;
        return Err(ApiError::Internal(format!("cannot store the upload: {e}")));
    }
    tracing::info!(target: "audit", event = "tus_created", user = %who.user_id, tenant = %who.tenant, upload = %id, length, "resumable upload created");
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/uploads/tus/{id}")))
        .insert_header(("Upload-Expires", http_date(upload.expires_s())))
        .finish())
}

/// `HEAD /api/v1/uploads/tus/{id}`.
async fn head(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let found = async {
        let who = checked(&req, &shared)?;
        let dir = tus_dir(&shared.config.data_dir.join("uploads"));
        let (id, upload) = load(&dir, &id, &who).await?;
        let offset = offset(&dir, id).await?;
        Ok(HttpResponse::Ok()
            .insert_header(("Upload-Offset", offset.to_string()))
            .insert_header(("Upload-Length", upload.length.to_string()))
            .insert_header(("Upload-Expires", http_date(upload.expires_s())))
            .insert_header(("Cache-Control", "no-store"))
            .finish())
    };
    answer(found.await)
}

/// `DELETE /api/v1/uploads/tus/{id}` (the termination extension): the upload is given up.
async fn delete(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let deleted = async {
        let who = checked(&req, &shared)?;
        let dir = tus_dir(&shared.config.data_dir.join("uploads"));
        let (id, _) = load(&dir, &id, &who).await?;
        let Some(_patching) = shared.tus.begin(id) else {
            return Err(ApiError::Conflict("a PATCH of this upload is under way".into()));
        };
        remove(&dir, id).await;
        Ok(HttpResponse::NoContent().finish())
    };
    answer(deleted.await)
}

/// `PATCH /api/v1/uploads/tus/{id}`.
async fn patch(req: HttpRequest, shared: web::Data<Shared>, id: web::Path<String>, body: web::Payload) -> HttpResponse {
    answer(append(&req, &shared, &id, body).await)
}

async fn append(
    req: &HttpRequest,
    shared: &Shared,
    id: &str,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let who = checked(req, shared)?;
    match header(req.headers(), "content-type") {
        Some(t) if t.eq_ignore_ascii_case("application/offset+octet-stream") => {}
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "a PATCH carries application/offset+octet-stream, not {}",
                excerpt(other.unwrap_or("no content type"))
            )))
        }
    }
    let claimed = number(req.headers(), "upload-offset")?;
    let dir = tus_dir(&shared.config.data_dir.join("uploads"));
    let (id, upload) = load(&dir, id, &who).await?;
    let Some(patching) = shared.tus.begin(id) else {
        return Err(ApiError::Conflict("another PATCH of this upload is under way".into()));
    };
    let at = offset(&dir, id).await?;
    if claimed != at {
        return Err(ApiError::Conflict(format!("Upload-Offset is {claimed}, but the upload holds {at} bytes")));
    }
    let (_, data) = paths(&dir, id);
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&data)
        .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
    let min_free = shared.quotas.limits().min_free_disk;
    let limit = Duration::from_secs(shared.config.upload_timeout_s);
    let mut size = at;
    // Whatever arrives is kept, even when the body then breaks off: the client resumes from it.
    // Each chunk is written on the blocking pool with the PATCH's guard, so a write under way when
    // this request is dropped still ends before another PATCH may begin.
    let mut held = Some((out, patching));
    let received = tokio::time::timeout(limit, async {
        let mut checked_at = size;
        loop {
            let chunk = match tokio::time::timeout(CHUNK_IDLE, body.next()).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return Ok(()),
                Err(_) => {
                    return Err(ApiError::RequestTimeout(format!(
                        "no byte of the PATCH arrived for {} s",
                        CHUNK_IDLE.as_secs()
                    )))
                }
            };
            let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("the upload was interrupted: {e}")))?;
            if size == 0 && chunk.iter().take(8192).any(|b| *b == 0) {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "{} holds binary data, not CSV text",
                    excerpt(&upload.filename)
                )));
            }
            if size + chunk.len() as u64 > upload.length {
                return Err(ApiError::PayloadTooLarge(format!(
                    "the PATCH goes past Upload-Length ({} bytes)",
                    upload.length
                )));
            }
            let Some((mut out, guard)) = held.take() else {
                return Err(ApiError::Internal("the upload's file is gone".into()));
            };
            let n = chunk.len() as u64;
            let (out, guard, written) = tokio::task::spawn_blocking(move || {
                let written = out.write_all(&chunk).and_then(|()| out.flush());
                (out, guard, written)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            held = Some((out, guard));
            written.map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
            size += n;
            if size - checked_at >= 4 << 20 {
                checked_at = size;
                let d = dir.clone();
                tokio::task::spawn_blocking(move || crate::quota::check_disk(&d, 0, min_free))
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))??;
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(ApiError::RequestTimeout(format!("the PATCH took longer than {} s (upload_timeout_s)", limit.as_secs())))
    });
    received?;
    let mut res = HttpResponse::NoContent();
    res.insert_header(("Upload-Offset", size.to_string()));
    if size < upload.length {
        res.insert_header(("Upload-Expires", http_date(upload.expires_s())));
        return Ok(res.finish());
    }
    // Complete: the file becomes a job as a multipart upload's would. The job gets a second link to
    // the bytes, so an upload that could not become a job (the store away, its `batch_id` taken) is
    // still whole: the client may try its last PATCH again (empty, at the full offset) or delete it.
    if shared.redis.as_ref().is_some_and(|r| r.is_down()) {
        return Err(ApiError::Unavailable("the cluster's Redis is not answering; try again shortly".into()));
    }
    let (mut admission, cluster) = admit(shared, &upload.tenant, size).await?;
    admission.settle(size);
    drop(cluster);
    let part = shared.config.data_dir.join("uploads").join(format!("{id}.part"));
    let (from, to) = (data.clone(), part.clone());
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(&to);
        std::fs::hard_link(&from, &to)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("cannot store the upload: {e}")))?;
    let filename = upload.filename.clone();
    let started =
        start_job(shared, &upload.tenant, &upload.user_id, upload.batch_id, filename, &part, size, admission).await;
    let job_id = started?;
    remove(&dir, id).await;
    drop(held);
    res.insert_header(("Jobcast-Job-Id", job_id.to_string()));
    Ok(res.finish())
}
