//! The room actor: one per active room, holding its members and its history ring.
//!
//! Only the broker sends to a room. Because a room handles `Join` and `Deliver` one at a time, a
//! joining member receives `subscribed`, then the replay, then live events, with no gap or duplicate
//! even while events are being published.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::Value;
use uuid::Uuid;

use crate::framing::Encoded;
use crate::history::{HistoryRing, Replay};
use crate::protocol::{Since, Subscribed};
use crate::session::RoomOutput;

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
    pub member: Recipient<RoomOutput>,
    /// Resume position, if any.
    pub since: Option<Since>,
    /// For job rooms, the job's state for `subscribed.snapshot`.
    pub snapshot: Option<Value>,
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
    /// The room's name, shared with every event sent to members.
    name: Arc<str>,
    /// The history epoch.
    epoch: Arc<str>,
    /// The newest `seq` delivered here.
    head: u64,
    /// The last `history_size` events.
    history: HistoryRing,
    /// Members by connection id.
    members: HashMap<Uuid, Recipient<RoomOutput>>,
}

impl Room {
    /// A room with no events yet.
    pub fn new(
        name: Arc<str>,
        epoch: Arc<str>,
        history_size: usize,
        history_ttl: Duration,
    ) -> Self {
        Room {
            name,
            epoch,
            head: 0,
            history: HistoryRing::new(history_size, history_ttl),
            members: HashMap::new(),
        }
    }
}

impl Actor for Room {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(30), |room, _| {
            room.history.expire(Instant::now())
        });
    }
}

impl Handler<Deliver> for Room {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        self.head = msg.seq;
        self.history
            .push(msg.seq, msg.event.clone(), Instant::now());
        for member in self.members.values() {
            member.do_send(RoomOutput::Event {
                room: self.name.clone(),
                event: msg.event.clone(),
            });
        }
    }
}

impl Handler<Join> for Room {
    type Result = ();
    fn handle(&mut self, msg: Join, _: &mut Context<Self>) {
        let replay = match &msg.since {
            Some(since) if *since.epoch == *self.epoch => {
                self.history.since(since.seq, self.head, Instant::now())
            }
            _ => Replay::Lost,
        };
        let (recovered, events) = match replay {
            Replay::Recovered(events) => (true, events),
            Replay::Lost => (false, Vec::new()),
        };
        msg.member.do_send(RoomOutput::Joined(Subscribed {
            room: self.name.to_string(),
            seq: self.head,
            epoch: self.epoch.to_string(),
            recovered,
            replayed: events.len() as u64,
            snapshot: msg.snapshot,
        }));
        for event in events {
            msg.member.do_send(RoomOutput::Event {
                room: self.name.clone(),
                event,
            });
        }
        self.members.insert(msg.conn, msg.member);
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
