//! Flash-sale campaigns against the real binary: never oversold under many concurrent
//! buyers, the per-buyer limit, the window, unpaid units coming back, the kill switch,
//! admission control on a hot campaign, and kill -9 in the middle of a sale.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardmall_tests::*;

/// An RFC 3339 instant `secs` from now (negative: in the past).
fn at(secs: i64) -> String {
    let t = if secs >= 0 {
        std::time::SystemTime::now() + Duration::from_secs(secs as u64)
    } else {
        std::time::SystemTime::now() - Duration::from_secs(secs.unsigned_abs())
    };
    humantime::format_rfc3339_millis(t).to_string()
}

fn campaign_body(id: &str, sku: &str, quantity: i64, limit: i64) -> Value {
    json!({
        "campaign_id": id,
        "sku_id": sku,
        "price": money(100),
        "quantity": quantity,
        "ends_at": at(3600),
        "per_buyer_limit": limit,
        "payment_timeout_secs": 600,
    })
}

async fn create_campaign(api: &Api, body: &Value) -> Value {
    let (st, v) = api.post("/v1/campaigns", &admin(), body).await;
    assert_eq!(st, 201, "create campaign: {v}");
    v
}

async fn campaign(api: &Api, id: &str) -> Value {
    let (st, v) = api
        .get(&format!("/v1/campaigns/{id}"), Some(&customer("reader")))
        .await;
    assert_eq!(st, 200, "GET campaign {id}: {v}");
    v
}

async fn buy(api: &Api, id: &str, buyer: &str, quantity: i64) -> Resp {
    api.post_idem(
        &format!("/v1/campaigns/{id}/buy"),
        &customer(buyer),
        &key(),
        &json!({"quantity": quantity}),
    )
    .await
}

