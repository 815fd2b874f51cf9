//! The event and job store: room history with its epoch, and jobs, in `jobcast.db` (imported rows
//! and zone reports are in the row store, `rows.db`, a database of its own).
//!
//! [`Store`] is a plain struct over one connection; [`StoreActor`] runs it on a sync arbiter so no
//! query ever blocks an I/O arbiter. Every write goes through that one connection: its page cache
//! stays warm (a connection that sees another's commit must drop its cache), and writers never wait
//! on SQLite's busy handler. `store = memory` uses shared in-memory databases with the same schema
//! and code.
//!
//! Guarantee: a batch of events is committed before any member can see one of them (the broker waits
//! for [`AppendEvents`]).

use std::path::PathBuf;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::protocol::{JobSnapshot, JobStatus};

use crate::db::sqlite::{connect, migrate, now_ms, Location, StoreError};

/// The first schema; its `zones` and `transactions` moved to `rows.db` (the row store's).
pub(crate) const LEGACY_V1: &str =
    "CREATE TABLE rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL, last_seq INTEGER NOT NULL);
     CREATE TABLE events (room TEXT NOT NULL, seq INTEGER NOT NULL, created_ms INTEGER NOT NULL,
         envelope TEXT NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
     CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL,
         snapshot TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
     CREATE INDEX jobs_by_tenant ON jobs (tenant, created_ms);
     CREATE TABLE zones (job_id TEXT NOT NULL, zone_index INTEGER NOT NULL, report TEXT NOT NULL,
         PRIMARY KEY (job_id, zone_index)) WITHOUT ROWID;
     CREATE TABLE transactions (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, key BLOB NOT NULL,
         job_id TEXT NOT NULL, line INTEGER NOT NULL, date TEXT NOT NULL, amount_cents INTEGER NOT NULL,
         description TEXT NOT NULL, category TEXT NOT NULL, UNIQUE (tenant, key));";

/// Versioned migrations, applied in order; a database records the highest applied. Before 2 runs,
/// [`crate::db::open`] has copied the rows and zone reports of version 1 to `rows.db`.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, LEGACY_V1),
    (2, "DROP TABLE zones; DROP TABLE transactions;"),
    // Webhooks, their outbox and delivery log (`db::outbox`).
    (
        3,
        "CREATE TABLE webhooks (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, url TEXT NOT NULL,
         events TEXT NOT NULL, secret TEXT NOT NULL, created_ms INTEGER NOT NULL);
     CREATE TABLE webhook_outbox (msg_id TEXT NOT NULL, webhook_id TEXT NOT NULL, body TEXT NOT NULL,
         attempts INTEGER NOT NULL, next_at_ms INTEGER NOT NULL, claimed_until_ms INTEGER,
         PRIMARY KEY (msg_id, webhook_id));
     CREATE INDEX webhook_due ON webhook_outbox (next_at_ms);
     CREATE TABLE webhook_attempts (webhook_id TEXT NOT NULL, msg_id TEXT NOT NULL, attempt INTEGER NOT NULL,
         at_ms INTEGER NOT NULL, status INTEGER, error TEXT, PRIMARY KEY (webhook_id, at_ms, msg_id, attempt));",
    ),
];

/// One event to append.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The room.
    pub room: String,
    /// The room's epoch.
    pub epoch: String,
    /// Its `seq`.
    pub seq: u64,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// The JSON envelope.
    pub envelope: String,
}

/// A room's position as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomCursor {
    /// The room.
    pub room: String,
    /// Its epoch.
    pub epoch: String,
    /// Its newest `seq`.
    pub last_seq: u64,
}

/// What a CSV job runs; kept with its snapshot (never shown to clients) so a restart can resume it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobSpec {
    /// The job id (the client's `batch_id` when given).
    pub job_id: Uuid,
    /// Owner's tenant.
    pub tenant: String,
    /// Owner.
    pub user_id: String,
    /// The name the client gave the file.
    pub filename: String,
    /// Where the upload is stored.
    pub path: PathBuf,
    /// Its size.
    pub size_bytes: u64,
    /// How many starts of the server have resumed this job (counted before each resume, so a job
    /// whose work brings the process down is counted too).
    #[serde(default)]
    pub resumes: u32,
}

/// A job as stored: its public snapshot and, for jobs jobcast runs itself, their spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// What clients see.
    #[serde(flatten)]
    pub snapshot: JobSnapshot,
    /// What the job runs; `None` for reservations and external jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
}

