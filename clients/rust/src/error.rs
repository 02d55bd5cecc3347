//! Typed errors of the client, by cause; [`Error::ends_client`] says which ones stop the
//! client for good (no further reconnect).

use crate::protocol::ErrorCode;

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The server refused a message (`{"type":"error"}`); the connection stays open.
    Server {
        /// Stable code.
        code: ErrorCode,
        /// The server's text.
        message: String,
        /// For a failed `rpc`: the backend's own `code`/`reason`, when it gave them.
        backend: Option<serde_json::Value>,
    },
    /// Not connected right now (reconnecting); try again after [`crate::Event::Connected`].
    NotConnected,
    /// The connection ended while a request waited for its answer.
    Disconnected,
    /// The client stopped (see [`StopReason`]); every later call fails with this.
    Stopped(StopReason),
    /// No answer within the request timeout.
    Timeout,
    /// Too many requests already wait for their answers on this connection; retry later.
    Busy,
    /// The pool had no connection free within its acquire timeout.
    PoolTimeout,
    /// The pool was closed.
    PoolClosed,
    /// A URL or setting that cannot work.
    Config(String),
}

/// Why a client stopped reconnecting.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// [`crate::Client::close`] was called (or every handle was dropped).
    Closed,
    /// Close 4000: a newer session with this client id is live.
    Replaced,
    /// A close code that means "do not reconnect" (1002, 1007, 1008, 1009, or the server's 1000).
    CloseCode {
        /// The code.
        code: u16,
        /// The server's reason text.
        reason: String,
    },
    /// `401` on the upgrade (and the token callback had no other token).
    Unauthorized(String),
    /// Close 4003 or a 401 and the token callback returned no new token.
    NoToken,
    /// `max_attempts` failed connects in a row.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
}

impl Error {
    /// Whether the client is stopped for good.
    pub fn ends_client(&self) -> bool {
        matches!(self, Error::Stopped(_))
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Server { code, message, .. } => write!(f, "server error {code}: {message}"),
            Error::NotConnected => f.write_str("not connected"),
            Error::Disconnected => f.write_str("disconnected before the answer came"),
            Error::Stopped(r) => write!(f, "client stopped: {r:?}"),
            Error::Timeout => f.write_str("no answer in time"),
            Error::Busy => f.write_str("too many requests waiting for answers"),
            Error::PoolTimeout => f.write_str("no pooled connection free in time"),
            Error::PoolClosed => f.write_str("pool closed"),
            Error::Config(s) => write!(f, "bad configuration: {s}"),
        }
    }
}

impl std::error::Error for Error {}
