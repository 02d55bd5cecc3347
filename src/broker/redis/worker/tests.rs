//! The worker against the in-memory store: two simulated nodes, each with a
//! recording sink in place of the application.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Worker;
use crate::broker::redis::memory::{MemoryConnector, MemoryHub};
use crate::broker::redis::{BreakerState, RedisBroker};
use crate::broker::{Broker, LocalNode, Sink};
use crate::config::ClusterConfig;
use crate::runtime::table::ConnId;

// 100 ms: a node hash lives 3 intervals, and on a loaded 2-core box a tick
// can be late by tens of milliseconds.
const INTERVAL_MS: u64 = 100;

/// What the worker handed to the application.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Room(String, String),
    Direct(String, Vec<u8>),
    Unknown(ConnId, String),
    Affinity(ConnId, String, String),
    Replaced(String, ConnId),
    Unavailable(ConnId),
}

struct Rec {
    id: String,
    got: Mutex<Vec<Got>>,
}

impl Sink for Rec {
    fn room(&self, room: &str, payload: &str) -> bool {
        self.got.lock().unwrap().push(Got::Room(room.into(), payload.into()));
        true
    }
    fn direct(&self, to: &str, frame: &[u8]) -> bool {
        self.got.lock().unwrap().push(Got::Direct(to.into(), frame.to_vec()));
        true
    }
    fn unknown_client(&self, from: ConnId, to: Arc<str>) -> bool {
        self.got.lock().unwrap().push(Got::Unknown(from, to.to_string()));
        true
    }
    fn replaced(&self, client_id: &str, conn: ConnId) -> bool {
        self.got.lock().unwrap().push(Got::Replaced(client_id.into(), conn));
        true
    }
    fn unavailable(&self, origin: ConnId) -> bool {
        self.got.lock().unwrap().push(Got::Unavailable(origin));
        true
    }
    fn affinity(&self, conn: ConnId, node: &str, url: &str) -> bool {
        self.got.lock().unwrap().push(Got::Affinity(conn, node.into(), url.into()));
        true
    }
    fn local(&self) -> LocalNode {
        LocalNode {
            node_id: self.id.clone(),
            url: format!("ws://{}/ws", self.id),
            shard_connections: vec![0, 0],
            capacity_per_shard: 100,
            handshake_p99_us: 0,
            draining: false,
            started_at: 1,
            class_connections: [0; 4],
        }
    }
}

struct TestNode {
    broker: RedisBroker,
    rec: Arc<Rec>,
}

impl TestNode {
    fn start(hub: &MemoryHub, id: &str) -> TestNode {
        let config = ClusterConfig {
            redis_url: "redis://memory".into(),
            sync_interval_ms: INTERVAL_MS,
            ..ClusterConfig::default()
        };
        let rec = Arc::new(Rec { id: id.into(), got: Mutex::new(Vec::new()) });
        let (broker, rx) = RedisBroker::detached(config.sample_size);
        let sink: Arc<dyn Sink> = rec.clone();
        let worker = Worker::new(config, id.into(), sink, broker.status.clone(), MemoryConnector(hub.clone()));
        tokio::task::spawn_local(worker.run(rx));
        TestNode { broker, rec }
    }

    fn cluster(&self) -> &RedisBroker {
        &self.broker
    }

    /// Everything delivered so far (taken).
    fn drain_all(&self) -> Vec<Got> {
        std::mem::take(&mut *self.rec.got.lock().unwrap())
    }
}

fn conn(shard: usize, slot: usize) -> ConnId {
    ConnId::new(shard, slot, 1)
}

