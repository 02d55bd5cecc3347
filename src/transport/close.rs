//! Close codes the node sends, each with its documented meaning: standard
//! codes (RFC 6455 §7.4.1) plus the application range 4000-4999. Which
//! ones mean "reconnect" and which mean "stop" is in docs/protocol.md.

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
/// Try again later: the server is overloaded (a shard's budget for
/// unfinished messages is spent). Reconnect after a delay.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Another connection with the same client id replaced this one.
/// Do not reconnect automatically (the newer connection is the live one).
pub const REPLACED: u16 = 4000;
/// No data (nor pong) from the client within `websocket.idle_timeout_ms`.
pub const IDLE_TIMEOUT: u16 = 4001;
/// The connection's token expired without a refresh: refresh the token,
/// then reconnect.
pub const TOKEN_EXPIRED: u16 = 4003;
/// Preempted by a connection of a higher priority class: reconnect after
/// the delay the `preempted` message gave, possibly elsewhere.
pub const PREEMPTED: u16 = 4004;
/// Every code above, for metrics labels (plus `none` and `other` there).
pub const ALL: [u16; 12] = [
    NORMAL,
    GOING_AWAY,
    PROTOCOL,
    INVALID_PAYLOAD,
    POLICY,
    TOO_BIG,
    INTERNAL,
    TRY_AGAIN_LATER,
    REPLACED,
    IDLE_TIMEOUT,
    TOKEN_EXPIRED,
    PREEMPTED,
];
