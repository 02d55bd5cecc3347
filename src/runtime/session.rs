//! A connection's life: HTTP head, upgrade, the read loop, the writer, and
//! the close. What the bytes mean is the application's: the runtime hands it
//! the request head and every complete message.
//!
//! One reader task per connection waits for readability (no buffer pinned
//! while idle), copies what arrived into the shard's shared read buffer,
//! feeds tungstenite, and handles the messages. Replies are queued on the
//! connection and written by the reader itself right after; output that
//! other connections or shards produce is written by a short-lived writer
//! task that exits when the queue is empty. Closing is always: queue the
//! close frame, flush, `shutdown(SHUT_WR)`, read until the peer's EOF or the
//! close deadline, then free the slot.

use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use tungstenite::error::{CapacityError, Error as WsError};
use tungstenite::Message;

use super::priority;
use super::shard::Shard;
use super::table::{Conn, ConnId, Phase};
use super::{Answer, App};
use crate::config::Class;
use crate::transport::boundary::Boundary;
use crate::transport::close;
use crate::transport::deflate;
use crate::transport::frame::{self, Io};
use crate::transport::http::Rejection;
use crate::transport::proxy;
use crate::transport::socket::{Recv, SharedStream};

/// What the reader does after a batch of input.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Keep reading.
    Continue,
    /// Flush, half-close, and wait for the peer's EOF.
    Linger,
    /// The shard is handing its connections to a new process: stop reading,
    /// touch nothing (the socket may already be the new process's).
    Frozen,
    /// Idle on the direct path: the task ends, the connection stays; an idle
    /// waker starts a new reader when something arrives ([`super::idle`]).
    Retire,
}

/// Runs one accepted connection to the end.
///
/// The phases that hold buffers or in-flight writes (HTTP head, writes,
/// lingering close) are boxed: the future that stays resident for an idle
/// connection is then only the read loop waiting on readability.
/// `refused` is set when the per-address limits refused the socket at
/// accept: it is answered (429 with `Retry-After`) and closed.
pub async fn run<A: App>(shard: Rc<Shard<A>>, stream: SharedStream, id: ConnId, refused: Option<(Rejection, u32)>) {
    if let Some((why, retry_after)) = refused {
        shard.metrics().rejected[why.index()].inc();
        let text = "too many connections from this address; slow down";
        let bytes = crate::transport::http::refusal(why, text, retry_after);
        Box::pin(respond_and_close(&shard, &stream, id, bytes)).await;
        Box::pin(linger(&shard, &stream, id)).await;
        return shard.remove_conn(id);
    }
    let next = match Box::pin(http_phase(&shard, &stream, id)).await {
        // Bytes that came right behind the request head (a pipelined first
        // frame) are handled here and their buffer freed before the wait.
        Some(leftover) if !leftover.is_empty() => process_input(&shard, id, &leftover),
        Some(_) => Next::Continue,
        None => Next::Linger,
    };
    let next = if next == Next::Continue { read_loop(&shard, &stream, id).await } else { next };
    finish(&shard, &stream, id, next).await;
}

async fn finish<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId, next: Next) {
    match next {
        Next::Frozen | Next::Retire => {}
        Next::Linger => {
            Box::pin(linger(shard, stream, id)).await;
            shard.remove_conn(id);
        }
        Next::Continue => shard.remove_conn(id),
    }
}

/// The rest of a connection's life after it came from another process (or
/// after a handover left it here): write what it had queued, then read.
pub async fn resumed<A: App>(shard: Rc<Shard<A>>, stream: SharedStream, id: ConnId) {
    let closing = {
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        shard.kick_writer(id, c);
        c.phase == Phase::Closing
    };
    let next = if closing { Next::Linger } else { read_loop(&shard, &stream, id).await };
    finish(&shard, &stream, id, next).await;
}

/// Input for `id` that arrived another way (a frame the old process had
/// begun reading): handled as if just read.
pub fn feed<A: App>(shard: &Rc<Shard<A>>, id: ConnId, data: &[u8]) {
    if process_input(shard, id, data) == Next::Linger {
        shard.start_close(id, close::PROTOCOL, "protocol violation", true);
    }
}

