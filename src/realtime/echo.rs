//! The `Echo` actor: one per `/ws/echo` connection, routed only by `serve --conformance-echo` on a
//! loopback bind (contract §11). It has no authentication, rooms or heartbeat pings (a conformance
//! suite counts every frame it did not expect); it sends every message back as it came. Its frames
//! go through the same [`Frames`] as a `/ws` session's (size limit, fragment reassembly and cap,
//! UTF-8 checked frame by frame, ping/pong, the closing handshake and the close each protocol error
//! gets), and its answers through the same bounded [`Outbox`] and writer, so what a suite such as
//! Autobahn's checks here is what every client of `/ws` gets.
//!
//! It is registered like any connection: it counts against `max_connections`, the per-address cap
//! (loopback is trusted by default) and, never authenticating, `max_unauthenticated_connections`;
//! the upgrade is refused an `Origin` outside `allowed_origins` as `/ws`'s is; it shows in the admin
//! listing, and closes with 1001 at shutdown. A connection silent for `client_timeout_s` is closed with
//! 4008.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_ws::{Message as WsMessage, ProtocolError};
use tracing::info;
use uuid::Uuid;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::realtime::frames::{Frames, Inbound};
use crate::realtime::outbox::{Outbox, OutboxSettings, Outgoing, Refused, SlowConsumer};
use crate::realtime::registry::{self, Disconnect, LimitReached, Registry};

/// The largest message the echo endpoint takes, at least: Autobahn's cases outside 9.* (performance)
/// send messages of up to 64 KiB, which the default `max_inbound_message_bytes` (4 KiB, sized for
/// jobcast's own client messages) would close with 1009.
pub const MIN_MESSAGE_BYTES: usize = 64 << 10;

/// A `/ws/echo` connection.
pub struct Echo {
    id: Uuid,
    config: Arc<Config>,
    registry: Addr<Registry>,
    remote: Option<std::net::SocketAddr>,
    frames: Frames,
    out: Outbox,
    /// Closes the writer at once when the client reads nothing and the queue is full.
    urgent_close: Option<tokio::sync::oneshot::Sender<(u16, String)>>,
    closing: bool,
    last_seen: Instant,
    span: tracing::Span,
}

impl Echo {
    /// The message limit: `max_inbound_message_bytes`, but at least [`MIN_MESSAGE_BYTES`].
    pub fn message_limit(config: &Config) -> usize {
        config.max_inbound_message_bytes.max(MIN_MESSAGE_BYTES)
    }

    /// Starts an echo connection over an upgraded WebSocket.
    pub fn start(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        registry: Addr<Registry>,
        remote: Option<std::net::SocketAddr>,
        ws: actix_ws::Session,
        stream: actix_ws::MessageStream,
    ) -> Addr<Echo> {
        let id = Uuid::new_v4();
        let limit = Echo::message_limit(&config);
        let stream = stream.max_frame_size(limit);
        Echo::create(move |ctx| {
            ctx.add_stream(stream);
            let settings = OutboxSettings {
                format: crate::framing::Format::Auto,
                max_msgs: config.max_queued_messages,
                max_bytes: config.max_queued_bytes,
                compress_threshold: config.compress_threshold_bytes,
            };
            let slow = ctx.address().downgrade().recipient();
            let (out, urgent_close) = Outbox::open(ws, settings, metrics, slow);
            Echo {
                id,
                config,
                registry,
                remote,
                frames: Frames::new(limit),
                out,
                urgent_close: Some(urgent_close),
                closing: false,
                last_seen: Instant::now(),
                span: tracing::info_span!("echo_connection", conn = %id),
            }
        })
    }

    fn push(&mut self, item: Outgoing, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        match self.out.push(item) {
            Ok(()) => {}
            Err(Refused::Full) => {
                self.out.overflow();
                let (code, reason) = close::SLOW_CONSUMER;
                if let Some(tx) = self.urgent_close.take() {
                    let _ = tx.send((code, reason.into()));
                }
                self.close(close::SLOW_CONSUMER, ctx);
            }
            Err(Refused::Closed) => ctx.stop(),
        }
    }

    fn close(&mut self, (code, reason): close::Close, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.span.in_scope(|| info!(conn = %self.id, code, reason, "echo connection closed by the server"));
        self.out.close(code, reason);
        ctx.stop();
    }
}

impl Actor for Echo {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.span.in_scope(|| info!(conn = %self.id, remote = ?self.remote, "echo connection opened"));
        let connect = registry::Connect {
            id: self.id,
            session: ctx.address().recipient(),
            remote: self.remote.map(|a| a.to_string()),
            ip: self.remote.map(|a| a.ip()),
            anonymous: true,
            format: "echo",
            ack: false,
        };
        let fut = self.registry.send(connect);
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(LimitReached::Unauthenticated)) => return act.close(close::TOO_MANY_UNAUTHENTICATED, ctx),
                Ok(Err(LimitReached::Address)) => return act.close(close::TOO_MANY_FROM_ADDRESS, ctx),
                Ok(Err(_)) | Err(_) => return act.close(close::TOO_MANY_CONNECTIONS, ctx),
            }
            let every = Duration::from_secs(act.config.heartbeat_interval_s);
            ctx.run_interval(every, |act, ctx| {
                if act.last_seen.elapsed() > Duration::from_secs(act.config.client_timeout_s) {
                    act.close(close::HEARTBEAT_TIMEOUT, ctx);
                }
            });
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if !self.closing {
            self.out.end();
        }
        self.registry.do_send(registry::Disconnected { id: self.id });
    }
}

impl StreamHandler<Result<WsMessage, ProtocolError>> for Echo {
    fn handle(&mut self, item: Result<WsMessage, ProtocolError>, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.last_seen = Instant::now();
        match self.frames.accept(item) {
            Inbound::Message(data) => self.push(Outgoing::Echo(Box::new(data)), ctx),
            Inbound::Ping(bytes) => self.push(Outgoing::Pong(bytes.as_ref().into()), ctx),
            Inbound::Pending => {}
            Inbound::Closed(code) => self.close((code, close::CLIENT_CLOSED.1), ctx),
            Inbound::Fail(reason) => self.close(reason, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Disconnect> for Echo {
    type Result = ();
    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        if !self.closing {
            self.closing = true;
            self.out.close(msg.code, &msg.reason);
            ctx.stop();
        }
    }
}

impl Handler<SlowConsumer> for Echo {
    type Result = ();
    fn handle(&mut self, _: SlowConsumer, ctx: &mut Context<Self>) {
        self.close(close::SLOW_CONSUMER, ctx);
    }
}
