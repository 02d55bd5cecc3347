//! The frame reader: tungstenite's server `WebSocketContext` driven exactly
//! as `runtime::session::process_input` drives it (feed a recv's bytes to
//! `Boundary`, then `read` until `WouldBlock` or an error), in arbitrary
//! chunks, next to the frame-boundary tracker.
//!
//! Input: byte 0 = number of chunks minus one (mod 8); then one byte per
//! chunk but the last, each that chunk's size minus one; the rest is the
//! byte stream. The last chunk takes whatever is left.
//!
//! Checks:
//! - nothing panics;
//! - `Boundary::at_rest()` after each chunk equals an independent model of
//!   RFC 6455 framing (every byte so far ends a whole frame and no
//!   fragmented data message is open), as long as tungstenite has not
//!   refused the stream; in particular it is false while a frame's header
//!   or payload is incomplete;
//! - what the sweeper relies on: a second context that is thrown away
//!   (and recreated on the next chunk) whenever `at_rest() && can_write()`
//!   yields the same messages, the same errors and the same output bytes as
//!   the context that is kept;
//! - the output (pongs, close replies, the node's own close frame) stays
//!   within `2 * input + 256` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringside::transport::boundary::Boundary;
use ringside::transport::frame::{self, Io};
use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

fn config() -> WebSocketConfig {
    // As runtime::shard::Shard::new builds it (read buffer, message and
    // frame limits as configured; here the frame limit is 16 KiB so that
    // oversized frames are cheap to reach).
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(16 << 10))
}

/// What one `read` returned.
#[derive(Debug, PartialEq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, Vec<u8>)>),
    Frame,
    WouldBlock,
    End(String),
    Error(String),
}

/// One context's view of the stream, as the runtime keeps it.
struct Conn {
    ctx: Option<WebSocketContext>,
    boundary: Boundary,
    out: Vec<u8>,
    /// Messages and the terminal outcome of each chunk, for comparison.
    log: Vec<Event>,
    /// The runtime stopped reading (error, or the peer's close completed).
    done: bool,
}

impl Conn {
    fn new() -> Self {
        Conn { ctx: None, boundary: Boundary::default(), out: Vec::new(), log: Vec::new(), done: false }
    }

    /// `process_input`; sets `done` when the reader stops.
    fn process(&mut self, data: &[u8]) {
        if self.done {
            return;
        }
        // The whole chunk, like the runtime before it stashed partial frames:
        // this target checks the tracker against tungstenite on every byte.
        let _ = self.boundary.feed(data, u64::MAX);
        let mut ctx = self.ctx.take().unwrap_or_else(|| WebSocketContext::new(Role::Server, Some(config())));
        let mut io = Io { input: data, out: &mut self.out };
        loop {
            match ctx.read(&mut io) {
                Ok(m) => self.log.push(match m {
                    // Raw bytes, not formatted text: formatting every payload
                    // cost three quarters of the time per input.
                    Message::Text(t) => Event::Text(t.as_bytes().to_vec()),
                    Message::Binary(b) => Event::Binary(b.to_vec()),
                    Message::Ping(p) => Event::Ping(p.to_vec()),
                    Message::Pong(p) => Event::Pong(p.to_vec()),
                    Message::Close(f) => Event::Close(f.map(|f| (u16::from(f.code), f.reason.as_bytes().to_vec()))),
                    Message::Frame(_) => Event::Frame,
                }),
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(io.input.is_empty(), "WouldBlock with {} bytes unread", io.input.len());
                    self.log.push(Event::WouldBlock);
                    break;
                }
                Err(e @ (WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    self.log.push(Event::End(format!("{e:?}")));
                    self.done = true;
                    break;
                }
                Err(e) => {
                    let (code, reason) = classify(&e);
                    frame::push_close(io.out, code, reason);
                    self.log.push(Event::Error(format!("{e:?}")));
                    self.done = true;
                    break;
                }
            }
        }
        self.ctx = Some(ctx);
    }

    /// The sweeper's rule (`runtime::sweep`): a reader at rest at a frame
    /// boundary gives its context back.
    fn sweep(&mut self) {
        if !self.done && self.ctx.as_ref().is_some_and(|c| c.can_write()) && self.boundary.at_rest() {
            self.ctx = None;
        }
    }
}

/// As `runtime::session::classify`.
fn classify(e: &WsError) -> (u16, &'static str) {
    match e {
        WsError::Utf8(_) => (1007, "invalid UTF-8 in a text message"),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (1009, "message or frame too large"),
        WsError::Capacity(_) => (1009, "too large"),
        WsError::Protocol(_) | WsError::AttackAttempt => (1002, "protocol violation"),
        _ => (1011, "internal error"),
    }
}

/// An independent model of RFC 6455 framing over the bytes fed so far.
#[derive(Default)]
struct Model {
    header: Vec<u8>,
    remaining: u64,
    fragmented: bool,
}

impl Model {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            if let Some((fin, opcode, len)) = self.header_done() {
                self.header.clear();
                self.remaining = len;
                if opcode < 8 {
                    self.fragmented = !fin;
                }
            }
        }
    }

    /// `(fin, opcode, payload length)` once `header` holds a whole header.
    fn header_done(&self) -> Option<(bool, u8, u64)> {
        let h = &self.header;
        if h.len() < 2 {
            return None;
        }
        let ext = match h[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
        if h.len() < 2 + ext + mask {
            return None;
        }
        let len = match ext {
            0 => u64::from(h[1] & 0x7f),
            n => h[2..2 + n].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        };
        Some((h[0] & 0x80 != 0, h[0] & 0x0f, len))
    }

    fn at_rest(&self) -> bool {
        self.header.is_empty() && self.remaining == 0 && !self.fragmented
    }

    fn mid_frame(&self) -> bool {
        !self.header.is_empty() || self.remaining > 0
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, rest)) = input.split_first() else { return };
    let n = (n % 8) as usize + 1;
    if rest.len() < n - 1 {
        return;
    }
    let (sizes, mut stream) = rest.split_at(n - 1);
    let mut chunks: Vec<&[u8]> = Vec::with_capacity(n);
    for &s in sizes {
        let take = (s as usize + 1).min(stream.len());
        chunks.push(&stream[..take]);
        stream = &stream[take..];
    }
    chunks.push(stream);

    let mut kept = Conn::new();
    let mut swept = Conn::new();
    let mut model = Model::default();
    let mut fed = 0usize;
    for chunk in chunks {
        let was_done = kept.done;
        kept.process(chunk);
        swept.process(chunk);
        if !was_done {
            fed += chunk.len();
            model.feed(chunk);
        }
        if !kept.done {
            // tungstenite accepted every byte so far: the tracker must agree
            // with the model exactly.
            assert_eq!(
                kept.boundary.at_rest(),
                model.at_rest(),
                "at_rest disagrees with the framing model after {fed} bytes"
            );
            if model.mid_frame() {
                assert!(!kept.boundary.at_rest(), "at rest inside a frame");
            }
        }
        assert_eq!(kept.log, swept.log, "dropping the context at rest changed what it read");
        assert_eq!(kept.out, swept.out, "dropping the context at rest changed what it wrote");
        swept.sweep();
    }
    assert!(kept.out.len() <= 2 * fed + 256, "wrote {} bytes for {fed} in", kept.out.len());
});
