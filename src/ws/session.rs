//! A connection's life: HTTP head, upgrade, the read loop, the writer, and
//! the close.
//!
//! One reader task per connection waits for readability (no buffer pinned
//! while idle), copies what arrived into the shard's shared read buffer,
//! feeds tungstenite, and handles the messages. Replies are queued on the
//! connection and written by the reader itself right after; output that
//! other connections or shards produce is written by a short-lived writer
//! task that exits when the queue is empty. Closing is always: queue the
//! close frame, flush, `shutdown(SHUT_WR)`, read until the peer's EOF or the
//! close deadline, then free the slot.

use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::Message;

use super::handshake::{decide, Decision};
use super::stream::{recv, shutdown, Recv, SharedStream};
use super::Io;
use crate::error::{close, ClientError};
use crate::protocol::{self, Request};
use crate::shard::mailbox::ShardMsg;
use crate::shard::table::{ConnId, Phase, Route};
use crate::shard::{ConnView, Shard};

/// What the reader does after a batch of input.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Keep reading.
    Continue,
    /// Flush, half-close, and wait for the peer's EOF.
    Linger,
}

/// Runs one accepted connection to the end.
///
/// The phases that hold buffers or in-flight writes (HTTP head, writes,
/// lingering close) are boxed: the future that stays resident for an idle
/// connection is then only the read loop waiting on readability.
pub async fn run(shard: Rc<Shard>, stream: Rc<SharedStream>, id: ConnId) {
    let next = match Box::pin(http_phase(&shard, &stream, id)).await {
        // Bytes that came right behind the request head (a pipelined first
        // frame) are handled here and their buffer freed before the wait.
        Some(leftover) if !leftover.is_empty() => process_input(&shard, id, &leftover),
        Some(_) => Next::Continue,
        None => Next::Linger,
    };
    let next = if next == Next::Continue { read_loop(&shard, &stream, id).await } else { next };
    if next == Next::Linger {
        Box::pin(linger(&shard, &stream, id)).await;
    }
    shard.remove_conn(id);
}

/// Reads the request head and answers it. `Some(bytes after the head)` when
/// the connection was upgraded.
async fn http_phase(shard: &Rc<Shard>, stream: &Rc<SharedStream>, id: ConnId) -> Option<Vec<u8>> {
    let max = shard.node.config.server.max_request_bytes;
    let mut head = Vec::new();
    loop {
        stream.readable().await.ok()?;
        match read_some(shard, stream, &mut head, max + 1) {
            Recv::Data(_) => {}
            Recv::WouldBlock => continue,
            Recv::Eof => return None,
        }
        let overflow = shard.table.borrow().get(id).is_some_and(|c| !c.slotted);
        match decide(&head, max, &ConnView { shard, overflow }) {
            Decision::NeedMore => continue,
            Decision::Respond { bytes, rejected } => {
                if let Some(r) = rejected {
                    shard.metrics().rejected[r.index()].inc();
                }
                respond_and_close(shard, stream, id, bytes).await;
                return None;
            }
            Decision::Upgrade { route, client_id, response, consumed } => {
                if !upgrade(shard, stream, id, route, client_id, response).await {
                    return None;
                }
                head.drain(..consumed);
                return Some(head);
            }
        }
    }
}

/// Appends one recv's worth to `head` (at most `limit` bytes in all).
fn read_some(shard: &Shard, stream: &SharedStream, head: &mut Vec<u8>, limit: usize) -> Recv {
    let mut buf = shard.read_buf.borrow_mut();
    let room = limit.saturating_sub(head.len()).clamp(1, buf.len());
    match recv(stream.fd(), &mut buf[..room]) {
        Ok(Recv::Data(n)) => {
            shard.metrics().bytes_in.add(n as u64);
            head.extend_from_slice(&buf[..n]);
            Recv::Data(n)
        }
        Ok(other) => other,
        Err(_) => Recv::Eof,
    }
}

