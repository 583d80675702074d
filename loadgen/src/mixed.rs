//! The storefront mix. Each request is one operation of a virtual user, drawn with these
//! weights: browse 50% (GET a SKU or its product), put in the cart 20%, check out 15%,
//! pay one of the user's pending orders 10%, cancel one 5%. Pay and cancel browse
//! instead when the user has nothing pending. SKUs are picked with Zipf-skewed
//! popularity.

use std::sync::Mutex;

use anyhow::Context;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::Rng;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{json_bytes, Api};
use crate::check::{Acked, Expected, SeenSku};
use crate::cli::MixedOpts;
use crate::jwt::Tokens;
use crate::scenario::{address, read_skus, Step};
use crate::zipf::Zipf;

/// SKUs per product created for the run.
const PER_PRODUCT: u64 = 20;
/// Stock of each SKU: enough that a run never sells out.
const STOCK: i64 = 1_000_000_000;

struct Sku {
    id: String,
    sku_url: reqwest::Url,
    product_url: reqwest::Url,
    cart_url: reqwest::Url,
    order_body: Bytes,
}

/// A virtual user. Its lock is held only to take or add a pending order, never across
/// a request (std `Mutex`: short, uncontended critical sections).
struct User {
    buyer: String,
    token: String,
    /// Orders placed and not yet paid or cancelled: (id, total).
    pending: Vec<(String, Value)>,
}

pub struct Mixed {
    skus: Vec<Sku>,
    zipf: Zipf,
    key_prefix: String,
    orders_url: reqwest::Url,
    cart_body: Bytes,
    users: Vec<Mutex<User>>,
    orders_base: String,
}

#[derive(Deserialize)]
struct Placed {
    order_id: String,
    total: Value,
}

impl Mixed {
    pub async fn setup(
        api: &Api,
        admin: &str,
        tokens: &Tokens,
        run_id: &str,
        a: &MixedOpts,
        users: usize,
    ) -> anyhow::Result<Mixed> {
        let mut skus = Vec::with_capacity(a.skus as usize);
        for p in 0..a.skus.div_ceil(PER_PRODUCT) {
            let product = format!("lgm-{run_id}-p{p}");
            let ids: Vec<String> = (p * PER_PRODUCT..((p + 1) * PER_PRODUCT).min(a.skus))
                .map(|i| format!("lgm-{run_id}-s{i}"))
                .collect();
            let body = json!({
                "product_id": product, "title": "loadgen product",
                "category": format!("loadgen-{run_id}"), "brand": "loadgen",
                "description": "created by shardmall-loadgen",
                "skus": ids.iter().map(|id| json!({"sku_id": id, "name": id, "specs": {},
                    "price": {"amount": 1999, "currency": "USD"}, "stock": STOCK})).collect::<Vec<_>>()
            });
            api.must(Method::POST, "/v1/products", Some(admin), Some(&body), 201)
                .await
                .with_context(|| format!("creating product {product} of the catalog"))?;
            let product_url = api.parsed(&format!("/v1/products/{product}"))?;
            for id in ids {
                skus.push(Sku {
                    sku_url: api.parsed(&format!("/v1/skus/{id}"))?,
                    product_url: product_url.clone(),
                    cart_url: api.parsed(&format!("/v1/cart/items/{id}"))?,
                    order_body: json_bytes(&json!({
                        "items": [{"sku_id": id, "quantity": 1}],
                        "shipping_address": address(),
                    })),
                    id,
                });
            }
        }
        let prefix = format!("buyer-{run_id}-");
        let users = tokens.buyers(users.max(1) as u64);
        let users = (0..users)
            .map(|u| {
                let buyer = tokens.buyer(&prefix, u, users);
                Mutex::new(User {
                    token: tokens.customer(&buyer),
                    buyer,
                    pending: Vec::new(),
                })
            })
            .collect();
        Ok(Mixed {
            zipf: Zipf::new(skus.len(), a.zipf_s),
            skus,
            key_prefix: format!("lgm-{run_id}-"),
            orders_url: api.parsed("/v1/orders")?,
            orders_base: api.url("/v1/orders/"),
            cart_body: json_bytes(&json!({"quantity": 1})),
            users,
        })
    }

