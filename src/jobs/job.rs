//! The job actor: one per document job, owning its state machine
//! (queued → validating → scanning → parsing → processing → finalizing → completed | failed | cancelled).
//!
//! It validates the file off the I/O arbiter, fans zones out to its zone actor (a window of
//! [`ZONES_IN_FLIGHT`], refilled as each zone is stored), alone computes overall progress and ETA,
//! coalesces `processing_progress`, and keeps its snapshot in the store. It knows nothing of sessions:
//! everything it says goes to the broker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::json;
use uuid::Uuid;

use crate::db::store::{JobRecord, JobSpec, SaveJob};
use crate::db::StoreAddr;
use crate::jobs::csv::{validate, Validated};
use crate::jobs::progress::{stage_at, validation_progress, zone_progress, Coalescer, Eta, Monotonic};
use crate::jobs::webhooks::{webhook_event, JobEvent};
use crate::jobs::zone::{ProcessZone, Zone, ZoneDeps, ZoneError};
use crate::protocol::{
    now_rfc3339, Event, FlaggedCell, ImportResults, InvalidRow, JobCancelled, JobError, JobSnapshot, JobStatus,
    ProcessingCompleted, ProcessingFailed, ProcessingProgress, ProcessingStarted, RoomKind, Stage, StatusData,
    ZoneReport,
};
use crate::quota::Admission;
use crate::realtime::broker::{Broker, Publish};

/// Results keep this many invalid rows and flagged cells.
const KEEP: usize = 100;

/// The kind of job this actor runs.
pub const CSV_IMPORT: &str = "csv_import";

/// The peers and limits a job needs.
#[derive(Clone)]
pub struct JobDeps {
    /// Where events go.
    pub broker: Addr<Broker>,
    /// Where snapshots go.
    pub store: StoreAddr,
    /// What the job's zone actor needs.
    pub zone: ZoneDeps,
    /// Limits from the configuration.
    pub max_upload_bytes: u64,
    /// Rows per zone.
    pub zone_rows: usize,
    /// `processing_progress` per second.
    pub progress_rate: u32,
    /// How long a reservation lives without being renewed.
    pub reservation_ttl: Duration,
    /// What jobs that run elsewhere need beyond the above.
    pub external: ExternalLimits,
    /// Told of every job that ends (its tenant's webhooks).
    pub webhooks: Recipient<JobEvent>,
}

/// The settings of jobs that run elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct ExternalLimits {
    /// `job_stall_timeout_s`.
    pub stall: Duration,
    /// `job_cancel_grace_s`.
    pub cancel_grace: Duration,
    /// `max_queued_jobs_per_tenant`: live external jobs of one tenant at most.
    pub max_per_tenant: usize,
}

/// Zones a job keeps in flight (being worked on or waiting for their group commit): enough for the
/// row store's group commits to take many zones at once (an import's cost is the dedup index pages
/// each commit writes). Memory is bounded across all jobs by [`crate::jobs::zone::ROWS_IN_FLIGHT`];
/// this bounds only the zone messages a job has queued.
const ZONES_IN_FLIGHT: usize = 64;

/// Sent to whoever started the job (the scheduler) once the job actor stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Finished {
    /// The job.
    pub job_id: Uuid,
}

/// How many restarts may resume one job; the next start fails it (`recoverable: false`), so a job
/// whose work brings the server down cannot bring it down on every start.
pub const MAX_RESUMES: u32 = 3;

/// Start working (a run slot was granted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Begin;

/// The job waits for a slot at this position (1 = next).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Queued(pub usize);

/// Cancel the job; answers whether it was still running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Cancel {
    /// Who asked (user id).
    pub by: String,
}

/// Validation read `done` of `total` bytes (sent from the blocking validation thread).
#[derive(Message)]
#[rtype(result = "()")]
struct ValidationProgress(u64, u64);

