//! The scheduler actor: starts job actors, runs at most `max_concurrent_jobs` at once (the others
//! wait as `queued` with their position), and finds running jobs for cancellation.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::db::pg_store::{ClaimExpired, PgStore, ReleaseLeases, RenewLeases, RestoreUpload};
use crate::db::sqlite::now_ms;
use crate::db::store::{DeleteReservations, JobRecord, JobSpec, StaleReservations};
use crate::jobs::job::{Abandon, Begin, Cancel, Finished, Job, JobDeps, Queued};
use crate::protocol::JobSnapshot;
use crate::protocol::RoomKind;
use crate::quota::{Admission, Quotas};
use crate::realtime::broker::Occupied;
use crate::realtime::redis::{RedisEngine, RemoteCancel};

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
    /// A renewal or takeover round is under way.
    tending: bool,
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
            tending: false,
        }
    }

    /// Holds leases on its jobs and takes over expired ones.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Renews the leases of the jobs here (stopping those another node took over), then takes
    /// over jobs whose lease expired, as many as this node has room for.
    fn tend_leases(&mut self, ctx: &mut Context<Self>) {
        let Some(leases) = &self.leases else { return };
        if self.tending {
            return;
        }
        self.tending = true;
        let ids: Vec<Uuid> = self.jobs.keys().copied().collect();
        let room = (2 * self.max_running).saturating_sub(self.jobs.len()) as i64;
        let (store, uploads) = (leases.store.clone(), leases.uploads.clone());
        let work = async move {
            let lost: Vec<Uuid> = match store.send(RenewLeases(ids.clone())).await {
                Ok(Ok(held)) => ids.into_iter().filter(|id| !held.contains(id)).collect(),
                // The database is away: the jobs go on (their zones wait for it), and nothing is
                // taken over by a node that cannot see the leases.
                _ => return (Vec::new(), Vec::new()),
            };
            let mut taken = Vec::new();
            let claimed = if room > 0 { store.send(ClaimExpired { limit: room }).await } else { Ok(Ok(Vec::new())) };
            for (mut job, cancel) in claimed.ok().and_then(|r| r.ok()).unwrap_or_default() {
                let Some(spec) = job.spec.as_mut() else { continue };
                if !spec.path.is_file() {
                    let to = uploads.join(format!("{}.csv", spec.job_id));
                    match store.send(RestoreUpload { job_id: spec.job_id, to: to.clone() }).await {
                        Ok(Ok(true)) => spec.path = to,
                        Ok(Ok(false)) => tracing::warn!(job = %spec.job_id, "taken over without its upload"),
                        Ok(Err(e)) => tracing::warn!(job = %spec.job_id, error = %e, "upload not restored"),
                        Err(e) => tracing::warn!(job = %spec.job_id, error = %e, "upload not restored"),
                    }
                }
                spec.resumes = spec.resumes.saturating_add(1);
                taken.push((job, cancel));
            }
            (lost, taken)
        };
        ctx.spawn(work.into_actor(self).map(|(lost, taken), s, ctx| {
            s.tending = false;
            for id in lost {
                if let Some(job) = s.jobs.get(&id) {
                    job.do_send(Abandon);
                }
            }
            for (job, cancel) in taken {
                s.take_over(job, cancel, ctx);
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
        let before_ms = now_ms() - ttl.as_millis() as i64;
        let work = async move {
            let stale = store.send(StaleReservations { before_ms }).await.ok()?.ok()?;
            if stale.is_empty() {
                return Some(0);
            }
            let rooms = stale.iter().map(|id| RoomKind::Job(*id).name()).collect();
            let occupied = broker.send(Occupied { rooms }).await.ok()?;
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
            ctx.run_interval(leases.every, |s, ctx| s.tend_leases(ctx));
            self.tend_leases(ctx);
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

impl Handler<CancelJob> for Scheduler {
    type Result = ResponseFuture<CancelOutcome>;
    fn handle(&mut self, msg: CancelJob, _: &mut Context<Self>) -> Self::Result {
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
        let Some(job) = self.jobs.get(&msg.job_id).cloned() else {
            return Box::pin(async { false });
        };
        Box::pin(async move { job.send(Cancel { by: msg.by }).await.unwrap_or(false) })
    }
}

impl Handler<ReleaseAll> for Scheduler {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: ReleaseAll, _: &mut Context<Self>) -> Self::Result {
        let ids: Vec<Uuid> = self.jobs.keys().copied().collect();
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
