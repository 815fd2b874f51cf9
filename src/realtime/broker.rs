//! The broker actor: the one way into rooms.
//!
//! It numbers each room event (`seq` rises by exactly one per room), stamps the room's epoch, encodes
//! the envelope once ([`Encoded`]) and hands the same bytes to the room actor, which appends them to
//! its history and passes them to every member. Joins and leaves go through the broker too, so it
//! knows which rooms are idle and can retire them once their history has expired.
//!
//! Guarantee: an event is in the room's history before any member can see it, and a member that
//! joins with `since` sees every later event exactly once, in order (see `room.rs`).
//!
//! Two engines behind the same messages: in-process (the default), where the broker numbers events
//! and commits them to SQLite in batches; and Redis (`redis_url`, `redis.rs`), where one script
//! numbers, stores and fans out each event to every node, and the broker hands what arrives from the
//! channel to its local rooms. Either way nothing here assumes rooms share its thread: rooms are
//! reached only by messages.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::db::sqlite::now_ms;
use crate::db::store::{AppendEvents, ExpireEvents, RoomCursor, StoredEvent};
use crate::db::StoreAddr;
use crate::framing::Encoded;
use crate::metrics::Metrics;
use crate::protocol::{now_rfc3339, Envelope, Event, JobSnapshot, RoomKind, Since};
use crate::realtime::outbox::Member;
use crate::realtime::redis::{RedisEngine, RemoteEvent, Resync};
use crate::realtime::room::{CatchUp, Deliver, Join, Part, Retire, Room, RoomSettings};

/// Publish an event into a room. The answer comes once the event's batch has been written to the store
/// (a store error is logged and the event delivered anyway) and the event handed to the room, so a client
/// that subscribes with `since` after it has the answer finds the event in the history.
#[derive(Message)]
#[rtype(result = "Result<Published, PublishError>")]
pub struct Publish {
    /// The room's key (`RoomKind::key`), already validated by the caller.
    pub room: String,
    /// The event.
    pub event: Event,
    /// Cluster mode: keep trying while Redis is away, in order, answering once it took the event
    /// (the events of jobs, which must not be lost: a zone waiting for its answer pauses its job).
    /// Without it an API publish fails at once with [`PublishError::Unavailable`] (503).
    pub until_published: bool,
}

impl Publish {
    /// An event no caller will retry: kept until published.
    pub fn job(room: String, event: Event) -> Publish {
        Publish { room, event, until_published: true }
    }

    /// An event of an API caller, who is told when it could not be published.
    pub fn api(room: String, event: Event) -> Publish {
        Publish { room, event, until_published: false }
    }
}

/// Where a published event went.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Published {
    /// Its `seq` in the room.
    pub seq: u64,
    /// How many connections it was handed to.
    pub delivered_to: usize,
}

/// Why an event could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Only a bug can cause this: every event serialises.
    #[error("cannot encode the event: {0}")]
    Encode(#[from] crate::framing::EncodeError),
    /// The broker stopped (the server is shutting down) before the event reached its room.
    #[error("the server stopped before the event was delivered")]
    Stopped,
    /// Cluster mode: Redis did not take the event (nothing was published).
    #[error("the event was not published: {0}")]
    Unavailable(String),
}

/// A connection joins a room (already authorised by the session).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    /// The room's key.
    pub room: String,
    /// The connection.
    pub conn: Uuid,
    /// Resume position.
    pub since: Option<Since>,
    /// Where the room's output goes.
    pub member: Member,
    /// For job rooms, the job's state.
    pub snapshot: Option<Box<JobSnapshot>>,
}

/// A connection leaves a room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    /// The room's key.
    pub room: String,
    /// The connection.
    pub conn: Uuid,
}

/// A connection closed; it leaves all of `rooms`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    /// The connection.
    pub conn: Uuid,
    /// The key of every room it was in.
    pub rooms: Vec<String>,
}

/// Which of `rooms` (keys) are in use: they have members, or events (live or remembered), which a
/// resume could still replay.
#[derive(Message)]
#[rtype(result = "HashSet<String>")]
pub struct Occupied {
    /// Room keys.
    pub rooms: Vec<String>,
}

/// The keys of the live `user:<id>` rooms of every tenant (rooms with members, or whose history is
/// still kept), for an admin broadcast that names no tenant.
#[derive(Message)]
#[rtype(result = "Vec<String>")]
pub struct UserRooms {
    /// The user id.
    pub user_id: String,
}

