//! Transport: how bytes move on a socket, and what they mean at the wire
//! level. Nothing here knows about shards, rooms or Redis.
//!
//! - [`socket`]: the socket a connection's reader and writer share:
//!   readiness, one non-blocking `recv(2)`, owned-buffer `send`s through the
//!   ring, `shutdown(2)`. A later socket path (multishot receive, direct
//!   descriptors) replaces this module and nothing above it.
//! - [`http`]: the HTTP request head, refusals with their statuses, the
//!   upgrade check and the `101` response.
//! - [`frame`]: server-side frame builders and the in-memory stream that
//!   tungstenite reads from and writes to.
//! - [`boundary`]: where the inbound byte stream stands relative to frames.
//! - [`close`]: every close code the node sends, with its meaning.
//! - [`deflate`]: permessage-deflate (RFC 7692): negotiation, inflating
//!   compressed messages for tungstenite, compressing outgoing ones.
//! - [`proxy`]: the PROXY protocol (v1, v2) and `X-Forwarded-For`, for the
//!   real client address behind a trusted balancer.

pub mod boundary;
pub mod close;
pub mod deflate;
pub mod frame;
pub mod http;
pub mod proxy;
pub mod socket;
