//! The real client address behind a load balancer: the PROXY protocol
//! header (v2 binary and v1 text, HAProxy's `proxy-protocol.txt`), the list
//! of trusted proxies ([`Cidr`], [`Trusted`]) and the `X-Forwarded-For` walk
//! ([`client_from_xff`]).
//!
//! Every byte handed to this module is hostile until checked: nothing here
//! panics, indexes out of bounds, allocates per byte or loops without bound.
//! Nothing here does I/O either; the caller owns the socket and the buffer.
//!
//! # Using the PROXY header
//!
//! The header, when there is one, is the very first thing on the connection.
//! The caller reads into a buffer of at least [`MAX_HEADER`] bytes and calls
//! [`parse`] after every read:
//!
//! - [`ProxyParse::NeedMore`]: the bytes so far are a proper prefix of a
//!   header that could still be valid; read more.
//! - [`ProxyParse::NotProxy`]: the bytes cannot start a header (a plain
//!   `GET` is recognised at its first byte); hand the whole buffer on.
//! - [`ProxyParse::Done`]: a complete, valid header of `consumed` bytes;
//!   drop them and hand the rest on. `source` is the client address, or
//!   `None` where the header carries none that applies (the connection is
//!   kept and its socket peer stands).
//! - [`ProxyParse::Invalid`]: a header that is broken or too large; close.
//!
//! Only connections whose socket peer is in [`Trusted`] may have their
//! header honoured; from anyone else a header is a spoofing attempt.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

/// The 12-byte signature that opens every PROXY protocol v2 header.
pub const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];

/// Fixed part of a v2 header: signature, version/command, family, length.
const V2_FIXED: usize = 16;

/// Largest v2 length field (bytes after the fixed 16) that is accepted.
///
/// 536 = 216 (the largest address block, a pair of `AF_UNIX` paths) + 320
/// bytes of TLV room: enough for what HAProxy sends in practice (ALPN,
/// authority, CRC32C, unique ID, NOOP padding); with INET addresses (12
/// bytes) that leaves 524 bytes of TLVs. A longer header is refused rather
/// than buffered, which keeps the caller's buffer at [`MAX_HEADER`] bytes.
pub const MAX_V2_LEN: usize = 536;

/// Longest v1 header, `"PROXY "` through CRLF, as the spec caps it.
pub const MAX_V1_LEN: usize = 107;

/// Longest header of either version: what a caller must be able to buffer
/// before [`parse`] can answer anything but [`ProxyParse::NeedMore`].
pub const MAX_HEADER: usize = V2_FIXED + MAX_V2_LEN;

/// The v1 signature.
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// Address block of `AF_INET`: src addr(4) dst addr(4) src port(2) dst port(2).
const V2_INET_LEN: usize = 12;
/// Address block of `AF_INET6`: 16 + 16 + 2 + 2.
const V2_INET6_LEN: usize = 36;
/// Address block of `AF_UNIX`: two 108-byte paths.
const V2_UNIX_LEN: usize = 216;

/// Verdict on the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyParse {
    /// The bytes so far are a proper prefix of a possible header.
    NeedMore,
    /// The bytes cannot be a PROXY header; treat the connection as direct.
    NotProxy,
    /// A complete, valid header.
    Done {
        /// The client's address; `None` for LOCAL, UNSPEC, UNIX, DGRAM and
        /// v1 `UNKNOWN`, where the socket peer stands.
        source: Option<SocketAddr>,
        /// Header length in bytes, never more than the buffer's length.
        consumed: usize,
    },
    /// A broken or oversized header; the reason, for a log line.
    Invalid(&'static str),
}

/// Parses a PROXY protocol header of either version at the start of `buf`:
/// v2 is tried first (it opens with `\r`), then v1 (it opens with `P`).
///
/// [`ProxyParse::NeedMore`] only while `buf` could still be the start of a
/// header of one of the two versions; an empty `buf` needs more.
pub fn parse(buf: &[u8]) -> ProxyParse {
    match parse_v2(buf) {
        ProxyParse::NotProxy => parse_v1(buf),
        verdict => verdict,
    }
}

