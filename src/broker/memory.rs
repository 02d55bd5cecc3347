//! The in-memory broker: a single node, or several nodes in one process
//! sharing a [`MemoryHub`] (the application's unit tests).
//!
//! Alone on its hub (the single-node default) every operation is a no-op
//! that touches no shared state: a direct message for a client that is not
//! on this node is answered `unknown_client` at once. With peers, the hub
//! keeps which node has which client and which rooms, behind one mutex: it
//! is meant for tests and small embeddings, not for the message path of a
//! production cluster (that is [`super::redis`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Broker, LocalNode, SampleEntry, Sink};
use crate::prom::Text;
use crate::runtime::table::ConnId;

/// Nodes that share one process.
#[derive(Clone, Default)]
pub struct MemoryHub {
    inner: Arc<Hub>,
}

#[derive(Default)]
struct Hub {
    nodes: AtomicUsize,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    sinks: Vec<(String, Arc<dyn Sink>)>,
    /// Client id → its sessions (node index, connection), oldest first.
    clients: HashMap<Arc<str>, Vec<(usize, ConnId)>>,
    /// Room → (node index, shard) pairs with local members.
    rooms: HashMap<Arc<str>, BTreeSet<(usize, usize)>>,
}

/// One node's broker on a [`MemoryHub`].
pub struct MemoryBroker {
    hub: MemoryHub,
    index: usize,
    sink: Arc<dyn Sink>,
}

impl MemoryBroker {
    /// A single node with a hub of its own.
    pub fn alone(sink: Arc<dyn Sink>) -> Self {
        Self::join(&MemoryHub::default(), sink)
    }

    /// Joins `hub` as one more node.
    pub fn join(hub: &MemoryHub, sink: Arc<dyn Sink>) -> Self {
        let mut st = hub.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let index = st.sinks.len();
        st.sinks.push((sink.local().node_id, sink.clone()));
        hub.inner.nodes.store(st.sinks.len(), Ordering::Release);
        MemoryBroker { hub: hub.clone(), index, sink }
    }

    fn alone_on_hub(&self) -> bool {
        self.hub.inner.nodes.load(Ordering::Acquire) <= 1
    }

