//! jobcast: runs long document jobs zone by zone and streams their progress over WebSocket.
//!
//! # Layout
//! Folders name the layers, lowest first; each may use the ones before it, never one after.
//! - Top-level modules, used by every layer: [`protocol`] (the wire protocol v1 as serde types, the
//!   one serde boundary, with the job snapshot, statuses and close codes), `framing` (JSON text or
//!   gzip(msgpack) frames, encoded once per event), `config` (one [`Config`]), `auth` (JWTs,
//!   WebSocket tokens, the tenancy rule), `error` ([`ApiError`]), `metrics`, `files` (the data
//!   directory's modes).
//! - `db/`: SQLite plumbing, the event and job store, the row store (sync actors).
//! - `realtime/`: the broker, rooms, history, outboxes, ack buffers, the registry; and at its edge
//!   the WebSocket session, the one realtime file that also uses `jobs`.
//! - `jobs/`: the scheduler, job and zone actors, progress arithmetic, the CSV pipeline, and job
//!   access for callers (used by the session and the HTTP API).
//! - `http/`: routes, extractors, the WebSocket upgrade, the admin and jobs APIs.
//! - `cli/`: `jobcast import`, a client of the public protocol only.
//!
//! [`start`] takes an already-bound listener, so tests bind port 0 and call it; `main.rs` only parses
//! the command line. Modules are private: what tests, the load-test harness and the binary use is
//! re-exported here. `ARCHITECTURE.md` maps the actors and their messages.

#[cfg(test)]
mod alloc_probe;
mod auth;
mod cli;
mod config;
mod db;
mod error;
mod files;
mod framing;
mod http;
mod jobs;
mod metrics;
pub mod protocol;
mod quota;
mod realtime;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{middleware, web, App, HttpServer};

pub use auth::{load_or_create_secret, unix_now, Auth, AuthError, KeptSecret, KeyError};
pub use cli::import::{run as run_import, ImportError, Outcome as ImportOutcome};
pub use config::{Config, ConfigError, Settings};
pub use db::sqlite::StoreError;
pub use error::ApiError;
pub use framing::{decode_binary, DECODE_HEAP_BOUND, MAX_DECODED_BYTES, MAX_DECODED_VALUES};
pub use http::shared::Shared;

use crate::auth::Auth as Verifier;
use crate::db::sqlite::Location;
use crate::db::store::{Store, StoreActor};
use crate::db::{RowsAddr, StoreAddr};
use crate::jobs::lookup::JobAccess;
use crate::jobs::scheduler::{Scheduler, Submit};
use crate::jobs::zone::ZoneDeps;
use crate::metrics::Metrics;
use crate::realtime::broker::Broker;
use crate::realtime::redis::RedisEngine;
use crate::realtime::registry::{CloseAll, Count, Limits, Registry};
use crate::realtime::room::RoomSettings;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Keys or the secret could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The categorization rules could not be read.
    #[error("{0}")]
    Rules(String),
    /// The data directory could not be made.
    #[error("data directory {0}")]
    DataDir(String),
    /// `redis_url` is not a Redis URL.
    #[error("redis_url: {0}")]
    Redis(String),
    /// `conformance_echo` on a listener other machines can reach.
    #[error("--conformance-echo serves /ws/echo without authentication: it needs a loopback bind (127.0.0.0/8, ::1 or localhost), not {0}")]
    EchoNotLoopback(String),
    /// The listener could not be used.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Closes every connection with 1001, waits for them to go, then stops the HTTP server.
#[derive(Clone)]
pub struct Shutdown {
    server: actix_web::dev::ServerHandle,
    registry: Addr<Registry>,
    scheduler: Addr<Scheduler>,
    /// Set when a graceful stop began; see [`Running::wait`].
    graceful: Arc<std::sync::atomic::AtomicBool>,
}

/// The marker of a graceful stop, in the data directory.
const CLEAN_STOP: &str = "stopped_cleanly";