fn n(v: &Value, k: &str) -> i64 {
    v[k].as_i64()
        .unwrap_or_else(|| panic!("{k} is not an integer: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_quantity_is_sold_under_many_concurrent_buyers() {
    const UNITS: i64 = 25;
    const BUYERS: usize = 300;
    let node = Node::start().await;
    node.create_product(&admin(), "fp", &[("fp-s", 1000, 100)])
        .await;
    let created = create_campaign(&node, &campaign_body("fs1", "fp-s", UNITS, 1)).await;
    assert_eq!(created["status"], "live");
    assert_eq!(node.stock("fp-s").await, Stock::new(75, 25, 0));

    let mut tasks = Vec::new();
    for i in 0..BUYERS {
        let api = node.api();
        tasks.push(tokio::spawn(async move {
            let buyer = format!("fs-buyer-{i}");
            (buyer.clone(), buy(&api, "fs1", &buyer, 1).await)
        }));
    }
    let mut orders = Vec::new();
    let mut refusals: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let (buyer, (st, v)) = t.await.unwrap();
        match st {
            201 => {
                assert_eq!(v["status"], "pending_payment", "{v}");
                assert_eq!(v["campaign_id"], "fs1");
                assert_eq!(v["total"]["amount"], 100, "the campaign price: {v}");
                orders.push((buyer, v["order_id"].as_str().unwrap().to_owned()));
            }
            409 | 429 => {
                *refusals
                    .entry(v["error"]["code"].as_str().unwrap().to_owned())
                    .or_default() += 1
            }
            _ => panic!("unexpected answer {st}: {v}"),
        }
    }
    assert_eq!(orders.len() as i64, UNITS, "refusals: {refusals:?}");
    let sold_out = refusals.get("sold_out").copied().unwrap_or(0);
    let overloaded = refusals.get("overloaded").copied().unwrap_or(0);
    assert_eq!(
        sold_out + overloaded,
        BUYERS - UNITS as usize,
        "{refusals:?}"
    );
    let ids: HashSet<&String> = orders.iter().map(|(_, o)| o).collect();
    assert_eq!(ids.len(), orders.len(), "order ids are unique");
    for (buyer, id) in &orders {
        let o = node.order(&customer(buyer), id).await;
        assert_eq!(o["status"], "pending_payment");
    }
    let c = campaign(&node, "fs1").await;
    assert_eq!((n(&c, "reserved"), n(&c, "remaining")), (UNITS, 0));
    assert_eq!(c["status"], "sold_out");
    // A late buyer is refused without anything changing.
    let (st, v) = buy(&node, "fs1", "late", 1).await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("sold_out")));

    // Paying moves the units to sold on the campaign and on the SKU.
    let (buyer, id) = &orders[0];
    let order = node.order(&customer(buyer), id).await;
    let (st, v) = node.pay(&customer(buyer), &order, &key()).await;
    assert_eq!(st, 200, "pay: {v}");
    let c = campaign(&node, "fs1").await;
    assert_eq!((n(&c, "sold"), n(&c, "reserved")), (1, UNITS - 1));
    assert_eq!(node.stock("fp-s").await, Stock::new(75, 24, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_buyer_limit_and_the_window_are_enforced() {
    let node = Node::start().await;
    node.create_product(&admin(), "lp", &[("lp-s", 1000, 100)])
        .await;
    create_campaign(&node, &campaign_body("lim", "lp-s", 10, 2)).await;
    assert_eq!(buy(&node, "lim", "ann", 1).await.0, 201);
    assert_eq!(buy(&node, "lim", "ann", 1).await.0, 201);
    let (st, v) = buy(&node, "lim", "ann", 1).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("limit_exceeded"))
    );
    let (st, v) = buy(&node, "lim", "ben", 3).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("limit_exceeded"))
    );
    assert_eq!(buy(&node, "lim", "ben", 2).await.0, 201);

    // Not started yet.
    let mut body = campaign_body("later", "lp-s", 5, 1);
    body["starts_at"] = json!(at(3000));
    let c = create_campaign(&node, &body).await;
    assert_eq!(c["status"], "scheduled");
    let (st, v) = buy(&node, "later", "ann", 1).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("campaign_not_started"))
    );

    // A short window: once it closes, buys are refused and unsold units go back.
    let mut body = campaign_body("short", "lp-s", 5, 1);
    body["ends_at"] = json!(at(2));
    create_campaign(&node, &body).await;
    assert_eq!(buy(&node, "short", "cat", 1).await.0, 201);
    // 100 - 10 (lim) - 5 (later) - 5 (short) carved.
    assert_eq!(node.stock("lp-s").await.available, 80);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (st, v) = buy(&node, "short", "dan", 1).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("campaign_ended"))
    );
    node.poll(
        "unsold units back on the sku",
        Duration::from_secs(10),
        || async { (node.stock("lp-s").await.available == 84).then_some(()) },
    )
    .await;
    let c = campaign(&node, "short").await;
    assert_eq!(c["status"], "ended");
    assert_eq!((n(&c, "reserved"), n(&c, "remaining")), (1, 0));
    let s = node.stock("lp-s").await;
    assert_eq!(s.total(), 100, "{s:?}");

    // The kill switch.
    let (st, v) = node
        .post("/v1/campaigns/lim/end", &admin(), &json!({}))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["status"], "ended");
    let (st, v) = buy(&node, "lim", "eve", 1).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("campaign_ended"))
    );
    // lim: 4 units awaiting payment stay reserved, 6 unsold return.
    assert_eq!(node.stock("lp-s").await.available, 90);
    let (st, list) = node.get("/v1/campaigns?status=ended", Some(&admin())).await;
    assert_eq!(st, 200, "{list}");
    let ended: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["campaign_id"].as_str().unwrap())
        .collect();
    assert_eq!(ended, vec!["lim", "short"]);
}

