//! The two scenarios: what they set up, what one request is, and what is read back
//! afterwards for the invariant checks.

use std::sync::Mutex;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::Rng;
use reqwest::Method;
use serde_json::{json, Value};

use crate::api::{Answer, Api};
use crate::check::{Acked, Expected, Observed, SeenCampaign, SeenOrder, SeenSku};
use crate::jwt::Minter;
use crate::zipf::Zipf;

/// What one request did, for the stats and the checks.
pub struct Step {
    pub op: &'static str,
    pub answer: Answer,
    pub acked: Option<Acked>,
    /// An order the run later paid or cancelled: (order id, new expectation).
    pub settled: Option<(String, Expected)>,
}

pub struct FlashSale {
    pub campaign_id: String,
    pub buyers: u64,
    pub buyer_prefix: String,
    pub buy_quantity: u64,
    pub idempotency_keys: bool,
    pub run_id: String,
    /// Loadgen created the campaign and SKU: their figures must match the run exactly.
    pub exclusive: bool,
    pub sku_id: String,
    pub sku_total_before: i64,
}

pub struct Mixed {
    pub skus: Vec<String>,
    pub zipf: Zipf,
    pub run_id: String,
    pub users: Vec<Mutex<User>>,
    pub sku_totals_before: Vec<i64>,
}

pub struct User {
    pub buyer: String,
    pub token: String,
    /// Orders placed and not yet paid or cancelled: (id, total).
    pub pending: Vec<(String, Value)>,
}

pub fn address() -> Value {
    json!({"name": "Load Gen", "phone": "+1 555 0100", "line1": "1 Bench Road",
           "city": "Loopback", "country": "US"})
}

async fn sku_total(api: &Api, sku: &str) -> anyhow::Result<i64> {
    let v = api
        .must(Method::GET, &format!("/v1/skus/{sku}"), None, None, 200)
        .await?;
    let f = |k: &str| v["stock"][k].as_i64().unwrap_or(0);
    Ok(f("available") + f("reserved") + f("sold"))
}

pub struct FlashArgs {
    pub campaign: Option<String>,
    pub stock: u64,
    pub quantity: u64,
    pub per_buyer_limit: u64,
    pub price_cents: i64,
    pub window_secs: u64,
    pub payment_timeout_secs: u64,
    pub buyers: u64,
    pub buy_quantity: u64,
    pub idempotency_keys: bool,
}

impl FlashSale {
    pub async fn setup(
        api: &Api,
        admin: &str,
        run_id: &str,
        a: &FlashArgs,
    ) -> anyhow::Result<Self> {
        let (campaign_id, sku_id, exclusive) = match &a.campaign {
            Some(id) => {
                let c = api
                    .must(
                        Method::GET,
                        &format!("/v1/campaigns/{id}"),
                        Some(admin),
                        None,
                        200,
                    )
                    .await
                    .with_context(|| format!("reading campaign {id}"))?;
                let sku = c["sku_id"].as_str().unwrap_or_default().to_owned();
                (id.clone(), sku, false)
            }
            None => {
                let product = format!("lg-{run_id}");
                let sku = format!("lg-{run_id}-s");
                let body = json!({
                    "product_id": product, "title": "loadgen flash-sale product",
                    "category": "loadgen", "brand": "loadgen", "description": "created by shardmall-loadgen",
                    "skus": [{"sku_id": sku, "name": "loadgen sku", "specs": {},
                              "price": {"amount": a.price_cents * 2, "currency": "USD"},
                              "stock": a.stock}]
                });
                api.must(Method::POST, "/v1/products", Some(admin), Some(&body), 201)
                    .await
                    .context("creating the product")?;
                let ends =
                    std::time::SystemTime::now() + std::time::Duration::from_secs(a.window_secs);
                let body = json!({
                    "campaign_id": format!("lg-{run_id}"), "sku_id": sku,
                    "price": {"amount": a.price_cents, "currency": "USD"},
                    "quantity": a.quantity,
                    "ends_at": humantime::format_rfc3339_millis(ends).to_string(),
                    "per_buyer_limit": a.per_buyer_limit,
                    "payment_timeout_secs": a.payment_timeout_secs,
                });
                api.must(Method::POST, "/v1/campaigns", Some(admin), Some(&body), 201)
                    .await
                    .context("creating the campaign")?;
                (format!("lg-{run_id}"), sku, true)
            }
        };
        let sku_total_before = sku_total(api, &sku_id).await?;
        Ok(FlashSale {
            campaign_id,
            buyers: a.buyers.max(1),
            buyer_prefix: format!("lg-{run_id}-buyer"),
            buy_quantity: a.buy_quantity,
            idempotency_keys: a.idempotency_keys,
            run_id: run_id.to_owned(),
            exclusive,
            sku_id,
            sku_total_before,
        })
    }

