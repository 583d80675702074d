//! The order lifecycle as a storefront drives it, against a real node (API.md: Catalog,
//! Cart, Orders). Every test starts its own node on a fresh data dir.

use std::time::Duration;

use serde_json::{json, Value};
use shardmall_tests::*;

/// admin creates a product -> a customer browses it -> cart -> checkout (from the cart and
/// from items) -> reserved -> pay -> sold -> ship -> confirm receipt -> completed.
#[tokio::test]
async fn full_order_lifecycle() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");

    let created = node
        .create_product(
            &admin,
            "phone",
            &[("phone-black", 1000, 10), ("phone-white", 2500, 10)],
        )
        .await;
    assert_eq!(
        created["product_id"], "phone",
        "create answers the product: {created}"
    );

    // Catalog reads need no token.
    let (st, p) = node.get("/v1/products/phone", None).await;
    assert_status(&(st, p.clone()), 200, "GET product");
    assert_eq!(p["product_id"], "phone");
    assert_eq!(p["title"], "phone title");
    assert_eq!(p["status"], "on_shelf", "status defaults to on_shelf: {p}");
    let (st, list) = node.get("/v1/products?category=e2e&limit=10", None).await;
    assert_status(&(st, list.clone()), 200, "list products");
    let items = list["items"].as_array().expect("items array");
    assert!(
        items.iter().any(|i| i["product_id"] == "phone"),
        "category list contains the product: {list}"
    );
    assert!(
        list.get("next_cursor").is_some(),
        "list has next_cursor: {list}"
    );

    let sku = node.sku("phone-black").await;
    assert_eq!(sku["sku_id"], "phone-black");
    assert_eq!(sku["product_id"], "phone");
    assert_eq!(sku["name"], "phone-black name");
    assert_eq!(sku["specs"]["color"], "black");
    assert_eq!(sku["price"], money(1000));
    assert!(sku["status"].is_string(), "sku has a status: {sku}");
    assert!(sku["version"].is_u64(), "sku has a version: {sku}");
    assert_stock(Stock::of(&sku), Stock::new(10, 0, 0), "fresh sku");

    // Cart: put, put, get, delete, put 0 removes.
    let r = node
        .put(
            "/v1/cart/items/phone-black",
            &alice,
            &json!({"quantity": 2}),
        )
        .await;
    assert_status(&r, 200, "PUT cart item");
    assert_eq!(r.1["total"], money(2000), "cart total: {}", r.1);
    let line = &r.1["items"][0];
    assert_eq!(line["sku_id"], "phone-black");
    assert_eq!(line["quantity"], 2);
    assert_eq!(line["unit_price"], money(1000));
    assert_eq!(line["line_total"], money(2000));
    let r = node
        .put(
            "/v1/cart/items/phone-white",
            &alice,
            &json!({"quantity": 1}),
        )
        .await;
    assert_status(&r, 200, "PUT second cart item");
    assert_eq!(r.1["total"], money(4500), "cart total: {}", r.1);
    let r = node.get("/v1/cart", Some(&alice)).await;
    assert_status(&r, 200, "GET cart");
    assert_eq!(r.1["items"].as_array().map(Vec::len), Some(2), "{}", r.1);
    assert_eq!(r.1["total"], money(4500));
    let r = node.delete("/v1/cart/items/phone-white", &alice).await;
    assert_status(&r, 200, "DELETE cart item");
    assert_eq!(r.1["items"].as_array().map(Vec::len), Some(1), "{}", r.1);
    assert_eq!(r.1["total"], money(2000));
    let r = node
        .put(
            "/v1/cart/items/phone-white",
            &alice,
            &json!({"quantity": 3}),
        )
        .await;
    assert_status(&r, 200, "PUT again");
    let r = node
        .put(
            "/v1/cart/items/phone-white",
            &alice,
            &json!({"quantity": 0}),
        )
        .await;
    assert_status(&r, 200, "PUT quantity 0");
    assert_eq!(
        r.1["items"].as_array().map(Vec::len),
        Some(1),
        "0 removes: {}",
        r.1
    );
    // Another customer's cart is their own.
    let r = node.get("/v1/cart", Some(&customer("bob"))).await;
    assert_status(&r, 200, "bob's cart");
    assert_eq!(r.1["items"], json!([]), "bob sees an empty cart: {}", r.1);

    // Checkout from the cart.
    let r = node
        .post_idem("/v1/orders", &alice, &key(), &cart_order_body())
        .await;
    assert_status(&r, 201, "checkout from cart");
    let o1 = r.1;
    assert_eq!(o1["status"], "pending_payment");
    assert_eq!(o1["buyer"], "alice");
    assert_eq!(o1["total"], money(2000));
    assert_eq!(o1["lines"][0]["sku_id"], "phone-black");
    assert_eq!(o1["lines"][0]["quantity"], 2);
    assert_eq!(o1["lines"][0]["unit_price"], money(1000));
    assert_eq!(o1["lines"][0]["line_total"], money(2000));
    assert_eq!(o1["lines"][0]["name"], "phone-black name");
    assert!(o1["created_at"].is_string(), "{o1}");
    assert!(o1["payment_deadline"].is_string(), "{o1}");
    assert!(o1["paid_at"].is_null(), "{o1}");
    assert!(o1["shipment"].is_null(), "{o1}");
    assert!(o1["refund"].is_null(), "{o1}");
    let r = node.get("/v1/cart", Some(&alice)).await;
    assert_eq!(
        r.1["items"],
        json!([]),
        "from_cart empties the ordered lines: {}",
        r.1
    );
    assert_stock(
        node.stock("phone-black").await,
        Stock::new(8, 2, 0),
        "after checkout",
    );

    // Checkout from items.
    let r = node.checkout(&alice, &[("phone-white", 3)], &key()).await;
    assert_status(&r, 201, "checkout from items");
    let o2 = r.1;
    assert_eq!(o2["total"], money(7500));
    assert_stock(
        node.stock("phone-white").await,
        Stock::new(7, 3, 0),
        "after checkout 2",
    );

    // Pay the first: reserved -> sold.
    let id1 = order_id(&o1);
    let r = node.pay(&alice, &o1, &key()).await;
    assert_ok(&r, "pay");
    assert_eq!(r.1["status"], "paid", "{}", r.1);
    assert!(r.1["paid_at"].is_string(), "{}", r.1);
    assert_stock(
        node.stock("phone-black").await,
        Stock::new(8, 0, 2),
        "after pay",
    );

    // Ship (admin).
    let r = node
        .post(
            &format!("/v1/orders/{id1}/ship"),
            &admin,
            &json!({"carrier": "SF", "tracking_no": "SF123456"}),
        )
        .await;
    assert_ok(&r, "ship");
    assert_eq!(r.1["status"], "shipped", "{}", r.1);
    assert_eq!(r.1["shipment"]["carrier"], "SF");
    assert_eq!(r.1["shipment"]["tracking_no"], "SF123456");
    assert!(r.1["shipped_at"].is_string(), "{}", r.1);

    // Confirm receipt (buyer).
    let r = node
        .post(
            &format!("/v1/orders/{id1}/confirm-receipt"),
            &alice,
            &json!({}),
        )
        .await;
    assert_ok(&r, "confirm-receipt");
    assert_eq!(r.1["status"], "completed", "{}", r.1);
    let o = node.order(&alice, &id1).await;
    assert_eq!(o["status"], "completed");
    assert!(o["completed_at"].is_string(), "{o}");
    assert_eq!(o["lines"], o1["lines"], "line snapshot unchanged");
    let o = node.order(&admin, &id1).await;
    assert_eq!(o["status"], "completed", "admin reads any order");
    assert_stock(
        node.stock("phone-black").await,
        Stock::new(8, 0, 2),
        "at the end",
    );
}

