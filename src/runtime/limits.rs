//! Admission limits: per-address connection caps and connection rate
//! ([`IpTable`]), per-connection message rate ([`TokenBucket`]) and per-shard
//! bounds on sockets still in their HTTP upgrade ([`HandshakeSlots`]).
//!
//! Shards share nothing but mailboxes, so the one structure that all shards
//! touch, [`IpTable`], is lock-free, fixed in size and off the message path:
//! it is used at accept ([`IpTable::admit`]) and at close (dropping the
//! [`IpGuard`]), never per message. The other two are single-threaded and
//! live inside one shard or one connection.
//!
//! # Cost model
//!
//! - [`IpTable`]: one per node, behind an `Arc`, shared by every shard thread.
//!   Memory is fixed at construction: [`BUCKETS`] (65,536) buckets of 16
//!   bytes, 1 MiB, whatever the number of clients. An admit is one CAS loop on
//!   the bucket's connection counter and, when a rate is configured, one CAS
//!   loop on its token word; a close is one `fetch_sub`. The counters carry
//!   no other data, so `Relaxed` ordering is enough: read-modify-writes of one
//!   atomic are totally ordered whatever the ordering argument.
//! - [`TokenBucket`]: 16 bytes inside a connection's table entry, plain
//!   integers, no atomics.
//! - [`HandshakeSlots`]: one per shard, plain collections, memory in
//!   O(`max_per_shard`) entries.
//!
//! # What is exact and what is approximate
//!
//! - Exact: the per-bucket connection cap. The counter is incremented by a
//!   CAS that never moves it past the cap, so concurrent admits on all shards
//!   can never hold more than `max_connections_per_ip` guards for one bucket.
//!   A refusal for the cap consumes no rate token.
//! - Approximate, always in the strict direction:
//!   - Addresses are mapped to buckets by a keyed hash, so two addresses may
//!     share a bucket and then share one limit (see [`IpTable`] for the
//!     odds). Sharing only ever refuses more, never admits more.
//!   - IPv6 addresses are limited per /64 prefix (see [`limit_key`]): one
//!     host usually holds a whole /64 and could otherwise rotate addresses
//!     at will. IPv4-mapped IPv6 addresses count as their IPv4 address.
//!   - Tokens are kept in thousandths of a token and time in whole
//!     milliseconds; each refill rounds down, losing less than one
//!     thousandth of a token or one millisecond of refill.
//!   - An admit first reserves a connection slot and then takes a rate
//!     token; when the token is refused the slot is handed back, and in that
//!     instant a concurrent admit of the same bucket may see it taken and be
//!     refused with [`Refusal::TooManyConnections`].
//!
//! # Clocks
//!
//! All `now_ms` arguments are milliseconds on a monotonic clock.
//! [`IpTable::now_ms`] gives one shared by all shards; per-shard clocks that
//! differ by a few milliseconds are tolerated (a reading older than the
//! bucket's last refill refills nothing; it never refills more).

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Number of buckets in an [`IpTable`]: 2^16 = 65,536, a power of two so
/// that the bucket index is the low bits of the keyed hash. At 16 bytes a
/// bucket, the table takes 1 MiB.
pub const BUCKETS: usize = 1 << 16;

/// Prefix length under which IPv6 addresses share one limit (see
/// [`limit_key`]).
pub const IPV6_PREFIX_LEN: u32 = 64;

/// One token in the fixed-point unit used by both token buckets: tokens are
/// counted in thousandths, so that a rate of `r` tokens per second refills
/// exactly `r` units per millisecond.
const ONE: u64 = 1000;

/// Slack subtracted before rounding a time up, so that floating-point noise
/// in `x / rate` does not add a whole millisecond or second.
const EPS: f64 = 1e-6;

/// Bits of an [`IpTable`] token word that hold the last refill time (ms);
/// the remaining high bits hold the tokens. 2^40 ms is 34.8 years.
const TIME_BITS: u32 = 40;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
/// A time difference at or above this (17.4 years, modulo 2^40) is read as
/// a clock that went backwards.
const TIME_HALF: u64 = 1 << (TIME_BITS - 1);
/// Largest token count an [`IpTable`] word can hold, in units.
const IP_MAX_UNITS: u64 = (1 << (64 - TIME_BITS)) - 1;
/// Largest per-address connection burst: 16,777 connections.
const IP_MAX_BURST: u64 = IP_MAX_UNITS / ONE;
/// Largest per-connection message burst: 4,294,967 messages.
const CONN_MAX_BURST: u64 = u32::MAX as u64 / ONE;

/// The key under which an address is limited: IPv4-mapped IPv6 addresses
/// (`::ffff:a.b.c.d`) become their IPv4 address, other IPv6 addresses keep
/// their first [`IPV6_PREFIX_LEN`] bits and zero the rest, IPv4 addresses
/// are unchanged. [`IpTable`] and [`HandshakeSlots`] both limit by this key,
/// and it is what a log line should name.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << (128 - IPV6_PREFIX_LEN)))),
        },
    }
}

