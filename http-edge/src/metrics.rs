//! Prometheus text exposition: HTTP requests by route and status with latency
//! histograms, the log's group-commit figures, active actors and orders by status.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Series {
    count: AtomicU64,
    sum_micros: AtomicU64,
    buckets: [AtomicU64; BUCKETS.len()],
}

/// Per (route, status) series. The map only grows when a new pair is first seen (a
/// bounded set: routes x statuses), so requests take the read side, uncontended.
#[derive(Default)]
pub struct HttpMetrics {
    series: RwLock<HashMap<(String, u16), Arc<Series>>>,
}

impl HttpMetrics {
    pub fn observe(&self, route: &str, status: u16, elapsed: Duration) {
        let key = (route.to_owned(), status);
        let found = self.series.read().ok().and_then(|m| m.get(&key).cloned());
        let series = match found {
            Some(s) => s,
            None => match self.series.write() {
                Ok(mut m) => m.entry(key).or_default().clone(),
                Err(_) => return,
            },
        };
        let secs = elapsed.as_secs_f64();
        series.count.fetch_add(1, Ordering::Relaxed);
        series
            .sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                series.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn render(&self, out: &mut String) {
        let Ok(map) = self.series.read() else { return };
        let mut keys: Vec<_> = map.keys().cloned().collect();
        keys.sort();
        out.push_str("# HELP shardmall_http_requests_total HTTP requests by route and status.\n# TYPE shardmall_http_requests_total counter\n");
        for k in &keys {
            let s = &map[k];
            let _ = writeln!(
                out,
                "shardmall_http_requests_total{{route=\"{}\",status=\"{}\"}} {}",
                k.0,
                k.1,
                s.count.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP shardmall_http_request_duration_seconds HTTP request latency.\n# TYPE shardmall_http_request_duration_seconds histogram\n");
        for k in &keys {
            let s = &map[k];
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "shardmall_http_request_duration_seconds_bucket{{route=\"{}\",status=\"{}\",le=\"{le}\"}} {}", k.0, k.1, s.buckets[i].load(Ordering::Relaxed));
            }
            let count = s.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "shardmall_http_request_duration_seconds_bucket{{route=\"{}\",status=\"{}\",le=\"+Inf\"}} {count}", k.0, k.1);
            let _ = writeln!(
                out,
                "shardmall_http_request_duration_seconds_sum{{route=\"{}\",status=\"{}\"}} {}",
                k.0,
                k.1,
                s.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(out, "shardmall_http_request_duration_seconds_count{{route=\"{}\",status=\"{}\"}} {count}", k.0, k.1);
        }
    }
}

/// Middleware: times every request under its route template.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .http_metrics
        .observe(&route, resp.status().as_u16(), start.elapsed());
    resp
}

pub async fn render(state: &AppState) -> String {
    let mut out = String::with_capacity(8192);
    state.http_metrics.render(&mut out);
    let wal = state.shop.wal().metrics();
    let _ = writeln!(
        out,
        "# TYPE shardmall_wal_appended_total counter\nshardmall_wal_appended_total {}",
        wal.appended
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_wal_durable_lsn gauge\nshardmall_wal_durable_lsn {}",
        wal.durable_lsn
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_wal_flushes_total counter\nshardmall_wal_flushes_total {}",
        wal.flushes
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_wal_queue_depth gauge\nshardmall_wal_queue_depth {}",
        wal.queue_depth
    );
    out.push_str("# HELP shardmall_wal_batch_size Records per group-commit batch.\n# TYPE shardmall_wal_batch_size histogram\n");
    for (le, n) in &wal.batch_size_buckets {
        let _ = writeln!(out, "shardmall_wal_batch_size_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "shardmall_wal_batch_size_bucket{{le=\"+Inf\"}} {}",
        wal.batches
    );
    let _ = writeln!(
        out,
        "shardmall_wal_batch_size_sum {}\nshardmall_wal_batch_size_count {}",
        wal.batch_size_sum, wal.batches
    );
    out.push_str("# HELP shardmall_wal_flush_seconds Latency of one log flush.\n# TYPE shardmall_wal_flush_seconds histogram\n");
    for (le, n) in &wal.flush_seconds_buckets {
        let _ = writeln!(out, "shardmall_wal_flush_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "shardmall_wal_flush_seconds_bucket{{le=\"+Inf\"}} {}",
        wal.flushes
    );
    let _ = writeln!(
        out,
        "shardmall_wal_flush_seconds_sum {}\nshardmall_wal_flush_seconds_count {}",
        wal.flush_seconds_sum, wal.flushes
    );
    let m = state.shop.metrics();
    let _ = writeln!(
        out,
        "# TYPE shardmall_active_actors gauge\nshardmall_active_actors {}",
        m.active_actors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_actor_activations_total counter\nshardmall_actor_activations_total {}",
        m.activations.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_actor_passivations_total counter\nshardmall_actor_passivations_total {}",
        m.passivations.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_actor_failures_total counter\nshardmall_actor_failures_total {}",
        m.actor_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_low_stock_alerts_total counter\nshardmall_low_stock_alerts_total {}",
        m.low_stock_alerts.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# TYPE shardmall_timers_fired_total counter\nshardmall_timers_fired_total {}",
        m.timers_fired.load(Ordering::Relaxed)
    );
    out.push_str("# TYPE shardmall_orders gauge\n");
    for (status, n) in m.orders_by_status() {
        let _ = writeln!(out, "shardmall_orders{{status=\"{status}\"}} {n}");
    }
    out
}
