//! The wire protocol v1: every message that crosses a WebSocket, as serde types.
//!
//! This module is the only serde boundary of the protocol. The server, the integration tests and the
//! load-test harness all use these types, and `proto-docs/protocol.md` describes them with examples.
//!
//! Server messages are an [`Envelope`]: `type`, `id`, `ts`, and for room events `room`, `seq`, `epoch`;
//! the payload sits in `data`. Client messages are flat JSON objects tagged by `type` ([`ClientMessage`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Feature names advertised in `connection_established.features`.
pub const FEATURES: &[&str] = &["history", "replay", "binary_msgpack_gzip", "refresh", "ack"];

/// The most WebSocket frames one client message may arrive in; one more closes with 1009.
pub const MAX_FRAGMENTS: usize = 1024;

/// The most characters of client input quoted back in an error, a stored snapshot or a log line.
pub const EXCERPT_CHARS: usize = 80;

/// Heap a client message may cost to decode, per byte of it (plus 16 KiB): the typed decoder buffers
/// an internally tagged message before it reads `type`, and a run of tiny JSON values is the most
/// heap per byte. With `max_inbound_message_bytes` 4096, a message costs at most 144 KiB (measured: at most 17 bytes per byte).
pub const DECODE_HEAP_PER_BYTE: usize = 32;

/// Client input fit to quote: at most [`EXCERPT_CHARS`] characters written (then `…`), control characters
/// (newlines, escapes, NUL, bidi overrides) written as escapes, so a quoted value can neither grow an
/// error without bound nor forge a log line.
pub fn excerpt(input: &str) -> String {
    let mut out = String::with_capacity(input.len().min(EXCERPT_CHARS * 4));
    let mut chars = 0;
    for c in input.chars() {
        let hidden =
            c.is_control() || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let piece: String = if hidden { c.escape_default().collect() } else { c.to_string() };
        let n = piece.chars().count();
        // The cut counts what is written, escapes included.
        if chars + n > EXCERPT_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&piece);
        chars += n;
    }
    out
}

