//! The `/ws` messages as typed Rust values (docs/protocol.md, "Rooms protocol"): what a
//! client sends ([`ClientMsg`]), what the server sends ([`ServerMsg`]) and the server's
//! stable error codes ([`ErrorCode`]). Unknown server message types decode to
//! [`ServerMsg::Unknown`] and unknown error codes to [`ErrorCode::Other`], so a newer
//! server never breaks an older client.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a room's history stands for this client: the last `offset` received and the
/// `epoch` of the `joined` it belongs to. Sent back in `join` to recover what was missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    /// The last offset received (0: none yet).
    pub offset: u64,
    /// The room's history epoch.
    pub epoch: String,
}

/// A message the client sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// Join a room, optionally recovering from `since`.
    Join {
        /// Room name (1-128 of `[A-Za-z0-9_.:-]`).
        room: String,
        /// Last position known, to recover missed messages.
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: String,
    },
    /// Publish to every other member of a room.
    Publish {
        /// Room name.
        room: String,
        /// Any JSON.
        data: Value,
    },
    /// A message to one client id (all its sessions).
    Direct {
        /// The recipient's client id.
        to: String,
        /// Any JSON.
        data: Value,
    },
    /// Ask who is in a room.
    Presence {
        /// Room name.
        room: String,
    },
    /// The server answers with the same data.
    Echo {
        /// Any JSON.
        data: Value,
    },
    /// Application-level round trip.
    Ping {
        /// Any JSON, returned in `pong`.
        id: Value,
    },
    /// Replace the connection's token.
    Refresh {
        /// The new JWT.
        token: String,
    },
    /// A call to the backend that `[[proxy.rpc]]` routes `method` to.
    Rpc {
        /// Any JSON, echoed in the answer (answers may come in any order).
        id: Value,
        /// Method name (1-128 of `[A-Za-z0-9_.:-]`).
        method: String,
        /// Any JSON.
        data: Value,
    },
}

/// A message the server sends. Field order on the wire is not fixed; this is parsed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message after the upgrade.
    Welcome {
        /// This session's client id.
        client_id: String,
        /// The node's id.
        #[serde(default)]
        node: String,
        /// The shard serving the connection.
        #[serde(default)]
        shard: u32,
        /// What the connect proxy's backend added (`proxy.connect`), else `null`.
        #[serde(default)]
        data: Value,
    },
    /// Answer to `join`.
    Joined {
        /// Room name.
        room: String,
        /// The room's current offset (rooms with history).
        #[serde(default)]
        offset: Option<u64>,
        /// The room's history epoch (rooms with history).
        #[serde(default)]
        epoch: Option<String>,
        /// Whether the `since` of the join was recovered in full (when one was given).
        #[serde(default)]
        recovered: Option<bool>,
    },
    /// Answer to `leave`.
    Left {
        /// Room name.
        room: String,
    },
    /// Someone else published to a room this client is in.
    Message {
        /// Room name.
        room: String,
        /// Publisher's client id.
        from: String,
        /// The published data.
        #[serde(default)]
        data: Value,
        /// Position in the room's history (rooms with history).
        #[serde(default)]
        offset: Option<u64>,
    },
    /// A direct message.
    Direct {
        /// Sender's client id.
        from: String,
        /// The data.
        #[serde(default)]
        data: Value,
    },
    /// Answer to `presence`.
    Presence {
        /// Room name.
        room: String,
        /// Sorted client ids in the room.
        clients: Vec<String>,
    },
    /// A client id's first session joined a room.
    PresenceJoin {
        /// Room name.
        room: String,
        /// Who.
        client_id: String,
    },
    /// A client id's last session left a room.
    PresenceLeave {
        /// Room name.
        room: String,
        /// Who.
        client_id: String,
    },
    /// Answer to `echo`.
    Echo {
        /// The data sent.
        #[serde(default)]
        data: Value,
    },
    /// Answer to `ping`.
    Pong {
        /// The id sent.
        #[serde(default)]
        id: Value,
    },
    /// Answer to a successful `refresh`.
    Refreshed {
        /// The new token's expiry (Unix seconds).
        exp: u64,
    },
    /// Sent before a close 4004.
    Preempted {
        /// Human-readable reason.
        #[serde(default)]
        reason: String,
        /// How long to wait before reconnecting.
        reconnect_delay_ms: u64,
    },
    /// Cluster mode: the client's previous node is another live one.
    Affinity {
        /// That node's id.
        #[serde(default)]
        node: String,
        /// Its URL.
        #[serde(default)]
        url: String,
    },
    /// The server asks the client to reconnect (drain, rebalance, upgrade).
    Reconnect {
        /// Where to go; empty: the same address.
        #[serde(default)]
        url: String,
        /// How long to wait before reconnecting (already spread by the server).
        #[serde(default)]
        after_ms: u64,
        /// `drain`, `rebalance` or `upgrade`.
        #[serde(default)]
        reason: String,
    },
    /// Answer to `rpc`.
    RpcResult {
        /// The request's id.
        #[serde(default)]
        id: Value,
        /// The backend's answer.
        #[serde(default)]
        data: Value,
    },
    /// A message was refused; the connection stays open.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable text (not stable).
        #[serde(default)]
        message: String,
        /// The `id` of the `rpc` refused (absent for other messages).
        #[serde(default)]
        id: Option<Value>,
        /// The backend's own `code`/`reason`, when it gave them.
        #[serde(default)]
        backend: Option<Value>,
    },
    /// A message type this client does not know.
    #[serde(other)]
    Unknown,
}

