//! Every knob of a ringside node: its unit, its default, and why.
//!
//! One [`Config`] struct, filled from four sources, each overriding the one
//! before: built-in defaults ([`Default`]), a TOML file (`--config FILE`),
//! environment variables (`RINGSIDE_<SECTION>_<KEY>`, e.g.
//! `RINGSIDE_SERVER_LISTEN=0.0.0.0:9000`), then command-line flags.
//! [`Config::validate`] refuses nonsense with an error that names the key.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Slots (connections plus pending handshakes) one shard can address: the
/// slot part of a connection id is 22 bits (`runtime::table`).
pub const MAX_SLOTS_PER_SHARD: usize = 1 << 22;

/// The whole node configuration. Sections map to TOML tables.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listener, shards, capacity and HTTP limits.
    pub server: ServerConfig,
    /// WebSocket session limits, timers and backpressure.
    pub websocket: WebSocketConfig,
    /// The rooms protocol on `/ws`.
    pub rooms: RoomsConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Cluster state in Redis (optional).
    pub cluster: ClusterConfig,
    /// Per-address and per-connection limits against abusive clients.
    pub limits: LimitsConfig,
    /// Who may connect: signed tokens, client ids, sessions per client.
    pub auth: AuthConfig,
    /// Capacity per priority class: reservations, waiting, preemption.
    pub priority: PriorityConfig,
    /// What the node asks the application behind it (connect, RPC,
    /// publish, disconnect), through the pools of `[[upstream]]`.
    pub proxy: ProxyConfig,
    /// Outbound HTTP pools to the application's backends, `[[upstream]]`
    /// entries (docs/configuration.md). Last: TOML writes arrays of tables
    /// after the plain tables.
    pub upstream: Vec<UpstreamConfig>,
}

/// Which io driver a shard runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring, falling back to epoll (logged, and shown in /metrics) only
    /// when the ring cannot be created.
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// epoll only (for kernels or sandboxes without io_uring, and for tests).
    Epoll,
}

impl DriverChoice {
    /// The accepted spellings, as in TOML, env and flags.
    pub const NAMES: [&'static str; 3] = ["auto", "io_uring", "epoll"];
}

/// How connections' sockets are served (`server.io`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum IoChoice {
    /// io_uring direct descriptors: accepts into each shard ring's sparse
    /// file table (no process fd per connection, so RLIMIT_NOFILE caps
    /// each shard's table instead of the whole process), multishot
    /// receives into a provided-buffer ring shared per shard, sends on the
    /// fixed file. Needs the io_uring driver; on epoll it falls back to `poll`.
    Direct,
    /// A plain fd per connection: readiness wait plus one `recv(2)`, and
    /// monoio sends (the path of the epoll driver).
    Poll,
}

impl IoChoice {
    /// The accepted spellings, as in TOML, env and flags.
    pub const NAMES: [&'static str; 2] = ["direct", "poll"];
}

/// What happens when a connection's send queue is full.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Close the connection with 1008 (the client learns it lost messages).
    Close,
    /// Drop the message for that connection and count it; keep the connection.
    Drop,
}

impl SlowConsumerPolicy {
    /// The accepted spellings, as in TOML, env and flags.
    pub const NAMES: [&'static str; 2] = ["close", "drop"];
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address every shard listens on with SO_REUSEPORT. Default `127.0.0.1:8080`.
    /// A host name (`localhost:8080`) is resolved when the value is read and
    /// the first address it resolves to is kept.
    pub listen: SocketAddr,
    /// Number of shards (threads, runtimes, listeners). `0` = one per core. Default 0.
    pub shards: usize,
    /// Pin shard N to core N with core_affinity. Default true.
    pub pin_cores: bool,
    /// Let the kernel back the process's memory with transparent huge pages.
    /// Off by default: mimalloc then touches memory in 2 MiB steps, about
    /// half of an idle WebSocket's RSS (results/2026-12-01-idle-memory),
    /// for no measured CPU gain. Default false.
    pub transparent_huge_pages: bool,
    /// Listen backlog per shard; the kernel caps it at `net.core.somaxconn`. Default 1024.
    pub backlog: u32,
    /// io driver: `auto`, `io_uring` or `epoll`. Default `auto`.
    pub driver: DriverChoice,
    /// io_uring submission queue entries per shard. Default 1024.
    pub ring_entries: u32,
    /// Set the ring up with COOP_TASKRUN + SINGLE_ISSUER (kernel >= 6.0;
    /// ignored where refused): fewer inter-processor interrupts. Default true.
    pub uring_coop_taskrun: bool,
    /// Socket path: `direct` (io_uring direct descriptors, receives into a
    /// shared buffer ring; see [`IoChoice`]) or `poll`. Default `poll`:
    /// the direct path passes every test, but costs more CPU per echoed
    /// message today (1.45-1.85×, results/2026-12-01-peers-uring-direct-vs-poll);
    /// use it to hold more sockets than RLIMIT_NOFILE. With the epoll
    /// driver (or when io_uring cannot start) `poll` is used whatever this says.
    pub io: IoChoice,
    /// Receive buffers in each shard's provided-buffer ring (`io = direct`),
    /// a power of two from 1 to 32768. Each arrival on any connection takes
    /// one until its task copied it out; when none is left the receive is
    /// re-armed once one comes back (no data is lost, the peer's TCP window
    /// holds it). Memory: `recv_buffers * recv_buffer_bytes` per shard,
    /// touched only as used (the kernel takes them in ring order, so a busy
    /// shard touches all of them). Default 256 (16 MiB a shard).
    pub recv_buffers: u32,
    /// Bytes per receive buffer (`io = direct`): the most one read takes,
    /// as the poll path's shared 64 KiB read buffer is. Smaller buffers
    /// cost less memory but make a fast sender's reads smaller (and each
    /// read is one turn of the shard). Default 65536.
    pub recv_buffer_bytes: usize,
    /// Receive with multishot receives (`io = direct`): one SQE per
    /// connection serves every arrival until it ends. Each is capped at 4
    /// buffers' worth of bytes (`IORING_RECV_MSHOT_LIM`, kernel 6.17; on an
    /// older kernel ringside falls back to one-shot receives with a
    /// warning), so a flooding peer cannot take the shared ring even when
    /// cancelling its receive fails while it is busy (`ENOENT`), which
    /// uncapped it did (a ping flood took all 256 buffers). Default false:
    /// it saved 2-3 % of CPU per message (results/2026-12-01-uring-cpu),
    /// and an upgrade's detach of a busy multishot receive can time out
    /// (the connection then gets a reconnect hint instead of moving). With
    /// false, each arrival is one buffer-select receive, re-armed once the
    /// connection's task read the buffer: at most one buffer per
    /// connection, and still no syscall of its own.
    pub recv_multishot: bool,
    /// Node identity in metrics, welcome messages and Redis. Empty = generated.
    pub node_id: String,
    /// URL clients should use to reach this node (affinity hints, `/cluster`).
    /// Empty = `ws://<listen>/ws`.
    pub advertise_url: String,
    /// WebSocket slots per shard (the seeds' "pool slots"). A full shard hands a
    /// new socket to the least-loaded shard with room; when all are full the
    /// upgrade gets 503. Capped at start-up below RLIMIT_NOFILE. Default 16384.
    pub max_connections_per_shard: usize,
    /// Largest HTTP request head accepted, in bytes; larger gets 431. Default 8192.
    pub max_request_bytes: usize,
    /// A client that has not completed the upgrade within this is dropped. Default 5000 ms.
    pub handshake_timeout_ms: u64,
    /// Capacity of each shard's mailbox (cross-shard messages). A full mailbox
    /// drops the message and counts it. The queue is allocated (and touched)
    /// up front, ~72 bytes a slot. Default 16384.
    pub mailbox_capacity: usize,
    /// `Retry-After` seconds sent with 503 when the node is full or draining. Default 5.
    pub retry_after_secs: u32,
    /// Address of the internal listener for `/metrics` and `/cluster` (and
    /// `/health`, `/ready`). Empty = no internal listener: those endpoints are
    /// served on the client port. Default empty (development); production
    /// sets it to a private address.
    pub admin_listen: String,
    /// HAProxy agent-check listener (`ip:port`): each connection is answered
    /// `up N%` (N from the node's live headroom) or `drain`, then closed.
    /// Empty = off. Default empty.
    pub agent_listen: String,
    /// Unix socket path a running node listens on for a zero-disconnect
    /// upgrade: `ringside --upgrade-from PATH` takes over its listeners and
    /// open WebSockets. Empty = off. Default empty.
    pub upgrade_socket: String,
    /// Serve `/metrics` and `/cluster` on the client port too. Default true;
    /// `false` answers them 404 there (`/health` and `/ready` stay for the
    /// balancer's checks).
    pub public_internal_endpoints: bool,
    /// Proxies whose PROXY protocol header (v1 or v2) and `X-Forwarded-For`
    /// are believed: CIDRs or addresses, e.g. `["127.0.0.1", "10.0.0.0/8"]`.
    /// From any other peer a PROXY header is refused (400) and
    /// `X-Forwarded-For` ignored. Default empty (trust nobody).
    pub trusted_proxies: Vec<String>,
    /// Browser `Origin` values allowed to upgrade (exact match, e.g.
    /// `https://app.example.com`); others get 403. Requests without `Origin`
    /// (non-browser clients) pass. Default empty = any origin.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: 0,
            pin_cores: true,
            transparent_huge_pages: false,
            backlog: 1024,
            driver: DriverChoice::Auto,
            ring_entries: 1024,
            uring_coop_taskrun: true,
            io: IoChoice::Poll,
            recv_buffers: 256,
            recv_buffer_bytes: 65536,
            recv_multishot: false,
            node_id: String::new(),
            advertise_url: String::new(),
            max_connections_per_shard: 16384,
            max_request_bytes: 8192,
            handshake_timeout_ms: 5000,
            mailbox_capacity: 16384,
            admin_listen: String::new(),
            agent_listen: String::new(),
            upgrade_socket: String::new(),
            public_internal_endpoints: true,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            retry_after_secs: 5,
        }
    }
}