    fn with<R>(&self, f: impl FnOnce(&mut HubState) -> R) -> R {
        f(&mut self.hub.inner.state.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Broker for MemoryBroker {
    fn conn_opened(&self, client_id: &Arc<str>, conn: ConnId, keep: usize, _named: bool) {
        if self.alone_on_hub() {
            return;
        }
        let evicted: Vec<(Arc<dyn Sink>, ConnId)> = self.with(|st| {
            let sessions = st.clients.entry(client_id.clone()).or_default();
            sessions.push((self.index, conn));
            let past = sessions.len().saturating_sub(keep.max(1));
            let gone: Vec<(usize, ConnId)> = sessions.drain(..past).collect();
            gone.into_iter().map(|(n, c)| (st.sinks[n].1.clone(), c)).collect()
        });
        for (sink, c) in evicted {
            sink.replaced(client_id, c);
        }
    }

    fn conn_closed(&self, client_id: &Arc<str>, conn: ConnId) {
        if self.alone_on_hub() {
            return;
        }
        self.with(|st| {
            if let Some(sessions) = st.clients.get_mut(client_id) {
                sessions.retain(|s| *s != (self.index, conn));
                if sessions.is_empty() {
                    st.clients.remove(client_id);
                }
            }
        });
    }

    fn room_interest(&self, shard: usize, room: &str, on: bool) {
        if self.alone_on_hub() {
            return;
        }
        self.with(|st| {
            let set = st.rooms.entry(Arc::from(room)).or_default();
            if on {
                set.insert((self.index, shard));
            } else {
                set.remove(&(self.index, shard));
                if set.is_empty() {
                    st.rooms.remove(room);
                }
            }
        });
    }

    fn publish(&self, room: Arc<str>, payload: &str) -> bool {
        if self.alone_on_hub() {
            return true;
        }
        let targets: Vec<Arc<dyn Sink>> = self.with(|st| {
            let nodes: BTreeSet<usize> = st.rooms.get(&room).into_iter().flatten().map(|(n, _)| *n).collect();
            nodes.into_iter().filter(|n| *n != self.index).map(|n| st.sinks[n].1.clone()).collect()
        });
        for t in targets {
            t.room(&room, payload);
        }
        true
    }

    fn direct(&self, to: Arc<str>, frame: Bytes, from: ConnId, delivered_here: bool) {
        let targets: Vec<Arc<dyn Sink>> = if self.alone_on_hub() {
            Vec::new()
        } else {
            self.with(|st| {
                let nodes: BTreeSet<usize> =
                    st.clients.get(&to).into_iter().flatten().map(|(n, _)| *n).filter(|n| *n != self.index).collect();
                nodes.into_iter().map(|n| st.sinks[n].1.clone()).collect()
            })
        };
        if targets.is_empty() && !delivered_here {
            let _ = self.sink.unknown_client(from, to);
            return;
        }
        for t in targets {
            let _ = t.direct(&to, &frame);
        }
    }

    fn sample_size(&self) -> usize {
        0
    }

    fn sample(&self, _shard: usize, _entries: Vec<SampleEntry>) {}

    fn ready_json(&self) -> Option<serde_json::Value> {
        None
    }

    fn cluster_json(&self) -> serde_json::Value {
        let sinks: Vec<Arc<dyn Sink>> = self.with(|st| st.sinks.iter().map(|(_, s)| s.clone()).collect());
        let nodes: Vec<serde_json::Value> = sinks.iter().map(|s| view(&s.local())).collect();
        let least = nodes
            .iter()
            .filter(|n| n["health"] == "ok")
            .min_by(|a, b| {
                a["utilization"].as_f64().unwrap_or(1.0).total_cmp(&b["utilization"].as_f64().unwrap_or(1.0))
            })
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        serde_json::json!({"mode": "standalone", "nodes": nodes, "least_loaded": least})
    }

    fn render_metrics(&self, _t: &mut Text) {}

    fn shutdown(&self) {}
}

fn view(n: &LocalNode) -> serde_json::Value {
    let health = if n.draining {
        "draining"
    } else if n.full() {
        "full"
    } else {
        "ok"
    };
    serde_json::json!({
        "node": n.node_id, "url": n.url, "connections": n.connections(),
        "utilization": n.connections() as f64 / n.capacity().max(1) as f64, "health": health,
        "classes": crate::config::Class::ALL.iter().map(|c| (c.name(), n.class_connections[c.index()])).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        id: String,
        got: Mutex<Vec<String>>,
    }

    impl Sink for Rec {
        fn room(&self, room: &str, payload: &str) -> bool {
            self.got.lock().unwrap().push(format!("room {room} {payload}"));
            true
        }
        fn direct(&self, to: &str, frame: &[u8]) -> bool {
            self.got.lock().unwrap().push(format!("direct {to} {}", String::from_utf8_lossy(frame)));
            true
        }
        fn unknown_client(&self, _from: ConnId, to: Arc<str>) -> bool {
            self.got.lock().unwrap().push(format!("unknown {to}"));
            true
        }
        fn replaced(&self, client_id: &str, conn: ConnId) -> bool {
            self.got.lock().unwrap().push(format!("replaced {client_id} {}", conn.raw()));
            true
        }
        fn affinity(&self, _conn: ConnId, _node: &str, _url: &str) -> bool {
            true
        }
        fn local(&self) -> LocalNode {
            LocalNode {
                node_id: self.id.clone(),
                url: format!("ws://{}/ws", self.id),
                shard_connections: vec![0, 1],
                capacity_per_shard: 10,
                handshake_p99_us: 0,
                draining: false,
                started_at: 0,
                class_connections: [0, 1, 0, 0],
            }
        }
    }

    fn node(hub: &MemoryHub, id: &str) -> (Arc<Rec>, MemoryBroker) {
        let rec = Arc::new(Rec { id: id.into(), ..Rec::default() });
        let b = MemoryBroker::join(hub, rec.clone());
        (rec, b)
    }

    #[test]
    fn rooms_and_directs_cross_nodes_in_one_process() {
        let hub = MemoryHub::default();
        let ((ra, a), (rb, b)) = (node(&hub, "a"), node(&hub, "b"));
        b.room_interest(1, "r", true);
        a.publish(Arc::from("r"), "p1");
        b.publish(Arc::from("r"), "own");
        a.publish(Arc::from("other"), "p2");
        assert_eq!(*rb.got.lock().unwrap(), vec!["room r p1".to_string()]);
        b.conn_opened(&Arc::from("bob"), ConnId::new(0, 1, 1), 1, true);
        a.direct(Arc::from("bob"), Bytes::from_static(b"hi"), ConnId::new(0, 2, 1), false);
        a.direct(Arc::from("nobody"), Bytes::from_static(b"x"), ConnId::new(0, 2, 1), false);
        assert_eq!(rb.got.lock().unwrap().last().map(String::as_str), Some("direct bob hi"));
        assert_eq!(*ra.got.lock().unwrap(), vec!["unknown nobody".to_string()]);
        b.conn_closed(&Arc::from("bob"), ConnId::new(0, 1, 1));
        a.direct(Arc::from("bob"), Bytes::from_static(b"late"), ConnId::new(0, 2, 1), false);
        assert_eq!(ra.got.lock().unwrap().last().map(String::as_str), Some("unknown bob"));
        assert_eq!(a.cluster_json()["nodes"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn sessions_past_the_limit_are_replaced_across_nodes_oldest_first() {
        let hub = MemoryHub::default();
        let ((ra, a), (rb, b)) = (node(&hub, "a"), node(&hub, "b"));
        let (a1, b1, a2) = (ConnId::new(0, 1, 1), ConnId::new(1, 1, 1), ConnId::new(0, 2, 1));
        a.conn_opened(&Arc::from("t"), a1, 2, true);
        b.conn_opened(&Arc::from("t"), b1, 2, true);
        assert!(ra.got.lock().unwrap().is_empty(), "two sessions fit in two");
        // A direct from a reaches b's session; a already delivered its own.
        a.direct(Arc::from("t"), Bytes::from_static(b"m"), ConnId::new(0, 9, 1), true);
        assert_eq!(rb.got.lock().unwrap().last().map(String::as_str), Some("direct t m"));
        a.conn_opened(&Arc::from("t"), a2, 2, true);
        assert_eq!(*ra.got.lock().unwrap(), vec![format!("replaced t {}", a1.raw())], "the oldest goes");
        b.conn_opened(&Arc::from("t"), ConnId::new(1, 2, 1), 1, true);
        assert_eq!(rb.got.lock().unwrap().last(), Some(&format!("replaced t {}", b1.raw())));
        assert_eq!(ra.got.lock().unwrap().last(), Some(&format!("replaced t {}", a2.raw())));
        // Only b's newest is left: a direct delivered here reaches nobody else and is not unknown.
        let before = ra.got.lock().unwrap().len();
        b.direct(Arc::from("t"), Bytes::from_static(b"x"), ConnId::new(1, 9, 1), true);
        assert_eq!(ra.got.lock().unwrap().len(), before);
    }

    #[test]
    fn alone_answers_unknown_and_lists_itself() {
        let rec = Arc::new(Rec { id: "solo".into(), ..Rec::default() });
        let b = MemoryBroker::alone(rec.clone());
        b.conn_opened(&Arc::from("x"), ConnId::new(0, 1, 1), 1, true);
        b.direct(Arc::from("x"), Bytes::new(), ConnId::new(0, 1, 1), false);
        assert_eq!(*rec.got.lock().unwrap(), vec!["unknown x".to_string()]);
        let v = b.cluster_json();
        assert_eq!((v["mode"].as_str(), v["least_loaded"]["node"].as_str()), (Some("standalone"), Some("solo")));
    }
}
