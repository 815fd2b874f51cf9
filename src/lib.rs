//! jobcast: runs long document jobs zone by zone and streams their progress over WebSocket.
//!
//! # Layout
//! - [`protocol`]: the wire protocol v1, every message as serde types (the one serde boundary).
//! - [`framing`]: JSON text or gzip(msgpack) binary frames, encoded once per event.
//! - [`session`]: the session actor, one per WebSocket connection (the only code touching frames).
//! - [`broker`]: the broker actor, numbering, encoding and routing room events.
//! - [`room`]: the room actor, one per active room: members and the history ring.
//! - [`registry`]: the registry actor, every connection, for limits and the admin endpoints.
//! - [`auth`]: JWT verification, single-use WebSocket tokens, the tenancy rules.
//! - [`http`]: the HTTP endpoints and the WebSocket upgrade.
//! - [`history`], [`rate_limit`], [`metrics`], [`config`], [`error`]: plain logic and plumbing.
//!
//! [`start`] takes an already-bound listener, so tests bind port 0 and call it; `main.rs` only parses
//! the command line.

pub mod ack_buffer;
pub mod api_jobs;
pub mod auth;
pub mod broker;
pub mod cli_import;
pub mod config;
pub mod csv_import;
pub mod error;
pub mod framing;
pub mod history;
pub mod http;
pub mod job;
pub mod metrics;
pub mod progress;
pub mod protocol;
pub mod rate_limit;
pub mod registry;
pub mod room;
pub mod row_store;
pub mod scheduler;
pub mod session;
pub mod store;
pub mod zone;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{middleware, web, App, HttpServer};

pub use config::Config;

use crate::auth::Auth;
use crate::broker::Broker;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::room::RoomSettings;
use crate::scheduler::Scheduler;
use crate::store::StoreActor;

/// Zones a job keeps in flight: enough for the row store's group commits to take many zones at once
/// (an import's cost is the dedup index pages each commit writes). Memory is bounded across all jobs by
/// `zone::ROWS_IN_FLIGHT`; this bounds only the zone messages a job has queued.
const ZONES_IN_FLIGHT: usize = 64;

/// What every handler and session is handed at construction.
#[derive(Clone)]
pub struct Shared {
    /// The configuration.
    pub config: Arc<Config>,
    /// Token verification and minting.
    pub auth: Arc<Auth>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The broker actor.
    pub broker: Addr<Broker>,
    /// The registry actor.
    pub registry: Addr<Registry>,
    /// The store actor.
    pub store: Addr<StoreActor>,
    /// The scheduler actor.
    pub scheduler: Addr<Scheduler>,
    /// When the server started.
    pub started: Instant,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Keys or the secret could not be loaded.
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// The categorization rules could not be read.
    #[error("{0}")]
    Rules(String),
    /// The listener could not be used.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Closes every connection with 1001, waits for them to go, then stops the HTTP server.
#[derive(Clone)]
pub struct Shutdown {
    server: actix_web::dev::ServerHandle,
    registry: Addr<Registry>,
}

impl Shutdown {
    /// Graceful shutdown: every socket is closed with 1001 "server shutting down".
    pub async fn shutdown(&self) {
        let closing = self
            .registry
            .send(registry::CloseAll { code: protocol::close::GOING_AWAY, reason: "server shutting down".into() })
            .await
            .unwrap_or(0);
        tracing::info!(target: "audit", event = "shutdown", closing, "closing every connection");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.registry.send(registry::Count).await {
                Ok(0) | Err(_) => break,
                Ok(_) => actix_rt::time::sleep(Duration::from_millis(20)).await,
            }
        }
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
}

impl Running {
    /// Runs until the server stops.
    pub async fn wait(self) -> std::io::Result<()> {
        self.server.await
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

/// Starts jobcast on `listener` (made by [`listen`], or any bound listener). Must be called inside an
/// actix `System`.
pub fn start(listener: TcpListener, config: Config) -> Result<Running, StartError> {
    config.validate()?;
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => auth::load_or_create_secret(&config.data_dir)?,
    };
    let auth = Arc::new(Auth::new(&config, &secret)?);
    let metrics = Arc::new(Metrics::default());
    let rules = Arc::new(match &config.rules_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| StartError::Rules(format!("{}: {e}", path.display())))?;
            csv_import::Rules::from_toml(&text).map_err(StartError::Rules)?
        }
        None => csv_import::Rules::default(),
    });

    // The store: opened here (start-up may block), then owned by its sync actor.
    let location = store::Location::from_config(&config);
    let first = store::Store::open(&location)?;
    let cursors = first.room_cursors()?;
    let unfinished = first.unfinished_jobs()?;
    let (loc, keep) = (location.clone(), config.history_size);
    let store = start_opened(StoreActor::new(first, keep), move || {
        StoreActor::new(store::Store::open(&loc).expect("store reopens"), keep)
    });
    let loc = location.clone();
    let rows = start_opened(row_store::RowStore::open(&location)?, move || {
        row_store::RowStore::open(&loc).expect("row store reopens")
    });

    let room_settings = RoomSettings {
        history_size: config.history_size,
        history_ttl: Duration::from_secs(config.history_ttl_s),
        compress_threshold: config.compress_threshold_bytes,
    };
    let broker = Broker::new(room_settings, metrics.clone(), store.clone(), cursors).start();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let deps = job::JobDeps {
        broker: broker.clone(),
        store: store.clone(),
        zone: zone::ZoneDeps::new(rows, rules, broker.clone(), cores),
        max_upload_bytes: config.max_upload_bytes,
        zone_rows: config.zone_rows,
        progress_rate: config.progress_max_rate_per_s,
        zones_in_flight: ZONES_IN_FLIGHT,
    };
    let scheduler = Scheduler::new(deps, config.max_concurrent_jobs).start();
    for snapshot in unfinished {
        match serde_json::from_value::<job::JobSpec>(snapshot["spec"].clone()) {
            Ok(spec) => {
                tracing::info!(job = %spec.job_id, "resuming a job interrupted by a restart");
                scheduler.do_send(scheduler::Submit { spec, resume: Some(snapshot) });
            }
            Err(e) => tracing::error!(error = %e, "a stored job cannot be resumed"),
        }
    }
    let registry = Registry::new(config.max_connections, config.max_connections_per_user).start();
    let shared = Shared {
        config: Arc::new(config),
        auth,
        metrics,
        broker,
        registry: registry.clone(),
        store,
        scheduler,
        started: Instant::now(),
    };
    let addr = listener.local_addr()?;
    let app_shared = shared.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(app_shared.clone()))
            .app_data(http::json_config())
            .app_data(http::path_config())
            .wrap(middleware::from_fn(http::access_log))
            .configure(http::routes)
            .default_service(web::to(http::not_found))
    })
    .listen(listener)?
    .max_connections(100_000)
    .disable_signals()
    .shutdown_timeout(5)
    .run();
    let shutdown = Shutdown { server: server.handle(), registry };
    Ok(Running { addr, shared, shutdown, server })
}
