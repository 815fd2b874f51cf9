//! Jobs as a caller may see them: lookup, reservation, listing and cancel, with the tenancy rule
//! ([`Identity::may_access`]) applied in one place for the WebSocket session and the HTTP API alike.

use actix::prelude::*;
use uuid::Uuid;

use crate::auth::Identity;
use crate::db::pg_store::RequestCancel;
use crate::db::store::{GetJob, JobRecord, ListJobs, ReserveJob};
use crate::db::StoreAddr;
use crate::jobs::scheduler::{CancelJob, CancelOutcome, Scheduler, StartExternal};
use crate::protocol::{JobSnapshot, JobStatus};
use crate::realtime::redis::{Control, RedisEngine, RemoteCancel};

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
    /// Jobs as `store` keeps them and `scheduler` runs them.
    pub fn new(store: StoreAddr, scheduler: Addr<Scheduler>) -> Self {
        JobAccess { store, scheduler, redis: None }
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
        let mut here = self.scheduler.send(msg).await.map_err(unavailable)?;
        // A worker's job whose actor is not live here (a restart): started again from its
        // snapshot, so the cancel reaches the worker through its next report.
        let worker_job = job.spec.is_none() && job.snapshot.stages.is_some() && !job.snapshot.status.is_terminal();
        if here == CancelOutcome::NotRunning && worker_job {
            let start = StartExternal { snapshot: job.snapshot.clone(), fresh: false };
            if self.scheduler.send(start).await.map_err(unavailable)?.is_ok() {
                here = self.scheduler.send(CancelJob { job_id, by: by.to_string() }).await.map_err(unavailable)?;
            }
        }
        let (Some(shared), Some(redis)) = (self.store.shared(), &self.redis) else { return Ok(here) };
        if here == CancelOutcome::Cancelling || job.spec.is_none() || job.snapshot.status.is_terminal() {
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
