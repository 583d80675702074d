//! Authentication, authorization, input validation and the operations endpoints, against
//! a real node (API.md: Conventions, Cluster and operations).

use reqwest::Method;
use serde_json::json;
use shardmall_http_edge::Role;
use shardmall_tests::*;

#[track_caller]
fn assert_unauthorized(r: &Resp, what: &str) {
    assert_error(r, 401, "unauthorized", what);
}

/// No token, a token signed with another secret, an expired or garbled token: 401.
#[tokio::test]
async fn bad_tokens_are_401() {
    let node = Node::start().await;
    let admin = admin();
    let skus = node.product_with_skus(&admin, "auth", 1, 100, 10).await;
    let body = order_body(&[(&skus[0], 1)]);

    let r = node.get("/v1/cart", None).await;
    assert_unauthorized(&r, "cart without a token");
    let r = node
        .call(Method::POST, "/v1/orders", None, Some(&key()), Some(&body))
        .await;
    assert_unauthorized(&r, "checkout without a token");
    let r = node.get("/v1/orders", None).await;
    assert_unauthorized(&r, "my orders without a token");

    let forged = token_signed(
        b"some-other-secret",
        Role::Customer,
        "alice",
        now_secs() + 3600,
    );
    let forged_admin = token_signed(
        b"some-other-secret",
        Role::Admin,
        "mallory",
        now_secs() + 3600,
    );
    let expired = token_signed(
        JWT_SECRET.as_bytes(),
        Role::Customer,
        "alice",
        now_secs() - 3600,
    );
    let expired_admin = token_signed(JWT_SECRET.as_bytes(), Role::Admin, "ops", now_secs() - 3600);
    for (what, t) in [
        ("forged", forged.as_str()),
        ("expired", expired.as_str()),
        ("garbage", "not-a-jwt"),
        ("empty", ""),
        ("three dots", "a.b.c"),
    ] {
        let r = node.get("/v1/cart", Some(t)).await;
        assert_unauthorized(&r, &format!("{what} token: GET /v1/cart"));
        let r = node
            .call(
                Method::POST,
                "/v1/orders",
                Some(t),
                Some(&key()),
                Some(&body),
            )
            .await;
        assert_unauthorized(&r, &format!("{what} token: POST /v1/orders"));
    }
    for (what, t) in [
        ("forged admin", &forged_admin),
        ("expired admin", &expired_admin),
    ] {
        let r = node
            .post(
                "/v1/products",
                t,
                &product_body("evil", &[("evil-1", 1, 1)]),
            )
            .await;
        assert_unauthorized(&r, &format!("{what} token: POST /v1/products"));
    }
    let r = node.get("/v1/products/evil", None).await;
    assert_error(&r, 404, "not_found", "no product was created by bad tokens");

    // A token whose signature has been tampered with.
    let good = customer("alice");
    let mut tampered = good.clone();
    let last = tampered.pop().expect("non-empty token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let r = node.get("/v1/cart", Some(&tampered)).await;
    assert_unauthorized(&r, "tampered signature");
    // Basic auth is not a bearer token.
    let r = node
        .raw(
            Method::GET,
            "/v1/cart",
            &[("authorization", "Basic YWxpY2U6eA==")],
            None,
        )
        .await;
    assert_unauthorized(&(r.status, r.body), "basic auth");

    // The good token works, so the refusals above were about the tokens.
    assert_status(&node.get("/v1/cart", Some(&good)).await, 200, "good token");
    assert_status(
        &node.checkout(&good, &[(&skus[0], 1)], &key()).await,
        201,
        "good checkout",
    );
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(9, 1, 0),
        "only the good checkout",
    );
}

