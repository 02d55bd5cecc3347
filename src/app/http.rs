//! The application's HTTP surface: which paths exist, what the plain
//! endpoints answer, and whether an upgrade is accepted (client id,
//! admission). Parsing and the upgrade check itself are the transport's
//! ([`crate::transport::http`]).

use super::protocol::valid_client_id;
use crate::transport::deflate;
use crate::transport::http::{self as wire, Head, Parsed, Rejection};

/// Which WebSocket endpoint a connection upgraded on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// `/echo`: every message back unchanged.
    #[default]
    Echo,
    /// `/ws`: the JSON rooms protocol.
    Rooms,
}

/// What to do with the bytes read so far.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// The head is not complete yet.
    NeedMore,
    /// Send these bytes, then close. `rejected` says why, if it is a refusal.
    Respond {
        /// A complete HTTP response.
        bytes: Vec<u8>,
        /// The refusal reason (counted), or `None` for a served endpoint.
        rejected: Option<Rejection>,
    },
    /// Upgrade: send `response`, then speak WebSocket on `route`.
    Upgrade {
        /// `/ws` or `/echo`.
        route: Route,
        /// The client id asked for (`?client_id=` or `X-Client-Id`), if any.
        client_id: Option<String>,
        /// The verified token's claims (`auth.mode = "token"`).
        claims: Option<super::auth::Claims>,
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the head; anything after belongs to the WebSocket.
        consumed: usize,
    },
}

/// Plain HTTP endpoints served on the client port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /health`
    Health,
    /// `GET /ready`
    Ready,
    /// `GET /metrics`
    Metrics,
    /// `GET /cluster`
    Cluster,
    /// `GET /pools`: shards and upstream pools as JSON (internal).
    Pools,
    /// `GET /dashboard`: the HTML page over `/pools` (internal).
    Dashboard,
}

/// Answers for plain endpoints and for the node's state at upgrade time.
pub trait Responder {
    /// Body and status for a plain endpoint.
    fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String);
    /// `Some(reason)` when the upgrade must be refused now (full, draining).
    fn admission(&self) -> Option<Rejection>;
    /// `Retry-After` seconds for 503s.
    fn retry_after(&self) -> u32;
    /// `/metrics` and `/cluster` may be served on this connection's listener.
    fn internal_allowed(&self) -> bool {
        true
    }
    /// The connection came in on the internal listener (no upgrades there).
    fn admin(&self) -> bool {
        false
    }
    /// Applies the per-address limits with what the request says about its
    /// client (`X-Forwarded-For` from a trusted proxy): `Some((reason,
    /// retry_after_secs))` when refused.
    fn admit(&self, _head: &Head) -> Option<(Rejection, u32)> {
        None
    }
    /// A browser `Origin` may upgrade (`None`: no Origin header).
    fn origin_allowed(&self, _origin: Option<&str>) -> bool {
        true
    }
    /// Who the client is: `Ok(None)` when no token is needed, `Ok(claims)`
    /// for a valid one, `Err` (answered 401) otherwise.
    fn authorize(&self, _head: &Head) -> Result<Option<super::auth::Claims>, super::auth::TokenError> {
        Ok(None)
    }
    /// permessage-deflate may be accepted (`websocket.deflate`).
    fn deflate(&self) -> bool {
        false
    }
}

/// Looks at `head` (everything read so far) and decides.
pub fn decide(head: &[u8], max_request: usize, node: &impl Responder) -> Decision {
    let head = match wire::parse(head, max_request) {
        Parsed::NeedMore => return Decision::NeedMore,
        Parsed::Refuse(why, text) => return refuse(why, &text, node),
        Parsed::Complete(h) => h,
    };
    if let Some((why, retry_after)) = node.admit(&head) {
        let body = wire::refusal(why, "too many connections from this address; slow down", retry_after);
        return Decision::Respond { bytes: body, rejected: Some(why) };
    }
    let internal = node.internal_allowed();
    let endpoint = match head.path() {
        "/ws" | "/echo" if !node.admin() => None,
        "/health" => Some(Endpoint::Health),
        "/ready" => Some(Endpoint::Ready),
        "/metrics" if internal => Some(Endpoint::Metrics),
        "/cluster" if internal => Some(Endpoint::Cluster),
        "/pools" if internal => Some(Endpoint::Pools),
        "/dashboard" if internal => Some(Endpoint::Dashboard),
        // Test-only (the `fault-injection` feature, off by default and in
        // release builds): lets tests/ops_fault.rs prove that a panicking
        // shard aborts the whole process.
        #[cfg(feature = "fault-injection")]
        "/__fault/panic" => panic!("fault injection: /__fault/panic"),
        _ => {
            return refuse(
                Rejection::NotFound,
                "no such path; try /ws, /echo, /health, /ready, /metrics, /cluster, /pools, /dashboard",
                node,
            )
        }
    };
    if let Some(e) = endpoint {
        if !head.is_get_or_head() {
            return refuse(Rejection::MethodNotAllowed, "only GET is allowed here", node);
        }
        let (status, ctype, body) = node.endpoint(e);
        return Decision::Respond { bytes: wire::response(status, ctype, &body, "", head.is_head()), rejected: None };
    }
    let route = if head.path() == "/ws" { Route::Rooms } else { Route::Echo };
    upgrade(&head, route, node)
}

