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
        "# TYPE shardmall_wal_info gauge\nshardmall_wal_info{{durability=\"{}\"}} 1",
        state.shop.wal().durability()
    );
    scalar(
        &mut out,
        "shardmall_wal_appended_total",
        "counter",
        wal.appended,
    );
    scalar(
        &mut out,
        "shardmall_wal_durable_lsn",
        "gauge",
        wal.durable_lsn,
    );
    scalar(
        &mut out,
        "shardmall_wal_flushes_total",
        "counter",
        wal.flushes,
    );
    scalar(
        &mut out,
        "shardmall_wal_queue_depth",
        "gauge",
        wal.queue_depth,
    );
    histogram(
        &mut out,
        "shardmall_wal_batch_size",
        "Records per group-commit batch.",
        &wal.batch_size_buckets,
        wal.batches,
        wal.batch_size_sum as f64,
    );
    histogram(
        &mut out,
        "shardmall_wal_flush_seconds",
        "Latency of one log flush.",
        &wal.flush_seconds_buckets,
        wal.flushes,
        wal.flush_seconds_sum,
    );
    let m = state.shop.metrics();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    scalar(
        &mut out,
        "shardmall_active_actors",
        "gauge",
        m.active_actors.load(Ordering::Relaxed),
    );
    scalar(
        &mut out,
        "shardmall_actor_activations_total",
        "counter",
        load(&m.activations),
    );
    scalar(
        &mut out,
        "shardmall_actor_passivations_total",
        "counter",
        load(&m.passivations),
    );
    scalar(
        &mut out,
        "shardmall_actor_failures_total",
        "counter",
        load(&m.actor_failures),
    );
    scalar(
        &mut out,
        "shardmall_low_stock_alerts_total",
        "counter",
        load(&m.low_stock_alerts),
    );
    scalar(
        &mut out,
        "shardmall_timers_fired_total",
        "counter",
        load(&m.timers_fired),
    );
    scalar(
        &mut out,
        "shardmall_entity_overloaded_total",
        "counter",
        load(&m.overloaded),
    );
    let c = state.cluster.metrics();
    let map = state.cluster.map();
    scalar(&mut out, "shardmall_cluster_epoch", "gauge", map.epoch);
    scalar(
        &mut out,
        "shardmall_cluster_members",
        "gauge",
        map.members.len(),
    );
    scalar(
        &mut out,
        "shardmall_cluster_partitions_owned",
        "gauge",
        map.owned_by(state.cluster.me().node_id).len(),
    );
    scalar(
        &mut out,
        "shardmall_cluster_partitions_serving",
        "gauge",
        state.cluster.serving_count(),
    );
    scalar(
        &mut out,
        "shardmall_cluster_is_leader",
        "gauge",
        u8::from(state.cluster.control().leader() == Some(state.cluster.me().node_id)),
    );
    scalar(
        &mut out,
        "shardmall_cluster_forwarded_total",
        "counter",
        load(&c.forwarded),
    );
    scalar(
        &mut out,
        "shardmall_cluster_forward_failures_total",
        "counter",
        load(&c.forward_failures),
    );
    scalar(
        &mut out,
        "shardmall_cluster_wrong_owner_total",
        "counter",
        load(&c.wrong_owner),
    );
    scalar(
        &mut out,
        "shardmall_cluster_rerouted_total",
        "counter",
        load(&c.rerouted),
    );
    scalar(
        &mut out,
        "shardmall_cluster_handoffs_total",
        "counter",
        load(&c.handoffs),
    );
    scalar(
        &mut out,
        "shardmall_cluster_handoff_failures_total",
        "counter",
        load(&c.handoff_failures),
    );
    scalar(
        &mut out,
        "shardmall_cluster_handoff_seconds_sum",
        "counter",
        load(&c.handoff_micros) as f64 / 1e6,
    );
    out.push_str("# TYPE shardmall_orders gauge\n");
    for (status, n) in m.orders_by_status() {
        let _ = writeln!(out, "shardmall_orders{{status=\"{status}\"}} {n}");
    }
    out
}

fn scalar(out: &mut String, name: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
}

/// A cumulative histogram; `buckets` holds (le, count) without the `+Inf` bucket, whose
/// count is `count`.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    buckets: &[(f64, u64)],
    count: u64,
    sum: f64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
}
