//! A self-contained latency plot: the latency by percentile (a "nines" axis: 90, 99,
//! 99.9, ...) and throughput and p99 second by second. SVG, or SVG inside an HTML page.

use std::fmt::Write;

use crate::stats::Stats;

const W: f64 = 760.0;
const H: f64 = 300.0;
const PAD: f64 = 60.0;

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
    let h = &stats.overall;
    if h.is_empty() {
        return out;
    }
    let max_nines = 5.0;
    let y_max = (h.max() as f64 / 1000.0).max(0.001) * 1.05;
    let (x0, x1) = (PAD, W - PAD);
    let (y0, y1) = (top + H - 60.0, top + 20.0);
    let mut points = String::new();
    for i in 0..=200 {
        let nines = max_nines * f64::from(i) / 200.0;
        let q = 1.0 - 10f64.powf(-nines);
        let ms = h.value_at_quantile(q) as f64 / 1000.0;
        let x = x0 + (x1 - x0) * nines / max_nines;
        let y = y0 - (y0 - y1) * ms / y_max;
        let _ = write!(points, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        out,
        "<polyline points=\"{points}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>"
    );
    for (nines, label) in [
        (0.0, "0"),
        (1.0, "90"),
        (2.0, "99"),
        (3.0, "99.9"),
        (4.0, "99.99"),
        (5.0, "99.999"),
    ] {
        let x = x0 + (x1 - x0) * nines / max_nines;
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            y0 + 16.0
        );
    }
    for f in [0.0, 0.5, 1.0] {
        let y = y0 - (y0 - y1) * f;
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{y:.1}\" text-anchor=\"end\">{:.2}</text>",
            x0 - 4.0,
            y_max * f
        );
    }
    out
}

/// Requests per second (bars) and p99 per second (line, right scale).
fn timeline_panel(stats: &Stats, top: f64) -> String {
    let mut out = String::new();
    frame(
        &mut out,
        top,
        "second of the run",
        "requests/s (bars), p99 ms (line)",
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
    let max_p99 = p99s.iter().cloned().fold(0.001, f64::max);
    let (x0, x1) = (PAD, W - PAD);
    let (y0, y1) = (top + H - 60.0, top + 20.0);
    let bw = (x1 - x0) / n as f64;
    let mut line = String::new();
    for (i, s) in stats.timeline.iter().enumerate() {
        let x = x0 + bw * i as f64;
        let bh = (y0 - y1) * s.requests as f64 / max_rps;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#aec7e8\"/>",
            y0 - bh,
            (bw - 1.0).max(0.5)
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
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max_rps:.0} req/s</text>",
        x0 - 4.0,
        y1 + 10.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\">{max_p99:.2} ms</text>",
        x1 + 4.0,
        y1 + 10.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{n} s</text>",
        x1,
        y0 + 16.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn renders_svg_and_html() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0);
        for i in 0..1000u64 {
            s.record("buy", t0, t0 + Duration::from_micros(500 + i), "ok");
        }
        let svg = render(&s, "flash-sale <test>", false);
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("&lt;test&gt;")
        );
        let html = render(&s, "t", true);
        assert!(html.starts_with("<!doctype html>") && html.contains("<svg"));
    }
}
