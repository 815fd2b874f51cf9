//! The `External` actor: one job that runs elsewhere (contract §7), reported by its worker over HTTP
//! with a job token. It turns reports into the same room events jobcast's own jobs publish: stage-
//! weighted progress that never goes down, an ETA, coalescing to `progress_max_rate_per_s`, step
//! events, and terminal events that are never coalesced away. It also carries a cancel to the worker
//! (`cancel_requested`, then `cancelled` when the worker ends the job or after the grace period) and
//! watches for a silent worker (`job_stalled`, then failed `recoverable: true`).

use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::db::store::{JobRecord, SaveJob};
use crate::db::StoreAddr;
use crate::jobs::progress::{Coalescer, Eta, Monotonic};
use crate::jobs::webhooks::{webhook_event, JobEvent};
use crate::protocol::{
    now_rfc3339, CancelRequested, Event, JobCancelled, JobError, JobSnapshot, JobStalled, JobStatus,
    ProcessingCompleted, ProcessingFailed, ProcessingProgress, RoomKind, Stage, StageSpec, StatusData, ZoneCompleted,
    ZoneProcessing,
};
use crate::realtime::broker::{Broker, Publish, PublishError};

/// The most bytes an external job's merged `metadata` may take as JSON.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// What every external job needs.
#[derive(Clone)]
pub struct ExternalDeps {
    /// Where its events go.
    pub broker: Addr<Broker>,
    /// Where its snapshot is kept.
    pub store: StoreAddr,
    /// `progress_max_rate_per_s`.
    pub progress_rate: u32,
    /// `job_stall_timeout_s`.
    pub stall: Duration,
    /// `job_cancel_grace_s`.
    pub cancel_grace: Duration,
    /// Told when the job ends or stalls (its tenant's webhooks).
    pub webhooks: Recipient<JobEvent>,
}

/// The external job actor stopped (the job ended, or the actor was discarded); its scheduler
/// forgets it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ExternalEnded {
    /// The job.
    pub job_id: Uuid,
    /// The actor that stopped.
    pub actor: Addr<External>,
    /// The job ended (a late report must not start it again).
    pub finished: bool,
}

/// A step of a worker's job (`zone_processing` / `zone_completed` in the room).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// The worker's name for it.
    pub id: String,
    /// Its position.
    pub index: u64,
    /// `processing`, `completed` or `failed`.
    pub status: StepStatus,
    /// How long it took, when the worker says.
    pub duration_ms: Option<u64>,
}

/// Where a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    /// Begun.
    Processing,
    /// Done.
    Completed,
    /// Done, with an error.
    Failed,
}

/// A worker's report, checked by the HTTP layer.
#[derive(Message, Debug, Clone, Default, Serialize, Deserialize)]
#[rtype(result = "Result<Reported, ExternalError>")]
pub struct Report {
    /// The stage it is in (one of the job's `stages` when it has some).
    pub stage: Option<String>,
    /// The stage's (or, without stages, the job's) own fraction done, 0 to 1.
    pub fraction: Option<f64>,
    /// Units done, with `total` (this report's or the job's).
    pub done: Option<u64>,
    /// Units in all.
    pub total: Option<u64>,
    /// What the worker is doing, for people.
    pub message: Option<String>,
    /// Merged into the snapshot's `metadata`.
    pub metadata: Option<Map<String, Value>>,
    /// A step event.
    pub step: Option<Step>,
}

/// The answer to a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    /// The `seq` of the `processing_progress` the report produced, `None` when it was coalesced.
    pub seq: Option<u64>,
    /// Someone asked to cancel the job: the worker should stop and call `/fail` or `/complete`.
    pub cancel_requested: bool,
}