/// Reads the request head and lets the application answer it.
/// `Some(bytes after the head)` when the connection was upgraded.
async fn http_phase<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId) -> Option<Vec<u8>> {
    let max = shard.node.config.server.max_request_bytes;
    let mut head = Vec::new();
    let mut first = true;
    loop {
        stream.readable().await.ok()?;
        let before = head.len();
        match read_some(shard, stream, &mut head, max + proxy::MAX_HEADER + 1) {
            Recv::Data(_) => {}
            Recv::WouldBlock => continue,
            Recv::Eof => return None,
        }
        match proxy_header(shard, id, &mut head) {
            Some(true) => {}
            Some(false) => continue,
            None => {
                let bytes = crate::transport::http::refusal(Rejection::BadProxyHeader, "malformed PROXY header", 0);
                shard.metrics().rejected[Rejection::BadProxyHeader.index()].inc();
                respond_and_close(shard, stream, id, bytes).await;
                return None;
            }
        }
        // Incremental: the head is parsed again only once its end may have
        // arrived (or it grew past the limit); the first read is parsed at
        // once so that garbage is refused without waiting.
        let from = before.saturating_sub(3);
        let ended = head.get(from..).is_some_and(|new| new.windows(4).any(|w| w == b"\r\n\r\n"));
        if !(first || ended || head.len() > max) {
            continue;
        }
        first = false;
        let mut answer = shard.app.on_request(shard, id, &head);
        while let Answer::Wait(super::Deferred(wait)) = answer {
            answer = match deferred(shard, id, wait).await {
                Some(true) => shard.app.on_request(shard, id, &head),
                Some(false) => Answer::Respond {
                    bytes: crate::transport::http::refusal(
                        Rejection::BackendUnavailable,
                        "the application did not answer in time",
                        shard.node.config.server.retry_after_secs,
                    ),
                    rejected: Some(Rejection::BackendUnavailable),
                },
                None => return None,
            };
        }
        match answer {
            Answer::Wait(_) => unreachable!("waited for above"),
            Answer::NeedMore => continue,
            Answer::Respond { bytes, rejected } => {
                if let Some(r) = rejected {
                    shard.metrics().rejected[r.index()].inc();
                }
                respond_and_close(shard, stream, id, bytes).await;
                return None;
            }
            Answer::Upgrade { response, consumed, class } => {
                if !admit_slot(shard, id, class).await {
                    let why = Rejection::Full;
                    shard.metrics().rejected[why.index()].inc();
                    shard.metrics().class_refused[class.index()].inc();
                    let retry = shard.node.config.server.retry_after_secs;
                    let bytes = crate::transport::http::refusal(why, "every slot is taken", retry);
                    respond_and_close(shard, stream, id, bytes).await;
                    return None;
                }
                if !upgrade(shard, stream, id, response).await {
                    return None;
                }
                head.drain(..consumed);
                return Some(head);
            }
        }
    }
}

/// Awaits the application's `wait` until the handshake deadline (less the
/// margin a 503 needs). `Some(true)`: done, ask again; `Some(false)`: timed
/// out; `None`: the connection is gone.
async fn deferred<A: App>(
    shard: &Rc<Shard<A>>,
    id: ConnId,
    wait: std::pin::Pin<Box<dyn Future<Output = ()>>>,
) -> Option<bool> {
    let accepted = shard.table.borrow().get(id).map(|c| c.accepted_at.instant())?;
    let end = accepted + Duration::from_millis(shard.node.config.server.handshake_timeout_ms);
    let left =
        end.checked_sub(Duration::from_millis(WAIT_MARGIN_MS)).map(|t| t.saturating_duration_since(Instant::now()));
    let done = monoio::time::timeout(left.unwrap_or_default(), wait).await.is_ok();
    let alive = shard.table.borrow().get(id).is_some_and(|c| c.phase == Phase::Http);
    alive.then_some(done)
}

/// Strips a PROXY protocol header sent by a trusted proxy and takes its
/// client address. `Some(true)`: go on; `Some(false)`: read more; `None`:
/// malformed (refuse).
fn proxy_header<A: App>(shard: &Shard<A>, id: ConnId, head: &mut Vec<u8>) -> Option<bool> {
    let mut table = shard.table.borrow_mut();
    let c = table.get_mut(id)?;
    if !c.proxy_pending {
        return Some(true);
    }
    match proxy::parse(head) {
        proxy::ProxyParse::NeedMore => Some(false),
        proxy::ProxyParse::NotProxy => {
            c.proxy_pending = false;
            Some(true)
        }
        proxy::ProxyParse::Done { source, consumed } => {
            c.proxy_pending = false;
            if let Some(src) = source {
                c.client = src.ip();
            }
            head.drain(..consumed);
            Some(true)
        }
        proxy::ProxyParse::Invalid(_) => None,
    }
}

