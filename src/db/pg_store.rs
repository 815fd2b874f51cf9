//! The shared event and job store on PostgreSQL (cluster mode with `database_url`): the same
//! messages as the SQLite [`StoreActor`](crate::db::store::StoreActor), so every caller holds a
//! [`StoreAddr`](crate::db::StoreAddr) and does not know which one answers, plus what only a shared
//! store can do: job leases (which node runs a job, renewed by it, taken over by another when it
//! expires) and uploads kept in the database so the node that takes a job over can read its file.
//!
//! [`PgStore`] is an async actor on an arbiter of its own; each message runs on a pooled
//! connection. [`UpdateJob`] reads with `FOR UPDATE` inside its transaction, so two nodes updating
//! one job cannot interleave either.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::db::pg;
use crate::db::sqlite::{now_ms, StoreError};
use crate::db::store::*;
use crate::protocol::{JobSnapshot, JobStatus};

/// The schema, in the order it was introduced.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL, last_seq BIGINT NOT NULL);
     CREATE TABLE events (room TEXT NOT NULL, seq BIGINT NOT NULL, created_ms BIGINT NOT NULL,
         envelope TEXT NOT NULL, PRIMARY KEY (room, seq));
     CREATE INDEX events_by_age ON events (created_ms);
     CREATE TABLE jobs (id UUID PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, snapshot TEXT NOT NULL,
         created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, runs BOOLEAN NOT NULL,
         lease_node TEXT, lease_until_ms BIGINT, cancel_by TEXT, saved_by TEXT, save_seq BIGINT NOT NULL DEFAULT 0);
     CREATE INDEX jobs_by_tenant ON jobs (tenant, created_ms);
     CREATE INDEX jobs_leased ON jobs (lease_until_ms) WHERE runs;
     CREATE TABLE upload_parts (job_id UUID NOT NULL, part INTEGER NOT NULL, data BYTEA NOT NULL,
         PRIMARY KEY (job_id, part));",
    ),
    // Webhooks, their outbox and delivery log (`db::outbox`).
    (
        2,
        "CREATE TABLE webhooks (id UUID PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL,
         events TEXT NOT NULL, secret TEXT NOT NULL, created_ms BIGINT NOT NULL);
     CREATE TABLE webhook_outbox (msg_id TEXT NOT NULL, webhook_id UUID NOT NULL, body TEXT NOT NULL,
         attempts INTEGER NOT NULL, next_at_ms BIGINT NOT NULL, claimed_until_ms BIGINT,
         PRIMARY KEY (msg_id, webhook_id));
     CREATE INDEX webhook_due ON webhook_outbox (next_at_ms);
     CREATE TABLE webhook_attempts (webhook_id UUID NOT NULL, msg_id TEXT NOT NULL, attempt INTEGER NOT NULL,
         at_ms BIGINT NOT NULL, status INTEGER, error TEXT, PRIMARY KEY (webhook_id, at_ms, msg_id, attempt));",
    ),
];

/// Bytes per stored piece of an upload.
const UPLOAD_PART: usize = 8 << 20;

/// The shared store actor.
pub struct PgStore {
    /// What each message's work gets a copy of.
    base: Ctx,
    /// The last operation on each job under way, so that the next one starts after it.
    order: JobOrder,
    /// The number of the last operation put in that order.
    ticket: u64,
}

impl PgStore {
    /// Connects to `url`, creating and migrating the schema of `prefix` when needed. Fails when the
    /// database cannot be reached: a node does not start half-configured.
    pub async fn open(url: &str, prefix: &str, keep: usize, node: &str, lease: Duration) -> Result<Self, StoreError> {
        // Migrated on a connection of its own; the pool's connections are made where the actor runs.
        let setup = pg::pool(url, prefix, 1, Some(Duration::from_secs(5)))?;
        pg::migrate(&setup, prefix, MIGRATIONS, "store_version").await?;
        setup.close();
        let pool = pg::pool(url, prefix, 8, Some(Duration::from_secs(5)))?;
        let leases = pg::pool(url, prefix, 2, Some(Duration::from_secs(5)))?;
        let base = Ctx { pool, leases, seq: 0, keep, node: node.to_string(), lease };
        Ok(PgStore { base, order: Arc::default(), ticket: 0 })
    }