/// Every WebSocket close jobcast sends (contract §4 "Close codes"): the codes, then each fixed
/// reason with its code. Metrics take their label set from [`close::CODES`]; the 4001 closes of a
/// failed authentication carry the `auth_failure` reason instead of a fixed text, and a close the
/// client began is answered with the client's own code.
pub mod close {
    /// A close frame's code and reason.
    pub type Close = (u16, &'static str);

    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Server going away (shutdown); reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// A WebSocket protocol error of the client.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not valid UTF-8 (RFC 6455 §8.1).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A client frame or message was larger than `max_inbound_message_bytes`, or in too many fragments.
    pub const TOO_BIG: u16 = 1009;
    /// Disconnected by an admin.
    pub const ADMIN: u16 = 4000;
    /// Missing, bad, expired or reused token; authentication timeout.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Forbidden.
    pub const FORBIDDEN: u16 = 4003;
    /// Unknown job (on `/ws/jobs/{id}`).
    pub const UNKNOWN_JOB: u16 = 4004;
    /// Heartbeat, acknowledgement or slow-consumer timeout; the reason says which.
    pub const TIMEOUT: u16 = 4008;
    /// Too many connections or messages.
    pub const TOO_MANY: u16 = 4029;

    /// Every code above, in order.
    pub const CODES: [u16; 11] = [
        NORMAL,
        GOING_AWAY,
        PROTOCOL_ERROR,
        INVALID_PAYLOAD,
        TOO_BIG,
        ADMIN,
        UNAUTHORIZED,
        FORBIDDEN,
        UNKNOWN_JOB,
        TIMEOUT,
        TOO_MANY,
    ];

    /// The client closed; answered with its own code, or this one when it gave none.
    pub const CLIENT_CLOSED: Close = (NORMAL, "closed by the client");
    /// Graceful shutdown.
    pub const SHUTTING_DOWN: Close = (GOING_AWAY, "server shutting down");
    /// A continuation frame with no message begun.
    pub const CONTINUATION_WITHOUT_FIRST: Close = (PROTOCOL_ERROR, "continuation without a first frame");
    /// A new data frame while a fragmented message is being assembled.
    pub const DATA_INSIDE_FRAGMENTED: Close = (PROTOCOL_ERROR, "data frame inside a fragmented message");
    /// Any other protocol error the WebSocket codec found.
    pub const BAD_FRAMES: Close = (PROTOCOL_ERROR, "protocol error");
    /// A text message, whole or reassembled from fragments, that is not valid UTF-8.
    pub const INVALID_UTF8: Close = (INVALID_PAYLOAD, "invalid UTF-8 in a text message");
    /// A frame, or a fragmented message, over `max_inbound_message_bytes`.
    pub const MESSAGE_TOO_BIG: Close = (TOO_BIG, "message too big");
    /// A message in more than [`super::MAX_FRAGMENTS`] frames.
    pub const TOO_MANY_FRAGMENTS: Close = (TOO_BIG, "too many fragments");
    /// An admin closed the connection.
    pub const BY_ADMIN: Close = (ADMIN, "disconnected by an admin");
    /// The credential of an open connection ran out.
    pub const TOKEN_EXPIRED: Close = (UNAUTHORIZED, "token expired");
    /// `/ws/jobs/{id}` for a job of another tenant.
    pub const JOB_FORBIDDEN: Close = (FORBIDDEN, "forbidden");
    /// `/ws/jobs/{id}` for an id no job has.
    pub const NO_SUCH_JOB: Close = (UNKNOWN_JOB, "unknown job");
    /// Nothing arrived from the client for `client_timeout_s`.
    pub const HEARTBEAT_TIMEOUT: Close = (TIMEOUT, "heartbeat timeout");
    /// More than `max_queued_messages` or `max_queued_bytes` waited for the connection.
    pub const SLOW_CONSUMER: Close = (TIMEOUT, "slow consumer");
    /// An event went unacknowledged through `max_delivery_attempts` deliveries.
    pub const ACK_TIMEOUT: Close = (TIMEOUT, "ack timeout");
    /// The client went on sending after the `rate_limited` warning.
    pub const TOO_MANY_MESSAGES: Close = (TOO_MANY, "too many messages");
    /// `max_connections` reached.
    pub const TOO_MANY_CONNECTIONS: Close = (TOO_MANY, "too many connections");
    /// `max_connections_per_user` reached.
    pub const TOO_MANY_FOR_USER: Close = (TOO_MANY, "too many connections for this user");
    /// `max_unauthenticated_connections` reached by connections opened without a token.
    pub const TOO_MANY_UNAUTHENTICATED: Close = (TOO_MANY, "too many unauthenticated connections");
    /// `max_connections_per_ip` reached by the peer's address.
    pub const TOO_MANY_FROM_ADDRESS: Close = (TOO_MANY, "too many connections from this address");

    /// Every fixed reason above.
    pub const REASONS: [Close; 20] = [
        CLIENT_CLOSED,
        SHUTTING_DOWN,
        CONTINUATION_WITHOUT_FIRST,
        DATA_INSIDE_FRAGMENTED,
        BAD_FRAMES,
        INVALID_UTF8,
        MESSAGE_TOO_BIG,
        TOO_MANY_FRAGMENTS,
        BY_ADMIN,
        TOKEN_EXPIRED,
        JOB_FORBIDDEN,
        NO_SUCH_JOB,
        HEARTBEAT_TIMEOUT,
        SLOW_CONSUMER,
        ACK_TIMEOUT,
        TOO_MANY_MESSAGES,
        TOO_MANY_CONNECTIONS,
        TOO_MANY_FOR_USER,
        TOO_MANY_UNAUTHENTICATED,
        TOO_MANY_FROM_ADDRESS,
    ];
}

/// Stable `error.code` values sent in `error` events.
pub mod error_code {
    /// Malformed JSON, unknown `type`, or missing fields.
    pub const BAD_REQUEST: &str = "bad_request";
    /// Room name is not `job:`, `user:` or `tenant:`, or the job does not exist.
    pub const UNKNOWN_ROOM: &str = "unknown_room";
    /// Room of another tenant or another user.
    pub const FORBIDDEN: &str = "forbidden";
    /// `max_subscriptions_per_connection` reached.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    /// The tenant holds `max_reservations_per_tenant` job-id reservations already.
    pub const TOO_MANY_RESERVATIONS: &str = "too_many_reservations";
    /// The inbound token bucket is empty; the message was not processed.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// A message that needs authentication arrived before it.
    pub const NOT_AUTHENTICATED: &str = "not_authenticated";
    /// `authenticate` on an already authenticated connection.
    pub const ALREADY_AUTHENTICATED: &str = "already_authenticated";
    /// `unsubscribe` or `ack` for a room the connection is not in.
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    /// A `refresh` token was invalid or belonged to another user.
    pub const INVALID_TOKEN: &str = "invalid_token";
    /// `cancel` of a job that does not exist (or is not visible to the user).
    pub const UNKNOWN_JOB: &str = "unknown_job";
    /// `cancel` of a job that has already ended.
    pub const JOB_FINISHED: &str = "job_finished";
    /// An `ack` for a `seq` that was never sent.
    pub const INVALID_ACK: &str = "invalid_ack";
}

/// A position in a room's history: the `seq` of an event and the room's `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    /// The last `seq` the client has seen.
    pub seq: u64,
    /// The `epoch` that `seq` belongs to.
    pub epoch: String,
}

