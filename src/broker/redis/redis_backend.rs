//! The real store: one Redis (a RESP3 multiplexed connection that carries
//! commands and subscriptions together) or a Redis Cluster (the crate's
//! cluster connection, RESP3, sharded pub/sub).
//!
//! In single mode a batch is one pipeline, one round trip. A cluster
//! pipeline must stay inside one hash slot and our keys are spread over all
//! of them, so in cluster mode each op is its own small pipeline and all of
//! them are sent at once on the multiplexed node connections (still one
//! round trip per master in practice).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Pipeline, ProtocolVersion, PushInfo, PushKind, Value};

use super::backend::{Backend, ClusterError, Connector, Incoming, Op, Reply, Result};

/// Connect timeout: a dead Redis is noticed in this long at worst.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Response timeout: a slow Redis opens the breaker after this long, while
/// cross-node events wait in the worker's queue (local traffic never waits).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Connects to the URL(s) in `cluster.redis_url`.
#[derive(Debug, Clone)]
pub struct RedisConnector {
    urls: Vec<String>,
    cluster: bool,
}

impl RedisConnector {
    /// `redis_url` (comma-separated seeds in cluster mode) in `mode`.
    pub fn new(redis_url: &str, mode: crate::config::RedisMode) -> Result<Self> {
        let urls: Vec<String> = redis_url.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(ClusterError::Config("cluster.redis_url is empty".into()));
        }
        let cluster = mode == crate::config::RedisMode::Cluster;
        if urls.len() > 1 && !cluster {
            return Err(ClusterError::Config("several URLs need cluster.redis_mode = \"cluster\"".into()));
        }
        Ok(Self { urls, cluster })
    }

    /// True in Redis Cluster mode.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }
}

/// A live connection.
#[derive(Clone)]
pub enum RedisConn {
    /// One Redis.
    Single(MultiplexedConnection),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

fn push_forwarder(tx: super::queue::Tx<Incoming>) -> impl Fn(PushInfo) -> std::result::Result<(), ()> + Send + Sync {
    move |info: PushInfo| {
        let msg = match info.kind {
            PushKind::Message | PushKind::SMessage => match <[Value; 2]>::try_from(info.data) {
                Ok([Value::BulkString(ch), Value::BulkString(payload)]) => {
                    Incoming::Message { channel: String::from_utf8_lossy(&ch).into_owned(), payload }
                }
                _ => return Ok(()),
            },
            PushKind::Disconnection => Incoming::Disconnected,
            _ => return Ok(()),
        };
        // Past the byte budget a message is dropped (counted by the
        // budget); the subscription itself carries on.
        let w = msg.weight();
        tx.send(msg, w);
        Ok(())
    }
}

fn with_resp3(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}protocol=resp3")
}

impl Connector for RedisConnector {
    type Conn = RedisConn;

