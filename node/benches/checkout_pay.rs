//! Checkout then pay for random SKUs through HTTP against a real node.
//!
//! `cargo bench -p shardmall --bench checkout_pay` (env: BENCH_CLIENTS=64,
//! BENCH_SECS=15, BENCH_SKUS=1000, BENCH_DURABILITY=sync, BENCH_MAX_ACTIVE=4096).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use shardmall_http_edge::Role;
use support::{env_or, token, Node};

#[tokio::main]
async fn main() {
    let clients: usize = env_or("BENCH_CLIENTS", 64);
    let secs: u64 = env_or("BENCH_SECS", 15);
    let skus: usize = env_or("BENCH_SKUS", 1000);
    let durability: String = env_or("BENCH_DURABILITY", "sync".to_string());
    let dir = tempfile::tempdir().expect("tempdir");
    let max_active: String = env_or("BENCH_MAX_ACTIVE", "4096".to_string());
    let node = Node::start(
        dir.path(),
        &["--durability", &durability, "--max-active", &max_active],
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .build()
        .unwrap();
    node.wait_ready(&http).await;

    let admin = token(Role::Admin, "bench-admin");
    for p in 0..skus.div_ceil(100) {
        let batch: Vec<_> = (0..100.min(skus - p * 100))
            .map(|i| json!({"sku_id": format!("s{}", p * 100 + i), "name": "sku", "price": {"amount": 1000, "currency": "CNY"}, "stock": 1_000_000}))
            .collect();
        let r = http
            .post(format!("{}/v1/products", node.base))
            .bearer_auth(&admin)
            .json(&json!({"product_id": format!("p{p}"), "title": "bench", "skus": batch}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    let base = Arc::new(node.base.clone());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let base = base.clone();
        let tok = token(Role::Customer, &format!("buyer{c}"));
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let sku = (rand_u64(c as u64 ^ n) as usize) % skus;
                let start = Instant::now();
                let r = http
                    .post(format!("{base}/v1/orders"))
                    .bearer_auth(&tok)
                    .header("Idempotency-Key", format!("c{c}-{n}"))
                    .json(&json!({
                        "items": [{"sku_id": format!("s{sku}"), "quantity": 1}],
                        "shipping_address": {"name": "Bench", "phone": "1", "line1": "1 Road", "city": "Shanghai", "country": "CN"}
                    }))
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status() != 201 => {
                        if errors == 0 {
                            eprintln!("checkout refused: {} {}", r.status(), r.text().await.unwrap_or_default());
                        }
                        false
                    }
                    Ok(r) => {
                        let order: serde_json::Value = r.json().await.unwrap();
                        let id = order["order_id"].as_str().unwrap().to_owned();
                        let pay = http
                            .post(format!("{base}/v1/orders/{id}/pay"))
                            .bearer_auth(&tok)
                            .header("Idempotency-Key", format!("p{c}-{n}"))
                            .json(&json!({"method": "fake", "amount": order["total"]}))
                            .send()
                            .await;
                        matches!(pay, Ok(p) if p.status() == 200)
                    }
                    _ => false,
                };
                if ok {
                    hist.record(start.elapsed().as_micros() as u64).unwrap();
                } else {
                    errors += 1;
                }
                n += 1;
            }
            (hist, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.unwrap();
        hist.add(h).unwrap();
        errors += e;
    }
    let secs_f = secs as f64;
    println!("checkout+pay over HTTP: durability={durability} clients={clients} skus={skus} max_active={max_active} duration={secs}s");
    println!("| durability | max active | clients | checkout+pay/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {durability} | {max_active} | {clients} | {:.0} | {:.2} | {:.2} | {errors} |",
        hist.len() as f64 / secs_f,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0
    );
    node.stop();
}

fn rand_u64(seed: u64) -> u64 {
    // splitmix64: uniform enough to spread buyers over SKUs, and dependency-free.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
