//! Idle connections without a task (the direct socket path).
//!
//! A connection's reader is a task whose future waits for readability; for
//! an idle connection that future is most of what it costs (a 352-byte task,
//! results/2026-12-01-idle-memory). On the direct path readiness is a
//! receive completion in the shard's own ring, delivered by waking whatever
//! waker the connection registered. So a reader that has been quiet for a
//! sweep interval *retires*: it registers an [`idle_waker`] instead of its
//! own and ends. That waker is no allocation: its data word is the
//! connection id, and waking it puts the id on this thread's ready list and
//! wakes the shard's one [`dispatch`] task, which starts a fresh reader for
//! it. A busy connection keeps its reader (no spawn per message); an idle
//! one holds no task at all.
//!
//! The wakers only ever live in the shard's ring (`transport::uring`), which
//! is woken on the shard's own thread: the ready list is thread-local.

use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

use super::shard::Shard;
use super::table::ConnId;
use super::App;

thread_local! {
    /// Connections whose idle waker fired, waiting for a reader.
    static READY: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
    /// The shard's dispatcher, parked while `READY` is empty.
    static DISPATCHER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

const VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);

fn clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

fn wake(data: *const ()) {
    READY.with(|r| r.borrow_mut().push(data as u64));
    if let Some(w) = DISPATCHER.with(|d| d.borrow_mut().take()) {
        w.wake();
    }
}

fn drop(_: *const ()) {}

/// A waker for retired connection `id`: waking it queues `id` for a reader.
pub fn idle_waker(id: ConnId) -> Waker {
    // SAFETY: the vtable's functions uphold RawWaker's contract: the data
    // word is a plain integer (no pointer is ever dereferenced), so cloning
    // copies it and dropping releases nothing.
    unsafe { Waker::from_raw(RawWaker::new(id.raw() as *const (), &VTABLE)) }
}

/// The shard's dispatcher: starts a reader for every retired connection
/// whose idle waker fired (data, EOF, a shutdown, a handover's detach).
pub async fn dispatch<A: App>(shard: Rc<Shard<A>>) {
    // Swapped with the ready list each round, so the two buffers keep their
    // capacity instead of a new one growing per round. Each holds at most
    // one entry per retired connection (an idle waker is woken once, then
    // gone): 8 bytes per slot of the shard at worst.
    let mut ready: Vec<u64> = Vec::new();
    loop {
        poll_fn(|cx| {
            READY.with(|r| std::mem::swap(&mut *r.borrow_mut(), &mut ready));
            if ready.is_empty() {
                DISPATCHER.with(|d| *d.borrow_mut() = Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        for raw in ready.drain(..) {
            let id = ConnId::from_raw(raw);
            let stream = {
                let mut table = shard.table.borrow_mut();
                let Some(c) = table.get_mut(id) else { continue };
                if !c.retired {
                    continue; // a reader runs already
                }
                c.retired = false;
                c.stream.clone()
            };
            let Some(stream) = stream else { continue };
            shard.metrics().readers_restarted.inc();
            monoio::spawn(super::session::resumed(shard.clone(), stream, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_waker_queues_its_connection_without_allocating() {
        let id = ConnId::new(3, 12345, 77);
        let w = idle_waker(id);
        let w2 = w.clone();
        std::mem::drop(w);
        w2.wake_by_ref();
        w2.wake();
        let ready = READY.with(|r| std::mem::take(&mut *r.borrow_mut()));
        assert_eq!(ready, vec![id.raw(), id.raw()]);
    }
}
