//! The background task behind a [`crate::Client`]: connect, serve the socket, and decide
//! what follows its end (close-code table in `close.rs`): backoff with jitter, a hint's
//! delay and URL, a preemption delay, a token refresh, or stop. After every connect it
//! re-joins the rooms with their last offsets (`since`) and drops replayed duplicates,
//! so nothing kept in history is lost or seen twice across a reconnect.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::client::{Cause, ClientConfig, Cmd, ConnState, Event, Expect, Shared};
use crate::close::{action_for, Action, REPLACED};
use crate::error::{Error, Result, StopReason};
use crate::protocol::{ClientMsg, ErrorCode, ServerMsg, Since};
use crate::token::{jwt_exp, refresh_in, unix_now};

type Ws = WebSocketStream<TcpStream>;

/// How long a normal close may take before the socket is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Requests waiting for their answer, per connection: each is bounded by the request
/// timeout, this bounds them by count (a caller flooding joins gets `Error::Busy`).
const MAX_PENDING: usize = 1024;
/// Retry delay of a failed ahead-of-exp refresh.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// A request waiting for its answer.
struct Pending {
    expect: Expect,
    /// For a refresh: the token that becomes the client's once accepted.
    token: Option<String>,
    reply: Option<oneshot::Sender<Result<ServerMsg>>>,
    deadline: Instant,
}

/// A room message's offset against the room's position.
enum Offset {
    /// The next one: deliver.
    Next,
    /// Already delivered (a replay overlapping live messages): drop.
    Seen,
    /// The room is being left to re-join after a gap: drop (the replay brings it).
    Recovering,
    /// Past the next one: some were lost; recover from this position.
    Gap(Since),
}

/// How a live connection ended.
enum End {
    Closed { code: Option<u16>, reason: String },
    Hint { url: String, after: Duration, reason: String },
    User,
}

/// Why a connect failed.
enum ConnectError {
    Unauthorized(String),
    RetryAfter(Duration, String),
    Failed(String),
}

pub(crate) struct Driver {
    cfg: ClientConfig,
    cmds: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<Event>,
    state: watch::Sender<ConnState>,
    shared: Arc<Shared>,
    token: Option<String>,
    url_index: usize,
    url: String,
    pending: VecDeque<Pending>,
    preempt_delay: Option<Duration>,
    hint: Option<(String, Duration, String)>,
    refresh_at: Option<Instant>,
    ever_connected: bool,
    /// Rooms left to re-join after a gap, until their `left`.
    recovering: std::collections::HashSet<String>,
}

impl Driver {
    pub(crate) fn new(
        cfg: ClientConfig,
        cmds: mpsc::Receiver<Cmd>,
        events: mpsc::Sender<Event>,
        state: watch::Sender<ConnState>,
        shared: Arc<Shared>,
    ) -> Driver {
        let url = cfg.urls[0].clone();
        Driver {
            cfg,
            cmds,
            events,
            state,
            shared,
            token: None,
            url_index: 0,
            url,
            pending: VecDeque::new(),
            preempt_delay: None,
            hint: None,
            refresh_at: None,
            ever_connected: false,
            recovering: std::collections::HashSet::new(),
        }
    }

    async fn emit(&self, e: Event) {
        let _ = self.events.send(e).await;
    }

    fn next_url(&mut self) {
        self.url_index = (self.url_index + 1) % self.cfg.urls.len();
        self.url = self.cfg.urls[self.url_index].clone();
    }