/// The worker ends the job.
#[derive(Message, Debug, Clone, Serialize, Deserialize)]
#[rtype(result = "Result<Ending, ExternalError>")]
pub enum End {
    /// `/complete` {results}.
    Complete(Value),
    /// `/fail` {error, recoverable}.
    Fail {
        /// What went wrong.
        error: String,
        /// Whether trying again may succeed.
        recoverable: bool,
    },
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ended {
    /// The `seq` of its terminal event.
    pub seq: u64,
    /// `completed`, `failed`, or `cancelled` (it had been asked to stop).
    pub status: JobStatus,
}

/// An [`End`] taken: its terminal event is published; `stored` resolves once the job's first try
/// to store its end is over (so that a read after the answer sees it).
pub struct Ending {
    /// The answer for the worker.
    pub ended: Ended,
    /// The first try to store the end is over.
    pub stored: oneshot::Receiver<()>,
}

/// Stop at once, publishing and saving nothing: a job whose creation could not be stored, or one
/// whose lease another node holds now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Discard;

impl Handler<Discard> for External {
    type Result = ();
    fn handle(&mut self, _: Discard, ctx: &mut Context<Self>) {
        self.ending = true;
        ctx.stop();
    }
}

/// Ask the worker to stop (a cancel by `by`); answers whether the job was still running.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RequestCancel {
    /// Who asked.
    pub by: String,
}

/// Why a report or an end was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExternalError {
    /// The job ended (its token with it).
    Ended,
    /// The report does not fit the job (an unknown stage, metadata too large).
    Invalid(String),
    /// The event could not be published (Redis away): try again.
    Unavailable(String),
}

/// What a worker's call asks of its job's actor, wherever that actor is: on this node, or on the
/// node holding the job's lease (forwarded as JSON through the cluster's control channel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WorkerOp {
    /// `/report`.
    Report(Report),
    /// `/complete` or `/fail`.
    End(End),
    /// A cancel (`by` asked).
    Cancel(String),
}

/// A [`WorkerOp`] for one job, as one node forwards it to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerCall {
    /// The job.
    pub job_id: Uuid,
    /// What to do.
    pub op: WorkerOp,
}

/// What a [`WorkerOp`] got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CallAnswer {
    /// The node asked has no actor for the job (it is starting one, or gave it up).
    NotHere,
    /// A report's answer.
    Reported(Result<Reported, ExternalError>),
    /// An end's answer.
    Ended(Result<Ended, ExternalError>),
    /// Whether a cancel found the job running.
    Cancel(bool),
}

impl WorkerOp {
    /// Runs on the job's actor here.
    pub async fn run(self, job: &Addr<External>) -> CallAnswer {
        let gone = |_| ExternalError::Ended;
        match self {
            WorkerOp::Report(r) => CallAnswer::Reported(job.send(r).await.map_err(gone).and_then(|a| a)),
            WorkerOp::End(e) => match job.send(e).await.map_err(gone).and_then(|a| a) {
                Ok(ending) => {
                    let _ = ending.stored.await;
                    CallAnswer::Ended(Ok(ending.ended))
                }
                Err(e) => CallAnswer::Ended(Err(e)),
            },
            WorkerOp::Cancel(by) => CallAnswer::Cancel(job.send(RequestCancel { by }).await.unwrap_or(false)),
        }
    }

    /// The answer when the job ended (here, a moment ago).
    pub fn ended(&self) -> CallAnswer {
        match self {
            WorkerOp::Report(_) => CallAnswer::Reported(Err(ExternalError::Ended)),
            WorkerOp::End(_) => CallAnswer::Ended(Err(ExternalError::Ended)),
            WorkerOp::Cancel(_) => CallAnswer::Cancel(false),
        }
    }
}

/// One external job.
pub struct External {
    deps: ExternalDeps,
    snapshot: JobSnapshot,
    room: String,
    /// The job's stages, weights summing to 1.
    stages: Vec<(String, f64)>,
    /// Where the job is: the stage index, and the weight of the stages before it.
    stage: Option<usize>,
    progress: Monotonic,
    eta: Eta,
    coalescer: Coalescer<()>,
    flush_scheduled: bool,
    /// The last progress event's data, to publish once the coalescer lets it go.
    pending: Option<ProcessingProgress>,
    steps_completed: u64,
    steps_failed: u64,
    /// A terminal event is on its way.
    ending: bool,
    cancel_by: Option<String>,
    last_report: (Instant, String),
    stall_timer: Option<SpawnHandle>,
    stalled: bool,
    ended: Recipient<ExternalEnded>,
}

