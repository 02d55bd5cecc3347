//! The server's RSS per connection, and when there is no such figure.
//!
//! The figure is `(RSS held - RSS before) / connections established`, from the
//! `/proc/PID/status` VmRSS samples the parent takes before the workers start and
//! at the first barrier (all connections open). It only means "memory a
//! connection costs" when the server's RSS actually grew by clearly more than
//! allocator and page noise: a server that had already served an earlier run
//! can hand freed memory back to the kernel during the new one (RSS *falls*),
//! and a hundred connections of a kilobyte each are lost in the allocator's own
//! trim threshold. Those cases yield a [`NotMeaningful`] reason instead of a
//! number, both in `summary.json` (the raw samples stay, the derived figure is
//! `null`) and in every table built from it.

/// Below this total growth the delta is within allocator and page noise (glibc's
/// default trim and mmap thresholds are 128 KiB; RSS moves in 4 KiB pages).
pub const NOISE_FLOOR_BYTES: i64 = 256 * 1024;

/// Why a run has no per-connection RSS figure although the server was sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotMeaningful {
    /// No sample while the connections were held (churn has no hold phase).
    NoHeldSample,
    /// No connection was established.
    NoConnections,
    /// RSS at the held sample was below the baseline.
    Fell,
    /// RSS grew by less than [`NOISE_FLOOR_BYTES`] in total (or not at all).
    BelowNoise,
}

impl NotMeaningful {
    /// Every reason, in footnote order.
    pub const ALL: [NotMeaningful; 4] =
        [NotMeaningful::Fell, NotMeaningful::BelowNoise, NotMeaningful::NoConnections, NotMeaningful::NoHeldSample];

    /// Short stable code, as written to `summary.json`.
    pub fn code(self) -> &'static str {
        match self {
            NotMeaningful::NoHeldSample => "no_held_sample",
            NotMeaningful::NoConnections => "no_connections",
            NotMeaningful::Fell => "rss_fell",
            NotMeaningful::BelowNoise => "below_noise",
        }
    }

    /// Short tag a table cell shows as `n/a (tag)`, explained in a footnote.
    pub fn tag(self) -> &'static str {
        match self {
            NotMeaningful::Fell => "fell",
            NotMeaningful::BelowNoise => "noise",
            NotMeaningful::NoConnections => "no conns",
            NotMeaningful::NoHeldSample => "no hold",
        }
    }

    /// The explanation a table's footnote gives.
    pub fn explain(self) -> &'static str {
        match self {
            NotMeaningful::Fell => {
                "RSS fell between the baseline and the held sample: the allocator returned memory \
                 (the server was not fresh, e.g. it had served an earlier run); no per-connection figure"
            }
            NotMeaningful::BelowNoise => {
                "RSS grew by less than 256 KiB in total (or not at all), within allocator and page noise: too few \
                 connections to tell; no per-connection figure"
            }
            NotMeaningful::NoConnections => "no connection was established; no per-connection figure",
            NotMeaningful::NoHeldSample => {
                "no sample while the connections were held (churn has no hold phase; storm's sampled \
                 node gets its connections only during the storm); no per-connection figure"
            }
        }
    }
}

/// Server RSS growth per established connection, in bytes, or why there is none.
pub fn per_connection(before: u64, held: Option<u64>, established: u64) -> Result<f64, NotMeaningful> {
    let held = held.ok_or(NotMeaningful::NoHeldSample)?;
    if established == 0 {
        return Err(NotMeaningful::NoConnections);
    }
    let delta = held as i64 - before as i64;
    if delta < 0 {
        return Err(NotMeaningful::Fell);
    }
    if delta < NOISE_FLOOR_BYTES {
        return Err(NotMeaningful::BelowNoise);
    }
    Ok(delta as f64 / established as f64)
}

/// The same, from a `summary.json` (its raw `server.rss_bytes_*` samples and
/// `connections.established`, never its stored derived figure, so summaries
/// written before this check read the same way). `None`: the server was not sampled.
pub fn from_summary(v: &serde_json::Value) -> Option<Result<f64, NotMeaningful>> {
    let s = v.get("server")?;
    let before = s["rss_bytes_before"].as_u64()?;
    let held = s["rss_bytes_held"].as_u64();
    Some(per_connection(before, held, v["connections"]["established"].as_u64().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_clearly_gives_a_figure() {
        assert_eq!(per_connection(1_000_000, Some(13_720_000), 10_000), Ok(1272.0));
    }

    #[test]
    fn fell_or_flat_or_noise_is_not_a_figure() {
        // 2026-11-23-connect-redis-off-r2: 51.6 MB before, 42.9 MB held, 5,000 connections.
        assert_eq!(per_connection(51_605_504, Some(42_852_352), 5000), Err(NotMeaningful::Fell));
        assert_eq!(per_connection(5000, Some(4999), 10), Err(NotMeaningful::Fell));
        assert_eq!(per_connection(5000, Some(5000), 10), Err(NotMeaningful::BelowNoise));
        // 100 echo connections, 32 KB of growth: noise.
        assert_eq!(per_connection(10_000_000, Some(10_032_800), 100), Err(NotMeaningful::BelowNoise));
        assert_eq!(per_connection(1, Some(1 + NOISE_FLOOR_BYTES as u64), 1).map(|b| b as i64), Ok(NOISE_FLOOR_BYTES));
        assert_eq!(per_connection(1, None, 10), Err(NotMeaningful::NoHeldSample));
        assert_eq!(per_connection(1, Some(10_000_000), 0), Err(NotMeaningful::NoConnections));
    }

    #[test]
    fn reads_raw_samples_of_old_summaries() {
        // An old summary stored the negative figure; the raw samples decide.
        let v = serde_json::json!({
            "connections": {"established": 5000},
            "server": {"rss_bytes_before": 51_605_504u64, "rss_bytes_held": 42_852_352u64,
                       "rss_delta_per_connection_bytes": -1750.63},
        });
        assert_eq!(from_summary(&v), Some(Err(NotMeaningful::Fell)));
        assert_eq!(from_summary(&serde_json::json!({"connections": {}})), None);
        let codes: std::collections::BTreeSet<_> = NotMeaningful::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), NotMeaningful::ALL.len());
    }
}