/// A positive, finite rate in tokens per second, which is also units per
/// millisecond; anything else (zero, negative, NaN, infinite) means
/// unlimited.
fn rate_of(rate_per_sec: f64) -> Option<f64> {
    if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
        Some(rate_per_sec)
    } else {
        None
    }
}

/// A burst in tokens as a capacity in units: at least one token (a bucket
/// that can never hold one would refuse everything), at most `max` tokens.
fn capacity(burst: u32, max: u64) -> u64 {
    u64::from(burst).clamp(1, max) * ONE
}

/// The outcome of refilling a bucket.
struct Refill {
    /// Tokens now, in units, at most the capacity.
    units: u64,
    /// Milliseconds of the elapsed time accounted for; the rest (less than
    /// one unit's worth) is carried to the next refill.
    advance: u64,
    /// The refill overflowed the capacity by at least one token.
    wasted_token: bool,
}

/// Refills `units` (out of `cap`) for `elapsed` ms at `rate` units per ms.
fn refill(units: u64, cap: u64, elapsed: u64, rate: f64) -> Refill {
    let units = units.min(cap);
    let gained = elapsed as f64 * rate;
    let room = (cap - units) as f64;
    if gained >= room {
        return Refill { units: cap, advance: elapsed, wasted_token: gained - room >= ONE as f64 };
    }
    // Below `room`, so it fits; `as` rounds down.
    let whole = gained as u64;
    if whole == 0 {
        return Refill { units, advance: 0, wasted_token: false };
    }
    // The time those whole units took, rounded up: the remainder stays
    // pending instead of being lost or counted twice.
    let advance = ((whole as f64 / rate) - EPS).ceil().max(0.0) as u64;
    Refill { units: units + whole, advance: advance.min(elapsed), wasted_token: false }
}

/// Seconds until a bucket holding `units` (< one token) has a whole token,
/// given `pending` ms already elapsed but not yet credited; at least 1.
fn retry_after_secs(units: u64, pending: u64, rate: f64) -> u32 {
    let need_ms = ONE.saturating_sub(units) as f64 / rate - pending as f64;
    let secs = (need_ms / 1000.0 - EPS).ceil();
    if secs >= 1.0 {
        // `as` saturates at u32::MAX.
        secs as u32
    } else {
        1
    }
}

/// Node-wide limits applied per address by an [`IpTable`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct IpLimits {
    /// Open connections one address may hold at once; 0 = no cap.
    pub max_connections_per_ip: u32,
    /// New connections one address may open per second, sustained; 0 (or
    /// anything not positive and finite) = no rate limit.
    pub connection_rate_per_ip: f64,
    /// New connections one address may open at once before the rate
    /// applies. Taken as at least 1 and at most 16,777 when a rate is set.
    pub connection_burst_per_ip: u32,
}

/// Why [`IpTable::admit`] refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address already holds `max_connections_per_ip` connections.
    TooManyConnections,
    /// The address opens connections faster than its rate allows.
    RateLimited {
        /// Seconds until one more connection would be admitted (at least 1),
        /// for a `Retry-After` header.
        retry_after_secs: u32,
    },
}

/// One bucket: 16 bytes.
struct Bucket {
    /// Guards alive for this bucket.
    open: AtomicU32,
    /// Rate state: tokens (units) in the high 24 bits, last refill time (ms
    /// since the table's epoch, modulo 2^40) in the low 40.
    tokens: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Bucket>() <= 16);

fn pack(units: u64, time_ms: u64) -> u64 {
    (units.min(IP_MAX_UNITS) << TIME_BITS) | (time_ms & TIME_MASK)
}

fn unpack(word: u64) -> (u64, u64) {
    (word >> TIME_BITS, word & TIME_MASK)
}

/// Per-address connection cap and connection rate for the whole node.
///
/// Shared by all shard threads behind an `Arc` (it is `Send + Sync`), with
/// fixed memory: [`BUCKETS`] buckets of atomics, 1 MiB. An address (its
/// [`limit_key`]) selects a bucket by SipHash keyed with a random key drawn
/// once in [`IpTable::new`], so an attacker can neither choose addresses
/// that land in a victim's bucket nor learn which buckets collide.
///
/// Two keys that hash to the same bucket share its cap and its rate: that is
/// stricter, never looser. For one address, the chance that any of `n` other
/// active keys shares its bucket is about `n / 65,536` (1.5% with 1,000
/// distinct clients), and sharing only matters when the co-tenant's own
/// connections bring the bucket near its cap, which for caps sized well above
/// what one client needs is negligible. To refuse a victim deliberately, an
/// attacker must fill buckets blindly: denying a fraction `f` of all clients
/// takes about `f × 65,536 × max_connections_per_ip` open connections from
/// as many distinct keys.
pub struct IpTable {
    buckets: Box<[Bucket]>,
    hasher: RandomState,
    epoch: Instant,
    limits: IpLimits,
    /// The connection rate in units per ms, and the capacity in units.
    rate: Option<(f64, u64)>,
}

