//! Inbound WebSocket frames to whole messages: the one place that applies RFC 6455's rules on top of
//! actix-ws's codec (which checks masking, reserved bits, opcodes, control-frame lengths and close
//! payloads). [`Frames`] reassembles fragmented messages (bounded in bytes and in frames), checks
//! text as UTF-8 as each frame arrives (§8.1: a message is failed as soon as its bytes cannot be UTF-8
//! any more) and says which close each protocol error deserves. `/ws` sessions and the `/ws/echo`
//! conformance endpoint both read their frames through it, so what a conformance suite checks on
//! the echo endpoint is what every client gets.

use actix_ws::{Item, Message as WsMessage, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::protocol::{close, MAX_FRAGMENTS};

/// What one inbound frame amounts to.
#[derive(Debug)]
pub enum Inbound {
    /// A whole message.
    Message(Data),
    /// A ping: answer with a pong carrying these bytes.
    Ping(Bytes),
    /// The client began the closing handshake: answer with this code.
    Closed(u16),
    /// Fail the connection with this close.
    Fail(close::Close),
    /// Nothing to do yet (a fragment of a message, a pong).
    Pending,
}

/// A whole message's payload.
#[derive(Debug)]
pub enum Data {
    /// A text message, valid UTF-8.
    Text(ByteString),
    /// A binary message.
    Binary(Bytes),
}

impl Data {
    /// The payload's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Data::Text(t) => t.as_bytes(),
            Data::Binary(b) => b,
        }
    }
}

/// A message arriving in fragments.
struct Fragmented {
    /// A text message (checked as UTF-8 as it arrives) or a binary one.
    text: bool,
    /// Its bytes so far.
    buf: BytesMut,
    /// How many of them are known to be valid UTF-8 (a character may straddle two frames).
    checked: usize,
    /// Frames so far.
    frames: usize,
}

impl Fragmented {
    /// Whether the bytes so far can still begin valid UTF-8; `last`: whether they must be complete.
    /// Each byte is checked once, so a message in many frames costs no more than one in a single frame.
    fn utf8_so_far(&mut self, last: bool) -> bool {
        match std::str::from_utf8(&self.buf[self.checked..]) {
            Ok(_) => {
                self.checked = self.buf.len();
                true
            }
            // Invalid bytes, or (with `error_len` None) a character cut short by the frame's end.
            Err(e) if e.error_len().is_some() || last => false,
            Err(e) => {
                self.checked += e.valid_up_to();
                true
            }
        }
    }
}

/// A connection's inbound side: at most one message in assembly, at most `limit` bytes of it.
pub struct Frames {
    limit: usize,
    fragments: Option<Fragmented>,
}

impl Frames {
    /// Messages (whole or reassembled) larger than `limit` bytes fail with 1009. The stream the frames
    /// come from should refuse larger single frames itself (`MessageStream::max_frame_size`), so
    /// that no frame over the limit is ever buffered.
    pub fn new(limit: usize) -> Self {
        Frames { limit, fragments: None }
    }

    /// Takes the next item of the connection's `MessageStream`.
    pub fn accept(&mut self, item: Result<WsMessage, ProtocolError>) -> Inbound {
        match item {
            Ok(WsMessage::Text(text)) if self.fragments.is_none() => Inbound::Message(Data::Text(text)),
            Ok(WsMessage::Binary(bytes)) if self.fragments.is_none() => Inbound::Message(Data::Binary(bytes)),
            Ok(WsMessage::Text(_)) | Ok(WsMessage::Binary(_)) => self.fail(close::DATA_INSIDE_FRAGMENTED),
            Ok(WsMessage::Continuation(item)) => self.fragment(item),
            Ok(WsMessage::Ping(bytes)) => Inbound::Ping(bytes),
            Ok(WsMessage::Pong(_)) | Ok(WsMessage::Nop) => Inbound::Pending,
            // The codec checked the close payload (code in the allowed ranges, reason UTF-8).
            Ok(WsMessage::Close(reason)) => {
                Inbound::Closed(reason.map(|r| u16::from(r.code)).unwrap_or(close::CLIENT_CLOSED.0))
            }
            Err(ProtocolError::Overflow) => self.fail(close::MESSAGE_TOO_BIG),
            // actix-ws reports a whole text frame that is not UTF-8 as invalid data around the
            // `Utf8Error`; reserved bits set on a frame come as invalid data too, with a text.
            Err(ProtocolError::Io(e)) if e.get_ref().is_some_and(|inner| inner.is::<std::str::Utf8Error>()) => {
                self.fail(close::INVALID_UTF8)
            }
            Err(_) => self.fail(close::BAD_FRAMES),
        }
    }

    fn fail(&mut self, close: close::Close) -> Inbound {
        self.fragments = None;
        Inbound::Fail(close)
    }