/// The order keeps the line snapshot taken when it was placed.
#[tokio::test]
async fn order_lines_are_a_snapshot() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "snap", 1, 1000, 5).await;
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let r = node
        .put(
            &format!("/v1/skus/{}/price", skus[0]),
            &admin,
            &json!({"price": money(5000)}),
        )
        .await;
    assert_ok(&r, "set price");
    assert_eq!(node.sku(&skus[0]).await["price"], money(5000));
    let o = node.order(&alice, &order_id(&order)).await;
    assert_eq!(
        o["lines"][0]["unit_price"],
        money(1000),
        "snapshot price: {o}"
    );
    assert_eq!(o["total"], money(1000), "{o}");
    // The order is paid at its own total, not the new price.
    let r = node.pay(&alice, &o, &key()).await;
    assert_ok(&r, "pay at snapshot total");
}

/// Refused transitions answer 409 invalid_state.
#[tokio::test]
async fn invalid_transitions_are_refused() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "trans", 1, 100, 10).await;
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let id = order_id(&order);

    let ship = json!({"carrier": "SF", "tracking_no": "T1"});
    let r = node
        .post(&format!("/v1/orders/{id}/ship"), &admin, &ship)
        .await;
    assert_error(&r, 409, "invalid_state", "ship an unpaid order");
    let r = node
        .post(
            &format!("/v1/orders/{id}/confirm-receipt"),
            &alice,
            &json!({}),
        )
        .await;
    assert_error(&r, 409, "invalid_state", "confirm an unpaid order");
    let r = node
        .post(
            &format!("/v1/orders/{id}/refund"),
            &alice,
            &json!({"reason": "x"}),
        )
        .await;
    assert_error(&r, 409, "invalid_state", "refund an unpaid order");

    assert_ok(&node.pay(&alice, &order, &key()).await, "pay");
    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &alice, &json!({}))
        .await;
    assert_error(&r, 409, "invalid_state", "cancel a paid order");
    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &admin, &json!({}))
        .await;
    assert_error(&r, 409, "invalid_state", "admin cancels a paid order");
    assert_eq!(node.order(&alice, &id).await["status"], "paid");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(9, 0, 1),
        "after refusals",
    );

    // paid -> paid is not a transition: a second payment (a new key, so not a replay)
    // is refused with the current status, and sells nothing.
    let r = node.pay(&alice, &order, &key()).await;
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(9, 0, 1),
        "after a second payment",
    );
    assert_error(&r, 409, "invalid_state", "pay a paid order with a new key");
}

