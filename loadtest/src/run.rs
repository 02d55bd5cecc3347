//! The parent side of a run: spawn worker processes (this binary re-executed
//! with the hidden `__worker` subcommand), relay barriers, print progress every
//! second, sample the server and the harness's own CPU, merge the workers'
//! stats exactly and hand everything to the report writer.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::clock::mono_us;
use crate::net::{raise_nofile, Target};
use crate::params::{Params, Scenario, ScenarioArgs};
use crate::report::{self, RunMeta};
use crate::stats::{decode_hist, new_hist, Stats};
use crate::sysinfo::{self, ServerSample};
use crate::trigger::{Trigger, TriggerReport};
use crate::worker::{FromWorker, Go, Task};

/// Where run directories go without `--out`, relative to the working directory.
pub const DEFAULT_OUT: &str = "target/loadtest";

/// Flags about the run rather than the load.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOpts {
    /// Directory the run directory `<UTC date>-<scenario>-<label>/` is created in.
    /// The default is not committed (`/target` is git-ignored); name `results/...`
    /// explicitly to add a run to the repository's results.
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// Label in the run directory name. Default: the host part of the first URL.
    #[arg(long)]
    pub label: Option<String>,
    /// Server process to sample (/proc VmRSS, utime+stime, fd count) before, while
    /// held (at the phase barrier) and after the run.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Free-form description of the server's configuration, copied into the report.
    #[arg(long)]
    pub server_info: Option<String>,
    /// Seconds to wait after the workers finish before the final server sample
    /// (lets the server finish closing). Default 1.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
}

/// Server samples taken by the parent.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerSamples {
    /// Before any worker started.
    pub before: Option<ServerSample>,
    /// At the first barrier (all connections open), if the scenario has one.
    pub held: Option<ServerSample>,
    /// After the workers finished and `--settle` passed.
    pub after: Option<ServerSample>,
}

/// Lines from worker reader threads.
enum Event {
    Line(usize, FromWorker),
    Eof(usize),
}

/// Runs one scenario end to end; returns the process exit code.
pub fn main(scenario: Scenario, args: &ScenarioArgs, opts: &RunOpts) -> i32 {
    let nofile = raise_nofile();
    let params = Params::resolve(scenario, args);
    if let Err(e) = params.validate(nofile).and_then(|_| check_targets(&params)) {
        eprintln!("loadtest: {e}");
        return 2;
    }
    let sample = || opts.server_pid.and_then(sysinfo::sample_server);
    let mut server = ServerSamples { before: sample(), ..Default::default() };
    if opts.server_pid.is_some() && server.before.is_none() {
        eprintln!("loadtest: --server-pid: cannot read /proc/{}", opts.server_pid.unwrap_or(0));
        return 2;
    }
    let (cpu0, wall0, started_utc) = (sysinfo::own_cpu_seconds(), Instant::now(), crate::clock::utc_timestamp());
    // A storm's sampled node (where the subscribers go) holds nothing at the barrier:
    // no "held" sample, so no RSS-per-connection figure that would mean nothing.
    let hold_sample = params.scenario != Scenario::Storm;
    let (stats, crashed, storm) = match drive_workers(&params, || {
        if hold_sample {
            server.held = server.held.or_else(sample);
        }
    }) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return 2;
        }
    };
    std::thread::sleep(Duration::from_secs_f64(opts.settle.max(0.0)));
    server.after = sample();
    let meta = RunMeta {
        params,
        opts: opts.clone(),
        started_utc,
        wall_seconds: wall0.elapsed().as_secs_f64(),
        client_cpu_seconds: sysinfo::own_cpu_seconds() - cpu0,
        command: command_line(),
        machine: sysinfo::machine(),
        server,
        workers_crashed: crashed,
        storm,
    };
    match report::write_run(&meta, stats) {
        Ok(dir) => {
            eprintln!("loadtest: report in {}", dir.display());
            if crashed > 0 {
                1
            } else {
                0
            }
        }
        Err(e) => {
            eprintln!("loadtest: writing report: {e}");
            1
        }
    }
}

