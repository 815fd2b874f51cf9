//! The scheduler actor: starts job actors, runs at most `max_concurrent_jobs` at once (the others
//! wait as `queued` with their position), keeps the actors of jobs that run elsewhere, and finds
//! running jobs for cancellation.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::db::pg_store::{ClaimExpired, Claimed, PgStore, ReleaseLeases, RenewLeases, RestoreUpload};
use crate::db::sqlite::now_ms;
use crate::db::store::{DeleteReservations, JobRecord, JobSpec, StaleReservations};
use crate::jobs::export::{AbandonExport, CancelExport, Export, ExportDeps, ExportEnded, EXPORT};
use crate::jobs::external::{CallAnswer, Discard, External, ExternalDeps, ExternalEnded, RequestCancel, WorkerCall};
use crate::jobs::job::{Abandon, Begin, Cancel, Finished, Job, JobDeps, Queued};
use crate::protocol::{Event, JobSnapshot, JobStatus, RoomKind, StatusData};
use crate::quota::{Admission, Quotas};
use crate::realtime::broker::{Occupied, Publish};
use crate::realtime::redis::{Forwarded, RedisEngine, RemoteCancel};

/// What the scheduler needs to hold leases on its jobs and take over other nodes' (cluster mode
/// with `database_url`).
pub struct Leases {
    /// The shared store.
    pub store: Addr<PgStore>,
    /// How often leases are renewed and expired ones looked for (`job_lease_s` / 3).
    pub every: Duration,
    /// Where a taken-over job's upload is written when this node does not have the file.
    pub uploads: PathBuf,
    /// The quotas a taken-over job counts against.
    pub quotas: Arc<Quotas>,
    /// The cluster's Redis (quotas across nodes).
    pub redis: RedisEngine,
}

/// A resumed job's share of its tenant's quotas: on this node, and across the cluster when there is
/// one (counted again under this node's id: the counts of a node that stopped lapse with it).
pub fn resumed_admission(quotas: &Arc<Quotas>, redis: Option<&RedisEngine>, spec: &JobSpec) -> Admission {
    let mut admission = quotas.resumed(&spec.tenant, spec.size_bytes);
    if let Some(redis) = redis {
        let upload = spec.job_id.simple().to_string();
        redis.release_with(&mut admission, &spec.tenant, &upload);
        let (r, tenant, bytes) = (redis.clone(), spec.tenant.clone(), spec.size_bytes);
        actix_rt::spawn(async move {
            if let Err(e) = r.claim_quota(&tenant, &upload, 0, 0, bytes).await {
                tracing::warn!(error = %e, "a resumed job is not counted across the cluster");
            }
        });
    }
    admission
}

/// How often, at most, a node looks for jobs to take over.
const CLAIM_EVERY: Duration = Duration::from_secs(2);

/// Give up the leases of every job here (a graceful stop): other nodes take them over at once.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseAll;

/// Start a new job (or resume one from its stored snapshot).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Submit {
    /// What to run.
    pub spec: JobSpec,
    /// The stored snapshot of a job interrupted by a restart.
    pub resume: Option<JobSnapshot>,
    /// The job's share of its tenant's quotas, held by the job actor until it ends.
    pub admission: Admission,
}

/// Cancel a job that is queued or running.
#[derive(Message)]
#[rtype(result = "CancelOutcome")]
pub struct CancelJob {
    /// The job.
    pub job_id: Uuid,
    /// Who asked.
    pub by: String,
}

/// What a [`CancelJob`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job will stop and emit `job_cancelled`.
    Cancelling,
    /// The job is not running (it ended, or never existed here).
    NotRunning,
}

/// Start the actor of a job that runs elsewhere: a new one (`fresh`), or one stored before a restart
/// (or on another node) whose worker reports here. Answers the live actor (the one already here,
/// when there is one), or why not.
#[derive(Message)]
#[rtype(result = "Result<Addr<External>, StartRefused>")]
pub struct StartExternal {
    /// The job as created or stored.
    pub snapshot: JobSnapshot,
    /// Created just now (its `queued` status is published).
    pub fresh: bool,
}

/// Why an external job's actor was not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartRefused {
    /// The job ended a moment ago on this node (its snapshot may not say so yet).
    Ended,
    /// Its tenant has as many live such jobs as it may.
    Quota(String),
    /// This node is stopping (its jobs go to other nodes).
    Stopping,
}