/// refund request -> approve with restock -> available back; without restock sold stays.
#[tokio::test]
async fn refund_approve_with_and_without_restock() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "refund", 1, 300, 5).await;
    let sku = skus[0].as_str();

    let mut paid = Vec::new();
    for _ in 0..2 {
        let r = node.checkout(&alice, &[(sku, 2)], &key()).await;
        assert_status(&r, 201, "checkout");
        assert_ok(&node.pay(&alice, &r.1, &key()).await, "pay");
        paid.push(order_id(&r.1));
    }
    assert_stock(
        node.stock(sku).await,
        Stock::new(1, 0, 4),
        "two paid orders",
    );

    let r = node
        .post(
            &format!("/v1/orders/{}/refund", paid[0]),
            &alice,
            &json!({"reason": "changed my mind"}),
        )
        .await;
    assert_ok(&r, "refund request");
    assert_eq!(r.1["status"], "refund_requested", "{}", r.1);
    assert_eq!(r.1["refund"]["reason"], "changed my mind", "{}", r.1);
    assert!(r.1["refund"]["status"].is_string(), "{}", r.1);

    let r = node
        .post(
            &format!("/v1/orders/{}/refund/approve", paid[0]),
            &admin,
            &json!({"restock": true}),
        )
        .await;
    assert_ok(&r, "approve with restock");
    assert_eq!(r.1["status"], "refunded", "{}", r.1);
    assert_eq!(r.1["refund"]["restock"], true, "{}", r.1);
    assert_stock(
        node.stock(sku).await,
        Stock::new(3, 0, 2),
        "restocked refund",
    );

    let r = node
        .post(
            &format!("/v1/orders/{}/refund", paid[1]),
            &alice,
            &json!({"reason": "broken"}),
        )
        .await;
    assert_ok(&r, "refund request 2");
    let r = node
        .post(
            &format!("/v1/orders/{}/refund/approve", paid[1]),
            &admin,
            &json!({"restock": false}),
        )
        .await;
    assert_ok(&r, "approve without restock");
    assert_eq!(r.1["status"], "refunded", "{}", r.1);
    // Without restock the units stay sold: nothing is created or lost.
    assert_stock(
        node.stock(sku).await,
        Stock::new(3, 0, 2),
        "refund without restock",
    );

    // A refunded order takes no further refund.
    let r = node
        .post(
            &format!("/v1/orders/{}/refund", paid[0]),
            &alice,
            &json!({"reason": "again"}),
        )
        .await;
    assert_error(&r, 409, "invalid_state", "refund a refunded order");
}

/// A rejected refund returns the order to the status it had (paid, shipped).
#[tokio::test]
async fn refund_reject_returns_previous_status() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "reject", 1, 300, 5).await;
    let sku = skus[0].as_str();

    let r = node.checkout(&alice, &[(sku, 1)], &key()).await;
    assert_status(&r, 201, "checkout");
    assert_ok(&node.pay(&alice, &r.1, &key()).await, "pay");
    let paid = order_id(&r.1);

    let r = node.checkout(&alice, &[(sku, 1)], &key()).await;
    assert_status(&r, 201, "checkout 2");
    assert_ok(&node.pay(&alice, &r.1, &key()).await, "pay 2");
    let shipped = order_id(&r.1);
    let r = node
        .post(
            &format!("/v1/orders/{shipped}/ship"),
            &admin,
            &json!({"carrier": "EMS", "tracking_no": "E1"}),
        )
        .await;
    assert_ok(&r, "ship");

    for (id, before) in [(&paid, "paid"), (&shipped, "shipped")] {
        let r = node
            .post(
                &format!("/v1/orders/{id}/refund"),
                &alice,
                &json!({"reason": "meh"}),
            )
            .await;
        assert_ok(&r, "refund request");
        assert_eq!(r.1["status"], "refund_requested", "{}", r.1);
        let r = node
            .post(
                &format!("/v1/orders/{id}/refund/reject"),
                &admin,
                &json!({"reason": "outside policy"}),
            )
            .await;
        assert_ok(&r, "reject");
        assert_eq!(r.1["status"], before, "reject returns to {before}: {}", r.1);
        assert_eq!(node.order(&alice, id).await["status"], before);
    }
    assert_stock(
        node.stock(sku).await,
        Stock::new(3, 0, 2),
        "rejections move no stock",
    );
}

