//! permessage-deflate: negotiation per RFC 7692 §7, inflate bounds, the
//! rewrite for tungstenite, and compression checked against plain flate2.

use super::*;
use flate2::{Compress, Compression, FlushCompress};

fn neg(offers: &str) -> Option<String> {
    negotiate(offers).map(|a| a.response())
}

const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

#[test]
fn negotiation_accepts_what_it_can_honour() {
    assert_eq!(neg("permessage-deflate").as_deref(), Some(BOTH));
    assert_eq!(neg("permessage-deflate; client_max_window_bits").as_deref(), Some(BOTH), "browsers' offer");
    assert_eq!(neg("permessage-deflate; client_max_window_bits=10").as_deref(), Some(BOTH));
    assert_eq!(
        neg("permessage-deflate; server_no_context_takeover; client_no_context_takeover").as_deref(),
        Some(BOTH)
    );
    assert_eq!(
        neg("permessage-deflate; server_max_window_bits=10").as_deref(),
        Some(&*format!("{BOTH}; server_max_window_bits=10"))
    );
    assert_eq!(
        neg("permessage-deflate; server_max_window_bits=\"12\"").as_deref(),
        Some(&*format!("{BOTH}; server_max_window_bits=12")),
        "quoted value"
    );
    let eight = negotiate("permessage-deflate; server_max_window_bits=8").unwrap();
    assert_eq!(eight.server_bits, 0, "accepted, but we send uncompressed");
    assert!(eight.response().ends_with("server_max_window_bits=8"));
    assert_eq!(neg("x-webkit-deflate-frame, permessage-deflate").as_deref(), Some(BOTH));
}

#[test]
fn negotiation_declines_bad_offers_and_falls_back_to_the_next() {
    for bad in [
        "permessage-deflate; foo",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; client_max_window_bits=20",
        "deflate-stream",
        "",
    ] {
        assert_eq!(neg(bad), None, "{bad:?}");
    }
    let two = "permessage-deflate; server_max_window_bits=20, permessage-deflate; client_max_window_bits";
    assert_eq!(neg(two).as_deref(), Some(BOTH), "first offer declined, second accepted");
}

#[test]
fn the_runtime_reads_back_what_the_101_said() {
    let a = negotiate("permessage-deflate; server_max_window_bits=11").unwrap();
    let resp = format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Extensions: {}\r\n\r\n", a.response());
    assert_eq!(accepted(resp.as_bytes()), Some(a));
    assert_eq!(accepted(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), None);
}

/// What a client sends: raw deflate, sync flush, tail removed.
fn client_compress(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - 4);
    out
}

fn client_frame(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let h = FrameHeader {
        is_final: fin,
        rsv1,
        opcode: OpCode::from(opcode),
        mask: Some([9, 8, 7, 6]),
        ..FrameHeader::default()
    };
    let mut f = Vec::new();
    h.format(payload.len() as u64, &mut f).unwrap();
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ [9, 8, 7, 6][i & 3]));
    f
}

const LIM: Limits = Limits { max_frame: 1000, max_message: 100_000 };

/// Reads every message tungstenite gets out of `frames`.
fn tungstenite_reads(frames: &[u8]) -> Vec<tungstenite::Message> {
    use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
    let cfg = WebSocketConfig::default().max_frame_size(Some(LIM.max_frame)).max_message_size(Some(LIM.max_message));
    let mut ctx = WebSocketContext::new(Role::Server, Some(cfg));
    let mut out = Vec::new();
    let mut io = crate::transport::frame::Io { input: frames, out: &mut out };
    let mut got = Vec::new();
    while let Ok(m) = ctx.read(&mut io) {
        got.push(m);
    }
    got
}

#[test]
fn compressed_messages_reach_tungstenite_as_plain_ones() {
    let text = "hello hello hello compress me ".repeat(100); // 3,000 bytes: cut into 3 frames
    let z = client_compress(text.as_bytes());
    let (a, b) = z.split_at(z.len() / 2);
    let input = [
        client_frame(1, true, true, &z),
        client_frame(2, true, false, b"plain"),
        client_frame(1, false, true, a),
        client_frame(9, true, false, b"ping"),
        client_frame(0, true, false, b),
    ]
    .concat();
    let mut st = Inbound::new(negotiate(NAME).unwrap());
    let mut codec = Codec::new(1);
    // In two reads, split between the fragments (the tracker only cuts at frame ends).
    let cut = input.len() - client_frame(0, true, false, b).len();
    let (mut all, fail) = rewrite(&input[..cut], &mut st, &mut codec, LIM);
    assert_eq!(fail, None);
    assert!(st.held() > 0, "the open compressed message waits");
    let (rest, fail) = rewrite(&input[cut..], &mut st, &mut codec, LIM);
    assert_eq!(fail, None);
    assert_eq!(st.held(), 0);
    all.extend(rest);
    let got = tungstenite_reads(&all);
    use tungstenite::Message;
    assert_eq!(
        got,
        vec![
            Message::Text(text.clone().into()),
            Message::Binary(b"plain".to_vec().into()),
            Message::Ping(b"ping".to_vec().into()),
            Message::Text(text.into()),
        ]
    );
}

#[test]
fn violations_inside_compressed_messages() {
    let z = client_compress(b"abc");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        ([client_frame(1, false, true, &z), client_frame(1, true, false, b"x")].concat(), 1002),
        ([client_frame(1, false, true, &z), client_frame(0, true, true, b"x")].concat(), 1002),
        (client_frame(2, true, true, b"\xff\xff\xff not deflate"), 1007),
    ];
    for (input, code) in cases {
        let mut st = Inbound::new(negotiate(NAME).unwrap());
        let (_, fail) = rewrite(&input, &mut st, &mut Codec::new(1), LIM);
        assert_eq!(fail.map(|f| f.0), Some(code), "{input:02x?}");
    }
    // RSV1 on a control frame passes through: tungstenite refuses it.
    let ping = [client_frame(1, true, false, b"ok"), client_frame(9, true, true, b"")].concat();
    let (out, fail) = rewrite(&ping, &mut Inbound::new(negotiate(NAME).unwrap()), &mut Codec::new(1), LIM);
    assert_eq!((out, fail), (ping, None));
}

