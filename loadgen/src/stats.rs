//! Latency histograms (microseconds, 3 significant digits), outcome counts per
//! operation, and a per-second timeline.
//!
//! One `Stats` for the whole run, behind a std `Mutex` held only for a `record` (no
//! `.await` inside): on the default single-threaded runtime it is never contended, and a
//! single set of histograms keeps memory flat however many clients run. (A histogram of
//! this range is ~128 KiB; one per client per second would not be.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded exactly: an hour. Longer ones are clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// Latencies in microseconds, three significant digits.
pub fn histogram() -> Histogram<u64> {
    // Valid bounds: low >= 1, high >= 2 * low, sigfig <= 5.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// The per-second histograms only feed a p99 line: two digits and 32-bit counts keep a
/// long run's timeline small (~10 KiB a second).
fn second_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("valid histogram bounds")
}

pub struct Second {
    pub requests: u64,
    pub ok: u64,
    pub latency: Histogram<u32>,
}

pub struct Op {
    pub latency: Histogram<u64>,
    pub outcomes: BTreeMap<String, u64>,
}

pub struct Stats {
    pub start: Instant,
    pub overall: Histogram<u64>,
    pub by_op: BTreeMap<&'static str, Op>,
    pub outcomes: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
    /// When each outcome was first seen, from the start (a sale's `sold_out` tells when
    /// it sold out).
    pub first_seen: BTreeMap<String, Duration>,
    /// When the last `ok` answer arrived, from the start.
    pub last_ok: Option<Duration>,
}

fn count(map: &mut BTreeMap<String, u64>, outcome: &str) {
    match map.get_mut(outcome) {
        Some(n) => *n += 1,
        None => {
            map.insert(outcome.to_owned(), 1);
        }
    }
}

impl Stats {
    pub fn new(start: Instant) -> Stats {
        Stats {
            start,
            overall: histogram(),
            by_op: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            timeline: Vec::new(),
            first_seen: BTreeMap::new(),
            last_ok: None,
        }
    }

    /// One request of `op`, meant to start at `intended` (the open loop's schedule, or
    /// the actual send time in a closed loop), finished at `done`.
    pub fn record(&mut self, op: &'static str, intended: Instant, done: Instant, outcome: &str) {
        let us = (done.saturating_duration_since(intended).as_micros() as u64).clamp(1, MAX_US);
        self.overall.saturating_record(us);
        let o = self.by_op.entry(op).or_insert_with(|| Op {
            latency: histogram(),
            outcomes: BTreeMap::new(),
        });
        o.latency.saturating_record(us);
        count(&mut o.outcomes, outcome);
        count(&mut self.outcomes, outcome);
        let at = done.saturating_duration_since(self.start);
        if !self.first_seen.contains_key(outcome) {
            self.first_seen.insert(outcome.to_owned(), at);
        }
        if outcome == "ok" {
            self.last_ok = Some(self.last_ok.map_or(at, |l| l.max(at)));
        }
        let sec = at.as_secs() as usize;
        while self.timeline.len() <= sec {
            self.timeline.push(Second {
                requests: 0,
                ok: 0,
                latency: second_histogram(),
            });
        }
        let s = &mut self.timeline[sec];
        s.requests += 1;
        if outcome == "ok" {
            s.ok += 1;
        }
        s.latency.saturating_record(us);
    }

    pub fn ok(&self) -> u64 {
        self.outcomes.get("ok").copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.overall.len()
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |us: u64| us as f64 / 1000.0;
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    }
}

/// Seconds, never zero (a divisor).
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_add_up_and_percentiles_are_in_ms() {
        let t0 = Instant::now();
        let mut a = Stats::new(t0);
        for i in 1..=100u64 {
            a.record("buy", t0, t0 + Duration::from_micros(i * 1000), "ok");
        }
        a.record(
            "browse",
            t0,
            t0 + Duration::from_millis(1002),
            "limit_exceeded",
        );
        assert_eq!((a.total(), a.ok()), (101, 100));
        assert_eq!(a.outcomes["limit_exceeded"], 1);
        assert_eq!(a.by_op["browse"].outcomes["limit_exceeded"], 1);
        assert_eq!(a.by_op["buy"].latency.len(), 100);
        let p = percentiles(&a.by_op["buy"].latency);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        // Three significant digits over the whole range.
        assert!((percentiles(&a.overall).max - 1002.0).abs() < 1.0);
        assert_eq!(a.timeline.len(), 2);
        assert_eq!(a.timeline.iter().map(|s| s.requests).sum::<u64>(), 101);
        assert_eq!(a.timeline[1].ok, 0);
    }

    #[test]
    fn a_latency_beyond_the_range_is_clamped_not_lost() {
        let t0 = Instant::now();
        let done = t0 + Duration::from_secs(7200);
        let mut a = Stats::new(done);
        a.record("buy", t0, done, "timeout");
        assert_eq!(a.total(), 1);
        assert!(percentiles(&a.overall).max >= 3_599_000.0);
    }
}