impl JobRecord {
    /// A job that runs elsewhere: created by `POST /api/v1/jobs`, reported by its worker.
    pub fn is_worker_job(&self) -> bool {
        self.spec.is_none() && self.snapshot.stages.is_some()
    }

    /// A job some node runs (one of jobcast's own, an export, or the actor taking a worker's
    /// reports): with a shared store, that node holds a lease on it.
    pub fn is_leased(&self) -> bool {
        // `export`: `jobs::export::EXPORT` (its spec is in the snapshot's metadata).
        self.spec.is_some() || self.is_worker_job() || self.snapshot.kind.as_deref() == Some("export")
    }
}

/// A stored job; one that no longer parses is logged and treated as absent.
fn parse_job(text: &str) -> Option<JobRecord> {
    serde_json::from_str(text).map_err(|e| tracing::error!(error = %e, "a stored job does not parse")).ok()
}

/// One connection to the database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating and migrating when needed) the database.
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        let conn = connect(location, 8_192)?;
        migrate(&conn, MIGRATIONS)?;
        // Claims on webhook messages are this process's alone: one that died mid-attempt left them.
        conn.execute("UPDATE webhook_outbox SET claimed_until_ms = NULL WHERE claimed_until_ms IS NOT NULL", [])?;
        Ok(Store { conn })
    }

    /// Every room's epoch and newest `seq`.
    pub fn room_cursors(&self) -> Result<Vec<RoomCursor>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT room, epoch, last_seq FROM rooms")?;
        let rows = stmt.query_map([], |r| {
            Ok(RoomCursor { room: r.get(0)?, epoch: r.get(1)?, last_seq: r.get::<_, i64>(2)? as u64 })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Appends events in one transaction, keeping at most `keep` per room.
    pub fn append_events(&mut self, events: &[StoredEvent], keep: usize) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO events (room, seq, created_ms, envelope) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut cur = tx.prepare_cached(
                "INSERT INTO rooms (room, epoch, last_seq) VALUES (?1, ?2, ?3)
                 ON CONFLICT (room) DO UPDATE SET epoch = excluded.epoch, last_seq = MAX(last_seq, excluded.last_seq)",
            )?;
            let mut trim = tx.prepare_cached("DELETE FROM events WHERE room = ?1 AND seq <= ?2")?;
            for e in events {
                ins.execute(params![e.room, e.seq as i64, e.created_ms, e.envelope])?;
            }
            // The last event of each room carries its cursor.
            let mut seen = std::collections::HashSet::new();
            for e in events.iter().rev() {
                if seen.insert(e.room.as_str()) {
                    cur.execute(params![e.room, e.epoch, e.seq as i64])?;
                    if e.seq as usize > keep {
                        trim.execute(params![e.room, (e.seq as usize - keep) as i64])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Events of `room` after `seq`, oldest first, at most `limit`, not older than `min_created_ms`.
    pub fn events_after(
        &self,
        room: &str,
        seq: u64,
        limit: usize,
        min_created_ms: i64,
    ) -> Result<Vec<(u64, i64, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, created_ms, envelope FROM events WHERE room = ?1 AND seq > ?2 AND seq <= ?2 + ?4
             AND created_ms >= ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![room, seq as i64, min_created_ms, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)?, r.get::<_, String>(2)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes events older than `before_ms`.
    pub fn expire_events(&self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM events WHERE created_ms < ?1", [before_ms])?)
    }

    /// Creates or replaces a job's row (indexed by its snapshot's tenant and status).
    pub fn save_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(job).map_err(|e| StoreError::new(e.to_string()))?;
        let s = &job.snapshot;
        self.conn
            .prepare_cached(
                "INSERT INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, snapshot = excluded.snapshot, updated_ms = excluded.updated_ms",
            )?
            .execute(params![s.job_id.to_string(), s.tenant, s.status.as_str(), text, now_ms()])?;
        Ok(())
    }

    /// Reserves a job id for a tenant (a client subscribing before its upload); answers the job,
    /// which belongs to another tenant when the id was taken first. A reservation the tenant already
    /// has is renewed (so it does not expire while clients keep subscribing). `None` when the tenant
    /// already holds `max` reservations.
    pub fn reserve_job(&self, id: Uuid, tenant: &str, max: usize) -> Result<Option<JobRecord>, StoreError> {
        let now = now_ms();
        let renewed = self
            .conn
            .prepare_cached("UPDATE jobs SET updated_ms = ?3 WHERE id = ?1 AND tenant = ?2 AND status = ?4")?
            .execute(params![id.to_string(), tenant, now, JobStatus::Pending.as_str()])?;
        if renewed == 0 && self.job(id)?.is_none() {
            let held: i64 = self.conn.query_row(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ?1 AND status = ?2",
                params![tenant, JobStatus::Pending.as_str()],
                |r| r.get(0),
            )?;
            if held as usize >= max {
                return Ok(None);
            }
            let pending = JobRecord { snapshot: JobSnapshot::reservation(id, tenant), spec: None };
            let text = serde_json::to_string(&pending).map_err(|e| StoreError::new(e.to_string()))?;
            self.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                )?
                .execute(params![id.to_string(), tenant, JobStatus::Pending.as_str(), text, now])?;
        }
        self.job(id)?.map(Some).ok_or_else(|| StoreError::new(format!("job {id} vanished")))
    }

    /// Reservations not renewed since `before_ms`.
    pub fn stale_reservations(&self, before_ms: i64) -> Result<Vec<Uuid>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT id FROM jobs WHERE status = ?1 AND updated_ms < ?2 LIMIT 10000")?;
        let ids = stmt.query_map(params![JobStatus::Pending.as_str(), before_ms], |r| r.get::<_, String>(0))?;
        Ok(ids.filter_map(|id| id.ok().and_then(|id| Uuid::parse_str(&id).ok())).collect())
    }

    /// Deletes those of `ids` that are still reservations not renewed since `before_ms`.
    pub fn delete_reservations(&self, ids: &[Uuid], before_ms: i64) -> Result<usize, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("DELETE FROM jobs WHERE id = ?1 AND status = ?2 AND updated_ms < ?3")?;
        let mut n = 0;
        for id in ids {
            n += stmt.execute(params![id.to_string(), JobStatus::Pending.as_str(), before_ms])?;
        }
        Ok(n)
    }

    /// A job.
    pub fn job(&self, id: Uuid) -> Result<Option<JobRecord>, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT snapshot FROM jobs WHERE id = ?1", [id.to_string()], |r| r.get(0))
            .optional()?;
        Ok(text.and_then(|t| parse_job(&t)))
    }

    /// Snapshots of a tenant's jobs (all tenants when `None`), newest first; reservations are not
    /// jobs yet.
    pub fn jobs(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<JobSnapshot>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT snapshot FROM jobs WHERE (?1 IS NULL OR tenant = ?1) AND status != ?2 ORDER BY created_ms DESC, id LIMIT ?3",
        )?;
        let rows =
            stmt.query_map(params![tenant, JobStatus::Pending.as_str(), limit as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.filter_map(|r| r.ok()).filter_map(|t| parse_job(&t)).map(|j| j.snapshot).collect())
    }

    /// Jobs that had not ended when the server stopped (neither reservations nor terminal).
    pub fn unfinished_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let [completed, failed, cancelled] = JobStatus::TERMINAL.map(|s| s.as_str().to_string());
        let mut stmt =
            self.conn.prepare("SELECT snapshot FROM jobs WHERE status NOT IN (?1, ?2, ?3, ?4) ORDER BY created_ms")?;
        let rows = stmt
            .query_map(params![JobStatus::Pending.as_str(), completed, failed, cancelled], |r| r.get::<_, String>(0))?;
        Ok(rows.filter_map(|r| r.ok()).filter_map(|t| parse_job(&t)).collect())
    }

    /// A cheap query proving the database answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}

