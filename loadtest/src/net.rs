//! Sockets: open-file limit, source addresses across 127.0.0.x, WebSocket
//! establishment with timing, and failure classification.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

use crate::clock::mono_us;

/// `IP_BIND_ADDRESS_NO_PORT` from `linux/in.h`: bind the address now, pick the
/// port at `connect()` time from the full 4-tuple, so each source address gets
/// its own 28k ephemeral ports per destination instead of one shared pool.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit struct for getrlimit/setrlimit to read and write.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A parsed `ws://host:port/path` target, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given (used as the handshake request).
    pub url: String,
    /// Resolved server address.
    pub addr: SocketAddr,
}

impl Target {
    /// Parses and resolves `url`; only `ws://` is supported (loopback benchmarks).
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| format!("--url {url}: only ws:// URLs are supported"))?;
        let hostport = rest.split('/').next().unwrap_or_default();
        let with_port = if hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("--url {url}: cannot resolve {with_port}: {e}"))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| format!("--url {url}: no IPv4 address"))?;
        Ok(Target { url: url.to_string(), addr })
    }

    /// The host part of the URL (default report label).
    pub fn host(url: &str) -> String {
        let rest = url.split("://").nth(1).unwrap_or(url);
        let hostport = rest.split('/').next().unwrap_or_default();
        match hostport.rsplit_once(':') {
            Some((h, _)) => h.to_string(),
            None => hostport.to_string(),
        }
    }
}

/// Source address number `k` of `n` (`127.0.0.1 ..= 127.0.0.n`), or `None` when
/// source binding is off or the target is not on loopback.
pub fn source_addr(target: &SocketAddr, n: u32, k: u64) -> Option<Ipv4Addr> {
    if n == 0 || !target.ip().is_loopback() {
        return None;
    }
    let host = 1 + (k % u64::from(n)) as u32;
    Some(Ipv4Addr::from(0x7f00_0000 | host))
}

/// The small buffers a load-generating client needs: a 4 KiB read buffer (tungstenite
/// fills its read buffer to capacity, so the 128 KiB default would be resident per
/// connection) and eager writes (`write_buffer_size` 0).
pub fn client_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(max_message.max(64 << 10)))
        .max_frame_size(Some(max_message.max(64 << 10)))
}

/// Timings of one successful establishment, all in monotonic microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Established {
    /// When the TCP connect actually started.
    pub started_us: u64,
    /// When the TCP connect completed.
    pub tcp_us: u64,
    /// When the `101 Switching Protocols` response was parsed.
    pub upgraded_us: u64,
}

/// Opens TCP (from `source` if given) and performs the WebSocket upgrade, each
/// step bounded by `timeout`. Returns the socket and its timings, or a failure reason.
pub async fn establish(
    target: &Target,
    source: Option<Ipv4Addr>,
    timeout: Duration,
    config: WebSocketConfig,
) -> Result<(Ws, Established), &'static str> {
    let started_us = mono_us();
    let tcp = tokio::time::timeout(timeout, tcp_connect(target.addr, source))
        .await
        .map_err(|_| "timeout")?
        .map_err(|e| io_reason(&e))?;
    let tcp_us = mono_us();
    let _ = tcp.set_nodelay(true);
    let hs = tokio_tungstenite::client_async_with_config(target.url.as_str(), tcp, Some(config));
    let (ws, _resp) = tokio::time::timeout(timeout, hs).await.map_err(|_| "timeout")?.map_err(|e| ws_reason(&e))?;
    let upgraded_us = mono_us();
    Ok((ws, Established { started_us, tcp_us, upgraded_us }))
}

/// TCP connect, binding the source address first with `IP_BIND_ADDRESS_NO_PORT`.
async fn tcp_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: valid fd owned by `sock`; option value is a c_int of the stated size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    sock.connect(addr).await
}

/// Failure reason for an I/O error.
pub fn io_reason(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => return "fd_limit",
        Some(libc::EADDRNOTAVAIL) => return "addr_not_available",
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => "closed_early",
        _ => "io_other",
    }
}

/// Failure reason for a tungstenite error.
pub fn ws_reason(e: &WsError) -> &'static str {
    match e {
        WsError::Http(_) => "bad_status",
        WsError::Io(io) => io_reason(io),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed_early",
        WsError::Protocol(p) => {
            let s = p.to_string();
            if s.contains("closing handshake") || s.contains("closed") {
                "closed_early"
            } else if s.contains("status") || s.contains("header") {
                "bad_status"
            } else {
                "protocol"
            }
        }
        _ => "ws_other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_and_labels() {
        let t = Target::parse("ws://127.0.0.1:9001/echo").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert!(Target::parse("http://x/").is_err());
        assert_eq!(Target::host("ws://127.0.0.1:9001/echo"), "127.0.0.1");
        assert_eq!(Target::host("ws://localhost/ws"), "localhost");
    }

    #[test]
    fn sources_round_robin_on_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(source_addr(&lo, 4, 0), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_addr(&lo, 4, 5), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_addr(&lo, 0, 5), None);
        assert_eq!(source_addr(&"10.0.0.1:1".parse().unwrap(), 4, 1), None);
    }

    #[test]
    fn classifies_errors() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&e), "refused");
        assert_eq!(io_reason(&io::Error::from_raw_os_error(libc::EMFILE)), "fd_limit");
        assert_eq!(ws_reason(&WsError::ConnectionClosed), "closed_early");
    }
}
