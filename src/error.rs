//! Typed errors and the close codes the node sends, each with its meaning.
//!
//! Who caused a failure decides where it is counted: client errors
//! (`Rejection`, `ClientError`) are answered and counted by reason; they never
//! end anything but the offending request or message.

use std::fmt;

/// Close codes the node sends. Standard codes (RFC 6455 §7.4.1) plus the
/// application range 4000-4999, documented in docs/protocol.md.
pub mod close {
    /// Normal closure: the client asked to close.
    pub const NORMAL: u16 = 1000;
    /// Going away: the node is shutting down. Reconnect (to any node).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error: the client broke RFC 6455 (unmasked frame, bad opcode,
    /// fragmented control frame, ...). Do not retry the same bytes.
    pub const PROTOCOL: u16 = 1002;
    /// Invalid UTF-8 in a text message.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation: the client reads too slowly; its send queue overflowed.
    /// Reconnect, and expect to have missed messages.
    pub const POLICY: u16 = 1008;
    /// Message or frame larger than `websocket.max_message_bytes` / `max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error on the node.
    pub const INTERNAL: u16 = 1011;
    /// Another connection with the same client id replaced this one.
    /// Do not reconnect automatically (the newer connection is the live one).
    pub const REPLACED: u16 = 4000;
    /// No data (nor pong) from the client within `websocket.idle_timeout_ms`.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// Every code above, for metrics labels (plus `none` and `other` there).
    pub const ALL: [u16; 9] =
        [NORMAL, GOING_AWAY, PROTOCOL, INVALID_PAYLOAD, POLICY, TOO_BIG, INTERNAL, REPLACED, IDLE_TIMEOUT];
}

/// A configuration value that cannot work, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `section.key`, env var or file name.
    pub key: String,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    /// A refusal of `key` for `reason`.
    pub fn new(key: &str, reason: impl Into<String>) -> Self {
        Self { key: key.to_string(), reason: reason.into() }
    }

    /// A failure that is ringside's fault, not the operator's.
    pub fn internal(e: impl fmt::Display) -> Self {
        Self::new("internal", e.to_string())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

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
}

impl Rejection {
    /// Every variant, for metrics.
    pub const ALL: [Rejection; 12] = [
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
    ];

    /// HTTP status sent.
    pub fn status(self) -> u16 {
        match self {
            Rejection::Malformed | Rejection::BadVersion | Rejection::BadKey | Rejection::BadClientId => 400,
            Rejection::HeaderTooLarge => 431,
            Rejection::NotFound => 404,
            Rejection::MethodNotAllowed => 405,
            Rejection::UpgradeRequired | Rejection::WsVersion => 426,
            Rejection::Full | Rejection::Draining => 503,
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
        }
    }

    /// Index into per-reason counters.
    pub fn index(self) -> usize {
        Rejection::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// An error answered on `/ws` with `{"type":"error",...}`; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// Not a JSON object, or a field of the wrong type.
    BadJson,
    /// `type` missing or not one the server knows.
    UnknownType,
    /// A required field is missing.
    MissingField,
    /// Room name not 1-128 of `[A-Za-z0-9_.:-]`.
    BadRoom,
    /// Target client id malformed.
    BadClientId,
    /// `direct` to a client connected nowhere.
    UnknownClient,
    /// `data` larger than `rooms.max_payload_bytes`.
    TooLarge,
    /// Joining more than `rooms.max_rooms_per_connection` rooms.
    TooManyRooms,
    /// A binary frame on `/ws` (the rooms protocol is JSON text).
    BinaryNotSupported,
    /// The message could not be delivered across shards (mailbox full).
    Overloaded,
}

impl ClientError {
    /// Every variant, for metrics.
    pub const ALL: [ClientError; 10] = [
        ClientError::BadJson,
        ClientError::UnknownType,
        ClientError::MissingField,
        ClientError::BadRoom,
        ClientError::BadClientId,
        ClientError::UnknownClient,
        ClientError::TooLarge,
        ClientError::TooManyRooms,
        ClientError::BinaryNotSupported,
        ClientError::Overloaded,
    ];

    /// The stable `code` string.
    pub fn code(self) -> &'static str {
        match self {
            ClientError::BadJson => "bad_json",
            ClientError::UnknownType => "unknown_type",
            ClientError::MissingField => "missing_field",
            ClientError::BadRoom => "bad_room",
            ClientError::BadClientId => "bad_client_id",
            ClientError::UnknownClient => "unknown_client",
            ClientError::TooLarge => "too_large",
            ClientError::TooManyRooms => "too_many_rooms",
            ClientError::BinaryNotSupported => "binary_not_supported",
            ClientError::Overloaded => "overloaded",
        }
    }

    /// Index into per-code counters.
    pub fn index(self) -> usize {
        ClientError::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What happened to a message offered to a connection's send queue.
/// Backpressure is a return value, never a silent drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued; it will be written in order.
    Queued,
    /// The queue was full and the policy is `drop`: this message is lost for
    /// this connection (counted).
    Dropped,
    /// The queue was full and the policy is `close`: the connection is being
    /// closed with 1008. Also returned for a connection that is already closing.
    Closed,
    /// No such connection (closed, or a stale id).
    Gone,
}
