//! The room actor: one per active room, holding its members and its history ring.
//!
//! Only the broker sends to a room. Because a room handles `Join` and `Deliver` one at a time, a
//! joining member receives `subscribed`, then the replay, then live events, with no gap or duplicate
//! even while events are being published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use uuid::Uuid;

use crate::db::sqlite::now_ms;
use crate::db::store::{EventsAfter, StoreActor};
use crate::framing::Encoded;
use crate::protocol::{Envelope, JobSnapshot, RoomKind, Since, Subscribed};
use crate::realtime::history::{HistoryRing, Replay};
use crate::realtime::outbox::Member;

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
    /// The encoded envelope every member receives.
    pub event: Arc<Encoded>,
}

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
    store: Addr<StoreActor>,
}

impl Room {
    /// The room of `key` whose newest event is `head` (0: none yet).
    pub fn new(key: Arc<str>, epoch: Arc<str>, head: u64, settings: RoomSettings, store: Addr<StoreActor>) -> Self {
        let history = HistoryRing::new(settings.history_size, settings.history_ttl);
        let name = Arc::from(RoomKind::name_of_key(&key).as_str());
        Room { key, name, epoch, head, history, members: HashMap::new(), settings, store }
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

/// Turns stored envelopes `after+1..=head` back into encoded events, or `None` when any is missing.
fn decode_run(rows: Vec<(u64, String)>, after: u64, head: u64, threshold: usize) -> Option<Vec<Arc<Encoded>>> {
    if rows.len() as u64 != head - after {
        return None;
    }
    let mut out = Vec::with_capacity(rows.len());
    for (i, (seq, json)) in rows.into_iter().enumerate() {
        if seq != after + 1 + i as u64 {
            return None;
        }
        let env: Envelope = serde_json::from_str(&json).ok()?;
        out.push(Arc::new(Encoded::new(&env, threshold).ok()?));
    }
    Some(out)
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(30), |room, _| room.history.expire(Instant::now()));
    }
}

impl Handler<Deliver> for Room {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        self.head = msg.seq;
        self.history.push(msg.seq, msg.event.clone(), Instant::now());
        for member in self.members.values() {
            member.event(&self.name, &msg.event, false);
        }
    }
}

impl Handler<Join> for Room {
    type Result = ();
    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) {
        let since = match &msg.since {
            Some(since) if *since.epoch == *self.epoch => since.seq,
            _ => return self.admit(msg, false, Vec::new()),
        };
        if let Replay::Recovered(events) = self.history.since(since, self.head, Instant::now()) {
            return self.admit(msg, true, events);
        }
        // The ring does not hold it (a restart empties it): the store may, within the history limits.
        let missing = self.head.saturating_sub(since);
        if since >= self.head || missing as usize > self.settings.history_size {
            return self.admit(msg, false, Vec::new());
        }
        let query = EventsAfter {
            room: self.key.to_string(),
            seq: since,
            limit: missing as usize,
            min_created_ms: now_ms() - self.settings.history_ttl.as_millis() as i64,
        };
        let (head, threshold) = (self.head, self.settings.compress_threshold);
        // `wait`: no live event is handled before this member has its replay.
        ctx.wait(self.store.send(query).into_actor(self).map(move |res, room, _| {
            match res.ok().and_then(|r| r.ok()).and_then(|rows| decode_run(rows, since, head, threshold)) {
                Some(events) => room.admit(msg, true, events),
                None => room.admit(msg, false, Vec::new()),
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