async fn respond_and_close(shard: &Rc<Shard>, stream: &Rc<SharedStream>, id: ConnId, bytes: Vec<u8>) {
    let deadline = shard.now_ms() + shard.node.config.websocket.close_timeout_ms;
    if let Some(c) = shard.table.borrow_mut().get_mut(id) {
        c.phase = Phase::Closing;
        c.close_deadline_ms = deadline;
        c.out = bytes;
        c.writing = true;
    }
    write_loop(shard.clone(), id, stream.clone()).await;
}

/// Accepts the upgrade: 101 (plus the welcome on `/ws`) in one write.
async fn upgrade(
    shard: &Rc<Shard>,
    stream: &Rc<SharedStream>,
    id: ConnId,
    route: Route,
    client_id: Option<String>,
    response: Vec<u8>,
) -> bool {
    let client_id: Option<Arc<str>> = match route {
        Route::Rooms => Some(client_id.unwrap_or_else(|| shard.generate_client_id()).into()),
        Route::Echo => None,
    };
    let now = shard.now_ms();
    {
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return false };
        c.phase = Phase::Open;
        c.route = route;
        c.upgraded = true;
        c.last_rx_ms = now;
        c.out = response;
        if let Some(cid) = &client_id {
            let welcome = protocol::welcome(cid, &shard.node.node_id, shard.id);
            protocol::push_text_frame(&mut c.out, welcome.as_bytes());
            c.client_id = Some(cid.clone());
        }
        c.writing = true;
    }
    let m = shard.metrics();
    m.upgraded.inc();
    m.websockets.fetch_add(1, Ordering::Relaxed);
    if let Some(cid) = client_id {
        let home = shard.node.home_shard(&cid);
        if let Some(cluster) = &shard.node.cluster {
            cluster.conn_opened(&cid, id);
        }
        let _ = shard.send_to(home, ShardMsg::Register { client_id: cid, conn: id });
    }
    write_loop(shard.clone(), id, stream.clone()).await;
    let accepted_at = shard.table.borrow().get(id).map(|c| c.accepted_at);
    match accepted_at {
        Some(t) => {
            m.record_handshake(t.elapsed().as_micros() as u64);
            true
        }
        None => false,
    }
}

/// The read loop of an open connection.
async fn read_loop(shard: &Rc<Shard>, stream: &Rc<SharedStream>, id: ConnId) -> Next {
    loop {
        if stream.readable().await.is_err() {
            return Next::Linger;
        }
        loop {
            let next = {
                let mut buf = shard.read_buf.borrow_mut();
                match recv(stream.fd(), &mut buf) {
                    Ok(Recv::Data(n)) => {
                        shard.metrics().bytes_in.add(n as u64);
                        let next = process_input(shard, id, &buf[..n]);
                        if next == Next::Continue && n == buf.len() {
                            None // maybe more waiting: read again before sleeping
                        } else {
                            Some(next)
                        }
                    }
                    Ok(Recv::WouldBlock) => Some(Next::Continue),
                    Ok(Recv::Eof) | Err(_) => Some(Next::Linger),
                }
            };
            flush(shard, stream, id).await;
            match next {
                None => continue,
                Some(Next::Continue) => break,
                Some(Next::Linger) => return Next::Linger,
            }
        }
    }
}

/// Writes what is queued, inline, unless a writer task already is.
async fn flush(shard: &Rc<Shard>, stream: &Rc<SharedStream>, id: ConnId) {
    let start = {
        let mut table = shard.table.borrow_mut();
        match table.get_mut(id) {
            Some(c) if !c.writing && !c.out.is_empty() => {
                c.writing = true;
                true
            }
            _ => false,
        }
    };
    if start {
        Box::pin(write_loop(shard.clone(), id, stream.clone())).await;
    }
}

