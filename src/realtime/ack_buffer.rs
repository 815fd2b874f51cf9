//! The acknowledgement buffer actor: one per `ack=1` connection.
//!
//! The connection's rooms tell it every room event they queue for the connection ([`Sent`]), and the
//! session every cumulative `ack` the client sent ([`Acked`]). Events wait in an [`Unacked`] window, ordered by deadline; one timer per buffer
//! (not per message) finds those past `ack_timeout_ms`, and the buffer asks the session to send them
//! again marked `redelivered` ([`Redeliver`]), backing off, up to `max_delivery_attempts` deliveries in
//! all; then it asks the session to close with 4008 "ack timeout" ([`AckTimedOut`]).
//!
//! One actor per connection keeps the window's state beside the connection it belongs to and dies
//! with it; the broker and the rooms never see acknowledgements.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::framing::Encoded;

/// A room queued an event for the connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sent {
    /// The room.
    pub room: Arc<str>,
    /// The event.
    pub event: Arc<Encoded>,
    /// The room membership's gate. The session closes it before it sends [`Forget`], so an event a
    /// room sent just as the client left is not awaited.
    pub gate: Arc<AtomicBool>,
}

/// The client acknowledged every event of `room` up to `seq`.
#[derive(Message)]
#[rtype(result = "Result<usize, AckError>")]
pub struct Acked {
    /// The room.
    pub room: String,
    /// Cumulative position.
    pub seq: u64,
}

/// The connection left a room: nothing of it is awaited any more.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Forget {
    /// The room.
    pub room: String,
}

/// The connection closed: stop (the buffer's timer would otherwise keep it alive).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Sent to the session: write this event again, marked `redelivered`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Redeliver {
    /// The room.
    pub room: Arc<str>,
    /// The event as first sent.
    pub event: Arc<Encoded>,
}

/// Sent to the session: an event went unacknowledged through every attempt.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AckTimedOut {
    /// The room.
    pub room: Arc<str>,
    /// The event's `seq`.
    pub seq: u64,
}

/// Why an `ack` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The `seq` is past anything sent in that room.
    #[error("seq {seq} of {room} was never sent (highest sent: {highest})")]
    Ahead {
        /// The room.
        room: String,
        /// The acknowledged seq.
        seq: u64,
        /// The highest seq sent.
        highest: u64,
    },
}

/// What the window decided for one overdue event.
#[derive(Debug, Clone)]
pub enum Due {
    /// Send it again (this is delivery number `attempt`).
    Redeliver { room: Arc<str>, event: Arc<Encoded>, attempt: u32 },
    /// Every attempt is used up.
    Exhausted { room: Arc<str>, seq: u64 },
}

struct Entry {
    event: Arc<Encoded>,
    /// Deliveries so far (1 after the first send).
    deliveries: u32,
    deadline: Instant,
}

/// Unacknowledged events, by room and seq, with a deadline-ordered index.
pub struct Unacked {
    timeout: Duration,
    max_deliveries: u32,
    entries: HashMap<(Arc<str>, u64), Entry>,
    /// `(deadline, room, seq)`, earliest first.
    deadlines: BTreeSet<(Instant, Arc<str>, u64)>,
    /// Highest seq sent per room (for refusing acks from the future).
    highest: HashMap<Arc<str>, u64>,
}

impl Unacked {
    /// A window that waits `timeout` for the first ack and allows `max_deliveries` sends of an event.
    pub fn new(timeout: Duration, max_deliveries: u32) -> Self {
        Unacked {
            timeout,
            max_deliveries: max_deliveries.max(1),
            entries: HashMap::new(),
            deadlines: BTreeSet::new(),
            highest: HashMap::new(),
        }
    }

    /// How long to wait after delivery number `deliveries` before the next: the timeout, doubled
    /// for each retry (2 s, 4 s, 8 s, ... with the default).
    pub fn backoff(&self, deliveries: u32) -> Duration {
        self.timeout.saturating_mul(1 << deliveries.saturating_sub(1).min(16))
    }