impl External {
    /// The actor for `snapshot` (new, or as stored before a restart).
    pub fn new(deps: ExternalDeps, snapshot: JobSnapshot, ended: Recipient<ExternalEnded>) -> External {
        let stages = normalised(snapshot.stages.as_deref().unwrap_or_default());
        let mut progress = Monotonic::default();
        progress.raise(snapshot.progress.unwrap_or(0.0));
        let now = Instant::now();
        // With stages, the job is in the first until a report names another.
        let stage = snapshot
            .stage
            .as_ref()
            .and_then(|s| stages.iter().position(|(n, _)| n == s.as_str()))
            .or(if stages.is_empty() { None } else { Some(0) });
        let reported = snapshot.reported_at.clone().or_else(|| snapshot.created_at.clone()).unwrap_or_else(now_rfc3339);
        External {
            room: RoomKind::Job(snapshot.job_id).name(),
            stage,
            stages,
            progress,
            eta: Eta::new(now),
            coalescer: Coalescer::new(deps.progress_rate),
            flush_scheduled: false,
            pending: None,
            steps_completed: snapshot.zones_completed.unwrap_or(0),
            steps_failed: snapshot.errors.unwrap_or(0),
            ending: false,
            // A cancel asked before a restart still holds (its grace period starts again).
            cancel_by: snapshot.cancel_requested_by.clone().filter(|_| snapshot.cancel_requested == Some(true)),
            last_report: (now, reported),
            stall_timer: None,
            stalled: snapshot.stalled == Some(true),
            snapshot,
            deps,
            ended,
        }
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

    /// The job is `cancelled` after the grace period unless its worker ended it first.
    fn arm_cancel_grace(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(self.deps.cancel_grace, |job, ctx| {
            if !job.ending {
                job.cancelled(ctx);
            }
        });
    }

    /// (Re)arms the stall timer: `job_stalled` after `stall` without a report, failed after twice that.
    fn arm_stall_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.stall_timer.take() {
            ctx.cancel_future(h);
        }
        self.stall_timer = Some(ctx.run_later(self.deps.stall, |job, ctx| {
            job.stall_timer = None;
            if job.ending || job.snapshot.status.is_terminal() {
                return;
            }
            if !job.stalled {
                job.stalled = true;
                job.snapshot.stalled = Some(true);
                job.publish(Event::JobStalled(JobStalled { job_id: job.job_id(), since: job.last_report.1.clone() }));
                job.save();
                job.deps.webhooks.do_send(JobEvent { event: "job.stalled", snapshot: job.snapshot.clone() });
                job.arm_stall_timer(ctx);
            } else if job.cancel_by.is_some() {
                // Asked to stop and silent since: it stopped.
                job.cancelled(ctx);
            } else {
                let secs = 2 * job.deps.stall.as_secs();
                job.finish_failed(format!("the worker sent no report for {secs} s"), true, ctx);
            }
        }));
    }

    /// The job's overall progress (0–100) for `fraction` of the current stage.
    fn overall(&self, fraction: f64) -> f64 {
        let fraction = fraction.clamp(0.0, 1.0);
        match self.stage {
            Some(i) => {
                let before: f64 = self.stages[..i].iter().map(|(_, w)| w).sum();
                (before + self.stages[i].1 * fraction) * 100.0
            }
            None => fraction * 100.0,
        }
    }

    fn progress_event(&self, message: Option<String>) -> ProcessingProgress {
        let value = self.progress.get();
        let now = Instant::now();
        ProcessingProgress {
            job_id: self.job_id(),
            stage: self.snapshot.stage.clone().unwrap_or(Stage::Other("running".into())),
            progress: value,
            zones_completed: self.steps_completed,
            zones_total: self.snapshot.zones_total.unwrap_or(0),
            processed: self.snapshot.processed.unwrap_or(0),
            total: self.snapshot.total.unwrap_or(0),
            errors: self.steps_failed,
            current_operation: message
                .or_else(|| self.snapshot.stage.as_ref().map(|s| s.to_string()))
                .unwrap_or_else(|| "running".into()),
            eta_seconds: self.eta.seconds_left(now, value),
            metadata: self.snapshot.metadata.clone(),
        }
    }

    /// Publishes the waiting progress event once the coalescer lets it go.
    fn schedule_flush(&mut self, ctx: &mut Context<Self>) {
        if self.flush_scheduled {
            return;
        }
        let Some(wait) = self.coalescer.wait(Instant::now()) else { return };
        self.flush_scheduled = true;
        ctx.run_later(wait, |job, _| {
            job.flush_scheduled = false;
            if job.coalescer.take_due(Instant::now()).is_some() && !job.ending {
                if let Some(p) = job.pending.take() {
                    job.publish(Event::ProcessingProgress(p));
                    job.save();
                }
            }
        });
    }