    fn fragment(&mut self, item: Item) -> Inbound {
        let (last, chunk) = match item {
            Item::FirstText(b) => {
                self.fragments = Some(Fragmented { text: true, buf: BytesMut::new(), checked: 0, frames: 0 });
                (false, b)
            }
            Item::FirstBinary(b) => {
                self.fragments = Some(Fragmented { text: false, buf: BytesMut::new(), checked: 0, frames: 0 });
                (false, b)
            }
            Item::Continue(b) => (false, b),
            Item::Last(b) => (true, b),
        };
        let Some(msg) = self.fragments.as_mut() else {
            return self.fail(close::CONTINUATION_WITHOUT_FIRST);
        };
        msg.frames += 1;
        if msg.frames > MAX_FRAGMENTS {
            return self.fail(close::TOO_MANY_FRAGMENTS);
        }
        if msg.buf.len() + chunk.len() > self.limit {
            return self.fail(close::MESSAGE_TOO_BIG);
        }
        msg.buf.extend_from_slice(&chunk);
        if msg.text && !msg.utf8_so_far(last) {
            return self.fail(close::INVALID_UTF8);
        }
        if !last {
            return Inbound::Pending;
        }
        let Some(msg) = self.fragments.take() else {
            return Inbound::Pending;
        };
        let bytes = msg.buf.freeze();
        if !msg.text {
            return Inbound::Message(Data::Binary(bytes));
        }
        match ByteString::try_from(bytes) {
            Ok(text) => Inbound::Message(Data::Text(text)),
            Err(_) => Inbound::Fail(close::INVALID_UTF8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_in(frames: &mut Frames, parts: &[&[u8]]) -> Vec<Inbound> {
        let n = parts.len();
        parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let b = Bytes::copy_from_slice(p);
                let item = match i {
                    0 => Item::FirstText(b),
                    i if i + 1 == n => Item::Last(b),
                    _ => Item::Continue(b),
                };
                frames.accept(Ok(WsMessage::Continuation(item)))
            })
            .collect()
    }

    #[test]
    fn a_character_split_across_fragments_is_reassembled() {
        let mut f = Frames::new(4096);
        let euro = "€".as_bytes();
        let got = text_in(&mut f, &[b"a", &euro[..1], &euro[1..], b"b"]);
        assert!(matches!(&got[3], Inbound::Message(Data::Text(t)) if &**t == "a€b"), "{got:?}");
    }

    #[test]
    fn invalid_utf8_fails_at_the_frame_that_makes_it_invalid() {
        let mut f = Frames::new(4096);
        let got = text_in(&mut f, &[b"ok", b"\xed\xa0\x80", b"never read"]);
        assert!(matches!(got[0], Inbound::Pending));
        assert!(matches!(got[1], Inbound::Fail(c) if c == close::INVALID_UTF8), "{got:?}");
    }

    #[test]
    fn a_character_cut_short_at_the_last_frame_fails() {
        let mut f = Frames::new(4096);
        let got = text_in(&mut f, &[b"ok", &"€".as_bytes()[..2]]);
        assert!(matches!(got[1], Inbound::Fail(c) if c == close::INVALID_UTF8), "{got:?}");
    }

    #[test]
    fn fragments_are_bounded_in_bytes_and_in_number() {
        let mut f = Frames::new(10);
        let got = text_in(&mut f, &[b"12345", b"123456", b"x"]);
        assert!(matches!(got[1], Inbound::Fail(c) if c == close::MESSAGE_TOO_BIG), "{got:?}");
        let mut f = Frames::new(4096);
        let many: Vec<&[u8]> = std::iter::repeat_n(&b""[..], MAX_FRAGMENTS + 1).collect();
        let got = text_in(&mut f, &many);
        assert!(matches!(got[MAX_FRAGMENTS], Inbound::Fail(c) if c == close::TOO_MANY_FRAGMENTS));
    }

    #[test]
    fn a_data_frame_inside_a_fragmented_message_fails() {
        let mut f = Frames::new(4096);
        f.accept(Ok(WsMessage::Continuation(Item::FirstBinary(Bytes::from_static(b"a")))));
        let got = f.accept(Ok(WsMessage::Text("b".into())));
        assert!(matches!(got, Inbound::Fail(c) if c == close::DATA_INSIDE_FRAGMENTED));
    }

    #[test]
    fn reserved_bits_are_a_protocol_error_not_invalid_utf8() {
        let mut f = Frames::new(4096);
        let rsv = std::io::Error::new(std::io::ErrorKind::InvalidData, "Received a frame with non-zero reserved bits");
        assert!(matches!(f.accept(Err(ProtocolError::Io(rsv))), Inbound::Fail(c) if c == close::BAD_FRAMES));
        // What actix-ws makes of a whole text frame that is not UTF-8.
        let Err(utf8) = ByteString::try_from(Bytes::from_static(b"\xff")) else { panic!("\\xff is not UTF-8") };
        let e = std::io::Error::new(std::io::ErrorKind::InvalidData, utf8);
        assert!(matches!(f.accept(Err(ProtocolError::Io(e))), Inbound::Fail(c) if c == close::INVALID_UTF8));
    }
}
