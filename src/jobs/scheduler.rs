//! The scheduler actor: starts job actors, runs at most `max_concurrent_jobs` at once (the others
//! wait as `queued` with their position), and finds running jobs for cancellation.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::db::sqlite::now_ms;
use crate::db::store::{DeleteReservations, JobSpec, StaleReservations};
use crate::jobs::job::{Begin, Cancel, Finished, Job, JobDeps, Queued};
use crate::protocol::JobSnapshot;
use crate::protocol::RoomKind;
use crate::quota::Admission;
use crate::realtime::broker::Occupied;

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
}

impl Scheduler {
    /// A scheduler running at most `max_running` jobs at once.
    pub fn new(deps: JobDeps, max_running: usize) -> Self {
        Scheduler { deps, max_running: max_running.max(1), jobs: HashMap::new(), running: 0, queue: VecDeque::new() }
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

impl Handler<Load> for Scheduler {
    type Result = MessageResult<Load>;
    fn handle(&mut self, _: Load, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.queue.len(), self.running))
    }
}
