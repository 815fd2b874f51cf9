//! The session actor: one per WebSocket connection.
//!
//! Inbound frames arrive as a stream (`ctx.add_stream` over actix-ws's `MessageStream`); outbound
//! messages go through the connection's [`Outbox`] (see `outbox.rs`) to a writer task that owns the
//! actix-ws `Session` handle, so the actor never waits on a socket. Rooms write events straight into
//! that queue. Client frames become messages in `frames.rs` (shared with the `/ws/echo` conformance
//! endpoint, so a conformance suite checks exactly this path); the writer is the only code that
//! writes frames. Authentication, refresh, heartbeat, rate limit, subscribe (with job-room
//! reservations), ack and cancel are handled here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{Message as WsMessage, ProtocolError};
use tokio::sync::oneshot;
use tracing::{info, warn};
use uuid::Uuid;

use crate::auth::{authorize_room, unix_now, Auth, AuthError, Identity, RoomRefusal};
use crate::config::Config;
use crate::framing::{Encoded, Format};
use crate::jobs::lookup::{JobAccess, Refused as JobRefused};
use crate::jobs::scheduler::CancelOutcome;
use crate::metrics::Metrics;
use crate::protocol::{
    close, error_code, excerpt, unix_to_rfc3339, AuthFailure, Authenticated, ClientMessage, ConnectionEstablished,
    Envelope, ErrorData, Event, JobSnapshot, Pong, RoomKind, Since, TokenExpiring, TokenRefreshed, Unsubscribed,
    FEATURES,
};
use crate::realtime::ack_buffer::{self, AckBuffer};
use crate::realtime::broker::{self, Broker};
use crate::realtime::frames::{Frames, Inbound};
use crate::realtime::outbox::{Outbox, OutboxSettings, Outgoing, Refused, SlowConsumer};
use crate::realtime::rate_limit::{TokenBucket, Verdict};
use crate::realtime::redis::{retry_in_background, RedisEngine, Spend};
use crate::realtime::registry::{self, Disconnect, LimitReached, Registry};

/// What every session is handed at construction.
#[derive(Clone)]
pub struct SessionDeps {
    /// The configuration.
    pub config: Arc<Config>,
    /// Token verification.
    pub auth: Arc<Auth>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Where subscriptions go.
    pub broker: Addr<Broker>,
    /// Where the connection reports itself.
    pub registry: Addr<Registry>,
    /// Job rooms and cancels.
    pub jobs: JobAccess,
    /// Cluster mode: where WebSocket tokens are spent, once across every node.
    pub redis: Option<RedisEngine>,
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
    /// Peer IP.
    pub ip: Option<std::net::IpAddr>,
}

/// A room as the server names it: `job:` ids in the lower-case hyphenated form, whatever spelling
/// of the UUID the client used (so every spelling is one room); other names as they are.
fn canonical(room: String) -> String {
    match RoomKind::parse(&room) {
        Some(kind @ RoomKind::Job(_)) => kind.name(),
        _ => room,
    }
}

/// One room membership.
struct Joined {
    /// The room's key in the broker (`RoomKind::key`: a `user:` room's carries the tenant).
    key: String,
    /// Closed on unsubscribe: the writer drops what the room still queued.
    gate: Arc<AtomicBool>,
    /// Whether a `since` of this membership was passed to the room already.
    replayed: bool,
}

/// A WebSocket connection.
pub struct Session {
    /// Server-chosen id.
    id: Uuid,
    deps: SessionDeps,
    params: SessionParams,
    /// Outbound queue to the writer task; its live part is bounded.
    out: Outbox,
    /// Closes the writer at once when the queue is too full to carry a close frame.
    urgent_close: Option<oneshot::Sender<(u16, String)>>,
    /// Set once authentication succeeded.
    identity: Option<Identity>,
    /// Rooms this connection is in, by the name the client uses.
    rooms: HashMap<String, Joined>,
    /// Inbound message rate limit.
    bucket: TokenBucket,
    /// Last time anything arrived from the client.
    last_seen: Instant,
    /// Frames to messages (fragments, UTF-8, the close each protocol error gets).
    frames: Frames,
    /// Set once a close was sent; nothing else is sent after it.
    closing: bool,
    /// Timers for `token_expiring` and the 4001 close; replaced on refresh.
    expiry_timers: Vec<SpawnHandle>,
    /// Span around everything this connection does.
    span: tracing::Span,
    /// The acknowledgement buffer, with `ack=1`.
    acks: Option<Addr<AckBuffer>>,
    /// Cluster mode: the (tenant, user) this connection is counted for across the cluster.
    user_claimed: Option<(String, String)>,
}

