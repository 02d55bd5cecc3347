//! The storm's parent side: runs `--trigger` at the go time plus `--trigger-at`,
//! scrapes `--metrics-url` just before it and once more after the run, and turns
//! the two scrapes of ringside's cumulative handshake histogram
//! (`ringside_websocket_connection_latency_seconds`, one series per shard) into
//! what happened in between: the handshake count and the p50/p99 *bucket upper
//! bounds* (Prometheus buckets give no finer answer; the quantile lies in the
//! bucket below the bound).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::clock::{mono_us, secs_us};
use crate::params::Params;

/// The handshake histogram's bucket series (docs/metrics.md): accept to 101 written.
pub const HANDSHAKE_BUCKETS: &str = "ringside_websocket_connection_latency_seconds_bucket";

/// Bound on a scrape (connect, request, whole response).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on a /metrics response: ringside's is a few tens of KiB; more is not a metrics page.
const SCRAPE_MAX_BYTES: u64 = 16 << 20;

/// How long the parent waits for the trigger command to exit after the run; a
/// command still running then is killed (and reported so).
const TRIGGER_WAIT: Duration = Duration::from_secs(30);

/// A cumulative histogram summed over its label sets: `(le, count)` by ascending `le`
/// (`+Inf` as infinity).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Buckets(pub Vec<(f64, u64)>);

impl Buckets {
    /// The count at `+Inf` (every observation).
    pub fn total(&self) -> u64 {
        self.0.last().map_or(0, |b| b.1)
    }

    /// Upper bound of the bucket holding quantile `q`: the smallest `le` whose
    /// cumulative count reaches `ceil(q x total)`. `None` without observations;
    /// infinity when it is above the largest finite bucket.
    pub fn quantile_le(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        self.0.iter().find(|(_, c)| *c >= rank).map(|(le, _)| *le)
    }

    /// `after - before` per bucket; an error if the buckets differ or any count fell
    /// (the process was replaced or restarted between the scrapes).
    pub fn delta(before: &Buckets, after: &Buckets) -> Result<Buckets, String> {
        if before.0.len() != after.0.len() || before.0.iter().zip(&after.0).any(|(b, a)| b.0 != a.0) {
            return Err("the bucket bounds differ between the scrapes".into());
        }
        let mut out = Vec::with_capacity(after.0.len());
        for ((le, b), (_, a)) in before.0.iter().zip(&after.0) {
            let d = a.checked_sub(*b).ok_or("a count fell between the scrapes (counter reset)")?;
            out.push((*le, d));
        }
        Ok(Buckets(out))
    }
}

/// Sums the `metric` bucket series of a Prometheus text exposition by `le`.
pub fn parse_buckets(text: &str, metric: &str) -> Result<Buckets, String> {
    let mut by_le: Vec<(f64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else { continue };
        let Some(rest) = rest.strip_prefix('{') else { continue };
        let (labels, value) = rest.split_once('}').ok_or_else(|| format!("bad line: {line}"))?;
        let le = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("le=\""))
            .and_then(|v| v.strip_suffix('"'))
            .ok_or_else(|| format!("no le label: {line}"))?;
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().map_err(|_| format!("bad le: {line}"))? };
        let v = value.split_whitespace().next().unwrap_or_default();
        let v: f64 = v.parse().map_err(|_| format!("bad value: {line}"))?;
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(slot) => slot.1 += v as u64,
            None => by_le.push((le, v as u64)),
        }
    }
    if by_le.is_empty() {
        return Err(format!("no {metric} series"));
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    if by_le.last().map(|b| b.0) != Some(f64::INFINITY) {
        return Err(format!("{metric} has no +Inf bucket"));
    }
    Ok(Buckets(by_le))
}

