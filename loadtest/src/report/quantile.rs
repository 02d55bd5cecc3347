//! How far into the tail a sample count lets a report go: with `n` samples the
//! highest quantile that still has about one sample beyond it is `1 - 1/n`;
//! anything higher (p99.9 of 500 samples, say) would only restate the maximum
//! with a precision the run does not have. The plot and the per-run tables stop
//! there and show the maximum as the last point; `.hgrm` files stay complete.

/// The highest quantile `n` samples resolve: `1 - 1/n` (0 for no samples).
pub fn highest_supported(n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        1.0 - 1.0 / n as f64
    }
}

/// Whether quantile `q` (0..=1) is resolved by `n` samples: at least one sample
/// lies at or beyond it, i.e. `n * (1 - q) >= 1` (with a little slack for the
/// rounding in quantiles such as 0.999).
pub fn supported(q: f64, n: u64) -> bool {
    n > 0 && (1.0 - q) * n as f64 >= 1.0 - 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_off_is_one_minus_one_over_n() {
        assert_eq!(highest_supported(0), 0.0);
        assert_eq!(highest_supported(1), 0.0);
        assert!((highest_supported(1000) - 0.999).abs() < 1e-12);
        // 1,000 samples resolve p99.9 (one sample beyond) but not p99.99.
        assert!(supported(0.999, 1000));
        assert!(!supported(0.9999, 1000));
        assert!(!supported(0.999, 999));
        assert!(supported(0.99, 100) && !supported(0.99, 99));
        assert!(supported(0.5, 2) && !supported(0.5, 1));
        assert!(!supported(0.0, 0));
        assert!(supported(0.0, 1));
        assert!(!supported(1.0, u64::MAX));
    }
}