/// Parses a PROXY protocol v2 (binary) header at the start of `buf`.
///
/// Rules, in the order the bytes arrive (each checked as soon as it is
/// there, so a bad header is refused without waiting for the rest):
///
/// - bytes that differ from [`V2_SIGNATURE`] → `NotProxy`;
/// - version other than 2 or command other than LOCAL (0) / PROXY (1) →
///   `Invalid`;
/// - LOCAL (health checks from the proxy itself): family and body are
///   ignored, as the spec says → `Done { source: None }`;
/// - PROXY: the family/transport byte must be one the spec defines:
///   `0x11` (TCP over IPv4) and `0x21` (TCP over IPv6) yield the source
///   address; `0x00` (UNSPEC, body ignored), `0x12`/`0x22` (UDP) and
///   `0x31`/`0x32` (UNIX) keep the connection with `source: None`; any
///   other value → `Invalid` (the spec says receivers must reject them);
/// - length above [`MAX_V2_LEN`], or shorter than the family's address
///   block → `Invalid`;
/// - after the address block, TLVs must tile the rest of the declared
///   length exactly (type, u16 length, value); they are skipped, not
///   interpreted (no CRC32C check). A TLV that overruns → `Invalid`.
///
/// Addresses and ports are taken as sent (a trusted proxy sends them).
pub fn parse_v2(buf: &[u8]) -> ProxyParse {
    let seen = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..seen) != V2_SIGNATURE.get(..seen) {
        return ProxyParse::NotProxy;
    }
    let Some(&ver_cmd) = buf.get(12) else { return ProxyParse::NeedMore };
    if ver_cmd >> 4 != 2 {
        return ProxyParse::Invalid("PROXY v2: version is not 2");
    }
    let local = match ver_cmd & 0x0F {
        0x0 => true,
        0x1 => false,
        _ => return ProxyParse::Invalid("PROXY v2: command is neither LOCAL nor PROXY"),
    };
    let Some(&family) = buf.get(13) else { return ProxyParse::NeedMore };
    // Address block length, or `None` where the body is opaque.
    let addr_len = if local {
        None
    } else {
        match family {
            0x00 => None,
            0x11 | 0x12 => Some(V2_INET_LEN),
            0x21 | 0x22 => Some(V2_INET6_LEN),
            0x31 | 0x32 => Some(V2_UNIX_LEN),
            _ => return ProxyParse::Invalid("PROXY v2: undefined address family/transport"),
        }
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else { return ProxyParse::NeedMore };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_V2_LEN {
        return ProxyParse::Invalid("PROXY v2: header longer than MAX_V2_LEN");
    }
    if addr_len.is_some_and(|a| len < a) {
        return ProxyParse::Invalid("PROXY v2: length shorter than the address block");
    }
    let total = V2_FIXED + len;
    let Some(body) = buf.get(V2_FIXED..total) else { return ProxyParse::NeedMore };
    let Some(addr_len) = addr_len else { return ProxyParse::Done { source: None, consumed: total } };
    let Some((addrs, tlvs)) = body.split_at_checked(addr_len) else {
        return ProxyParse::Invalid("PROXY v2: length shorter than the address block");
    };
    if let Err(why) = check_tlvs(tlvs) {
        return ProxyParse::Invalid(why);
    }
    let source = match family {
        0x11 => match inet(addrs) {
            Some(a) => Some(a),
            None => return ProxyParse::Invalid("PROXY v2: short IPv4 address block"),
        },
        0x21 => match inet6(addrs) {
            Some(a) => Some(a),
            None => return ProxyParse::Invalid("PROXY v2: short IPv6 address block"),
        },
        _ => None,
    };
    ProxyParse::Done { source, consumed: total }
}

/// Checks that `rest` is a whole number of TLVs (type, u16 BE length, value).
fn check_tlvs(mut rest: &[u8]) -> Result<(), &'static str> {
    // At most MAX_V2_LEN / 3 rounds: every TLV takes at least 3 bytes.
    while !rest.is_empty() {
        let [_kind, hi, lo, tail @ ..] = rest else { return Err("PROXY v2: truncated TLV header") };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        rest = tail.get(len..).ok_or("PROXY v2: TLV overruns the header")?;
    }
    Ok(())
}

/// Source address of an `AF_INET` block: src(4) dst(4) sport(2) dport(2).
fn inet(addrs: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 4] = addrs.get(0..4)?.try_into().ok()?;
    let port: [u8; 2] = addrs.get(8..10)?.try_into().ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), u16::from_be_bytes(port))))
}

/// Source address of an `AF_INET6` block: src(16) dst(16) sport(2) dport(2).
fn inet6(addrs: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = addrs.get(0..16)?.try_into().ok()?;
    let port: [u8; 2] = addrs.get(32..34)?.try_into().ok()?;
    Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), u16::from_be_bytes(port), 0, 0)))
}

/// Transport named by a v1 header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Proto {
    /// `TCP4`: dotted-quad addresses.
    Tcp4,
    /// `TCP6`: RFC 4291 text addresses.
    Tcp6,
}

