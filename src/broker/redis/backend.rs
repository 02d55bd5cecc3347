//! The narrow interface between the cluster worker and a Redis-like store:
//! a batch of [`Op`]s executed in one round trip, channel subscriptions, and
//! pushed messages arriving on a channel. [`super::redis_backend`] is the real
//! one (single Redis or Redis Cluster); [`super::memory`] is the in-memory
//! double the unit tests use.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;

/// One operation in a batch. Each yields exactly one [`Reply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `HSET key f v ...` then `PEXPIRE key ttl_ms`.
    HSet {
        /// Key.
        key: String,
        /// Field/value pairs.
        fields: Vec<(&'static str, String)>,
        /// TTL, ms.
        ttl_ms: u64,
    },
    /// `SET key value PX ttl_ms`.
    Set {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// TTL, ms.
        ttl_ms: u64,
    },
    /// `PEXPIRE key ttl_ms`.
    Expire {
        /// Key.
        key: String,
        /// TTL, ms.
        ttl_ms: u64,
    },
    /// `HSET key field value` then `PEXPIRE key ttl_ms` (a field named at run time).
    HSetField {
        /// Key.
        key: String,
        /// Field.
        field: String,
        /// Value.
        value: String,
        /// TTL, ms.
        ttl_ms: u64,
    },
    /// `HDEL key field`.
    HDel {
        /// Key.
        key: String,
        /// Field.
        field: String,
    },
    /// `DEL key`.
    Del {
        /// Key.
        key: String,
    },
    /// Deletes the conn hash `key` only if its `node` field is `node` (a
    /// client that moved to another node keeps that node's entry).
    DelIfNode {
        /// Key.
        key: String,
        /// Expected owner.
        node: String,
    },
    /// `SADD key member`.
    SAdd {
        /// Key.
        key: String,
        /// Member.
        member: String,
    },
    /// `SREM key member`.
    SRem {
        /// Key.
        key: String,
        /// Member.
        member: String,
    },
    /// `SMEMBERS key` → [`Reply::List`].
    SMembers {
        /// Key.
        key: String,
    },
    /// `GET key` → [`Reply::Str`].
    Get {
        /// Key.
        key: String,
    },
    /// `HGET key field` → [`Reply::Str`].
    HGet {
        /// Key.
        key: String,
        /// Field.
        field: &'static str,
    },
    /// `HGETALL key` → [`Reply::Map`] (empty when the key is gone).
    HGetAll {
        /// Key.
        key: String,
    },
    /// Adds `member` to the sorted set `key` with `score`, refreshes its TTL
    /// and answers every member, lowest score first ([`Reply::List`]); one
    /// atomic script.
    SessionOpen {
        /// Key.
        key: String,
        /// Member.
        member: String,
        /// Score.
        score: u64,
        /// TTL, ms.
        ttl_ms: u64,
    },
    /// `ZRANGE key 0 -1` → [`Reply::List`], lowest score first.
    ZRange {
        /// Key.
        key: String,
    },
    /// `ZREM key member`.
    ZRem {
        /// Key.
        key: String,
        /// Member.
        member: String,
    },
    /// One atomic script: numbers a message of a room with history, keeps it
    /// in the room's stream (at most `size`, none older than `ttl_ms`) and
    /// publishes `header` + `offset \n` + message on `channel` →
    /// [`Reply::Int`], the offset. A room without a sequence (new, or
    /// expired) starts one with `new_epoch`.
    HistoryPublish {
        /// `keys::history_seq`.
        seq: String,
        /// `keys::history_stream`.
        stream: String,
        /// The room's channel.
        channel: String,
        /// `keys::ordered_header`.
        header: String,
        /// The message JSON up to its offset (`...,"offset":`).
        prefix: String,
        /// Messages kept.
        size: usize,
        /// Age kept and the keys' TTL, ms.
        ttl_ms: u64,
        /// The epoch if the room has none.
        new_epoch: String,
        /// The publishing node.
        node: String,
        /// Its sequence number, increasing per node (retries are recognised).
        node_seq: u64,
    },
    /// One atomic script: the room's epoch and last offset (starting a
    /// sequence with `new_epoch` if it has none) and, for `since`, the kept
    /// messages after it → [`Reply::Recovery`].
    HistoryRecover {
        /// `keys::history_seq`.
        seq: String,
        /// `keys::history_stream`.
        stream: String,
        /// The client's last (offset, epoch).
        since: Option<(u64, String)>,
        /// Age kept and the keys' TTL, ms.
        ttl_ms: u64,
        /// The epoch if the room has none.
        new_epoch: String,
    },
    /// `PUBLISH` (or `SPUBLISH` in cluster mode) → [`Reply::Int`], the receivers.
    Publish {
        /// Channel.
        channel: String,
        /// Message.
        payload: Vec<u8>,
    },
}

