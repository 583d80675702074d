//! A SKU and its stock: the hottest entity of a flash sale.
//!
//! Stock lives in three figures. Reserve moves `available -> reserved`, commit (payment)
//! moves `reserved -> sold`, release or expiry moves `reserved -> available`, restock (a
//! refund) moves `sold -> available`, and only an admin adjustment changes the total.
//!
//! Invariants, checked by `debug_assert!` in [`Sku::check`] and by the property tests:
//! - every figure is >= 0 (they are unsigned, and no operation underflows);
//! - `reserved` MUST equal the sum of the open reservations;
//! - `available + reserved + sold` changes only through `Create` and `AdjustStock`;
//! - one order is restocked at most once.
//!
//! Every command is idempotent per order id, because sagas retry: the `settled` map
//! remembers what became of each order's reservation for a bounded time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::common::{Millis, Money, ProductStatus, DAY_MS, HOUR_MS};
use super::{Entity, Kind};

/// How long the outcome of a released (or expired, or restocked) reservation is kept.
pub const SETTLED_RETENTION_MS: Millis = 7 * DAY_MS;
/// How long a committed (sold) reservation is kept: long enough to outlive the automatic
/// receipt confirmation plus the after-sale window, so a refund can still restock it.
pub const COMMITTED_RETENTION_MS: Millis = 60 * DAY_MS;
/// Settled entries are swept at most this often (a sweep walks the whole map, and a hot
/// SKU must not pay for it on every event), so an entry lives up to this much longer.
pub const SWEEP_INTERVAL_MS: Millis = HOUR_MS;
/// Debug builds check the invariants after every event while a SKU has at most this many
/// open reservations.
const CHECK_LIMIT: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuState {
    pub sku: Option<Sku>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sku {
    pub sku_id: String,
    pub product_id: String,
    pub name: String,
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub product_status: ProductStatus,
    pub low_stock_threshold: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// Open reservations by order id.
    pub reservations: BTreeMap<String, Reservation>,
    /// What became of past reservations, by order id (bounded: see the retention consts).
    pub settled: BTreeMap<String, Settled>,
    /// Bumped by every event; 1 after creation.
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The expiry instants of the open reservations, with how many expire at each: the
    /// next deadline without a walk over every reservation.
    pub expiries: BTreeMap<Millis, u64>,
    /// When `settled` was last swept.
    pub swept_at: Millis,
    /// Units carved out for flash-sale campaigns, by campaign id. Their held units count
    /// in `reserved`, their sold units in `sold`.
    pub campaigns: BTreeMap<String, CampaignHold>,
}

/// What one campaign holds of this SKU, as last reported by the campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignHold {
    /// The campaign's version these figures come from; older reports are ignored.
    pub version: u64,
    pub held: u64,
    pub sold: u64,
    /// Sold units given back by refunds.
    pub restocked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub quantity: u64,
    pub expires_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    pub outcome: Outcome,
    pub quantity: u64,
    pub at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Moved to sold (the order was paid).
    Committed,
    /// Returned to available (released by a cancel or a failed checkout, or expired).
    Released,
    /// Sold, then returned to available by a refund.
    Restocked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkuCommand {
    Create {
        sku_id: String,
        product_id: String,
        name: String,
        specs: BTreeMap<String, String>,
        price: Money,
        market_price: Option<Money>,
        product_status: ProductStatus,
        low_stock_threshold: u64,
        stock: u64,
    },
    /// Saga rollback of `Create`: removes the SKU. Refused once stock was reserved or
    /// sold; a SKU that does not exist is accepted with no change.
    Discard,
    /// An admin's change of `available`.
    AdjustStock {
        delta: i64,
        reason: String,
    },
    SetPrice(Money),
    SetProductStatus(ProductStatus),
    /// Holds `quantity` units for `order_id` until `expires_at`. Idempotent per order id.
    Reserve {
        order_id: String,
        quantity: u64,
        expires_at: Millis,
    },
    /// Returns an order's reserved units. Idempotent; a committed order stays sold.
    Release {
        order_id: String,
    },
    /// Moves an order's reserved units to sold. Idempotent.
    Commit {
        order_id: String,
    },
    /// Moves a committed order's units back to available, once. Idempotent.
    Restock {
        order_id: String,
    },
    /// The timer: releases every reservation whose `expires_at <= now`.
    Expire,
    Get,
    /// Carves `quantity` available units out for a campaign. Idempotent per campaign.
    CarveCampaign {
        campaign_id: String,
        quantity: u64,
    },
    /// The campaign's current figures: units it still holds and units it sold. Applied
    /// only if `version` is newer than the last report, so it is safe to repeat.
    SyncCampaign {
        campaign_id: String,
        version: u64,
        held: u64,
        sold: u64,
    },
    /// A refund gives a campaign order's sold units back to available, once per order.
    RestockCampaign {
        campaign_id: String,
        order_id: String,
        quantity: u64,
    },
}

/// The facts of a SKU's life. Variants are only ever appended (bincode encodes the
/// variant by position). Every event carries the `now` of the command that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SkuEvent {
    Created(SkuCreated),
    Discarded {
        at: Millis,
    },
    StockAdjusted {
        delta: i64,
        reason: String,
        at: Millis,
    },
    PriceSet {
        price: Money,
        at: Millis,
    },
    ProductStatusSet {
        status: ProductStatus,
        at: Millis,
    },
    Reserved {
        order_id: String,
        quantity: u64,
        expires_at: Millis,
        at: Millis,
    },
    Released {
        order_id: String,
        quantity: u64,
        at: Millis,
    },
    Expired {
        order_id: String,
        quantity: u64,
        at: Millis,
    },
    Committed {
        order_id: String,
        quantity: u64,
        at: Millis,
    },
    Restocked {
        order_id: String,
        quantity: u64,
        at: Millis,
    },
    CampaignCarved {
        campaign_id: String,
        quantity: u64,
        at: Millis,
    },
    CampaignSynced {
        campaign_id: String,
        version: u64,
        held: u64,
        sold: u64,
        at: Millis,
    },
    CampaignRestocked {
        campaign_id: String,
        order_id: String,
        quantity: u64,
        at: Millis,
    },
}

