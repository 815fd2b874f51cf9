//! Framing: an [`Envelope`] becomes JSON text, or gzip(msgpack) binary above the threshold.
//!
//! Room events are encoded once by the broker ([`Encoded::new`]) and the same bytes are handed to every
//! member; each session only picks the frame that fits its `format`.

use std::io::Write;
use std::time::Instant;

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use serde::{Deserialize, Serialize};

use crate::protocol::{Envelope, EventType};

/// How a connection wants its messages framed (`format` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON text up to the threshold, gzip(msgpack) binary above it.
    Auto,
    /// Always JSON text.
    Json,
}

impl Format {
    /// Parses the query value; `None` for anything but `auto` and `json`.
    pub fn parse(value: Option<&str>) -> Option<Format> {
        match value {
            None | Some("auto") => Some(Format::Auto),
            Some("json") => Some(Format::Json),
            Some(_) => None,
        }
    }
}

/// One WebSocket frame's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON text frame.
    Text(bytestring::ByteString),
    /// A gzip(msgpack) binary frame.
    Binary(Bytes),
}

impl Frame {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }
}

/// An envelope encoded for every format, shared (behind an `Arc`) by all receivers.
#[derive(Debug)]
pub struct Encoded {
    /// The event's type, for metrics.
    pub kind: EventType,
    /// The room's `seq`, for room events.
    pub seq: Option<u64>,
    /// JSON text.
    pub json: bytestring::ByteString,
    /// gzip(msgpack), present only when the JSON is over the threshold.
    pub binary: Option<Bytes>,
    /// When the broker encoded it, for the broker-to-socket latency histogram.
    pub created: Instant,
}

