//! The room actor: one per active room, holding its members and its history ring.
//!
//! Only the broker sends to a room. Because a room handles `Join` and `Deliver` one at a time, a
//! joining member receives `subscribed`, then the replay, then live events, with no gap or duplicate
//! even while events are being published.
//!
//! In cluster mode (`redis_url`) the room's epoch and `seq` come from Redis when the room starts,
//! events arrive from every node through the broker, an event already held is dropped, a gap (events
//! published while this node's subscription was down) is filled from the room's Redis stream before
//! the event after it, and a new epoch (Redis lost the room) starts the ring over.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use crate::db::sqlite::now_ms;
use crate::db::store::EventsAfter;
use crate::db::StoreAddr;
use crate::framing::Encoded;
use crate::protocol::{Envelope, JobSnapshot, RoomKind, Since, Subscribed};
use crate::realtime::history::{HistoryRing, Replay};
use crate::realtime::outbox::Member;
use crate::realtime::redis::RedisEngine;

/// What every room needs to know.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// Events kept per room.
    pub history_size: usize,
    /// How long events are kept.
    pub history_ttl: Duration,
    /// JSON above this size is also encoded as gzip(msgpack).
    pub compress_threshold: usize,
}

/// A new event of this room, already numbered and encoded by the broker.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    /// Its `seq`.
    pub seq: u64,
    /// Its epoch.
    pub epoch: Arc<str>,
    /// The encoded envelope every member receives.
    pub event: Arc<Encoded>,
}

/// Cluster mode: read the events after the newest held from Redis (the broker's subscription was
/// down for a while).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CatchUp;

/// A connection joins (or re-joins) the room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Join {
    /// The connection.
    pub conn: Uuid,
    /// Where its events go.
    pub member: Member,
    /// Resume position, if any.
    pub since: Option<Since>,
    /// For job rooms, the job's state for `subscribed.snapshot`.
    pub snapshot: Option<Box<JobSnapshot>>,
    /// Cluster mode: the room already read up to Redis for this join (its `since` was ahead of the
    /// room here).
    pub caught_up: bool,
}

/// A connection leaves the room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Part {
    /// The connection.
    pub conn: Uuid,
}

/// The broker retired this room (no members, history expired).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// The room actor.
pub struct Room {
    /// The room's key in the broker and the store (see `RoomKind::key`).
    key: Arc<str>,
    /// The room's name as clients see it, shared with every event sent to members.
    name: Arc<str>,
    /// The history epoch.
    epoch: Arc<str>,
    /// The newest `seq` delivered here.
    head: u64,
    /// The last `history_size` events.
    history: HistoryRing,
    /// Members by connection id.
    members: HashMap<Uuid, Member>,
    settings: RoomSettings,
    /// Where older history is read from when the ring does not hold it (after a restart).
    store: StoreAddr,
    /// Whether the store's history was read into the ring already: it is read once per room actor,
    /// whatever number of clients resume from it.
    loaded: bool,
    /// Cluster mode: where the room's epoch, `seq` and history live.
    redis: Option<RedisEngine>,
    /// Cluster mode: the cursor could not be read when the room started; the first event sets it.
    cursor_unknown: bool,
}

/// A run of stored events, decoded, or `None` when the source failed or changed epoch.
type Run = Option<Vec<(u64, Instant, Arc<Encoded>)>>;

impl Room {
    /// The room of `key` whose newest event is `head` (0: none yet).
    pub fn new(
        key: Arc<str>,
        epoch: Arc<str>,
        head: u64,
        settings: RoomSettings,
        store: StoreAddr,
        redis: Option<RedisEngine>,
    ) -> Self {
        let history = HistoryRing::new(settings.history_size, settings.history_ttl);
        let name = Arc::from(RoomKind::name_of_key(&key).as_str());
        Room {
            key,
            name,
            epoch,
            head,
            history,
            members: HashMap::new(),
            settings,
            store,
            loaded: false,
            redis,
            cursor_unknown: false,
        }
    }

    /// Takes the next event: into the ring and to every member.
    fn accept(&mut self, seq: u64, event: Arc<Encoded>) {
        self.head = seq;
        self.history.push(seq, event.clone(), Instant::now());
        for member in self.members.values() {
            member.event(&self.name, &event, false);
        }
    }

