//! Priority classes (seed 001's `PriorityConnectionPool`): node-wide counts
//! per class, the reservation rule, each shard's queue of upgrades waiting
//! for a slot, and the choice of whom to preempt.
//!
//! Counts are node-wide (one atomic per class, written by every shard at a
//! slot's take and release, never per message): a class's reservation is a
//! share of the whole node. Waiting and preemption are per shard: an upgrade
//! waits for a slot of the shard that holds its socket, and preempts a
//! connection of that shard.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

use crate::config::{Class, PriorityConfig};

/// Connections per class, node-wide.
#[derive(Debug, Default)]
pub struct ClassCounts([AtomicUsize; 4]);

impl ClassCounts {
    /// One more connection of `class`.
    pub fn add(&self, class: Class) {
        self.0[class.index()].fetch_add(1, Ordering::AcqRel);
    }

    /// One fewer.
    pub fn sub(&self, class: Class) {
        self.0[class.index()].fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections of `class` now.
    pub fn get(&self, class: Class) -> usize {
        self.0[class.index()].load(Ordering::Acquire)
    }

    /// All four, lowest class first.
    pub fn snapshot(&self) -> [usize; 4] {
        Class::ALL.map(|c| self.get(c))
    }
}

/// Slots reserved for `class` out of `capacity` (only critical and high reserve).
pub fn reserved(cfg: &PriorityConfig, capacity: usize, class: Class) -> usize {
    let share = match class {
        Class::Critical => cfg.reserved_critical,
        Class::High => cfg.reserved_high,
        Class::Normal | Class::Low => 0.0,
    };
    (capacity as f64 * share).floor() as usize
}

/// The seed's `canAcceptConnection`: a class may take any free slot that is
/// not held back for a higher class that has not used its reservation.
pub fn can_accept(cfg: &PriorityConfig, capacity: usize, counts: [usize; 4], class: Class) -> bool {
    let used: usize = counts.iter().sum();
    let free = capacity.saturating_sub(used);
    let held_back: usize = Class::ALL
        .into_iter()
        .filter(|c| *c > class)
        .map(|c| reserved(cfg, capacity, c).saturating_sub(counts[c.index()]))
        .sum();
    free > held_back
}

/// Who to preempt for an upgrade of `class`: among `(id, class, last_active_ms)`
/// of open connections, the least recently active of the lowest class below it.
pub fn victim<I: Copy>(candidates: impl Iterator<Item = (I, Class, u64)>, class: Class) -> Option<I> {
    candidates.filter(|(_, c, _)| *c < class).min_by_key(|(_, c, active)| (*c, *active)).map(|(id, _, _)| id)
}

/// One shard's upgrades waiting for a slot: higher classes first, FIFO
/// within a class.
#[derive(Debug, Default)]
pub struct Waiters {
    queue: BTreeMap<(std::cmp::Reverse<Class>, u64), Waiter>,
    next: u64,
}

#[derive(Debug)]
struct Waiter {
    waker: Option<Waker>,
    woken: bool,
}

/// A place in the queue.
pub type Ticket = (std::cmp::Reverse<Class>, u64);

impl Waiters {
    /// Upgrades waiting now.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Joins the queue.
    pub fn push(&mut self, class: Class) -> Ticket {
        self.next += 1;
        let t = (std::cmp::Reverse(class), self.next);
        self.queue.insert(t, Waiter { waker: None, woken: false });
        t
    }

    /// Leaves the queue (served, timed out or gone).
    pub fn remove(&mut self, t: Ticket) {
        self.queue.remove(&t);
    }

    /// True when `t` is the first of the queue (it goes before anyone else).
    pub fn is_first(&self, t: Ticket) -> bool {
        self.queue.keys().next() == Some(&t)
    }

    /// Polls `t`: ready once woken (then re-armed), else remembers the waker.
    pub fn poll(&mut self, t: Ticket, waker: &Waker) -> bool {
        let Some(w) = self.queue.get_mut(&t) else { return true };
        if std::mem::take(&mut w.woken) {
            return true;
        }
        w.waker = Some(waker.clone());
        false
    }

    /// A slot freed: the first waiter checks again.
    pub fn wake_first(&mut self) {
        if let Some(w) = self.queue.values_mut().next() {
            w.woken = true;
            if let Some(k) = w.waker.take() {
                k.wake();
            }
        }
    }

