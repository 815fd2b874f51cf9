//! What every HTTP handler is handed: the configuration, identity, counters and the actors the
//! endpoints talk to.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use crate::auth::Auth;
use crate::config::Config;
use crate::db::StoreAddr;
use crate::jobs::lookup::JobAccess;
use crate::jobs::scheduler::Scheduler;
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::realtime::broker::Broker;
use crate::realtime::redis::RedisEngine;
use crate::realtime::registry::Registry;
use crate::realtime::session::SessionDeps;

/// What every handler is handed at construction (actix-web app data).
#[derive(Clone)]
pub struct Shared {
    /// The configuration.
    pub(crate) config: Arc<Config>,
    /// Token verification and minting (tests use it to mint tokens).
    pub auth: Arc<Auth>,
    /// Counters.
    pub(crate) metrics: Arc<Metrics>,
    /// The broker actor.
    pub(crate) broker: Addr<Broker>,
    /// The registry actor.
    pub(crate) registry: Addr<Registry>,
    /// The store actor.
    pub(crate) store: StoreAddr,
    /// The scheduler actor.
    pub(crate) scheduler: Addr<Scheduler>,
    /// Jobs as callers may see them.
    pub(crate) jobs: JobAccess,
    /// Per-tenant quotas.
    pub(crate) quotas: Arc<Quotas>,
    /// Cluster mode: the Redis engine.
    pub(crate) redis: Option<RedisEngine>,
    /// Where the server listens.
    pub(crate) addr: String,
    /// When the server started.
    pub(crate) started: Instant,
    /// The resumable uploads with a `PATCH` under way.
    pub(crate) tus: Patching,
}

impl Shared {
    /// What a WebSocket session is handed.
    pub(crate) fn session_deps(&self) -> SessionDeps {
        SessionDeps {
            config: self.config.clone(),
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            broker: self.broker.clone(),
            registry: self.registry.clone(),
            jobs: self.jobs.clone(),
            redis: self.redis.clone(),
        }
    }
}

/// The resumable uploads (`http::tus`) with a `PATCH` under way on this node.
#[derive(Clone, Default)]
pub struct Patching(Arc<std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>>);

impl Patching {
    /// Marks `id` busy until the guard is dropped; `None` when it is busy already.
    pub(crate) fn begin(&self, id: uuid::Uuid) -> Option<PatchGuard> {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(id).then(|| PatchGuard { set: self.clone(), id })
    }
}

/// One upload's `PATCH`, under way while this lives.
pub(crate) struct PatchGuard {
    set: Patching,
    id: uuid::Uuid,
}

impl Drop for PatchGuard {
    fn drop(&mut self) {
        self.set.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}