    async fn connect(&self, incoming: super::queue::Tx<Incoming>) -> Result<RedisConn> {
        let fut = async {
            if self.is_cluster() {
                let client = ClusterClientBuilder::new(self.urls.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .retries(2)
                    .push_sender(push_forwarder(incoming))
                    .build()
                    .map_err(|e| ClusterError::Config(e.to_string()))?;
                let conn = client.get_async_connection().await.map_err(|e| ClusterError::Connect(e.to_string()))?;
                Ok(RedisConn::Cluster(conn))
            } else {
                let client =
                    redis::Client::open(with_resp3(&self.urls[0])).map_err(|e| ClusterError::Config(e.to_string()))?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_push_sender(push_forwarder(incoming));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| ClusterError::Connect(e.to_string()))?;
                Ok(RedisConn::Single(conn))
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT * 2, fut).await.map_err(|_| ClusterError::Timeout)?
    }
}

/// Appends `op`'s commands to `p`.
fn add(p: &mut Pipeline, op: &Op, cluster: bool) {
    match op {
        Op::HSet { key, fields, ttl_ms } => {
            let c = p.cmd("HSET").arg(key);
            for (f, v) in fields {
                c.arg(*f).arg(v);
            }
            p.cmd("PEXPIRE").arg(key).arg(*ttl_ms);
        }
        Op::Set { key, value, ttl_ms } => {
            p.cmd("SET").arg(key).arg(value).arg("PX").arg(*ttl_ms);
        }
        Op::Expire { key, ttl_ms } => {
            p.cmd("PEXPIRE").arg(key).arg(*ttl_ms);
        }
        Op::HSetField { key, field, value, ttl_ms } => {
            p.cmd("HSET").arg(key).arg(field).arg(value);
            p.cmd("PEXPIRE").arg(key).arg(*ttl_ms);
        }
        Op::HDel { key, field } => {
            p.cmd("HDEL").arg(key).arg(field);
        }
        Op::Del { key } => {
            p.cmd("DEL").arg(key);
        }
        Op::DelIfNode { key, node } => {
            p.cmd("EVAL").arg(DEL_IF_NODE).arg(1).arg(key).arg(node);
        }
        Op::SAdd { key, member } => {
            p.cmd("SADD").arg(key).arg(member);
        }
        Op::SRem { key, member } => {
            p.cmd("SREM").arg(key).arg(member);
        }
        Op::SMembers { key } => {
            p.cmd("SMEMBERS").arg(key);
        }
        Op::Get { key } => {
            p.cmd("GET").arg(key);
        }
        Op::HGet { key, field } => {
            p.cmd("HGET").arg(key).arg(*field);
        }
        Op::HGetAll { key } => {
            p.cmd("HGETALL").arg(key);
        }
        Op::SessionOpen { key, member, score, ttl_ms } => {
            p.cmd("EVAL").arg(SESSION_OPEN).arg(1).arg(key).arg(*score).arg(member).arg(*ttl_ms);
        }
        Op::ZRange { key } => {
            p.cmd("ZRANGE").arg(key).arg(0).arg(-1);
        }
        Op::ZRem { key, member } => {
            p.cmd("ZREM").arg(key).arg(member);
        }
        Op::HistoryPublish { seq, stream, channel, header, prefix, size, ttl_ms, new_epoch, node, node_seq } => {
            let publish = if cluster { "SPUBLISH" } else { "PUBLISH" };
            p.cmd("EVAL").arg(HISTORY_PUBLISH).arg(2).arg(seq).arg(stream);
            p.arg(prefix).arg(*size).arg(*ttl_ms).arg(new_epoch).arg(publish).arg(channel).arg(header);
            p.arg(node).arg(*node_seq);
        }
        Op::HistoryRecover { seq, stream, since, ttl_ms, new_epoch } => {
            let (offset, epoch) = match since {
                Some((o, e)) => (o.to_string(), e.clone()),
                None => (String::new(), String::new()),
            };
            p.cmd("EVAL").arg(HISTORY_RECOVER).arg(2).arg(seq).arg(stream);
            p.arg(offset).arg(epoch).arg(*ttl_ms).arg(new_epoch).arg(super::keys::REPLAY_MAX_BYTES);
        }
        Op::Publish { channel, payload } => {
            p.cmd(if cluster { "SPUBLISH" } else { "PUBLISH" }).arg(channel).arg(payload);
        }
    }
}

/// Deletes a conn hash only while it still names this node.
const DEL_IF_NODE: &str =
    "if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Adds a session and answers all of the client's sessions, oldest first.
const SESSION_OPEN: &str = "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) \
     redis.call('PEXPIRE', KEYS[1], ARGV[3]) return redis.call('ZRANGE', KEYS[1], 0, -1)";

/// Numbers, keeps and publishes a message of a room with history.
/// KEYS: seq, stream. ARGV: prefix, size, ttl_ms, new_epoch, PUBLISH or
/// SPUBLISH, channel, header, node id, the node's sequence number (a
/// client-side retry of a script that already ran is recognised by it and
/// answers -1 instead of numbering the message twice).
const HISTORY_PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', 0)
end
local mine = 'n:' .. ARGV[8]
if tonumber(ARGV[9]) <= tonumber(redis.call('HGET', KEYS[1], mine) or '0') then return -1 end
redis.call('HSET', KEYS[1], mine, ARGV[9])
local off = redis.call('HINCRBY', KEYS[1], 'last', 1)
local msg = ARGV[1] .. off .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '*', 'o', off, 'm', msg)
local t = redis.call('TIME')
local cut = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', cut))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[5], ARGV[6], ARGV[7] .. epoch .. '\n' .. off .. '\n' .. msg)
return off
"#;

