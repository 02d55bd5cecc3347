//! Redis key and channel names (fixed, so operators and tests can read
//! them), their TTLs, and the wire format of cross-node messages.
//!
//! Every message a node publishes starts with its own node id and a newline,
//! so that a node can drop its own room messages when Redis echoes them
//! back (the sender's node already delivered locally).

/// Prefix of every key and channel.
pub const PREFIX: &str = "ringside:";
/// Set of node ids that registered at least once; members whose node hash
/// expired are removed by whichever node reads the registry next.
pub const NODES_SET: &str = "ringside:nodes";
/// A conn key lives this many sync intervals without a refresh. Live
/// connections are refreshed in [`REFRESH_ROUNDS`] slices, so a key is
/// touched every 10 intervals: 10k connections cost 1k PEXPIREs per interval
/// (one pipelined round trip), and a crashed node's keys vanish in 30.
pub const CONN_TTL_INTERVALS: u64 = 30;
/// Bytes of messages one recovery or repair may fetch from a room's stream
/// at most; a larger gap is not recovered (the client resyncs). Bounds what
/// a client asking for a long history makes the cluster thread hold.
pub const REPLAY_MAX_BYTES: usize = 8 << 20;
/// Live connections are refreshed in this many slices, one per interval.
pub const REFRESH_ROUNDS: u64 = 10;
/// Node, pool and sample keys live this many intervals (the issue's "TTL 3
/// intervals": a SIGKILLed node disappears within 3).
pub const NODE_TTL_INTERVALS: u64 = 3;

/// `ringside:node:{node_id}`
pub fn node(node_id: &str) -> String {
    format!("{PREFIX}node:{node_id}")
}

/// `ringside:pool:{node_id}:{shard}`
pub fn pool(node_id: &str, shard: usize) -> String {
    format!("{PREFIX}pool:{node_id}:{shard}")
}

/// `ringside:conn:{client_id}`
pub fn conn(client_id: &str) -> String {
    format!("{PREFIX}conn:{client_id}")
}

/// `ringside:sessions:{client_id}`: a sorted set of the client's live
/// sessions in the whole cluster, `{node}|{conn}` scored by when they
/// opened (unix ms × 1000 + a per-node sequence), oldest first.
pub fn sessions(client_id: &str) -> String {
    format!("{PREFIX}sessions:{client_id}")
}

/// A session's member in [`sessions`].
pub fn session_member(node_id: &str, conn: u64) -> String {
    format!("{node_id}|{conn}")
}

/// `(node, conn)` of a [`session_member`]; `None` if malformed.
pub fn parse_session_member(m: &str) -> Option<(&str, u64)> {
    let (node, conn) = m.rsplit_once('|')?;
    Some((node, conn.parse().ok()?))
}

/// `ringside:seq:{ringside:room:R}`: a room with history's `epoch` and
/// `last` offset. The hash tag is the room's channel, so that in Redis
/// Cluster the keys and the channel share a slot (one script publishes).
pub fn history_seq(room: &str) -> String {
    format!("{PREFIX}seq:{{{ROOM_CHANNEL}{room}}}")
}

/// `ringside:history:{ringside:room:R}`: the room's kept messages, a stream
/// of `o` (offset) and `m` (message JSON).
pub fn history_stream(room: &str) -> String {
    format!("{PREFIX}history:{{{ROOM_CHANNEL}{room}}}")
}

/// `ringside:presence:{ringside:room:R}`: who is in room R, fields
/// `{client_id}|{node_id}` (one per node where the client has a session in
/// the room); readers skip nodes that are not live.
pub fn presence(room: &str) -> String {
    format!("{PREFIX}presence:{{{ROOM_CHANNEL}{room}}}")
}

/// The start of an ordered room message on the wire, before the script
/// appends `epoch \n offset \n message`: `origin \n #conn \n`.
pub fn ordered_header(origin: &str, conn: u64) -> String {
    format!("{origin}\n#{conn}\n")
}

/// A room message from the channel.
#[derive(Debug, PartialEq, Eq)]
pub enum RoomMsg<'a> {
    /// A message of a room without history (already delivered on its origin).
    Plain(&'a str),
    /// A message of a room with history: `(publisher's conn, epoch, offset, JSON)`.
    Ordered(u64, &'a str, u64, &'a str),
}

/// `(origin, message)` of a room channel message; `None` if malformed.
pub fn decode_room_msg(msg: &[u8]) -> Option<(&str, RoomMsg<'_>)> {
    let (origin, rest) = split_line(msg)?;
    let Some(rest) = rest.strip_prefix(b"#") else {
        return Some((origin, RoomMsg::Plain(std::str::from_utf8(rest).ok()?)));
    };
    let (conn, rest) = split_line(rest)?;
    let (epoch, rest) = split_line(rest)?;
    let (offset, body) = split_line(rest)?;
    let body = std::str::from_utf8(body).ok()?;
    Some((origin, RoomMsg::Ordered(conn.parse().ok()?, epoch, offset.parse().ok()?, body)))
}

/// `ringside:affinity:{client_id}`
pub fn affinity(client_id: &str) -> String {
    format!("{PREFIX}affinity:{client_id}")
}

/// `ringside:sample:{node_id}`
pub fn sample(node_id: &str) -> String {
    format!("{PREFIX}sample:{node_id}")
}

/// Prefix of room channels.
pub const ROOM_CHANNEL: &str = "ringside:room:";
/// Prefix of node inbox channels.
pub const INBOX_CHANNEL: &str = "ringside:inbox:";