/// Ended external jobs remembered, so that a late report cannot start one again.
const ENDED_KEPT: usize = 10_000;

/// The live actors of the jobs that run elsewhere, by job, with their tenants: written by the
/// scheduler, read by anyone holding a clone (a worker's report finds its job's actor without a
/// message to the scheduler, which runs on another thread than the HTTP workers).
#[derive(Clone, Default)]
pub struct LiveExternals(Arc<RwLock<ExternalMap>>);

/// Each live external job's actor and tenant.
type ExternalMap = HashMap<Uuid, (Addr<External>, String)>;

impl LiveExternals {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, ExternalMap> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ExternalMap> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The live actor of the job, if it is on this node.
    pub fn get(&self, id: &Uuid) -> Option<Addr<External>> {
        self.read().get(id).map(|(a, _)| a.clone())
    }

    fn of_tenant(&self, tenant: &str) -> usize {
        self.read().values().filter(|(_, t)| t == tenant).count()
    }

    fn ids(&self) -> Vec<Uuid> {
        self.read().keys().copied().collect()
    }
}

/// Start the actor of an export job: a new one, or one stored before a restart (or taken over),
/// which runs again from the start.
#[derive(Message)]
#[rtype(result = "Result<(), StartRefused>")]
pub struct StartExport {
    /// The job as created or stored (its `metadata` holds the export's spec).
    pub snapshot: JobSnapshot,
}

/// How many jobs are queued and running.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct Load;

/// The scheduler actor.
pub struct Scheduler {
    deps: JobDeps,
    max_running: usize,
    /// Every live job actor.
    jobs: HashMap<Uuid, Addr<Job>>,
    running: usize,
    queue: VecDeque<Uuid>,
    leases: Option<Leases>,
    /// A renewal is under way.
    renewing: bool,
    /// A takeover round is under way.
    claiming: bool,
    /// Jobs claimed whose upload is being restored (renewed with the live ones).
    taking: HashSet<Uuid>,
    /// A graceful stop began: nothing more is taken over or renewed.
    releasing: bool,
    /// Jobs that run elsewhere, live here, with their tenants.
    external: LiveExternals,
    /// External jobs that ended here lately (at most [`ENDED_KEPT`], oldest first).
    ended: (VecDeque<Uuid>, HashSet<Uuid>),
    /// Export jobs running here, with their tenants.
    exports: HashMap<Uuid, (Addr<Export>, String)>,
    /// What export jobs need (set once the server has built it).
    export_deps: Option<ExportDeps>,
}

impl Scheduler {
    /// A scheduler running at most `max_running` jobs at once.
    pub fn new(deps: JobDeps, max_running: usize) -> Self {
        Scheduler {
            deps,
            max_running: max_running.max(1),
            jobs: HashMap::new(),
            running: 0,
            queue: VecDeque::new(),
            leases: None,
            renewing: false,
            claiming: false,
            taking: HashSet::new(),
            releasing: false,
            external: LiveExternals::default(),
            ended: Default::default(),
            exports: HashMap::new(),
            export_deps: None,
        }
    }

    /// Runs export jobs with `deps`.
    pub fn with_exports(mut self, deps: ExportDeps) -> Self {
        self.export_deps = Some(deps);
        self
    }

    /// The live actors of its jobs that run elsewhere.
    pub fn externals(&self) -> LiveExternals {
        self.external.clone()
    }

