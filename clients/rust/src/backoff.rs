//! Reconnect delays: exponential backoff with full jitter (the AWS architecture blog's
//! "full jitter": `delay = random(0, min(cap, base × 2^attempt))`). Jitter is what keeps
//! thousands of clients that lost one node at the same instant from coming back at the
//! same instant; without it every retry wave is as large as the first.

use std::time::Duration;

/// Backoff settings. Defaults: base 500 ms, cap 30 s, unlimited attempts, jitter on.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Delay ceiling of the first retry (attempt 0). Default 500 ms.
    pub base: Duration,
    /// Largest delay ceiling. Default 30 s.
    pub cap: Duration,
    /// Failed attempts in a row after which the client stops (`None`: never). Default `None`.
    pub max_attempts: Option<u32>,
    /// Full jitter (`true`, default) or the bare exponential ceiling (`false`, for
    /// comparison only: it synchronises clients).
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(30), max_attempts: None, jitter: true }
    }
}

impl Backoff {
    /// The ceiling for `attempt` (0-based): `min(cap, base × 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |d| d.min(self.cap))
    }

    /// The delay before retry `attempt` (0-based): uniform in `[0, ceiling]` with jitter,
    /// the ceiling itself without.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if !self.jitter {
            return ceiling;
        }
        let ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(fastrand::u64(0..=ms))
    }

    /// Whether `failed` attempts in a row exhaust the budget.
    pub fn exhausted(&self, failed: u32) -> bool {
        self.max_attempts.is_some_and(|max| failed >= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_millis(1000), ..Backoff::default() };
        let c: Vec<u128> = (0..6).map(|a| b.ceiling(a).as_millis()).collect();
        assert_eq!(c, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(200), Duration::from_millis(1000));
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling_and_spreads() {
        let b = Backoff { base: Duration::from_millis(1000), ..Backoff::default() };
        let samples: Vec<u64> = (0..2000).map(|_| b.delay(0).as_millis() as u64).collect();
        assert!(samples.iter().all(|&d| d <= 1000));
        // Spread: the four quarters of [0, 1000] are each hit.
        for q in 0..4 {
            assert!(samples.iter().any(|&d| d / 250 == q), "quarter {q} never drawn");
        }
        let nojit = Backoff { jitter: false, ..b };
        assert_eq!(nojit.delay(2), Duration::from_millis(4000));
    }

    #[test]
    fn max_attempts() {
        let b = Backoff { max_attempts: Some(3), ..Backoff::default() };
        assert!(!b.exhausted(2));
        assert!(b.exhausted(3));
        assert!(!Backoff::default().exhausted(u32::MAX));
    }
}