    /// Starts the actor on an arbiter of its own (its connections' I/O runs there too).
    pub fn start_own(self) -> Addr<PgStore> {
        PgStore::start_in_arbiter(&Arbiter::new().handle(), move |_| self)
    }

    /// Runs `work` on a pooled connection, as the answer to a message; numbers it among this node's
    /// writes.
    pub(crate) fn run<T, F, Fut>(&mut self, work: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: 'static,
        F: FnOnce(Ctx) -> Fut + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>> + 'static,
    {
        self.base.seq += 1;
        Box::pin(work(self.base.clone()))
    }

    /// [`PgStore::run`] for work on job `id`, begun once the work on it sent before has ended (the
    /// handlers run concurrently): a read of a job sent after a write of it sees that write, as
    /// with the SQLite store, whose actor answers one message at a time.
    fn run_for<T, F, Fut>(&mut self, id: Uuid, work: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: 'static,
        F: FnOnce(Ctx) -> Fut + 'static,
        Fut: std::future::Future<Output = Result<T, StoreError>> + 'static,
    {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let before = order.get(&id).map(|(_, f)| f.clone());
        self.ticket += 1;
        let (done, ended) = tokio::sync::oneshot::channel::<()>();
        let ended = async move {
            let _ = ended.await;
        };
        order.insert(id, (self.ticket, ended.boxed().shared()));
        drop(order);
        // Forgets this work's place when it ends (or its caller stops waiting), unless later work
        // on the job took the place already.
        let place = Place { order: self.order.clone(), id, ticket: self.ticket, _done: done };
        let work = self.run(work);
        Box::pin(async move {
            if let Some(before) = before {
                before.await;
            }
            let out = work.await;
            drop(place);
            out
        })
    }
}

/// The last work under way on each job: its number and its end.
type JobOrder = Arc<Mutex<HashMap<Uuid, (u64, Shared<BoxFuture<'static, ()>>)>>>;

/// One job's work's place in [`PgStore`]'s order; dropping it lets the next work begin.
struct Place {
    order: JobOrder,
    id: Uuid,
    ticket: u64,
    _done: tokio::sync::oneshot::Sender<()>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if order.get(&self.id).is_some_and(|(t, _)| *t == self.ticket) {
            order.remove(&self.id);
        }
    }
}

impl Actor for PgStore {
    type Context = Context<Self>;
}

/// What one message's work needs.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) pool: Pool,
    /// Connections for leases and the readiness check only, so that uploads being kept (which hold
    /// a connection for a whole file) never delay a renewal.
    leases: Pool,
    /// This message's place among this node's writes: the handlers run concurrently, and a write
    /// of a job older than one already applied is dropped.
    seq: i64,
    /// Events kept per room.
    keep: usize,
    /// This node's id: the holder of the leases it takes.
    node: String,
    /// How long a lease lasts.
    lease: Duration,
}

fn encode(job: &JobRecord) -> Result<String, StoreError> {
    serde_json::to_string(job).map_err(|e| StoreError::new(e.to_string()))
}

fn parse_job(text: &str) -> Option<JobRecord> {
    serde_json::from_str(text).map_err(|e| tracing::error!(error = %e, "a stored job does not parse")).ok()
}

fn statuses(list: &[JobStatus]) -> Vec<String> {
    list.iter().map(|s| s.as_str().to_string()).collect()
}

/// Whether a saved job ends its upload's life (the file is not needed again).
fn upload_done(job: &JobRecord) -> bool {
    let s = &job.snapshot;
    s.status.is_terminal()
        && !(s.status == JobStatus::Failed && s.error.as_ref().and_then(|e| e.as_ref()).is_some_and(|e| e.recoverable))
}

impl Ctx {
    fn lease_until(&self) -> i64 {
        now_ms() + self.lease.as_millis() as i64
    }