/// Collects what `node` receives until `n` deliveries arrived or two
/// seconds passed (a loaded test machine may need more than an interval).
async fn drain_until(node: &TestNode, n: usize) -> Vec<Got> {
    let mut got = Vec::new();
    for _ in 0..200 {
        got.extend(node.drain_all());
        if got.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    got
}

async fn settle(intervals: u64) {
    tokio::time::sleep(Duration::from_millis(INTERVAL_MS * intervals)).await;
}

async fn local(f: impl std::future::Future<Output = ()>) {
    tokio::task::LocalSet::new().run_until(f).await;
}

#[tokio::test]
async fn rooms_cross_nodes_once_and_skip_the_origin() {
    local(async {
        let hub = MemoryHub::default();
        let (a, b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(2).await;
        a.cluster().room_interest(0, "r", true);
        b.cluster().room_interest(1, "r", true);
        b.cluster().room_interest(0, "r", true);
        settle(2).await;
        assert!(hub.channels().contains("ringside:room:r"));
        a.cluster().publish(Arc::from("r"), "{\"type\":\"message\",\"n\":1}");
        b.cluster().publish(Arc::from("other"), "{}");
        settle(2).await;
        let at_b = b.drain_all();
        assert_eq!(at_b, vec![Got::Room("r".into(), "{\"type\":\"message\",\"n\":1}".into())], "once at b");
        assert!(a.drain_all().is_empty(), "a ignores its own message and 'other' has no members on a");
        // Interest gone on b: unsubscribed, nothing delivered there.
        b.cluster().room_interest(1, "r", false);
        b.cluster().room_interest(0, "r", false);
        settle(2).await;
        a.cluster().publish(Arc::from("r"), "{}");
        settle(2).await;
        assert!(b.drain_all().is_empty());
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_holds_room_subscriptions_until_the_sessions_floors_arrive() {
    local(async {
        let hub = MemoryHub::default();
        let a = TestNode::start(&hub, "a");
        settle(2).await;
        // A new process: sessions arrive and join before their floors are known.
        a.cluster().resume_expected();
        a.cluster().room_interest(0, "h", true);
        settle(3).await;
        assert!(!hub.channels().contains("ringside:room:h"), "subscribed before the floors");
        // The floors (none here) end the hold: subscribed at once.
        a.cluster().resume_floors(Vec::new());
        settle(2).await;
        assert!(hub.channels().contains("ringside:room:h"), "never subscribed after the floors");
    })
    .await;
}

#[tokio::test]
async fn direct_reaches_the_target_node_or_says_unknown() {
    local(async {
        let hub = MemoryHub::default();
        let (a, b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(2).await;
        b.cluster().conn_opened(&Arc::from("bob"), conn(1, 7), 1, true);
        // Sent before b's batch wrote bob's conn key: the worker waits for it.
        a.cluster().direct(Arc::from("bob"), bytes::Bytes::from_static(b"frame"), conn(0, 3), false);
        settle(4).await;
        assert_eq!(hub.hash("ringside:conn:bob").get("node").map(String::as_str), Some("b"));
        assert_eq!(b.drain_all(), vec![Got::Direct("bob".into(), b"frame".to_vec())]);
        a.cluster().direct(Arc::from("nobody"), bytes::Bytes::from_static(b"x"), conn(0, 3), false);
        settle(6).await;
        assert_eq!(a.drain_all(), vec![Got::Unknown(conn(0, 3), "nobody".into())]);
        // Leaving deletes the key (only b's own entry).
        b.cluster().conn_closed(&Arc::from("bob"), conn(1, 7));
        settle(2).await;
        assert!(hub.hash("ringside:conn:bob").is_empty());
        assert_eq!(hub.string("ringside:affinity:bob").as_deref(), Some("b"));
    })
    .await;
}

#[tokio::test]
async fn sessions_past_the_limit_are_replaced_across_nodes_and_directs_reach_all() {
    local(async {
        let hub = MemoryHub::default();
        let (a, b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(3).await;
        let t: Arc<str> = Arc::from("tab");
        // Two sessions allowed: one on each node.
        a.cluster().conn_opened(&t, conn(0, 1), 2, true);
        settle(1).await;
        b.cluster().conn_opened(&t, conn(1, 1), 2, true);
        settle(2).await;
        assert_eq!(hub.zset("ringside:sessions:tab").len(), 2);
        assert!(no_hints(a.drain_all()).is_empty() && no_hints(b.drain_all()).is_empty(), "both fit");
        // A direct sent on a, delivered to a's own session there, also reaches b.
        a.cluster().direct(t.clone(), bytes::Bytes::from_static(b"m"), conn(0, 9), true);
        settle(2).await;
        assert_eq!(no_hints(b.drain_all()), vec![Got::Direct("tab".into(), b"m".to_vec())]);
        assert!(no_hints(a.drain_all()).is_empty(), "no unknown_client: a delivered it");
        // A third session on b replaces the oldest, which is on a.
        b.cluster().conn_opened(&t, conn(1, 2), 2, true);
        let got = no_hints(drain_until(&a, 1).await);
        assert_eq!(got, vec![Got::Replaced("tab".into(), conn(0, 1))]);
        assert!(no_hints(b.drain_all()).is_empty(), "b's two sessions stay");
        // With one session allowed, the newest (on a) replaces both of b's.
        a.cluster().conn_closed(&t, conn(0, 1));
        a.cluster().conn_opened(&t, conn(0, 2), 1, true);
        let mut got = no_hints(drain_until(&b, 2).await);
        got.sort_by_key(|g| format!("{g:?}"));
        assert_eq!(got, vec![Got::Replaced("tab".into(), conn(1, 1)), Got::Replaced("tab".into(), conn(1, 2))]);
        settle(2).await;
        let left: Vec<String> = hub.zset("ringside:sessions:tab");
        assert_eq!(left, vec![format!("a|{}", conn(0, 2).raw())]);
        assert_eq!(a.broker.status.sessions_replaced.load(Ordering::Relaxed), 2);
        assert_eq!(b.broker.status.remote_replacements.load(Ordering::Relaxed), 2);
    })
    .await;
}

/// Without affinity hints (a client moving between nodes gets one).
fn no_hints(v: Vec<Got>) -> Vec<Got> {
    v.into_iter().filter(|g| !matches!(g, Got::Affinity(..))).collect()
}

#[tokio::test]
async fn registry_keys_have_ttls_and_cluster_view_lists_both() {
    local(async {
        let hub = MemoryHub::default();
        let (a, _b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(3).await;
        let node = hub.hash("ringside:node:a");
        assert_eq!(node.get("url").map(String::as_str), Some("ws://a/ws"));
        assert!(hub.ttl("ringside:node:a").unwrap() <= Duration::from_millis(3 * INTERVAL_MS));
        assert_eq!(hub.hash("ringside:pool:a:1").get("max").map(String::as_str), Some("100"));
        let view = a.cluster().cluster_json();
        assert_eq!(view["nodes"].as_array().map(Vec::len), Some(2), "{view}");
        assert!(view["least_loaded"]["node"].is_string());
    })
    .await;
}

#[tokio::test]
async fn affinity_hint_names_the_previous_live_node() {
    local(async {
        let hub = MemoryHub::default();
        let (a, b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(2).await;
        a.cluster().conn_opened(&Arc::from("carol"), conn(0, 1), 1, true);
        a.cluster().conn_closed(&Arc::from("carol"), conn(0, 1));
        // a writes the affinity in its next batch; b looks it up once, on open.
        for _ in 0..40 {
            if hub.string("ringside:affinity:carol").as_deref() == Some("a") {
                break;
            }
            settle(1).await;
        }
        assert_eq!(hub.string("ringside:affinity:carol").as_deref(), Some("a"));
        settle(2).await;
        assert!(a.drain_all().is_empty(), "no hint on the affinity node itself");
        // On a loaded machine a tick can come later than the 3-interval TTL
        // and `a` drops out of b's view for a moment (by design): then the
        // lookup finds no live node and sends no hint. Reconnect until b sees
        // a live; the hint must then name a, exactly once per connect.
        let mut got = Vec::new();
        for k in 0..5 {
            b.cluster().conn_opened(&Arc::from("carol"), conn(1, 2 + k), 1, true);
            got = drain_until(&b, 1).await;
            if !got.is_empty() {
                assert_eq!(got, vec![Got::Affinity(conn(1, 2 + k), "a".into(), "ws://a/ws".into())], "one hint");
                break;
            }
            b.cluster().conn_closed(&Arc::from("carol"), conn(1, 2 + k));
            // Affinity must point at a again for the next try.
            a.cluster().conn_opened(&Arc::from("carol"), conn(0, 1), 1, true);
            a.cluster().conn_closed(&Arc::from("carol"), conn(0, 1));
            settle(4).await;
        }
        assert!(!got.is_empty(), "no affinity hint in 5 connects");
        for _ in 0..40 {
            if hub.string("ringside:affinity:carol").as_deref() == Some("b") {
                break;
            }
            settle(1).await;
        }
        assert_eq!(hub.string("ringside:affinity:carol").as_deref(), Some("b"), "affinity moves to b");
    })
    .await;
}

#[tokio::test]
async fn breaker_fails_fast_then_reregisters() {
    local(async {
        let hub = MemoryHub::default();
        let a = TestNode::start(&hub, "a");
        settle(2).await;
        a.cluster().conn_opened(&Arc::from("dave"), conn(0, 1), 1, true);
        a.cluster().room_interest(0, "r", true);
        settle(2).await;
        hub.set_down(true);
        settle(1).await;
        assert_eq!(a.cluster().breaker(), BreakerState::Open);
        a.cluster().direct(Arc::from("x"), bytes::Bytes::new(), conn(1, 9), false);
        settle(1).await;
        // Redis cannot be asked: `unavailable`, never `unknown_client`.
        assert_eq!(a.drain_all(), vec![Got::Unavailable(conn(1, 9))], "fails fast while open");
        hub.set_down(false);
        // Backoff is capped at 2 s; the first retries come much sooner.
        for _ in 0..60 {
            if a.cluster().breaker() == BreakerState::Closed {
                break;
            }
            settle(1).await;
        }
        settle(2).await;
        assert_eq!(a.cluster().breaker(), BreakerState::Closed);
        assert_eq!(a.cluster().status.reregistrations.load(Ordering::Relaxed), 1);
        assert_eq!(hub.hash("ringside:conn:dave").get("node").map(String::as_str), Some("a"));
        assert!(hub.channels().contains("ringside:room:r"));
        assert!(hub.channels().contains("ringside:inbox:a"));
    })
    .await;
}

#[tokio::test]
async fn only_named_clients_get_affinity_keys() {
    local(async {
        let hub = MemoryHub::default();
        let a = TestNode::start(&hub, "a");
        settle(2).await;
        a.cluster().conn_opened(&Arc::from("gen0a1"), conn(0, 1), 1, false);
        a.cluster().conn_opened(&Arc::from("named"), conn(0, 2), 1, true);
        a.cluster().conn_closed(&Arc::from("gen0a1"), conn(0, 1));
        for _ in 0..40 {
            if hub.string("ringside:affinity:named").is_some() {
                break;
            }
            settle(1).await;
        }
        assert_eq!(hub.string("ringside:affinity:named").as_deref(), Some("a"));
        settle(2).await;
        assert_eq!(hub.string("ringside:affinity:gen0a1"), None, "a generated id never comes back");
    })
    .await;
}

#[test]
fn rebalance_count_is_the_seed_rule() {
    use super::rebalance_count;
    assert_eq!(rebalance_count(38, 40), 3, "ceil((38 - 32) / 2)");
    assert_eq!(rebalance_count(37, 40), 3, "ceil(2.5)");
    assert_eq!(rebalance_count(32, 40), 0, "at 80 %: nothing to move");
    assert_eq!(rebalance_count(10, 40), 0);
    assert_eq!(rebalance_count(10_000, 10_000), 1_000);
}