/// `ringside:room:{room}`
pub fn room_channel(room: &str) -> String {
    format!("{ROOM_CHANNEL}{room}")
}

/// `ringside:inbox:{node_id}`
pub fn inbox_channel(node_id: &str) -> String {
    format!("{INBOX_CHANNEL}{node_id}")
}

/// A room message on the wire: `origin \n payload`.
pub fn encode_room(origin: &str, payload: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(origin.len() + 1 + payload.len());
    v.extend_from_slice(origin.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(payload.as_bytes());
    v
}

/// `(origin, payload)` of a room message; `None` if malformed.
pub fn decode_room(msg: &[u8]) -> Option<(&str, &str)> {
    let (origin, rest) = split_line(msg)?;
    Some((origin, std::str::from_utf8(rest).ok()?))
}

/// A direct message on the wire: `origin \n to \n frame` (the frame is the
/// complete WebSocket frame the target receives, passed through untouched).
pub fn encode_direct(origin: &str, to: &str, frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(origin.len() + to.len() + 2 + frame.len());
    v.extend_from_slice(origin.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(to.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(frame);
    v
}

/// `(origin, to, frame)` of a direct message; `None` if malformed.
pub fn decode_direct(msg: &[u8]) -> Option<(&str, &str, &[u8])> {
    let (origin, rest) = split_line(msg)?;
    let (to, frame) = split_line(rest)?;
    // The id is the application's to check (its sink looks it up).
    (!to.is_empty()).then_some((origin, to, frame))
}

/// The `to` of an inbox message that replaces a session instead of carrying
/// a frame (no client id contains `!`).
const REPLACE: &str = "!replace";

/// An inbox message telling a node to close its session `conn` of
/// `client_id` (replaced by a newer one): `origin \n !replace \n client \n conn`.
pub fn encode_replace(origin: &str, client_id: &str, conn: u64) -> Vec<u8> {
    format!("{origin}\n{REPLACE}\n{client_id}\n{conn}").into_bytes()
}

/// What arrived on a node's inbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbox<'a> {
    /// A direct message: `(to, frame)`.
    Direct(&'a str, &'a [u8]),
    /// Close session `conn` of this client: `(client_id, conn)`.
    Replace(&'a str, u64),
}

/// Decodes an inbox message; `None` if malformed.
pub fn decode_inbox(msg: &[u8]) -> Option<Inbox<'_>> {
    let (_, to, rest) = decode_direct(msg)?;
    if to != REPLACE {
        return Some(Inbox::Direct(to, rest));
    }
    let (client, conn) = split_line(rest)?;
    Some(Inbox::Replace(client, std::str::from_utf8(conn).ok()?.parse().ok()?))
}

fn split_line(b: &[u8]) -> Option<(&str, &[u8])> {
    let i = b.iter().position(|&c| c == b'\n')?;
    Some((std::str::from_utf8(&b[..i]).ok()?, &b[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones() {
        assert_eq!(node("n1"), "ringside:node:n1");
        assert_eq!(pool("n1", 3), "ringside:pool:n1:3");
        assert_eq!(conn("c"), "ringside:conn:c");
        assert_eq!(affinity("c"), "ringside:affinity:c");
        assert_eq!(sessions("c"), "ringside:sessions:c");
        assert_eq!(history_seq("r.1"), "ringside:seq:{ringside:room:r.1}");
        assert_eq!(history_stream("r.1"), "ringside:history:{ringside:room:r.1}");
        assert_eq!(session_member("n-1", 42), "n-1|42");
        assert_eq!(sample("n1"), "ringside:sample:n1");
        assert_eq!(room_channel("r.1"), "ringside:room:r.1");
        assert_eq!(inbox_channel("n2"), "ringside:inbox:n2");
    }

    #[test]
    fn messages_round_trip() {
        let m = encode_room("n1", "{\"a\":\"x\\ny\"}");
        assert_eq!(decode_room(&m), Some(("n1", "{\"a\":\"x\\ny\"}")));
        let frame = [0x81u8, 2, b'\n', 0xff];
        let d = encode_direct("n1", "bob", &frame);
        assert_eq!(decode_direct(&d), Some(("n1", "bob", &frame[..])));
        assert_eq!(decode_room(b"no newline"), None);
        assert_eq!(decode_room_msg(&m), Some(("n1", RoomMsg::Plain("{\"a\":\"x\\ny\"}"))));
        let mut o = ordered_header("n2", 77).into_bytes();
        o.extend_from_slice(b"ep1\n5\n{\"offset\":5}");
        assert_eq!(decode_room_msg(&o), Some(("n2", RoomMsg::Ordered(77, "ep1", 5, "{\"offset\":5}"))));
        assert_eq!(decode_room_msg(b"n2\n#x\nep\n5\n{}"), None);
        assert_eq!(decode_direct(b"n1\n\nx"), None);
        assert_eq!(decode_direct(b"n1 only"), None);
        assert_eq!(decode_inbox(&d), Some(Inbox::Direct("bob", &frame[..])));
        assert_eq!(decode_inbox(&encode_replace("n1", "bob", 77)), Some(Inbox::Replace("bob", 77)));
        assert_eq!(decode_inbox(b"n1\n!replace\nbob\nx"), None);
        assert_eq!(parse_session_member("n-1|42"), Some(("n-1", 42)));
        assert_eq!(parse_session_member("n-1"), None);
    }
}
