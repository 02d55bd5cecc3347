//! The application's own counters (one set per shard, written only by that
//! shard) and the node-level families that only the application knows.

use super::auth::TokenError;
use super::protocol::ClientError;
use crate::prom::{Kind, Text};
use crate::runtime::metrics::Counter;

/// One shard's application counters.
#[derive(Debug, Default)]
pub struct AppMetrics {
    /// `/ws` errors answered, by [`ClientError`].
    pub client_errors: [Counter; ClientError::ALL.len()],
    /// Connections closed 1008 for sustained message-rate abuse.
    pub rate_limit_closed: Counter,
    /// Upgrades refused 401, by token error.
    pub auth_failures: [Counter; TokenError::ALL.len()],
    /// Connections closed 4003: the token expired without a refresh.
    pub tokens_expired: Counter,
    /// Tokens refreshed on a live connection.
    pub tokens_refreshed: Counter,
    /// Upgrades admitted on their token alone because the connect backend
    /// could not answer (`proxy.connect_fallback = "token"`).
    pub connect_fallbacks: Counter,
    /// Joins with `since`: [recovered, not recovered].
    pub recoveries: [Counter; 2],
    /// Bytes of room history kept by this shard (updated at each sweep).
    pub history_bytes: std::sync::atomic::AtomicU64,
    /// Messages of room history kept by this shard (updated at each sweep).
    pub history_messages: std::sync::atomic::AtomicU64,
}

/// Renders the application's families over every shard.
pub fn render(t: &mut Text, shards: &[AppMetrics], node_id: &str, draining: bool) {
    t.family("client_errors_total", Kind::Counter, "Errors answered on /ws, by code; the connection stays open.");
    for e in ClientError::ALL {
        let n: u64 = shards.iter().map(|m| m.client_errors[e.index()].get()).sum();
        t.sample("client_errors_total", &[("code", &e.code())], n);
    }
    let help = "Connections closed 1008 after limits.rate_limit_strikes messages refused in a row.";
    t.family("rate_limit_closed_total", Kind::Counter, help);
    let n: u64 = shards.iter().map(|m| m.rate_limit_closed.get()).sum();
    t.sample("rate_limit_closed_total", &[], n);
    t.family("auth_failures_total", Kind::Counter, "Upgrades refused 401, by the token's problem.");
    for e in TokenError::ALL {
        let n: u64 = shards.iter().map(|m| m.auth_failures[e.index()].get()).sum();
        t.sample("auth_failures_total", &[("reason", &e.reason())], n);
    }
    let n: u64 = shards.iter().map(|m| m.tokens_expired.get()).sum();
    t.single("tokens_expired_total", Kind::Counter, "Connections closed 4003: token expired without a refresh.", n);
    let n: u64 = shards.iter().map(|m| m.tokens_refreshed.get()).sum();
    t.single("tokens_refreshed_total", Kind::Counter, "Tokens refreshed on live connections.", n);
    let n: u64 = shards.iter().map(|m| m.connect_fallbacks.get()).sum();
    let help = "Upgrades admitted on their token alone: the connect backend could not answer.";
    t.single("connect_fallbacks_total", Kind::Counter, help, n);
    t.family(
        "room_recoveries_total",
        Kind::Counter,
        "Joins with since: every missed message delivered (recovered) or not.",
    );
    for (i, outcome) in ["recovered", "unrecovered"].into_iter().enumerate() {
        let n: u64 = shards.iter().map(|m| m.recoveries[i].get()).sum();
        t.sample("room_recoveries_total", &[("outcome", &outcome)], n);
    }
    let g = |f: fn(&AppMetrics) -> &std::sync::atomic::AtomicU64| -> u64 {
        shards.iter().map(|m| f(m).load(std::sync::atomic::Ordering::Relaxed)).sum()
    };
    t.single(
        "room_history_bytes",
        Kind::Gauge,
        "Bytes of room history kept (as of the last sweep).",
        g(|m| &m.history_bytes),
    );
    t.single(
        "room_history_messages",
        Kind::Gauge,
        "Messages of room history kept (as of the last sweep).",
        g(|m| &m.history_messages),
    );
    t.single("draining", Kind::Gauge, "1 while the node drains for shutdown.", draining as u8);
    t.family("node_info", Kind::Gauge, "Node identity and version.");
    t.sample("node_info", &[("node", &node_id), ("version", &env!("CARGO_PKG_VERSION"))], 1);
}