/// Room and subscription counts.
#[derive(Message)]
#[rtype(result = "BrokerStats")]
pub struct Stats;

/// What [`Stats`] answers.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BrokerStats {
    /// Active rooms.
    pub rooms: usize,
    /// Subscriptions over all rooms.
    pub subscriptions: usize,
    /// Events published since start.
    pub published: u64,
}

struct RoomEntry {
    addr: Addr<Room>,
    /// The newest `seq` assigned.
    seq: u64,
    epoch: Arc<str>,
    members: HashSet<Uuid>,
    /// When the room last had an event or a member leave.
    active_at: Instant,
}

/// An event numbered and encoded, waiting for its batch to be committed before it is delivered.
struct Pending {
    room: Addr<Room>,
    seq: u64,
    event: Arc<Encoded>,
    stored: StoredEvent,
    /// Told once the event is in the room's mailbox.
    done: oneshot::Sender<()>,
}

/// The broker actor.
pub struct Broker {
    rooms: HashMap<Arc<str>, RoomEntry>,
    /// Epoch and newest `seq` of rooms without an actor (retired, or known from the store at start),
    /// so a room that comes back continues its `seq` instead of starting over.
    cursors: HashMap<String, (Arc<str>, u64)>,
    settings: RoomSettings,
    metrics: Arc<Metrics>,
    store: StoreAddr,
    /// Events waiting for the next batch write.
    pending: Vec<Pending>,
    /// Whether a batch write is in flight (one at a time keeps rooms in `seq` order).
    writing: bool,
    /// Cluster mode: the Redis engine numbers, stores and fans out events.
    redis: Option<RedisEngine>,
}

impl Broker {
    /// A broker that persists through `store` and continues the rooms of `cursors`.
    pub fn new(settings: RoomSettings, metrics: Arc<Metrics>, store: StoreAddr, cursors: Vec<RoomCursor>) -> Self {
        let cursors = cursors.into_iter().map(|c| (c.room, (Arc::from(c.epoch.as_str()), c.last_seq))).collect();
        Broker {
            rooms: HashMap::new(),
            cursors,
            settings,
            metrics,
            store,
            pending: Vec::new(),
            writing: false,
            redis: None,
        }
    }

    /// Cluster mode: events go through `redis` (numbered, stored and fanned out there).
    pub fn with_redis(mut self, redis: RedisEngine) -> Self {
        self.redis = Some(redis);
        self
    }

    /// Cluster mode: numbers, stores and fans out through Redis; the event reaches this node's rooms
    /// from the channel, like every other node's.
    fn publish_redis(&mut self, redis: RedisEngine, msg: Publish) -> ResponseFuture<Result<Published, PublishError>> {
        let delivered_to = self.rooms.get(msg.room.as_str()).map_or(0, |e| e.members.len());
        let env = Envelope {
            event: msg.event,
            id: Uuid::new_v4(),
            room: Some(RoomKind::name_of_key(&msg.room)),
            seq: None,
            epoch: None,
            ts: now_rfc3339(),
            redelivered: false,
        };
        let body = match serde_json::to_string(&env) {
            Ok(body) => body,
            Err(e) => return Box::pin(std::future::ready(Err(PublishError::Unavailable(e.to_string())))),
        };
        self.metrics.published.fetch_add(1, Relaxed);
        // Queued here, in the handler, so the broker's order of messages is the order of publishes.
        let published = redis.publish(msg.room, env.id.to_string(), body, msg.until_published);
        Box::pin(async move {
            let (seq, _, members) = published.await.map_err(|e| PublishError::Unavailable(e.to_string()))?;
            // Every node's members; this node's as it knows them when Redis could not count them yet.
            Ok(Published { seq, delivered_to: members.max(delivered_to) })
        })
    }

    fn room(&mut self, name: &str) -> &mut RoomEntry {
        if !self.rooms.contains_key(name) {
            let (epoch, seq) = self
                .cursors
                .remove(name)
                .unwrap_or_else(|| (Arc::from(Uuid::new_v4().simple().to_string().as_str()), 0));
            let name: Arc<str> = Arc::from(name);
            let addr = Room::new(
                name.clone(),
                epoch.clone(),
                seq,
                self.settings.clone(),
                self.store.clone(),
                self.redis.clone(),
            )
            .start();
            self.metrics.rooms.fetch_add(1, Relaxed);
            let entry = RoomEntry { addr, seq, epoch, members: HashSet::new(), active_at: Instant::now() };
            self.rooms.insert(name.clone(), entry);
        }
        // Inserted just above when missing.
        self.rooms.get_mut(name).expect("room entry exists")
    }

