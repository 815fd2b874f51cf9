//! The SQLite plumbing both stores use: where a database lives ([`Location`]), opening a connection
//! with jobcast's pragmas ([`connect`]), versioned migrations ([`migrate`]) and the one error type.
//!
//! Nothing here knows a table: the event/job store (`store.rs`) and the row store (`row_store.rs`)
//! each bring their own schema and open their own connection through these functions.

use std::path::PathBuf;

use rusqlite::Connection;

/// A store error, with the operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {message}")]
pub struct StoreError {
    message: String,
    lease_lost: bool,
}

impl StoreError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), lease_lost: false }
    }

    /// Cluster mode: the job's lease is another node's now (it took the job over), so this node
    /// must stop running it without a word.
    pub fn lease_lost(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), lease_lost: true }
    }

    /// Whether this is [`StoreError::lease_lost`].
    pub fn is_lease_lost(&self) -> bool {
        self.lease_lost
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::new(e.to_string())
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
pub fn connect(location: &Location, cache_kib: i64) -> Result<Connection, StoreError> {
    let conn = match &location.target {
        Target::File(path) => {
            if let Some(dir) = path.parent() {
                crate::files::private_dir(dir).map_err(|e| StoreError::new(format!("{}: {e}", dir.display())))?;
            }
            // Created 0600 before SQLite opens it, so its -wal and -shm files get that mode too.
            crate::files::private_file(path).map_err(|e| StoreError::new(format!("{}: {e}", path.display())))?;
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

/// Applies the `migrations` newer than the database's version, each in its own transaction.
pub fn migrate(conn: &Connection, migrations: &[(i64, &str)]) -> Result<(), StoreError> {
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)", [])?;
    let current: i64 = conn.query_row("SELECT COALESCE(MAX(version), 0) FROM schema_version", [], |r| r.get(0))?;
    for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
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

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
