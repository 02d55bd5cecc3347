//! `peer-tokio-tungstenite`: the same-run baseline for ringside benchmarks, a
//! plain tokio-tungstenite echo server. It echoes every text and binary message
//! unchanged on any path (so it answers what ringside's `/echo` answers); pings
//! get pongs from tungstenite itself.
//!
//! It uses tungstenite's *default* `WebSocketConfig` on purpose, because that is
//! what a typical tokio-tungstenite service runs with: `read_buffer_size` 128 KiB
//! (eagerly allocated, so resident per connection once data arrives),
//! `write_buffer_size` 128 KiB, `max_write_buffer_size` unlimited,
//! `max_message_size` 64 MiB, `max_frame_size` 16 MiB, unmasked client frames
//! rejected. Compare memory per connection with that in mind.
//!
//! Flags: `--listen ADDR` (default 127.0.0.1:9001), `--threads N` (tokio
//! multi-thread workers, default = available cores).

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};

/// Parsed command line.
struct Opts {
    listen: String,
    threads: usize,
}

fn parse_args() -> Result<Opts, String> {
    let mut o =
        Opts { listen: "127.0.0.1:9001".into(), threads: std::thread::available_parallelism().map_or(1, |n| n.get()) };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => o.listen = val()?,
            "--threads" => {
                o.threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?;
                if o.threads == 0 {
                    return Err("--threads must be >= 1".into());
                }
            }
            "-h" | "--help" => {
                println!("peer-tokio-tungstenite [--listen ADDR (127.0.0.1:9001)] [--threads N (cores)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("peer-tokio-tungstenite: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let listener = match TcpListener::bind(&opts.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("peer-tokio-tungstenite: bind {}: {e}", opts.listen);
                std::process::exit(2);
            }
        };
        eprintln!(
            "peer-tokio-tungstenite listening on {} with {} threads",
            listener.local_addr().expect("bound"),
            opts.threads
        );
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream));
                }
                // Out of fds and the like: keep serving the connections we have.
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// The tokio-tungstenite example echo loop: forward data frames back, in order.
async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    while let Some(Ok(msg)) = rx.next().await {
        if msg.is_text() || msg.is_binary() {
            if tx.send(msg).await.is_err() {
                break;
            }
        } else if msg.is_close() {
            break;
        }
    }
    let _ = tx.close().await;
}
