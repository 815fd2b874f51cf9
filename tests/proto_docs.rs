//! Keeps `proto-docs/protocol.md` true to the code.
//!
//! Every fenced block with the info string `json server` must hold exactly one [`Envelope`] that
//! re-serialises to the same JSON (so the examples carry exactly the fields the server emits), and
//! every `json client` block exactly one [`ClientMessage`] that round-trips the same way. Every event
//! type and every client message type needs at least one example. No server is started.

use std::collections::HashSet;
use std::path::PathBuf;

use jobcast::protocol::{close, error_code, ClientMessage, Envelope, Event, EventType};
use jobcast::ApiError;
use jobcast::AuthError;
use serde_json::Value;

/// Which side of the connection an example speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// One `json server` or `json client` block.
struct Block {
    side: Side,
    /// 1-based line of the opening fence, to name the block in failures.
    line: usize,
    text: String,
}

impl Block {
    fn name(&self) -> String {
        let side = match self.side {
            Side::Server => "json server",
            Side::Client => "json client",
        };
        format!("`{side}` block at proto-docs/protocol.md:{}", self.line)
    }

    /// The block as one JSON object.
    fn object(&self) -> Value {
        let value: Value = serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("{} is not one JSON value: {e}\n{}", self.name(), self.text));
        assert!(value.is_object(), "{} must hold one JSON object, not {value}", self.name());
        value
    }
}

fn doc() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto-docs/protocol.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every `json server` / `json client` block of `text`. Other fenced blocks are skipped, but an info
/// string that starts with `json` and names anything else is refused, so a typo cannot hide a block.
fn blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    // The open fence: its backtick count, and the block being collected (None for other blocks).
    let mut open: Option<(usize, Option<Block>)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|c| *c == '`').count();
        match &mut open {
            Some((fence, block)) => {
                if ticks >= *fence && trimmed[ticks..].trim().is_empty() {
                    if let Some(b) = block.take() {
                        out.push(b);
                    }
                    open = None;
                } else if let Some(b) = block {
                    b.text.push_str(line);
                    b.text.push('\n');
                }
            }
            None if ticks >= 3 => {
                let info: Vec<&str> = trimmed[ticks..].split_whitespace().collect();
                let side = match info.as_slice() {
                    ["json", "server"] => Some(Side::Server),
                    ["json", "client"] => Some(Side::Client),
                    ["json"] | [] => None,
                    [first, ..] if first.starts_with("json") => panic!(
                        "proto-docs/protocol.md:{}: unknown info string {:?}; use `json server`, \
                         `json client` or plain `json`",
                        i + 1,
                        info.join(" ")
                    ),
                    _ => None,
                };
                let block = side.map(|side| Block { side, line: i + 1, text: String::new() });
                open = Some((ticks, block));
            }
            None => {}
        }
    }
    assert!(open.is_none(), "proto-docs/protocol.md ends inside a fenced block");
    out
}

/// The wire name of a client message. Exhaustive on purpose: a new variant fails to compile here
/// until it is added to [`CLIENT_TYPES`] and documented.
fn client_type(msg: &ClientMessage) -> &'static str {
    match msg {
        ClientMessage::Authenticate { .. } => "authenticate",
        ClientMessage::Subscribe { .. } => "subscribe",
        ClientMessage::Unsubscribe { .. } => "unsubscribe",
        ClientMessage::Ack { .. } => "ack",
        ClientMessage::Ping { .. } => "ping",
        ClientMessage::Cancel { .. } => "cancel",
        ClientMessage::Refresh { .. } => "refresh",
    }
}

/// Fails unless the code's serialisation of a block equals the block, showing both.
fn assert_round_trip(block: &Block, emitted: &Value, written: &Value) {
    assert!(
        emitted == written,
        "{} does not round-trip (look for fields the code omits or adds, and 42 vs 42.0):\n  \
         the code emits: {emitted}\n  the block says: {written}",
        block.name()
    );
}

const CLIENT_TYPES: &[&str] = &["authenticate", "subscribe", "unsubscribe", "ack", "ping", "cancel", "refresh"];