    /// Records a first delivery.
    pub fn sent(&mut self, room: Arc<str>, event: Arc<Encoded>, now: Instant) {
        let Some(seq) = event.seq else { return };
        let top = self.highest.entry(room.clone()).or_insert(0);
        *top = (*top).max(seq);
        let key = (room.clone(), seq);
        if self.entries.contains_key(&key) {
            return;
        }
        let deadline = now + self.backoff(1);
        self.deadlines.insert((deadline, room, seq));
        self.entries.insert(key, Entry { event, deliveries: 1, deadline });
    }

    /// Applies a cumulative ack; answers how many events it released. Late and repeated acks are fine.
    pub fn ack(&mut self, room: &str, seq: u64) -> Result<usize, AckError> {
        let highest = self.highest.get(room).copied().unwrap_or(0);
        if seq > highest {
            return Err(AckError::Ahead { room: room.to_string(), seq, highest });
        }
        let keys: Vec<(Arc<str>, u64)> =
            self.entries.keys().filter(|(r, s)| &**r == room && *s <= seq).cloned().collect();
        for key in &keys {
            if let Some(e) = self.entries.remove(key) {
                self.deadlines.remove(&(e.deadline, key.0.clone(), key.1));
            }
        }
        Ok(keys.len())
    }

    /// Drops everything of a room.
    pub fn forget(&mut self, room: &str) {
        self.entries.retain(|(r, _), _| &**r != room);
        self.deadlines.retain(|(_, r, _)| &**r != room);
        self.highest.retain(|r, _| &**r != room);
    }

    /// Events past their deadline at `now`, in deadline order, rescheduled with backoff.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut out = Vec::new();
        while let Some((deadline, room, seq)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let key = (room.clone(), seq);
            let Some(entry) = self.entries.get_mut(&key) else { continue };
            if entry.deliveries >= self.max_deliveries {
                self.entries.remove(&key);
                out.push(Due::Exhausted { room, seq });
                continue;
            }
            entry.deliveries += 1;
            entry.deadline = now + self.timeout.saturating_mul(1 << (entry.deliveries - 1).min(16));
            self.deadlines.insert((entry.deadline, room.clone(), seq));
            out.push(Due::Redeliver { room, event: entry.event.clone(), attempt: entry.deliveries });
        }
        out
    }

    /// Events waiting for an ack.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The actor.
pub struct AckBuffer {
    window: Unacked,
    /// The session that owns this buffer.
    redeliver: Recipient<Redeliver>,
    timed_out: Recipient<AckTimedOut>,
    tick: Duration,
}

impl AckBuffer {
    /// A buffer reporting to its session.
    pub fn new(
        timeout: Duration,
        max_deliveries: u32,
        redeliver: Recipient<Redeliver>,
        timed_out: Recipient<AckTimedOut>,
    ) -> Self {
        let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        AckBuffer { window: Unacked::new(timeout, max_deliveries), redeliver, timed_out, tick }
    }
}

impl Actor for AckBuffer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.tick, |buf, ctx| {
            for due in buf.window.due(Instant::now()) {
                match due {
                    Due::Redeliver { room, event, attempt } => {
                        tracing::debug!(room = %room, seq = event.seq, attempt, "redelivering an unacknowledged event");
                        buf.redeliver.do_send(Redeliver { room, event })
                    }
                    Due::Exhausted { room, seq } => {
                        buf.timed_out.do_send(AckTimedOut { room, seq });
                        ctx.stop();
                        return;
                    }
                }
            }
        });
    }
}

impl Handler<Sent> for AckBuffer {
    type Result = ();
    fn handle(&mut self, msg: Sent, _: &mut Context<Self>) {
        if msg.gate.load(Relaxed) {
            self.window.sent(msg.room, msg.event, Instant::now());
        }
    }
}

