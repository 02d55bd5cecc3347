//! The application behind the node (Centrifugo's proxies, Pushpin's
//! backend calls): the connect proxy at upgrade, `rpc`, the publish proxy
//! and disconnect notices, over the pools of [`crate::upstream`].
//!
//! Every call leaves the shard as a message to the upstream thread and
//! comes back as [`AppMsg::Backend`] in the caller's own mailbox: a shard
//! never waits. An upgrade that needs the connect backend's verdict is
//! parked (`Answer::Wait`) on a [`ConnectWait`], woken when the verdict
//! arrives, and bounded by its own deadline inside the handshake timeout.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::protocol::{self, ClientError};
use super::{AppMsg, Edge};
use crate::config::{Class, Config};
use crate::runtime::mailbox::ShardMsg;
use crate::runtime::table::ConnId;
use crate::runtime::{Conns, NodeState};
use crate::upstream::{Call, Failure, NoticeSpec, Response, Upstreams};

/// The node's handle on its backends.
pub struct Backend {
    /// The pools.
    pub upstreams: Upstreams,
    node: Arc<NodeState<AppMsg>>,
    connect: Option<usize>,
    /// The disconnect notice stream (always notice target 0 when set).
    disconnect: bool,
}

impl Backend {
    /// Starts the upstream thread when `[[upstream]]` has entries.
    pub fn start(node: Arc<NodeState<AppMsg>>) -> std::io::Result<Option<Arc<Backend>>> {
        let cfg = &node.config;
        if cfg.upstream.is_empty() {
            return Ok(None);
        }
        let index = |name: &str| cfg.upstream.iter().position(|u| u.name == name);
        let p = &cfg.proxy;
        let notices: Vec<NoticeSpec> = index(&p.disconnect)
            .map(|pool| NoticeSpec {
                pool,
                path: p.disconnect_path.clone(),
                key: "disconnects".into(),
                batch: p.disconnect_batch,
                flush_ms: p.disconnect_flush_ms,
                queue: p.disconnect_queue,
            })
            .into_iter()
            .collect();
        let disconnect = !notices.is_empty();
        let upstreams = Upstreams::start(&cfg.upstream, notices, p.queue_capacity)?;
        let connect = index(&p.connect);
        Ok(Some(Arc::new(Backend { upstreams, node, connect, disconnect })))
    }

    /// A reply that posts the answer to `conn`'s shard.
    fn call(&self, pool: usize, conn: ConnId, asked: Asked, path: &str, body: String, deadline: Option<Instant>) {
        let node = self.node.clone();
        let reply = Box::new(move |result| {
            let msg = AppMsg::Backend(Box::new(Answered { conn, asked, result }));
            if let Some(s) = node.shards.get(conn.shard()) {
                let _ = s.mailbox.send(ShardMsg::App(msg));
            }
        });
        self.upstreams.call(pool, Call { path: path.to_string(), body: body.into(), deadline, reply });
    }
}

/// What was asked, to know what to do with the answer.
#[derive(Debug)]
pub enum Asked {
    /// The connect proxy, for an upgrade.
    Connect,
    /// An `rpc` with this id (raw JSON).
    Rpc {
        /// The client's id.
        id: Box<str>,
    },
    /// A publish to `room` of `data`, waiting for the backend's verdict.
    Publish {
        /// Room.
        room: Box<str>,
        /// The client's data (raw JSON).
        data: Box<str>,
    },
}

/// A backend's answer, on its way back to the asking shard.
#[derive(Debug)]
pub struct Answered {
    /// Who asked.
    pub conn: ConnId,
    /// What.
    pub asked: Asked,
    /// The answer.
    pub result: Result<Response, Failure>,
}