/// Same key + same body replays the first answer; same key + other body is 409.
#[tokio::test]
async fn order_and_pay_idempotency() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "idem", 2, 100, 10).await;

    let k = key();
    let first = node.checkout(&alice, &[(&skus[0], 2)], &k).await;
    assert_status(&first, 201, "first create");
    let replay = node.checkout(&alice, &[(&skus[0], 2)], &k).await;
    assert_status(&replay, 201, "replay answers the first response");
    assert_eq!(
        order_id(&replay.1),
        order_id(&first.1),
        "replay: same order"
    );
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(8, 2, 0),
        "reserved once",
    );

    let other = node.checkout(&alice, &[(&skus[0], 3)], &k).await;
    assert_error(&other, 409, "idempotency_conflict", "same key, other body");
    let other = node.checkout(&alice, &[(&skus[1], 2)], &k).await;
    assert_error(&other, 409, "idempotency_conflict", "same key, other sku");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(8, 2, 0),
        "conflict reserves nothing",
    );
    assert_stock(
        node.stock(&skus[1]).await,
        Stock::new(10, 0, 0),
        "conflict reserves nothing",
    );

    // The key is scoped by the token's sub: bob may use the same key.
    let bob = customer("bob");
    let r = node.checkout(&bob, &[(&skus[0], 2)], &k).await;
    assert_status(&r, 201, "another buyer, same key");
    assert_ne!(order_id(&r.1), order_id(&first.1), "bob gets his own order");

    // A missing Idempotency-Key is refused.
    let r = node
        .post("/v1/orders", &alice, &order_body(&[(&skus[0], 1)]))
        .await;
    assert_error(
        &r,
        400,
        "idempotency_key_required",
        "create without Idempotency-Key",
    );

    // Pay: a replay answers the first (paid) response, not invalid_state.
    let pk = key();
    let p1 = node.pay(&alice, &first.1, &pk).await;
    assert_ok(&p1, "pay");
    let p2 = node.pay(&alice, &first.1, &pk).await;
    assert_eq!(p2.0, p1.0, "pay replay status: {}", p2.1);
    assert_eq!(p2.1["status"], "paid", "pay replay body: {}", p2.1);
    let id = order_id(&first.1);
    let r = node
        .post_idem(
            &format!("/v1/orders/{id}/pay"),
            &alice,
            &pk,
            &json!({"method": "fake", "amount": money(1)}),
        )
        .await;
    assert_error(
        &r,
        409,
        "idempotency_conflict",
        "pay key reused with another body",
    );
    assert_stock(node.stock(&skus[0]).await, Stock::new(6, 2, 2), "paid once");
}

/// One short SKU fails the whole checkout and leaves nothing reserved on the others.
#[tokio::test]
async fn short_sku_reserves_nothing() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    node.create_product(
        &admin,
        "bundle",
        &[
            ("bundle-a", 100, 10),
            ("bundle-b", 100, 10),
            ("bundle-c", 100, 1),
        ],
    )
    .await;

    for items in [
        vec![("bundle-a", 2), ("bundle-b", 3), ("bundle-c", 2)],
        vec![("bundle-c", 2), ("bundle-a", 2), ("bundle-b", 3)],
        vec![("bundle-a", 11), ("bundle-b", 1)],
    ] {
        let r = node.checkout(&alice, &items, &key()).await;
        assert_error(&r, 409, "out_of_stock", &format!("checkout {items:?}"));
        assert_stock(
            node.stock("bundle-a").await,
            Stock::new(10, 0, 0),
            "a untouched",
        );
        assert_stock(
            node.stock("bundle-b").await,
            Stock::new(10, 0, 0),
            "b untouched",
        );
        assert_stock(
            node.stock("bundle-c").await,
            Stock::new(1, 0, 0),
            "c untouched",
        );
    }

    // All of it is really there to be ordered.
    let r = node
        .checkout(
            &alice,
            &[("bundle-a", 10), ("bundle-b", 10), ("bundle-c", 1)],
            &key(),
        )
        .await;
    assert_status(&r, 201, "checkout everything");
    assert_stock(
        node.stock("bundle-a").await,
        Stock::new(0, 10, 0),
        "a reserved",
    );
    assert_stock(
        node.stock("bundle-c").await,
        Stock::new(0, 1, 0),
        "c reserved",
    );
    let r = node.checkout(&alice, &[("bundle-a", 1)], &key()).await;
    assert_error(&r, 409, "out_of_stock", "nothing left");
}

/// Cancel (buyer or admin) returns the reservation; only from pending_payment.
#[tokio::test]
async fn cancel_returns_stock() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "cancel", 2, 100, 10).await;

    let r = node
        .checkout(&alice, &[(&skus[0], 3), (&skus[1], 4)], &key())
        .await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let id = order_id(&order);
    assert_stock(node.stock(&skus[0]).await, Stock::new(7, 3, 0), "reserved");
    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &alice, &json!({}))
        .await;
    assert_ok(&r, "buyer cancel");
    assert_eq!(r.1["status"], "cancelled", "{}", r.1);
    assert!(r.1["cancelled_at"].is_string(), "{}", r.1);
    assert_stock(node.stock(&skus[0]).await, Stock::new(10, 0, 0), "returned");
    assert_stock(node.stock(&skus[1]).await, Stock::new(10, 0, 0), "returned");

    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &alice, &json!({}))
        .await;
    assert_error(&r, 409, "invalid_state", "cancel twice");
    let r = node.pay(&alice, &order, &key()).await;
    assert_error(&r, 409, "invalid_state", "pay a cancelled order");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(10, 0, 0),
        "still returned",
    );

    let r = node.checkout(&alice, &[(&skus[0], 5)], &key()).await;
    assert_status(&r, 201, "checkout 2");
    let id2 = order_id(&r.1);
    let r = node
        .post(&format!("/v1/orders/{id2}/cancel"), &admin, &json!({}))
        .await;
    assert_ok(&r, "admin cancel");
    assert_eq!(r.1["status"], "cancelled", "{}", r.1);
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(10, 0, 0),
        "admin cancel returns",
    );
}

