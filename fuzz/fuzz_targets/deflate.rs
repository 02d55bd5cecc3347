//! permessage-deflate's parsers: the offer (`transport::deflate::negotiate`)
//! and the inbound rewrite (`transport::deflate::rewrite`), driven as
//! `runtime::session::process_input` drives them: the boundary tracker cuts
//! each chunk at its last whole frame, the rewrite turns compressed
//! messages into plain frames, and tungstenite reads the result.
//!
//! Input: byte 0 = offer length (the offer is the next bytes, lossy UTF-8);
//! byte 1 = number of chunks minus one (mod 8); then one byte per chunk but
//! the last, each that chunk's size minus one; the rest is the byte stream.
//!
//! Checks:
//! - nothing panics;
//! - an accepted offer's answer is accepted again by `negotiate` (the
//!   runtime reads it back from the 101) with the same agreement;
//! - what a compressed message held never exceeds the message limit, and
//!   the rewrite's output is never more than one message limit (plus frame
//!   headers) per frame of input (a bomb cannot inflate past the limit);
//! - tungstenite reads the rewritten frames without panicking either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringside::transport::boundary::Boundary;
use ringside::transport::deflate::{self, Codec, Inbound, Limits};
use ringside::transport::frame::Io;
use tungstenite::error::Error as WsError;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

const LIM: Limits = Limits { max_frame: 4096, max_message: 16 << 10 };

fuzz_target!(|input: &[u8]| {
    let Some((&offer_len, rest)) = input.split_first() else { return };
    let (offer, rest) = rest.split_at((offer_len as usize).min(rest.len()));
    let offer = String::from_utf8_lossy(offer);
    if let Some(a) = deflate::negotiate(&offer) {
        assert_eq!(deflate::negotiate(&a.response()), Some(a), "{offer:?} -> {}", a.response());
    }
    let Some((&n, rest)) = rest.split_first() else { return };
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

    let agreed = deflate::negotiate("permessage-deflate").expect("the plain offer is accepted");
    let mut st = Inbound::new(agreed);
    let mut codec = Codec::new(1);
    let mut boundary = Boundary::default();
    let cfg = WebSocketConfig::default()
        .read_buffer_size(1024)
        .max_message_size(Some(LIM.max_message))
        .max_frame_size(Some(LIM.max_frame));
    let mut ctx = WebSocketContext::new(Role::Server, Some(cfg));
    let mut out = Vec::new();
    let mut partial: Vec<u8> = Vec::new();
    for chunk in chunks {
        let cut = boundary.feed(chunk, LIM.max_frame as u64);
        partial.extend_from_slice(&chunk[..cut]);
        let whole = std::mem::take(&mut partial);
        partial.extend_from_slice(&chunk[cut..]);
        if boundary.invalid_utf8() {
            return;
        }
        let (frames, fail) = deflate::rewrite(&whole, &mut st, &mut codec, LIM);
        assert!(st.held() <= LIM.max_message, "held {}", st.held());
        let per_message = LIM.max_message + 14 * (LIM.max_message / LIM.max_frame + 2);
        assert!(frames.len() <= whole.len() + (whole.len() / 6 + 1) * per_message, "{} from {}", frames.len(), whole.len());
        let mut io = Io { input: &frames, out: &mut out };
        loop {
            match ctx.read(&mut io) {
                Ok(_) => {}
                Err(WsError::Io(_)) => break,
                Err(_) => return,
            }
        }
        if fail.is_some() {
            return;
        }
    }
});