/// A message from client to server.
///
/// Fields have types (a wrong one is refused); fields this server does not know are ignored, so a
/// newer client can talk to it; an unknown `type` is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message when no token was in the URL.
    Authenticate {
        /// A WebSocket token or an access JWT.
        token: String,
    },
    /// Join a room, optionally resuming after `since`.
    Subscribe {
        /// `job:<uuid>`, `user:<id>` or `tenant:<id>`.
        room: String,
        /// Resume position; events after it are replayed when history still holds them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// Leave a room.
    Unsubscribe {
        /// The room to leave.
        room: String,
    },
    /// Cumulative acknowledgement of every event of `room` up to `seq` (with `ack=1`).
    Ack {
        /// The room.
        room: String,
        /// Highest `seq` received in order.
        seq: u64,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// A number (the client's clock, usually), echoed back as `client_ts`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<serde_json::Number>,
    },
    /// Cancel a job.
    Cancel {
        /// The job to cancel.
        job_id: String,
    },
    /// Extend the connection's life with a fresh access JWT for the same user.
    Refresh {
        /// The new access JWT.
        token: String,
    },
}

/// `connection_established` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionEstablished {
    /// Server-chosen id, the one admin endpoints use.
    pub connection_id: Uuid,
    /// How often the server pings.
    pub heartbeat_interval_s: u64,
    /// `jobcast/<crate version>`.
    pub server_version: String,
    /// Feature names ([`FEATURES`]).
    pub features: Vec<String>,
}

/// `authenticated` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Authenticated {
    /// The token's `sub`.
    pub user_id: String,
    /// The token's `tenant`.
    pub tenant: String,
    /// When the credential expires (RFC 3339).
    pub expires_at: String,
}

/// `auth_failure` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthFailure {
    /// Machine-readable reason: `expired`, `invalid_signature`, `token_reused`, ...
    pub reason: String,
}

/// `token_expiring` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenExpiring {
    /// Seconds until the connection is closed with 4001 unless refreshed.
    pub expires_in_s: u64,
}

/// `token_refreshed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRefreshed {
    /// The new expiry (RFC 3339).
    pub expires_at: String,
}

/// `subscribed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The room joined.
    pub room: String,
    /// The room's newest `seq` at the moment of joining (0 when it has no events).
    pub seq: u64,
    /// The room's epoch.
    pub epoch: String,
    /// True when every event after `since` was replayed.
    pub recovered: bool,
    /// How many events follow as replay.
    pub replayed: u64,
    /// For job rooms, the job's current state; `null` for other rooms.
    pub snapshot: Option<Box<JobSnapshot>>,
}

/// `unsubscribed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribed {
    /// The room left.
    pub room: String,
}

/// `pong` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// Server time (RFC 3339).
    pub ts: String,
    /// The `ts` the client sent, echoed.
    pub client_ts: Option<serde_json::Number>,
}

/// `error` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorData {
    /// A stable code from [`error_code`].
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

/// `processing_started` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessingStarted {
    pub job_id: Uuid,
    pub kind: String,
    pub filename: String,
    pub size_bytes: u64,
    pub zones_total: u64,
}

/// `status` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<Uuid>,
    pub status: JobStatus,
    #[serde(default)]
    pub message: String,
}

/// `processing_progress` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessingProgress {
    pub job_id: Uuid,
    pub stage: Stage,
    pub progress: f64,
    pub zones_completed: u64,
    pub zones_total: u64,
    pub processed: u64,
    pub total: u64,
    pub errors: u64,
    pub current_operation: String,
    /// Seconds left: always present, `null` while no estimate exists yet, 0 at completion.
    #[serde(default)]
    pub eta_seconds: Option<f64>,
    /// A job that runs elsewhere: its `metadata` as merged from its reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// `zone_processing` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneProcessing {
    pub job_id: Uuid,
    pub zone_id: String,
    pub zone_index: u64,
    pub processing_tool: String,
}

/// `zone_completed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneCompleted {
    pub job_id: Uuid,
    pub zone_id: String,
    pub zone_index: u64,
    pub rows: u64,
    pub errors: u64,
    pub duration_ms: u64,
}

/// `processing_completed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessingCompleted {
    pub job_id: Uuid,
    pub results: Value,
}

/// `processing_failed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessingFailed {
    pub job_id: Uuid,
    pub error: String,
    #[serde(default)]
    pub details: Value,
    pub recoverable: bool,
}

/// `job_cancelled` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCancelled {
    pub job_id: Uuid,
    pub by: String,
}

/// `cancel_requested` data: someone asked to cancel a job that runs elsewhere; its worker learns it
/// from its next report's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequested {
    pub job_id: Uuid,
    pub by: String,
}

/// `job_stalled` data: a job that runs elsewhere had no report since `since` (RFC 3339) for
/// `job_stall_timeout_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStalled {
    pub job_id: Uuid,
    pub since: String,
}

/// `export_started` data: an export job began writing `format` (`csv` or `jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStarted {
    pub job_id: Uuid,
    pub format: String,
}

/// `export_progress` data: `rows` written so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportProgress {
    pub job_id: Uuid,
    pub rows: u64,
}

