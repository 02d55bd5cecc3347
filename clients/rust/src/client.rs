//! The client handle: configuration ([`ClientConfig`]), the typed request API
//! ([`Client`]), what the application hears ([`Event`]) and the connection state. The
//! connection itself lives in a background task (`driver.rs`) that reconnects, resumes
//! rooms and follows hints; the handle talks to it over a bounded channel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::error::{Error, Result, StopReason};
use crate::protocol::{ClientMsg, ServerMsg, Since};
use crate::token::Auth;

/// Client settings; [`ClientConfig::new`] fills in the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Endpoints (`ws://host:port/ws`), tried in turn: each backoff retry moves to the next.
    pub urls: Vec<String>,
    /// Token or anonymous. Default anonymous.
    pub auth: Auth,
    /// `?client_id=` to ask for (auth mode `none` with `auth.allow_client_ids`). Default none.
    pub client_id: Option<String>,
    /// Reconnect backoff. Default [`Backoff::default`] (500 ms base, 30 s cap, full jitter).
    pub backoff: Backoff,
    /// TCP connect + upgrade + welcome. Default 10 s.
    pub connect_timeout: Duration,
    /// How long `join`, `presence`, `echo`, `ping`, `refresh` wait for their answer. Default 10 s.
    pub request_timeout: Duration,
    /// Refresh the token when this share of its remaining lifetime has passed (the token
    /// callback is asked for a new one). `None`: never refresh ahead (wait for 4003).
    /// Default `Some(0.8)`.
    pub refresh_ahead: Option<f64>,
    /// Events buffered for the application; when full the client stops reading the socket
    /// (backpressure reaches the server, which applies its slow-consumer policy). Default 1024.
    pub event_capacity: usize,
    /// Source address to bind before connecting (load tests spread over 127.0.0.x). Default none.
    pub local_addr: Option<IpAddr>,
    /// tungstenite read buffer per connection. Default 16 KiB (tungstenite's 128 KiB
    /// default is resident per connection: 1.3 GB at 10,000 clients).
    pub read_buffer_bytes: usize,
}

impl ClientConfig {
    /// Defaults for one endpoint.
    pub fn new(url: impl Into<String>) -> ClientConfig {
        ClientConfig::with_urls(vec![url.into()])
    }

    /// Defaults for several endpoints.
    pub fn with_urls(urls: Vec<String>) -> ClientConfig {
        ClientConfig {
            urls,
            auth: Auth::Anonymous,
            client_id: None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            refresh_ahead: Some(0.8),
            event_capacity: 1024,
            local_addr: None,
            read_buffer_bytes: 16 * 1024,
        }
    }
}

/// Why the client waits before its next connect.
#[derive(Debug, Clone, PartialEq)]
pub enum Cause {
    /// The connection ended or a connect failed: exponential backoff.
    Backoff,
    /// A `reconnect` hint from the server (its reason): its `after_ms`, no backoff.
    Hint(String),
    /// A 4004 preemption: the `preempted` message's delay.
    Preempted,
    /// A 429/503 with `Retry-After`.
    RetryAfter,
    /// A 4003 or 401: a new token was fetched.
    TokenRefreshed,
}

/// What the application hears, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The welcome arrived. `reconnect` is false only for the first connection.
    Connected {
        /// The session's client id.
        client_id: String,
        /// The node's id.
        node: String,
        /// The URL connected to.
        url: String,
        /// Whether this replaces an earlier connection.
        reconnect: bool,
    },
    /// A server message that is not the answer to a request: room messages, directs,
    /// presence events, errors of publish/direct, `joined` of rooms re-joined after a
    /// reconnect (with `recovered`), hints, affinity.
    Message(ServerMsg),
    /// The connection ended (`code` `None`: no close frame).
    Disconnected {
        /// The close code.
        code: Option<u16>,
        /// The close reason or the I/O error.
        reason: String,
    },
    /// A connect attempt failed.
    ConnectFailed {
        /// Failed attempts in a row.
        attempt: u32,
        /// What happened.
        error: String,
    },
    /// The client waits `delay`, then connects to `url`.
    Reconnecting {
        /// Failed attempts in a row so far (0 after a live connection ended).
        attempt: u32,
        /// The wait.
        delay: Duration,
        /// The next URL.
        url: String,
        /// Why this wait.
        cause: Cause,
    },
    /// The client stopped for good.
    Stopped(StopReason),
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    /// Connecting or waiting to reconnect.
    Connecting,
    /// Live, after the welcome.
    Connected {
        /// The session's client id.
        client_id: String,
        /// The URL.
        url: String,
    },
    /// Stopped for good.
    Stopped(StopReason),
}

