//! The percentile plot (`percentiles.svg`), drawn by hand.
//!
//! x is log10(1/(1-p)), the HdrHistogram plotter's axis, with a tick per decade
//! (0%, 90%, 99%, 99.9%, ...) up to what the largest sample count resolves; y is
//! latency on a log axis with a labelled tick per decade (0.01 ms, 0.1 ms, 1 ms,
//! 10 ms, ...), so sub-millisecond percentiles are as readable as a slow tail.
//! Each line stops at the `1 - 1/n` quantile of its `n` samples (see
//! [`super::quantile`]) and its last point is the maximum, marked "max".

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::{hgrm, quantile};

const W: f64 = 900.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 60.0;
/// Most decades the x axis spans (99.99999%).
const MAX_X_DECADES: u32 = 7;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// One plotted line: a histogram's percentile points (quantile, microseconds),
/// as `.hgrm` lists them, with its sample count and maximum.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Histogram name.
    pub name: String,
    /// Samples recorded.
    pub count: u64,
    /// Largest sample, microseconds (highest equivalent value, as `.hgrm` prints it).
    pub max_us: u64,
    /// `(quantile, value_us)` in increasing quantile order.
    pub points: Vec<(f64, u64)>,
}

impl Series {
    /// The points of `h` (microseconds), the same ones its `.hgrm` file lists.
    pub fn from_hist(name: &str, h: &Histogram<u64>) -> Series {
        Series {
            name: name.into(),
            count: h.len(),
            max_us: h.max(),
            points: h
                .iter_quantiles(hgrm::TICKS_PER_HALF)
                .map(|v| (v.quantile_iterated_to(), v.value_iterated_to()))
                .collect(),
        }
    }

    /// The points of a `.hgrm` file written by [`hgrm::render`] (values in ms), so a
    /// committed run can be re-plotted without its histograms. `None` if it has no rows.
    pub fn from_hgrm(name: &str, text: &str) -> Option<Series> {
        let rows = hgrm::parse_rows(text);
        let last = rows.last()?;
        let to_us = |ms: f64| (ms * 1000.0).round() as u64;
        let max_ms = text
            .lines()
            .find_map(|l| l.strip_prefix("#[Max"))
            .and_then(|l| l.trim_start_matches([' ', '=']).split(',').next()?.trim().parse::<f64>().ok())
            .unwrap_or(last.0);
        Some(Series {
            name: name.into(),
            count: last.2,
            max_us: to_us(max_ms),
            points: rows.iter().map(|&(ms, q, _)| (q, to_us(ms))).collect(),
        })
    }

    /// What the plot shows: the points up to the highest quantile the sample count
    /// resolves, then the maximum at that quantile (the "max" point, always last).
    pub fn shown(&self) -> Vec<(f64, u64)> {
        let top = quantile::highest_supported(self.count);
        let mut pts: Vec<(f64, u64)> = self.points.iter().copied().filter(|&(q, _)| q <= top + 1e-12).collect();
        if pts.last() == Some(&(top, self.max_us)) {
            pts.pop();
        }
        pts.push((top, self.max_us));
        pts
    }
}

/// Decades of the x axis for the largest sample count `n`: enough to reach `1 - 1/n`.
pub fn x_decades(n: u64) -> u32 {
    let mut d = 1;
    while d < MAX_X_DECADES && 10u64.pow(d) < n {
        d += 1;
    }
    d
}

/// x position of quantile `q` (0..1) on the log 1/(1-q) axis of `decades` decades.
pub fn x_of(q: f64, decades: u32) -> f64 {
    let d = (1.0 / (1.0 - q.clamp(0.0, 1.0 - 1e-12))).log10().min(f64::from(decades));
    LEFT + d / f64::from(decades) * (W - LEFT - RIGHT)
}

/// Label of the x tick `d` decades in: 0%, 90%, 99%, 99.9%, ...
pub fn x_label(d: u32) -> String {
    match d {
        0 => "0%".into(),
        1 => "90%".into(),
        _ => format!("99{}{}%", if d > 2 { "." } else { "" }, "9".repeat(d as usize - 2)),
    }
}

/// A log latency axis from 10^lo to 10^hi milliseconds (whole decades).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogAxis {
    /// Exponent of the bottom decade, in ms (-3 = 1 us).
    pub lo: i32,
    /// Exponent of the top decade, in ms; always > `lo`.
    pub hi: i32,
}