/// `[websocket]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest message (after reassembly); larger closes with 1009. Default 65536.
    pub max_message_bytes: usize,
    /// Largest single frame; larger closes with 1009. Default 65536.
    pub max_frame_bytes: usize,
    /// tungstenite's read chunk per connection, allocated on the first
    /// inbound frame (never for a connection that only listens). Small keeps
    /// idle connections cheap; it is a memcpy size, not a syscall size.
    /// Default 1024 (tungstenite's own default is 128 KiB).
    pub read_buffer_bytes: usize,
    /// Bytes a connection may have queued for sending (including the write in
    /// flight) before `slow_consumer` applies. Default 262144.
    pub send_queue_bytes: usize,
    /// `close` (1008) or `drop` when the send queue is full. Default `close`.
    pub slow_consumer: SlowConsumerPolicy,
    /// Server ping after this much silence from the client. Default 25000 ms.
    pub ping_interval_ms: u64,
    /// Close (4001) after this much silence, pings unanswered. Default 60000 ms.
    pub idle_timeout_ms: u64,
    /// After sending a close frame, wait this long for the peer's close
    /// before dropping the socket. Default 2000 ms.
    pub close_timeout_ms: u64,
    /// How often each shard sweeps its table for timers. Default 1000 ms.
    pub sweep_interval_ms: u64,
    /// A write that has not been accepted by the kernel within this (the peer
    /// stopped reading and its TCP window is shut) applies the slow-consumer
    /// policy: with `close`, 1008. Checked by the sweep. Default 10000 ms.
    pub write_timeout_ms: u64,
    /// A frame or fragmented message that has started must complete within
    /// this, else close 1008 (a peer that trickles one byte at a time holds
    /// its bytes only this long). Checked by the sweep. Default 10000 ms.
    pub message_timeout_ms: u64,
    /// Bytes a shard holds in unfinished frames and fragmented messages, all
    /// connections together; the connection that would go past it is closed
    /// 1013 (try again later). Default 67108864 (64 MiB).
    pub max_unfinished_bytes_per_shard: usize,
    /// Bytes of the shard's mailbox taken by messages for connections (room
    /// and direct frames); past it they are refused (`overloaded`) while
    /// control messages (register, kick, shutdown) always pass. Default
    /// 67108864 (64 MiB).
    pub mailbox_bytes: usize,
    /// Accept permessage-deflate (RFC 7692) when the client offers it. The
    /// answer always demands no context takeover both ways, so zlib state is
    /// per shard and reset per message: an idle compressed connection costs
    /// what a plain one does, and compression costs CPU per message (a
    /// shard's codec is ~300 KiB once used). Off: the offer is declined (no
    /// extension header in the 101). Default false.
    pub deflate: bool,
    /// Outgoing text and binary messages shorter than this are sent
    /// uncompressed (small messages barely shrink and pay the zlib reset).
    /// Default 256.
    pub deflate_min_bytes: usize,
    /// zlib level for outgoing messages, 0-9 (1: fastest, 9: smallest).
    /// Default 1.
    pub deflate_level: u32,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_frame_bytes: 64 * 1024,
            read_buffer_bytes: 1024,
            send_queue_bytes: 256 * 1024,
            slow_consumer: SlowConsumerPolicy::Close,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            close_timeout_ms: 2_000,
            sweep_interval_ms: 1_000,
            write_timeout_ms: 10_000,
            message_timeout_ms: 10_000,
            max_unfinished_bytes_per_shard: 64 << 20,
            mailbox_bytes: 64 << 20,
            deflate: false,
            deflate_min_bytes: 256,
            deflate_level: 1,
        }
    }
}

/// `[rooms]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Rooms one connection may be in at once; more answers `too_many_rooms`. Default 64.
    pub max_rooms_per_connection: usize,
    /// Largest `data` in a publish or direct message; larger answers
    /// `too_large` and the connection stays open. Default 16384.
    pub max_payload_bytes: usize,
    /// Publishing to a room needs membership; otherwise error `not_joined`.
    /// Default true (a client cannot spray rooms it does not read).
    pub publish_requires_join: bool,
    /// Messages of history kept per room (0 = no history: messages carry no
    /// offset and a `join` with `since` answers `recovered:false`). Rooms
    /// matching a `history_rules` pattern use that rule instead. Default 0.
    pub history_size: usize,
    /// How long a message stays in history, seconds. Default 300.
    pub history_ttl_secs: u64,
    /// Bytes of history per room at most (oldest messages go first). Default 1 MiB.
    pub history_max_bytes: usize,
    /// Bytes of history per shard at most, all rooms together; a room whose
    /// next message would pass it loses its history (a later recovery
    /// answers `recovered:false`, never a silent gap). Default 64 MiB.
    pub history_bytes_per_shard: usize,
    /// Per-pattern history settings, first match wins: `[[rooms.history_rules]]`
    /// with `pattern` (an exact name or a trailing `*`), `size`, `ttl_secs`.
    pub history_rules: Vec<HistoryRule>,
    /// Joins of rooms with history waiting for their offset, per connection;
    /// more answer `rate_limited`. Default 4.
    pub max_pending_joins: usize,
    /// Rooms whose members get `presence_join` / `presence_leave` when a
    /// client id's first session joins or its last leaves: exact names or
    /// prefixes with a trailing `*`. Default none.
    pub presence_events: Vec<String>,
}

/// A room-name pattern of the config (an exact name, or a prefix followed
/// by `*`) matches `room`.
fn pattern_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => room == pattern,
    }
}

/// A valid room-name pattern: 1-128 of `[A-Za-z0-9_.:-]`, optionally
/// followed by `*` (`*` alone: every room).
fn valid_pattern(pattern: &str) -> bool {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    !pattern.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// `[[rooms.history_rules]]`: history settings for rooms matching `pattern`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// An exact room name, or a prefix followed by `*` (`chat.*`).
    pub pattern: String,
    /// Messages kept (0 = no history for these rooms).
    pub size: usize,
    /// Seconds a message stays.
    #[serde(default = "default_history_ttl")]
    pub ttl_secs: u64,
}

fn default_history_ttl() -> u64 {
    300
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            max_rooms_per_connection: 64,
            max_payload_bytes: 16 * 1024,
            publish_requires_join: true,
            history_size: 0,
            history_ttl_secs: default_history_ttl(),
            history_max_bytes: 1 << 20,
            history_bytes_per_shard: 64 << 20,
            history_rules: Vec::new(),
            max_pending_joins: 4,
            presence_events: Vec::new(),
        }
    }
}

impl RoomsConfig {
    /// `(size, ttl_secs)` of `room`'s history (size 0: none).
    pub fn history_of(&self, room: &str) -> (usize, u64) {
        match self.history_rules.iter().find(|r| pattern_matches(&r.pattern, room)) {
            Some(r) => (r.size, r.ttl_secs),
            None => (self.history_size, self.history_ttl_secs),
        }
    }

    /// True if `room`'s members get presence events.
    pub fn presence_events_of(&self, room: &str) -> bool {
        self.presence_events.iter().any(|p| pattern_matches(p, room))
    }