/// `export_completed` data: the file is ready at `download_url` (a signed, expiring link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportCompleted {
    pub job_id: Uuid,
    pub rows: u64,
    pub bytes: u64,
    pub download_url: String,
}

/// `export_failed` data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportFailed {
    pub job_id: Uuid,
    pub error: String,
}

/// One stage of a job that runs elsewhere, with its share of the progress bar (weights are relative).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    pub name: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

macro_rules! events {
    ($( $(#[$doc:meta])* $variant:ident($data:ty) = $name:literal, )*) => {
        /// Every server-to-client event: its `type` and its typed `data`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "type", content = "data", rename_all = "snake_case")]
        pub enum Event {
            $( $(#[$doc])* $variant($data), )*
        }

        /// The `type` of an [`Event`] without its data; indexes per-type metrics.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $( $(#[$doc])* $variant, )*
        }

        impl EventType {
            /// Every event type, in declaration order.
            pub const ALL: &'static [EventType] = &[$(EventType::$variant,)*];

            /// How many event types there are.
            pub const COUNT: usize = EventType::ALL.len();

            /// The snake_case wire name.
            pub fn as_str(self) -> &'static str {
                match self { $(EventType::$variant => $name,)* }
            }
        }

        impl Event {
            /// The event's type.
            pub fn kind(&self) -> EventType {
                match self { $(Event::$variant(_) => EventType::$variant,)* }
            }
        }
    };
}

events! {
    /// Sent once, right after the upgrade.
    ConnectionEstablished(ConnectionEstablished) = "connection_established",
    /// Authentication succeeded.
    Authenticated(Authenticated) = "authenticated",
    /// Authentication failed; a 4001 close follows.
    AuthFailure(AuthFailure) = "auth_failure",
    /// The credential expires soon; answer with `refresh`.
    TokenExpiring(TokenExpiring) = "token_expiring",
    /// A `refresh` was accepted.
    TokenRefreshed(TokenRefreshed) = "token_refreshed",
    /// A `subscribe` was accepted; replayed events follow.
    Subscribed(Subscribed) = "subscribed",
    /// An `unsubscribe` was accepted.
    Unsubscribed(Unsubscribed) = "unsubscribed",
    /// Answer to `ping`.
    Pong(Pong) = "pong",
    /// A client message was refused; the connection stays open.
    Error(ErrorData) = "error",
    /// Free-form warning (admin and publisher events may use it).
    Warning(Value) = "warning",
    /// Free-form information (admin and publisher events may use it).
    Info(Value) = "info",
    /// A job started processing.
    ProcessingStarted(ProcessingStarted) = "processing_started",
    /// A job changed status.
    Status(StatusData) = "status",
    /// A job's overall progress.
    ProcessingProgress(ProcessingProgress) = "processing_progress",
    /// A zone started.
    ZoneProcessing(ZoneProcessing) = "zone_processing",
    /// A zone finished.
    ZoneCompleted(ZoneCompleted) = "zone_completed",
    /// A job finished; `results` holds its outcome.
    ProcessingCompleted(ProcessingCompleted) = "processing_completed",
    /// A job failed.
    ProcessingFailed(ProcessingFailed) = "processing_failed",
    /// A job was cancelled.
    JobCancelled(JobCancelled) = "job_cancelled",
    /// Someone asked to cancel a job that runs elsewhere (its worker ends it).
    CancelRequested(CancelRequested) = "cancel_requested",
    /// A job that runs elsewhere had no report for `job_stall_timeout_s`.
    JobStalled(JobStalled) = "job_stalled",
    /// An export job began.
    ExportStarted(ExportStarted) = "export_started",
    /// An export job's rows written so far.
    ExportProgress(ExportProgress) = "export_progress",
    /// An export job's file is ready for download.
    ExportCompleted(ExportCompleted) = "export_completed",
    /// An export job failed.
    ExportFailed(ExportFailed) = "export_failed",
}

impl EventType {
    /// Whether this type may be published into a room (by jobs, admins or publishers), as opposed to
    /// connection-level messages that only the server sends to one connection.
    pub fn is_room_event(self) -> bool {
        !matches!(
            self,
            EventType::ConnectionEstablished
                | EventType::Authenticated
                | EventType::AuthFailure
                | EventType::TokenExpiring
                | EventType::TokenRefreshed
                | EventType::Subscribed
                | EventType::Unsubscribed
                | EventType::Pong
                | EventType::Error
        )
    }

    /// Position in [`EventType::ALL`] (the declaration order), for metric arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A server-to-client message: the event plus its routing and identity fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// `type` and `data`.
    #[serde(flatten)]
    pub event: Event,
    /// Unique per event (the same for every member that receives a room event).
    pub id: Uuid,
    /// The room, for room events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// Position in the room, for room events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The room's history epoch, for room events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// When the server created the message (RFC 3339, milliseconds, UTC).
    pub ts: String,
    /// Present and true only on a retry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redelivered: bool,
}

impl Envelope {
    /// A connection-level message (no room, seq or epoch).
    pub fn direct(event: Event) -> Self {
        Envelope {
            event,
            id: Uuid::new_v4(),
            room: None,
            seq: None,
            epoch: None,
            ts: now_rfc3339(),
            redelivered: false,
        }
    }
}

/// The current time as RFC 3339 with milliseconds in UTC, the format of every `ts`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// 9999-12-31T23:59:59Z in Unix seconds, the latest instant RFC 3339 can write.
pub const MAX_RFC3339_S: u64 = 253_402_300_799;

/// A Unix timestamp (seconds) as RFC 3339.
pub fn unix_to_rfc3339(secs: u64) -> String {
    // The formatter panics past year 9999: later instants write as its end.
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.min(MAX_RFC3339_S));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A Unix timestamp (milliseconds) as RFC 3339 with milliseconds.
pub fn unix_ms_to_rfc3339(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0).min(MAX_RFC3339_S * 1000);
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// Whether `id` can name a `user:` or `tenant:` room: 1 to 128 characters of `A-Z a-z 0-9 - _ . @`.
/// Tokens whose `sub` or `tenant` break this rule are refused at authentication, so every identity
/// has its own rooms.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// What kind of room a name denotes (contract §4 "Rooms").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomKind {
    /// `job:<uuid>`.
    Job(Uuid),
    /// `user:<id>`.
    User(String),
    /// `tenant:<id>`.
    Tenant(String),
}

impl RoomKind {
    /// The room's name: `job:<uuid>`, `user:<id>` or `tenant:<id>`.
    pub fn name(&self) -> String {
        match self {
            RoomKind::Job(id) => format!("job:{id}"),
            RoomKind::User(id) => format!("user:{id}"),
            RoomKind::Tenant(id) => format!("tenant:{id}"),
        }
    }

    /// The broker's key for this room as a member of `tenant` names it. A `user:` room belongs to a
    /// user of one tenant, so its key carries the tenant (`user:<tenant>/<id>`; `/` cannot occur in
    /// an id); every other room's key is its name.
    pub fn key(&self, tenant: &str) -> String {
        match self {
            RoomKind::User(id) => format!("user:{tenant}/{id}"),
            other => other.name(),
        }
    }

    /// The name clients see for a room `key` (the inverse of [`RoomKind::key`]).
    pub fn name_of_key(key: &str) -> String {
        match key.strip_prefix("user:").and_then(|rest| rest.split_once('/')) {
            Some((_tenant, id)) => format!("user:{id}"),
            None => key.to_string(),
        }
    }

    /// Parses a room name; `None` for anything that is not a valid job, user or tenant room.
    pub fn parse(room: &str) -> Option<RoomKind> {
        let (prefix, rest) = room.split_once(':')?;
        let valid_id = valid_id(rest);
        match prefix {
            "job" => Uuid::parse_str(rest).ok().map(RoomKind::Job),
            "user" if valid_id => Some(RoomKind::User(rest.to_string())),
            "tenant" if valid_id => Some(RoomKind::Tenant(rest.to_string())),
            _ => None,
        }
    }
}

/// An enum of known names that also carries any other string, serialised as the bare name: the
/// wire accepts any `status` or `stage` a publisher sends, and jobcast's own jobs use the known ones.
macro_rules! open_enum {
    ($(#[$meta:meta])* $name:ident { $( $(#[$doc:meta])* $variant:ident = $text:literal, )* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$doc])* $variant, )*
            /// A name an external job's publisher chose.
            Other(String),
        }

        impl $name {
            /// The wire name.
            pub fn as_str(&self) -> &str {
                match self { $( $name::$variant => $text, )* $name::Other(s) => s }
            }

            /// The known value for `text`, else [`Self::Other`].
            pub fn parse(text: &str) -> Self {
                match text { $( $text => $name::$variant, )* other => $name::Other(other.to_string()) }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok($name::parse(&text))
            }
        }
    };
}

open_enum! {
    /// A job's status (contract §6): `pending` for a reservation, then queued → validating → scanning →
    /// parsing → processing → finalizing → completed | failed | cancelled.
    JobStatus {
        /// A reservation: a client subscribed to the room of a job not uploaded yet.
        Pending = "pending",
        /// Waiting for a run slot.
        Queued = "queued",
        /// Checking the file.
        Validating = "validating",
        /// Zones in the scanning band.
        Scanning = "scanning",
        /// Zones in the parsing band.
        Parsing = "parsing",
        /// Zones in the database and categorization bands.
        Processing = "processing",
        /// Aggregating results.
        Finalizing = "finalizing",
        /// Done; `results` holds the outcome.
        Completed = "completed",
        /// Ended with an error.
        Failed = "failed",
        /// Cancelled by a user.
        Cancelled = "cancelled",
    }
}

impl JobStatus {
    /// The statuses after which a job never changes.
    pub const TERMINAL: [JobStatus; 3] = [JobStatus::Completed, JobStatus::Failed, JobStatus::Cancelled];

    /// Whether the job has ended.
    pub fn is_terminal(&self) -> bool {
        JobStatus::TERMINAL.contains(self)
    }
}

open_enum! {
    /// A stage of a job's progress: the CSV import's five bands of 20 points each (contract §6), or the
    /// stage an external job reported.
    Stage {
        /// 0–20: size, UTF-8, header.
        Validation = "validation",
        /// 20–40: formula injection, control characters.
        Scanning = "scanning",
        /// 40–60: typed rows.
        Parsing = "parsing",
        /// 60–80: rows stored, deduplicated.
        Database = "database",
        /// 80–100: rule-based categories.
        Categorization = "categorization",
    }
}

/// A `null` that is sent, told apart from a field that is absent: `None` leaves the field out,
/// `Some(None)` sends `null`.
mod nullable {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(value: &Option<Option<T>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// A job's error once it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// What went wrong.
    pub message: String,
    /// Whether submitting the same file again may succeed.
    pub recoverable: bool,
}

/// A refused row of a CSV file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidRow {
    /// File line.
    pub line: u64,
    /// Why.
    pub reason: String,
}

/// A flagged cell of a CSV file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlaggedCell {
    /// File line.
    pub line: u64,
    /// Column name.
    pub column: String,
    /// `formula_injection` or `control_characters`.
    pub reason: String,
}

