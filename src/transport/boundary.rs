//! Knows, from the bytes fed to tungstenite, whether its reader sits
//! between frames and outside a fragmented message.
//!
//! tungstenite's context keeps a read buffer (and any half-read frame) for
//! as long as it lives. When a connection goes quiet *at a frame boundary*
//! the context holds nothing that matters, so the sweeper drops it and an
//! idle connection returns to costing only its slot and its reader task.
//! Frame headers are parsed with tungstenite's own `FrameHeader::parse`.
//!
//! It also checks the UTF-8 of text messages as their bytes arrive (fail
//! fast, Autobahn 6.4.*): tungstenite checks a fragmented text message only
//! once it is complete, and a frame only once it is whole. The check keeps
//! the incomplete trailing code point of a fragment (at most 3 bytes) until
//! the next one, and stops at the frame holding the first invalid byte.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest frame header (2 + 8 length + 4 mask).
const MAX_HEADER: usize = 14;

/// Frame-boundary state of one inbound stream.
#[derive(Debug, Default, Clone)]
pub struct Boundary {
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Bytes of a header that arrived split across reads.
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// A data message has started and its final frame has not arrived.
    fragmented: bool,
    /// Payload bytes of the open fragmented message's completed frames (what
    /// tungstenite holds for it).
    message: u64,
    /// The current frame is a data frame.
    in_data: bool,
    /// Bytes that cannot be a valid client frame arrived (unparseable,
    /// unmasked, or over the frame limit): tungstenite must see them and fail.
    broken: bool,
    /// The incremental UTF-8 check of the open text message.
    utf8: Utf8Check,
}

/// Where the UTF-8 check of an uncompressed text message stands.
#[derive(Debug, Default, Clone)]
struct Utf8Check {
    /// A text message is open (its first frame had no RSV1: compressed
    /// text is checked after inflating).
    in_text: bool,
    /// The current frame's payload is checked as it arrives.
    checking: bool,
    /// The current frame is the message's final one.
    last: bool,
    /// The current frame's masking key and the key index of its next byte.
    mask: [u8; 4],
    mask_at: u8,
    /// Bytes of an incomplete code point carried to the next chunk.
    carry: [u8; 3],
    carry_len: u8,
    /// An invalid byte arrived: nothing from its frame on goes further.
    failed: bool,
}

/// Bytes unmasked onto the stack per `from_utf8` call.
const UTF8_CHUNK: usize = 512;

impl Utf8Check {
    /// A data frame header was parsed. `opens` says it starts a message;
    /// `whole` says its payload is all in the current read (then an
    /// unfragmented frame is left to tungstenite, which checks it whole).
    fn frame(&mut self, h: &FrameHeader, text: bool, opens: bool, whole: bool) {
        if opens {
            self.in_text = text && !h.rsv1;
            self.carry_len = 0;
        }
        // A data frame that neither opens nor continues a message is a
        // protocol error tungstenite reports (1002): not checked here.
        let continues = !opens && h.opcode == OpCode::Data(Data::Continue);
        self.checking = self.in_text && if opens { !(h.is_final && whole) } else { continues };
        self.last = h.is_final;
        self.mask = h.mask.unwrap_or_default();
        self.mask_at = 0;
    }