    /// Writes `job`: a job jobcast runs is leased to this node while it is not terminal (a
    /// terminal one to no node), and is written only while no other node holds a live lease on it,
    /// never over a newer write of this node's, and never back from terminal to running. Answers
    /// whether it was written.
    async fn save(&self, c: &impl GenericClient, job: &JobRecord, insert_only: bool) -> Result<bool, StoreError> {
        let s = &job.snapshot;
        let now = now_ms();
        let runs = job.is_leased();
        let (holder, until) = match (runs, s.status.is_terminal()) {
            (true, false) => (Some(self.node.as_str()), Some(self.lease_until())),
            _ => (None, None),
        };
        let text = encode(job)?;
        let ended = statuses(&JobStatus::TERMINAL);
        let (status, node) = (s.status.as_str(), self.node.as_str());
        let n = if insert_only {
            c.execute(
                "INSERT INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms, runs, lease_node, lease_until_ms,
                     saved_by, save_seq)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING",
                &[&s.job_id, &s.tenant, &status, &text, &now, &runs, &holder, &until, &node, &self.seq],
            )
            .await?
        } else {
            c.execute(
                "INSERT INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms, runs, lease_node, lease_until_ms,
                     saved_by, save_seq)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, snapshot = excluded.snapshot,
                     updated_ms = excluded.updated_ms, runs = excluded.runs, lease_node = excluded.lease_node,
                     lease_until_ms = excluded.lease_until_ms, saved_by = excluded.saved_by, save_seq = excluded.save_seq
                 WHERE (jobs.lease_node IS NULL OR jobs.lease_node = excluded.saved_by OR jobs.lease_until_ms < $5)
                     AND NOT (jobs.saved_by = excluded.saved_by AND jobs.save_seq >= excluded.save_seq)
                     AND NOT (jobs.runs AND jobs.status = ANY($11) AND excluded.status <> ALL($11))",
                &[&s.job_id, &s.tenant, &status, &text, &now, &runs, &holder, &until, &node, &self.seq, &ended],
            )
            .await?
        };
        if n == 1 && job.spec.is_some() && upload_done(job) {
            c.execute("DELETE FROM upload_parts WHERE job_id = $1", &[&s.job_id]).await?;
        }
        Ok(n == 1)
    }

    async fn job(&self, c: &impl GenericClient, id: Uuid, lock: bool) -> Result<Option<JobRecord>, StoreError> {
        let sql = if lock {
            "SELECT snapshot FROM jobs WHERE id = $1 FOR UPDATE"
        } else {
            "SELECT snapshot FROM jobs WHERE id = $1"
        };
        let row = c.query_opt(sql, &[&id]).await?;
        Ok(row.and_then(|r| parse_job(r.get::<_, &str>(0))))
    }

    async fn update(&self, id: Uuid, change: DecideChange) -> Result<Result<(), Refusal>, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let current = self.job(&tx, id, true).await?;
        let existed = current.is_some();
        match change(current.as_ref()) {
            JobChange::Save(job) => {
                // A job that did not exist is only inserted: when another node created it meanwhile,
                // the decision was made on a stale view, and the caller is told so.
                if !self.save(&tx, &job, !existed).await? {
                    return Err(StoreError::new(format!(
                        "job {id} was changed by another node at the same moment (or is leased by one); try again"
                    )));
                }
                tx.commit().await?;
                Ok(Ok(()))
            }
            JobChange::Keep => Ok(Ok(())),
            JobChange::Refuse(why) => Ok(Err(why)),
        }
    }

    async fn reserve(&self, id: Uuid, tenant: &str, max: usize) -> Result<Option<JobRecord>, StoreError> {
        let mut client = self.pool.get().await?;
        let c = client.transaction().await?;
        let (now, pending) = (now_ms(), JobStatus::Pending.as_str());
        let renewed = c
            .execute(
                "UPDATE jobs SET updated_ms = $3 WHERE id = $1 AND tenant = $2 AND status = $4",
                &[&id, &tenant, &now, &pending],
            )
            .await?;
        if renewed == 0 && self.job(&c, id, false).await?.is_none() {
            // One count at a time per tenant, so two nodes reserving at once cannot both pass the limit.
            c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("jobcast-reserve/{tenant}")]).await?;
            let held: i64 = c
                .query_one("SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status = $2", &[&tenant, &pending])
                .await?
                .get(0);
            if held as usize >= max {
                return Ok(None);
            }
            let job = JobRecord { snapshot: JobSnapshot::reservation(id, tenant), spec: None };
            self.save(&c, &job, true).await?;
        }
        let job = self.job(&c, id, false).await?;
        c.commit().await?;
        job.map(Some).ok_or_else(|| StoreError::new(format!("job {id} vanished")))
    }

    async fn append(&self, events: Vec<StoredEvent>) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let ins = tx
            .prepare(
                "INSERT INTO events (room, seq, created_ms, envelope) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (room, seq) DO UPDATE SET created_ms = excluded.created_ms, envelope = excluded.envelope",
            )
            .await?;
        for e in &events {
            tx.execute(&ins, &[&e.room, &(e.seq as i64), &e.created_ms, &e.envelope]).await?;
        }
        let mut seen = std::collections::HashSet::new();
        for e in events.iter().rev() {
            if seen.insert(e.room.as_str()) {
                tx.execute(
                    "INSERT INTO rooms (room, epoch, last_seq) VALUES ($1, $2, $3) ON CONFLICT (room) DO UPDATE
                     SET epoch = excluded.epoch, last_seq = GREATEST(rooms.last_seq, excluded.last_seq)",
                    &[&e.room, &e.epoch, &(e.seq as i64)],
                )
                .await?;
                if e.seq as usize > self.keep {
                    let cut = (e.seq as usize - self.keep) as i64;
                    tx.execute("DELETE FROM events WHERE room = $1 AND seq <= $2", &[&e.room, &cut]).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_expired(&self, limit: i64, except: &[Uuid]) -> Result<Vec<Claimed>, StoreError> {
        let c = self.leases.get().await?;
        let ended = statuses(&[JobStatus::Pending, JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled]);
        let rows = c
            .query(
                "WITH c AS (
                     SELECT id, lease_node AS was FROM jobs
                     WHERE runs AND lease_until_ms < $3 AND status <> ALL($4) AND id <> ALL($6)
                     ORDER BY created_ms LIMIT $5 FOR UPDATE SKIP LOCKED)
                 UPDATE jobs SET lease_node = $1, lease_until_ms = $2 FROM c WHERE jobs.id = c.id
                 RETURNING jobs.snapshot, jobs.cancel_by, c.was IS NULL",
                &[&self.node, &self.lease_until(), &now_ms(), &ended, &limit, &except],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(Claimed { job: parse_job(r.get::<_, &str>(0))?, cancel_by: r.get(1), handed_over: r.get(2) })
            })
            .collect())
    }

    async fn save_upload(&self, job_id: Uuid, path: PathBuf) -> Result<u64, StoreError> {
        use tokio::io::AsyncReadExt;
        let io = |e: std::io::Error| StoreError::new(format!("{}: {e}", path.display()));
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("DELETE FROM upload_parts WHERE job_id = $1", &[&job_id]).await?;
        let ins = tx.prepare("INSERT INTO upload_parts (job_id, part, data) VALUES ($1, $2, $3)").await?;
        let (mut part, mut total) = (0i32, 0u64);
        let mut buf = Vec::with_capacity(UPLOAD_PART);
        loop {
            buf.clear();
            while buf.len() < UPLOAD_PART {
                let n = (&mut file).take((UPLOAD_PART - buf.len()) as u64).read_to_end(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
            }
            if buf.is_empty() && part > 0 {
                break;
            }
            tx.execute(&ins, &[&job_id, &part, &buf.as_slice()]).await?;
            total += buf.len() as u64;
            part += 1;
            if buf.len() < UPLOAD_PART {
                break;
            }
        }
        tx.commit().await?;
        Ok(total)
    }

    async fn restore_upload(&self, job_id: Uuid, to: PathBuf) -> Result<bool, StoreError> {
        let io = |e: std::io::Error| StoreError::new(format!("{}: {e}", to.display()));
        let c = self.pool.get().await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&job_id];
        let rows = c
            .query_raw("SELECT data FROM upload_parts WHERE job_id = $1 ORDER BY part", params.iter().copied())
            .await?;
        futures_util::pin_mut!(rows);
        let partial = to.with_extension("partial");
        let mut file = tokio::fs::OpenOptions::from(crate::files::private_options())
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .await
            .map_err(io)?;
        let mut parts = 0;
        while let Some(row) = rows.next().await {
            file.write_all(row?.get::<_, &[u8]>(0)).await.map_err(io)?;
            parts += 1;
        }
        file.sync_all().await.map_err(io)?;
        drop(file);
        if parts == 0 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Ok(false);
        }
        tokio::fs::rename(&partial, &to).await.map_err(io)?;
        Ok(true)
    }
}