    /// The whole life of the client.
    pub(crate) async fn run(mut self) {
        self.token = self.cfg.auth.fetch().await;
        let mut failed: u32 = 0;
        let mut token_retried = false;
        let mut delay = Duration::ZERO;
        let reason = loop {
            if !delay.is_zero() && !self.wait(delay).await {
                break StopReason::Closed;
            }
            let Some(opened) = self.open_unless_closed().await else { break StopReason::Closed };
            match opened {
                Ok((ws, welcome)) => {
                    failed = 0;
                    token_retried = false;
                    let end = self.live(ws, welcome).await;
                    match self.after_end(end).await {
                        Ok(d) => delay = d,
                        Err(r) => break r,
                    }
                }
                Err(err) => {
                    failed += 1;
                    self.shared.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let (text, floor) = match &err {
                        ConnectError::Unauthorized(t) | ConnectError::Failed(t) => (t.clone(), Duration::ZERO),
                        ConnectError::RetryAfter(d, t) => (t.clone(), *d),
                    };
                    self.emit(Event::ConnectFailed { attempt: failed, error: text.clone() }).await;
                    if let ConnectError::Unauthorized(t) = &err {
                        // A 401: the same token would get the same answer. One new token, else stop.
                        let fresh = if token_retried { None } else { self.cfg.auth.fetch().await };
                        match fresh {
                            Some(tok) if self.cfg.auth.can_refresh() && Some(&tok) != self.token.as_ref() => {
                                self.token = Some(tok);
                                token_retried = true;
                                delay = self.cfg.backoff.delay(0);
                                self.announce(0, delay, Cause::TokenRefreshed).await;
                                continue;
                            }
                            _ => break StopReason::Unauthorized(t.clone()),
                        }
                    }
                    if self.cfg.backoff.exhausted(failed) {
                        break StopReason::GaveUp { attempts: failed, last: text };
                    }
                    self.next_url();
                    delay = self.cfg.backoff.delay(failed).max(floor);
                    let cause = if floor.is_zero() { Cause::Backoff } else { Cause::RetryAfter };
                    self.announce(failed, delay, cause).await;
                }
            }
        };
        self.fail_pending(Error::Stopped(reason.clone()));
        let _ = self.state.send(ConnState::Stopped(reason.clone()));
        self.emit(Event::Stopped(reason)).await;
        // Answer whatever is still queued, then let the channel close.
        self.cmds.close();
        while let Some(cmd) = self.cmds.recv().await {
            if let Cmd::Send { reply, .. } = cmd {
                let _ = reply.send(Err(Error::Stopped(StopReason::Closed)));
            }
        }
    }

    async fn announce(&self, attempt: u32, delay: Duration, cause: Cause) {
        self.emit(Event::Reconnecting { attempt, delay, url: self.url.clone(), cause }).await;
    }

