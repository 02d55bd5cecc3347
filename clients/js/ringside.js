// ringside.js: the browser client for ringside's /ws protocol (docs/protocol.md).
// One ES module, no build step, no dependency. Same behaviour as the Rust client
// (clients/rust): exponential backoff with full jitter, the close-code table
// (reconnect / refresh-then-reconnect / stop), `reconnect` hints (close, wait after_ms,
// go to url), rooms re-joined with `since` so nothing kept in history is lost or seen
// twice, and token refresh ahead of `exp`. The token travels the browser way: the
// subprotocol entry `ringside.bearer.<token>` next to `ringside`.

/** Close codes the server sends, and 1006 (no close frame). */
export const CloseCode = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, PROTOCOL_ERROR: 1002, ABNORMAL: 1006, INVALID_PAYLOAD: 1007,
  POLICY: 1008, TOO_BIG: 1009, INTERNAL: 1011, TRY_AGAIN: 1013,
  REPLACED: 4000, IDLE_TIMEOUT: 4001, TOKEN_EXPIRED: 4003, PREEMPTED: 4004,
});

/** What to do after a close: "reconnect", "preempted" (wait its delay), "refresh", "stop". */
export function actionFor(code) {
  switch (code) {
    case 1000: case 1002: case 1007: case 1008: case 1009: case 4000: return "stop";
    case 4003: return "refresh";
    case 4004: return "preempted";
    default: return "reconnect"; // 1001, 1006, 1011, 1013, 4001, unknown
  }
}

/** Backoff defaults: base 500 ms, cap 30 s, unlimited attempts, full jitter. */
export const DEFAULT_BACKOFF = Object.freeze({ baseMs: 500, capMs: 30000, maxAttempts: Infinity, jitter: true });

/** Delay before retry `attempt` (0-based): uniform in [0, min(cap, base * 2^attempt)]. */
export function backoffDelay(attempt, b = DEFAULT_BACKOFF, random = Math.random) {
  const ceiling = Math.min(b.capMs, b.baseMs * 2 ** Math.min(attempt, 30));
  return b.jitter ? Math.floor(random() * (ceiling + 1)) : ceiling;
}

/** The `exp` claim of a JWT (Unix seconds), read without verifying; null if none. */
export function jwtExp(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).exp;
    return typeof exp === "number" && exp >= 0 ? Math.floor(exp) : null;
  } catch {
    return null;
  }
}

/** Error codes a waiting request can be refused with (errors carry no request id). */
const REFUSALS = {
  joined: ["forbidden", "too_many_rooms", "bad_room", "rate_limited", "missing_field"],
  left: ["bad_room", "missing_field"],
  presence: ["forbidden", "bad_room", "missing_field"],
  echo: ["too_large"],
  refreshed: ["invalid_token", "forbidden", "unknown_type", "missing_field", "rate_limited"],
  pong: [],
  rpc_result: [], // rpc errors carry the call's id and are matched by it
};

/** A server refusal: `code` is the server's stable error code. */
export class RingsideError extends Error {
  constructor(code, message, backend = null) {
    super(`${code}: ${message}`);
    this.code = code;
    /** For a failed rpc: the backend's own {code, reason}, when it gave them. */
    this.backend = backend;
  }
}

/**
 * One logical connection. Options (defaults):
 *   urls: ["ws://host/ws", ...] (or url): tried in turn, each backoff retry moves on
 *   token: null | "jwt" | async () => "jwt" (called before connecting, ahead of exp, after 4003)
 *   clientId: null (asked for with ?client_id=, auth mode none)
 *   backoff: DEFAULT_BACKOFF; refreshAhead: 0.8 (null: never); requestTimeoutMs: 10000
 *   connectTimeoutMs: 10000; WebSocket: globalThis.WebSocket
 * Events (client.on(name, fn)): connected {clientId, node, url, reconnect}, message (any
 * server message not answering a request: room messages, directs, errors of publish,
 * `joined` of resumed rooms, hints), disconnected {code, reason}, reconnecting {attempt,
 * delayMs, url, cause: backoff|hint|preempted|retry|token}, stopped {reason}.
 */
