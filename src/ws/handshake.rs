//! The HTTP side of a connection: parse the request head, route it, and
//! either answer (health, metrics, refusals) or accept the WebSocket upgrade.
//!
//! The upgrade itself is checked by tungstenite (`create_response`): method,
//! version, `Connection`, `Upgrade`, `Sec-WebSocket-Version` and the key.
//! Each of its refusals maps to one status and one metrics reason.

use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::server::{create_response, write_response};

use crate::error::Rejection;
use crate::shard::table::Route;

/// Most headers a request may carry.
const MAX_HEADERS: usize = 64;

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
        /// The `101 Switching Protocols` response.
        response: Vec<u8>,
        /// Bytes of the head; anything after belongs to the WebSocket.
        consumed: usize,
    },
}

/// Plain HTTP endpoints served on the WebSocket port.
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
}

/// Answers for plain endpoints and for the node's state at upgrade time.
pub trait Responder {
    /// Body and status for a plain endpoint.
    fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String);
    /// `Some(reason)` when the upgrade must be refused now (full, draining).
    fn admission(&self) -> Option<Rejection>;
    /// `Retry-After` seconds for 503s.
    fn retry_after(&self) -> u32;
}

/// Looks at `head` (everything read so far) and decides.
pub fn decide(head: &[u8], max_request: usize, node: &impl Responder) -> Decision {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if head.len() > max_request => {
            return refuse(Rejection::HeaderTooLarge, "request head too large", node)
        }
        Ok(httparse::Status::Partial) => return Decision::NeedMore,
        Err(e) => return refuse(Rejection::Malformed, &format!("malformed request: {e}"), node),
    };
    if consumed > max_request {
        return refuse(Rejection::HeaderTooLarge, "request head too large", node);
    }
    let path = req.path.unwrap_or("/");
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let endpoint = match path {
        "/ws" => None,
        "/echo" => None,
        "/health" => Some(Endpoint::Health),
        "/ready" => Some(Endpoint::Ready),
        "/metrics" => Some(Endpoint::Metrics),
        "/cluster" => Some(Endpoint::Cluster),
        _ => {
            return refuse(
                Rejection::NotFound,
                "no such path; try /ws, /echo, /health, /ready, /metrics, /cluster",
                node,
            )
        }
    };
    if let Some(e) = endpoint {
        if req.method != Some("GET") && req.method != Some("HEAD") {
            return refuse(Rejection::MethodNotAllowed, "only GET is allowed here", node);
        }
        let (status, ctype, body) = node.endpoint(e);
        let head_only = req.method == Some("HEAD");
        return Decision::Respond { bytes: response(status, ctype, &body, "", head_only), rejected: None };
    }
    let route = if path == "/ws" { Route::Rooms } else { Route::Echo };
    upgrade(&req, route, query, consumed, node)
}

fn upgrade(req: &httparse::Request, route: Route, query: &str, consumed: usize, node: &impl Responder) -> Decision {
    let request = match to_http(req) {
        Ok(r) => r,
        Err(why) => return refuse(Rejection::Malformed, why, node),
    };
    let resp = match create_response(&request) {
        Ok(r) => r,
        Err(e) => return refuse_ws(e, &request, node),
    };
    let client_id = client_id(query, &request);
    if let Some(Err(())) = client_id {
        return refuse(Rejection::BadClientId, "client_id must be 1-64 of [A-Za-z0-9_-]", node);
    }
    if let Some(why) = node.admission() {
        let text =
            if why == Rejection::Draining { "node is draining; reconnect elsewhere" } else { "every shard is full" };
        return refuse(why, text, node);
    }
    let mut bytes = Vec::with_capacity(160);
    if write_response(&mut bytes, &resp).is_err() {
        return refuse(Rejection::Malformed, "unrepresentable request", node);
    }
    Decision::Upgrade { route, client_id: client_id.map(|c| c.unwrap_or_default()), response: bytes, consumed }
}

/// The client id from `?client_id=` (first) or `X-Client-Id`.
fn client_id(query: &str, request: &http::Request<()>) -> Option<Result<String, ()>> {
    let from_query = query.split('&').find_map(|kv| kv.strip_prefix("client_id=")).map(str::to_string);
    let from_header = || request.headers().get("x-client-id").map(|v| v.to_str().unwrap_or("").to_string());
    let id = from_query.or_else(from_header)?;
    Some(if crate::config::valid_id(&id) { Ok(id) } else { Err(()) })
}

fn to_http(req: &httparse::Request) -> Result<http::Request<()>, &'static str> {
    let mut b = http::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(req.path.unwrap_or("/"))
        .version(if req.version == Some(1) { http::Version::HTTP_11 } else { http::Version::HTTP_10 });
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    b.body(()).map_err(|_| "malformed request: bad method, path or header")
}

/// Maps tungstenite's refusal of an upgrade to a status.
fn refuse_ws(e: WsError, request: &http::Request<()>, node: &impl Responder) -> Decision {
    let (why, text) = match e {
        WsError::Protocol(ProtocolError::WrongHttpMethod) => {
            (Rejection::MethodNotAllowed, "WebSocket upgrade needs GET")
        }
        WsError::Protocol(ProtocolError::WrongHttpVersion) => {
            (Rejection::BadVersion, "WebSocket upgrade needs HTTP/1.1")
        }
        WsError::Protocol(ProtocolError::MissingConnectionUpgradeHeader)
        | WsError::Protocol(ProtocolError::MissingUpgradeWebSocketHeader) => {
            (Rejection::UpgradeRequired, "this path speaks WebSocket: send Connection: Upgrade and Upgrade: websocket")
        }
        WsError::Protocol(ProtocolError::MissingSecWebSocketVersionHeader) => {
            let text = if request.headers().contains_key("sec-websocket-version") {
                "unsupported Sec-WebSocket-Version; this server speaks 13"
            } else {
                "missing Sec-WebSocket-Version; this server speaks 13"
            };
            (Rejection::WsVersion, text)
        }
        WsError::Protocol(ProtocolError::MissingSecWebSocketKey) => (Rejection::BadKey, "missing Sec-WebSocket-Key"),
        WsError::Protocol(ProtocolError::InvalidSecWebSocketKey) => {
            (Rejection::BadKey, "Sec-WebSocket-Key must be 16 bytes, base64")
        }
        _ => (Rejection::Malformed, "malformed upgrade request"),
    };
    refuse(why, text, node)
}

fn refuse(why: Rejection, text: &str, node: &impl Responder) -> Decision {
    let extra = match why {
        Rejection::UpgradeRequired => "Upgrade: websocket\r\n".to_string(),
        Rejection::WsVersion => "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n".to_string(),
        Rejection::MethodNotAllowed => "Allow: GET, HEAD\r\n".to_string(),
        Rejection::Full | Rejection::Draining => format!("Retry-After: {}\r\n", node.retry_after()),
        _ => String::new(),
    };
    let body = format!("{}: {text}\n", why.label());
    Decision::Respond {
        bytes: response(why.status(), "text/plain; charset=utf-8", &body, &extra, false),
        rejected: Some(why),
    }
}

/// A complete `Connection: close` HTTP/1.1 response.
pub fn response(status: u16, ctype: &str, body: &str, extra_headers: &str, head_only: bool) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
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