/// What the connect backend decided.
#[derive(Debug)]
pub enum Verdict {
    /// Admit, with these settings.
    Allow(Box<Grant>),
    /// Refuse (403) with the backend's code and reason.
    Deny(String),
    /// No answer (503, or the token fallback).
    Unavailable(&'static str),
}

/// The connect backend's `{"client_id","rooms","class","data"}`.
#[derive(Debug, Default)]
pub struct Grant {
    /// The client id to use (else the token's, the client's or a generated one).
    pub client_id: Option<String>,
    /// Rooms to join at once.
    pub rooms: Vec<String>,
    /// Priority class.
    pub class: Option<Class>,
    /// Raw JSON for the welcome's `data`.
    pub data: Option<Box<str>>,
}

/// What an upgrade parked on the connect backend is waiting for.
#[derive(Debug)]
pub enum Pending {
    /// Asked; the waker of the parked upgrade.
    Waiting(Option<Waker>),
    /// Answered.
    Done(Verdict),
}

/// Parked upgrades, by connection.
pub type Connects = Rc<RefCell<HashMap<ConnId, Pending>>>;

/// The future an upgrade waits on: ready when the verdict is in (or its
/// deadline passed, which counts as unavailable). Dropped early (the socket
/// went away), it forgets the question.
pub struct ConnectWait {
    map: Connects,
    id: ConnId,
    sleep: Pin<Box<monoio::time::Sleep>>,
}

impl Future for ConnectWait {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut map = self.map.borrow_mut();
            match map.get_mut(&self.id) {
                Some(Pending::Waiting(w)) => *w = Some(cx.waker().clone()),
                _ => return Poll::Ready(()),
            }
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.map
                .borrow_mut()
                .insert(self.id, Pending::Done(Verdict::Unavailable("the backend did not answer in time")));
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for ConnectWait {
    fn drop(&mut self) {
        let mut map = self.map.borrow_mut();
        if matches!(map.get(&self.id), Some(Pending::Waiting(_))) {
            map.remove(&self.id);
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    class: Option<String>,
}

/// A backend's JSON answer, `Err(message)` when it is not one.
fn wire(r: &Response) -> Result<Wire<'_>, String> {
    if !(200..300).contains(&r.status) {
        return Err(format!("backend answered HTTP {}", r.status));
    }
    let text = std::str::from_utf8(&r.body).map_err(|_| "backend answer is not UTF-8".to_string())?;
    serde_json::from_str(text).map_err(|_| "backend answer is not the expected JSON object".to_string())
}

/// The backend's `error` as `"code: reason"`.
fn error_text(e: &Value) -> String {
    let code = match &e["code"] {
        Value::String(s) => s.clone(),
        Value::Null => "denied".into(),
        other => other.to_string(),
    };
    match e["reason"].as_str() {
        Some(r) => format!("{code}: {r}"),
        None => code,
    }
}

/// The connect backend's answer as a verdict.
pub fn verdict(result: &Result<Response, Failure>) -> Verdict {
    let r = match result {
        Ok(r) => r,
        Err(f) => return Verdict::Unavailable(f.reason()),
    };
    if (400..500).contains(&r.status) {
        return Verdict::Deny(format!("backend answered HTTP {}", r.status));
    }
    let w = match wire(r) {
        Ok(w) => w,
        Err(_) => return Verdict::Unavailable("the backend's answer was not understood"),
    };
    if let Some(e) = &w.error {
        return Verdict::Deny(error_text(e));
    }
    let bad_id = w.client_id.as_deref().is_some_and(|c| !protocol::valid_client_id(c));
    let bad_room = w.rooms.iter().flatten().any(|r| !protocol::valid_room(r));
    let class = w.class.as_deref().map(Class::parse);
    if bad_id || bad_room || class == Some(None) {
        return Verdict::Unavailable("the backend answered an invalid client_id, room or class");
    }
    Verdict::Allow(Box::new(Grant {
        client_id: w.client_id,
        rooms: w.rooms.unwrap_or_default(),
        class: class.flatten(),
        data: w.data.map(|d| Box::from(d.get())),
    }))
}

/// The body POSTed to the connect backend.
pub fn connect_body(
    cfg: &Config,
    head: &[u8],
    addr: Option<std::net::IpAddr>,
    claims: Option<&super::auth::Claims>,
    client_id: Option<&str>,
    node: &str,
) -> String {
    let parsed = crate::transport::http::parse(head, cfg.server.max_request_bytes);
    let (headers, query) = match &parsed {
        crate::transport::http::Parsed::Complete(h) => {
            let hs: serde_json::Map<String, Value> = cfg
                .proxy
                .connect_headers
                .iter()
                .filter_map(|n| h.header(n).map(|v| (n.to_ascii_lowercase(), json!(v))))
                .collect();
            (Value::Object(hs), h.query().to_string())
        }
        _ => (json!({}), String::new()),
    };
    let claims = claims.map(|c| json!({"sub": &*c.sub, "exp": c.exp, "class": c.class.name()}));
    json!({"addr": addr.map(|a| a.to_string()), "headers": headers, "query": query, "claims": claims,
        "client_id": client_id, "node": node, "path": "/ws"})
    .to_string()
}

/// How long a parked upgrade may wait: inside the handshake timeout, with
/// room for the 503 (the runtime's own margin is 250 ms).
pub fn connect_budget(cfg: &Config) -> Duration {
    let hs = cfg.server.handshake_timeout_ms;
    Duration::from_millis(hs.saturating_sub(500).max(hs / 2))
}

impl Edge {
    fn backend(&self) -> Option<&Arc<Backend>> {
        self.shared.backend.as_ref()
    }

    /// The connect proxy's pool, when it is on.
    pub(super) fn connect_pool(&self) -> Option<usize> {
        self.backend().and_then(|b| b.connect)
    }

    /// Asks the connect backend about upgrade `id` and parks it.
    pub(super) fn ask_connect(
        &self,
        pool: usize,
        id: ConnId,
        path: &str,
        body: String,
        budget: Duration,
    ) -> ConnectWait {
        self.connects.borrow_mut().insert(id, Pending::Waiting(None));
        let deadline = Instant::now() + budget;
        if let Some(b) = self.backend() {
            b.call(pool, id, Asked::Connect, path, body, Some(deadline));
        }
        // The future's own timer fires a little after the call's deadline,
        // so that a late answer still wins when it made it.
        let sleep = Box::pin(monoio::time::sleep(budget + Duration::from_millis(50)));
        ConnectWait { map: self.connects.clone(), id, sleep }
    }

    /// The verdict for `id`, if one is in (taken).
    pub(super) fn take_verdict(&self, id: ConnId) -> Option<Verdict> {
        let mut map = self.connects.borrow_mut();
        match map.get(&id) {
            Some(Pending::Done(_)) => match map.remove(&id) {
                Some(Pending::Done(v)) => Some(v),
                _ => None,
            },
            _ => None,
        }
    }

    /// `{"type":"rpc",...}`.
    pub(super) fn rpc<C: Conns<Self>>(&self, cx: &C, id: ConnId, from: &str, rid: &str, method: &str, data: &str) {
        let m = &self.shared.metrics[self.shard];
        if !protocol::valid_room(method) {
            m.client_errors[ClientError::RpcFailed.index()].inc();
            cx.send_text(
                id,
                &protocol::error_for(ClientError::RpcFailed, rid, "method must be 1-128 of [A-Za-z0-9_.:-]", None),
            );
            return;
        }
        let cfg = &cx.node().config;
        let route = cfg.proxy.rpc_route(method);
        let (Some(b), Some(route)) = (self.backend(), route) else {
            m.client_errors[ClientError::RpcFailed.index()].inc();
            cx.send_text(id, &protocol::error_for(ClientError::RpcFailed, rid, "no backend serves this method", None));
            return;
        };
        let Some(pool) = b.upstreams.index(&route.upstream) else { return };
        if !self.take_in_flight(cx, id) {
            m.client_errors[ClientError::RateLimited.index()].inc();
            let text = "too many RPCs and proxied publishes outstanding (proxy.max_in_flight_per_connection)";
            cx.send_text(id, &protocol::error_for(ClientError::RateLimited, rid, text, None));
            return;
        }
        let body =
            format!(r#"{{"client_id":"{from}","node":"{}","method":"{method}","data":{data}}}"#, cx.node().node_id);
        b.call(pool, id, Asked::Rpc { id: Box::from(rid) }, &route.path, body, None);
    }

    /// A publish to a room with a `[[proxy.publish]]` route: asks first.
    /// False when no route applies (publish as usual).
    pub(super) fn publish_via_backend<C: Conns<Self>>(
        &self,
        cx: &C,
        id: ConnId,
        room: &str,
        from: &str,
        data: &str,
    ) -> bool {
        let Some(b) = self.backend() else { return false };
        let Some(route) = cx.node().config.proxy.publish_route(room) else { return false };
        let Some(pool) = b.upstreams.index(&route.upstream) else { return false };
        if !self.take_in_flight(cx, id) {
            self.send_error(cx, id, ClientError::RateLimited);
            return true;
        }
        let body = format!(r#"{{"client_id":"{from}","node":"{}","room":"{room}","data":{data}}}"#, cx.node().node_id);
        b.call(pool, id, Asked::Publish { room: Box::from(room), data: Box::from(data) }, &route.path, body, None);
        true
    }

    fn take_in_flight<C: Conns<Self>>(&self, cx: &C, id: ConnId) -> bool {
        let max = cx.node().config.proxy.max_in_flight_per_connection;
        cx.state(id, |s| {
            if s.in_flight >= max {
                return false;
            }
            s.in_flight += 1;
            true
        })
        .unwrap_or(false)
    }

    /// A backend's answer arrived on this shard.
    pub(super) fn answered<C: Conns<Self>>(&self, cx: &C, a: Answered) {
        let Answered { conn, asked, result } = a;
        match asked {
            Asked::Connect => {
                let mut map = self.connects.borrow_mut();
                if let Some(Pending::Waiting(w)) = map.get_mut(&conn) {
                    let waker = w.take();
                    map.insert(conn, Pending::Done(verdict(&result)));
                    drop(map);
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
            }
            Asked::Rpc { id } => {
                let Some(()) = cx.state(conn, |s| s.in_flight = s.in_flight.saturating_sub(1)) else { return };
                self.rpc_answered(cx, conn, &id, &result);
            }
            Asked::Publish { room, data } => {
                let Some(Some(from)) = cx.state(conn, |s| {
                    s.in_flight = s.in_flight.saturating_sub(1);
                    s.client_id.clone()
                }) else {
                    return;
                };
                self.publish_answered(cx, conn, &room, &from, &data, &result);
            }
        }
    }

    fn rpc_answered<C: Conns<Self>>(&self, cx: &C, conn: ConnId, rid: &str, result: &Result<Response, Failure>) {
        let m = &self.shared.metrics[self.shard];
        let fail = |e: ClientError, text: &str, backend: Option<&Value>| {
            m.client_errors[e.index()].inc();
            cx.send_text(conn, &protocol::error_for(e, rid, text, backend));
        };
        let r = match result {
            Ok(r) if r.status >= 500 => {
                return fail(ClientError::RpcFailed, &format!("backend answered HTTP {}", r.status), None)
            }
            Ok(r) => r,
            Err(f) => return fail(ClientError::BackendUnavailable, f.reason(), None),
        };
        match wire(r) {
            Err(text) => fail(ClientError::RpcFailed, &text, None),
            Ok(w) if w.error.is_some() => {
                fail(ClientError::RpcFailed, "the backend answered an error", w.error.as_ref())
            }
            Ok(w) => {
                cx.send_text(conn, &protocol::rpc_result(rid, w.data.map(RawValue::get).unwrap_or("null")));
            }
        }
    }

    fn publish_answered<C: Conns<Self>>(
        &self,
        cx: &C,
        conn: ConnId,
        room: &str,
        from: &Arc<str>,
        data: &str,
        result: &Result<Response, Failure>,
    ) {
        let r = match result {
            Ok(r) => r,
            Err(_) => return self.send_error(cx, conn, ClientError::BackendUnavailable),
        };
        if r.status >= 500 {
            return self.send_error(cx, conn, ClientError::BackendUnavailable);
        }
        match wire(r) {
            Ok(w) if w.error.is_none() => {
                let data = w.data.map(RawValue::get).unwrap_or(data);
                if data.len() > cx.node().config.rooms.max_payload_bytes {
                    return self.send_error(cx, conn, ClientError::TooLarge);
                }
                self.publish_now(cx, conn, room, from, data);
            }
            Ok(w) => {
                self.shared.metrics[self.shard].client_errors[ClientError::PublishRejected.index()].inc();
                let text = w.error.as_ref().map(error_text).unwrap_or_default();
                cx.send_text(conn, &protocol::error(ClientError::PublishRejected, &text));
            }
            Err(text) => {
                self.shared.metrics[self.shard].client_errors[ClientError::PublishRejected.index()].inc();
                cx.send_text(conn, &protocol::error(ClientError::PublishRejected, &text));
            }
        }
    }

    /// Tells the disconnect backend (batched, best effort) that `client` left.
    pub(super) fn notify_disconnect(&self, client: &str, conn: ConnId, node: &str) {
        let Some(b) = self.backend().filter(|b| b.disconnect) else { return };
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let item = format!(r#"{{"client_id":"{client}","conn":{},"node":"{node}","at_ms":{at}}}"#, conn.raw());
        b.upstreams.notice(0, item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ok(body: &str) -> Result<Response, Failure> {
        Ok(Response { status: 200, body: Bytes::from(body.to_string()) })
    }

    #[test]
    fn connect_answers_become_verdicts() {
        match verdict(&ok(r#"{"client_id":"u1","rooms":["a","b"],"class":"high","data":{"n":1}}"#)) {
            Verdict::Allow(g) => {
                assert_eq!(g.client_id.as_deref(), Some("u1"));
                assert_eq!(g.rooms, ["a", "b"]);
                assert_eq!(g.class, Some(Class::High));
                assert_eq!(g.data.as_deref(), Some(r#"{"n":1}"#));
            }
            v => panic!("{v:?}"),
        }
        assert!(
            matches!(verdict(&ok(r#"{"error":{"code":"banned","reason":"go away"}}"#)), Verdict::Deny(t) if t == "banned: go away")
        );
        assert!(matches!(verdict(&ok(r#"{"client_id":"a b"}"#)), Verdict::Unavailable(_)));
        assert!(matches!(verdict(&ok(r#"{"class":"vip"}"#)), Verdict::Unavailable(_)));
        assert!(matches!(verdict(&ok("not json")), Verdict::Unavailable(_)));
        assert!(matches!(verdict(&Err(Failure::CircuitOpen)), Verdict::Unavailable(_)));
        let forbidden = Ok(Response { status: 403, body: Bytes::new() });
        assert!(matches!(verdict(&forbidden), Verdict::Deny(_)));
        assert!(matches!(verdict(&ok("{}")), Verdict::Allow(g) if g.client_id.is_none() && g.rooms.is_empty()));
    }
}
