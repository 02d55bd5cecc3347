//! Zero-disconnect upgrade between two processes over a Unix socket
//! (`server.upgrade_socket`), with SCM_RIGHTS for the sockets.
//!
//! ```text
//! new                                   old (listening on upgrade_socket)
//!  │ hello ───────────────────────────────►│
//!  │◄──────── listeners (+ fds: public × shards, admin?, agent?)
//!  │ (starts its shards on those listeners)│
//!  │ ready ───────────────────────────────►│ every shard: freeze, barrier,
//!  │◄──────── shared (room histories) …    │ hand over
//!  │◄──────── conn (+ fd) …                │
//!  │◄──────── done {moved, closed}         │ exits once its shards are done
//! ```
//!
//! Each message is a 4-byte big-endian length and a JSON body; a message
//! with sockets carries them as ancillary data. Both processes accept on
//! the same listening sockets for a moment (the kernel's queue is shared,
//! nothing in it is lost); the old one stops at the freeze.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::app::{AppMsg, EdgeShared};
use crate::config::Class;
use crate::runtime::handover::{Handed, Item, Outbox};
use crate::runtime::mailbox::ShardMsg;
use crate::runtime::NodeState;

/// How long the old process waits for the new one to take a message.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most sockets one message carries.
const MAX_FDS: usize = 256;
/// Largest message body accepted (a connection's queued output is bounded
/// by `websocket.send_queue_bytes`, which is far below this).
const MAX_BODY: usize = 256 << 20;

/// One message of the upgrade protocol.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Msg {
    Hello {
        pid: u32,
    },
    Listeners {
        shards: usize,
        admin: bool,
        agent: bool,
        /// The old process's node id: the new one takes it (its clients'
        /// keys in the cluster name it).
        #[serde(default)]
        node_id: String,
    },
    Ready,
    Shared {
        blob: serde_json::Value,
    },
    Conn {
        shard: usize,
        client: String,
        class: Class,
        out: Vec<u8>,
        input: Vec<u8>,
        #[serde(default)]
        deflate: Option<(u8, bool)>,
        app: serde_json::Value,
    },
    Done {
        moved: usize,
        closed: usize,
    },
}

fn send(s: &UnixStream, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    send_with_fds(s, &frame, fds)
}

fn recv(s: &mut UnixStream) -> io::Result<(Msg, Vec<OwnedFd>)> {
    let mut head = [0u8; 4];
    let fds = recv_with_fds(s, &mut head)?;
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_BODY {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "upgrade message too large"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((msg, fds))
}

/// `sendmsg` of all of `bytes`, the fds (if any) with the first byte.
/// A message header over one buffer and a control buffer (cmsg(3)).
fn header(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the
    // pointers set next outlive every call the header is used in.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    mh.msg_controllen = control.len() as _;
    mh
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut sent = 0;
    if !fds.is_empty() {
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
        // SAFETY: msghdr and the control buffer are built per cmsg(3);
        // every pointer stays valid for the call.
        let mh = header(&mut iov, &mut cbuf);
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), fds.len());
            libc::sendmsg(s.as_raw_fd(), &mh, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        sent = n as usize;
    }
    (&*s).write_all(&bytes[sent..])
}

/// `recvmsg` filling all of `buf`, returning the fds that came with it.
fn recv_with_fds(s: &mut UnixStream, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut fds = Vec::new();
    // SAFETY: as in `send_with_fds`; received fds are taken into OwnedFd once.
    let mut mh = header(&mut iov, &mut cbuf);
    let n = unsafe {
        let n = libc::recvmsg(s.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC);
        if n > 0 {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        n
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "upgrade peer went away"));
    }
    s.read_exact(&mut buf[n as usize..])?;
    Ok(fds)
}

/// The sockets a new process takes over.
pub struct Inherited {
    /// One public listener per shard.
    pub public: Vec<TcpListener>,
    /// `server.admin_listen`.
    pub admin: Option<TcpListener>,
    /// `server.agent_listen`.
    pub agent: Option<TcpListener>,
    /// The old process's node id, which this one takes.
    pub node_id: String,
    stream: UnixStream,
}

/// What the old process shares about its listeners.
pub struct OldListeners {
    /// One per shard.
    pub public: Vec<RawFd>,
    /// The internal listener.
    pub admin: Option<RawFd>,
    /// The agent-check listener.
    pub agent: Option<RawFd>,
}