impl Handler<AppendEvents> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: AppendEvents, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move { c.append(msg.0).await })
    }
}

impl Handler<EventsAfter> for PgStore {
    type Result = ResponseFuture<Result<Vec<(u64, i64, String)>, StoreError>>;
    fn handle(&mut self, m: EventsAfter, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let (seq, limit) = (m.seq as i64, m.limit as i64);
            let rows = client
                .query(
                    "SELECT seq, created_ms, envelope FROM events WHERE room = $1 AND seq > $2 AND seq <= $2 + $4
                     AND created_ms >= $3 ORDER BY seq LIMIT $4",
                    &[&m.room, &seq, &m.min_created_ms, &limit],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get(2))).collect())
        })
    }
}

impl Handler<ExpireEvents> for PgStore {
    type Result = ResponseFuture<Result<usize, StoreError>>;
    fn handle(&mut self, m: ExpireEvents, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            Ok(client.execute("DELETE FROM events WHERE created_ms < $1", &[&m.before_ms]).await? as usize)
        })
    }
}

impl Handler<SaveJob> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: SaveJob, _: &mut Context<Self>) -> Self::Result {
        self.run_for(m.0.snapshot.job_id, move |c| async move {
            let client = c.pool.get().await?;
            if c.save(&client, &m.0, false).await? {
                Ok(())
            } else {
                let id = m.0.snapshot.job_id;
                tracing::warn!(job = %id, "job not saved: another node holds its lease (it took the job over)");
                Err(StoreError::new(format!("job {id} is leased by another node")))
            }
        })
    }
}