    /// Sleeps `d` while answering requests with `NotConnected`; false when closed meanwhile.
    async fn wait(&mut self, d: Duration) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Cmd::Close) => return false,
                    Some(Cmd::Send { reply, .. }) => { let _ = reply.send(Err(Error::NotConnected)); }
                },
            }
        }
    }

    /// What follows the end of a live connection: the delay before the next connect, or stop.
    async fn after_end(&mut self, end: End) -> std::result::Result<Duration, StopReason> {
        let _ = self.state.send(ConnState::Connecting);
        self.fail_pending(Error::Disconnected);
        let (code, reason) = match end {
            End::User => return Err(StopReason::Closed),
            End::Hint { url, after, reason } => {
                self.shared.stats.hints_followed.fetch_add(1, Ordering::Relaxed);
                // "": the usual address (the configured endpoint, e.g. the balancer), not
                // a node an earlier hint sent us to.
                self.url = if url.is_empty() { self.cfg.urls[self.url_index].clone() } else { url };
                self.emit(Event::Disconnected { code: Some(1000), reason: format!("following hint ({reason})") }).await;
                self.announce(0, after, Cause::Hint(reason)).await;
                return Ok(after);
            }
            End::Closed { code, reason } => (code, reason),
        };
        self.emit(Event::Disconnected { code, reason: reason.clone() }).await;
        match action_for(code, self.preempt_delay.take()) {
            Action::Stop if code == Some(REPLACED) => Err(StopReason::Replaced),
            Action::Stop => Err(StopReason::CloseCode { code: code.unwrap_or(0), reason }),
            Action::Reconnect => {
                let d = self.cfg.backoff.delay(0);
                self.announce(0, d, Cause::Backoff).await;
                Ok(d)
            }
            Action::ReconnectAfter(d) => {
                // Plus jitter, so the preempted do not all return at once.
                let d = d + Duration::from_millis(fastrand::u64(0..=d.as_millis() as u64 / 5));
                self.next_url();
                self.announce(0, d, Cause::Preempted).await;
                Ok(d)
            }
            Action::RefreshThenReconnect => {
                if !self.cfg.auth.can_refresh() {
                    return Err(StopReason::NoToken);
                }
                match self.cfg.auth.fetch().await {
                    None => Err(StopReason::NoToken),
                    Some(t) => {
                        self.token = Some(t);
                        let d = self.cfg.backoff.delay(0);
                        self.announce(0, d, Cause::TokenRefreshed).await;
                        Ok(d)
                    }
                }
            }
        }
    }

    fn fail_pending(&mut self, err: Error) {
        for p in self.pending.drain(..) {
            if let Some(r) = p.reply {
                let _ = r.send(Err(err.clone()));
            }
        }
    }

    /// TCP connect (from `local_addr` when set), upgrade with the token, and the welcome;
    /// `None` when the client was closed meanwhile.
    async fn open_unless_closed(&mut self) -> Option<std::result::Result<(Ws, Welcome), ConnectError>> {
        let url = self.url_with_query();
        let fut = tokio::time::timeout(self.cfg.connect_timeout, open_ws(url, self.token.clone(), &self.cfg));
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => return Some(r.unwrap_or_else(|_| Err(ConnectError::Failed("connect timed out".into())))),
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Cmd::Close) => return None,
                    Some(Cmd::Send { reply, .. }) => { let _ = reply.send(Err(Error::NotConnected)); }
                },
            }
        }
    }

    fn url_with_query(&self) -> String {
        match &self.cfg.client_id {
            None => self.url.clone(),
            Some(id) => {
                let sep = if self.url.contains('?') { '&' } else { '?' };
                format!("{}{sep}client_id={id}", self.url)
            }
        }
    }

    /// Serves one live connection until it ends.
    async fn live(&mut self, mut ws: Ws, welcome: Welcome) -> End {
        let Welcome { client_id, node } = welcome;
        self.recovering.clear(); // the resume joins below recover every room
        self.shared.stats.connects.fetch_add(1, Ordering::Relaxed);
        let _ = self.state.send(ConnState::Connected { client_id: client_id.clone(), url: self.url.clone() });
        let reconnect = std::mem::replace(&mut self.ever_connected, true);
        self.emit(Event::Connected { client_id, node, url: self.url.clone(), reconnect }).await;
        self.schedule_refresh(self.token.as_deref().and_then(jwt_exp));
        if let Err(e) = self.resume(&mut ws).await {
            return End::Closed { code: None, reason: e };
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let refresh_at = self.refresh_at.map(tokio::time::Instant::from_std);
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(end) = self.on_text(t.as_str(), &mut ws).await { return end; }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                        finish_close(&mut ws).await;
                        return End::Closed { code, reason };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return End::Closed { code: None, reason: e.to_string() },
                    None => return End::Closed { code: None, reason: "connection closed".into() },
                },
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Cmd::Close) => {
                        close_normally(&mut ws, "client closed").await;
                        return End::User;
                    }
                    Some(Cmd::Send { reply, .. }) if self.pending.len() >= MAX_PENDING => {
                        let _ = reply.send(Err(Error::Busy));
                    }
                    Some(Cmd::Send { msg, expect, reply }) => {
                        if let Err(e) = self.send(&mut ws, msg, expect, Some(reply)).await {
                            return End::Closed { code: None, reason: e };
                        }
                    }
                },
                _ = sleep_opt(refresh_at) => {
                    if let Err(e) = self.refresh_ahead(&mut ws).await {
                        return End::Closed { code: None, reason: e };
                    }
                }
                _ = tick.tick() => self.expire_pending(),
            }
        }
    }

    /// Re-joins every room with its last position.
    async fn resume(&mut self, ws: &mut Ws) -> std::result::Result<(), String> {
        let rooms: Vec<(String, Option<Since>)> = self
            .shared
            .rooms
            .lock()
            .map(|r| r.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (room, since) in rooms {
            let msg = ClientMsg::Join { room: room.clone(), since };
            self.send(ws, msg, Expect::Joined(room), None).await?;
        }
        Ok(())
    }

    async fn send(
        &mut self,
        ws: &mut Ws,
        msg: ClientMsg,
        expect: Expect,
        reply: Option<oneshot::Sender<Result<ServerMsg>>>,
    ) -> std::result::Result<(), String> {
        if let ClientMsg::Leave { room } = &msg {
            if let Ok(mut r) = self.shared.rooms.lock() {
                r.remove(room);
            }
        }
        let token = match &msg {
            ClientMsg::Refresh { token } => Some(token.clone()),
            _ => None,
        };
        let text = serde_json::to_string(&msg).map_err(|e| e.to_string())?;
        if let Err(e) = ws.send(Message::Text(text.into())).await {
            if let Some(r) = reply {
                let _ = r.send(Err(Error::Disconnected));
            }
            return Err(e.to_string());
        }
        match expect {
            Expect::Written => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(ServerMsg::Unknown));
                }
            }
            expect => {
                let deadline = Instant::now() + self.cfg.request_timeout;
                self.pending.push_back(Pending { expect, token, reply, deadline });
            }
        }
        Ok(())
    }

    fn expire_pending(&mut self) {
        let now = Instant::now();
        while self.pending.front().is_some_and(|p| p.deadline <= now) {
            if let Some(r) = self.pending.pop_front().and_then(|p| p.reply) {
                let _ = r.send(Err(Error::Timeout));
            }
        }
    }

    /// Handles one server message; `Some` when it ends the connection (a hint).
    async fn on_text(&mut self, text: &str, ws: &mut Ws) -> Option<End> {
        let Ok(msg) = serde_json::from_str::<ServerMsg>(text) else { return None };
        match &msg {
            ServerMsg::Message { room, offset: Some(o), .. } => match self.classify(room, *o) {
                Offset::Next => {}
                Offset::Seen => {
                    self.shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Offset::Recovering => return None,
                Offset::Gap(since) => {
                    let room = room.clone();
                    return self
                        .recover_gap(ws, room, since)
                        .await
                        .err()
                        .map(|e| End::Closed { code: None, reason: e });
                }
            },
            // After the gap's leave the room's messages are the replay: in order again.
            ServerMsg::Left { room } => {
                self.recovering.remove(room);
            }
            ServerMsg::Joined { room, offset, epoch, recovered } => {
                self.recovering.remove(room);
                self.on_joined(room, *offset, epoch.as_deref(), *recovered);
            }
            ServerMsg::Preempted { reconnect_delay_ms, .. } => {
                self.preempt_delay = Some(Duration::from_millis(*reconnect_delay_ms));
            }
            ServerMsg::Reconnect { url, after_ms, reason } => {
                self.hint = Some((url.clone(), Duration::from_millis(*after_ms), reason.clone()));
            }
            _ => {}
        }
        if let Some(msg) = self.answer(msg) {
            let is_hint = matches!(msg, ServerMsg::Reconnect { .. });
            self.emit(Event::Message(msg)).await;
            if is_hint {
                return Some(self.follow_hint(ws).await);
            }
        }
        None
    }

    /// Closes normally after a hint; the server may close 1001 first, which is fine.
    async fn follow_hint(&mut self, ws: &mut Ws) -> End {
        let (url, after, reason) = self.hint.take().unwrap_or_default();
        close_normally(ws, "following reconnect hint").await;
        End::Hint { url, after, reason }
    }

    /// Where `offset` of `room` stands against the last one delivered.
    fn classify(&mut self, room: &str, offset: u64) -> Offset {
        if self.recovering.contains(room) {
            return Offset::Recovering;
        }
        let Ok(mut rooms) = self.shared.rooms.lock() else { return Offset::Next };
        match rooms.get_mut(room) {
            Some(Some(since)) if offset <= since.offset => Offset::Seen,
            Some(Some(since)) if offset > since.offset + 1 => Offset::Gap(since.clone()),
            Some(Some(since)) => {
                since.offset = offset;
                Offset::Next
            }
            _ => Offset::Next,
        }
    }

    /// A gap in a room's offsets (a message lost on the way: a full mailbox, the Redis
    /// path): leave and join again with `since` at the last offset delivered; the replay
    /// brings the missing ones, in order. Until the `left`, live messages of the room are
    /// dropped (the replay has them too).
    async fn recover_gap(&mut self, ws: &mut Ws, room: String, since: Since) -> std::result::Result<(), String> {
        self.recovering.insert(room.clone());
        self.shared.stats.gaps_recovered.fetch_add(1, Ordering::Relaxed);
        for msg in [ClientMsg::Leave { room: room.clone() }, ClientMsg::Join { room: room.clone(), since: Some(since) }]
        {
            let text = serde_json::to_string(&msg).map_err(|e| e.to_string())?;
            ws.send(Message::Text(text.into())).await.map_err(|e| e.to_string())?;
        }
        let deadline = Instant::now() + self.cfg.request_timeout;
        self.pending.push_back(Pending { expect: Expect::Left(room.clone()), token: None, reply: None, deadline });
        self.pending.push_back(Pending { expect: Expect::Joined(room), token: None, reply: None, deadline });
        Ok(())
    }

    fn on_joined(&mut self, room: &str, offset: Option<u64>, epoch: Option<&str>, recovered: Option<bool>) {
        let Ok(mut rooms) = self.shared.rooms.lock() else { return };
        // Epoch "none": the node cannot reach its store right now (e.g. just restarted).
        // Keep the position: the room's next message shows as a gap and recovers from it.
        if epoch == Some("none") && rooms.get(room).is_some_and(Option::is_some) {
            return;
        }
        let since = match (offset, epoch) {
            (Some(o), Some(e)) if e != "none" => {
                let keep = rooms.get(room).cloned().flatten();
                match keep {
                    // Recovered: the replay already moved the position; keep the larger.
                    Some(s) if recovered == Some(true) && s.epoch == e => {
                        Some(Since { offset: s.offset.max(o), epoch: s.epoch })
                    }
                    _ => Some(Since { offset: o, epoch: e.to_string() }),
                }
            }
            _ => None,
        };
        rooms.insert(room.to_string(), since);
    }

    fn on_refreshed(&mut self) {
        self.shared.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        self.schedule_refresh(self.token.as_deref().and_then(jwt_exp));
    }

    fn schedule_refresh(&mut self, exp: Option<u64>) {
        self.refresh_at = match (self.cfg.refresh_ahead, exp, self.cfg.auth.can_refresh()) {
            (Some(ahead), Some(exp), true) => Some(Instant::now() + refresh_in(exp, ahead, unix_now())),
            _ => None,
        };
    }

    /// Asks the token callback for a new token and sends `refresh`.
    async fn refresh_ahead(&mut self, ws: &mut Ws) -> std::result::Result<(), String> {
        self.refresh_at = Some(Instant::now() + REFRESH_RETRY);
        let fetched = tokio::time::timeout(self.cfg.request_timeout, self.cfg.auth.fetch()).await;
        match fetched {
            Ok(Some(token)) => self.send(ws, ClientMsg::Refresh { token }, Expect::Refreshed, None).await,
            // No token now: retry later; 4003 follows if none ever comes.
            _ => Ok(()),
        }
    }

    /// Hands an answer to the request waiting for it; returns messages nobody waits for.
    fn answer(&mut self, msg: ServerMsg) -> Option<ServerMsg> {
        let Some(idx) = self.pending.iter().position(|p| answers(&p.expect, &msg)) else { return Some(msg) };
        let p = self.pending.remove(idx)?;
        if let (ServerMsg::Refreshed { .. }, Some(token)) = (&msg, p.token) {
            self.token = Some(token);
            self.on_refreshed();
        }
        let result = match msg {
            ServerMsg::Error { code, message, backend, .. } => Err(Error::Server { code, message, backend }),
            other => Ok(other),
        };
        match p.reply {
            Some(r) => {
                let _ = r.send(result);
                None
            }
            // The leave of a gap recovery is the client's business only.
            None if matches!(p.expect, Expect::Left(_)) => None,
            // The client's own requests (resume joins, refresh ahead): the application hears them.
            None => match result {
                Ok(m) => Some(m),
                Err(Error::Server { code, message, backend }) => {
                    Some(ServerMsg::Error { code, message, id: None, backend })
                }
                Err(_) => None,
            },
        }
    }
}

