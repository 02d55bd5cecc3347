//! ringside: an io_uring, thread-per-core WebSocket edge node.
//!
//! The module tree is the architecture (docs/design.md explains it):
//! [`node`] starts [`shard`]s; each shard owns a slab [`shard::table`], a
//! [`rooms`] index and a [`shard::mailbox`]; [`ws`] speaks HTTP and
//! RFC 6455 over monoio; [`protocol`] is the JSON rooms protocol; [`http`]
//! serves health, readiness and [`metrics`]; [`cluster`] talks to Redis on
//! its own thread; [`config`] holds every knob and [`error`] every error and
//! close code.

pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod rooms;
pub mod shard;
pub mod ws;

pub use config::Config;
pub use node::Node;