/// Appends one recv's worth to `head` (at most `limit` bytes in all).
fn read_some<A: App>(shard: &Shard<A>, stream: &SharedStream, head: &mut Vec<u8>, limit: usize) -> Recv {
    let mut buf = shard.read_buf.borrow_mut();
    let room = limit.saturating_sub(head.len()).clamp(1, buf.len());
    match stream.try_recv(&mut buf[..room]) {
        Ok(Recv::Data(n)) => {
            shard.metrics().bytes_in.add(n as u64);
            head.extend_from_slice(&buf[..n]);
            Recv::Data(n)
        }
        Ok(other) => other,
        Err(_) => Recv::Eof,
    }
}

async fn respond_and_close<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId, bytes: Vec<u8>) {
    let deadline = shard.now_ms() + shard.node.config.websocket.close_timeout_ms;
    if let Some(c) = shard.table.borrow_mut().get_mut(id) {
        c.closing(deadline, 0);
        c.out = bytes;
        c.writing = true;
    }
    write_loop(shard.clone(), id, stream.clone()).await;
}

/// Takes a WebSocket slot for `id` as `class`: at once if one is free for
/// it (and nobody waits ahead), else by preempting a lower class when the
/// node is full, else by waiting (higher classes first, FIFO within one) up
/// to `priority.wait_ms.<class>`. False: no slot (answer 503).
async fn admit_slot<A: App>(shard: &Rc<Shard<A>>, id: ConnId, class: Class) -> bool {
    let cfg = &shard.node.config.priority;
    if shard.waiters.borrow().is_empty() && try_slot(shard, id, class) {
        return true;
    }
    if shard.waiters.borrow().len() >= cfg.max_waiting_per_shard {
        return false;
    }
    let started = Instant::now();
    // A waiting socket is still a pending handshake: it must get its 503
    // before the handshake timeout would drop it without an answer.
    let accepted = shard.table.borrow().get(id).map(|c| c.accepted_at.instant()).unwrap_or(started);
    let handshake_end = accepted + Duration::from_millis(shard.node.config.server.handshake_timeout_ms);
    let by_handshake = handshake_end.checked_sub(Duration::from_millis(WAIT_MARGIN_MS)).unwrap_or(started);
    let deadline = (started + Duration::from_millis(cfg.wait_ms(class))).min(by_handshake);
    let ticket = shard.waiters.borrow_mut().push(class);
    shard.metrics().waiting.store(shard.waiters.borrow().len(), Ordering::Relaxed);
    let mut preempted = false;
    let got = loop {
        let alive = shard.table.borrow().get(id).is_some_and(|c| c.phase == Phase::Http);
        if !alive {
            break false;
        }
        if shard.waiters.borrow().is_first(ticket) && try_slot(shard, id, class) {
            break true;
        }
        if !preempted {
            preempted = preempt_for(shard, class);
            if preempted {
                continue; // its slot is free now: try again at once
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        let woken =
            poll_fn(
                |cx| if shard.waiters.borrow_mut().poll(ticket, cx.waker()) { Poll::Ready(()) } else { Poll::Pending },
            );
        let _ = monoio::time::timeout(left, woken).await;
    };
    let mut w = shard.waiters.borrow_mut();
    w.remove(ticket);
    if got {
        w.wake_first(); // a slot may be left for the next one
    }
    shard.metrics().waiting.store(w.len(), Ordering::Relaxed);
    shard.metrics().record_wait(class, started.elapsed().as_micros() as u64);
    got
}

/// A waiting upgrade gives up this long before the handshake timeout, so
/// that its 503 is written before the sweep would drop the socket.
const WAIT_MARGIN_MS: u64 = 250;

/// Takes a slot if the shard has one and the class may have it (the
/// reservations of higher classes, node-wide).
fn try_slot<A: App>(shard: &Shard<A>, id: ConnId, class: Class) -> bool {
    let node = &shard.node;
    if !priority::can_accept(&node.config.priority, node.capacity(), node.classes.snapshot(), class) {
        return false;
    }
    let mut table = shard.table.borrow_mut();
    if !table.take_slot(id, node.capacity_per_shard) {
        return false;
    }
    if let Some(c) = table.get_mut(id) {
        c.class = class;
    }
    node.classes.add(class);
    true
}

/// When the node (or this shard) is full, preempts this shard's least
/// recently active connection of the lowest class below `class`. True if
/// one was preempted. Its slot is freed at once, before its close
/// completes: a victim that never answers its close would otherwise keep
/// the slot until the close deadline, longer than the upgrade may wait. It
/// keeps its socket (not a slot) until the close completes or times out.
fn preempt_for<A: App>(shard: &Rc<Shard<A>>, class: Class) -> bool {
    let node = &shard.node;
    let full = node.connections() >= node.capacity() || shard.table.borrow().slotted() >= node.capacity_per_shard;
    if !full {
        return false;
    }
    let victim = {
        let mut table = shard.table.borrow_mut();
        let open = table.iter_mut().filter(|(_, c)| c.phase == Phase::Open && c.slotted);
        priority::victim(open.map(|(id, c)| (id, c.class, c.last_rx_ms)), class)
    };
    let Some(v) = victim else { return false };
    let victim_class = shard.table.borrow().get(v).map(|c| c.class).unwrap_or(class);
    shard.metrics().preempted[victim_class.index()].inc();
    shard.app.on_preempt(shard, v);
    let released = shard.table.borrow_mut().release_slot(v);
    if released {
        node.classes.sub(victim_class);
        shard.metrics().connections.store(shard.table.borrow().slotted(), Ordering::Relaxed);
    }
    true
}

/// Accepts the upgrade: the 101 and whatever the application queues on
/// open (the welcome on `/ws`) go out in one write.
async fn upgrade<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId, response: Vec<u8>) -> bool {
    let now = shard.now_ms();
    {
        let mut table = shard.table.borrow_mut();
        // The application checked admission just now, on this thread: a slot is free.
        if !table.take_slot(id, shard.node.capacity_per_shard) {
            return false;
        }
        let slotted = table.slotted();
        let Some(c) = table.get_mut(id) else { return false };
        let mut hs = shard.handshakes.borrow_mut();
        hs.release(c.handshake_key(id), id.raw());
        shard.metrics().handshakes.store(hs.len(), Ordering::Relaxed);
        shard.metrics().connections.store(slotted, Ordering::Relaxed);
        c.phase = Phase::Open;
        c.upgraded = true;
        c.last_rx_ms = now;
        if shard.node.config.websocket.deflate {
            // What the 101 told the client is what the connection does.
            c.deflate = deflate::accepted(&response).map(|a| Box::new(deflate::Inbound::new(a)));
        }
        c.out = response;
        // The write below is this task's: nobody else may start one meanwhile.
        c.writing = true;
    }
    let m = shard.metrics();
    m.upgraded.inc();
    m.websockets.fetch_add(1, Ordering::Relaxed);
    shard.app.on_open(shard, id);
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
///
/// Fairness: one `recv` of at most the shared buffer per turn; when it came
/// back full (more may be waiting) the task yields to the shard's other
/// tasks before reading again, so one flooding peer cannot starve its
/// neighbours, the mailbox or the sweeper. Backpressure: while the
/// connection's output is over its cap, it is not read at all (its peer's
/// TCP window fills instead of our memory).
async fn read_loop<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId) -> Next {
    // Reads done since this task last really waited for the driver. On
    // io_uring every readiness wait goes through the ring (it suspends); on
    // epoll a cached readiness answers at once, so a busy peer would keep
    // the task running without this count.
    let mut streak = 0u32;
    loop {
        match wait_readable(shard, stream, id).await {
            Ok(Some(true)) => streak = 0,
            Ok(Some(false)) => {}
            Ok(None) => return Next::Retire,
            Err(_) => return Next::Linger,
        }
        loop {
            // Not a byte more once the shard hands its connections over, and
            // nothing at all for a connection that already went (its socket
            // is the new process's now).
            if shard.frozen.get() || !shard.table.borrow().get(id).is_some_and(|c| c.phase != Phase::Http) {
                return Next::Frozen;
            }
            let next = {
                let mut buf = shard.read_buf.borrow_mut();
                match stream.try_recv(&mut buf) {
                    Ok(Recv::Data(n)) => {
                        shard.metrics().bytes_in.add(n as u64);
                        let next = process_input(shard, id, &buf[..n]);
                        if next == Next::Continue && n == buf.len() {
                            None // maybe more waiting: read again after others had a turn
                        } else {
                            Some(next)
                        }
                    }
                    Ok(Recv::WouldBlock) => Some(Next::Continue),
                    Ok(Recv::Eof) | Err(_) => Some(Next::Linger),
                }
            };
            // The reader writes its own replies inline: while the peer's
            // window is shut, this waits and the connection is not read
            // (read-side backpressure); the sweep applies the slow-consumer
            // policy after `websocket.write_timeout_ms`.
            let before = shard.now_ms();
            flush(shard, stream, id).await;
            if shard.now_ms().saturating_sub(before) >= READ_PAUSE_MS {
                shard.metrics().read_paused.inc();
            }
            if over_cap(shard, id) {
                shard.metrics().read_paused.inc();
                wait_writer(shard, id).await;
            }
            if next == Some(Next::Linger) {
                return Next::Linger;
            }
            streak += 1;
            if streak > 1 {
                // Boxed: only a busy connection pays for the timer it may hold;
                // the future that stays resident for an idle one stays small.
                Box::pin(fair_turn(streak)).await;
            }
            if next.is_some() {
                break;
            }
        }
    }
}

/// Waits for readability; `Some(true)` if the wait really suspended the
/// task. On the direct path a reader that the sweep asked to retire
/// (`Conn::retire`) and that would wait now hands the wait to an idle waker
/// instead and gets `None`: its task ends ([`super::idle`]).
async fn wait_readable<A: App>(shard: &Shard<A>, stream: &SharedStream, id: ConnId) -> std::io::Result<Option<bool>> {
    let mut fut = std::pin::pin!(stream.readable());
    let mut polls = 0u32;
    poll_fn(|cx| {
        polls += 1;
        if let Poll::Ready(r) = fut.as_mut().poll(cx) {
            return Poll::Ready(r.map(|()| Some(polls > 1)));
        }
        if !stream.can_retire() || !retire(shard, id) {
            return Poll::Pending;
        }
        let waker = super::idle::idle_waker(id);
        match fut.as_mut().poll(&mut std::task::Context::from_waker(&waker)) {
            // Something arrived in between: read on.
            Poll::Ready(r) => {
                if let Some(c) = shard.table.borrow_mut().get_mut(id) {
                    c.retired = false;
                }
                Poll::Ready(r.map(|()| Some(true)))
            }
            Poll::Pending => {
                shard.metrics().readers_retired.inc();
                Poll::Ready(Ok(None))
            }
        }
    })
    .await
}

/// Whether `id`'s reader retires now: asked to by the sweep, open, and
/// nothing being written or waited for. Marks it retired.
fn retire<A: App>(shard: &Shard<A>, id: ConnId) -> bool {
    let mut table = shard.table.borrow_mut();
    let Some(c) = table.get_mut(id) else { return false };
    if !c.retire {
        return false;
    }
    c.retire = false;
    let ok = c.open_and_flushed() && !shard.frozen.get();
    c.retired = ok;
    ok
}

/// An inline write that holds the reader this long counts as a read pause.
const READ_PAUSE_MS: u64 = 100;

/// The connection's output is over `websocket.send_queue_bytes`.
fn over_cap<A: App>(shard: &Shard<A>, id: ConnId) -> bool {
    let cap = shard.node.config.websocket.send_queue_bytes;
    shard.table.borrow().get(id).is_some_and(|c| c.phase == Phase::Open && c.queued() > cap)
}

/// Waits until no writer runs for `id` (its queue was written out or failed).
async fn wait_writer<A: App>(shard: &Rc<Shard<A>>, id: ConnId) {
    poll_fn(|cx| {
        let mut table = shard.table.borrow_mut();
        match table.get_mut(id) {
            Some(c) if c.writing => {
                shard.flush_wakers.borrow_mut().insert(id, cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    })
    .await;
}

/// After a read that did not wait for the driver: let the shard's other
/// tasks run; every [`PARK_EVERY`]th time in a row, sleep a millisecond instead, so that the
/// runtime parks (polls the driver and fires timers: the sweep), which it
/// never does while some task is always ready.
async fn fair_turn(streak: u32) {
    if streak % PARK_EVERY == 0 {
        monoio::time::sleep(Duration::from_millis(1)).await;
    } else {
        yield_now().await;
    }
}

/// Reads of one connection without waiting, between two parks of the runtime.
const PARK_EVERY: u32 = 8;

/// Lets every other ready task of the shard run once.
///
/// Not by waking itself while it is being polled: monoio re-queues a task
/// woken during its own poll at the *front* of the run queue (its
/// `yield_now` scheduling), so it would run again before anyone else and
/// starve the shard. Instead a tiny task, queued at the back, wakes it: by
/// then every task that was ready has had its turn.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        let waker = cx.waker().clone();
        monoio::spawn(async move { waker.wake() });
        Poll::Pending
    })
    .await;
}

/// Writes what is queued, inline, unless a writer task already is.
async fn flush<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId) {
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

/// Feeds `data` to the connection's frame reader and hands every message
/// it completes to the application, in wire order.
///
/// Only whole frames reach tungstenite: the bytes of a frame still arriving
/// wait in the connection's own `partial` buffer, which grows as they come
/// (tungstenite would reserve the announced length at once). What a
/// connection holds unfinished counts against the shard's budget.
///
/// Each message is handled as soon as tungstenite completes it, before the
/// frames behind it are read: a valid message that came in the same read as
/// a protocol violation is handled (echoed) before the close frame is
/// queued, and pongs and echoes leave in the order of what they answer.
fn process_input<A: App>(shard: &Rc<Shard<A>>, id: ConnId, data: &[u8]) -> Next {
    let w = &shard.node.config.websocket;
    let now = shard.now_ms();
    let deadline = now + w.close_timeout_ms;
    let (whole, invalid_utf8, inflate_fail, at_start) = {
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return Next::Linger };
        c.last_rx_ms = now;
        c.ping_sent = false;
        let (whole, invalid_utf8) = whole_frames(c, data, w.max_frame_bytes as u64);
        let (whole, inflate_fail) = inflate_frames(shard, c, whole, data);
        (whole, invalid_utf8, inflate_fail, c.phase)
    };
    let input = whole.bytes(data);
    let (mut next, fail, wrote) = read_and_handle(shard, id, input, deadline, at_start);
    // In stream order: tungstenite's refusal, then one found while
    // inflating (its frames come after), then bad UTF-8 (not handed on).
    let fail = fail.or(inflate_fail);
    let fail = fail.or(invalid_utf8.then_some((close::INVALID_PAYLOAD, "invalid UTF-8 in a text message")));
    let over = {
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return Next::Linger };
        if let Some((code, reason)) = fail {
            // Unless a close already went out (a handler's, or ours earlier).
            if c.phase == Phase::Open {
                c.closing(deadline, code);
                frame::push_close(&mut c.out, code, reason);
            }
            next = Next::Linger;
        }
        c.unfinished_since_ms = match (c.boundary.is_none(), c.unfinished_since_ms) {
            (true, _) => 0,
            (false, 0) => now.max(1),
            (false, t) => t,
        };
        let over_budget = account_unfinished(shard, c);
        (over_budget, wrote && c.queued() > w.send_queue_bytes)
    };
    if next == Next::Linger {
        return next;
    }
    if over.0 {
        shard.metrics().unfinished_closed.inc();
        shard.start_close(id, close::TRY_AGAIN_LATER, "server busy: too many unfinished messages", true);
    } else if over.1 && w.slow_consumer == crate::config::SlowConsumerPolicy::Close {
        // Protocol replies (pongs, close) went past the send queue cap.
        shard.metrics().slow_consumer_closed.inc();
        shard.start_close(id, close::POLICY, "send queue full: reading too slowly", true);
    }
    next
}