/// Whether `msg` answers a request waiting for `expect`. Errors carry no request id; an
/// error goes to the oldest waiting request that can be refused with that code
/// (publish and direct are not waited for, so their refusals become events).
fn answers(expect: &Expect, msg: &ServerMsg) -> bool {
    use ErrorCode::*;
    match (expect, msg) {
        (Expect::Joined(r), ServerMsg::Joined { room, .. }) => r == room,
        (Expect::Left(r), ServerMsg::Left { room }) => r == room,
        (Expect::Presence(r), ServerMsg::Presence { room, .. }) => r == room,
        (Expect::Echo, ServerMsg::Echo { .. }) => true,
        (Expect::Pong(id), ServerMsg::Pong { id: got }) => id == got,
        (Expect::Refreshed, ServerMsg::Refreshed { .. }) => true,
        (Expect::Rpc(want), ServerMsg::RpcResult { id, .. }) => want == id,
        // An error with an id answers that rpc and nothing else.
        (Expect::Rpc(want), ServerMsg::Error { id: Some(id), .. }) => want == id,
        (_, ServerMsg::Error { id: Some(_), .. }) => false,
        (e, ServerMsg::Error { code, .. }) => match e {
            Expect::Joined(_) => matches!(code, Forbidden | TooManyRooms | BadRoom | RateLimited | MissingField),
            Expect::Left(_) => matches!(code, BadRoom | MissingField),
            Expect::Presence(_) => matches!(code, Forbidden | BadRoom | MissingField),
            Expect::Echo => matches!(code, TooLarge),
            Expect::Refreshed => matches!(code, InvalidToken | Forbidden | UnknownType | MissingField | RateLimited),
            Expect::Pong(_) | Expect::Written | Expect::Rpc(_) => false,
        },
        _ => false,
    }
}