/// Feeds `data` to the connection's frame reader and handles every message
/// it completes.
fn process_input(shard: &Rc<Shard>, id: ConnId, data: &[u8]) -> Next {
    let mut messages = Vec::new();
    let (next, route) = {
        let now = shard.now_ms();
        let deadline = now + shard.node.config.websocket.close_timeout_ms;
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return Next::Linger };
        c.last_rx_ms = now;
        c.ping_sent = false;
        let route = c.route;
        c.boundary.feed(data);
        let ctx = c.ctx.get_or_insert_with(|| shard.new_context());
        let mut io = Io { input: data, out: &mut c.out };
        let next = loop {
            match ctx.read(&mut io) {
                Ok(Message::Text(t)) => messages.push(Message::Text(t)),
                Ok(Message::Binary(b)) => messages.push(Message::Binary(b)),
                Ok(Message::Close(frame)) => {
                    if c.phase == Phase::Open {
                        c.phase = Phase::Closing;
                        c.close_deadline_ms = deadline;
                        c.close_code = frame.map(|f| u16::from(f.code)).unwrap_or(close::NORMAL);
                    }
                }
                Ok(Message::Pong(p)) => {
                    if let Some(sent) = protocol::pong_stamp(&p) {
                        c.rtt_us = shard.now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
                    }
                }
                Ok(_) => {}
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break Next::Continue,
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => break Next::Linger,
                Err(e) => {
                    let (code, reason) = classify(&e);
                    c.phase = Phase::Closing;
                    c.close_deadline_ms = deadline;
                    c.close_code = code;
                    protocol::push_close_frame(&mut c.out, code, reason);
                    break Next::Linger;
                }
            }
        };
        (next, route)
    };
    let m = shard.metrics();
    for msg in messages {
        m.messages_in.inc();
        match (route, msg) {
            (Route::Echo, Message::Text(t)) => {
                shard.send_text(id, t.as_str());
            }
            (Route::Echo, Message::Binary(b)) => {
                shard.offer(id, b.len() + 10, |out| super::push_binary_frame(out, &b));
            }
            (Route::Rooms, Message::Text(t)) => rooms_message(shard, id, t.as_str()),
            (Route::Rooms, _) => shard.send_error(id, ClientError::BinaryNotSupported),
            _ => {}
        }
    }
    next
}

/// Close code and reason for a frame-level failure.
fn classify(e: &WsError) -> (u16, &'static str) {
    match e {
        WsError::Utf8(_) => (close::INVALID_PAYLOAD, "invalid UTF-8 in a text message"),
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => (close::TOO_BIG, "message or frame too large"),
        WsError::Capacity(_) => (close::TOO_BIG, "too large"),
        WsError::Protocol(_) | WsError::AttackAttempt => (close::PROTOCOL, "protocol violation"),
        _ => (close::INTERNAL, "internal error"),
    }
}

/// One JSON message on `/ws`.
fn rooms_message(shard: &Rc<Shard>, id: ConnId, text: &str) {
    let cfg = &shard.node.config.rooms;
    let req = match protocol::parse(text, cfg.max_payload_bytes) {
        Ok(r) => r,
        Err(e) => return shard.send_error(id, e),
    };
    let Some(from) = shard.table.borrow().get(id).and_then(|c| c.client_id.clone()) else { return };
    match req {
        Request::Join(room) => join(shard, id, &room),
        Request::Leave(room) => leave(shard, id, &room),
        Request::Publish { room, data } => publish(shard, id, &room, &protocol::room_message(&room, &from, data)),
        Request::Direct { to, data } => {
            let frame = protocol::text_frame(&protocol::direct_message(&from, data));
            let to: Arc<str> = Arc::from(&*to);
            let home = shard.node.home_shard(&to);
            if shard.send_to(home, ShardMsg::DirectRoute { to, frame, reply_to: Some(id) }).is_err() {
                shard.send_error(id, ClientError::Overloaded);
            }
        }
        Request::Echo(data) => {
            shard.send_text(id, &protocol::echo(data));
        }
        Request::Ping(x) => {
            shard.send_text(id, &protocol::pong(x));
        }
    }
}

fn join(shard: &Rc<Shard>, id: ConnId, room: &str) {
    let max = shard.node.config.rooms.max_rooms_per_connection;
    let (already, full) = match shard.table.borrow().get(id) {
        Some(c) => (c.rooms.iter().any(|r| &**r == room), c.rooms.len() >= max),
        None => return,
    };
    if !already {
        if full {
            return shard.send_error(id, ClientError::TooManyRooms);
        }
        let (name, first) = shard.rooms.borrow_mut().join(room, id);
        if let Some(c) = shard.table.borrow_mut().get_mut(id) {
            c.rooms.push(name);
        }
        if first {
            if let Some(cluster) = &shard.node.cluster {
                cluster.room_interest(shard.id, room, true);
            }
        }
    }
    shard.send_text(id, &protocol::room_ack("joined", room));
}