impl Handler<GetJob> for PgStore {
    type Result = ResponseFuture<Result<Option<JobRecord>, StoreError>>;
    fn handle(&mut self, m: GetJob, _: &mut Context<Self>) -> Self::Result {
        self.run_for(m.0, move |c| async move {
            let client = c.pool.get().await?;
            c.job(&client, m.0, false).await
        })
    }
}

impl Handler<UpdateJob> for PgStore {
    type Result = ResponseFuture<Result<Result<(), Refusal>, StoreError>>;
    fn handle(&mut self, m: UpdateJob, _: &mut Context<Self>) -> Self::Result {
        self.run_for(m.id, move |c| async move { c.update(m.id, m.change).await })
    }
}

impl Handler<ReserveJob> for PgStore {
    type Result = ResponseFuture<Result<Option<JobRecord>, StoreError>>;
    fn handle(&mut self, m: ReserveJob, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move { c.reserve(m.id, &m.tenant, m.max).await })
    }
}

impl Handler<StaleReservations> for PgStore {
    type Result = ResponseFuture<Result<Vec<Uuid>, StoreError>>;
    fn handle(&mut self, m: StaleReservations, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let rows = client
                .query(
                    "SELECT id FROM jobs WHERE status = $1 AND updated_ms < $2 LIMIT 10000",
                    &[&JobStatus::Pending.as_str(), &m.before_ms],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }
}

impl Handler<DeleteReservations> for PgStore {
    type Result = ResponseFuture<Result<usize, StoreError>>;
    fn handle(&mut self, m: DeleteReservations, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let n = client
                .execute(
                    "DELETE FROM jobs WHERE id = ANY($1) AND status = $2 AND updated_ms < $3",
                    &[&m.ids, &JobStatus::Pending.as_str(), &m.before_ms],
                )
                .await?;
            Ok(n as usize)
        })
    }
}

impl Handler<ListJobs> for PgStore {
    type Result = ResponseFuture<Result<Vec<JobSnapshot>, StoreError>>;
    fn handle(&mut self, m: ListJobs, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let rows = client
                .query(
                    "SELECT snapshot FROM jobs WHERE ($1::TEXT IS NULL OR tenant = $1) AND status <> $2
                     ORDER BY created_ms DESC, id LIMIT $3",
                    &[&m.tenant, &JobStatus::Pending.as_str(), &(m.limit as i64)],
                )
                .await?;
            Ok(rows.iter().filter_map(|r| parse_job(r.get::<_, &str>(0))).map(|j| j.snapshot).collect())
        })
    }
}

