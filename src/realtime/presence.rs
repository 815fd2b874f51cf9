//! The `Presence` actor (cluster mode only): this node's heartbeat and its part in admin actions
//! across the cluster.
//!
//! Every second it writes the node's counts under `<prefix>:node:<id>` for
//! [`PRESENCE_TTL_S`](crate::realtime::redis::PRESENCE_TTL_S) seconds, so a node that dies drops out
//! of `GET /api/v1/admin/stats` and of the per-user connection counts within that time. It takes the
//! cluster's [`Control`] commands (admin disconnects) off `<prefix>:control`, closes the matching
//! connections of this node through the registry and answers how many.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::json;

use crate::metrics::Metrics;
use crate::protocol::close;
use crate::realtime::redis::{Control, Forwarded, RedisEngine, RemoteCancel};
use crate::realtime::registry::{CloseConnection, CloseUser, Registry};

/// This node in the cluster.
pub struct Presence {
    redis: RedisEngine,
    registry: Addr<Registry>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// Where clients reach this node (for the admin view).
    addr: String,
    /// Where a cluster cancel goes (the scheduler), when this node runs jobs of a shared store.
    jobs: Option<Recipient<RemoteCancel>>,
    /// Where calls forwarded to this node go (the scheduler: worker reports for its jobs).
    calls: Option<Recipient<Forwarded>>,
}

impl Presence {
    /// The presence of the node listening on `addr`.
    pub fn new(redis: RedisEngine, registry: Addr<Registry>, metrics: Arc<Metrics>, addr: String) -> Self {
        Presence { redis, registry, metrics, started: Instant::now(), addr, jobs: None, calls: None }
    }

    /// Cluster cancels of jobs go to `jobs`, and calls forwarded to this node to `calls`.
    pub fn with_jobs(mut self, jobs: Recipient<RemoteCancel>, calls: Recipient<Forwarded>) -> Self {
        self.jobs = Some(jobs);
        self.calls = Some(calls);
        self
    }

    /// This node's counts as `GET /api/v1/admin/stats` lists them under `nodes`.
    pub fn counts(node: &str, addr: &str, metrics: &Metrics, started: Instant) -> serde_json::Value {
        json!({
            "node_id": node,
            "addr": addr,
            "connections": metrics.connections.load(Relaxed),
            "rooms": metrics.rooms.load(Relaxed),
            "subscriptions": metrics.subscriptions.load(Relaxed),
            "events_published": metrics.published.load(Relaxed),
            "uptime_s": started.elapsed().as_secs(),
        })
    }

    fn beat(&self, ctx: &mut Context<Self>) {
        let stats = Presence::counts(self.redis.node(), &self.addr, &self.metrics, self.started);
        let redis = self.redis.clone();
        ctx.spawn(
            async move {
                if let Err(e) = redis.heartbeat(&stats).await {
                    tracing::warn!(error = %e, "heartbeat not written");
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for Presence {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.beat(ctx);
        ctx.run_interval(Duration::from_secs(1), |me, ctx| me.beat(ctx));
        self.redis.run_control(ctx.address().recipient());
    }
}

impl Handler<Control> for Presence {
    type Result = ();
    fn handle(&mut self, mut msg: Control, ctx: &mut Context<Self>) {
        if let Some(call) = msg.call.take() {
            // For one node only; the others do not answer.
            if call.node != self.redis.node() {
                return;
            }
            let (redis, calls) = (self.redis.clone(), self.calls.clone());
            ctx.spawn(
                async move {
                    let Some(calls) = calls else { return };
                    let Some(answer) = calls.send(call).await.ok().flatten() else { return };
                    if let Err(e) = redis.answer_with(&msg.id, answer).await {
                        tracing::warn!(error = %e, "cannot answer a forwarded call");
                    }
                }
                .into_actor(self),
            );
            return;
        }
        let (code, reason) = close::BY_ADMIN;
        let registry = self.registry.clone();
        let redis = self.redis.clone();
        let jobs = self.jobs.clone();
        ctx.spawn(
            async move {
                let closed = match (&msg.connection, &msg.user) {
                    _ if msg.cancel.is_some() => match (&msg.cancel, &jobs) {
                        (Some(cancel), Some(jobs)) => u64::from(jobs.send(cancel.clone()).await.unwrap_or(false)),
                        _ => 0,
                    },
                    (Some(id), _) => {
                        let found = registry.send(CloseConnection { id: *id, code, reason: reason.into() }).await;
                        u64::from(found.unwrap_or(false))
                    }
                    (None, Some(user)) => {
                        let close = CloseUser {
                            user_id: user.clone(),
                            tenant: msg.tenant.clone(),
                            code,
                            reason: reason.into(),
                        };
                        registry.send(close).await.unwrap_or(0) as u64
                    }
                    (None, None) => 0,
                };
                if let Err(e) = redis.answer(&msg.id, closed).await {
                    tracing::warn!(error = %e, "cannot answer a cluster command");
                }
            }
            .into_actor(self),
        );
    }
}