fn check_targets(p: &Params) -> Result<(), String> {
    p.urls.iter().try_for_each(|u| Target::parse(u).map(|_| ()))
}

/// Spawns the workers and runs the event loop; `on_barrier` runs once per barrier
/// before the go line is sent; a storm's trigger fires on its time. Returns merged
/// stats, the crashed-worker count and what the trigger did.
fn drive_workers(p: &Params, mut on_barrier: impl FnMut()) -> Result<(Stats, u64, Option<TriggerReport>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // Leave the workers time to start before the first scheduled connection.
    let start_us = mono_us() + 300_000;
    let trigger = if p.scenario == Scenario::Storm { Trigger::new(p, start_us) } else { None };
    let (tx, rx) = mpsc::channel();
    let mut children: Vec<Child> = Vec::new();
    let mut stdins: Vec<Option<ChildStdin>> = Vec::new();
    for index in 0..p.workers {
        let task = serde_json::to_string(&Task { params: p.clone(), index, start_us }).expect("task serializes");
        let mut child = Command::new(&exe)
            .args(["__worker", "--task", &task])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning worker {index}: {e}"))?;
        let out = child.stdout.take().expect("piped stdout");
        stdins.push(child.stdin.take());
        children.push(child);
        let tx = tx.clone();
        std::thread::spawn(move || read_worker(index, out, tx));
    }
    drop(tx);
    let mut lp = EventLoop::new(p, stdins, trigger);
    lp.run(&rx, &mut on_barrier);
    let mut crashed = 0;
    for (i, mut c) in children.into_iter().enumerate() {
        match c.wait() {
            Ok(s) if s.success() && lp.done[i] => {}
            other => {
                eprintln!("loadtest: worker {i} failed: {other:?}");
                crashed += 1;
            }
        }
    }
    let report = lp.trigger.take().map(Trigger::finish);
    let mut merged = lp.merged;
    merged.add("failures.worker_crashed", crashed);
    Ok((merged, crashed, report))
}

fn read_worker(index: usize, out: std::process::ChildStdout, tx: mpsc::Sender<Event>) {
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<FromWorker>(&line) {
            Ok(m) => {
                if tx.send(Event::Line(index, m)).is_err() {
                    return;
                }
            }
            Err(e) => eprintln!("loadtest: worker {index} wrote {line:?}: {e}"),
        }
    }
    let _ = tx.send(Event::Eof(index));
}

/// A worker's latest progress: open gauge, counters, headline histogram.
type Latest = (i64, BTreeMap<String, u64>, Option<Histogram<u64>>);

/// State of the parent's event loop.
struct EventLoop {
    scenario: Scenario,
    total_conns: u64,
    stdins: Vec<Option<ChildStdin>>,
    exited: Vec<bool>,
    done: Vec<bool>,
    at_barrier: Vec<bool>,
    latest: Vec<Latest>,
    merged: Stats,
    started: Instant,
    last_print: Instant,
    last_est: u64,
    last_recv: u64,
    trigger: Option<Trigger>,
}

impl EventLoop {
    fn new(p: &Params, stdins: Vec<Option<ChildStdin>>, trigger: Option<Trigger>) -> Self {
        let n = stdins.len();
        Self {
            scenario: p.scenario,
            total_conns: match p.scenario {
                Scenario::Churn => crate::schedule::Schedule::events_in(p.rate, p.duration),
                _ => p.total_sockets(),
            },
            stdins,
            exited: vec![false; n],
            done: vec![false; n],
            at_barrier: vec![false; n],
            latest: (0..n).map(|_| (0, BTreeMap::new(), None)).collect(),
            merged: Stats::default(),
            started: Instant::now(),
            last_print: Instant::now(),
            last_est: 0,
            last_recv: 0,
            trigger,
        }
    }