/// The answer to a `join`.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    /// Room name.
    pub room: String,
    /// The room's current offset (rooms with history).
    pub offset: Option<u64>,
    /// Its epoch (rooms with history).
    pub epoch: Option<String>,
    /// Whether `since` was recovered (when given).
    pub recovered: Option<bool>,
}

/// Counters of one client (monotonic).
#[derive(Debug, Default)]
pub struct Stats {
    /// Welcomes received.
    pub connects: AtomicU64,
    /// Connect attempts that failed.
    pub connect_failures: AtomicU64,
    /// Hints followed.
    pub hints_followed: AtomicU64,
    /// Room messages dropped because their offset was already seen (replay overlap).
    pub duplicates_dropped: AtomicU64,
    /// Tokens refreshed on a live connection.
    pub refreshes: AtomicU64,
    /// Gaps in a room's offsets recovered by re-joining with `since`.
    pub gaps_recovered: AtomicU64,
}

impl Stats {
    /// Reads one counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// What a request waits for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expect {
    /// Nothing: done once written.
    Written,
    /// `joined` of the room.
    Joined(String),
    /// `left` of the room.
    Left(String),
    /// `presence` of the room.
    Presence(String),
    /// `echo`.
    Echo,
    /// `pong` with this id.
    Pong(Value),
    /// `refreshed`.
    Refreshed,
    /// `rpc_result` (or an error) with this id.
    Rpc(Value),
}

/// A command to the driver.
pub(crate) enum Cmd {
    Send { msg: ClientMsg, expect: Expect, reply: oneshot::Sender<Result<ServerMsg>> },
    Close,
}

/// State shared by handle and driver.
pub(crate) struct Shared {
    pub rooms: Mutex<BTreeMap<String, Option<Since>>>,
    pub stats: Stats,
    pub ping_seq: AtomicU64,
}

/// A handle to one logical connection; cheap to clone. Dropping every handle closes it.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Cmd>,
    state: watch::Receiver<ConnState>,
    shared: Arc<Shared>,
}

