//! permessage-deflate (RFC 7692): the offer and the answer, inbound
//! compressed messages turned into plain frames for tungstenite, and
//! outbound data frames compressed.
//!
//! tungstenite 0.30 refuses any frame with RSV1 set, so compressed frames
//! never reach it: [`rewrite`] runs over the whole frames of each read,
//! collects the (unmasked) payload of a compressed message, inflates it once
//! its final frame is in, and hands tungstenite an equivalent uncompressed
//! message (frames masked with an all-zero key, which unmasks to itself, cut
//! at the frame limit). Every other frame passes through untouched, so
//! tungstenite still does all of RFC 6455's checks.
//!
//! No zlib state lives on a connection. The answer always carries
//! `server_no_context_takeover` and `client_no_context_takeover` (RFC 7692
//! §7.1.1.1 and §7.1.1.2 let a server add both to any accepted offer), so
//! every message is compressed and inflated on its own: one [`Codec`] per
//! shard serves all its connections, reset per message, and an idle
//! compressed connection holds only its [`Inbound`] (a few bytes). The
//! price is the ratio context takeover would give on many small similar
//! messages. It also makes a compressed frame the same bytes for every
//! connection with the same window, so room fan-out compresses each message
//! once per shard ([`Codec::compress_frames`] keeps the last one).

use std::io::Cursor;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::close;

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// The empty stored block a sync flush ends with; RFC 7692 §7.2.1 removes
/// it from each message and §7.2.2 puts it back before inflating.
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Smallest LZ77 window (bits) we compress with: zlib cannot deflate with a
/// 256-byte window (it silently uses 512), so a client that limits us to 8
/// bits gets its messages uncompressed (always allowed: RSV1 is per message).
const MIN_COMPRESS_BITS: u8 = 9;

/// An accepted offer: what this connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// Window bits we compress with toward the client; 0: never compress
    /// (the client allowed only 8).
    pub server_bits: u8,
    /// The client named `server_max_window_bits` (the answer must carry it).
    server_bits_offered: bool,
}

impl Agreed {
    /// What travels with a connection handed to another process:
    /// (server window bits, whether the client named them).
    pub fn to_parts(self) -> (u8, bool) {
        (self.server_bits, self.server_bits_offered)
    }

    /// The inverse of [`Agreed::to_parts`]; `None` for values no
    /// negotiation gives.
    pub fn from_parts(server_bits: u8, server_bits_offered: bool) -> Option<Self> {
        (server_bits == 0 || (MIN_COMPRESS_BITS..=15).contains(&server_bits))
            .then_some(Agreed { server_bits, server_bits_offered })
    }
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut s = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
        if self.server_bits_offered {
            let bits = if self.server_bits == 0 { 8 } else { self.server_bits };
            s.push_str(&format!("; server_max_window_bits={bits}"));
        }
        s
    }
}

/// Picks the first offer of `offers` (every `Sec-WebSocket-Extensions` line
/// joined with `,`) that we can honour; `None` declines them all (the 101
/// then carries no extension header). An offer with an unknown or repeated
/// parameter, or a malformed value, is declined (RFC 7692 §5.1).
pub fn negotiate(offers: &str) -> Option<Agreed> {
    offers.split(',').find_map(accept)
}

/// The extension a 101 we wrote accepted (the runtime reads it back from
/// the bytes it sends, so the connection's state is what the client was told).
pub fn accepted(response: &[u8]) -> Option<Agreed> {
    let text = std::str::from_utf8(response).ok()?;
    let line = text.split("\r\n").find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))?;
    accept(line)
}

fn accept(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut agreed = Agreed { server_bits: 15, server_bits_offered: false };
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim())?)),
            None => (p.trim(), None),
        };
        let i = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|k| k.eq_ignore_ascii_case(name))?;
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
        match i {
            0 | 1 if value.is_some() => return None,
            2 => {
                let bits = window_bits(value?)?;
                agreed.server_bits = if bits < MIN_COMPRESS_BITS { 0 } else { bits };
                agreed.server_bits_offered = true;
            }
            // The client may limit its own window: we inflate any (15 bits).
            3 if value.is_some() => {
                window_bits(value?)?;
            }
            _ => {}
        }
    }
    Some(agreed)
}

/// A token or quoted-string value (RFC 7692 §5.1 allows either).
fn unquote(v: &str) -> Option<&str> {
    match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(v),
    }
}