impl Op {
    /// Redis commands this op costs (for `redis_commands`).
    pub fn commands(&self) -> u64 {
        match self {
            Op::HSet { .. } | Op::HSetField { .. } => 2,
            _ => 1,
        }
    }
}

/// The answer to one [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Writes.
    Done,
    /// `PUBLISH` / `SPUBLISH`: how many subscribers received it.
    Int(i64),
    /// `GET` / `HGET`.
    Str(Option<String>),
    /// `HGETALL`.
    Map(HashMap<String, String>),
    /// `SMEMBERS`.
    List(Vec<String>),
    /// `HistoryRecover`: (epoch, last offset, recovered, messages).
    Recovery(String, u64, bool, Vec<String>),
}

impl Reply {
    /// The string of a `Str` reply.
    pub fn into_str(self) -> Option<String> {
        match self {
            Reply::Str(s) => s,
            _ => None,
        }
    }
}

impl Incoming {
    /// Its weight in the incoming queue: messages are data (bounded), a
    /// disconnection is control.
    pub fn weight(&self) -> Option<usize> {
        match self {
            Incoming::Message { channel, payload } => Some(channel.len() + payload.len() + 64),
            Incoming::Disconnected => None,
        }
    }
}

/// Something the store pushed to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message on a subscribed channel.
    Message {
        /// Channel.
        channel: String,
        /// Message bytes.
        payload: Vec<u8>,
    },
    /// The connection carrying the subscriptions dropped.
    Disconnected,
}

/// Why a Redis operation failed. Every variant opens the breaker; none ends a
/// client connection (local traffic never depends on Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterError {
    /// Could not connect (refused, unreachable, handshake failed).
    Connect(String),
    /// A command failed or the connection broke.
    Command(String),
    /// No answer within the response timeout.
    Timeout,
    /// The configuration cannot work (bad URL).
    Config(String),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::Connect(e) => write!(f, "redis connect: {e}"),
            ClusterError::Command(e) => write!(f, "redis command: {e}"),
            ClusterError::Timeout => write!(f, "redis timeout"),
            ClusterError::Config(e) => write!(f, "redis config: {e}"),
        }
    }
}

impl std::error::Error for ClusterError {}

/// Result of a store operation.
pub type Result<T> = std::result::Result<T, ClusterError>;

/// One live connection to the store.
pub trait Backend {
    /// Runs `ops` (pipelined where the store allows) and returns one reply per op.
    fn exec(&mut self, ops: &[Op]) -> impl Future<Output = Result<Vec<Reply>>>;
    /// Subscribes to `channels` (sharded in cluster mode).
    fn subscribe(&mut self, channels: &[String]) -> impl Future<Output = Result<()>>;
    /// Unsubscribes from `channels`.
    fn unsubscribe(&mut self, channels: &[String]) -> impl Future<Output = Result<()>>;
}

/// Opens connections; messages for subscribed channels go to `incoming`.
pub trait Connector {
    /// The connection type.
    type Conn: Backend;
    /// Connects (with its own timeout).
    fn connect(&self, incoming: super::queue::Tx<Incoming>) -> impl Future<Output = Result<Self::Conn>>;
}