/// Why an envelope could not be encoded (only a bug can cause it: every field is serialisable).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("msgpack: {0}")]
    Msgpack(#[from] rmp_serde::encode::Error),
    #[error("gzip: {0}")]
    Gzip(#[from] std::io::Error),
}

impl Encoded {
    /// Encodes `env` as JSON and, when the JSON is longer than `threshold` bytes, as gzip(msgpack).
    pub fn new(env: &Envelope, threshold: usize) -> Result<Encoded, EncodeError> {
        let json = serde_json::to_string(env)?;
        let binary = if json.len() > threshold { Some(gzip_msgpack(env)?) } else { None };
        Ok(Encoded { kind: env.event.kind(), seq: env.seq, json: json.into(), binary, created: Instant::now() })
    }

    /// The same event marked `redelivered: true`, for a retry.
    pub fn redelivered(&self, threshold: usize) -> Result<Encoded, EncodeError> {
        let mut env: Envelope = serde_json::from_str(&self.json)?;
        env.redelivered = true;
        Encoded::new(&env, threshold)
    }

    /// The payload length of the frame a connection with `format` receives.
    pub fn len(&self, format: Format) -> usize {
        match (format, &self.binary) {
            (Format::Auto, Some(bin)) => bin.len(),
            _ => self.json.len(),
        }
    }

    /// The frame a connection with `format` receives.
    pub fn frame(&self, format: Format) -> Frame {
        match (format, &self.binary) {
            (Format::Auto, Some(bin)) => Frame::Binary(bin.clone()),
            _ => Frame::Text(self.json.clone()),
        }
    }
}

/// gzip(msgpack(envelope)), msgpack as a map with the JSON field names and the JSON values: the
/// serializer is told it writes a human-readable format, so a UUID is its string, as in JSON, not 16
/// raw bytes a client would have to guess about.
pub fn gzip_msgpack(env: &Envelope) -> Result<Bytes, EncodeError> {
    let mut packed = Vec::new();
    env.serialize(&mut rmp_serde::Serializer::new(&mut packed).with_struct_map().with_human_readable())?;
    let mut gz = GzEncoder::new(Vec::with_capacity(packed.len() / 2), Compression::fast());
    gz.write_all(&packed)?;
    Ok(Bytes::from(gz.finish()?))
}

/// The most a binary frame may inflate to: a frame from a hostile peer (a gzip bomb inflates about
/// 1000 to 1) is refused at this size instead of filling memory.
pub const MAX_DECODED_BYTES: usize = 16 << 20;

/// Decodes a binary frame back into an envelope (used by tests, the harness and the CLI client).
/// Whatever the bytes, it holds at most about twice [`MAX_DECODED_BYTES`] plus 1 MiB of heap (the
/// inflated msgpack, the values decoded from it, and serde's cap on preallocating claimed lengths).
pub fn decode_binary(bytes: &[u8]) -> Result<Envelope, String> {
    use std::io::Read;
    let mut packed = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECODED_BYTES as u64 + 1)
        .read_to_end(&mut packed)
        .map_err(|e| format!("gzip: {e}"))?;
    if packed.len() > MAX_DECODED_BYTES {
        return Err(format!("gzip: the frame inflates past {MAX_DECODED_BYTES} bytes"));
    }
    Envelope::deserialize(&mut rmp_serde::Deserializer::new(&packed[..]).with_human_readable())
        .map_err(|e| format!("msgpack: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Event;
    use serde_json::json;

    fn env_with(len: usize) -> Envelope {
        let mut env = Envelope::direct(Event::Info(json!({ "text": "x".repeat(len) })));
        env.room = Some("tenant:a".into());
        env.seq = Some(7);
        env.epoch = Some("ep".into());
        env
    }

    #[test]
    fn small_messages_are_json_text_in_both_formats() {
        let e = Encoded::new(&env_with(10), 1024).unwrap();
        assert!(e.binary.is_none());
        assert!(matches!(e.frame(Format::Auto), Frame::Text(_)));
        assert!(matches!(e.frame(Format::Json), Frame::Text(_)));
    }

    #[test]
    fn large_messages_are_binary_for_auto_and_decode_to_the_same_envelope() {
        let env = env_with(5000);
        let e = Encoded::new(&env, 1024).unwrap();
        assert!(e.json.len() > 1024);
        let Frame::Binary(bin) = e.frame(Format::Auto) else { panic!("expected binary") };
        assert!(bin.len() < e.json.len(), "gzip should shrink a repetitive payload");
        assert_eq!(decode_binary(&bin).unwrap(), env);
        assert!(matches!(e.frame(Format::Json), Frame::Text(_)));
    }

    #[test]
    fn threshold_is_inclusive_for_text() {
        let env = env_with(10);
        let len = serde_json::to_string(&env).unwrap().len();
        assert!(Encoded::new(&env, len).unwrap().binary.is_none());
        assert!(Encoded::new(&env, len - 1).unwrap().binary.is_some());
    }

    #[test]
    fn redelivered_copies_carry_the_flag_and_nothing_else_changes() {
        let env = env_with(10);
        let first = Encoded::new(&env, 1024).unwrap();
        let again = first.redelivered(1024).unwrap();
        let back: Envelope = serde_json::from_str(&again.json).unwrap();
        assert!(back.redelivered);
        assert_eq!(Envelope { redelivered: false, ..back }, env);
        assert_eq!(again.seq, Some(7));
    }

    #[test]
    fn every_field_of_the_binary_envelope_is_what_the_json_one_carries() {
        use crate::protocol::{ProcessingStarted, StatusData};
        let job_id = uuid::Uuid::new_v4();
        let payload = json!({"blob": "y".repeat(3000), "n": 1.5, "i": -3, "nested": {"list": [true, null]}});
        let events = [
            Event::Info(payload),
            Event::ProcessingStarted(ProcessingStarted {
                job_id,
                kind: "csv_import".into(),
                filename: "z".repeat(2000),
                size_bytes: 10,
                zones_total: 2,
            }),
            Event::Status(StatusData {
                job_id: Some(job_id),
                status: crate::protocol::JobStatus::Parsing,
                message: "m".repeat(2000),
            }),
        ];
        for event in events {
            let mut env = Envelope::direct(event);
            env.room = Some(format!("job:{job_id}"));
            env.seq = Some(9);
            env.epoch = Some("ep".into());
            let e = Encoded::new(&env, 1024).unwrap();
            let Frame::Binary(bin) = e.frame(Format::Auto) else { panic!("expected binary") };
            let mut packed = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bin[..]), &mut packed).unwrap();
            // Read as plain msgpack values, with no knowledge of jobcast's types, as a client would.
            let generic: serde_json::Value = rmp_serde::from_slice(&packed).expect("only JSON-shaped values");
            let json: serde_json::Value = serde_json::from_str(&e.json).unwrap();
            assert_eq!(generic, json);
            assert_eq!(generic["id"], json!(env.id.to_string()));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        /// Any bytes, raw or gzipped: decoding a binary frame answers, never panics, and holds no
        /// more than its bound.
        #[test]
        fn decoding_any_binary_frame_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let (_, held) = crate::alloc_probe::peak(|| decode_binary(&bytes));
            proptest::prop_assert!(held <= DECODE_BOUND);
            let frame = gzip(&bytes);
            let (_, held) = crate::alloc_probe::peak(|| decode_binary(&frame));
            proptest::prop_assert!(held <= DECODE_BOUND);
        }
    }

    /// What [`decode_binary`] may hold at most, whatever its input.
    const DECODE_BOUND: usize = 2 * MAX_DECODED_BYTES + (1 << 20);

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_is_refused_within_the_bound() {
        // 64 KiB that inflate to 64 MiB (it held 134 MB before inflation was bounded).
        let bomb = gzip(&vec![0u8; 64 << 20]);
        let (decoded, held) = crate::alloc_probe::peak(|| decode_binary(&bomb));
        assert!(decoded.is_err_and(|e| e.contains("inflates past")));
        assert!(held <= DECODE_BOUND, "held {held} bytes for a {}-byte frame", bomb.len());
    }

    #[test]
    fn a_msgpack_length_claim_allocates_nothing_like_it() {
        // A map whose `data` claims 2^31 array elements, and a `type` string claiming 2 GiB.
        for claim in [
            &[0x81, 0xa4, b'd', b'a', b't', b'a', 0xdd, 0x7f, 0xff, 0xff, 0xff][..],
            &[0x81, 0xa4, b't', b'y', b'p', b'e', 0xdb, 0x7f, 0xff, 0xff, 0xff],
        ] {
            let frame = gzip(claim);
            let (decoded, held) = crate::alloc_probe::peak(|| decode_binary(&frame));
            assert!(decoded.is_err());
            assert!(held <= 2 << 20, "held {held} bytes for a claim");
        }
    }

    #[test]
    fn garbage_binary_is_an_error_not_a_panic() {
        assert!(decode_binary(b"not gzip").is_err());
    }
}
