//! The plain HTTP endpoints served on the client port: `/health`, `/ready`,
//! `/metrics` and `/cluster`, and the node's state at upgrade time, as one
//! connection sees them.

use std::sync::atomic::Ordering;

use super::auth::{self, Claims, TokenError};
use super::http::{Endpoint, Responder};
use super::{Edge, EdgeShared};
use crate::prom::Text;
use crate::runtime::table::ConnId;
use crate::runtime::{Conns, NodeState};
use crate::transport::http::{Head, Rejection};
use crate::transport::proxy;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const HTML: &str = "text/html; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The node as connection `id` sees it: a socket kept past capacity
/// (overflow) is refused as full, whatever the shard's own state.
pub struct View<'a, C> {
    /// The shard's connections.
    pub cx: &'a C,
    /// The connection asking.
    pub id: ConnId,
    /// Broker and application counters.
    pub shared: &'a EdgeShared,
}

impl<C: Conns<Edge>> Responder for View<'_, C> {
    fn endpoint(&self, e: Endpoint) -> (u16, &'static str, String) {
        let node = self.cx.node();
        match e {
            Endpoint::Health => (200, TEXT, "ok\n".into()),
            Endpoint::Ready => ready(node, self.shared),
            Endpoint::Metrics => (200, PROMETHEUS, metrics(node, self.shared)),
            Endpoint::Cluster => (200, JSON, format!("{}\n", self.shared.broker.cluster_json())),
            Endpoint::Pools => (200, JSON, format!("{}\n", super::dashboard::pools(node, self.shared))),
            Endpoint::Dashboard => (200, HTML, super::dashboard::PAGE.to_string()),
        }
    }

    fn admission(&self) -> Option<Rejection> {
        self.cx.admission(self.id)
    }

    fn retry_after(&self) -> u32 {
        self.cx.node().config.server.retry_after_secs
    }

    fn internal_allowed(&self) -> bool {
        let s = &self.cx.node().config.server;
        self.admin() || s.public_internal_endpoints
    }

    fn admin(&self) -> bool {
        self.cx.peer(self.id).is_some_and(|p| p.admin)
    }

    fn deflate(&self) -> bool {
        self.cx.node().config.websocket.deflate
    }

    fn admit(&self, head: &Head) -> Option<(Rejection, u32)> {
        let peer = self.cx.peer(self.id)?;
        if !peer.via_proxy {
            return None; // limited at accept, by its socket address
        }
        // All lines: a proxy appends its own line after the client's.
        let xff = head.header_joined("x-forwarded-for");
        let client = proxy::client_from_xff(peer.client, xff.as_deref(), &self.cx.node().trusted);
        self.cx.admit_ip(self.id, client).err()
    }

    fn authorize(&self, head: &Head) -> Result<Option<Claims>, TokenError> {
        let Some(verifier) = &self.shared.verifier else { return Ok(None) };
        let token = match auth::token_from(head) {
            auth::TokenSource::None => Err(TokenError::Missing),
            auth::TokenSource::Query(t) => verifier.verify(&t, super::unix_now()),
            auth::TokenSource::Bearer(t) => verifier.verify(t, super::unix_now()),
            auth::TokenSource::Protocol { token, .. } => verifier.verify(&token, super::unix_now()),
        };
        match token {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                self.shared.metrics[self.cx.shard_id()].auth_failures[e.index()].inc();
                Err(e)
            }
        }
    }

    fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let allowed = &self.cx.node().config.server.allowed_origins;
        match origin {
            None => true,
            Some(o) => allowed.is_empty() || allowed.iter().any(|a| a == o),
        }
    }
}

/// 200 while accepting; 503 when draining or when every shard is full.
/// The body says which, shard by shard, plus the cluster link state.
fn ready<M>(node: &NodeState<M>, shared: &EdgeShared) -> (u16, &'static str, String) {
    let draining = node.is_draining();
    let full = node.all_full();
    let connecting = !shared.broker.ready();
    let status = if draining {
        "draining"
    } else if full {
        "full"
    } else if connecting {
        "connecting"
    } else {
        "ready"
    };
    let shards: Vec<_> = node
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "shard": i,
                "connections": s.metrics.connections.load(Ordering::Relaxed),
                "capacity": node.capacity_per_shard,
                "driver": s.metrics.driver().name(),
            })
        })
        .collect();
    let mut body = serde_json::json!({"status": status, "node": node.node_id, "shards": shards});
    if let Some(c) = shared.broker.ready_json() {
        body["cluster"] = c;
    }
    let code = if draining || full || connecting { 503 } else { 200 };
    (code, JSON, format!("{body}\n"))
}

fn metrics<M>(node: &NodeState<M>, shared: &EdgeShared) -> String {
    let mut t = Text::with_capacity(16 * 1024);
    let depth: Vec<(usize, usize)> = node.shards.iter().map(|s| (s.mailbox.len(), s.mailbox.queued_bytes())).collect();
    crate::runtime::metrics::render(&mut t, &node.metrics(), &depth);
    crate::runtime::priority::render(&mut t, node);
    super::metrics::render(&mut t, &shared.metrics, &node.node_id, node.is_draining());
    shared.broker.render_metrics(&mut t);
    if let Some(b) = &shared.backend {
        b.upstreams.render(&mut t);
    }
    t.finish()
}
