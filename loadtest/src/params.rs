//! Scenario flags, their per-scenario defaults, and validation.
//!
//! Every scenario subcommand takes the same flags; the ones a scenario does not
//! use are ignored (and `--help` says which). Defaults differ per scenario and
//! live in one place, [`Params::defaults`].

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// The six load shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Open N connections at R/s, hold, check alive, close.
    Connect,
    /// Echo round trips on N connections, closed loop or fixed rate.
    Echo,
    /// Rooms fan-out: subscribers join, publishers publish, deliveries are counted.
    Fanout,
    /// Connect/close cycles at R/s.
    Churn,
    /// Rooms with history: subscribers track offsets, reconnect (to another URL) with
    /// `since` after a drop, and every offset must arrive exactly once.
    Resume,
    /// Resume's subscribers all on the first URL while `--trigger` drains or upgrades
    /// that node: time until all are back, reconnect rate, the other node's handshakes.
    Storm,
}

/// What `--trigger` does to the subscribers' node, which decides the storm's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TriggerKind {
    /// A drain (SIGTERM): every subscriber must get a hint and end on another node.
    #[default]
    Drain,
    /// A zero-disconnect upgrade: no subscriber may see a close or reconnect.
    Upgrade,
}

impl Scenario {
    /// Lower-case name, used in directory names and summary.json.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Echo => "echo",
            Scenario::Fanout => "fanout",
            Scenario::Churn => "churn",
            Scenario::Resume => "resume",
            Scenario::Storm => "storm",
        }
    }

    /// The histogram the progress line shows p99 of.
    pub fn headline_hist(self) -> &'static str {
        match self {
            Scenario::Connect | Scenario::Churn => "upgrade_from_intended",
            Scenario::Echo => "rtt_from_intended",
            Scenario::Fanout | Scenario::Resume | Scenario::Storm => "delivery_from_intended",
        }
    }
}

