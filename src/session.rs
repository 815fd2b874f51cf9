//! The session actor: one per WebSocket connection.
//!
//! Inbound frames arrive as a stream (`ctx.add_stream` over actix-ws's `MessageStream`); outbound
//! messages go through a queue with counted bounds (the [`Outbox`]) to a writer task that owns the actix-ws `Session`
//! handle, so the actor never waits on a socket. Rooms write events straight into that queue
//! ([`Member`]): one hop per member instead of an actor message and a hop. Only this file touches
//! WebSocket frames.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakAddr;
use actix_ws::{CloseCode, CloseReason, Item, Message as WsMessage, ProtocolError};
use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};
use uuid::Uuid;

use crate::ack_buffer::{self, AckBuffer};
use crate::auth::{authorize_room, unix_now, AuthError, Identity, RoomRefusal};
use crate::broker;
use crate::framing::{Encoded, Format, Frame};
use crate::job::public_snapshot;
use crate::protocol::RoomKind;
use crate::protocol::{
    close, error_code, unix_to_rfc3339, AuthFailure, Authenticated, ClientMessage, ConnectionEstablished, Envelope,
    ErrorData, Event, Pong, Since, Subscribed, TokenExpiring, TokenRefreshed, Unsubscribed, FEATURES,
};
use crate::rate_limit::{TokenBucket, Verdict};
use crate::registry::{self, LimitReached};
use crate::scheduler::{CancelJob, CancelOutcome};
use crate::store::{GetJob, ReserveJob};
use crate::Shared;

/// Close the connection (sent by the registry for admin disconnects and shutdown).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Disconnect {
    /// Close code.
    pub code: u16,
    /// Close reason.
    pub reason: String,
}

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

/// The connection's slow-consumer bound was crossed by a room writing into its outbox.
#[derive(Message)]
#[rtype(result = "()")]
struct SlowConsumer;

/// Live messages and bytes waiting for the writer (replayed ones are not counted), and their bounds.
struct Queued {
    msgs: AtomicUsize,
    bytes: AtomicUsize,
    max_msgs: usize,
    max_bytes: usize,
    /// Set when a bound was crossed; nothing live is queued after it.
    overflowed: AtomicBool,
}

/// Why a message was not queued.
enum Refused {
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
    gate: Option<Arc<AtomicBool>>,
    session: WeakAddr<Session>,
}

impl Outbox {
    /// Queues `item`, counting live frames against the slow-consumer bounds.
    fn push(&self, item: Outgoing) -> Result<(), Refused> {
        let live_len = match &item {
            Outgoing::Frame { event, live: true, .. } => Some(event.len(self.format)),
            Outgoing::Frame { .. } => None,
            _ => Some(0),
        };
        if let Some(len) = live_len {
            let q = &self.queued;
            if q.overflowed.load(Relaxed)
                || q.msgs.load(Relaxed) >= q.max_msgs
                || q.bytes.load(Relaxed) + len > q.max_bytes
            {
                return Err(Refused::Full);
            }
            q.msgs.fetch_add(1, Relaxed);
            q.bytes.fetch_add(len, Relaxed);
        }
        if self.tx.send(item).is_err() {
            // The writer is gone: nothing will take the count back.
            if let Some(len) = live_len {
                self.queued.msgs.fetch_sub(1, Relaxed);
                self.queued.bytes.fetch_sub(len, Relaxed);
            }
            return Err(Refused::Closed);
        }
        Ok(())
    }

