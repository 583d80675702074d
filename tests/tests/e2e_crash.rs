//! Durability against a real process: kill -9 in the middle of a stream of checkouts and
//! payments, graceful restart, and passivation of idle actors (DESIGN.md: "a success is
//! never returned for an event that a crash could still lose"; stock conservation).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardmall_tests::*;

const CLIENTS: usize = 8;
const INITIAL_STOCK: i64 = 400;
/// Acknowledged operations (checkouts + payments) before the kill.
const ACKED_BEFORE_KILL: usize = 150;

/// What a client saw acknowledged for one order.
#[derive(Debug, Clone)]
struct Acked {
    order_id: String,
    buyer: String,
    sku: String,
    /// The payment answered 2xx.
    paid: bool,
}

/// One client: checkout 1 unit, pay every other order, until the node goes away.
async fn client(api: Api, i: usize, skus: Vec<String>, acked_ops: Arc<AtomicUsize>) -> Vec<Acked> {
    let buyer = format!("crash-buyer-{i}");
    let token = customer(&buyer);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut acked = Vec::new();
    for n in 0..400 {
        if Instant::now() > deadline {
            break;
        }
        let sku = skus[(i + n) % skus.len()].clone();
        let body = order_body(&[(&sku, 1)]);
        let r = api
            .try_call(
                reqwest::Method::POST,
                "/v1/orders",
                Some(&token),
                Some(&key()),
                Some(&body),
            )
            .await;
        let order = match r {
            Err(_) => break, // the node is gone
            Ok((201, order)) => order,
            Ok((st, v)) => {
                assert!(
                    st == 429 || st == 503,
                    "client {i}: checkout refused with {st} {v} (stock is ample)"
                );
                continue;
            }
        };
        acked.push(Acked {
            order_id: order_id(&order),
            buyer: token.clone(),
            sku,
            paid: false,
        });
        acked_ops.fetch_add(1, Ordering::SeqCst);
        if n % 2 == 0 {
            let id = order_id(&order);
            let body = json!({"method": "fake", "amount": order["total"].clone()});
            let r = api
                .try_call(
                    reqwest::Method::POST,
                    &format!("/v1/orders/{id}/pay"),
                    Some(&token),
                    Some(&key()),
                    Some(&body),
                )
                .await;
            match r {
                Err(_) => break,
                Ok((st, v)) if (200..300).contains(&st) => {
                    assert_eq!(v["status"], "paid", "client {i}: pay answered {v}");
                    acked.last_mut().expect("just pushed").paid = true;
                    acked_ops.fetch_add(1, Ordering::SeqCst);
                }
                Ok((st, v)) => assert!(
                    st == 429 || st == 503,
                    "client {i}: pay refused with {st} {v}"
                ),
            }
        }
    }
    acked
}

/// All of one buyer's orders, through the cursor (bounded).
async fn all_orders(api: &Api, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let path = match &cursor {
            Some(c) => format!("/v1/orders?limit=100&cursor={c}"),
            None => "/v1/orders?limit=100".to_string(),
        };
        let r = api.get(&path, Some(token)).await;
        assert_status(&r, 200, "list orders");
        out.extend(r.1["items"].as_array().expect("items").iter().cloned());
        match r.1["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("more than 50 pages of orders");
}

/// Runs the clients until `ACKED_BEFORE_KILL` operations are acknowledged, kills the
/// node with SIGKILL mid-stream, and answers what was acknowledged.
async fn run_and_kill(node: &mut Node, skus: &[String], round: usize) -> Vec<Acked> {
    let acked_ops = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(node.api(), i, skus.to_vec(), acked_ops.clone())))
        .collect();

    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_ops.load(Ordering::SeqCst) < ACKED_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "round {round}: only {} operations acknowledged in 60s",
            acked_ops.load(Ordering::SeqCst)
        );
        assert!(
            !tasks.iter().all(|t| t.is_finished()),
            "round {round}: every client stopped before the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill9();

    let mut acked = Vec::new();
    for t in tasks {
        let got = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a client did not stop after the kill")
            .expect("a client panicked");
        acked.extend(got);
    }
    eprintln!(
        "round {round}: killed after {} acknowledged operations ({} orders, {} paid)",
        acked_ops.load(Ordering::SeqCst),
        acked.len(),
        acked.iter().filter(|a| a.paid).count()
    );
    acked
}

