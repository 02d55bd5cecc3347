//! The circuit breaker in front of Redis, and its reconnect backoff.
//!
//! Closed: cross-node operations flow. Any Redis failure (error or timeout)
//! opens it: the connection is dropped, cross-node operations fail fast
//! (direct messages answer `unknown_client`, publishes to other nodes are
//! counted and dropped) and a reconnect is scheduled after an exponential
//! backoff with jitter. Half-open: one reconnect attempt is in flight; it
//! closes the breaker on success or reopens it with a longer wait.

use std::time::{Duration, Instant};

use super::BreakerState;

/// First reconnect wait. Short, because a blip is the common failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect wait. With a connect timeout of 1 s this puts a node
/// back at most ~3 s after Redis returns (the issue asks for 5 s), while an
/// outage costs Redis at most one connection attempt per node every 2 s.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Breaker state plus the reconnect schedule.
#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    next_attempt: Instant,
}

impl Breaker {
    /// Open, with an attempt due now (a node starts disconnected).
    pub fn new(now: Instant) -> Self {
        Self { state: BreakerState::Open, failures: 0, next_attempt: now }
    }

    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// True when cross-node operations may use Redis.
    pub fn is_closed(&self) -> bool {
        self.state == BreakerState::Closed
    }

    /// When the next reconnect attempt is due (meaningful while open).
    pub fn next_attempt(&self) -> Instant {
        self.next_attempt
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Moves open → half-open if an attempt is due; true if the caller should try.
    pub fn begin_attempt(&mut self, now: Instant) -> bool {
        if self.state == BreakerState::Open && now >= self.next_attempt {
            self.state = BreakerState::HalfOpen;
            return true;
        }
        false
    }

    /// Redis answered: close.
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed;
        self.failures = 0;
    }

    /// Redis failed: open and schedule the next attempt.
    pub fn on_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.state = BreakerState::Open;
        self.next_attempt = now + backoff(self.failures, fastrand::f64());
    }
}

/// The wait after `failures` consecutive failures: "equal jitter", half of
/// the capped exponential plus a random part of the other half, so nodes
/// that lost Redis together do not reconnect in lockstep.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16)).min(BACKOFF_CAP);
    exp / 2 + exp.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(50));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(backoff(5, 1.0), Duration::from_millis(1600));
        assert_eq!(backoff(6, 1.0), BACKOFF_CAP);
        assert_eq!(backoff(1000, 1.0), BACKOFF_CAP);
        assert!(backoff(1000, 0.0) >= BACKOFF_CAP / 2);
    }

    #[test]
    fn opens_on_failure_and_retries_only_when_due() {
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.begin_attempt(t0), "first attempt is due at once");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.begin_attempt(t0), "one attempt at a time");
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.begin_attempt(t0), "not before the backoff");
        assert!(b.next_attempt() > t0 && b.next_attempt() <= t0 + BACKOFF_BASE);
        let later = b.next_attempt();
        assert!(b.begin_attempt(later));
        b.on_success();
        assert!(b.is_closed());
        assert_eq!(b.failures(), 0);
        assert!(!b.begin_attempt(later + BACKOFF_CAP), "closed: nothing to retry");
    }
}