    /// Holds leases on its jobs and takes over expired ones.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Renews the leases of the jobs here: a job another node took over stops here, and a cancel
    /// recorded for a job here (one the control channel did not bring) is applied.
    fn renew_leases(&mut self, ctx: &mut Context<Self>) {
        let Some(leases) = &self.leases else { return };
        if self.renewing || self.releasing {
            return;
        }
        let ids = self.leased();
        if ids.is_empty() {
            return;
        }
        self.renewing = true;
        let renewal = leases.store.send(RenewLeases(ids.clone()));
        ctx.spawn(renewal.into_actor(self).map(move |answer, s, _| {
            s.renewing = false;
            // The database is away: the jobs go on (their zones wait for it and are fenced there).
            let Ok(Ok(held)) = answer else { return };
            for id in ids.iter().filter(|id| !held.iter().any(|(h, _)| h == *id)) {
                if let Some(job) = s.jobs.get(id) {
                    job.do_send(Abandon);
                }
                // A worker's job another node took over: its reports go there now.
                if let Some((external, _)) = s.external.write().remove(id) {
                    tracing::warn!(job = %id, "another node took over a worker's job; its actor here stops");
                    external.do_send(Discard);
                }
                if let Some((export, _)) = s.exports.remove(id) {
                    tracing::warn!(job = %id, "another node took over an export; it stops here");
                    export.do_send(AbandonExport);
                }
            }
            for (id, by) in held {
                let Some(by) = by else { continue };
                if let Some(job) = s.jobs.get(&id) {
                    job.do_send(Cancel { by });
                } else if let Some(external) = s.external.get(&id) {
                    external.do_send(RequestCancel { by });
                } else if let Some((export, _)) = s.exports.get(&id) {
                    export.do_send(CancelExport { by });
                }
            }
        }));
    }

    /// Takes over jobs whose lease expired, as many as this node has room for; each one's upload is
    /// restored from the database when this node does not have the file.
    fn claim_expired(&mut self, ctx: &mut Context<Self>) {
        let Some(leases) = &self.leases else { return };
        let live = self.jobs.len() + self.taking.len();
        let room = (2 * self.max_running).saturating_sub(live) as i64;
        if self.claiming || self.releasing || room == 0 {
            return;
        }
        self.claiming = true;
        let except = self.leased();
        let claim = leases.store.send(ClaimExpired { limit: room, except });
        ctx.spawn(claim.into_actor(self).map(|answer, s, ctx| {
            s.claiming = false;
            let Ok(Ok(claimed)) = answer else { return };
            for c in claimed {
                s.restore_then_take_over(c, ctx);
            }
        }));
    }