/// A customer never sees (or acts on) another customer's order: 404.
#[tokio::test]
async fn other_customers_order_is_404() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let bob = customer("bob");
    let skus = node.product_with_skus(&admin, "priv", 1, 100, 10).await;
    let r = node.checkout(&alice, &[(&skus[0], 1)], &key()).await;
    assert_status(&r, 201, "alice checkout");
    let order = r.1;
    let id = order_id(&order);

    let r = node.get(&format!("/v1/orders/{id}"), Some(&bob)).await;
    assert_error(&r, 404, "not_found", "bob reads alice's order");
    let r = node.pay(&bob, &order, &key()).await;
    assert_error(&r, 404, "not_found", "bob pays alice's order");
    let r = node
        .post(&format!("/v1/orders/{id}/cancel"), &bob, &json!({}))
        .await;
    assert_error(&r, 404, "not_found", "bob cancels alice's order");
    let r = node
        .post(
            &format!("/v1/orders/{id}/refund"),
            &bob,
            &json!({"reason": "x"}),
        )
        .await;
    assert_error(&r, 404, "not_found", "bob asks a refund of alice's order");
    let r = node.get("/v1/orders", Some(&bob)).await;
    assert_status(&r, 200, "bob's list");
    assert_eq!(r.1["items"], json!([]), "bob's list is empty: {}", r.1);
    // An order id that does not exist looks the same.
    let r = node
        .get("/v1/orders/doesnotexist000000000", Some(&bob))
        .await;
    assert!(
        r.0 == 404 || r.0 == 400,
        "unknown order id: {} {}",
        r.0,
        r.1
    );
    assert_error_shape(&r.1, "unknown order id");

    let o = node.order(&alice, &id).await;
    assert_eq!(o["status"], "pending_payment", "untouched: {o}");
    assert_stock(
        node.stock(&skus[0]).await,
        Stock::new(9, 1, 0),
        "untouched stock",
    );
}

/// A customer calling admin endpoints gets 403, and nothing changes.
#[tokio::test]
async fn customer_on_admin_endpoints_is_403() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "roles", 1, 100, 10).await;
    let sku = skus[0].as_str();
    let r = node.checkout(&alice, &[(sku, 1)], &key()).await;
    assert_status(&r, 201, "checkout");
    let order = r.1;
    let id = order_id(&order);
    assert_ok(&node.pay(&alice, &order, &key()).await, "pay");

    let r = node
        .post(
            "/v1/products",
            &alice,
            &product_body("mine", &[("mine-1", 1, 1)]),
        )
        .await;
    assert_error(&r, 403, "forbidden", "customer creates a product");
    let r = node
        .patch("/v1/products/roles", &alice, &json!({"title": "pwned"}))
        .await;
    assert_error(&r, 403, "forbidden", "customer patches a product");
    let r = node
        .post(
            &format!("/v1/skus/{sku}/stock"),
            &alice,
            &json!({"delta": 1000, "reason": "free stuff"}),
        )
        .await;
    assert_error(&r, 403, "forbidden", "customer adjusts stock");
    let r = node
        .put(
            &format!("/v1/skus/{sku}/price"),
            &alice,
            &json!({"price": money(1)}),
        )
        .await;
    assert_error(&r, 403, "forbidden", "customer sets a price");
    let r = node
        .post(
            &format!("/v1/orders/{id}/ship"),
            &alice,
            &json!({"carrier": "SF", "tracking_no": "X"}),
        )
        .await;
    assert_error(&r, 403, "forbidden", "customer ships");
    let r = node
        .post(
            &format!("/v1/orders/{id}/refund"),
            &alice,
            &json!({"reason": "r"}),
        )
        .await;
    assert_ok(&r, "refund request");
    let r = node
        .post(
            &format!("/v1/orders/{id}/refund/approve"),
            &alice,
            &json!({"restock": true}),
        )
        .await;
    assert_error(&r, 403, "forbidden", "customer approves own refund");
    let r = node.get("/v1/admin/orders", Some(&alice)).await;
    assert_error(&r, 403, "forbidden", "customer searches orders");
    // An operator is not an admin for the catalog.
    let r = node
        .post(
            &format!("/v1/skus/{sku}/stock"),
            &operator(),
            &json!({"delta": 1, "reason": "x"}),
        )
        .await;
    assert_error(&r, 403, "forbidden", "operator adjusts stock");

    let p = node.get("/v1/products/roles", None).await.1;
    assert_eq!(p["title"], "roles title", "title unchanged: {p}");
    let s = node.sku(sku).await;
    assert_eq!(s["price"], money(100), "price unchanged: {s}");
    assert_stock(Stock::of(&s), Stock::new(9, 0, 1), "stock unchanged");
    assert_eq!(node.order(&alice, &id).await["status"], "refund_requested");
    assert_error(
        &node.get("/v1/products/mine", None).await,
        404,
        "not_found",
        "customer's product does not exist",
    );
}

