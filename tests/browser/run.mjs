// Browser test of clients/js: headless Chromium (Debian's chromium, driven by
// playwright-core with executablePath) loads clients/js/example/ served from a local HTTP
// server and talks to real ringside nodes sharing a real redis-server:
//   1. a subscriber page on node A, a publisher page on node B, one room with history;
//   2. A is killed and restarted on the same port: the page backs off, reconnects, resumes;
//   3. A gets SIGTERM: the page follows the drain hint to B and resumes there;
//   4. every offset published arrived exactly once;
//   5. a page on a token-mode node passes its token as a subprotocol and refreshes it
//      (fetched from this server's /token) ahead of exp without being closed;
//   6. that page calls rpc through the node to the project's Python HTTP backend.
// Usage: node tests/browser/run.mjs   (RINGSIDE_BIN, CHROMIUM override the binaries)

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer } from "node:http";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const bin = process.env.RINGSIDE_BIN
  ?? path.join(process.env.CARGO_TARGET_DIR ?? path.join(root, "target"), "debug", "ringside");
const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SECRET = "browser-test-secret-0123456789abcdef-0123456789";
const children = new Set();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(msg) {
  throw new Error(msg);
}

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitFor(what, cond, ms = 20000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await sleep(50);
  }
  fail(`timed out waiting for ${what}`);
}

/** Up; with `--redis`, also connected to it (a room with history joined before
 * that is answered epoch "none" and cannot be recovered on a reconnect). */
async function healthy(port, clustered) {
  try {
    if (!clustered) return (await fetch(`http://127.0.0.1:${port}/health`)).status === 200;
    const r = await fetch(`http://127.0.0.1:${port}/ready`);
    return r.status === 200 && (await r.json()).cluster?.redis === "closed";
  } catch {
    return false;
  }
}

function start(cmd, args, stdout = false) {
  const child = spawn(cmd, args, { stdio: ["ignore", stdout ? "pipe" : "ignore", "pipe"] });
  child.log = [];
  child.stderr.on("data", (d) => child.log.push(...d.toString().split("\n").filter(Boolean)));
  children.add(child);
  child.on("exit", () => children.delete(child));
  return child;
}

class Node {
  constructor(port, args) {
    this.port = port;
    this.args = ["--listen", `127.0.0.1:${port}`, "--shards", "2", "--set", "server.pin_cores=false",
      "--set", "auth.allow_client_ids=true", ...args];
    this.url = `ws://127.0.0.1:${port}/ws`;
  }
  async start() {
    this.child = start(bin, this.args);
    await waitFor(`node on ${this.port}`, () => healthy(this.port, this.args.includes("--redis")));
  }
  async stop(signal) {
    const c = this.child;
    const exited = new Promise((r) => (c.exitCode !== null ? r() : c.on("exit", r)));
    c.kill(signal);
    await Promise.race([exited, sleep(15000).then(() => fail(`node ${this.port} did not exit on ${signal}`))]);
  }
}

