//! The application driven without sockets: each shard's [`Edge`] runs over
//! an in-memory [`Conns`] that records the frames it would send, and the
//! real mailboxes carry the cross-shard messages between them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tungstenite::Message;

use super::{AppMsg, Delivery, Edge, EdgeShared, Session};
use crate::broker::memory::MemoryBroker;
use crate::config::Config;
use crate::runtime::mailbox::{mailbox, MailboxError, MailboxReceiver, ShardMsg};
use crate::runtime::metrics::ShardMetrics;
use crate::runtime::table::ConnId;
use crate::runtime::{Answer, App, Conns, NodeState, Peer, Sampled, SendOutcome, ShardHandle};
use crate::transport::http::Rejection;

/// One shard's connections, in memory.
struct MemConns {
    shard: usize,
    node: Arc<NodeState<AppMsg>>,
    conns: RefCell<HashMap<ConnId, (Session, Vec<u8>)>>,
    closed: RefCell<Vec<(ConnId, u16)>>,
    next: RefCell<usize>,
    clock: RefCell<u64>,
}

impl Conns<Edge> for MemConns {
    fn shard_id(&self) -> usize {
        self.shard
    }
    fn node(&self) -> &NodeState<AppMsg> {
        &self.node
    }
    fn offer(&self, id: ConnId, _len: usize, write: impl FnOnce(&mut Vec<u8>)) -> SendOutcome {
        match self.conns.borrow_mut().get_mut(&id) {
            Some((_, out)) => {
                write(out);
                SendOutcome::Queued
            }
            None => SendOutcome::Gone,
        }
    }
    fn close(&self, id: ConnId, code: u16, _reason: &'static str) {
        self.closed.borrow_mut().push((id, code));
    }
    fn send_to(&self, to: usize, msg: AppMsg) -> Result<(), MailboxError> {
        self.node.shards[to].mailbox.send(ShardMsg::App(msg))
    }
    fn state<R>(&self, id: ConnId, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        self.conns.borrow_mut().get_mut(&id).map(|(s, _)| f(s))
    }
    fn admission(&self, _id: ConnId) -> Option<Rejection> {
        None
    }
    fn sample(&self, _k: usize) -> Vec<Sampled> {
        Vec::new()
    }
    fn least_active(&self, k: usize, keep: impl Fn(&Session) -> bool) -> Vec<ConnId> {
        let mut ids: Vec<ConnId> =
            self.conns.borrow().iter().filter(|(_, (s, _))| keep(s)).map(|(id, _)| *id).collect();
        ids.sort_by_key(|id| id.raw());
        ids.truncate(k);
        ids
    }
    fn now_ms(&self) -> u64 {
        *self.clock.borrow()
    }
    fn peer(&self, _id: ConnId) -> Option<Peer> {
        Some(Peer { client: std::net::Ipv4Addr::LOCALHOST.into(), via_proxy: false, admin: false })
    }
    fn admit_ip(&self, _id: ConnId, _ip: std::net::IpAddr) -> Result<(), (Rejection, u32)> {
        Ok(())
    }
}

/// A node of `n` shards: each shard's application, its connections and its mailbox.
struct Harness {
    shards: Vec<(Edge, MemConns)>,
    boxes: Vec<MailboxReceiver<AppMsg>>,
}

impl Harness {
    /// Client-chosen ids allowed (the tests name their clients).
    fn new(n: usize) -> Harness {
        let mut config = Config::default();
        config.auth.allow_client_ids = true;
        Harness::with(n, config)
    }