/// Parses a PROXY protocol v1 (text) header at the start of `buf`:
/// `"PROXY TCP4 <src> <dst> <sport> <dport>\r\n"`, the same with `TCP6`, or
/// `"PROXY UNKNOWN<anything>\r\n"`, at most [`MAX_V1_LEN`] bytes in all.
///
/// Strict: fields are separated by exactly one space; addresses must parse
/// as the family named (std's parsers: no leading zeros in IPv4 octets, no
/// zone ids); ports are decimal, 0–65535, without leading zeros; no field
/// may follow the destination port. `UNKNOWN` yields `source: None` and
/// whatever follows it up to the CRLF is ignored, as the spec says.
///
/// While the CRLF has not arrived, the fields seen so far are checked: a
/// finished field must be valid, the unfinished one must use only the
/// characters and length its kind allows; otherwise `Invalid` at once.
/// A lone `\n`, a `\r` not followed by `\n`, or no CRLF within
/// [`MAX_V1_LEN`] bytes → `Invalid`.
pub fn parse_v1(buf: &[u8]) -> ProxyParse {
    let seen = buf.len().min(V1_SIGNATURE.len());
    if buf.get(..seen) != V1_SIGNATURE.get(..seen) {
        return ProxyParse::NotProxy;
    }
    let rest = buf.get(V1_SIGNATURE.len()..).unwrap_or_default();
    // The CR may sit at index MAX_V1_LEN - 2 at most, so that the LF fits.
    let window = rest.get(..(MAX_V1_LEN - 1 - V1_SIGNATURE.len()).min(rest.len())).unwrap_or_default();
    match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(at) => {
            let line = window.get(..at).unwrap_or_default();
            if window.get(at) == Some(&b'\n') {
                return ProxyParse::Invalid("PROXY v1: LF without CR");
            }
            let source = match v1_fields(line, true) {
                Ok(source) => source,
                Err(why) => return ProxyParse::Invalid(why),
            };
            match rest.get(at + 1) {
                None => ProxyParse::NeedMore,
                Some(b'\n') => ProxyParse::Done { source, consumed: V1_SIGNATURE.len() + at + 2 },
                Some(_) => ProxyParse::Invalid("PROXY v1: CR not followed by LF"),
            }
        }
        None if buf.len() >= MAX_V1_LEN - 1 => ProxyParse::Invalid("PROXY v1: no CRLF within 107 bytes"),
        None => match v1_fields(window, false) {
            Ok(_) => ProxyParse::NeedMore,
            Err(why) => ProxyParse::Invalid(why),
        },
    }
}

/// Checks the fields of a v1 line (after `"PROXY "`, before CR). With
/// `complete` false the last field may be unfinished and only its
/// characters and length are checked. Returns the source address of a
/// complete TCP line; `None` for `UNKNOWN` or an incomplete line.
fn v1_fields(line: &[u8], complete: bool) -> Result<Option<SocketAddr>, &'static str> {
    let mut fields = line.split(|&b| b == b' ').peekable();
    let mut proto = V1Proto::Tcp4;
    let mut src_ip: Option<IpAddr> = None;
    let mut src_port: Option<u16> = None;
    let mut index = 0usize;
    while let Some(field) = fields.next() {
        let unfinished = !complete && fields.peek().is_none();
        if !unfinished && field.is_empty() {
            return Err("PROXY v1: empty field");
        }
        match index {
            0 if unfinished => {
                let possible = [&b"TCP4"[..], b"TCP6", b"UNKNOWN"].iter().any(|p| p.starts_with(field));
                return if possible { Ok(None) } else { Err("PROXY v1: unknown protocol") };
            }
            0 => {
                proto = match field {
                    b"TCP4" => V1Proto::Tcp4,
                    b"TCP6" => V1Proto::Tcp6,
                    // The spec: ignore anything presented before the CRLF.
                    b"UNKNOWN" => return Ok(None),
                    _ => return Err("PROXY v1: unknown protocol"),
                };
            }
            1 | 2 if unfinished => {
                return if ip_prefix_ok(proto, field) { Ok(None) } else { Err("PROXY v1: bad address") };
            }
            1 | 2 => {
                let ip = v1_ip(proto, field).ok_or("PROXY v1: bad address")?;
                if index == 1 {
                    src_ip = Some(ip);
                }
            }
            3 | 4 if unfinished => {
                return if port_prefix_ok(field) { Ok(None) } else { Err("PROXY v1: bad port") };
            }
            3 | 4 => {
                let port = parse_port(field).ok_or("PROXY v1: bad port")?;
                if index == 3 {
                    src_port = Some(port);
                }
            }
            _ => return Err("PROXY v1: too many fields"),
        }
        index += 1;
    }
    if !complete {
        // Not reached: an incomplete line's last field returns above.
        return Ok(None);
    }
    match (src_ip, src_port, index) {
        (Some(ip), Some(port), 5) => Ok(Some(SocketAddr::new(ip, port))),
        _ => Err("PROXY v1: missing fields"),
    }
}

/// Parses a finished v1 address field as the family `proto` names.
fn v1_ip(proto: V1Proto, field: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(field).ok()?;
    match proto {
        V1Proto::Tcp4 => Ipv4Addr::from_str(text).ok().map(IpAddr::V4),
        V1Proto::Tcp6 => Ipv6Addr::from_str(text).ok().map(IpAddr::V6),
    }
}