/// The store actor: a [`Store`] on a sync arbiter.
pub struct StoreActor {
    store: Store,
    /// Events kept per room.
    keep: usize,
}

impl StoreActor {
    /// The connection, for the handlers of other files (`db::outbox`).
    pub(crate) fn conn(&self) -> &rusqlite::Connection {
        &self.store.conn
    }

    /// Wraps an open store.
    pub fn new(store: Store, keep: usize) -> Self {
        StoreActor { store, keep }
    }
}

impl Actor for StoreActor {
    type Context = SyncContext<Self>;
}

/// Append a batch of events.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct AppendEvents(pub Vec<StoredEvent>);

/// Events of a room after a `seq`: `(seq, created_ms, envelope)`.
#[derive(Message)]
#[rtype(result = "Result<Vec<(u64, i64, String)>, StoreError>")]
pub struct EventsAfter {
    /// The room.
    pub room: String,
    /// After this `seq`.
    pub seq: u64,
    /// At most this many.
    pub limit: usize,
    /// Not older than this (Unix ms).
    pub min_created_ms: i64,
}

/// Delete events older than a time.
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct ExpireEvents {
    /// Unix ms.
    pub before_ms: i64,
}

/// Save a job.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct SaveJob(pub JobRecord);

/// A job (`None`: no such job).
#[derive(Message)]
#[rtype(result = "Result<Option<JobRecord>, StoreError>")]
pub struct GetJob(pub Uuid);