    /// True if any room can have history.
    pub fn any_history(&self) -> bool {
        self.history_size > 0 || self.history_rules.iter().any(|r| r.size > 0)
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: `/ready` and upgrades answer 503 at once, open
    /// WebSockets get a `reconnect` hint (spread over `reconnect_spread_ms`),
    /// those still open at 3/4 of this get 1001, and the node exits within
    /// this. Default 10000 ms.
    pub drain_timeout_ms: u64,
    /// Hints of a drain go out spread evenly over this (in random order), so
    /// clients do not come back in the same second. 0 sends them all at once;
    /// at most half of `drain_timeout_ms` is used. Default 5000 ms.
    pub reconnect_spread_ms: u64,
}

impl ShutdownConfig {
    /// The spread a drain uses: `reconnect_spread_ms`, at most half the drain.
    pub fn spread_ms(&self) -> u64 {
        self.reconnect_spread_ms.min(self.drain_timeout_ms / 2)
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_timeout_ms: 10_000, reconnect_spread_ms: 5_000 }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Anonymous clients with server-assigned ids (development).
    None,
    /// A valid signed token (JWT) on every upgrade.
    Token,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none` (the default, for development: anonymous clients get
    /// server-assigned ids) or `token` (every upgrade carries a JWT; see
    /// docs/protocol.md for the three ways to pass it).
    pub mode: AuthMode,
    /// In `mode = "none"`, honour a client-chosen id (`?client_id=`,
    /// `X-Client-Id`). Default false: anyone could take another's id.
    pub allow_client_ids: bool,
    /// HS256 secret (at least 32 bytes). Prefer `hmac_secret_file`.
    pub hmac_secret: String,
    /// File holding the HS256 secret (trailing newline ignored).
    pub hmac_secret_file: String,
    /// PEM public key for RS256 or ES256 tokens.
    pub public_key_file: String,
    /// Required `iss`, if set.
    pub issuer: String,
    /// Required `aud`, if set.
    pub audience: String,
    /// Clock skew allowed on `exp`/`nbf`, seconds. Default 5.
    pub leeway_secs: u64,
    /// Live sessions one client id may hold; a new one past this replaces
    /// the oldest with 4000. Default 1.
    pub sessions_per_client: u32,
    /// A `refresh` sooner than this after the connection's previous one
    /// (accepted or not) is answered `rate_limited` without verifying the
    /// token: a signature check costs up to ~150 µs (ES256), so refreshes
    /// are capped even when `limits.messages_per_second` is off. Default
    /// 1000 ms; 0 = no cap.
    pub min_refresh_interval_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            allow_client_ids: false,
            hmac_secret: String::new(),
            hmac_secret_file: String::new(),
            public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway_secs: 5,
            sessions_per_client: 1,
            min_refresh_interval_ms: 1000,
        }
    }
}

/// A priority class (seed 001's `PriorityConnectionPool`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Lowest: first to be preempted.
    Low,
    /// The default.
    Normal,
    /// Reserved share `priority.reserved_high`.
    High,
    /// Reserved share `priority.reserved_critical`; never preempted.
    Critical,
}

impl Class {
    /// Every class, lowest first.
    pub const ALL: [Class; 4] = [Class::Low, Class::Normal, Class::High, Class::Critical];

    /// The label (`low`, `normal`, `high`, `critical`).
    pub fn name(self) -> &'static str {
        match self {
            Class::Low => "low",
            Class::Normal => "normal",
            Class::High => "high",
            Class::Critical => "critical",
        }
    }

    /// From a label.
    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Index into per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `[priority]`: shares of each node's slots reserved for the higher
/// classes, preemption of lower ones when full, and bounded waiting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    /// Share of capacity only `critical` may take. Default 0 (a development
    /// node serves every client as `normal` and should use all its slots);
    /// production.toml sets seed 001's 0.10.
    pub reserved_critical: f64,
    /// Share of capacity only `high` and above may take. Default 0
    /// (production.toml: 0.20).
    pub reserved_high: f64,
    /// Class of clients without a token (`auth.mode = "none"`). Default `normal`.
    pub default_class: Class,
    /// When no slot is free and nothing can be preempted, an upgrade waits
    /// up to this long for one (ms, per class; 0 = refuse at once with 503).
    /// Defaults: critical 5000, high 3000, normal 2000, low 1000 (the seed's
    /// 5/15/30/60 s hold a socket too long for an edge node).
    pub wait_ms_critical: u64,
    /// See `wait_ms_critical`.
    pub wait_ms_high: u64,
    /// See `wait_ms_critical`.
    pub wait_ms_normal: u64,
    /// See `wait_ms_critical`.
    pub wait_ms_low: u64,
    /// Upgrades waiting per shard at most (they also hold handshake slots).
    /// Default 256.
    pub max_waiting_per_shard: usize,
    /// `reconnect_delay_ms` told to a preempted client. Default 5000.
    pub preempt_reconnect_delay_ms: u64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            reserved_critical: 0.0,
            reserved_high: 0.0,
            default_class: Class::Normal,
            wait_ms_critical: 5_000,
            wait_ms_high: 3_000,
            wait_ms_normal: 2_000,
            wait_ms_low: 1_000,
            max_waiting_per_shard: 256,
            preempt_reconnect_delay_ms: 5_000,
        }
    }
}

impl PriorityConfig {
    /// How long an upgrade of `class` may wait for a slot.
    pub fn wait_ms(&self, class: Class) -> u64 {
        match class {
            Class::Critical => self.wait_ms_critical,
            Class::High => self.wait_ms_high,
            Class::Normal => self.wait_ms_normal,
            Class::Low => self.wait_ms_low,
        }
    }
}

/// `[limits]`: what one address or one connection may take. Each refusal
/// is counted by reason in `/metrics` (docs/metrics.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections (upgraded or not) per client address, node-wide;
    /// more get 429. 0 = off. Default 0 (production: 256).
    pub max_connections_per_ip: u32,
    /// New connections per second per client address (token bucket); more get
    /// 429 with `Retry-After`. 0 = off. Default 0 (production: 20).
    pub connection_rate_per_ip: f64,
    /// Burst of new connections per address above the rate. Default 50.
    pub connection_burst_per_ip: u32,
    /// Sockets per shard that have not finished their upgrade, counted apart
    /// from WebSocket slots. When full, the oldest pending handshake of the
    /// address holding the most is dropped for the newcomer. Each holds an
    /// fd, so they are reserved under RLIMIT_NOFILE apart from the WebSocket
    /// slots. Default 1024.
    pub max_handshakes_per_shard: usize,
    /// Share of a shard's handshake slots one address may hold; more are
    /// closed at once. Default 128.
    pub max_handshakes_per_ip: usize,
    /// Messages per second per connection (token bucket); more answer error
    /// `rate_limited` (on `/ws`) or are dropped (on `/echo`). 0 = off. Default
    /// 0 (production: 100).
    pub messages_per_second: f64,
    /// Burst above the message rate. Default 200.
    pub message_burst: u32,
    /// Refused messages in a row after which the connection is closed 1008.
    /// Default 100.
    pub rate_limit_strikes: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0.0,
            connection_burst_per_ip: 50,
            max_handshakes_per_shard: 1024,
            max_handshakes_per_ip: 128,
            messages_per_second: 0.0,
            message_burst: 200,
            rate_limit_strikes: 100,
        }
    }
}

/// `[cluster]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://host:port` (several, comma-separated, are seeds of a Redis
    /// Cluster). Empty = the node runs alone. Default empty.
    pub redis_url: String,
    /// `standalone` (one Redis; the default) or `cluster` (Redis Cluster:
    /// one seed URL is enough, the client finds the other nodes). Several
    /// URLs need `cluster`.
    pub redis_mode: RedisMode,
    /// How often registry, pools and connections are written. Default 1000 ms.
    pub sync_interval_ms: u64,
    /// Session affinity TTL in Redis. Default 1800 s (30 minutes).
    pub affinity_ttl_secs: u64,
    /// Connections each shard samples per interval for `ringside:sample:*`. Default 16.
    pub sample_size: usize,
    /// Every this many sync intervals the node rewrites everything it keeps
    /// in Redis (conn keys, sessions, presence; in chunks of 2,000), so a
    /// key lost in Redis (a failover, a hand edit) comes back. Default 60.
    pub reconcile_intervals: u64,
    /// Where `reconnect` hints (drain, rebalance) send clients: `peer` (the
    /// target node's `server.advertise_url`) or `balancer` (`""`: the address
    /// the client used, i.e. back through the load balancer). Default `peer`.
    pub reconnect_via: ReconnectVia,
    /// Rebalancing starts when this node's utilization (connections /
    /// slots) is above this while a live peer is below `rebalance_low`.
    /// Default 0.85 (seed 000); 1.0 or more turns rebalancing off.
    pub rebalance_high: f64,
    /// A peer below this utilization may receive moved clients. Default 0.30.
    pub rebalance_low: f64,
    /// At most this many clients are asked to move per second. Default 100.
    pub migrate_rate: u32,
    /// A client asked to move that has not left after this is closed (1001).
    /// Default 5000 ms.
    pub migrate_grace_ms: u64,
    /// After start, `/ready` answers 503 `connecting` until the cluster
    /// thread has reached Redis once, for at most this long; then 200 even
    /// without Redis (local traffic is served either way). 0 = never wait.
    /// Default 5000 ms.
    pub ready_wait_ms: u64,
}

/// `cluster.reconnect_via`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReconnectVia {
    /// The target node's own URL.
    Peer,
    /// `""`: through the balancer the client came from.
    Balancer,
}

