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
    /// Bytes that cannot be a valid header arrived (tungstenite will fail too).
    broken: bool,
}

impl Boundary {
    /// Accounts for `data`, exactly the bytes tungstenite is about to read.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.broken {
            if self.remaining > 0 {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let take = (MAX_HEADER - self.header_len as usize).min(data.len());
            let start = self.header_len as usize;
            self.header[start..start + take].copy_from_slice(&data[..take]);
            let avail = start + take;
            let mut cursor = Cursor::new(&self.header[..avail]);
            match FrameHeader::parse(&mut cursor) {
                Ok(Some((h, len))) => {
                    let used = cursor.position() as usize - start;
                    data = &data[used..];
                    self.header_len = 0;
                    self.remaining = len;
                    // Control frames may sit between fragments; only data
                    // frames open or close a message.
                    if let OpCode::Data(_) = h.opcode {
                        self.fragmented = !h.is_final;
                    }
                }
                Ok(None) => {
                    self.header_len = avail as u8;
                    data = &data[take..];
                }
                Err(_) => self.broken = true,
            }
        }
    }

    /// True when every byte fed so far completed whole frames and no
    /// fragmented message is open: the reader's state can be thrown away.
    pub fn at_rest(&self) -> bool {
        self.remaining == 0 && self.header_len == 0 && !self.fragmented && !self.broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
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

    #[test]
    fn whole_frames_in_any_split_leave_it_at_rest() {
        let stream: Vec<u8> =
            [frame(1, true, 5), frame(2, true, 300), frame(9, true, 0), frame(1, true, 70_000)].concat();
        for chunk in [1, 2, 3, 7, 13, 14, 15, 100, 4096, stream.len()] {
            let mut b = Boundary::default();
            for part in stream.chunks(chunk) {
                b.feed(part);
            }
            assert!(b.at_rest(), "chunk {chunk}");
        }
    }

    #[test]
    fn partial_frames_and_open_fragments_are_not_at_rest() {
        let mut b = Boundary::default();
        b.feed(&frame(1, true, 10)[..5]);
        assert!(!b.at_rest(), "mid-header or mid-payload");
        let mut b = Boundary::default();
        b.feed(&frame(1, false, 3));
        assert!(!b.at_rest(), "first fragment of a message");
        b.feed(&frame(9, true, 0));
        assert!(!b.at_rest(), "a ping between fragments does not end the message");
        b.feed(&frame(0, true, 3));
        assert!(b.at_rest(), "final continuation ends it");
        let mut b = Boundary::default();
        b.feed(&[0x81]);
        assert!(!b.at_rest());
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
            whole.feed(&data);
            let mut parts = Boundary::default();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len());
                parts.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(whole.at_rest(), parts.at_rest(), "{data:02x?}");
        }
    }
}