async fn send_json(node: &Node, method: Method, path: &str, token: &str, body: &str) -> Resp {
    let auth = format!("Bearer {token}");
    let k = key();
    let r = node
        .raw(
            method,
            path,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
                ("idempotency-key", k.as_str()),
            ],
            Some(body.as_bytes().to_vec()),
        )
        .await;
    (r.status, r.body)
}

/// Malformed input of every kind is a 4xx in the JSON error shape; the node survives.
#[tokio::test]
async fn malformed_requests_are_json_4xx() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "valid", 1, 100, 10).await;
    let sku = skus[0].as_str();
    let cart_path = format!("/v1/cart/items/{sku}");
    let long_id = "a".repeat(65);
    let max_id = "b".repeat(64);
    let addr = address().to_string();

    // (what, method, path, token, body, expected status: 0 = any 4xx)
    let ca: &str = &alice;
    let cadm: &str = &admin;
    let cases: Vec<(&str, Method, String, &str, String, u16)> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/v1/orders".into(),
            ca,
            r#"{"items": [{"sku_id": "#.into(),
            400,
        ),
        (
            "not JSON at all",
            Method::PUT,
            cart_path.clone(),
            ca,
            "quantity=1".into(),
            400,
        ),
        (
            "empty body",
            Method::PUT,
            cart_path.clone(),
            ca,
            String::new(),
            400,
        ),
        (
            "JSON array body",
            Method::PUT,
            cart_path.clone(),
            ca,
            "[1,2]".into(),
            400,
        ),
        (
            "quantity of the wrong type",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": "two"}"#.into(),
            400,
        ),
        (
            "quantity fractional",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": 1.5}"#.into(),
            400,
        ),
        (
            "unknown field in cart put",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": 1, "price": 0}"#.into(),
            400,
        ),
        (
            "negative cart quantity",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": -1}"#.into(),
            400,
        ),
        (
            "huge cart quantity",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": 1000000000000}"#.into(),
            0,
        ),
        (
            "cart quantity beyond u64",
            Method::PUT,
            cart_path.clone(),
            ca,
            r#"{"quantity": 100000000000000000000000}"#.into(),
            400,
        ),
        (
            "zero order quantity",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": 0}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "negative order quantity",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": -3}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "huge order quantity",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": 9223372036854775807}}], "shipping_address": {addr}}}"#
            ),
            0,
        ),
        (
            "order quantity beyond u64",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": 18446744073709551616}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "order quantity as string",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": "1"}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "unknown field in order",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": 1}}], "shipping_address": {addr}, "discount": 100}}"#
            ),
            400,
        ),
        (
            "unknown field in order line",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{sku}", "quantity": 1, "unit_price": 1}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "over-long sku id in order",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "{long_id}", "quantity": 1}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "bad characters in sku id",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(
                r#"{{"items": [{{"sku_id": "a b/c", "quantity": 1}}], "shipping_address": {addr}}}"#
            ),
            400,
        ),
        (
            "no items",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(r#"{{"items": [], "shipping_address": {addr}}}"#),
            400,
        ),
        (
            "no shipping address",
            Method::POST,
            "/v1/orders".into(),
            ca,
            format!(r#"{{"items": [{{"sku_id": "{sku}", "quantity": 1}}]}}"#),
            400,
        ),
        (
            "over-long cart sku id in path",
            Method::PUT,
            format!("/v1/cart/items/{long_id}"),
            ca,
            r#"{"quantity": 1}"#.into(),
            400,
        ),
        (
            "over-long product id",
            Method::POST,
            "/v1/products".into(),
            cadm,
            product_body(&long_id, &[("ok-sku", 1, 1)]).to_string(),
            400,
        ),
        (
            "over-long sku id in product",
            Method::POST,
            "/v1/products".into(),
            cadm,
            product_body("okprod", &[(&long_id, 1, 1)]).to_string(),
            400,
        ),
        (
            "negative stock in product",
            Method::POST,
            "/v1/products".into(),
            cadm,
            product_body("negprod", &[("neg-sku", 1, -5)]).to_string(),
            400,
        ),
        (
            "negative price in product",
            Method::POST,
            "/v1/products".into(),
            cadm,
            product_body("negprice", &[("negprice-sku", -1, 5)]).to_string(),
            400,
        ),
        (
            "unknown field in product",
            Method::POST,
            "/v1/products".into(),
            cadm,
            {
                let mut b = product_body("unkprod", &[("unk-sku", 1, 1)]);
                b["owner"] = json!("me");
                b.to_string()
            },
            400,
        ),
        (
            "price as float",
            Method::PUT,
            format!("/v1/skus/{sku}/price"),
            cadm,
            r#"{"price": {"amount": 9.99, "currency": "CNY"}}"#.into(),
            400,
        ),
        (
            "stock delta as string",
            Method::POST,
            format!("/v1/skus/{sku}/stock"),
            cadm,
            r#"{"delta": "5", "reason": "x"}"#.into(),
            400,
        ),
        (
            "stock below zero",
            Method::POST,
            format!("/v1/skus/{sku}/stock"),
            cadm,
            r#"{"delta": -11, "reason": "x"}"#.into(),
            409,
        ),
    ];

    // Every case is checked, and every mismatch reported together.
    let mut failures: Vec<String> = Vec::new();
    for (what, method, path, token, body, want) in &cases {
        let r = send_json(&node, method.clone(), path, token, body).await;
        let status = (*want != 0).then_some(*want);
        check(
            &mut failures,
            &format!("{what}: {method} {path} {body}"),
            &r,
            status,
            None,
        );
    }
    let r = send_json(
        &node,
        Method::POST,
        format!("/v1/skus/{sku}/stock").as_str(),
        &admin,
        r#"{"delta": -11, "reason": "x"}"#,
    )
    .await;
    check(
        &mut failures,
        "stock below zero",
        &r,
        Some(409),
        Some("insufficient_stock"),
    );

    // Over-long ids and bad characters in paths.
    for path in [
        format!("/v1/skus/{long_id}"),
        format!("/v1/products/{long_id}"),
        format!("/v1/orders/{long_id}"),
        "/v1/skus/bad$id".to_string(),
    ] {
        let r = node.get(&path, Some(&alice)).await;
        check(
            &mut failures,
            &format!("GET {path}"),
            &r,
            Some(400),
            Some("bad_request"),
        );
    }
    // The longest valid id is fine (the SKU does not exist: 404).
    let r = node.get(&format!("/v1/skus/{max_id}"), None).await;
    check(
        &mut failures,
        "64-char id",
        &r,
        Some(404),
        Some("not_found"),
    );
    // An unknown route is still a JSON error.
    let r = node.get("/v1/no-such-thing", None).await;
    check(&mut failures, "unknown route", &r, None, None);

    // A 4 MiB body: 413.
    let mut big = product_body("bigprod", &[("big-sku", 1, 1)]);
    big["description"] = json!("x".repeat(4 * 1024 * 1024));
    let auth = format!("Bearer {admin}");
    let r = node
        .http1_early_answer(
            "POST",
            "/v1/products",
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            big.to_string().into_bytes(),
        )
        .await;
    match r {
        Ok(r) => check(
            &mut failures,
            "4 MiB body",
            &r,
            Some(413),
            Some("payload_too_large"),
        ),
        Err(e) => failures.push(format!("4 MiB body: no answer: {e}")),
    }

    // Headers past 16 KiB: 400, answered by the edge with its request id.
    let huge = "a".repeat(17 * 1024);
    let r = node
        .raw(
            Method::GET,
            "/v1/skus/x",
            &[("x-padding", huge.as_str())],
            None,
        )
        .await;
    check(
        &mut failures,
        "17 KiB of headers",
        &(r.status, r.body.clone()),
        Some(400),
        Some("bad_request"),
    );
    if !r.headers.contains_key("x-request-id") {
        failures.push("17 KiB of headers: no x-request-id".into());
    }

    // Nothing of the above changed anything, and the node still answers.
    let r = node.raw(Method::GET, "/healthz", &[], None).await;
    if r.status != 200 {
        failures.push(format!("healthz after bad input: {} {}", r.status, r.body));
    }
    let s = node.stock(sku).await;
    if s != Stock::new(10, 0, 0) {
        failures.push(format!("stock changed by bad input: {s:?}"));
    }
    let r = node.get("/v1/cart", Some(&alice)).await;
    if r.1["items"] != json!([]) {
        failures.push(format!("cart changed by bad input: {}", r.1));
    }
    for p in ["okprod", "negprod", "negprice", "unkprod", "bigprod"] {
        let r = node.get(&format!("/v1/products/{p}"), None).await;
        if r.0 != 404 {
            failures.push(format!(
                "product {p} was created by a bad request: {} {}",
                r.0, r.1
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} malformed requests were mishandled:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert_status(
        &node.checkout(&alice, &[(sku, 1)], &key()).await,
        201,
        "still serving",
    );
}

/// Records a mismatch: the status (any 4xx when `None`), the code, the JSON error shape.
fn check(
    failures: &mut Vec<String>,
    what: &str,
    r: &Resp,
    status: Option<u16>,
    code: Option<&str>,
) {
    let status_ok = match status {
        Some(s) => r.0 == s,
        None => (400..500).contains(&r.0),
    };
    let shape_ok = r.1["error"]["code"].is_string() && r.1["error"]["message"].is_string();
    let code_ok = code.is_none_or(|c| r.1["error"]["code"] == c);
    if !(status_ok && shape_ok && code_ok) {
        let want = match status {
            Some(s) => s.to_string(),
            None => "4xx".to_string(),
        };
        let body = r.1.to_string();
        let body = if body.len() > 300 {
            format!("{}...", &body[..300])
        } else {
            body
        };
        let what = if what.len() > 300 {
            format!("{}...", &what[..300])
        } else {
            what.to_string()
        };
        failures.push(format!(
            "{what}\n      expected {want} {} in the JSON error shape, got {} {body}",
            code.unwrap_or(""),
            r.0
        ));
    }
}

/// A request to probe: method, path, headers, body.
type Probe<'a> = (Method, String, Vec<(&'a str, &'a str)>, Option<Vec<u8>>);

/// `/openapi.json`, `/metrics`, `/healthz`, `/readyz`, and `x-request-id` everywhere.
#[tokio::test]
async fn operations_endpoints_and_request_ids() {
    let node = Node::start().await;
    let admin = admin();
    let alice = customer("alice");
    let skus = node.product_with_skus(&admin, "ops", 1, 100, 10).await;
    assert_status(
        &node.checkout(&alice, &[(&skus[0], 1)], &key()).await,
        201,
        "checkout",
    );

    let r = node.raw(Method::GET, "/openapi.json", &[], None).await;
    assert_eq!(r.status, 200, "openapi: {}", r.body);
    assert!(r.body.is_object(), "openapi is a JSON object");
    let paths = r.body["paths"].as_object().expect("openapi has paths");
    for p in ["/v1/orders", "/v1/products", "/v1/cart"] {
        assert!(
            paths.contains_key(p),
            "openapi paths contain {p}: {:?}",
            paths.keys()
        );
    }

    let m = node.metrics().await;
    assert!(m.contains("shardmall_http_requests_total"), "metrics:\n{m}");
    assert!(m.contains("shardmall_wal_flush_seconds"), "metrics:\n{m}");
    assert!(
        metric_sum(&m, "shardmall_http_requests_total").is_some_and(|v| v >= 2.0),
        "requests are counted:\n{m}"
    );

    let bad_json = b"{".to_vec();
    let auth = format!("Bearer {alice}");
    let cases: Vec<Probe> = vec![
        (Method::GET, "/healthz".into(), vec![], None),
        (Method::GET, "/readyz".into(), vec![], None),
        (Method::GET, "/metrics".into(), vec![], None),
        (Method::GET, "/openapi.json".into(), vec![], None),
        (Method::GET, "/dashboard".into(), vec![], None),
        (Method::GET, format!("/v1/skus/{}", skus[0]), vec![], None),
        (Method::GET, "/v1/skus/nope".into(), vec![], None),
        (Method::GET, "/v1/cart".into(), vec![], None),
        (
            Method::GET,
            "/v1/cart".into(),
            vec![("authorization", auth.as_str())],
            None,
        ),
        (
            Method::PUT,
            format!("/v1/cart/items/{}", skus[0]),
            vec![
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(bad_json),
        ),
        (Method::GET, "/no/such/route".into(), vec![], None),
    ];
    let mut ids = std::collections::HashSet::new();
    for (method, path, headers, body) in cases {
        let r = node.raw(method.clone(), &path, &headers, body).await;
        let id = r
            .headers
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{method} {path} ({}) has no x-request-id", r.status));
        let id = id.to_str().expect("ascii request id").to_string();
        assert!(!id.is_empty(), "{method} {path}: empty x-request-id");
        assert!(
            ids.insert(id.clone()),
            "{method} {path}: request id {id} reused"
        );
    }
    let r = node.raw(Method::GET, "/healthz", &[], None).await;
    assert_eq!(r.status, 200);
    let r = node.raw(Method::GET, "/readyz", &[], None).await;
    assert_eq!(r.status, 200);
}

/// `shardmall token` signs with the secret the node created in its data dir.
#[tokio::test]
async fn cli_token_from_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::config()
        .dir(dir.path())
        .without_jwt_secret()
        .start()
        .await;
    assert!(
        dir.path().join("jwt.secret").exists(),
        "first start creates DIR/jwt.secret"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("jwt.secret"))
            .expect("secret file")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "jwt.secret must be readable by its owner only"
        );
    }
    let cli_token = |role: &str, sub: &str| -> String {
        let out = std::process::Command::new(shardmall_bin())
            .args(["token", "--role", role, "--sub", sub, "--data-dir"])
            .arg(dir.path())
            .env_remove("SHARDMALL_JWT_SECRET")
            .env_remove("SHARDMALL_DATA_DIR")
            .output()
            .expect("run shardmall token");
        assert!(
            out.status.success(),
            "shardmall token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = String::from_utf8(out.stdout).expect("utf-8 token");
        let t = t.trim().to_string();
        assert_eq!(t.split('.').count(), 3, "a JWT: {t:?}");
        t
    };
    let ops = cli_token("admin", "ops");
    let r = node
        .post(
            "/v1/products",
            &ops,
            &product_body("cli", &[("cli-1", 100, 3)]),
        )
        .await;
    assert_status(&r, 201, "admin token from the CLI");
    let buyer = cli_token("customer", "frank");
    assert_status(
        &node.get("/v1/cart", Some(&buyer)).await,
        200,
        "customer token from the CLI",
    );
    let r = node
        .post(
            "/v1/products",
            &buyer,
            &product_body("cli2", &[("cli2-1", 100, 3)]),
        )
        .await;
    assert_error(
        &r,
        403,
        "forbidden",
        "the CLI's customer token is a customer",
    );
    // Our own secret is not this node's secret.
    let r = node.get("/v1/cart", Some(&customer("frank"))).await;
    assert_unauthorized(&r, "token signed with a secret the node does not use");

    // A file of tokens for a load test: one a line, subjects PREFIX0.., mode 0600, never
    // written over an existing file.
    let file = dir.path().join("tokens.txt");
    let batch = |out: &std::path::Path| {
        std::process::Command::new(shardmall_bin())
            .args([
                "token", "--role", "customer", "--count", "3", "--prefix", "lt-",
            ])
            .arg("--out")
            .arg(out)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("SHARDMALL_JWT_SECRET")
            .env_remove("SHARDMALL_DATA_DIR")
            .output()
            .expect("run shardmall token --count")
    };
    let out = batch(&file);
    assert!(
        out.status.success(),
        "shardmall token --count failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)
            .expect("tokens file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the tokens file is its owner's only");
    }
    let tokens: Vec<String> = std::fs::read_to_string(&file)
        .expect("tokens file")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tokens.len(), 3);
    for (i, t) in tokens.iter().enumerate() {
        assert_status(
            &node.get("/v1/orders", Some(t)).await,
            200,
            "a token from the file",
        );
        let payload = t.split('.').nth(1).expect("a JWT");
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .expect("base64url payload"),
        )
        .expect("JSON claims");
        assert_eq!(claims["sub"], format!("lt-{i}"));
        assert_eq!(claims["role"], "customer");
    }
    let again = batch(&file);
    assert!(
        !again.status.success(),
        "an existing tokens file was written over"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 3);
}