/// With `--payment-timeout 2s` an unpaid order is cancelled and its stock returns.
#[tokio::test]
async fn payment_deadline_cancels_and_returns_stock() {
    let node = Node::config()
        .args(&["--payment-timeout", "2s"])
        .start()
        .await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "expire", 2, 100, 10).await;

    let r = node
        .checkout(&alice, &[(&skus[0], 4), (&skus[1], 1)], &key())
        .await;
    assert_status(&r, 201, "checkout");
    let unpaid = r.1;
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "checkout 2");
    assert_ok(&node.pay(&alice, &r.1, &key()).await, "pay 2 in time");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(5, 4, 1),
        "before expiry",
    );

    let id = order_id(&unpaid);
    let api = node.api();
    let a = alice.clone();
    let o = poll_until(
        "the unpaid order to be cancelled",
        Duration::from_secs(15),
        || {
            let api = api.clone();
            let a = a.clone();
            let id = id.clone();
            async move {
                let o = api.order(&a, &id).await;
                (o["status"] != "pending_payment").then_some(o)
            }
        },
    )
    .await;
    assert_eq!(o["status"], "cancelled", "expired order: {o}");
    assert!(o["cancelled_at"].is_string(), "{o}");

    // Stock returns on every line (the release may trail the status change a little).
    let skus2 = skus.clone();
    let got = poll_until(
        "every line's reservation to return",
        Duration::from_secs(10),
        || {
            let api = api.clone();
            let skus2 = skus2.clone();
            async move {
                let s0 = api.stock(&skus2[0]).await;
                let s1 = api.stock(&skus2[1]).await;
                (s0.reserved == 0 && s1.reserved == 0).then_some((s0, s1))
            }
        },
    )
    .await;
    assert_stock(got.0, Stock::new(9, 0, 1), "first line after expiry");
    assert_stock(got.1, Stock::new(10, 0, 0), "second line after expiry");

    let r = node.pay(&alice, &unpaid, &key()).await;
    assert_error(&r, 409, "invalid_state", "pay after the deadline");
    assert_eq!(node.order(&alice, &id).await["status"], "cancelled");
}

/// Paying another amount is 422 amount_mismatch and changes nothing.
#[tokio::test]
async fn pay_amount_mismatch_is_422() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "amount", 1, 1999, 10).await;
    let r = node.checkout(&alice, &[(&skus[0], 2)], &key()).await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let id = order_id(&order);
    assert_eq!(order["total"], money(3998));

    for amount in [
        money(3997),
        money(3999),
        money(0),
        json!({"amount": 3998, "currency": "USD"}),
    ] {
        let r = node
            .post_idem(
                &format!("/v1/orders/{id}/pay"),
                &alice,
                &key(),
                &json!({"method": "fake", "amount": amount}),
            )
            .await;
        assert_error(&r, 422, "amount_mismatch", &format!("pay {amount}"));
    }
    assert_eq!(node.order(&alice, &id).await["status"], "pending_payment");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(8, 2, 0),
        "nothing sold",
    );
    assert_ok(
        &node.pay(&alice, &order, &key()).await,
        "pay the right amount",
    );
    assert_stock(node.stock(&skus[0]).await, Stock::new(8, 0, 2), "sold");
}

async fn callback(node: &Node, body: &Value, secret: &[u8]) -> Resp {
    let bytes = serde_json::to_vec(body).expect("serialize");
    let sig = sign_callback(secret, &bytes);
    let r = node
        .raw(
            reqwest::Method::POST,
            "/v1/payments/callback",
            &[
                ("content-type", "application/json"),
                ("x-signature", sig.as_str()),
            ],
            Some(bytes),
        )
        .await;
    (r.status, r.body)
}

