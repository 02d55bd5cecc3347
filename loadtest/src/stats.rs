//! Counters and HDR histograms of one worker, and their exact merge in the parent.
//!
//! Latencies are recorded in microseconds with 3 significant figures between
//! 1 us and 1 hour. Workers ship histograms to the parent in the standard V2
//! serialization (base64 in a JSON line); deserializing and `add`ing them is
//! exact, so the merged percentiles are the ones a single process would report.

use std::collections::BTreeMap;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histogram names, "actual start" first then "intended start", as in summary.json.
pub const HIST_NAMES: [&str; 8] = [
    "connect",
    "upgrade",
    "rtt",
    "delivery",
    "connect_from_intended",
    "upgrade_from_intended",
    "rtt_from_intended",
    "delivery_from_intended",
];

/// Failure reasons every report lists, even at zero.
pub const FAILURE_REASONS: [&str; 5] = ["refused", "timeout", "bad_status", "closed_early", "mismatch"];

/// Highest recordable latency: one hour in microseconds (larger values saturate).
const HIST_HIGH_US: u64 = 3_600_000_000;

/// A fresh latency histogram (1 us .. 1 h, 3 significant figures: ~0.1% error).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_HIGH_US, 3).expect("static histogram bounds are valid")
}

/// Everything a worker measured: named counters and named latency histograms.
#[derive(Debug, Default)]
pub struct Stats {
    /// Monotonic counters by dotted name (`connections.established`, `failures.timeout`, ...).
    pub counters: BTreeMap<String, u64>,
    /// Latency histograms in microseconds, by name from [`HIST_NAMES`].
    pub hists: BTreeMap<String, Histogram<u64>>,
}

/// The wire form of [`Stats`]: histograms as base64 V2 blobs.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WireStats {
    /// Counters, as in [`Stats::counters`].
    pub counters: BTreeMap<String, u64>,
    /// Histograms, V2-serialized then base64-encoded.
    pub hists: BTreeMap<String, String>,
}

impl Stats {
    /// Adds `n` to counter `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        if let Some(c) = self.counters.get_mut(name) {
            *c += n;
        } else {
            self.counters.insert(name.to_string(), n);
        }
    }

    /// Counts one failure with `reason` (also `connections.failed` if `conn` is set).
    pub fn fail(&mut self, reason: &str, conn: bool) {
        self.add(&format!("failures.{reason}"), 1);
        if conn {
            self.add("connections.failed", 1);
        }
    }

    /// Keeps the largest value reported for `max.<name>` (merged as a maximum, not a sum).
    pub fn max(&mut self, name: &str, v: u64) {
        let c = self.counters.entry(format!("max.{name}")).or_insert(v);
        *c = (*c).max(v);
    }

    /// Keeps the smallest value reported for `min.<name>` (merged as a minimum, not a sum).
    pub fn min(&mut self, name: &str, v: u64) {
        let c = self.counters.entry(format!("min.{name}")).or_insert(v);
        *c = (*c).min(v);
    }

    /// Value of counter `name` (0 when never touched).
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// Records `us` microseconds into histogram `name` (values below 1 us count as 1).
    pub fn record(&mut self, name: &str, us: u64) {
        let h = self.hists.entry(name.to_string()).or_insert_with(new_hist);
        h.saturating_record(us.max(1));
    }

    /// Records an (actual, intended) latency pair: `name` and `name_from_intended`.
    pub fn record_pair(&mut self, name: &str, actual_us: u64, intended_us: u64) {
        self.record(name, actual_us);
        self.record(&format!("{name}_from_intended"), intended_us);
    }

    /// Merges another worker's stats into these, exactly.
    pub fn merge(&mut self, other: &Stats) {
        for (k, v) in &other.counters {
            if let Some(name) = k.strip_prefix("max.") {
                self.max(name, *v);
            } else if let Some(name) = k.strip_prefix("min.") {
                self.min(name, *v);
            } else {
                self.add(k, *v);
            }
        }
        for (k, h) in &other.hists {
            let mine = self.hists.entry(k.clone()).or_insert_with(new_hist);
            mine.add(h).expect("histograms share bounds");
        }
    }

    /// Converts to the wire form.
    pub fn to_wire(&self) -> WireStats {
        WireStats {
            counters: self.counters.clone(),
            hists: self.hists.iter().map(|(k, h)| (k.clone(), encode_hist(h))).collect(),
        }
    }

    /// Converts from the wire form; fails on a corrupt histogram.
    pub fn from_wire(w: &WireStats) -> Result<Stats, String> {
        let mut hists = BTreeMap::new();
        for (k, b) in &w.hists {
            hists.insert(k.clone(), decode_hist(b)?);
        }
        Ok(Stats { counters: w.counters.clone(), hists })
    }
}

/// V2-serializes a histogram and base64-encodes it.
pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serializing to a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Decodes a base64 V2 histogram.
pub fn decode_hist(b64: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("histogram base64: {e}"))?;
    let h: Histogram<u64> =
        Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| format!("histogram V2: {e:?}"))?;
    // Deserialized histograms may have a different (smaller) high bound; normalise.
    let mut out = new_hist();
    out.add(&h).map_err(|e| format!("histogram bounds: {e:?}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_of_serialized_workers_equals_single_process() {
        let mut single = Stats::default();
        let mut parts = vec![Stats::default(), Stats::default(), Stats::default()];
        for v in 1..30_000u64 {
            let us = v * 37 % 100_000 + 1;
            single.record("rtt", us);
            parts[(v % 3) as usize].record("rtt", us);
            single.add("messages.sent", 1);
            parts[(v % 3) as usize].add("messages.sent", 1);
        }
        parts[1].record("rtt", HIST_HIGH_US * 10); // saturates, must still merge
        single.record("rtt", HIST_HIGH_US * 10);
        let mut merged = Stats::default();
        for p in &parts {
            let wire = serde_json::to_string(&p.to_wire()).unwrap();
            let back: WireStats = serde_json::from_str(&wire).unwrap();
            merged.merge(&Stats::from_wire(&back).unwrap());
        }
        let (a, b) = (&single.hists["rtt"], &merged.hists["rtt"]);
        assert_eq!(a.len(), b.len());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(a.value_at_quantile(q), b.value_at_quantile(q), "q={q}");
        }
        assert_eq!(a, b);
        assert_eq!(merged.get("messages.sent"), 29_999);
    }

    #[test]
    fn max_and_min_merge_as_extremes_not_sums() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        a.max("last_back_us", 70);
        a.max("last_back_us", 50);
        b.max("last_back_us", 90);
        a.min("first_drop_us", 30);
        b.min("first_drop_us", 10);
        b.min("first_drop_us", 20);
        let mut merged = Stats::default();
        merged.merge(&a);
        merged.merge(&b);
        assert_eq!(merged.get("max.last_back_us"), 90);
        assert_eq!(merged.get("min.first_drop_us"), 10);
    }

    #[test]
    fn fail_counts_reason_and_connection() {
        let mut s = Stats::default();
        s.fail("refused", true);
        s.fail("mismatch", false);
        assert_eq!(s.get("failures.refused"), 1);
        assert_eq!(s.get("failures.mismatch"), 1);
        assert_eq!(s.get("connections.failed"), 1);
    }

    #[test]
    fn record_pair_names() {
        let mut s = Stats::default();
        s.record_pair("upgrade", 10, 20);
        assert_eq!(s.hists["upgrade"].max(), 10);
        assert_eq!(s.hists["upgrade_from_intended"].max(), 20);
    }
}
