//! Report tests: the summary key set, files written, index rebuild, the
//! per-connection RSS figure (never a negative number), the quantile cut-off
//! of the per-run table, and redrawing committed runs.

use super::*;
use crate::params::Params;
use crate::sysinfo::ServerSample;

fn meta(dir: &Path, scenario: Scenario) -> RunMeta {
    RunMeta {
        params: Params::defaults(scenario),
        opts: RunOpts {
            out: dir.to_path_buf(),
            label: None,
            server_pid: Some(1),
            server_info: Some("shards=2".into()),
            settle: 0.0,
        },
        started_utc: "2026-01-01T00:00:00Z".into(),
        wall_seconds: 10.0,
        client_cpu_seconds: 2.0,
        command: "loadtest connect".into(),
        machine: crate::sysinfo::machine(),
        server: ServerSamples {
            before: Some(ServerSample { rss_bytes: 1000, cpu_seconds: 1.0, fds: 5 }),
            held: Some(ServerSample { rss_bytes: 10_001_000, cpu_seconds: 1.5, fds: 15 }),
            after: Some(ServerSample { rss_bytes: 2000, cpu_seconds: 3.0, fds: 5 }),
        },
        workers_crashed: 0,
        storm: None,
    }
}

fn stats() -> Stats {
    let mut s = Stats::default();
    for (k, v) in [
        ("connections.attempted", 10),
        ("connections.established", 10),
        ("connections.alive_at_end", 10),
        ("connections.closed_clean", 10),
        ("messages.sent", 40),
        ("messages.received", 60),
        ("fanout.room.0.subs", 3),
        ("fanout.room.0.sent", 20),
        ("fanout.room.1.subs", 0),
        ("fanout.room.1.sent", 20),
        ("failures.timeout", 2),
    ] {
        s.add(k, v);
    }
    for us in 100..200 {
        s.record_pair("upgrade", us, us + 50);
    }
    s
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loadtest-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn summary_has_the_required_keys() {
    let v = summarize(&meta(Path::new("/tmp"), Scenario::Connect), &stats());
    for k in ["attempted", "established", "failed", "alive_at_end"] {
        assert!(v["connections"][k].is_u64(), "connections.{k}");
    }
    for h in HIST_NAMES {
        for q in ["p50", "p90", "p99", "p999", "max", "count"] {
            assert!(v["latency_us"][h][q].is_u64(), "latency_us.{h}.{q}");
        }
    }
    for k in ["sent", "received", "lost", "mismatched"] {
        assert!(v["messages"][k].is_u64(), "messages.{k}");
    }
    assert!(v["messages"]["per_second"].is_number());
    for k in ["rss_bytes_before", "rss_bytes_after"] {
        assert!(v["server"][k].is_u64(), "server.{k}");
    }
    assert_eq!(v["server"]["cpu_seconds"], json!(2.0));
    assert_eq!(v["server"]["rss_delta_per_connection_bytes"], json!(1_000_000.0));
    assert_eq!(v["server"]["rss_delta_bytes"], json!(10_000_000));
    assert!(v["server"]["rss_per_connection_note"].is_null());
    for r in FAILURE_REASONS {
        assert!(v["failures"][r].is_u64(), "failures.{r}");
    }
    assert_eq!(v["failures"]["timeout"], json!(2));
    assert!(v["client"]["cpu_seconds"].is_number());
    assert_eq!(v["latency_us"]["upgrade_from_intended"]["count"], json!(100));
    for k in ["scenario", "parameters", "target", "machine", "server_config"] {
        assert!(!v[k].is_null(), "{k}");
    }
    assert_eq!(v["checks"]["no_failures"], json!(false));
}

#[test]
fn fanout_expected_is_subs_times_sent_per_room() {
    let v = summarize(&meta(Path::new("/tmp"), Scenario::Fanout), &stats());
    // Default fanout has 1 room: 3 subs x 20 sent.
    assert_eq!(v["messages"]["expected"], json!(60));
    assert_eq!(v["messages"]["lost"], json!(0));
    let mut p2 = meta(Path::new("/tmp"), Scenario::Fanout);
    p2.params.rooms = 2;
    assert_eq!(fanout_expected(&stats(), 2), 60);
}

#[test]
fn writes_run_files_and_index() {
    let dir = tmpdir("report");
    let m = meta(&dir, Scenario::Connect);
    let d1 = write_run(&m, stats()).unwrap();
    let d2 = write_run(&m, stats()).unwrap();
    assert_ne!(d1, d2, "a second run must not overwrite the first");
    let name = d1.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.ends_with("-connect-127.0.0.1"), "{name}");
    for f in ["summary.json", "README.md", "percentiles.svg", "upgrade.hgrm", "upgrade_from_intended.hgrm"] {
        assert!(d1.join(f).is_file(), "{f}");
    }
    assert!(!d1.join("rtt.hgrm").exists(), "empty histograms get no file");
    let readme = std::fs::read_to_string(d1.join("README.md")).unwrap();
    assert!(readme.contains("loadtest connect") && readme.contains("| upgrade |"));
    let back: Value = serde_json::from_str(&std::fs::read_to_string(d1.join("summary.json")).unwrap()).unwrap();
    assert_eq!(back["connections"]["established"], json!(10));
    assert_eq!(index::rebuild(&dir).unwrap(), 2);
    let idx = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(idx.contains(&name) && idx.contains("upgrade p99 0.25 ms"), "{idx}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn falling_rss_is_recorded_raw_but_gives_no_per_connection_figure() {
    let mut m = meta(Path::new("/tmp"), Scenario::Connect);
    // The server's RSS went down between the baseline and the held sample.
    m.server.before = Some(ServerSample { rss_bytes: 51_605_504, cpu_seconds: 1.0, fds: 15 });
    m.server.held = Some(ServerSample { rss_bytes: 42_852_352, cpu_seconds: 1.5, fds: 5015 });
    let v = summarize(&m, &stats());
    assert_eq!(v["server"]["rss_bytes_before"], json!(51_605_504));
    assert_eq!(v["server"]["rss_bytes_held"], json!(42_852_352));
    assert_eq!(v["server"]["rss_delta_bytes"], json!(42_852_352 - 51_605_504));
    assert!(v["server"]["rss_delta_per_connection_bytes"].is_null());
    assert_eq!(v["server"]["rss_per_connection_note"], json!("rss_fell"));
    let r = readme(&v);
    assert!(r.contains("| server RSS delta per connection (bytes) | n/a: RSS fell"), "{r}");
    // Too little growth to tell: 10 connections, 10 kB.
    m.server.held = Some(ServerSample { rss_bytes: 51_615_504, cpu_seconds: 1.5, fds: 25 });
    let v = summarize(&m, &stats());
    assert!(v["server"]["rss_delta_per_connection_bytes"].is_null());
    assert_eq!(v["server"]["rss_per_connection_note"], json!("below_noise"));
}

#[test]
fn index_never_prints_a_negative_rss_figure() {
    let dir = tmpdir("index-rss");
    // A summary as older harness versions wrote it: a negative derived figure.
    let old = json!({
        "scenario": "connect",
        "connections": {"attempted": 5000, "established": 5000, "alive_at_end": 5000},
        "latency_us": {"upgrade_from_intended": {"p99": 4055, "count": 5000}},
        "client": {"cpu_percent_of_one_core": 10.957},
        "server": {"rss_bytes_before": 51_605_504u64, "rss_bytes_held": 42_852_352u64,
                   "rss_delta_per_connection_bytes": -1750.63, "cpu_percent_of_one_core": 9.79},
        "checks": {"all_established": true},
    });
    let mut fresh = old.clone();
    fresh["server"]["rss_bytes_held"] = json!(51_605_504u64 + 6_360_000);
    let mut churn = old.clone();
    churn["scenario"] = json!("churn");
    churn["server"]["rss_bytes_held"] = Value::Null;
    let mut unsampled = old.clone();
    unsampled.as_object_mut().unwrap().remove("server");
    for (name, v) in [("a-old", &old), ("b-fresh", &fresh), ("c-churn", &churn), ("d-none", &unsampled)] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("summary.json"), v.to_string()).unwrap();
    }
    assert_eq!(index::rebuild(&dir).unwrap(), 4);
    let idx = std::fs::read_to_string(dir.join("README.md")).unwrap();
    let rows: Vec<&str> = idx.lines().filter(|l| l.starts_with("| [")).collect();
    let rss_col = |row: &str| row.split(" | ").nth(5).unwrap().to_string();
    assert_eq!(rows.iter().map(|r| rss_col(r)).collect::<Vec<_>>(), ["n/a (fell)", "1272 B", "n/a (no hold)", "-"]);
    assert!(!idx.contains("-1751") && !idx.contains("| -1"), "{idx}");
    assert!(idx.contains("- n/a (fell): RSS fell between the baseline and the held sample"), "{idx}");
    assert!(idx.contains("- n/a (no hold): "), "{idx}");
    assert!(!idx.contains("- n/a (noise): "), "only the footnotes used: {idx}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn latency_table_stops_at_what_the_sample_count_resolves() {
    let lat = json!({
        "rtt": {"count": 2_000_000, "p50": 300, "p90": 2400, "p99": 7500, "p999": 11000, "max": 17855},
        "ping": {"count": 500, "p50": 100, "p90": 120, "p99": 150, "p999": 170, "max": 171},
        "few": {"count": 50, "p50": 10, "p90": 12, "p99": 13, "p999": 13, "max": 13},
        "empty": {"count": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0},
    });
    let t = latency_table(&lat);
    assert!(t.contains("| rtt | 2000000 | 300 | 2400 | 7500 | 11000 | 17855 |"), "{t}");
    // 500 samples: p99 (5 beyond) is shown, p99.9 (half a sample beyond) is not.
    assert!(t.contains("| ping | 500 | 100 | 120 | 150 | - | 171 |"), "{t}");
    assert!(t.contains("| few | 50 | 10 | 12 | - | - | 13 |"), "{t}");
    assert!(!t.contains("| empty |"));
    assert!(t.contains("`-`: not resolved by the sample count"));
    let full = latency_table(&json!({"rtt": lat["rtt"].clone()}));
    assert!(!full.contains("not resolved"), "no footnote when nothing is cut");
}