    fn with(n: usize, config: Config) -> Harness {
        let mut handles = Vec::new();
        let mut boxes = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mailbox(1024, 1 << 20).unwrap();
            handles.push(ShardHandle { mailbox: tx, metrics: ShardMetrics::default() });
            boxes.push(rx);
        }
        let node = Arc::new(NodeState {
            config,
            node_id: "n1".into(),
            advertise_url: "ws://n1/ws".into(),
            capacity_per_shard: 100,
            shards: handles,
            draining: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            started_at: 0,
            ip_table: None,
            trusted: Default::default(),
            classes: Default::default(),
        });
        let key = std::collections::hash_map::RandomState::new();
        let broker = Arc::new(MemoryBroker::alone(Arc::new(Delivery::new(node.clone(), key.clone()))));
        let shared = Arc::new(EdgeShared::new(broker, n, key));
        let shards = (0..n)
            .map(|i| {
                let cx = MemConns {
                    shard: i,
                    node: node.clone(),
                    conns: RefCell::default(),
                    closed: RefCell::default(),
                    next: RefCell::new(1),
                    clock: RefCell::new(1),
                };
                (Edge::new(i, shared.clone(), 16), cx)
            })
            .collect();
        Harness { shards, boxes }
    }

    /// Upgrades a new connection on `shard` at `path`; returns its id and what it was sent.
    fn connect(&mut self, shard: usize, path: &str) -> ConnId {
        let (edge, cx) = &self.shards[shard];
        let slot = cx.next.replace_with(|n| *n + 1);
        let id = ConnId::new(shard, slot, 1);
        cx.conns.borrow_mut().insert(id, (Session::default(), Vec::new()));
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
        assert!(matches!(edge.on_request(cx, id, req.as_bytes()), Answer::Upgrade { .. }));
        edge.on_open(cx, id);
        self.pump();
        id
    }

    fn send(&mut self, id: ConnId, text: &str) {
        let (edge, cx) = &self.shards[id.shard()];
        edge.on_message(cx, id, Message::text(text));
        self.pump();
    }

    fn disconnect(&mut self, id: ConnId) {
        let (edge, cx) = &self.shards[id.shard()];
        let (state, _) = cx.conns.borrow_mut().remove(&id).unwrap();
        edge.on_close(cx, id, state);
        self.pump();
    }

    /// Delivers every mailbox message until all are empty.
    fn pump(&mut self) {
        loop {
            let mut any = false;
            for (i, rx) in self.boxes.iter().enumerate() {
                while let Ok(msg) = rx.rx.try_recv() {
                    any = true;
                    let (edge, cx) = &self.shards[i];
                    match msg {
                        ShardMsg::App(m) => edge.on_mail(cx, m),
                        other => panic!("the application sent a runtime message: {other:?}"),
                    }
                }
            }
            if !any {
                return;
            }
        }
    }

    /// The JSON messages `id` was sent since the last call (taken).
    fn received(&self, id: ConnId) -> Vec<serde_json::Value> {
        let (_, cx) = &self.shards[id.shard()];
        let out = std::mem::take(&mut cx.conns.borrow_mut().get_mut(&id).unwrap().1);
        text_frames(&out)
            .iter()
            .map(|t| serde_json::from_str(t).unwrap_or(serde_json::Value::String(t.clone())))
            .collect()
    }
}

/// Splits unmasked server frames; every one must be a final text frame.
fn text_frames(mut b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert_eq!(b[0], 0x81, "final text frame");
        let (len, head) = match b[1] {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => panic!("no huge frames here"),
            n => (n as usize, 2),
        };
        out.push(String::from_utf8(b[head..head + len].to_vec()).unwrap());
        b = &b[head + len..];
    }
    out
}

