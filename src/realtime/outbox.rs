//! A connection's outbound queue: the [`Outbox`] that the session and its rooms write into, the
//! [`Member`] a room holds for each connection, and the writer task that owns the socket's sending
//! half.
//!
//! Rooms write events straight into a member's outbox, one hop per member and no actor message (the
//! fan-out hot path): every member gets the same `Arc<Encoded>`. The live part of the queue is
//! bounded (`max_queued_messages`, `max_queued_bytes`), counted by the pushers and the writer through
//! two atomics; past a bound nothing live is queued, and the session is told ([`SlowConsumer`]) so it
//! closes with 4008. Each room membership holds the queue behind a gate of its own that `unsubscribe`
//! closes, so the writer drops what the room queued after it. The writer is the only code that writes
//! to the socket; the session only reads from it.
//!
//! A room message a connection was subscribed for but never sent — refused past the bound, or still
//! queued (or failing to write) when the connection ended — is counted in `dropped`
//! (`jobcast_messages_dropped_total`). None is lost silently: the connection was closed with a code,
//! and `subscribe` with `since` on the next one replays them from the room's history.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use actix::prelude::*;
use actix::WeakRecipient;
use actix_ws::{CloseCode, CloseReason};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::framing::{Encoded, Format, Frame};
use crate::metrics::Metrics;
use crate::protocol::{Envelope, Event, Subscribed};
use crate::realtime::ack_buffer::{self, AckBuffer};
use crate::realtime::frames::Data;

/// A connection as its rooms see it: its outbound queue behind the membership's gate, and with
/// `ack=1` its acknowledgement buffer, told of each event before the event is queued (so an `ack` from
/// the client can never reach the buffer before the event it acknowledges).
#[derive(Clone)]
pub struct Member {
    out: Outbox,
    acks: Option<Addr<AckBuffer>>,
}

impl Member {
    /// The `subscribed` answer of a join.
    pub fn joined(&self, sub: Subscribed) {
        self.out.subscribed(sub);
    }

    /// A room event; `replay` for the events that follow `subscribed`.
    pub fn event(&self, room: &Arc<str>, event: &Arc<Encoded>, replay: bool) {
        if let (Some(acks), Some(gate)) = (&self.acks, &self.out.gate) {
            acks.do_send(ack_buffer::Sent { room: room.clone(), event: event.clone(), gate: gate.clone() });
        }
        self.out.event(event, replay);
    }
}

/// Sent to the session: its slow-consumer bound was crossed by a room writing into its outbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SlowConsumer;

/// Messages and bytes waiting for the writer, and their bounds: every frame's bytes count, replayed
/// frames do not count as messages.
struct Queued {
    msgs: AtomicUsize,
    bytes: AtomicUsize,
    max_msgs: usize,
    max_bytes: usize,
    /// Set when a bound was crossed; nothing live is queued after it.
    overflowed: AtomicBool,
}

/// Why a message was not queued.
pub enum Refused {
    /// A slow-consumer bound was crossed.
    Full,
    /// The writer is gone.
    Closed,
}

/// The writing end of a connection's outbound queue. The session holds one; each room membership holds
/// a clone with a gate of its own, closed on `unsubscribe`, so the writer drops what the room queued
/// after it.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Outgoing>,
    queued: Arc<Queued>,
    format: Format,
    compress_threshold: usize,
    /// The room membership's gate (`None` for the session's own handle).
    gate: Option<Arc<AtomicBool>>,
    /// Told when a room crosses the bound; weak, so rooms never keep a closed session alive.
    slow: WeakRecipient<SlowConsumer>,
    /// Counts the room messages this connection was not sent.
    metrics: Arc<Metrics>,
}

/// How a connection's queue is bounded and framed.
pub struct OutboxSettings {
    /// `format` query parameter.
    pub format: Format,
    /// `max_queued_messages`.
    pub max_msgs: usize,
    /// `max_queued_bytes`.
    pub max_bytes: usize,
    /// `compress_threshold_bytes`, for the `subscribed` a room encodes.
    pub compress_threshold: usize,
}