    fn restore_then_take_over(&mut self, mut claimed: Claimed, ctx: &mut Context<Self>) {
        if claimed.job.snapshot.kind.as_deref() == Some(EXPORT) && claimed.job.spec.is_none() {
            let id = claimed.job.snapshot.job_id;
            tracing::info!(job = %id, "taking over an export whose node stopped renewing its lease; it runs again");
            if let Err(e) =
                <Self as Handler<StartExport>>::handle(self, StartExport { snapshot: claimed.job.snapshot }, ctx)
            {
                tracing::warn!(job = %id, reason = ?e, "an export not taken over; its lease is given up");
                self.release(id);
            }
            return;
        }
        if claimed.job.is_worker_job() {
            let id = claimed.job.snapshot.job_id;
            tracing::info!(job = %id, "taking over a worker's job whose node stopped renewing its lease");
            let start = StartExternal { snapshot: claimed.job.snapshot, fresh: false };
            match <Self as Handler<StartExternal>>::handle(self, start, ctx) {
                Ok(addr) => {
                    if let Some(by) = claimed.cancel_by {
                        addr.do_send(RequestCancel { by });
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %id, reason = ?e, "a worker's job not taken over; its lease is given up");
                    self.release(id);
                }
            }
            return;
        }
        let (Some(leases), Some(spec)) = (&self.leases, claimed.job.spec.as_mut()) else { return };
        let id = spec.job_id;
        if !claimed.handed_over {
            spec.resumes = spec.resumes.saturating_add(1);
        }
        let (store, path, to) = (leases.store.clone(), spec.path.clone(), leases.uploads.join(format!("{id}.csv")));
        self.taking.insert(id);
        let restore = async move {
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                return Ok(path);
            }
            match store.send(RestoreUpload { job_id: id, to: to.clone() }).await {
                // Without its upload (it was never kept) the job fails when it opens the file.
                Ok(Ok(true)) | Ok(Ok(false)) => Ok(to),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        ctx.spawn(restore.into_actor(self).map(move |restored, s, ctx| {
            s.taking.remove(&id);
            match restored {
                Ok(path) if !s.releasing => {
                    if let Some(spec) = claimed.job.spec.as_mut() {
                        spec.path = path;
                    }
                    s.take_over(claimed.job, claimed.cancel_by, ctx);
                }
                Ok(_) => {}
                // The lease runs out unrenewed, and the job is claimed again (here or elsewhere).
                Err(e) => tracing::warn!(job = %id, error = %e, "upload not restored; the job is taken over later"),
            }
        }));
    }

    fn take_over(&mut self, job: JobRecord, cancel: Option<String>, ctx: &mut Context<Self>) {
        let (Some(spec), Some(leases)) = (job.spec, &self.leases) else { return };
        let id = spec.job_id;
        tracing::info!(job = %id, resumes = spec.resumes, "taking over a job whose node stopped renewing its lease");
        let admission = resumed_admission(&leases.quotas, Some(&leases.redis), &spec);
        <Self as Handler<Submit>>::handle(self, Submit { spec, resume: Some(job.snapshot), admission }, ctx);
        if let (Some(by), Some(job)) = (cancel, self.jobs.get(&id)) {
            job.do_send(Cancel { by });
        }
    }

    /// Gives up this node's lease on `id` at once (it took the lease but runs no actor for it).
    fn release(&self, id: Uuid) {
        if let Some(leases) = &self.leases {
            leases.store.do_send(ReleaseLeases(vec![id]));
        }
    }

    /// The jobs whose leases this node holds: its own running and queued, those being taken over,
    /// and the workers' jobs whose actors are here.
    fn leased(&self) -> Vec<Uuid> {
        let exports = self.exports.keys().copied();
        self.jobs.keys().chain(&self.taking).copied().chain(self.external.ids()).chain(exports).collect()
    }

    fn start_waiting(&mut self) {
        while self.running < self.max_running {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            if let Some(job) = self.jobs.get(&id) {
                self.running += 1;
                job.do_send(Begin);
            }
        }
        for (i, id) in self.queue.iter().enumerate() {
            if let Some(job) = self.jobs.get(id) {
                job.do_send(Queued(i + 1));
            }
        }
    }
}

impl Scheduler {
    /// Releases reservations not renewed for `ttl` whose rooms nobody is in: a room someone still
    /// watches keeps its tenant's claim on the id, so no other tenant can take it from under them.
    fn release_reservations(&self, ttl: Duration, ctx: &mut Context<Self>) {
        let (store, broker) = (self.deps.store.clone(), self.deps.broker.clone());
        // With a shared store the reservations are every node's: a room watched on any node counts.
        let redis = self.leases.as_ref().map(|l| l.redis.clone());
        let before_ms = now_ms() - ttl.as_millis() as i64;
        let work = async move {
            let stale = store.send(StaleReservations { before_ms }).await.ok()?.ok()?;
            if stale.is_empty() {
                return Some(0);
            }
            let rooms: Vec<String> = stale.iter().map(|id| RoomKind::Job(*id).name()).collect();
            let mut occupied = broker.send(Occupied { rooms: rooms.clone() }).await.ok()?;
            if let Some(redis) = redis {
                occupied.extend(redis.occupied_elsewhere(&rooms).await.ok()?);
            }
            let ids: Vec<Uuid> =
                stale.into_iter().filter(|id| !occupied.contains(&RoomKind::Job(*id).name())).collect();
            store.send(DeleteReservations { ids, before_ms }).await.ok()?.ok()
        };
        ctx.spawn(work.into_actor(self).map(|released, _, _| {
            if let Some(n) = released.filter(|n| *n > 0) {
                tracing::info!(released = n, "released reservations no one renewed");
            }
        }));
    }
}

impl Actor for Scheduler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let ttl = self.deps.reservation_ttl;
        let every = ttl.clamp(Duration::from_millis(200), Duration::from_secs(60));
        ctx.run_interval(every, move |s, ctx| s.release_reservations(ttl, ctx));
        if let Some(leases) = &self.leases {
            ctx.run_interval(leases.every, |s, ctx| s.renew_leases(ctx));
            // Looked for more often than leases are renewed, so that the jobs of a node that stopped
            // gracefully (it gave their leases up) move within 2 s whatever `job_lease_s` is.
            ctx.run_interval(leases.every.min(CLAIM_EVERY), |s, ctx| s.claim_expired(ctx));
            self.claim_expired(ctx);
        }
    }
}

impl Handler<Submit> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: Submit, ctx: &mut Context<Self>) {
        let id = msg.spec.job_id;
        // One actor per job id: a second submit of a live job (a bug, or a race the store's claim
        // did not catch) must not start a second writer of its rows.
        if self.jobs.contains_key(&id) {
            tracing::warn!(job = %id, "refused a second submit of a job that is already queued or running");
            return;
        }
        let job = Job::new(msg.spec, self.deps.clone(), ctx.address().recipient(), msg.resume.as_ref(), msg.admission)
            .start();
        self.jobs.insert(id, job);
        self.queue.push_back(id);
        self.start_waiting();
    }
}