    /// Every waiter checks again (the sweep: slots may have freed elsewhere).
    pub fn wake_all(&mut self) {
        for w in self.queue.values_mut() {
            w.woken = true;
            if let Some(k) = w.waker.take() {
                k.wake();
            }
        }
    }
}

/// The priority families: connections and reserved slots per class
/// (node-wide), preemptions, refusals and wait times per class (all shards).
pub fn render<M>(t: &mut crate::prom::Text, node: &super::NodeState<M>) {
    use crate::prom::Kind;
    let cfg = &node.config.priority;
    let shards = node.metrics();
    t.family("priority_connections", Kind::Gauge, "Connections per priority class, node-wide.");
    for c in Class::ALL {
        t.sample("priority_connections", &[("class", &c.name())], node.classes.get(c));
    }
    t.family("priority_reserved", Kind::Gauge, "Slots reserved for a class (priority.reserved_*), node-wide.");
    for c in Class::ALL {
        t.sample("priority_reserved", &[("class", &c.name())], reserved(cfg, node.capacity(), c));
    }
    let help = "Connections preempted (4004) for a higher class, by the preempted connection's class.";
    t.family("priority_preempted_total", Kind::Counter, help);
    for c in Class::ALL {
        let n: u64 = shards.iter().map(|m| m.preempted[c.index()].get()).sum();
        t.sample("priority_preempted_total", &[("class", &c.name())], n);
    }
    let help = "Upgrades answered 503 because no slot was free for their class in time.";
    t.family("priority_refused_total", Kind::Counter, help);
    for c in Class::ALL {
        let n: u64 = shards.iter().map(|m| m.class_refused[c.index()].get()).sum();
        t.sample("priority_refused_total", &[("class", &c.name())], n);
    }
    t.family("priority_waiting", Kind::Gauge, "Upgrades waiting for a slot, per shard.");
    for (i, m) in shards.iter().enumerate() {
        t.sample("priority_waiting", &[("shard", &i)], m.waiting.load(Ordering::Relaxed));
    }
    let name = "priority_wait_seconds";
    t.family(name, Kind::Histogram, "Time an upgrade waited for a slot (only upgrades that had to wait).");
    for c in Class::ALL {
        let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
        for m in &shards {
            if let Ok(h) = m.waits_us[c.index()].lock() {
                let _ = all.add(&*h);
            }
        }
        t.histogram(name, &[("class", &c.name())], &all, 1e-6, &WAIT_BUCKETS);
    }
}

/// Bucket bounds (seconds) for waits: up to the longest default wait.
const WAIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_seed_rule() {
        let cfg = PriorityConfig { reserved_critical: 0.10, reserved_high: 0.20, ..PriorityConfig::default() };
        // 100 slots, 70 normal in use: 30 free, all of them reserved (10 + 20).
        let counts = [0, 70, 0, 0];
        assert!(!can_accept(&cfg, 100, counts, Class::Normal));
        assert!(!can_accept(&cfg, 100, counts, Class::Low));
        assert!(can_accept(&cfg, 100, counts, Class::High));
        assert!(can_accept(&cfg, 100, counts, Class::Critical));
        // High used its 20 and 10 more: only critical's 10 are held back... and
        // 0 free are left for high beyond them.
        let counts = [0, 60, 30, 0];
        assert!(!can_accept(&cfg, 100, counts, Class::High));
        assert!(can_accept(&cfg, 100, counts, Class::Critical));
        // A used reservation no longer holds anything back.
        let counts = [0, 60, 20, 10];
        assert!(can_accept(&cfg, 100, counts, Class::Low));
        assert!(!can_accept(&cfg, 100, [0, 100, 0, 0], Class::Critical), "full is full");
    }

    #[test]
    fn the_victim_is_the_least_recently_active_of_the_lowest_class_below() {
        let conns = [(1, Class::Normal, 5), (2, Class::Low, 50), (3, Class::Low, 10), (4, Class::High, 1)];
        assert_eq!(victim(conns.into_iter(), Class::Critical), Some(3));
        assert_eq!(victim(conns.into_iter(), Class::Normal), Some(3));
        assert_eq!(victim(conns.into_iter(), Class::Low), None, "nobody below low");
        assert_eq!(victim([(1, Class::High, 0)].into_iter(), Class::High), None, "not the same class");
    }

    #[test]
    fn waiters_go_by_class_then_arrival() {
        let mut w = Waiters::default();
        let a = w.push(Class::Normal);
        let b = w.push(Class::Critical);
        let c = w.push(Class::Normal);
        assert!(w.is_first(b));
        w.remove(b);
        assert!(w.is_first(a) && !w.is_first(c));
        let waker = std::task::Waker::noop();
        assert!(!w.poll(a, waker));
        w.wake_first();
        assert!(w.poll(a, waker), "woken");
        assert!(!w.poll(a, waker), "re-armed");
        assert!(!w.poll(c, waker));
        w.wake_all();
        assert!(w.poll(c, waker));
    }
}
