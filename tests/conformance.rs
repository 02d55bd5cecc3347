//! Strict RFC 6455 conformance over a real socket, case by case after the
//! Autobahn testsuite: a valid message that arrived in the same read as a
//! violation is echoed before the close, and invalid UTF-8 in a text
//! message is refused (1007) at the bad bytes, before the message or its
//! frame is complete.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A server frame: opcode and payload.
type Frame = (u8, Vec<u8>);

/// Parses whole server frames from the front of `buf`.
fn parse_frames(buf: &mut Vec<u8>) -> Vec<Frame> {
    let mut out = Vec::new();
    loop {
        if buf.len() < 2 {
            return out;
        }
        let (mut len, mut at) = ((buf[1] & 0x7f) as usize, 2);
        if len == 126 {
            if buf.len() < 4 {
                return out;
            }
            len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
            at = 4;
        } else if len == 127 {
            if buf.len() < 10 {
                return out;
            }
            len = u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize;
            at = 10;
        }
        if buf.len() < at + len {
            return out;
        }
        out.push((buf[0] & 0x0f, buf[at..at + len].to_vec()));
        buf.drain(..at + len);
    }
}

/// Every frame the server sends within `wait` (or until its close frame).
fn frames_within(s: &mut TcpStream, wait: Duration) -> Vec<Frame> {
    let end = Instant::now() + wait;
    let (mut buf, mut frames) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 4096];
    while !frames.iter().any(|f: &Frame| f.0 == 8) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                frames.extend(parse_frames(&mut buf));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => break,
        }
    }
    frames
}

fn close_code(f: &Frame) -> Option<u16> {
    (f.0 == 8 && f.1.len() >= 2).then(|| u16::from_be_bytes([f.1[0], f.1[1]]))
}

fn with_rsv(mut frame: Vec<u8>, rsv: u8) -> Vec<u8> {
    frame[0] |= rsv << 4;
    frame
}

fn text(payload: &str) -> Vec<u8> {
    client_frame(0x1, true, payload.as_bytes(), true)
}

/// Sends `bytes` in one write; returns what came back until the close.
fn one_chop(node: &NodeProc, bytes: &[u8]) -> Vec<Frame> {
    let mut s = raw_ws(node.addr, "/echo");
    s.write_all(bytes).unwrap();
    frames_within(&mut s, Duration::from_secs(5))
}

fn assert_echo_then_close(got: &[Frame], echoed: &[&str], code: u16, case: &str) {
    let want: Vec<Frame> = echoed.iter().map(|t| (1u8, t.as_bytes().to_vec())).collect();
    assert!(got.len() == echoed.len() + 1, "{case}: {got:?}");
    assert_eq!(&got[..echoed.len()], &want[..], "{case}: the valid message first");
    assert_eq!(close_code(&got[echoed.len()]), Some(code), "{case}: then the close, {got:?}");
}

#[test]
fn valid_message_before_a_violation_is_echoed_first() {
    let node = NodeProc::start(&["--shards", "1"]);
    let hello = "Hello, world!";
    let ping = client_frame(0x9, true, b"", true);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("3.2 RSV=2", with_rsv(text(hello), 2)),
        ("3.3 RSV=3", with_rsv(text(hello), 3)),
        ("4.1.3 reserved opcode 5", client_frame(0x5, true, b"", true)),
        ("4.1.4 reserved opcode 6 with payload", client_frame(0x6, true, b"reserved", true)),
        ("4.2.3 reserved control opcode 13", client_frame(0xd, true, b"", true)),
        ("4.2.4 reserved control opcode 14 with payload", client_frame(0xe, true, b"reserved", true)),
    ];
    for (case, bad) in cases {
        let got = one_chop(&node, &[text(hello), bad, ping.clone()].concat());
        assert_echo_then_close(&got, &[hello], 1002, case);
    }
    // 5.15: two fragments, a continuation with nothing to continue, a text
    // message, all in one chop.
    let bytes = [
        client_frame(0x1, false, b"fragment1", true),
        client_frame(0x0, true, b"fragment2", true),
        client_frame(0x0, false, b"fragment3", true),
        client_frame(0x1, true, b"fragment4", true),
    ]
    .concat();
    assert_echo_then_close(&one_chop(&node, &bytes), &["fragment1fragment2"], 1002, "5.15");
    // A ping between two messages is answered in order; the close comes last.
    let bytes = [text("a"), client_frame(0x9, true, b"p", true), text("b"), with_rsv(text("c"), 4)].concat();
    let got = one_chop(&node, &bytes);
    let kinds: Vec<(u8, &[u8])> = got.iter().map(|(op, p)| (*op, &p[..])).collect();
    assert_eq!(&kinds[..3], &[(1, &b"a"[..]), (0xa, b"p"), (1, b"b")], "{got:?}");
    assert_eq!(close_code(&got[3]), Some(1002));
}

/// A case name and its three payload parts.
type Parts = (&'static str, &'static [u8], &'static [u8], &'static [u8]);

/// Autobahn 6.4.*: PART1 valid, PART2 makes the message invalid, PART3 the rest.
const CASES_6_4: [Parts; 2] = [
    ("6.4.1/6.4.3", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", b"\xf4\x90\x80\x80", b"edited"),
    ("6.4.2/6.4.4", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4", b"\x90", b"\x80\x80edited"),
];

/// Sends `parts` with a pause after each but the last; the server must
/// answer nothing to the first and close 1007 right after the second,
/// before the third is sent.
fn fails_fast(node: &NodeProc, parts: [Vec<u8>; 3], case: &str) {
    let mut s = raw_ws(node.addr, "/echo");
    s.write_all(&parts[0]).unwrap();
    let early = frames_within(&mut s, Duration::from_millis(300));
    assert!(early.is_empty(), "{case}: nothing after the valid part, got {early:?}");
    s.write_all(&parts[1]).unwrap();
    let got = frames_within(&mut s, Duration::from_secs(2));
    assert_eq!(got.len(), 1, "{case}: {got:?}");
    assert_eq!(close_code(&got[0]), Some(1007), "{case}: closed at the bad bytes, {got:?}");
    let _ = s.write_all(&parts[2]); // too late: the server has closed already
}

#[test]
fn invalid_utf8_in_fragments_closes_1007_before_the_final_fragment() {
    let node = NodeProc::start(&["--shards", "1"]);
    for (case, a, b, c) in CASES_6_4 {
        let parts =
            [client_frame(0x1, false, a, true), client_frame(0x0, false, b, true), client_frame(0x0, true, c, true)];
        fails_fast(&node, parts, case);
    }
}

#[test]
fn invalid_utf8_in_a_chopped_frame_closes_1007_before_the_frame_is_whole() {
    let node = NodeProc::start(&["--shards", "1"]);
    for (case, a, b, c) in CASES_6_4 {
        let frame = client_frame(0x1, true, &[a, b, c].concat(), true);
        let cut1 = frame.len() - b.len() - c.len();
        let cut2 = frame.len() - c.len();
        let parts = [frame[..cut1].to_vec(), frame[cut1..cut2].to_vec(), frame[cut2..].to_vec()];
        fails_fast(&node, parts, case);
    }
    // Valid text in the same shapes is echoed whole.
    let mut s = raw_ws(node.addr, "/echo");
    let frame = text("κόσμε edited");
    for b in &frame {
        s.write_all(&[*b]).unwrap();
    }
    let got = frames_within(&mut s, Duration::from_secs(2));
    assert_eq!(got, vec![(1, "κόσμε edited".as_bytes().to_vec())]);
}