    fn run(&mut self, rx: &mpsc::Receiver<Event>, on_barrier: &mut impl FnMut()) {
        while self.exited.iter().any(|e| !e) {
            let mut wait = Duration::from_secs(1).saturating_sub(self.last_print.elapsed());
            if let Some(due) = self.trigger.as_ref().and_then(Trigger::due_us) {
                wait = wait.min(Duration::from_micros(due.saturating_sub(mono_us())));
            }
            match rx.recv_timeout(wait) {
                Ok(Event::Line(i, m)) => self.on_line(i, m),
                Ok(Event::Eof(i)) => {
                    self.exited[i] = true;
                    self.stdins[i] = None;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.maybe_release_barrier(on_barrier);
            if let Some(t) = self.trigger.as_mut().filter(|t| t.due_us().is_some_and(|d| d <= mono_us())) {
                t.fire();
            }
            if self.last_print.elapsed() >= Duration::from_secs(1) {
                self.print_progress();
            }
        }
    }

    fn on_line(&mut self, i: usize, m: FromWorker) {
        match m {
            FromWorker::Progress { open, counters, hist } => {
                let h = hist.and_then(|b| decode_hist(&b).ok());
                self.latest[i] = (open, counters, h);
            }
            FromWorker::Barrier { .. } => self.at_barrier[i] = true,
            FromWorker::Done { stats } => match Stats::from_wire(&stats) {
                Ok(s) => {
                    self.merged.merge(&s);
                    self.done[i] = true;
                }
                Err(e) => eprintln!("loadtest: worker {i} stats: {e}"),
            },
        }
    }

    /// Releases a barrier once every still-running worker has reached it.
    fn maybe_release_barrier(&mut self, on_barrier: &mut impl FnMut()) {
        let waiting = self.at_barrier.iter().filter(|b| **b).count();
        let all = (0..self.at_barrier.len()).all(|i| self.at_barrier[i] || self.exited[i]);
        if waiting == 0 || !all {
            return;
        }
        on_barrier();
        // A short lead so every worker sees the go line before the go time.
        let go_us = mono_us() + 200_000;
        if let Some(t) = self.trigger.as_mut() {
            t.arm(go_us);
        }
        let line = serde_json::to_string(&Go { go_us }).expect("go serializes");
        for (i, stdin) in self.stdins.iter_mut().enumerate() {
            if let (true, Some(s)) = (self.at_barrier[i], stdin.as_mut()) {
                let _ = writeln!(s, "{line}").and_then(|_| s.flush());
            }
        }
        self.at_barrier.iter_mut().for_each(|b| *b = false);
        eprintln!("loadtest: all workers at barrier; go");
    }

    fn print_progress(&mut self) {
        let dt = self.last_print.elapsed().as_secs_f64().max(0.001);
        self.last_print = Instant::now();
        let sum = |k: &str| self.latest.iter().map(|l| l.1.get(k).copied().unwrap_or(0)).sum::<u64>();
        let open: i64 = self.latest.iter().map(|l| l.0).sum();
        let (est, recv) = (sum("connections.established"), sum("messages.received"));
        let fails: u64 = self
            .latest
            .iter()
            .flat_map(|l| l.1.iter())
            .filter(|(k, _)| k.starts_with("failures."))
            .map(|(_, v)| v)
            .sum();
        let mut h = new_hist();
        for l in &self.latest {
            if let Some(x) = &l.2 {
                let _ = h.add(x);
            }
        }
        let p99 =
            if h.is_empty() { "-".to_string() } else { format!("{:.2}ms", h.value_at_quantile(0.99) as f64 / 1000.0) };
        eprintln!(
            "[{:>4}s] open {open} | est {est}/{} ({:.0}/s) | sent {} recv {recv} ({:.0}/s) | errors {fails} | p99 {} {p99}",
            self.started.elapsed().as_secs(),
            self.total_conns,
            (est - self.last_est.min(est)) as f64 / dt,
            sum("messages.sent"),
            (recv - self.last_recv.min(recv)) as f64 / dt,
            self.scenario.headline_hist(),
        );
        self.last_est = est;
        self.last_recv = recv;
    }
}

/// This process's command line, shell-quoted, to paste back into a terminal.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
