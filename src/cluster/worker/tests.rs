//! The worker against the in-memory store: two simulated nodes, each with
//! two shard mailboxes whose messages the tests read directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Worker;
use crate::cluster::memory::{MemoryConnector, MemoryHub};
use crate::cluster::{handle, BreakerState, ClusterCmd, ClusterHandle};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::shard::mailbox::{mailbox, MailboxReceiver, ShardMsg};
use crate::shard::table::ConnId;
use crate::shard::{NodeShared, ShardHandle};

const INTERVAL_MS: u64 = 50;

struct TestNode {
    shared: Arc<NodeShared>,
    boxes: Vec<MailboxReceiver>,
}

impl TestNode {
    fn start(hub: &MemoryHub, id: &str) -> TestNode {
        let mut config = Config::default();
        config.cluster.redis_url = "redis://memory".into();
        config.cluster.sync_interval_ms = INTERVAL_MS;
        let mut shards = Vec::new();
        let mut boxes = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = mailbox(1024).unwrap();
            shards.push(ShardHandle { mailbox: tx, metrics: ShardMetrics::default() });
            boxes.push(rx);
        }
        let (cluster, rx) = handle(&config);
        let shared = Arc::new(NodeShared {
            config,
            node_id: id.into(),
            advertise_url: format!("ws://{id}/ws"),
            capacity_per_shard: 100,
            shards,
            draining: AtomicBool::new(false),
            started_at: 1,
            cluster,
        });
        let worker = Worker::new(shared.clone(), MemoryConnector(hub.clone()));
        let rx: mpsc::Receiver<ClusterCmd> = rx.unwrap();
        tokio::task::spawn_local(worker.run(rx));
        TestNode { shared, boxes }
    }

    fn cluster(&self) -> &ClusterHandle {
        self.shared.cluster.as_ref().unwrap()
    }

    /// Every message waiting in shard `i`'s mailbox.
    fn drain(&self, i: usize) -> Vec<ShardMsg> {
        self.boxes[i].rx.try_iter().collect()
    }

    fn drain_all(&self) -> Vec<ShardMsg> {
        (0..self.boxes.len()).flat_map(|i| self.drain(i)).collect()
    }
}

fn conn(shard: usize, slot: usize) -> ConnId {
    ConnId::new(shard, slot, 1)
}

/// Collects what shard `i` of `node` receives until `n` messages arrived or
/// two seconds passed (a loaded test machine may need more than an interval).
async fn drain_until(node: &TestNode, i: usize, n: usize) -> Vec<ShardMsg> {
    let mut got = Vec::new();
    for _ in 0..200 {
        got.extend(node.drain(i));
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
        assert_eq!(at_b.len(), 2, "one Room per shard of b: {at_b:?}");
        assert!(at_b.iter().all(|m| matches!(m, ShardMsg::Room { origin: None, .. })));
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
async fn direct_reaches_the_target_node_or_says_unknown() {
    local(async {
        let hub = MemoryHub::default();
        let (a, b) = (TestNode::start(&hub, "a"), TestNode::start(&hub, "b"));
        settle(2).await;
        b.cluster().conn_opened(&Arc::from("bob"), conn(1, 7));
        // Sent before b's batch wrote bob's conn key: the worker waits for it.
        a.cluster().direct(Arc::from("bob"), bytes::Bytes::from_static(b"frame"), conn(0, 3));
        settle(4).await;
        assert_eq!(hub.hash("ringside:conn:bob").get("node").map(String::as_str), Some("b"));
        let home = b.shared.home_shard("bob");
        let got = b.drain(home);
        assert!(
            matches!(&got[..], [ShardMsg::DirectRoute { to, frame, reply_to: None }] if &**to == "bob" && &frame[..] == b"frame"),
            "{got:?}"
        );
        a.cluster().direct(Arc::from("nobody"), bytes::Bytes::from_static(b"x"), conn(0, 3));
        settle(6).await;
        let got = a.drain(0);
        assert!(matches!(&got[..], [ShardMsg::UnknownClient { to, .. }] if &**to == "nobody"), "{got:?}");
        // Leaving deletes the key (only b's own entry).
        b.cluster().conn_closed(&Arc::from("bob"));
        settle(2).await;
        assert!(hub.hash("ringside:conn:bob").is_empty());
        assert_eq!(hub.string("ringside:affinity:bob").as_deref(), Some("b"));
    })
    .await;
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
        a.cluster().conn_opened(&Arc::from("carol"), conn(0, 1));
        a.cluster().conn_closed(&Arc::from("carol"));
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
        b.cluster().conn_opened(&Arc::from("carol"), conn(1, 2));
        let got = drain_until(&b, 1, 1).await;
        match &got[..] {
            [ShardMsg::Deliver { conn: c, frame }] => {
                assert_eq!(*c, conn(1, 2));
                let text = String::from_utf8_lossy(frame);
                assert!(text.contains("\"type\":\"affinity\"") && text.contains("ws://a/ws"), "{text}");
            }
            other => panic!("expected one affinity hint, got {other:?}"),
        }
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
        a.cluster().conn_opened(&Arc::from("dave"), conn(0, 1));
        a.cluster().room_interest(0, "r", true);
        settle(2).await;
        hub.set_down(true);
        settle(1).await;
        assert_eq!(a.cluster().breaker(), BreakerState::Open);
        a.cluster().direct(Arc::from("x"), bytes::Bytes::new(), conn(1, 9));
        settle(1).await;
        assert!(matches!(&a.drain(1)[..], [ShardMsg::UnknownClient { .. }]), "fails fast while open");
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