impl ReconnectVia {
    /// The `url` a hint toward a node reachable at `url` carries.
    pub fn hint_url(self, url: &str) -> &str {
        match self {
            ReconnectVia::Peer => url,
            ReconnectVia::Balancer => "",
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_mode: RedisMode::Standalone,
            sync_interval_ms: 1000,
            affinity_ttl_secs: 1800,
            sample_size: 16,
            reconcile_intervals: 60,
            reconnect_via: ReconnectVia::Peer,
            rebalance_high: 0.85,
            rebalance_low: 0.30,
            migrate_rate: 100,
            migrate_grace_ms: 5_000,
            ready_wait_ms: 5_000,
        }
    }
}

/// `cluster.redis_mode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// One Redis.
    Standalone,
    /// Redis Cluster.
    Cluster,
}

/// Environment variables are read with this prefix.
pub const ENV_PREFIX: &str = "RINGSIDE_";

/// `[[upstream]]`: one backend and its connection pool (seed 002's knobs).
/// Every duration is in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// What `proxy.*` entries call it: 1-64 of `[A-Za-z0-9_-]`. Required.
    pub name: String,
    /// `http://host:port` (no path, no TLS: a backend on the same host or
    /// a private network). Required.
    pub url: String,
    /// Connections kept open even when idle (refilled after failures). Default 1.
    pub min_connections: usize,
    /// Connections to this backend from the whole node, never exceeded
    /// (one pool per node, not per shard). Default 10.
    pub max_connections: usize,
    /// How long a call waits for a connection (queued FIFO when all are
    /// busy) before it fails with `backend_unavailable`. Default 1000: an
    /// upgrade waits for it and must stay well inside
    /// `server.handshake_timeout_ms`.
    pub acquire_timeout_ms: u64,
    /// How long one request may take once it has a connection (the
    /// connection is closed when it runs past). Default 5000.
    pub request_timeout_ms: u64,
    /// An idle connection above `min_connections` is closed after this. Default 120000 (2 min).
    pub idle_timeout_ms: u64,
    /// A connection is retired after this long (when next idle). Default 1800000 (30 min).
    pub max_lifetime_ms: u64,
    /// `GET` this on every idle connection each `health_check_interval_ms`;
    /// a transport error, timeout or 5xx fails it (the connection is
    /// replaced and the pool reported unhealthy). Empty: no checks. Default `/health`.
    pub health_check_path: String,
    /// Default 60000.
    pub health_check_interval_ms: u64,
    /// Retries of a call after a transport failure, timeout or 5xx (not
    /// after a 4xx, nor an acquire timeout). Calls are then at least once:
    /// a backend that did the work but whose answer was lost sees it again.
    /// Default 2.
    pub retry_attempts: u32,
    /// First retry delay; doubled per retry, with jitter (50%-150%). Default 50.
    pub retry_delay_ms: u64,
    /// Consecutive failed attempts that open the breaker (calls then fail
    /// at once); 0 = no breaker. Default 5.
    pub circuit_breaker_threshold: u32,
    /// Open time before one half-open probe is let through. Default 5000.
    pub circuit_breaker_cooldown_ms: u64,
    /// A connection checked out longer than this is logged and counted as
    /// a leak (seed 003); 0 = off. Default 10000 (twice the request timeout:
    /// a checkout that long is a bug, not a slow backend).
    pub leak_detection_ms: u64,
    /// Largest response body read; a larger one fails the call. Default 65536.
    pub max_response_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            min_connections: 1,
            max_connections: 10,
            acquire_timeout_ms: 1000,
            request_timeout_ms: 5000,
            idle_timeout_ms: 120_000,
            max_lifetime_ms: 1_800_000,
            health_check_path: "/health".into(),
            health_check_interval_ms: 60_000,
            retry_attempts: 2,
            retry_delay_ms: 50,
            circuit_breaker_threshold: 5,
            circuit_breaker_cooldown_ms: 5000,
            leak_detection_ms: 10_000,
            max_response_bytes: 64 * 1024,
        }
    }
}

impl UpstreamConfig {
    /// `host:port` of `url` (`http://host:port`, optional trailing `/`).
    pub fn authority(&self) -> Option<&str> {
        let rest = self.url.strip_prefix("http://")?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = rest.rsplit_once(':')?;
        (!host.is_empty() && !rest.contains('/') && port.parse::<u16>().is_ok()).then_some(rest)
    }
}

/// What a dead connect proxy means for an upgrade.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConnectFallback {
    /// Answer 503 with `Retry-After`.
    Refuse,
    /// Admit the client on its verified token alone (`auth.mode = "token"`);
    /// without a token, 503.
    Token,
}

impl ConnectFallback {
    /// The accepted spellings.
    pub const NAMES: [&'static str; 2] = ["refuse", "token"];
}

/// `[[proxy.rpc]]`: which upstream answers which RPC methods.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RpcRoute {
    /// An exact method name or a prefix followed by `*` (`*`: every method).
    pub methods: String,
    /// The `[[upstream]]` name.
    pub upstream: String,
    /// Path POSTed to. Default `/rpc`.
    #[serde(default = "default_rpc_path")]
    pub path: String,
}

/// `[[proxy.publish]]`: publishes to matching rooms are first asked of the backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublishRoute {
    /// An exact room name or a prefix followed by `*`.
    pub rooms: String,
    /// The `[[upstream]]` name.
    pub upstream: String,
    /// Path POSTed to. Default `/publish`.
    #[serde(default = "default_publish_path")]
    pub path: String,
}

fn default_rpc_path() -> String {
    "/rpc".into()
}

fn default_publish_path() -> String {
    "/publish".into()
}

/// `[proxy]`: the calls to the application (docs/protocol.md, "Backend proxy").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Upstream asked on every `/ws` upgrade (empty: off). Its answer sets
    /// the client id, rooms, class and welcome data, or refuses with 403.
    pub connect: String,
    /// Path POSTed to. Default `/connect`.
    pub connect_path: String,
    /// Request headers passed to the connect backend (lower case). Default
    /// `["origin", "user-agent"]`.
    pub connect_headers: Vec<String>,
    /// `refuse` (503 + Retry-After, the default) or `token` (admit on the
    /// token alone) when the connect backend cannot answer.
    pub connect_fallback: ConnectFallback,
    /// RPC routes, first match wins. Default none (every `rpc` fails).
    pub rpc: Vec<RpcRoute>,
    /// Publish routes, first match wins. Default none.
    pub publish: Vec<PublishRoute>,
    /// Upstream told who disconnected (empty: off), in batches, best effort.
    pub disconnect: String,
    /// Path POSTed to. Default `/disconnect`.
    pub disconnect_path: String,
    /// Notices per POST at most. Default 100.
    pub disconnect_batch: usize,
    /// A partial batch is sent after this, ms. Default 200.
    pub disconnect_flush_ms: u64,
    /// Notices waiting to be sent at most; more are dropped (counted). Default 10000.
    pub disconnect_queue: usize,
    /// Calls waiting for the upstream thread, node-wide; past it a call
    /// fails at once with `backend_unavailable`. Default 8192.
    pub queue_capacity: usize,
    /// RPCs and proxied publishes one connection may have outstanding;
    /// more answer `rate_limited`. Default 16.
    pub max_in_flight_per_connection: u8,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            connect: String::new(),
            connect_path: "/connect".into(),
            connect_headers: vec!["origin".into(), "user-agent".into()],
            connect_fallback: ConnectFallback::Refuse,
            rpc: Vec::new(),
            publish: Vec::new(),
            disconnect: String::new(),
            disconnect_path: "/disconnect".into(),
            disconnect_batch: 100,
            disconnect_flush_ms: 200,
            disconnect_queue: 10_000,
            queue_capacity: 8192,
            max_in_flight_per_connection: 16,
        }
    }
}

impl ProxyConfig {
    /// The route for RPC `method`, if any.
    pub fn rpc_route(&self, method: &str) -> Option<&RpcRoute> {
        self.rpc.iter().find(|r| pattern_matches(&r.methods, method))
    }

    /// The publish route for `room`, if any.
    pub fn publish_route(&self, room: &str) -> Option<&PublishRoute> {
        self.publish.iter().find(|r| pattern_matches(&r.rooms, room))
    }
}

