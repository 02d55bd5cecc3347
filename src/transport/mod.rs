//! Transport: how bytes move on a socket, and what they mean at the wire
//! level. Nothing here knows about shards, rooms or Redis.
//!
//! - [`socket`]: the socket a connection's reader and writer share, on
//!   either socket path: *poll* (readiness, one non-blocking `recv(2)`,
//!   monoio `send`s) or *direct* (a direct descriptor, multishot receive).
//! - [`uring`]: the shard's own io_uring ring behind the direct path
//!   (direct accepts, multishot receives, fixed-file sends), driven from
//!   the monoio runtime; [`bufring`]: its provided-buffer ring.
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
pub mod bufring;
pub mod close;
pub mod deflate;
pub mod frame;
pub mod http;
pub mod proxy;
pub mod socket;
pub mod uring;