impl IpTable {
    /// A table enforcing `cfg`, with every bucket empty and its rate bucket
    /// full, and a fresh random hash key. Allocates [`BUCKETS`] buckets
    /// (1 MiB) once.
    pub fn new(cfg: IpLimits) -> IpTable {
        let rate =
            rate_of(cfg.connection_rate_per_ip).map(|r| (r, capacity(cfg.connection_burst_per_ip, IP_MAX_BURST)));
        let full = pack(rate.map_or(0, |(_, cap)| cap), 0);
        let buckets = (0..BUCKETS).map(|_| Bucket { open: AtomicU32::new(0), tokens: AtomicU64::new(full) }).collect();
        IpTable { buckets, hasher: RandomState::new(), epoch: Instant::now(), limits: cfg, rate }
    }

    /// The number of buckets, [`BUCKETS`].
    pub fn bucket_count() -> usize {
        BUCKETS
    }

    /// The limits this table enforces.
    pub fn limits(&self) -> &IpLimits {
        &self.limits
    }

    /// Milliseconds since this table was created: a monotonic clock that
    /// all shards can pass to [`IpTable::admit`].
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn index(&self, ip: IpAddr) -> usize {
        (self.hasher.hash_one(limit_key(ip)) as usize) & (BUCKETS - 1)
    }

    /// Admits a connection from `ip` at `now_ms`, or says why not.
    ///
    /// The connection cap is checked first, by reserving a slot that never
    /// takes the count past the cap, so a refusal for the cap consumes no
    /// token; then one rate token is taken, and if none is left the slot is
    /// handed back. On success the bucket's count stays incremented until
    /// the returned guard is dropped.
    ///
    /// # Errors
    ///
    /// [`Refusal::TooManyConnections`] when the bucket holds its cap (or, for
    /// an instant, when a concurrent admit is handing back a slot), and
    /// [`Refusal::RateLimited`] when it has no rate token left.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now_ms: u64) -> Result<IpGuard, Refusal> {
        let index = self.index(ip);
        let Some(bucket) = self.buckets.get(index) else {
            return Err(Refusal::TooManyConnections);
        };
        let cap = self.limits.max_connections_per_ip;
        let reserved = bucket.open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            if cap != 0 && n >= cap {
                None
            } else {
                n.checked_add(1)
            }
        });
        if reserved.is_err() {
            return Err(Refusal::TooManyConnections);
        }
        if let Some((rate, cap_units)) = self.rate {
            if let Err(retry_after_secs) = take_shared(&bucket.tokens, rate, cap_units, now_ms) {
                bucket.open.fetch_sub(1, Ordering::Relaxed);
                return Err(Refusal::RateLimited { retry_after_secs });
            }
        }
        Ok(IpGuard { table: Arc::clone(self), index })
    }

    /// Open connections counted in `ip`'s bucket: those of `ip` (its
    /// [`limit_key`]) plus those of any key sharing the bucket.
    pub fn open(&self, ip: IpAddr) -> u32 {
        self.buckets.get(self.index(ip)).map_or(0, |b| b.open.load(Ordering::Relaxed))
    }
}

impl fmt::Debug for IpTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpTable").field("buckets", &self.buckets.len()).field("limits", &self.limits).finish()
    }
}

/// Takes one token from a shared token word, or returns the Retry-After.
fn take_shared(word: &AtomicU64, rate: f64, cap: u64, now_ms: u64) -> Result<(), u32> {
    let now = now_ms & TIME_MASK;
    let mut current = word.load(Ordering::Relaxed);
    loop {
        let (units, last) = unpack(current);
        let diff = now.wrapping_sub(last) & TIME_MASK;
        // A reading older than the last refill (another shard's clock, a few
        // ms behind) refills nothing and keeps the later time.
        let elapsed = if diff >= TIME_HALF { 0 } else { diff };
        let r = refill(units, cap, elapsed, rate);
        if r.units < ONE {
            return Err(retry_after_secs(r.units, elapsed.saturating_sub(r.advance), rate));
        }
        let next = pack(r.units - ONE, last.wrapping_add(r.advance));
        match word.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(seen) => current = seen,
        }
    }
}

/// One admitted connection's place in an [`IpTable`]; dropping it (when the
/// connection closes) decrements its bucket's count. It is `Send`, so it
/// may be dropped on any thread.
#[must_use = "dropping the guard releases the connection's slot at once"]
pub struct IpGuard {
    table: Arc<IpTable>,
    index: usize,
}

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some(bucket) = self.table.buckets.get(self.index) {
            bucket.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for IpGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpGuard").field("bucket", &self.index).finish()
    }
}

const fn assert_send_sync<T: Send + Sync>() {}
const _: () = {
    assert_send_sync::<IpTable>();
    assert_send_sync::<IpGuard>();
};