/// The payload of [`SkuEvent::Created`]: its own type, so that a field added to [`Sku`]
/// later does not change the layout of events already logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuCreated {
    pub sku_id: String,
    pub product_id: String,
    pub name: String,
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub product_status: ProductStatus,
    pub low_stock_threshold: u64,
    pub stock: u64,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SkuError {
    #[error("sku not found")]
    NotFound,
    #[error("a sku with this id already exists")]
    AlreadyExists,
    /// An adjustment would take `available` below zero.
    #[error("insufficient stock (available {available})")]
    InsufficientStock { available: u64 },
    /// A reservation asks for more than is available.
    #[error("out of stock (available {available})")]
    OutOfStock { available: u64 },
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    BadRequest(String),
}

/// What callers get back: every field but the reservation bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuView {
    pub sku_id: String,
    pub product_id: String,
    pub name: String,
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub product_status: ProductStatus,
    pub low_stock_threshold: u64,
    pub available: u64,
    pub reserved: u64,
    pub sold: u64,
    /// `available <= low_stock_threshold`.
    pub low_stock: bool,
    pub version: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl Sku {
    /// `available + reserved + sold`, or `None` if it does not fit in a u64.
    pub fn total(&self) -> Option<u64> {
        self.available
            .checked_add(self.reserved)?
            .checked_add(self.sold)
    }

    pub fn is_low_stock(&self) -> bool {
        self.available <= self.low_stock_threshold
    }

    /// Sum of the open reservations (what `reserved` MUST equal).
    pub fn reservations_total(&self) -> u64 {
        self.reservations.values().map(|r| r.quantity).sum()
    }

    /// The structural invariants; cheap enough only for debug builds and tests.
    pub fn check(&self) -> Result<(), String> {
        let held: u64 = self.campaigns.values().map(|c| c.held).sum();
        if self.reserved != self.reservations_total() + held {
            return Err(format!(
                "reserved {} != sum of reservations {} + campaign units {held}",
                self.reserved,
                self.reservations_total()
            ));
        }
        let open = self.expiries.values().sum::<u64>();
        if open != self.reservations.len() as u64 {
            return Err(format!(
                "expiry index holds {open}, reservations {}",
                self.reservations.len()
            ));
        }
        if self.total().is_none() {
            return Err("stock total overflows".into());
        }
        Ok(())
    }

    fn view(&self) -> SkuView {
        SkuView {
            sku_id: self.sku_id.clone(),
            product_id: self.product_id.clone(),
            name: self.name.clone(),
            specs: self.specs.clone(),
            price: self.price.clone(),
            market_price: self.market_price.clone(),
            product_status: self.product_status,
            low_stock_threshold: self.low_stock_threshold,
            available: self.available,
            reserved: self.reserved,
            sold: self.sold,
            low_stock: self.is_low_stock(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// Removes an open reservation (and its expiry) and its units from `reserved`.
    fn take_reservation(&mut self, order_id: &str) -> Option<u64> {
        let r = self.reservations.remove(order_id)?;
        if let Some(n) = self.expiries.get_mut(&r.expires_at) {
            *n -= 1;
            if *n == 0 {
                self.expiries.remove(&r.expires_at);
            }
        }
        self.reserved = self.reserved.saturating_sub(r.quantity);
        Some(r.quantity)
    }

    fn settle(&mut self, order_id: &str, outcome: Outcome, quantity: u64, at: Millis) {
        self.settled.insert(
            order_id.to_owned(),
            Settled {
                outcome,
                quantity,
                at,
            },
        );
    }

    /// Drops settled entries past their retention, relative to the event time `at`.
    fn sweep(&mut self, at: Millis) {
        if at < self.swept_at.saturating_add(SWEEP_INTERVAL_MS) {
            return;
        }
        self.settled.retain(|_, s| {
            let keep_for = match s.outcome {
                Outcome::Committed => COMMITTED_RETENTION_MS,
                Outcome::Released | Outcome::Restocked => SETTLED_RETENTION_MS,
            };
            at.saturating_sub(s.at) <= keep_for
        });
        self.swept_at = at;
    }
}

impl SkuEvent {
    /// The instant the event happened.
    pub fn at(&self) -> Millis {
        match self {
            SkuEvent::Created(c) => c.at,
            SkuEvent::Discarded { at }
            | SkuEvent::StockAdjusted { at, .. }
            | SkuEvent::PriceSet { at, .. }
            | SkuEvent::ProductStatusSet { at, .. }
            | SkuEvent::Reserved { at, .. }
            | SkuEvent::Released { at, .. }
            | SkuEvent::Expired { at, .. }
            | SkuEvent::Committed { at, .. }
            | SkuEvent::Restocked { at, .. }
            | SkuEvent::CampaignCarved { at, .. }
            | SkuEvent::CampaignSynced { at, .. }
            | SkuEvent::CampaignRestocked { at, .. } => *at,
        }
    }
}

fn bad(msg: impl Into<String>) -> SkuError {
    SkuError::BadRequest(msg.into())
}

fn invalid(msg: impl Into<String>) -> SkuError {
    SkuError::InvalidState(msg.into())
}

impl SkuState {
    fn existing(&self) -> Result<&Sku, SkuError> {
        self.sku.as_ref().ok_or(SkuError::NotFound)
    }
}

impl Entity for SkuState {
    type Command = SkuCommand;
    type Event = SkuEvent;
    type Error = SkuError;
    type View = Option<SkuView>;

    const KIND: Kind = Kind::Sku;

    fn decide(&self, cmd: &SkuCommand, now: Millis) -> Result<Vec<SkuEvent>, SkuError> {
        match cmd {
            SkuCommand::Create {
                sku_id,
                product_id,
                name,
                specs,
                price,
                market_price,
                product_status,
                low_stock_threshold,
                stock,
            } => {
                if self.sku.is_some() {
                    return Err(SkuError::AlreadyExists);
                }
                if !price.is_valid_price() {
                    return Err(bad("price must be >= 0 with a currency"));
                }
                if market_price.as_ref().is_some_and(|m| !m.is_valid_price()) {
                    return Err(bad("market price must be >= 0 with a currency"));
                }
                Ok(vec![SkuEvent::Created(SkuCreated {
                    sku_id: sku_id.clone(),
                    product_id: product_id.clone(),
                    name: name.clone(),
                    specs: specs.clone(),
                    price: price.clone(),
                    market_price: market_price.clone(),
                    product_status: *product_status,
                    low_stock_threshold: *low_stock_threshold,
                    stock: *stock,
                    at: now,
                })])
            }
            SkuCommand::Discard => match &self.sku {
                None => Ok(vec![]),
                Some(s) if s.reserved > 0 || s.sold > 0 => Err(invalid(
                    "a sku with reserved or sold stock cannot be discarded",
                )),
                Some(_) => Ok(vec![SkuEvent::Discarded { at: now }]),
            },
            SkuCommand::AdjustStock { delta, reason } => {
                let s = self.existing()?;
                let magnitude = delta.unsigned_abs();
                if *delta < 0 {
                    if s.available < magnitude {
                        return Err(SkuError::InsufficientStock {
                            available: s.available,
                        });
                    }
                } else if s.total().and_then(|t| t.checked_add(magnitude)).is_none() {
                    return Err(bad("stock would overflow"));
                }
                if *delta == 0 {
                    return Ok(vec![]);
                }
                Ok(vec![SkuEvent::StockAdjusted {
                    delta: *delta,
                    reason: reason.clone(),
                    at: now,
                }])
            }
            SkuCommand::SetPrice(price) => {
                let s = self.existing()?;
                if !price.is_valid_price() {
                    return Err(bad("price must be >= 0 with a currency"));
                }
                if s.price == *price {
                    return Ok(vec![]);
                }
                Ok(vec![SkuEvent::PriceSet {
                    price: price.clone(),
                    at: now,
                }])
            }
            SkuCommand::SetProductStatus(status) => {
                let s = self.existing()?;
                if s.product_status == *status {
                    return Ok(vec![]);
                }
                Ok(vec![SkuEvent::ProductStatusSet {
                    status: *status,
                    at: now,
                }])
            }
            SkuCommand::Reserve {
                order_id,
                quantity,
                expires_at,
            } => {
                let s = self.existing()?;
                if *quantity == 0 {
                    return Err(bad("quantity must be at least 1"));
                }
                if let Some(r) = s.reservations.get(order_id) {
                    // A saga retry: the same reservation is already held.
                    return if r.quantity == *quantity {
                        Ok(vec![])
                    } else {
                        Err(invalid(format!(
                            "order {order_id} already holds {} units",
                            r.quantity
                        )))
                    };
                }
                if s.settled.contains_key(order_id) {
                    return Err(invalid(format!(
                        "the reservation of order {order_id} is already settled"
                    )));
                }
                if s.product_status != ProductStatus::OnShelf {
                    return Err(invalid(format!(
                        "the product is {}, not on_shelf",
                        s.product_status
                    )));
                }
                if *expires_at <= now {
                    return Err(bad("a reservation must expire in the future"));
                }
                if s.available < *quantity {
                    return Err(SkuError::OutOfStock {
                        available: s.available,
                    });
                }
                Ok(vec![SkuEvent::Reserved {
                    order_id: order_id.clone(),
                    quantity: *quantity,
                    expires_at: *expires_at,
                    at: now,
                }])
            }
            SkuCommand::Release { order_id } => {
                // Releasing what is not held (never reserved, released, expired or
                // committed) changes nothing: a rollback may run twice.
                let held = self.sku.as_ref().and_then(|s| s.reservations.get(order_id));
                Ok(match held {
                    Some(r) => vec![SkuEvent::Released {
                        order_id: order_id.clone(),
                        quantity: r.quantity,
                        at: now,
                    }],
                    None => vec![],
                })
            }
            SkuCommand::Commit { order_id } => {
                let s = self.existing()?;
                if let Some(r) = s.reservations.get(order_id) {
                    return Ok(vec![SkuEvent::Committed {
                        order_id: order_id.clone(),
                        quantity: r.quantity,
                        at: now,
                    }]);
                }
                match s.settled.get(order_id).map(|x| x.outcome) {
                    Some(Outcome::Committed | Outcome::Restocked) => Ok(vec![]),
                    Some(Outcome::Released) => Err(invalid(format!(
                        "the reservation of order {order_id} was released"
                    ))),
                    None => Err(invalid(format!("no reservation for order {order_id}"))),
                }
            }
            SkuCommand::Restock { order_id } => {
                let s = self.existing()?;
                match s.settled.get(order_id) {
                    Some(x) if x.outcome == Outcome::Committed => Ok(vec![SkuEvent::Restocked {
                        order_id: order_id.clone(),
                        quantity: x.quantity,
                        at: now,
                    }]),
                    Some(x) if x.outcome == Outcome::Restocked => Ok(vec![]),
                    _ => Err(invalid(format!(
                        "order {order_id} has no sold units here to restock"
                    ))),
                }
            }
            SkuCommand::Expire => {
                let Some(s) = &self.sku else {
                    return Ok(vec![]);
                };
                // The expiry index says whether anything is due without a full walk.
                if s.expiries.keys().next().is_none_or(|first| *first > now) {
                    return Ok(vec![]);
                }
                Ok(s.reservations
                    .iter()
                    .filter(|(_, r)| r.expires_at <= now)
                    .map(|(order_id, r)| SkuEvent::Expired {
                        order_id: order_id.clone(),
                        quantity: r.quantity,
                        at: now,
                    })
                    .collect())
            }
            SkuCommand::Get => Ok(vec![]),
            SkuCommand::CarveCampaign {
                campaign_id,
                quantity,
            } => {
                let s = self.existing()?;
                if s.campaigns.contains_key(campaign_id) {
                    return Ok(vec![]);
                }
                if s.product_status != ProductStatus::OnShelf {
                    return Err(invalid("the product is off shelf"));
                }
                if s.available < *quantity {
                    return Err(SkuError::InsufficientStock {
                        available: s.available,
                    });
                }
                Ok(vec![SkuEvent::CampaignCarved {
                    campaign_id: campaign_id.clone(),
                    quantity: *quantity,
                    at: now,
                }])
            }
            SkuCommand::SyncCampaign {
                campaign_id,
                version,
                held,
                sold,
            } => {
                let s = self.existing()?;
                let Some(hold) = s.campaigns.get(campaign_id) else {
                    return Ok(vec![]);
                };
                if *version <= hold.version || (*held == hold.held && *sold == hold.sold) {
                    return Ok(vec![]);
                }
                // Units only ever leave a campaign: held falls, sold grows.
                if *held > hold.held || *sold < hold.sold || held + sold > hold.held + hold.sold {
                    return Err(invalid(format!(
                        "campaign {campaign_id} reports figures that do not follow its last ones"
                    )));
                }
                Ok(vec![SkuEvent::CampaignSynced {
                    campaign_id: campaign_id.clone(),
                    version: *version,
                    held: *held,
                    sold: *sold,
                    at: now,
                }])
            }
            SkuCommand::RestockCampaign {
                campaign_id,
                order_id,
                quantity,
            } => {
                let s = self.existing()?;
                if s.settled.get(order_id).map(|x| x.outcome) == Some(Outcome::Restocked) {
                    return Ok(vec![]);
                }
                let hold = s.campaigns.get(campaign_id).ok_or_else(|| {
                    invalid(format!("campaign {campaign_id} holds nothing of this sku"))
                })?;
                if hold.sold < hold.restocked + quantity {
                    return Err(invalid(format!(
                        "campaign {campaign_id} has not reported {quantity} more sold units"
                    )));
                }
                Ok(vec![SkuEvent::CampaignRestocked {
                    campaign_id: campaign_id.clone(),
                    order_id: order_id.clone(),
                    quantity: *quantity,
                    at: now,
                }])
            }
        }
    }

    fn apply(&mut self, event: &SkuEvent) {
        if let SkuEvent::Created(c) = event {
            self.sku = Some(Sku {
                sku_id: c.sku_id.clone(),
                product_id: c.product_id.clone(),
                name: c.name.clone(),
                specs: c.specs.clone(),
                price: c.price.clone(),
                market_price: c.market_price.clone(),
                product_status: c.product_status,
                low_stock_threshold: c.low_stock_threshold,
                available: c.stock,
                reserved: 0,
                sold: 0,
                reservations: BTreeMap::new(),
                settled: BTreeMap::new(),
                version: 1,
                created_at: c.at,
                updated_at: c.at,
                expiries: BTreeMap::new(),
                swept_at: c.at,
                campaigns: BTreeMap::new(),
            });
            return;
        }
        if let SkuEvent::Discarded { .. } = event {
            self.sku = None;
            return;
        }
        let Some(s) = self.sku.as_mut() else {
            // decide never emits these for a missing SKU.
            debug_assert!(false, "sku event without a sku: {event:?}");
            return;
        };
        // Arithmetic below saturates rather than panics: decide has already checked every
        // bound, and replay of a logged event must never bring the actor down.
        match event {
            SkuEvent::Created(_) | SkuEvent::Discarded { .. } => {}
            SkuEvent::StockAdjusted { delta, .. } => {
                let magnitude = delta.unsigned_abs();
                s.available = if *delta < 0 {
                    s.available.saturating_sub(magnitude)
                } else {
                    s.available.saturating_add(magnitude)
                };
            }
            SkuEvent::PriceSet { price, .. } => s.price = price.clone(),
            SkuEvent::ProductStatusSet { status, .. } => s.product_status = *status,
            SkuEvent::Reserved {
                order_id,
                quantity,
                expires_at,
                ..
            } => {
                let previous = s.reservations.insert(
                    order_id.clone(),
                    Reservation {
                        quantity: *quantity,
                        expires_at: *expires_at,
                    },
                );
                debug_assert!(previous.is_none(), "order {order_id} reserved twice");
                *s.expiries.entry(*expires_at).or_insert(0) += 1;
                s.available = s.available.saturating_sub(*quantity);
                s.reserved = s.reserved.saturating_add(*quantity);
            }
            SkuEvent::Released { order_id, at, .. } | SkuEvent::Expired { order_id, at, .. } => {
                if let Some(q) = s.take_reservation(order_id) {
                    s.available = s.available.saturating_add(q);
                    s.settle(order_id, Outcome::Released, q, *at);
                }
            }
            SkuEvent::Committed { order_id, at, .. } => {
                if let Some(q) = s.take_reservation(order_id) {
                    s.sold = s.sold.saturating_add(q);
                    s.settle(order_id, Outcome::Committed, q, *at);
                }
            }
            SkuEvent::Restocked { order_id, at, .. } => {
                let committed = s
                    .settled
                    .get(order_id)
                    .filter(|x| x.outcome == Outcome::Committed)
                    .map(|x| x.quantity);
                if let Some(q) = committed {
                    s.sold = s.sold.saturating_sub(q);
                    s.available = s.available.saturating_add(q);
                    s.settle(order_id, Outcome::Restocked, q, *at);
                }
            }
            SkuEvent::CampaignCarved {
                campaign_id,
                quantity,
                ..
            } => {
                s.available = s.available.saturating_sub(*quantity);
                s.reserved = s.reserved.saturating_add(*quantity);
                s.campaigns.insert(
                    campaign_id.clone(),
                    CampaignHold {
                        version: 0,
                        held: *quantity,
                        sold: 0,
                        restocked: 0,
                    },
                );
            }
            SkuEvent::CampaignSynced {
                campaign_id,
                version,
                held,
                sold,
                ..
            } => {
                if let Some(hold) = s.campaigns.get_mut(campaign_id) {
                    let newly_sold = sold.saturating_sub(hold.sold);
                    let left = hold.held.saturating_sub(*held);
                    s.reserved = s.reserved.saturating_sub(left);
                    s.sold = s.sold.saturating_add(newly_sold);
                    s.available = s.available.saturating_add(left.saturating_sub(newly_sold));
                    hold.version = *version;
                    hold.held = *held;
                    hold.sold = *sold;
                }
            }
            SkuEvent::CampaignRestocked {
                campaign_id,
                order_id,
                quantity,
                at,
            } => {
                if let Some(hold) = s.campaigns.get_mut(campaign_id) {
                    hold.restocked = hold.restocked.saturating_add(*quantity);
                    s.sold = s.sold.saturating_sub(*quantity);
                    s.available = s.available.saturating_add(*quantity);
                    s.settle(order_id, Outcome::Restocked, *quantity, *at);
                }
            }
        }
        let at = event.at();
        s.version += 1;
        s.updated_at = at;
        s.sweep(at);
        // The check walks every reservation: debug builds run it on small SKUs only, so a
        // debug-built flash sale does not turn quadratic. The property tests run it always.
        if cfg!(debug_assertions) && s.reservations.len() <= CHECK_LIMIT {
            debug_assert_eq!(s.check(), Ok(()));
        }
    }

    fn view(&self) -> Option<SkuView> {
        self.sku.as_ref().map(Sku::view)
    }

    fn published(&self) -> Option<Option<SkuView>> {
        self.sku.is_some().then(|| self.view())
    }

    fn next_deadline(&self) -> Option<Millis> {
        self.sku.as_ref()?.expiries.keys().next().copied()
    }

    /// `I/low/<sku>` while the SKU is at or below its low-stock threshold: the host raises
    /// the alert when the entry appears, and admins can list low-stock SKUs.
    fn index_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        match &self.sku {
            Some(s) if s.is_low_stock() => vec![(
                [b"I/low/".as_slice(), s.sku_id.as_bytes()].concat(),
                Vec::new(),
            )],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(stock: u64) -> SkuCommand {
        SkuCommand::Create {
            sku_id: "s1".into(),
            product_id: "p1".into(),
            name: "Red, 128 GB".into(),
            specs: BTreeMap::from([("color".into(), "red".into())]),
            price: Money::new(799_900, "CNY"),
            market_price: Some(Money::new(899_900, "CNY")),
            product_status: ProductStatus::OnShelf,
            low_stock_threshold: 2,
            stock,
        }
    }

    fn run(s: &mut SkuState, cmd: SkuCommand, now: Millis) -> Result<Vec<SkuEvent>, SkuError> {
        let events = s.decide(&cmd, now)?;
        for e in &events {
            s.apply(e);
        }
        Ok(events)
    }

    fn with_stock(stock: u64) -> SkuState {
        let mut s = SkuState::default();
        run(&mut s, create(stock), 1).unwrap();
        s
    }

    fn reserve(order: &str, quantity: u64, expires_at: Millis) -> SkuCommand {
        SkuCommand::Reserve {
            order_id: order.into(),
            quantity,
            expires_at,
        }
    }

    fn order(o: &str) -> String {
        o.to_owned()
    }

    fn figures(s: &SkuState) -> (u64, u64, u64) {
        let v = s.view().unwrap();
        (v.available, v.reserved, v.sold)
    }

    #[test]
    fn campaign_units_are_carved_synced_and_restocked_without_losing_stock() {
        let mut s = with_stock(100);
        let carve = |q| SkuCommand::CarveCampaign {
            campaign_id: "c1".into(),
            quantity: q,
        };
        assert_eq!(
            run(&mut s, carve(101), 2),
            Err(SkuError::InsufficientStock { available: 100 })
        );
        run(&mut s, carve(40), 2).unwrap();
        assert_eq!(figures(&s), (60, 40, 0));
        // Carving again is a no-op.
        assert!(run(&mut s, carve(40), 3).unwrap().is_empty());
        let sync = |version, held, sold| SkuCommand::SyncCampaign {
            campaign_id: "c1".into(),
            version,
            held,
            sold,
        };
        // Sold 10 while live: held falls by the same amount.
        run(&mut s, sync(5, 30, 10), 4).unwrap();
        assert_eq!(figures(&s), (60, 30, 10));
        // A stale or repeated report changes nothing.
        assert!(run(&mut s, sync(4, 35, 5), 5).unwrap().is_empty());
        assert!(run(&mut s, sync(5, 30, 10), 5).unwrap().is_empty());
        // Ended with 2 awaiting payment: the other 28 return to available.
        run(&mut s, sync(9, 2, 10), 6).unwrap();
        assert_eq!(figures(&s), (88, 2, 10));
        // Figures that do not follow the last ones are refused.
        assert!(run(&mut s, sync(10, 3, 10), 7).is_err());
        // A refund gives one order's unit back, once.
        let restock = SkuCommand::RestockCampaign {
            campaign_id: "c1".into(),
            order_id: "o1".into(),
            quantity: 1,
        };
        run(&mut s, restock.clone(), 8).unwrap();
        assert!(run(&mut s, restock, 9).unwrap().is_empty());
        assert_eq!(figures(&s), (89, 2, 9));
        s.sku.as_ref().unwrap().check().unwrap();
        // Units held by a campaign block a discard.
        assert!(run(&mut s, SkuCommand::Discard, 10).is_err());
    }

    #[test]
    fn create_twice_is_already_exists() {
        let s = with_stock(5);
        assert_eq!(s.decide(&create(5), 2), Err(SkuError::AlreadyExists));
    }

    #[test]
    fn create_refuses_negative_price() {
        let s = SkuState::default();
        let mut cmd = create(5);
        if let SkuCommand::Create { price, .. } = &mut cmd {
            price.amount = -1;
        }
        assert!(matches!(s.decide(&cmd, 1), Err(SkuError::BadRequest(_))));
    }

    #[test]
    fn commands_on_a_missing_sku_are_not_found() {
        let s = SkuState::default();
        for cmd in [
            SkuCommand::AdjustStock {
                delta: 1,
                reason: "r".into(),
            },
            SkuCommand::SetPrice(Money::new(1, "CNY")),
            SkuCommand::SetProductStatus(ProductStatus::OffShelf),
            reserve("o1", 1, 100),
            SkuCommand::Commit {
                order_id: order("o1"),
            },
            SkuCommand::Restock {
                order_id: order("o1"),
            },
        ] {
            assert_eq!(s.decide(&cmd, 1), Err(SkuError::NotFound), "{cmd:?}");
        }
        for cmd in [
            SkuCommand::Release {
                order_id: order("o1"),
            },
            SkuCommand::Expire,
            SkuCommand::Discard,
            SkuCommand::Get,
        ] {
            assert_eq!(s.decide(&cmd, 1), Ok(vec![]), "{cmd:?}");
        }
    }

    #[test]
    fn adjust_below_zero_is_insufficient_stock() {
        let mut s = with_stock(3);
        let cmd = SkuCommand::AdjustStock {
            delta: -4,
            reason: "count".into(),
        };
        assert_eq!(
            s.decide(&cmd, 2),
            Err(SkuError::InsufficientStock { available: 3 })
        );
        let cmd = SkuCommand::AdjustStock {
            delta: i64::MIN,
            reason: "count".into(),
        };
        assert_eq!(
            s.decide(&cmd, 2),
            Err(SkuError::InsufficientStock { available: 3 })
        );
        run(
            &mut s,
            SkuCommand::AdjustStock {
                delta: -3,
                reason: "count".into(),
            },
            2,
        )
        .unwrap();
        assert_eq!(figures(&s), (0, 0, 0));
        assert!(s.view().unwrap().low_stock);
    }

    #[test]
    fn adjust_refuses_overflow() {
        let s = with_stock(u64::MAX - 1);
        let cmd = SkuCommand::AdjustStock {
            delta: 2,
            reason: "x".into(),
        };
        assert!(matches!(s.decide(&cmd, 2), Err(SkuError::BadRequest(_))));
    }

    #[test]
    fn set_price_refuses_negative() {
        let s = with_stock(1);
        let cmd = SkuCommand::SetPrice(Money::new(-5, "CNY"));
        assert!(matches!(s.decide(&cmd, 2), Err(SkuError::BadRequest(_))));
    }

    #[test]
    fn reserve_zero_is_bad_request() {
        let s = with_stock(3);
        assert!(matches!(
            s.decide(&reserve("o1", 0, 100), 2),
            Err(SkuError::BadRequest(_))
        ));
    }

    #[test]
    fn reserve_beyond_available_is_out_of_stock() {
        let mut s = with_stock(3);
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        assert_eq!(
            s.decide(&reserve("o2", 2, 100), 3),
            Err(SkuError::OutOfStock { available: 1 })
        );
    }

    #[test]
    fn reserve_off_shelf_is_invalid_state() {
        let mut s = with_stock(3);
        run(
            &mut s,
            SkuCommand::SetProductStatus(ProductStatus::OffShelf),
            2,
        )
        .unwrap();
        assert!(matches!(
            s.decide(&reserve("o1", 1, 100), 3),
            Err(SkuError::InvalidState(_))
        ));
    }

    #[test]
    fn reserve_in_the_past_is_bad_request() {
        let s = with_stock(3);
        assert!(matches!(
            s.decide(&reserve("o1", 1, 5), 5),
            Err(SkuError::BadRequest(_))
        ));
    }

    #[test]
    fn reserve_is_idempotent_per_order() {
        let mut s = with_stock(3);
        assert_eq!(run(&mut s, reserve("o1", 2, 100), 2).unwrap().len(), 1);
        assert_eq!(run(&mut s, reserve("o1", 2, 100), 3).unwrap(), vec![]);
        assert!(matches!(
            s.decide(&reserve("o1", 1, 100), 3),
            Err(SkuError::InvalidState(_))
        ));
        assert_eq!(figures(&s), (1, 2, 0));
        assert_eq!(s.next_deadline(), Some(100));
    }

    #[test]
    fn reserve_of_a_settled_order_is_invalid_state() {
        let mut s = with_stock(3);
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        run(
            &mut s,
            SkuCommand::Release {
                order_id: order("o1"),
            },
            3,
        )
        .unwrap();
        assert!(matches!(
            s.decide(&reserve("o1", 2, 100), 4),
            Err(SkuError::InvalidState(_))
        ));
    }

    #[test]
    fn release_is_idempotent_and_keeps_sold_units() {
        let mut s = with_stock(5);
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        run(&mut s, reserve("o2", 1, 100), 2).unwrap();
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Release {
                    order_id: order("o1")
                },
                3
            )
            .unwrap()
            .len(),
            1
        );
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Release {
                    order_id: order("o1")
                },
                4
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Release {
                    order_id: order("nope")
                },
                4
            )
            .unwrap(),
            vec![]
        );
        run(
            &mut s,
            SkuCommand::Commit {
                order_id: order("o2"),
            },
            5,
        )
        .unwrap();
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Release {
                    order_id: order("o2")
                },
                6
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(figures(&s), (4, 0, 1));
    }

    #[test]
    fn commit_without_reservation_is_invalid_state() {
        let mut s = with_stock(5);
        assert!(matches!(
            s.decide(
                &SkuCommand::Commit {
                    order_id: order("o1")
                },
                2
            ),
            Err(SkuError::InvalidState(_))
        ));
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        run(
            &mut s,
            SkuCommand::Release {
                order_id: order("o1"),
            },
            3,
        )
        .unwrap();
        assert!(matches!(
            s.decide(
                &SkuCommand::Commit {
                    order_id: order("o1")
                },
                4
            ),
            Err(SkuError::InvalidState(_))
        ));
    }

    #[test]
    fn commit_is_idempotent() {
        let mut s = with_stock(5);
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Commit {
                    order_id: order("o1")
                },
                3
            )
            .unwrap()
            .len(),
            1
        );
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Commit {
                    order_id: order("o1")
                },
                4
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(figures(&s), (3, 0, 2));
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn restock_once_and_only_for_committed() {
        let mut s = with_stock(5);
        run(&mut s, reserve("o1", 2, 100), 2).unwrap();
        assert!(matches!(
            s.decide(
                &SkuCommand::Restock {
                    order_id: order("o1")
                },
                3
            ),
            Err(SkuError::InvalidState(_))
        ));
        run(
            &mut s,
            SkuCommand::Commit {
                order_id: order("o1"),
            },
            3,
        )
        .unwrap();
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Restock {
                    order_id: order("o1")
                },
                4
            )
            .unwrap()
            .len(),
            1
        );
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Restock {
                    order_id: order("o1")
                },
                5
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(
            run(
                &mut s,
                SkuCommand::Commit {
                    order_id: order("o1")
                },
                5
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(figures(&s), (5, 0, 0));
        assert!(matches!(
            s.decide(
                &SkuCommand::Restock {
                    order_id: order("o9")
                },
                6
            ),
            Err(SkuError::InvalidState(_))
        ));
    }

    #[test]
    fn expire_releases_only_what_is_due() {
        let mut s = with_stock(10);
        run(&mut s, reserve("o1", 1, 100), 2).unwrap();
        run(&mut s, reserve("o2", 2, 100), 2).unwrap();
        run(&mut s, reserve("o3", 3, 200), 2).unwrap();
        assert_eq!(s.next_deadline(), Some(100));
        assert_eq!(run(&mut s, SkuCommand::Expire, 99).unwrap(), vec![]);
        assert_eq!(run(&mut s, SkuCommand::Expire, 100).unwrap().len(), 2);
        assert_eq!(figures(&s), (7, 3, 0));
        assert_eq!(s.next_deadline(), Some(200));
        assert!(matches!(
            s.decide(
                &SkuCommand::Commit {
                    order_id: order("o1")
                },
                101
            ),
            Err(SkuError::InvalidState(_))
        ));
    }

    #[test]
    fn discard_refused_once_stock_moved() {
        let mut s = with_stock(5);
        run(&mut s, reserve("o1", 1, 100), 2).unwrap();
        assert!(matches!(
            s.decide(&SkuCommand::Discard, 3),
            Err(SkuError::InvalidState(_))
        ));
        run(
            &mut s,
            SkuCommand::Release {
                order_id: order("o1"),
            },
            3,
        )
        .unwrap();
        run(&mut s, SkuCommand::Discard, 4).unwrap();
        assert_eq!(s.view(), None);
    }

    #[test]
    fn settled_entries_are_pruned_by_event_time() {
        let mut s = with_stock(5);
        run(&mut s, reserve("o1", 1, 100), 2).unwrap();
        run(&mut s, reserve("o2", 1, 100), 2).unwrap();
        run(
            &mut s,
            SkuCommand::Release {
                order_id: order("o1"),
            },
            3,
        )
        .unwrap();
        run(
            &mut s,
            SkuCommand::Commit {
                order_id: order("o2"),
            },
            3,
        )
        .unwrap();
        let later = 3 + SETTLED_RETENTION_MS + SWEEP_INTERVAL_MS + 1;
        run(&mut s, SkuCommand::SetPrice(Money::new(1, "CNY")), later).unwrap();
        let settled = &s.sku.as_ref().unwrap().settled;
        assert!(!settled.contains_key("o1"));
        assert!(
            settled.contains_key("o2"),
            "a sale is kept longer, for refunds"
        );
        let much_later = 3 + COMMITTED_RETENTION_MS + SWEEP_INTERVAL_MS + 1;
        run(
            &mut s,
            SkuCommand::SetPrice(Money::new(2, "CNY")),
            much_later,
        )
        .unwrap();
        assert!(s.sku.as_ref().unwrap().settled.is_empty());
    }

    #[test]
    fn view_flags_low_stock() {
        let mut s = with_stock(3);
        assert!(!s.view().unwrap().low_stock);
        run(&mut s, reserve("o1", 1, 100), 2).unwrap();
        assert!(s.view().unwrap().low_stock);
    }
}