impl Config {
    /// The `[[upstream]]` and `[proxy]` checks.
    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError::new(key, why));
        for (i, u) in self.upstream.iter().enumerate() {
            let key = |k: &str| format!("upstream[{i}].{k}");
            if !valid_id(&u.name) {
                return bad(&key("name"), format!("{:?}: 1-64 of [A-Za-z0-9_-]", u.name));
            }
            if self.upstream[..i].iter().any(|o| o.name == u.name) {
                return bad(&key("name"), format!("{:?} is used twice", u.name));
            }
            if u.authority().is_none() {
                return bad(&key("url"), format!("{:?}: expected http://host:port", u.url));
            }
            if u.max_connections == 0 || u.min_connections > u.max_connections {
                return bad(&key("max_connections"), "at least 1 and at least min_connections".into());
            }
            if u.acquire_timeout_ms == 0 || u.request_timeout_ms == 0 {
                return bad(&key("acquire_timeout_ms"), "acquire and request timeouts must be at least 1".into());
            }
            if u.health_check_interval_ms < 10 || u.idle_timeout_ms < 10 || u.max_lifetime_ms < 10 {
                return bad(&key("idle_timeout_ms"), "idle, lifetime and health intervals at least 10".into());
            }
            if !(u.health_check_path.is_empty() || u.health_check_path.starts_with('/')) {
                return bad(&key("health_check_path"), "empty or a path starting with /".into());
            }
            if u.retry_attempts > 10 || u.max_response_bytes < 64 {
                return bad(&key("retry_attempts"), "at most 10 (and max_response_bytes at least 64)".into());
            }
        }
        let p = &self.proxy;
        let known = |name: &str| self.upstream.iter().any(|u| u.name == name);
        for (key, name) in [("proxy.connect", &p.connect), ("proxy.disconnect", &p.disconnect)] {
            if !name.is_empty() && !known(name) {
                return bad(key, format!("{name:?} is no [[upstream]] name"));
            }
        }
        for r in &p.rpc {
            if !known(&r.upstream) || !valid_pattern(&r.methods) || !r.path.starts_with('/') {
                return bad("proxy.rpc", format!("{r:?}: methods a name or prefix*, a known upstream, a /path"));
            }
        }
        for r in &p.publish {
            if !known(&r.upstream) || !valid_pattern(&r.rooms) || !r.path.starts_with('/') {
                return bad("proxy.publish", format!("{r:?}: rooms a name or prefix*, a known upstream, a /path"));
            }
        }
        for (key, path) in [("proxy.connect_path", &p.connect_path), ("proxy.disconnect_path", &p.disconnect_path)] {
            if !path.starts_with('/') {
                return bad(key, format!("{path:?}: a path starting with /"));
            }
        }
        if p.connect_fallback == ConnectFallback::Token && self.auth.mode != AuthMode::Token {
            return bad("proxy.connect_fallback", "\"token\" needs auth.mode = \"token\"".into());
        }
        if p.disconnect_batch == 0 || p.disconnect_queue < p.disconnect_batch || p.disconnect_flush_ms == 0 {
            return bad(
                "proxy.disconnect_batch",
                "at least 1, at most proxy.disconnect_queue; flush at least 1 ms".into(),
            );
        }
        if p.queue_capacity == 0 || p.max_in_flight_per_connection == 0 {
            return bad("proxy.queue_capacity", "queue_capacity and max_in_flight_per_connection at least 1".into());
        }
        Ok(())
    }
}

impl Config {
    /// Loads defaults, then `file`, then `RINGSIDE_*` from `env`.
    /// Flags are applied by the caller with [`Config::set`].
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut tree = toml::Value::try_from(Config::default()).map_err(ConfigError::internal)?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))?;
            let file_tree: toml::Value = toml::from_str(&text).map_err(|e| syntax_error(path, &text, &e))?;
            merge(&mut tree, file_tree, "").map_err(|e| at_file_line(e, path, &text))?;
        }
        let vars: BTreeMap<String, String> = env.into_iter().collect();
        for (name, value) in vars {
            if let Some(rest) = name.strip_prefix(ENV_PREFIX) {
                // Only names in a settings section are settings (a typo there
                // is refused); others (RINGSIDE_LOG, a test's RINGSIDE_BIN) are
                // not ours to judge.
                if !names_a_section(&tree, rest) {
                    continue;
                }
                let key = env_key(&tree, rest)
                    .ok_or_else(|| ConfigError::new(&name, "no such setting (expected RINGSIDE_<SECTION>_<KEY>)"))?;
                set_key(&mut tree, &key, &value)
                    .map_err(|e| ConfigError::new(&e.key, format!("{} (from {name})", e.reason)))?;
            }
        }
        from_tree(tree)
    }

    /// Sets one `section.key` from a string, as flags and env vars do.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let mut tree = toml::Value::try_from(&*self).map_err(ConfigError::internal)?;
        set_key(&mut tree, key, value)?;
        *self = from_tree(tree)?;
        Ok(())
    }

    /// Refuses values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Every refusal below also says what was given: this `check` wraps the
        // free function of that name and appends the key's current value.
        let tree = toml::Value::try_from(self).ok();
        let check = |ok: bool, key: &str, why: &str| -> Result<(), ConfigError> {
            if ok {
                return Ok(());
            }
            match tree.as_ref().and_then(|t| lookup(t, key)) {
                // Secrets are never echoed into a log line.
                Some(_) if key.contains("secret") => check(false, key, why),
                Some(given) => check(false, key, &format!("{why} (got {given})")),
                None => check(false, key, why),
            }
        };
        let s = &self.server;
        let w = &self.websocket;
        check(s.backlog >= 1, "server.backlog", "must be at least 1")?;
        check(s.shards <= 1024, "server.shards", "at most 1024 shards")?;
        check(s.max_connections_per_shard >= 1, "server.max_connections_per_shard", "must be at least 1")?;
        check(
            s.max_connections_per_shard.saturating_add(self.limits.max_handshakes_per_shard) < MAX_SLOTS_PER_SHARD,
            "server.max_connections_per_shard",
            "plus limits.max_handshakes_per_shard exceeds the connection-id slot space (4M)",
        )?;
        check(s.ring_entries.is_power_of_two() && s.ring_entries >= 8, "server.ring_entries", "power of two >= 8")?;
        check(
            s.recv_buffers.is_power_of_two() && s.recv_buffers <= 32768,
            "server.recv_buffers",
            "power of two from 1 to 32768",
        )?;
        check((512..=1 << 20).contains(&s.recv_buffer_bytes), "server.recv_buffer_bytes", "from 512 to 1048576")?;
        check(s.max_request_bytes >= 512, "server.max_request_bytes", "must be at least 512")?;
        check(s.handshake_timeout_ms >= 10, "server.handshake_timeout_ms", "must be at least 10")?;
        check(s.mailbox_capacity >= 16, "server.mailbox_capacity", "must be at least 16")?;
        check(valid_id(&s.node_id) || s.node_id.is_empty(), "server.node_id", "1-64 of [A-Za-z0-9_-]")?;
        check(w.max_frame_bytes >= 125, "websocket.max_frame_bytes", "must be at least 125")?;
        check(
            w.max_message_bytes >= w.max_frame_bytes,
            "websocket.max_message_bytes",
            "must be >= websocket.max_frame_bytes",
        )?;
        // What one connection holds unfinished is counted in 32 bits.
        check(w.max_message_bytes <= 1 << 30, "websocket.max_message_bytes", "at most 1073741824 (1 GiB)")?;
        check(w.read_buffer_bytes >= 64, "websocket.read_buffer_bytes", "must be at least 64")?;
        check(w.send_queue_bytes >= 1024, "websocket.send_queue_bytes", "must be at least 1024")?;
        check(w.ping_interval_ms >= 100, "websocket.ping_interval_ms", "must be at least 100")?;
        check(
            w.idle_timeout_ms > w.ping_interval_ms,
            "websocket.idle_timeout_ms",
            "must be greater than websocket.ping_interval_ms",
        )?;
        check(w.sweep_interval_ms >= 10, "websocket.sweep_interval_ms", "must be at least 10")?;
        check(
            w.sweep_interval_ms <= w.ping_interval_ms,
            "websocket.sweep_interval_ms",
            "must be <= websocket.ping_interval_ms",
        )?;
        check(self.rooms.max_rooms_per_connection >= 1, "rooms.max_rooms_per_connection", "at least 1")?;
        let r = &self.rooms;
        check(r.history_size <= 100_000, "rooms.history_size", "at most 100000")?;
        check(r.history_ttl_secs >= 1, "rooms.history_ttl_secs", "at least 1")?;
        check(r.history_max_bytes >= 1024, "rooms.history_max_bytes", "at least 1024")?;
        check(
            r.history_bytes_per_shard >= r.history_max_bytes,
            "rooms.history_bytes_per_shard",
            "at least rooms.history_max_bytes",
        )?;
        check(r.max_pending_joins >= 1, "rooms.max_pending_joins", "at least 1")?;
        if let Some(p) = r.presence_events.iter().find(|p| !valid_pattern(p)) {
            return Err(ConfigError::new(
                "rooms.presence_events",
                format!("bad pattern {p:?}: a room name or a prefix followed by *"),
            ));
        }
        for rule in &r.history_rules {
            if !valid_pattern(&rule.pattern) {
                return Err(ConfigError::new(
                    "rooms.history_rules",
                    format!("bad pattern {:?}: a room name or a prefix followed by *", rule.pattern),
                ));
            }
            if rule.size > 100_000 || rule.ttl_secs == 0 {
                return Err(ConfigError::new(
                    "rooms.history_rules",
                    format!("pattern {:?}: size at most 100000, ttl_secs at least 1", rule.pattern),
                ));
            }
        }
        check(
            self.rooms.max_payload_bytes + 512 <= w.max_message_bytes,
            "rooms.max_payload_bytes",
            "must leave 512 bytes of envelope under websocket.max_message_bytes",
        )?;
        check(self.shutdown.drain_timeout_ms >= 10, "shutdown.drain_timeout_ms", "at least 10")?;
        check(w.message_timeout_ms >= 100, "websocket.message_timeout_ms", "must be at least 100")?;
        check(w.write_timeout_ms >= 100, "websocket.write_timeout_ms", "must be at least 100")?;
        check(
            w.max_unfinished_bytes_per_shard >= w.max_frame_bytes,
            "websocket.max_unfinished_bytes_per_shard",
            "must be >= websocket.max_frame_bytes (one full frame must fit)",
        )?;
        check(w.mailbox_bytes >= 64 * 1024, "websocket.mailbox_bytes", "must be at least 65536")?;
        check(w.deflate_level <= 9, "websocket.deflate_level", "must be 0-9 (zlib levels)")?;
        let l = &self.limits;
        check(l.connection_rate_per_ip >= 0.0, "limits.connection_rate_per_ip", "must be >= 0")?;
        check(l.messages_per_second >= 0.0, "limits.messages_per_second", "must be >= 0")?;
        check(l.max_handshakes_per_shard >= 1, "limits.max_handshakes_per_shard", "must be at least 1")?;
        check(l.max_handshakes_per_ip >= 1, "limits.max_handshakes_per_ip", "must be at least 1")?;
        check(l.rate_limit_strikes >= 1, "limits.rate_limit_strikes", "must be at least 1")?;
        let p = &self.priority;
        check((0.0..=1.0).contains(&p.reserved_critical), "priority.reserved_critical", "a share from 0 to 1")?;
        check((0.0..=1.0).contains(&p.reserved_high), "priority.reserved_high", "a share from 0 to 1")?;
        check(
            p.reserved_critical + p.reserved_high < 1.0,
            "priority.reserved_high",
            "plus priority.reserved_critical must leave a share for normal and low (< 1)",
        )?;
        let a = &self.auth;
        check(a.sessions_per_client >= 1, "auth.sessions_per_client", "must be at least 1")?;
        let keyed = !a.hmac_secret.is_empty() || !a.hmac_secret_file.is_empty() || !a.public_key_file.is_empty();
        check(
            a.mode == AuthMode::None || keyed,
            "auth.mode",
            "\"token\" needs auth.hmac_secret, auth.hmac_secret_file or auth.public_key_file",
        )?;
        check(
            a.hmac_secret.is_empty() || a.hmac_secret.len() >= 32,
            "auth.hmac_secret",
            "must be at least 32 bytes (HS256 needs a key as long as its hash)",
        )?;
        check(
            s.admin_listen.is_empty() || s.admin_listen.parse::<SocketAddr>().is_ok(),
            "server.admin_listen",
            "expected ip:port, e.g. 127.0.0.1:9090, or empty",
        )?;
        check(
            s.agent_listen.is_empty() || s.agent_listen.parse::<SocketAddr>().is_ok(),
            "server.agent_listen",
            "expected ip:port, e.g. 127.0.0.1:9091, or empty",
        )?;
        check(self.cluster.sync_interval_ms >= 50, "cluster.sync_interval_ms", "at least 50")?;
        let c = &self.cluster;
        check(
            (0.0..1.0).contains(&c.rebalance_low) && c.rebalance_low < c.rebalance_high,
            "cluster.rebalance_low",
            "between 0 and 1, and below cluster.rebalance_high",
        )?;
        check(c.migrate_rate >= 1, "cluster.migrate_rate", "at least 1")?;
        check(self.cluster.reconcile_intervals >= 1, "cluster.reconcile_intervals", "at least 1")?;
        let url = &self.cluster.redis_url;
        check(
            url.is_empty()
                || url.split(',').all(|u| u.trim().starts_with("redis://") || u.trim().starts_with("rediss://")),
            "cluster.redis_url",
            "expected redis://host:port[,redis://...]",
        )?;
        check(
            !url.contains("rediss://"),
            "cluster.redis_url",
            "rediss:// (TLS) is not supported by this build; reach Redis over a private network or a local TLS tunnel (stunnel, spiped) at redis://",
        )?;
        check(
            !url.contains(',') || self.cluster.redis_mode == RedisMode::Cluster,
            "cluster.redis_url",
            "several URLs are the seeds of a Redis Cluster: set cluster.redis_mode = \"cluster\"",
        )?;
        self.validate_upstreams()
    }

    /// The effective configuration as TOML (printed by `--check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Node ids: 1-64 of `[A-Za-z0-9_-]` (the same charset as client ids, so