impl Shutdown {
    /// Graceful shutdown: every socket is closed with 1001 "server shutting down".
    pub async fn shutdown(&self) {
        let (code, reason) = protocol::close::SHUTTING_DOWN;
        let closing = self.registry.send(CloseAll { code, reason: reason.into() }).await.unwrap_or(0);
        tracing::info!(target: "audit", event = "shutdown", closing, "closing every connection");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.registry.send(Count).await {
                Ok(0) | Err(_) => break,
                Ok(_) => actix_rt::time::sleep(Duration::from_millis(20)).await,
            }
        }
        // With a shared store, other nodes take this node's jobs over at once.
        let _ = self.scheduler.send(jobs::scheduler::ReleaseAll).await;
        self.graceful.store(true, std::sync::atomic::Ordering::SeqCst);
        self.server.stop(true).await;
    }
}

/// A started server.
pub struct Running {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// What every handler shares (tests use it to mint tokens).
    pub shared: Shared,
    /// Stops it gracefully.
    pub shutdown: Shutdown,
    server: actix_web::dev::Server,
    /// Written once a graceful stop has ended: the next start knows the jobs it finds unfinished
    /// were stopped, not crashed, and does not count their resume against `jobs::job::MAX_RESUMES`.
    clean_stop: std::path::PathBuf,
}

impl Running {
    /// Runs until the server stops.
    pub async fn wait(self) -> std::io::Result<()> {
        let stopped = self.server.await;
        if self.shutdown.graceful.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = std::fs::write(&self.clean_stop, b"") {
                tracing::warn!(error = %e, "cannot mark the stop as clean; unfinished jobs will count it as a crash");
            }
        }
        stopped
    }
}