impl Outbox {
    /// Opens a connection's queue and spawns its writer over `ws`. Answers the session's handle and
    /// the sender of an urgent close, which the writer takes ahead of everything queued.
    pub fn open(
        ws: actix_ws::Session,
        settings: OutboxSettings,
        metrics: Arc<Metrics>,
        slow: WeakRecipient<SlowConsumer>,
    ) -> (Outbox, oneshot::Sender<(u16, String)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (urgent_tx, urgent_rx) = oneshot::channel();
        let queued = Arc::new(Queued {
            msgs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_msgs: settings.max_msgs,
            max_bytes: settings.max_bytes,
            overflowed: AtomicBool::new(false),
        });
        actix_rt::spawn(writer(ws, rx, urgent_rx, metrics.clone(), queued.clone(), settings.format));
        let out = Outbox {
            tx,
            queued,
            format: settings.format,
            compress_threshold: settings.compress_threshold,
            gate: None,
            slow,
            metrics,
        };
        (out, urgent_tx)
    }

    /// The handle a room membership holds: this queue behind `gate`, and the connection's `acks`.
    pub fn member(&self, gate: Arc<AtomicBool>, acks: Option<Addr<AckBuffer>>) -> Member {
        Member { out: Outbox { gate: Some(gate), ..self.clone() }, acks }
    }

    /// Marks the queue over its bound: nothing live is queued from now on.
    pub fn overflow(&self) {
        self.queued.overflowed.store(true, Relaxed);
    }

    /// Queues a close frame after everything already queued; the writer stops after it.
    pub fn close(&self, code: u16, reason: &str) {
        let _ = self.tx.send(Outgoing::Close(code, reason.into()));
    }

    /// The session stopped without a close of its own: the writer ends the socket.
    pub fn end(&self) {
        let _ = self.tx.send(Outgoing::End);
    }

    /// Queues `item`, counting live frames against the slow-consumer bounds.
    /// A replayed frame counts its bytes (a replay must not grow a queue past `max_queued_bytes`)
    /// but not against the message bound (a replay of up to `history_size` events is expected).
    pub fn push(&self, item: Outgoing) -> Result<(), Refused> {
        let (msgs, len) = match &item {
            Outgoing::Frame { event, live, .. } => (usize::from(*live), event.len(self.format)),
            Outgoing::Echo(data) => (1, data.as_bytes().len()),
            _ => (1, 0),
        };
        let q = &self.queued;
        if q.overflowed.load(Relaxed)
            || (msgs > 0 && q.msgs.load(Relaxed) >= q.max_msgs)
            || q.bytes.load(Relaxed) + len > q.max_bytes
        {
            return Err(Refused::Full);
        }
        q.msgs.fetch_add(msgs, Relaxed);
        q.bytes.fetch_add(len, Relaxed);
        if self.tx.send(item).is_err() {
            // The writer is gone: nothing will take the count back.
            q.msgs.fetch_sub(msgs, Relaxed);
            q.bytes.fetch_sub(len, Relaxed);
            return Err(Refused::Closed);
        }
        Ok(())
    }

    /// From a room: counts what is refused as dropped, and tells the session when the bound is
    /// crossed (once; it then closes with 4008).
    fn push_from_room(&self, item: Outgoing) {
        let Err(refused) = self.push(item) else {
            return;
        };
        self.metrics.dropped.fetch_add(1, Relaxed);
        if let Refused::Full = refused {
            if !self.queued.overflowed.swap(true, Relaxed) {
                if let Some(session) = self.slow.upgrade() {
                    session.do_send(SlowConsumer);
                }
            }
        }
    }

    fn subscribed(&self, sub: Subscribed) {
        let env = Envelope::direct(Event::Subscribed(sub));
        match Encoded::new(&env, self.compress_threshold) {
            Ok(enc) => self.push_from_room(Outgoing::Frame {
                event: Arc::new(enc),
                live: true,
                timed: false,
                gate: self.gate.clone(),
            }),
            Err(e) => warn!(error = %e, "cannot encode subscribed"),
        }
    }

    fn event(&self, event: &Arc<Encoded>, replay: bool) {
        self.push_from_room(Outgoing::Frame {
            event: event.clone(),
            live: !replay,
            timed: true,
            gate: self.gate.clone(),
        });
    }
}