/// that both go into Redis keys and JSON without escaping).
fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check(ok: bool, key: &str, why: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(key, why))
    }
}

fn from_tree(tree: toml::Value) -> Result<Config, ConfigError> {
    Config::deserialize(tree.clone()).map_err(|e| {
        // Every leaf was checked when it was set, so this should not happen;
        // if it does, find the key that fails on its own to name it.
        let leaves = tree.as_table().into_iter().flatten().flat_map(|(section, inner)| {
            inner.as_table().into_iter().flatten().map(move |(name, v)| (format!("{section}.{name}"), v.clone()))
        });
        leaves
            .filter_map(|(key, v)| check_leaf(&key, v).err())
            .next()
            .unwrap_or_else(|| ConfigError::new("config", one_line(e.message())))
    })
}

/// `section.key` in `tree`, as TOML would write it (strings quoted).
fn lookup(tree: &toml::Value, key: &str) -> Option<String> {
    let (section, name) = key.split_once('.')?;
    Some(tree.get(section)?.get(name)?.to_string())
}

/// Checks one value for `section.key` as the field's type will read it,
/// returning it in the form to store (a resolved `server.listen`). Errors
/// name the key, the value given and what is allowed, on one line.
fn check_leaf(key: &str, value: toml::Value) -> Result<toml::Value, ConfigError> {
    let allowed: &[&str] = match key {
        "server.listen" => {
            let raw = value.as_str().ok_or_else(|| ConfigError::new(key, format!("expected a string, got {value}")))?;
            return resolve_listen(key, raw).map(|a| toml::Value::String(a.to_string()));
        }
        "server.driver" => &DriverChoice::NAMES,
        "server.io" => &IoChoice::NAMES,
        "websocket.slow_consumer" => &SlowConsumerPolicy::NAMES,
        "proxy.connect_fallback" => &ConnectFallback::NAMES,
        // `[[upstream]]` entries are read whole (and checked by validate()).
        "upstream" => {
            return Vec::<UpstreamConfig>::deserialize(value.clone())
                .map(|_| value)
                .map_err(|e| ConfigError::new(key, one_line(e.message())));
        }
        _ => &[],
    };
    if !allowed.is_empty() {
        return match value.as_str() {
            Some(v) if allowed.contains(&v) => Ok(value),
            _ => Err(ConfigError::new(key, format!("{value} is not one of {}", allowed.join(", ")))),
        };
    }
    let (section, name) = key.split_once('.').ok_or_else(|| ConfigError::new(key, "expected section.key"))?;
    let mut tree = toml::Value::try_from(Config::default()).map_err(ConfigError::internal)?;
    let slot =
        tree.get_mut(section).and_then(|t| t.get_mut(name)).ok_or_else(|| ConfigError::new(key, "unknown setting"))?;
    *slot = value.clone();
    match Config::deserialize(tree) {
        Ok(_) => Ok(value),
        Err(e) => Err(ConfigError::new(key, describe(&value, e.message()))),
    }
}

/// One line for a serde refusal of `value`: integers out of range say the range.
fn describe(value: &toml::Value, message: &str) -> String {
    let range = |ty: &str| match ty {
        "u8" => Some(u8::MAX as u64),
        "u16" => Some(u16::MAX as u64),
        "u32" => Some(u32::MAX as u64),
        "u64" => Some(u64::MAX),
        "usize" => Some(usize::MAX as u64),
        _ => None,
    };
    match (value, message.rsplit_once("expected ")) {
        (toml::Value::Integer(i), Some((_, ty))) if range(ty.trim()).is_some() => {
            let max = range(ty.trim()).unwrap_or_default();
            format!("{i} is out of range (0 to {max})")
        }
        _ => format!("{value}: {}", one_line(message)),
    }
}

