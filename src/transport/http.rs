//! The HTTP side of a connection at the wire level: parse a request head,
//! check a WebSocket upgrade, and build responses and refusals. Which paths
//! exist and what they answer is the application's business
//! (`app::http`); this module only knows HTTP.
//!
//! The upgrade itself is checked by tungstenite (`create_response`): method,
//! version, `Connection`, `Upgrade`, `Sec-WebSocket-Version` and the key.
//! Each of its refusals maps to one status and one metrics reason.

use tungstenite::error::{Error as WsError, ProtocolError};
use tungstenite::handshake::server::{create_response, write_response};

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Why an HTTP request or upgrade was refused. Each maps to one status code
/// and one `ringside_connections_rejected_total{reason,status}` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Unparseable request line or headers (400).
    Malformed,
    /// Request head over `server.max_request_bytes` (431).
    HeaderTooLarge,
    /// Unknown path (404).
    NotFound,
    /// Method other than GET (405).
    MethodNotAllowed,
    /// HTTP/1.0 or older (400).
    BadVersion,
    /// A WebSocket path without `Upgrade: websocket` (426).
    UpgradeRequired,
    /// Missing or unsupported `Sec-WebSocket-Version` (426, with `13`).
    WsVersion,
    /// Missing or malformed `Sec-WebSocket-Key` (400).
    BadKey,
    /// `client_id` not 1-64 of `[A-Za-z0-9_-]` (400).
    BadClientId,
    /// Every shard is full (503 + Retry-After).
    Full,
    /// The node is draining (503 + Retry-After).
    Draining,
    /// The upgrade did not complete within `server.handshake_timeout_ms` (socket dropped).
    HandshakeTimeout,
    /// The client address holds `limits.max_connections_per_ip` connections (429).
    TooManyConnections,
    /// The client address opens connections faster than
    /// `limits.connection_rate_per_ip` (429 + Retry-After).
    RateLimited,
    /// The shard's or the address's share of handshake slots is taken
    /// (`limits.max_handshakes_*`): the socket is closed without an answer.
    HandshakeLimit,
    /// A browser `Origin` not in `server.allowed_origins` (403).
    OriginNotAllowed,
    /// A malformed PROXY protocol header from a trusted proxy (400).
    BadProxyHeader,
    /// No valid token (`auth.mode = "token"`): 401 with
    /// `WWW-Authenticate: Bearer error="invalid_token"`.
    Unauthorized,
    /// The application's connect backend refused the client (403).
    ConnectDenied,
    /// The application's connect backend could not be asked in time (503 + Retry-After).
    BackendUnavailable,
}

impl Rejection {
    /// Every variant, for metrics.
    pub const ALL: [Rejection; 20] = [
        Rejection::Malformed,
        Rejection::HeaderTooLarge,
        Rejection::NotFound,
        Rejection::MethodNotAllowed,
        Rejection::BadVersion,
        Rejection::UpgradeRequired,
        Rejection::WsVersion,
        Rejection::BadKey,
        Rejection::BadClientId,
        Rejection::Full,
        Rejection::Draining,
        Rejection::HandshakeTimeout,
        Rejection::TooManyConnections,
        Rejection::RateLimited,
        Rejection::HandshakeLimit,
        Rejection::OriginNotAllowed,
        Rejection::BadProxyHeader,
        Rejection::Unauthorized,
        Rejection::ConnectDenied,
        Rejection::BackendUnavailable,
    ];

    /// HTTP status sent.
    pub fn status(self) -> u16 {
        match self {
            Rejection::Malformed
            | Rejection::BadVersion
            | Rejection::BadKey
            | Rejection::BadClientId
            | Rejection::BadProxyHeader => 400,
            Rejection::TooManyConnections | Rejection::RateLimited => 429,
            Rejection::OriginNotAllowed | Rejection::ConnectDenied => 403,
            Rejection::Unauthorized => 401,
            // Never answered (the socket is closed); 503 is the label.
            Rejection::HandshakeLimit => 503,
            Rejection::HeaderTooLarge => 431,
            Rejection::NotFound => 404,
            Rejection::MethodNotAllowed => 405,
            Rejection::UpgradeRequired | Rejection::WsVersion => 426,
            Rejection::Full | Rejection::Draining | Rejection::BackendUnavailable => 503,
            Rejection::HandshakeTimeout => 408,
        }
    }

    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::HeaderTooLarge => "header_too_large",
            Rejection::NotFound => "not_found",
            Rejection::MethodNotAllowed => "method_not_allowed",
            Rejection::BadVersion => "bad_http_version",
            Rejection::UpgradeRequired => "upgrade_required",
            Rejection::WsVersion => "bad_websocket_version",
            Rejection::BadKey => "bad_websocket_key",
            Rejection::BadClientId => "bad_client_id",
            Rejection::Full => "full",
            Rejection::Draining => "draining",
            Rejection::HandshakeTimeout => "handshake_timeout",
            Rejection::TooManyConnections => "too_many_connections_per_ip",
            Rejection::RateLimited => "connection_rate_per_ip",
            Rejection::HandshakeLimit => "handshake_limit",
            Rejection::OriginNotAllowed => "origin_not_allowed",
            Rejection::BadProxyHeader => "bad_proxy_header",
            Rejection::Unauthorized => "unauthorized",
            Rejection::ConnectDenied => "connect_denied",
            Rejection::BackendUnavailable => "backend_unavailable",
        }
    }

    /// Index into per-reason counters.
    pub fn index(self) -> usize {
        Rejection::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A complete request head.
#[derive(Debug)]
pub struct Head {
    /// The request as the `http` crate sees it (what tungstenite checks).
    pub request: http::Request<()>,
    /// Bytes of the head; anything after belongs to the next protocol.
    pub consumed: usize,
}

impl Head {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.request.uri().path()
    }

    /// The query string (empty if none).
    pub fn query(&self) -> &str {
        self.request.uri().query().unwrap_or("")
    }

    /// `HEAD` (answer without a body).
    pub fn is_head(&self) -> bool {
        self.request.method() == http::Method::HEAD
    }

    /// `GET` or `HEAD`.
    pub fn is_get_or_head(&self) -> bool {
        self.request.method() == http::Method::GET || self.is_head()
    }

    /// A header's value, if present and visible ASCII (the first, if repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.headers().get(name).and_then(|v| v.to_str().ok())
    }

    /// Every line of a header, in order, joined with `,` (RFC 9110 §5.3:
    /// repeated lines are one comma-separated list); `None` if absent or if
    /// a line is not visible ASCII.
    pub fn header_joined(&self, name: &str) -> Option<String> {
        let mut lines = self.request.headers().get_all(name).iter().peekable();
        lines.peek()?;
        let parts: Option<Vec<&str>> = lines.map(|v| v.to_str().ok()).collect();
        Some(parts?.join(","))
    }
}

