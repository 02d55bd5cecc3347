//! The `ringside` binary: parse flags, load configuration, run the node
//! until SIGTERM/SIGINT, drain, exit 0.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ringside::{Config, Node};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// io_uring thread-per-core WebSocket edge node.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see tuning/config/ for examples).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Listen address (server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Number of shards, 0 = one per core (server.shards).
    #[arg(long)]
    shards: Option<String>,
    /// Node id (server.node_id).
    #[arg(long)]
    node_id: Option<String>,
    /// Redis URL for cluster mode (cluster.redis_url).
    #[arg(long)]
    redis: Option<String>,
    /// io driver: auto, io_uring or epoll (server.driver).
    #[arg(long)]
    driver: Option<String>,
    /// Any setting as section.key=value (repeatable), e.g. --set websocket.max_message_bytes=1048576.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Validate the configuration, print it, and exit (non-zero and the offending key on error).
    #[arg(long)]
    check_config: bool,
}

fn load(args: &Args) -> Result<Config, ringside::error::ConfigError> {
    let mut config = Config::load(args.config.as_deref(), std::env::vars())?;
    let flags = [
        ("server.listen", &args.listen),
        ("server.shards", &args.shards),
        ("server.node_id", &args.node_id),
        ("cluster.redis_url", &args.redis),
        ("server.driver", &args.driver),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            config.set(key, v)?;
        }
    }
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ringside::error::ConfigError::new(kv, "expected --set section.key=value"))?;
        config.set(k, v)?;
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringside: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        eprintln!("ringside: configuration OK");
        return ExitCode::SUCCESS;
    }
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringside: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = match Node::start(config) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("ringside: failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(sig) = signals.forever().next() {
        eprintln!("ringside: signal {sig}: draining");
    }
    node.shutdown();
    eprintln!("ringside: stopped");
    ExitCode::SUCCESS
}