/// A room's position and the kept messages after `since`.
/// KEYS: seq, stream. ARGV: since offset ('' = none), since epoch, ttl_ms
/// (0: trim nothing), new_epoch ('' = do not start a sequence), the most
/// bytes of messages to answer (past it: not recovered). Reads only the
/// missed entries. Returns {epoch, last, recovered (0/1), {messages}}.
const HISTORY_RECOVER: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[4] == '' then return {'', 0, 0, {}} end
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'last', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last'))
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  local cut = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])
  redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', cut))
end
if ARGV[1] == '' then return {epoch, last, 1, {}} end
local since = tonumber(ARGV[1])
if ARGV[2] ~= epoch or since > last then return {epoch, last, 0, {}} end
if since == last then return {epoch, last, 1, {}} end
-- The stream holds contiguous offsets: the newest (last - since) entries are
-- the missed ones, if all are still kept. Read only those, newest first.
local want = last - since
local entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', want)
if #entries < want or tonumber(entries[#entries][2][2]) ~= since + 1 then return {epoch, last, 0, {}} end
local out = {}
local bytes = 0
for i = #entries, 1, -1 do
  local m = entries[i][2][4]
  bytes = bytes + #m
  if bytes > tonumber(ARGV[5]) then return {epoch, last, 0, {}} end
  out[#out + 1] = m
end
return {epoch, last, 1, out}
"#;

/// The reply of `op` from its first command's value.
fn reply(op: &Op, v: Value) -> Result<Reply> {
    let bad = |e: redis::ParsingError| ClusterError::Command(e.to_string());
    if let Value::ServerError(e) = &v {
        return Err(ClusterError::Command(format!("{e:?}")));
    }
    Ok(match op {
        Op::Get { .. } | Op::HGet { .. } => Reply::Str(redis::from_redis_value::<Option<String>>(v).map_err(bad)?),
        Op::HGetAll { .. } => Reply::Map(redis::from_redis_value::<HashMap<String, String>>(v).map_err(bad)?),
        Op::SMembers { .. } | Op::SessionOpen { .. } | Op::ZRange { .. } => {
            Reply::List(redis::from_redis_value::<Vec<String>>(v).map_err(bad)?)
        }
        Op::Publish { .. } | Op::HistoryPublish { .. } => Reply::Int(redis::from_redis_value::<i64>(v).map_err(bad)?),
        Op::HistoryRecover { .. } => {
            let (epoch, last, ok, msgs) = redis::from_redis_value::<(String, u64, i64, Vec<String>)>(v).map_err(bad)?;
            Reply::Recovery(epoch, last, ok == 1, msgs)
        }
        _ => Reply::Done,
    })
}

fn cmd_err(e: redis::RedisError) -> ClusterError {
    if e.is_timeout() {
        ClusterError::Timeout
    } else {
        ClusterError::Command(e.to_string())
    }
}

async fn run_pipeline(conn: &mut impl redis::aio::ConnectionLike, p: &Pipeline) -> Result<Vec<Value>> {
    timed(p.query_async::<Vec<Value>>(conn)).await
}

/// Maps the values of a pipeline built from `ops` back to one reply per op.
fn replies(ops: &[Op], values: Vec<Value>) -> Result<Vec<Reply>> {
    let mut it = values.into_iter();
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let first = it.next().ok_or_else(|| ClusterError::Command("short pipeline reply".into()))?;
        for _ in 1..op.commands() {
            if let Some(Value::ServerError(e)) = it.next() {
                return Err(ClusterError::Command(format!("{e:?}")));
            }
        }
        out.push(reply(op, first)?);
    }
    Ok(out)
}