/// Command-line flags shared by all scenario subcommands (`None` = scenario default).
#[derive(Debug, Clone, Default, Args)]
pub struct ScenarioArgs {
    /// Target WebSocket URL(s); repeat or comma-separate for several nodes (connections
    /// are spread round-robin). Default ws://127.0.0.1:8080/echo (fanout: /ws).
    #[arg(long, value_delimiter = ',')]
    pub url: Vec<String>,
    /// Connections (connect, echo), subscribers (fanout) or the cap on concurrent
    /// cycles (churn). Default connect 1000, echo 100, fanout 1000, churn 1000.
    #[arg(long)]
    pub conns: Option<u64>,
    /// Connection opening rate per second, all workers together (churn: cycles/s).
    /// Default 1000 (churn 500).
    #[arg(long)]
    pub rate: Option<f64>,
    /// connect: seconds to hold all connections after the last one opened. Default 5.
    #[arg(long)]
    pub hold: Option<f64>,
    /// Seconds of message traffic (echo, fanout) or of cycles (churn). Default 10.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Message size in bytes (echo payload; fanout padding in `data`). Default 64.
    #[arg(long)]
    pub size: Option<usize>,
    /// Worker processes (each under the per-process open-file limit). Default 2.
    #[arg(long)]
    pub workers: Option<usize>,
    /// echo: messages in flight per connection in closed loop. Default 1.
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// echo: fixed total messages/s (open loop; 0 = closed loop). fanout: publishes/s
    /// over all publishers. Default echo 0, fanout 20.
    #[arg(long)]
    pub msg_rate: Option<f64>,
    /// echo: send text frames instead of binary.
    #[arg(long)]
    pub text: bool,
    /// fanout: publisher connections. Default 1.
    #[arg(long)]
    pub publishers: Option<u64>,
    /// fanout: rooms; subscriber j joins room j mod rooms, publish k goes to room k mod rooms.
    /// Default 1.
    #[arg(long)]
    pub rooms: Option<u64>,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread connections over (0 = let the
    /// kernel choose). Only used when the target is on loopback. Default 8.
    #[arg(long)]
    pub sources: Option<u32>,
    /// Seconds before a connect, upgrade, join, pong or echo counts as `timeout`. Default 10.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// fanout, resume: seconds to keep listening after the last publish. Default 2.
    #[arg(long)]
    pub drain: Option<f64>,
    /// resume: seconds after the go time at which every even-numbered subscriber drops
    /// its connection (no close frame) and reconnects with `since`; 0 = never (drops
    /// then come only from the servers, e.g. a killed node). Default 0.
    #[arg(long)]
    pub drop_at: Option<f64>,
    /// resume: a subscriber whose connection dropped waits a uniform random time in
    /// [0, S] before its first reconnect attempt (then 200 ms doubling to 2 s, equal
    /// jitter), so a killed node's clients do not all return in the same millisecond.
    /// Default 1.
    #[arg(long)]
    pub reconnect_jitter: Option<f64>,
    /// storm: shell command (`sh -c`) the parent runs --trigger-at seconds after the go
    /// time, e.g. `kill -TERM <pid of node A>`; it should return at once (start a
    /// long-running process in the background). Required for storm.
    #[arg(long)]
    pub trigger: Option<String>,
    /// storm: seconds after the go time at which --trigger runs. Default 2.
    #[arg(long)]
    pub trigger_at: Option<f64>,
    /// storm: what the trigger does, which decides the checks: drain (everyone moves,
    /// each after a hint) or upgrade (no close, no reconnect). Default drain.
    #[arg(long, value_enum)]
    pub trigger_kind: Option<TriggerKind>,
    /// storm: Prometheus endpoint of the node the subscribers move to (http://host:port/path),
    /// scraped just before the trigger and after the run for its handshake histogram.
    /// Default none.
    #[arg(long)]
    pub metrics_url: Option<String>,
}

/// Fully resolved parameters of a run; what workers receive and summary.json records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Params {
    /// Which scenario.
    pub scenario: Scenario,
    /// Target URLs.
    pub urls: Vec<String>,
    /// See [`ScenarioArgs::conns`].
    pub conns: u64,
    /// See [`ScenarioArgs::rate`].
    pub rate: f64,
    /// See [`ScenarioArgs::hold`].
    pub hold: f64,
    /// See [`ScenarioArgs::duration`].
    pub duration: f64,
    /// See [`ScenarioArgs::size`].
    pub size: usize,
    /// See [`ScenarioArgs::workers`].
    pub workers: usize,
    /// See [`ScenarioArgs::in_flight`].
    pub in_flight: usize,
    /// See [`ScenarioArgs::msg_rate`].
    pub msg_rate: f64,
    /// See [`ScenarioArgs::text`].
    pub text: bool,
    /// See [`ScenarioArgs::publishers`].
    pub publishers: u64,
    /// See [`ScenarioArgs::rooms`].
    pub rooms: u64,
    /// See [`ScenarioArgs::sources`].
    pub sources: u32,
    /// See [`ScenarioArgs::timeout`].
    pub timeout: f64,
    /// See [`ScenarioArgs::drain`].
    pub drain: f64,
    /// See [`ScenarioArgs::drop_at`].
    #[serde(default)]
    pub drop_at: f64,
    /// See [`ScenarioArgs::reconnect_jitter`].
    #[serde(default)]
    pub reconnect_jitter: f64,
    /// See [`ScenarioArgs::trigger`] (empty = none).
    #[serde(default)]
    pub trigger: String,
    /// See [`ScenarioArgs::trigger_at`].
    #[serde(default)]
    pub trigger_at: f64,
    /// See [`ScenarioArgs::trigger_kind`].
    #[serde(default)]
    pub trigger_kind: TriggerKind,
    /// See [`ScenarioArgs::metrics_url`] (empty = none).
    #[serde(default)]
    pub metrics_url: String,
}

/// Sockets a worker may hold below the open-file limit (stdin/out/err, the runtime's
/// epoll and eventfd, and headroom for a few sockets in their closing handshake).
const FD_HEADROOM: u64 = 200;