/// A plain HTTP/1.0 GET of `http://host:port/path`; the body of a 200 answer.
pub fn http_get(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(SCRAPE_TIMEOUT)).map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| format!("{url}: {e}"))?;
    let mut body = String::new();
    s.take(SCRAPE_MAX_BYTES).read_to_string(&mut body).map_err(|e| format!("{url}: {e}"))?;
    let (head, text) = body.split_once("\r\n\r\n").ok_or_else(|| format!("{url}: no HTTP header"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(text.to_string())
}

fn scrape(url: &str) -> Result<Buckets, String> {
    http_get(url).and_then(|t| parse_buckets(&t, HANDSHAKE_BUCKETS))
}

/// The trigger of a storm run, armed at the go time.
#[derive(Debug)]
pub struct Trigger {
    command: String,
    at_us: u64,
    metrics_url: String,
    due: Option<u64>,
    child: Option<Child>,
    report: TriggerReport,
    before: Option<Result<Buckets, String>>,
}

/// What the trigger did, for the report.
#[derive(Debug, Clone, Default)]
pub struct TriggerReport {
    /// The command, as given.
    pub command: String,
    /// Seconds after the go time it was due.
    pub at_s: f64,
    /// The schedule's start (monotonic us): reconnect slots count from it.
    pub start_mono_us: u64,
    /// The go time (monotonic us).
    pub go_mono_us: Option<u64>,
    /// When the command was started (monotonic us), right after the first scrape.
    pub fired_mono_us: Option<u64>,
    /// Its exit status (`None`: not run, killed, or not exited in time).
    pub exit_code: Option<i32>,
    /// Why it did not run or finish, if so.
    pub error: Option<String>,
    /// The metrics URL (empty: none).
    pub metrics_url: String,
    /// The handshakes between the two scrapes, or why there is no figure.
    pub handshakes: Option<Result<Buckets, String>>,
}

impl Trigger {
    /// The storm's trigger, if the run has one.
    pub fn new(p: &Params, start_us: u64) -> Option<Trigger> {
        if p.trigger.is_empty() {
            return None;
        }
        let report = TriggerReport {
            command: p.trigger.clone(),
            at_s: p.trigger_at,
            start_mono_us: start_us,
            metrics_url: p.metrics_url.clone(),
            ..Default::default()
        };
        Some(Trigger {
            command: p.trigger.clone(),
            at_us: secs_us(p.trigger_at),
            metrics_url: p.metrics_url.clone(),
            due: None,
            child: None,
            report,
            before: None,
        })
    }

    /// Arms the trigger at the (first) go time.
    pub fn arm(&mut self, go_us: u64) {
        if self.report.go_mono_us.is_none() {
            self.report.go_mono_us = Some(go_us);
            self.due = Some(go_us + self.at_us);
        }
    }

    /// When it is due, if armed and not yet fired.
    pub fn due_us(&self) -> Option<u64> {
        self.due
    }

    /// Scrapes the metrics (if any), then starts the command without waiting for it.
    pub fn fire(&mut self) {
        self.due = None;
        if !self.metrics_url.is_empty() {
            self.before = Some(scrape(&self.metrics_url));
        }
        self.report.fired_mono_us = Some(mono_us());
        eprintln!("loadtest: trigger: {}", self.command);
        match Command::new("sh").arg("-c").arg(&self.command).stdin(Stdio::null()).spawn() {
            Ok(c) => self.child = Some(c),
            Err(e) => self.report.error = Some(format!("sh -c: {e}")),
        }
    }

    /// After the run: the second scrape, the command's exit status (waiting up to
    /// [`TRIGGER_WAIT`], then killing it), and the report.
    pub fn finish(mut self) -> TriggerReport {
        if self.report.fired_mono_us.is_none() {
            self.report.error = Some("the run ended before the trigger was due".into());
            return self.report;
        }
        if let Some(before) = self.before.take() {
            self.report.handshakes = Some(before.and_then(|b| Buckets::delta(&b, &scrape(&self.metrics_url)?)));
        }
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + TRIGGER_WAIT;
            loop {
                match c.try_wait() {
                    Ok(Some(s)) => {
                        self.report.exit_code = s.code();
                        break;
                    }
                    Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
                    Ok(None) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        self.report.error = Some(format!("still running after {TRIGGER_WAIT:?}; killed"));
                        break;
                    }
                    Err(e) => {
                        self.report.error = Some(format!("wait: {e}"));
                        break;
                    }
                }
            }
        }
        self.report
    }
}