/// Listens on `addr` (`host:port`) with a backlog of 4096. `std::net::TcpListener::bind` asks for 128,
/// which drops the SYNs of a burst of reconnecting clients and costs each of them a one-second retry.
pub fn listen(addr: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for addr in addr.to_socket_addrs()? {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()).and_then(|()| socket.listen(4096)) {
            Ok(()) => return Ok(socket.into()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Starts a one-thread sync actor from an already opened `first` (opening may block, so it is done
/// before anything is accepted, and proves the database works); only a restart of the thread calls
/// `reopen`.
fn start_opened<A, F>(first: A, reopen: F) -> Addr<A>
where
    A: Actor<Context = SyncContext<A>> + Send,
    F: Fn() -> A + Send + Sync + 'static,
{
    let first = std::sync::Mutex::new(Some(first));
    SyncArbiter::start(1, move || first.lock().ok().and_then(|mut f| f.take()).unwrap_or_else(&reopen))
}

/// Opens this node's own SQLite stores (start-up may block: done once, before anything is
/// accepted) and starts their sync actors; answers them with the rooms' cursors and the jobs a
/// restart interrupted.
#[allow(clippy::type_complexity)]
fn open_local(
    config: &Config,
    keep: usize,
    quotas: &Arc<quota::Quotas>,
) -> Result<
    (Addr<StoreActor>, Addr<db::row_store::RowStore>, Vec<db::store::RoomCursor>, Vec<db::store::JobRecord>),
    StartError,
> {
    let location = Location::from_config(config);
    let (first, rows) = db::open(&location)?;
    let cursors = first.room_cursors()?;
    // Each resume after a crash is counted and saved before the job runs again, so a job that
    // brings the process down is not resumed forever (`jobs::job::MAX_RESUMES`); a graceful stop
    // leaves a marker and is not counted.
    let stopped_cleanly = std::fs::remove_file(config.data_dir.join(CLEAN_STOP)).is_ok();
    let mut unfinished = first.unfinished_jobs()?;
    // Only jobs that had begun work count: one that was queued behind the crash did not cause it.
    let started = |j: &&mut db::store::JobRecord| j.snapshot.status != protocol::JobStatus::Queued;
    for job in unfinished.iter_mut().filter(|_| !stopped_cleanly).filter(started) {
        if let Some(spec) = job.spec.as_mut() {
            spec.resumes = spec.resumes.saturating_add(1);
            first.save_job(job)?;
        }
    }
    let loc = location.clone();
    let store = start_opened(StoreActor::new(first, keep), move || {
        StoreActor::new(Store::open(&loc).expect("store reopens"), keep)
    });
    // The row store enforces `max_stored_rows_per_tenant` and reports committed counts to the quotas.
    let rows = rows.with_quotas(quotas.clone())?;
    let (loc, q) = (location, quotas.clone());
    let rows = start_opened(rows, move || {
        let reopened = db::row_store::RowStore::open(&loc).and_then(|r| r.with_quotas(q.clone()));
        reopened.expect("row store reopens")
    });
    Ok((store, rows, cursors, unfinished))
}

/// Starts jobcast on `listener` (made by [`listen`], or any bound listener). Must be called inside an
/// actix `System`.
pub async fn start(listener: TcpListener, config: Config) -> Result<Running, StartError> {
    config.validate()?;
    let addr = listener.local_addr()?;
    if config.conformance_echo && !addr.ip().is_loopback() {
        return Err(StartError::EchoNotLoopback(addr.to_string()));
    }
    files::private_dir(&config.data_dir)
        .map_err(|e| StartError::DataDir(format!("{}: {e}", config.data_dir.display())))?;
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => load_or_create_secret(&config.data_dir)?.secret,
    };
    let auth = Arc::new(Verifier::new(&config, &secret)?);
    let metrics = Arc::new(Metrics::default());
    let rules = Arc::new(match &config.rules_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| StartError::Rules(format!("{}: {e}", path.display())))?;
            jobs::csv::Rules::from_toml(&text).map_err(StartError::Rules)?
        }
        None => jobs::csv::Rules::default(),
    });

    let room_settings = RoomSettings {
        history_size: config.history_size,
        history_ttl: Duration::from_secs(config.history_ttl_s),
        compress_threshold: config.compress_threshold_bytes,
    };
    let redis = match &config.redis_url {
        Some(url) => Some(
            RedisEngine::new(url, &config.cluster_prefix, config.history_size, config.history_ttl_s)
                .map_err(|e| StartError::Redis(e.to_string()))?,
        ),
        None => None,
    };
    let quotas = quota::Quotas::new(quota::Limits::of(&config));
    let uploads = config.data_dir.join("uploads");
    files::private_dir(&uploads).map_err(|e| StartError::DataDir(format!("{}: {e}", uploads.display())))?;
    let keep = config.history_size;
    let (store, rows, cursors, unfinished) = match (&config.database_url, &redis) {
        (Some(url), Some(redis)) => {
            // Shared: every node's jobs and rows in PostgreSQL. Jobs are not resumed here at start:
            // whichever node sees a job's lease expire takes it over (this one included).
            let lease = Duration::from_secs(config.job_lease_s);
            let prefix = &config.cluster_prefix;
            let store = db::pg_store::PgStore::open(url, prefix, keep, redis.node(), lease).await?;
            let rows = db::pg_rows::PgRows::open(url, prefix, redis.node(), quotas.clone()).await?;
            (StoreAddr::Postgres(store.start_own()), RowsAddr::Postgres(rows.start_own()), Vec::new(), Vec::new())
        }
        _ => {
            let (store, rows, cursors, unfinished) = open_local(&config, keep, &quotas)?;
            (StoreAddr::Sqlite(store), RowsAddr::Sqlite(rows), cursors, unfinished)
        }
    };

    let broker = Broker::new(room_settings, metrics.clone(), store.clone(), cursors);
    let broker = match &redis {
        Some(r) => broker.with_redis(r.clone()),
        None => broker,
    }
    .start();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let backoff = jobs::webhooks::Backoff {
        initial: Duration::from_millis(config.webhook_backoff_initial_ms),
        max: Duration::from_secs(config.webhook_backoff_max_s),
        attempts: config.webhook_max_attempts,
    };
    let allow = jobs::webhooks::PrivateAllow::parse(&config.webhook_private_allow)
        .map_err(|message| ConfigError::Invalid { key: "webhook_private_allow", message })?;
    let webhooks = jobs::webhooks::Webhooks::new(store.clone(), backoff, allow).start();
    let deps = jobs::job::JobDeps {
        broker: broker.clone(),
        store: store.clone(),
        zone: ZoneDeps::new(rows.clone(), rules, broker.clone(), cores),
        max_upload_bytes: config.max_upload_bytes,
        zone_rows: config.zone_rows,
        progress_rate: config.progress_max_rate_per_s,
        reservation_ttl: Duration::from_secs(config.reservation_ttl_s),
        external: jobs::job::ExternalLimits {
            stall: Duration::from_secs(config.job_stall_timeout_s),
            cancel_grace: Duration::from_secs(config.job_cancel_grace_s),
            max_per_tenant: config.max_queued_jobs_per_tenant,
        },
        webhooks: webhooks.clone().recipient(),
    };
    let downloads = config.data_dir.join("downloads");
    files::private_dir(&downloads).map_err(|e| StartError::DataDir(format!("{}: {e}", downloads.display())))?;
    jobs::downloads::Retention::new(downloads.clone(), Duration::from_secs(config.retention_s)).start();
    let exports = jobs::export::ExportDeps {
        broker: broker.clone(),
        store: store.clone(),
        rows,
        auth: auth.clone(),
        downloads,
        download_ttl: Duration::from_secs(config.download_ttl_s),
        progress_rate: config.progress_max_rate_per_s,
        webhooks: webhooks.clone().recipient(),
    };
    let scheduler = Scheduler::new(deps, config.max_concurrent_jobs).with_exports(exports);
    let externals = scheduler.externals();
    let scheduler = match (store.shared(), &redis) {
        (Some(shared), Some(redis)) => scheduler.with_leases(jobs::scheduler::Leases {
            store: shared.clone(),
            every: Duration::from_secs(config.job_lease_s) / 3,
            uploads,
            quotas: quotas.clone(),
            redis: redis.clone(),
        }),
        _ => scheduler,
    }
    .start();
    for job in unfinished {
        // Jobs created for a worker (`POST /api/v1/jobs`) go on waiting for its reports (and stall
        // without them); other external jobs wait for their publisher.
        if job.is_worker_job() {
            scheduler.do_send(jobs::scheduler::StartExternal { snapshot: job.snapshot, fresh: false });
            continue;
        }
        // An export interrupted by a restart runs again from the start.
        if job.snapshot.kind.as_deref() == Some(jobs::export::EXPORT) && job.spec.is_none() {
            tracing::info!(job = %job.snapshot.job_id, "an export interrupted by a restart runs again");
            scheduler.do_send(jobs::scheduler::StartExport { snapshot: job.snapshot });
            continue;
        }
        // Only the jobs jobcast runs itself have a spec.
        if let Some(spec) = job.spec {
            tracing::info!(job = %spec.job_id, "resuming a job interrupted by a restart");
            let admission = jobs::scheduler::resumed_admission(&quotas, redis.as_ref(), &spec);
            scheduler.do_send(Submit { spec, resume: Some(job.snapshot), admission });
        }
    }
    let registry = Registry::new(Limits {
        max_connections: config.max_connections,
        max_per_user: config.max_connections_per_user,
        max_unauthenticated: config.max_unauthenticated_connections,
        max_per_ip: config.max_connections_per_ip,
        trusted: config.trusted()?,
    })
    .start();
    if let Some(redis) = &redis {
        let presence =
            realtime::presence::Presence::new(redis.clone(), registry.clone(), metrics.clone(), addr.to_string());
        presence.with_jobs(scheduler.clone().recipient(), scheduler.clone().recipient()).start();
    }
    let shared = Shared {
        config: Arc::new(config),
        auth,
        metrics,
        broker,
        registry: registry.clone(),
        jobs: match &redis {
            Some(redis) => JobAccess::new(store.clone(), scheduler.clone(), externals).with_cluster(redis.clone()),
            None => JobAccess::new(store.clone(), scheduler.clone(), externals),
        },
        quotas,
        redis,
        store,
        scheduler,
        started: Instant::now(),
        tus: Default::default(),
        addr: addr.to_string(),
    };
    let echo = shared.config.conformance_echo;
    let app_shared = shared.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_shared.clone()))
            .app_data(http::path_config())
            .wrap(middleware::from_fn(http::access_log))
            .configure(|cfg| http::routes(cfg, echo))
            .default_service(web::to(http::not_found))
    })
    .listen(listener)?
    .max_connections(100_000)
    .disable_signals()
    .shutdown_timeout(5)
    .run();
    let shutdown =
        Shutdown { server: server.handle(), registry, scheduler: shared.scheduler.clone(), graceful: Arc::default() };
    let clean_stop = shared.config.data_dir.join(CLEAN_STOP);
    Ok(Running { addr, shared, shutdown, server, clean_stop })
}