impl Params {
    /// The defaults of `scenario`.
    pub fn defaults(scenario: Scenario) -> Params {
        let rooms = matches!(scenario, Scenario::Fanout | Scenario::Resume | Scenario::Storm);
        let path = if rooms { "ws" } else { "echo" };
        Params {
            scenario,
            urls: vec![format!("ws://127.0.0.1:8080/{path}")],
            conns: if scenario == Scenario::Echo { 100 } else { 1000 },
            rate: if scenario == Scenario::Churn { 500.0 } else { 1000.0 },
            hold: 5.0,
            duration: 10.0,
            size: 64,
            workers: 2,
            in_flight: 1,
            msg_rate: if rooms { 20.0 } else { 0.0 },
            text: false,
            publishers: 1,
            rooms: 1,
            sources: 8,
            timeout: 10.0,
            drain: 2.0,
            drop_at: 0.0,
            reconnect_jitter: 1.0,
            trigger: String::new(),
            trigger_at: 2.0,
            trigger_kind: TriggerKind::Drain,
            metrics_url: String::new(),
        }
    }

    /// Resolves command-line flags over the scenario defaults.
    pub fn resolve(scenario: Scenario, a: &ScenarioArgs) -> Params {
        let d = Params::defaults(scenario);
        Params {
            scenario,
            urls: if a.url.is_empty() { d.urls } else { a.url.clone() },
            conns: a.conns.unwrap_or(d.conns),
            rate: a.rate.unwrap_or(d.rate),
            hold: a.hold.unwrap_or(d.hold),
            duration: a.duration.unwrap_or(d.duration),
            size: a.size.unwrap_or(d.size),
            workers: a.workers.unwrap_or(d.workers),
            in_flight: a.in_flight.unwrap_or(d.in_flight),
            msg_rate: a.msg_rate.unwrap_or(d.msg_rate),
            text: a.text,
            publishers: a.publishers.unwrap_or(d.publishers),
            rooms: a.rooms.unwrap_or(d.rooms),
            sources: a.sources.unwrap_or(d.sources),
            timeout: a.timeout.unwrap_or(d.timeout),
            drain: a.drain.unwrap_or(d.drain),
            drop_at: a.drop_at.unwrap_or(d.drop_at),
            reconnect_jitter: a.reconnect_jitter.unwrap_or(d.reconnect_jitter),
            trigger: a.trigger.clone().unwrap_or(d.trigger),
            trigger_at: a.trigger_at.unwrap_or(d.trigger_at),
            trigger_kind: a.trigger_kind.unwrap_or(d.trigger_kind),
            metrics_url: a.metrics_url.clone().unwrap_or(d.metrics_url),
        }
    }

