//! The Prometheus text exposition format (0.0.4), written once: families
//! with `# HELP`/`# TYPE`, samples with labels, and histograms computed from
//! an HDR histogram at scrape time. Every layer renders its own metrics
//! through this; nothing else writes the format by hand.

use std::fmt::{Display, Write};

use hdrhistogram::Histogram;

/// Prefix of every metric name.
pub const PREFIX: &str = "ringside_";

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets on restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, sum and count.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One label: name and value (values are ids, codes and numbers that need
/// no escaping; [`Text::sample`] escapes anyway).
pub type Label<'a> = (&'a str, &'a dyn Display);

/// A text exposition being written.
#[derive(Debug, Default)]
pub struct Text {
    out: String,
}

impl Text {
    /// An empty exposition with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Text { out: String::with_capacity(capacity) }
    }

    /// Starts the family `name` (without the prefix).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {PREFIX}{name} {help}\n# TYPE {PREFIX}{name} {}", kind.name());
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[Label], value: impl Display) -> &mut Self {
        let _ = write!(self.out, "{PREFIX}{name}");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// The buckets (bounds in seconds), sum and count of `h`, whose values
    /// are in units of `unit` seconds.
    pub fn histogram(&mut self, name: &str, labels: &[Label], h: &Histogram<u64>, unit: f64, buckets: &[f64]) {
        for b in buckets {
            let bound = (b / unit) as u64;
            let n = if h.is_empty() { 0 } else { h.count_between(0, bound) };
            let _ = write!(self.out, "{PREFIX}{name}_bucket");
            self.labels(labels, Some(&b.to_string()));
            let _ = writeln!(self.out, " {n}");
        }
        let _ = write!(self.out, "{PREFIX}{name}_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {}", h.len());
        let sum = h.mean() * h.len() as f64 * unit;
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, h.len());
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }

    fn labels(&mut self, labels: &[Label], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        let le = le.map(|v| ("le", v.to_string()));
        for (k, v) in labels.iter().map(|(k, v)| (*k, v.to_string())).chain(le) {
            if !first {
                self.out.push(',');
            }
            first = false;
            let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(self.out, "{k}=\"{v}\"");
        }
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_samples_and_cumulative_buckets() {
        let mut t = Text::default();
        t.family("x_total", Kind::Counter, "Things.").sample("x_total", &[("code", &"a\"b")], 3);
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
        h.record(300).unwrap();
        h.record(3_000).unwrap();
        t.histogram("lat_seconds", &[("shard", &0)], &h, 1e-6, &[0.001, 0.01]);
        let s = t.finish();
        assert!(s.starts_with("# HELP ringside_x_total Things.\n# TYPE ringside_x_total counter\n"), "{s}");
        assert!(s.contains("ringside_x_total{code=\"a\\\"b\"} 3\n"), "{s}");
        assert!(s.contains("ringside_lat_seconds_bucket{shard=\"0\",le=\"0.001\"} 1\n"), "{s}");
        assert!(s.contains("ringside_lat_seconds_bucket{shard=\"0\",le=\"0.01\"} 2\n"), "{s}");
        assert!(s.contains("ringside_lat_seconds_bucket{shard=\"0\",le=\"+Inf\"} 2\n"), "{s}");
        assert!(s.contains("ringside_lat_seconds_count{shard=\"0\"} 2\n"), "{s}");
    }
}