    /// Request `i`: buyer `i % buyers` buys.
    pub async fn step(&self, api: &Api, minter: &Minter, i: u64) -> Step {
        let buyer = format!("{}-{}", self.buyer_prefix, i % self.buyers);
        let token = minter.token("customer", &buyer);
        let key = self
            .idempotency_keys
            .then(|| format!("lg-{}-{i}", self.run_id));
        let body = json!({"quantity": self.buy_quantity});
        let path = format!("/v1/campaigns/{}/buy", self.campaign_id);
        let answer = api
            .call(
                Method::POST,
                &path,
                Some(&token),
                key.as_deref(),
                Some(&body),
                201,
            )
            .await;
        let acked = answer.ok().then(|| Acked {
            order_id: answer.body["order_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            buyer,
            quantity: self.buy_quantity,
            expected: Expected::Unpaid,
        });
        Step {
            op: "buy",
            answer,
            acked,
            settled: None,
        }
    }

    pub async fn observe(&self, api: &Api, admin: &str, obs: &mut Observed) -> anyhow::Result<()> {
        let c = api
            .must(
                Method::GET,
                &format!("/v1/campaigns/{}", self.campaign_id),
                Some(admin),
                None,
                200,
            )
            .await?;
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        obs.campaign = Some(SeenCampaign {
            campaign_id: self.campaign_id.clone(),
            quantity: n("quantity"),
            sold: n("sold"),
            reserved: n("reserved"),
            per_buyer_limit: n("per_buyer_limit"),
            exclusive: self.exclusive,
        });
        let v = api
            .must(
                Method::GET,
                &format!("/v1/skus/{}", self.sku_id),
                None,
                None,
                200,
            )
            .await?;
        let f = |k: &str| v["stock"][k].as_i64().unwrap_or(-1);
        obs.skus.push(SeenSku {
            sku_id: self.sku_id.clone(),
            available: f("available"),
            reserved: f("reserved"),
            sold: f("sold"),
            total_before: self.sku_total_before,
        });
        Ok(())
    }
}

pub struct MixedArgs {
    pub skus: usize,
    pub zipf_s: f64,
    pub users: usize,
}

impl Mixed {
    pub async fn setup(
        api: &Api,
        admin: &str,
        minter: &Minter,
        run_id: &str,
        a: &MixedArgs,
    ) -> anyhow::Result<Self> {
        const PER_PRODUCT: usize = 20;
        const STOCK: i64 = 1_000_000_000;
        let mut skus = Vec::with_capacity(a.skus);
        for p in 0..a.skus.div_ceil(PER_PRODUCT) {
            let ids: Vec<String> = (0..PER_PRODUCT)
                .map(|i| p * PER_PRODUCT + i)
                .take_while(|i| *i < a.skus)
                .map(|i| format!("lgm-{run_id}-s{i}"))
                .collect();
            let body = json!({
                "product_id": format!("lgm-{run_id}-p{p}"), "title": "loadgen product",
                "category": format!("loadgen-{run_id}"), "brand": "loadgen", "description": "created by shardmall-loadgen",
                "skus": ids.iter().map(|id| json!({"sku_id": id, "name": id, "specs": {},
                    "price": {"amount": 1999, "currency": "USD"}, "stock": STOCK})).collect::<Vec<_>>()
            });
            api.must(Method::POST, "/v1/products", Some(admin), Some(&body), 201)
                .await
                .context("creating the catalog")?;
            skus.extend(ids);
        }
        let users = (0..a.users.max(1))
            .map(|u| {
                let buyer = format!("lgm-{run_id}-u{u}");
                Mutex::new(User {
                    token: minter.token("customer", &buyer),
                    buyer,
                    pending: Vec::new(),
                })
            })
            .collect();
        let n = skus.len();
        Ok(Mixed {
            sku_totals_before: vec![STOCK; n],
            skus,
            zipf: Zipf::new(n, a.zipf_s),
            run_id: run_id.to_owned(),
            users,
        })
    }

