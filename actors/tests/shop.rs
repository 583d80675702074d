//! The shop on real actors and a real log in a temporary directory: activation,
//! passivation racing messages, supervision, timers re-armed after a restart, and
//! checkpoints.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shardmall_actors::domain::order::OrderStatus;
use shardmall_actors::domain::{Money, ProductStatus};
use shardmall_actors::keys::{EntityKey, Partitioner};
use shardmall_actors::{Clock, NewProduct, NewSku, Shop, ShopConfig, ShopError};
use shardmall_persistence::{Record, Wal, WalConfig};

fn config() -> ShopConfig {
    ShopConfig {
        partitions: 8,
        timer_tick: Duration::from_millis(20),
        checkpoint_interval: Duration::from_millis(100),
        ..ShopConfig::default()
    }
}

async fn open(dir: &std::path::Path, cfg: ShopConfig) -> Shop {
    // A restart within one process: the previous shop's last handles on the database are
    // dropped by its tasks shortly after its shutdown.
    let start = Instant::now();
    let wal = loop {
        match Wal::open(WalConfig::new(dir.join("db"))) {
            Ok(wal) => break wal,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open log: {e}"),
        }
    };
    Shop::start(wal, cfg).await.expect("start shop")
}

fn product(id: &str, skus: &[(&str, u64)]) -> NewProduct {
    NewProduct {
        product_id: id.into(),
        title: "t".into(),
        category: "c".into(),
        brand: "b".into(),
        description: String::new(),
        status: ProductStatus::OnShelf,
        skus: skus
            .iter()
            .map(|(sku, stock)| NewSku {
                sku_id: (*sku).into(),
                name: format!("name of {sku}"),
                specs: BTreeMap::new(),
                price: Money {
                    amount: 100,
                    currency: "CNY".into(),
                },
                market_price: None,
                stock: *stock,
                low_stock_threshold: 0,
            })
            .collect(),
    }
}

/// A shop with product "p", SKU "s" (100 units) and campaign "c" on it, live for an hour.
async fn shop_with_campaign(dir: &std::path::Path, quantity: u64, per_buyer_limit: u64) -> Shop {
    let shop = open(dir, config()).await;
    shop.create_product(product("p", &[("s", 100)]))
        .await
        .unwrap();
    let now = shardmall_actors::clock::system_ms();
    shop.create_campaign(campaign(quantity, None, now + 3_600_000, per_buyer_limit))
        .await
        .unwrap();
    shop
}

/// Campaign "c" on SKU "s" at 50 CNY.
fn campaign(
    quantity: u64,
    starts_at: Option<u64>,
    ends_at: u64,
    per_buyer_limit: u64,
) -> shardmall_actors::NewCampaign {
    shardmall_actors::NewCampaign {
        campaign_id: "c".into(),
        sku_id: "s".into(),
        price: Money {
            amount: 50,
            currency: "CNY".into(),
        },
        quantity,
        starts_at,
        ends_at,
        per_buyer_limit,
        payment_timeout: None,
    }
}

