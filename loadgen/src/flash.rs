//! The flash sale: many buyers, one campaign. Request `i` is a buy by buyer
//! `i % buyers`, so once every buyer has bought, each next attempt meets the per-buyer
//! limit (with a limit of 1, a buyer's second attempt is `limit_exceeded`).

use std::borrow::Cow;

use anyhow::Context;
use bytes::Bytes;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{json_bytes, Api};
use crate::check::{Acked, Expected, Figures, SeenCampaign, SeenSku};
use crate::cli::FlashOpts;
use crate::jwt::Tokens;
use crate::scenario::{read_skus, Step};

pub struct FlashSale {
    pub campaign_id: String,
    pub sku_id: String,
    /// The run created the product and the campaign: nobody else buys from them.
    pub exclusive: bool,
    /// The SKU's created stock (when the run created it).
    pub sku_stock: Option<i64>,
    pub quantity: u64,
    pub per_buyer_limit: u64,
    buyers: u64,
    buyer_prefix: String,
    buy_quantity: u64,
    key_prefix: Option<String>,
    buy_url: reqwest::Url,
    buy_body: Bytes,
}

#[derive(Deserialize)]
struct CampaignRead {
    sku_id: String,
    quantity: u64,
    per_buyer_limit: u64,
    sold: u64,
    reserved: u64,
}

#[derive(Deserialize)]
struct Placed {
    order_id: String,
}

impl FlashSale {
    pub async fn setup(
        api: &Api,
        admin: &str,
        tokens: &Tokens,
        run_id: &str,
        a: &FlashOpts,
    ) -> anyhow::Result<FlashSale> {
        let (campaign_id, exclusive, sku_stock) = match &a.campaign {
            Some(id) => (id.clone(), false, None),
            None => {
                let product = format!("lg-{run_id}");
                let sku = format!("lg-{run_id}-sku");
                let body = json!({
                    "product_id": product, "title": "loadgen flash-sale product",
                    "category": "loadgen", "brand": "loadgen",
                    "description": "created by shardmall-loadgen",
                    "skus": [{"sku_id": sku, "name": "loadgen sku", "specs": {},
                              "price": {"amount": a.price_cents.saturating_mul(2), "currency": "USD"},
                              "stock": a.stock}]
                });
                api.must(Method::POST, "/v1/products", Some(admin), Some(&body), 201)
                    .await
                    .context("creating the flash-sale product")?;
                let ends =
                    std::time::SystemTime::now() + std::time::Duration::from_secs(a.window_secs);
                let id = format!("lg-{run_id}");
                let body = json!({
                    "campaign_id": id, "sku_id": sku,
                    "price": {"amount": a.price_cents, "currency": "USD"},
                    "quantity": a.quantity,
                    "ends_at": humantime::format_rfc3339_millis(ends).to_string(),
                    "per_buyer_limit": a.per_buyer_limit,
                    "payment_timeout_secs": a.payment_timeout_secs,
                });
                api.must(Method::POST, "/v1/campaigns", Some(admin), Some(&body), 201)
                    .await
                    .context("creating the campaign")?;
                (id, true, Some(a.stock as i64))
            }
        };
        let c = read_campaign(api, admin, &campaign_id)
            .await
            .with_context(|| format!("reading campaign {campaign_id}"))?;
        Ok(FlashSale {
            buy_url: api.parsed(&format!("/v1/campaigns/{campaign_id}/buy"))?,
            buy_body: json_bytes(&json!({"quantity": a.buy_quantity})),
            campaign_id,
            sku_id: c.sku_id,
            exclusive,
            sku_stock,
            quantity: c.quantity,
            per_buyer_limit: c.per_buyer_limit,
            buyers: tokens.buyers(a.buyers.max(1)),
            buyer_prefix: format!("buyer-{run_id}-"),
            buy_quantity: a.buy_quantity,
            // The node requires a key on every buy (API.md: buy is marked idem).
            key_prefix: Some(format!("lg-{run_id}-")),
        })
    }

    /// Request `i`: a buy by buyer `i % buyers`.
    pub async fn step(&self, api: &Api, tokens: &Tokens, i: u64) -> Step {
        let buyer = tokens.buyer(&self.buyer_prefix, i, self.buyers);
        let token = tokens.customer(&buyer);
        let key = self.key_prefix.as_ref().map(|p| format!("{p}{i}"));
        let answer = api
            .call(
                Method::POST,
                self.buy_url.clone(),
                Some(&token),
                key.as_deref(),
                Some(self.buy_body.clone()),
                201,
            )
            .await;
        let mut step = Step {
            op: "buy",
            uncertain_units: if answer.uncertain() {
                self.buy_quantity
            } else {
                0
            },
            outcome: answer.outcome.clone(),
            acked: None,
            settled: None,
        };
        if answer.ok() {
            match answer.json::<Placed>() {
                Some(p) => {
                    step.acked = Some(Acked {
                        order_id: p.order_id,
                        buyer,
                        quantity: self.buy_quantity,
                        expected: Expected::Unpaid,
                    });
                }
                None => {
                    // A 201 the run cannot follow: count it apart, and as units the
                    // campaign may hold.
                    step.outcome = Cow::Borrowed("created_without_order_id");
                    step.uncertain_units = self.buy_quantity;
                }
            }
        }
        step
    }

    /// The campaign's terms and figures now.
    pub async fn campaign(
        &self,
        api: &Api,
        admin: &str,
        uncertain_units: u64,
    ) -> anyhow::Result<SeenCampaign> {
        let c = read_campaign(api, admin, &self.campaign_id).await?;
        let f = Figures {
            sold: c.sold,
            reserved: c.reserved,
        };
        Ok(SeenCampaign {
            campaign_id: self.campaign_id.clone(),
            quantity: c.quantity,
            per_buyer_limit: c.per_buyer_limit,
            first: f,
            last: f,
            exclusive: self.exclusive,
            uncertain_units,
        })
    }

    pub async fn skus(&self, api: &Api) -> anyhow::Result<Vec<SeenSku>> {
        read_skus(api, vec![(self.sku_id.clone(), self.sku_stock)]).await
    }

    pub fn parameters(&self, a: &FlashOpts) -> Value {
        json!({
            "campaign_id": self.campaign_id, "sku_id": self.sku_id,
            "created_by_run": self.exclusive,
            "stock": if self.exclusive { Some(a.stock) } else { None },
            "quantity": self.quantity, "per_buyer_limit": self.per_buyer_limit,
            "price_cents": if self.exclusive { Some(a.price_cents) } else { None },
            "window_secs": if self.exclusive { Some(a.window_secs) } else { None },
            "payment_timeout_secs": if self.exclusive { Some(a.payment_timeout_secs) } else { None },
            "buyers": self.buyers, "buy_quantity": self.buy_quantity,
            "idempotency_keys": self.key_prefix.is_some(),
        })
    }
}

async fn read_campaign(api: &Api, admin: &str, id: &str) -> anyhow::Result<CampaignRead> {
    let v = api
        .must(
            Method::GET,
            &format!("/v1/campaigns/{id}"),
            Some(admin),
            None,
            200,
        )
        .await?;
    serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("GET /v1/campaigns/{id}: unexpected body: {e}"))
}
