//! Durable append throughput and latency of the write-ahead log.
//!
//! For each durability mode and appender count, every appender loops
//! `append(...).await` then `ack.durable().await` with a ~100-byte payload.
//!
//!     cargo bench -p shardmall-persistence --bench wal_append
//!
//! Environment: `WAL_BENCH_SECS` (seconds per run, default 3), `WAL_BENCH_APPENDERS`
//! (comma-separated, default `1,64,1024`), `WAL_BENCH_MODES` (default `sync,relaxed`),
//! `WAL_BENCH_DIR` (parent of the temporary databases; default the system temp dir,
//! so set it to the disk you want to measure).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use shardmall_persistence::{Durability, Record, Wal, WalConfig};

struct Run {
    mode: Durability,
    appenders: usize,
    appends: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
    avg_batch: f64,
    flushes: u64,
    flush_ms: f64,
}

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad value {s:?} in {name}"))
        })
        .collect()
}

async fn run(mode: Durability, appenders: usize, secs: f64) -> Run {
    let dir = match std::env::var("WAL_BENCH_DIR") {
        Ok(parent) => tempfile::tempdir_in(parent),
        Err(_) => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let mut cfg = WalConfig::new(dir.path());
    cfg.durability = mode;
    let wal = Wal::open(cfg).expect("open the log");
    let stop = Arc::new(AtomicBool::new(false));
    let payload = vec![0x5a; 100];
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(appenders);
    for i in 0..appenders {
        let wal = wal.clone();
        let stop = stop.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let entity = format!("sku-{i}").into_bytes();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let rec = Record {
                    partition: (i % 256) as u16,
                    entity: entity.clone(),
                    payload: payload.clone(),
                    aux: Vec::new(),
                    also: vec![],
                };
                let ack = wal.append(rec).await.expect("append");
                ack.durable().await.expect("durable");
                hist.saturating_record(t.elapsed().as_micros() as u64);
                n += 1;
            }
            (n, hist)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut appends = 0;
    let mut latency_us =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    for t in tasks {
        let (n, h) = t.await.expect("appender task");
        appends += n;
        latency_us.add(h).expect("same histogram bounds");
    }
    let elapsed = started.elapsed();
    let m = wal.metrics();
    wal.shutdown().await.expect("shutdown");
    Run {
        mode,
        appenders,
        appends,
        elapsed,
        latency_us,
        avg_batch: m.batch_size_sum as f64 / m.batches.max(1) as f64,
        flushes: m.flushes,
        flush_ms: m.flush_seconds_sum * 1e3 / m.flushes.max(1) as f64,
    }
}

fn main() {
    let secs: f64 = std::env::var("WAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let modes: Vec<Durability> = env_list("WAL_BENCH_MODES", "sync,relaxed");
    let counts: Vec<usize> = env_list("WAL_BENCH_APPENDERS", "1,64,1024");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "wal_append: {secs} s per run, 100-byte payloads, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<8} {:>9} {:>12} {:>9} {:>9} {:>10} {:>10} {:>9}",
        "mode", "appenders", "appends/s", "p50 µs", "p99 µs", "avg batch", "flushes/s", "flush ms"
    );
    let mut baseline = None;
    for &mode in &modes {
        for &n in &counts {
            let r = rt.block_on(run(mode, n, secs));
            let rate = r.appends as f64 / r.elapsed.as_secs_f64();
            println!(
                "{:<8} {:>9} {:>12.0} {:>9} {:>9} {:>10.1} {:>10.0} {:>9.2}",
                r.mode.to_string(),
                r.appenders,
                rate,
                r.latency_us.value_at_quantile(0.50),
                r.latency_us.value_at_quantile(0.99),
                r.avg_batch,
                r.flushes as f64 / r.elapsed.as_secs_f64(),
                r.flush_ms,
            );
            if r.mode == Durability::Sync {
                if r.appenders == 1 {
                    baseline = Some(rate);
                } else if let (Some(base), 1024) = (baseline, r.appenders) {
                    println!(
                        "         sync x{:.1} the 1-appender rate with 1024 appenders",
                        rate / base
                    );
                }
            }
        }
    }
}