impl Handler<Acked> for AckBuffer {
    type Result = Result<usize, AckError>;
    fn handle(&mut self, msg: Acked, _: &mut Context<Self>) -> Self::Result {
        self.window.ack(&msg.room, msg.seq)
    }
}

impl Handler<Stop> for AckBuffer {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Forget> for AckBuffer {
    type Result = ();
    fn handle(&mut self, msg: Forget, _: &mut Context<Self>) {
        self.window.forget(&msg.room);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, Event};

    fn ev(seq: u64) -> Arc<Encoded> {
        let mut env = Envelope::direct(Event::Info(serde_json::json!({})));
        env.seq = Some(seq);
        env.room = Some("tenant:a".into());
        Arc::new(Encoded::new(&env, 1024).unwrap())
    }

    fn room() -> Arc<str> {
        Arc::from("tenant:a")
    }

    #[test]
    fn cumulative_acks_release_everything_up_to_seq() {
        let t = Instant::now();
        let mut w = Unacked::new(Duration::from_secs(2), 3);
        for s in 1..=5 {
            w.sent(room(), ev(s), t);
        }
        assert_eq!(w.ack("tenant:a", 3), Ok(3));
        assert_eq!(w.len(), 2);
        assert_eq!(w.ack("tenant:a", 2), Ok(0), "a late ack is harmless");
        assert_eq!(w.ack("tenant:a", 3), Ok(0), "a duplicate ack is harmless");
        assert!(matches!(w.ack("tenant:a", 9), Err(AckError::Ahead { highest: 5, .. })));
        assert!(matches!(w.ack("tenant:b", 1), Err(AckError::Ahead { highest: 0, .. })));
        assert_eq!(w.ack("tenant:a", 5), Ok(2));
        assert!(w.is_empty());
    }

    #[test]
    fn overdue_events_are_redelivered_with_backoff_then_exhausted() {
        let t = Instant::now();
        let mut w = Unacked::new(Duration::from_secs(2), 3);
        w.sent(room(), ev(1), t);
        w.sent(room(), ev(2), t + Duration::from_millis(500));
        assert!(w.due(t + Duration::from_millis(1999)).is_empty());
        let due = w.due(t + Duration::from_secs(2));
        assert!(matches!(due.as_slice(), [Due::Redeliver { attempt: 2, .. }]));
        // Delivery 2 of seq 1 waits 4 s; seq 2 is due at 2.5 s.
        let due = w.due(t + Duration::from_millis(2500));
        assert!(matches!(due.as_slice(), [Due::Redeliver { attempt: 2, event, .. }] if event.seq == Some(2)));
        assert!(w.due(t + Duration::from_millis(5999)).is_empty());
        let due = w.due(t + Duration::from_secs(6));
        assert!(matches!(due.as_slice(), [Due::Redeliver { attempt: 3, .. }]));
        // The third delivery was the last: 8 s later it is exhausted.
        let due = w.due(t + Duration::from_secs(14));
        assert!(matches!(due.as_slice(), [Due::Redeliver { attempt: 3, .. }, Due::Exhausted { seq: 1, .. }]));
    }

    #[test]
    fn acked_events_never_come_back() {
        let t = Instant::now();
        let mut w = Unacked::new(Duration::from_secs(1), 3);
        w.sent(room(), ev(1), t);
        w.ack("tenant:a", 1).unwrap();
        assert!(w.due(t + Duration::from_secs(60)).is_empty());
        w.sent(room(), ev(2), t);
        w.forget("tenant:a");
        assert!(w.due(t + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn backoff_doubles() {
        let w = Unacked::new(Duration::from_millis(100), 5);
        assert_eq!(w.backoff(1), Duration::from_millis(100));
        assert_eq!(w.backoff(2), Duration::from_millis(200));
        assert_eq!(w.backoff(3), Duration::from_millis(400));
    }
}