/// The whole frames of a read, for tungstenite.
enum Whole {
    /// The first `n` bytes of the read itself.
    Borrowed(usize),
    /// A frame that started in an earlier read, completed by this one (and
    /// any whole frames after it).
    Owned(Vec<u8>),
}

impl Whole {
    /// The frames, given the read they came from.
    fn bytes<'a>(&'a self, data: &'a [u8]) -> &'a [u8] {
        match self {
            Whole::Borrowed(cut) => &data[..*cut],
            Whole::Owned(v) => v,
        }
    }
}

/// For a connection that agreed to permessage-deflate: its whole frames
/// with every completed compressed message inflated into plain frames
/// (tungstenite refuses RSV1), and the violation found doing so, if any.
fn inflate_frames<A: App>(
    shard: &Shard<A>,
    c: &mut Conn<A::Conn>,
    whole: Whole,
    data: &[u8],
) -> (Whole, Option<deflate::Failure>) {
    let Some(st) = c.deflate.as_mut() else { return (whole, None) };
    if matches!(whole, Whole::Borrowed(0)) {
        return (whole, None);
    }
    let w = &shard.node.config.websocket;
    let lim = deflate::Limits { max_frame: w.max_frame_bytes, max_message: w.max_message_bytes };
    let (frames, fail) = deflate::rewrite(whole.bytes(data), st, &mut shard.codec(), lim);
    (Whole::Owned(frames), fail)
}