#[test]
fn welcome_then_rooms_across_shards_exclude_the_sender() {
    let mut h = Harness::new(2);
    let a = h.connect(0, "/ws?client_id=alice");
    let b = h.connect(1, "/ws?client_id=bob");
    let welcome = h.received(a);
    assert_eq!(welcome[0]["type"], "welcome");
    assert_eq!((welcome[0]["client_id"].as_str(), welcome[0]["node"].as_str()), (Some("alice"), Some("n1")));
    h.received(b);
    h.send(a, r#"{"type":"join","room":"r"}"#);
    h.send(b, r#"{"type":"join","room":"r"}"#);
    assert_eq!(h.received(a), vec![serde_json::json!({"type":"joined","room":"r"})]);
    h.received(b);
    h.send(a, r#"{"type":"publish","room":"r","data":{"n":1}}"#);
    assert_eq!(h.received(b), vec![serde_json::json!({"type":"message","room":"r","from":"alice","data":{"n":1}})]);
    assert!(h.received(a).is_empty(), "the publisher gets no copy");
    h.send(b, r#"{"type":"leave","room":"r"}"#);
    h.received(b);
    h.send(a, r#"{"type":"publish","room":"r","data":2}"#);
    assert!(h.received(b).is_empty(), "left the room");
}

#[test]
fn direct_messages_route_through_the_home_shard_or_answer_unknown() {
    let mut h = Harness::new(2);
    let a = h.connect(0, "/ws?client_id=alice");
    let b = h.connect(1, "/ws?client_id=bob");
    h.received(a);
    h.received(b);
    h.send(a, r#"{"type":"direct","to":"bob","data":"hi"}"#);
    assert_eq!(h.received(b), vec![serde_json::json!({"type":"direct","from":"alice","data":"hi"})]);
    h.send(a, r#"{"type":"direct","to":"nobody","data":1}"#);
    let got = h.received(a);
    assert_eq!((got.len(), got[0]["code"].as_str()), (1, Some("unknown_client")), "{got:?}");
    h.disconnect(b);
    h.send(a, r#"{"type":"direct","to":"bob","data":"late"}"#);
    assert_eq!(h.received(a)[0]["code"], "unknown_client", "bob's directory entry went with him");
}

#[test]
fn a_second_connection_with_the_same_id_replaces_the_first_with_4000() {
    let mut h = Harness::new(2);
    let first = h.connect(0, "/ws?client_id=carol");
    let second = h.connect(1, "/ws?client_id=carol");
    assert_eq!(*h.shards[0].1.closed.borrow(), vec![(first, crate::transport::close::REPLACED)]);
    assert!(h.shards[1].1.closed.borrow().is_empty());
    h.received(second);
    let a = h.connect(0, "/ws?client_id=dave");
    h.received(a);
    h.send(a, r#"{"type":"direct","to":"carol","data":1}"#);
    assert_eq!(h.received(second).len(), 1, "the newer connection is the one registered");
}

#[test]
fn errors_are_answered_with_codes_and_counted_and_echo_echoes() {
    let mut h = Harness::new(1);
    let a = h.connect(0, "/ws");
    let welcome = h.received(a);
    assert!(welcome[0]["client_id"].as_str().is_some_and(|id| !id.is_empty()), "a generated id");
    h.send(a, "not json");
    h.send(a, r#"{"type":"join","room":"bad room"}"#);
    let codes: Vec<_> = h.received(a).iter().map(|v| v["code"].as_str().unwrap().to_string()).collect();
    assert_eq!(codes, ["bad_json", "bad_room"]);
    let m = &h.shards[0].0.shared.metrics[0];
    assert_eq!(m.client_errors[super::protocol::ClientError::BadJson.index()].get(), 1);
    let e = h.connect(0, "/echo");
    assert!(h.received(e).is_empty(), "no welcome on /echo");
    h.send(e, "same bytes back");
    assert_eq!(h.received(e), vec![serde_json::Value::String("same bytes back".into())]);
}

#[test]
fn publishing_needs_membership_and_messages_are_rate_limited() {
    let mut h = Harness::new(1);
    let a = h.connect(0, "/ws?client_id=pub");
    h.received(a);
    h.send(a, r#"{"type":"publish","room":"r","data":1}"#);
    assert_eq!(h.received(a)[0]["code"], "not_joined");
    let mut config = Config::default();
    config.limits.messages_per_second = 1.0;
    config.limits.message_burst = 2;
    config.limits.rate_limit_strikes = 3;
    let mut h = Harness::with(1, config);
    let a = h.connect(0, "/ws");
    h.received(a);
    for _ in 0..2 {
        h.send(a, r#"{"type":"ping","id":1}"#);
    }
    assert_eq!(h.received(a).len(), 2, "the burst passes");
    h.send(a, r#"{"type":"ping","id":2}"#);
    assert_eq!(h.received(a)[0]["code"], "rate_limited", "the clock did not move: no token");
    assert!(h.shards[0].1.closed.borrow().is_empty());
    for _ in 0..3 {
        h.send(a, r#"{"type":"ping","id":3}"#);
    }
    let closed = h.shards[0].1.closed.borrow();
    assert_eq!(closed.first(), Some(&(a, crate::transport::close::POLICY)), "sustained: 1008 at the third strike");
    assert_eq!(closed.len(), 2, "strikes 3 and 4 (the runtime makes the second a no-op)");
}

#[test]
fn chosen_ids_need_permission_and_several_sessions_all_get_directs() {
    let mut h = Harness::with(1, Config::default());
    let a = h.connect(0, "/ws?client_id=alice");
    let id = h.received(a)[0]["client_id"].as_str().unwrap().to_string();
    assert_ne!(id, "alice", "auth.allow_client_ids is off by default: the server assigns the id");
    let mut config = Config::default();
    config.auth.allow_client_ids = true;
    config.auth.sessions_per_client = 2;
    let mut h = Harness::with(2, config);
    let tabs: Vec<ConnId> = (0..3).map(|i| h.connect(i % 2, "/ws?client_id=tabs")).collect();
    let closed: Vec<_> = h.shards.iter().flat_map(|(_, cx)| cx.closed.borrow().clone()).collect();
    assert_eq!(closed, vec![(tabs[0], crate::transport::close::REPLACED)], "the oldest of three goes");
    let s = h.connect(1, "/ws?client_id=sender");
    h.send(s, r#"{"type":"direct","to":"tabs","data":"hi"}"#);
    for t in &tabs[1..] {
        let got = h.received(*t);
        assert!(got.iter().any(|m| m["type"] == "direct" && m["data"] == "hi"), "{got:?}");
    }
}

#[test]
fn joins_waiting_for_their_offset_are_bounded_and_a_leave_or_close_drops_the_answer() {
    let mut config = Config::default();
    config.auth.allow_client_ids = true;
    config.rooms.history_size = 10;
    config.rooms.max_pending_joins = 4;
    let mut h = Harness::with(2, config);
    let a = h.connect(0, "/ws?client_id=alice");
    h.received(a);
    // Rooms whose home (sequencer) is the other shard: their joins wait for a mailbox round trip.
    let shared = h.shards[0].0.shared.clone();
    let far: Vec<String> = (0..).map(|i| format!("far{i}")).filter(|r| shared.home_shard(r, 2) == 1).take(5).collect();
    let send_raw = |h: &Harness, id: ConnId, text: &str| {
        let (edge, cx) = &h.shards[id.shard()];
        edge.on_message(cx, id, Message::text(text));
    };
    for r in &far {
        send_raw(&h, a, &format!(r#"{{"type":"join","room":"{r}"}}"#));
    }
    let now = h.received(a);
    assert_eq!(now.len(), 1, "four wait, the fifth is refused: {now:?}");
    assert_eq!(now[0]["code"], "rate_limited");
    // Leaving one before its answer: the answer is dropped, the others arrive.
    send_raw(&h, a, &format!(r#"{{"type":"leave","room":"{}"}}"#, far[0]));
    h.pump();
    let got = h.received(a);
    assert_eq!(got[0], serde_json::json!({"type":"left","room": far[0]}));
    let joined: Vec<&str> = got[1..].iter().map(|m| m["room"].as_str().unwrap()).collect();
    assert_eq!(joined, far[1..4].iter().map(String::as_str).collect::<Vec<_>>());
    assert!(got[1..].iter().all(|m| m["type"] == "joined" && m["offset"] == 0 && m["epoch"].is_string()));
    // Closing with a join pending: the answer finds nobody, nothing breaks.
    send_raw(&h, a, &format!(r#"{{"type":"join","room":"{}"}}"#, far[4]));
    h.disconnect(a);
    assert!(h.shards[0].0.pending.borrow().is_empty());
}

/// Every connection holds its table entry for its whole life: it stays
/// small (results/2026-12-01-idle-memory-retire says where each byte goes).
#[test]
fn a_connection_entry_stays_small() {
    assert!(std::mem::size_of::<crate::runtime::table::Conn<super::Session>>() <= 248);
    assert!(std::mem::size_of::<crate::transport::socket::SharedStream>() <= 24);
}