/// A signed provider callback pays once per payment_id; a bad signature is 401.
#[tokio::test]
async fn payment_callback_applies_once() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "cb", 1, 500, 10).await;
    let sku = skus[0].as_str();

    let id = node.place(&alice, &[(sku, 2)], "checkout").await;
    let id2 = node.place(&alice, &[(sku, 1)], "checkout 2").await;

    // Bad signatures first: nothing happens.
    let body = json!({"payment_id": "pay-1", "order_id": id, "amount": money(1000), "status": "succeeded"});
    let r = callback(&node, &body, b"not-the-payment-secret").await;
    assert_error(
        &r,
        401,
        "unauthorized",
        "callback signed with another secret",
    );
    let bytes = serde_json::to_vec(&body).expect("serialize");
    let r = node
        .raw(
            reqwest::Method::POST,
            "/v1/payments/callback",
            &[("content-type", "application/json")],
            Some(bytes.clone()),
        )
        .await;
    assert_error(
        &(r.status, r.body),
        401,
        "unauthorized",
        "callback without signature",
    );
    // A signature over other bytes than the ones sent.
    let tampered =
        json!({"payment_id": "pay-1", "order_id": id, "amount": money(1), "status": "succeeded"});
    let sig = sign_callback(PAYMENT_SECRET.as_bytes(), &bytes);
    let r = node
        .raw(
            reqwest::Method::POST,
            "/v1/payments/callback",
            &[
                ("content-type", "application/json"),
                ("x-signature", sig.as_str()),
            ],
            Some(serde_json::to_vec(&tampered).expect("serialize")),
        )
        .await;
    assert_error(
        &(r.status, r.body),
        401,
        "unauthorized",
        "callback with a tampered body",
    );
    assert_eq!(node.order(&alice, &id).await["status"], "pending_payment");
    assert_stock(
        node.stock(sku).await,
        Stock::new(7, 3, 0),
        "bad callbacks sell nothing",
    );

    // The good one pays.
    let r = callback(&node, &body, PAYMENT_SECRET.as_bytes()).await;
    assert_ok(&r, "signed callback");
    let paid = node.order(&alice, &id).await;
    assert_eq!(paid["status"], "paid", "{paid}");
    assert_stock(node.stock(sku).await, Stock::new(7, 1, 2), "callback sold");

    // The same payment_id again changes nothing: the same callback, or a later
    // "failed" for it.
    let r = callback(&node, &body, PAYMENT_SECRET.as_bytes()).await;
    assert!(
        (200..300).contains(&r.0) || r.0 == 409,
        "a repeated callback is acknowledged or refused, not an error: {} {}",
        r.0,
        r.1
    );
    let mut late_failure = body.clone();
    late_failure["status"] = json!("failed");
    let r = callback(&node, &late_failure, PAYMENT_SECRET.as_bytes()).await;
    assert!(
        r.0 < 500,
        "a late failure for a used payment_id: {} {}",
        r.0,
        r.1
    );
    let after = node.order(&alice, &id).await;
    assert_eq!(after["status"], "paid");
    assert_eq!(
        after["version"], paid["version"],
        "a repeated payment_id changed the order"
    );
    assert_stock(
        node.stock(sku).await,
        Stock::new(7, 1, 2),
        "applied at most once",
    );

    // A failed payment does not pay.
    let failed =
        json!({"payment_id": "pay-2", "order_id": id2, "amount": money(500), "status": "failed"});
    let r = callback(&node, &failed, PAYMENT_SECRET.as_bytes()).await;
    assert!(r.0 < 500, "failed callback: {} {}", r.0, r.1);
    assert_ne!(node.order(&alice, &id2).await["status"], "paid");
}

fn ids_of(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items array: {list}"))
        .iter()
        .map(order_id)
        .collect()
}

/// `GET /v1/orders` lists the caller's own orders newest first, with a cursor.
#[tokio::test]
async fn my_orders_newest_first() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let bob = customer("bob");
    let skus = node.product_with_skus(&admin, "mine", 1, 100, 50).await;
    let sku = skus[0].as_str();

    let mut created = Vec::new();
    for i in 0..4 {
        let r = node.checkout(&alice, &[(sku, 1)], &key()).await;
        assert_status(&r, 201, &format!("alice order {i}"));
        created.push(r.1);
    }
    let bobs = node.place(&bob, &[(sku, 1)], "bob order").await;
    assert_ok(&node.pay(&alice, &created[1], &key()).await, "pay one");

    let newest_first: Vec<String> = created.iter().rev().map(order_id).collect();
    let r = node.get("/v1/orders", Some(&alice)).await;
    assert_status(&r, 200, "list mine");
    assert_eq!(
        ids_of(&r.1),
        newest_first,
        "newest first, only mine: {}",
        r.1
    );
    assert!(r.1["next_cursor"].is_null(), "one page: {}", r.1);

    let r = node.get("/v1/orders", Some(&bob)).await;
    assert_eq!(ids_of(&r.1), vec![bobs], "bob's list: {}", r.1);

    let r = node.get("/v1/orders?status=paid", Some(&alice)).await;
    assert_status(&r, 200, "status filter");
    assert_eq!(ids_of(&r.1), vec![order_id(&created[1])], "{}", r.1);

    // Pages of 3 then 1.
    let r = node.get("/v1/orders?limit=3", Some(&alice)).await;
    assert_status(&r, 200, "page 1");
    assert_eq!(ids_of(&r.1), newest_first[..3].to_vec(), "{}", r.1);
    let cursor = r.1["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a next_cursor after a full page: {}", r.1))
        .to_string();
    let r = node
        .get(&format!("/v1/orders?limit=3&cursor={cursor}"), Some(&alice))
        .await;
    assert_status(&r, 200, "page 2");
    assert_eq!(ids_of(&r.1), newest_first[3..].to_vec(), "{}", r.1);
    assert!(r.1["next_cursor"].is_null(), "last page: {}", r.1);

    let r = node.get("/v1/orders?limit=101", Some(&alice)).await;
    assert_error(&r, 400, "bad_request", "limit above 100");
}