/// What [`UpdateJob`] does with a job.
pub enum JobChange {
    /// Save this.
    Save(Box<JobRecord>),
    /// Leave the stored job as it is.
    Keep,
    /// Nothing is saved, and the caller is told why.
    Refuse(Refusal),
}

/// Why a [`JobChange`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The caller may not touch this job (another tenant's).
    Forbidden,
    /// The change does not fit the job (for example a terminal event posted into a job the server runs).
    Conflict(String),
}

/// How [`UpdateJob`] decides, given the stored job (`None`: no such job).
pub type DecideChange = Box<dyn FnOnce(Option<&JobRecord>) -> JobChange + Send>;

/// Reads a job (`None`: no such job), decides on it and saves the result, all in one step of the
/// store's single writer, so two updates of the same job cannot interleave. Answers the refusal
/// when there was one.
#[derive(Message)]
#[rtype(result = "Result<Result<(), Refusal>, StoreError>")]
pub struct UpdateJob {
    /// Job id.
    pub id: Uuid,
    /// The decision.
    pub change: DecideChange,
}

/// Reserve a job id for a tenant; answers the job, or `None` when the tenant holds `max` reservations.
#[derive(Message)]
#[rtype(result = "Result<Option<JobRecord>, StoreError>")]
pub struct ReserveJob {
    /// The job id.
    pub id: Uuid,
    /// The tenant reserving it.
    pub tenant: String,
    /// The most reservations one tenant may hold.
    pub max: usize,
}

/// Reservations not renewed since `before_ms`.
#[derive(Message)]
#[rtype(result = "Result<Vec<Uuid>, StoreError>")]
pub struct StaleReservations {
    /// Unix ms.
    pub before_ms: i64,
}

/// Delete reservations (those still not renewed since `before_ms`).
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct DeleteReservations {
    /// Which.
    pub ids: Vec<Uuid>,
    /// Unix ms.
    pub before_ms: i64,
}

/// Snapshots of a tenant's jobs (`None`: all).
#[derive(Message)]
#[rtype(result = "Result<Vec<JobSnapshot>, StoreError>")]
pub struct ListJobs {
    /// The tenant.
    pub tenant: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// Whether the database answers.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Ping;

impl Handler<AppendEvents> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, msg: AppendEvents, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.append_events(&msg.0, self.keep)
    }
}

impl Handler<EventsAfter> for StoreActor {
    type Result = Result<Vec<(u64, i64, String)>, StoreError>;
    fn handle(&mut self, m: EventsAfter, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.events_after(&m.room, m.seq, m.limit, m.min_created_ms)
    }
}

impl Handler<ExpireEvents> for StoreActor {
    type Result = Result<usize, StoreError>;
    fn handle(&mut self, m: ExpireEvents, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.expire_events(m.before_ms)
    }
}

impl Handler<SaveJob> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: SaveJob, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.save_job(&m.0)
    }
}

impl Handler<GetJob> for StoreActor {
    type Result = Result<Option<JobRecord>, StoreError>;
    fn handle(&mut self, m: GetJob, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.job(m.0)
    }
}

impl Handler<UpdateJob> for StoreActor {
    type Result = Result<Result<(), Refusal>, StoreError>;
    fn handle(&mut self, m: UpdateJob, _: &mut SyncContext<Self>) -> Self::Result {
        let current = self.store.job(m.id)?;
        match (m.change)(current.as_ref()) {
            JobChange::Save(job) => {
                self.store.save_job(&job)?;
                Ok(Ok(()))
            }
            JobChange::Keep => Ok(Ok(())),
            JobChange::Refuse(why) => Ok(Err(why)),
        }
    }
}

impl Handler<ReserveJob> for StoreActor {
    type Result = Result<Option<JobRecord>, StoreError>;
    fn handle(&mut self, m: ReserveJob, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.reserve_job(m.id, &m.tenant, m.max)
    }
}