impl Handler<Ping> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let ping = async {
                c.leases.get().await?.query_one("SELECT 1", &[]).await?;
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(2), ping)
                .await
                .unwrap_or_else(|_| Err(StoreError::new("postgres did not answer within 2 s")))
        })
    }
}

/// Renew this node's leases on `jobs` (those it has queued or running); answers the ones it still
/// holds, each with who asked to cancel it when someone did (a cancel that reached no node over
/// the control channel). A job missing from the answer was taken over by another node (this one
/// could not renew in time): its actor here must stop.
#[derive(Message)]
#[rtype(result = "Result<Vec<(Uuid, Option<String>)>, StoreError>")]
pub struct RenewLeases(pub Vec<Uuid>);

/// Take over up to `limit` jobs whose lease expired (their node died, lost the database for
/// longer than a lease, or stopped and gave its leases up), except the jobs this node has live.
#[derive(Message)]
#[rtype(result = "Result<Vec<Claimed>, StoreError>")]
pub struct ClaimExpired {
    /// At most this many.
    pub limit: i64,
    /// The jobs this node runs or is taking over already.
    pub except: Vec<Uuid>,
}

/// A job taken over, now leased to this node.
pub struct Claimed {
    /// The job as its last node saved it.
    pub job: JobRecord,
    /// Who asked to cancel it meanwhile, when someone did.
    pub cancel_by: Option<String>,
    /// Its node gave the lease up when it stopped (so this is no resume after a crash).
    pub handed_over: bool,
}

/// Record a cancel of a job no live node runs (its node died and its lease has not expired yet):
/// the node that takes it over cancels it instead of running it. Answers whether the job was
/// still unfinished.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct RequestCancel {
    /// The job.
    pub job_id: Uuid,
    /// Who asked.
    pub by: String,
}

impl Handler<RequestCancel> for PgStore {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: RequestCancel, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let ended = statuses(&[JobStatus::Pending, JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled]);
            let n = client
                .execute(
                    "UPDATE jobs SET cancel_by = $2 WHERE id = $1 AND runs AND status <> ALL($3)",
                    &[&m.job_id, &m.by, &ended],
                )
                .await?;
            Ok(n == 1)
        })
    }
}

/// Give up this node's leases on `jobs` at once (a graceful stop), so another node takes them
/// over without waiting for them to expire.
#[derive(Message)]
#[rtype(result = "Result<u64, StoreError>")]
pub struct ReleaseLeases(pub Vec<Uuid>);

/// Keep a job's uploaded file in the database (any node that takes the job over can read it);
/// answers its size.
#[derive(Message)]
#[rtype(result = "Result<u64, StoreError>")]
pub struct SaveUpload {
    /// The job.
    pub job_id: Uuid,
    /// The file as received.
    pub path: PathBuf,
}

/// Write a job's kept upload to `to` on this node; answers whether the database had it.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct RestoreUpload {
    /// The job.
    pub job_id: Uuid,
    /// Where the file goes.
    pub to: PathBuf,
}

impl Handler<RenewLeases> for PgStore {
    type Result = ResponseFuture<Result<Vec<(Uuid, Option<String>)>, StoreError>>;
    fn handle(&mut self, m: RenewLeases, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            if m.0.is_empty() {
                return Ok(Vec::new());
            }
            let client = c.leases.get().await?;
            let rows = client
                .query(
                    "UPDATE jobs SET lease_until_ms = $2 WHERE id = ANY($1) AND lease_node = $3 RETURNING id, cancel_by",
                    &[&m.0, &c.lease_until(), &c.node],
                )
                .await?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }
}

impl Handler<ClaimExpired> for PgStore {
    type Result = ResponseFuture<Result<Vec<Claimed>, StoreError>>;
    fn handle(&mut self, m: ClaimExpired, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move { c.claim_expired(m.limit, &m.except).await })
    }
}