/// A campaign read again and again shows its status at the moment of each read, though
/// the campaign itself writes nothing when it starts (its body is rendered once per copy
/// and status, ADR 0014).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_page_shows_the_status_of_the_moment() {
    let node = Node::start().await;
    node.create_product(&admin(), "tp", &[("tp-s", 1000, 10)])
        .await;
    let starts = std::time::SystemTime::now() + Duration::from_millis(1500);
    let mut body = campaign_body("soon", "tp-s", 4, 1);
    body["starts_at"] = json!(humantime::format_rfc3339_millis(starts).to_string());
    create_campaign(&node, &body).await;
    for _ in 0..3 {
        let c = campaign(&node, "soon").await;
        assert_eq!(
            (c["status"].as_str(), n(&c, "remaining")),
            (Some("scheduled"), 4)
        );
    }
    tokio::time::sleep(
        starts
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(100),
    )
    .await;
    let c = campaign(&node, "soon").await;
    assert_eq!(
        (c["status"].as_str(), n(&c, "remaining")),
        (Some("live"), 4),
        "{c}"
    );
    assert_eq!(buy(&node, "soon", "ann", 1).await.0, 201);
    let c = campaign(&node, "soon").await;
    assert_eq!(
        (c["status"].as_str(), n(&c, "remaining")),
        (Some("live"), 3),
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_units_return_to_the_campaign_at_the_deadline() {
    let node = Node::start().await;
    node.create_product(&admin(), "up", &[("up-s", 1000, 10)])
        .await;
    let mut body = campaign_body("unpaid", "up-s", 1, 1);
    body["payment_timeout_secs"] = json!(1);
    create_campaign(&node, &body).await;
    let (st, order) = buy(&node, "unpaid", "fay", 1).await;
    assert_eq!(st, 201, "{order}");
    let (st, v) = buy(&node, "unpaid", "gus", 1).await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("sold_out")));
    let id = order["order_id"].as_str().unwrap();
    node.poll(
        "the unpaid order expires",
        Duration::from_secs(10),
        || async {
            let o = node.order(&customer("fay"), id).await;
            (o["status"] == "cancelled").then_some(())
        },
    )
    .await;
    let c = node
        .poll(
            "its unit back on the campaign",
            Duration::from_secs(10),
            || async {
                let c = campaign(&node, "unpaid").await;
                (n(&c, "remaining") == 1).then_some(c)
            },
        )
        .await;
    assert_eq!(c["status"], "live");
    // The same buyer's count dropped too: fay may buy again; paying the expired order fails.
    let (st, v) = node.pay(&customer("fay"), &order, &key()).await;
    assert_eq!(st, 409, "{v}");
    let (st, again) = buy(&node, "unpaid", "fay", 1).await;
    assert_eq!(st, 201, "{again}");
    let (st, v) = node.pay(&customer("fay"), &again, &key()).await;
    assert_eq!(st, 200, "{v}");
    let c = campaign(&node, "unpaid").await;
    assert_eq!((n(&c, "sold"), n(&c, "reserved")), (1, 0));
    assert_eq!(node.stock("up-s").await, Stock::new(9, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_campaign_input_is_refused_clearly() {
    let node = Node::start().await;
    node.create_product(&admin(), "bp", &[("bp-s", 1000, 10)])
        .await;
    let cases = [
        (
            json!({"sku_id": "bp-s", "price": money(1), "quantity": 0, "ends_at": at(60)}),
            400,
        ),
        (
            json!({"sku_id": "bp-s", "price": money(1), "quantity": 1, "ends_at": "tomorrow"}),
            400,
        ),
        (
            json!({"sku_id": "bp-s", "price": money(1), "quantity": 1, "ends_at": at(-60)}),
            400,
        ),
        (
            json!({"sku_id": "bp-s", "price": money(1), "quantity": 11, "ends_at": at(60)}),
            409,
        ),
        (
            json!({"sku_id": "nope", "price": money(1), "quantity": 1, "ends_at": at(60)}),
            404,
        ),
        (
            json!({"sku_id": "bp-s", "price": money(1), "quantity": 1, "ends_at": at(60), "per_buyer_limit": 0}),
            400,
        ),
        (
            json!({"sku_id": "bp s", "price": money(1), "quantity": 1, "ends_at": at(60)}),
            400,
        ),
    ];
    for (body, want) in cases {
        let (st, v) = node.post("/v1/campaigns", &admin(), &body).await;
        assert_eq!(st, want, "{body}: {v}");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    // Nothing was carved by the refusals.
    assert_eq!(node.stock("bp-s").await, Stock::new(10, 0, 0));
    // Customers may not create campaigns; buyers need a customer token.
    let (st, _) = node
        .post(
            "/v1/campaigns",
            &customer("x"),
            &campaign_body("c", "bp-s", 1, 1),
        )
        .await;
    assert_eq!(st, 403);
    create_campaign(&node, &campaign_body("ok", "bp-s", 1, 1)).await;
    let (st, _) = node
        .post_idem(
            "/v1/campaigns/ok/buy",
            &admin(),
            &key(),
            &json!({"quantity": 1}),
        )
        .await;
    assert_eq!(st, 403);
    // A buy needs an Idempotency-Key, like checkout and pay.
    let (st, v) = node
        .post(
            "/v1/campaigns/ok/buy",
            &customer("y"),
            &json!({"quantity": 1}),
        )
        .await;
    assert_eq!(
        (st, &v["error"]["code"]),
        (400, &json!("idempotency_key_required")),
        "{v}"
    );
    let (st, v) = buy(&node, "ok", "y", 0).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = buy(&node, "missing", "y", 1).await;
    assert_eq!(st, 404, "{v}");
    // An id that exists is refused, and the refusal carves nothing.
    let (st, v) = node
        .post(
            "/v1/campaigns",
            &admin(),
            &campaign_body("ok", "bp-s", 1, 1),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("already_exists"))
    );
    assert_eq!(node.stock("bp-s").await, Stock::new(9, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_buy_is_answered_once() {
    let node = Node::start().await;
    node.create_product(&admin(), "ip", &[("ip-s", 1000, 10)])
        .await;
    create_campaign(&node, &campaign_body("idem", "ip-s", 5, 3)).await;
    let k = key();
    let body = json!({"quantity": 1});
    let first = node
        .post_idem("/v1/campaigns/idem/buy", &customer("hal"), &k, &body)
        .await;
    let again = node
        .post_idem("/v1/campaigns/idem/buy", &customer("hal"), &k, &body)
        .await;
    assert_eq!(first.0, 201, "{}", first.1);
    assert_eq!(first, again);
    assert_eq!(n(&campaign(&node, "idem").await, "reserved"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_buy_replays_its_first_answer_and_refuses_another_body() {
    let node = Node::start().await;
    node.create_product(&admin(), "kr", &[("kr-s", 1000, 10)])
        .await;
    create_campaign(&node, &campaign_body("keyed", "kr-s", 5, 2)).await;
    let (k, path) = (key(), "/v1/campaigns/keyed/buy");
    let auth = format!("Bearer {}", customer("kim"));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("idempotency-key", k.as_str()),
    ];
    let body = br#"{"quantity":1}"#.to_vec();
    let first = node
        .raw(reqwest::Method::POST, path, &headers, Some(body.clone()))
        .await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert!(first.headers.get("idempotent-replay").is_none());
    let id = first.body["order_id"].as_str().unwrap().to_owned();
    // Readable, and cancellable, at once.
    let o = node.order(&customer("kim"), &id).await;
    assert_eq!(o["status"], "pending_payment");
    let (st, v) = node
        .post(
            &format!("/v1/orders/{id}/cancel"),
            &customer("kim"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // The repeat answers the first answer, even after the cancel, and buys nothing.
    let again = node
        .raw(reqwest::Method::POST, path, &headers, Some(body))
        .await;
    assert_eq!((again.status, &again.body), (201, &first.body));
    assert_eq!(
        again.headers.get("idempotent-replay").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(n(&campaign(&node, "keyed").await, "reserved"), 0);
    // The same key with another body is a conflict.
    let other = node
        .raw(
            reqwest::Method::POST,
            path,
            &headers,
            Some(br#"{"quantity":2}"#.to_vec()),
        )
        .await;
    assert_eq!(
        (other.status, other.body["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{}",
        other.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_campaign_sells_again_soon_after_a_unit_comes_back() {
    let node = Node::start().await;
    node.create_product(&admin(), "sb", &[("sb-s", 1000, 10)])
        .await;
    create_campaign(&node, &campaign_body("back", "sb-s", 1, 1)).await;
    let (st, order) = buy(&node, "back", "ann", 1).await;
    assert_eq!(st, 201, "{order}");
    for _ in 0..3 {
        let (st, v) = buy(&node, "back", "bob", 1).await;
        assert_eq!((st, v["error"]["code"].as_str()), (409, Some("sold_out")));
    }
    let id = order["order_id"].as_str().unwrap();
    let (st, v) = node
        .post(
            &format!("/v1/orders/{id}/cancel"),
            &customer("ann"),
            &json!({}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // The edge may answer from figures it saw a moment ago, but not for long.
    let started = Instant::now();
    loop {
        match buy(&node, "back", "bob", 1).await {
            (201, _) => break,
            (409, v) if v["error"]["code"] == "sold_out" => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "still sold out 5 s after a unit came back"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (st, v) => panic!("unexpected {st}: {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_campaign_past_its_queue_bound_answers_429() {
    let node = Node::config().args(&["--entity-queue", "1"]).start().await;
    node.create_product(&admin(), "hp", &[("hp-s", 1000, 10_000)])
        .await;
    create_campaign(&node, &campaign_body("hot", "hp-s", 10_000, 1)).await;
    let mut tasks = Vec::new();
    for i in 0..400 {
        let api = node.api();
        tasks.push(tokio::spawn(async move {
            let buyer = format!("hot-{i}");
            let token = customer(&buyer);
            api.raw(
                reqwest::Method::POST,
                "/v1/campaigns/hot/buy",
                &[
                    ("authorization", &format!("Bearer {token}")),
                    ("content-type", "application/json"),
                    ("idempotency-key", &key()),
                ],
                Some(br#"{"quantity":1}"#.to_vec()),
            )
            .await
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => ok += 1,
            429 => {
                assert_eq!(r.body["error"]["code"], "overloaded");
                assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
                overloaded += 1;
            }
            st => panic!("unexpected {st}: {}", r.body),
        }
    }
    assert!(
        overloaded > 0,
        "no 429 among 400 concurrent buys with a queue of 1"
    );
    let c = campaign(&node, "hot").await;
    assert_eq!(
        n(&c, "reserved"),
        ok,
        "every 201 holds one unit, every 429 none"
    );
    assert!(node
        .metrics()
        .await
        .lines()
        .any(|l| l.starts_with("shardmall_entity_overloaded_total") && !l.ends_with(" 0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_in_the_middle_of_a_flash_sale_loses_no_acknowledged_buy() {
    const UNITS: i64 = 120;
    const BUYERS: usize = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::config().dir(dir.path()).start().await;
    node.create_product(&admin(), "kp", &[("kp-s", 1000, 500)])
        .await;
    create_campaign(&node, &campaign_body("crash", "kp-s", UNITS, 1)).await;

    // Buyers in waves until the node is killed under them.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (api, tx) = (node.api(), tx.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..BUYERS).step_by(8) {
                let buyer = format!("kb-{i}");
                let r = api
                    .try_call(
                        reqwest::Method::POST,
                        "/v1/campaigns/crash/buy",
                        Some(&customer(&buyer)),
                        Some(&key()),
                        Some(&json!({"quantity": 1})),
                    )
                    .await;
                match r {
                    Err(_) => break,
                    Ok((201, v)) => {
                        let _ = tx.send((buyer, v["order_id"].as_str().unwrap().to_owned()));
                    }
                    Ok((409 | 429 | 503, _)) => {}
                    Ok((st, v)) => panic!("unexpected {st}: {v}"),
                }
            }
        }));
    }
    drop(tx);
    let mut acked = Vec::new();
    let started = Instant::now();
    while acked.len() < 40 && started.elapsed() < Duration::from_secs(60) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(a)) => acked.push(a),
            _ => break,
        }
    }
    node.kill9();
    for t in tasks {
        let _ = t.await;
    }
    while let Ok(a) = rx.try_recv() {
        acked.push(a);
    }
    assert!(
        acked.len() >= 40,
        "only {} buys before the kill",
        acked.len()
    );

    let node = Node::config().dir(dir.path()).start().await;
    let mut cancelled = 0;
    for (i, (buyer, id)) in acked.iter().enumerate() {
        let o = node.order(&customer(buyer), id).await;
        assert_eq!(o["status"], "pending_payment", "acknowledged order {id}");
        assert_eq!(o["campaign_id"], "crash");
        // Every acknowledged buy's order can be paid or cancelled after the restart.
        if i % 2 == 0 {
            let (st, v) = node.pay(&customer(buyer), &o, &key()).await;
            assert_eq!(
                (st, v["status"].as_str()),
                (200, Some("paid")),
                "pay {id}: {v}"
            );
        } else {
            let (st, v) = node
                .post(
                    &format!("/v1/orders/{id}/cancel"),
                    &customer(buyer),
                    &json!({}),
                )
                .await;
            assert_eq!(
                (st, v["status"].as_str()),
                (200, Some("cancelled")),
                "cancel {id}: {v}"
            );
            cancelled += 1;
        }
    }
    let c = campaign(&node, "crash").await;
    let held = n(&c, "reserved") + n(&c, "sold");
    let paid = (acked.len() - cancelled) as i64;
    assert!(n(&c, "sold") == paid, "{paid} paid: {c}");
    assert!(
        held >= paid && held <= UNITS,
        "campaign holds {held} for {paid} acknowledged buys still open: {c}"
    );
    // Selling on after the restart still stops at the quantity.
    let mut more = 0;
    for i in BUYERS..BUYERS + 200 {
        match buy(&node, "crash", &format!("kb-{i}"), 1).await {
            (201, _) => more += 1,
            (409, v) => assert_eq!(v["error"]["code"], "sold_out", "{v}"),
            (st, v) => panic!("unexpected {st}: {v}"),
        }
    }
    let c = campaign(&node, "crash").await;
    assert_eq!(n(&c, "reserved") + n(&c, "sold"), UNITS, "{c}");
    assert_eq!(held + more, UNITS);
    let s = node.stock("kp-s").await;
    assert_eq!(s.total(), 500, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refunded_campaign_order_returns_its_unit_to_the_sku_once() {
    let node = Node::start().await;
    node.create_product(&admin(), "rp", &[("rp-s", 1000, 10)])
        .await;
    create_campaign(&node, &campaign_body("ref", "rp-s", 4, 2)).await;
    let (st, order) = buy(&node, "ref", "ivy", 2).await;
    assert_eq!(st, 201, "{order}");
    let (st, v) = node.pay(&customer("ivy"), &order, &key()).await;
    assert_eq!(st, 200, "{v}");
    // The campaign holds 2 unsold units, the order's 2 are sold.
    assert_eq!(node.stock("rp-s").await, Stock::new(6, 2, 2));
    let id = order["order_id"].as_str().unwrap();
    let (st, v) = node
        .post(
            &format!("/v1/orders/{id}/refund"),
            &customer("ivy"),
            &json!({"reason": "too late"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let approve = |restock: bool| {
        let node = node.api();
        let id = id.to_owned();
        async move {
            node.post(
                &format!("/v1/orders/{id}/refund/approve"),
                &admin(),
                &json!({"restock": restock}),
            )
            .await
        }
    };
    let (st, v) = approve(true).await;
    assert_eq!((st, v["status"].as_str()), (200, Some("refunded")), "{v}");
    assert_eq!(node.stock("rp-s").await, Stock::new(8, 2, 0));
    // Approving again (a retry) does not restock twice.
    let (st, v) = approve(true).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(node.stock("rp-s").await, Stock::new(8, 2, 0));
    // The campaign still counts the sale.
    let c = campaign(&node, "ref").await;
    assert_eq!((n(&c, "sold"), n(&c, "remaining")), (2, 2));
}