impl Handler<StaleReservations> for StoreActor {
    type Result = Result<Vec<Uuid>, StoreError>;
    fn handle(&mut self, m: StaleReservations, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.stale_reservations(m.before_ms)
    }
}

impl Handler<DeleteReservations> for StoreActor {
    type Result = Result<usize, StoreError>;
    fn handle(&mut self, m: DeleteReservations, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.delete_reservations(&m.ids, m.before_ms)
    }
}

impl Handler<ListJobs> for StoreActor {
    type Result = Result<Vec<JobSnapshot>, StoreError>;
    fn handle(&mut self, m: ListJobs, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.jobs(m.tenant.as_deref(), m.limit)
    }
}

impl Handler<Ping> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, _: Ping, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.ping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(room: &str, seq: u64) -> StoredEvent {
        StoredEvent {
            room: room.into(),
            epoch: "e1".into(),
            seq,
            created_ms: now_ms(),
            envelope: format!("{{\"seq\":{seq}}}"),
        }
    }

    #[test]
    fn events_survive_reopening_and_are_trimmed_per_room() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::file(dir.path().join("j.db"));
        {
            let mut s = Store::open(&loc).unwrap();
            s.append_events(&(1..=5).map(|i| ev("tenant:a", i)).collect::<Vec<_>>(), 3).unwrap();
            s.append_events(&[ev("tenant:b", 1)], 3).unwrap();
        }
        let s = Store::open(&loc).unwrap();
        let mut cursors = s.room_cursors().unwrap();
        cursors.sort_by(|a, b| a.room.cmp(&b.room));
        assert_eq!(cursors[0], RoomCursor { room: "tenant:a".into(), epoch: "e1".into(), last_seq: 5 });
        assert_eq!(
            s.events_after("tenant:a", 0, 100, 0).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(s.events_after("tenant:a", 3, 1, 0).unwrap().len(), 1);
        assert_eq!(s.events_after("tenant:a", 0, 100, now_ms() + 1000).unwrap().len(), 0);
    }

    fn job(tenant: &str, status: JobStatus) -> JobRecord {
        let mut snapshot = JobSnapshot::reservation(Uuid::new_v4(), tenant);
        snapshot.status = status;
        JobRecord { snapshot, spec: None }
    }

    #[test]
    fn jobs_round_trip_and_unfinished_ones_are_found() {
        let loc = Location::memory();
        let s = Store::open(&loc).unwrap();
        let (a, b) = (job("t1", JobStatus::Processing), job("t2", JobStatus::Completed));
        s.save_job(&a).unwrap();
        s.save_job(&b).unwrap();
        assert_eq!(s.job(a.snapshot.job_id).unwrap().unwrap(), a);
        assert_eq!(s.jobs(Some("t1"), 10).unwrap().len(), 1);
        assert_eq!(s.jobs(None, 10).unwrap().len(), 2);
        assert_eq!(s.unfinished_jobs().unwrap(), vec![a]);
        assert!(s.job(Uuid::new_v4()).unwrap().is_none());
        // A reservation is neither listed nor unfinished, and keeps its first tenant.
        let id = Uuid::new_v4();
        assert_eq!(s.reserve_job(id, "t1", 10).unwrap().unwrap().snapshot.status, JobStatus::Pending);
        assert_eq!(s.reserve_job(id, "t2", 10).unwrap().unwrap().snapshot.tenant, "t1");
        // A tenant holds at most `max`; its own are renewed, not counted again.
        assert!(s.reserve_job(id, "t1", 1).unwrap().is_some());
        assert!(s.reserve_job(Uuid::new_v4(), "t1", 1).unwrap().is_none());
        assert!(s.reserve_job(Uuid::new_v4(), "t2", 1).unwrap().is_some());
        // Stale ones go; a renewed one stays.
        let later = now_ms() + 1;
        assert_eq!(s.stale_reservations(later).unwrap().len(), 2);
        s.reserve_job(id, "t1", 10).unwrap();
        let stale = s.stale_reservations(later).unwrap();
        assert_eq!(s.delete_reservations(&[id], later - 1).unwrap(), 0, "renewed after the cut");
        assert_eq!(s.delete_reservations(&stale, later).unwrap(), stale.len());
        assert_eq!((s.jobs(None, 10).unwrap().len(), s.unfinished_jobs().unwrap().len()), (2, 1));
    }
}