/// New process: connects to the old one at `path` and takes its listeners.
pub fn connect(path: &Path, shards: usize) -> io::Result<Inherited> {
    let mut s = UnixStream::connect(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    send(&s, &Msg::Hello { pid: std::process::id() }, &[])?;
    let (msg, fds) = recv(&mut s)?;
    let Msg::Listeners { shards: old_shards, admin, agent, node_id } = msg else {
        return Err(io::Error::other("upgrade: expected the listeners"));
    };
    if old_shards != shards {
        return Err(io::Error::other(format!(
            "upgrade: the running node has {old_shards} shard(s), this one would have {shards}: set server.shards to {old_shards}"
        )));
    }
    if fds.len() != old_shards + admin as usize + agent as usize {
        return Err(io::Error::other("upgrade: listeners missing from the message"));
    }
    let mut fds = fds.into_iter();
    let mut listener = || TcpListener::from(fds.next().expect("counted"));
    let public = (0..old_shards).map(|_| listener()).collect();
    let admin = admin.then(&mut listener);
    let agent = agent.then(&mut listener);
    s.set_read_timeout(None)?;
    Ok(Inherited { public, admin, agent, node_id, stream: s })
}

/// New process, once its shards serve the inherited listeners: tells the
/// old one to hand over, and routes what arrives to the shards (on a thread
/// of its own, until the old process is done).
pub fn take_over(inh: Inherited, state: Arc<NodeState<AppMsg>>, shared: Arc<EdgeShared>) -> io::Result<()> {
    let mut s = inh.stream;
    // Before the first session arrives (and joins its rooms): the cluster
    // holds room subscriptions until it knows where they all stood.
    shared.broker.resume_expected();
    send(&s, &Msg::Ready, &[])?;
    std::thread::Builder::new().name("ringside-takeover".into()).spawn(move || {
        let n = state.shards.len();
        let (mut moved, mut lost) = (0usize, 0usize);
        // Each connection goes to its shard at once (taken in and parked:
        // on the direct path its fd is closed there), and all of them
        // resume only once everything arrived: the old shards hand over
        // one after another, and a connection resumed early would talk to
        // rooms whose other members (and sequencer) are still in the old
        // process. Where they stood in rooms the cluster orders: the lowest
        // offset per room, for the cluster to fetch from.
        let mut floors: std::collections::HashMap<(String, String), u64> = std::collections::HashMap::new();
        loop {
            let (msg, mut fds) = match recv(&mut s) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, moved, "upgrade: the old process went away before it was done");
                    // What came over still resumes (the old process no longer serves it).
                    resume_all(&state, &shared, floors);
                    return;
                }
            };
            match msg {
                Msg::Shared { blob } => {
                    let bytes = serde_json::to_vec(&blob).unwrap_or_default();
                    if let Some((home, m)) = crate::app::handover::restore_message(&shared, n, &bytes) {
                        let _ = state.shards[home].mailbox.send(ShardMsg::App(m));
                    }
                }
                Msg::Conn { shard, client, class, out, input, deflate, app } => {
                    let Some(fd) = fds.pop() else { continue };
                    let client = client.parse().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                    let app = serde_json::to_vec(&app).unwrap_or_default();
                    for (room, epoch, offset) in crate::app::handover::positions(&app) {
                        let f = floors.entry((room, epoch)).or_insert(offset);
                        *f = (*f).min(offset);
                    }
                    let handed = Handed { shard, fd, client, class, out, input, deflate, app };
                    match state.shards[shard % n].mailbox.send(ShardMsg::Resume { handed: Box::new(handed) }) {
                        Ok(()) => moved += 1,
                        Err(_) => lost += 1,
                    }
                }
                Msg::Done { moved: m, closed } => {
                    resume_all(&state, &shared, floors);
                    tracing::info!(
                        handed_over = m,
                        resumed = moved,
                        lost,
                        closed_by_old = closed,
                        "upgrade done: {moved} connection(s) taken over, {closed} closed by the old process"
                    );
                    return;
                }
                other => tracing::warn!(?other, "upgrade: unexpected message"),
            }
        }
    })?;
    Ok(())
}

/// New process: the cluster learns where the sessions stood, then every
/// shard resumes what it parked.
fn resume_all(
    state: &NodeState<AppMsg>,
    shared: &EdgeShared,
    floors: std::collections::HashMap<(String, String), u64>,
) {
    // Even with none: this ends the cluster's hold on room subscriptions.
    shared.broker.resume_floors(floors.into_iter().map(|((room, epoch), o)| (room, epoch, o)).collect());
    let restored = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for sh in &state.shards {
        let _ = sh.mailbox.send(ShardMsg::ResumeAll { restored: restored.clone() });
    }
}