/// `server.listen`: `ip:port`, `[v6]:port` or `host:port`; a host name is
/// resolved now and the first address kept.
fn resolve_listen(key: &str, raw: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = raw.trim().parse::<SocketAddr>() {
        return Ok(addr);
    }
    const FORMS: &str = "expected host:port, e.g. 0.0.0.0:8080, [::1]:8080 or localhost:8080";
    let bad = |why: &str| ConfigError::new(key, format!("{raw:?} {why}; {FORMS}"));
    let text = raw.trim();
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(bad("has no port"));
    };
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(bad("is an IPv6 address without brackets"));
    }
    if port.parse::<u16>().is_err() {
        return Err(bad(&format!("has no valid port ({port:?} is not 0-65535)")));
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| ConfigError::new(key, format!("cannot resolve {raw:?}: {}", one_line(&e.to_string()))))?;
    addrs.next().ok_or_else(|| ConfigError::new(key, format!("{raw:?} resolves to no address")))
}

/// Joins a multi-line message into one line.
fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// A TOML syntax error in `path`, on one line: the key (when the line has
/// one), the file, line and column, and what the parser expected.
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let file = path.display().to_string();
    let Some(span) = e.span() else {
        return ConfigError::new(&file, format!("TOML syntax error: {}", one_line(e.message())));
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let column = text[..start].rfind('\n').map_or(start, |nl| start - nl - 1) + 1;
    let reason = format!("TOML syntax error at {file} line {line}, column {column}: {}", one_line(e.message()));
    match key_on_line(text, line) {
        Some(key) => ConfigError::new(&key, reason),
        None => ConfigError::new(&file, reason),
    }
}

/// `section.key` of a `key = ...` line (1-based), from the `[section]` above it.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if i + 1 == line {
            let (name, _) = l.split_once('=')?;
            let name = name.trim().trim_matches('"');
            if name.is_empty() || name.starts_with('[') {
                return None;
            }
            return Some(if section.is_empty() { name.to_string() } else { format!("{section}.{name}") });
        }
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            section = h.trim().trim_matches('"').to_string();
        }
    }
    None
}

/// Appends where in the file `e.key` is set, when it can be found.
fn at_file_line(e: ConfigError, path: &Path, text: &str) -> ConfigError {
    match file_line(text, &e.key) {
        Some(line) => ConfigError::new(&e.key, format!("{} ({} line {line})", e.reason, path.display())),
        None => e,
    }
}

/// The 1-based line where `key` (`section` or `section.key`) is written in `text`.
fn file_line(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut span = None;
    for part in key.split('.') {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        span = Some(k.span());
        match v.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    let start = span?.start.min(text.len());
    Some(text[..start].matches('\n').count() + 1)
}

/// Deep-merges `src` into `dst`, refusing keys the defaults do not have.
fn merge(dst: &mut toml::Value, src: toml::Value, path: &str) -> Result<(), ConfigError> {
    match (dst, src) {
        (toml::Value::Table(d), toml::Value::Table(s)) => {
            for (k, v) in s {
                let key = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let slot = d.get_mut(&k).ok_or_else(|| ConfigError::new(&key, "unknown setting"))?;
                merge(slot, v, &key)?;
            }
            Ok(())
        }
        (d, s) => {
            if std::mem::discriminant(d) != std::mem::discriminant(&s) {
                return Err(ConfigError::new(path, format!("expected {}, got {} {s}", d.type_str(), s.type_str())));
            }
            *d = check_leaf(path, s)?;
            Ok(())
        }
    }
}

/// Maps `SERVER_MAX_CONNECTIONS_PER_SHARD` to `server.max_connections_per_shard`.
/// True if `rest` (an env name after `RINGSIDE_`) starts with a section name.
fn names_a_section(tree: &toml::Value, rest: &str) -> bool {
    let lower = rest.to_ascii_lowercase();
    tree.as_table().is_some_and(|t| t.keys().any(|section| lower.starts_with(&format!("{section}_"))))
}

fn env_key(tree: &toml::Value, rest: &str) -> Option<String> {
    let lower = rest.to_ascii_lowercase();
    let table = tree.as_table()?;
    for (section, inner) in table {
        if let Some(key) = lower.strip_prefix(&format!("{section}_")) {
            if inner.as_table()?.contains_key(key) {
                return Some(format!("{section}.{key}"));
            }
        }
    }
    None
}

/// Sets `section.key` to `raw`, parsed as the type the default has.
fn set_key(tree: &mut toml::Value, key: &str, raw: &str) -> Result<(), ConfigError> {
    let (section, name) = key.split_once('.').ok_or_else(|| ConfigError::new(key, "expected section.key"))?;
    let slot =
        tree.get_mut(section).and_then(|t| t.get_mut(name)).ok_or_else(|| ConfigError::new(key, "unknown setting"))?;
    let value = match slot {
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim().parse().map_err(|_| ConfigError::new(key, format!("not an integer: {raw:?}")))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            raw.trim().parse().map_err(|_| ConfigError::new(key, format!("not true/false: {raw:?}")))?,
        ),
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| ConfigError::new(key, format!("not a number: {raw:?}")))?)
        }
        // Lists from a flag or an environment variable: comma-separated.
        toml::Value::Array(_) => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|v| !v.is_empty()).map(|v| toml::Value::String(v.into())).collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    };
    *slot = check_leaf(key, value)?;
    Ok(())
}