impl Backend for RedisConn {
    async fn exec(&mut self, ops: &[Op]) -> Result<Vec<Reply>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            RedisConn::Single(conn) => {
                let mut p = redis::pipe();
                for op in ops {
                    add(&mut p, op, false);
                }
                replies(ops, run_pipeline(conn, &p).await?)
            }
            RedisConn::Cluster(conn) => {
                let futs = ops.iter().map(|op| {
                    let mut conn = conn.clone();
                    async move {
                        let mut p = redis::pipe();
                        add(&mut p, op, true);
                        let values = run_pipeline(&mut conn, &p).await?;
                        replies(std::slice::from_ref(op), values).map(|mut r| r.remove(0))
                    }
                });
                join_all(futs).await.into_iter().collect()
            }
        }
    }

    async fn subscribe(&mut self, channels: &[String]) -> Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let fut = async {
            match self {
                RedisConn::Single(c) => c.subscribe(channels).await,
                RedisConn::Cluster(c) => {
                    // Sharded channels must be subscribed slot by slot.
                    for ch in channels {
                        c.ssubscribe(ch).await?;
                    }
                    Ok(())
                }
            }
        };
        timed(fut).await
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let fut = async {
            match self {
                RedisConn::Single(c) => c.unsubscribe(channels).await,
                RedisConn::Cluster(c) => {
                    for ch in channels {
                        c.sunsubscribe(ch).await?;
                    }
                    Ok(())
                }
            }
        };
        timed(fut).await
    }
}

/// Runs one Redis exchange under the response deadline: a slow Redis is a
/// failure (the breaker counts it), never a wait on the caller's side.
async fn timed<T>(fut: impl std::future::Future<Output = redis::RedisResult<T>>) -> Result<T> {
    match tokio::time::timeout(RESPONSE_TIMEOUT * 2, fut).await {
        Ok(r) => r.map_err(cmd_err),
        Err(_) => Err(ClusterError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_urls_mean_cluster() {
        use crate::config::RedisMode::{Cluster, Standalone};
        assert!(!RedisConnector::new("redis://a:1", Standalone).unwrap().is_cluster());
        assert!(RedisConnector::new("redis://a:1", Cluster).unwrap().is_cluster(), "one seed is enough");
        assert!(RedisConnector::new("redis://a:1, redis://b:2", Cluster).unwrap().is_cluster());
        assert!(RedisConnector::new("redis://a:1, redis://b:2", Standalone).is_err());
        assert!(RedisConnector::new(" , ", Cluster).is_err());
        assert_eq!(with_resp3("redis://a:1"), "redis://a:1?protocol=resp3");
        assert_eq!(with_resp3("redis://a:1/?db=2"), "redis://a:1/?db=2&protocol=resp3");
    }

    #[test]
    fn replies_follow_ops() {
        let ops = vec![
            Op::HSet { key: "k".into(), fields: vec![("a", "1".into())], ttl_ms: 5 },
            Op::Get { key: "g".into() },
            Op::HGet { key: "h".into(), field: "node" },
        ];
        let values = vec![Value::Int(1), Value::Int(1), Value::BulkString(b"v".to_vec()), Value::Nil];
        let r = replies(&ops, values).unwrap();
        assert_eq!(r, vec![Reply::Done, Reply::Str(Some("v".into())), Reply::Str(None)]);
        assert!(replies(&ops, vec![Value::Int(1)]).is_err());
    }
}