/// Whether an unfinished v1 address field could still become valid:
/// the right characters, no longer than the longest text form.
fn ip_prefix_ok(proto: V1Proto, field: &[u8]) -> bool {
    match proto {
        V1Proto::Tcp4 => field.len() <= 15 && field.iter().all(|b| b.is_ascii_digit() || *b == b'.'),
        // 45 = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255".
        V1Proto::Tcp6 => field.len() <= 45 && field.iter().all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.'),
    }
}

/// Whether an unfinished port field could still become a valid port.
fn port_prefix_ok(field: &[u8]) -> bool {
    field.is_empty() || parse_port(field).is_some()
}

/// A decimal port, 0–65535, 1 to 5 digits, no leading zero (but `"0"`).
fn parse_port(field: &[u8]) -> Option<u16> {
    if field.is_empty() || field.len() > 5 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if field.len() > 1 && field.first() == Some(&b'0') {
        return None;
    }
    let value = field.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
    u16::try_from(value).ok()
}

/// An IPv4 or IPv6 network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address, host bits zero.
    net: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

impl Cidr {
    /// Parses `"10.0.0.0/8"`, `"fd00::/8"`, or a bare address (`"127.0.0.1"`,
    /// `"::1"`), which is a host: /32 or /128. Surrounding whitespace is
    /// ignored. The prefix must be decimal and in range; host bits set past
    /// the prefix (`"10.1.0.0/8"`) are refused as a likely typo.
    ///
    /// # Errors
    ///
    /// One line naming the input and the problem: not an address, prefix
    /// not a number, prefix above 32/128, host bits set.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let text = s.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let net = IpAddr::from_str(addr).map_err(|_| format!("{text:?}: not an IPv4 or IPv6 address"))?;
        let max: u8 = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("{text:?}: prefix length {p:?} is not a number from 0 to {max}"));
                }
                match p.parse::<u8>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(format!("{text:?}: prefix length {p} is above {max}")),
                }
            }
        };
        let cidr = Cidr { net, prefix };
        let masked = cidr.masked(net);
        if masked != net {
            return Err(format!(
                "{text:?}: host bits set after the /{prefix} prefix (did you mean {masked}/{prefix}?)"
            ));
        }
        Ok(cidr)
    }

    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`) matches IPv4 networks as its IPv4 address, and an
    /// IPv4 address matches IPv6 networks as its mapped form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (_, ip) => ip,
        };
        self.masked(ip) == self.net
    }

    /// `ip` with the bits past this network's prefix cleared; `ip` must be
    /// of the network's family (the other family is returned unchanged).
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32u32.saturating_sub(u32::from(self.prefix))).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128u32.saturating_sub(u32::from(self.prefix))).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

impl fmt::Display for Cidr {
    /// `network/prefix`, e.g. `10.0.0.0/8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The proxies whose PROXY headers and `X-Forwarded-For` are believed.
