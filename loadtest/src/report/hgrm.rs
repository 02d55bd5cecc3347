//! The standard HdrHistogram percentile-distribution text (`.hgrm`), as Java's
//! `outputPercentileDistribution(out, 5, 1000.0)` prints it: values recorded in
//! microseconds, printed in milliseconds. The file is complete (it runs to the
//! maximum whatever the sample count); the plot and the tables are the ones
//! that stop where the sample count does (see `quantile.rs`).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Scaling from recorded units (us) to printed units (ms).
const US_PER_MS: f64 = 1000.0;

/// Percentile ticks per half distance, the Java default.
pub const TICKS_PER_HALF: u32 = 5;

/// Renders `h` (microseconds) as `.hgrm` text with values in milliseconds.
pub fn render(name: &str, h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}   (Value in milliseconds; histogram \"{name}\")\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF) {
        total += v.count_since_last_iteration();
        let value = v.value_iterated_to() as f64 / US_PER_MS;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
        } else {
            let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10}");
        }
    }
    let _ = writeln!(s, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", h.mean() / US_PER_MS, h.stdev() / US_PER_MS);
    let _ = writeln!(s, "#[Max     = {:12.3}, Total count    = {:12}]", h.max() as f64 / US_PER_MS, h.len());
    let sub_buckets = (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two();
    let _ = writeln!(s, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), sub_buckets);
    s
}

/// Parses `(value_ms, percentile, total_count)` rows back out of `.hgrm` text
/// (the header and the `#[` footer lines are skipped).
pub fn parse_rows(text: &str) -> Vec<(f64, f64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let v = f.next()?.parse().ok()?;
            let p = f.next()?.parse().ok()?;
            let c = f.next()?.parse().ok()?;
            Some((v, p, c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    #[test]
    fn standard_layout_and_values_in_ms() {
        let mut h = new_hist();
        for us in 1..=10_000u64 {
            h.record(us).unwrap();
        }
        let text = render("rtt", &h);
        let first = text.lines().next().unwrap();
        assert!(first.contains("Value") && first.contains("1/(1-Percentile)"));
        assert!(first.contains("milliseconds"));
        assert!(text.contains("#[Mean    ="));
        assert!(text.contains("#[Max     =       10.007, Total count    =        10000]"));
        assert!(text.contains("SubBuckets     =         2048]"));
        let rows = parse_rows(&text);
        let last = rows.last().unwrap();
        assert_eq!((last.1, last.2), (1.0, 10_000));
        assert!((last.0 - 10.0).abs() < 0.02, "max in ms: {}", last.0);
        assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
