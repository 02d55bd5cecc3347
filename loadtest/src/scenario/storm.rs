//! `storm`: every subscriber on one node while something moves them. It is
//! `resume`'s subscriber (rooms with history, offsets checked exactly once,
//! `reconnect` hints followed, re-join with `since`) with a different layout:
//! all subscribers start on the *first* `--url` (node A), publishers go to the
//! *last* one (node B, the node that stays), and the parent runs `--trigger`
//! (a shell command: `kill -TERM <A>` for a drain, `ringside --upgrade-from ...`
//! for an upgrade) `--trigger-at` seconds after the go time, scraping
//! `--metrics-url` (B's `/metrics`) just before it and after the run (see
//! `crate::trigger`). The report's `storm` section says how long until every
//! subscriber was back, how fast they came (per 100 ms and per second), what
//! closed, and B's own handshake latency during the storm; the checks depend
//! on `--trigger-kind`: a drain must move everyone to another node with a hint
//! first, an upgrade must close and reconnect nothing.

use super::resume::{room_name, subscriber};
use super::rooms::{self, Layout};
use crate::worker::CtxRef;

/// Publishers go to the last `--url`: the node that stays up.
pub fn last_target(_pid: u64, targets: usize) -> usize {
    targets - 1
}

/// Runs this worker's share of the storm scenario.
pub async fn run(ctx: CtxRef) {
    let layout = Layout { room: room_name, publisher_target: last_target };
    rooms::drive(ctx, layout, |ctx, j, intended, phase| subscriber(ctx, j, intended, 0, phase)).await;
}