/// A configuration value that cannot work, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `section.key`, env var or file name.
    pub key: String,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    /// A refusal of `key` for `reason`.
    pub fn new(key: &str, reason: impl Into<String>) -> Self {
        Self { key: key.to_string(), reason: reason.into() }
    }

    /// A failure that is ringside's fault, not the operator's.
    pub fn internal(e: impl fmt::Display) -> Self {
        Self::new("internal", e.to_string())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp file holding `text`, unique per test.
    fn file(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ringside-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(name);
        std::fs::write(&f, text).unwrap();
        f
    }

    /// The error's text, asserted to be one line.
    fn one(e: ConfigError) -> String {
        let text = e.to_string();
        assert!(!text.contains('\n'), "not one line: {text:?}");
        text
    }

    #[test]
    fn upstreams_are_read_whole_and_checked_by_name() {
        let f = file(
            "up.toml",
            "[proxy]\nconnect = \"app\"\n[[proxy.rpc]]\nmethods = \"chat.*\"\nupstream = \"app\"\n\n\
             [[upstream]]\nname = \"app\"\nurl = \"http://127.0.0.1:3000\"\nmax_connections = 4\n",
        );
        let c = Config::load(Some(&f), vec![]).unwrap();
        c.validate().unwrap();
        assert_eq!((c.upstream.len(), c.upstream[0].max_connections, c.upstream[0].min_connections), (1, 4, 1));
        assert_eq!(c.upstream[0].authority(), Some("127.0.0.1:3000"));
        assert_eq!(c.proxy.rpc_route("chat.send").map(|r| r.path.as_str()), Some("/rpc"));
        assert!(c.proxy.rpc_route("other").is_none());
        assert_eq!(Config::load(Some(&f), vec![]).unwrap().to_toml().matches("[[upstream]]").count(), 1);
        let mut bad = c.clone();
        bad.proxy.connect = "nope".into();
        assert!(one(bad.validate().unwrap_err()).contains("proxy.connect"));
        let mut bad = c.clone();
        bad.upstream[0].url = "https://x:1".into();
        assert!(one(bad.validate().unwrap_err()).contains("upstream[0].url"));
        let mut bad = c.clone();
        bad.upstream[0].min_connections = 5;
        assert!(one(bad.validate().unwrap_err()).contains("upstream[0].max_connections"));
        let f = file("up-typo.toml", "[[upstream]]\nname = \"a\"\nurl = \"http://h:1\"\nmax_conections = 4\n");
        assert!(one(Config::load(Some(&f), vec![]).unwrap_err()).contains("max_conections"));
    }

    #[test]
    fn enum_errors_name_the_key_the_value_and_the_choices() {
        let f = file("enum.toml", "[server]\ndriver = \"bogus\"\n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(
            e.starts_with("invalid configuration: server.driver: \"bogus\" is not one of auto, io_uring, epoll"),
            "{e}"
        );
        assert!(e.ends_with("enum.toml line 2)"), "{e}");
        let e = one(Config::default().set("server.driver", "bogus").unwrap_err());
        assert_eq!(e, "invalid configuration: server.driver: \"bogus\" is not one of auto, io_uring, epoll");
        let env = vec![("RINGSIDE_WEBSOCKET_SLOW_CONSUMER".to_string(), "later".to_string())];
        let e = one(Config::load(None, env).unwrap_err());
        assert_eq!(
            e,
            "invalid configuration: websocket.slow_consumer: \"later\" is not one of close, drop \
             (from RINGSIDE_WEBSOCKET_SLOW_CONSUMER)"
        );
        let f = file("enum-type.toml", "[server]\ndriver = 1\n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(e.contains("server.driver: expected string, got integer 1"), "{e}");
    }

    #[test]
    fn enum_names_are_exactly_the_variants() {
        for v in [DriverChoice::Auto, DriverChoice::IoUring, DriverChoice::Epoll] {
            let name = toml::Value::try_from(v).unwrap();
            assert!(DriverChoice::NAMES.contains(&name.as_str().unwrap()), "{name}");
        }
        for v in [SlowConsumerPolicy::Close, SlowConsumerPolicy::Drop] {
            let name = toml::Value::try_from(v).unwrap();
            assert!(SlowConsumerPolicy::NAMES.contains(&name.as_str().unwrap()), "{name}");
        }
        for name in DriverChoice::NAMES {
            Config::default().set("server.driver", name).unwrap();
        }
        for name in SlowConsumerPolicy::NAMES {
            Config::default().set("websocket.slow_consumer", name).unwrap();
        }
        for v in [IoChoice::Direct, IoChoice::Poll] {
            let name = toml::Value::try_from(v).unwrap();
            assert!(IoChoice::NAMES.contains(&name.as_str().unwrap()), "{name}");
        }
        for name in IoChoice::NAMES {
            Config::default().set("server.io", name).unwrap();
        }
        let e = one(Config::default().set("server.io", "bogus").unwrap_err());
        assert_eq!(e, "invalid configuration: server.io: \"bogus\" is not one of direct, poll");
    }

    #[test]
    fn receive_buffer_ring_is_checked() {
        let mut c = Config::default();
        c.server.recv_buffers = 300;
        assert!(one(c.validate().unwrap_err()).contains("server.recv_buffers: power of two"));
        c.server.recv_buffers = 2;
        c.server.recv_buffer_bytes = 100;
        assert!(one(c.validate().unwrap_err()).contains("server.recv_buffer_bytes"));
    }

    #[test]
    fn listen_accepts_addresses_and_host_names() {
        let mut c = Config::default();
        c.set("server.listen", "localhost:8080").unwrap();
        assert_eq!(c.server.listen.port(), 8080);
        assert!(c.server.listen.ip().is_loopback(), "{}", c.server.listen);
        c.set("server.listen", "127.0.0.1:0").unwrap();
        assert_eq!(c.server.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        c.set("server.listen", "[::1]:9000").unwrap();
        assert_eq!(c.server.listen, "[::1]:9000".parse::<SocketAddr>().unwrap());
        let f = file("listen.toml", "[server]\nlisten = \"localhost:9001\"\n");
        assert_eq!(Config::load(Some(&f), vec![]).unwrap().server.listen.port(), 9001);
    }

    #[test]
    fn listen_errors_are_one_line() {
        let e = one(Config::default().set("server.listen", "nonsense").unwrap_err());
        assert!(
            e.starts_with("invalid configuration: server.listen: \"nonsense\" has no port; expected host:port"),
            "{e}"
        );
        let e = one(Config::default().set("server.listen", "localhost").unwrap_err());
        assert!(e.starts_with("invalid configuration: server.listen: \"localhost\" has no port"), "{e}");
        let e = one(Config::default().set("server.listen", "localhost:http2").unwrap_err());
        assert!(e.contains("server.listen: \"localhost:http2\" has no valid port"), "{e}");
        let e = one(Config::default().set("server.listen", "::1:80").unwrap_err());
        assert!(e.contains("without brackets"), "{e}");
        let f = file("listen-bad.toml", "[server]\nshards = 1\nlisten = \"nonsense\"\n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(e.contains("server.listen: \"nonsense\"") && e.ends_with("listen-bad.toml line 3)"), "{e}");
    }

    #[test]
    fn toml_syntax_errors_are_one_line_with_key_and_line() {
        let f = file("syntax.toml", "[server]\nshards = 2\ndriver = \n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(e.starts_with("invalid configuration: server.driver: TOML syntax error at "), "{e}");
        assert!(e.contains("syntax.toml line 3, column 10: "), "{e}");
        let f = file("syntax2.toml", "[server\n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(e.contains("syntax2.toml: TOML syntax error at ") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn out_of_range_integers_say_the_range() {
        let f = file("range.toml", "[server]\nbacklog = -1\n");
        let e = one(Config::load(Some(&f), vec![]).unwrap_err());
        assert!(e.starts_with("invalid configuration: server.backlog: -1 is out of range (0 to 4294967295)"), "{e}");
        let e = one(Config::default().set("server.shards", "-2").unwrap_err());
        assert!(e.starts_with("invalid configuration: server.shards: -2 is out of range (0 to "), "{e}");
        let e = one(Config::default().set("server.shards", "two").unwrap_err());
        assert_eq!(e, "invalid configuration: server.shards: not an integer: \"two\"");
    }

    #[test]
    fn validate_says_what_was_given() {
        let mut c = Config::default();
        c.server.ring_entries = 1000;
        assert_eq!(
            one(c.validate().unwrap_err()),
            "invalid configuration: server.ring_entries: power of two >= 8 (got 1000)"
        );
        let mut c = Config::default();
        c.set("cluster.redis_url", "http://x").unwrap();
        assert!(one(c.validate().unwrap_err()).ends_with("(got \"http://x\")"));
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn env_overrides_and_names_bad_keys() {
        let env = vec![
            ("RINGSIDE_SERVER_MAX_CONNECTIONS_PER_SHARD".to_string(), "77".to_string()),
            ("RINGSIDE_WEBSOCKET_SLOW_CONSUMER".to_string(), "drop".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.server.max_connections_per_shard, 77);
        assert_eq!(c.websocket.slow_consumer, SlowConsumerPolicy::Drop);
        let other = vec![("RINGSIDE_LOG".to_string(), "debug".to_string()), ("RINGSIDE_BIN".into(), "/x".into())];
        assert!(Config::load(None, other).is_ok(), "names outside the settings sections are not settings");
        let bad = Config::load(None, vec![("RINGSIDE_SERVER_NOPE".into(), "1".into())]).unwrap_err();
        assert!(bad.to_string().contains("RINGSIDE_SERVER_NOPE"), "{bad}");
        let bad = Config::load(None, vec![("RINGSIDE_SERVER_SHARDS".into(), "two".into())]).unwrap_err();
        assert!(bad.to_string().contains("server.shards"), "{bad}");
    }

    #[test]
    fn file_merge_rejects_unknown_and_wrong_types() {
        let dir = std::env::temp_dir().join(format!("ringside-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.toml");
        std::fs::write(&f, "[server]\nshards = 3\n[websocket]\nmax_message_bytes = 99999\n").unwrap();
        let c = Config::load(Some(&f), vec![]).unwrap();
        assert_eq!(c.server.shards, 3);
        assert_eq!(c.websocket.max_message_bytes, 99999);
        std::fs::write(&f, "[server]\nshard = 3\n").unwrap();
        assert!(Config::load(Some(&f), vec![]).unwrap_err().to_string().contains("server.shard"));
        std::fs::write(&f, "[server]\nshards = \"3\"\n").unwrap();
        assert!(Config::load(Some(&f), vec![]).unwrap_err().to_string().contains("server.shards"));
    }

    #[test]
    fn validate_names_the_key() {
        let mut c = Config::default();
        c.websocket.idle_timeout_ms = 10;
        assert!(c.validate().unwrap_err().to_string().contains("websocket.idle_timeout_ms"));
        let mut c = Config::default();
        c.set("cluster.redis_url", "http://x").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("cluster.redis_url"));
        let mut c = Config::default();
        c.set("cluster.redis_url", "rediss://r:6380").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("TLS"), "rediss refused, not silently plain");
        let mut c = Config::default();
        c.cluster.redis_url = "redis://a:1,redis://b:2".into();
        assert!(c.validate().unwrap_err().to_string().contains("redis_mode"));
        c.set("cluster.redis_mode", "cluster").unwrap();
        assert!(c.validate().is_ok());
        assert!(c.set("cluster.redis_mode", "sentinel").is_err());
        let mut c = Config::default();
        c.rooms.presence_events = vec!["chat.*".into(), "bad room".into()];
        assert!(c.validate().unwrap_err().to_string().contains("rooms.presence_events"));
        c.rooms.presence_events = vec!["chat.*".into(), "lobby".into()];
        assert!(c.rooms.presence_events_of("chat.1") && c.rooms.presence_events_of("lobby"));
        assert!(!c.rooms.presence_events_of("lobby2"));
    }

    #[test]
    fn ids() {
        assert!(valid_id("abc_DEF-09"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"a".repeat(65)));
    }
}