    /// Checks the next payload bytes of the current frame; false at an invalid byte.
    fn payload(&mut self, masked: &[u8]) -> bool {
        if !self.checking {
            return true;
        }
        let mut buf = [0u8; 3 + UTF8_CHUNK];
        for chunk in masked.chunks(UTF8_CHUNK) {
            let c = self.carry_len as usize;
            buf[..c].copy_from_slice(&self.carry[..c]);
            for (i, b) in chunk.iter().enumerate() {
                buf[c + i] = b ^ self.mask[(self.mask_at as usize + i) & 3];
            }
            self.mask_at = ((self.mask_at as usize + chunk.len()) & 3) as u8;
            let s = &buf[..c + chunk.len()];
            self.carry_len = 0;
            if let Err(e) = std::str::from_utf8(s) {
                if e.error_len().is_some() {
                    return self.fail();
                }
                let tail = &s[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
            }
        }
        true
    }

    /// The current frame's payload is complete; false if it ended the
    /// message inside a code point.
    fn frame_done(&mut self, data: bool) -> bool {
        if !(data && self.last) {
            return true;
        }
        let ok = !self.checking || self.carry_len == 0;
        self.in_text = false;
        self.checking = false;
        ok || self.fail()
    }

    fn fail(&mut self) -> bool {
        self.failed = true;
        false
    }
}

impl Boundary {
    /// Accounts for `data`, the next bytes of the stream, and returns how
    /// many of its leading bytes end at a frame boundary: those can go to
    /// tungstenite now; the rest belong to a frame not yet complete. Once the
    /// stream is broken (see [`Boundary::is_broken`]) every byte is returned,
    /// so that tungstenite reads the offending header and fails with its
    /// error (and close code).
    pub fn feed(&mut self, mut data: &[u8], max_frame: u64) -> usize {
        let total = data.len();
        let mut complete = 0;
        while !data.is_empty() && !self.broken && !self.utf8.failed {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                if self.in_data && !self.utf8.payload(&data[..n]) {
                    return complete;
                }
                self.remaining -= n as u64;
                data = &data[n..];
                if self.remaining == 0 {
                    if !self.utf8.frame_done(self.in_data) {
                        return complete;
                    }
                    complete = total - data.len();
                }
                continue;
            }
            let take = (MAX_HEADER - self.header_len as usize).min(data.len());
            let start = self.header_len as usize;
            self.header[start..start + take].copy_from_slice(&data[..take]);
            let avail = start + take;
            let mut cursor = Cursor::new(&self.header[..avail]);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((h, len))) if h.mask.is_some() && len <= max_frame => {
                    let used = cursor.position() as usize - start;
                    data = &data[used..];
                    self.header_len = 0;
                    self.remaining = len;
                    // Control frames may sit between fragments; only data
                    // frames open or close a message.
                    self.in_data = matches!(h.opcode, OpCode::Data(_));
                    if let OpCode::Data(d) = h.opcode {
                        let opens = !self.fragmented && d != Data::Continue;
                        self.utf8.frame(&h, d == Data::Text, opens, len <= data.len() as u64);
                        self.message = if h.is_final { 0 } else { self.message.saturating_add(len) };
                        self.fragmented = !h.is_final;
                    }
                    if len == 0 {
                        if !self.utf8.frame_done(self.in_data) {
                            return complete;
                        }
                        complete = total - data.len();
                    }
                }
                Ok(Some(_)) | Err(_) => self.broken = true,
                Ok(None) => {
                    self.header_len = avail as u8;
                    data = &data[take..];
                }
            }
        }
        if self.broken {
            total
        } else {
            complete
        }
    }

    /// True when every byte fed so far completed whole frames and no
    /// fragmented message is open: the reader's state can be thrown away.
    pub fn at_rest(&self) -> bool {
        self.remaining == 0 && self.header_len == 0 && !self.fragmented && !self.broken && !self.utf8.failed
    }

    /// Invalid UTF-8 arrived in a text message (close 1007). `feed`
    /// returned the bytes before the frame that holds it, and takes no more.
    pub fn invalid_utf8(&self) -> bool {
        self.utf8.failed
    }

    /// True between frames (a fragmented message may still be open).
    pub fn between_frames(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    /// Payload bytes of an open fragmented message held by the frame reader.
    pub fn message_bytes(&self) -> u64 {
        if self.fragmented {
            self.message
        } else {
            0
        }
    }

    /// No fragmented message is open and nothing failed: whatever follows
    /// the last whole frame (a frame still arriving) can be fed to a fresh
    /// `Boundary` and give the same state (a connection handed to another
    /// process passes those bytes along).
    pub fn movable(&self) -> bool {
        !self.fragmented && !self.broken && !self.utf8.failed
    }

    /// The stream can no longer be framed (tungstenite will close it).
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

#[cfg(test)]
mod tests_support {
    /// A masked client frame with `len` payload bytes.
    pub fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match len {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::frame;
    use super::*;

    #[test]
    fn whole_frames_in_any_split_leave_it_at_rest() {
        let stream: Vec<u8> =
            [frame(1, true, 5), frame(2, true, 300), frame(9, true, 0), frame(1, true, 70_000)].concat();
        for chunk in [1, 2, 3, 7, 13, 14, 15, 100, 4096, stream.len()] {
            let mut b = Boundary::default();
            for part in stream.chunks(chunk) {
                b.feed(part, u64::MAX);
            }
            assert!(b.at_rest(), "chunk {chunk}");
        }
    }

    /// The runtime drops a connection's boundary whenever it is at rest and
    /// starts the next read from a fresh one: that must be the same as
    /// keeping it, for any stream split anywhere.
    #[test]
    fn a_boundary_at_rest_is_a_fresh_one() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..300 {
            let mut stream = Vec::new();
            for _ in 0..rng.usize(1..12) {
                match rng.u8(0..5) {
                    0 => stream.extend(frame(1, true, rng.usize(0..200))),
                    1 => stream.extend(frame(2, true, rng.usize(0..70_000))),
                    2 => stream.extend(frame(9, true, rng.usize(0..125))),
                    3 => {
                        // A fragmented text message with a ping inside.
                        stream.extend(frame(1, false, rng.usize(0..50)));
                        stream.extend(frame(9, true, 3));
                        stream.extend(frame(0, true, rng.usize(0..50)));
                    }
                    _ => {
                        // Unmasked payload under a zero key: invalid UTF-8 in text.
                        stream.extend([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]);
                    }
                }
            }
            let (mut kept, mut dropped) = (Boundary::default(), Boundary::default());
            let mut at = 0;
            while at < stream.len() {
                let n = rng.usize(1..=(stream.len() - at).min(5000));
                let part = &stream[at..at + n];
                at += n;
                let a = kept.feed(part, 1 << 20);
                let b = dropped.feed(part, 1 << 20);
                assert_eq!(a, b, "cut");
                assert_eq!(kept.invalid_utf8(), dropped.invalid_utf8());
                assert_eq!(kept.at_rest(), dropped.at_rest());
                assert_eq!(kept.message_bytes(), dropped.message_bytes());
                assert_eq!(kept.movable(), dropped.movable());
                if kept.invalid_utf8() {
                    break;
                }
                if dropped.at_rest() {
                    dropped = Boundary::default();
                }
            }
        }
    }

    #[test]
    fn partial_frames_and_open_fragments_are_not_at_rest() {
        let mut b = Boundary::default();
        b.feed(&frame(1, true, 10)[..5], 1 << 20);
        assert!(!b.at_rest(), "mid-header or mid-payload");
        let mut b = Boundary::default();
        b.feed(&frame(1, false, 3), 1 << 20);
        assert!(!b.at_rest(), "first fragment of a message");
        b.feed(&frame(9, true, 0), 1 << 20);
        assert!(!b.at_rest(), "a ping between fragments does not end the message");
        b.feed(&frame(0, true, 3), 1 << 20);
        assert!(b.at_rest(), "final continuation ends it");
        let mut b = Boundary::default();
        b.feed(&[0x81], 1 << 20);
        assert!(!b.at_rest());
    }
}

#[cfg(test)]
mod complete_tests {
    use super::tests_support::frame;
    use super::*;

    #[test]
    fn reports_the_bytes_that_end_at_a_frame_boundary() {
        let a = frame(1, true, 5);
        let b = frame(2, true, 300);
        let stream: Vec<u8> = [a.clone(), b.clone()].concat();
        let mut bd = Boundary::default();
        assert_eq!(bd.feed(&stream[..a.len() + 10], 1 << 20), a.len(), "the second frame is not complete");
        assert_eq!(bd.feed(&stream[a.len() + 10..], 1 << 20), stream.len() - a.len() - 10);
        assert!(bd.at_rest());
        let mut bd = Boundary::default();
        assert_eq!(bd.feed(&a[..3], 1 << 20), 0);
        assert_eq!(bd.feed(&a[3..], 1 << 20), a.len() - 3);
    }

    #[test]
    fn fragments_are_counted_and_bad_headers_break_the_stream() {
        let mut bd = Boundary::default();
        bd.feed(&frame(1, false, 100), 1 << 20);
        bd.feed(&frame(0, false, 50), 1 << 20);
        assert_eq!(bd.message_bytes(), 150);
        assert!(bd.between_frames() && !bd.at_rest());
        bd.feed(&frame(0, true, 1), 1 << 20);
        assert_eq!(bd.message_bytes(), 0);
        let big = frame(2, true, 2000);
        let mut bd = Boundary::default();
        assert_eq!(bd.feed(&big[..20], 1000), 20, "over the frame limit: hand everything over");
        assert!(bd.is_broken());
        let mut unmasked = frame(1, true, 3);
        unmasked[1] &= 0x7f;
        let mut bd = Boundary::default();
        assert_eq!(bd.feed(&unmasked[..4], 1 << 20), 4, "unmasked client frame");
        assert!(bd.is_broken());
    }
}

#[cfg(test)]
mod fuzzish {
    //! Random bytes in random splits: `feed` never panics, and a split never
    //! changes the verdict.
    use super::*;

    #[test]
    fn splits_do_not_change_the_verdict() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..5_000 {
            let data: Vec<u8> = (0..rng.usize(..200)).map(|_| rng.u8(..)).collect();
            let mut whole = Boundary::default();
            whole.feed(&data, 1 << 20);
            let mut parts = Boundary::default();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len());
                parts.feed(&rest[..n], 1 << 20);
                rest = &rest[n..];
            }
            assert_eq!(whole.at_rest(), parts.at_rest(), "{data:02x?}");
        }
    }
}