#[track_caller]
fn stock(s: &shardmall_actors::domain::sku::SkuView) -> (u64, u64, u64) {
    (s.available, s.reserved, s.sold)
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_racing_passivation_are_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShopConfig {
        idle_timeout: Duration::from_millis(30),
        ..config()
    };
    let shop = open(dir.path(), cfg).await;
    shop.create_product(product("p", &[("s", 0)]))
        .await
        .unwrap();
    // Writes spaced around the idle period, so many land while the actor passivates.
    let mut expected = 0u64;
    for i in 0..60u64 {
        shop.adjust_stock("s", 1, "restock".into()).await.unwrap();
        expected += 1;
        tokio::time::sleep(Duration::from_millis(5 + (i * 7) % 40)).await;
    }
    assert_eq!(shop.get_sku("s").await.unwrap().available, expected);
    assert!(
        shop.metrics()
            .passivations
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the test must exercise passivation"
    );
    eventually("every actor passivated", Duration::from_secs(5), || async {
        shop.active_actors() == 0
    })
    .await;
    assert_eq!(shop.get_sku("s").await.unwrap().available, expected);
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_entity_does_not_take_its_partition_down() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShopConfig {
        partitions: 1,
        ..config()
    };
    let wal = Wal::open(WalConfig::new(dir.path().join("db"))).unwrap();
    // A record no SKU can decode, for SKU "bad".
    let key = EntityKey::new(shardmall_actors::domain::Kind::Sku, "bad");
    let ack = wal
        .append(Record {
            partition: 0,
            entity: key.to_bytes(),
            payload: vec![1, 250, 250, 250],
            aux: vec![],
            also: vec![],
        })
        .await
        .unwrap();
    ack.durable().await.unwrap();
    let shop = Shop::start(wal, cfg).await.unwrap();
    shop.create_product(product("p", &[("good", 5)]))
        .await
        .unwrap();
    assert!(matches!(
        shop.get_sku("bad").await,
        Err(ShopError::Unavailable(_))
    ));
    assert_eq!(shop.get_sku("good").await.unwrap().available, 5);
    assert!(matches!(
        shop.get_sku("bad").await,
        Err(ShopError::Unavailable(_))
    ));
    assert_eq!(
        shop.adjust_stock("good", 1, "r".into())
            .await
            .unwrap()
            .available,
        6
    );
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_deadlines_are_rearmed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShopConfig {
        payment_timeout: Duration::from_millis(600),
        ..config()
    };
    let shop = open(dir.path(), cfg.clone()).await;
    shop.create_product(product("p", &[("a", 10), ("b", 10)]))
        .await
        .unwrap();
    let order = shop
        .checkout(
            "alice",
            Some(vec![("a".into(), 3), ("b".into(), 2)]),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(stock(&shop.get_sku("a").await.unwrap()), (7, 3, 0));
    shop.shutdown().await;
    drop(shop);

    let shop = open(dir.path(), cfg).await;
    eventually(
        "the unpaid order expires",
        Duration::from_secs(10),
        || async {
            shop.get_order(&order.order_id).await.unwrap().status == OrderStatus::Cancelled
        },
    )
    .await;
    eventually("stock returns", Duration::from_secs(10), || async {
        stock(&shop.get_sku("a").await.unwrap()) == (10, 0, 0)
            && stock(&shop.get_sku("b").await.unwrap()) == (10, 0, 0)
    })
    .await;
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_bound_the_log_and_keep_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let shop = open(dir.path(), config()).await;
    shop.create_product(product("p", &[("a", 100)]))
        .await
        .unwrap();
    let mut paid = Vec::new();
    for i in 0..20 {
        let buyer = format!("b{i}");
        let order = shop
            .checkout(&buyer, Some(vec![("a".into(), 1)]), None, None)
            .await
            .unwrap();
        if i % 2 == 0 {
            shop.pay(&order.order_id, order.total.clone(), None)
                .await
                .unwrap();
            paid.push(order.order_id);
        }
    }
    eventually(
        "the checkpointer empties the log",
        Duration::from_secs(10),
        || async { shop.wal().partitions_with_log().unwrap().is_empty() },
    )
    .await;
    shop.shutdown().await;
    drop(shop);

    let shop = open(dir.path(), config()).await;
    assert_eq!(stock(&shop.get_sku("a").await.unwrap()), (80, 10, 10));
    for id in &paid {
        assert_eq!(shop.get_order(id).await.unwrap().status, OrderStatus::Paid);
    }
    let page = shop.list_orders(Some("b0"), None, 10, None).await.unwrap();
    assert_eq!(page.items.len(), 1);
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_checkout_leaves_nothing_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let shop = open(dir.path(), config()).await;
    shop.create_product(product("p", &[("a", 5), ("b", 1), ("c", 5)]))
        .await
        .unwrap();
    let err = shop
        .checkout(
            "alice",
            Some(vec![("a".into(), 2), ("b".into(), 2), ("c".into(), 1)]),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ShopError::OutOfStock { ref sku_id, .. } if sku_id == "b"),
        "{err:?}"
    );
    for (sku, n) in [("a", 5), ("b", 1), ("c", 5)] {
        assert_eq!(stock(&shop.get_sku(sku).await.unwrap()), (n, 0, 0));
    }
    assert!(shop
        .list_orders(Some("alice"), None, 10, None)
        .await
        .unwrap()
        .items
        .is_empty());
    shop.shutdown().await;
}

/// The per-line limit holds for the merged order: two lines of one SKU are one line of
/// their sum, so splitting a line does not get past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_lines_of_one_sku_are_limited_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let shop = open(dir.path(), config()).await;
    shop.create_product(product("p", &[("a", 50_000)]))
        .await
        .unwrap();
    let err = shop
        .checkout(
            "hoarder",
            Some(vec![("a".into(), 10_000), ("a".into(), 10_000)]),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ShopError::BadRequest(ref why) if why.contains("at most 10000")),
        "{err:?}"
    );
    assert_eq!(stock(&shop.get_sku("a").await.unwrap()), (50_000, 0, 0));
    let order = shop
        .checkout(
            "buyer",
            Some(vec![("a".into(), 4_000), ("a".into(), 6_000)]),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(order.lines.len(), 1);
    assert_eq!(order.lines[0].quantity, 10_000);
    shop.shutdown().await;
}