#[test]
fn server_examples_are_envelopes_exactly_as_the_code_emits_them() {
    let all = blocks(&doc());
    let mut seen = HashSet::new();
    for block in all.iter().filter(|b| b.side == Side::Server) {
        let value = block.object();
        let env: Envelope = serde_json::from_str(&block.text)
            .unwrap_or_else(|e| panic!("{} is not an Envelope: {e}\n{}", block.name(), block.text));
        let back = serde_json::to_value(&env).expect("an Envelope serialises");
        assert_round_trip(block, &back, &value);
        let kind = env.event.kind();
        let routed = [env.room.is_some(), env.seq.is_some(), env.epoch.is_some()];
        if kind.is_room_event() {
            assert_eq!(
                routed,
                [true; 3],
                "{}: `{}` is a room event; the broker always sets room, seq and epoch",
                block.name(),
                kind.as_str()
            );
        } else {
            assert_eq!(
                routed,
                [false; 3],
                "{}: `{}` is connection-level; it never carries room, seq or epoch",
                block.name(),
                kind.as_str()
            );
        }
        seen.insert(kind);
    }
    let missing: Vec<&str> = EventType::ALL.iter().filter(|t| !seen.contains(*t)).map(|t| t.as_str()).collect();
    assert!(missing.is_empty(), "event types without a `json server` example: {missing:?}");
}

#[test]
fn client_examples_are_client_messages_that_round_trip() {
    let all = blocks(&doc());
    let mut seen = HashSet::new();
    for block in all.iter().filter(|b| b.side == Side::Client) {
        let value = block.object();
        let msg: ClientMessage = serde_json::from_str(&block.text)
            .unwrap_or_else(|e| panic!("{} is not a ClientMessage: {e}\n{}", block.name(), block.text));
        let back = serde_json::to_value(&msg).expect("a ClientMessage serialises");
        assert_round_trip(block, &back, &value);
        seen.insert(client_type(&msg));
    }
    let missing: Vec<&&str> = CLIENT_TYPES.iter().filter(|t| !seen.contains(**t)).collect();
    assert!(missing.is_empty(), "client message types without a `json client` example: {missing:?}");
}

#[test]
fn there_are_enough_examples() {
    let n = blocks(&doc()).len();
    assert!(n >= 60, "expected at least 60 `json server`/`json client` blocks, found {n}");
}

/// The blocks under the `###` heading `title`, up to the next heading of that level or above.
fn section_blocks(text: &str, title: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == format!("### {title}"))
        .unwrap_or_else(|| panic!("proto-docs/protocol.md has no section `### {title}`"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## ") || l.starts_with("### "))
        .map_or(lines.len(), |i| start + 1 + i);
    blocks(text).into_iter().filter(|b| b.line > start && b.line <= end).collect()
}

#[test]
fn the_worked_import_is_one_room_in_order_with_progress_reaching_100_last() {
    let text = doc();
    let envs: Vec<Envelope> = section_blocks(&text, "A full import, event by event")
        .iter()
        .filter(|b| b.side == Side::Server)
        .map(|b| serde_json::from_str(&b.text).expect("checked by the round-trip test"))
        .collect();
    let Some((Event::Subscribed(joined), events)) = envs.split_first().map(|(f, r)| (&f.event, r)) else {
        panic!("the worked import starts with `subscribed`");
    };
    assert_eq!(joined.snapshot.as_ref().map(|s| s.status.as_str()), Some("pending"));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.room.as_deref(), Some(joined.room.as_str()), "event {i} is in another room");
        assert_eq!(e.epoch.as_deref(), Some(joined.epoch.as_str()), "event {i} has another epoch");
        assert_eq!(e.seq, Some(joined.seq + 1 + i as u64), "seq must rise by exactly one");
    }
    let kinds: Vec<EventType> = events.iter().map(|e| e.event.kind()).collect();
    let progress: Vec<f64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ProcessingProgress(p) => Some(p.progress),
            _ => None,
        })
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress goes down: {progress:?}");
    assert_eq!(progress.iter().filter(|p| **p >= 100.0).count(), 1, "{progress:?}");
    assert_eq!(progress.last(), Some(&100.0));
    let n = kinds.len();
    assert!(n >= 3, "the worked import is too short");
    assert_eq!(
        kinds[n - 3..],
        [EventType::ProcessingProgress, EventType::ProcessingCompleted, EventType::Status],
        "100 comes right before processing_completed, and the final status is last"
    );
}

