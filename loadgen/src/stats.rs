//! Latency histograms (microseconds), outcome counts and a per-second timeline. Each
//! worker records into its own [`Stats`]; they are merged at the end, so recording takes
//! no lock. [`Live`] holds the few atomic counters the progress bar reads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Latencies up to a minute, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Default)]
pub struct Live {
    pub done: AtomicU64,
    pub ok: AtomicU64,
}

pub struct Second {
    pub requests: u64,
    pub ok: u64,
    pub latency: Histogram<u64>,
}

pub struct Stats {
    pub start: Instant,
    pub overall: Histogram<u64>,
    pub by_op: BTreeMap<&'static str, Histogram<u64>>,
    pub outcomes: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
}

impl Stats {
    pub fn new(start: Instant) -> Stats {
        Stats {
            start,
            overall: histogram(),
            by_op: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            timeline: Vec::new(),
        }
    }

    /// One request of `op`, meant to start at `intended` (the open loop's schedule, or
    /// the actual send time in a closed loop), finished at `done`.
    pub fn record(&mut self, op: &'static str, intended: Instant, done: Instant, outcome: &str) {
        let us = done.saturating_duration_since(intended).as_micros() as u64;
        let us = us.max(1);
        self.overall.saturating_record(us);
        self.by_op
            .entry(op)
            .or_insert_with(histogram)
            .saturating_record(us);
        match self.outcomes.get_mut(outcome) {
            Some(n) => *n += 1,
            None => {
                self.outcomes.insert(outcome.to_owned(), 1);
            }
        }
        let sec = done.saturating_duration_since(self.start).as_secs() as usize;
        while self.timeline.len() <= sec {
            self.timeline.push(Second {
                requests: 0,
                ok: 0,
                latency: histogram(),
            });
        }
        let s = &mut self.timeline[sec];
        s.requests += 1;
        if outcome == "ok" {
            s.ok += 1;
        }
        s.latency.saturating_record(us);
    }

    pub fn merge(&mut self, other: Stats) {
        let _ = self.overall.add(&other.overall);
        for (op, h) in other.by_op {
            let _ = self.by_op.entry(op).or_insert_with(histogram).add(&h);
        }
        for (k, n) in other.outcomes {
            *self.outcomes.entry(k).or_default() += n;
        }
        for (i, s) in other.timeline.into_iter().enumerate() {
            while self.timeline.len() <= i {
                self.timeline.push(Second {
                    requests: 0,
                    ok: 0,
                    latency: histogram(),
                });
            }
            let t = &mut self.timeline[i];
            t.requests += s.requests;
            t.ok += s.ok;
            let _ = t.latency.add(&s.latency);
        }
    }

    pub fn ok(&self) -> u64 {
        self.outcomes.get("ok").copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.overall.len()
    }
}

/// The percentiles a summary shows, in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    serde_json::json!({
        "p50": ms(h.value_at_quantile(0.50)),
        "p90": ms(h.value_at_quantile(0.90)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

impl Live {
    pub fn add(&self, ok: bool) {
        self.done.fetch_add(1, Ordering::Relaxed);
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_stats_add_up_and_percentiles_are_in_ms() {
        let t0 = Instant::now();
        let mut a = Stats::new(t0);
        let mut b = Stats::new(t0);
        for i in 1..=100u64 {
            a.record("buy", t0, t0 + Duration::from_micros(i * 1000), "ok");
        }
        b.record("buy", t0, t0 + Duration::from_millis(2), "sold_out");
        a.merge(b);
        assert_eq!((a.total(), a.ok()), (101, 100));
        assert_eq!(a.outcomes["sold_out"], 1);
        let p = percentiles(&a.overall);
        assert!((p["p50"].as_f64().unwrap() - 50.0).abs() < 1.0, "{p}");
        assert!((p["max"].as_f64().unwrap() - 100.0).abs() < 0.5, "{p}");
        assert_eq!(a.timeline.iter().map(|s| s.requests).sum::<u64>(), 101);
    }
}