impl Handler<Finished> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: Finished, _: &mut Context<Self>) {
        self.jobs.remove(&msg.job_id);
        if let Some(pos) = self.queue.iter().position(|id| *id == msg.job_id) {
            self.queue.remove(pos);
        } else {
            self.running = self.running.saturating_sub(1);
        }
        self.start_waiting();
    }
}

impl Handler<StartExternal> for Scheduler {
    type Result = Result<Addr<External>, StartRefused>;
    fn handle(&mut self, msg: StartExternal, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.snapshot.job_id;
        if let Some(addr) = self.external.get(&id) {
            return Ok(addr);
        }
        if self.ended.1.contains(&id) || msg.snapshot.status.is_terminal() {
            return Err(StartRefused::Ended);
        }
        if self.releasing {
            return Err(StartRefused::Stopping);
        }
        let limits = self.deps.external;
        let tenant = msg.snapshot.tenant.clone();
        let live = self.external.of_tenant(&tenant);
        // Counted when the job is created: one stored (or taken over) always gets its actor back.
        if msg.fresh && live >= limits.max_per_tenant {
            return Err(StartRefused::Quota(format!(
                "tenant {tenant} has {live} jobs waiting for their workers; at most {} (max_queued_jobs_per_tenant)",
                limits.max_per_tenant
            )));
        }
        let deps = ExternalDeps {
            broker: self.deps.broker.clone(),
            store: self.deps.store.clone(),
            progress_rate: self.deps.progress_rate,
            stall: limits.stall,
            cancel_grace: limits.cancel_grace,
            webhooks: self.deps.webhooks.clone(),
        };
        if msg.fresh {
            let status = Event::Status(StatusData {
                job_id: Some(id),
                status: JobStatus::Queued,
                message: "waiting for its worker's first report".into(),
            });
            self.deps.broker.do_send(Publish::job(RoomKind::Job(id).name(), status));
        }
        let addr = External::new(deps, msg.snapshot, ctx.address().recipient()).start();
        self.external.write().insert(id, (addr.clone(), tenant));
        Ok(addr)
    }
}

impl Handler<ExternalEnded> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: ExternalEnded, _: &mut Context<Self>) {
        // Only the actor that stopped (a discarded one may have been replaced already).
        let mut live = self.external.write();
        if live.get(&msg.job_id).is_some_and(|(a, _)| *a == msg.actor) {
            live.remove(&msg.job_id);
        }
        drop(live);
        if !msg.finished {
            return;
        }
        let (order, set) = &mut self.ended;
        if set.insert(msg.job_id) {
            order.push_back(msg.job_id);
        }
        while order.len() > ENDED_KEPT {
            if let Some(old) = order.pop_front() {
                set.remove(&old);
            }
        }
    }
}

impl Handler<CancelJob> for Scheduler {
    type Result = ResponseFuture<CancelOutcome>;
    fn handle(&mut self, msg: CancelJob, _: &mut Context<Self>) -> Self::Result {
        // A job that runs elsewhere: its worker is asked to stop.
        if let Some(external) = self.external.get(&msg.job_id) {
            return Box::pin(async move {
                match external.send(RequestCancel { by: msg.by }).await {
                    Ok(true) => CancelOutcome::Cancelling,
                    _ => CancelOutcome::NotRunning,
                }
            });
        }
        if let Some((export, _)) = self.exports.get(&msg.job_id).cloned() {
            return Box::pin(async move {
                match export.send(CancelExport { by: msg.by }).await {
                    Ok(true) => CancelOutcome::Cancelling,
                    _ => CancelOutcome::NotRunning,
                }
            });
        }
        let Some(job) = self.jobs.get(&msg.job_id).cloned() else {
            return Box::pin(async { CancelOutcome::NotRunning });
        };
        Box::pin(async move {
            match job.send(Cancel { by: msg.by }).await {
                Ok(true) => CancelOutcome::Cancelling,
                _ => CancelOutcome::NotRunning,
            }
        })
    }
}

