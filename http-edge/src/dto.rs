//! The JSON types of API.md. They are separate from the domain's log types: JSON may
//! grow optional fields freely, log records may not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shardmall_actors::domain::campaign::CampaignView;
use shardmall_actors::domain::order::{Order, OrderStatus, RefundStatus};
use shardmall_actors::domain::sku::SkuView;
use shardmall_actors::domain::{self, Millis};
use shardmall_actors::{CartLine, Page, ProductDetail};
use utoipa::ToSchema;

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::validate;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Money {
    /// Minor units (e.g. fen, cents).
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
}

impl Money {
    pub fn into_domain(self, field: &str) -> Result<domain::Money, ApiError> {
        validate::currency(&self.currency)?;
        if !(0..=validate::MAX_AMOUNT).contains(&self.amount) {
            return Err(ApiError::bad_request(format!(
                "{field}.amount must be between 0 and {}",
                validate::MAX_AMOUNT
            )));
        }
        Ok(domain::Money {
            amount: self.amount,
            currency: self.currency,
        })
    }
}

impl From<&domain::Money> for Money {
    fn from(m: &domain::Money) -> Self {
        Money {
            amount: m.amount,
            currency: m.currency.clone(),
        }
    }
}

pub fn rfc3339(ms: Millis) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn opt_time(ms: Option<Millis>) -> Option<String> {
    ms.map(rfc3339)
}

