//! The plain HTTP endpoints served on the WebSocket port: `/health`,
//! `/ready`, `/metrics` and `/cluster`.

use std::sync::atomic::Ordering;

use crate::metrics::{render, NodeView};
use crate::shard::NodeShared;
use crate::ws::handshake::Endpoint;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Status, content type and body for `e`.
pub fn endpoint(node: &NodeShared, e: Endpoint) -> (u16, &'static str, String) {
    match e {
        Endpoint::Health => (200, TEXT, "ok\n".into()),
        Endpoint::Ready => ready(node),
        Endpoint::Metrics => (200, PROMETHEUS, metrics(node)),
        Endpoint::Cluster => cluster(node),
    }
}

/// 200 while accepting; 503 when draining or when every shard is full.
/// The body says which, shard by shard, plus the cluster link state.
fn ready(node: &NodeShared) -> (u16, &'static str, String) {
    let draining = node.is_draining();
    let full = node.all_full();
    let status = if draining {
        "draining"
    } else if full {
        "full"
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
    if let Some(c) = &node.cluster {
        body["cluster"] = c.status_json();
    }
    let code = if draining || full { 503 } else { 200 };
    (code, JSON, format!("{body}\n"))
}

fn metrics(node: &NodeShared) -> String {
    let view = NodeView {
        node_id: &node.node_id,
        shards: node.shards.iter().map(|s| &s.metrics).collect(),
        mailbox_depth: node.shards.iter().map(|s| s.mailbox.len()).collect(),
        draining: node.is_draining(),
        extra: node.cluster.as_ref().map(|c| c.metrics_text()).unwrap_or_default(),
    };
    render(&view)
}

/// Live nodes from the registry, and the least-loaded one.
fn cluster(node: &NodeShared) -> (u16, &'static str, String) {
    match &node.cluster {
        Some(c) => (200, JSON, format!("{}\n", c.cluster_json())),
        None => {
            let util = node.connections() as f64 / (node.capacity_per_shard * node.shards.len()).max(1) as f64;
            let me = serde_json::json!({
                "node": node.node_id, "url": node.advertise_url,
                "connections": node.connections(), "utilization": util,
            });
            let body = serde_json::json!({"mode": "standalone", "nodes": [me], "least_loaded": me});
            (200, JSON, format!("{body}\n"))
        }
    }
}
