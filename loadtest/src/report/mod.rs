//! Run reports: `summary.json` with the fixed key set, one `.hgrm` per
//! histogram, a percentile plot (`percentiles.svg`) and a `README.md` with the
//! command and a short table, in `<out>/<UTC date>-<scenario>-<label>/`; and
//! [`replot`], which redraws the plot and README of committed runs from their
//! `summary.json` and `.hgrm` files.

pub mod hgrm;
pub mod index;
pub mod quantile;
pub mod rss;
pub mod storm;
pub mod svg;

use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::net::Target;
use crate::params::{Params, Scenario};
use crate::run::{RunOpts, ServerSamples};
use crate::stats::{new_hist, Stats, FAILURE_REASONS, HIST_NAMES};
use crate::sysinfo::Machine;
use crate::trigger::TriggerReport;

/// Everything about a run except the merged stats.
#[derive(Debug, Clone)]
pub struct RunMeta {
    /// Resolved parameters.
    pub params: Params,
    /// Run options (out dir, label, server pid/info).
    pub opts: RunOpts,
    /// Start time, RFC 3339 UTC.
    pub started_utc: String,
    /// Wall-clock seconds of the whole run.
    pub wall_seconds: f64,
    /// CPU seconds of the harness (parent and all workers).
    pub client_cpu_seconds: f64,
    /// The command that produced the run.
    pub command: String,
    /// Machine description.
    pub machine: Machine,
    /// Server samples, if `--server-pid` was given.
    pub server: ServerSamples,
    /// Workers that exited abnormally.
    pub workers_crashed: u64,
    /// What a storm's trigger did (storm runs only).
    pub storm: Option<TriggerReport>,
}

impl RunMeta {
    /// The run-directory label: `--label` or the host of the first URL.
    pub fn label(&self) -> String {
        let raw = self.opts.label.clone().unwrap_or_else(|| Target::host(&self.params.urls[0]));
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
    }
}

