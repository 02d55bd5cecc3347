//! Knows, from the bytes fed to tungstenite, whether its reader sits
//! between frames and outside a fragmented message.
//!
//! tungstenite's context keeps a read buffer (and any half-read frame) for
//! as long as it lives. When a connection goes quiet *at a frame boundary*
//! the context holds nothing that matters, so the sweeper drops it and an
//! idle connection returns to costing only its slot and its reader task.
//! Frame headers are parsed with tungstenite's own `FrameHeader::parse`.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::OpCode;
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
    /// Bytes that cannot be a valid client frame arrived (unparseable,
    /// unmasked, or over the frame limit): tungstenite must see them and fail.
    broken: bool,
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
        while !data.is_empty() && !self.broken {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                if self.remaining == 0 {
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
                    if let OpCode::Data(_) = h.opcode {
                        self.message = if h.is_final { 0 } else { self.message.saturating_add(len) };
                        self.fragmented = !h.is_final;
                    }
                    if len == 0 {
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
        self.remaining == 0 && self.header_len == 0 && !self.fragmented && !self.broken
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