/// 8-15, digits only, no leading zero (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') || v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// A connection's inbound deflate state: where it stands in the current
/// message. Idle it holds no allocation.
#[derive(Debug, Default)]
pub struct Inbound {
    /// What was agreed at the upgrade.
    pub agreed: Option<Agreed>,
    open: Open,
    /// Compressed payload of the open compressed message's frames so far.
    pending: Vec<u8>,
}

/// The data message in progress.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Open {
    #[default]
    None,
    /// An uncompressed fragmented message: its frames pass through.
    Plain,
    /// A compressed message of this kind (text or binary).
    Compressed(Data),
}

impl Inbound {
    /// A connection that agreed to `agreed`.
    pub fn new(agreed: Agreed) -> Self {
        Inbound { agreed: Some(agreed), ..Inbound::default() }
    }

    /// No message open: what is left is what was agreed (a connection at
    /// rest can move to another process with only that).
    pub fn at_rest(&self) -> bool {
        self.open == Open::None && self.pending.is_empty()
    }

    /// Bytes held for an open compressed message.
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// Window bits to compress outgoing messages with (0: do not).
    pub fn server_bits(&self) -> u8 {
        self.agreed.map_or(0, |a| a.server_bits)
    }
}

/// A violation found while rewriting: close code and reason.
pub type Failure = (u16, &'static str);

/// Limits for [`rewrite`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame tungstenite accepts (inflated messages are cut to it).
    pub max_frame: usize,
    /// Largest message, compressed or inflated.
    pub max_message: usize,
}

/// Rewrites `input` (whole client frames, as the boundary tracker cut them)
/// for tungstenite: compressed messages become plain ones once complete.
/// Returns the frames to read and, if one was found, the violation to close
/// for after them (nothing behind it is returned).
pub fn rewrite(input: &[u8], st: &mut Inbound, codec: &mut Codec, lim: Limits) -> (Vec<u8>, Option<Failure>) {
    let mut out = Vec::with_capacity(input.len());
    let mut rest = input;
    while !rest.is_empty() {
        let mut cur = Cursor::new(rest);
        let parsed = FrameHeader::parse(&mut cur);
        let at = cur.position() as usize;
        let Ok(Some((h, len))) = parsed else { break };
        if ((rest.len() - at) as u64) < len {
            break;
        }
        let (frame, tail) = rest.split_at(at + len as usize);
        rest = tail;
        if let Err(f) = one_frame(&h, frame, &frame[at..], st, codec, lim, &mut out) {
            return (out, Some(f));
        }
    }
    // A stream the tracker found broken: tungstenite reads the bad bytes and fails.
    out.extend_from_slice(rest);
    (out, None)
}

fn one_frame(
    h: &FrameHeader,
    frame: &[u8],
    payload: &[u8],
    st: &mut Inbound,
    codec: &mut Codec,
    lim: Limits,
    out: &mut Vec<u8>,
) -> Result<(), Failure> {
    let OpCode::Data(kind) = h.opcode else {
        out.extend_from_slice(frame); // control frames: tungstenite's
        return Ok(());
    };
    match (kind, st.open) {
        (Data::Continue, Open::Compressed(k)) => {
            if h.rsv1 || h.rsv2 || h.rsv3 {
                return Err((close::PROTOCOL, "RSV bits on a continuation frame"));
            }
            if st.pending.len() + payload.len() > lim.max_message {
                return Err((close::TOO_BIG, "message or frame too large"));
            }
            unmask_into(&mut st.pending, payload, h.mask);
            if h.is_final {
                let pending = std::mem::take(&mut st.pending);
                st.open = Open::None;
                let plain = codec.inflate(&pending, lim.max_message)?;
                plain_frames(out, k, &plain, lim.max_frame);
            }
        }
        (Data::Text | Data::Binary, Open::Compressed(_)) => {
            return Err((close::PROTOCOL, "a new message inside a fragmented one"));
        }
        (Data::Text | Data::Binary, Open::None) if h.rsv1 && !h.rsv2 && !h.rsv3 => {
            if h.is_final {
                let mut compressed = Vec::with_capacity(payload.len());
                unmask_into(&mut compressed, payload, h.mask);
                let plain = codec.inflate(&compressed, lim.max_message)?;
                plain_frames(out, kind, &plain, lim.max_frame);
            } else {
                unmask_into(&mut st.pending, payload, h.mask);
                st.open = Open::Compressed(kind);
            }
        }
        _ => {
            // Uncompressed (or broken: tungstenite refuses it). Track where
            // a plain fragmented message stands so its continuations pass.
            out.extend_from_slice(frame);
            match kind {
                Data::Text | Data::Binary if st.open == Open::None && !h.is_final => st.open = Open::Plain,
                Data::Continue if st.open == Open::Plain && h.is_final => st.open = Open::None,
                _ => {}
            }
        }
    }
    Ok(())
}

