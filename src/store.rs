//! The durable store: room history with its epoch, and jobs, in SQLite (imported rows and zone
//! reports are in [`crate::row_store`], a database of their own).
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
use serde_json::Value;

/// The first schema; its `zones` and `transactions` moved to `rows.db` (see [`crate::row_store`]).
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
/// the rows and zone reports of version 1 are copied to `rows.db`.
const MIGRATIONS: &[(i64, &str)] = &[(1, LEGACY_V1), (2, "DROP TABLE zones; DROP TABLE transactions;")];

/// A store error, with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl StoreError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError(message.into())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// Where the database lives.
#[derive(Debug, Clone)]
pub struct Location {
    target: Target,
}

#[derive(Debug, Clone)]
enum Target {
    /// A file (`data_dir/jobcast.db`).
    File(PathBuf),
    /// A named in-memory database shared by this process's connections (lives while one is open).
    Memory(String),
}

impl Location {
    /// A database file.
    pub fn file(path: PathBuf) -> Location {
        Location { target: Target::File(path) }
    }

    /// A fresh in-memory database.
    pub fn memory() -> Location {
        Location { target: Target::Memory(format!("jobcast-{}", uuid::Uuid::new_v4().simple())) }
    }

    /// The location the configuration asks for.
    pub fn from_config(config: &crate::Config) -> Location {
        if config.store == "memory" {
            Location::memory()
        } else {
            Location::file(config.data_dir.join("jobcast.db"))
        }
    }

    /// Where the imported rows live: `rows.db` beside the main database.
    pub fn rows(&self) -> Location {
        Location {
            target: match &self.target {
                Target::File(path) => Target::File(path.with_file_name("rows.db")),
                Target::Memory(name) => Target::Memory(format!("{name}-rows")),
            },
        }
    }

    /// Whether the database may hold anything (a file that exists, or any in-memory database).
    pub fn exists(&self) -> bool {
        match &self.target {
            Target::File(path) => path.exists(),
            Target::Memory(_) => true,
        }
    }

    /// The name `ATTACH` takes.
    pub fn uri(&self) -> String {
        match &self.target {
            Target::File(path) => path.display().to_string(),
            Target::Memory(name) => format!("file:/{name}?vfs=memdb"),
        }
    }
}

/// Opens a connection to `location` in WAL mode with a page cache of `cache_kib` KiB.
pub(crate) fn connect(location: &Location, cache_kib: i64) -> Result<Connection, StoreError> {
    let conn = match &location.target {
        Target::File(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
            }
            let conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn
        }
        Target::Memory(_) => Connection::open_with_flags(
            // The memdb VFS shares one in-memory database between this process's connections
            // with ordinary locking, so the busy timeout works as it does for files.
            location.uri(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
                | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )?,
    };
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // A bounded page cache, and checkpoints every 128 MiB of WAL rather than every 4 MiB; after a
    // checkpoint the WAL file is cut back to 64 MiB instead of keeping its largest size on disk.
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.pragma_update(None, "wal_autocheckpoint", 32_768)?;
    conn.pragma_update(None, "journal_size_limit", 64 << 20)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    Ok(conn)
}

/// Applies the `migrations` newer than the database's version, calling `before(version)` ahead of each.
pub(crate) fn migrate(
    conn: &Connection,
    migrations: &[(i64, &str)],
    mut before: impl FnMut(i64) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", [])?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
        before(*version)?;
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applied = conn
            .execute_batch(sql)
            .and_then(|()| conn.execute("INSERT INTO schema_version (version) VALUES (?1)", [version]))
            .and_then(|_| conn.execute_batch("COMMIT"));
        if let Err(e) = applied {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e.into());
        }
    }
    Ok(())
}

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

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One connection to the database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating and migrating when needed) the database.
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        let conn = connect(location, 8_192)?;
        migrate(&conn, MIGRATIONS, |version| {
            if version == 2 {
                // Version 2 drops the rows of version 1: they go to `rows.db` first.
                crate::row_store::RowStore::open(location)?.adopt_legacy(location)?;
            }
            Ok(())
        })?;
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
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, envelope FROM events WHERE room = ?1 AND seq > ?2 AND created_ms >= ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![room, seq as i64, min_created_ms, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes events older than `before_ms`.
    pub fn expire_events(&self, before_ms: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM events WHERE created_ms < ?1", [before_ms])?)
    }

    /// Creates or replaces a job's row.
    pub fn save_job(&self, id: &str, tenant: &str, status: &str, snapshot: &Value) -> Result<(), StoreError> {
        let now = now_ms();
        self.conn
            .prepare_cached(
                "INSERT INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, snapshot = excluded.snapshot, updated_ms = excluded.updated_ms",
            )?
            .execute(params![id, tenant, status, snapshot.to_string(), now])?;
        Ok(())
    }

    /// Reserves a job id for a tenant (a client subscribing before its upload); answers the job's
    /// snapshot, which belongs to another tenant when the id was taken first.
    pub fn reserve_job(&self, id: &str, tenant: &str) -> Result<Value, StoreError> {
        let pending =
            serde_json::json!({ "job_id": id, "room": format!("job:{id}"), "tenant": tenant, "status": "pending" });
        let now = now_ms();
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO jobs (id, tenant, status, snapshot, created_ms, updated_ms) VALUES (?1, ?2, 'pending', ?3, ?4, ?4)",
            )?
            .execute(params![id, tenant, pending.to_string(), now])?;
        self.job(id)?.ok_or_else(|| StoreError(format!("job {id} vanished")))
    }

    /// A job's snapshot.
    pub fn job(&self, id: &str) -> Result<Option<Value>, StoreError> {
        let text: Option<String> =
            self.conn.query_row("SELECT snapshot FROM jobs WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Jobs of a tenant (all tenants when `None`), newest first.
    pub fn jobs(&self, tenant: Option<&str>, limit: usize) -> Result<Vec<Value>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT snapshot FROM jobs WHERE (?1 IS NULL OR tenant = ?1) AND status != 'pending' ORDER BY created_ms DESC, id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![tenant, limit as i64], |r| r.get::<_, String>(0))?;
        Ok(rows.filter_map(|r| r.ok()).filter_map(|t| serde_json::from_str(&t).ok()).collect())
    }

    /// Jobs that had not ended when the server stopped.
    pub fn unfinished_jobs(&self) -> Result<Vec<Value>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT snapshot FROM jobs WHERE status NOT IN ('pending', 'completed', 'failed', 'cancelled') ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.filter_map(|r| r.ok()).filter_map(|t| serde_json::from_str(&t).ok()).collect())
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