/// The running totals of a job's results.
#[derive(Debug, Default, Clone)]
struct Totals {
    processed: u64,
    inserted: u64,
    duplicates: u64,
    invalid_count: u64,
    flagged_count: u64,
    /// By line, so resumed zones merge in file order.
    invalid: BTreeMap<u64, InvalidRow>,
    flagged: Vec<FlaggedCell>,
    categories: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, report: &ZoneReport) {
        self.processed += report.rows;
        self.inserted += report.inserted;
        self.duplicates += report.duplicates;
        self.invalid_count += report.invalid_count;
        self.flagged_count += report.flagged_count;
        for r in &report.invalid_rows {
            self.invalid.insert(r.line, r.clone());
        }
        while self.invalid.len() > KEEP {
            self.invalid.pop_last();
        }
        self.flagged.extend(report.flagged_cells.iter().cloned());
        self.flagged.sort_by_key(|c| c.line);
        self.flagged.truncate(KEEP);
        for (k, v) in &report.categories {
            *self.categories.entry(k.clone()).or_insert(0) += v;
        }
    }

    fn results(&self) -> ImportResults {
        ImportResults {
            processed_rows: self.processed,
            inserted: self.inserted,
            duplicates: self.duplicates,
            invalid_count: self.invalid_count,
            invalid_rows: self.invalid.values().cloned().collect(),
            flagged_count: self.flagged_count,
            flagged_cells: self.flagged.clone(),
            categories: self.categories.clone(),
        }
    }
}

/// The job actor.
pub struct Job {
    spec: JobSpec,
    deps: JobDeps,
    /// Told when the job actor stops.
    finished: Recipient<Finished>,
    room: String,
    status: JobStatus,
    progress: Monotonic,
    eta: Eta,
    eta_seconds: Option<f64>,
    coalescer: Coalescer<()>,
    /// A flush of the coalesced progress is scheduled.
    flush_scheduled: bool,
    validated: Option<Arc<Validated>>,
    /// Zones stored (including before a restart).
    done: BTreeSet<u64>,
    next_zone: u64,
    in_flight: usize,
    /// The job's zone actor, started with its first zone.
    zone: Option<Addr<Zone>>,
    /// Tells zones in flight that have not begun to skip their work (set on cancel and failure).
    stop_zones: Arc<AtomicBool>,
    totals: Totals,
    /// Set when a cancel arrived; the job stops once no zone is in flight.
    cancelled_by: Option<String>,
    /// Stopped by [`Abandon`].
    abandoned: bool,
    error: Option<JobError>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    /// Set for a job resumed after a restart.
    resumed: bool,
    /// The job's share of its tenant's quotas (`quota.rs`), given back when the actor is dropped.
    _admission: Admission,
    span: tracing::Span,
}

impl Job {
    /// A new job, or one resumed from its stored `snapshot`; `finished` is told when it stops.
    pub fn new(
        spec: JobSpec,
        deps: JobDeps,
        finished: Recipient<Finished>,
        snapshot: Option<&JobSnapshot>,
        admission: Admission,
    ) -> Self {
        let mut progress = Monotonic::default();
        if let Some(p) = snapshot.and_then(|s| s.progress) {
            progress.raise(p);
        }
        let span = tracing::info_span!("job", job = %spec.job_id, tenant = %spec.tenant);
        Job {
            room: RoomKind::Job(spec.job_id).name(),
            coalescer: Coalescer::new(deps.progress_rate),
            created_at: snapshot.and_then(|s| s.created_at.clone()).unwrap_or_else(now_rfc3339),
            started_at: snapshot.and_then(|s| s.started_at.clone().flatten()),
            resumed: snapshot.is_some(),
            spec,
            deps,
            finished,
            status: JobStatus::Queued,
            progress,
            eta: Eta::new(Instant::now()),
            eta_seconds: None,
            flush_scheduled: false,
            validated: None,
            done: BTreeSet::new(),
            next_zone: 0,
            in_flight: 0,
            zone: None,
            stop_zones: Arc::new(AtomicBool::new(false)),
            totals: Totals::default(),
            cancelled_by: None,
            abandoned: false,
            error: None,
            finished_at: None,
            _admission: admission,
            span,
        }
    }

