//! The circuit breaker of one upstream pool: closed (calls flow), open
//! (calls fail at once), half-open (one probe call is let through; its
//! result closes or reopens the breaker).
//!
//! Counted per *attempt*: a transport failure, a timeout or a 5xx is a
//! failure, any other answer a success. `threshold` consecutive failures
//! open it for `cooldown`; the first attempt after the cooldown is the
//! probe, and everyone else fails fast until it has answered.

use std::time::{Duration, Instant};

/// Breaker states, as `/pools` and `/metrics` name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls flow.
    Closed,
    /// Calls fail fast until the cooldown ends.
    Open,
    /// One probe is allowed; its result decides.
    HalfOpen,
}

impl State {
    /// Every state, in gauge order.
    pub const ALL: [State; 3] = [State::Closed, State::Open, State::HalfOpen];

    /// The name in `/pools` and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The gauge value (0 closed, 1 open, 2 half-open).
    pub fn code(self) -> u8 {
        self as u8
    }

    /// From the gauge value.
    pub fn from_code(c: u8) -> State {
        State::ALL.get(c as usize).copied().unwrap_or(State::Closed)
    }
}

/// What an attempt may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead (closed).
    Normal,
    /// Go ahead as the half-open probe: report the result, or [`Breaker::abandon`].
    Probe,
    /// Fail fast.
    Refused,
}

/// One pool's breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: State,
    failures: u32,
    opened_at: Instant,
    probing: bool,
}

impl Breaker {
    /// Closed. `threshold` 0 never opens.
    pub fn new(threshold: u32, cooldown: Duration, now: Instant) -> Self {
        Breaker { threshold, cooldown, state: State::Closed, failures: 0, opened_at: now, probing: false }
    }

    /// The state now (open turns half-open once the cooldown has passed).
    pub fn state(&mut self, now: Instant) -> State {
        if self.state == State::Open && now >= self.opened_at + self.cooldown {
            self.state = State::HalfOpen;
            self.probing = false;
        }
        self.state
    }

    /// May an attempt start now?
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state(now) {
            State::Closed => Permit::Normal,
            State::Open => Permit::Refused,
            State::HalfOpen if self.probing => Permit::Refused,
            State::HalfOpen => {
                self.probing = true;
                Permit::Probe
            }
        }
    }

    /// The attempt was answered.
    pub fn success(&mut self) {
        self.state = State::Closed;
        self.failures = 0;
        self.probing = false;
    }

    /// The attempt failed.
    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let probe_failed = self.state == State::HalfOpen;
        if probe_failed || (self.threshold > 0 && self.failures >= self.threshold) {
            self.state = State::Open;
            self.opened_at = now;
            self.probing = false;
        }
    }

    /// The probe ended without a verdict (it found no connection in time):
    /// the next attempt probes instead.
    pub fn abandon(&mut self, permit: Permit) {
        if permit == Permit::Probe {
            self.probing = false;
        }
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cooldown_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100), t0);
        for _ in 0..2 {
            assert_eq!(b.permit(t0), Permit::Normal);
            b.failure(t0);
        }
        assert_eq!(b.state(t0), State::Closed, "two of three");
        b.success();
        for _ in 0..3 {
            b.failure(t0);
        }
        assert_eq!(b.state(t0), State::Open);
        assert_eq!(b.permit(t0 + Duration::from_millis(50)), Permit::Refused);
        let later = t0 + Duration::from_millis(100);
        assert_eq!(b.permit(later), Permit::Probe);
        assert_eq!(b.permit(later), Permit::Refused, "one probe at a time");
        b.failure(later);
        assert_eq!(b.state(later), State::Open, "a failed probe reopens");
        let again = later + Duration::from_millis(100);
        let p = b.permit(again);
        assert_eq!(p, Permit::Probe);
        b.abandon(p);
        assert_eq!(b.permit(again), Permit::Probe, "an abandoned probe frees the turn");
        b.success();
        assert_eq!((b.state(again), b.failures()), (State::Closed, 0));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0, Duration::from_millis(1), t0);
        for _ in 0..100 {
            b.failure(t0);
        }
        assert_eq!(b.permit(t0), Permit::Normal);
    }
}
