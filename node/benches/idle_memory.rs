//! Memory per idle SKU after passivation, and time from process start to `/readyz` on
//! that data set.
//!
//! `cargo bench -p shardmall --bench idle_memory` (env: BENCH_SKUS=1000000,
//! BENCH_WRITERS=32, BENCH_CACHE_MB=64, BENCH_MAX_ACTIVE=4096).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shardmall_http_edge::Role;
use support::{env_or, rss_bytes, token, Node};

#[tokio::main]
async fn main() {
    let skus: usize = env_or("BENCH_SKUS", 1_000_000);
    let writers: usize = env_or("BENCH_WRITERS", 32);
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();
    let cache_mb: String = env_or("BENCH_CACHE_MB", "64".to_string());
    let max_active: String = env_or("BENCH_MAX_ACTIVE", "4096".to_string());
    let node = Node::start(
        dir.path(),
        &[
            "--idle-timeout",
            "2s",
            "--cache-mb",
            &cache_mb,
            "--max-active",
            &max_active,
        ],
    );
    node.wait_ready(&http).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_bytes(node.pid());

    let admin = Arc::new(token(Role::Admin, "bench-admin"));
    let products = skus.div_ceil(100);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (http, admin, next, base) =
            (http.clone(), admin.clone(), next.clone(), node.base.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let p = next.fetch_add(1, Ordering::Relaxed);
                if p >= products {
                    break;
                }
                let batch: Vec<_> = (0..100.min(skus - p * 100))
                    .map(|i| json!({"sku_id": format!("s{}", p * 100 + i), "name": "sku", "price": {"amount": 1000, "currency": "CNY"}, "stock": 10}))
                    .collect();
                let r = http
                    .post(format!("{base}/v1/products"))
                    .bearer_auth(&*admin)
                    .json(&json!({"product_id": format!("p{p}"), "title": "bench", "skus": batch}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let load = start.elapsed();
    let loaded = rss_bytes(node.pid());
    // Wait for every actor to passivate.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = http
            .get(format!("{}/metrics", node.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let active = m
            .lines()
            .find_map(|l| l.strip_prefix("shardmall_active_actors "))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1);
        if active == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = rss_bytes(node.pid());
    node.stop();

    let process_start = Instant::now();
    let node = Node::start(dir.path(), &[]);
    node.wait_ready(&http).await;
    let ready = process_start.elapsed();
    let restarted = rss_bytes(node.pid());
    node.stop();

    println!(
        "idle memory: {skus} SKUs in {products} products, created in {load:.1?} ({:.0} SKUs/s)",
        skus as f64 / load.as_secs_f64()
    );
    println!("| SKUs | storage cache | max active | RSS before | RSS after loading | RSS idle after passivation | bytes per idle SKU | start to /readyz | RSS after restart |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {skus} | {cache_mb} MiB | {max_active} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} | {:.2?} | {:.1} MiB |",
        baseline as f64 / 1048576.0,
        loaded as f64 / 1048576.0,
        idle as f64 / 1048576.0,
        idle.saturating_sub(baseline) as f64 / skus as f64,
        ready,
        restarted as f64 / 1048576.0
    );
}