    /// Refuses nonsense, naming the flag; `nofile` is the per-process open-file limit.
    pub fn validate(&self, nofile: u64) -> Result<(), String> {
        let pos = |v: f64, k: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("--{k} must be a non-negative number, got {v}"))
            }
        };
        pos(self.rate, "rate")?;
        pos(self.hold, "hold")?;
        pos(self.duration, "duration")?;
        pos(self.msg_rate, "msg-rate")?;
        pos(self.drain, "drain")?;
        pos(self.drop_at, "drop-at")?;
        pos(self.reconnect_jitter, "reconnect-jitter")?;
        pos(self.trigger_at, "trigger-at")?;
        if self.scenario == Scenario::Storm {
            self.validate_storm()?;
        }
        if self.timeout <= 0.0 {
            return Err("--timeout must be > 0".into());
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(format!("--workers must be 1..=64, got {}", self.workers));
        }
        if self.urls.is_empty() {
            return Err("--url: at least one URL is needed".into());
        }
        if self.scenario == Scenario::Echo && self.in_flight == 0 {
            return Err("--in-flight must be >= 1".into());
        }
        if self.rooms_scenario() && (self.rooms == 0 || self.publishers == 0) {
            return Err("--rooms and --publishers must be >= 1".into());
        }
        if self.scenario == Scenario::Churn && self.rate <= 0.0 {
            return Err("--rate must be > 0 for churn".into());
        }
        let per_worker = self.sockets_per_worker();
        if per_worker + FD_HEADROOM > nofile {
            let need = (self.total_sockets()).div_ceil(nofile.saturating_sub(FD_HEADROOM).max(1));
            return Err(format!(
                "--workers {}: each worker would hold {per_worker} sockets but the open-file \
                 limit is {nofile} per process; use --workers {need} or more",
                self.workers
            ));
        }
        Ok(())
    }

    /// Storm needs a trigger inside the publishing window and a plain-HTTP metrics URL.
    fn validate_storm(&self) -> Result<(), String> {
        if self.trigger.trim().is_empty() {
            return Err("storm needs --trigger (the command that drains or upgrades the first --url)".into());
        }
        if self.trigger_at >= self.duration {
            return Err(format!(
                "--trigger-at {} must be below --duration {}: the storm is measured while publishers publish",
                self.trigger_at, self.duration
            ));
        }
        if !self.metrics_url.is_empty() && !self.metrics_url.starts_with("http://") {
            return Err(format!("--metrics-url {}: only http:// URLs are supported", self.metrics_url));
        }
        if self.trigger_kind == TriggerKind::Drain && self.urls.len() < 2 {
            return Err("storm --trigger-kind drain needs two --url: the drained node first, the other last".into());
        }
        Ok(())
    }

    /// Whether the scenario is one of the rooms scenarios (subscribers and publishers on /ws).
    pub fn rooms_scenario(&self) -> bool {
        matches!(self.scenario, Scenario::Fanout | Scenario::Resume | Scenario::Storm)
    }

    /// Sockets the whole run holds at once, at most.
    pub fn total_sockets(&self) -> u64 {
        if self.rooms_scenario() {
            self.conns + self.publishers
        } else {
            self.conns
        }
    }

    /// Sockets the busiest worker holds at once, at most.
    pub fn sockets_per_worker(&self) -> u64 {
        let w = self.workers as u64;
        if self.rooms_scenario() {
            self.conns.div_ceil(w) + self.publishers.div_ceil(w)
        } else {
            self.conns.div_ceil(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_scenario_and_overrides() {
        let p = Params::resolve(Scenario::Fanout, &ScenarioArgs::default());
        assert_eq!(p.urls, vec!["ws://127.0.0.1:8080/ws".to_string()]);
        assert_eq!(p.msg_rate, 20.0);
        let a = ScenarioArgs { conns: Some(5), url: vec!["ws://127.0.0.1:1/x".into()], ..Default::default() };
        let e = Params::resolve(Scenario::Echo, &a);
        assert_eq!((e.conns, e.in_flight, e.size), (5, 1, 64));
    }

    #[test]
    fn validate_names_the_flag_and_enforces_fd_limit() {
        let mut p = Params::defaults(Scenario::Connect);
        assert!(p.validate(20_000).is_ok());
        p.conns = 19_900;
        p.workers = 1;
        let e = p.validate(20_000).unwrap_err();
        assert!(e.contains("--workers 2 or more"), "{e}");
        p.workers = 2;
        assert!(p.validate(20_000).is_ok());
        p.rate = -1.0;
        assert!(p.validate(20_000).unwrap_err().contains("--rate"));
    }

    #[test]
    fn storm_needs_a_trigger_inside_the_run_and_two_urls_to_drain() {
        let mut p = Params::defaults(Scenario::Storm);
        assert!(p.validate(20_000).unwrap_err().contains("--trigger"));
        p.trigger = "true".into();
        assert!(p.validate(20_000).unwrap_err().contains("two --url"));
        p.trigger_kind = TriggerKind::Upgrade;
        assert!(p.validate(20_000).is_ok());
        p.trigger_at = p.duration;
        assert!(p.validate(20_000).unwrap_err().contains("--trigger-at"));
        p.trigger_at = 1.0;
        p.metrics_url = "https://x/metrics".into();
        assert!(p.validate(20_000).unwrap_err().contains("--metrics-url"));
    }
}
