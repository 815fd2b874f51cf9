//! The realtime layer: WebSocket sessions, their outbound queues, the broker and its rooms,
//! delivery confirmation and the connection registry.
//!
//! - `session.rs`: the `Session` actor, one per WebSocket.
//! - `frames.rs`: inbound frames to whole messages (fragments, UTF-8, the close each protocol error
//!   gets); every connection reads its frames through it.
//! - `echo.rs`: the `Echo` actor, one per `/ws/echo` connection (`serve --conformance-echo` only).
//! - `outbox.rs`: a connection's bounded outbound queue, the `Member` handle rooms write into, and
//!   the writer task, the only code that writes frames.
//! - `broker.rs`: the `Broker` actor, the one way into rooms: numbering, encoding once, persisting,
//!   delivering.
//! - `room.rs`: the `Room` actor, one per active room: members and the history ring.
//! - `presence.rs`: the `Presence` actor (cluster mode): heartbeats, admin actions across nodes.
//! - `redis.rs`: the broker's Redis engine in cluster mode (`redis_url`): numbering, history streams,
//!   the cluster channel, single-use WebSocket tokens.
//! - `ack_buffer.rs`: the `AckBuffer` actor, one per `ack=1` connection: unacknowledged events.
//! - `registry.rs`: the `Registry` actor, every connection, for limits and the admin endpoints.
//! - `history.rs`, `rate_limit.rs`: plain logic: the history ring, the inbound token bucket.
//!
//! Everything here but the session uses only the top-level modules and `db`; the session is this
//! layer's edge and also uses `jobs` (to look up, reserve and cancel jobs). Nothing below the
//! session names it: rooms hold a `Member`, the registry and the ack buffer call back through
//! `Recipient`s of messages they define (`Disconnect`, `Redeliver`, `AckTimedOut`), and the outbox
//! through a weak `Recipient<SlowConsumer>`.

pub mod ack_buffer;
pub mod broker;
pub mod echo;
pub mod frames;
pub mod history;
pub mod outbox;
pub mod presence;
pub mod rate_limit;
pub mod redis;
pub mod registry;
pub mod room;
pub mod session;
