//! A queue between threads bounded in bytes: data items carry their size
//! and are refused past the budget (counted); control items are never
//! refused (they are O(1) per connection event, so the connections bound
//! them). Used between the shards and the cluster thread, and between the
//! Redis client's push callback and the cluster thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

/// The shared byte budget of one queue.
#[derive(Debug)]
pub struct Budget {
    bytes: AtomicUsize,
    max: usize,
    /// Data items refused because the budget was spent.
    pub dropped: AtomicU64,
}

impl Budget {
    /// A fresh budget of `max` bytes.
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget { bytes: AtomicUsize::new(0), max, dropped: AtomicU64::new(0) })
    }

    /// Bytes of data items waiting.
    pub fn queued(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// The sending side (cloneable, any thread).
#[derive(Debug)]
pub struct Tx<T> {
    tx: UnboundedSender<(T, usize)>,
    budget: Arc<Budget>,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Tx { tx: self.tx.clone(), budget: self.budget.clone() }
    }
}

/// The receiving side (the cluster thread).
#[derive(Debug)]
pub struct Rx<T> {
    rx: UnboundedReceiver<(T, usize)>,
    budget: Arc<Budget>,
}

/// A queue whose data items may hold `max_bytes` in all.
pub fn queue<T>(max_bytes: usize) -> (Tx<T>, Rx<T>) {
    queue_with(Budget::new(max_bytes))
}

/// A queue on an existing budget (kept across reconnects, for its counters).
pub fn queue_with<T>(budget: Arc<Budget>) -> (Tx<T>, Rx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Tx { tx, budget: budget.clone() }, Rx { rx, budget })
}

impl<T> Tx<T> {
    /// Queues `item`: `Some(bytes)` for data (refused past the budget),
    /// `None` for control. False when refused or the receiver is gone.
    pub fn send(&self, item: T, bytes: Option<usize>) -> bool {
        let n = bytes.unwrap_or(0);
        if bytes.is_some() {
            let before = self.budget.bytes.fetch_add(n, Ordering::AcqRel);
            if before + n > self.budget.max {
                self.budget.bytes.fetch_sub(n, Ordering::AcqRel);
                self.budget.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        if self.tx.send((item, n)).is_err() {
            self.budget.bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The budget, for metrics.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl<T> Rx<T> {
    /// The next item, once one is queued; `None` when every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let (item, n) = self.rx.recv().await?;
        self.budget.bytes.fetch_sub(n, Ordering::AcqRel);
        Some(item)
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        let (item, n) = self.rx.try_recv().ok()?;
        self.budget.bytes.fetch_sub(n, Ordering::AcqRel);
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_bounded_in_bytes_and_control_always_passes() {
        let (tx, mut rx) = queue::<u32>(100);
        assert!(tx.send(1, Some(60)));
        assert!(!tx.send(2, Some(60)), "past the budget");
        assert!(tx.send(3, None), "control");
        assert!(tx.send(4, Some(40)));
        assert_eq!(tx.budget().queued(), 100);
        assert_eq!(tx.budget().dropped.load(Ordering::Relaxed), 1);
        assert_eq!((rx.try_recv(), rx.try_recv(), rx.try_recv(), rx.try_recv()), (Some(1), Some(3), Some(4), None));
        assert_eq!(tx.budget().queued(), 0);
        assert!(tx.send(5, Some(100)), "the budget is free again");
    }
}