#[test]
fn replot_redraws_from_committed_files_and_keeps_hand_written_text() {
    let dir = tmpdir("replot");
    let m = meta(&dir, Scenario::Connect);
    let run = write_run(&m, stats()).unwrap();
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    let hgrm = std::fs::read_to_string(run.join("upgrade.hgrm")).unwrap();
    let svg = std::fs::read_to_string(run.join("percentiles.svg")).unwrap();
    let readme = std::fs::read_to_string(run.join("README.md")).unwrap();
    std::fs::write(run.join("README.md"), format!("{readme}\n## How this run differs\n\nBy hand.\n")).unwrap();
    std::fs::write(run.join("percentiles.svg"), "stale").unwrap();
    assert_eq!(replot(&dir).unwrap(), 1);
    // The plot drawn from the .hgrm files is the one drawn from the histograms.
    assert_eq!(std::fs::read_to_string(run.join("percentiles.svg")).unwrap(), svg);
    let again = std::fs::read_to_string(run.join("README.md")).unwrap();
    assert_eq!(again, format!("{readme}\n## How this run differs\n\nBy hand.\n"));
    assert_eq!(std::fs::read_to_string(run.join("summary.json")).unwrap(), summary);
    assert_eq!(std::fs::read_to_string(run.join("upgrade.hgrm")).unwrap(), hgrm);
    // Idempotent.
    replot(&dir).unwrap();
    assert_eq!(std::fs::read_to_string(run.join("README.md")).unwrap(), again);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A storm run's counters: `subs` subscribers in one room, each dropped `per_sub` times.
fn storm_stats(subs: u64, hints: u64, moved: u64) -> Stats {
    let mut s = Stats::default();
    for (k, v) in [
        ("connections.attempted", subs + 1),
        ("connections.established", subs + 1),
        ("connections.closed_clean", subs + 1),
        ("messages.sent", 10),
        ("messages.received", subs * 10),
        ("fanout.room.0.subs", subs),
        ("fanout.room.0.sent", 10),
        ("recovery.hints", hints),
        ("recovery.drops", hints),
        ("recovery.rejoined", hints),
        ("recovery.ended_elsewhere", moved),
        ("recovery.reconnected_100ms.60", hints),
    ] {
        s.add(k, v);
    }
    if hints > 0 {
        s.min("first_drop_us", 5_000_000);
        s.max("last_back_us", 6_000_000);
    }
    s
}

fn storm_meta(dir: &Path, kind: crate::params::TriggerKind) -> RunMeta {
    let mut m = meta(dir, Scenario::Storm);
    m.params.rooms = 1;
    m.params.trigger_kind = kind;
    m.storm = Some(crate::trigger::TriggerReport {
        command: "true".into(),
        at_s: 1.0,
        start_mono_us: 0,
        go_mono_us: Some(4_000_000),
        fired_mono_us: Some(5_000_000),
        exit_code: Some(0),
        ..Default::default()
    });
    m
}

#[test]
fn storm_checks_follow_the_trigger_kind() {
    use crate::params::TriggerKind;
    let d = tmpdir("storm");
    let drain = summarize(&storm_meta(&d, TriggerKind::Drain), &storm_stats(4, 4, 4));
    assert_eq!(drain["storm"]["all_back_after_trigger_ms"], json!(1000.0));
    assert_eq!(drain["storm"]["peak_reconnects_per_second"], json!(4));
    assert_eq!(drain["storm"]["reconnects_per_100ms"], json!([[1000.0, 4]]), "slot 60 = 6 s, 1 s after the trigger");
    for c in ["trigger_ran", "all_moved", "every_close_hinted", "all_rejoined", "nothing_lost"] {
        assert_eq!(drain["checks"][c], json!(true), "{c}");
    }
    let stayed = summarize(&storm_meta(&d, TriggerKind::Drain), &storm_stats(4, 4, 3));
    assert_eq!(stayed["checks"]["all_moved"], json!(false));
    let up = summarize(&storm_meta(&d, TriggerKind::Upgrade), &storm_stats(4, 0, 0));
    assert_eq!((up["checks"]["no_closes"].clone(), up["checks"]["no_reconnects"].clone()), (json!(true), json!(true)));
    assert!(up["storm"]["all_back_after_trigger_ms"].is_null());
    let closed = summarize(&storm_meta(&d, TriggerKind::Upgrade), &storm_stats(4, 1, 0));
    assert_eq!(closed["checks"]["no_closes"], json!(false));
    assert_eq!(closed["checks"]["no_reconnects"], json!(false));
}