/// `GET /v1/admin/orders?status=paid` finds the paid orders of every buyer.
#[tokio::test]
async fn admin_order_search() {
    let node = Node::start().await;
    let admin = admin();
    let skus = node.product_with_skus(&admin, "search", 1, 100, 50).await;
    let sku = skus[0].as_str();

    let mut paid = Vec::new();
    let mut unpaid = Vec::new();
    for buyer in ["carol", "dave", "erin"] {
        let t = customer(buyer);
        for i in 0..2 {
            let r = node.checkout(&t, &[(sku, 1)], &key()).await;
            assert_status(&r, 201, "checkout");
            if i == 0 {
                assert_ok(&node.pay(&t, &r.1, &key()).await, "pay");
                paid.push(order_id(&r.1));
            } else {
                unpaid.push(order_id(&r.1));
            }
        }
    }

    let r = node
        .get("/v1/admin/orders?status=paid&limit=100", Some(&admin))
        .await;
    assert_status(&r, 200, "admin search paid");
    let items = r.1["items"].as_array().expect("items array");
    assert!(
        items.iter().all(|o| o["status"] == "paid"),
        "only paid: {}",
        r.1
    );
    let mut got = ids_of(&r.1);
    got.sort();
    let mut want = paid.clone();
    want.sort();
    assert_eq!(got, want, "every paid order, across buyers");

    let r = node
        .get(
            "/v1/admin/orders?status=pending_payment&buyer=dave",
            Some(&admin),
        )
        .await;
    assert_status(&r, 200, "admin search by buyer");
    assert_eq!(ids_of(&r.1), vec![unpaid[1].clone()], "{}", r.1);

    let r = node
        .get("/v1/admin/orders?status=paid", Some(&customer("carol")))
        .await;
    assert_error(&r, 403, "forbidden", "customer searching orders");
}

/// Existing ids are 409 already_exists; an off_shelf product cannot be ordered; stock
/// adjustments move `available` only and never below 0.
#[tokio::test]
async fn catalog_rules() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "rules", 2, 100, 5).await;

    let r = node
        .post(
            "/v1/products",
            &admin,
            &product_body("rules", &[("rules-new", 1, 1)]),
        )
        .await;
    assert_error(&r, 409, "already_exists", "same product id");
    let r = node
        .post(
            "/v1/products",
            &admin,
            &product_body("rules2", &[(&skus[0], 1, 1)]),
        )
        .await;
    assert_error(&r, 409, "already_exists", "a new product reusing a SKU id");
    let s = node.sku(&skus[0]).await;
    assert_eq!(
        s["product_id"], "rules",
        "the SKU still belongs to its product: {s}"
    );
    assert_eq!(s["price"], money(100), "{s}");
    assert_stock(
        Stock::of(&s),
        Stock::new(5, 0, 0),
        "SKU untouched by the refused create",
    );
    // A refused create rolls back what it created: the product and its earlier SKUs.
    let r = node
        .post(
            "/v1/products",
            &admin,
            &product_body("rules3", &[("rules3-new", 100, 2), (&skus[0], 1, 1)]),
        )
        .await;
    assert_error(&r, 409, "already_exists", "a later SKU id exists");
    assert_eq!(
        node.get("/v1/products/rules3", None).await.0,
        404,
        "product rolled back"
    );
    assert_eq!(
        node.get("/v1/skus/rules3-new", None).await.0,
        404,
        "SKU rolled back"
    );
    let r = node
        .post(
            "/v1/products",
            &admin,
            &product_body("rules3", &[("rules3-new", 100, 2)]),
        )
        .await;
    assert_status(&r, 201, "the ids are free again after the rollback");

    let r = node
        .patch(
            "/v1/products/rules",
            &admin,
            &json!({"status": "off_shelf"}),
        )
        .await;
    assert_ok(&r, "off_shelf");
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_error(&r, 409, "invalid_state", "ordering an off_shelf product");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(5, 0, 0),
        "nothing reserved",
    );
    let r = node
        .patch(
            "/v1/products/rules",
            &admin,
            &json!({"status": "on_shelf", "title": "renamed"}),
        )
        .await;
    assert_ok(&r, "on_shelf");
    assert_eq!(
        node.get("/v1/products/rules", None).await.1["title"],
        "renamed"
    );
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "ordering again");

    let stock_path = format!("/v1/skus/{}/stock", skus[1]);
    let r = node
        .post(
            &stock_path,
            &admin,
            &json!({"delta": 7, "reason": "delivery"}),
        )
        .await;
    assert_ok(&r, "stock +7");
    assert_stock(node.stock(&skus[1]).await, Stock::new(12, 0, 0), "after +7");
    let r = node
        .post(
            &stock_path,
            &admin,
            &json!({"delta": -13, "reason": "too much"}),
        )
        .await;
    assert_error(&r, 409, "insufficient_stock", "below zero");
    let r = node
        .post(
            &stock_path,
            &admin,
            &json!({"delta": -12, "reason": "write-off"}),
        )
        .await;
    assert_ok(&r, "stock -12");
    assert_stock(node.stock(&skus[1]).await, Stock::new(0, 0, 0), "after -12");
    let r = node.checkout(&alice, &[(&skus[1], 1)], &key()).await;
    assert_error(&r, 409, "out_of_stock", "nothing available");
}

