//! The HTTP request head: `transport::http::parse` and `app::http::decide`
//! on arbitrary bytes, whole and as a growing prefix (the runtime calls
//! `decide` on everything read so far after every recv).
//!
//! Input: byte 0 picks the split point (as a fraction of the rest) and the
//! Responder's admission answer; the rest is the request bytes.
//!
//! Checks: never panics; a `Respond` is a complete HTTP/1.1 response
//! (starts with "HTTP/1.1 ", has "\r\n\r\n"); an `Upgrade`'s `consumed` is
//! within the input and its response is a 101; a `Complete` parse's
//! `consumed` is within the input and the limit; a prefix that already got
//! an answer gets the same kind of answer when more bytes follow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringside::app::http::{decide, Decision, Endpoint, Responder};
use ringside::transport::http::{parse, Parsed, Rejection};

const MAX: usize = 8192;

struct R(Option<Rejection>);

impl Responder for R {
    fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String) {
        (200, "text/plain; charset=utf-8", format!("{e:?}\n"))
    }
    fn admission(&self) -> Option<Rejection> {
        self.0
    }
    fn retry_after(&self) -> u32 {
        3
    }
}

fn check_parse(buf: &[u8]) {
    match parse(buf, MAX) {
        Parsed::Complete(h) => {
            assert!(h.consumed <= buf.len(), "consumed {} > len {}", h.consumed, buf.len());
            assert!(h.consumed <= MAX, "consumed {} > max {MAX}", h.consumed);
            // The accessors the application uses must not panic either.
            let _ = (h.path(), h.query(), h.is_get_or_head(), h.header("x-client-id"));
            let _ = ringside::transport::http::upgrade_response(&h);
        }
        Parsed::Refuse(why, text) => {
            let _ = why.status();
            assert!(!text.is_empty());
        }
        Parsed::NeedMore => assert!(buf.len() <= MAX, "NeedMore past the limit ({} bytes)", buf.len()),
    }
}

fn check_decision(buf: &[u8], d: &Decision) {
    match d {
        Decision::NeedMore => {}
        Decision::Respond { bytes, .. } => {
            assert!(bytes.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(bytes));
            assert!(bytes.windows(4).any(|w| w == b"\r\n\r\n"), "{:?}", String::from_utf8_lossy(bytes));
        }
        Decision::Upgrade { consumed, response, client_id, .. } => {
            assert!(*consumed <= buf.len(), "consumed {consumed} > len {}", buf.len());
            assert!(response.starts_with(b"HTTP/1.1 101 "), "{:?}", String::from_utf8_lossy(response));
            assert!(response.ends_with(b"\r\n\r\n"));
            if let Some(id) = client_id {
                assert!(ringside::app::protocol::valid_client_id(id), "{id:?}");
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, buf)) = input.split_first() else { return };
    let node = R(match ctl & 3 {
        0 => Some(Rejection::Full),
        1 => Some(Rejection::Draining),
        _ => None,
    });

    check_parse(buf);
    let whole = decide(buf, MAX, &node);
    check_decision(buf, &whole);

    // The runtime's view: first the bytes of one recv, then all of them.
    let split = (ctl as usize >> 2) * buf.len() / 63;
    let prefix = &buf[..split.min(buf.len())];
    check_parse(prefix);
    let first = decide(prefix, MAX, &node);
    check_decision(prefix, &first);
    match (&first, &whole) {
        // An Upgrade of a prefix is the same Upgrade of the whole (the head
        // ended inside the prefix; the rest is WebSocket bytes).
        (Decision::Upgrade { consumed: a, response: ra, .. }, Decision::Upgrade { consumed: b, response: rb, .. }) => {
            assert_eq!(a, b);
            assert_eq!(ra, rb);
        }
        (Decision::Upgrade { .. }, other) => panic!("prefix upgraded, whole answered {other:?}"),
        (Decision::Respond { .. }, Decision::NeedMore) => panic!("prefix answered, whole needs more"),
        _ => {}
    }
});
