//! `ringside-client`: the reference Rust client for ringside's `/ws` protocol
//! (docs/protocol.md).
//!
//! * [`Client`]: one logical connection that connects with a token or anonymously, speaks
//!   every `/ws` message through a typed API, reconnects with exponential backoff and full
//!   jitter, decides by close code whether to reconnect, refresh or stop
//!   ([`close::action_for`]), follows the server's `reconnect` hints, re-joins its rooms
//!   with their last offsets (nothing kept in history is lost or duplicated), and
//!   refreshes its token ahead of `exp`.
//! * [`Pool`]: clients across endpoints with a per-host cap, a waiting `acquire` with a
//!   timeout, and stats.
//!
//! ```no_run
//! # async fn demo() -> ringside_client::Result<()> {
//! use ringside_client::{Client, ClientConfig, Event};
//! let (client, mut events) = Client::start(ClientConfig::new("ws://127.0.0.1:8080/ws"))?;
//! client.wait_connected(std::time::Duration::from_secs(5)).await?;
//! client.join("lobby").await?;
//! client.publish("lobby", serde_json::json!({"text": "hi"})).await?;
//! while let Some(ev) = events.recv().await {
//!     if let Event::Message(m) = ev { println!("{m:?}"); }
//! }
//! # Ok(()) }
//! ```

pub mod backoff;
mod client;
pub mod close;
mod driver;
pub mod error;
pub mod pool;
pub mod protocol;
pub mod token;

pub use backoff::Backoff;
pub use client::{Cause, Client, ClientConfig, ConnState, Event, Events, Joined, Stats};
pub use error::{Error, Result, StopReason};
pub use pool::{Pool, PoolConfig, PoolStats, PooledClient};
pub use protocol::{ClientMsg, ErrorCode, ServerMsg, Since};
pub use token::Auth;
