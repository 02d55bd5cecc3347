//! Open-loop pacing: when the k-th event of a run is *meant* to start.
//!
//! A run has one global schedule, event `k` at `start + k / rate`. Worker `i` of
//! `W` (or connection `c` of `N` for per-connection message schedules) takes the
//! events `i, i + W, i + 2W, ...`, so together the workers follow the global rate
//! exactly and nobody has to coordinate at run time. Latency "from intended" is
//! measured from these times, so a stalled client or server cannot hide its stall
//! by starting later (coordinated omission, as wrk2 corrects it).

/// One worker's share of a global open-loop schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Monotonic start of the global schedule, microseconds.
    pub start_us: u64,
    /// Global events per second; `<= 0` means "all at once".
    pub rate: f64,
    /// First global index owned by this share.
    pub offset: u64,
    /// Distance between owned global indices (the number of shares).
    pub stride: u64,
    /// Number of global events in the whole schedule (`u64::MAX` = unbounded).
    pub total: u64,
}

impl Schedule {
    /// The share `offset` of `stride` shares of `total` events at `rate` per second.
    pub fn new(start_us: u64, rate: f64, offset: u64, stride: u64, total: u64) -> Self {
        Self { start_us, rate, offset, stride: stride.max(1), total }
    }

    /// Number of events this share owns.
    pub fn len(&self) -> u64 {
        if self.total <= self.offset {
            0
        } else {
            (self.total - self.offset).div_ceil(self.stride)
        }
    }

    /// Whether this share owns no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Global index of this share's `n`-th event.
    pub fn global_index(&self, n: u64) -> u64 {
        self.offset + n * self.stride
    }

    /// Intended start (monotonic microseconds) of this share's `n`-th event.
    pub fn intended_us(&self, n: u64) -> u64 {
        self.at_global(self.global_index(n))
    }

    /// Intended start of global event `k`.
    pub fn at_global(&self, k: u64) -> u64 {
        if self.rate <= 0.0 {
            return self.start_us;
        }
        self.start_us + (k as f64 * 1e6 / self.rate) as u64
    }

    /// Number of global events whose intended start falls before `start + secs`.
    pub fn events_in(rate: f64, secs: f64) -> u64 {
        (rate * secs).floor().max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_global_schedule_exactly_once() {
        let total = 1_003;
        let shares: Vec<Schedule> = (0..4).map(|i| Schedule::new(1_000, 2_000.0, i, 4, total)).collect();
        let mut all: Vec<u64> = shares.iter().flat_map(|s| (0..s.len()).map(|n| s.global_index(n))).collect();
        all.sort_unstable();
        assert_eq!(all, (0..total).collect::<Vec<_>>());
        assert_eq!(shares.iter().map(Schedule::len).sum::<u64>(), total);
    }

    #[test]
    fn intended_times_follow_rate() {
        let s = Schedule::new(5_000_000, 2_000.0, 1, 2, 10);
        assert_eq!(s.intended_us(0), 5_000_500);
        assert_eq!(s.intended_us(1), 5_001_500);
        assert_eq!(s.at_global(2_000), 6_000_000);
        for n in 1..s.len() {
            assert!(s.intended_us(n) > s.intended_us(n - 1));
        }
    }

    #[test]
    fn zero_rate_means_all_at_once_and_empty_shares() {
        let s = Schedule::new(7, 0.0, 0, 1, 3);
        assert_eq!(s.intended_us(2), 7);
        assert!(Schedule::new(0, 1.0, 5, 8, 5).is_empty());
        assert_eq!(Schedule::events_in(20.0, 2.5), 50);
    }
}
