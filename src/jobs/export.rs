//! The `Export` actor: one export job (contract §8) writing a tenant's stored rows, filtered, to a
//! CSV or JSON-lines file page by page (the row store's keyset pages of [`PAGE_ROWS`], so memory is
//! flat in the row count), with `export_started`, coalesced `export_progress`, and `export_completed`
//! with a signed, expiring `download_url` (or `export_failed`). The file is written beside its final
//! name and renamed when complete, so a download never sees half a file. The job's spec (format and
//! filters) is its snapshot's `metadata`: after a restart or a takeover the export runs again from
//! the start, its file written anew.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::auth::Auth;
use crate::db::row_store::{ExportFilters, ExportRow, ExportRows};
use crate::db::store::{JobRecord, SaveJob};
use crate::db::{RowsAddr, StoreAddr};
use crate::jobs::webhooks::{webhook_event, JobEvent};
use crate::protocol::{
    now_rfc3339, Event, ExportCompleted, ExportFailed, ExportProgress, ExportStarted, JobCancelled, JobError,
    JobSnapshot, JobStatus, ProcessingCompleted, ProcessingFailed, RoomKind, StatusData,
};
use crate::realtime::broker::{Broker, Publish};

/// The kind of job this actor runs.
pub const EXPORT: &str = "export";
/// Rows read and written per page.
pub const PAGE_ROWS: usize = 2000;

/// What every export needs.
#[derive(Clone)]
pub struct ExportDeps {
    /// Where its events go.
    pub broker: Addr<Broker>,
    /// Where its snapshot is kept.
    pub store: StoreAddr,
    /// Where the rows are read.
    pub rows: RowsAddr,
    /// Mints the download link.
    pub auth: Arc<Auth>,
    /// `data_dir/downloads`.
    pub downloads: PathBuf,
    /// `download_ttl_s`.
    pub download_ttl: Duration,
    /// `progress_max_rate_per_s`.
    pub progress_rate: u32,
    /// Told when the job ends (its tenant's webhooks).
    pub webhooks: Recipient<JobEvent>,
}

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `date,amount,description,category,job_id,line` with a header row.
    Csv,
    /// One JSON object per row.
    Jsonl,
}

impl Format {
    /// `csv` or `jsonl`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "jsonl" => Some(Format::Jsonl),
            _ => None,
        }
    }

    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    /// The name of the job's file.
    pub fn file(self) -> &'static str {
        match self {
            Format::Csv => "export.csv",
            Format::Jsonl => "export.jsonl",
        }
    }
}

/// The spec an export job keeps in its snapshot's `metadata`.
pub fn spec_metadata(format: Format, filters: &ExportFilters) -> Value {
    json!({ "format": format.as_str(), "filters": filters })
}

/// The format and filters of an export job's snapshot.
pub fn spec_of(snapshot: &JobSnapshot) -> Option<(Format, ExportFilters)> {
    let meta = snapshot.metadata.as_ref()?;
    let format = Format::parse(meta.get("format")?.as_str()?)?;
    let filters = serde_json::from_value(meta.get("filters").cloned().unwrap_or(Value::Null)).unwrap_or_default();
    Some((format, filters))
}

/// Where the files of job `id` are.
pub fn job_dir(downloads: &Path, id: Uuid) -> PathBuf {
    downloads.join(id.to_string())
}

/// Cancel the export; answers whether it was still running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CancelExport {
    /// Who asked.
    pub by: String,
}

/// The export actor stopped; its scheduler forgets it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ExportEnded {
    /// The job.
    pub job_id: Uuid,
    /// The actor that stopped (an abandoned one may have been replaced already).
    pub actor: Addr<Export>,
}

/// Stop at once, saving nothing (another node holds the job's lease now).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AbandonExport;

/// One export job.
pub struct Export {
    deps: ExportDeps,
    snapshot: JobSnapshot,
    format: Format,
    filters: ExportFilters,
    room: String,
    stop: Arc<AtomicBool>,
    cancel_by: Option<String>,
    abandoned: bool,
    ended: Recipient<ExportEnded>,
}

/// How the run ended.
enum Outcome {
    Done { rows: u64, bytes: u64 },
    Stopped,
    Failed(String),
}

impl Export {
    /// The actor of the export job `snapshot` (new, or stored before a restart); `None` when the
    /// snapshot holds no export spec.
    pub fn new(deps: ExportDeps, snapshot: JobSnapshot, ended: Recipient<ExportEnded>) -> Option<Export> {
        let (format, filters) = spec_of(&snapshot)?;
        Some(Export {
            room: RoomKind::Job(snapshot.job_id).name(),
            deps,
            snapshot,
            format,
            filters,
            stop: Arc::new(AtomicBool::new(false)),
            cancel_by: None,
            abandoned: false,
            ended,
        })
    }

    fn job_id(&self) -> Uuid {
        self.snapshot.job_id
    }

    fn publish(&self, event: Event) {
        self.deps.broker.do_send(Publish::job(self.room.clone(), event));
    }

    fn save(&mut self) {
        self.snapshot.updated_at = Some(now_rfc3339());
        self.deps.store.do_send(SaveJob(JobRecord { snapshot: self.snapshot.clone(), spec: None }));
    }