fn unmask_into(dst: &mut Vec<u8>, payload: &[u8], mask: Option<[u8; 4]>) {
    let key = mask.unwrap_or_default();
    dst.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
}

/// Appends `payload` as a `kind` message of client frames (zero masking
/// key), at most `max_frame` bytes each.
fn plain_frames(out: &mut Vec<u8>, kind: Data, payload: &[u8], max_frame: usize) {
    let mut chunks = payload.chunks(max_frame.max(1)).peekable();
    let mut first = true;
    loop {
        let chunk = chunks.next().unwrap_or(&[]);
        let last = chunks.peek().is_none();
        let opcode = OpCode::Data(if first { kind } else { Data::Continue });
        let header = FrameHeader { is_final: last, opcode, mask: Some([0; 4]), ..FrameHeader::default() };
        header.format(chunk.len() as u64, out).expect("writing to a Vec cannot fail");
        out.extend_from_slice(chunk);
        first = false;
        if last {
            return;
        }
    }
}

/// What a shard's codec did since it was created (read by the sweep for
/// `/metrics`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Compressed messages inflated.
    pub inflated: u64,
    /// Messages sent compressed (fan-out copies included).
    pub compressed: u64,
    /// Of those, copies of the previous output (no compression run).
    pub reused: u64,
    /// Payload bytes of the messages sent compressed, before compression.
    pub plain_bytes: u64,
    /// Their payload bytes after compression.
    pub wire_bytes: u64,
}

/// A shard's zlib state: one inflater, one deflater per window size in use,
/// and the last compressed output (room fan-out sends the same frame to
/// many connections). Reset before every message.
pub struct Codec {
    level: Compression,
    inflater: Option<Decompress>,
    deflaters: [Option<Compress>; 7],
    /// The input and window of the last [`Codec::compress_frames`], and its output.
    last_in: Vec<u8>,
    last_bits: u8,
    last_out: Vec<u8>,
    /// Where [`Codec::compress_with`] has the application write its frames.
    scratch: Vec<u8>,
    /// What the last output holds: (messages compressed, plain, wire bytes).
    last_counts: (u64, u64, u64),
    /// Running totals.
    pub stats: Stats,
}

/// Output grows by at least this much per step while inflating.
const INFLATE_STEP: usize = 16 * 1024;

impl Codec {
    /// A codec compressing at zlib `level` (0-9); nothing allocated yet.
    pub fn new(level: u32) -> Self {
        Codec {
            level: Compression::new(level.min(9)),
            inflater: None,
            deflaters: Default::default(),
            last_in: Vec::new(),
            last_bits: 0,
            last_out: Vec::new(),
            scratch: Vec::new(),
            last_counts: (0, 0, 0),
            stats: Stats::default(),
        }
    }

    /// Lets `write` append server frames, then appends them to `out`
    /// compressed as [`Codec::compress_frames`] does.
    pub fn compress_with(&mut self, bits: u8, min_bytes: usize, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        let mut frames = std::mem::take(&mut self.scratch);
        frames.clear();
        write(&mut frames);
        self.compress_frames(&mut frames, bits, min_bytes, out);
        frames.clear();
        self.scratch = frames;
    }

