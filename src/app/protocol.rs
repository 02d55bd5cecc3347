//! The JSON rooms protocol on `/ws`: parsing client messages, building
//! server messages, and the error codes answered on the connection.
//!
//! `data` is never re-serialized: it is kept as the client's raw JSON and
//! spliced into the outgoing envelope. Room names and client ids are checked
//! against charsets that need no JSON escaping, so envelopes are built with
//! plain string pushes. A message fanned out to many members is framed once
//! and shared as [`Bytes`].

use std::borrow::Cow;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A parsed client message. Borrowed from the frame's text.
#[derive(Debug, PartialEq)]
pub enum Request<'a> {
    /// `{"type":"join","room":R}`
    Join(Cow<'a, str>),
    /// `{"type":"join","room":R,"since":{"offset":O,"epoch":E}}`: join and
    /// first get the messages published after offset `O` of epoch `E`.
    JoinSince {
        /// Room.
        room: Cow<'a, str>,
        /// The last offset the client saw.
        offset: u64,
        /// The epoch it saw it in.
        epoch: Cow<'a, str>,
    },
    /// `{"type":"leave","room":R}`
    Leave(Cow<'a, str>),
    /// `{"type":"publish","room":R,"data":ANY}`
    Publish {
        /// Room.
        room: Cow<'a, str>,
        /// Raw JSON.
        data: &'a str,
    },
    /// `{"type":"direct","to":ID,"data":ANY}`
    Direct {
        /// Target client id.
        to: Cow<'a, str>,
        /// Raw JSON.
        data: &'a str,
    },
    /// `{"type":"echo","data":ANY}`
    Echo(&'a str),
    /// `{"type":"ping","id":X}`
    Ping(&'a str),
    /// `{"type":"presence","room":R}`
    Presence(Cow<'a, str>),
    /// `{"type":"refresh","token":T}`
    Refresh(Cow<'a, str>),
    /// `{"type":"rpc","id":X,"method":M,"data":D}`: asked of the backend
    /// that `[[proxy.rpc]]` routes `M` to.
    Rpc {
        /// The client's id for the answer (raw JSON, echoed back).
        id: &'a str,
        /// Method name (checked against [`valid_room`]'s charset).
        method: Cow<'a, str>,
        /// Raw JSON.
        data: &'a str,
    },
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    since: Option<Since<'a>>,
}

#[derive(Deserialize)]
struct Since<'a> {
    offset: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

/// Parses one client text message. Unknown fields are ignored (forward
/// compatibility); `data` and `id` default to `null`.
pub fn parse(text: &str, max_payload: usize) -> Result<Request<'_>, ClientError> {
    let w: Wire = serde_json::from_str(text).map_err(|_| ClientError::BadJson)?;
    let ty = w.ty.ok_or(ClientError::UnknownType)?;
    let data = || -> Result<&str, ClientError> {
        let d = w.data.map(RawValue::get).unwrap_or("null");
        if d.len() > max_payload {
            Err(ClientError::TooLarge)
        } else {
            strict(d)
        }
    };
    Ok(match ty.as_ref() {
        "join" => match w.since {
            None => Request::Join(room_of(w.room)?),
            Some(Since { offset, epoch }) if valid_epoch(&epoch) => {
                Request::JoinSince { room: room_of(w.room)?, offset, epoch }
            }
            Some(_) => return Err(ClientError::BadJson),
        },
        "leave" => Request::Leave(room_of(w.room)?),
        "publish" => Request::Publish { room: room_of(w.room)?, data: data()? },
        "direct" => {
            let to = w.to.ok_or(ClientError::MissingField)?;
            if !valid_client_id(&to) {
                return Err(ClientError::BadClientId);
            }
            Request::Direct { to, data: data()? }
        }
        "echo" => Request::Echo(data()?),
        "presence" => Request::Presence(room_of(w.room)?),
        "ping" => Request::Ping(strict(w.id.map(RawValue::get).unwrap_or("null"))?),
        "refresh" => Request::Refresh(w.token.ok_or(ClientError::MissingField)?),
        "rpc" => Request::Rpc {
            id: strict(w.id.map(RawValue::get).unwrap_or("null"))?,
            method: w.method.ok_or(ClientError::MissingField)?,
            data: data()?,
        },
        _ => return Err(ClientError::UnknownType),
    })
}

/// A raw value that is relayed verbatim to other clients must be JSON that
/// strict parsers accept too: the grammar alone (what `RawValue` checks)
/// lets through lone surrogate escapes, numbers beyond f64 and nesting past
/// 128 levels, which would make the envelope unreadable for its recipients
/// (found by fuzz/ws_json). Costs a parse of `data`, off the echo path.
fn strict(raw: &str) -> Result<&str, ClientError> {
    serde_json::from_str::<serde_json::Value>(raw).map(|_| raw).map_err(|_| ClientError::BadJson)
}

fn room_of<'a>(r: Option<Cow<'a, str>>) -> Result<Cow<'a, str>, ClientError> {
    let r = r.ok_or(ClientError::MissingField)?;
    if valid_room(&r) {
        Ok(r)
    } else {
        Err(ClientError::BadRoom)
    }
}

/// Room names: 1-128 of `[A-Za-z0-9_.:-]`.
pub fn valid_room(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Epochs: 1-32 of `[A-Za-z0-9]` (the server makes 16 hex digits).
pub fn valid_epoch(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Client ids: 1-64 of `[A-Za-z0-9_-]` (they go into JSON and Redis keys
/// without escaping).
pub fn valid_client_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `{"type":"welcome","client_id":ID,"node":NODE,"shard":N}`
pub fn welcome(client_id: &str, node: &str, shard: usize) -> String {
    format!(r#"{{"type":"welcome","client_id":"{client_id}","node":"{node}","shard":{shard}}}"#)
}

/// The welcome with the connect backend's `data` (raw JSON) added.
pub fn welcome_with(client_id: &str, node: &str, shard: usize, data: Option<&str>) -> String {
    match data {
        None => welcome(client_id, node, shard),
        Some(d) => {
            format!(r#"{{"type":"welcome","client_id":"{client_id}","node":"{node}","shard":{shard},"data":{d}}}"#)
        }
    }
}

/// `{"type":"rpc_result","id":X,"data":R}` (`id` and `data` raw JSON).
pub fn rpc_result(id: &str, data: &str) -> String {
    format!(r#"{{"type":"rpc_result","id":{id},"data":{data}}}"#)
}

/// An error answering request `id` (raw JSON), with the backend's own
/// `{"code":..,"reason":..}` when it gave one.
pub fn error_for(e: ClientError, id: &str, message: &str, backend: Option<&serde_json::Value>) -> String {
    let id: serde_json::Value = serde_json::from_str(id).unwrap_or(serde_json::Value::Null);
    let mut v = serde_json::json!({"type": "error", "code": e.code(), "id": id, "message": message});
    if let Some(b) = backend {
        v["backend"] = b.clone();
    }
    v.to_string()
}

/// `{"type":"joined","room":R}` / `{"type":"left","room":R}`
pub fn room_ack(kind: &str, room: &str) -> String {
    format!(r#"{{"type":"{kind}","room":"{room}"}}"#)
}

/// `{"type":"message","room":R,"from":ID,"data":ANY}`
pub fn room_message(room: &str, from: &str, data: &str) -> String {
    let mut s = String::with_capacity(48 + room.len() + from.len() + data.len());
    s.push_str(r#"{"type":"message","room":""#);
    s.push_str(room);
    s.push_str(r#"","from":""#);
    s.push_str(from);
    s.push_str(r#"","data":"#);
    s.push_str(data);
    s.push('}');
    s
}

/// `{"type":"message","room":R,"from":ID,"data":ANY,"offset":N}`: a
/// message of a room with history.
pub fn room_message_at(room: &str, from: &str, data: &str, offset: u64) -> String {
    let mut s = room_message_prefix(room, from, data);
    s.push_str(&offset.to_string());
    s.push('}');
    s
}

/// `{"type":"message","room":R,"from":ID,"data":ANY,"offset":` — what
/// [`room_message_at`] gives before the number, for a store that numbers it.
pub fn room_message_prefix(room: &str, from: &str, data: &str) -> String {
    let mut s = room_message(room, from, data);
    s.pop();
    s.push_str(r#","offset":"#);
    s
}

/// `{"type":"joined","room":R,"offset":N,"epoch":E}` for a room with
/// history, with `"recovered":B` when the join asked for recovery.
pub fn joined_at(room: &str, offset: u64, epoch: &str, recovered: Option<bool>) -> String {
    match recovered {
        Some(r) => {
            format!(r#"{{"type":"joined","room":"{room}","offset":{offset},"epoch":"{epoch}","recovered":{r}}}"#)
        }
        None => format!(r#"{{"type":"joined","room":"{room}","offset":{offset},"epoch":"{epoch}"}}"#),
    }
}

/// `{"type":"presence","room":R,"clients":[...]}` (ids need no escaping).
pub fn presence(room: &str, clients: &[Arc<str>]) -> String {
    let mut s = format!(r#"{{"type":"presence","room":"{room}","clients":["#);
    for (i, c) in clients.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        s.push_str(c);
        s.push('"');
    }
    s.push_str("]}");
    s
}

/// `{"type":"presence_join"|"presence_leave","room":R,"client_id":ID}`
pub fn presence_event(join: bool, room: &str, client_id: &str) -> String {
    let kind = if join { "presence_join" } else { "presence_leave" };
    format!(r#"{{"type":"{kind}","room":"{room}","client_id":"{client_id}"}}"#)
}

/// `{"type":"direct","from":ID,"data":ANY}`
pub fn direct_message(from: &str, data: &str) -> String {
    format!(r#"{{"type":"direct","from":"{from}","data":{data}}}"#)
}

/// `{"type":"echo","data":ANY}`
pub fn echo(data: &str) -> String {
    format!(r#"{{"type":"echo","data":{data}}}"#)
}

/// `{"type":"pong","id":X}`
pub fn pong(id: &str) -> String {
    format!(r#"{{"type":"pong","id":{id}}}"#)
}

/// `{"type":"refreshed","exp":E}`
pub fn refreshed(exp: u64) -> String {
    format!(r#"{{"type":"refreshed","exp":{exp}}}"#)
}

/// `{"type":"preempted","reason":TEXT,"reconnect_delay_ms":N}`
pub fn preempted(reason: &str, reconnect_delay_ms: u64) -> String {
    serde_json::json!({"type": "preempted", "reason": reason, "reconnect_delay_ms": reconnect_delay_ms}).to_string()
}

/// Why a client is asked to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintReason {
    /// The node is shutting down.
    Drain,
    /// The node is overloaded and a peer has room (cluster rebalancing).
    Rebalance,
    /// The node is being replaced by a new process.
    Upgrade,
}

impl HintReason {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            HintReason::Drain => "drain",
            HintReason::Rebalance => "rebalance",
            HintReason::Upgrade => "upgrade",
        }
    }
}

/// `{"type":"reconnect","url":U,"after_ms":J,"reason":R}`: go to `url` (""
/// = the same address, through the balancer) after `after_ms`.
pub fn reconnect(url: &str, after_ms: u64, reason: HintReason) -> String {
    serde_json::json!({"type": "reconnect", "url": url, "after_ms": after_ms, "reason": reason.name()}).to_string()
}

/// `{"type":"affinity","node":N,"url":U}`: this client's affinity node is another one.
pub fn affinity(node: &str, url: &str) -> String {
    serde_json::json!({"type": "affinity", "node": node, "url": url}).to_string()
}

/// `{"type":"error","code":CODE,"message":TEXT}`
pub fn error(e: ClientError, message: &str) -> String {
    serde_json::json!({"type": "error", "code": e.code(), "message": message}).to_string()
}

/// An error answered on `/ws` with `{"type":"error",...}`; the connection stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// Not a JSON object, or a field of the wrong type.
    BadJson,
    /// `type` missing or not one the server knows.
    UnknownType,
    /// A required field is missing.
    MissingField,
    /// Room name not 1-128 of `[A-Za-z0-9_.:-]`.
    BadRoom,
    /// Target client id malformed.
    BadClientId,
    /// `direct` to a client connected nowhere.
    UnknownClient,
    /// `data` larger than `rooms.max_payload_bytes`.
    TooLarge,
    /// Joining more than `rooms.max_rooms_per_connection` rooms.
    TooManyRooms,
    /// A binary frame on `/ws` (the rooms protocol is JSON text).
    BinaryNotSupported,
    /// The message could not be delivered across shards (mailbox full).
    Overloaded,
    /// Publishing to a room the connection has not joined
    /// (`rooms.publish_requires_join`).
    NotJoined,
    /// More messages than `limits.messages_per_second` (plus the burst).
    RateLimited,
    /// Joining or publishing outside the token's `rooms` / `publish`
    /// claims, or refreshing with another client's token.
    Forbidden,
    /// A refresh token that does not verify (expired, bad signature, ...).
    InvalidToken,
    /// The cluster's store (Redis) is unreachable: a publish did not reach
    /// other nodes (a room with history: nobody), or a direct message could
    /// not be looked up.
    Unavailable,
    /// An `rpc` failed: no route for its method, or the backend answered
    /// an error (its `code` and `reason` are passed on).
    RpcFailed,
    /// The backend could not be asked (no connection in time, breaker
    /// open, timeout, connection refused); nothing was done.
    BackendUnavailable,
    /// The publish backend rejected the message; nobody got it.
    PublishRejected,
}

impl ClientError {
    /// Every variant, for metrics.
    pub const ALL: [ClientError; 18] = [
        ClientError::BadJson,
        ClientError::UnknownType,
        ClientError::MissingField,
        ClientError::BadRoom,
        ClientError::BadClientId,
        ClientError::UnknownClient,
        ClientError::TooLarge,
        ClientError::TooManyRooms,
        ClientError::BinaryNotSupported,
        ClientError::Overloaded,
        ClientError::NotJoined,
        ClientError::RateLimited,
        ClientError::Forbidden,
        ClientError::InvalidToken,
        ClientError::Unavailable,
        ClientError::RpcFailed,
        ClientError::BackendUnavailable,
        ClientError::PublishRejected,
    ];

    /// The stable `code` string.
    pub fn code(self) -> &'static str {
        match self {
            ClientError::BadJson => "bad_json",
            ClientError::UnknownType => "unknown_type",
            ClientError::MissingField => "missing_field",
            ClientError::BadRoom => "bad_room",
            ClientError::BadClientId => "bad_client_id",
            ClientError::UnknownClient => "unknown_client",
            ClientError::TooLarge => "too_large",
            ClientError::TooManyRooms => "too_many_rooms",
            ClientError::BinaryNotSupported => "binary_not_supported",
            ClientError::Overloaded => "overloaded",
            ClientError::NotJoined => "not_joined",
            ClientError::RateLimited => "rate_limited",
            ClientError::Forbidden => "forbidden",
            ClientError::InvalidToken => "invalid_token",
            ClientError::Unavailable => "unavailable",
            ClientError::RpcFailed => "rpc_failed",
            ClientError::BackendUnavailable => "backend_unavailable",
            ClientError::PublishRejected => "publish_rejected",
        }
    }

    /// Index into per-code counters.
    pub fn index(self) -> usize {
        ClientError::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The human text for each error code.
pub fn error_text(e: ClientError) -> &'static str {
    match e {
        ClientError::BadJson => "message is not a JSON object of the expected shape",
        ClientError::UnknownType => "missing or unknown \"type\"",
        ClientError::MissingField => "a required field is missing",
        ClientError::BadRoom => "room must be 1-128 of [A-Za-z0-9_.:-]",
        ClientError::BadClientId => "client id must be 1-64 of [A-Za-z0-9_-]",
        ClientError::UnknownClient => "no such client is connected",
        ClientError::TooLarge => "data is larger than rooms.max_payload_bytes",
        ClientError::TooManyRooms => "joined too many rooms (rooms.max_rooms_per_connection)",
        ClientError::BinaryNotSupported => "binary frames are not part of the /ws protocol; send JSON text",
        ClientError::Overloaded => "the node is overloaded; message not delivered",
        ClientError::NotJoined => "join the room before publishing to it",
        ClientError::RateLimited => "too many messages; slow down (limits.messages_per_second)",
        ClientError::Forbidden => "not allowed by your token (rooms / publish claims, or another client's token)",
        ClientError::InvalidToken => "the token does not verify (expired, malformed or badly signed)",
        ClientError::Unavailable => {
            "the cluster's store is unreachable: the message did not reach other nodes (in a room with history: nobody)"
        }
        ClientError::RpcFailed => "the RPC failed: no backend for this method, or the backend answered an error",
        ClientError::BackendUnavailable => {
            "the application's backend could not be asked; nothing was done; retry later"
        }
        ClientError::PublishRejected => "the application's backend rejected this publish; nobody got it",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_type() {
        assert_eq!(parse(r#"{"type":"join","room":"a.b:c-d_e"}"#, 100), Ok(Request::Join("a.b:c-d_e".into())));
        assert_eq!(
            parse(r#"{"type":"join","room":"r","since":{"offset":7,"epoch":"00ff"}}"#, 100),
            Ok(Request::JoinSince { room: "r".into(), offset: 7, epoch: "00ff".into() })
        );
        for bad in [r#"{"offset":-1,"epoch":"e"}"#, r#"{"offset":1,"epoch":"a\"b"}"#, r#"{"offset":1}"#, "7"] {
            let text = format!(r#"{{"type":"join","room":"r","since":{bad}}}"#);
            assert_eq!(parse(&text, 100), Err(ClientError::BadJson), "{text}");
        }
        let v: serde_json::Value = serde_json::from_str(&room_message_at("r", "c", "[1]", 42)).unwrap();
        assert_eq!((v["offset"].as_u64(), v["data"][0].as_u64()), (Some(42), Some(1)));
        assert_eq!(parse(r#"{"type":"presence","room":"r"}"#, 100), Ok(Request::Presence("r".into())));
        let v: serde_json::Value = serde_json::from_str(&presence("r", &[Arc::from("a"), Arc::from("b")])).unwrap();
        assert_eq!(v["clients"], serde_json::json!(["a", "b"]));
        let v: serde_json::Value = serde_json::from_str(&presence_event(false, "r", "a")).unwrap();
        assert_eq!((v["type"].as_str(), v["client_id"].as_str()), (Some("presence_leave"), Some("a")));
        let v: serde_json::Value = serde_json::from_str(&joined_at("r", 3, "ab", Some(false))).unwrap();
        assert_eq!(
            (v["offset"].as_u64(), v["epoch"].as_str(), v["recovered"].as_bool()),
            (Some(3), Some("ab"), Some(false))
        );
        assert_eq!(parse(r#"{"room":"r","type":"leave","x":1}"#, 100), Ok(Request::Leave("r".into())));
        assert_eq!(
            parse(r#"{"type":"publish","room":"r","data":{"k":[1,2]}}"#, 100),
            Ok(Request::Publish { room: "r".into(), data: r#"{"k":[1,2]}"# })
        );
        assert_eq!(
            parse(r#"{"type":"direct","to":"u1","data":"hi"}"#, 100),
            Ok(Request::Direct { to: "u1".into(), data: "\"hi\"" })
        );
        assert_eq!(parse(r#"{"type":"echo"}"#, 100), Ok(Request::Echo("null")));
        assert_eq!(parse(r#"{"type":"ping","id":7}"#, 100), Ok(Request::Ping("7")));
    }

    #[test]
    fn errors_have_stable_codes() {
        assert_eq!(parse("nope", 100), Err(ClientError::BadJson));
        assert_eq!(parse("[1]", 100), Err(ClientError::BadJson));
        assert_eq!(parse(r#"{"type":5}"#, 100), Err(ClientError::BadJson));
        assert_eq!(parse(r#"{"room":"x"}"#, 100), Err(ClientError::UnknownType));
        assert_eq!(parse(r#"{"type":"dance"}"#, 100), Err(ClientError::UnknownType));
        assert_eq!(parse(r#"{"type":"join"}"#, 100), Err(ClientError::MissingField));
        assert_eq!(parse(r#"{"type":"join","room":"a b"}"#, 100), Err(ClientError::BadRoom));
        assert_eq!(
            parse(&format!(r#"{{"type":"join","room":"{}"}}"#, "r".repeat(129)), 100),
            Err(ClientError::BadRoom)
        );
        assert_eq!(parse(r#"{"type":"direct","to":"a b"}"#, 100), Err(ClientError::BadClientId));
        assert_eq!(parse(r#"{"type":"publish","room":"r","data":"0123456789"}"#, 5), Err(ClientError::TooLarge));
        // Valid grammar, but not for strict readers (fuzz/crashes/ws_json).
        assert_eq!(parse(r#"{"type":"echo","data":"\ude00"}"#, 100), Err(ClientError::BadJson));
        assert_eq!(parse(r#"{"type":"ping","id":"\ud800"}"#, 100), Err(ClientError::BadJson));
        assert_eq!(parse(r#"{"type":"echo","data":1e400}"#, 100), Err(ClientError::BadJson));
        let deep = format!(r#"{{"type":"echo","data":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(parse(&deep, 1 << 20), Err(ClientError::BadJson));
    }

    #[test]
    fn envelopes_are_valid_json() {
        for s in [
            welcome("c1", "n1", 3),
            room_ack("joined", "r"),
            room_message("r", "c1", r#"{"a":[1,"x"]}"#),
            direct_message("c1", "null"),
            echo("\"x\""),
            pong("{\"n\":1}"),
            error(ClientError::BadJson, "quote \" and \\ ok"),
            affinity("n2", "ws://127.0.0.1:1/ws"),
        ] {
            let v: serde_json::Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert!(v["type"].is_string());
        }
    }
}

#[cfg(test)]
mod fuzzish {
    //! Random and mutated client messages: `parse` answers every one with a
    //! request or a stable error and never panics.
    use super::*;

    #[test]
    fn random_and_mutated_messages_never_panic() {
        let seeds = [
            r#"{"type":"publish","room":"r","data":{"a":[1,2,{"b":null}]}}"#,
            r#"{"type":"direct","to":"u1","data":"x"}"#,
            r#"{"type":"ping","id":1}"#,
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..30_000 {
            let mut input = seeds[rng.usize(..seeds.len())].as_bytes().to_vec();
            for _ in 0..rng.usize(1..4) {
                if input.is_empty() {
                    break;
                }
                let i = rng.usize(..input.len());
                input[i] = rng.u8(32..127);
            }
            if let Ok(text) = std::str::from_utf8(&input) {
                if let Ok(Request::Publish { room, data }) = parse(text, 1 << 20) {
                    assert!(valid_room(&room));
                    serde_json::from_str::<serde_json::Value>(data).expect("data is valid JSON");
                }
            }
        }
    }
}