fn quantiles(h: &Histogram<u64>) -> Value {
    let q = |x: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    json!({
        "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999),
        "max": h.max(), "count": h.len(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

/// Fanout: deliveries expected, from per-room subscriber and publish counts.
pub fn fanout_expected(stats: &Stats, rooms: u64) -> u64 {
    (0..rooms).map(|r| stats.get(&format!("fanout.room.{r}.subs")) * stats.get(&format!("fanout.room.{r}.sent"))).sum()
}

/// Builds summary.json from the run's metadata and merged stats.
pub fn summarize(meta: &RunMeta, stats: &Stats) -> Value {
    let p = &meta.params;
    let g = |k: &str| stats.get(k);
    let empty = new_hist();
    let mut latency = Map::new();
    for name in HIST_NAMES {
        latency.insert(name.into(), quantiles(stats.hists.get(name).unwrap_or(&empty)));
    }
    for (name, h) in &stats.hists {
        latency.entry(name.clone()).or_insert_with(|| quantiles(h));
    }
    let mut failures = Map::new();
    for r in FAILURE_REASONS {
        failures.insert(r.into(), json!(0));
    }
    for (k, v) in &stats.counters {
        if let Some(r) = k.strip_prefix("failures.") {
            failures.insert(r.into(), json!(v));
        }
    }
    let received = g("messages.received");
    let (lost, expected) = match p.scenario {
        Scenario::Fanout | Scenario::Resume | Scenario::Storm => {
            let e = fanout_expected(stats, p.rooms);
            (e.saturating_sub(received), Some(e))
        }
        _ => (g("messages.lost"), None),
    };
    let msg_secs = match p.scenario {
        Scenario::Echo | Scenario::Fanout | Scenario::Resume | Scenario::Storm => p.duration,
        _ => 0.0,
    };
    let per_second = if msg_secs > 0.0 { received as f64 / msg_secs } else { 0.0 };
    let alive = match p.scenario {
        Scenario::Connect => g("connections.alive_at_end"),
        _ => g("connections.closed_clean"),
    };
    let client_cpu = meta.client_cpu_seconds;
    let mut v = json!({
        "scenario": p.scenario.name(),
        "label": meta.label(),
        "started_utc": meta.started_utc,
        "command": meta.command,
        "parameters": p,
        "target": { "urls": p.urls },
        "machine": meta.machine,
        "server_config": meta.opts.server_info,
        "wall_seconds": round3(meta.wall_seconds),
        "connections": {
            "attempted": g("connections.attempted"),
            "established": g("connections.established"),
            "failed": g("connections.failed"),
            "alive_at_end": alive,
            "closed_clean": g("connections.closed_clean"),
        },
        "latency_us": latency,
        "messages": {
            "sent": g("messages.sent"),
            "received": received,
            "lost": lost,
            "mismatched": g("messages.mismatched"),
            "per_second": round3(per_second),
            "expected": expected,
            "duplicates": g("messages.duplicates"),
            "out_of_order": g("messages.out_of_order"),
        },
        "failures": failures,
        "client": {
            "cpu_seconds": round3(client_cpu),
            "cpu_percent_of_one_core": round3(100.0 * client_cpu / meta.wall_seconds.max(1e-9)),
            "workers": p.workers,
            "workers_crashed": meta.workers_crashed,
            "messages_per_cpu_second": if client_cpu > 0.0 { round3(received as f64 / client_cpu) } else { 0.0 },
        },
    });
    if matches!(p.scenario, Scenario::Resume | Scenario::Storm) {
        v["recovery"] = recovery_json(stats);
    }
    if p.scenario == Scenario::Storm {
        let subs = (0..p.rooms).map(|r| g(&format!("fanout.room.{r}.subs"))).sum();
        v["storm"] = storm::storm_json(p, meta.storm.as_ref(), stats, subs);
    }
    if let Some(s) = server_json(meta, stats, received) {
        v["server"] = s;
    }
    v["checks"] = checks(&v);
    v
}

/// Resume: drops, reconnects, re-joins, replayed messages and the time from the first
/// drop until the last dropped subscriber was joined again.
pub fn recovery_json(stats: &Stats) -> Value {
    let g = |k: &str| stats.get(k);
    let (first, last) = (g("min.first_drop_us"), g("max.last_back_us"));
    let all_back_ms = if g("recovery.drops") > 0 && last >= first && last > 0 {
        json!(round3((last - first) as f64 / 1000.0))
    } else {
        Value::Null
    };
    let mut failed = Map::new();
    for (k, v) in &stats.counters {
        if let Some(r) = k.strip_prefix("recovery.reconnect_failed.") {
            failed.insert(format!("connect.{r}"), json!(v));
        } else if let Some(r) = k.strip_prefix("recovery.rejoin_failed.") {
            failed.insert(format!("rejoin.{r}"), json!(v));
        }
    }
    json!({
        "drops": g("recovery.drops"),
        "rejoined": g("recovery.rejoined"),
        "reconnect_attempts": g("recovery.reconnect_attempts"),
        "reconnect_failed": g("recovery.reconnect_failed"),
        "reconnect_failed_by_reason": failed,
        "replayed_messages": g("messages.replayed"),
        "hints": g("recovery.hints"),
        "server_closes_without_hint": g("recovery.server_closes"),
        "abrupt_closes": g("recovery.abrupt_closes"),
        "gap_at_rejoin": g("messages.gap_at_rejoin"),
        "offset_holes": g("messages.offset_holes"),
        "subscribers_with_holes": g("messages.subscribers_with_holes"),
        "holes_by_room": holes_by_room(stats),
        "first_drop_mono_us": if first > 0 { json!(first) } else { Value::Null },
        "last_back_mono_us": if last > 0 { json!(last) } else { Value::Null },
        "all_back_after_first_drop_ms": all_back_ms,
    })
}

/// Per room with holes: subscribers affected and the lowest and highest first
/// missing offset among them (`{room: [subscribers, lowest, highest]}`).
fn holes_by_room(stats: &Stats) -> Value {
    let mut m = Map::new();
    for (k, n) in &stats.counters {
        if let Some(r) = k.strip_prefix("holes.room.").and_then(|x| x.strip_suffix(".subscribers")) {
            let lo = stats.get(&format!("min.holes.room.{r}.first_offset"));
            let hi = stats.get(&format!("max.holes.room.{r}.last_offset"));
            m.insert(r.to_string(), json!([n, lo, hi]));
        }
    }
    Value::Object(m)
}

fn server_json(meta: &RunMeta, stats: &Stats, received: u64) -> Option<Value> {
    let (b, a) = (meta.server.before?, meta.server.after?);
    let held = meta.server.held;
    let cpu = a.cpu_seconds - b.cpu_seconds;
    let per_conn = rss::per_connection(b.rss_bytes, held.map(|h| h.rss_bytes), stats.get("connections.established"));
    Some(json!({
        "pid": meta.opts.server_pid,
        "rss_bytes_before": b.rss_bytes,
        "rss_bytes_held": held.map(|h| h.rss_bytes),
        "rss_bytes_after": a.rss_bytes,
        // Raw growth (may be negative); the per-connection figure is null when it
        // is not meaningful, and the note says why (see rss.rs).
        "rss_delta_bytes": held.map(|h| h.rss_bytes as i64 - b.rss_bytes as i64),
        "rss_delta_per_connection_bytes": per_conn.ok().map(round3),
        "rss_per_connection_note": per_conn.err().map(rss::NotMeaningful::code),
        "cpu_seconds": round3(cpu),
        "cpu_percent_of_one_core": round3(100.0 * cpu / meta.wall_seconds.max(1e-9)),
        "messages_per_cpu_second": if cpu > 0.0 { round3(received as f64 / cpu) } else { 0.0 },
        "fds_before": b.fds,
        "fds_held": held.map(|h| h.fds),
        "fds_after": a.fds,
    }))
}

/// The scenario's own invariants, evaluated on a summary.
pub fn checks(v: &Value) -> Value {
    let n = |path: &str| v.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    let scenario = v["scenario"].as_str().unwrap_or_default();
    let mut c = Map::new();
    let attempted = n("/connections/attempted");
    c.insert("all_established".into(), json!(attempted > 0 && n("/connections/established") == attempted));
    c.insert("all_alive_at_end".into(), json!(n("/connections/alive_at_end") == n("/connections/established")));
    let rooms = matches!(scenario, "fanout" | "resume" | "storm");
    if scenario == "echo" || rooms {
        c.insert("nothing_lost".into(), json!(n("/messages/lost") == 0 && n("/messages/received") > 0));
        c.insert("nothing_mismatched".into(), json!(n("/messages/mismatched") == 0));
    }
    if scenario == "resume" || scenario == "storm" {
        c.insert("all_rejoined".into(), json!(n("/recovery/rejoined") == n("/recovery/drops")));
    }
    if scenario == "storm" {
        storm::checks(v, &mut c);
    }
    if rooms {
        c.insert(
            "no_duplicates_or_reordering".into(),
            json!(n("/messages/duplicates") == 0 && n("/messages/out_of_order") == 0),
        );
    }
    let failures: u64 = v["failures"].as_object().map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
    c.insert("no_failures".into(), json!(failures == 0));
    Value::Object(c)
}

/// The quantiles the per-run table lists, with their `summary.json` keys.
const TABLE_QUANTILES: [(f64, &str, &str); 4] =
    [(0.5, "p50", "p50"), (0.9, "p90", "p90"), (0.99, "p99", "p99"), (0.999, "p999", "p99.9")];

/// The latency table of a run: one row per non-empty histogram; a quantile its
/// sample count does not resolve (see [`quantile::supported`]) is `-`, with a
/// footnote, and the last column is the maximum.
pub fn latency_table(latency: &Value) -> String {
    let mut s = String::from("| histogram | count |");
    for (_, _, head) in TABLE_QUANTILES {
        s += &format!(" {head} |");
    }
    s += " max |\n|---|---|---|---|---|---|---|\n";
    let mut cut = false;
    if let Some(m) = latency.as_object() {
        for (name, q) in m.iter().filter(|(_, q)| q["count"].as_u64().unwrap_or(0) > 0) {
            let n = q["count"].as_u64().unwrap_or(0);
            s += &format!("| {name} | {n} |");
            for (p, key, _) in TABLE_QUANTILES {
                if quantile::supported(p, n) {
                    s += &format!(" {} |", q[key]);
                } else {
                    cut = true;
                    s += " - |";
                }
            }
            s += &format!(" {} |\n", q["max"]);
        }
    }
    if cut {
        s += "\n`-`: not resolved by the sample count. With n samples only quantiles up to 1 - 1/n \
              have a sample beyond them (p99 needs 100 samples, p99.9 needs 1,000); higher ones would \
              only restate the maximum, which is the last column.\n";
    }
    s
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Creates a fresh run directory `<out>/<date>-<scenario>-<label>[-N]`.
pub fn run_dir(out: &Path, scenario: &str, label: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let base = format!("{}-{scenario}-{label}", crate::clock::utc_date());
    for n in 1.. {
        let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
        let dir = out.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    unreachable!("an unbounded range always yields a fresh name")
}

/// Writes a full run report and returns its directory.
pub fn write_run(meta: &RunMeta, stats: Stats) -> std::io::Result<PathBuf> {
    let summary = summarize(meta, &stats);
    let dir = run_dir(&meta.opts.out, meta.params.scenario.name(), &meta.label())?;
    write_files(&dir, &summary, &stats)?;
    print_checks(&summary);
    Ok(dir)
}

/// Writes summary.json, the .hgrm files, the SVG and README.md into `dir`.
pub fn write_files(dir: &Path, summary: &Value, stats: &Stats) -> std::io::Result<()> {
    let pretty = serde_json::to_string_pretty(summary).expect("summary serializes");
    std::fs::write(dir.join("summary.json"), pretty + "\n")?;
    let mut plotted = Vec::new();
    for (name, h) in &stats.hists {
        if !h.is_empty() {
            std::fs::write(dir.join(format!("{name}.hgrm")), hgrm::render(name, h))?;
            plotted.push(svg::Series::from_hist(name, h));
        }
    }
    std::fs::write(dir.join("percentiles.svg"), svg::render(&plot_title(summary), &plotted))?;
    std::fs::write(dir.join("README.md"), readme(summary))?;
    Ok(())
}

fn plot_title(summary: &Value) -> String {
    format!(
        "{} {} ({})",
        summary["scenario"].as_str().unwrap_or_default(),
        summary["label"].as_str().unwrap_or_default(),
        summary["started_utc"].as_str().unwrap_or_default()
    )
}

/// The line the generated part of a run's README ends with; anything a person
/// appended below it is kept by [`replot`].
const README_END: &str = "![percentiles](percentiles.svg)";

/// Redraws `percentiles.svg` and rewrites `README.md` of every run directory below
/// `root` from its `summary.json` and `.hgrm` files, which are left untouched (as is
/// any hand-written text after the generated part of the README). Returns the
/// number of runs redrawn.
pub fn replot(root: &Path) -> std::io::Result<usize> {
    let mut found = Vec::new();
    index::find(root, "summary.json", &mut found);
    found.sort();
    for p in &found {
        let dir = p.parent().unwrap_or(root);
        let bad = |e: serde_json::Error| std::io::Error::other(format!("{}: {e}", p.display()));
        let summary: Value = serde_json::from_str(&std::fs::read_to_string(p)?).map_err(bad)?;
        let mut hgrms: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|f| f.extension().is_some_and(|x| x == "hgrm"))
            .collect();
        hgrms.sort_by_key(|f| f.file_stem().map(|s| s.to_os_string()));
        let mut series = Vec::new();
        for f in hgrms {
            let name = f.file_stem().unwrap_or_default().to_string_lossy().to_string();
            series.extend(svg::Series::from_hgrm(&name, &std::fs::read_to_string(&f)?));
        }
        std::fs::write(dir.join("percentiles.svg"), svg::render(&plot_title(&summary), &series))?;
        let old = std::fs::read_to_string(dir.join("README.md")).unwrap_or_default();
        let tail = old.find(README_END).map_or("", |i| old[i + README_END.len()..].trim_start_matches('\n'));
        let mut text = readme(&summary);
        if !tail.trim().is_empty() {
            text += "\n";
            text += tail;
        }
        std::fs::write(dir.join("README.md"), text)?;
    }
    Ok(found.len())
}

fn print_checks(summary: &Value) {
    if let Some(m) = summary["checks"].as_object() {
        let bad: Vec<&String> = m.iter().filter(|(_, v)| v != &&json!(true)).map(|(k, _)| k).collect();
        if bad.is_empty() {
            eprintln!("loadtest: all checks passed");
        } else {
            eprintln!("loadtest: checks FAILED: {bad:?}");
        }
    }
}

/// The per-run README: command, machine, and a short table.
pub fn readme(v: &Value) -> String {
    let mut s = format!(
        "# {} run `{}`\n\nStarted {} on {} ({} cores, kernel {}), ringside {}.\n\n```sh\n{}\n```\n\n",
        v["scenario"].as_str().unwrap_or_default(),
        v["label"].as_str().unwrap_or_default(),
        v["started_utc"].as_str().unwrap_or_default(),
        v["machine"]["cpu_model"].as_str().unwrap_or_default(),
        v["machine"]["cores"],
        v["machine"]["kernel"].as_str().unwrap_or_default(),
        v["machine"]["ringside_rev"].as_str().unwrap_or_default(),
        v["command"].as_str().unwrap_or_default(),
    );
    if let Some(info) = v["server_config"].as_str() {
        s += &format!("Server: {info}\n\n");
    }
    s += "| metric | value |\n|---|---|\n";
    for (label, path) in [
        ("connections attempted / established / failed", "/connections/attempted"),
        ("alive at end", "/connections/alive_at_end"),
        ("messages sent / received / lost / mismatched", "/messages/sent"),
        ("messages per second", "/messages/per_second"),
        ("client CPU s (% of one core)", "/client/cpu_seconds"),
    ] {
        let val = match path {
            "/connections/attempted" => format!(
                "{} / {} / {}",
                v["connections"]["attempted"], v["connections"]["established"], v["connections"]["failed"]
            ),
            "/messages/sent" => format!(
                "{} / {} / {} / {}",
                v["messages"]["sent"], v["messages"]["received"], v["messages"]["lost"], v["messages"]["mismatched"]
            ),
            "/client/cpu_seconds" => {
                format!("{} ({}%)", v["client"]["cpu_seconds"], v["client"]["cpu_percent_of_one_core"])
            }
            _ => v.pointer(path).map(Value::to_string).unwrap_or_default(),
        };
        s += &format!("| {label} | {val} |\n");
    }
    if let Some(srv) = v.get("server") {
        let per_conn = match rss::from_summary(v) {
            Some(Ok(b)) => format!("{}", round3(b)),
            Some(Err(why)) => format!("n/a: {}", why.explain()),
            None => "-".into(),
        };
        s += &format!(
            "| server RSS before / held / after (bytes) | {} / {} / {} |\n| server RSS delta per connection (bytes) | {per_conn} |\n| server CPU s (% of one core) | {} ({}%) |\n| server fds before / held / after | {} / {} / {} |\n",
            srv["rss_bytes_before"], srv["rss_bytes_held"], srv["rss_bytes_after"],
            srv["cpu_seconds"], srv["cpu_percent_of_one_core"],
            srv["fds_before"], srv["fds_held"], srv["fds_after"]
        );
    }
    if let Some(f) = v["failures"].as_object() {
        let nz: Vec<String> =
            f.iter().filter(|(_, n)| n.as_u64() != Some(0)).map(|(k, n)| format!("{k} {n}")).collect();
        s += &format!("| failures | {} |\n", if nz.is_empty() { "none".into() } else { nz.join(", ") });
    }
    if v.get("storm").is_some() {
        s += &storm::readme_rows(v);
    }
    s += "\nLatency, microseconds (`_from_intended`: measured from the scheduled start, coordinated-omission corrected):\n\n";
    s += &latency_table(&v["latency_us"]);
    s += "\nChecks: ";
    s += &v["checks"].to_string();
    s += "\n\n![percentiles](percentiles.svg)\n";
    s
}

#[cfg(test)]
mod tests;