/// Cluster endpoints (API.md: Cluster and operations): operator and admin read the
/// cluster map; a customer is 403; no token is 401.
#[tokio::test]
async fn cluster_endpoint_roles() {
    let node = Node::start().await;
    let r = node.get("/v1/cluster", None).await;
    assert_error(&r, 401, "unauthorized", "cluster without a token");
    let r = node.get("/v1/cluster", Some(&customer("alice"))).await;
    assert_error(&r, 403, "forbidden", "customer reads the cluster");
    for (who, t) in [("operator", operator()), ("admin", admin())] {
        let r = node.get("/v1/cluster", Some(&t)).await;
        assert_status(&r, 200, &format!("{who} reads the cluster"));
        let nodes = r.1["nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("nodes: {}", r.1));
        assert_eq!(nodes.len(), 1, "a single node: {}", r.1);
        assert!(r.1["partitions"].as_u64().is_some_and(|p| p > 0), "{}", r.1);
        assert!(
            r.1["leader"].is_string() || r.1["leader"].is_number(),
            "{}",
            r.1
        );
    }
}

/// Admission control: past `--max-inflight` requests in flight the edge answers 429
/// `overloaded` with Retry-After at once, loses nothing, and keeps answering health and
/// metrics.
#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let node = Node::config().args(&["--max-inflight", "2"]).start().await;
    let admin = admin();
    let skus = node
        .product_with_skus(&admin, "busy", 1, 100, 100_000)
        .await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let api = node.api();
        let sku = skus[0].clone();
        tasks.push(tokio::spawn(async move {
            let buyer = customer(&format!("crowd{i}"));
            let body = serde_json::to_vec(&order_body(&[(&sku, 1)])).unwrap();
            api.raw(
                Method::POST,
                "/v1/orders",
                &[
                    ("authorization", &format!("Bearer {buyer}")),
                    ("content-type", "application/json"),
                    ("idempotency-key", "k"),
                ],
                Some(body),
            )
            .await
        }));
    }
    let (mut created, mut overloaded) = (0u64, 0u64);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            201 => created += 1,
            429 => {
                assert_eq!(r.body["error"]["code"], "overloaded", "{}", r.body);
                assert!(
                    r.headers.get("retry-after").is_some(),
                    "429 carries Retry-After"
                );
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(
        overloaded > 0,
        "64 concurrent checkouts past a bound of 2 must shed some"
    );
    assert!(created > 0, "admitted requests are served");
    let stock = node.stock(&skus[0]).await;
    assert_eq!(
        stock.reserved as u64, created,
        "exactly the admitted orders hold stock"
    );
    assert_eq!(node.get("/healthz", None).await.0, 200);
}