async fn sleep_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends a close 1000 and waits (bounded) for the server's.
async fn close_normally(ws: &mut Ws, reason: &str) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: reason.to_string().into() };
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        let _ = ws.send(Message::Close(Some(frame))).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// After the server's close frame: let tungstenite write its reply.
async fn finish_close(ws: &mut Ws) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

async fn connect_tcp(host: &str, port: u16, cfg: &ClientConfig) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = cfg.local_addr {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        match sock.connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What the welcome said.
struct Welcome {
    client_id: String,
    node: String,
}

async fn open_ws(
    url: String,
    token: Option<String>,
    cfg: &ClientConfig,
) -> std::result::Result<(Ws, Welcome), ConnectError> {
    let mut req = url.as_str().into_client_request().map_err(|e| ConnectError::Failed(e.to_string()))?;
    if let Some(t) = &token {
        let v =
            format!("Bearer {t}").parse().map_err(|_| ConnectError::Failed("token is not a header value".into()))?;
        req.headers_mut().insert("authorization", v);
    }
    let host = req.uri().host().unwrap_or("127.0.0.1").trim_matches(['[', ']']).to_string();
    let port = req.uri().port_u16().unwrap_or(80);
    let tcp =
        connect_tcp(&host, port, cfg).await.map_err(|e| ConnectError::Failed(format!("connect {host}:{port}: {e}")))?;
    let wscfg = WebSocketConfig::default().read_buffer_size(cfg.read_buffer_bytes).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(wscfg)).await.map_err(refusal)?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(t.as_str()) {
                Ok(ServerMsg::Welcome { client_id, node, .. }) => return Ok((ws, Welcome { client_id, node })),
                _ => return Err(ConnectError::Failed(format!("expected a welcome, got {t}"))),
            },
            Some(Ok(Message::Close(f))) => {
                return Err(ConnectError::Failed(format!("closed before the welcome: {f:?}")));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(ConnectError::Failed(e.to_string())),
            None => return Err(ConnectError::Failed("closed before the welcome".into())),
        }
    }
}

/// Sorts an upgrade failure: 401, 429/503 with `Retry-After`, or anything else.
fn refusal(e: WsError) -> ConnectError {
    let WsError::Http(resp) = &e else { return ConnectError::Failed(e.to_string()) };
    let status = resp.status().as_u16();
    let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().trim().to_string();
    let text = format!("HTTP {status}: {body}");
    match status {
        401 => ConnectError::Unauthorized(text),
        429 | 503 => {
            let secs = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1);
            ConnectError::RetryAfter(Duration::from_secs(secs.min(300)), text)
        }
        _ => ConnectError::Failed(text),
    }
}