    fn set_status(&mut self, status: JobStatus, message: &str) {
        self.snapshot.status = status.clone();
        let data = StatusData { job_id: Some(self.job_id()), status: status.clone(), message: message.into() };
        self.publish(Event::Status(data));
        self.save();
        if let Some(event) = webhook_event(&status) {
            self.deps.webhooks.do_send(JobEvent { event, snapshot: self.snapshot.clone() });
        }
    }

    /// Writes every page; publishes progress (at most `progress_rate` a second) as it goes.
    fn run(&self) -> impl std::future::Future<Output = Outcome> + 'static {
        let (deps, job_id, room) = (self.deps.clone(), self.job_id(), self.room.clone());
        let (tenant, filters, format, stop) =
            (self.snapshot.tenant.clone(), self.filters.clone(), self.format, self.stop.clone());
        async move {
            let dir = job_dir(&deps.downloads, job_id);
            let part = dir.join(format!("{}.part", format.file()));
            let made = (dir.clone(), part.clone());
            let opened = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                crate::files::private_dir(&made.0)?;
                let mut out = crate::files::private_options().write(true).create(true).truncate(true).open(&made.1)?;
                if format == Format::Csv {
                    out.write_all(b"date,amount,description,category,job_id,line\n")?;
                }
                out.flush()
            })
            .await;
            if let Err(e) = opened.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                return Outcome::Failed(format!("cannot write the export: {e}"));
            }
            let every = Duration::from_secs_f64(1.0 / f64::from(deps.progress_rate.max(1)));
            // The first page's progress goes out at once; later ones at most `progress_rate` a second.
            let (mut rows, mut cursor, mut last_progress) = (0u64, None, None::<Instant>);
            loop {
                if stop.load(Ordering::Acquire) {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Outcome::Stopped;
                }
                let page = ExportRows { tenant: tenant.clone(), filters: filters.clone(), cursor, limit: PAGE_ROWS };
                let (page, next) = match deps.rows.export_rows(page).await {
                    Ok(p) => p,
                    Err(e) => return failed(&part, format!("cannot read the rows: {e}")).await,
                };
                let n = page.len() as u64;
                let path = part.clone();
                let written = tokio::task::spawn_blocking(move || append(&path, format, &page)).await;
                if let Err(e) = written.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                    return failed(&part, format!("cannot write the export: {e}")).await;
                }
                rows += n;
                if next.is_some() && last_progress.is_none_or(|t| t.elapsed() >= every) {
                    last_progress = Some(Instant::now());
                    let progress = Event::ExportProgress(ExportProgress { job_id, rows });
                    deps.broker.do_send(Publish::job(room.clone(), progress));
                }
                cursor = next;
                if cursor.is_none() {
                    break;
                }
            }
            // A cancel that came with the last page still wins: nothing is published under its name.
            if stop.load(Ordering::Acquire) {
                let _ = tokio::fs::remove_file(&part).await;
                return Outcome::Stopped;
            }
            let done = dir.join(format.file());
            if let Err(e) = tokio::fs::rename(&part, &done).await {
                return failed(&part, format!("cannot write the export: {e}")).await;
            }
            let bytes = tokio::fs::metadata(&done).await.map(|m| m.len()).unwrap_or(0);
            Outcome::Done { rows, bytes }
        }
    }

    fn finish(&mut self, outcome: Outcome, ctx: &mut Context<Self>) {
        if self.abandoned {
            return ctx.stop();
        }
        let job_id = self.job_id();
        self.snapshot.finished_at = Some(Some(now_rfc3339()));
        self.snapshot.eta_seconds = Some(None);
        match (outcome, self.cancel_by.clone()) {
            (Outcome::Done { rows, bytes }, None) => {
                let download_url = download_url(&self.deps, &self.snapshot.tenant, job_id, self.format);
                let download_url = match download_url {
                    Ok(url) => url,
                    Err(e) => return self.fail(format!("cannot sign the download link: {e}"), ctx),
                };
                let results = json!({
                    "format": self.format.as_str(), "rows": rows, "bytes": bytes, "download_url": download_url,
                });
                self.publish(Event::ExportCompleted(ExportCompleted { job_id, rows, bytes, download_url }));
                self.publish(Event::ProcessingCompleted(ProcessingCompleted { job_id, results: results.clone() }));
                self.snapshot.progress = Some(100.0);
                self.snapshot.processed = Some(rows);
                self.snapshot.total = Some(rows);
                self.snapshot.results = Some(results);
                self.set_status(JobStatus::Completed, "completed");
            }
            (Outcome::Failed(error), None) => return self.fail(error, ctx),
            (_, by) => {
                let by = by.unwrap_or_default();
                self.publish(Event::JobCancelled(JobCancelled { job_id, by: by.clone() }));
                self.set_status(JobStatus::Cancelled, &format!("cancelled by {by}"));
            }
        }
        ctx.stop();
    }

    fn fail(&mut self, error: String, ctx: &mut Context<Self>) {
        let job_id = self.job_id();
        tracing::warn!(job = %job_id, %error, "export failed");
        self.publish(Event::ExportFailed(ExportFailed { job_id, error: error.clone() }));
        self.publish(Event::ProcessingFailed(ProcessingFailed {
            job_id,
            error: error.clone(),
            details: Value::Null,
            recoverable: true,
        }));
        self.snapshot.error = Some(Some(JobError { message: error, recoverable: true }));
        self.set_status(JobStatus::Failed, "failed");
        ctx.stop();
    }
}