#[test]
fn buyer_data_shares_a_partition() {
    let p = Partitioner::new(256);
    let cart = EntityKey::new(shardmall_actors::domain::Kind::Cart, "alice");
    let idem = EntityKey::new(shardmall_actors::domain::Kind::Idempotency, "alice");
    assert_eq!(p.of(&cart), p.of(&idem));
    assert_eq!(p.of(&cart), Some(p.buyer("alice")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_passivates_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShopConfig {
        partitions: 1,
        max_active: 4,
        ..config()
    };
    let shop = open(dir.path(), cfg).await;
    let skus: Vec<(String, u64)> = (0..20).map(|i| (format!("s{i}"), 10 + i)).collect();
    let refs: Vec<(&str, u64)> = skus.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    shop.create_product(product("p", &refs)).await.unwrap();
    eventually("the budget holds", Duration::from_secs(5), || async {
        shop.active_actors() <= 4
    })
    .await;
    for (sku, stock) in &skus {
        assert_eq!(shop.get_sku(sku).await.unwrap().available, *stock);
        // Evicted actors finish their last flush before they stop; once they have, the
        // budget holds (without it all 20 would stay active for the idle timeout).
        eventually("the budget holds", Duration::from_secs(5), || async {
            shop.active_actors() <= 4
        })
        .await;
    }
    // Writes survive eviction too.
    for (sku, _) in &skus {
        shop.adjust_stock(sku, 1, "r".into()).await.unwrap();
    }
    for (sku, stock) in &skus {
        assert_eq!(shop.get_sku(sku).await.unwrap().available, stock + 1);
    }
    shop.shutdown().await;
}

/// ADR 0013: on one node a flash-sale buy is one log record (the campaign's, carrying
/// the order), and the order is readable, payable and cancellable the moment the buy
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buy_is_one_log_record_and_its_order_is_there_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let shop = shop_with_campaign(dir.path(), 10, 5).await;
    let before = shop.wal().metrics().appended;
    let mut orders = Vec::new();
    for i in 0..6 {
        let order = shop.buy("c", &format!("b{i}"), 1, None).await.unwrap();
        let read = shop.get_order(&order.order_id).await.unwrap();
        assert_eq!(read.status, OrderStatus::PendingPayment);
        assert_eq!(read.total.amount, 50);
        orders.push(order.order_id);
    }
    assert_eq!(
        shop.wal().metrics().appended - before,
        6,
        "one record per buy (reads write nothing)"
    );
    let paid = shop
        .pay(
            &orders[0],
            Money {
                amount: 50,
                currency: "CNY".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(paid.status, OrderStatus::Paid);
    let cancelled = shop.cancel(&orders[1], false).await.unwrap();
    assert_eq!(cancelled.status, OrderStatus::Cancelled);
    let campaign = shop.get_campaign("c").await.unwrap();
    assert_eq!((campaign.sold, campaign.reserved), (1, 4));
    // A restart folds the frames into both entities' snapshots: the orders stay.
    shop.shutdown().await;
    drop(shop);
    let shop = open(dir.path(), config()).await;
    for id in &orders[2..] {
        assert_eq!(
            shop.get_order(id).await.unwrap().status,
            OrderStatus::PendingPayment
        );
    }
    shop.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_time_is_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let start = shardmall_actors::clock::system_ms();
    let (clock, hand) = Clock::manual(start);
    let shop = open(
        dir.path(),
        ShopConfig {
            payment_timeout: Duration::from_secs(15 * 60),
            clock,
            ..config()
        },
    )
    .await;
    assert_eq!(shop.now_ms(), start);
    shop.create_product(product("p", &[("s", 10)]))
        .await
        .unwrap();
    shop.create_campaign(campaign(5, Some(start + 3_600_000), start + 7_200_000, 1))
        .await
        .unwrap();

    // The campaign opens when the clock reaches its start, not before.
    assert!(matches!(
        shop.buy("c", "early", 1, None).await,
        Err(ShopError::CampaignNotStarted(_))
    ));
    hand.advance(Duration::from_secs(3_600));
    let bought = shop.buy("c", "on-time", 1, None).await.unwrap();

    // An unpaid order lives until its deadline on this clock, however long the timer
    // wheel ticks meanwhile.
    let order = shop
        .checkout("alice", Some(vec![("s".into(), 2)]), None, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        shop.get_order(&order.order_id).await.unwrap().status,
        OrderStatus::PendingPayment,
        "no deadline passed on the shop's clock"
    );
    hand.advance(Duration::from_secs(15 * 60 + 1));
    for id in [&order.order_id, &bought.order_id] {
        eventually(
            "the unpaid orders expire once the clock passes their deadline",
            Duration::from_secs(10),
            || async { shop.get_order(id).await.unwrap().status == OrderStatus::Cancelled },
        )
        .await;
    }
    shop.shutdown().await;
}

/// A keyed repeat of an accepted buy answers the first answer even after the campaign
/// sold out (the board must not refuse it), while a new buy is refused `sold_out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_repeat_after_the_sell_out_replays_its_order() {
    use shardmall_actors::domain::campaign::IdemTag;
    let dir = tempfile::tempdir().unwrap();
    let shop = shop_with_campaign(dir.path(), 2, 1).await;
    let tag = |n: u128| Some(IdemTag { key: n, body: 7 });
    let first = shop.buy_keyed("c", "ann", 1, None, tag(1)).await.unwrap();
    assert!(!first.replayed);
    shop.buy_keyed("c", "bob", 1, None, tag(2)).await.unwrap();
    // The campaign is sold out, and the board knows it.
    assert!(matches!(
        shop.buy_keyed("c", "cat", 1, None, tag(3)).await,
        Err(ShopError::SoldOut(_))
    ));
    assert!(matches!(
        shop.buy_keyed("c", "dan", 1, None, tag(4)).await,
        Err(ShopError::SoldOut(_))
    ));
    let again = shop.buy_keyed("c", "ann", 1, None, tag(1)).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.order.order_id, first.order.order_id);
    // The same buyer with a new key is refused like anyone else.
    assert!(matches!(
        shop.buy_keyed("c", "ann", 1, None, tag(9)).await,
        Err(ShopError::SoldOut(_)) | Err(ShopError::LimitExceeded { .. })
    ));
    shop.shutdown().await;
}

/// In a replicated cluster a bought order goes to a partition of the campaign's replica
/// group, so that it rides in the claim's entry (one consensus round per buy); the
/// buyer's order list still finds it, and the campaign still sees a keyed repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bought_order_joins_the_campaigns_replica_group_and_is_listed_for_its_buyer() {
    use shardmall_actors::domain::campaign::IdemTag;
    use shardmall_actors::domain::Kind;
    const GROUPS: u16 = 4;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShopConfig {
        replica_groups: GROUPS,
        ..config()
    };
    let shop = open(dir.path(), cfg).await;
    shop.create_product(product("p", &[("s", 100)]))
        .await
        .unwrap();
    let now = shardmall_actors::clock::system_ms();
    shop.create_campaign(campaign(3, None, now + 3_600_000, 1))
        .await
        .unwrap();
    let parts = shop.partitioner();
    let campaign_group = parts.catalog(Kind::Campaign, "c") % GROUPS;
    let before = shop.wal().metrics().appended;
    let tag = |n: u128| Some(IdemTag { key: n, body: 7 });
    let mut bought = Vec::new();
    for (i, buyer) in ["ann", "bob", "cat"].into_iter().enumerate() {
        let b = shop
            .buy_keyed("c", buyer, 1, None, tag(i as u128))
            .await
            .unwrap();
        let p = parts.of_id(Kind::Order, &b.order.order_id).unwrap();
        assert_eq!(
            p % GROUPS,
            campaign_group,
            "{buyer}'s order in partition {p}"
        );
        bought.push((buyer, b.order.order_id));
    }
    assert_eq!(
        shop.wal().metrics().appended - before,
        3,
        "the claim and its order in one record per buy"
    );
    for (buyer, order_id) in &bought {
        let page = shop.list_orders(Some(buyer), None, 10, None).await.unwrap();
        let ids: Vec<_> = page.items.iter().map(|o| o.order_id.clone()).collect();
        assert_eq!(ids, vec![order_id.clone()], "{buyer}");
    }
    // Sold out: a keyed repeat is still answered with its first order.
    let again = shop.buy_keyed("c", "ann", 1, None, tag(0)).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.order.order_id, bought[0].1);
    shop.shutdown().await;
}