export class Client {
  constructor(opts = {}) {
    this.urls = opts.urls ?? [opts.url];
    if (!this.urls.length || !this.urls.every((u) => /^wss?:\/\//.test(u))) throw new Error("urls must be ws:// or wss:// URLs");
    this.tokenSource = opts.token ?? null;
    this.clientId = opts.clientId ?? null;
    this.backoff = { ...DEFAULT_BACKOFF, ...(opts.backoff ?? {}) };
    this.refreshAhead = opts.refreshAhead === undefined ? 0.8 : opts.refreshAhead;
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 10000;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? 10000;
    this.WS = opts.WebSocket ?? globalThis.WebSocket;
    /** room -> {offset, epoch} | null: where each room resumes from. */
    this.rooms = new Map();
    this.stats = { connects: 0, connectFailures: 0, hintsFollowed: 0, duplicatesDropped: 0, refreshes: 0, gapsRecovered: 0 };
    /** Rooms left to re-join after a gap, until their `left`. */
    this.recovering = new Set();
    this.state = "idle"; // idle | connecting | connected | stopped
    this.handlers = {};
    this.pending = [];
    this.urlIndex = 0;
    this.url = this.urls[0];
    this.failed = 0;
    this.everConnected = false;
    this.token = null;
    this.timers = new Set();
    this.pingSeq = 0;
  }

  on(name, fn) { (this.handlers[name] ??= []).push(fn); return this; }
  emit(name, ev) { for (const fn of this.handlers[name] ?? []) { try { fn(ev); } catch (e) { console.error(e); } } }
  later(ms, fn) { const t = setTimeout(() => { this.timers.delete(t); fn(); }, ms); this.timers.add(t); return t; }
  cancel(t) { clearTimeout(t); this.timers.delete(t); }

  /** Starts connecting; resolves once the first connection is up (or rejects when stopped). */
  async start() {
    const up = new Promise((resolve, reject) => {
      this.on("connected", resolve);
      this.on("stopped", (e) => reject(new Error(`stopped: ${e.reason}`)));
    });
    this.token = await this.fetchToken();
    this.connect();
    return up;
  }

  async fetchToken() {
    const t = this.tokenSource;
    if (t == null) return null;
    if (typeof t === "string") return t;
    try { return (await t()) ?? null; } catch { return null; }
  }

  connect() {
    if (this.state === "stopped") return;
    this.state = "connecting";
    let url = this.url;
    if (this.clientId) url += (url.includes("?") ? "&" : "?") + "client_id=" + encodeURIComponent(this.clientId);
    // The browser cannot set headers: the token goes as a subprotocol entry, with
    // "ringside" offered too (the server selects it; without it the handshake fails).
    const protocols = this.token ? ["ringside.bearer." + this.token, "ringside"] : ["ringside"];
    const ws = new this.WS(url, protocols);
    this.ws = ws;
    let welcomed = false;
    const timeout = this.later(this.connectTimeoutMs, () => { if (!welcomed) ws.close(); });
    ws.onmessage = (e) => {
      let msg;
      try { msg = JSON.parse(e.data); } catch { return; }
      if (!welcomed) {
        if (msg.type !== "welcome") return;
        welcomed = true;
        this.cancel(timeout);
        this.onWelcome(msg);
        return;
      }
      this.onMessage(msg);
    };
    ws.onclose = (e) => {
      this.cancel(timeout);
      if (this.ws !== ws) return;
      this.ws = null;
      if (welcomed) this.onEnd(e.code, e.reason);
      else this.onConnectFailed(`closed before the welcome (${e.code})`);
    };
  }

  onWelcome(msg) {
    this.recovering.clear(); // the resume joins below recover every room
    this.failed = 0;
    this.state = "connected";
    this.stats.connects++;
    const reconnect = this.everConnected;
    this.everConnected = true;
    this.emit("connected", { clientId: msg.client_id, node: msg.node, url: this.url, reconnect });
    this.scheduleRefresh();
    for (const [room, since] of this.rooms) this.send(since ? { type: "join", room, since } : { type: "join", room }, "joined", room, true);
  }

  onMessage(msg) {
    if (msg.type === "message" && typeof msg.offset === "number") {
      if (this.recovering.has(msg.room)) return; // the replay after the gap brings it
      const since = this.rooms.get(msg.room);
      if (since && msg.offset <= since.offset) { this.stats.duplicatesDropped++; return; }
      if (since && msg.offset > since.offset + 1) return this.recoverGap(msg.room, since);
      if (since) since.offset = msg.offset;
    }
    // After the gap's leave, the room's messages are the replay: in order again.
    if (msg.type === "left" && this.recovering.delete(msg.room)) return;
    if (msg.type === "joined") this.onJoined(msg);
    if (msg.type === "preempted") this.preemptMs = msg.reconnect_delay_ms;
    if (!this.answer(msg)) this.emit("message", msg);
    if (msg.type === "reconnect") this.followHint(msg);
  }

  onJoined(msg) {
    const old = this.rooms.get(msg.room);
    // Epoch "none": the node cannot reach its store right now (e.g. just restarted). Keep
    // the position: the room's next message shows as a gap and recovers from it.
    if (msg.epoch === "none" && old) return;
    if (typeof msg.offset === "number" && msg.epoch && msg.epoch !== "none") {
      const keep = msg.recovered === true && old && old.epoch === msg.epoch;
      this.rooms.set(msg.room, { offset: keep ? Math.max(old.offset, msg.offset) : msg.offset, epoch: msg.epoch });
    } else {
      this.rooms.set(msg.room, null);
    }
  }

  /** Gives an answer to the oldest request waiting for it; false when nobody waits. */
  answer(msg) {
    const byId = (p) => p.expect === "pong" || p.expect === "rpc_result";
    const i = this.pending.findIndex((p) =>
      msg.type === "error"
        ? (msg.id !== undefined ? p.expect === "rpc_result" && msg.id === p.key : REFUSALS[p.expect].includes(msg.code))
        : msg.type === p.expect && (p.key === undefined || (byId(p) ? msg.id === p.key : msg.room === p.key)));
    if (i < 0) return false;
    const [p] = this.pending.splice(i, 1);
    clearTimeout(p.timer);
    if (msg.type === "refreshed" && p.token) { this.token = p.token; this.stats.refreshes++; this.scheduleRefresh(); }
    if (msg.type === "error") p.reject(new RingsideError(msg.code, msg.message, msg.backend));
    else p.resolve(msg);
    return !p.internal;
  }

  /** A gap in a room's offsets (a message lost on the way): leave, join again with `since`. */
  recoverGap(room, since) {
    this.recovering.add(room);
    this.stats.gapsRecovered++;
    this.ws.send(JSON.stringify({ type: "leave", room }));
    this.send({ type: "join", room, since: { ...since } }, "joined", room, true);
  }

  followHint(msg) {
    this.stats.hintsFollowed++;
    this.hint = { url: msg.url, afterMs: msg.after_ms ?? 0, reason: msg.reason };
    this.state = "connecting"; // stop sending: the socket is closing
    this.ws?.close(1000, "following reconnect hint");
  }

  onEnd(code, reason) {
    this.state = "connecting";
    this.clearRefresh();
    this.failPending("disconnected");
    const hint = this.hint;
    this.hint = null;
    this.emit("disconnected", { code, reason });
    if (this.userClosed) return this.stop("closed");
    if (hint) {
      // A hint replaces backoff for this one reconnect.
      // "": the usual address (the configured URL, e.g. the balancer), not a node an
      // earlier hint sent us to.
      this.url = hint.url || this.urls[this.urlIndex];
      return this.retry(0, hint.afterMs, "hint");
    }
    const action = actionFor(code);
    if (action === "stop") return this.stop(code === 4000 ? "replaced" : `close ${code}`);
    if (action === "preempted") {
      const d = this.preemptMs ?? 5000;
      this.nextUrl();
      return this.retry(0, d + Math.floor(Math.random() * (d / 5 + 1)), "preempted");
    }
    if (action === "refresh") {
      if (typeof this.tokenSource !== "function") return this.stop("no token");
      return this.fetchToken().then((t) => {
        if (!t) return this.stop("no token");
        this.token = t;
        this.retry(0, backoffDelay(0, this.backoff), "token");
      });
    }
    this.retry(0, backoffDelay(0, this.backoff), "backoff");
  }

  onConnectFailed(error) {
    this.stats.connectFailures++;
    this.failed++;
    this.emit("connectfailed", { attempt: this.failed, error });
    if (this.userClosed) return this.stop("closed");
    if (this.failed >= this.backoff.maxAttempts) return this.stop(`gave up after ${this.failed} attempts`);
    this.nextUrl();
    this.retry(this.failed, backoffDelay(this.failed, this.backoff), "backoff");
  }

  nextUrl() { this.urlIndex = (this.urlIndex + 1) % this.urls.length; this.url = this.urls[this.urlIndex]; }

  retry(attempt, delayMs, cause) {
    if (this.state === "stopped") return;
    this.emit("reconnecting", { attempt, delayMs, url: this.url, cause });
    this.later(delayMs, () => this.connect());
  }

  stop(reason) {
    if (this.state === "stopped") return;
    this.state = "stopped";
    this.failPending("stopped");
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    this.emit("stopped", { reason });
  }

  failPending(why) {
    for (const p of this.pending.splice(0)) { clearTimeout(p.timer); p.reject(new Error(why)); }
  }

  clearRefresh() { if (this.refreshTimer) this.cancel(this.refreshTimer); this.refreshTimer = null; }

  scheduleRefresh() {
    this.clearRefresh();
    const exp = this.token && jwtExp(this.token);
    if (this.refreshAhead == null || !exp || typeof this.tokenSource !== "function") return;
    const left = exp - Date.now() / 1000;
    this.refreshTimer = this.later(Math.max(100, left * this.refreshAhead * 1000), async () => {
      const t = await this.fetchToken();
      if (t && this.state === "connected") this.send({ type: "refresh", token: t }, "refreshed", undefined, true, t).catch(() => {});
      else this.scheduleRefresh();
    });
  }

  /** Sends `msg`; with `expect`, resolves with its answer (rejects on a refusal). */
  send(msg, expect, key, internal = false, token = undefined) {
    if (this.state === "stopped") return Promise.reject(new Error("stopped"));
    if (this.state !== "connected" || !this.ws) return Promise.reject(new Error("not connected"));
    if (msg.type === "leave") this.rooms.delete(msg.room);
    this.ws.send(JSON.stringify(msg));
    if (!expect) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const p = { expect, key, internal, token, resolve, reject };
      p.timer = setTimeout(() => { this.pending.splice(this.pending.indexOf(p), 1); reject(new Error("timeout")); }, this.requestTimeoutMs);
      this.pending.push(p);
    }).catch((e) => {
      // The client's own requests (resume joins, refresh ahead): the refusal was already
      // emitted as a "message" event.
      if (internal) return null;
      throw e;
    });
  }