    /// Inflates one message. Output never grows past `max + 1` bytes: a
    /// message that would is refused (1009) however well it compressed.
    pub fn inflate(&mut self, compressed: &[u8], max: usize) -> Result<Vec<u8>, Failure> {
        let z = self.inflater.get_or_insert_with(|| Decompress::new(false));
        z.reset(false);
        let corrupt = (close::INVALID_PAYLOAD, "invalid compressed data");
        let too_big = (close::TOO_BIG, "message or frame too large");
        self.stats.inflated += 1;
        let mut out = Vec::new();
        for mut input in [compressed, &TAIL[..]] {
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(too_big);
                    }
                    out.reserve_exact(out.len().max(INFLATE_STEP).min(max + 1 - out.len()));
                }
                let (in0, out0) = (z.total_in(), z.total_out());
                let status = z.decompress_vec(input, &mut out, FlushDecompress::Sync).map_err(|_| corrupt)?;
                input = &input[(z.total_in() - in0) as usize..];
                if status == Status::StreamEnd {
                    return if out.len() > max { Err(too_big) } else { Ok(out) };
                }
                let produced = z.total_out() - out0;
                if out.len() < out.capacity() && (input.is_empty() || produced == 0) {
                    break; // this input is used up (or zlib wants more)
                }
            }
        }
        if out.len() > max {
            return Err(too_big);
        }
        Ok(out)
    }

    /// Appends `frames` (whole server frames, as the application wrote
    /// them) to `out`, with each final unfragmented text or binary frame of
    /// at least `min_bytes` compressed with a `bits` window (RSV1 set).
    /// Called again with the same frames and window (fan-out), it copies
    /// the previous output instead of compressing again. `frames` is left
    /// holding other bytes (the codec keeps the input to compare).
    pub fn compress_frames(&mut self, frames: &mut Vec<u8>, bits: u8, min_bytes: usize, out: &mut Vec<u8>) {
        if bits != self.last_bits || *frames != self.last_in {
            self.last_out.clear();
            let mut last_out = std::mem::take(&mut self.last_out);
            self.last_counts = self.compress_into(frames, bits, min_bytes, &mut last_out);
            self.last_out = last_out;
            self.last_bits = bits;
            std::mem::swap(&mut self.last_in, frames);
        } else if self.last_counts.0 > 0 {
            self.stats.reused += 1;
        }
        let (n, plain, wire) = self.last_counts;
        self.stats.compressed += n;
        self.stats.plain_bytes += plain;
        self.stats.wire_bytes += wire;
        out.extend_from_slice(&self.last_out);
    }

    /// Returns (messages compressed, their plain and compressed payload bytes).
    fn compress_into(&mut self, mut frames: &[u8], bits: u8, min_bytes: usize, out: &mut Vec<u8>) -> (u64, u64, u64) {
        let mut counts = (0, 0, 0);
        while !frames.is_empty() {
            let mut cur = Cursor::new(frames);
            let Ok(Some((h, len))) = FrameHeader::parse(&mut cur) else { break };
            let at = cur.position() as usize;
            let end = (at as u64 + len).min(frames.len() as u64) as usize;
            let (frame, rest) = frames.split_at(end);
            frames = rest;
            let data = matches!(h.opcode, OpCode::Data(Data::Text | Data::Binary));
            if !(data && h.is_final && !h.rsv1 && frame.len() - at >= min_bytes) {
                out.extend_from_slice(frame);
                continue;
            }
            let mut body = Vec::with_capacity((frame.len() - at) / 2 + 64);
            self.deflate(bits, &frame[at..], &mut body);
            let header = FrameHeader { rsv1: true, ..h };
            header.format(body.len() as u64, out).expect("writing to a Vec cannot fail");
            out.extend_from_slice(&body);
            counts = (counts.0 + 1, counts.1 + (frame.len() - at) as u64, counts.2 + body.len() as u64);
        }
        out.extend_from_slice(frames);
        counts
    }

    /// Raw deflate of one message with a sync flush, tail removed.
    fn deflate(&mut self, bits: u8, mut input: &[u8], out: &mut Vec<u8>) {
        let level = self.level;
        let slot = (bits.clamp(MIN_COMPRESS_BITS, 15) - MIN_COMPRESS_BITS) as usize;
        let z = self.deflaters[slot].get_or_insert_with(|| Compress::new_with_window_bits(level, false, bits));
        z.reset();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let (in0, out0) = (z.total_in(), z.total_out());
            // A Vec's spare room is always enough to make progress; an
            // error here would be a zlib bug: send what we have.
            if z.compress_vec(input, out, FlushCompress::Sync).is_err() {
                break;
            }
            input = &input[(z.total_in() - in0) as usize..];
            // Room left after the call: the flush is complete.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            if z.total_out() == out0 && z.total_in() == in0 && out.len() < out.capacity() {
                break; // no progress with room to spare: never expected
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    }
}

#[cfg(test)]
mod tests;