/// A per-connection message-rate limiter: a token bucket of `burst` tokens
/// refilled at `rate_per_sec`, plus a count of refusals ("strikes") for
/// deciding when a client is abusive rather than merely bursty.
///
/// Single-threaded and 16 bytes: the last refill time (u64 ms), the tokens
/// (u32, in thousandths, so at most 4,294,967 tokens) and the strikes (u32).
/// The rate and burst are passed to every [`TokenBucket::take`] rather than
/// stored, so a configuration change applies on the next message.
///
/// # Strikes
///
/// [`TokenBucket::strikes`] is the number of refused takes since the bucket
/// last overflowed by a whole token, that is since the client last stayed
/// under its rate long enough to leave a full bucket unused for one token
/// interval (`1 / rate_per_sec` seconds). A client that keeps sending faster
/// than its rate never lets that happen, so its strikes only grow, one per
/// refused message, whatever the burst; a client that bursts once and then
/// calms down goes back to 0 about `(burst + 1) / rate_per_sec` seconds
/// later. So the caller can close sustained abuse (1008) as
/// `!bucket.take(..) && bucket.strikes() >= N`, N refusals without a pause.
/// The value is as of the last `take`; it saturates at `u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    last_ms: u64,
    tokens: u32,
    strikes: u32,
}

const _: () = assert!(std::mem::size_of::<TokenBucket>() <= 16);

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least 1) at `now_ms`, with no
    /// strikes.
    pub fn new(burst: u32, now_ms: u64) -> Self {
        TokenBucket {
            last_ms: now_ms,
            tokens: u32::try_from(capacity(burst, CONN_MAX_BURST)).unwrap_or(u32::MAX),
            strikes: 0,
        }
    }

    /// Refills the bucket up to `now_ms` at `rate_per_sec` (capped at
    /// `burst` tokens, at least 1) and takes one token: `true` if the
    /// message is allowed. A refusal adds a strike (see [`TokenBucket`]). A
    /// rate that is not positive and finite (0 included) means unlimited:
    /// always `true`, and the bucket is left as it is. A `now_ms` earlier than
    /// the last refill refills nothing.
    pub fn take(&mut self, rate_per_sec: f64, burst: u32, now_ms: u64) -> bool {
        let Some(rate) = rate_of(rate_per_sec) else {
            return true;
        };
        let cap = capacity(burst, CONN_MAX_BURST);
        let elapsed = now_ms.saturating_sub(self.last_ms);
        let r = refill(u64::from(self.tokens), cap, elapsed, rate);
        self.last_ms = self.last_ms.saturating_add(r.advance);
        if r.wasted_token {
            self.strikes = 0;
        }
        // Both are at most `cap`, which fits in u32.
        if r.units >= ONE {
            self.tokens = u32::try_from(r.units - ONE).unwrap_or(u32::MAX);
            true
        } else {
            self.tokens = u32::try_from(r.units).unwrap_or(u32::MAX);
            self.strikes = self.strikes.saturating_add(1);
            false
        }
    }

    /// Refused takes since the client last left a full bucket unused for a
    /// token interval; see [`TokenBucket`] for the exact rule.
    pub fn strikes(&self) -> u32 {
        self.strikes
    }
}

/// The outcome of [`HandshakeSlots::try_take`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The newcomer holds a handshake slot.
    Ok,
    /// The slots were full.
    ///
    /// - `evict: None`: the newcomer's address already holds its share; the
    ///   newcomer is refused and holds no slot.
    /// - `evict: Some(id)`: the shard was full; the newcomer is admitted and
    ///   holds a slot, and the slot of pending handshake `id` (the oldest of
    ///   the address holding the most) was taken from it. The caller must
    ///   close `id`; a later [`HandshakeSlots::release`] of it does nothing.
    Full {
        /// The pending handshake to close, if the newcomer was admitted in
        /// its place.
        evict: Option<u64>,
    },
}

/// Per-shard bounds on sockets that have not finished their HTTP upgrade,
/// kept apart from the WebSocket slots so that silent sockets cannot use up
/// the capacity meant for upgraded connections.
///
/// Each address (its [`limit_key`]) may hold `max_per_ip` pending
/// handshakes; beyond that a newcomer is refused. When the whole shard holds
/// `max_per_shard`, a newcomer is still admitted and the oldest pending
/// handshake of the address holding the most (ties: the one whose oldest
/// handshake is oldest) is evicted instead, so a flood of silent sockets from
/// one address never keeps a client from another address from upgrading.
/// 0 means no bound, for either limit. "Oldest" is the earliest taken.
///
/// Memory: at most `max_per_shard` entries (24 bytes each in a per-address
/// queue, plus one index entry per address). Time, with `a` addresses
/// pending and `k` handshakes pending for the address at hand (at most
/// `max_per_ip`): [`try_take`](Self::try_take) and
/// [`release`](Self::release) are O(log a + k), the eviction O(log a),
/// [`len`](Self::len) and [`for_ip`](Self::for_ip) O(1) expected.
///
/// Ids are the caller's and should be unique within the shard; taking an id
/// that is already pending for the same address does nothing and returns
/// [`Take::Ok`].
#[derive(Debug)]
pub struct HandshakeSlots {
    max_per_shard: usize,
    max_per_ip: usize,
    /// Pending handshakes per address: (id, taken at ms), oldest first.
    pending: HashMap<IpAddr, VecDeque<(u64, u64)>>,
    /// One entry per address in `pending`: (pending count, Reverse(taken at
    /// ms of its oldest), address); the last is the eviction victim.
    heaviest: BTreeSet<(usize, Reverse<u64>, IpAddr)>,
    len: usize,
}