  join(room) {
    const since = this.rooms.get(room);
    return this.send(since ? { type: "join", room, since } : { type: "join", room }, "joined", room);
  }
  leave(room) { return this.send({ type: "leave", room }, "left", room); }
  /** Resolves once sent; refusals arrive as "message" events of type error. */
  publish(room, data) { return this.send({ type: "publish", room, data }); }
  direct(to, data) { return this.send({ type: "direct", to, data }); }
  presence(room) { return this.send({ type: "presence", room }, "presence", room).then((m) => m.clients); }
  echo(data) { return this.send({ type: "echo", data }, "echo").then((m) => m.data); }
  ping() { const id = ++this.pingSeq, t0 = performance.now(); return this.send({ type: "ping", id }, "pong", id).then(() => performance.now() - t0); }
  /** Calls `method` on the backend the node's [[proxy.rpc]] routes it to; answers match by id. */
  rpc(method, data) { const id = ++this.pingSeq; return this.send({ type: "rpc", id, method, data }, "rpc_result", id).then((m) => m.data); }
  refresh(token) { return this.send({ type: "refresh", token }, "refreshed", undefined, false, token).then((m) => m.exp); }

  /** Closes normally and stops reconnecting. */
  close() {
    this.userClosed = true;
    if (this.ws) this.ws.close(1000, "client closed");
    else this.stop("closed");
  }
}
