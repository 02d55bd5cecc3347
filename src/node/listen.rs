//! Listening sockets and the fd budget: one SO_REUSEPORT listener per shard
//! on one address that no other process already serves, and the cap on
//! slots that keeps every shard under RLIMIT_NOFILE (on the poll path, the
//! whole process; on the direct path, each shard ring's file table).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use crate::transport::uring::FILE_TABLE_SLACK;

/// fds a node keeps for itself besides connections: per shard a listener,
/// a ring, two wake sockets; plus stdio, the cluster thread's sockets and
/// slack for /proc reads.
const FD_RESERVE_BASE: usize = 64;
const FD_RESERVE_PER_SHARD: usize = 8;

/// One SO_REUSEPORT listener per shard on `addr` (port 0 is resolved once).
///
/// SO_REUSEPORT would also let a second process bind the same address and
/// silently take half of its traffic. So the address is first claimed by a
/// probe socket *without* SO_REUSEPORT: the kernel refuses it with
/// `EADDRINUSE` if anyone listens there, and that error is returned (the
/// binary exits 1 with "address in use").
pub fn bind_all(addr: SocketAddr, n: usize, backlog: u32) -> io::Result<Vec<std::net::TcpListener>> {
    let addr = probe(addr)?;
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        // Accepted sockets inherit it: direct descriptors, which have no
        // plain setsockopt, get it this way.
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into()).map_err(|e| bind_error(addr, e))?;
        s.listen(backlog.min(i32::MAX as u32) as i32)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// The internal listener: a plain socket (no SO_REUSEPORT), served by shard 0.
pub fn bind_admin(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into()).map_err(|e| bind_error(addr, e))?;
    s.listen(128)?;
    Ok(s.into())
}

/// Binds `addr` without SO_REUSEPORT to learn whether it is free (and which
/// port 0 resolves to), then lets it go.
fn probe(addr: SocketAddr) -> io::Result<SocketAddr> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into()).map_err(|e| bind_error(addr, e))?;
    s.local_addr()?.as_socket().ok_or_else(|| io::Error::other("not an inet address"))
}

fn bind_error(addr: SocketAddr, e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::AddrInUse {
        return io::Error::new(e.kind(), format!("bind {addr}: address in use (another process serves it)"));
    }
    io::Error::new(e.kind(), format!("bind {addr}: {e}"))
}

/// WebSocket slots per shard: `wanted`, capped so that all shards, with
/// their `handshakes_per_shard` sockets still in their upgrade, fit under
/// RLIMIT_NOFILE (raised to its hard limit first). Pending handshakes get
/// fds of their own, so a flood of them can never take the fds that
/// upgraded connections need.
///
/// On the `direct` path a socket takes a slot of its shard ring's file
/// table instead of a process fd, and the kernel caps each ring's table at
/// RLIMIT_NOFILE on its own: each shard gets the whole limit, less its
/// handshakes and [`FILE_TABLE_SLACK`].
pub fn capacity_per_shard(wanted: usize, handshakes_per_shard: usize, shards: usize, direct: bool) -> usize {
    let Some(nofile) = raise_nofile() else { return wanted };
    let (reserve, fit) = if direct {
        let reserve = handshakes_per_shard + FILE_TABLE_SLACK;
        (reserve, nofile.saturating_sub(reserve).max(1))
    } else {
        let reserve = FD_RESERVE_BASE + shards * (FD_RESERVE_PER_SHARD + handshakes_per_shard);
        (reserve, (nofile.saturating_sub(reserve) / shards).max(1))
    };
    if fit < wanted {
        tracing::warn!(
            "RLIMIT_NOFILE is {nofile}: capping server.max_connections_per_shard from {wanted} to {fit} \
             ({shards} shard(s), {reserve} fds reserved); raise LimitNOFILE (see tuning/) for more"
        );
        return fit;
    }
    wanted
}

/// Raises the soft open-files limit to the hard one; returns the soft limit.
fn raise_nofile() -> Option<usize> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    Some(lim.rlim_cur as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_served_address_is_refused_and_port_zero_is_shared_by_the_shards() {
        let first = bind_all("127.0.0.1:0".parse().unwrap(), 2, 16).unwrap();
        let addr = first[0].local_addr().unwrap();
        assert_eq!(first[1].local_addr().unwrap(), addr);
        let err = bind_all(addr, 1, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("address in use"), "{err}");
    }
}