/// Events of a room after a `seq`.
#[derive(Message)]
#[rtype(result = "Result<Vec<(u64, String)>, StoreError>")]
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

/// Save a job's snapshot.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct SaveJob {
    /// Job id.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its status.
    pub status: String,
    /// Its snapshot.
    pub snapshot: Value,
}

/// A job's snapshot.
#[derive(Message)]
#[rtype(result = "Result<Option<Value>, StoreError>")]
pub struct GetJob(pub String);

/// What [`UpdateJob`] does with a snapshot.
pub enum JobChange {
    /// Save this snapshot (its `tenant` and `status` fields index it).
    Save(Value),
    /// Leave the stored snapshot as it is.
    Keep,
    /// The caller may not touch this job; nothing is saved.
    Refuse,
}

/// How [`UpdateJob`] decides, given the stored snapshot (`None`: no such job).
pub type DecideChange = Box<dyn FnOnce(Option<&Value>) -> JobChange + Send>;

/// Reads a job's snapshot (`None`: no such job), decides on it and saves the result, all in one step
/// of the store's single writer, so two updates of the same job cannot interleave. Answers false when
/// refused.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct UpdateJob {
    /// Job id.
    pub id: String,
    /// The decision.
    pub change: DecideChange,
}

/// Reserve a job id for a tenant; answers the job's snapshot.
#[derive(Message)]
#[rtype(result = "Result<Value, StoreError>")]
pub struct ReserveJob {
    /// The job id.
    pub id: String,
    /// The tenant reserving it.
    pub tenant: String,
}

/// Jobs of a tenant (`None`: all).
#[derive(Message)]
#[rtype(result = "Result<Vec<Value>, StoreError>")]
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
    type Result = Result<Vec<(u64, String)>, StoreError>;
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
        self.store.save_job(&m.id, &m.tenant, &m.status, &m.snapshot)
    }
}

impl Handler<GetJob> for StoreActor {
    type Result = Result<Option<Value>, StoreError>;
    fn handle(&mut self, m: GetJob, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.job(&m.0)
    }
}

impl Handler<UpdateJob> for StoreActor {
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, m: UpdateJob, _: &mut SyncContext<Self>) -> Self::Result {
        let current = self.store.job(&m.id)?;
        match (m.change)(current.as_ref()) {
            JobChange::Save(snapshot) => {
                let tenant = snapshot["tenant"].as_str().unwrap_or_default().to_string();
                let status = snapshot["status"].as_str().unwrap_or_default().to_string();
                self.store.save_job(&m.id, &tenant, &status, &snapshot)?;
                Ok(true)
            }
            JobChange::Keep => Ok(true),
            JobChange::Refuse => Ok(false),
        }
    }
}

impl Handler<ReserveJob> for StoreActor {
    type Result = Result<Value, StoreError>;
    fn handle(&mut self, m: ReserveJob, _: &mut SyncContext<Self>) -> Self::Result {
        self.store.reserve_job(&m.id, &m.tenant)
    }
}

impl Handler<ListJobs> for StoreActor {
    type Result = Result<Vec<Value>, StoreError>;
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

    #[test]
    fn jobs_round_trip_and_unfinished_ones_are_found() {
        let loc = Location::memory();
        let s = Store::open(&loc).unwrap();
        s.save_job("a", "t1", "processing", &serde_json::json!({"job_id": "a", "status": "processing"})).unwrap();
        s.save_job("b", "t2", "completed", &serde_json::json!({"job_id": "b", "status": "completed"})).unwrap();
        assert_eq!(s.job("a").unwrap().unwrap()["status"], "processing");
        assert_eq!(s.jobs(Some("t1"), 10).unwrap().len(), 1);
        assert_eq!(s.jobs(None, 10).unwrap().len(), 2);
        assert_eq!(s.unfinished_jobs().unwrap().len(), 1);
        assert!(s.job("zzz").unwrap().is_none());
    }
}