#[test]
fn a_bomb_is_refused_without_allocating_past_the_limit() {
    let bomb = client_compress(&vec![0u8; 50 << 20]); // 50 MiB of zeros, ~50 KiB compressed
    assert!(bomb.len() < 100_000);
    let mut codec = Codec::new(1);
    assert_eq!(codec.inflate(&bomb, 1 << 20).unwrap_err().0, 1009);
    let ok = client_compress(&vec![7u8; 1 << 20]);
    assert_eq!(codec.inflate(&ok, 1 << 20).unwrap().len(), 1 << 20, "exactly the limit is fine");
    assert_eq!(codec.inflate(&ok, (1 << 20) - 1).unwrap_err().0, 1009);
    let frame = client_frame(2, true, true, &bomb[..90_000.min(bomb.len())]);
    let lim = Limits { max_frame: 100_000, max_message: 100_000 };
    let (_, fail) = rewrite(&frame, &mut Inbound::new(negotiate(NAME).unwrap()), &mut codec, lim);
    assert_eq!(fail.map(|f| f.0), Some(1009));
}

/// Decodes server frames, inflating RSV1 ones with a fresh plain inflater.
fn client_reads(mut frames: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut got = Vec::new();
    while !frames.is_empty() {
        let mut cur = Cursor::new(frames);
        let (h, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        let at = cur.position() as usize;
        let payload = &frames[at..at + len as usize];
        frames = &frames[at + len as usize..];
        let data = if h.rsv1 {
            let mut z = Decompress::new(false);
            let mut out = Vec::with_capacity(1 << 20);
            z.decompress_vec(&[payload, &TAIL].concat(), &mut out, FlushDecompress::Sync).unwrap();
            out
        } else {
            payload.to_vec()
        };
        got.push((h.rsv1, data));
    }
    got
}

#[test]
fn outgoing_frames_over_the_threshold_are_compressed_and_fan_out_reuses_them() {
    let big = "the same room message for everyone ".repeat(50);
    let mut frames = Vec::new();
    crate::transport::frame::push_text(&mut frames, b"tiny");
    crate::transport::frame::push_text(&mut frames, big.as_bytes());
    crate::transport::frame::push_ping(&mut frames, 1);
    let original = frames.clone();
    let mut codec = Codec::new(1);
    for bits in [15, 9] {
        let mut out = Vec::new();
        codec.compress_frames(&mut frames.clone(), bits, 256, &mut out);
        let got = client_reads(&out);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (false, b"tiny".to_vec()), "under the threshold");
        assert_eq!(got[1], (true, big.as_bytes().to_vec()), "{bits} bits");
        assert!(!got[2].0, "control frames never");
        assert!(out.len() < original.len() / 4, "compressible");
        // Again with the same frame (the next member of the room): same bytes.
        let mut again = Vec::new();
        codec.compress_frames(&mut frames.clone(), bits, 256, &mut again);
        assert_eq!(again, out);
    }
    assert_eq!(frames, original);
    let st = codec.stats;
    assert_eq!((st.compressed, st.reused), (4, 2), "{st:?}");
    assert!(st.wire_bytes * 4 < st.plain_bytes, "{st:?}");
}

#[test]
fn random_payloads_round_trip_through_both_directions() {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut codec = Codec::new(1);
    for _ in 0..300 {
        let len = rng.usize(..5000);
        let alphabet = rng.u8(1..=255);
        let payload: Vec<u8> = (0..len).map(|_| rng.u8(..=alphabet)).collect();
        let bits = rng.u8(9..=15);
        // Outbound: our compressor, a plain inflater.
        let mut frames = Vec::new();
        crate::transport::frame::push_data(&mut frames, crate::transport::frame::Kind::Binary, &payload);
        let mut out = Vec::new();
        codec.compress_frames(&mut frames, bits, 0, &mut out);
        let got = client_reads(&out);
        assert_eq!(got, vec![(true, payload.clone())], "len {len} bits {bits}");
        // Inbound: a plain compressor, our rewrite, tungstenite.
        let z = client_compress(&payload);
        let input = client_frame(2, true, true, &z);
        let lim = Limits { max_frame: 1000, max_message: 10_000 };
        let (plain, fail) = rewrite(&input, &mut Inbound::new(negotiate(NAME).unwrap()), &mut codec, lim);
        assert_eq!(fail, None);
        assert_eq!(tungstenite_reads(&plain), vec![tungstenite::Message::Binary(payload.into())]);
    }
}

#[test]
fn random_bytes_never_panic_the_rewrite_or_the_negotiation() {
    let mut rng = fastrand::Rng::with_seed(5);
    let mut codec = Codec::new(1);
    let lim = Limits { max_frame: 300, max_message: 2000 };
    for _ in 0..5_000 {
        let data: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
        let mut st = Inbound::new(negotiate(NAME).unwrap());
        let (out, _) = rewrite(&data, &mut st, &mut codec, lim);
        assert!(out.len() <= data.len() + 2 * lim.max_message + 64, "{} from {}", out.len(), data.len());
        let _ = negotiate(&String::from_utf8_lossy(&data));
    }
    assert!(std::mem::size_of::<Inbound>() <= 32);
}