/// Checks the recovered node against everything acknowledged so far.
async fn check_recovered(node: &Node, skus: &[String], acked: &[Acked], round: usize) {
    // Every acknowledged order is there, with what was acknowledged.
    let mut acked_units: HashMap<&str, i64> = HashMap::new();
    let mut acked_paid: HashMap<&str, i64> = HashMap::new();
    for a in acked {
        let (st, o) = node
            .get(&format!("/v1/orders/{}", a.order_id), Some(&a.buyer))
            .await;
        assert_eq!(
            st, 200,
            "round {round}: acknowledged order {} lost after kill -9: {o}",
            a.order_id
        );
        let status = o["status"].as_str().unwrap_or_default();
        if a.paid {
            assert_eq!(
                status, "paid",
                "round {round}: acknowledged payment of {} lost: {o}",
                a.order_id
            );
        } else {
            assert!(
                status == "pending_payment" || status == "paid",
                "round {round}: acknowledged order {} in status {status}: {o}",
                a.order_id
            );
        }
        assert_eq!(o["lines"][0]["sku_id"], a.sku.as_str(), "{o}");
        assert_eq!(o["lines"][0]["quantity"], 1, "{o}");
        *acked_units.entry(&a.sku).or_default() += 1;
        if a.paid {
            *acked_paid.entry(&a.sku).or_default() += 1;
        }
    }

    // Everything the buyers have now (acknowledged or not), by SKU.
    let mut open_units: HashMap<String, i64> = HashMap::new();
    for i in 0..CLIENTS {
        let token = customer(&format!("crash-buyer-{i}"));
        for o in all_orders(node, &token).await {
            let sku = o["lines"][0]["sku_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match o["status"].as_str() {
                Some("pending_payment") | Some("paid") => *open_units.entry(sku).or_default() += 1,
                other => panic!("round {round}: an order in status {other:?} after restart: {o}"),
            }
        }
    }

    for sku in skus {
        let s = node.stock(sku).await;
        let units = acked_units.get(sku.as_str()).copied().unwrap_or(0);
        let paid = acked_paid.get(sku.as_str()).copied().unwrap_or(0);
        let open = open_units.get(sku).copied().unwrap_or(0);
        let what = format!(
            "round {round}: {sku} after kill -9 ({units} acked orders, {paid} acked paid, \
             {open} open now): {s:?}"
        );
        assert!(s.available >= 0 && s.reserved >= 0 && s.sold >= 0, "{what}");
        assert_eq!(s.total(), INITIAL_STOCK, "stock not conserved: {what}");
        assert!(s.sold >= paid, "acknowledged sales lost: {what}");
        assert!(
            s.reserved + s.sold >= units,
            "acknowledged reservations lost: {what}"
        );
        assert!(
            s.reserved + s.sold >= open,
            "open orders without stock behind them: {what}"
        );
    }
}

/// A node on `dir` acknowledging only durable writes: what the kill -9 tests restart.
async fn sync_node(dir: &std::path::Path) -> Node {
    Node::config()
        .dir(dir)
        .args(&["--durability", "sync"])
        .start()
        .await
}

/// kill -9 while 8 clients check out and pay, three times over; after each restart every
/// acknowledged order (of every round) is there with its acknowledged status, and stock
/// is conserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_keeps_acknowledged_writes() {
    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || sync_node(dir.path());
    let mut node = start().await;
    let admin = admin();
    let skus = node
        .product_with_skus(&admin, "crash", 2, 100, INITIAL_STOCK)
        .await;

    let mut acked: Vec<Acked> = Vec::new();
    for round in 1..=ROUNDS {
        let got = run_and_kill(&mut node, &skus, round).await;
        assert!(
            got.len() >= ACKED_BEFORE_KILL / 2,
            "round {round}: few orders acknowledged: {}",
            got.len()
        );
        acked.extend(got);
        drop(node);
        node = start().await;
        check_recovered(&node, &skus, &acked, round).await;
    }

    // The node serves after recovery: an acknowledged unpaid order can still be paid.
    if let Some(a) = acked.iter().find(|a| !a.paid) {
        let o = node.order(&a.buyer, &a.order_id).await;
        if o["status"] == "pending_payment" {
            let before = node.stock(&a.sku).await;
            assert_ok(&node.pay(&a.buyer, &o, &key()).await, "pay after recovery");
            let after = node.stock(&a.sku).await;
            assert_eq!(after.sold, before.sold + 1, "{before:?} -> {after:?}");
            assert_eq!(
                after.reserved,
                before.reserved - 1,
                "{before:?} -> {after:?}"
            );
        }
    }
    let alice = customer("alice");
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "checkout after recovery");
    assert_ok(&node.pay(&alice, &r.1, &key()).await, "pay after recovery");
    assert_eq!(node.stock(&skus[0]).await.total(), INITIAL_STOCK);
}

