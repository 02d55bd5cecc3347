//! The worker side: one process, one current-thread tokio runtime, a share of
//! the connections. It talks to the parent with JSON lines: progress, barriers
//! and the final stats on stdout; "go" replies on stdin.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::net::{raise_nofile, Target};
use crate::params::Params;
use crate::stats::{encode_hist, Stats, WireStats};

/// What the parent hands a worker (as JSON in `--task`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Task {
    /// The run's parameters.
    pub params: Params,
    /// This worker's index, `0..params.workers`.
    pub index: usize,
    /// Monotonic start of the run's schedule, microseconds.
    pub start_us: u64,
}

/// A line from a worker to the parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FromWorker {
    /// Once a second: the open-connection gauge, counters, and the headline histogram.
    Progress {
        /// Connections open now.
        open: i64,
        /// Counters so far.
        counters: BTreeMap<String, u64>,
        /// The headline histogram so far (base64 V2), if any value was recorded.
        hist: Option<String>,
    },
    /// The worker reached a phase boundary and waits for a [`Go`] line.
    Barrier {
        /// Phase name (`held`, `subscribed`, `connected`).
        name: String,
    },
    /// Final stats; the last line a worker writes.
    Done {
        /// Everything measured.
        stats: WireStats,
    },
}

/// The parent's answer to a barrier.
#[derive(Debug, Serialize, Deserialize)]
pub struct Go {
    /// Monotonic time at which the next phase starts, microseconds.
    pub go_us: u64,
}

/// Shared state of a running worker (single-threaded: `Rc`/`RefCell`).
pub struct Ctx {
    /// The task.
    pub task: Task,
    /// Resolved targets, in `--url` order.
    pub targets: Vec<Target>,
    /// Counters and histograms.
    pub stats: RefCell<Stats>,
    /// Open-connection gauge.
    pub open: Cell<i64>,
    go_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Go>>,
}

/// Shared handle to the worker context.
pub type CtxRef = Rc<Ctx>;

impl Ctx {
    /// Shortcut to the parameters.
    pub fn p(&self) -> &Params {
        &self.task.params
    }

    /// The configured timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.p().timeout)
    }

    /// Tells the parent this worker reached `name` and waits for its go time.
    pub async fn barrier(&self, name: &str) -> u64 {
        emit(&FromWorker::Barrier { name: name.into() });
        let mut rx = self.go_rx.lock().await;
        match rx.recv().await {
            Some(go) => go.go_us,
            None => {
                eprintln!("loadtest worker {}: parent went away", self.task.index);
                std::process::exit(3);
            }
        }
    }

    /// Emits one progress line.
    fn progress(&self) {
        let st = self.stats.borrow();
        let hist = st.hists.get(self.p().scenario.headline_hist()).map(encode_hist);
        emit(&FromWorker::Progress { open: self.open.get(), counters: st.counters.clone(), hist });
    }
}

/// Writes one JSON line to stdout and flushes it.
pub fn emit(msg: &FromWorker) {
    let line = serde_json::to_string(msg).expect("worker messages serialize");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of the hidden `__worker` subcommand.
pub fn main(task_json: &str) -> i32 {
    raise_nofile();
    let task: Task = match serde_json::from_str(task_json) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadtest worker: bad --task: {e}");
            return 2;
        }
    };
    let targets = match task.params.urls.iter().map(|u| Target::parse(u)).collect() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("loadtest worker: {e}");
            return 2;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || read_go_lines(tx));
    let ctx = Rc::new(Ctx {
        task,
        targets,
        stats: RefCell::new(Stats::default()),
        open: Cell::new(0),
        go_rx: tokio::sync::Mutex::new(rx),
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let ticker = tokio::task::spawn_local(progress_ticker(ctx.clone()));
        crate::scenario::run(ctx.clone()).await;
        ticker.abort();
    });
    ctx.progress();
    emit(&FromWorker::Done { stats: ctx.stats.borrow().to_wire() });
    0
}

async fn progress_ticker(ctx: CtxRef) {
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    iv.tick().await;
    loop {
        iv.tick().await;
        ctx.progress();
    }
}

fn read_go_lines(tx: mpsc::UnboundedSender<Go>) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Go>(&line) {
            Ok(go) => {
                if tx.send(go).is_err() {
                    break;
                }
            }
            Err(e) => eprintln!("loadtest worker: bad go line {line:?}: {e}"),
        }
    }
}