    /// Request `i` of virtual user `u`: browse 50%, cart 20%, checkout 15%, pay 10%,
    /// cancel 5% (pay and cancel fall back to browsing when the user has no pending order).
    pub async fn step(&self, api: &Api, u: usize, i: u64, rng: &mut StdRng) -> Step {
        let sku = &self.skus[self.zipf.sample(rng)];
        let roll: u32 = rng.gen_range(0..100);
        let (token, buyer, pending) = {
            let user = self.users[u % self.users.len()]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let pending = if roll >= 85 && !user.pending.is_empty() {
                let k = rng.gen_range(0..user.pending.len());
                Some(user.pending[k].clone())
            } else {
                None
            };
            (user.token.clone(), user.buyer.clone(), pending)
        };
        let take = |id: &str| {
            let mut user = self.users[u % self.users.len()]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            user.pending.retain(|(o, _)| o != id);
        };
        match (roll, pending) {
            (50..=69, _) => {
                let answer = api
                    .call(
                        Method::PUT,
                        &format!("/v1/cart/items/{sku}"),
                        Some(&token),
                        None,
                        Some(&json!({"quantity": 1})),
                        200,
                    )
                    .await;
                Step {
                    op: "cart",
                    answer,
                    acked: None,
                    settled: None,
                }
            }
            (70..=84, _) => {
                let key = format!("lgm-{}-{i}", self.run_id);
                let body = json!({"items": [{"sku_id": sku, "quantity": 1}], "shipping_address": address()});
                let answer = api
                    .call(
                        Method::POST,
                        "/v1/orders",
                        Some(&token),
                        Some(&key),
                        Some(&body),
                        201,
                    )
                    .await;
                let acked = answer.ok().then(|| {
                    let id = answer.body["order_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let mut user = self.users[u % self.users.len()]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    user.pending
                        .push((id.clone(), answer.body["total"].clone()));
                    Acked {
                        order_id: id,
                        buyer: buyer.clone(),
                        quantity: 1,
                        expected: Expected::Unpaid,
                    }
                });
                Step {
                    op: "checkout",
                    answer,
                    acked,
                    settled: None,
                }
            }
            (85..=94, Some((id, total))) => {
                take(&id);
                let key = format!("lgm-{}-{i}", self.run_id);
                let body = json!({"method": "fake", "amount": total});
                let answer = api
                    .call(
                        Method::POST,
                        &format!("/v1/orders/{id}/pay"),
                        Some(&token),
                        Some(&key),
                        Some(&body),
                        200,
                    )
                    .await;
                let settled = answer.ok().then_some((id, Expected::Paid));
                Step {
                    op: "pay",
                    answer,
                    acked: None,
                    settled,
                }
            }
            (95.., Some((id, _))) => {
                take(&id);
                let answer = api
                    .call(
                        Method::POST,
                        &format!("/v1/orders/{id}/cancel"),
                        Some(&token),
                        None,
                        None,
                        200,
                    )
                    .await;
                let settled = answer.ok().then_some((id, Expected::Cancelled));
                Step {
                    op: "cancel",
                    answer,
                    acked: None,
                    settled,
                }
            }
            _ => {
                let answer = api
                    .call(
                        Method::GET,
                        &format!("/v1/skus/{sku}"),
                        None,
                        None,
                        None,
                        200,
                    )
                    .await;
                Step {
                    op: "browse",
                    answer,
                    acked: None,
                    settled: None,
                }
            }
        }
    }

    pub async fn observe(&self, api: &Api, obs: &mut Observed) -> anyhow::Result<()> {
        for (sku, before) in self.skus.iter().zip(&self.sku_totals_before) {
            let v = api
                .must(Method::GET, &format!("/v1/skus/{sku}"), None, None, 200)
                .await?;
            let f = |k: &str| v["stock"][k].as_i64().unwrap_or(-1);
            obs.skus.push(SeenSku {
                sku_id: sku.clone(),
                available: f("available"),
                reserved: f("reserved"),
                sold: f("sold"),
                total_before: *before,
            });
        }
        Ok(())
    }

    pub fn token_of(&self, buyer: &str) -> Option<String> {
        self.users.iter().find_map(|u| {
            let u = u.lock().unwrap_or_else(|p| p.into_inner());
            (u.buyer == buyer).then(|| u.token.clone())
        })
    }
}

/// Reads back acknowledged orders (all, or an evenly spread sample of `sample`), at most
/// 32 at a time.
pub async fn read_orders(
    api: &Api,
    acked: &[Acked],
    token_of: impl Fn(&str) -> String,
    sample: Option<usize>,
) -> std::collections::HashMap<String, SeenOrder> {
    let step = match sample {
        Some(n) if n > 0 && acked.len() > n => acked.len().div_ceil(n),
        _ => 1,
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for a in acked.iter().step_by(step) {
        let (api, sem) = (api.clone(), sem.clone());
        let (id, token) = (a.order_id.clone(), token_of(&a.buyer));
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let ans = api
                .call(
                    Method::GET,
                    &format!("/v1/orders/{id}"),
                    Some(&token),
                    None,
                    None,
                    200,
                )
                .await;
            let seen = SeenOrder {
                status: ans
                    .ok()
                    .then(|| ans.body["status"].as_str().unwrap_or("").to_owned()),
                buyer: ans.body["buyer"].as_str().unwrap_or("").to_owned(),
                campaign_id: ans.body["campaign_id"].as_str().map(str::to_owned),
            };
            (id, seen)
        });
    }
    let mut out = std::collections::HashMap::new();
    while let Some(Ok((id, seen))) = set.join_next().await {
        out.insert(id, seen);
    }
    out
}