/// Splits `data` at the last frame boundary: what lies before goes to
/// tungstenite, the rest waits in `c.partial`. Also says whether invalid
/// UTF-8 arrived (then nothing from its frame on is kept or handed on).
fn whole_frames<S>(c: &mut Conn<S>, data: &[u8], max_frame: u64) -> (Whole, bool) {
    // A boundary that is not at rest keeps its box across reads; a resting
    // one works on the stack and is boxed only if it stops being at rest.
    let step = |b: &mut Boundary| (b.feed(data, max_frame), b.invalid_utf8(), b.at_rest());
    let (cut, failed) = match c.boundary.as_deref_mut() {
        Some(b) => {
            let (cut, failed, rest) = step(b);
            if rest {
                c.boundary = None;
            }
            (cut, failed)
        }
        None => {
            let mut b = Boundary::default();
            let (cut, failed, rest) = step(&mut b);
            if !rest {
                c.boundary = Some(Box::new(b));
            }
            (cut, failed)
        }
    };
    let mut stash = c.partial.take().map(|b| *b).unwrap_or_default();
    let whole = match (stash.is_empty(), cut) {
        (true, _) => {
            stash.extend_from_slice(&data[cut..]);
            Whole::Borrowed(cut)
        }
        (false, 0) => {
            stash.extend_from_slice(data);
            Whole::Borrowed(0)
        }
        (false, _) => {
            stash.extend_from_slice(&data[..cut]);
            let owned = std::mem::replace(&mut stash, data[cut..].to_vec());
            Whole::Owned(owned)
        }
    };
    if failed {
        stash = Vec::new(); // the rest belongs to the frame being refused
    }
    // An emptied buffer gives its allocation back (idle connections hold none).
    c.partial = if stash.is_empty() { None } else { Some(Box::new(stash)) };
    (whole, failed)
}