impl LogAxis {
    /// The whole decades that hold `min_us..=max_us` (values below 1 us count as 1 us,
    /// the histograms' resolution).
    pub fn span(min_us: u64, max_us: u64) -> LogAxis {
        let (min_us, max_us) = (min_us.max(1), max_us.max(min_us.max(1)));
        // Decade exponents in us by integer arithmetic: floor for the bottom, ceil for the top.
        let mut lo = 0;
        while 10u64.pow(lo + 1) <= min_us {
            lo += 1;
        }
        let mut hi = 0;
        while 10u64.pow(hi) < max_us {
            hi += 1;
        }
        let (lo, hi) = (lo as i32 - 3, hi as i32 - 3);
        LogAxis { lo, hi: hi.max(lo + 1) }
    }

    /// Position of `ms` from the bottom (0) to the top (1); values off the axis are clamped.
    pub fn frac(&self, ms: f64) -> f64 {
        let l = ms.max(10f64.powi(self.lo)).log10();
        ((l - f64::from(self.lo)) / f64::from(self.hi - self.lo)).clamp(0.0, 1.0)
    }

    /// y pixel of `ms` in the plot area.
    fn y(&self, ms: f64) -> f64 {
        H - BOTTOM - self.frac(ms) * (H - TOP - BOTTOM)
    }

    /// The labelled decade ticks, bottom to top: (ms, label).
    pub fn ticks(&self) -> Vec<(f64, String)> {
        (self.lo..=self.hi).map(|e| (10f64.powi(e), decade_label(e))).collect()
    }
}

/// "0.001 ms" .. "0.1 ms", "1 ms" .. "100 ms", then "1 s", "10 s", ...
pub fn decade_label(e: i32) -> String {
    if e < 0 {
        format!("{:.*} ms", (-e) as usize, 10f64.powi(e))
    } else if e < 3 {
        format!("{} ms", 10u64.pow(e as u32))
    } else {
        format!("{} s", 10u64.pow(e as u32 - 3))
    }
}