    fn user(&self, u: usize) -> std::sync::MutexGuard<'_, User> {
        // A poisoned lock only means a panic elsewhere; the list itself is intact.
        self.users[u % self.users.len()]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Request `i` of virtual user `u`.
    pub async fn step(&self, api: &Api, u: usize, i: u64, rng: &mut StdRng) -> Step {
        let sku = &self.skus[self.zipf.sample(rng)];
        let roll: u32 = rng.gen_range(0..100);
        // Pay and cancel take the order out of the user's pending list before sending,
        // so two requests of one user never settle the same order.
        let (token, buyer, pending) = {
            let mut user = self.user(u);
            let pending = if roll >= 85 && !user.pending.is_empty() {
                let k = rng.gen_range(0..user.pending.len());
                Some(user.pending.swap_remove(k))
            } else {
                None
            };
            (user.token.clone(), user.buyer.clone(), pending)
        };
        let mut step = Step {
            op: "browse",
            outcome: "ok".into(),
            acked: None,
            settled: None,
            uncertain_units: 0,
        };
        match (roll, pending) {
            (50..=69, _) => {
                step.op = "cart";
                let a = api
                    .call(
                        Method::PUT,
                        sku.cart_url.clone(),
                        Some(&token),
                        None,
                        Some(self.cart_body.clone()),
                        200,
                    )
                    .await;
                step.outcome = a.outcome;
            }
            (70..=84, _) => {
                step.op = "checkout";
                let key = format!("{}{i}", self.key_prefix);
                let a = api
                    .call(
                        Method::POST,
                        self.orders_url.clone(),
                        Some(&token),
                        Some(&key),
                        Some(sku.order_body.clone()),
                        201,
                    )
                    .await;
                let placed = if a.ok() { a.json::<Placed>() } else { None };
                step.outcome = match &placed {
                    None if a.ok() => "created_without_order_id".into(),
                    _ => a.outcome,
                };
                if let Some(p) = placed {
                    self.user(u).pending.push((p.order_id.clone(), p.total));
                    step.acked = Some(Acked {
                        order_id: p.order_id,
                        buyer,
                        quantity: 1,
                        expected: Expected::Unpaid,
                    });
                }
            }
            (85..=94, Some((id, total))) => {
                step.op = "pay";
                let key = format!("{}{i}", self.key_prefix);
                let body = json_bytes(&json!({"method": "fake", "amount": total}));
                let a = api
                    .call(
                        Method::POST,
                        format!("{}{id}/pay", self.orders_base),
                        Some(&token),
                        Some(&key),
                        Some(body),
                        200,
                    )
                    .await;
                if a.status == 429 {
                    // Refused unseen: the order is still there to pay.
                    self.user(u).pending.push((id, total));
                } else {
                    step.settled = settle(&a, id, Expected::Paid);
                }
                step.outcome = a.outcome;
            }
            (95.., Some((id, total))) => {
                step.op = "cancel";
                let a = api
                    .call(
                        Method::POST,
                        format!("{}{id}/cancel", self.orders_base),
                        Some(&token),
                        None,
                        None,
                        200,
                    )
                    .await;
                if a.status == 429 {
                    self.user(u).pending.push((id, total));
                } else {
                    step.settled = settle(&a, id, Expected::Cancelled);
                }
                step.outcome = a.outcome;
            }
            (0..=24, _) | (85.., None) => {
                let a = api
                    .call(Method::GET, sku.sku_url.clone(), None, None, None, 200)
                    .await;
                step.outcome = a.outcome;
            }
            _ => {
                let a = api
                    .call(Method::GET, sku.product_url.clone(), None, None, None, 200)
                    .await;
                step.outcome = a.outcome;
            }
        }
        step
    }

    /// Every SKU's figures, against the stock it was created with.
    pub async fn skus(&self, api: &Api) -> anyhow::Result<Vec<SeenSku>> {
        read_skus(
            api,
            self.skus
                .iter()
                .map(|s| (s.id.clone(), Some(STOCK)))
                .collect(),
        )
        .await
    }

    pub fn parameters(&self, a: &MixedOpts) -> Value {
        json!({"skus": self.skus.len(), "zipf_s": a.zipf_s, "users": self.users.len(),
               "sku_stock": STOCK, "skus_per_product": PER_PRODUCT})
    }
}

/// What to expect of an order after a pay or cancel: done (200), unknown (no answer or
/// a 5xx), or unchanged (a refusal, e.g. it expired first).
fn settle(a: &crate::api::Answer, id: String, done: Expected) -> Option<(String, Expected)> {
    if a.ok() {
        Some((id, done))
    } else if a.uncertain() {
        Some((id, Expected::Unknown))
    } else {
        None
    }
}