impl Session {
    /// Starts a session over an upgraded WebSocket.
    pub fn start(
        deps: SessionDeps,
        params: SessionParams,
        ws: actix_ws::Session,
        stream: actix_ws::MessageStream,
    ) -> Addr<Session> {
        let id = Uuid::new_v4();
        let span = tracing::info_span!("connection", conn = %id, user = tracing::field::Empty);
        let limit = deps.config.max_inbound_message_bytes;
        let stream = stream.max_frame_size(limit);
        let bucket = TokenBucket::new(deps.config.inbound_rate_per_s, deps.config.inbound_burst, Instant::now());
        Session::create(move |ctx| {
            ctx.add_stream(stream);
            let settings = OutboxSettings {
                format: params.format,
                max_msgs: deps.config.max_queued_messages,
                max_bytes: deps.config.max_queued_bytes,
                compress_threshold: deps.config.compress_threshold_bytes,
            };
            let slow = ctx.address().downgrade().recipient();
            let (out, urgent_close) = Outbox::open(ws, settings, deps.metrics.clone(), slow);
            Session {
                id,
                deps,
                params,
                out,
                urgent_close: Some(urgent_close),
                identity: None,
                rooms: HashMap::new(),
                bucket,
                last_seen: Instant::now(),
                frames: Frames::new(limit),
                closing: false,
                expiry_timers: Vec::new(),
                span,
                acks: None,
                user_claimed: None,
            }
        })
    }