    fn set_status(&mut self, status: JobStatus, message: &str) {
        if self.snapshot.status == status {
            return;
        }
        self.snapshot.status = status.clone();
        self.publish(Event::Status(StatusData { job_id: Some(self.job_id()), status, message: message.into() }));
    }

    /// Ends the job failed (a stall, or the worker's `/fail`), publishing and saving.
    fn finish_failed(&mut self, error: String, recoverable: bool, ctx: &mut Context<Self>) {
        self.coalescer.clear();
        self.pending = None;
        self.publish(Event::ProcessingFailed(ProcessingFailed {
            job_id: self.job_id(),
            error: error.clone(),
            details: Value::Null,
            recoverable,
        }));
        self.snapshot.error = Some(Some(JobError { message: error, recoverable }));
        drop(self.terminal(JobStatus::Failed, "failed", ctx));
    }

    /// Ends the job: its status published, its snapshot stored (the answer resolves once the first
    /// try to store it is over), its webhooks told, and the actor stopped.
    fn terminal(&mut self, status: JobStatus, message: &str, ctx: &mut Context<Self>) -> oneshot::Receiver<()> {
        self.ending = true;
        self.snapshot.eta_seconds = Some(None);
        self.snapshot.finished_at = Some(Some(now_rfc3339()));
        self.snapshot.cancel_requested = self.cancel_by.as_ref().map(|_| true);
        self.set_status(status.clone(), message);
        // The last save must land: with the store away it is tried again (once a second, for up
        // to ten minutes) after the actor is gone.
        self.snapshot.updated_at = Some(now_rfc3339());
        let (store, record) = (self.deps.store.clone(), JobRecord { snapshot: self.snapshot.clone(), spec: None });
        let job = self.job_id();
        // The first try is queued now, before anything sent after it (a lookup, the webhook).
        let first = store.send(SaveJob(record.clone()));
        let (tried, stored) = oneshot::channel();
        actix_rt::spawn(async move {
            let saved = matches!(first.await, Ok(Ok(())));
            let _ = tried.send(());
            if saved {
                return;
            }
            for _ in 0..600 {
                actix_rt::time::sleep(Duration::from_secs(1)).await;
                if matches!(store.send(SaveJob(record.clone())).await, Ok(Ok(()))) {
                    return;
                }
            }
            tracing::error!(%job, "the end of a job that runs elsewhere was not stored");
        });
        if let Some(event) = webhook_event(&status) {
            self.deps.webhooks.do_send(JobEvent { event, snapshot: self.snapshot.clone() });
        }
        ctx.stop();
        stored
    }

    fn cancelled(&mut self, ctx: &mut Context<Self>) {
        let by = self.cancel_by.clone().unwrap_or_default();
        self.coalescer.clear();
        self.pending = None;
        self.publish(Event::JobCancelled(JobCancelled { job_id: self.job_id(), by }));
        drop(self.terminal(JobStatus::Cancelled, "cancelled", ctx));
    }
}

/// Weights scaled to sum to 1 (equal shares when they sum to nothing).
fn normalised(stages: &[StageSpec]) -> Vec<(String, f64)> {
    let sum: f64 = stages.iter().map(|s| s.weight).filter(|w| w.is_finite() && *w > 0.0).sum();
    stages
        .iter()
        .map(|s| {
            let w = if sum > 0.0 { s.weight.max(0.0) / sum } else { 1.0 / stages.len() as f64 };
            (s.name.clone(), w)
        })
        .collect()
}

impl Actor for External {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let span = tracing::info_span!("job", job = %self.job_id(), tenant = %self.snapshot.tenant);
        let _g = span.enter();
        tracing::info!(status = self.snapshot.status.as_str(), "external job live");
        self.arm_stall_timer(ctx);
        if self.cancel_by.is_some() {
            self.arm_cancel_grace(ctx);
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        let finished = self.snapshot.status.is_terminal();
        self.ended.do_send(ExternalEnded { job_id: self.job_id(), actor: ctx.address(), finished });
    }
}

impl Handler<Report> for External {
    type Result = ResponseActFuture<Self, Result<Reported, ExternalError>>;