    fn publish(&self, event: Event) {
        self.deps.broker.do_send(Publish::job(self.room.clone(), event));
    }

    fn zones_total(&self) -> u64 {
        self.validated.as_ref().map(|v| v.zones.len() as u64).unwrap_or(0)
    }

    fn total_rows(&self) -> u64 {
        self.validated.as_ref().map(|v| v.rows).unwrap_or(0)
    }

    /// The job as stored: the snapshot `GET /api/v1/jobs/{id}` and `subscribed.snapshot` show, and
    /// its spec.
    fn record(&self) -> JobRecord {
        let completed = self.status == JobStatus::Completed;
        let mut s = csv_snapshot(&self.spec, self.status.clone(), self.created_at.clone());
        s.stage = Some(stage_at(self.progress.get()));
        s.progress = Some(if completed { 100.0 } else { self.progress.get() });
        s.eta_seconds = Some(if self.status.is_terminal() { None } else { self.eta_seconds });
        s.zones_total = Some(self.zones_total());
        s.zones_completed = Some(self.done.len() as u64);
        s.processed = Some(self.totals.processed);
        s.total = Some(self.total_rows());
        s.errors = Some(self.totals.invalid_count);
        s.started_at = Some(self.started_at.clone());
        s.finished_at = Some(self.finished_at.clone());
        if completed {
            s.results = Some(json!(self.totals.results()));
        }
        s.error = Some(self.error.clone());
        JobRecord { snapshot: s, spec: Some(self.spec.clone()) }
    }

    fn save(&self) {
        self.deps.store.do_send(SaveJob(self.record()));
    }

    fn set_status(&mut self, status: JobStatus, message: impl Into<String>) {
        if self.status == status {
            return;
        }
        self.status = status.clone();
        let _g = self.span.enter();
        tracing::info!(status = status.as_str(), "job status");
        self.publish(Event::Status(StatusData {
            job_id: Some(self.spec.job_id),
            status: status.clone(),
            message: message.into(),
        }));
        self.save();
        if let Some(event) = webhook_event(&status) {
            self.deps.webhooks.do_send(JobEvent { event, snapshot: self.record().snapshot });
        }
    }

    /// Raises progress to `p` and emits it, coalesced.
    fn advance(&mut self, p: f64, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let value = self.progress.raise(p);
        self.eta.update(now, value);
        self.eta_seconds = self.eta.seconds_left(now, value);
        // Status follows the stage bands once validation is over.
        if value >= 20.0 && self.status != JobStatus::Finalizing {
            let status = match stage_at(value) {
                Stage::Validation | Stage::Scanning => JobStatus::Scanning,
                Stage::Parsing => JobStatus::Parsing,
                _ => JobStatus::Processing,
            };
            self.set_status(status, format!("{} zones of {}", self.done.len(), self.zones_total()));
        }
        if self.coalescer.offer(now, ()).is_some() {
            self.emit_progress();
        } else if !self.flush_scheduled {
            if let Some(wait) = self.coalescer.wait(now) {
                self.flush_scheduled = true;
                ctx.run_later(wait, |job, _| {
                    job.flush_scheduled = false;
                    if job.coalescer.take_due(Instant::now()).is_some() && job.cancelled_by.is_none() {
                        job.emit_progress();
                    }
                });
            }
        }
    }

    fn emit_progress(&mut self) {
        let value = self.progress.get();
        let operation = if value < 20.0 {
            "validating the file".to_string()
        } else {
            format!("zone {} of {}", self.done.len(), self.zones_total())
        };
        self.publish(Event::ProcessingProgress(self.progress_event(value, operation)));
        self.save();
    }

    fn progress_event(&self, value: f64, current_operation: String) -> ProcessingProgress {
        ProcessingProgress {
            job_id: self.spec.job_id,
            stage: stage_at(value),
            progress: value,
            zones_completed: self.done.len() as u64,
            zones_total: self.zones_total(),
            processed: self.totals.processed,
            total: self.total_rows(),
            errors: self.totals.invalid_count,
            current_operation,
            eta_seconds: if value >= 100.0 { Some(0.0) } else { self.eta_seconds },
            metadata: None,
        }
    }