    /// Queues a frame. A connection with more than `max_queued_messages` live messages or
    /// `max_queued_bytes` bytes waiting is a slow consumer: it is closed with 4008 rather than
    /// buffered without limit, and it recovers from history when it comes back. A replay counts its
    /// bytes, not its messages (its length is bounded by the history size).
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
        self.out.overflow();
        self.deps.metrics.slow_consumers.fetch_add(1, Relaxed);
        let (code, reason) = close::SLOW_CONSUMER;
        if let Some(tx) = self.urgent_close.take() {
            let _ = tx.send((code, reason.into()));
        }
        self.close_as(close::SLOW_CONSUMER, ctx);
    }

    /// Sends a connection-level message.
    fn send(&mut self, event: Event, ctx: &mut Context<Self>) {
        let env = Envelope::direct(event);
        match Encoded::new(&env, self.deps.config.compress_threshold_bytes) {
            Ok(enc) => self.push(Outgoing::direct(Arc::new(enc)), ctx),
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
        self.deps.metrics.closed(code);
        let _g = self.span.enter();
        info!(target: "audit", event = "close", conn = %self.id, code, reason, "server closed the connection");
        self.out.close(code, reason);
        ctx.stop();
    }

    /// Closes with one of the fixed closes of [`close`].
    fn close_as(&mut self, (code, reason): close::Close, ctx: &mut Context<Self>) {
        self.close(code, reason, ctx);
    }

    fn auth_failed(&mut self, err: AuthError, ctx: &mut Context<Self>) {
        self.deps.metrics.auth_failed(err.reason());
        {
            let _g = self.span.enter();
            warn!(target: "audit", event = "auth_failure", conn = %self.id, reason = err.reason(), "authentication failed");
        }
        self.send(Event::AuthFailure(AuthFailure { reason: err.reason().into() }), ctx);
        self.close(close::UNAUTHORIZED, err.reason(), ctx);
    }

    /// Verifies `token` and, once the registry accepts the user, marks the connection authenticated.
    fn authenticate(&mut self, token: &str, ctx: &mut Context<Self>) {
        if let Some(redis) = self.deps.redis.clone() {
            let (identity, spend) = match self.deps.auth.verify_connect_unspent(token) {
                Ok(checked) => checked,
                Err(e) => return self.auth_failed(e, ctx),
            };
            let Some(unspent) = spend else {
                return self.identify(identity, ctx);
            };
            let spent = async move { redis.spend_token(&unspent.jti, unspent.exp, &unspent.run).await };
            ctx.wait(spent.into_actor(self).map(move |res, act, ctx| match res {
                Ok(Spend::Spent) => act.identify(identity, ctx),
                Ok(Spend::Reused) => act.auth_failed(AuthError::Reused, ctx),
                Ok(Spend::Stale) => act.auth_failed(AuthError::MintedBeforeStart, ctx),
                Err(e) => {
                    act.span.in_scope(|| warn!(conn = %act.id, error = %e, "cannot spend a WebSocket token"));
                    act.auth_failed(AuthError::Unavailable, ctx)
                }
            }));
            return;
        }
        match self.deps.auth.verify_connect(token) {
            Ok(id) => self.identify(id, ctx),
            Err(e) => self.auth_failed(e, ctx),
        }
    }

    /// Tells the registry who the connection is; once it accepts, the connection is authenticated.
    /// In cluster mode the user's connections are counted across every node first.
    fn identify(&mut self, identity: Identity, ctx: &mut Context<Self>) {
        if let (Some(redis), None) = (self.deps.redis.clone(), &self.user_claimed) {
            let (tenant, user, max) =
                (identity.tenant.clone(), identity.user_id.clone(), self.deps.config.max_connections_per_user);
            let claim = async move { redis.claim_user(&tenant, &user, max).await };
            ctx.wait(claim.into_actor(self).map(move |res, act, ctx| match res {
                Ok(true) => {
                    act.user_claimed = Some((identity.tenant.clone(), identity.user_id.clone()));
                    act.identify(identity, ctx)
                }
                Ok(false) => act.close_as(close::TOO_MANY_FOR_USER, ctx),
                Err(e) => {
                    act.span.in_scope(|| warn!(conn = %act.id, error = %e, "cannot count the user's connections"));
                    act.auth_failed(AuthError::Unavailable, ctx)
                }
            }));
            return;
        }
        let fut = self.deps.registry.send(registry::Identify { id: self.id, identity: identity.clone() });
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(Ok(())) => act.authenticated(identity, ctx),
            Ok(Err(LimitReached::User)) => act.close_as(close::TOO_MANY_FOR_USER, ctx),
            Ok(Err(_)) | Err(_) => act.close_as(close::TOO_MANY_CONNECTIONS, ctx),
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
            (RoomRefusal::Unknown, true) => self.close_as(close::NO_SUCH_JOB, ctx),
            (RoomRefusal::Forbidden, true) => self.close_as(close::JOB_FORBIDDEN, ctx),
            (RoomRefusal::Unknown, false) => {
                self.send_error(error_code::UNKNOWN_ROOM, format!("no such room: {}", excerpt(room)), ctx)
            }
            (RoomRefusal::Forbidden, false) => {
                self.send_error(error_code::FORBIDDEN, format!("not allowed to join {}", excerpt(room)), ctx)
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
            act.deps.metrics.auth_failed(AuthError::Expired.reason());
            act.send(Event::AuthFailure(AuthFailure { reason: AuthError::Expired.reason().into() }), ctx);
            act.close_as(close::TOKEN_EXPIRED, ctx);
        }));
    }

    /// Checks a room (job rooms against the store: they exist once their job does) and joins it.
    fn subscribe(&mut self, room: String, since: Option<Since>, auto: bool, ctx: &mut Context<Self>) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        let room = canonical(room);
        // The cap first: a refused subscribe must not reserve a job id or look anything up.
        if !self.rooms.contains_key(&room) && self.rooms.len() >= self.deps.config.max_subscriptions_per_connection {
            let max = self.deps.config.max_subscriptions_per_connection;
            return self.send_error(
                error_code::TOO_MANY_SUBSCRIPTIONS,
                format!("at most {max} subscriptions per connection"),
                ctx,
            );
        }
        let kind = match RoomKind::parse(&room) {
            Some(RoomKind::Job(job_id)) => job_id,
            Some(kind) => {
                return match authorize_room(&identity, &kind, None) {
                    Ok(()) => self.join(room, kind.key(&identity.tenant), since, None),
                    Err(refusal) => self.refuse(&room, refusal, auto, ctx),
                }
            }
            None => return self.refuse(&room, RoomRefusal::Unknown, auto, ctx),
        };
        // The room of a job not uploaded yet is reserved for the user's tenant (subscribe first,
        // then upload with `batch_id`); `/ws/jobs/{id}` and admins only join jobs that exist.
        let jobs = self.deps.jobs.clone();
        let reserve = !auto && !identity.admin;
        let max = self.deps.config.max_reservations_per_tenant;
        let lookup = async move {
            if reserve {
                jobs.reserve(&identity, kind, max).await
            } else {
                jobs.find(&identity, kind, true).await
            }
        };
        // `wait`: later messages of this client are handled after this subscription, in order.
        ctx.wait(lookup.into_actor(self).map(move |found, act, ctx| match found {
            Ok(job) => act.join(room.clone(), room, since, Some(Box::new(job.snapshot))),
            Err(JobRefused::Forbidden) => act.refuse(&room, RoomRefusal::Forbidden, auto, ctx),
            Err(JobRefused::TooManyReservations) => act.send_error(
                error_code::TOO_MANY_RESERVATIONS,
                format!("the tenant holds {max} job-id reservations already; upload to one, or let them expire"),
                ctx,
            ),
            Err(JobRefused::Unknown | JobRefused::Unavailable(_)) => act.refuse(&room, RoomRefusal::Unknown, auto, ctx),
        }));
    }

    /// Joins an authorised room; the `subscribed` answer comes from the room itself.
    fn join(&mut self, room: String, key: String, since: Option<Since>, snapshot: Option<Box<JobSnapshot>>) {
        // The subscription cap was checked in `subscribe`; a job room's lookup runs under
        // `ctx.wait`, so no other subscribe can come between.
        // A repeated subscribe keeps its membership (and its gate); the room answers it again. One
        // `since` per membership is replayed (a client that joined without one, then asks for the
        // room's history, gets it); later ones are ignored, so a client cannot make the server
        // re-send the history without end.
        let joined = self.rooms.entry(room).or_insert_with(|| Joined {
            key,
            gate: Arc::new(AtomicBool::new(true)),
            replayed: false,
        });
        let since = if joined.replayed { None } else { since };
        joined.replayed |= since.is_some();
        let (key, gate) = (joined.key.clone(), joined.gate.clone());
        let member = self.out.member(gate, self.acks.clone());
        self.report_rooms();
        self.deps.broker.do_send(broker::Subscribe { room: key, conn: self.id, since, member, snapshot });
    }

    /// Cancels a job of the user's tenant; `job_cancelled` arrives in the job's room.
    fn cancel(&mut self, job_id: String, ctx: &mut Context<Self>) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        let Ok(id) = uuid::Uuid::parse_str(&job_id) else {
            return self.send_error(error_code::UNKNOWN_JOB, format!("no such job: {}", excerpt(&job_id)), ctx);
        };
        let jobs = self.deps.jobs.clone();
        let work = async move {
            let job = jobs.find(&identity, id, true).await?;
            // The scheduler gone means the server is stopping: nothing runs any more.
            Ok(jobs.cancel(&job, &identity.user_id).await.unwrap_or(CancelOutcome::NotRunning))
        };
        ctx.spawn(work.into_actor(self).map(move |res, act, ctx| match res {
            Ok(CancelOutcome::Cancelling) => {}
            Ok(CancelOutcome::NotRunning) => {
                act.send_error(error_code::JOB_FINISHED, format!("job {job_id} is not running"), ctx)
            }
            Err(JobRefused::Unknown | JobRefused::Unavailable(_) | JobRefused::TooManyReservations) => {
                act.send_error(error_code::UNKNOWN_JOB, format!("no such job: {}", excerpt(&job_id)), ctx)
            }
            Err(JobRefused::Forbidden) => {
                act.send_error(error_code::FORBIDDEN, format!("not allowed to cancel {job_id}"), ctx)
            }
        }));
    }

    fn report_rooms(&self) {
        self.deps.registry.do_send(registry::RoomsChanged { id: self.id, rooms: self.rooms.keys().cloned().collect() });
    }

    /// One complete client message (text, or binary holding UTF-8 JSON).
    fn on_message(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        match self.bucket.take(Instant::now()) {
            Verdict::Allow => {}
            Verdict::Warn => {
                return self.send_error(error_code::RATE_LIMITED, "too many messages; slow down", ctx);
            }
            Verdict::Close => return self.close_as(close::TOO_MANY_MESSAGES, ctx),
        }
        let msg = match serde_json::from_slice::<ClientMessage>(bytes) {
            Ok(m) => m,
            // serde quotes the offending input: keep the quote short and free of control characters.
            Err(e) => {
                return self.send_error(
                    error_code::BAD_REQUEST,
                    format!("invalid message: {}", excerpt(&e.to_string())),
                    ctx,
                )
            }
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
                let room = canonical(room);
                if !self.leave(room.clone(), ctx) {
                    self.send_error(error_code::NOT_SUBSCRIBED, format!("not subscribed to {}", excerpt(&room)), ctx);
                }
            }
            ClientMessage::Ack { room, seq } => self.ack(canonical(room), seq, ctx),
            ClientMessage::Ping { ts } => {
                self.send(Event::Pong(Pong { ts: crate::protocol::now_rfc3339(), client_ts: ts }), ctx)
            }
            ClientMessage::Cancel { job_id } => self.cancel(job_id, ctx),
            ClientMessage::Refresh { token } => self.refresh(&token, ctx),
        }
    }

    /// Leaves `room` and answers `unsubscribed`; false when the connection was not in it.
    fn leave(&mut self, room: String, ctx: &mut Context<Self>) -> bool {
        let Some(joined) = self.rooms.remove(&room) else {
            return false;
        };
        // Whatever the room queued from here on is dropped by the writer.
        joined.gate.store(false, Relaxed);
        self.report_rooms();
        self.deps.broker.do_send(broker::Unsubscribe { room: joined.key, conn: self.id });
        if let Some(acks) = &self.acks {
            acks.do_send(ack_buffer::Forget { room: room.clone() });
        }
        self.send(Event::Unsubscribed(Unsubscribed { room }), ctx);
        true
    }

    /// After a refresh took the admin role away: leaves every room the new identity may not join
    /// (other tenants' rooms and jobs, other users' rooms), each with `error` `forbidden` then
    /// `unsubscribed`, before anything else of this client is handled.
    fn recheck_rooms(&mut self, ctx: &mut Context<Self>) {
        let Some(identity) = self.identity.clone() else {
            return;
        };
        let mut jobs = Vec::new();
        let mut lost = Vec::new();
        for room in self.rooms.keys() {
            match RoomKind::parse(room) {
                Some(RoomKind::Job(id)) => jobs.push((room.clone(), id)),
                Some(kind) if authorize_room(&identity, &kind, None).is_ok() => {}
                _ => lost.push(room.clone()),
            }
        }
        self.lose(lost, ctx);
        let access = self.deps.jobs.clone();
        let check = async move {
            let mut lost = Vec::new();
            for (room, id) in jobs {
                if let Err(JobRefused::Forbidden) = access.find(&identity, id, true).await {
                    lost.push(room);
                }
            }
            lost
        };
        ctx.wait(check.into_actor(self).map(|lost, act, ctx| act.lose(lost, ctx)));
    }

    fn lose(&mut self, rooms: Vec<String>, ctx: &mut Context<Self>) {
        for room in rooms {
            self.send_error(error_code::FORBIDDEN, format!("no longer allowed in {room} after refresh"), ctx);
            self.leave(room, ctx);
        }
    }

    /// A cumulative `ack`: releases the room's events up to `seq` from the acknowledgement buffer.
    fn ack(&mut self, room: String, seq: u64, ctx: &mut Context<Self>) {
        if !self.rooms.contains_key(&room) {
            return self.send_error(error_code::NOT_SUBSCRIBED, format!("not subscribed to {}", excerpt(&room)), ctx);
        }
        // Without `ack=1` nothing waits for acks; an ack is harmless.
        let Some(acks) = &self.acks else { return };
        let fut = acks.send(ack_buffer::Acked { room, seq });
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok(Ok(released)) => {
                act.deps.metrics.acknowledged.fetch_add(released as u64, Relaxed);
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
        match self.deps.auth.verify_access(token) {
            Ok(fresh) if fresh.user_id == current.user_id && fresh.tenant == current.tenant => {
                self.schedule_expiry(fresh.expires_at, ctx);
                let expires_at = unix_to_rfc3339(fresh.expires_at);
                let demoted = current.admin && !fresh.admin;
                self.identity = Some(fresh);
                self.send(Event::TokenRefreshed(TokenRefreshed { expires_at }), ctx);
                if demoted {
                    self.recheck_rooms(ctx);
                }
            }
            Ok(_) => self.send_error(error_code::INVALID_TOKEN, "the token belongs to another user", ctx),
            Err(e) => {
                self.deps.metrics.auth_failed(e.reason());
                self.send_error(error_code::INVALID_TOKEN, format!("refresh refused: {e} ({})", e.reason()), ctx)
            }
        }
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.deps.metrics.connections.fetch_add(1, Relaxed);
        self.deps.metrics.connections_total.fetch_add(1, Relaxed);
        {
            let _g = self.span.enter();
            info!(target: "audit", event = "connect", conn = %self.id, remote = ?self.params.remote, "connection opened");
        }
        if self.params.ack {
            let window = Duration::from_millis(self.deps.config.ack_timeout_ms);
            let me = ctx.address();
            let buffer =
                AckBuffer::new(window, self.deps.config.max_delivery_attempts, me.clone().recipient(), me.recipient());
            self.acks = Some(buffer.start());
        }
        let connect = registry::Connect {
            id: self.id,
            session: ctx.address().recipient(),
            remote: self.params.remote.clone(),
            ip: self.params.ip,
            anonymous: self.params.token.is_none(),
            format: match self.params.format {
                Format::Auto => "auto",
                Format::Json => "json",
            },
            ack: self.params.ack,
        };
        let fut = self.deps.registry.send(connect);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(LimitReached::Unauthenticated)) => return act.close_as(close::TOO_MANY_UNAUTHENTICATED, ctx),
                Ok(Err(LimitReached::Address)) => return act.close_as(close::TOO_MANY_FROM_ADDRESS, ctx),
                Ok(Err(_)) | Err(_) => return act.close_as(close::TOO_MANY_CONNECTIONS, ctx),
            }
            let hb = act.deps.config.heartbeat_interval_s;
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
                let timeout = Duration::from_secs(act.deps.config.client_timeout_s);
                if act.last_seen.elapsed() > timeout {
                    act.close_as(close::HEARTBEAT_TIMEOUT, ctx);
                } else {
                    act.push(Outgoing::Ping, ctx);
                }
            });
            match act.params.token.take() {
                Some(token) => act.authenticate(&token, ctx),
                None => {
                    ctx.run_later(Duration::from_secs(act.deps.config.auth_timeout_s), |act, ctx| {
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
            self.out.end();
        }
        if let (Some((tenant, user)), Some(redis)) = (self.user_claimed.take(), self.deps.redis.clone()) {
            retry_in_background("a user's cluster connection count was not given back", move || {
                let (redis, tenant, user) = (redis.clone(), tenant.clone(), user.clone());
                async move { redis.release_user(&tenant, &user).await }
            });
        }
        self.deps.metrics.connections.fetch_sub(1, Relaxed);
        if let Some(acks) = self.acks.take() {
            acks.do_send(ack_buffer::Stop);
        }
        if !self.rooms.is_empty() {
            self.deps
                .broker
                .do_send(broker::Leave { conn: self.id, rooms: self.rooms.drain().map(|(_, j)| j.key).collect() });
        }
        self.deps.registry.do_send(registry::Disconnected { id: self.id });
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
        match self.frames.accept(item) {
            Inbound::Message(data) => self.on_message(data.as_bytes(), ctx),
            Inbound::Ping(bytes) => self.push(Outgoing::Pong(bytes.as_ref().into()), ctx),
            Inbound::Pending => {}
            Inbound::Closed(code) => self.close(code, close::CLIENT_CLOSED.1, ctx),
            Inbound::Fail(reason) => {
                if reason == close::BAD_FRAMES {
                    self.span.in_scope(|| info!(conn = %self.id, "protocol error"));
                }
                self.close_as(reason, ctx)
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
        match msg.event.redelivered(self.deps.config.compress_threshold_bytes) {
            Ok(again) => {
                self.deps.metrics.redelivered.fetch_add(1, Relaxed);
                self.push(Outgoing::direct(Arc::new(again)), ctx);
            }
            Err(e) => warn!(error = %e, "cannot encode a redelivery"),
        }
    }
}

impl Handler<ack_buffer::AckTimedOut> for Session {
    type Result = ();
    fn handle(&mut self, msg: ack_buffer::AckTimedOut, ctx: &mut Context<Self>) {
        self.span.in_scope(|| info!(room = %msg.room, seq = msg.seq, "event never acknowledged"));
        self.deps.metrics.ack_timeouts.fetch_add(1, Relaxed);
        self.close_as(close::ACK_TIMEOUT, ctx);
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
