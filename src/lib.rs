//! ringside: an io_uring, thread-per-core WebSocket edge node.
//!
//! The module tree is the architecture (docs/design.md explains it). Layers,
//! each importing only from those listed before it (`scripts/check-layers`
//! enforces this):
//!
//! 1. base: [`config`] (every knob) and [`prom`] (the metrics text format);
//! 2. [`transport`]: sockets, the HTTP head, WebSocket framing;
//! 3. [`runtime`]: shards, the slab table, mailboxes, timers, backpressure,
//!    the close path; it serves an application through a trait;
//! 4. [`broker`]: what crosses nodes (in memory, or Redis), and beside it
//!    [`upstream`]: outbound HTTP pools to the application's backends;
//! 5. [`app`]: the `/ws` protocol, `/echo` and the HTTP endpoints;
//! 6. [`node`]: wires them together, starts and drains.

pub mod app;
pub mod broker;
pub mod config;
pub mod node;
pub mod prom;
pub mod runtime;
pub mod transport;
pub mod upstream;

pub use config::Config;
pub use node::Node;