    fn leave(&mut self, room: &str, conn: Uuid) {
        if let Some(entry) = self.rooms.get_mut(room) {
            if entry.members.remove(&conn) {
                self.metrics.subscriptions.fetch_sub(1, Relaxed);
                entry.active_at = Instant::now();
                entry.addr.do_send(Part { conn });
                if let Some(redis) = &self.redis {
                    redis.members_changed(room, entry.members.len());
                }
            }
        }
    }

    /// Retires rooms with no members whose last activity is older than the history ttl.
    fn sweep(&mut self) {
        let ttl = self.settings.history_ttl;
        if self.redis.is_some() {
            // The history lives in Redis: a room actor stays only while it has members here, and a
            // minute after (its ring serves quick resumes).
            let metrics = &self.metrics;
            self.rooms.retain(|_, e| {
                let keep = !e.members.is_empty() || e.active_at.elapsed() <= ttl.min(Duration::from_secs(60));
                if !keep {
                    e.addr.do_send(Retire);
                    metrics.rooms.fetch_sub(1, Relaxed);
                }
                keep
            });
            return;
        }
        let metrics = &self.metrics;
        let cursors = &mut self.cursors;
        self.rooms.retain(|name, e| {
            // A room that never had an event has nothing to keep: it goes once empty, with no cursor.
            let keep = !e.members.is_empty() || (e.seq > 0 && e.active_at.elapsed() <= ttl);
            if !keep {
                e.addr.do_send(Retire);
                metrics.rooms.fetch_sub(1, Relaxed);
                if e.seq > 0 {
                    cursors.insert(name.to_string(), (e.epoch.clone(), e.seq));
                }
            }
            keep
        });
        // Nor is one kept for an eventless room known from the store.
        cursors.retain(|_, (_, seq)| *seq > 0);
        let before_ms = now_ms() - ttl.as_millis() as i64;
        self.store.do_send(ExpireEvents { before_ms });
    }

    /// Writes the waiting events in one batch, then hands them to their rooms.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        self.writing = true;
        let batch = std::mem::take(&mut self.pending);
        let rows = batch.iter().map(|p| p.stored.clone()).collect();
        let write = self.store.send(AppendEvents(rows));
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, events = batch.len(), "events not persisted; delivering them anyway")
                }
                Err(e) => tracing::error!(error = %e, events = batch.len(), "store unreachable; delivering anyway"),
            }
            for p in batch {
                p.room.do_send(Deliver { seq: p.seq, epoch: Arc::from(p.stored.epoch.as_str()), event: p.event });
                // The publisher may have stopped waiting; nothing to do then.
                let _ = p.done.send(());
            }
            act.writing = false;
            act.flush(ctx);
        }));
    }
}

impl Actor for Broker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = self.settings.history_ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
        ctx.run_interval(every, |broker, _| broker.sweep());
        if let Some(redis) = &self.redis {
            redis.run(ctx.address().recipient(), ctx.address().recipient());
        }
    }
}

impl Handler<RemoteEvent> for Broker {
    type Result = ();
    /// An event off the cluster channel: to this node's room, if it has one (only rooms with members
    /// here, or recently, have an actor). Decoded and encoded once per node.
    fn handle(&mut self, msg: RemoteEvent, _: &mut Context<Self>) {
        let Some(entry) = self.rooms.get_mut(msg.room.as_str()) else {
            return;
        };
        let env = match serde_json::from_str::<Envelope>(&msg.json) {
            Ok(env) => env,
            Err(e) => return tracing::warn!(room = %msg.room, error = %e, "unreadable event from the cluster channel"),
        };
        let (Some(seq), Some(epoch)) = (env.seq, env.epoch.clone()) else {
            return tracing::warn!(room = %msg.room, "an event without seq or epoch on the cluster channel");
        };
        let event = match Encoded::new(&env, self.settings.compress_threshold) {
            Ok(e) => Arc::new(e),
            Err(e) => return tracing::warn!(room = %msg.room, error = %e, "cannot encode an event from the cluster"),
        };
        entry.seq = entry.seq.max(seq);
        entry.active_at = Instant::now();
        entry.addr.do_send(Deliver { seq, epoch: Arc::from(epoch.as_str()), event });
    }
}