impl Handler<ReleaseLeases> for PgStore {
    type Result = ResponseFuture<Result<u64, StoreError>>;
    fn handle(&mut self, m: ReleaseLeases, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            // No node's, and newer than any save of this node's still on its way.
            let client = c.leases.get().await?;
            let n = client
                .execute(
                    "UPDATE jobs SET lease_node = NULL, lease_until_ms = 0, saved_by = $2, save_seq = $3
                     WHERE id = ANY($1) AND lease_node = $2",
                    &[&m.0, &c.node, &c.seq],
                )
                .await?;
            Ok(n)
        })
    }
}

/// Take the lease of one job now, unless another node holds it: a worker's report reached this
/// node and the job's actor is nowhere (its lease expired, or it was never leased), or is on a node
/// the cluster says is dead (`from`: its lease is taken from it). Answers the job when it is now
/// this node's, else who holds it.
#[derive(Message)]
#[rtype(result = "Result<TakeLease, StoreError>")]
pub struct TakeJob {
    /// The job.
    pub job_id: Uuid,
    /// A dead node whose lease on it may be taken.
    pub from: Option<String>,
}

/// What [`TakeJob`] found.
pub enum TakeLease {
    /// Leased to this node now (or already was).
    Taken(Box<Claimed>),
    /// A live lease of that node.
    HeldBy(String),
    /// No such job, or it ended, or no node runs it.
    NotLeased,
}

impl Handler<TakeJob> for PgStore {
    type Result = ResponseFuture<Result<TakeLease, StoreError>>;
    fn handle(&mut self, m: TakeJob, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.leases.get().await?;
            let ended = statuses(&[JobStatus::Pending, JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled]);
            let taken = client
                .query_opt(
                    "WITH c AS (
                         SELECT id, lease_node AS was FROM jobs
                         WHERE id = $3 AND runs AND status <> ALL($4)
                             AND (lease_node IS NULL OR lease_node = $1 OR lease_until_ms < $5 OR lease_node = $6)
                         FOR UPDATE)
                     UPDATE jobs SET lease_node = $1, lease_until_ms = $2 FROM c WHERE jobs.id = c.id
                     RETURNING jobs.snapshot, jobs.cancel_by, c.was IS NULL",
                    &[&c.node, &c.lease_until(), &m.job_id, &ended, &now_ms(), &m.from],
                )
                .await?;
            if let Some(r) = taken {
                let job = parse_job(r.get::<_, &str>(0))
                    .ok_or_else(|| StoreError::new(format!("job {} does not parse", m.job_id)))?;
                return Ok(TakeLease::Taken(Box::new(Claimed { job, cancel_by: r.get(1), handed_over: r.get(2) })));
            }
            let holder = client
                .query_opt(
                    "SELECT lease_node FROM jobs WHERE id = $1 AND runs AND status <> ALL($2) AND lease_node IS NOT NULL",
                    &[&m.job_id, &ended],
                )
                .await?;
            Ok(match holder.and_then(|r| r.get::<_, Option<String>>(0)) {
                Some(node) => TakeLease::HeldBy(node),
                None => TakeLease::NotLeased,
            })
        })
    }
}

/// Undo an upload's claim on its job id when its file could not be kept (the client was answered
/// 503): the id goes back to being its tenant's reservation, so the same upload can be tried again,
/// and no node takes over a job without its upload.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Unclaim {
    /// The job.
    pub job_id: Uuid,
    /// Its tenant.
    pub tenant: String,
}

impl Handler<Unclaim> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: Unclaim, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let mut client = c.pool.get().await?;
            let tx = client.transaction().await?;
            let job = JobRecord { snapshot: JobSnapshot::reservation(m.job_id, &m.tenant), spec: None };
            c.save(&tx, &job, false).await?;
            tx.execute("DELETE FROM upload_parts WHERE job_id = $1", &[&m.job_id]).await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl Handler<SaveUpload> for PgStore {
    type Result = ResponseFuture<Result<u64, StoreError>>;
    fn handle(&mut self, m: SaveUpload, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move { c.save_upload(m.job_id, m.path).await })
    }
}

impl Handler<RestoreUpload> for PgStore {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: RestoreUpload, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move { c.restore_upload(m.job_id, m.to).await })
    }
}