/// What one zone of a CSV import did, as the row store keeps it and the job sums it (a field
/// missing from an older stored report reads as zero or empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZoneReport {
    /// The zone's index.
    pub index: u64,
    /// Records in the zone.
    pub rows: u64,
    /// Rows that parsed.
    pub valid: u64,
    /// Rows refused.
    pub invalid_count: u64,
    /// The first refused rows (at most 100).
    pub invalid_rows: Vec<InvalidRow>,
    /// Cells flagged.
    pub flagged_count: u64,
    /// The first flagged cells (at most 100).
    pub flagged_cells: Vec<FlaggedCell>,
    /// Valid rows per category.
    pub categories: std::collections::BTreeMap<String, u64>,
    /// Rows stored (set by the row store).
    pub inserted: u64,
    /// Rows the tenant already had (set by the row store).
    pub duplicates: u64,
}

/// A CSV import's results: `processing_completed.results` and the snapshot's `results`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportResults {
    /// Data rows read.
    pub processed_rows: u64,
    /// Rows stored.
    pub inserted: u64,
    /// Rows the tenant already had.
    pub duplicates: u64,
    /// Rows refused.
    pub invalid_count: u64,
    /// The first 100 refused rows, in file order.
    pub invalid_rows: Vec<InvalidRow>,
    /// Cells flagged.
    pub flagged_count: u64,
    /// The first 100 flagged cells, in file order.
    pub flagged_cells: Vec<FlaggedCell>,
    /// Rows per category.
    pub categories: std::collections::BTreeMap<String, u64>,
}

