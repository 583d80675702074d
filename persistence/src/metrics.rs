//! Counters and histograms of the group commit, read without locks.
//!
//! Concurrency: only the writer thread and the flusher task update them, with relaxed
//! atomics: a metrics snapshot may be a few operations stale or mix two instants, which
//! is fine for monitoring and keeps the hot path free of locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::Lsn;

/// Upper bounds of the batch size histogram (records per applied batch).
const BATCH_SIZE_BOUNDS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];
/// Upper bounds of the flush duration histogram, in seconds.
const FLUSH_SECONDS_BOUNDS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A snapshot of the log's metrics.
///
/// Histograms are cumulative, Prometheus style: `(le, count of observations <= le)`,
/// without the `+Inf` bucket, whose count is `batches` (resp. `flushes`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WalMetrics {
    /// Records applied to the storage engine.
    pub appended: u64,
    /// Bytes written to the log since the node started (frames included).
    pub appended_bytes: u64,
    /// Every record with an lsn up to this one is durable.
    pub durable_lsn: Lsn,
    /// Group-commit batches applied.
    pub batches: u64,
    /// Flushes (`fsync`s) completed.
    pub flushes: u64,
    pub batch_size_buckets: Vec<(f64, u64)>,
    pub batch_size_sum: u64,
    pub flush_seconds_buckets: Vec<(f64, u64)>,
    pub flush_seconds_sum: f64,
    /// Records and requests waiting in the append queue.
    pub queue_depth: usize,
}

/// The live counters behind [`WalMetrics`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    appended: AtomicU64,
    appended_bytes: AtomicU64,
    batches: AtomicU64,
    flushes: AtomicU64,
    batch_size_sum: AtomicU64,
    batch_size_counts: [AtomicU64; BATCH_SIZE_BOUNDS.len()],
    flush_nanos_sum: AtomicU64,
    flush_counts: [AtomicU64; FLUSH_SECONDS_BOUNDS.len()],
}

impl Counters {
    pub(crate) fn record_batch(&self, records: usize, bytes: usize) {
        let n = records as u64;
        self.appended.fetch_add(n, Ordering::Relaxed);
        self.appended_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_size_sum.fetch_add(n, Ordering::Relaxed);
        if let Some(i) = BATCH_SIZE_BOUNDS
            .iter()
            .position(|&le| records as f64 <= le)
        {
            self.batch_size_counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_flush(&self, took: Duration) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.flush_nanos_sum
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = FLUSH_SECONDS_BOUNDS.iter().position(|&le| secs <= le) {
            self.flush_counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self, durable_lsn: Lsn, queue_depth: usize) -> WalMetrics {
        WalMetrics {
            appended: self.appended.load(Ordering::Relaxed),
            appended_bytes: self.appended_bytes.load(Ordering::Relaxed),
            durable_lsn,
            batches: self.batches.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            batch_size_buckets: cumulative(&BATCH_SIZE_BOUNDS, &self.batch_size_counts),
            batch_size_sum: self.batch_size_sum.load(Ordering::Relaxed),
            flush_seconds_buckets: cumulative(&FLUSH_SECONDS_BOUNDS, &self.flush_counts),
            flush_seconds_sum: self.flush_nanos_sum.load(Ordering::Relaxed) as f64 / 1e9,
            queue_depth,
        }
    }
}

fn cumulative(bounds: &[f64], counts: &[AtomicU64]) -> Vec<(f64, u64)> {
    let mut total = 0;
    bounds
        .iter()
        .zip(counts)
        .map(|(&le, c)| {
            total += c.load(Ordering::Relaxed);
            (le, total)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let c = Counters::default();
        c.record_batch(1, 100);
        c.record_batch(3, 300);
        c.record_batch(5000, 500_000);
        c.record_flush(Duration::from_micros(300));
        let m = c.snapshot(9, 2);
        assert_eq!(m.appended, 5004);
        assert_eq!(m.appended_bytes, 500_400);
        assert_eq!(m.batches, 3);
        assert_eq!(m.batch_size_sum, 5004);
        assert_eq!(m.batch_size_buckets[0], (1.0, 1));
        assert_eq!(m.batch_size_buckets[2], (4.0, 2));
        // 5000 is above the last bound: counted only in +Inf (= batches).
        assert_eq!(m.batch_size_buckets.last().unwrap().1, 2);
        assert_eq!(m.flush_seconds_buckets[1].1, 0);
        assert_eq!(m.flush_seconds_buckets[2].1, 1);
        assert!((m.flush_seconds_sum - 0.0003).abs() < 1e-9);
        assert_eq!((m.durable_lsn, m.queue_depth), (9, 2));
    }
}