    /// From a room: tells the session when the bound is crossed (once; it then closes with 4008).
    fn push_from_room(&self, item: Outgoing) {
        if let Err(Refused::Full) = self.push(item) {
            if !self.queued.overflowed.swap(true, Relaxed) {
                if let Some(session) = self.session.upgrade() {
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
enum Outgoing {
    Frame {
        /// The message, in every format; the writer picks the connection's.
        event: Arc<Encoded>,
        /// Counted against the slow-consumer bounds (everything but a replay).
        live: bool,
        /// A room event, timed for the broker-to-socket latency histogram.
        timed: bool,
        /// A room membership's gate: the frame is dropped once it is closed.
        gate: Option<Arc<AtomicBool>>,
    },
    Ping,
    Pong(Box<[u8]>),
    Close(u16, Box<str>),
    /// The session stopped without a close of its own (the client's stream ended): end the socket
    /// now rather than when the last room lets go of its outbox.
    End,
}

/// How a connection starts.
pub struct SessionParams {
    /// Token from the query string, if any.
    pub token: Option<String>,
    /// `format` query parameter.
    pub format: Format,
    /// `ack=1`.
    pub ack: bool,
    /// Room to join right after authentication (`/ws/jobs/{id}`).
    pub auto_room: Option<String>,
    /// Peer address.
    pub remote: Option<String>,
}

/// A WebSocket connection.
pub struct Session {
    /// Server-chosen id.
    id: Uuid,
    shared: Shared,
    params: SessionParams,
    /// Outbound queue to the writer task; its live part is bounded.
    out: Outbox,
    /// Closes the writer at once when the queue is too full to carry a close frame.
    urgent_close: Option<oneshot::Sender<(u16, String)>>,
    /// Set once authentication succeeded.
    identity: Option<Identity>,
    /// Rooms this connection is in, with the gate of each membership.
    rooms: HashMap<String, Arc<AtomicBool>>,
    /// Inbound message rate limit.
    bucket: TokenBucket,
    /// Last time anything arrived from the client.
    last_seen: Instant,
    /// A fragmented message being assembled: whether it is text, and its bytes so far.
    fragments: Option<(bool, BytesMut)>,
    /// Set once a close was sent; nothing else is sent after it.
    closing: bool,
    /// Timers for `token_expiring` and the 4001 close; replaced on refresh.
    expiry_timers: Vec<SpawnHandle>,
    /// Span around everything this connection does.
    span: tracing::Span,
    /// The acknowledgement buffer, with `ack=1`.
    acks: Option<Addr<AckBuffer>>,
}

impl Session {
    /// Starts a session over an upgraded WebSocket.
    pub fn start(
        shared: Shared,
        params: SessionParams,
        ws: actix_ws::Session,
        stream: actix_ws::MessageStream,
    ) -> Addr<Session> {
        let id = Uuid::new_v4();
        let (out, rx) = mpsc::unbounded_channel();
        let (urgent_tx, urgent_rx) = oneshot::channel();
        let queued = Arc::new(Queued {
            msgs: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_msgs: shared.config.max_queued_messages,
            max_bytes: shared.config.max_queued_bytes,
            overflowed: AtomicBool::new(false),
        });
        actix_rt::spawn(writer(ws, rx, urgent_rx, shared.metrics.clone(), queued.clone(), params.format));
        let span = tracing::info_span!("connection", conn = %id, user = tracing::field::Empty);
        let stream = stream.max_frame_size(shared.config.max_inbound_message_bytes);
        let bucket = TokenBucket::new(shared.config.inbound_rate_per_s, shared.config.inbound_burst, Instant::now());
        Session::create(move |ctx| {
            ctx.add_stream(stream);
            let out = Outbox {
                tx: out,
                queued,
                format: params.format,
                compress_threshold: shared.config.compress_threshold_bytes,
                gate: None,
                session: ctx.address().downgrade(),
            };
            Session {
                id,
                shared,
                params,
                out,
                urgent_close: Some(urgent_tx),
                identity: None,
                rooms: HashMap::new(),
                bucket,
                last_seen: Instant::now(),
                fragments: None,
                closing: false,
                expiry_timers: Vec::new(),
                span,
                acks: None,
            }
        })
    }

    /// Queues a frame. A connection with more than `max_queued_messages` live messages or
    /// `max_queued_bytes` live bytes waiting is a slow consumer: it is closed with 4008 rather than
    /// buffered without limit, and it recovers from history when it comes back. A replay is not
    /// counted: its burst is the server's doing, and it is bounded by the history size.
    fn push(&mut self, item: Outgoing, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        match self.out.push(item) {
            Ok(()) => {}
            Err(Refused::Full) => self.slow_consumer(ctx),
            Err(Refused::Closed) => ctx.stop(),
        }
    }

    /// Closes at once, ahead of everything queued (which the client is not reading).
    fn slow_consumer(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.out.queued.overflowed.store(true, Relaxed);
        self.shared.metrics.slow_consumers.fetch_add(1, Relaxed);
        if let Some(tx) = self.urgent_close.take() {
            let _ = tx.send((close::TIMEOUT, "slow consumer".into()));
        }
        self.close(close::TIMEOUT, "slow consumer", ctx);
    }

    /// Sends a connection-level message.
    fn send(&mut self, event: Event, ctx: &mut Context<Self>) {
        let env = Envelope::direct(event);
        match Encoded::new(&env, self.shared.config.compress_threshold_bytes) {
            Ok(enc) => self.push(Outgoing::Frame { event: Arc::new(enc), live: true, timed: false, gate: None }, ctx),
            Err(e) => warn!(error = %e, "cannot encode a connection message"),
        }
    }

    fn send_error(&mut self, code: &str, message: impl Into<String>, ctx: &mut Context<Self>) {
        self.send(Event::Error(ErrorData { code: code.into(), message: message.into() }), ctx);
    }

    /// Sends a close frame (after everything already queued) and stops the actor.
    fn close(&mut self, code: u16, reason: &str, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.shared.metrics.closed(code);
        let _g = self.span.enter();
        info!(target: "audit", event = "close", conn = %self.id, code, reason, "server closed the connection");
        let _ = self.out.tx.send(Outgoing::Close(code, reason.into()));
        ctx.stop();
    }

    fn auth_failed(&mut self, err: AuthError, ctx: &mut Context<Self>) {
        self.shared.metrics.auth_failed(err.reason());
        {
            let _g = self.span.enter();
            warn!(target: "audit", event = "auth_failure", conn = %self.id, reason = err.reason(), "authentication failed");
        }
        self.send(Event::AuthFailure(AuthFailure { reason: err.reason().into() }), ctx);
        self.close(close::UNAUTHORIZED, err.reason(), ctx);
    }

    /// Verifies `token` and, once the registry accepts the user, marks the connection authenticated.
    fn authenticate(&mut self, token: &str, ctx: &mut Context<Self>) {
        let identity = match self.shared.auth.verify_connect(token) {
            Ok(id) => id,
            Err(e) => return self.auth_failed(e, ctx),
        };
        let fut = self.shared.registry.send(registry::Identify { id: self.id, identity: identity.clone() });
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(Ok(())) => act.authenticated(identity, ctx),
            Ok(Err(LimitReached::User)) => act.close(close::TOO_MANY, "too many connections for this user", ctx),
            Ok(Err(LimitReached::Node)) | Err(_) => act.close(close::TOO_MANY, "too many connections", ctx),
        }));
    }

    fn authenticated(&mut self, identity: Identity, ctx: &mut Context<Self>) {
        self.span.record("user", identity.user_id.as_str());
        {
            let _g = self.span.enter();
            info!(target: "audit", event = "authenticated", conn = %self.id, user = %identity.user_id,
                tenant = %identity.tenant, admin = identity.admin, "connection authenticated");
        }
        self.send(
            Event::Authenticated(Authenticated {
                user_id: identity.user_id.clone(),
                tenant: identity.tenant.clone(),
                expires_at: unix_to_rfc3339(identity.expires_at),
            }),
            ctx,
        );
        self.schedule_expiry(identity.expires_at, ctx);
        self.identity = Some(identity);
        if let Some(room) = self.params.auto_room.clone() {
            self.subscribe(room, None, true, ctx);
        }
    }

    /// A subscription was refused: an `error`, or for the room of `/ws/jobs/{id}` a close.
    fn refuse(&mut self, room: &str, refusal: RoomRefusal, auto: bool, ctx: &mut Context<Self>) {
        match (refusal, auto) {
            (RoomRefusal::Unknown, true) => self.close(close::UNKNOWN_JOB, "unknown job", ctx),
            (RoomRefusal::Forbidden, true) => self.close(close::FORBIDDEN, "forbidden", ctx),
            (RoomRefusal::Unknown, false) => {
                self.send_error(error_code::UNKNOWN_ROOM, format!("no such room: {room}"), ctx)
            }
            (RoomRefusal::Forbidden, false) => {
                self.send_error(error_code::FORBIDDEN, format!("not allowed to join {room}"), ctx)
            }
        }
    }

    /// Sends `token_expiring` about 60 s before `exp`, and closes with 4001 at `exp`.
    fn schedule_expiry(&mut self, exp: u64, ctx: &mut Context<Self>) {
        for h in self.expiry_timers.drain(..) {
            ctx.cancel_future(h);
        }
        let left = exp.saturating_sub(unix_now());
        let warn_in = left.saturating_sub(60);
        self.expiry_timers.push(ctx.run_later(Duration::from_secs(warn_in), move |act, ctx| {
            let expires_in_s = exp.saturating_sub(unix_now());
            act.send(Event::TokenExpiring(TokenExpiring { expires_in_s }), ctx);
        }));
        self.expiry_timers.push(ctx.run_later(Duration::from_secs(left), |act, ctx| {
            act.shared.metrics.auth_failed(AuthError::Expired.reason());
            act.send(Event::AuthFailure(AuthFailure { reason: AuthError::Expired.reason().into() }), ctx);
            act.close(close::UNAUTHORIZED, "token expired", ctx);
        }));
    }

    /// Checks a room (job rooms against the store: they exist once their job does) and joins it.
    fn subscribe(&mut self, room: String, since: Option<Since>, auto: bool, ctx: &mut Context<Self>) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        let Some(RoomKind::Job(job_id)) = RoomKind::parse(&room) else {
            return match authorize_room(&identity, &room, |_| None) {
                Ok(_) => self.join(room, since, None, ctx),
                Err(refusal) => self.refuse(&room, refusal, auto, ctx),
            };
        };
        // The room of a job not uploaded yet is reserved for the user's tenant (subscribe first,
        // then upload with `batch_id`); `/ws/jobs/{id}` and admins only join jobs that exist.
        let store = self.shared.store.clone();
        let reserve = (!auto && !identity.admin).then(|| identity.tenant.clone());
        let lookup = async move {
            match reserve {
                Some(tenant) => {
                    store.send(ReserveJob { id: job_id.to_string(), tenant }).await.ok().and_then(|r| r.ok())
                }
                None => store.send(GetJob(job_id.to_string())).await.ok().and_then(|r| r.ok()).flatten(),
            }
        };
        // `wait`: later messages of this client are handled after this subscription, in order.
        ctx.wait(lookup.into_actor(self).map(move |snapshot, act, ctx| {
            let tenant = snapshot.as_ref().and_then(|s| s["tenant"].as_str()).map(str::to_string);
            match authorize_room(&identity, &room, |_| tenant) {
                Ok(_) => act.join(room, since, snapshot.map(public_snapshot), ctx),
                Err(refusal) => act.refuse(&room, refusal, auto, ctx),
            }
        }));
    }

    /// Joins an authorised room; the `subscribed` answer comes from the room itself.
    fn join(
        &mut self,
        room: String,
        since: Option<Since>,
        snapshot: Option<serde_json::Value>,
        ctx: &mut Context<Self>,
    ) {
        if !self.rooms.contains_key(&room) && self.rooms.len() >= self.shared.config.max_subscriptions_per_connection {
            let max = self.shared.config.max_subscriptions_per_connection;
            return self.send_error(
                error_code::TOO_MANY_SUBSCRIPTIONS,
                format!("at most {max} subscriptions per connection"),
                ctx,
            );
        }
        // A repeated subscribe keeps its membership (and its gate); the room answers it again.
        let gate = self.rooms.entry(room.clone()).or_insert_with(|| Arc::new(AtomicBool::new(true))).clone();
        let member = Member { out: Outbox { gate: Some(gate), ..self.out.clone() }, acks: self.acks.clone() };
        self.report_rooms();
        self.shared.broker.do_send(broker::Subscribe { room, conn: self.id, since, member, snapshot });
    }

    /// Cancels a job of the user's tenant; `job_cancelled` arrives in the job's room.
    fn cancel(&mut self, job_id: String, ctx: &mut Context<Self>) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        let Ok(id) = uuid::Uuid::parse_str(&job_id) else {
            return self.send_error(error_code::UNKNOWN_JOB, format!("no such job: {job_id}"), ctx);
        };
        let store = self.shared.store.clone();
        let scheduler = self.shared.scheduler.clone();
        let by = identity.user_id.clone();
        let work = async move {
            let snapshot = store.send(GetJob(id.to_string())).await.ok().and_then(|r| r.ok()).flatten();
            let Some(snapshot) = snapshot else {
                return Err(RoomRefusal::Unknown);
            };
            if !identity.admin && snapshot["tenant"].as_str() != Some(identity.tenant.as_str()) {
                return Err(RoomRefusal::Forbidden);
            }
            Ok(scheduler.send(CancelJob { job_id: id, by }).await.unwrap_or(CancelOutcome::NotRunning))
        };
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| match res {
            Ok(CancelOutcome::Cancelling) => {}
            Ok(CancelOutcome::NotRunning) => {
                act.send_error(error_code::JOB_FINISHED, format!("job {job_id} is not running"), ctx)
            }
            Err(RoomRefusal::Unknown) => act.send_error(error_code::UNKNOWN_JOB, format!("no such job: {job_id}"), ctx),
            Err(RoomRefusal::Forbidden) => {
                act.send_error(error_code::FORBIDDEN, format!("not allowed to cancel {job_id}"), ctx)
            }
        }));
    }

    fn report_rooms(&self) {
        self.shared
            .registry
            .do_send(registry::RoomsChanged { id: self.id, rooms: self.rooms.keys().cloned().collect() });
    }

    /// One complete client message (text, or binary holding UTF-8 JSON).
    fn on_message(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        match self.bucket.take(Instant::now()) {
            Verdict::Allow => {}
            Verdict::Warn => {
                return self.send_error(error_code::RATE_LIMITED, "too many messages; slow down", ctx);
            }
            Verdict::Close => return self.close(close::TOO_MANY, "too many messages", ctx),
        }
        let msg = match serde_json::from_slice::<ClientMessage>(bytes) {
            Ok(m) => m,
            Err(e) => return self.send_error(error_code::BAD_REQUEST, format!("invalid message: {e}"), ctx),
        };
        if self.identity.is_none() {
            return match msg {
                ClientMessage::Authenticate { token } => self.authenticate(&token, ctx),
                _ => self.auth_failed(AuthError::Missing, ctx),
            };
        }
        match msg {
            ClientMessage::Authenticate { .. } => {
                self.send_error(error_code::ALREADY_AUTHENTICATED, "this connection is already authenticated", ctx)
            }
            ClientMessage::Subscribe { room, since } => self.subscribe(room, since, false, ctx),
            ClientMessage::Unsubscribe { room } => {
                if let Some(gate) = self.rooms.remove(&room) {
                    // Whatever the room queued from here on is dropped by the writer.
                    gate.store(false, Relaxed);
                    self.report_rooms();
                    self.shared.broker.do_send(broker::Unsubscribe { room: room.clone(), conn: self.id });
                    if let Some(acks) = &self.acks {
                        acks.do_send(ack_buffer::Forget { room: room.clone() });
                    }
                    self.send(Event::Unsubscribed(Unsubscribed { room }), ctx);
                } else {
                    self.send_error(error_code::NOT_SUBSCRIBED, format!("not subscribed to {room}"), ctx);
                }
            }
            ClientMessage::Ack { room, seq } => self.ack(room, seq, ctx),
            ClientMessage::Ping { ts } => {
                self.send(Event::Pong(Pong { ts: crate::protocol::now_rfc3339(), client_ts: ts }), ctx)
            }
            ClientMessage::Cancel { job_id } => self.cancel(job_id, ctx),
            ClientMessage::Refresh { token } => self.refresh(&token, ctx),
        }
    }

    /// A cumulative `ack`: releases the room's events up to `seq` from the acknowledgement buffer.
    fn ack(&mut self, room: String, seq: u64, ctx: &mut Context<Self>) {
        if !self.rooms.contains_key(&room) {
            return self.send_error(error_code::NOT_SUBSCRIBED, format!("not subscribed to {room}"), ctx);
        }
        // Without `ack=1` nothing waits for acks; an ack is harmless.
        let Some(acks) = &self.acks else { return };
        let fut = acks.send(ack_buffer::Acked { room, seq });
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(Ok(released)) => {
                act.shared.metrics.acknowledged.fetch_add(released as u64, Relaxed);
            }
            Ok(Err(e)) => act.send_error(error_code::INVALID_ACK, e.to_string(), ctx),
            Err(_) => {}
        }));
    }

    /// Extends the connection's life with a fresh access token of the same user.
    fn refresh(&mut self, token: &str, ctx: &mut Context<Self>) {
        let Some(current) = self.identity.clone() else {
            return;
        };
        match self.shared.auth.verify_access(token) {
            Ok(fresh) if fresh.user_id == current.user_id && fresh.tenant == current.tenant => {
                self.schedule_expiry(fresh.expires_at, ctx);
                let expires_at = unix_to_rfc3339(fresh.expires_at);
                self.identity = Some(fresh);
                self.send(Event::TokenRefreshed(TokenRefreshed { expires_at }), ctx);
            }
            Ok(_) => self.send_error(error_code::INVALID_TOKEN, "the token belongs to another user", ctx),
            Err(e) => {
                self.shared.metrics.auth_failed(e.reason());
                self.send_error(error_code::INVALID_TOKEN, format!("refresh refused: {e} ({})", e.reason()), ctx)
            }
        }
    }

    /// A data frame or a piece of a fragmented one.
    fn on_fragment(&mut self, item: Item, ctx: &mut Context<Self>) {
        let limit = self.shared.config.max_inbound_message_bytes;
        let (last, chunk) = match item {
            Item::FirstText(b) => {
                self.fragments = Some((true, BytesMut::new()));
                (false, b)
            }
            Item::FirstBinary(b) => {
                self.fragments = Some((false, BytesMut::new()));
                (false, b)
            }
            Item::Continue(b) => (false, b),
            Item::Last(b) => (true, b),
        };
        let Some((_, buf)) = self.fragments.as_mut() else {
            return self.close(1002, "continuation without a first frame", ctx);
        };
        if buf.len() + chunk.len() > limit {
            self.fragments = None;
            return self.close(close::TOO_BIG, "message too big", ctx);
        }
        buf.extend_from_slice(&chunk);
        if last {
            if let Some((_, buf)) = self.fragments.take() {
                self.on_message(&buf, ctx);
            }
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.shared.metrics.connections.fetch_add(1, Relaxed);
        self.shared.metrics.connections_total.fetch_add(1, Relaxed);
        {
            let _g = self.span.enter();
            info!(target: "audit", event = "connect", conn = %self.id, remote = ?self.params.remote, "connection opened");
        }
        if self.params.ack {
            let window = Duration::from_millis(self.shared.config.ack_timeout_ms);
            let me = ctx.address();
            let buffer = AckBuffer::new(
                window,
                self.shared.config.max_delivery_attempts,
                me.clone().recipient(),
                me.recipient(),
            );
            self.acks = Some(buffer.start());
        }
        let connect = registry::Connect {
            id: self.id,
            session: ctx.address().recipient(),
            remote: self.params.remote.clone(),
            format: match self.params.format {
                Format::Auto => "auto",
                Format::Json => "json",
            },
            ack: self.params.ack,
        };
        let fut = self.shared.registry.send(connect);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            if !matches!(res, Ok(Ok(()))) {
                return act.close(close::TOO_MANY, "too many connections", ctx);
            }
            let hb = act.shared.config.heartbeat_interval_s;
            act.send(
                Event::ConnectionEstablished(ConnectionEstablished {
                    connection_id: act.id,
                    heartbeat_interval_s: hb,
                    server_version: format!("jobcast/{}", env!("CARGO_PKG_VERSION")),
                    features: FEATURES.iter().map(|f| f.to_string()).collect(),
                }),
                ctx,
            );
            ctx.run_interval(Duration::from_secs(hb), |act, ctx| {
                let timeout = Duration::from_secs(act.shared.config.client_timeout_s);
                if act.last_seen.elapsed() > timeout {
                    act.close(close::TIMEOUT, "heartbeat timeout", ctx);
                } else {
                    act.push(Outgoing::Ping, ctx);
                }
            });
            match act.params.token.take() {
                Some(token) => act.authenticate(&token, ctx),
                None => {
                    ctx.run_later(Duration::from_secs(act.shared.config.auth_timeout_s), |act, ctx| {
                        if act.identity.is_none() {
                            act.auth_failed(AuthError::Timeout, ctx);
                        }
                    });
                }
            }
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.closing {
            let _ = self.out.tx.send(Outgoing::End);
        }
        self.shared.metrics.connections.fetch_sub(1, Relaxed);
        if let Some(acks) = self.acks.take() {
            acks.do_send(ack_buffer::Stop);
        }
        if !self.rooms.is_empty() {
            self.shared
                .broker
                .do_send(broker::Leave { conn: self.id, rooms: self.rooms.drain().map(|(r, _)| r).collect() });
        }
        self.shared.registry.do_send(registry::Disconnected { id: self.id });
        let _g = self.span.enter();
        info!(target: "audit", event = "disconnect", conn = %self.id,
            user = self.identity.as_ref().map(|i| i.user_id.as_str()), "connection closed");
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for Session {
    fn handle(&mut self, item: Result<WsMessage, ProtocolError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.last_seen = Instant::now();
        match item {
            Ok(WsMessage::Text(text)) => {
                if self.fragments.is_some() {
                    return self.close(1002, "data frame inside a fragmented message", ctx);
                }
                self.on_message(text.as_bytes(), ctx)
            }
            Ok(WsMessage::Binary(bytes)) => {
                if self.fragments.is_some() {
                    return self.close(1002, "data frame inside a fragmented message", ctx);
                }
                self.on_message(&bytes, ctx)
            }
            Ok(WsMessage::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(WsMessage::Ping(bytes)) => self.push(Outgoing::Pong(bytes.as_ref().into()), ctx),
            Ok(WsMessage::Pong(_)) | Ok(WsMessage::Nop) => {}
            Ok(WsMessage::Close(reason)) => {
                let code = reason.as_ref().map(|r| u16::from(r.code)).unwrap_or(close::NORMAL);
                self.close(code, "closed by the client", ctx);
            }
            Err(ProtocolError::Overflow) => self.close(close::TOO_BIG, "message too big", ctx),
            Err(e) => {
                self.span.in_scope(|| info!(conn = %self.id, error = %e, "protocol error"));
                self.close(1002, "protocol error", ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<ack_buffer::Redeliver> for Session {
    type Result = ();
    fn handle(&mut self, msg: ack_buffer::Redeliver, ctx: &mut Context<Self>) {
        if !self.rooms.contains_key(&*msg.room) {
            return;
        }
        match msg.event.redelivered(self.shared.config.compress_threshold_bytes) {
            Ok(again) => {
                self.shared.metrics.redelivered.fetch_add(1, Relaxed);
                self.push(Outgoing::Frame { event: Arc::new(again), live: true, timed: false, gate: None }, ctx);
            }
            Err(e) => warn!(error = %e, "cannot encode a redelivery"),
        }
    }
}

impl Handler<ack_buffer::AckTimedOut> for Session {
    type Result = ();
    fn handle(&mut self, msg: ack_buffer::AckTimedOut, ctx: &mut Context<Self>) {
        self.span.in_scope(|| info!(room = %msg.room, seq = msg.seq, "event never acknowledged"));
        self.shared.metrics.ack_timeouts.fetch_add(1, Relaxed);
        self.close(close::TIMEOUT, "ack timeout", ctx);
    }
}

impl Handler<SlowConsumer> for Session {
    type Result = ();
    fn handle(&mut self, _: SlowConsumer, ctx: &mut Context<Self>) {
        self.slow_consumer(ctx);
    }
}

impl Handler<Disconnect> for Session {
    type Result = ();
    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        self.close(msg.code, &msg.reason, ctx);
    }
}

/// Owns the actix-ws handle and writes queued messages in order until a close or the queue ends.
async fn writer(
    mut ws: actix_ws::Session,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    mut urgent: oneshot::Receiver<(u16, String)>,
    metrics: Arc<crate::metrics::Metrics>,
    queued: Arc<Queued>,
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
                let open = gate.is_none_or(|g| g.load(Relaxed));
                let r = match frame {
                    _ if !open => Ok(()),
                    Frame::Text(t) => ws.text(t).await,
                    Frame::Binary(b) => ws.binary(b).await,
                };
                if live {
                    queued.msgs.fetch_sub(1, Relaxed);
                    queued.bytes.fetch_sub(len, Relaxed);
                }
                if open && r.is_ok() {
                    metrics.sent(event.kind, len);
                    if timed {
                        metrics.observe_latency(event.created.elapsed());
                    }
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
