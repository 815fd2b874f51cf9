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

/// What [`decode_binary`] may hold at most, whatever its input (measured: see its tests).
pub const DECODE_HEAP_BOUND: usize = 3 * MAX_DECODED_BYTES + 32 * MAX_DECODED_VALUES;

/// The most msgpack values (scalars and containers) a binary frame may hold: serde buffers the
/// envelope's values before it reads them (about 32 bytes each), so a frame of millions of one-byte
/// values would cost far more memory than its bytes.
pub const MAX_DECODED_VALUES: usize = 1 << 20;

/// Counts the msgpack values of one complete value in `bytes`, refusing past `max` and refusing any
/// container that claims more values than bytes remain (each value takes at least one byte).
fn msgpack_values(mut b: &[u8], max: usize) -> Result<usize, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("msgpack: truncated".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn len(b: &mut &[u8], n: usize) -> Result<usize, String> {
        Ok(take(b, n)?.iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x)))
    }
    let (mut pending, mut seen) = (1usize, 0usize);
    while pending > 0 {
        pending -= 1;
        seen += 1;
        if seen > max {
            return Err(format!("msgpack: more than {max} values"));
        }
        let m = take(&mut b, 1)?[0];
        let more = match m {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0x80..=0x8f => 2 * usize::from(m & 0x0f),
            0x90..=0x9f => usize::from(m & 0x0f),
            0xa0..=0xbf => take(&mut b, usize::from(m & 0x1f)).map(|_| 0)?,
            0xc4 | 0xd9 => len(&mut b, 1).and_then(|n| take(&mut b, n)).map(|_| 0)?,
            0xc5 | 0xda => len(&mut b, 2).and_then(|n| take(&mut b, n)).map(|_| 0)?,
            0xc6 | 0xdb => len(&mut b, 4).and_then(|n| take(&mut b, n)).map(|_| 0)?,
            0xc7 => len(&mut b, 1).and_then(|n| take(&mut b, n + 1)).map(|_| 0)?,
            0xc8 => len(&mut b, 2).and_then(|n| take(&mut b, n + 1)).map(|_| 0)?,
            0xc9 => len(&mut b, 4).and_then(|n| take(&mut b, n + 1)).map(|_| 0)?,
            0xcc | 0xd0 => take(&mut b, 1).map(|_| 0)?,
            0xcd | 0xd1 | 0xd4 => take(&mut b, 2).map(|_| 0)?,
            0xd5 => take(&mut b, 3).map(|_| 0)?,
            0xca | 0xce | 0xd2 => take(&mut b, 4).map(|_| 0)?,
            0xd6 => take(&mut b, 5).map(|_| 0)?,
            0xcb | 0xcf | 0xd3 => take(&mut b, 8).map(|_| 0)?,
            0xd7 => take(&mut b, 9).map(|_| 0)?,
            0xd8 => take(&mut b, 17).map(|_| 0)?,
            0xdc => len(&mut b, 2)?,
            0xdd => len(&mut b, 4)?,
            0xde => 2 * len(&mut b, 2)?,
            0xdf => 2 * len(&mut b, 4)?,
            0xc1 => return Err("msgpack: the never-used marker 0xc1".into()),
        };
        pending = pending.saturating_add(more);
        if pending > b.len() {
            return Err("msgpack: a container claims more values than the frame has bytes".into());
        }
    }
    Ok(seen)
}

/// Decodes a binary frame back into an envelope (used by tests, the harness and the CLI client).
/// Whatever the bytes, it holds at most about [`DECODE_HEAP_BOUND`]: the inflated msgpack (at most
/// [`MAX_DECODED_BYTES`]), serde's buffered values (at most [`MAX_DECODED_VALUES`]) and the envelope.
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
    msgpack_values(&packed, MAX_DECODED_VALUES)?;
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

    const DECODE_BOUND: usize = DECODE_HEAP_BOUND;

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
    fn millions_of_one_byte_values_are_refused_before_serde_buffers_them() {
        // {"data": [[], [], ... 8 Mi times]}: 8 KiB of gzip that held 272 MiB before values were counted.
        let mut packed = vec![0x81, 0xa4, b'd', b'a', b't', b'a', 0xdd, 0x00, 0x80, 0x00, 0x00];
        packed.extend(std::iter::repeat_n(0x90u8, 8 << 20));
        let frame = gzip(&packed);
        let (decoded, held) = crate::alloc_probe::peak(|| decode_binary(&frame));
        assert!(decoded.is_err_and(|e| e.contains("values")));
        assert!(held <= DECODE_BOUND, "held {held} bytes for a {}-byte frame", frame.len());
        // The counter agrees with the format on real frames.
        let env = env_with(5000);
        let e = Encoded::new(&env, 1024).unwrap();
        let Frame::Binary(b) = e.frame(Format::Auto) else { panic!("binary expected") };
        assert_eq!(decode_binary(&b).unwrap(), env);
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
