//! The cluster thread: Redis registry, affinity, cross-node fan-out.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::ClusterCmd;
use crate::shard::NodeShared;

/// Runs until [`ClusterCmd::Shutdown`].
pub fn run(shared: Arc<NodeShared>, mut rx: mpsc::Receiver<ClusterCmd>) {
    let _ = &shared;
    while let Some(cmd) = rx.blocking_recv() {
        if let ClusterCmd::Shutdown = cmd {
            return;
        }
    }
}