function jwt(sub, secs) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + secs, rooms: ["*"] })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** Serves clients/js and /token?sub=S (a 3-second HS256 token). */
async function serveClients() {
  const dir = path.join(root, "clients/js");
  const server = createServer((req, res) => {
    const u = new URL(req.url, "http://x");
    if (u.pathname === "/token") {
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      return res.end(jwt(u.searchParams.get("sub"), 3));
    }
    const file = path.join(dir, path.normalize(u.pathname.endsWith("/") ? u.pathname + "index.html" : u.pathname));
    if (!file.startsWith(dir) || !existsSync(file)) {
      res.writeHead(404);
      return res.end();
    }
    const type = file.endsWith(".js") ? "text/javascript" : "text/html";
    res.writeHead(200, { "content-type": type });
    res.end(readFileSync(file));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return server;
}

const events = (page) => page.evaluate(() => window.ringsideEvents);
const count = async (page, pred) => (await events(page)).filter(pred).length;
const offsets = async (page) =>
  (await events(page)).filter((e) => e.name === "message" && e.msg.type === "message").map((e) => e.msg.offset);

/** The module's pure parts, in Node: backoff ceilings, the close-code table, exp. */
async function unitChecks() {
  const m = await import(path.join(root, "clients/js/ringside.js"));
  const b = { baseMs: 100, capMs: 1000, jitter: false };
  const ceilings = [0, 1, 2, 3, 4, 10].map((n) => m.backoffDelay(n, b));
  if (JSON.stringify(ceilings) !== "[100,200,400,800,1000,1000]") fail(`ceilings ${ceilings}`);
  const jittered = Array.from({ length: 500 }, () => m.backoffDelay(2, { ...b, jitter: true }));
  if (jittered.some((d) => d < 0 || d > 400) || new Set(jittered).size < 50) fail("full jitter out of [0, 400] or not spread");
  const table = Object.fromEntries([1000, 1001, 1006, 1008, 4000, 4001, 4003, 4004].map((c) => [c, m.actionFor(c)]));
  const want = { 1000: "stop", 1001: "reconnect", 1006: "reconnect", 1008: "stop", 4000: "stop", 4001: "reconnect", 4003: "refresh", 4004: "preempted" };
  if (JSON.stringify(table) !== JSON.stringify(want)) fail(`close table ${JSON.stringify(table)}`);
  if (m.jwtExp(jwt("x", 100)) !== Math.floor(Date.now() / 1000) + 100) fail("jwtExp");
}

async function main() {
  await unitChecks();
  if (!existsSync(bin)) fail(`${bin} is missing: build it first (cargo build --bin ringside)`);
  if (!existsSync(chromiumPath)) fail(`${chromiumPath} is missing: scripts/test installs Debian's chromium`);
  const redisPort = await freePort();
  start("redis-server", ["--port", String(redisPort), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]);
  await waitFor("redis", () => new Promise((r) => {
    const s = net.connect(redisPort, "127.0.0.1", () => { s.end(); r(true); }).on("error", () => r(false));
  }));
  const cluster = (id) => ["--redis", `redis://127.0.0.1:${redisPort}`, "--node-id", id,
    "--set", "cluster.sync_interval_ms=200", "--set", "rooms.history_size=2000",
    "--set", "shutdown.reconnect_spread_ms=300", "--set", "shutdown.drain_timeout_ms=4000"];
  const a = new Node(await freePort(), cluster("a"));
  const b = new Node(await freePort(), cluster("b"));
  // The token node also routes rpc "app.*" to the project's Python HTTP backend.
  const backend = start("python3", [path.join(root, "tests/python/upstream_backend.py"), "--port", "0"], true);
  const backendPort = await new Promise((resolve, reject) => {
    backend.stdout.on("data", (d) => { const m = /PORT (\d+)/.exec(d.toString()); if (m) resolve(Number(m[1])); });
    backend.on("exit", () => reject(new Error("the Python backend exited")));
  });
  const tomlDir = mkdtempSync(path.join(tmpdir(), "ringside-browser-"));
  const toml = path.join(tomlDir, "node.toml");
  writeFileSync(toml, `[[upstream]]\nname = "app"\nurl = "http://127.0.0.1:${backendPort}"\nretry_attempts = 1\n`
    + `[[proxy.rpc]]\nmethods = "app.*"\nupstream = "app"\n`);
  const t = new Node(await freePort(), ["--config", toml, "--set", "auth.mode=token", "--set", `auth.hmac_secret=${SECRET}`,
    "--set", "auth.leeway_secs=0", "--set", "websocket.sweep_interval_ms=100"]);
  await Promise.all([a.start(), b.start(), t.start()]);
  await waitFor("a to see b in /cluster", async () =>
    (await (await fetch(`http://127.0.0.1:${a.port}/cluster`)).text()).includes(`127.0.0.1:${b.port}`));

  const http = await serveClients();
  const base = `http://127.0.0.1:${http.address().port}/example/index.html`;
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
  try {
    const open = async (query) => {
      const page = await browser.newPage();
      page.on("pageerror", (e) => console.error("page error:", e));
      await page.goto(`${base}?${query}`);
      await page.waitForFunction(() => window.ringsideReady === true, null, { timeout: 20000 });
      return page;
    };
    const tok = await open(`url=${t.url}&room=tokroom&token_url=/token%3Fsub%3Dtok-user`);
    const sub = await open(`url=${a.url}&room=feed&client_id=browser-sub&base_ms=100`);
    const pub = await open(`url=${b.url}&room=feed&client_id=browser-pub`);
    await pub.evaluate(() => {
      window.sent = 0;
      window.pubTimer = setInterval(() => {
        const i = window.sent + 1;
        window.ringside.publish("feed", i).then(() => (window.sent = i), () => {});
      }, 20);
    });
    await waitFor("first messages", async () => (await offsets(sub)).length >= 20);

    // 2. A killed and restarted on the same port.
    await a.stop("SIGKILL");
    await waitFor("connect failures while A is down", async () => (await count(sub, (e) => e.name === "connectfailed")) >= 2);
    await a.start();
    await waitFor("reconnect to A", async () => (await count(sub, (e) => e.name === "connected" && e.reconnect && e.url === a.url)) === 1);
    const recovered = (e) => e.name === "message" && e.msg.type === "joined" && e.msg.recovered === true;
    await waitFor("recovery on A", async () => (await count(sub, recovered)) === 1);
    await waitFor("A to see b again", async () =>
      (await (await fetch(`http://127.0.0.1:${a.port}/cluster`)).text()).includes(`127.0.0.1:${b.port}`));

    // 3. SIGTERM on A: drain hint to B.
    const draining = a.stop("SIGTERM");
    await waitFor("move to B", async () => (await count(sub, (e) => e.name === "connected" && e.url === b.url)) === 1);
    await waitFor("recovery on B", async () => (await count(sub, recovered)) === 2);
    await draining;
    const hints = await count(sub, (e) => e.name === "message" && e.msg.type === "reconnect" && e.msg.url === b.url);
    if (hints !== 1) fail(`expected one drain hint naming B, got ${hints}`);

    // 4. Nothing lost, nothing twice.
    await sleep(200);
    // Stop; one last message (a loss of the one before it then shows as a gap); the room's
    // last offset as the node says it (leave and join again: joined carries it).
    const sent = await pub.evaluate(async () => {
      clearInterval(window.pubTimer);
      await window.ringside.publish("feed", "last");
      await window.ringside.leave("feed");
      return (await window.ringside.join("feed")).offset;
    });
    await waitFor(`offset ${sent}`, async () => (await offsets(sub)).at(-1) === sent);
    const got = await offsets(sub);
    const want = Array.from({ length: sent }, (_, i) => i + 1);
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      const missing = want.filter((o) => !got.includes(o));
      const twice = got.filter((o, i) => got.indexOf(o) !== i);
      const trail = (await events(sub)).map((e) => e.name === "message"
        ? `${e.msg.type}${e.msg.offset ?? ""}${e.msg.recovered !== undefined ? ` recovered=${e.msg.recovered} offset=${e.msg.offset}` : ""}`
        : `${e.name}${e.code ? ` ${e.code}` : ""}${e.cause ? ` ${e.cause}` : ""}`);
      fail(`offsets: got ${got.length}, want 1..${sent}; missing ${missing}, twice ${twice}; trail: ${trail.join(", ")}`);
    }
    const waits = (await events(sub)).filter((e) => e.name === "reconnecting" && e.cause === "backoff");
    const backoff = waits.map((e) => e.attempt);
    // While A was down: attempts 0, 1, 2, ... each within min(cap, base x 2^n) (base 100 ms).
    if (backoff.length < 3 || backoff.some((a, i) => a !== i)) fail(`backoff attempts ${backoff}`);
    if (waits.some((e) => e.delayMs > Math.min(30000, 100 * 2 ** e.attempt))) fail(`backoff delays ${JSON.stringify(waits)}`);

    // 5. Token page: a subprotocol token, refreshed ahead of exp, never closed.
    await waitFor("two refreshes", () => tok.evaluate(() => window.ringside.stats.refreshes >= 2), 15000);
    const tokEvents = await events(tok);
    const who = tokEvents.find((e) => e.name === "connected")?.clientId;
    if (who !== "tok-user") fail(`token page connected as ${who}`);
    if (tokEvents.some((e) => e.name === "disconnected")) fail(`token page was disconnected: ${JSON.stringify(tokEvents)}`);

    // 6. RPC from the page through the token node to the backend, and a backend error.
    const rpc = await tok.evaluate(async () => {
      const sum = await window.ringside.rpc("app.add", [2, 3]);
      const err = await window.ringside.rpc("app.fail", null).then(() => null, (e) => ({ code: e.code, backend: e.backend }));
      return { sum, err };
    });
    if (rpc.sum !== 5 || rpc.err?.code !== "rpc_failed" || rpc.err?.backend?.code !== "boom") fail(`rpc: ${JSON.stringify(rpc)}`);

    console.log(JSON.stringify({ ok: true, messages: sent, backoff_attempts: backoff, hint_followed_to: b.url,
      refreshes: await tok.evaluate(() => window.ringside.stats.refreshes),
      gaps_recovered: await sub.evaluate(() => window.ringside.stats.gapsRecovered) }));
  } catch (e) {
    for (const page of browser.contexts().flatMap((c) => c.pages())) {
      const evs = await events(page).catch(() => []);
      console.error(page.url().split("?")[1], "events (last 30):", JSON.stringify(evs.slice(-30), null, 1));
    }
    throw e;
  } finally {
    await browser.close();
    http.close();
  }
}

main()
  .then(() => cleanup(0))
  .catch(async (e) => {
    console.error("browser test FAILED:", e.message);
    for (const c of children) console.error(c.spawnargs.slice(0, 3).join(" "), "log tail:", c.log.slice(-5));
    cleanup(1);
  });

function cleanup(code) {
  for (const c of children) c.kill("SIGKILL");
  process.exit(code);
}