/// A payment_id is applied at most once, even when a second callback names it for
/// another order.
#[tokio::test]
async fn payment_callback_id_is_used_once_across_orders() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "cbx", 1, 500, 10).await;
    let sku = skus[0].as_str();
    let first = node.place(&alice, &[(sku, 1)], "checkout").await;
    let second = node.place(&alice, &[(sku, 1)], "checkout 2").await;

    let body = json!({"payment_id": "pay-once", "order_id": first, "amount": money(500), "status": "succeeded"});
    assert_ok(
        &callback(&node, &body, PAYMENT_SECRET.as_bytes()).await,
        "callback",
    );
    assert_eq!(node.order(&alice, &first).await["status"], "paid");

    let reuse = json!({"payment_id": "pay-once", "order_id": second, "amount": money(500), "status": "succeeded"});
    let r = callback(&node, &reuse, PAYMENT_SECRET.as_bytes()).await;
    assert!(
        r.0 < 500,
        "payment_id reused for another order: {} {}",
        r.0,
        r.1
    );
    assert_eq!(
        node.order(&alice, &second).await["status"],
        "pending_payment",
        "POST /v1/payments/callback with a used payment_id paid another order (answered {} {})",
        r.0,
        r.1
    );
    assert_stock(
        node.stock(sku).await,
        Stock::new(8, 1, 1),
        "one payment, one unit sold",
    );
}

/// Many buyers racing for little stock: exactly the stock is reserved, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkouts_never_oversell() {
    const STOCK: i64 = 20;
    const BUYERS: usize = 8;
    const ATTEMPTS: usize = 5;
    let node = Node::start().await;
    let admin = admin();
    let skus = node.product_with_skus(&admin, "race", 1, 100, STOCK).await;

    let tasks: Vec<_> = (0..BUYERS)
        .map(|i| {
            let api = node.api();
            let sku = skus[0].clone();
            tokio::spawn(async move {
                let t = customer(&format!("racer-{i}"));
                let (mut won, mut shed) = (0i64, 0i64);
                for _ in 0..ATTEMPTS {
                    let r = api.checkout(&t, &[(&sku, 1)], &key()).await;
                    match r.0 {
                        201 => won += 1,
                        409 => assert_eq!(r.1["error"]["code"], "out_of_stock", "{}", r.1),
                        429 | 503 => shed += 1,
                        _ => panic!("racer {i}: unexpected {} {}", r.0, r.1),
                    }
                }
                (won, shed)
            })
        })
        .collect();
    let (mut won, mut shed) = (0, 0);
    for t in tasks {
        let (w, s) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("racer finished")
            .expect("racer did not panic");
        won += w;
        shed += s;
    }
    let s = node.stock(&skus[0]).await;
    assert_eq!(
        s.reserved, won,
        "every won checkout reserved one unit: {s:?}"
    );
    assert_eq!(s.total(), STOCK, "stock conserved: {s:?}");
    assert!(won <= STOCK, "oversold: {won} > {STOCK}");
    // 40 attempts for 20 units: unless the edge shed load, all of it went.
    if shed == 0 {
        assert_eq!(s, Stock::new(0, STOCK, 0), "{won} won");
    }
}

/// The same Idempotency-Key and body sent concurrently creates one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_create_one_order() {
    let node = Node::start().await;
    let admin = admin();
    let skus = node.product_with_skus(&admin, "replay", 1, 100, 50).await;
    let k = key();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let api = node.api();
            let sku = skus[0].clone();
            let k = k.clone();
            tokio::spawn(async move { api.checkout(&customer("alice"), &[(&sku, 2)], &k).await })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("finished")
            .expect("no panic");
        match r.0 {
            201 => {
                ids.insert(order_id(&r.1));
            }
            // A duplicate still in flight may be told to retry; it must not create.
            409 | 429 | 503 => assert_error_shape(&r.1, "concurrent duplicate"),
            _ => panic!("concurrent replay: {} {}", r.0, r.1),
        }
    }
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(48, 2, 0),
        "reserved once",
    );
    let r = node.get("/v1/orders", Some(&customer("alice"))).await;
    assert_eq!(
        r.1["items"].as_array().map(Vec::len),
        Some(1),
        "one order listed: {}",
        r.1
    );
}

/// A provider's payment for a cancelled order is never applied as a sale: it is
/// recorded on the order for refund, answered 409 every time, and its id cannot pay
/// another order.
#[tokio::test]
async fn callback_for_a_cancelled_order_is_flagged_for_refund() {
    let node = Node::start().await;
    let skus = node.product_with_skus(&admin(), "flag", 1, 500, 5).await;
    let alice = customer("alice-flag");
    let r = node.checkout(&alice, &[(&skus[0], 1)], "flag-1").await;
    assert_status(&r, 201, "checkout");
    let id = r.1["order_id"].as_str().unwrap().to_string();
    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &alice, &json!({}))
        .await;
    assert_status(&r, 200, "cancel");

    let body = json!({
        "payment_id": "late-pay", "order_id": id, "amount": money(500), "status": "succeeded"
    });
    for attempt in 0..2 {
        let r = callback(&node, &body, PAYMENT_SECRET.as_bytes()).await;
        assert_eq!(r.0, 409, "attempt {attempt}: {}", r.1);
        assert_eq!(r.1["error"]["code"], "invalid_state");
    }
    let order = node.order(&alice, &id).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(
        order["payments_to_refund"][0]["payment_id"], "late-pay",
        "{order}"
    );
    let stock = node.stock(&skus[0]).await;
    assert_eq!(
        (stock.available, stock.reserved, stock.sold),
        (5, 0, 0),
        "nothing sold"
    );
}
