//! Server → client frames, built with tungstenite's `FrameHeader` (unmasked,
//! the same bytes tungstenite writes; a unit test compares them), and the
//! in-memory stream tungstenite reads from and writes to.

use std::io::{self, Read, Write};

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};

/// Most bytes a server frame header takes (2 + 8 length bytes, no mask).
pub const MAX_HEADER: usize = 10;

/// The in-memory stream tungstenite reads from and writes to: input is the
/// bytes one `recv` brought (then `WouldBlock`), output goes straight into the
/// connection's send queue.
pub struct Io<'a> {
    /// Bytes not yet consumed by tungstenite.
    pub input: &'a [u8],
    /// The connection's send queue.
    pub out: &'a mut Vec<u8>,
}

impl Read for Io<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The kind of a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Opcode 0x1: UTF-8 text.
    Text,
    /// Opcode 0x2: binary.
    Binary,
}

/// Appends an unmasked, final data frame holding `payload` to `out`.
pub fn push_data(out: &mut Vec<u8>, kind: Kind, payload: &[u8]) {
    let data = match kind {
        Kind::Text => Data::Text,
        Kind::Binary => Data::Binary,
    };
    let header = FrameHeader { opcode: OpCode::Data(data), ..FrameHeader::default() };
    out.reserve(payload.len() + MAX_HEADER);
    header.format(payload.len() as u64, out).expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
}

/// Appends an unmasked, final text frame holding `payload` to `out`.
pub fn push_text(out: &mut Vec<u8>, payload: &[u8]) {
    push_data(out, Kind::Text, payload);
}

/// A text frame as shareable bytes (framed once, copied into each queue).
pub fn text(payload: &str) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER);
    push_text(&mut out, payload.as_bytes());
    Bytes::from(out)
}

/// An unmasked ping frame carrying `stamp` (the sender's clock, µs), so the
/// pong tells the round trip.
pub fn push_ping(out: &mut Vec<u8>, stamp: u64) {
    let _ = Frame::ping(Bytes::copy_from_slice(&stamp.to_be_bytes())).format(out);
}

/// Bytes [`push_ping`] appends.
pub const PING_LEN: usize = 10;

/// The stamp of a pong that answers [`push_ping`], if it is one.
pub fn pong_stamp(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?))
}

/// A close frame with `code` and `reason` (reason trimmed to fit 123 bytes).
pub fn push_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = Frame::close(Some(CloseFrame { code: CloseCode::from(code), reason: reason[..end].to_owned().into() }));
    let _ = frame.format(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_frames_match_tungstenite() {
        for (kind, op) in [(Kind::Text, Data::Text), (Kind::Binary, Data::Binary)] {
            for len in [0usize, 1, 125, 126, 65535, 65536, 70000] {
                let payload = "x".repeat(len);
                let mut ours = Vec::new();
                push_data(&mut ours, kind, payload.as_bytes());
                let mut theirs = Vec::new();
                Frame::message(payload.clone(), OpCode::Data(op), true).format(&mut theirs).unwrap();
                assert_eq!(ours, theirs, "{kind:?} len {len}");
            }
        }
    }

    #[test]
    fn ping_stamp_round_trips() {
        let mut out = Vec::new();
        push_ping(&mut out, 123_456_789);
        assert_eq!(out.len(), PING_LEN);
        assert_eq!(out[0], 0x89);
        assert_eq!(pong_stamp(&out[2..]), Some(123_456_789));
        assert_eq!(pong_stamp(b"short"), None);
    }

    #[test]
    fn close_reason_is_trimmed_on_a_char_boundary() {
        let mut out = Vec::new();
        push_close(&mut out, 1000, &"é".repeat(100));
        assert_eq!(out[0], 0x88);
        assert!(out[1] as usize <= 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