/// A job's state as `GET /api/v1/jobs/{id}` and `subscribed.snapshot` show it. Three kinds share it:
/// a CSV job sends every field (`null` where unknown); a reservation only `job_id`, `room`, `tenant`
/// and `status`; an external job what its publisher's events have set. A field that is `None` is
/// left out; the doubled options send `null` for `Some(None)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSnapshot {
    /// The job id.
    pub job_id: Uuid,
    /// `job:<job_id>`.
    pub room: String,
    /// The owning tenant.
    pub tenant: String,
    /// Who created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// `csv_import` or `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The uploaded file's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// The uploaded file's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Where the job is in its life.
    pub status: JobStatus,
    /// The stage of its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// 0–100; 100.0 only once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// Seconds left; `null` when unknown and once the job ended.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    pub eta_seconds: Option<Option<f64>>,
    /// Zones in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones_total: Option<u64>,
    /// Zones stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zones_completed: Option<u64>,
    /// Rows processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed: Option<u64>,
    /// Rows in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Rows refused so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<u64>,
    /// When it was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// When it got a run slot.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    pub started_at: Option<Option<String>>,
    /// When the snapshot last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
    /// When it completed, failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    pub finished_at: Option<Option<String>>,
    /// The outcome once completed: an [`ImportResults`] for CSV jobs, what the publisher sent for
    /// external ones; `Some(Value::Null)` sends `null`.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub results: Option<Value>,
    /// The error once failed.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "nullable")]
    pub error: Option<Option<JobError>>,
    /// A job that runs elsewhere: its title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// A job that runs elsewhere (created with `POST /api/v1/jobs`): its stages, maybe none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageSpec>>,
    /// A job that runs elsewhere: the `metadata` of its creation and reports, merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Someone asked to cancel it; its worker has not ended it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<bool>,
    /// Who asked to cancel it (with `cancel_requested`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_by: Option<String>,
    /// When its worker last reported (RFC 3339); its creation until the first report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<String>,
    /// Its worker has been silent for `job_stall_timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<bool>,
}

