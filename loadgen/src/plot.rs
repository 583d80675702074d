//! A self-contained latency plot (no script, no external resource): latency by
//! percentile on a "nines" axis (90, 99, 99.9, ...), overall and per operation, then
//! requests and p99 second by second. SVG, or the SVG inside an HTML page.

use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::stats::Stats;

const W: f64 = 800.0;
const H: f64 = 320.0;
const PAD: f64 = 64.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

pub fn render(stats: &Stats, title: &str, html: bool) -> String {
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{PAD}\" y=\"24\" font-size=\"15\">{}</text>\n{}{}</svg>\n",
        2.0 * H + 40.0,
        escape(title),
        percentile_panel(stats, 40.0),
        timeline_panel(stats, 40.0 + H),
    );
    if html {
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head><body>\n{svg}</body></html>\n",
            escape(title)
        )
    } else {
        svg
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn frame(out: &mut String, top: f64, x_label: &str, y_label: &str) {
    let _ = writeln!(
        out,
        "<rect x=\"{PAD}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>",
        top + 20.0,
        W - 2.0 * PAD,
        H - 80.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>",
        W / 2.0,
        top + H - 22.0
    );
    let _ = writeln!(
        out,
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{y_label}</text>",
        top + H / 2.0,
        top + H / 2.0
    );
}

/// Latency against percentile, with x = log10(1 / (1 - q)): 0 at p0, 1 at p90, 2 at p99.
fn percentile_panel(stats: &Stats, top: f64) -> String {
    let mut out = String::new();
    frame(&mut out, top, "percentile", "latency (ms)");
    if stats.overall.is_empty() {
        return out;
    }
    let mut series: Vec<(&str, &Histogram<u64>)> = vec![("all", &stats.overall)];
    if stats.by_op.len() > 1 {
        series.extend(stats.by_op.iter().map(|(op, o)| (*op, &o.latency)));
    }
    // Up to the nines the data supports (p99.999 needs 100,000 samples), at least 3.
    let max_nines = (stats.overall.len() as f64).log10().floor().clamp(3.0, 6.0);
    let y_max = (stats.overall.max() as f64 / 1000.0).max(0.001) * 1.05;
    let (x0, x1) = (PAD, W - PAD);
    let (y0, y1) = (top + H - 60.0, top + 20.0);
    for (k, (name, h)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut points = String::new();
        for i in 0..=240 {
            let nines = max_nines * f64::from(i) / 240.0;
            let q = 1.0 - 10f64.powf(-nines);
            let ms = h.value_at_quantile(q) as f64 / 1000.0;
            let x = x0 + (x1 - x0) * nines / max_nines;
            let y = y0 - (y0 - y1) * ms / y_max;
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let width = if k == 0 { 2.5 } else { 1.5 };
        let _ = writeln!(
            out,
            "<polyline points=\"{points}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\"/>"
        );
        let ly = y1 + 14.0 + 15.0 * k as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"3\" fill=\"{color}\"/><text x=\"{}\" y=\"{ly:.1}\">{} ({} requests)</text>",
            x0 + 10.0,
            ly - 4.0,
            x0 + 26.0,
            escape(name),
            h.len()
        );
    }
    let labels = ["0", "90", "99", "99.9", "99.99", "99.999", "99.9999"];
    for (n, label) in labels.iter().enumerate().take(max_nines as usize + 1) {
        let x = x0 + (x1 - x0) * n as f64 / max_nines;
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            y0 + 16.0
        );
    }
    for f in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let y = y0 - (y0 - y1) * f;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.2}</text>",
            x0 - 4.0,
            y + 4.0,
            y_max * f
        );
    }
    out
}

/// Requests per second (bars, left scale) and p99 per second (line, right scale).
fn timeline_panel(stats: &Stats, top: f64) -> String {
    let mut out = String::new();
    frame(
        &mut out,
        top,
        "second of the run",
        "requests/s (bars), p99 ms (red line)",
    );
    let n = stats.timeline.len();
    if n == 0 {
        return out;
    }
    let max_rps = stats
        .timeline
        .iter()
        .map(|s| s.requests)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let p99s: Vec<f64> = stats
        .timeline
        .iter()
        .map(|s| s.latency.value_at_quantile(0.99) as f64 / 1000.0)
        .collect();
    let max_p99 = p99s.iter().copied().fold(0.001, f64::max) * 1.05;
    let (x0, x1) = (PAD, W - PAD);
    let (y0, y1) = (top + H - 60.0, top + 20.0);
    let bw = (x1 - x0) / n as f64;
    let mut line = String::new();
    for (i, s) in stats.timeline.iter().enumerate() {
        let x = x0 + bw * i as f64;
        let bh = (y0 - y1) * s.requests as f64 / max_rps;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#aec7e8\"><title>second {i}: {} requests, {} ok, p99 {:.3} ms</title></rect>",
            y0 - bh,
            (bw - 1.0).max(0.5),
            s.requests,
            s.ok,
            p99s[i]
        );
        let y = y0 - (y0 - y1) * p99s[i] / max_p99;
        let _ = write!(line, "{:.1},{y:.1} ", x + bw / 2.0);
    }
    let _ = writeln!(
        out,
        "<polyline points=\"{line}\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\"/>"
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max_rps:.0}/s</text>",
        x0 - 4.0,
        y1 + 10.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" fill=\"#d62728\">{max_p99:.2} ms</text>",
        x1 + 4.0,
        y1 + 10.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{x1}\" y=\"{}\" text-anchor=\"end\">{n} s</text>",
        y0 + 16.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn renders_self_contained_svg_and_html() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0);
        for i in 0..1000u64 {
            let op = if i % 2 == 0 { "browse" } else { "pay" };
            s.record(op, t0, t0 + Duration::from_micros(500 + i), "ok");
        }
        let svg = render(&s, "mixed <test>", false);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One curve overall and one per operation, plus the p99 line.
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("&lt;test&gt;") && svg.contains("browse (500 requests)"));
        assert!(!svg.contains("<script"));
        let html = render(&s, "t", true);
        assert!(html.starts_with("<!doctype html>") && html.contains("<svg"));
        assert!(!html.contains("<script"));
        // An empty run still renders.
        assert!(render(&Stats::new(t0), "empty", false).starts_with("<svg"));
    }
}