/// Empty by default: nobody is trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    /// Parses each item with [`Cidr::parse`]. An empty list trusts nobody.
    ///
    /// # Errors
    ///
    /// The first bad item fails the list: one line with its position (from
    /// 0) and [`Cidr::parse`]'s message.
    pub fn parse_list(items: &[String]) -> Result<Trusted, String> {
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Cidr::parse(item).map_err(|e| format!("trusted proxy #{i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Trusted)
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` lies in any trusted network (see [`Cidr::contains`]).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Longest `X-Forwarded-For` value looked at; a longer one is ignored.
pub const MAX_XFF_LEN: usize = 4096;

/// Most `X-Forwarded-For` entries considered, counted from the right.
pub const MAX_XFF_ENTRIES: usize = 64;

/// The client address for a connection from `peer` that carried the
/// `X-Forwarded-For` value `xff` (several headers joined with `,`).
///
/// Rules:
/// - `peer` not trusted (or `trusted` empty): `peer`; the header is ignored,
///   anyone can write it.
/// - no header, or one longer than [`MAX_XFF_LEN`] bytes: `peer`.
/// - otherwise the comma-separated entries are walked from the right (the
///   entry nearest to us, added by `peer`, first): trusted addresses are
///   skipped and the first untrusted one is the client.
/// - a malformed entry (empty, not an address) stops the walk: the result
///   is the last good address seen, which is trusted, or `peer` if none.
/// - all entries trusted, or [`MAX_XFF_ENTRIES`] of them considered: the
///   last (leftmost) one seen.
/// - entries are trimmed of spaces and tabs and may carry a port, which is
///   dropped: `1.2.3.4`, `1.2.3.4:5678`, `::1`, `[::1]`, `[::1]:80`.
///   Zone ids, `unknown` and obfuscated identifiers are malformed.
pub fn client_from_xff(peer: IpAddr, xff: Option<&str>, trusted: &Trusted) -> IpAddr {
    if !trusted.contains(peer) {
        return peer;
    }
    let Some(xff) = xff else { return peer };
    if xff.len() > MAX_XFF_LEN {
        return peer;
    }
    let mut last = peer;
    for entry in xff.rsplit(',').take(MAX_XFF_ENTRIES) {
        let Some(ip) = xff_entry(entry) else { return last };
        if !trusted.contains(ip) {
            return ip;
        }
        last = ip;
    }
    last
}

/// One `X-Forwarded-For` entry: an address, optionally with a port.
fn xff_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches(|c| c == ' ' || c == '\t');
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        if !after.is_empty() {
            parse_port(after.strip_prefix(':')?.as_bytes())?;
        }
        return Ipv6Addr::from_str(host).ok().map(IpAddr::V6);
    }
    if let Ok(ip) = IpAddr::from_str(entry) {
        return Some(ip);
    }
    let (host, port) = entry.split_once(':')?;
    parse_port(port.as_bytes())?;
    Ipv4Addr::from_str(host).ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn inet_body() -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 1];
        b.extend_from_slice(&51234u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    fn inet6_body() -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let dst: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut b = src.octets().to_vec();
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(&4000u16.to_be_bytes());
        b.extend_from_slice(&443u16.to_be_bytes());
        b
    }

    fn tlvs() -> Vec<u8> {
        let mut t = vec![0x01, 0x00, 0x02, b'h', b'2']; // ALPN
        t.extend_from_slice(&[0x02, 0x00, 0x0b]);
        t.extend_from_slice(b"example.com"); // authority
        t.extend_from_slice(&[0x04, 0x00, 0x00]); // NOOP, empty
        t
    }

    fn done(buf: &[u8]) -> (Option<SocketAddr>, usize) {
        match parse(buf) {
            ProxyParse::Done { source, consumed } => (source, consumed),
            other => panic!("expected Done for {buf:?}, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> bool {
        matches!(parse(buf), ProxyParse::Invalid(_))
    }

    /// Every proper prefix of `buf` needs more.
    fn prefixes_need_more(buf: &[u8]) {
        for n in 0..buf.len() {
            assert_eq!(parse(&buf[..n]), ProxyParse::NeedMore, "prefix {n} of {buf:?}");
        }
    }

    #[test]
    fn v2_inet() {
        let h = v2(0x21, 0x11, &inet_body());
        assert_eq!(done(&h), (Some("192.0.2.7:51234".parse().unwrap()), 28));
        prefixes_need_more(&h);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(done(&with_data).1, 28);
    }

    #[test]
    fn v2_inet_with_tlvs() {
        let mut body = inet_body();
        body.extend_from_slice(&tlvs());
        let h = v2(0x21, 0x11, &body);
        assert_eq!(done(&h), (Some("192.0.2.7:51234".parse().unwrap()), h.len()));
        prefixes_need_more(&h);
    }

    #[test]
    fn v2_inet6_with_and_without_tlvs() {
        let h = v2(0x21, 0x21, &inet6_body());
        assert_eq!(done(&h), (Some("[2001:db8::7]:4000".parse().unwrap()), 52));
        prefixes_need_more(&h);
        let mut body = inet6_body();
        body.extend_from_slice(&tlvs());
        let h = v2(0x21, 0x21, &body);
        assert_eq!(done(&h), (Some("[2001:db8::7]:4000".parse().unwrap()), h.len()));
        prefixes_need_more(&h);
    }

    #[test]
    fn v2_bad_tlvs() {
        for tail in [&[0x01][..], &[0x01, 0x00], &[0x01, 0x00, 0x05, b'x'], &[0x04, 0x00, 0x00, 0x01]] {
            let mut body = inet_body();
            body.extend_from_slice(tail);
            assert!(invalid(&v2(0x21, 0x11, &body)), "{tail:?}");
        }
    }

    #[test]
    fn v2_local_and_unspec() {
        assert_eq!(done(&v2(0x20, 0x00, &[])), (None, 16));
        // LOCAL ignores the family, even a bogus one, and the body.
        assert_eq!(done(&v2(0x20, 0x11, &inet_body())), (None, 28));
        assert_eq!(done(&v2(0x20, 0xFF, &[1, 2, 3])), (None, 19));
        assert_eq!(done(&v2(0x21, 0x00, &[])), (None, 16));
        assert_eq!(done(&v2(0x21, 0x00, &[9; 5])), (None, 21));
        prefixes_need_more(&v2(0x20, 0x00, &[]));
    }

    #[test]
    fn v2_unix_and_dgram_keep_the_connection() {
        assert_eq!(done(&v2(0x21, 0x12, &inet_body())).0, None);
        assert_eq!(done(&v2(0x21, 0x22, &inet6_body())).0, None);
        assert_eq!(done(&v2(0x21, 0x31, &[0; 216])), (None, 232));
        assert_eq!(done(&v2(0x21, 0x32, &[0; 216])), (None, 232));
        assert!(invalid(&v2(0x21, 0x31, &[0; 100])));
    }

    #[test]
    fn v2_refusals() {
        assert!(invalid(&v2(0x11, 0x11, &inet_body()))); // version 1
        assert!(invalid(&v2(0x31, 0x11, &inet_body()))); // version 3
        assert!(invalid(&v2(0x22, 0x11, &inet_body()))); // command 2
        assert!(invalid(&v2(0x21, 0x13, &inet_body()))); // transport 3
        assert!(invalid(&v2(0x21, 0x41, &inet_body()))); // family 4
        assert!(invalid(&v2(0x21, 0x10, &inet_body()))); // INET + UNSPEC undefined
        assert!(invalid(&v2(0x21, 0x11, &inet_body()[..11]))); // short address block
        assert!(invalid(&v2(0x21, 0x21, &inet_body()))); // INET6 with 12 bytes
                                                         // Refused as soon as the byte is there, not after the body.
        assert!(invalid(&v2(0x11, 0x11, &[])[..13]));
        assert!(invalid(&v2(0x21, 0x41, &[])[..14]));
    }

    #[test]
    fn v2_length_bound() {
        let mut body = inet_body();
        body.extend_from_slice(&[0x04, 0x00, 0x00]);
        body.resize(MAX_V2_LEN, 0);
        // Fill with NOOP TLV: type 4, len = remaining.
        let room = MAX_V2_LEN - 12 - 3;
        body[12..15].copy_from_slice(&[0x04, (room >> 8) as u8, room as u8]);
        let h = v2(0x21, 0x11, &body);
        assert_eq!(done(&h).1, MAX_HEADER);
        let mut too_big = v2(0x21, 0x11, &inet_body());
        too_big[14..16].copy_from_slice(&((MAX_V2_LEN + 1) as u16).to_be_bytes());
        assert!(invalid(&too_big[..16]));
        too_big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(invalid(&too_big));
    }

    #[test]
    fn not_proxy() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ProxyParse::NotProxy);
        assert_eq!(parse(b"G"), ProxyParse::NotProxy);
        assert_eq!(parse(b"\r\n\r\nX"), ProxyParse::NotProxy);
        assert_eq!(parse(b"PROXX"), ProxyParse::NotProxy);
        assert_eq!(parse(b"proxy TCP4"), ProxyParse::NotProxy);
        assert_eq!(parse(b""), ProxyParse::NeedMore);
        assert_eq!(parse(b"\r\n\r\n\0"), ProxyParse::NeedMore);
        assert_eq!(parse(b"PROX"), ProxyParse::NeedMore);
        assert_eq!(parse_v2(b"PROXY "), ProxyParse::NotProxy);
        assert_eq!(parse_v1(&V2_SIGNATURE), ProxyParse::NotProxy);
    }

    #[test]
    fn v1_forms() {
        let line = b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n";
        assert_eq!(done(line), (Some("1.2.3.4:111".parse().unwrap()), line.len()));
        prefixes_need_more(line);
        let line = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\nGET";
        assert_eq!(done(line), (Some("[2001:db8::1]:65535".parse().unwrap()), line.len() - 3));
        prefixes_need_more(&line[..line.len() - 3]);
        let line = b"PROXY TCP6 ::ffff:10.1.2.3 ::1 1 2\r\n";
        assert_eq!(done(line).0, Some("[::ffff:10.1.2.3]:1".parse().unwrap()));
        assert_eq!(done(b"PROXY UNKNOWN\r\n"), (None, 15));
        let line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(done(line), (None, line.len()));
        prefixes_need_more(line);
        // The longest legal line: exactly 107 bytes.
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {ip} {ip} 65535 65535\r\n");
        assert_eq!(line.len(), 104);
        assert_eq!(done(line.as_bytes()).1, 104);
        let line = format!("PROXY UNKNOWN {}\r\n", "x".repeat(107 - 16));
        assert_eq!(line.len(), 107);
        assert_eq!(done(line.as_bytes()).1, 107);
        prefixes_need_more(line.as_bytes());
    }

    #[test]
    fn v1_malformed() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 1.2.3.256 5.6.7.8 111 222\r\n",
            b"PROXY TCP4 1.2.3 5.6.7.8 111 222\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 111 222\r\n",
            b"PROXY TCP4 ::1 5.6.7.8 111 222\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 111 222\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 111 222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 0111 222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222 333\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222 \r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 111 222\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\rX",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 111 222\r\n",
            b"PROXY tcp4 1.2.3.4 5.6.7.8 111 222\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
        ];
        for line in bad {
            assert!(invalid(line), "{:?} -> {:?}", String::from_utf8_lossy(line), parse(line));
        }
        // Refused before the CRLF arrives.
        for partial in
            [&b"PROXY TCP4 1.2.3.4x"[..], b"PROXY TCP4 1.2.3.4 5.6.7.8 70000", b"PROXY FOO", b"PROXY TCP4 1..2"]
        {
            let verdict = parse(partial);
            if partial == b"PROXY TCP4 1..2" {
                // Characters are fine; std's parser decides at the space.
                assert_eq!(verdict, ProxyParse::NeedMore);
                assert!(invalid(b"PROXY TCP4 1..2 "));
            } else {
                assert!(matches!(verdict, ProxyParse::Invalid(_)), "{partial:?}");
            }
        }
        // No CRLF within 107 bytes.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        assert!(invalid(&long[..107]));
        assert!(invalid(&long[..106]));
        assert_eq!(parse(&long[..105]), ProxyParse::NeedMore);
        // CR at byte 107: the LF would be the 108th.
        let mut late = long[..106].to_vec();
        late.extend_from_slice(b"\r\n");
        assert!(invalid(&late));
    }

    #[test]
    fn cidr_parse() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert_eq!(Cidr::parse("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert_eq!(Cidr::parse(" fd00::/8 ").unwrap().to_string(), "fd00::/8");
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(Cidr::parse("::/0").unwrap().to_string(), "::/0");
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "10.0.0.0/0008",
            "10.0.0.0/256",
            "10.0.0.0/99999999999",
            "foo",
            "10.0.0/8",
            "10.1.0.0/8",
            "fd00::1/8",
            "10.0.0.0 /8",
            "fe80::1%eth0",
        ] {
            let e = Cidr::parse(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains(&format!("{:?}", bad.trim())), "{e}");
        }
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("above 32"));
        assert!(Cidr::parse("10.1.0.0/8").unwrap_err().contains("did you mean 10.0.0.0/8"));
    }

    #[test]
    fn cidr_contains() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.2")));
        assert!(!c.contains(ip("11.0.0.0")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("::ffff:11.1.2.3")));
        assert!(!c.contains(ip("::a01:203"))); // IPv4-compatible, not mapped
        assert!(!c.contains(ip("fd00::1")));
        let h = Cidr::parse("127.0.0.1").unwrap();
        assert!(h.contains(ip("127.0.0.1")) && !h.contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains(ip("fdff::1")) && !v6.contains(ip("fe00::1")) && !v6.contains(ip("10.0.0.1")));
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains(ip("10.9.9.9")) && !mapped.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        let t = Trusted::parse_list(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(!t.is_empty() && t.contains(ip("10.0.0.1")) && t.contains(ip("::1")) && !t.contains(ip("1.1.1.1")));
        let e = Trusted::parse_list(&["10.0.0.0/8".into(), "x".into()]).unwrap_err();
        assert!(e.starts_with("trusted proxy #1: "), "{e}");
        let empty = Trusted::parse_list(&[]).unwrap();
        assert!(empty.is_empty() && !empty.contains(ip("127.0.0.1")));
        assert_eq!(empty, Trusted::default());
    }

    #[test]
    fn xff_rules() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t = Trusted::parse_list(&["10.0.0.0/8".into(), "fd00::/8".into()]).unwrap();
        let proxy = ip("10.0.0.5");
        // Untrusted peer: the header is ignored.
        assert_eq!(client_from_xff(ip("1.2.3.4"), Some("9.9.9.9"), &t), ip("1.2.3.4"));
        assert_eq!(client_from_xff(ip("1.2.3.4"), Some("9.9.9.9"), &Trusted::default()), ip("1.2.3.4"));
        assert_eq!(client_from_xff(proxy, None, &t), proxy);
        assert_eq!(client_from_xff(proxy, Some(""), &t), proxy);
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9"), &t), ip("9.9.9.9"));
        // Chains: the rightmost untrusted entry wins; spoofed left entries lose.
        assert_eq!(client_from_xff(proxy, Some("6.6.6.6, 9.9.9.9, 10.1.1.1"), &t), ip("9.9.9.9"));
        assert_eq!(client_from_xff(proxy, Some("6.6.6.6,9.9.9.9,fd00::2"), &t), ip("9.9.9.9"));
        // All trusted: the leftmost.
        assert_eq!(client_from_xff(proxy, Some("10.0.0.9, 10.1.1.1"), &t), ip("10.0.0.9"));
        // Ports and brackets, whitespace.
        assert_eq!(client_from_xff(proxy, Some(" 9.9.9.9:5678\t"), &t), ip("9.9.9.9"));
        assert_eq!(client_from_xff(proxy, Some("[2001:db8::1]:80"), &t), ip("2001:db8::1"));
        assert_eq!(client_from_xff(proxy, Some("[2001:db8::1]"), &t), ip("2001:db8::1"));
        assert_eq!(client_from_xff(proxy, Some("2001:db8::1"), &t), ip("2001:db8::1"));
        assert_eq!(client_from_xff(proxy, Some("::ffff:9.9.9.9"), &t), ip("::ffff:9.9.9.9"));
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9, ::ffff:10.0.0.1"), &t), ip("9.9.9.9"));
        // Garbage stops the walk at the last good address.
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9, garbage"), &t), proxy);
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9, garbage, 10.1.1.1"), &t), ip("10.1.1.1"));
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9,,10.1.1.1"), &t), ip("10.1.1.1"));
        assert_eq!(client_from_xff(proxy, Some("9.9.9.9, unknown"), &t), proxy);
        for junk in [
            "9.9.9.9:70000",
            "9.9.9.9:",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[9.9.9.9]",
            "fe80::1%eth0",
            "1.2.3.4:5:6",
            "\u{00e9}",
            "9.9.9.9 9.9.9.8",
        ] {
            assert_eq!(client_from_xff(proxy, Some(junk), &t), proxy, "{junk:?}");
        }
        // Bounds: too long → peer; at most 64 entries considered.
        let long = format!("9.9.9.9,{}", "10.0.0.1,".repeat(500));
        assert!(long.len() > MAX_XFF_LEN);
        assert_eq!(client_from_xff(proxy, Some(&long), &t), proxy);
        let many = format!("9.9.9.9{}", ",10.0.0.1".repeat(64));
        assert_eq!(client_from_xff(proxy, Some(&many), &t), ip("10.0.0.1"));
        let fits = format!("9.9.9.9{}", ",10.0.0.1".repeat(63));
        assert_eq!(client_from_xff(proxy, Some(&fits), &t), ip("9.9.9.9"));
    }

    /// Tiny xorshift64* PRNG, deterministic.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn seeds() -> Vec<Vec<u8>> {
        let mut inet_tlv = inet_body();
        inet_tlv.extend_from_slice(&tlvs());
        vec![
            v2(0x21, 0x11, &inet_body()),
            v2(0x21, 0x11, &inet_tlv),
            v2(0x21, 0x21, &inet6_body()),
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x31, &[0; 216]),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 111 222\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ]
    }

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut buf = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(5) {
                0 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] = rng.next() as u8;
                }
                1 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf[i] ^= 1 << rng.below(8);
                }
                2 => {
                    let i = rng.below(buf.len() + 1);
                    buf.insert(i, [b' ', b'\r', b'\n', b'0', b':', b'.', 0, 0xFF][rng.below(8)]);
                }
                3 if !buf.is_empty() => {
                    let i = rng.below(buf.len());
                    buf.remove(i);
                }
                _ => buf.truncate(rng.below(buf.len() + 1)),
            }
        }
        if rng.below(3) == 0 {
            for _ in 0..rng.below(64) {
                buf.push(rng.next() as u8);
            }
        }
        buf
    }

    fn check(buf: &[u8]) {
        let verdict = parse(buf);
        if let ProxyParse::Done { consumed, .. } = verdict {
            assert!(consumed > 0 && consumed <= buf.len(), "{buf:?}");
            // The header alone gives the same answer.
            assert_eq!(parse(&buf[..consumed]), verdict, "{buf:?}");
        }
        let _ = client_from_xff(IpAddr::V4(Ipv4Addr::LOCALHOST), std::str::from_utf8(buf).ok(), &trusted_all());
    }

    fn trusted_all() -> Trusted {
        Trusted::parse_list(&["0.0.0.0/1".into(), "::/1".into()]).unwrap()
    }

    #[test]
    fn never_panics() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let seeds = seeds();
        for round in 0..50_000 {
            let buf = if round % 4 == 0 {
                let mut b: Vec<u8> = (0..rng.below(600)).map(|_| rng.next() as u8).collect();
                // Give random bytes a chance to start like a header.
                match rng.below(3) {
                    0 => b.splice(0..0, V2_SIGNATURE).for_each(drop),
                    1 => b.splice(0..0, b"PROXY ".iter().copied()).for_each(drop),
                    _ => {}
                }
                b
            } else {
                let seed = &seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            };
            check(&buf);
        }
    }

    /// NeedMore only on prefixes: once a prefix is refused or recognised,
    /// no extension of it changes the kind of answer.
    #[test]
    fn verdicts_are_stable_under_extension() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let seeds = seeds();
        for _ in 0..2_000 {
            let seed = &seeds[rng.below(seeds.len())];
            let buf = mutate(&mut rng, seed);
            let full = parse(&buf);
            for n in 0..buf.len() {
                match parse(&buf[..n]) {
                    ProxyParse::NeedMore => {}
                    ProxyParse::NotProxy => assert_eq!(full, ProxyParse::NotProxy, "{buf:?} at {n}"),
                    ProxyParse::Invalid(_) => assert!(matches!(full, ProxyParse::Invalid(_)), "{buf:?} at {n}"),
                    done @ ProxyParse::Done { .. } => assert_eq!(full, done, "{buf:?} at {n}"),
                }
            }
        }
    }
}