/// A present field, `null` included, as `Some`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl JobSnapshot {
    /// A reservation of `job_id` for `tenant` (a client subscribed before uploading).
    pub fn reservation(job_id: Uuid, tenant: &str) -> JobSnapshot {
        JobSnapshot {
            job_id,
            room: RoomKind::Job(job_id).name(),
            tenant: tenant.to_string(),
            user_id: None,
            kind: None,
            filename: None,
            size_bytes: None,
            status: JobStatus::Pending,
            stage: None,
            progress: None,
            eta_seconds: None,
            zones_total: None,
            zones_completed: None,
            processed: None,
            total: None,
            errors: None,
            created_at: None,
            started_at: None,
            updated_at: None,
            finished_at: None,
            results: None,
            error: None,
            title: None,
            stages: None,
            metadata: None,
            cancel_requested: None,
            cancel_requested_by: None,
            reported_at: None,
            stalled: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_parse_flat() {
        let m: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","room":"tenant:a","since":{"seq":41,"epoch":"e"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe { room: "tenant:a".into(), since: Some(Since { seq: 41, epoch: "e".into() }) }
        );
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"dance"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"subscribe"}"#).is_err());
    }

    #[test]
    fn client_message_fields_have_types_and_unknown_fields_are_ignored() {
        let parse = |s: &str| serde_json::from_str::<ClientMessage>(s);
        for wrong in [
            r#"{"type":"ping","ts":"noon"}"#,
            r#"{"type":"ping","ts":{}}"#,
            r#"{"type":"ack","room":"tenant:a","seq":1.5}"#,
            r#"{"type":"ack","room":"tenant:a","seq":"3"}"#,
            r#"{"type":"ack","room":"tenant:a","seq":-1}"#,
            r#"{"type":"subscribe","room":"tenant:a","since":41}"#,
            r#"{"type":"subscribe","room":"tenant:a","since":{"seq":"41","epoch":"e"}}"#,
            r#"{"type":"subscribe","room":"tenant:a","since":{"seq":41,"epoch":7}}"#,
            r#"{"type":"subscribe","room":7}"#,
        ] {
            assert!(parse(wrong).is_err(), "{wrong} parsed");
        }
        assert_eq!(
            parse(r#"{"type":"ping","ts":5,"client":"next-gen","trace":{"id":1}}"#).unwrap(),
            ClientMessage::Ping { ts: Some(5.into()) }
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","room":"tenant:a","since":{"seq":1,"epoch":"e","shard":3},"types":[]}"#)
                .unwrap(),
            ClientMessage::Subscribe { room: "tenant:a".into(), since: Some(Since { seq: 1, epoch: "e".into() }) }
        );
        assert!(parse(r#"{"type":"unsubscribe","room":"tenant:a","why":"done"}"#).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// JSON values built to cost the decoder the most per byte: long runs of tiny values, nested.
        fn hostile_json() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("0".to_string()),
                Just("[]".to_string()),
                Just("{}".to_string()),
                Just("\"\"".to_string()),
                Just("null".to_string())
            ];
            leaf.prop_recursive(4, 4096, 1200, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..1200).prop_map(|v| format!("[{}]", v.join(","))),
                    proptest::collection::vec(inner, 0..400).prop_map(|v| {
                        let fields: Vec<String> = v.iter().enumerate().map(|(i, x)| format!("\"{i}\":{x}")).collect();
                        format!("{{{}}}", fields.join(","))
                    }),
                ]
            })
        }

        /// The shapes that cost the most per byte, at the size of the largest message.
        #[test]
        fn the_costliest_shapes_stay_within_the_decode_bound() {
            for text in [
                format!(r#"{{"type":"ping","x":[{}]}}"#, vec!["0"; 2000].join(",")),
                format!(r#"{{"type":"ping","x":[{}]}}"#, vec!["[]"; 1300].join(",")),
                format!(r#"{{"type":"ping","x":[{}]}}"#, vec!["{}"; 1300].join(",")),
                format!(
                    r#"{{"type":"ping","x":{{{}}}}}"#,
                    (0..600).map(|i| format!("\"{i}\":0")).collect::<Vec<_>>().join(",")
                ),
                format!(r#"{{"type":"ping","x":{}{}}}"#, "[".repeat(127), "]".repeat(127)),
            ] {
                let (_, held) = crate::alloc_probe::peak(|| serde_json::from_str::<ClientMessage>(&text).is_ok());
                assert!(held <= DECODE_HEAP_PER_BYTE * text.len() + (16 << 10), "{} bytes held {held}", text.len());
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            /// Any bytes: the client-message decoder answers, never panics.
            #[test]
            fn the_client_message_decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let _ = serde_json::from_slice::<ClientMessage>(&bytes);
            }

            /// JSON objects of the message shapes with fields of any type: decoded or refused, and a
            /// decoded one encodes back to a message that decodes to itself.
            #[test]
            fn client_messages_of_any_field_types(
                kind in prop_oneof![Just("ping"), Just("ack"), Just("subscribe"), Just("unsubscribe"),
                    Just("cancel"), Just("refresh"), Just("authenticate"), Just("dance")],
                value in prop_oneof![Just(serde_json::json!(1)), Just(serde_json::json!(-1)), Just(serde_json::json!(1.5)),
                    Just(serde_json::json!("x")), Just(serde_json::json!(null)), Just(serde_json::json!({"seq": 1, "epoch": "e"})),
                    Just(serde_json::json!([1]))],
                field in prop_oneof![Just("ts"), Just("seq"), Just("since"), Just("room"), Just("token"), Just("job_id"), Just("extra")],
            ) {
                let mut msg = serde_json::json!({"type": kind, "room": "tenant:a", "token": "t", "job_id": "j", "seq": 1});
                msg[field] = value;
                if let Ok(m) = serde_json::from_value::<ClientMessage>(msg) {
                    let again: ClientMessage = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
                    prop_assert_eq!(again, m);
                }
            }

            /// JSON of any shape inside a message (nested arrays and objects of small values, the most
            /// heap per input byte): decoding holds at most [`DECODE_HEAP_PER_BYTE`] bytes per input byte
            /// plus 16 KiB.
            #[test]
            fn decoding_a_client_message_holds_a_bounded_heap(value in hostile_json(), kind in prop_oneof![Just("ping"), Just("subscribe"), Just("nope")]) {
                let text = format!(r#"{{"type":"{kind}","room":"tenant:a","x":{value}}}"#);
                let (_, held) = crate::alloc_probe::peak(|| serde_json::from_str::<ClientMessage>(&text).is_ok());
                prop_assert!(held <= DECODE_HEAP_PER_BYTE * text.len() + (16 << 10), "{} bytes held {held}", text.len());
            }

            /// Any text: an excerpt is short and has no control character.
            #[test]
            fn excerpts_of_anything(text in ".{0,300}") {
                let e = excerpt(&text);
                prop_assert!(e.chars().count() <= EXCERPT_CHARS + 1);
                prop_assert!(!e.chars().any(char::is_control));
            }
        }
    }

    #[test]
    fn excerpts_are_short_and_cannot_forge_lines() {
        assert_eq!(excerpt("amount"), "amount");
        assert_eq!(excerpt("a\nINFO forged\r\u{1b}[31m"), "a\\nINFO forged\\r\\u{1b}[31m");
        assert_eq!(excerpt("x\u{202e}y"), "x\\u{202e}y");
        let long = "é".repeat(1_000_000);
        let cut = excerpt(&long);
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn envelope_round_trips_with_data_nested() {
        let mut env = Envelope::direct(Event::Pong(Pong { ts: now_rfc3339(), client_ts: None }));
        env.room = Some("tenant:a".into());
        env.seq = Some(3);
        let text = serde_json::to_string(&env).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "pong");
        assert!(v["data"]["ts"].is_string());
        assert!(v.get("redelivered").is_none());
        assert!(v.get("epoch").is_none());
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn event_type_names_match_serde() {
        let env = Envelope::direct(Event::Info(serde_json::json!({"m": 1})));
        let v = serde_json::to_value(&env).unwrap();
        assert_eq!(v["type"], EventType::Info.as_str());
        assert_eq!(EventType::ALL.len(), 25);
    }

    #[test]
    fn room_names() {
        assert_eq!(RoomKind::parse("tenant:acme"), Some(RoomKind::Tenant("acme".into())));
        assert_eq!(RoomKind::parse("user:u-1"), Some(RoomKind::User("u-1".into())));
        assert_eq!(RoomKind::parse("user:a/b"), None);
        let bob = RoomKind::User("bob".into());
        assert_ne!(bob.key("acme"), bob.key("globex"));
        assert_eq!(RoomKind::name_of_key(&bob.key("acme")), "user:bob");
        assert_eq!(RoomKind::Tenant("acme".into()).key("other"), "tenant:acme");
        assert_eq!(RoomKind::name_of_key("tenant:acme"), "tenant:acme");
        assert!(RoomKind::parse("job:not-a-uuid").is_none());
        assert!(RoomKind::parse("lobby").is_none());
        assert!(RoomKind::parse("tenant:").is_none());
        assert!(RoomKind::parse("tenant:a b").is_none());
        let id = Uuid::new_v4();
        assert_eq!(RoomKind::parse(&format!("job:{id}")), Some(RoomKind::Job(id)));
    }
}
