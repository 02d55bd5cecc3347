//! The `ringside` binary: parse flags, load configuration, set up logging,
//! run the node until SIGTERM/SIGINT, drain, exit 0.
//!
//! Exit codes: 0 after a drain (or a good `--check-config`), 1 when the node
//! cannot start (address in use, a shard that failed to start), 2 for a bad
//! configuration. A panic anywhere aborts the whole process (see
//! [`abort_on_panic`]): a node never keeps serving with a dead shard.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ringside::config::ConfigError;
use ringside::{Config, Node};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// `2026-12-01T10:00:00.000Z  INFO ringside::node: message key=value`
    Text,
    /// One JSON object per line.
    Json,
}

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
    /// Take over a running node's listeners and open WebSockets through its
    /// `server.upgrade_socket` (zero-disconnect upgrade; same settings).
    #[arg(long, value_name = "PATH")]
    upgrade_from: Option<std::path::PathBuf>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax; RINGSIDE_LOG overrides), e.g. `info` or `ringside=debug`.
    #[arg(long, default_value = "info")]
    log: String,
}

fn load(args: &Args) -> Result<Config, ConfigError> {
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
        let (k, v) = kv.split_once('=').ok_or_else(|| ConfigError::new(kv, "expected --set section.key=value"))?;
        config.set(k, v)?;
    }
    config.validate()?;
    ringside::node::check(&config)?;
    Ok(config)
}

/// Logs go to stderr through tracing; a write that fails (a closed pipe, a
/// full disk) is dropped by the subscriber and never stops the node. Rust
/// ignores SIGPIPE, so a closed stderr is an error return, not a signal.
/// `log_internal_errors(false)`: otherwise the subscriber reports a failed
/// write with `eprintln!`, which panics on that same closed stderr (and the
/// panic aborts the node): tests/ops.rs, `ringside 2>&1 | head -1`.
fn init_logging(args: &Args) {
    let filter = std::env::var("RINGSIDE_LOG").unwrap_or_else(|_| args.log.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .log_internal_errors(false);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A panic on any thread is logged and aborts the process. Shards share
/// nothing but mailboxes, so a shard that died would leave its connections,
/// its directory entries and its listener's share of new connections dead
/// while `/ready` kept answering 200; aborting lets the supervisor
/// (systemd's `Restart=on-failure` in tuning/systemd) start a clean node.
fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        let text = info.to_string().replace('\n', " ");
        tracing::error!(thread = %thread, "panic: {text}; aborting the process");
        default(info);
        std::process::abort();
    }));
}

fn main() -> ExitCode {
    // First, so that a SIGTERM at any moment after exec is a drain, never
    // the default action (exit 143 without a word).
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]);
    let args = Args::parse();
    // mimalloc purges freed pages only while their thread allocates; a
    // shard whose readers retired may then stay quiet (runtime/idle.rs).
    // SAFETY: mi_collect only walks the calling thread's own heap.
    ringside::runtime::set_heap_collect(|| unsafe { libmimalloc_sys::mi_collect(false) });
    init_logging(&args);
    abort_on_panic();
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        let _ = std::io::stdout().write_all(config.to_toml().as_bytes());
        tracing::info!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ringside starting");
    if !config.server.transparent_huge_pages {
        // SAFETY: prctl with integer arguments; affects only this process
        // (and its future children), not the machine.
        if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot turn transparent huge pages off");
        }
    }
    let inherited = match &args.upgrade_from {
        None => None,
        Some(path) => {
            let shards = match config.server.shards {
                0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                n => n,
            };
            match ringside::node::upgrade::connect(path, shards) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::error!("upgrade from {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let node = match Node::start_inherited(config, inherited) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "signal {sig}: draining");
    }
    node.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