/// SIGTERM drains and flushes; after a restart on the same dir everything is there.
#[tokio::test]
async fn graceful_restart_keeps_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::config().dir(dir.path()).start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "grace", 2, 250, 20).await;

    let r = node
        .put(
            &format!("/v1/cart/items/{}", skus[1]),
            &alice,
            &json!({"quantity": 2}),
        )
        .await;
    assert_status(&r, 200, "cart put");
    let r = node.checkout(&alice, &[(&skus[0], 3)], &key()).await;
    assert_status(&r, 201, "paid order");
    let paid = r.1;
    assert_ok(&node.pay(&alice, &paid, &key()).await, "pay");
    let r = node
        .checkout(&alice, &[(&skus[0], 2), (&skus[1], 1)], &key())
        .await;
    assert_status(&r, 201, "pending order");
    let pending = r.1;
    let r = node.checkout(&alice, &[(&skus[1], 4)], &key()).await;
    assert_status(&r, 201, "cancelled order");
    let cancelled = order_id(&r.1);
    let r = node
        .post(
            &format!("/v1/orders/{cancelled}/cancel"),
            &alice,
            &json!({}),
        )
        .await;
    assert_ok(&r, "cancel");
    let r = node
        .post(
            &format!("/v1/skus/{}/stock", skus[1]),
            &admin,
            &json!({"delta": 5, "reason": "delivery"}),
        )
        .await;
    assert_ok(&r, "stock adjustment");

    let product = node.get("/v1/products/grace", None).await.1;
    let sku_before = [node.sku(&skus[0]).await, node.sku(&skus[1]).await];
    assert_stock(
        Stock::of(&sku_before[0]),
        Stock::new(15, 2, 3),
        "sku 0 before",
    );
    assert_stock(
        Stock::of(&sku_before[1]),
        Stock::new(24, 1, 0),
        "sku 1 before",
    );
    let cart = node.get("/v1/cart", Some(&alice)).await.1;
    let orders = node.get("/v1/orders", Some(&alice)).await.1;

    let status = node.stop().await;
    assert!(status.success(), "graceful stop exits 0, got {status}");
    drop(node);

    let node = Node::config().dir(dir.path()).start().await;
    assert_eq!(
        node.get("/v1/products/grace", None).await.1,
        product,
        "product"
    );
    assert_eq!(
        node.sku(&skus[0]).await,
        sku_before[0],
        "sku 0 after restart"
    );
    assert_eq!(
        node.sku(&skus[1]).await,
        sku_before[1],
        "sku 1 after restart"
    );
    assert_eq!(
        node.get("/v1/cart", Some(&alice)).await.1,
        cart,
        "cart after restart"
    );
    assert_eq!(
        node.get("/v1/orders", Some(&alice)).await.1,
        orders,
        "orders after restart"
    );
    assert_eq!(node.order(&alice, &order_id(&paid)).await["status"], "paid");
    assert_eq!(node.order(&alice, &cancelled).await["status"], "cancelled");

    // And it goes on from there.
    assert_ok(
        &node.pay(&alice, &pending, &key()).await,
        "pay after restart",
    );
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(15, 0, 5),
        "sku 0 at the end",
    );
    assert_stock(
        node.stock(&skus[1]).await,
        Stock::new(24, 0, 1),
        "sku 1 at the end",
    );
    let r = node.checkout(&alice, &[(&skus[1], 24)], &key()).await;
    assert_status(&r, 201, "the adjusted stock is orderable");
}

/// Waits until `shardmall_active_actors` falls below `than`, and answers it.
async fn active_actors_below(api: &Api, than: f64) -> f64 {
    poll_until(
        &format!("shardmall_active_actors below {than}"),
        Duration::from_secs(20),
        || async move {
            let m = api.metrics().await;
            let v = metric_sum(&m, "shardmall_active_actors")
                .unwrap_or_else(|| panic!("no shardmall_active_actors in /metrics:\n{m}"));
            (v < than).then_some(v)
        },
    )
    .await
}