// ---- catalog ------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSku {
    pub sku_id: String,
    pub name: String,
    #[serde(default)]
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub stock: i64,
    pub low_stock_threshold: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub product_id: String,
    pub title: String,
    #[serde(default)]
    pub category: String,
    #[serde(default)]
    pub brand: String,
    #[serde(default)]
    pub description: String,
    /// `draft` | `on_shelf` (default) | `off_shelf`
    pub status: Option<String>,
    pub skus: Vec<NewSku>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Stock {
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Sku {
    pub sku_id: String,
    pub product_id: String,
    pub name: String,
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub stock: Stock,
    pub low_stock_threshold: u64,
    pub low_stock: bool,
    /// The product's status: only an `on_shelf` product's SKUs can be ordered.
    pub status: String,
    pub version: u64,
}

impl From<&SkuView> for Sku {
    fn from(s: &SkuView) -> Self {
        Sku {
            sku_id: s.sku_id.clone(),
            product_id: s.product_id.clone(),
            name: s.name.clone(),
            specs: s.specs.clone(),
            price: (&s.price).into(),
            market_price: s.market_price.as_ref().map(Into::into),
            stock: Stock {
                available: s.available,
                reserved: s.reserved,
                sold: s.sold,
            },
            low_stock_threshold: s.low_stock_threshold,
            low_stock: s.low_stock,
            status: s.product_status.as_str().into(),
            version: s.version,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Product {
    pub product_id: String,
    pub title: String,
    pub category: String,
    pub brand: String,
    pub description: String,
    pub status: String,
    pub skus: Vec<Sku>,
    pub created_at: String,
    pub updated_at: String,
    pub version: u64,
}

impl From<&ProductDetail> for Product {
    fn from(d: &ProductDetail) -> Self {
        let p = &d.product;
        Product {
            product_id: p.product_id.clone(),
            title: p.title.clone(),
            category: p.category.clone(),
            brand: p.brand.clone(),
            description: p.description.clone(),
            status: p.status.as_str().into(),
            skus: d.skus.iter().map(Into::into).collect(),
            created_at: rfc3339(p.created_at),
            updated_at: rfc3339(p.updated_at),
            version: p.version,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StockAdjustment {
    pub delta: i64,
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceChange {
    pub price: Money,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    pub fn from_page<U>(page: &Page<U>, f: impl Fn(&U) -> T) -> Self {
        List {
            items: page.items.iter().map(f).collect(),
            next_cursor: page.next_cursor.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub category: Option<String>,
    pub status: Option<String>,
    pub buyer: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl ListQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(20),
            Some(n) if (1..=validate::MAX_LIST).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::bad_request("limit must be between 1 and 100")),
        }
    }

    pub fn cursor(&self) -> Result<Option<&str>, ApiError> {
        match &self.cursor {
            Some(c) => {
                validate::id("cursor", c)?;
                Ok(Some(c))
            }
            None => Ok(None),
        }
    }
}

// ---- cart ---------------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CartItemPut {
    pub quantity: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CartItem {
    pub sku_id: String,
    pub quantity: u64,
    pub unit_price: Money,
    pub line_total: Money,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Cart {
    pub items: Vec<CartItem>,
    pub total: Option<Money>,
}

impl Cart {
    pub fn from_lines(lines: &[CartLine]) -> Result<Self, ApiError> {
        let mut items = Vec::with_capacity(lines.len());
        let mut total: Option<Money> = None;
        for l in lines {
            let line_total = l
                .unit_price
                .amount
                .checked_mul(l.quantity as i64)
                .ok_or_else(|| ApiError::bad_request("cart total overflows"))?;
            match &mut total {
                None => {
                    total = Some(Money {
                        amount: line_total,
                        currency: l.unit_price.currency.clone(),
                    })
                }
                Some(t) if t.currency == l.unit_price.currency => {
                    t.amount = t
                        .amount
                        .checked_add(line_total)
                        .ok_or_else(|| ApiError::bad_request("cart total overflows"))?;
                }
                // Mixed currencies have no single total.
                Some(_) => {}
            }
            items.push(CartItem {
                sku_id: l.sku_id.clone(),
                quantity: l.quantity,
                unit_price: (&l.unit_price).into(),
                line_total: Money {
                    amount: line_total,
                    currency: l.unit_price.currency.clone(),
                },
            });
        }
        Ok(Cart { items, total })
    }
}

// ---- orders -------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Address {
    pub name: String,
    pub phone: String,
    pub line1: String,
    pub city: String,
    pub country: String,
}

impl Address {
    pub fn into_domain(self) -> Result<domain::Address, ApiError> {
        for (f, v) in [
            ("name", &self.name),
            ("phone", &self.phone),
            ("line1", &self.line1),
            ("city", &self.city),
            ("country", &self.country),
        ] {
            validate::required_text(&format!("shipping_address.{f}"), v, 256)?;
        }
        Ok(domain::Address {
            name: self.name,
            phone: self.phone,
            line1: self.line1,
            city: self.city,
            country: self.country,
        })
    }
}

impl From<&domain::Address> for Address {
    fn from(a: &domain::Address) -> Self {
        Address {
            name: a.name.clone(),
            phone: a.phone.clone(),
            line1: a.line1.clone(),
            city: a.city.clone(),
            country: a.country.clone(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderItem {
    pub sku_id: String,
    pub quantity: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    pub items: Option<Vec<OrderItem>>,
    #[serde(default)]
    pub from_cart: bool,
    pub shipping_address: Address,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Payment {
    pub method: String,
    pub amount: Money,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipRequest {
    pub carrier: String,
    pub tracking_no: String,
    pub expected_version: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    pub reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundApproval {
    pub restock: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRejection {
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shipment {
    pub carrier: String,
    pub tracking_no: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderPatch {
    pub shipping_address: Option<Address>,
    pub shipment: Option<Shipment>,
    pub expected_version: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentCallback {
    pub payment_id: String,
    pub order_id: String,
    pub amount: Money,
    /// `succeeded` | `failed`
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderLine {
    pub sku_id: String,
    pub name: String,
    pub unit_price: Money,
    pub quantity: u64,
    pub line_total: Money,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Refund {
    pub reason: String,
    /// `requested` | `approved` | `rejected`
    pub status: String,
    pub restock: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrderBody {
    pub order_id: String,
    pub buyer: String,
    pub status: String,
    pub lines: Vec<OrderLine>,
    pub total: Money,
    pub shipping_address: Option<Address>,
    pub created_at: String,
    pub payment_deadline: String,
    pub paid_at: Option<String>,
    pub shipped_at: Option<String>,
    pub completed_at: Option<String>,
    pub cancelled_at: Option<String>,
    pub shipment: Option<Shipment>,
    pub refund: Option<Refund>,
    pub campaign_id: Option<String>,
    /// Provider payments recorded but not applied (the order could not take them); they
    /// are owed back to the payer.
    pub payments_to_refund: Vec<FlaggedPayment>,
    pub version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FlaggedPayment {
    pub payment_id: String,
    pub amount: Money,
}

impl From<&Order> for OrderBody {
    fn from(o: &Order) -> Self {
        OrderBody {
            order_id: o.order_id.clone(),
            buyer: o.buyer.clone(),
            status: o.status.as_str().into(),
            lines: o
                .lines
                .iter()
                .map(|l| OrderLine {
                    sku_id: l.sku_id.clone(),
                    name: l.name.clone(),
                    unit_price: (&l.unit_price).into(),
                    quantity: l.quantity,
                    line_total: Money {
                        amount: l.unit_price.amount.saturating_mul(l.quantity as i64),
                        currency: l.unit_price.currency.clone(),
                    },
                })
                .collect(),
            total: (&o.total).into(),
            shipping_address: o.shipping_address.as_ref().map(Into::into),
            created_at: rfc3339(o.created_at),
            payment_deadline: rfc3339(o.payment_deadline),
            paid_at: opt_time(o.paid_at),
            shipped_at: opt_time(o.shipped_at),
            completed_at: opt_time(o.completed_at),
            cancelled_at: opt_time(o.cancelled_at),
            shipment: o.shipment.as_ref().map(|s| Shipment {
                carrier: s.carrier.clone(),
                tracking_no: s.tracking_no.clone(),
            }),
            refund: o.refund.as_ref().map(|r| Refund {
                reason: r.reason.clone(),
                status: match r.status {
                    RefundStatus::Requested => "requested",
                    RefundStatus::Approved => "approved",
                    RefundStatus::Rejected => "rejected",
                }
                .into(),
                restock: r.restock,
            }),
            campaign_id: o.campaign_id.clone(),
            payments_to_refund: o
                .flagged_payments
                .iter()
                .map(|(id, amount)| FlaggedPayment {
                    payment_id: id.clone(),
                    amount: amount.into(),
                })
                .collect(),
            version: o.version,
        }
    }
}

pub fn parse_status(s: &str) -> Result<OrderStatus, ApiError> {
    OrderStatus::parse(s)
        .ok_or_else(|| ApiError::bad_request(format!("unknown order status {s:?}")))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

// ---- campaigns ----------------------------------------------------------------------

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCampaign {
    /// Generated when absent.
    pub campaign_id: Option<String>,
    pub sku_id: String,
    pub price: Money,
    pub quantity: i64,
    /// RFC 3339; defaults to now.
    pub starts_at: Option<String>,
    /// RFC 3339.
    pub ends_at: String,
    /// Defaults to 1.
    pub per_buyer_limit: Option<i64>,
    /// Defaults to the node's payment timeout.
    pub payment_timeout_secs: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignBody {
    pub campaign_id: String,
    pub sku_id: String,
    pub price: Money,
    pub quantity: u64,
    pub starts_at: String,
    pub ends_at: String,
    pub per_buyer_limit: u64,
    pub payment_timeout_secs: u64,
    /// Units paid.
    pub sold: u64,
    /// Units bought and awaiting payment.
    pub reserved: u64,
    /// Units still for sale (0 once ended).
    pub remaining: u64,
    /// `scheduled` | `live` | `sold_out` | `ended`
    pub status: String,
}

impl CampaignBody {
    pub fn new(v: &CampaignView, now: Millis) -> Self {
        let t = &v.terms;
        CampaignBody {
            campaign_id: t.campaign_id.clone(),
            sku_id: t.sku_id.clone(),
            price: (&t.price).into(),
            quantity: t.quantity,
            starts_at: rfc3339(t.starts_at),
            ends_at: rfc3339(t.ends_at),
            per_buyer_limit: t.per_buyer_limit,
            payment_timeout_secs: t.payment_timeout_ms / 1000,
            sold: v.sold,
            reserved: v.reserved,
            remaining: v.remaining(now),
            status: v.status(now).as_str().into(),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuyRequest {
    pub quantity: i64,
    pub shipping_address: Option<Address>,
}

/// Parses an RFC 3339 instant into milliseconds since the Unix epoch.
pub fn parse_time(field: &str, s: &str) -> Result<Millis, ApiError> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        ApiError::bad_request(format!(
            "{field} must be an RFC 3339 time, e.g. 2026-11-23T10:00:00Z"
        ))
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| Millis::try_from(d.as_millis()).ok())
        .ok_or_else(|| ApiError::bad_request(format!("{field} is before 1970")))
}

/// An order's JSON body, as every answer carrying one renders it.
pub fn order_json(order: &Order) -> Vec<u8> {
    serde_json::to_vec(&OrderBody::from(order)).unwrap_or_default()
}

/// An answer whose JSON body is already rendered (owned, or a published copy's shared
/// rendering).
pub(crate) fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    Response::builder()
        .status(status)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_else(|_| ApiError::internal().into_response())
}
