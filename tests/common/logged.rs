//! The address a node logged for one of its listeners: tests start the
//! admin and agent listeners on port 0 and read where they landed, since a
//! port picked free beforehand can be taken by the node's own port-0 bind
//! (or another test's) before the node binds it.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The first `ip:port` after "listening on " in a log line containing
/// `marker`, waiting up to 10 s for it.
pub fn logged_addr(log: &Mutex<Vec<String>>, marker: &str) -> SocketAddr {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let found = log.lock().unwrap().iter().find_map(|l| {
            let rest = l.split(marker).nth(1)?.split("listening on ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        });
        if let Some(a) = found {
            return a;
        }
        assert!(Instant::now() < end, "no `{marker}` listener in the log: {:?}", log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}