    fn handle(&mut self, r: Report, ctx: &mut Context<Self>) -> Self::Result {
        let refused = |e| Box::pin(fut::ready(Err(e))) as Self::Result;
        if self.ending {
            return refused(ExternalError::Ended);
        }
        // Checked first: a refused report changes nothing.
        let at = r.stage.as_ref().map(|name| self.stages.iter().position(|(n, _)| n == name));
        if let (Some(None), Some(name)) = (at, &r.stage) {
            if !self.stages.is_empty() {
                let known: Vec<&str> = self.stages.iter().map(|(n, _)| n.as_str()).collect();
                return refused(ExternalError::Invalid(format!(
                    "unknown stage {name:?}: the job's stages are {known:?}"
                )));
            }
        }
        let merged = match r.metadata {
            Some(meta) => {
                let mut merged = match &self.snapshot.metadata {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                merged.extend(meta);
                let merged = Value::Object(merged);
                let size = serde_json::to_vec(&merged).map(|v| v.len()).unwrap_or(usize::MAX);
                if size > MAX_METADATA_BYTES {
                    return refused(ExternalError::Invalid(format!(
                        "metadata would take {size} bytes; at most {MAX_METADATA_BYTES}"
                    )));
                }
                Some(merged)
            }
            None => None,
        };
        let mut changed = merged.is_some();
        if merged.is_some() {
            self.snapshot.metadata = merged;
        }
        // Stages go forward only: a report of an earlier one changes nothing of the bar. A later
        // one starts where the stages before it end.
        let mut behind = false;
        match (at.flatten(), &r.stage) {
            (Some(i), _) if self.stage.is_some_and(|cur| i < cur) => behind = true,
            (Some(i), Some(name)) => {
                changed |= self.stage != Some(i);
                self.stage = Some(i);
                self.snapshot.stage = Some(Stage::parse(name));
                let start = self.overall(0.0);
                self.progress.raise(start);
            }
            (None, Some(name)) => {
                changed |= self.snapshot.stage.as_ref().map(|s| s.as_str()) != Some(name.as_str());
                self.snapshot.stage = Some(Stage::parse(name));
            }
            _ => {}
        }
        // The report counts: the worker is alive.
        self.last_report = (Instant::now(), now_rfc3339());
        self.snapshot.reported_at = Some(self.last_report.1.clone());
        changed |= self.stalled;
        self.stalled = false;
        self.snapshot.stalled = None;
        self.arm_stall_timer(ctx);
        if matches!(self.snapshot.status, JobStatus::Queued) {
            changed = true;
            self.set_status(JobStatus::Processing, "the worker reported");
            self.snapshot.started_at = Some(Some(now_rfc3339()));
        }
        if let Some(total) = r.total {
            self.snapshot.total = Some(total);
        }
        if let Some(done) = r.done {
            self.snapshot.processed = Some(done);
        }
        if let Some(step) = &r.step {
            let zone_id = step.id.clone();
            match step.status {
                StepStatus::Processing => self.publish(Event::ZoneProcessing(ZoneProcessing {
                    job_id: self.job_id(),
                    zone_id,
                    zone_index: step.index,
                    processing_tool: "worker".into(),
                })),
                StepStatus::Completed | StepStatus::Failed => {
                    let failed = step.status == StepStatus::Failed;
                    self.steps_completed += u64::from(!failed);
                    self.steps_failed += u64::from(failed);
                    self.publish(Event::ZoneCompleted(ZoneCompleted {
                        job_id: self.job_id(),
                        zone_id,
                        zone_index: step.index,
                        rows: 0,
                        errors: u64::from(failed),
                        duration_ms: step.duration_ms.unwrap_or(0),
                    }));
                }
            }
            self.snapshot.zones_completed = Some(self.steps_completed);
            self.snapshot.errors = Some(self.steps_failed);
        }
        let fraction = r.fraction.filter(|_| !behind).or_else(|| {
            if behind {
                return None;
            }
            let (done, total) = (r.done?, r.total.or(self.snapshot.total)?);
            (total > 0).then(|| done as f64 / total as f64)
        });
        let now = Instant::now();
        if let Some(f) = fraction {
            let value = self.progress.raise(self.overall(f));
            self.eta.update(now, value);
        }
        let value = self.progress.get();
        self.snapshot.progress = Some(value);
        self.snapshot.eta_seconds = Some(self.eta.seconds_left(now, value));
        let cancel_requested = self.cancel_by.is_some();
        let event = self.progress_event(r.message);
        if self.coalescer.offer(now, ()).is_none() {
            // Saved with the event that carries it, unless something beyond progress changed.
            if changed || r.step.is_some() {
                self.save();
            }
            self.pending = Some(event);
            self.schedule_flush(ctx);
            return Box::pin(fut::ready(Ok(Reported { seq: None, cancel_requested })));
        }
        self.save();
        self.pending = None;
        let published = self.deps.broker.send(Publish::api(self.room.clone(), Event::ProcessingProgress(event)));
        Box::pin(published.into_actor(self).map(move |answer, _, _| match answer {
            Ok(Ok(p)) => Ok(Reported { seq: Some(p.seq), cancel_requested }),
            Ok(Err(e)) => Err(ExternalError::Unavailable(publish_error(&e))),
            Err(e) => Err(ExternalError::Unavailable(e.to_string())),
        }))
    }
}

fn publish_error(e: &PublishError) -> String {
    e.to_string()
}

impl Handler<End> for External {
    // Atomic: no other message or timer runs while the terminal event is being published, so a
    // refused publish (503) leaves the job exactly as it was.
    type Result = AtomicResponse<Self, Result<Ending, ExternalError>>;