fn upgrade(head: &Head, route: Route, node: &impl Responder) -> Decision {
    let response = match wire::upgrade_response(head) {
        Ok(r) => r,
        Err((why, text)) => return refuse(why, text, node),
    };
    if !node.origin_allowed(head.header("origin")) {
        return refuse(Rejection::OriginNotAllowed, "this Origin may not open WebSockets here", node);
    }
    let client_id = client_id(head);
    if let Some(Err(())) = client_id {
        return refuse(Rejection::BadClientId, "client_id must be 1-64 of [A-Za-z0-9_-]", node);
    }
    if let Some(why) = node.admission() {
        let text =
            if why == Rejection::Draining { "node is draining; reconnect elsewhere" } else { "every shard is full" };
        return refuse(why, text, node);
    }
    let claims = match node.authorize(head) {
        Ok(c) => c,
        Err(e) => return refuse(Rejection::Unauthorized, &format!("{}: {}", e.reason(), e.text()), node),
    };
    // A browser passes its token as a subprotocol: it must see `ringside`
    // selected, or it drops the connection.
    let mut response = response;
    if let Some(p) = super::auth::selected_protocol(head) {
        let at = response.len().saturating_sub(2);
        response.splice(at..at, format!("Sec-WebSocket-Protocol: {p}\r\n").into_bytes());
    }
    // Declining is saying nothing: no header unless an offer is accepted.
    let offers = head.header_joined("sec-websocket-extensions").filter(|_| node.deflate());
    if let Some(agreed) = offers.as_deref().and_then(deflate::negotiate) {
        let at = response.len().saturating_sub(2);
        response.splice(at..at, format!("Sec-WebSocket-Extensions: {}\r\n", agreed.response()).into_bytes());
    }
    let client_id = client_id.map(|c| c.unwrap_or_default());
    Decision::Upgrade { route, client_id, claims, response, consumed: head.consumed }
}

/// The client id from `?client_id=` (first) or `X-Client-Id`.
fn client_id(head: &Head) -> Option<Result<String, ()>> {
    let from_query = head.query().split('&').find_map(|kv| kv.strip_prefix("client_id=")).map(str::to_string);
    let from_header = || head.request.headers().get("x-client-id").map(|v| v.to_str().unwrap_or("").to_string());
    let id = from_query.or_else(from_header)?;
    Some(if valid_client_id(&id) { Ok(id) } else { Err(()) })
}

