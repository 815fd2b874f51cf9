//! The PostgreSQL plumbing the shared stores use (cluster mode with `database_url`): a pool of
//! async connections (tokio-postgres behind deadpool), the schema named by `cluster_prefix`, and
//! versioned migrations that several nodes starting at once apply exactly once.
//!
//! Nothing here knows a table: `pg_store.rs` (jobs, uploads, events) and `pg_rows.rs` (imported rows,
//! zone reports) bring the schema and the queries.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::db::sqlite::StoreError;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message (constraint, syntax) when there is one; the transport's otherwise.
        match e.as_db_error() {
            Some(db) => StoreError::new(format!("postgres: {} ({})", db.message(), db.code().code())),
            None => StoreError::new(format!("postgres: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::new(format!("postgres unreachable: {e}"))
    }
}

/// Whether `e` says the server could not be reached or the connection broke (retrying later may
/// work), rather than that the statement itself was refused.
pub fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // No server code: transient only when the connection broke or could not be made (an
        // encoding or conversion error would fail again, and is not retried).
        None => e.is_closed() || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
        // Class 08 (connection exception), 53 (insufficient resources: too many connections, disk
        // full), 57P01..57P03 (admin shutdown, crash shutdown, cannot connect now), 40001/40P01
        // (serialization failure, deadlock: the transaction may be retried).
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c == "40001" || c == "40P01"
        }
    }
}

/// The schema's name as an SQL identifier (`cluster_prefix` is `[A-Za-z0-9_-]`, so quoting is enough).
pub fn schema_ident(prefix: &str) -> String {
    format!("\"{}\"", prefix.replace('"', ""))
}

/// A pool of at most `size` connections to `url`, each with `search_path` set to the schema of
/// `prefix`. Connecting waits at most 5 s; `wait` bounds the wait for a free connection (`None`:
/// as long as it takes, for work that must not be dropped).
pub fn pool(url: &str, prefix: &str, size: usize, wait: Option<Duration>) -> Result<Pool, StoreError> {
    let mut config: tokio_postgres::Config =
        url.parse().map_err(|e| StoreError::new(format!("database_url is not a PostgreSQL URL: {e}")))?;
    config.connect_timeout(Duration::from_secs(5));
    // A server (or the path to it) that vanished is noticed by TCP keepalives, and a transaction
    // left open by a node that vanished holds its locks for at most a minute.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    // Notices (a schema or temporary table that exists already) are not worth a log line each.
    config.options(format!(
        "-c search_path={} -c client_min_messages=warning -c idle_in_transaction_session_timeout=60000",
        schema_ident(prefix)
    ));
    config.application_name("jobcast");
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(5)))
        .wait_timeout(wait)
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::new(format!("postgres pool: {e}")))
}

/// Creates the schema when missing and applies the `migrations` newer than its version, all in one
/// transaction under an advisory lock, so nodes starting together neither race nor half-apply.
pub async fn migrate(pool: &Pool, prefix: &str, migrations: &[(i64, &str)], table: &str) -> Result<(), StoreError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    // One lock per schema: its stores migrate one after the other (and create the schema once).
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("jobcast-schema/{prefix}")]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.{table} (version BIGINT NOT NULL)",
        schema = schema_ident(prefix)
    ))
    .await?;
    let current: i64 = tx.query_one(&format!("SELECT COALESCE(MAX(version), 0) FROM {table}"), &[]).await?.get(0);
    for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await?;
        tx.execute(&format!("INSERT INTO {table} (version) VALUES ($1)"), &[version]).await?;
    }
    tx.commit().await?;
    Ok(())
}