    /// Sends zones to the job's zone actor until [`ZONES_IN_FLIGHT`] are in flight.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        let Some(v) = self.validated.clone() else {
            return;
        };
        while self.cancelled_by.is_none() && self.error.is_none() && self.in_flight < ZONES_IN_FLIGHT {
            while self.done.contains(&self.next_zone) {
                self.next_zone += 1;
            }
            let Some(start) = v.zones.get(self.next_zone as usize).copied() else {
                break;
            };
            let index = self.next_zone;
            self.next_zone += 1;
            self.in_flight += 1;
            let msg = ProcessZone {
                job_id: self.spec.job_id,
                tenant: self.spec.tenant.clone(),
                path: Arc::new(self.spec.path.clone()),
                columns: v.columns,
                index,
                start,
                stop: self.stop_zones.clone(),
            };
            let deps = &self.deps.zone;
            let zone = self.zone.get_or_insert_with(|| Zone::new(deps.clone()).start());
            ctx.spawn(zone.send(msg).into_actor(self).map(move |res, job, ctx| {
                job.in_flight -= 1;
                match res {
                    Ok(Ok(Some(report))) if job.error.is_none() => {
                        job.done.insert(index);
                        job.totals.add(&report);
                        let p = zone_progress(job.done.len() as u64, job.zones_total());
                        job.advance(p, ctx);
                    }
                    // A zone finishing after another failed changes nothing: the job stays failed.
                    Ok(Ok(Some(_))) => {}
                    // Skipped: the job was stopped before the zone began, and nothing of it was stored.
                    Ok(Ok(None)) => {}
                    Ok(Err(ZoneError::LeaseLost)) => ctx.notify(Abandon),
                    Ok(Err(e)) => job.fail(format!("zone {index} failed: {e}"), false, ctx),
                    Err(e) => job.fail(format!("zone {index} was lost: {e}"), true, ctx),
                }
                job.step(ctx);
            }));
        }
    }

    /// Decides what comes next after a zone finished or a cancel arrived: a cancelled or failed job
    /// ends once no zone is in flight; otherwise the window of zones in flight is refilled.
    fn step(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight == 0 {
            if let Some(by) = self.cancelled_by.clone() {
                return self.finish_cancelled(by, ctx);
            }
            if self.error.is_some() {
                return self.finish_failed(ctx);
            }
            if self.validated.is_some() && self.done.len() as u64 == self.zones_total() {
                return self.complete(ctx);
            }
        }
        self.dispatch(ctx);
    }

    fn complete(&mut self, ctx: &mut Context<Self>) {
        self.set_status(JobStatus::Finalizing, "aggregating results");
        self.finished_at = Some(now_rfc3339());
        self.coalescer.clear();
        let results = json!(self.totals.results());
        self.publish(Event::ProcessingProgress(self.progress_event(100.0, "completed".into())));
        self.publish(Event::ProcessingCompleted(ProcessingCompleted { job_id: self.spec.job_id, results }));
        self.set_status(JobStatus::Completed, format!("{} rows imported", self.totals.inserted));
        {
            let _g = self.span.enter();
            tracing::info!(rows = self.totals.processed, inserted = self.totals.inserted, "job completed");
        }
        ctx.stop();
    }

    /// Fails the job. Zones in flight that have begun finish first (zones not begun are skipped), so
    /// `processing_failed` and `failed` come after every zone event, as `job_cancelled` does.
    fn fail(&mut self, error: String, recoverable: bool, ctx: &mut Context<Self>) {
        if self.error.is_some() || self.status.is_terminal() {
            return;
        }
        {
            let _g = self.span.enter();
            tracing::warn!(%error, "job failed");
        }
        self.error = Some(JobError { message: error, recoverable });
        self.stop_zones.store(true, Ordering::Release);
        self.coalescer.clear();
        if self.in_flight == 0 {
            self.finish_failed(ctx);
        }
    }

    fn finish_failed(&mut self, ctx: &mut Context<Self>) {
        let Some(error) = self.error.clone() else {
            return;
        };
        let JobError { message, recoverable } = error;
        self.finished_at = Some(now_rfc3339());
        self.coalescer.clear();
        self.publish(Event::ProcessingFailed(ProcessingFailed {
            job_id: self.spec.job_id,
            error: message.clone(),
            details: json!({ "stage": stage_at(self.progress.get()), "zones_completed": self.done.len() }),
            recoverable,
        }));
        self.set_status(JobStatus::Failed, message);
        ctx.stop();
    }

    fn finish_cancelled(&mut self, by: String, ctx: &mut Context<Self>) {
        self.finished_at = Some(now_rfc3339());
        self.coalescer.clear();
        self.publish(Event::JobCancelled(JobCancelled { job_id: self.spec.job_id, by: by.clone() }));
        self.set_status(JobStatus::Cancelled, format!("cancelled by {by}"));
        ctx.stop();
    }
}