fn refuse(why: Rejection, text: &str, node: &impl Responder) -> Decision {
    Decision::Respond { bytes: wire::refusal(why, text, node.retry_after()), rejected: Some(why) }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Option<Rejection>);
    impl Responder for Fake {
        fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String) {
            (200, "text/plain", format!("{e:?}"))
        }
        fn admission(&self) -> Option<Rejection> {
            self.0
        }
        fn retry_after(&self) -> u32 {
            7
        }
    }

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn ws_req(path: &str, extra: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n")
    }

    fn status(d: &Decision) -> (u16, String) {
        match d {
            Decision::Respond { bytes, .. } => {
                let s = String::from_utf8_lossy(bytes).to_string();
                (s[9..12].parse().unwrap(), s)
            }
            Decision::Upgrade { response, .. } => (101, String::from_utf8_lossy(response).to_string()),
            Decision::NeedMore => (0, String::new()),
        }
    }

    #[test]
    fn upgrades_with_accept_key_and_client_id() {
        let d = decide(ws_req("/ws?client_id=abc", "").as_bytes(), 8192, &Fake(None));
        let (code, text) = status(&d);
        assert_eq!(code, 101);
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
        match d {
            Decision::Upgrade { route, client_id, .. } => {
                assert_eq!(route, Route::Rooms);
                assert_eq!(client_id.as_deref(), Some("abc"));
            }
            _ => unreachable!(),
        }
        let d = decide(ws_req("/echo", "X-Client-Id: hdr_1\r\n").as_bytes(), 8192, &Fake(None));
        assert!(matches!(d, Decision::Upgrade { route: Route::Echo, client_id: Some(ref c), .. } if c == "hdr_1"));
    }

    #[test]
    fn refusals_map_to_statuses() {
        let f = Fake(None);
        assert_eq!(decide(b"GET /ws HTTP/1.1\r\nHost: x\r\n", 8192, &f), Decision::NeedMore);
        assert_eq!(status(&decide(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 8192, &f)).0, 426);
        let (c, t) = status(&decide(ws_req("/ws", "").replace("Version: 13", "Version: 8").as_bytes(), 8192, &f));
        assert_eq!(c, 426);
        assert!(t.contains("Sec-WebSocket-Version: 13"));
        assert_eq!(status(&decide(ws_req("/ws", "").replace(KEY, "short").as_bytes(), 8192, &f)).0, 400);
        assert_eq!(status(&decide(ws_req("/nope", "").as_bytes(), 8192, &f)).0, 404);
        assert_eq!(status(&decide(b"BLAH\x01 / HTTP/1.1\r\n\r\n", 8192, &f)).0, 400);
        assert_eq!(status(&decide(b"GET /ws HTTP/1.1\r\nX: \x7f\r\n\r\n", 8192, &f)).0, 400);
        assert_eq!(status(&decide(ws_req("/ws?client_id=a%20b", "").as_bytes(), 8192, &f)).0, 400);
        assert_eq!(status(&decide(ws_req("/ws", "").replace("HTTP/1.1", "HTTP/1.0").as_bytes(), 8192, &f)).0, 400);
        assert_eq!(status(&decide(b"POST /metrics HTTP/1.1\r\n\r\n", 8192, &f)).0, 405);
        let big = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(status(&decide(big.as_bytes(), 8192, &f)).0, 431);
        let (c, t) = status(&decide(ws_req("/ws", "").as_bytes(), 8192, &Fake(Some(Rejection::Full))));
        assert_eq!(c, 503);
        assert!(t.contains("Retry-After: 7"));
    }

    struct Locked;
    impl Responder for Locked {
        fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String) {
            (200, "text/plain", format!("{e:?}"))
        }
        fn admission(&self) -> Option<Rejection> {
            None
        }
        fn retry_after(&self) -> u32 {
            3
        }
        fn internal_allowed(&self) -> bool {
            false
        }
        fn origin_allowed(&self, origin: Option<&str>) -> bool {
            origin.is_none_or(|o| o == "https://ok.example")
        }
        fn admit(&self, head: &Head) -> Option<(Rejection, u32)> {
            head.header("x-forwarded-for").filter(|v| *v == "6.6.6.6").map(|_| (Rejection::RateLimited, 9))
        }
    }

    #[test]
    fn internal_endpoints_origins_and_address_limits() {
        assert_eq!(status(&decide(b"GET /metrics HTTP/1.1\r\n\r\n", 8192, &Locked)).0, 404);
        assert_eq!(status(&decide(b"GET /cluster HTTP/1.1\r\n\r\n", 8192, &Locked)).0, 404);
        assert_eq!(status(&decide(b"GET /ready HTTP/1.1\r\n\r\n", 8192, &Locked)).0, 200);
        let d = decide(ws_req("/ws", "Origin: https://evil.example\r\n").as_bytes(), 8192, &Locked);
        assert!(matches!(d, Decision::Respond { rejected: Some(Rejection::OriginNotAllowed), .. }));
        assert_eq!(status(&d).0, 403);
        assert_eq!(status(&decide(ws_req("/ws", "Origin: https://ok.example\r\n").as_bytes(), 8192, &Locked)).0, 101);
        assert_eq!(status(&decide(ws_req("/ws", "").as_bytes(), 8192, &Locked)).0, 101, "no Origin: not a browser");
        let (c, t) = status(&decide(ws_req("/ws", "X-Forwarded-For: 6.6.6.6\r\n").as_bytes(), 8192, &Locked));
        assert_eq!(c, 429);
        assert!(t.contains("Retry-After: 9"), "{t}");
    }

    #[test]
    fn endpoints() {
        let (c, t) = status(&decide(b"GET /health HTTP/1.1\r\n\r\n", 8192, &Fake(None)));
        assert_eq!(c, 200);
        assert!(t.ends_with("Health"));
    }
}

#[cfg(test)]
mod fuzzish {
    //! Random and mutated request heads: `decide` answers every one and never panics.
    use super::*;

    struct Open;
    impl Responder for Open {
        fn endpoint(&self, _: Endpoint) -> (u16, &'static str, String) {
            (200, "text/plain", String::new())
        }
        fn admission(&self) -> Option<Rejection> {
            None
        }
        fn retry_after(&self) -> u32 {
            1
        }
    }

    #[test]
    fn random_and_mutated_heads_never_panic() {
        let seed = b"GET /ws?client_id=a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut input = seed.to_vec();
            for _ in 0..rng.usize(1..6) {
                match rng.u8(0..3) {
                    0 if !input.is_empty() => {
                        let i = rng.usize(..input.len());
                        input[i] = rng.u8(..);
                    }
                    1 if !input.is_empty() => {
                        let i = rng.usize(..input.len());
                        input.truncate(i);
                    }
                    _ => input.insert(rng.usize(..=input.len()), rng.u8(..)),
                }
            }
            let _ = decide(&input, 8192, &Open);
            let noise: Vec<u8> = (0..rng.usize(..300)).map(|_| rng.u8(..)).collect();
            let _ = decide(&noise, 8192, &Open);
        }
    }
}