/// The server's error codes (`ClientError` in the server's `src/app/protocol.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not a JSON object of the expected shape.
    BadJson,
    /// Missing or unknown `type`.
    UnknownType,
    /// A required field is missing.
    MissingField,
    /// Bad room name.
    BadRoom,
    /// Bad client id in a direct.
    BadClientId,
    /// Direct to a client connected nowhere.
    UnknownClient,
    /// `data` over `rooms.max_payload_bytes`.
    TooLarge,
    /// Over `rooms.max_rooms_per_connection`.
    TooManyRooms,
    /// Binary message on `/ws`.
    BinaryNotSupported,
    /// A shard mailbox was full.
    Overloaded,
    /// Cluster store unreachable.
    Unavailable,
    /// Publish without joining.
    NotJoined,
    /// Over the message rate.
    RateLimited,
    /// Not allowed by the token.
    Forbidden,
    /// A refresh token that does not verify.
    InvalidToken,
    /// An `rpc` without a route, or the backend answered an error.
    RpcFailed,
    /// The backend could not be asked.
    BackendUnavailable,
    /// The publish proxy's backend rejected a publish.
    PublishRejected,
    /// A code this client does not know.
    Other(String),
}

impl ErrorCode {
    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::BadClientId => "bad_client_id",
            ErrorCode::UnknownClient => "unknown_client",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RpcFailed => "rpc_failed",
            ErrorCode::BackendUnavailable => "backend_unavailable",
            ErrorCode::PublishRejected => "publish_rejected",
            ErrorCode::Other(s) => s,
        }
    }

    /// Parses a wire string (never fails: unknown codes are [`ErrorCode::Other`]).
    pub fn parse(s: &str) -> ErrorCode {
        match s {
            "bad_json" => ErrorCode::BadJson,
            "unknown_type" => ErrorCode::UnknownType,
            "missing_field" => ErrorCode::MissingField,
            "bad_room" => ErrorCode::BadRoom,
            "bad_client_id" => ErrorCode::BadClientId,
            "unknown_client" => ErrorCode::UnknownClient,
            "too_large" => ErrorCode::TooLarge,
            "too_many_rooms" => ErrorCode::TooManyRooms,
            "binary_not_supported" => ErrorCode::BinaryNotSupported,
            "overloaded" => ErrorCode::Overloaded,
            "unavailable" => ErrorCode::Unavailable,
            "not_joined" => ErrorCode::NotJoined,
            "rate_limited" => ErrorCode::RateLimited,
            "forbidden" => ErrorCode::Forbidden,
            "invalid_token" => ErrorCode::InvalidToken,
            "rpc_failed" => ErrorCode::RpcFailed,
            "backend_unavailable" => ErrorCode::BackendUnavailable,
            "publish_rejected" => ErrorCode::PublishRejected,
            other => ErrorCode::Other(other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_messages_serialize_as_the_protocol_says() {
        let j = ClientMsg::Join { room: "a".into(), since: Some(Since { offset: 4, epoch: "e".into() }) };
        assert_eq!(
            serde_json::to_value(&j).unwrap(),
            json!({"type":"join","room":"a","since":{"offset":4,"epoch":"e"}})
        );
        let j = ClientMsg::Join { room: "a".into(), since: None };
        assert_eq!(serde_json::to_value(&j).unwrap(), json!({"type":"join","room":"a"}));
        let c = ClientMsg::Rpc { id: json!(3), method: "user.get".into(), data: json!({"a":1}) };
        assert_eq!(serde_json::to_value(&c).unwrap(), json!({"type":"rpc","id":3,"method":"user.get","data":{"a":1}}));
        let p = ClientMsg::Publish { room: "a".into(), data: json!([1]) };
        assert_eq!(serde_json::to_value(&p).unwrap(), json!({"type":"publish","room":"a","data":[1]}));
        let r = ClientMsg::Refresh { token: "t".into() };
        assert_eq!(serde_json::to_value(&r).unwrap(), json!({"type":"refresh","token":"t"}));
    }

    #[test]
    fn server_messages_parse_whatever_the_field_order() {
        let m: ServerMsg =
            serde_json::from_str(r#"{"offset":3,"data":{"x":1},"from":"b","room":"r","type":"message"}"#).unwrap();
        assert_eq!(m, ServerMsg::Message { room: "r".into(), from: "b".into(), data: json!({"x":1}), offset: Some(3) });
        let e: ServerMsg = serde_json::from_str(r#"{"code":"not_joined","message":"m","type":"error"}"#).unwrap();
        assert_eq!(e, ServerMsg::Error { code: ErrorCode::NotJoined, message: "m".into(), id: None, backend: None });
        let r: ServerMsg = serde_json::from_str(r#"{"type":"rpc_result","id":7,"data":{"ok":1}}"#).unwrap();
        assert_eq!(r, ServerMsg::RpcResult { id: json!(7), data: json!({"ok":1}) });
        let f: ServerMsg = serde_json::from_str(
            r#"{"type":"error","code":"rpc_failed","id":7,"message":"m","backend":{"code":"nope","reason":"r"}}"#,
        )
        .unwrap();
        assert!(matches!(f, ServerMsg::Error { code: ErrorCode::RpcFailed, id: Some(_), backend: Some(_), .. }));
        let h: ServerMsg =
            serde_json::from_str(r#"{"type":"reconnect","url":"ws://x/ws","after_ms":250,"reason":"drain"}"#).unwrap();
        assert_eq!(h, ServerMsg::Reconnect { url: "ws://x/ws".into(), after_ms: 250, reason: "drain".into() });
    }

    #[test]
    fn unknown_types_and_codes_do_not_fail() {
        let u: ServerMsg = serde_json::from_str(r#"{"type":"brand_new_kind","id":1}"#).unwrap();
        assert_eq!(u, ServerMsg::Unknown);
        let e: ServerMsg = serde_json::from_str(r#"{"type":"error","code":"brand_new"}"#).unwrap();
        assert_eq!(
            e,
            ServerMsg::Error {
                code: ErrorCode::Other("brand_new".into()),
                message: String::new(),
                id: None,
                backend: None
            }
        );
        for code in ["bad_json", "forbidden", "invalid_token", "rate_limited", "unavailable"] {
            assert_eq!(ErrorCode::parse(code).as_str(), code);
        }
    }
}
