//! Jobs as a caller may see them: lookup, reservation, listing and cancel, with the tenancy rule
//! ([`Identity::may_access`]) applied in one place for the WebSocket session and the HTTP API alike.

use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use crate::auth::Identity;
use crate::db::pg_store::{ReleaseLeases, RequestCancel, TakeJob, TakeLease};
use crate::db::store::{GetJob, JobRecord, ListJobs, ReserveJob};
use crate::db::StoreAddr;
use crate::jobs::external::{
    CallAnswer, End, Ended, External, ExternalError, Report, Reported, RequestCancel as AskWorker, WorkerCall, WorkerOp,
};
use crate::jobs::scheduler::{CancelJob, CancelOutcome, LiveExternals, Scheduler, StartExternal, StartRefused};
use crate::protocol::{JobSnapshot, JobStatus};
use crate::realtime::redis::{Control, RedisEngine, RemoteCancel};

/// How long a call forwarded to the node holding a worker job's lease may take.
const FORWARD_WAIT: Duration = Duration::from_secs(5);

/// Why a worker's call did not reach its job.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerRefused {
    /// No such job.
    NotFound,
    /// Its tenant has as many live worker jobs as it may.
    Quota(String),
    /// The job's actor refused it, or could not be reached (`Unavailable`: try again).
    Job(ExternalError),
}

/// Where a worker job's actor is.
enum Located {
    Here(Addr<External>),
    /// On the node (by id) that holds its lease.
    On(String),
}

fn worker_unavailable(e: impl std::fmt::Display) -> WorkerRefused {
    WorkerRefused::Job(ExternalError::Unavailable(e.to_string()))
}

/// Why a caller cannot have a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No such job (or, where reservations do not count, only a reservation).
    Unknown,
    /// A job of another tenant.
    Forbidden,
    /// The tenant holds `max_reservations_per_tenant` reservations already.
    TooManyReservations,
    /// The store or the scheduler did not answer.
    Unavailable(String),
}

/// Finds, reserves, lists and cancels jobs for callers. Cheap to clone.
#[derive(Clone)]
pub struct JobAccess {
    store: StoreAddr,
    scheduler: Addr<Scheduler>,
    /// The scheduler's actors of workers' jobs.
    externals: LiveExternals,
    /// The cluster's Redis: a cancel reaches the node that runs the job.
    redis: Option<RedisEngine>,
}

fn unavailable(e: impl std::fmt::Display) -> Refused {
    Refused::Unavailable(e.to_string())
}

/// The tenancy rule applied to a stored job; a reservation is a job only when `reservations` says so.
fn check(who: &Identity, job: Option<JobRecord>, reservations: bool) -> Result<JobRecord, Refused> {
    match job {
        Some(job) if reservations || job.snapshot.status != JobStatus::Pending => {
            if who.may_access(&job.snapshot.tenant) {
                Ok(job)
            } else {
                Err(Refused::Forbidden)
            }
        }
        _ => Err(Refused::Unknown),
    }
}

impl JobAccess {
    /// Jobs as `store` keeps them and `scheduler` runs them (`externals`: its workers' jobs).
    pub fn new(store: StoreAddr, scheduler: Addr<Scheduler>, externals: LiveExternals) -> Self {
        JobAccess { store, scheduler, externals, redis: None }
    }

    /// With a shared store, cancels of jobs another node runs go to it through `redis`.
    pub fn with_cluster(mut self, redis: RedisEngine) -> Self {
        self.redis = Some(redis);
        self
    }

    /// The job `id` if `who` may see it. A reservation counts as a job for the WebSocket (its room
    /// may be joined, and a cancel is answered `job_finished`), not for the HTTP API.
    pub async fn find(&self, who: &Identity, id: Uuid, reservations: bool) -> Result<JobRecord, Refused> {
        let job = self.store.send(GetJob(id)).await.map_err(unavailable)?.map_err(unavailable)?;
        check(who, job, reservations)
    }

    /// Reserves `id` for `who`'s tenant unless a job has it (a client subscribing before it uploads
    /// with `batch_id`), then answers the job if `who` may see it.
    pub async fn reserve(&self, who: &Identity, id: Uuid, max: usize) -> Result<JobRecord, Refused> {
        let reserve = ReserveJob { id, tenant: who.tenant.clone(), max };
        let job = self.store.send(reserve).await.map_err(unavailable)?.map_err(unavailable)?;
        check(who, Some(job.ok_or(Refused::TooManyReservations)?), true)
    }

