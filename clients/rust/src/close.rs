//! Close codes the server sends (docs/protocol.md, "Close codes the server sends") and
//! what the client does about each: the one table every reconnect decision goes through.

use std::time::Duration;

/// Normal closure (the server's echo of a client-initiated close).
pub const NORMAL: u16 = 1000;
/// Going away: node shutdown or drain. Reconnect (any node) with backoff.
pub const GOING_AWAY: u16 = 1001;
/// Protocol error: the client broke RFC 6455. Stop.
pub const PROTOCOL_ERROR: u16 = 1002;
/// No close frame at all (reset, EOF, kill -9): never on the wire. Reconnect with backoff.
pub const ABNORMAL: u16 = 1006;
/// Invalid UTF-8. Stop.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation (slow consumer, message timeout, rate limit). Stop: the application
/// decides (it may have to resync, or is misbehaving).
pub const POLICY: u16 = 1008;
/// Message too big. Stop.
pub const TOO_BIG: u16 = 1009;
/// Internal error on the node. Reconnect with backoff.
pub const INTERNAL: u16 = 1011;
/// Try again later. Reconnect with backoff.
pub const TRY_AGAIN: u16 = 1013;
/// Replaced by a newer session with the same client id. Stop (or two sessions evict each other forever).
pub const REPLACED: u16 = 4000;
/// Idle timeout. Reconnect.
pub const IDLE_TIMEOUT: u16 = 4001;
/// Token expired. Get a new token, then reconnect with it.
pub const TOKEN_EXPIRED: u16 = 4003;
/// Preempted by a higher class. Wait the `preempted` message's delay, then reconnect.
pub const PREEMPTED: u16 = 4004;

/// What to do after a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Reconnect after the backoff delay.
    Reconnect,
    /// Reconnect after this delay (4004's `reconnect_delay_ms`, or a hint's `after_ms`)
    /// instead of the backoff delay.
    ReconnectAfter(Duration),
    /// Get a new token from the token callback, then reconnect (stop if there is none).
    RefreshThenReconnect,
    /// Do not reconnect.
    Stop,
}

/// The decision for a close `code` (`None`: the connection ended without a close frame).
/// `preempt_delay` is the delay of a `preempted` message received just before.
pub fn action_for(code: Option<u16>, preempt_delay: Option<Duration>) -> Action {
    match code {
        None | Some(GOING_AWAY) | Some(ABNORMAL) | Some(INTERNAL) | Some(TRY_AGAIN) | Some(IDLE_TIMEOUT) => {
            Action::Reconnect
        }
        Some(PREEMPTED) => Action::ReconnectAfter(preempt_delay.unwrap_or(Duration::from_secs(5))),
        Some(TOKEN_EXPIRED) => Action::RefreshThenReconnect,
        Some(NORMAL) | Some(PROTOCOL_ERROR) | Some(INVALID_PAYLOAD) | Some(POLICY) | Some(TOO_BIG) | Some(REPLACED) => {
            Action::Stop
        }
        // Codes this client does not know: assume a transient server condition.
        Some(_) => Action::Reconnect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_table() {
        for code in [None, Some(1001), Some(1006), Some(4001), Some(1011), Some(1013)] {
            assert_eq!(action_for(code, None), Action::Reconnect, "{code:?}");
        }
        assert_eq!(
            action_for(Some(4004), Some(Duration::from_millis(70))),
            Action::ReconnectAfter(Duration::from_millis(70))
        );
        assert_eq!(action_for(Some(4003), None), Action::RefreshThenReconnect);
        for code in [4000, 1008, 1002, 1007, 1009] {
            assert_eq!(action_for(Some(code), None), Action::Stop, "{code}");
        }
    }
}