/// What the writer task writes.
/// Kept small: each connection's queue allocates room for 32 of them up front.
pub enum Outgoing {
    Frame {
        /// The message, in every format; the writer picks the connection's.
        event: Arc<Encoded>,
        /// Counted against the message bound (everything but a replay; every frame's bytes count).
        live: bool,
        /// A room event, timed for the broker-to-socket latency histogram.
        timed: bool,
        /// A room membership's gate: the frame is dropped once it is closed.
        gate: Option<Arc<AtomicBool>>,
    },
    Ping,
    Pong(Box<[u8]>),
    /// A message of the `/ws/echo` conformance endpoint, sent back as it came.
    Echo(Box<Data>),
    Close(u16, Box<str>),
    /// The session stopped without a close of its own (the client's stream ended): end the socket
    /// now rather than when the last room lets go of its outbox.
    End,
}

impl Outgoing {
    /// A connection-level message (or a redelivery): live, untimed, behind no gate.
    pub fn direct(event: Arc<Encoded>) -> Outgoing {
        Outgoing::Frame { event, live: true, timed: false, gate: None }
    }

    /// A message a room queued for a membership that is still open.
    fn is_room_message(&self) -> bool {
        matches!(self, Outgoing::Frame { gate: Some(g), .. } if g.load(Relaxed))
    }
}

/// Owns the actix-ws handle and writes queued messages in order until a close or the queue ends;
/// then counts the room messages left unwritten as dropped.
async fn writer(
    ws: actix_ws::Session,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    urgent: oneshot::Receiver<(u16, String)>,
    metrics: Arc<Metrics>,
    queued: Arc<Queued>,
    format: Format,
) {
    write_until_closed(ws, &mut rx, urgent, &metrics, &queued, format).await;
    rx.close();
    let mut left = 0;
    while let Ok(item) = rx.try_recv() {
        if item.is_room_message() {
            left += 1;
        }
    }
    metrics.dropped.fetch_add(left, Relaxed);
}

async fn write_until_closed(
    mut ws: actix_ws::Session,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    mut urgent: oneshot::Receiver<(u16, String)>,
    metrics: &Metrics,
    queued: &Queued,
    format: Format,
) {
    let close_frame =
        |code: u16, reason: String| Some(CloseReason { code: CloseCode::from(code), description: Some(reason) });
    // Whether the actor may still ask for an urgent close (the sender is dropped with the actor).
    let mut urgent_open = true;
    loop {
        let item = tokio::select! {
            biased;
            r = &mut urgent, if urgent_open => match r {
                Ok((code, reason)) => {
                    let _ = ws.close(close_frame(code, reason)).await;
                    return;
                }
                Err(_) => {
                    urgent_open = false;
                    continue;
                }
            },
            item = rx.recv() => item,
        };
        let Some(item) = item else {
            // The actor is gone without a close (the client closed first): end the stream.
            let _ = ws.close(None).await;
            return;
        };
        let sent = match item {
            Outgoing::Frame { event, live, timed, gate } => {
                let frame = event.frame(format);
                let len = frame.len();
                // A frame queued by a room the client has left since is dropped.
                let from_room = gate.is_some();
                let open = gate.is_none_or(|g| g.load(Relaxed));
                let r = match frame {
                    _ if !open => Ok(()),
                    Frame::Text(t) => ws.text(t).await,
                    Frame::Binary(b) => ws.binary(b).await,
                };
                queued.msgs.fetch_sub(usize::from(live), Relaxed);
                queued.bytes.fetch_sub(len, Relaxed);
                match &r {
                    Ok(()) if open => {
                        metrics.sent(event.kind, len);
                        if timed {
                            metrics.observe_latency(event.created.elapsed());
                        }
                    }
                    Err(_) if open && from_room => {
                        metrics.dropped.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
                r
            }
            Outgoing::Ping => {
                queued.msgs.fetch_sub(1, Relaxed);
                ws.ping(b"").await
            }
            Outgoing::Pong(b) => {
                queued.msgs.fetch_sub(1, Relaxed);
                ws.pong(&b).await
            }
            Outgoing::Echo(data) => {
                queued.msgs.fetch_sub(1, Relaxed);
                queued.bytes.fetch_sub(data.as_bytes().len(), Relaxed);
                match *data {
                    Data::Text(t) => ws.text(t).await,
                    Data::Binary(b) => ws.binary(b).await,
                }
            }
            Outgoing::Close(code, reason) => {
                let _ = ws.close(close_frame(code, reason.into())).await;
                return;
            }
            Outgoing::End => {
                let _ = ws.close(None).await;
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