    /// Snapshots of the jobs `who` may see (every tenant's for admins), newest first, at most `limit`.
    pub async fn list(&self, who: &Identity, limit: usize) -> Result<Vec<JobSnapshot>, Refused> {
        let tenant = (!who.admin).then(|| who.tenant.clone());
        self.store.send(ListJobs { tenant, limit }).await.map_err(unavailable)?.map_err(unavailable)
    }

    /// Cancels a job found with [`JobAccess::find`]; `by` is who asked.
    pub async fn cancel(&self, job: &JobRecord, by: &str) -> Result<CancelOutcome, Refused> {
        let job_id = job.snapshot.job_id;
        let msg = CancelJob { job_id, by: by.to_string() };
        let here = self.scheduler.send(msg).await.map_err(unavailable)?;
        // A worker's job whose actor is elsewhere: on the node holding its lease, or nowhere (a
        // restart; it is started again from its snapshot), so the cancel reaches the worker
        // through its next report.
        if here == CancelOutcome::NotRunning && job.is_worker_job() && !job.snapshot.status.is_terminal() {
            return match self.worker_call(job_id, WorkerOp::Cancel(by.to_string())).await {
                Ok(CallAnswer::Cancel(true)) => Ok(CancelOutcome::Cancelling),
                Err(WorkerRefused::Job(ExternalError::Unavailable(e))) => Err(Refused::Unavailable(e)),
                _ => Ok(CancelOutcome::NotRunning),
            };
        }
        let (Some(shared), Some(redis)) = (self.store.shared(), &self.redis) else { return Ok(here) };
        if here == CancelOutcome::Cancelling || !job.is_leased() || job.snapshot.status.is_terminal() {
            return Ok(here);
        }
        // Another node runs the job (it answers), or ran it and died: the cancel is recorded, and
        // the node that takes the job over cancels it instead of running it.
        let cancel = RemoteCancel { job_id, by: by.to_string() };
        let control = Control { id: Uuid::new_v4().simple().to_string(), cancel: Some(cancel), ..Default::default() };
        if redis.control(&control).await.map_err(unavailable)? > 0 {
            return Ok(CancelOutcome::Cancelling);
        }
        let recorded = shared.send(RequestCancel { job_id, by: by.to_string() }).await;
        match recorded.map_err(unavailable)?.map_err(unavailable)? {
            true => Ok(CancelOutcome::Cancelling),
            false => Ok(CancelOutcome::NotRunning),
        }
    }
}

/// A worker's calls (contract §7), wherever its job's actor is.
impl JobAccess {
    /// A worker's report.
    pub async fn report(&self, job_id: Uuid, report: Report) -> Result<Reported, WorkerRefused> {
        match self.worker_call(job_id, WorkerOp::Report(report)).await? {
            CallAnswer::Reported(answer) => answer.map_err(WorkerRefused::Job),
            other => Err(worker_unavailable(format!("a report was answered {other:?}"))),
        }
    }

    /// A worker's `/complete` or `/fail`.
    pub async fn end(&self, job_id: Uuid, end: End) -> Result<Ended, WorkerRefused> {
        match self.worker_call(job_id, WorkerOp::End(end)).await? {
            CallAnswer::Ended(answer) => answer.map_err(WorkerRefused::Job),
            other => Err(worker_unavailable(format!("an end was answered {other:?}"))),
        }
    }

    /// Runs `op` on the job's actor: here, or on the node holding the job's lease (a cluster with
    /// a shared store), through the control channel.
    async fn worker_call(&self, job_id: Uuid, op: WorkerOp) -> Result<CallAnswer, WorkerRefused> {
        for attempt in 1..=3u32 {
            let node = match self.locate(job_id).await? {
                Located::Here(actor) => return Ok(op.run(&actor).await),
                Located::On(node) => node,
            };
            let Some(redis) = &self.redis else { break };
            let call = serde_json::to_string(&WorkerCall { job_id, op: op.clone() }).map_err(worker_unavailable)?;
            let parses = |a: &str| serde_json::from_str::<CallAnswer>(a).is_ok();
            let answer = redis.call(&node, call, FORWARD_WAIT, parses).await.map_err(worker_unavailable)?;
            let Some(answer) = answer else {
                return Err(worker_unavailable(format!(
                    "node {node}, which runs job {job_id}, did not answer within {} s; try again",
                    FORWARD_WAIT.as_secs()
                )));
            };
            match serde_json::from_str::<CallAnswer>(&answer).map_err(worker_unavailable)? {
                // It is starting the job's actor, or just gave it up: looked for again.
                CallAnswer::NotHere => actix_rt::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await,
                answer => return Ok(answer),
            }
        }
        Err(worker_unavailable(format!("job {job_id} is moving between nodes; try again")))
    }