/// Renders the percentile plot of `series` titled `title`.
pub fn render(title: &str, series: &[Series]) -> String {
    let shown: Vec<Vec<(f64, u64)>> = series.iter().map(Series::shown).collect();
    let all = || shown.iter().flatten().map(|p| p.1);
    let y = LogAxis::span(all().min().unwrap_or(1), all().max().unwrap_or(1));
    let decades = x_decades(series.iter().map(|s| s.count).max().unwrap_or(1));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#, esc(title));
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="40" font-size="11" fill="#555">Each line stops at the 1 - 1/n quantile of its n samples; its last point is the maximum.</text>"##
    );
    axes(&mut s, &y, decades);
    for (i, (ser, pts)) in series.iter().zip(&shown).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let xy = |&(q, us): &(f64, u64)| (x_of(q, decades), y.y(us as f64 / 1000.0));
        let line: Vec<String> = pts.iter().map(&xy).map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, line.join(" "));
        if let Some(last) = pts.last() {
            let (x, yy) = xy(last);
            let _ = writeln!(
                s,
                r#"<circle cx="{x:.1}" cy="{yy:.1}" r="3.5" fill="white" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}" font-size="10" fill="{color}">max</text>"#,
                x + 6.0,
                yy + 3.5
            );
        }
        let ly = TOP + 16.0 + 30.0 * i as f64;
        let lx = W - RIGHT + 25.0;
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text><text x="{}" y="{}" font-size="10" fill="#555">n = {}</text>"##,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0,
            esc(&ser.name),
            lx + 25.0,
            ly + 17.0,
            ser.count
        );
    }
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, y: &LogAxis, decades: u32) {
    let (x0, x1, yb) = (LEFT, W - RIGHT, H - BOTTOM);
    for e in y.lo..y.hi {
        for m in 2..=9 {
            let yy = y.y(f64::from(m) * 10f64.powi(e));
            let _ = writeln!(s, r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#f2f2f2"/>"##);
        }
    }
    for d in 0..=decades {
        let q = 1.0 - 10f64.powi(-(d as i32));
        let x = x_of(q, decades);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{yb}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            yb + 18.0,
            x_label(d)
        );
    }
    for (ms, label) in y.ticks() {
        let yy = y.y(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#ccc"/><text x="{}" y="{:.1}" text-anchor="end">{label}</text>"##,
            x0 - 6.0,
            yy + 4.0,
        );
    }
    let _ = writeln!(s, r##"<path d="M{x0} {TOP} V{yb} H{x1}" stroke="#333" fill="none"/>"##);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">Percentile (log 1/(1-p))</text>"#,
        (x0 + x1) / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">Latency (log scale)</text>"#,
        (TOP + yb) / 2.0,
        (TOP + yb) / 2.0
    );
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    fn hist(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = new_hist();
        for v in values {
            h.record(v).unwrap();
        }
        h
    }

    #[test]
    fn x_axis_ticks_are_decades_up_to_the_sample_count() {
        let step = (W - LEFT - RIGHT) / 5.0;
        assert!((x_of(0.0, 5) - LEFT).abs() < 1e-9);
        assert!((x_of(0.9, 5) - (LEFT + step)).abs() < 1e-6);
        assert!((x_of(0.999, 5) - (LEFT + 3.0 * step)).abs() < 1e-6);
        assert!(x_of(1.0, 5) <= W - RIGHT + 1e-6);
        assert_eq!((x_decades(1), x_decades(10), x_decades(11), x_decades(1000)), (1, 1, 2, 3));
        assert_eq!(x_decades(2_166_639), 7);
        assert_eq!(x_decades(u64::MAX), MAX_X_DECADES);
        assert_eq!(
            (x_label(0), x_label(1), x_label(2), x_label(5)),
            ("0%".into(), "90%".into(), "99%".into(), "99.999%".into())
        );
    }

    #[test]
    fn latency_axis_is_logarithmic_in_whole_decades() {
        // 100 us .. 18 ms: 0.1 ms to 100 ms, three decades.
        let a = LogAxis::span(133, 17_855);
        assert_eq!(a, LogAxis { lo: -1, hi: 2 });
        assert!(a.frac(0.1).abs() < 1e-12);
        assert!((a.frac(1.0) - 1.0 / 3.0).abs() < 1e-12);
        assert!((a.frac(10.0) - 2.0 / 3.0).abs() < 1e-12);
        assert!((a.frac(100.0) - 1.0).abs() < 1e-12);
        // Each decade takes the same height; the half of a decade sits at log10(sqrt 10).
        assert!((a.frac(10f64.sqrt()) - 0.5).abs() < 1e-12);
        // Below the axis (and zero) sits on the floor, above it on the ceiling.
        assert_eq!((a.frac(0.0), a.frac(0.01), a.frac(1e6)), (0.0, 0.0, 1.0));
        let labels: Vec<String> = a.ticks().into_iter().map(|t| t.1).collect();
        assert_eq!(labels, ["0.1 ms", "1 ms", "10 ms", "100 ms"]);
        // Exact decades stay on their decade; a single value still gets one decade.
        assert_eq!(LogAxis::span(1000, 10_000), LogAxis { lo: 0, hi: 1 });
        assert_eq!(LogAxis::span(0, 0), LogAxis { lo: -3, hi: -2 });
        assert_eq!(LogAxis::span(5, 5), LogAxis { lo: -3, hi: -2 });
        assert_eq!(decade_label(-2), "0.01 ms");
        assert_eq!(decade_label(3), "1 s");
    }

    #[test]
    fn lines_stop_at_one_minus_one_over_n_and_end_with_max() {
        let h = hist(1..=1000);
        let s = Series::from_hist("rtt", &h);
        let pts = s.shown();
        let top = quantile::highest_supported(1000);
        assert!(pts.iter().all(|p| p.0 <= top + 1e-12), "{pts:?}");
        assert_eq!(*pts.last().unwrap(), (top, h.max()));
        assert!(pts.len() > 10);
        // 1,000 samples: nothing plotted beyond 99.9%, and the axis stops there too.
        assert!(s.points.iter().any(|p| p.0 > top), "the full distribution goes further");
        let svg = render("t", &[s]);
        assert!(svg.contains(">99.9%<") && !svg.contains(">99.99%<"), "{svg}");
        assert!(svg.contains(">max<"));
        // A single sample is its own max.
        let one = Series::from_hist("one", &hist([42]));
        assert_eq!(one.shown(), vec![(0.0, 42)]);
    }

    #[test]
    fn hgrm_round_trips_into_the_same_series() {
        let h = hist((1..5000).map(|v| v * 7));
        let live = Series::from_hist("upgrade", &h);
        let back = Series::from_hgrm("upgrade", &hgrm::render("upgrade", &h)).unwrap();
        assert_eq!((back.count, back.max_us), (live.count, live.max_us));
        assert_eq!(back.points.len(), live.points.len());
        for (a, b) in back.points.iter().zip(&live.points) {
            assert_eq!(a.1, b.1);
            assert!((a.0 - b.0).abs() < 1e-11);
        }
        assert_eq!(Series::from_hgrm("x", "no rows"), None);
    }

    #[test]
    fn renders_one_polyline_per_histogram() {
        let a = hist(1..1000);
        let b = hist((1..1000).map(|v| v * 3));
        let svg = render("t <x>", &[Series::from_hist("rtt", &a), Series::from_hist("rtt_from_intended", &b)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches(">max<").count(), 2);
        assert!(svg.contains("t &lt;x&gt;") && svg.contains("n = 999"));
        assert!(svg.contains(">0.001 ms<") && svg.contains(">1 ms<") && svg.contains(">10 ms<"));
    }
}