type HeavyKey = (usize, Reverse<u64>, IpAddr);

fn heavy_key(ip: IpAddr, queue: &VecDeque<(u64, u64)>) -> Option<HeavyKey> {
    queue.front().map(|&(_, since)| (queue.len(), Reverse(since), ip))
}

impl HandshakeSlots {
    /// Empty slots: at most `max_per_shard` pending handshakes on the shard
    /// and `max_per_ip` per address (0 = no bound).
    pub fn new(max_per_shard: usize, max_per_ip: usize) -> Self {
        HandshakeSlots { max_per_shard, max_per_ip, pending: HashMap::new(), heaviest: BTreeSet::new(), len: 0 }
    }

    /// Gives handshake `id` from `ip`, starting at `now_ms`, a slot; see
    /// [`Take`] for the outcomes.
    pub fn try_take(&mut self, ip: IpAddr, id: u64, now_ms: u64) -> Take {
        let key = limit_key(ip);
        let held = match self.pending.get(&key) {
            Some(queue) if queue.iter().any(|&(pending, _)| pending == id) => return Take::Ok,
            Some(queue) => queue.len(),
            None => 0,
        };
        if self.max_per_ip != 0 && held >= self.max_per_ip {
            return Take::Full { evict: None };
        }
        let mut evict = None;
        if self.max_per_shard != 0 && self.len >= self.max_per_shard {
            evict = self.evict_one();
            if evict.is_none() {
                return Take::Full { evict: None };
            }
        }
        let queue = self.pending.entry(key).or_default();
        if let Some(old) = heavy_key(key, queue) {
            self.heaviest.remove(&old);
        }
        queue.push_back((id, now_ms));
        if let Some(new) = heavy_key(key, queue) {
            self.heaviest.insert(new);
        }
        self.len += 1;
        match evict {
            Some(_) => Take::Full { evict },
            None => Take::Ok,
        }
    }

    /// Removes the oldest pending handshake of the heaviest address.
    fn evict_one(&mut self) -> Option<u64> {
        let victim = self.heaviest.pop_last()?;
        let ip = victim.2;
        let queue = self.pending.get_mut(&ip)?;
        let id = queue.pop_front().map(|(id, _)| id);
        self.settle(ip);
        if id.is_some() {
            self.len = self.len.saturating_sub(1);
        }
        id
    }

    /// Re-indexes `ip` after its queue changed (its old index entry already
    /// removed), dropping the queue if it is empty.
    fn settle(&mut self, ip: IpAddr) {
        let Some(queue) = self.pending.get_mut(&ip) else {
            return;
        };
        match heavy_key(ip, queue) {
            Some(key) => {
                if queue.capacity() > 4 * queue.len().max(4) {
                    queue.shrink_to(2 * queue.len());
                }
                self.heaviest.insert(key);
            }
            None => {
                self.pending.remove(&ip);
            }
        }
    }

    /// Frees the slot of handshake `id` from `ip`, on upgrade or close.
    /// Idempotent: an id that holds no slot under `ip` (released, evicted or
    /// never taken) is ignored.
    pub fn release(&mut self, ip: IpAddr, id: u64) {
        let key = limit_key(ip);
        let Some(queue) = self.pending.get_mut(&key) else {
            return;
        };
        let Some(at) = queue.iter().position(|&(pending, _)| pending == id) else {
            return;
        };
        if let Some(old) = heavy_key(key, queue) {
            self.heaviest.remove(&old);
        }
        queue.remove(at);
        self.len = self.len.saturating_sub(1);
        self.settle(key);
    }