fn leave(shard: &Rc<Shard>, id: ConnId, room: &str) {
    let was_member = match shard.table.borrow_mut().get_mut(id) {
        Some(c) => match c.rooms.iter().position(|r| &**r == room) {
            Some(i) => {
                c.rooms.swap_remove(i);
                true
            }
            None => false,
        },
        None => return,
    };
    if was_member && shard.rooms.borrow_mut().leave(room, id) {
        if let Some(cluster) = &shard.node.cluster {
            cluster.room_interest(shard.id, room, false);
        }
    }
    shard.send_text(id, &protocol::room_ack("left", room));
}

/// Sends one shared frame to every other shard first (so they start writing
/// while this one does), then delivers to local members, then hands the
/// payload to the cluster thread for other nodes.
fn publish(shard: &Rc<Shard>, id: ConnId, room: &str, payload: &str) {
    let frame = protocol::text_frame(payload);
    let room_arc: Arc<str> = Arc::from(room);
    let mut lost = false;
    for to in (0..shard.node.shards.len()).filter(|s| *s != shard.id) {
        let msg = ShardMsg::Room { room: room_arc.clone(), frame: frame.clone(), origin: Some(id) };
        lost |= shard.send_to(to, msg).is_err();
    }
    shard.deliver_room(room, &frame, Some(id));
    if let Some(cluster) = &shard.node.cluster {
        cluster.publish(room_arc, payload);
    }
    if lost {
        shard.send_error(id, ClientError::Overloaded);
    }
}

/// Writes the connection's queue until it is empty. Exactly one runs per
/// connection at a time (`Conn::writing`, set by whoever starts it).
pub async fn write_loop(shard: Rc<Shard>, id: ConnId, stream: Rc<SharedStream>) {
    loop {
        let buf = {
            let mut table = shard.table.borrow_mut();
            let Some(c) = table.get_mut(id) else { return };
            if c.out.is_empty() {
                c.writing = false;
                if let Some(w) = c.flush_waker.take() {
                    w.wake();
                }
                return;
            }
            let buf = std::mem::take(&mut c.out);
            c.inflight = buf.len();
            buf
        };
        let (res, _buf) = stream.write_all(buf).await;
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        c.inflight = 0;
        match res {
            Ok(n) => shard.metrics().bytes_out.add(n as u64),
            Err(_) => {
                c.out.clear();
                c.writing = false;
                if c.phase == Phase::Open {
                    c.phase = Phase::Closing;
                }
                shutdown(c.fd, libc::SHUT_RDWR);
                if let Some(w) = c.flush_waker.take() {
                    w.wake();
                }
                return;
            }
        }
    }
}

/// Waits for queued output (the close frame) to be written, half-closes,
/// and reads until the peer's EOF or the close deadline (the sweeper shuts
/// the socket down then). Closing this way, rather than with a bare
/// `close(2)`, keeps the kernel from answering unread input with a RST that
/// would destroy the close frame before the peer reads it.
async fn linger(shard: &Rc<Shard>, stream: &Rc<SharedStream>, id: ConnId) {
    {
        let deadline = shard.now_ms() + shard.node.config.websocket.close_timeout_ms;
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        if c.phase != Phase::Closing {
            c.phase = Phase::Closing;
            c.close_deadline_ms = deadline;
        } else if c.close_deadline_ms == 0 {
            c.close_deadline_ms = deadline;
        }
    }
    flush(shard, stream, id).await;
    poll_fn(|cx| {
        let mut table = shard.table.borrow_mut();
        match table.get_mut(id) {
            Some(c) if c.writing => {
                c.flush_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    })
    .await;
    shutdown(stream.fd(), libc::SHUT_WR);
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut buf = shard.read_buf.borrow_mut();
        match recv(stream.fd(), &mut buf) {
            Ok(Recv::Data(_)) | Ok(Recv::WouldBlock) => {}
            Ok(Recv::Eof) | Err(_) => return,
        }
    }
}