    /// The worker job's actor: live here; or, with a shared store, on the node holding its lease
    /// (a lease expired, or held by a node the cluster says is dead, is taken and the actor started
    /// here); or, on one node, started again from its snapshot (after a restart).
    async fn locate(&self, job_id: Uuid) -> Result<Located, WorkerRefused> {
        if let Some(actor) = self.externals.get(&job_id) {
            return Ok(Located::Here(actor));
        }
        let (Some(shared), Some(redis)) = (self.store.shared(), &self.redis) else {
            return self.start_stored(job_id).await;
        };
        let mut from = None;
        for _ in 0..2 {
            let take = TakeJob { job_id, from: from.take() };
            match shared.send(take).await.map_err(worker_unavailable)?.map_err(worker_unavailable)? {
                TakeLease::Taken(claimed) => {
                    let actor = match self.start(claimed.job.snapshot).await {
                        Ok(actor) => actor,
                        Err(e) => {
                            // Taken but not run here: given back, so another node can.
                            shared.do_send(ReleaseLeases(vec![job_id]));
                            return Err(e);
                        }
                    };
                    if let Some(by) = claimed.cancel_by {
                        actor.do_send(AskWorker { by });
                    }
                    return Ok(Located::Here(actor));
                }
                TakeLease::HeldBy(node) => {
                    if redis.is_alive(&node).await.map_err(worker_unavailable)? {
                        return Ok(Located::On(node));
                    }
                    tracing::info!(job = %job_id, %node, "a worker's job is taken from a node that stopped beating");
                    from = Some(node);
                }
                // Not leased (stored before worker jobs were): its actor starts here, and its
                // first save leases it.
                TakeLease::NotLeased => return self.start_stored(job_id).await,
            }
        }
        Err(worker_unavailable(format!("job {job_id} is moving between nodes; try again")))
    }

    async fn start_stored(&self, job_id: Uuid) -> Result<Located, WorkerRefused> {
        let job = self.store.send(GetJob(job_id)).await.map_err(worker_unavailable)?.map_err(worker_unavailable)?;
        let job = job.ok_or(WorkerRefused::NotFound)?;
        if job.snapshot.status.is_terminal() {
            return Err(WorkerRefused::Job(ExternalError::Ended));
        }
        self.start(job.snapshot).await.map(Located::Here)
    }

    async fn start(&self, snapshot: JobSnapshot) -> Result<Addr<External>, WorkerRefused> {
        let start = StartExternal { snapshot, fresh: false };
        match self.scheduler.send(start).await.map_err(worker_unavailable)? {
            Ok(actor) => Ok(actor),
            Err(StartRefused::Ended) => Err(WorkerRefused::Job(ExternalError::Ended)),
            Err(StartRefused::Quota(why)) => Err(WorkerRefused::Quota(why)),
            Err(StartRefused::Stopping) => Err(worker_unavailable("this node is stopping; try again")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(tenant: &str, admin: bool) -> Identity {
        Identity { user_id: "u".into(), tenant: tenant.into(), admin, publisher: false, expires_at: 0 }
    }

    fn job(tenant: &str, status: JobStatus) -> Option<JobRecord> {
        let mut snapshot = JobSnapshot::reservation(Uuid::new_v4(), tenant);
        snapshot.status = status;
        Some(JobRecord { snapshot, spec: None })
    }

    #[test]
    fn jobs_of_another_tenant_are_forbidden_and_reservations_count_only_where_asked() {
        assert!(check(&who("a", false), job("a", JobStatus::Queued), false).is_ok());
        assert_eq!(check(&who("a", false), job("b", JobStatus::Queued), false), Err(Refused::Forbidden));
        assert!(check(&who("a", true), job("b", JobStatus::Queued), false).is_ok());
        assert_eq!(check(&who("a", false), None, true), Err(Refused::Unknown));
        assert_eq!(check(&who("a", false), job("a", JobStatus::Pending), false), Err(Refused::Unknown));
        assert!(check(&who("a", false), job("a", JobStatus::Pending), true).is_ok());
        assert_eq!(check(&who("a", false), job("b", JobStatus::Pending), true), Err(Refused::Forbidden));
    }
}