/// What one turn of the frame reader produced.
enum Step {
    /// A complete text or binary message.
    Message(Message),
    /// Every byte was read; tungstenite wants more.
    Wait,
    /// The close handshake is done (or the reader was already closed).
    Closed,
    /// A protocol violation: close with this code and reason.
    Fail(u16, &'static str),
}

/// Reads `input` (whole frames only), handing each message to the
/// application as it completes, while the connection stays in the phase
/// `at_start` (a handler that started a close stops the handling of what
/// follows). Returns what the reader does next, the violation to close for,
/// and whether tungstenite wrote anything (pongs, a close reply).
fn read_and_handle<A: App>(
    shard: &Rc<Shard<A>>,
    id: ConnId,
    mut input: &[u8],
    deadline: u64,
    at_start: Phase,
) -> (Next, Option<(u16, &'static str)>, bool) {
    let mut wrote = false;
    loop {
        let step = {
            let mut table = shard.table.borrow_mut();
            let Some(c) = table.get_mut(id) else { return (Next::Linger, None, wrote) };
            let before = c.out.len();
            let step = read_step(shard, c, &mut input, deadline);
            wrote |= c.out.len() > before;
            step
        };
        match step {
            Step::Message(msg) => {
                if shard.table.borrow().get(id).map(|c| c.phase) == Some(at_start) {
                    shard.metrics().messages_in.inc();
                    shard.app.on_message(shard, id, msg);
                }
            }
            Step::Wait => return (Next::Continue, None, wrote),
            Step::Closed => return (Next::Linger, None, wrote),
            Step::Fail(code, reason) => return (Next::Linger, Some((code, reason)), wrote),
        }
    }
}

/// Runs tungstenite over `input` until it completes a data message, wants
/// more, or fails; `input` is advanced past what it consumed.
fn read_step<A: App>(shard: &Shard<A>, c: &mut Conn<A::Conn>, input: &mut &[u8], deadline: u64) -> Step {
    // Taken out for the loop (a Box move) so that the connection's own
    // methods stay callable while tungstenite reads.
    let mut ctx = c.ctx.take().unwrap_or_else(|| shard.new_context());
    let step = loop {
        let mut out = std::mem::take(&mut c.out);
        let mut io = Io { input, out: &mut out };
        let read = ctx.read(&mut io);
        let consumed = input.len() - io.input.len();
        *input = &input[consumed..];
        c.out = out;
        match read {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => break Step::Message(m),
            Ok(Message::Close(frame)) => {
                c.closing(deadline, frame.map(|f| u16::from(f.code)).unwrap_or(close::NORMAL));
            }
            Ok(Message::Pong(p)) => {
                if let Some(sent) = frame::pong_stamp(&p) {
                    c.rtt_us = shard.now_us().saturating_sub(sent).min(u32::MAX as u64) as u32;
                }
            }
            Ok(_) => {}
            Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => break Step::Wait,
            Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => break Step::Closed,
            Err(e) => {
                let (code, reason) = classify(&e);
                break Step::Fail(code, reason);
            }
        }
    };
    c.ctx = Some(ctx);
    step
}

/// Updates the shard's count of unfinished bytes with what `c` holds now;
/// true when the shard is over its budget (and `c` holds some of it).
fn account_unfinished<A: App>(shard: &Shard<A>, c: &mut Conn<A::Conn>) -> bool {
    let held =
        c.partial.as_ref().map_or(0, |p| p.len()) + c.boundary.as_ref().map_or(0, |b| b.message_bytes()) as usize;
    let total = shard.unfinished.get() + held - c.unfinished_bytes as usize;
    shard.unfinished.set(total);
    // A frame and a message are each bounded by limits far below 4 GiB.
    c.unfinished_bytes = held.min(u32::MAX as usize) as u32;
    held > 0 && total > shard.node.config.websocket.max_unfinished_bytes_per_shard
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

/// Writes the connection's queue until it is empty. Exactly one runs per
/// connection at a time (`Conn::writing`, set by whoever starts it).
pub async fn write_loop<A: App>(shard: Rc<Shard<A>>, id: ConnId, stream: SharedStream) {
    loop {
        let buf = {
            let mut table = shard.table.borrow_mut();
            let Some(c) = table.get_mut(id) else { return };
            if c.out.is_empty() {
                c.writing = false;
                if let Some(w) = shard.flush_wakers.borrow_mut().remove(&id) {
                    w.wake();
                }
                return;
            }
            let buf = std::mem::take(&mut c.out);
            c.inflight = buf.len().min(u32::MAX as usize) as u32;
            c.write_started_ms = shard.now_ms();
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
                c.abort(shard.now_ms());
                if let Some(w) = shard.flush_wakers.borrow_mut().remove(&id) {
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
async fn linger<A: App>(shard: &Rc<Shard<A>>, stream: &SharedStream, id: ConnId) {
    {
        let deadline = shard.now_ms() + shard.node.config.websocket.close_timeout_ms;
        let mut table = shard.table.borrow_mut();
        let Some(c) = table.get_mut(id) else { return };
        c.closing(deadline, 0);
    }
    flush(shard, stream, id).await;
    wait_writer(shard, id).await;
    stream.shutdown(libc::SHUT_WR);
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut buf = shard.read_buf.borrow_mut();
        match stream.try_recv(&mut buf) {
            Ok(Recv::Data(_)) | Ok(Recv::WouldBlock) => {}
            Ok(Recv::Eof) | Err(_) => return,
        }
    }
}
