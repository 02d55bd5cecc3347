//! permessage-deflate on the wire, over a raw socket: what the 101 says,
//! RSV1 frames each way, the threshold, a ping inside a compressed
//! fragmented message, and RSV1 refused (1002) when nothing was agreed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Upgrades `/echo` offering `offer`; returns the socket and the 101 head.
fn upgrade(node: &NodeProc, offer: &str) -> (TcpStream, String) {
    raw_upgrade(node.addr, "/echo", &format!("Sec-WebSocket-Extensions: {offer}\r\n"))
}

fn compress(data: &[u8]) -> Vec<u8> {
    let mut z = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    z.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut z = Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    z.decompress_vec(&[data, &[0, 0, 0xff, 0xff]].concat(), &mut out, FlushDecompress::Sync).unwrap();
    out
}

/// One server frame: (first byte, payload).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).unwrap();
    (h[0], p)
}

fn compressed(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = client_frame(opcode, fin, payload, true);
    f[0] |= 0x40;
    f
}

#[test]
fn compressed_both_ways_on_the_wire() {
    let node = NodeProc::start(&["--shards", "1", "--set", "websocket.deflate=true"]);
    let (mut s, head) = upgrade(&node, OFFER);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    let text = "compress me, compress me, compress me ".repeat(60);
    s.write_all(&compressed(0x1, true, &compress(text.as_bytes()))).unwrap();
    let (b0, payload) = read_frame(&mut s);
    assert_eq!(b0, 0x80 | 0x40 | 0x1, "final, RSV1, text");
    assert!(payload.len() < text.len() / 10, "{} bytes on the wire", payload.len());
    assert_eq!(inflate(&payload), text.as_bytes());
    // Under websocket.deflate_min_bytes: plain, whichever way it came.
    s.write_all(&compressed(0x1, true, &compress(b"hi"))).unwrap();
    assert_eq!(read_frame(&mut s), (0x81, b"hi".to_vec()));
    s.write_all(&client_frame(0x2, true, b"plain", true)).unwrap();
    assert_eq!(read_frame(&mut s), (0x82, b"plain".to_vec()));
    // A compressed message in two fragments with a ping between: pong first.
    let z = compress(text.as_bytes());
    let (a, b) = z.split_at(z.len() / 2);
    let frames = [compressed(0x1, false, a), client_frame(0x9, true, b"p", true), client_frame(0x0, true, b, true)];
    s.write_all(&frames.concat()).unwrap();
    assert_eq!(read_frame(&mut s), (0x8a, b"p".to_vec()));
    let (b0, payload) = read_frame(&mut s);
    assert_eq!(b0, 0xc1);
    assert_eq!(inflate(&payload), text.as_bytes());
    // Corrupt compressed data: 1007.
    s.write_all(&compressed(0x2, true, b"\xff\xff\xff\xff")).unwrap();
    assert_eq!(raw_close_code(&mut s), 1007);
}

#[test]
fn off_or_declined_means_no_header_and_rsv1_is_a_protocol_error() {
    let off = NodeProc::start(&["--shards", "1"]);
    let on = NodeProc::start(&["--shards", "1", "--set", "websocket.deflate=true"]);
    for (node, offer) in [(&off, OFFER), (&on, "permessage-deflate; server_max_window_bits=16")] {
        let (mut s, head) = upgrade(node, offer);
        assert!(head.starts_with("HTTP/1.1 101") && !head.to_ascii_lowercase().contains("extensions"), "{head}");
        s.write_all(&client_frame(0x1, true, b"plain works", true)).unwrap();
        assert_eq!(read_frame(&mut s), (0x81, b"plain works".to_vec()));
        s.write_all(&compressed(0x1, true, &compress(b"not agreed"))).unwrap();
        assert_eq!(raw_close_code(&mut s), 1002, "{offer}");
    }
}