impl Handler<RemoteCancel> for Scheduler {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, msg: RemoteCancel, _: &mut Context<Self>) -> Self::Result {
        if let Some((export, _)) = self.exports.get(&msg.job_id).cloned() {
            return Box::pin(async move { export.send(CancelExport { by: msg.by }).await.unwrap_or(false) });
        }
        let Some(job) = self.jobs.get(&msg.job_id).cloned() else {
            return Box::pin(async { false });
        };
        Box::pin(async move { job.send(Cancel { by: msg.by }).await.unwrap_or(false) })
    }
}

impl Handler<StartExport> for Scheduler {
    type Result = Result<(), StartRefused>;
    fn handle(&mut self, msg: StartExport, ctx: &mut Context<Self>) -> Self::Result {
        let id = msg.snapshot.job_id;
        if self.exports.contains_key(&id) {
            return Ok(());
        }
        if msg.snapshot.status.is_terminal() {
            return Err(StartRefused::Ended);
        }
        if self.releasing {
            return Err(StartRefused::Stopping);
        }
        let Some(deps) = self.export_deps.clone() else {
            return Err(StartRefused::Stopping);
        };
        let tenant = msg.snapshot.tenant.clone();
        let limit = self.deps.external.max_per_tenant;
        if self.exports.values().filter(|(_, t)| *t == tenant).count() >= limit {
            return Err(StartRefused::Quota(format!(
                "tenant {tenant} has {limit} exports running; at most {limit} (max_queued_jobs_per_tenant)"
            )));
        }
        let Some(export) = Export::new(deps, msg.snapshot, ctx.address().recipient()) else {
            tracing::warn!(job = %id, "an export job without its spec is not run");
            return Err(StartRefused::Ended);
        };
        self.exports.insert(id, (export.start(), tenant));
        Ok(())
    }
}

impl Handler<ExportEnded> for Scheduler {
    type Result = ();
    fn handle(&mut self, msg: ExportEnded, _: &mut Context<Self>) {
        if self.exports.get(&msg.job_id).is_some_and(|(a, _)| *a == msg.actor) {
            self.exports.remove(&msg.job_id);
        }
    }
}

impl Handler<Forwarded> for Scheduler {
    type Result = ResponseFuture<Option<String>>;
    /// A worker's call another node forwarded here: this node holds the job's lease.
    fn handle(&mut self, msg: Forwarded, _: &mut Context<Self>) -> Self::Result {
        let call: WorkerCall = match serde_json::from_str(&msg.body) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable forwarded call");
                return Box::pin(async { None });
            }
        };
        let answer = |a: &CallAnswer| serde_json::to_string(a).ok();
        if let Some(external) = self.external.get(&call.job_id) {
            return Box::pin(async move { answer(&call.op.run(&external).await) });
        }
        let found = if self.ended.1.contains(&call.job_id) { call.op.ended() } else { CallAnswer::NotHere };
        Box::pin(async move { answer(&found) })
    }
}

impl Handler<ReleaseAll> for Scheduler {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: ReleaseAll, _: &mut Context<Self>) -> Self::Result {
        // The jobs stop here first, so that no node runs them twice once the leases are given up.
        self.releasing = self.leases.is_some();
        let ids = self.leased();
        if self.releasing {
            for job in self.jobs.values() {
                job.do_send(Abandon);
            }
            // Their workers' next reports go to the node that takes them over.
            let live = std::mem::take(&mut *self.external.write());
            for (external, _) in live.into_values() {
                external.do_send(Discard);
            }
            for (export, _) in std::mem::take(&mut self.exports).into_values() {
                export.do_send(AbandonExport);
            }
        }
        let Some(store) = self.leases.as_ref().map(|l| l.store.clone()).filter(|_| !ids.is_empty()) else {
            return Box::pin(async {});
        };
        Box::pin(async move {
            match store.send(ReleaseLeases(ids)).await {
                Ok(Ok(n)) => tracing::info!(jobs = n, "leases released for other nodes to take over"),
                Ok(Err(e)) => tracing::warn!(error = %e, "leases not released; they expire instead"),
                Err(e) => tracing::warn!(error = %e, "leases not released; they expire instead"),
            }
        })
    }
}

impl Handler<Load> for Scheduler {
    type Result = MessageResult<Load>;
    fn handle(&mut self, _: Load, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.queue.len(), self.running))
    }
}