/// Old process: serves `path` on a thread of its own. When a new process
/// asks, hands it the listeners, freezes every shard, forwards what they
/// hand over, and then asks this process to stop (SIGTERM to itself; the
/// node's shutdown sees `NodeState::handed_over` and does not drain).
pub fn serve(
    path: PathBuf,
    state: Arc<NodeState<AppMsg>>,
    shared: Arc<EdgeShared>,
    listeners: OldListeners,
) -> io::Result<()> {
    let _ = std::fs::remove_file(&path); // a stale socket of an earlier run
    let server = UnixListener::bind(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // Whoever connects here takes every client over: the socket is the
    // owner's only (mode 0600), and a peer of another user is refused.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    std::thread::Builder::new().name("ringside-upgrade".into()).spawn(move || {
        for conn in server.incoming() {
            let Ok(s) = conn else { continue };
            // SAFETY: plain syscall.
            let me = unsafe { libc::geteuid() };
            match peer_uid(&s) {
                Some(uid) if uid == me => {}
                other => {
                    tracing::warn!(peer_uid = ?other, "upgrade socket: refused a peer of another user");
                    continue;
                }
            }
            match hand_over(s, &state, &shared, &listeners) {
                Ok(true) => {
                    let _ = std::fs::remove_file(&path);
                    // SAFETY: signalling ourselves; main turns it into the stop.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    return;
                }
                Ok(false) => {}
                // Past the freeze the shards no longer serve: this process
                // stops (what the new one got, it serves; what it did not
                // get was closed here).
                Err(e) if state.handed_over.load(Ordering::Acquire) => {
                    tracing::error!(error = %e, "upgrade failed after the handover began; stopping");
                    let _ = std::fs::remove_file(&path);
                    // SAFETY: signalling ourselves; main turns it into the stop.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "upgrade attempt failed; still serving"),
            }
        }
    })?;
    Ok(())
}

/// The user id of the process at the other end (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// One upgrade conversation; `Ok(true)` once everything was handed over.
fn hand_over(mut s: UnixStream, state: &NodeState<AppMsg>, shared: &EdgeShared, l: &OldListeners) -> io::Result<bool> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // A new process that stops reading ends the handover (the shards'
    // connections in flight are bounded meanwhile: MAX_IN_FLIGHT each).
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let (Msg::Hello { pid }, _) = recv(&mut s)? else { return Ok(false) };
    tracing::info!(pid, "upgrade: process {pid} asks to take over");
    let mut fds = l.public.clone();
    fds.extend(l.admin);
    fds.extend(l.agent);
    let n = state.shards.len();
    let node_id = state.node_id.clone();
    send(&s, &Msg::Listeners { shards: n, admin: l.admin.is_some(), agent: l.agent.is_some(), node_id }, &fds)?;
    let (Msg::Ready, _) = recv(&mut s)? else { return Ok(false) };
    // Bounded by the shards: each has at most MAX_IN_FLIGHT connections in it.
    let (tx, rx) = crossbeam_channel::unbounded();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    state.handed_over.store(true, Ordering::Release);
    // The new process speaks for this node id in the cluster from now on.
    shared.broker.handed_over();
    for sh in &state.shards {
        let out = Outbox { tx: tx.clone(), in_flight: in_flight.clone() };
        let _ = sh.mailbox.send(ShardMsg::Handover { out });
    }
    drop(tx);
    let (mut shared_ends, mut done, mut moved, mut closed) = (0, 0, 0, 0);
    let mut held: Vec<Handed> = Vec::new();
    let send_conn = |s: &UnixStream, h: Handed| -> io::Result<()> {
        let app = serde_json::from_slice(&h.app).unwrap_or(serde_json::Value::Null);
        let msg = Msg::Conn {
            shard: h.shard,
            client: h.client.to_string(),
            class: h.class,
            out: h.out,
            input: h.input,
            deflate: h.deflate,
            app,
        };
        let r = send(s, &msg, &[h.fd.as_raw_fd()]);
        // Sent (the new process holds the socket now) or failed: ours closes.
        drop(h.fd);
        in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    };
    while done < n {
        let Ok(item) = rx.recv() else { break };
        match item {
            Item::Shared(blob) => {
                let blob = serde_json::from_slice(&blob).unwrap_or(serde_json::Value::Null);
                send(&s, &Msg::Shared { blob }, &[])?;
            }
            Item::SharedEnd => {
                shared_ends += 1;
                if shared_ends == n {
                    for h in held.drain(..) {
                        send_conn(&s, h)?;
                    }
                }
            }
            Item::Conn(h) if shared_ends < n => held.push(h),
            Item::Conn(h) => send_conn(&s, h)?,
            Item::Done { shard, moved: m, closed: c } => {
                tracing::debug!(shard, moved = m, closed = c, "upgrade: shard {shard} handed over");
                done += 1;
                moved += m;
                closed += c;
            }
        }
    }
    for h in held.drain(..) {
        send_conn(&s, h)?;
    }
    send(&s, &Msg::Done { moved, closed }, &[])?;
    tracing::info!(moved, closed, "upgrade: {moved} connection(s) handed over, {closed} closed");
    Ok(true)
}