/// The `server_handshake` part of the storm report.
pub fn handshake_json(r: &TriggerReport) -> Value {
    let note = "server side, accept to 101 written, between a scrape just before the trigger and one \
                after the run; p50/p99 are the upper bounds (le, seconds) of the histogram buckets they \
                fall in, so the true value is at most that and above the next lower bound; null = \
                above the largest finite bucket or no handshakes";
    let le = |x: Option<f64>| x.filter(|v| v.is_finite()).map_or(Value::Null, |v| json!(v));
    match &r.handshakes {
        None => Value::Null,
        Some(Err(e)) => json!({ "metrics_url": r.metrics_url, "error": e }),
        Some(Ok(d)) => json!({
            "metrics_url": r.metrics_url,
            "count": d.total(),
            "p50_le_s": le(d.quantile_le(0.5)),
            "p99_le_s": le(d.quantile_le(0.99)),
            "buckets": d.0.iter().map(|(l, c)| {
                json!([if l.is_finite() { json!(l) } else { json!("+Inf") }, c])
            }).collect::<Vec<_>>(),
            "note": note,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE x histogram\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"0.001\"} 5\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"0.01\"} 9\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"0\",le=\"+Inf\"} 10\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"1\",le=\"0.001\"} 0\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"1\",le=\"0.01\"} 0\n\
        ringside_websocket_connection_latency_seconds_bucket{shard=\"1\",le=\"+Inf\"} 0\n\
        ringside_websocket_connection_latency_seconds_count{shard=\"0\"} 10\n\
        ringside_websocket_connection_duration_seconds_bucket{shard=\"0\",le=\"0.1\"} 77\n";

    #[test]
    fn sums_shards_by_le_and_ignores_other_series() {
        let b = parse_buckets(BEFORE, HANDSHAKE_BUCKETS).unwrap();
        assert_eq!(b.0, vec![(0.001, 5), (0.01, 9), (f64::INFINITY, 10)]);
        assert!(parse_buckets("other 1\n", HANDSHAKE_BUCKETS).is_err());
    }

    #[test]
    fn delta_quantiles_are_bucket_upper_bounds() {
        let before = parse_buckets(BEFORE, HANDSHAKE_BUCKETS).unwrap();
        // 100 more handshakes: 90 below 1 ms, 9 below 10 ms, 1 above.
        let after = Buckets(vec![(0.001, 95), (0.01, 108), (f64::INFINITY, 110)]);
        let d = Buckets::delta(&before, &after).unwrap();
        assert_eq!(d.total(), 100);
        assert_eq!(d.quantile_le(0.5), Some(0.001));
        assert_eq!(d.quantile_le(0.9), Some(0.001));
        assert_eq!(d.quantile_le(0.99), Some(0.01));
        assert_eq!(d.quantile_le(1.0), Some(f64::INFINITY));
        assert_eq!(Buckets(vec![(f64::INFINITY, 0)]).quantile_le(0.99), None);
        let reset = Buckets(vec![(0.001, 1), (0.01, 1), (f64::INFINITY, 1)]);
        assert!(Buckets::delta(&before, &reset).unwrap_err().contains("reset"));
    }

    #[test]
    fn http_get_reads_a_200_body_and_refuses_other_statuses() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            for reply in ["HTTP/1.1 200 OK\r\n\r\nhello", "HTTP/1.1 503 Service Unavailable\r\n\r\nx"] {
                let (mut s, _) = l.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.ends_with(b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "request ended early");
                    req.extend_from_slice(&buf[..n]);
                }
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        assert_eq!(http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap(), "hello");
        let e = http_get(&format!("http://127.0.0.1:{port}/metrics")).unwrap_err();
        assert!(e.contains("503"), "{e}");
        t.join().unwrap();
    }
}