impl Handler<Resync> for Broker {
    type Result = ();
    fn handle(&mut self, _: Resync, _: &mut Context<Self>) {
        for entry in self.rooms.values() {
            entry.addr.do_send(CatchUp);
        }
    }
}

impl Handler<Publish> for Broker {
    type Result = ResponseFuture<Result<Published, PublishError>>;
    fn handle(&mut self, msg: Publish, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(redis) = self.redis.clone() {
            return self.publish_redis(redis, msg);
        }
        let threshold = self.settings.compress_threshold;
        let entry = self.room(&msg.room);
        let seq = entry.seq + 1;
        let env = Envelope {
            event: msg.event,
            id: Uuid::new_v4(),
            room: Some(RoomKind::name_of_key(&msg.room)),
            seq: Some(seq),
            epoch: Some(entry.epoch.to_string()),
            ts: now_rfc3339(),
            redelivered: false,
        };
        let encoded = match Encoded::new(&env, threshold) {
            Ok(encoded) => Arc::new(encoded),
            Err(e) => return Box::pin(std::future::ready(Err(e.into()))),
        };
        entry.seq = seq;
        entry.active_at = Instant::now();
        let stored = StoredEvent {
            room: msg.room,
            epoch: entry.epoch.to_string(),
            seq,
            created_ms: now_ms(),
            envelope: encoded.json.to_string(),
        };
        let (done, delivered) = oneshot::channel();
        let pending = Pending { room: entry.addr.clone(), seq, event: encoded, stored, done };
        let delivered_to = entry.members.len();
        self.pending.push(pending);
        self.flush(ctx);
        self.metrics.published.fetch_add(1, Relaxed);
        if msg.until_published {
            // A job's event: in-process it is never refused (a store error is logged and the event
            // delivered anyway), so its sender need not wait for the batch.
            return Box::pin(std::future::ready(Ok(Published { seq, delivered_to })));
        }
        Box::pin(async move {
            // The sender is dropped unanswered only when the broker itself goes.
            delivered.await.map_err(|_| PublishError::Stopped)?;
            Ok(Published { seq, delivered_to })
        })
    }
}

impl Handler<Subscribe> for Broker {
    type Result = ();
    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) {
        let (metrics, redis) = (self.metrics.clone(), self.redis.clone());
        let entry = self.room(&msg.room);
        if entry.members.insert(msg.conn) {
            metrics.subscriptions.fetch_add(1, Relaxed);
            if let Some(redis) = redis {
                redis.members_changed(&msg.room, entry.members.len());
            }
        }
        entry.addr.do_send(Join {
            conn: msg.conn,
            member: msg.member,
            since: msg.since,
            snapshot: msg.snapshot,
            caught_up: false,
        });
    }
}

impl Handler<Unsubscribe> for Broker {
    type Result = ();
    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        self.leave(&msg.room, msg.conn);
    }
}

impl Handler<Leave> for Broker {
    type Result = ();
    fn handle(&mut self, msg: Leave, _: &mut Context<Self>) {
        for room in &msg.rooms {
            self.leave(room, msg.conn);
        }
    }
}

impl Handler<Occupied> for Broker {
    type Result = MessageResult<Occupied>;
    fn handle(&mut self, msg: Occupied, _: &mut Context<Self>) -> Self::Result {
        let in_use = |r: &String| {
            self.rooms.get(r.as_str()).is_some_and(|e| !e.members.is_empty() || e.seq > 0)
                || self.cursors.get(r).is_some_and(|(_, seq)| *seq > 0)
        };
        MessageResult(msg.rooms.into_iter().filter(in_use).collect())
    }
}

impl Handler<UserRooms> for Broker {
    type Result = MessageResult<UserRooms>;
    fn handle(&mut self, msg: UserRooms, _: &mut Context<Self>) -> Self::Result {
        let suffix = format!("/{}", msg.user_id);
        let keys = self.rooms.keys().filter(|k| k.starts_with("user:") && k.ends_with(&suffix)).map(|k| k.to_string());
        MessageResult(keys.collect())
    }
}

impl Handler<Stats> for Broker {
    type Result = MessageResult<Stats>;
    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(BrokerStats {
            rooms: self.rooms.len(),
            subscriptions: self.rooms.values().map(|e| e.members.len()).sum(),
            published: self.metrics.published.load(Relaxed),
        })
    }
}