    /// Pending handshakes on the shard.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no handshake is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pending handshakes of `ip` (its [`limit_key`]).
    pub fn for_ip(&self, ip: IpAddr) -> usize {
        self.pending.get(&limit_key(ip)).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Barrier;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn table(max: u32, rate: f64, burst: u32) -> Arc<IpTable> {
        Arc::new(IpTable::new(IpLimits {
            max_connections_per_ip: max,
            connection_rate_per_ip: rate,
            connection_burst_per_ip: burst,
        }))
    }

    /// Two addresses in distinct buckets of `t`.
    fn distinct(t: &IpTable) -> (IpAddr, IpAddr) {
        let a = v4(1);
        let b = (2..=255).map(v4).find(|&b| t.index(b) != t.index(a)).unwrap();
        (a, b)
    }

    #[test]
    fn sizes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 16);
        assert_eq!(std::mem::size_of::<TokenBucket>(), 16);
        assert_eq!(IpTable::bucket_count(), BUCKETS);
        assert!(BUCKETS.is_power_of_two());
        assert_eq!(IpTable::new(IpLimits::default()).buckets.len(), BUCKETS);
    }

    #[test]
    fn connection_cap() {
        let t = table(2, 0.0, 0);
        let (a, b) = distinct(&t);
        let g1 = t.admit(a, 0).unwrap();
        let _g2 = t.admit(a, 0).unwrap();
        assert_eq!(t.admit(a, 0).unwrap_err(), Refusal::TooManyConnections);
        assert_eq!(t.open(a), 2);
        let _gb = t.admit(b, 0).unwrap();
        assert_eq!(t.open(b), 1);
        drop(g1);
        assert_eq!(t.open(a), 1);
        let _g3 = t.admit(a, 0).unwrap();
        assert_eq!(t.open(a), 2);
    }

    #[test]
    fn no_limits_still_counts() {
        let t = table(0, 0.0, 0);
        let guards: Vec<_> = (0..1000).map(|_| t.admit(v4(9), 0).unwrap()).collect();
        assert_eq!(t.open(v4(9)), 1000);
        drop(guards);
        assert_eq!(t.open(v4(9)), 0);
    }

    #[test]
    fn cap_refusal_consumes_no_token() {
        let t = table(1, 1.0, 2);
        let a = v4(1);
        let g = t.admit(a, 0).unwrap(); // token 1 of 2
        for _ in 0..10 {
            assert_eq!(t.admit(a, 0).unwrap_err(), Refusal::TooManyConnections);
        }
        drop(g);
        let g = t.admit(a, 0).unwrap(); // token 2 of 2: still there
        drop(g);
        assert!(matches!(t.admit(a, 0), Err(Refusal::RateLimited { .. })));
        // A rate refusal hands the reserved slot back.
        assert_eq!(t.open(a), 0);
    }

    #[test]
    fn rate_refills_over_time() {
        let t = table(0, 2.0, 3);
        let a = v4(1);
        for _ in 0..3 {
            drop(t.admit(a, 0).unwrap());
        }
        assert!(matches!(t.admit(a, 0), Err(Refusal::RateLimited { .. })));
        assert!(matches!(t.admit(a, 499), Err(Refusal::RateLimited { .. })));
        drop(t.admit(a, 500).unwrap());
        assert!(matches!(t.admit(a, 500), Err(Refusal::RateLimited { .. })));
        // Refills stop at the burst.
        for _ in 0..3 {
            drop(t.admit(a, 100_000).unwrap());
        }
        assert!(matches!(t.admit(a, 100_000), Err(Refusal::RateLimited { .. })));
        // A clock reading from the past refills nothing and does not panic.
        assert!(matches!(t.admit(a, 0), Err(Refusal::RateLimited { .. })));
        assert!(matches!(t.admit(a, u64::MAX), Ok(_) | Err(_)));
    }

    #[test]
    fn retry_after() {
        let t = table(0, 0.1, 1);
        let a = v4(1);
        drop(t.admit(a, 0).unwrap());
        assert_eq!(t.admit(a, 0).unwrap_err(), Refusal::RateLimited { retry_after_secs: 10 });
        assert_eq!(t.admit(a, 5_000).unwrap_err(), Refusal::RateLimited { retry_after_secs: 5 });
        assert_eq!(t.admit(a, 9_001).unwrap_err(), Refusal::RateLimited { retry_after_secs: 1 });
        assert_eq!(t.admit(a, 9_999).unwrap_err(), Refusal::RateLimited { retry_after_secs: 1 });
        drop(t.admit(a, 10_000).unwrap());
        // Very slow rates saturate instead of overflowing.
        let slow = table(0, 1e-300, 1);
        drop(slow.admit(a, 0).unwrap());
        assert_eq!(slow.admit(a, 0).unwrap_err(), Refusal::RateLimited { retry_after_secs: u32::MAX });
        // Fast rates always say at least 1.
        let fast = table(0, 1e6, 1);
        drop(fast.admit(a, 0).unwrap());
        assert_eq!(fast.admit(a, 0).unwrap_err(), Refusal::RateLimited { retry_after_secs: 1 });
    }

    #[test]
    fn odd_rates_mean_off_and_bursts_are_clamped() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let t = table(0, rate, 0);
            for _ in 0..100 {
                drop(t.admit(v4(1), 0).unwrap());
            }
        }
        // Burst 0 with a rate is a burst of 1.
        let t = table(0, 1.0, 0);
        drop(t.admit(v4(1), 0).unwrap());
        assert!(t.admit(v4(1), 0).is_err());
        // A huge burst is clamped to what the word holds.
        let t = table(0, 1.0, u32::MAX);
        let n = (0..20_000).filter(|_| t.admit(v4(1), 0).is_ok()).count();
        assert_eq!(n as u64, IP_MAX_BURST);
    }

    #[test]
    fn guard_drop_decrements_on_any_thread() {
        let t = table(3, 0.0, 0);
        let g = t.admit(v4(1), 0).unwrap();
        assert_eq!(t.open(v4(1)), 1);
        std::thread::spawn(move || drop(g)).join().unwrap();
        assert_eq!(t.open(v4(1)), 0);
    }

    #[test]
    fn concurrent_admits_never_exceed_cap() {
        const CAP: u32 = 10;
        let t = table(CAP, 0.0, 0);
        let a = v4(1);
        let barrier = Barrier::new(4);
        let held: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        // Churn: admit and drop, observing the count.
                        for i in 0..20_000u32 {
                            if let Ok(g) = t.admit(a, 0) {
                                assert!(t.open(a) <= CAP);
                                if i % 3 == 0 {
                                    std::thread::yield_now();
                                }
                                drop(g);
                            }
                            assert!(t.open(a) <= CAP);
                        }
                        barrier.wait();
                        // Grab: keep whatever is admitted.
                        let mine: Vec<_> = (0..100).filter_map(|_| t.admit(a, 0).ok()).collect();
                        barrier.wait();
                        assert!(t.open(a) <= CAP);
                        mine.len()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(held, CAP as usize);
        assert_eq!(t.open(a), 0);
    }

    #[test]
    fn concurrent_rate_is_exact() {
        let t = table(0, 1e-3, 50);
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..1000).filter(|_| t.admit(v4(1), 7).is_ok()).count())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 50);
    }

    #[test]
    fn mapped_ipv6_is_ipv4_and_ipv6_is_per_64() {
        let t = table(2, 0.0, 0);
        let v4a = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(limit_key(mapped), v4a);
        assert_eq!(t.index(mapped), t.index(v4a));
        let _g1 = t.admit(v4a, 0).unwrap();
        let _g2 = t.admit(mapped, 0).unwrap();
        assert_eq!(t.admit(v4a, 0).unwrap_err(), Refusal::TooManyConnections);
        assert_eq!(t.open(mapped), 2);

        let x: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(x), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(limit_key(x), limit_key(y));
        assert_ne!(limit_key(x), limit_key(z));
        assert_eq!(t.index(x), t.index(y));
    }

    #[test]
    fn hash_is_keyed_per_table() {
        let first = IpTable::new(IpLimits::default());
        let addr = v4(42);
        let differs = (0..20).any(|_| IpTable::new(IpLimits::default()).index(addr) != first.index(addr));
        assert!(differs);
    }

    #[test]
    fn token_bucket_burst_and_refill() {
        let mut b = TokenBucket::new(3, 1_000);
        assert!(b.take(1.0, 3, 1_000));
        assert!(b.take(1.0, 3, 1_000));
        assert!(b.take(1.0, 3, 1_000));
        assert!(!b.take(1.0, 3, 1_000));
        assert!(!b.take(1.0, 3, 1_999));
        assert!(b.take(1.0, 3, 2_000));
        assert!(!b.take(1.0, 3, 2_000));
        // Refill is capped at the burst.
        for _ in 0..3 {
            assert!(b.take(1.0, 3, 60_000));
        }
        assert!(!b.take(1.0, 3, 60_000));
        // Fractional refills accumulate across calls rather than being lost.
        let mut b = TokenBucket::new(1, 0);
        assert!(b.take(1.0, 1, 0));
        let allowed = (1..=10_000u64).filter(|ms| b.take(1.0, 1, *ms)).count();
        assert_eq!(allowed, 10);
        // A clock reading from the past refills nothing.
        assert!(!b.take(1.0, 1, 0));
        // Burst 0 is a burst of 1.
        let mut b = TokenBucket::new(0, 0);
        assert!(b.take(5.0, 0, 0));
        assert!(!b.take(5.0, 0, 0));
    }

    #[test]
    fn token_bucket_unlimited() {
        let mut b = TokenBucket::new(1, 0);
        for rate in [0.0, -3.0, f64::NAN, f64::INFINITY] {
            for _ in 0..1000 {
                assert!(b.take(rate, 1, 0));
            }
        }
        assert_eq!(b.strikes(), 0);
        assert_eq!(b, TokenBucket::new(1, 0));
    }

    #[test]
    fn token_bucket_strikes() {
        // Twice the rate with burst 1: every other message refused, and the
        // strikes keep growing because the bucket never overflows.
        let mut b = TokenBucket::new(1, 0);
        let mut refused = 0;
        for i in 0..20u64 {
            if !b.take(1.0, 1, i * 500) {
                refused += 1;
                assert_eq!(b.strikes(), refused);
            }
        }
        assert_eq!(refused, 10);
        // Allowed takes in between did not reset them.
        assert!(b.take(1.0, 1, 10_000));
        assert_eq!(b.strikes(), 10);
        // Calm long enough to leave a full bucket unused for a token
        // interval: back to 0.
        assert!(b.take(1.0, 1, 12_000));
        assert_eq!(b.strikes(), 0);

        // A burst then calm (below the rate) resets too.
        let mut b = TokenBucket::new(5, 0);
        let refused = (0..10).filter(|_| !b.take(10.0, 5, 0)).count();
        assert_eq!(refused, 5);
        assert_eq!(b.strikes(), 5);
        let mut t = 0;
        while b.strikes() != 0 && t < 10_000 {
            t += 200;
            assert!(b.take(10.0, 5, t));
        }
        assert_eq!(b.strikes(), 0);
        assert!(t <= 1_000, "reset after {t} ms");

        // Saturates instead of overflowing.
        let mut b = TokenBucket { last_ms: 0, tokens: 0, strikes: u32::MAX };
        assert!(!b.take(1.0, 1, 0));
        assert_eq!(b.strikes(), u32::MAX);
    }

    #[test]
    fn handshake_per_ip_refusal() {
        let mut h = HandshakeSlots::new(10, 2);
        assert_eq!(h.try_take(v4(1), 1, 0), Take::Ok);
        assert_eq!(h.try_take(v4(1), 2, 0), Take::Ok);
        assert_eq!(h.try_take(v4(1), 3, 0), Take::Full { evict: None });
        // Retaking a pending id is a no-op.
        assert_eq!(h.try_take(v4(1), 2, 0), Take::Ok);
        assert_eq!(h.for_ip(v4(1)), 2);
        assert_eq!(h.try_take(v4(2), 4, 0), Take::Ok);
        assert_eq!(h.len(), 3);
        // Mapped IPv6 shares the IPv4 share.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(h.for_ip(mapped), 2);
        assert_eq!(h.try_take(mapped, 5, 0), Take::Full { evict: None });
        h.release(mapped, 1);
        assert_eq!(h.try_take(v4(1), 6, 0), Take::Ok);
    }

    #[test]
    fn handshake_eviction_picks_oldest_of_heaviest() {
        let mut h = HandshakeSlots::new(4, 0);
        let (a, b, c, d, e) = (v4(1), v4(2), v4(3), v4(4), v4(5));
        assert_eq!(h.try_take(a, 1, 0), Take::Ok);
        assert_eq!(h.try_take(b, 10, 1), Take::Ok);
        assert_eq!(h.try_take(a, 2, 2), Take::Ok);
        assert_eq!(h.try_take(a, 3, 3), Take::Ok);
        // Full: a holds the most; its oldest (1) goes, the newcomer stays.
        assert_eq!(h.try_take(c, 20, 4), Take::Full { evict: Some(1) });
        assert_eq!((h.len(), h.for_ip(a), h.for_ip(c)), (4, 2, 1));
        assert_eq!(h.try_take(d, 30, 5), Take::Full { evict: Some(2) });
        // All hold one: the oldest handshake overall, b's 10 (at 1 ms).
        assert_eq!(h.try_take(e, 40, 6), Take::Full { evict: Some(10) });
        assert_eq!(h.for_ip(b), 0);
        assert_eq!(h.len(), 4);
        // Evicted ids hold nothing; releasing them changes nothing.
        h.release(a, 1);
        h.release(b, 10);
        assert_eq!(h.len(), 4);
        // The heaviest address is the newcomer's own: it still gets in.
        let mut h = HandshakeSlots::new(2, 0);
        assert_eq!(h.try_take(a, 1, 0), Take::Ok);
        assert_eq!(h.try_take(a, 2, 1), Take::Ok);
        assert_eq!(h.try_take(a, 3, 2), Take::Full { evict: Some(1) });
        assert_eq!(h.for_ip(a), 2);
    }

    #[test]
    fn handshake_release_is_idempotent() {
        let mut h = HandshakeSlots::new(3, 3);
        assert!(h.is_empty());
        assert_eq!(h.try_take(v4(1), 1, 0), Take::Ok);
        assert_eq!(h.try_take(v4(1), 2, 0), Take::Ok);
        h.release(v4(1), 1);
        h.release(v4(1), 1);
        h.release(v4(2), 2); // wrong address: ignored
        h.release(v4(1), 99); // unknown id: ignored
        assert_eq!((h.len(), h.for_ip(v4(1))), (1, 1));
        h.release(v4(1), 2);
        assert!(h.is_empty());
        assert_eq!(h.for_ip(v4(1)), 0);
        assert!(h.pending.is_empty() && h.heaviest.is_empty());
    }

    #[test]
    fn handshake_bounds_and_index_stay_consistent() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut h = HandshakeSlots::new(64, 8);
        let mut live: Vec<(IpAddr, u64)> = Vec::new();
        for id in 0..20_000u64 {
            let ip = v4(rng.u8(0..12));
            if rng.bool() && !live.is_empty() {
                let (ip, id) = live.swap_remove(rng.usize(..live.len()));
                h.release(ip, id);
            }
            match h.try_take(ip, id, id) {
                Take::Ok => live.push((ip, id)),
                Take::Full { evict: None } => assert_eq!(h.for_ip(ip), 8),
                Take::Full { evict: Some(gone) } => {
                    live.retain(|&(_, l)| l != gone);
                    live.push((ip, id));
                }
            }
            assert!(h.len() <= 64);
            assert_eq!(h.len(), live.len());
            assert_eq!(h.heaviest.len(), h.pending.len());
        }
        assert_eq!(h.pending.values().map(VecDeque::len).sum::<usize>(), h.len());
    }
}
