//! A percentile plot as SVG, drawn by hand: x is log10(1/(1-p)) with ticks at
//! 0%, 90%, 99%, 99.9%, 99.99% and 99.999% (the HdrHistogram plotter's axis),
//! y is latency in milliseconds, one line per histogram.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
/// Decades on the x axis: 0% .. 99.999%.
const X_DECADES: f64 = 5.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// x position of quantile `q` (0..1) on the log 1/(1-q) axis.
pub fn x_of(q: f64) -> f64 {
    let decades = (1.0 / (1.0 - q.min(1.0 - 1e-9))).log10().min(X_DECADES);
    LEFT + decades / X_DECADES * (W - LEFT - RIGHT)
}

/// Renders the percentile plot of `hists` (name, microseconds) titled `title`.
pub fn render(title: &str, hists: &[(&str, &Histogram<u64>)]) -> String {
    let max_ms = hists.iter().map(|(_, h)| h.max() as f64 / 1000.0).fold(0.0, f64::max).max(0.001);
    let y_top = nice_ceiling(max_ms);
    let y_of = |ms: f64| H - BOTTOM - ms / y_top * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#, esc(title));
    axes(&mut s, y_top, &y_of);
    for (i, (name, h)) in hists.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut pts = String::new();
        for v in h.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let _ = write!(pts, "{:.1},{:.1} ", x_of(q), y_of(v.value_iterated_to() as f64 / 1000.0));
        }
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.trim_end());
        let ly = TOP + 20.0 + 18.0 * i as f64;
        let lx = W - RIGHT + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, y_top: f64, y_of: &dyn Fn(f64) -> f64) {
    let (x0, x1, yb) = (LEFT, W - RIGHT, H - BOTTOM);
    let _ = writeln!(s, r##"<path d="M{x0} {TOP} V{yb} H{x1}" stroke="#333" fill="none"/>"##);
    for (q, label) in
        [(0.0, "0%"), (0.9, "90%"), (0.99, "99%"), (0.999, "99.9%"), (0.9999, "99.99%"), (0.99999, "99.999%")]
    {
        let x = x_of(q);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{yb}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            yb + 18.0
        );
    }
    for i in 0..=5 {
        let ms = y_top * f64::from(i) / 5.0;
        let y = y_of(ms);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{x1}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            y + 4.0,
            fmt_ms(ms)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">Percentile (log 1/(1-p))</text>"#,
        (x0 + x1) / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">Latency (ms)</text>"#,
        (TOP + yb) / 2.0,
        (TOP + yb) / 2.0
    );
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0}")
    } else if ms >= 0.1 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// The smallest 1, 2 or 5 times a power of ten that is >= `v`.
pub fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * p).find(|c| *c >= v * 0.999_999).unwrap_or(10.0 * p)
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_hist;

    #[test]
    fn axis_ticks_are_decades() {
        let step = (W - LEFT - RIGHT) / X_DECADES;
        assert!((x_of(0.0) - LEFT).abs() < 1e-9);
        assert!((x_of(0.9) - (LEFT + step)).abs() < 1e-6);
        assert!((x_of(0.999) - (LEFT + 3.0 * step)).abs() < 1e-6);
        assert!(x_of(1.0) <= W - RIGHT + 1e-6);
    }

    #[test]
    fn renders_one_polyline_per_histogram() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..1000 {
            a.record(v).unwrap();
            b.record(v * 3).unwrap();
        }
        let svg = render("t <x>", &[("rtt", &a), ("rtt_from_intended", &b)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("99.99%") && svg.contains("t &lt;x&gt;"));
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(0.011), 0.02);
    }
}