/// A CSV job's snapshot before any work: every field present, `null` where nothing is known yet.
fn csv_snapshot(spec: &JobSpec, status: JobStatus, created_at: String) -> JobSnapshot {
    JobSnapshot {
        user_id: Some(spec.user_id.clone()),
        kind: Some(CSV_IMPORT.into()),
        filename: Some(spec.filename.clone()),
        size_bytes: Some(spec.size_bytes),
        stage: Some(Stage::Validation),
        progress: Some(0.0),
        eta_seconds: Some(None),
        zones_total: Some(0),
        zones_completed: Some(0),
        processed: Some(0),
        total: Some(0),
        errors: Some(0),
        created_at: Some(created_at),
        started_at: Some(None),
        updated_at: Some(now_rfc3339()),
        finished_at: Some(None),
        results: Some(serde_json::Value::Null),
        error: Some(None),
        status,
        ..JobSnapshot::reservation(spec.job_id, &spec.tenant)
    }
}

/// A new CSV job as stored when its upload is accepted: what the job actor saves when it starts.
pub fn queued(spec: JobSpec) -> JobRecord {
    JobRecord { snapshot: csv_snapshot(&spec, JobStatus::Queued, now_rfc3339()), spec: Some(spec) }
}

impl Actor for Job {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if !self.resumed {
            self.publish(Event::Status(StatusData {
                job_id: Some(self.spec.job_id),
                status: JobStatus::Queued,
                message: "waiting for a slot".into(),
            }));
        }
        self.save();
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.finished.do_send(Finished { job_id: self.spec.job_id });
        // The upload is kept only while the job may still run (or resume after a restart).
        let recoverable = self.error.as_ref().is_some_and(|e| e.recoverable);
        if self.status.is_terminal() && !recoverable {
            let path = self.spec.path.clone();
            actix_rt::spawn(async move {
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    tracing::warn!(error = %e, path = %path.display(), "cannot remove a finished upload");
                }
            });
        }
    }
}

impl Handler<Queued> for Job {
    type Result = ();
    fn handle(&mut self, Queued(position): Queued, _: &mut Context<Self>) {
        self.publish(Event::Status(StatusData {
            job_id: Some(self.spec.job_id),
            status: JobStatus::Queued,
            message: format!("position {position} in the queue"),
        }));
    }
}