#[cfg(test)]
mod utf8_tests {
    //! The fail-fast UTF-8 check: invalid bytes stop the stream at the frame
    //! that holds them, in any split; valid text never trips it.
    use super::*;

    /// A masked client frame carrying `payload` (key 1 2 3 4).
    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = super::tests_support::frame(opcode, fin, payload.len());
        let at = f.len() - payload.len();
        for (i, b) in payload.iter().enumerate() {
            f[at + i] = b ^ [1, 2, 3, 4][i % 4];
        }
        f
    }

    /// Feeds `stream` in `chunk`-byte reads; returns (where the last frame
    /// handed on ends, whether it failed).
    fn run(stream: &[u8], chunk: usize) -> (usize, bool) {
        let mut b = Boundary::default();
        let (mut handed, mut at) = (0, 0);
        for part in stream.chunks(chunk) {
            let cut = b.feed(part, 1 << 20);
            if cut > 0 {
                handed = at + cut;
            }
            at += part.len();
            if b.invalid_utf8() {
                break;
            }
        }
        (handed, b.invalid_utf8())
    }

    #[test]
    fn valid_text_in_fragments_and_chops_passes() {
        let text = "κόσμε ünïcødé ✓ 𝄞".repeat(40);
        let bytes = text.as_bytes();
        let (a, b) = bytes.split_at(7); // inside a code point
        let stream = [masked(1, false, a), masked(9, true, b"\xff\xfe"), masked(0, true, b)].concat();
        for chunk in [1, 2, 3, 5, 64, stream.len()] {
            assert_eq!(run(&stream, chunk), (stream.len(), false), "chunk {chunk}");
        }
        let binary = masked(2, true, &[0xff; 300]);
        assert_eq!(run(&binary, 7), (binary.len(), false), "binary is not checked");
    }

    #[test]
    fn invalid_fragment_fails_before_the_message_ends() {
        let ok = masked(1, true, b"fine");
        let first = masked(1, false, "κόσμε".as_bytes());
        let bad = masked(0, false, b"\xf4\x90\x80\x80"); // U+110000
        let stream = [ok.clone(), first.clone(), bad.clone()].concat();
        for chunk in [1, 3, 10, stream.len()] {
            let (handed, failed) = run(&stream, chunk);
            assert!(failed, "chunk {chunk}");
            assert_eq!(handed, ok.len() + first.len(), "chunk {chunk}: frames before the bad one go on");
        }
    }

    #[test]
    fn invalid_byte_in_a_chopped_frame_fails_before_the_frame_is_whole() {
        let payload = [&b"hello "[..], b"\xf4\x90\x80\x80", b" world"].concat();
        let frame = masked(1, true, &payload);
        let mut b = Boundary::default();
        assert_eq!(b.feed(&frame[..12], 1 << 20), 0);
        assert!(!b.invalid_utf8());
        assert_eq!(b.feed(&frame[12..14], 1 << 20), 0);
        assert!(b.invalid_utf8(), "0xf4 0x90 is never valid");
    }

    #[test]
    fn message_ending_inside_a_code_point_fails() {
        let stream = [masked(1, false, b"ab\xe2"), masked(0, true, b"\x82")].concat();
        assert!(run(&stream, 3).1);
        let stream = [masked(1, false, b"ab\xe2"), masked(0, true, b"\x82\xac")].concat();
        assert_eq!(run(&stream, 3), (stream.len(), false), "U+20AC across fragments");
    }
}