    fn handle(&mut self, end: End, _: &mut Context<Self>) -> Self::Result {
        if self.ending {
            return AtomicResponse::new(Box::pin(fut::ready(Err(ExternalError::Ended))));
        }
        self.ending = true;
        let job_id = self.job_id();
        // A job asked to stop ends cancelled whatever the worker says.
        let (event, status) = match (&self.cancel_by, &end) {
            (Some(by), _) => (Event::JobCancelled(JobCancelled { job_id, by: by.clone() }), JobStatus::Cancelled),
            (None, End::Complete(results)) => (
                Event::ProcessingCompleted(ProcessingCompleted { job_id, results: results.clone() }),
                JobStatus::Completed,
            ),
            (None, End::Fail { error, recoverable }) => (
                Event::ProcessingFailed(ProcessingFailed {
                    job_id,
                    error: error.clone(),
                    details: Value::Null,
                    recoverable: *recoverable,
                }),
                JobStatus::Failed,
            ),
        };
        let published = self.deps.broker.send(Publish::api(self.room.clone(), event));
        AtomicResponse::new(Box::pin(published.into_actor(self).map(move |answer, job, ctx| {
            let seq = match answer {
                Ok(Ok(p)) => p.seq,
                Ok(Err(e)) => {
                    job.ending = false;
                    return Err(ExternalError::Unavailable(publish_error(&e)));
                }
                Err(e) => {
                    job.ending = false;
                    return Err(ExternalError::Unavailable(e.to_string()));
                }
            };
            match (&status, end) {
                (JobStatus::Completed, End::Complete(results)) => {
                    job.progress.raise(100.0);
                    job.snapshot.progress = Some(100.0);
                    job.snapshot.results = Some(results);
                }
                (JobStatus::Failed, End::Fail { error, recoverable }) => {
                    job.snapshot.error = Some(Some(JobError { message: error, recoverable }));
                }
                _ => {}
            }
            job.coalescer.clear();
            job.pending = None;
            let stored = job.terminal(status.clone(), status.as_str(), ctx);
            Ok(Ending { ended: Ended { seq, status }, stored })
        })))
    }
}

impl Handler<RequestCancel> for External {
    type Result = ResponseFuture<bool>;

    /// Answers once the request is stored, so a cancel that was answered outlives a crash.
    fn handle(&mut self, m: RequestCancel, ctx: &mut Context<Self>) -> Self::Result {
        if self.ending {
            return Box::pin(async { false });
        }
        if self.cancel_by.is_some() {
            return Box::pin(async { true });
        }
        self.cancel_by = Some(m.by.clone());
        self.snapshot.cancel_requested = Some(true);
        self.snapshot.cancel_requested_by = Some(m.by.clone());
        self.publish(Event::CancelRequested(CancelRequested { job_id: self.job_id(), by: m.by }));
        self.snapshot.updated_at = Some(now_rfc3339());
        let saved = self.deps.store.send(SaveJob(JobRecord { snapshot: self.snapshot.clone(), spec: None }));
        self.arm_cancel_grace(ctx);
        let job = self.job_id();
        Box::pin(async move {
            if !matches!(saved.await, Ok(Ok(()))) {
                tracing::warn!(%job, "a cancel request was not stored; it holds until the server stops");
            }
            true
        })
    }
}