    /// The stored events after `after`, at most `limit`, decoded off this thread: from Redis in
    /// cluster mode (only if still of this room's epoch), else from the store.
    fn load_after(&self, after: u64, limit: usize) -> futures_util::future::BoxFuture<'static, Run> {
        let threshold = self.settings.compress_threshold;
        let min_created_ms = now_ms() - self.settings.history_ttl.as_millis() as i64;
        let room = self.key.to_string();
        if let Some(redis) = self.redis.clone() {
            let epoch = self.epoch.to_string();
            return Box::pin(async move {
                let (now, rows) = redis.events_after(&room, after, limit, min_created_ms).await.ok()?;
                if now != epoch {
                    return None;
                }
                decode_off_thread(rows, threshold).await
            });
        }
        let store = self.store.clone();
        let query = EventsAfter { room, seq: after, limit, min_created_ms };
        Box::pin(async move {
            let rows = store.send(query).await.ok()?.ok()?;
            decode_off_thread(rows, threshold).await
        })
    }

    /// Cluster mode: fills the gap after `head` from Redis, then takes `then` (the event that showed
    /// the gap). When Redis has a new epoch for the room (it lost the old one), the ring starts over
    /// and the new epoch's events are taken from its first. Events the stream no longer has are lost
    /// to this node's members, who see the gap in `seq` and resume (`recovered: false`).
    fn catch_up(&mut self, then: Option<Deliver>, ctx: &mut Context<Self>) {
        let Some(redis) = self.redis.clone() else {
            return;
        };
        let size = self.settings.history_size.max(1) as u64;
        // Up to the event that showed the gap (or the newest), at most a history's worth before it.
        let until = then.as_ref().map_or(u64::MAX, |d| d.seq.saturating_sub(1));
        let from = if until == u64::MAX { self.head } else { self.head.max(until.saturating_sub(size)) };
        let limit = if until == u64::MAX { size } else { until.saturating_sub(from).clamp(1, size) } as usize;
        let (key, epoch, head) = (self.key.to_string(), self.epoch.to_string(), from);
        let threshold = self.settings.compress_threshold;
        let min_created_ms = now_ms() - self.settings.history_ttl.as_millis() as i64;
        let load = async move {
            let (mut now, mut rows) = redis.events_after(&key, head, limit, min_created_ms).await.ok()?;
            if now != epoch {
                (now, rows) = redis.events_after(&key, 0, limit, min_created_ms).await.ok()?;
            }
            Some((now, decode_off_thread(rows, threshold).await?))
        };
        ctx.wait(load.into_actor(self).map(move |loaded, room, _| {
            if let Some((epoch, run)) = loaded {
                if !epoch.is_empty() && *epoch != *room.epoch {
                    room.start_epoch(Arc::from(epoch.as_str()));
                }
                for (seq, _, event) in run {
                    if seq == room.head + 1 {
                        room.accept(seq, event);
                    }
                }
            }
            // An event of an epoch Redis has since replaced is dropped: the stream read is newer.
            if let Some(d) = then.filter(|d| *d.epoch == *room.epoch) {
                if d.seq > room.head {
                    room.accept(d.seq, d.event);
                }
            }
        }));
    }

    /// Redis lost the room and began `epoch`: what the ring holds belongs to the old one.
    fn start_epoch(&mut self, epoch: Arc<str>) {
        tracing::warn!(room = %self.key, old = %self.epoch, new = %epoch, "room epoch changed");
        self.epoch = epoch;
        self.head = 0;
        self.history = HistoryRing::new(self.settings.history_size, self.settings.history_ttl);
        self.loaded = false;
    }

    /// Sends `subscribed`, then the replay, and adds the member.
    fn admit(&mut self, msg: Join, recovered: bool, events: Vec<Arc<Encoded>>) {
        msg.member.joined(Subscribed {
            room: self.name.to_string(),
            seq: self.head,
            epoch: self.epoch.to_string(),
            recovered,
            replayed: events.len() as u64,
            snapshot: msg.snapshot,
        });
        for event in &events {
            msg.member.event(&self.name, event, true);
        }
        self.members.insert(msg.conn, msg.member);
    }
}

/// Turns stored envelopes `after+1..` back into encoded events with the instant each was made,
/// stopping at the first gap or unreadable one. CPU work (JSON, gzip): run off the actor's thread.
fn decode_run(rows: Vec<(u64, i64, String)>, after: u64, threshold: usize) -> Vec<(u64, Instant, Arc<Encoded>)> {
    let (now, now_ms) = (Instant::now(), now_ms());
    let mut out = Vec::with_capacity(rows.len());
    for (i, (seq, created_ms, json)) in rows.into_iter().enumerate() {
        if seq != after + 1 + i as u64 {
            break;
        }
        let Some(enc) = serde_json::from_str::<Envelope>(&json).ok().and_then(|env| Encoded::new(&env, threshold).ok())
        else {
            break;
        };
        let age = std::time::Duration::from_millis(now_ms.saturating_sub(created_ms).max(0) as u64);
        out.push((seq, now.checked_sub(age).unwrap_or(now), Arc::new(enc)));
    }
    out
}