impl Handler<Begin> for Job {
    type Result = ();
    fn handle(&mut self, _: Begin, ctx: &mut Context<Self>) {
        if self.cancelled_by.is_some() {
            return;
        }
        self.started_at.get_or_insert_with(now_rfc3339);
        if self.resumed && self.spec.resumes > MAX_RESUMES {
            let n = self.spec.resumes;
            return self.fail(
                format!("the server stopped {n} times while this job ran; it is not resumed again"),
                false,
                ctx,
            );
        }
        self.set_status(
            JobStatus::Validating,
            if self.resumed { "resuming after a restart" } else { "checking the file" },
        );
        if !self.spec.path.is_file() {
            // The upload is gone (e.g. the data dir was moved): uploading it again would work.
            return self.fail(format!("the uploaded file {} is missing", self.spec.filename), true, ctx);
        }
        let path = self.spec.path.clone();
        let (max, zone_rows) = (self.deps.max_upload_bytes, self.deps.zone_rows);
        let me = ctx.address();
        let work = tokio::task::spawn_blocking(move || {
            let mut last = Instant::now();
            validate(&path, max, zone_rows, |done, total| {
                if last.elapsed() >= Duration::from_millis(100) {
                    last = Instant::now();
                    me.do_send(ValidationProgress(done, total));
                }
            })
        });
        let reports = self.deps.zone.rows.zone_reports(self.spec.job_id.to_string());
        let both = async move { (work.await, reports.await) };
        // `spawn`, not `wait`: validation progress and a cancel are handled while it runs.
        ctx.spawn(both.into_actor(self).map(|(validated, reports), job, ctx| {
            if job.cancelled_by.is_some() {
                return;
            }
            let validated = match validated {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return job.fail(e, false, ctx),
                Err(e) => return job.fail(format!("validation stopped: {e}"), true, ctx),
            };
            // Zones stored before a restart count as done.
            if let Ok(Ok(reports)) = reports {
                for (index, report) in reports {
                    if job.done.insert(index) {
                        job.totals.add(&report);
                    }
                }
            }
            job.validated = Some(Arc::new(validated));
            if !job.resumed || job.done.is_empty() {
                job.publish(Event::ProcessingStarted(ProcessingStarted {
                    job_id: job.spec.job_id,
                    kind: CSV_IMPORT.into(),
                    filename: job.spec.filename.clone(),
                    size_bytes: job.spec.size_bytes,
                    zones_total: job.zones_total(),
                }));
            }
            let p = zone_progress(job.done.len() as u64, job.zones_total());
            job.advance(p.min(99.9), ctx);
            job.step(ctx);
        }));
    }
}

impl Handler<ValidationProgress> for Job {
    type Result = ();
    fn handle(&mut self, ValidationProgress(done, total): ValidationProgress, ctx: &mut Context<Self>) {
        if self.validated.is_none() && self.error.is_none() {
            self.advance(validation_progress(done, total).min(19.9), ctx);
        }
    }
}

/// Stop at once, publishing and saving nothing: another node took this job over (this one could
/// not renew its lease in time). Zones not begun are skipped; one being stored either lands before
/// the other node's copy of that zone or is refused by it (a zone is stored once).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abandon;

impl Handler<Abandon> for Job {
    type Result = ();
    fn handle(&mut self, _: Abandon, ctx: &mut Context<Self>) {
        // A job that ended has said everything already; it stops by itself.
        if self.status.is_terminal() || self.abandoned {
            return;
        }
        self.abandoned = true;
        {
            let _g = self.span.enter();
            tracing::warn!("stopping here: another node runs this job now, or takes it over");
        }
        self.stop_zones.store(true, Ordering::Release);
        self.coalescer.clear();
        // The database keeps the upload for whichever node runs the job.
        let path = self.spec.path.clone();
        actix_rt::spawn(async move {
            let _ = tokio::fs::remove_file(&path).await;
        });
        ctx.stop();
    }
}

impl Handler<Cancel> for Job {
    type Result = bool;
    fn handle(&mut self, msg: Cancel, ctx: &mut Context<Self>) -> bool {
        if self.cancelled_by.is_some()
            || self.error.is_some()
            || matches!(self.status, JobStatus::Finalizing | JobStatus::Completed)
        {
            return false;
        }
        {
            let _g = self.span.enter();
            tracing::info!(by = %msg.by, "cancel requested");
        }
        self.cancelled_by = Some(msg.by);
        self.stop_zones.store(true, Ordering::Release);
        self.step(ctx);
        true
    }
}
