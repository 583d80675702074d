//! Flash-sale buys straight into the shop, without HTTP: how fast the engine alone
//! claims and places orders. `cargo bench -p shardmall-actors --bench buy`.
//!
//! Environment: `BUY_BENCH_SECS` (default 5), `BUY_BENCH_CALLERS` (default 256),
//! `BUY_BENCH_DURABILITY` (`sync` or `relaxed`, default `sync`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_actors::domain::{Money, ProductStatus};
use shardmall_actors::{NewCampaign, NewProduct, NewSku, Shop, ShopConfig};
use shardmall_persistence::{Wal, WalConfig};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secs: u64 = env("BUY_BENCH_SECS", 5);
    let callers: usize = env("BUY_BENCH_CALLERS", 256);
    let durability: String = env("BUY_BENCH_DURABILITY", "sync".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = WalConfig::new(dir.path());
        cfg.durability = durability.parse().expect("durability");
        let wal = Wal::open(cfg).expect("open log");
        let shop = Shop::start(wal, ShopConfig::default()).await.expect("shop");
        let money = Money {
            amount: 100,
            currency: "USD".into(),
        };
        shop.create_product(NewProduct {
            product_id: "p".into(),
            title: "t".into(),
            category: "c".into(),
            brand: "b".into(),
            description: String::new(),
            status: ProductStatus::OnShelf,
            skus: vec![NewSku {
                sku_id: "s".into(),
                name: "s".into(),
                specs: BTreeMap::new(),
                price: money.clone(),
                market_price: None,
                stock: 100_000_000,
                low_stock_threshold: 0,
            }],
        })
        .await
        .expect("product");
        let ends = std::time::SystemTime::now() + Duration::from_secs(3600);
        let ends_at = ends
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        shop.create_campaign(NewCampaign {
            campaign_id: "c".into(),
            sku_id: "s".into(),
            price: money,
            quantity: 50_000_000,
            starts_at: None,
            ends_at,
            per_buyer_limit: 1,
            payment_timeout: None,
        })
        .await
        .expect("campaign");
        let next = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (shop, next) = (shop.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    shop.buy("c", &format!("buyer-{i}"), 1, None)
                        .await
                        .expect("buy");
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("task"));
        }
        let elapsed = start.elapsed().as_secs_f64();
        lat.sort();
        let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
        println!(
            "buy {durability} callers {callers}: {:.0} buys/s, p50 {:?} p99 {:?} ({} buys in {elapsed:.1} s)",
            lat.len() as f64 / elapsed,
            q(0.5),
            q(0.99),
            lat.len()
        );
        shop.shutdown().await;
    });
}
