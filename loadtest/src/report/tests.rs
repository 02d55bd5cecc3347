//! Report tests: the summary key set, files written, index rebuild.

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
            held: Some(ServerSample { rss_bytes: 11_000, cpu_seconds: 1.5, fds: 15 }),
            after: Some(ServerSample { rss_bytes: 2000, cpu_seconds: 3.0, fds: 5 }),
        },
        workers_crashed: 0,
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
    assert_eq!(v["server"]["rss_delta_per_connection_bytes"], json!(1000.0));
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