/// A completed export's snapshot as it is read: with a download link good for `ttl_s` from now (the
/// one its events carried may have expired).
pub fn fresh_link(auth: &Auth, ttl_s: u64, snapshot: &mut JobSnapshot) {
    if snapshot.kind.as_deref() != Some(EXPORT) || snapshot.status != JobStatus::Completed {
        return;
    }
    let Some((format, _)) = spec_of(snapshot) else { return };
    let exp = crate::auth::unix_now() + ttl_s;
    let Ok(token) = auth.mint_download(&snapshot.tenant, snapshot.job_id, format.file(), exp) else { return };
    if let Some(results) = snapshot.results.as_mut().and_then(|r| r.as_object_mut()) {
        results.insert("download_url".into(), json!(format!("/api/v1/downloads/{token}")));
    }
}

/// The run failed: its half-written file goes.
async fn failed(part: &Path, error: String) -> Outcome {
    let _ = tokio::fs::remove_file(part).await;
    Outcome::Failed(error)
}

/// A signed link to the export file of `job`, good for `download_ttl_s` from now.
pub fn download_url(deps: &ExportDeps, tenant: &str, job: Uuid, format: Format) -> Result<String, String> {
    let exp = crate::auth::unix_now() + deps.download_ttl.as_secs();
    let token = deps.auth.mint_download(tenant, job, format.file(), exp).map_err(|e| e.to_string())?;
    Ok(format!("/api/v1/downloads/{token}"))
}

/// A CSV text cell as the import's scan leaves it: one a spreadsheet would run as a formula (or
/// with control characters) is written neutralised, whatever wrote it into the store.
fn neutral(cell: &str) -> std::borrow::Cow<'_, str> {
    match crate::jobs::csv::scan_cell(cell).1 {
        Some(safe) => safe.into(),
        None => cell.into(),
    }
}

fn amount(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.unsigned_abs() / 100, cents.unsigned_abs() % 100)
}

/// Appends `rows` to the file at `path` (blocking).
fn append(path: &Path, format: Format, rows: &[ExportRow]) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().append(true).open(path)?;
    let mut out = std::io::BufWriter::with_capacity(64 << 10, file);
    match format {
        Format::Csv => {
            let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(&mut out);
            for r in rows {
                let line = r.line.to_string();
                let fields = [
                    r.date.as_str(),
                    &amount(r.amount_cents),
                    &neutral(&r.description),
                    &neutral(&r.category),
                    &r.job_id,
                    &line,
                ];
                w.write_record(fields).map_err(std::io::Error::other)?;
            }
            w.flush()?;
        }
        Format::Jsonl => {
            for r in rows {
                let line = json!({
                    "date": r.date, "amount": amount(r.amount_cents), "amount_cents": r.amount_cents,
                    "description": r.description, "category": r.category, "job_id": r.job_id, "line": r.line,
                });
                serde_json::to_writer(&mut out, &line)?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()
}

impl Actor for Export {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let span = tracing::info_span!("job", job = %self.job_id(), tenant = %self.snapshot.tenant, kind = EXPORT);
        let _g = span.enter();
        tracing::info!(format = self.format.as_str(), "export started");
        self.snapshot.started_at = Some(Some(now_rfc3339()));
        self.snapshot.progress = Some(0.0);
        self.set_status(JobStatus::Processing, "exporting");
        self.publish(Event::ExportStarted(ExportStarted {
            job_id: self.job_id(),
            format: self.format.as_str().into(),
        }));
        let run = self.run();
        ctx.spawn(run.into_actor(self).map(|outcome, export, ctx| export.finish(outcome, ctx)));
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.ended.do_send(ExportEnded { job_id: self.job_id(), actor: ctx.address() });
    }
}

impl Handler<CancelExport> for Export {
    type Result = bool;
    fn handle(&mut self, m: CancelExport, _: &mut Context<Self>) -> bool {
        if self.snapshot.status.is_terminal() || self.stop.load(Ordering::Acquire) {
            return self.cancel_by.is_some();
        }
        self.cancel_by = Some(m.by);
        self.stop.store(true, Ordering::Release);
        true
    }
}

impl Handler<AbandonExport> for Export {
    type Result = ();
    fn handle(&mut self, _: AbandonExport, _: &mut Context<Self>) {
        self.abandoned = true;
        self.stop.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_and_formula_cells() {
        assert_eq!(amount(-5420), "-54.20");
        assert_eq!(amount(5), "0.05");
        assert_eq!(amount(-5), "-0.05");
        assert_eq!(amount(100), "1.00");
        assert_eq!(neutral("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(neutral("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(neutral("groceries"), "groceries");
    }
}