/// The application's side of the event stream.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client stopped and everything was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event within `d`.
    pub async fn recv_timeout(&mut self, d: Duration) -> Option<Event> {
        tokio::time::timeout(d, self.rx.recv()).await.ok().flatten()
    }

    /// An event already buffered, without waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Client {
    /// Starts the client on the current tokio runtime. Returns at once; it connects in
    /// the background (see [`Client::wait_connected`]).
    pub fn start(config: ClientConfig) -> Result<(Client, Events)> {
        if config.urls.is_empty() {
            return Err(Error::Config("no url".into()));
        }
        if let Some(bad) = config.urls.iter().find(|u| !u.starts_with("ws://")) {
            return Err(Error::Config(format!("{bad}: only ws:// URLs (no TLS in this client)")));
        }
        let (tx, cmds) = mpsc::channel(256);
        let (events_tx, rx) = mpsc::channel(config.event_capacity.max(1));
        let (state_tx, state) = watch::channel(ConnState::Connecting);
        let shared = Arc::new(Shared { rooms: Mutex::default(), stats: Stats::default(), ping_seq: AtomicU64::new(0) });
        let driver = crate::driver::Driver::new(config, cmds, events_tx, state_tx, shared.clone());
        tokio::spawn(driver.run());
        Ok((Client { tx, state, shared }, Events { rx }))
    }

    /// The connection state now.
    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    /// Whether the connection is live.
    pub fn is_connected(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Connected { .. })
    }

    /// Waits until connected (or stopped: then the stop reason), at most `d`.
    pub async fn wait_connected(&self, d: Duration) -> Result<()> {
        let mut state = self.state.clone();
        let wait = async move {
            match state.wait_for(|s| !matches!(s, ConnState::Connecting)).await {
                Err(_) => Err(Error::Stopped(StopReason::Closed)),
                Ok(s) => match &*s {
                    ConnState::Stopped(r) => Err(Error::Stopped(r.clone())),
                    _ => Ok(()),
                },
            }
        };
        tokio::time::timeout(d, wait).await.unwrap_or(Err(Error::Timeout))
    }

    /// Rooms this client is in, with the position it would resume from.
    pub fn rooms(&self) -> BTreeMap<String, Option<Since>> {
        self.shared.rooms.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The client's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    async fn request(&self, msg: ClientMsg, expect: Expect) -> Result<ServerMsg> {
        if let ConnState::Stopped(r) = self.state() {
            return Err(Error::Stopped(r));
        }
        let (reply, rx) = oneshot::channel();
        self.tx.send(Cmd::Send { msg, expect, reply }).await.map_err(|_| Error::Stopped(StopReason::Closed))?;
        rx.await.map_err(|_| Error::Disconnected)?
    }

    /// Joins `room` (a room already joined is re-joined with its `since`); after a
    /// reconnect the client re-joins it by itself.
    pub async fn join(&self, room: &str) -> Result<Joined> {
        let since = self.shared.rooms.lock().ok().and_then(|r| r.get(room).cloned().flatten());
        match self.request(ClientMsg::Join { room: room.into(), since }, Expect::Joined(room.into())).await? {
            ServerMsg::Joined { room, offset, epoch, recovered } => Ok(Joined { room, offset, epoch, recovered }),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves `room` (and stops re-joining it).
    pub async fn leave(&self, room: &str) -> Result<()> {
        self.request(ClientMsg::Leave { room: room.into() }, Expect::Left(room.into())).await.map(drop)
    }

    /// Publishes `data` to `room`. Returns once written: the server answers only
    /// refusals, which arrive as [`Event::Message`] errors.
    pub async fn publish(&self, room: &str, data: Value) -> Result<()> {
        self.request(ClientMsg::Publish { room: room.into(), data }, Expect::Written).await.map(drop)
    }

    /// Sends `data` to client id `to` (refusals arrive as events, like publish).
    pub async fn direct(&self, to: &str, data: Value) -> Result<()> {
        self.request(ClientMsg::Direct { to: to.into(), data }, Expect::Written).await.map(drop)
    }

    /// Who is in `room`.
    pub async fn presence(&self, room: &str) -> Result<Vec<String>> {
        match self.request(ClientMsg::Presence { room: room.into() }, Expect::Presence(room.into())).await? {
            ServerMsg::Presence { clients, .. } => Ok(clients),
            other => Err(unexpected(other)),
        }
    }

    /// The server's echo of `data`.
    pub async fn echo(&self, data: Value) -> Result<Value> {
        match self.request(ClientMsg::Echo { data }, Expect::Echo).await? {
            ServerMsg::Echo { data } => Ok(data),
            other => Err(unexpected(other)),
        }
    }

    /// An application-level round trip.
    pub async fn ping(&self) -> Result<Duration> {
        let id = Value::from(self.shared.ping_seq.fetch_add(1, Ordering::Relaxed));
        let start = Instant::now();
        self.request(ClientMsg::Ping { id: id.clone() }, Expect::Pong(id)).await?;
        Ok(start.elapsed())
    }

    /// Replaces the connection's token with `token` (also used for later reconnects);
    /// returns the new `exp`.
    pub async fn refresh(&self, token: &str) -> Result<u64> {
        match self.request(ClientMsg::Refresh { token: token.into() }, Expect::Refreshed).await? {
            ServerMsg::Refreshed { exp } => Ok(exp),
            other => Err(unexpected(other)),
        }
    }

    /// Calls `method` on the backend that the node's `[[proxy.rpc]]` routes it to; returns
    /// its answer. Refusals: `rpc_failed` (no route, or the backend's own error, in
    /// `backend`), `backend_unavailable`, `rate_limited` (past
    /// `proxy.max_in_flight_per_connection`). Answers are matched by id, in any order.
    pub async fn rpc(&self, method: &str, data: Value) -> Result<Value> {
        let id = Value::from(self.shared.ping_seq.fetch_add(1, Ordering::Relaxed));
        let msg = ClientMsg::Rpc { id: id.clone(), method: method.into(), data };
        match self.request(msg, Expect::Rpc(id)).await? {
            ServerMsg::RpcResult { data, .. } => Ok(data),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the connection normally and stops reconnecting.
    pub async fn close(&self) {
        let _ = self.tx.send(Cmd::Close).await;
        let mut state = self.state.clone();
        let stopped = async move {
            let _ = state.wait_for(|s| matches!(s, ConnState::Stopped(_))).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), stopped).await;
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("state", &self.state()).finish()
    }
}

fn unexpected(m: ServerMsg) -> Error {
    Error::Config(format!("unexpected answer {m:?}"))
}