/// With `--idle-timeout 1s` idle actors passivate, and come back with their state.
#[tokio::test]
async fn passivated_actors_keep_state() {
    let node = Node::config().args(&["--idle-timeout", "1s"]).start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "idle", 1, 700, 10).await;
    let sku = skus[0].as_str();
    let r = node.checkout(&alice, &[(sku, 2)], &key()).await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let id = order_id(&order);
    let r = node
        .put(
            &format!("/v1/cart/items/{sku}"),
            &alice,
            &json!({"quantity": 1}),
        )
        .await;
    assert_status(&r, 200, "cart put");

    let sku_before = node.sku(sku).await;
    let order_before = node.order(&alice, &id).await;
    let cart_before = node.get("/v1/cart", Some(&alice)).await.1;
    let m = node.metrics().await;
    let active = metric_sum(&m, "shardmall_active_actors")
        .unwrap_or_else(|| panic!("no shardmall_active_actors in /metrics:\n{m}"));
    assert!(active >= 1.0, "actors are active after use: {active}");

    let idle = active_actors_below(&node, active).await;
    assert!(idle < active);
    assert_eq!(node.sku(sku).await, sku_before, "sku after passivation");
    assert_eq!(
        node.order(&alice, &id).await,
        order_before,
        "order after passivation"
    );
    assert_eq!(
        node.get("/v1/cart", Some(&alice)).await.1,
        cart_before,
        "cart after passivation"
    );

    // Mutate the reactivated entities.
    let r = node
        .post(
            &format!("/v1/skus/{sku}/stock"),
            &admin,
            &json!({"delta": 5, "reason": "restock"}),
        )
        .await;
    assert_ok(&r, "stock adjustment after passivation");
    assert_ok(
        &node.pay(&alice, &order_before, &key()).await,
        "pay after passivation",
    );
    let sku_after = node.sku(sku).await;
    assert_stock(
        Stock::of(&sku_after),
        Stock::new(13, 0, 2),
        "after mutation",
    );
    let m = node.metrics().await;
    let active = metric_sum(&m, "shardmall_active_actors").unwrap_or(0.0);

    // Once more: the mutations survive the next passivation too.
    if active > 0.0 {
        active_actors_below(&node, active).await;
    }
    assert_eq!(
        node.sku(sku).await,
        sku_after,
        "sku after second passivation"
    );
    assert_eq!(node.order(&alice, &id).await["status"], "paid");
    let r = node.checkout(&alice, &[(sku, 13)], &key()).await;
    assert_status(&r, 201, "all available stock is orderable");
}

/// A keyed checkout and payment record their answers in the frames that place and pay
/// the order (ADR 0015): after kill -9 each repeat answers exactly the first answer and
/// runs nothing again, for one line and for several.
#[tokio::test]
async fn keyed_answers_survive_kill9_with_their_orders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = || sync_node(dir.path());
    let mut node = start().await;
    let admin = admin();
    let alice = customer("replay-alice");
    let skus = node.product_with_skus(&admin, "replay", 2, 300, 10).await;

    let mut firsts = Vec::new();
    for items in [vec![(&*skus[0], 2)], vec![(&*skus[0], 1), (&*skus[1], 3)]] {
        let (ck, pk) = (key(), key());
        let placed = node.checkout(&alice, &items, &ck).await;
        assert_status(&placed, 201, "checkout");
        let paid = node.pay(&alice, &placed.1, &pk).await;
        assert_ok(&paid, "pay");
        assert_eq!(paid.1["status"], "paid", "{}", paid.1);
        firsts.push((items, ck, pk, placed, paid));
    }
    let stock = [node.stock(&skus[0]).await, node.stock(&skus[1]).await];
    assert_stock(stock[0], Stock::new(7, 0, 3), "sold before the kill");

    node.kill9();
    let node = start().await;
    for (items, ck, pk, placed, paid) in &firsts {
        let again = node.checkout(&alice, items, ck).await;
        assert_eq!(again, *placed, "checkout repeated after kill -9");
        let again = node.pay(&alice, &placed.1, pk).await;
        assert_eq!(again, *paid, "pay repeated after kill -9");
    }
    let after = [node.stock(&skus[0]).await, node.stock(&skus[1]).await];
    assert_eq!(after, stock, "the repeats moved no stock");
    let (st, mine) = node.get("/v1/orders", Some(&alice)).await;
    assert_eq!(st, 200, "{mine}");
    assert_eq!(mine["items"].as_array().map(Vec::len), Some(2), "{mine}");
}
