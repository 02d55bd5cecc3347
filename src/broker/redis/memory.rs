//! An in-memory store with Redis semantics for the ops the worker uses
//! (hashes, strings, sets, TTLs, pub/sub), shared by several simulated
//! nodes. Unit tests drive the worker against it, and switch it "down" to
//! exercise the breaker. Not for production: no persistence, one lock.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::backend::{Backend, ClusterError, Connector, Incoming, Op, Reply, Result};

#[derive(Debug, Clone)]
enum Val {
    Str(Vec<u8>),
    Hash(HashMap<String, String>),
    Set(BTreeSet<String>),
    /// (score, member), kept sorted.
    ZSet(Vec<(u64, String)>),
    /// (added, offset, message): a room's history stream.
    Stream(Vec<(Instant, u64, String)>),
}

#[derive(Debug)]
struct Entry {
    val: Val,
    expires: Option<Instant>,
}

struct Sub {
    id: u64,
    channels: HashSet<String>,
    tx: super::queue::Tx<Incoming>,
}

#[derive(Default)]
struct Hub {
    kv: HashMap<String, Entry>,
    subs: Vec<Sub>,
    down: bool,
    next_id: u64,
    commands: u64,
}

/// The shared store; clone it to hand it to several nodes.
#[derive(Clone, Default)]
pub struct MemoryHub {
    inner: Arc<Mutex<Hub>>,
}

/// A connection to a [`MemoryHub`].
pub struct MemoryConn {
    hub: MemoryHub,
    id: u64,
}

impl MemoryHub {
    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates Redis stopping (`true`: every connection drops) or returning.
    pub fn set_down(&self, down: bool) {
        let mut h = self.lock();
        h.down = down;
        if down {
            for s in h.subs.drain(..) {
                let _ = s.tx.send(Incoming::Disconnected, None);
            }
        }
    }

