//! `loadtest`: ringside's load-test harness.
//!
//! Six scenarios (`connect`, `echo`, `fanout`, `churn`, `resume`, `storm`) run open-loop on a
//! schedule in W worker processes (this binary re-executed as `__worker`), whose
//! HDR histograms and counters are merged exactly into one report directory
//! (`summary.json`, `.hgrm` files, `percentiles.svg`, `README.md`).
//! Reports go to `target/loadtest/` unless `--out` says otherwise (the committed
//! `results/` directory is written only when asked for by name).
//! `loadtest index results/` rebuilds `results/README.md` from every summary;
//! `loadtest replot results/` redraws the runs' plots and READMEs.

mod clock;
mod fake_rooms;
mod net;
mod params;
mod report;
mod run;
mod scenario;
mod schedule;
mod stats;
mod sysinfo;
mod trigger;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use params::{Scenario, ScenarioArgs};
use run::RunOpts;

/// Command line of the harness.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about = "Load-test harness for ringside (and any WebSocket echo server)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open --conns connections at --rate/s, hold them --hold s, check each answers a
    /// ping, close cleanly. Records connect and upgrade time.
    Connect(ScenarioCmd),
    /// --conns connections echo --size-byte messages for --duration s, --in-flight per
    /// connection (closed loop) or --msg-rate in total (open loop); checks every byte.
    Echo(ScenarioCmd),
    /// --conns subscribers join --rooms rooms on /ws; --publishers publish --msg-rate/s;
    /// counts expected, received, lost, duplicated, reordered; records delivery latency.
    Fanout(ScenarioCmd),
    /// Connect/upgrade/close cycles at --rate/s for --duration s.
    Churn(ScenarioCmd),
    /// Fanout in rooms with history (lt-hist-<r>): subscribers track offsets and, when
    /// a connection drops, reconnect (next --url first) and re-join with `since`;
    /// checks every offset arrived exactly once; records recovery time.
    Resume(ScenarioCmd),
    /// Resume's subscribers all on the first --url (node A), publishers on the last (B);
    /// --trigger (SIGTERM to A, or an upgrade) runs --trigger-at s after the go. Reports
    /// time until all are back, peak reconnects per 100 ms and per second, closes, lost
    /// and duplicated messages, and B's handshake p50/p99 from --metrics-url.
    Storm(ScenarioCmd),
    /// Rebuild DIR/README.md from every summary.json below DIR.
    Index {
        /// Results directory.
        #[arg(default_value = "results")]
        dir: PathBuf,
    },
    /// Redraw percentiles.svg and rewrite README.md of every run below DIR from its
    /// summary.json and .hgrm files (both left as they are; hand-written text after
    /// the generated part of a README is kept).
    Replot {
        /// Results directory (or one run directory).
        dir: PathBuf,
    },
    /// Internal: one worker process of a run.
    #[command(name = "__worker", hide = true)]
    Worker {
        /// The task as JSON.
        #[arg(long)]
        task: String,
    },
    /// Internal: a minimal in-memory rooms server speaking ringside's /ws protocol,
    /// for tests of the fanout scenario without a ringside build.
    #[command(name = "__fake-rooms", hide = true)]
    FakeRooms {
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
}

/// Flags of a scenario subcommand.
#[derive(Debug, clap::Args)]
struct ScenarioCmd {
    #[command(flatten)]
    load: ScenarioArgs,
    #[command(flatten)]
    run: RunOpts,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Connect(c) => run::main(Scenario::Connect, &c.load, &c.run),
        Cmd::Echo(c) => run::main(Scenario::Echo, &c.load, &c.run),
        Cmd::Fanout(c) => run::main(Scenario::Fanout, &c.load, &c.run),
        Cmd::Churn(c) => run::main(Scenario::Churn, &c.load, &c.run),
        Cmd::Resume(c) => run::main(Scenario::Resume, &c.load, &c.run),
        Cmd::Storm(c) => run::main(Scenario::Storm, &c.load, &c.run),
        Cmd::Index { dir } => match report::index::rebuild(&dir) {
            Ok(n) => {
                eprintln!("loadtest: indexed {n} runs in {}", dir.join("README.md").display());
                0
            }
            Err(e) => {
                eprintln!("loadtest index: {e}");
                1
            }
        },
        Cmd::Replot { dir } => match report::replot(&dir) {
            Ok(n) => {
                eprintln!("loadtest: redrew {n} runs below {}", dir.display());
                0
            }
            Err(e) => {
                eprintln!("loadtest replot: {e}");
                1
            }
        },
        Cmd::Worker { task } => worker::main(&task),
        Cmd::FakeRooms { listen } => fake_rooms::main(&listen),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_of(args: &[&str]) -> PathBuf {
        match Cli::try_parse_from(args).unwrap().cmd {
            Cmd::Connect(c) | Cmd::Echo(c) | Cmd::Fanout(c) | Cmd::Churn(c) | Cmd::Resume(c) | Cmd::Storm(c) => {
                c.run.out
            }
            other => panic!("not a scenario: {other:?}"),
        }
    }

    #[test]
    fn reports_default_outside_the_committed_results() {
        for scen in ["connect", "echo", "fanout", "churn", "resume", "storm"] {
            let out = out_of(&["loadtest", scen]);
            assert_eq!(out, PathBuf::from(run::DEFAULT_OUT));
            assert!(out.starts_with("target"), "git-ignored by the root .gitignore's /target");
            assert!(!out.starts_with("results"));
        }
        // Writing into results/ still works when asked for by name.
        assert_eq!(out_of(&["loadtest", "echo", "--out", "results/x"]), PathBuf::from("results/x"));
    }
}