/// A wrong method is a 400 in the JSON shape; the payment callback's body limit answers
/// the JSON 413; the bearer scheme is case-insensitive.
#[tokio::test]
async fn edge_cases_keep_the_json_shape() {
    let node = Node::start().await;
    let r = node.raw(Method::DELETE, "/v1/products", &[], None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "bad_request");

    let big = vec![b'x'; 256 * 1024];
    let r = node
        .raw(
            Method::POST,
            "/v1/payments/callback",
            &[("content-type", "application/json"), ("x-signature", "00")],
            Some(big),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "payload_too_large");

    let t = customer("casey");
    // A fresh client: the 413 above closed its connection mid-body.
    let r = Api::new(&node.api().base)
        .raw(
            Method::GET,
            "/v1/cart",
            &[("authorization", &format!("bearer {t}"))],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A signing secret shorter than 32 bytes is refused at start, with the reason.
#[tokio::test]
async fn short_signing_secrets_are_refused_at_start() {
    for (var, value) in [
        ("SHARDMALL_JWT_SECRET", "too-short-jwt-secret"),
        ("SHARDMALL_PAYMENT_SECRET", "too-short-payment-secret"),
    ] {
        let mut node = Node::config().env(var, value).spawn_expecting_failure();
        let status = poll_until(
            "a node with a short secret gives up",
            std::time::Duration::from_secs(30),
            || {
                let st = node.try_exit();
                async move { st }
            },
        )
        .await;
        assert!(!status.success(), "{var}");
        let log = node.log_tail(100);
        assert!(
            log.contains(var) && log.contains("at least 32"),
            "{var}: {log}"
        );
    }
}