    /// A hash's fields, or empty.
    pub fn hash(&self, key: &str) -> HashMap<String, String> {
        match self.lock().get(key) {
            Some(Val::Hash(h)) => h.clone(),
            _ => HashMap::new(),
        }
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Option<String> {
        match self.lock().get(key) {
            Some(Val::Str(v)) => Some(String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        }
    }

    /// A sorted set's members, lowest score first.
    pub fn zset(&self, key: &str) -> Vec<String> {
        match self.lock().get(key) {
            Some(Val::ZSet(z)) => z.into_iter().map(|(_, m)| m).collect(),
            _ => Vec::new(),
        }
    }

    /// Remaining TTL of `key`.
    pub fn ttl(&self, key: &str) -> Option<Duration> {
        let h = self.lock();
        h.kv.get(key).and_then(|e| e.expires).map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Channels with at least one subscriber.
    pub fn channels(&self) -> BTreeSet<String> {
        self.lock().subs.iter().flat_map(|s| s.channels.iter().cloned()).collect()
    }
}

impl Hub {
    fn get(&mut self, key: &str) -> Option<Val> {
        let expired = self.kv.get(key).is_some_and(|e| e.expires.is_some_and(|t| t <= Instant::now()));
        if expired {
            self.kv.remove(key);
        }
        self.kv.get(key).map(|e| e.val.clone())
    }

    fn expire(&mut self, key: &str, ttl_ms: u64) {
        if self.get(key).is_some() {
            if let Some(e) = self.kv.get_mut(key) {
                e.expires = Some(Instant::now() + Duration::from_millis(ttl_ms));
            }
        }
    }

    fn put(&mut self, key: &str, val: Val, expires: Option<Instant>) {
        self.kv.insert(key.to_string(), Entry { val, expires });
    }

    /// A room's (epoch, last offset), starting a sequence with `new_epoch`.
    fn sequence(&mut self, seq: &str, stream: &str, new_epoch: &str, ttl_ms: u64) -> (String, u64) {
        if let Some(Val::Hash(h)) = self.get(seq) {
            let last = h.get("last").and_then(|l| l.parse().ok()).unwrap_or(0);
            return (h.get("epoch").cloned().unwrap_or_default(), last);
        }
        self.kv.remove(stream);
        let mut h = HashMap::new();
        h.insert("epoch".to_string(), new_epoch.to_string());
        h.insert("last".to_string(), "0".to_string());
        self.put(seq, Val::Hash(h), Some(Instant::now() + Duration::from_millis(ttl_ms)));
        (new_epoch.to_string(), 0)
    }

    fn run(&mut self, op: &Op) -> Reply {
        self.commands += op.commands();
        match op {
            Op::HSet { key, fields, ttl_ms } => {
                let mut h = match self.get(key) {
                    Some(Val::Hash(h)) => h,
                    _ => HashMap::new(),
                };
                h.extend(fields.iter().map(|(f, v)| (f.to_string(), v.clone())));
                self.put(key, Val::Hash(h), None);
                self.expire(key, *ttl_ms);
            }
            Op::Set { key, value, ttl_ms } => {
                self.put(key, Val::Str(value.clone()), Some(Instant::now() + Duration::from_millis(*ttl_ms)))
            }
            Op::Expire { key, ttl_ms } => self.expire(key, *ttl_ms),
            Op::HSetField { key, field, value, ttl_ms } => {
                let mut h = match self.get(key) {
                    Some(Val::Hash(h)) => h,
                    _ => HashMap::new(),
                };
                h.insert(field.clone(), value.clone());
                self.put(key, Val::Hash(h), None);
                self.expire(key, *ttl_ms);
            }
            Op::HDel { key, field } => {
                if let Some(e) = self.kv.get_mut(key) {
                    if let Val::Hash(h) = &mut e.val {
                        h.remove(field);
                        if h.is_empty() {
                            self.kv.remove(key);
                        }
                    }
                }
            }
            Op::Del { key } => {
                self.kv.remove(key);
            }
            Op::DelIfNode { key, node } => {
                if let Some(Val::Hash(h)) = self.get(key) {
                    if h.get("node") == Some(node) {
                        self.kv.remove(key);
                    }
                }
            }
            Op::SAdd { key, member } => {
                let mut s = match self.get(key) {
                    Some(Val::Set(s)) => s,
                    _ => BTreeSet::new(),
                };
                s.insert(member.clone());
                self.put(key, Val::Set(s), None);
            }
            Op::SRem { key, member } => {
                if let Some(e) = self.kv.get_mut(key) {
                    if let Val::Set(s) = &mut e.val {
                        s.remove(member);
                    }
                }
            }
            Op::SMembers { key } => {
                return Reply::List(match self.get(key) {
                    Some(Val::Set(s)) => s.into_iter().collect(),
                    _ => Vec::new(),
                })
            }
            Op::Get { key } => {
                return Reply::Str(match self.get(key) {
                    Some(Val::Str(v)) => Some(String::from_utf8_lossy(&v).into_owned()),
                    _ => None,
                })
            }
            Op::HGet { key, field } => {
                return Reply::Str(match self.get(key) {
                    Some(Val::Hash(h)) => h.get(*field).cloned(),
                    _ => None,
                })
            }
            Op::HGetAll { key } => {
                return Reply::Map(match self.get(key) {
                    Some(Val::Hash(h)) => h,
                    _ => HashMap::new(),
                })
            }
            Op::SessionOpen { key, member, score, ttl_ms } => {
                let mut z = match self.get(key) {
                    Some(Val::ZSet(z)) => z,
                    _ => Vec::new(),
                };
                z.retain(|(_, m)| m != member);
                z.push((*score, member.clone()));
                z.sort();
                let all = z.iter().map(|(_, m)| m.clone()).collect();
                self.put(key, Val::ZSet(z), None);
                self.expire(key, *ttl_ms);
                return Reply::List(all);
            }
            Op::ZRange { key } => {
                return Reply::List(match self.get(key) {
                    Some(Val::ZSet(z)) => z.into_iter().map(|(_, m)| m).collect(),
                    _ => Vec::new(),
                })
            }
            Op::ZRem { key, member } => {
                if let Some(e) = self.kv.get_mut(key) {
                    if let Val::ZSet(z) = &mut e.val {
                        z.retain(|(_, m)| m != member);
                        if z.is_empty() {
                            self.kv.remove(key);
                        }
                    }
                }
            }
            Op::HistoryPublish { seq, stream, channel, header, prefix, size, ttl_ms, new_epoch, .. } => {
                let (epoch, last) = self.sequence(seq, stream, new_epoch, *ttl_ms);
                let off = last + 1;
                let msg = format!("{prefix}{off}}}");
                let mut st = match self.get(stream) {
                    Some(Val::Stream(v)) => v,
                    _ => Vec::new(),
                };
                st.push((Instant::now(), off, msg.clone()));
                let ttl = Duration::from_millis(*ttl_ms);
                st.retain(|(at, _, _)| at.elapsed() < ttl);
                let excess = st.len().saturating_sub(*size);
                st.drain(..excess);
                let mut h = HashMap::new();
                h.insert("epoch".to_string(), epoch.clone());
                h.insert("last".to_string(), off.to_string());
                self.put(seq, Val::Hash(h), Some(Instant::now() + ttl));
                self.put(stream, Val::Stream(st), Some(Instant::now() + ttl));
                let payload = format!("{header}{epoch}\n{off}\n{msg}").into_bytes();
                self.run(&Op::Publish { channel: channel.clone(), payload });
                return Reply::Int(off as i64);
            }
            Op::HistoryRecover { seq, stream, since, ttl_ms, new_epoch } => {
                if new_epoch.is_empty() && self.get(seq).is_none() {
                    return Reply::Recovery(String::new(), 0, false, Vec::new());
                }
                let (epoch, last) = self.sequence(seq, stream, new_epoch, *ttl_ms);
                let ttl = if *ttl_ms == 0 { Duration::MAX } else { Duration::from_millis(*ttl_ms) };
                let kept: Vec<(u64, String)> = match self.get(stream) {
                    Some(Val::Stream(v)) => {
                        v.into_iter().filter(|(at, _, _)| at.elapsed() < ttl).map(|(_, o, m)| (o, m)).collect()
                    }
                    _ => Vec::new(),
                };
                let Some((from, their)) = since else { return Reply::Recovery(epoch, last, true, Vec::new()) };
                if *their != epoch || *from > last {
                    return Reply::Recovery(epoch, last, false, Vec::new());
                }
                let first = kept.first().map_or(last + 1, |(o, _)| *o);
                if *from < last && first > from + 1 {
                    return Reply::Recovery(epoch, last, false, Vec::new());
                }
                let msgs: Vec<String> = kept.into_iter().filter(|(o, _)| o > from).map(|(_, m)| m).collect();
                if msgs.iter().map(String::len).sum::<usize>() > super::keys::REPLAY_MAX_BYTES {
                    return Reply::Recovery(epoch, last, false, Vec::new());
                }
                return Reply::Recovery(epoch, last, true, msgs);
            }
            Op::Publish { channel, payload } => {
                let mut n = 0;
                for s in self.subs.iter().filter(|s| s.channels.contains(channel)) {
                    let m = Incoming::Message { channel: channel.clone(), payload: payload.clone() };
                    let w = m.weight();
                    let _ = s.tx.send(m, w);
                    n += 1;
                }
                return Reply::Int(n);
            }
        }
        Reply::Done
    }
}

/// Connects to a [`MemoryHub`].
#[derive(Clone)]
pub struct MemoryConnector(pub MemoryHub);

impl Connector for MemoryConnector {
    type Conn = MemoryConn;

    async fn connect(&self, incoming: super::queue::Tx<Incoming>) -> Result<MemoryConn> {
        let mut h = self.0.lock();
        if h.down {
            return Err(ClusterError::Connect("memory store is down".into()));
        }
        h.next_id += 1;
        let id = h.next_id;
        h.subs.push(Sub { id, channels: HashSet::new(), tx: incoming });
        Ok(MemoryConn { hub: self.0.clone(), id })
    }
}

impl MemoryConn {
    fn with_sub(&self, f: impl FnOnce(&mut HashSet<String>)) -> Result<()> {
        let mut h = self.hub.lock();
        if h.down {
            return Err(ClusterError::Command("memory store is down".into()));
        }
        match h.subs.iter_mut().find(|s| s.id == self.id) {
            Some(s) => {
                f(&mut s.channels);
                Ok(())
            }
            None => Err(ClusterError::Command("connection dropped".into())),
        }
    }
}

impl Backend for MemoryConn {
    async fn exec(&mut self, ops: &[Op]) -> Result<Vec<Reply>> {
        let mut h = self.hub.lock();
        if h.down {
            return Err(ClusterError::Command("memory store is down".into()));
        }
        Ok(ops.iter().map(|op| h.run(op)).collect())
    }

    async fn subscribe(&mut self, channels: &[String]) -> Result<()> {
        self.with_sub(|s| s.extend(channels.iter().cloned()))
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> Result<()> {
        self.with_sub(|s| {
            for c in channels {
                s.remove(c);
            }
        })
    }
}

impl Drop for MemoryConn {
    fn drop(&mut self) {
        let id = self.id;
        self.hub.lock().subs.retain(|s| s.id != id);
    }
}