#[test]
fn every_error_code_close_code_and_auth_reason_is_documented() {
    let text = doc();
    let error_codes = [
        error_code::BAD_REQUEST,
        error_code::UNKNOWN_ROOM,
        error_code::FORBIDDEN,
        error_code::TOO_MANY_SUBSCRIPTIONS,
        error_code::RATE_LIMITED,
        error_code::NOT_AUTHENTICATED,
        error_code::ALREADY_AUTHENTICATED,
        error_code::NOT_SUBSCRIBED,
        error_code::INVALID_TOKEN,
        error_code::UNKNOWN_JOB,
        error_code::JOB_FINISHED,
        error_code::INVALID_ACK,
    ];
    for code in error_codes {
        assert!(text.contains(&format!("`{code}`")), "error code `{code}` is not in proto-docs/protocol.md");
    }
    // HTTP error codes: every `ApiError` variant, so a new one fails to compile here until listed.
    let http_codes = [
        ApiError::BadRequest(String::new()),
        ApiError::Unauthorized(String::new()),
        ApiError::Forbidden(String::new()),
        ApiError::NotFound(String::new()),
        ApiError::RequestTimeout(String::new()),
        ApiError::Conflict(String::new()),
        ApiError::PreconditionFailed(String::new()),
        ApiError::PayloadTooLarge(String::new()),
        ApiError::UnsupportedMediaType(String::new()),
        ApiError::QuotaExceeded(String::new()),
        ApiError::InsufficientStorage(String::new()),
        ApiError::Unavailable(String::new()),
        ApiError::Internal(String::new()),
    ];
    for e in &http_codes {
        // Exhaustive on purpose: a new variant must be added to `http_codes` above.
        match e {
            ApiError::BadRequest(_)
            | ApiError::Unauthorized(_)
            | ApiError::Forbidden(_)
            | ApiError::NotFound(_)
            | ApiError::RequestTimeout(_)
            | ApiError::Conflict(_)
            | ApiError::PreconditionFailed(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::QuotaExceeded(_)
            | ApiError::InsufficientStorage(_)
            | ApiError::Unavailable(_)
            | ApiError::Internal(_) => {}
        }
        let code = e.code();
        assert!(text.contains(&format!("`{code}`")), "HTTP error code `{code}` is not in proto-docs/protocol.md");
    }
    // Every code the server sends has a row, and each fixed reason is quoted in its code's row.
    let row = |code: u16| text.lines().find(|l| l.starts_with(&format!("| {code} |")));
    for code in close::CODES {
        assert!(row(code).is_some(), "close code {code} has no row in the close codes table");
    }
    for (code, reason) in close::REASONS {
        let line = row(code).unwrap_or_else(|| panic!("close code {code} of {reason:?} has no row"));
        assert!(line.contains(&format!("\"{reason}\"")), "reason {reason:?} is not in the row of close code {code}");
    }
    let reasons = [
        AuthError::Missing,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::InvalidSignature,
        AuthError::UnsupportedAlgorithm,
        AuthError::InvalidAudience,
        AuthError::InvalidIssuer,
        AuthError::MissingTenant,
        AuthError::InvalidIdentity,
        AuthError::Reused,
        AuthError::MintedBeforeStart,
        AuthError::Malformed,
        AuthError::WebSocketTokenNotAccepted,
        AuthError::Timeout,
        AuthError::Unavailable,
    ];
    for e in reasons {
        let reason = e.reason();
        assert!(
            text.contains(&format!("`{reason}`")),
            "auth_failure reason `{reason}` is not in proto-docs/protocol.md"
        );
    }
}

#[test]
fn the_block_reader_finds_only_labelled_blocks() {
    let md = "text\n```json server\n{\"a\": 1}\n```\n\n````json\n```json client\n````\n\
              ```json client\n{\"b\": 2}\n```\n";
    let found = blocks(md);
    assert_eq!(found.len(), 2);
    assert_eq!((found[0].side, found[0].line), (Side::Server, 2));
    assert_eq!(found[0].text, "{\"a\": 1}\n");
    assert_eq!((found[1].side, found[1].line), (Side::Client, 9));
}