/// What the bytes read so far amount to.
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet.
    NeedMore,
    /// A complete head.
    Complete(Box<Head>),
    /// Not a request we can serve: refuse with this reason and text.
    Refuse(Rejection, String),
}

/// Parses `buf` (everything read so far) as a request head of at most `max` bytes.
pub fn parse(buf: &[u8], max: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max => {
            return Parsed::Refuse(Rejection::HeaderTooLarge, "request head too large".into())
        }
        Ok(httparse::Status::Partial) => return Parsed::NeedMore,
        Err(e) => return Parsed::Refuse(Rejection::Malformed, format!("malformed request: {e}")),
    };
    if consumed > max {
        return Parsed::Refuse(Rejection::HeaderTooLarge, "request head too large".into());
    }
    match to_http(&req) {
        Ok(request) => Parsed::Complete(Box::new(Head { request, consumed })),
        Err(why) => Parsed::Refuse(Rejection::Malformed, why.into()),
    }
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

/// The `101 Switching Protocols` response for a valid upgrade request, or
/// the refusal tungstenite's check maps to.
pub fn upgrade_response(head: &Head) -> Result<Vec<u8>, (Rejection, &'static str)> {
    let resp = create_response(&head.request).map_err(|e| upgrade_refusal(e, &head.request))?;
    let mut bytes = Vec::with_capacity(160);
    write_response(&mut bytes, &resp).map_err(|_| (Rejection::Malformed, "unrepresentable request"))?;
    Ok(bytes)
}

/// Maps tungstenite's refusal of an upgrade to a reason and a text.
fn upgrade_refusal(e: WsError, request: &http::Request<()>) -> (Rejection, &'static str) {
    match e {
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
    }
}

/// A refusal: the reason's status, the headers it calls for, and a
/// one-line `reason: text` body. `retry_after` is used for 503s.
pub fn refusal(why: Rejection, text: &str, retry_after: u32) -> Vec<u8> {
    let extra = match why {
        Rejection::UpgradeRequired => "Upgrade: websocket\r\n".to_string(),
        Rejection::WsVersion => "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n".to_string(),
        Rejection::MethodNotAllowed => "Allow: GET, HEAD\r\n".to_string(),
        Rejection::Unauthorized => {
            let why = text.split(':').next().unwrap_or("invalid");
            format!("WWW-Authenticate: Bearer error=\"invalid_token\", error_description=\"{why}\"\r\n")
        }
        Rejection::Full
        | Rejection::Draining
        | Rejection::RateLimited
        | Rejection::TooManyConnections
        | Rejection::BackendUnavailable => {
            format!("Retry-After: {retry_after}\r\n")
        }
        _ => String::new(),
    };
    let body = format!("{}: {text}\n", why.label());
    response(why.status(), "text/plain; charset=utf-8", &body, &extra, false)
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

    #[test]
    fn parses_incomplete_complete_and_malformed() {
        assert!(matches!(parse(b"GET /ws HTTP/1.1\r\nHost: x\r\n", 8192), Parsed::NeedMore));
        match parse(b"GET /ws?a=b HTTP/1.1\r\nHost: x\r\n\r\nrest", 8192) {
            Parsed::Complete(h) => {
                assert_eq!((h.path(), h.query(), h.consumed), ("/ws", "a=b", 33));
                assert_eq!(h.header("host"), Some("x"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(b"BLAH\x01 / HTTP/1.1\r\n\r\n", 8192), Parsed::Refuse(Rejection::Malformed, _)));
        let big = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert!(matches!(parse(big.as_bytes(), 8192), Parsed::Refuse(Rejection::HeaderTooLarge, _)));
    }

    #[test]
    fn refusals_carry_their_headers() {
        let r = String::from_utf8(refusal(Rejection::Full, "every shard is full", 7)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && r.contains("Retry-After: 7\r\n"), "{r}");
        let r = String::from_utf8(refusal(Rejection::WsVersion, "x", 1)).unwrap();
        assert!(r.starts_with("HTTP/1.1 426") && r.contains("Sec-WebSocket-Version: 13"), "{r}");
    }
}