/// [`decode_run`] of stored rows from their first `seq`, on `spawn_blocking`; `None` when that failed.
async fn decode_off_thread(rows: Vec<(u64, i64, String)>, threshold: usize) -> Run {
    let Some(first) = rows.first().map(|r| r.0) else {
        return Some(Vec::new());
    };
    tokio::task::spawn_blocking(move || decode_run(rows, first - 1, threshold)).await.ok()
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(30), |room, _| room.history.expire(Instant::now()));
        // Cluster mode: nothing is handled before the room knows its epoch and newest `seq`.
        if let Some(redis) = self.redis.clone() {
            let key = self.key.to_string();
            let cursor = async move { redis.cursor(&key).await };
            ctx.wait(cursor.into_actor(self).map(|res, room, _| match res {
                Ok((epoch, seq)) => {
                    room.epoch = Arc::from(epoch.as_str());
                    room.head = seq;
                }
                Err(e) => {
                    tracing::warn!(room = %room.key, error = %e, "room cursor unavailable; the first event sets it");
                    room.cursor_unknown = true;
                }
            }));
        }
    }
}

impl Handler<Deliver> for Room {
    type Result = ();
    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        if std::mem::take(&mut self.cursor_unknown) {
            // Nothing older is claimed: the room starts at the event before this one.
            self.epoch = msg.epoch.clone();
            self.head = msg.seq.saturating_sub(1);
        }
        if *msg.epoch != *self.epoch {
            self.start_epoch(msg.epoch.clone());
        }
        if msg.seq <= self.head {
            return;
        }
        if msg.seq > self.head + 1 && self.redis.is_some() {
            return self.catch_up(Some(msg), ctx);
        }
        self.accept(msg.seq, msg.event);
    }
}

impl Handler<CatchUp> for Room {
    type Result = ();
    fn handle(&mut self, _: CatchUp, ctx: &mut Context<Self>) {
        self.catch_up(None, ctx);
    }
}

impl Handler<Join> for Room {
    type Result = ();
    fn handle(&mut self, mut msg: Join, ctx: &mut Context<Self>) {
        let since = match &msg.since {
            Some(since) if *since.epoch == *self.epoch => since.seq,
            _ => return self.admit(msg, false, Vec::new()),
        };
        if since > self.head && self.redis.is_some() && !msg.caught_up {
            // The client saw more than this node has (its subscription lags, or was reconnecting):
            // read up from Redis first, then take the join again, behind what arrived meanwhile.
            self.catch_up(None, ctx);
            msg.caught_up = true;
            ctx.address().do_send(msg);
            return;
        }
        if let Replay::Recovered(events) = self.history.since(since, self.head, Instant::now()) {
            return self.admit(msg, true, events);
        }
        // The ring does not hold it (a restart empties it): the store may, within the history limits.
        // It is read once, for the whole window the ring lacks, and decoded off this thread; every
        // later resume is served from the ring.
        let missing = self.head.saturating_sub(since);
        if self.loaded || since >= self.head || missing as usize > self.settings.history_size {
            return self.admit(msg, false, Vec::new());
        }
        let after = self.head.saturating_sub(self.settings.history_size as u64);
        let before = self.history.oldest().unwrap_or(self.head + 1);
        let load = self.load_after(after, before.saturating_sub(after + 1) as usize);
        // `wait`: no live event is handled before this member has its replay.
        ctx.wait(load.into_actor(self).map(move |run, room, _| {
            if let Some(run) = run {
                // A run the ring cannot take (the store lost some of it) leaves `loaded` unset.
                room.loaded = run.is_empty() || room.history.prepend(run, room.head);
            }
            match room.history.since(since, room.head, Instant::now()) {
                Replay::Recovered(events) => room.admit(msg, true, events),
                Replay::Lost => room.admit(msg, false, Vec::new()),
            }
        }));
    }
}

impl Handler<Part> for Room {
    type Result = ();
    fn handle(&mut self, msg: Part, _: &mut Context<Self>) {
        self.members.remove(&msg.conn);
    }
}

impl Handler<Retire> for Room {
    type Result = ();
    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
