//! The node registry: what this node writes about itself and its shard
//! pools each interval, and how the live nodes read back from Redis become
//! the `/cluster` view with its least-loaded pick.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::backend::Op;
use super::keys;
use crate::broker::LocalNode;
use crate::config::Class;

/// One node as the registry describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    /// Node id.
    pub node: String,
    /// URL clients use to reach it.
    pub url: String,
    /// Shards.
    pub shards: u64,
    /// Slotted connections.
    pub connections: u64,
    /// Slots in all.
    pub capacity: u64,
    /// connections / capacity.
    pub utilization: f64,
    /// Upgrade latency p99, µs.
    pub handshake_p99_us: u64,
    /// `ok`, `full` or `draining`.
    pub health: String,
    /// Software version.
    pub version: String,
    /// Unix seconds at start.
    pub started_at: u64,
    /// Connections per priority class (`low`, `normal`, `high`, `critical`).
    pub classes: BTreeMap<String, u64>,
}

fn health(full: bool, draining: bool) -> &'static str {
    if draining {
        "draining"
    } else if full {
        "full"
    } else {
        "ok"
    }
}

/// This node's entry, from what the application reports.
pub fn self_info(local: &LocalNode) -> NodeInfo {
    let (connections, capacity) = (local.connections() as u64, local.capacity() as u64);
    NodeInfo {
        node: local.node_id.clone(),
        url: local.url.clone(),
        shards: local.shard_connections.len() as u64,
        connections,
        capacity,
        utilization: connections as f64 / capacity.max(1) as f64,
        handshake_p99_us: local.handshake_p99_us,
        health: health(local.full(), local.draining).to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_at: local.started_at,
        classes: Class::ALL.iter().map(|c| (c.name().to_string(), local.class_connections[c.index()] as u64)).collect(),
    }
}

/// The node hash, the node set membership, and one hash per shard pool.
pub fn register_ops(local: &LocalNode, me: &NodeInfo, ttl_ms: u64) -> Vec<Op> {
    let fields = vec![
        ("url", me.url.clone()),
        ("shards", me.shards.to_string()),
        ("connections", me.connections.to_string()),
        ("capacity", me.capacity.to_string()),
        ("utilization", format!("{:.4}", me.utilization)),
        ("handshake_p99_us", me.handshake_p99_us.to_string()),
        ("health", me.health.clone()),
        ("version", me.version.clone()),
        ("started_at", me.started_at.to_string()),
    ];
    let mut fields = fields;
    for (name, n) in &me.classes {
        fields.push((class_field(name), n.to_string()));
    }
    let mut ops = vec![
        Op::HSet { key: keys::node(&me.node), fields, ttl_ms },
        Op::SAdd { key: keys::NODES_SET.into(), member: me.node.clone() },
    ];
    let max = local.capacity_per_shard;
    for (i, &current) in local.shard_connections.iter().enumerate() {
        let fields = vec![
            ("current", current.to_string()),
            ("max", max.to_string()),
            ("utilization", format!("{:.4}", current as f64 / max.max(1) as f64)),
            ("health", health(current >= max, local.draining).to_string()),
        ];
        ops.push(Op::HSet { key: keys::pool(&me.node, i), fields, ttl_ms });
    }
    ops
}

/// The node-hash field of a class's connection count (`class_<name>`).
fn class_field(name: &str) -> &'static str {
    match name {
        "low" => "class_low",
        "normal" => "class_normal",
        "high" => "class_high",
        _ => "class_critical",
    }
}

/// What a graceful stop removes.
pub fn deregister_ops(me: &str, shards: usize) -> Vec<Op> {
    let mut ops = vec![
        Op::Del { key: keys::node(me) },
        Op::SRem { key: keys::NODES_SET.into(), member: me.to_string() },
        Op::Del { key: keys::sample(me) },
    ];
    ops.extend((0..shards).map(|i| Op::Del { key: keys::pool(me, i) }));
    ops
}

/// A node entry from its hash; `None` when the hash is gone (expired).
pub fn parse_node(node: &str, h: &HashMap<String, String>) -> Option<NodeInfo> {
    if h.is_empty() {
        return None;
    }
    let s = |k: &str| h.get(k).cloned().unwrap_or_default();
    let n = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(NodeInfo {
        node: node.to_string(),
        url: s("url"),
        shards: n("shards"),
        connections: n("connections"),
        capacity: n("capacity"),
        utilization: h.get("utilization").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        handshake_p99_us: n("handshake_p99_us"),
        health: s("health"),
        version: s("version"),
        started_at: n("started_at"),
        classes: Class::ALL.iter().map(|c| (c.name().to_string(), n(class_field(c.name())))).collect(),
    })
}

/// The healthy node with the lowest utilization (then fewest connections, then id).
pub fn least_loaded(nodes: &[NodeInfo]) -> Option<&NodeInfo> {
    nodes.iter().filter(|n| n.health == "ok").min_by(|a, b| {
        a.utilization.total_cmp(&b.utilization).then(a.connections.cmp(&b.connections)).then(a.node.cmp(&b.node))
    })
}

/// The `/cluster` body. `redis` is the breaker state; when Redis is away the
/// view holds this node only and says so (`stale`).
pub fn cluster_json(me: &str, redis: &str, nodes: &[NodeInfo], stale: bool) -> serde_json::Value {
    serde_json::json!({
        "mode": "cluster",
        "node": me,
        "redis": redis,
        "stale": stale,
        "nodes": nodes,
        "least_loaded": least_loaded(nodes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(node: &str, util: f64, conns: u64, health: &str) -> NodeInfo {
        NodeInfo {
            node: node.into(),
            url: format!("ws://{node}/ws"),
            shards: 2,
            connections: conns,
            capacity: 100,
            utilization: util,
            handshake_p99_us: 10,
            health: health.into(),
            version: "0".into(),
            started_at: 1,
            classes: Class::ALL.iter().map(|c| (c.name().to_string(), 0)).collect(),
        }
    }

    #[test]
    fn least_loaded_skips_unhealthy_and_breaks_ties() {
        let nodes = vec![info("a", 0.5, 50, "ok"), info("b", 0.1, 10, "draining"), info("c", 0.5, 40, "ok")];
        assert_eq!(least_loaded(&nodes).map(|n| n.node.as_str()), Some("c"));
        assert!(least_loaded(&[info("x", 1.0, 100, "full")]).is_none());
    }

    #[test]
    fn parses_what_it_writes() {
        let me = info("n1", 0.25, 25, "ok");
        let mut h = HashMap::new();
        for (k, v) in [
            ("url", "ws://n1/ws"),
            ("shards", "2"),
            ("connections", "25"),
            ("capacity", "100"),
            ("utilization", "0.2500"),
            ("handshake_p99_us", "10"),
            ("health", "ok"),
            ("version", "0"),
            ("started_at", "1"),
            ("class_low", "0"),
            ("class_normal", "0"),
            ("class_high", "0"),
            ("class_critical", "0"),
        ] {
            h.insert(k.to_string(), v.to_string());
        }
        assert_eq!(parse_node("n1", &h), Some(me));
        assert_eq!(parse_node("gone", &HashMap::new()), None);
        let v = cluster_json("n1", "closed", &[info("n1", 0.2, 1, "ok")], false);
        assert_eq!(v["least_loaded"]["node"], "n1");
        assert_eq!(v["nodes"][0]["url"], "ws://n1/ws");
    }
}
