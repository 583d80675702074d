//! An order and its state machine (DESIGN.md, Domain and invariants):
//!
//! ```text
//! pending_payment -> paid -> shipped -> completed
//! pending_payment -> cancelled            (buyer, admin, payment deadline, failed payment)
//! paid | shipped | completed -> refund_requested -> refunded
//!                               refund_requested -> the status it had (refund rejected)
//! ```
//!
//! Any other transition is refused with the current status. Each order keeps a snapshot of
//! its lines taken when it was placed; later catalog edits never change it.
//!
//! Payment is a saga: `BeginPayment` marks a payment in progress (which blocks cancel and
//! expiry), the SKUs move the units to sold, then `MarkPaid` completes it, or
//! `AbortPayment` gives up.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::common::{Address, Millis, Money};
use super::{Entity, Kind};

/// Index key prefix: `I/ob/<buyer>/<order_id>` -> status, for "my orders".
pub const BUYER_INDEX_PREFIX: &[u8] = b"I/ob/";
/// Index key prefix: `I/o/<order_id>` -> `<buyer>\0<status>`, for the admin search.
pub const ORDER_INDEX_PREFIX: &[u8] = b"I/o/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Shipped,
    Completed,
    Cancelled,
    RefundRequested,
    Refunded,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 7] = [
        Self::PendingPayment,
        Self::Paid,
        Self::Shipped,
        Self::Completed,
        Self::Cancelled,
        Self::RefundRequested,
        Self::Refunded,
    ];

    /// The name clients see, e.g. `pending_payment`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::PendingPayment => "pending_payment",
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::RefundRequested => "refund_requested",
            Self::Refunded => "refunded",
        }
    }

    /// The inverse of [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// True if the state machine has an edge `self -> to`.
    pub fn can_become(self, to: OrderStatus) -> bool {
        use OrderStatus::*;
        matches!(
            (self, to),
            (PendingPayment, Paid | Cancelled)
                | (Paid, Shipped | RefundRequested)
                | (Shipped, Completed | RefundRequested)
                | (Completed, RefundRequested)
                | (RefundRequested, Refunded | Paid | Shipped | Completed)
        )
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order: a snapshot of the SKU taken when the order was placed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub sku_id: String,
    pub name: String,
    pub unit_price: Money,
    pub quantity: u64,
}

impl Line {
    /// `unit_price * quantity`; `None` on overflow.
    pub fn line_total(&self) -> Option<Money> {
        self.unit_price.checked_mul(self.quantity).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub carrier: String,
    pub tracking_no: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    Requested,
    Approved,
    Rejected,
}

impl RefundStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    pub reason: String,
    pub status: RefundStatus,
    /// Whether the units went back to stock (set on approval).
    pub restock: bool,
    /// The status the order returns to if the refund is rejected.
    pub previous_status: OrderStatus,
    pub reject_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    Buyer,
    Admin,
    /// The payment deadline passed.
    Expired,
    PaymentFailed,
}

impl CancelReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Buyer => "buyer",
            Self::Admin => "admin",
            Self::Expired => "expired",
            Self::PaymentFailed => "payment_failed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub order: Option<Order>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub buyer: String,
    pub status: OrderStatus,
    pub lines: Vec<Line>,
    pub total: Money,
    pub shipping_address: Option<Address>,
    pub created_at: Millis,
    pub payment_deadline: Millis,
    pub paid_at: Option<Millis>,
    pub shipped_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub cancelled_at: Option<Millis>,
    /// When a shipped order completes by itself if the buyer does not confirm receipt.
    pub auto_confirm_at: Option<Millis>,
    pub shipment: Option<Shipment>,
    pub refund: Option<Refund>,
    /// The payment between `BeginPayment` and `MarkPaid`/`AbortPayment`.
    pub payment_in_progress: Option<String>,
    /// Payments applied to this order (at most once each).
    pub payment_ids: BTreeSet<String>,
    pub campaign_id: Option<String>,
    pub cancel_reason: Option<CancelReason>,
    /// Provider payments that arrived when the order could not take them (cancelled,
    /// already paid by another payment): recorded, never applied as a sale, to be
    /// refunded to the payer.
    pub flagged_payments: BTreeMap<String, Money>,
    /// Bumped by every event; 1 after placement. Operators' edits name the version they
    /// saw, so a late retry cannot overwrite a newer edit.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderCommand {
    Place {
        order_id: String,
        buyer: String,
        lines: Vec<Line>,
        shipping_address: Option<Address>,
        payment_deadline: Millis,
        campaign_id: Option<String>,
        /// The creation time, when another entity decided it (a campaign buy, so that
        /// the order and the buy's first answer agree); otherwise the order's clock.
        placed_at: Option<Millis>,
        /// The caller minted the id for this very command: nothing of the order can have
        /// been checkpointed, so it is loaded from the log's tail alone.
        fresh: bool,
    },
    BeginPayment {
        payment_id: String,
        amount: Money,
    },
    AbortPayment {
        payment_id: String,
    },
    /// `auto_confirm_after` is accepted for the caller's convenience and not used: the
    /// automatic confirmation is armed by `Ship`.
    MarkPaid {
        payment_id: String,
        auto_confirm_after: Millis,
    },
    Cancel {
        reason: CancelReason,
    },
    Ship {
        carrier: String,
        tracking_no: String,
        expected_version: Option<u64>,
        auto_confirm_after: Millis,
    },
    ConfirmReceipt,
    /// `window`: how long after completion a refund may still be requested.
    RequestRefund {
        reason: String,
        window: Millis,
    },
    ApproveRefund {
        restock: bool,
    },
    RejectRefund {
        reason: String,
    },
    /// An operator's edit. The address may change before shipping, the shipment while
    /// shipped.
    Patch {
        shipping_address: Option<Address>,
        shipment: Option<Shipment>,
        expected_version: u64,
    },
    /// The timer: expires an unpaid order, or completes a shipped one.
    Tick,
    Get,
    /// Records a provider payment the order cannot take, for refund. Once per payment id.
    FlagPayment {
        payment_id: String,
        amount: Money,
    },
}

/// The facts of an order's life. Variants are only ever appended (bincode encodes the
/// variant by position); [`Line`], [`Money`], [`Address`] and [`Shipment`] are part of
/// their layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderEvent {
    Placed(OrderPlaced),
    PaymentBegun {
        payment_id: String,
        at: Millis,
    },
    PaymentAborted {
        payment_id: String,
        at: Millis,
    },
    Paid {
        payment_id: String,
        at: Millis,
    },
    Cancelled {
        reason: CancelReason,
        at: Millis,
    },
    Shipped {
        carrier: String,
        tracking_no: String,
        auto_confirm_at: Millis,
        at: Millis,
    },
    Completed {
        /// True when the timer confirmed receipt, false when the buyer did.
        automatic: bool,
        at: Millis,
    },
    RefundRequested {
        reason: String,
        at: Millis,
    },
    RefundApproved {
        restock: bool,
        at: Millis,
    },
    RefundRejected {
        reason: String,
        at: Millis,
    },
    Patched {
        shipping_address: Option<Address>,
        shipment: Option<Shipment>,
        at: Millis,
    },
    PaymentFlagged {
        payment_id: String,
        amount: Money,
        at: Millis,
    },
}

/// The payload of [`OrderEvent::Placed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
    pub buyer: String,
    pub lines: Vec<Line>,
    pub total: Money,
    pub shipping_address: Option<Address>,
    pub payment_deadline: Millis,
    pub campaign_id: Option<String>,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum OrderError {
    #[error("order not found")]
    NotFound,
    #[error("an order with this id already exists")]
    AlreadyExists,
    #[error("not allowed while the order is {status}")]
    InvalidState { status: OrderStatus },
    #[error("the amount does not match the order total {expected}")]
    AmountMismatch { expected: Money },
    #[error("the order changed: its current version is {current}")]
    VersionConflict { current: u64 },
    #[error("{0}")]
    BadRequest(String),
}

fn invalid(o: &Order) -> OrderError {
    OrderError::InvalidState { status: o.status }
}

/// Validates the lines of a new order and returns their total.
fn total_of(lines: &[Line]) -> Result<Money, OrderError> {
    let first = lines
        .first()
        .ok_or_else(|| OrderError::BadRequest("an order needs at least one line".into()))?;
    let mut total = Money::zero(first.unit_price.currency.clone());
    for line in lines {
        if line.quantity == 0 {
            return Err(OrderError::BadRequest(format!(
                "quantity of {} must be at least 1",
                line.sku_id
            )));
        }
        if !line.unit_price.is_valid_price() {
            return Err(OrderError::BadRequest(format!(
                "the price of {} is not valid",
                line.sku_id
            )));
        }
        if line.unit_price.currency != total.currency {
            return Err(OrderError::BadRequest(
                "all lines of one order must share one currency".into(),
            ));
        }
        total = line
            .unit_price
            .checked_mul(line.quantity)
            .and_then(|l| total.checked_add(&l))
            .map_err(|_| OrderError::BadRequest("the order total is too large".into()))?;
    }
    Ok(total)
}

impl OrderState {
    fn decide_on(
        o: &Order,
        cmd: &OrderCommand,
        now: Millis,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus as S;
        match cmd {
            OrderCommand::Place { .. } => Err(OrderError::AlreadyExists),
            OrderCommand::BeginPayment { payment_id, amount } => {
                if o.payment_ids.contains(payment_id) {
                    // Already applied: a retry of a payment that went through.
                    return Ok(vec![]);
                }
                if o.status != S::PendingPayment {
                    return Err(invalid(o));
                }
                if *amount != o.total {
                    return Err(OrderError::AmountMismatch {
                        expected: o.total.clone(),
                    });
                }
                match &o.payment_in_progress {
                    Some(p) if p == payment_id => Ok(vec![]),
                    Some(_) => Err(invalid(o)),
                    None if now > o.payment_deadline => Err(invalid(o)),
                    None => Ok(vec![OrderEvent::PaymentBegun {
                        payment_id: payment_id.clone(),
                        at: now,
                    }]),
                }
            }
            OrderCommand::AbortPayment { payment_id } => {
                Ok(if o.payment_in_progress.as_ref() == Some(payment_id) {
                    vec![OrderEvent::PaymentAborted {
                        payment_id: payment_id.clone(),
                        at: now,
                    }]
                } else {
                    vec![]
                })
            }
            OrderCommand::MarkPaid { payment_id, .. } => {
                if o.payment_ids.contains(payment_id) {
                    return Ok(vec![]);
                }
                if o.status != S::PendingPayment
                    || o.payment_in_progress.as_ref() != Some(payment_id)
                {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::Paid {
                    payment_id: payment_id.clone(),
                    at: now,
                }])
            }
            OrderCommand::Cancel { reason } => {
                if o.status != S::PendingPayment || o.payment_in_progress.is_some() {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::Cancelled {
                    reason: *reason,
                    at: now,
                }])
            }
            OrderCommand::Ship {
                carrier,
                tracking_no,
                expected_version,
                auto_confirm_after,
            } => {
                if expected_version.is_some_and(|v| v != o.version) {
                    return Err(OrderError::VersionConflict { current: o.version });
                }
                if o.status != S::Paid {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::Shipped {
                    carrier: carrier.clone(),
                    tracking_no: tracking_no.clone(),
                    auto_confirm_at: now.saturating_add(*auto_confirm_after),
                    at: now,
                }])
            }
            OrderCommand::ConfirmReceipt => {
                if o.status != S::Shipped {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::Completed {
                    automatic: false,
                    at: now,
                }])
            }
            OrderCommand::RequestRefund { reason, window } => {
                let allowed = match o.status {
                    S::Paid | S::Shipped => true,
                    S::Completed => o
                        .completed_at
                        .is_some_and(|c| now <= c.saturating_add(*window)),
                    _ => false,
                };
                if !allowed {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::RefundRequested {
                    reason: reason.clone(),
                    at: now,
                }])
            }
            OrderCommand::ApproveRefund { restock } => {
                if o.status != S::RefundRequested {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::RefundApproved {
                    restock: *restock,
                    at: now,
                }])
            }
            OrderCommand::RejectRefund { reason } => {
                if o.status != S::RefundRequested {
                    return Err(invalid(o));
                }
                Ok(vec![OrderEvent::RefundRejected {
                    reason: reason.clone(),
                    at: now,
                }])
            }
            OrderCommand::Patch {
                shipping_address,
                shipment,
                expected_version,
            } => {
                if *expected_version != o.version {
                    return Err(OrderError::VersionConflict { current: o.version });
                }
                if shipping_address.is_some() && !matches!(o.status, S::PendingPayment | S::Paid) {
                    return Err(invalid(o));
                }
                if shipment.is_some() && o.status != S::Shipped {
                    return Err(invalid(o));
                }
                if shipping_address.is_none() && shipment.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![OrderEvent::Patched {
                    shipping_address: shipping_address.clone(),
                    shipment: shipment.clone(),
                    at: now,
                }])
            }
            OrderCommand::Tick => Ok(match o.status {
                S::PendingPayment
                    if now >= o.payment_deadline && o.payment_in_progress.is_none() =>
                {
                    vec![OrderEvent::Cancelled {
                        reason: CancelReason::Expired,
                        at: now,
                    }]
                }
                S::Shipped if o.auto_confirm_at.is_some_and(|t| now >= t) => {
                    vec![OrderEvent::Completed {
                        automatic: true,
                        at: now,
                    }]
                }
                _ => vec![],
            }),
            OrderCommand::Get => Ok(vec![]),
            OrderCommand::FlagPayment { payment_id, amount } => Ok(
                if o.payment_ids.contains(payment_id) || o.flagged_payments.contains_key(payment_id)
                {
                    vec![]
                } else {
                    vec![OrderEvent::PaymentFlagged {
                        payment_id: payment_id.clone(),
                        amount: amount.clone(),
                        at: now,
                    }]
                },
            ),
        }
    }
}

impl Entity for OrderState {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;
    type View = Option<Order>;

    const KIND: Kind = Kind::Order;

    fn decide(&self, cmd: &OrderCommand, now: Millis) -> Result<Vec<OrderEvent>, OrderError> {
        match (&self.order, cmd) {
            (
                None,
                OrderCommand::Place {
                    order_id,
                    buyer,
                    lines,
                    shipping_address,
                    payment_deadline,
                    campaign_id,
                    placed_at,
                    ..
                },
            ) => {
                let total = total_of(lines)?;
                Ok(vec![OrderEvent::Placed(OrderPlaced {
                    order_id: order_id.clone(),
                    buyer: buyer.clone(),
                    lines: lines.clone(),
                    total,
                    shipping_address: shipping_address.clone(),
                    payment_deadline: *payment_deadline,
                    campaign_id: campaign_id.clone(),
                    at: placed_at.unwrap_or(now),
                })])
            }
            // A timer or a read for an order that does not exist changes nothing.
            (None, OrderCommand::Tick | OrderCommand::Get) => Ok(vec![]),
            (None, _) => Err(OrderError::NotFound),
            (Some(o), cmd) => Self::decide_on(o, cmd, now),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        if let OrderEvent::Placed(p) = event {
            self.order = Some(Order {
                order_id: p.order_id.clone(),
                buyer: p.buyer.clone(),
                status: OrderStatus::PendingPayment,
                lines: p.lines.clone(),
                total: p.total.clone(),
                shipping_address: p.shipping_address.clone(),
                created_at: p.at,
                payment_deadline: p.payment_deadline,
                paid_at: None,
                shipped_at: None,
                completed_at: None,
                cancelled_at: None,
                auto_confirm_at: None,
                shipment: None,
                refund: None,
                payment_in_progress: None,
                payment_ids: BTreeSet::new(),
                campaign_id: p.campaign_id.clone(),
                cancel_reason: None,
                flagged_payments: BTreeMap::new(),
                version: 1,
            });
            return;
        }
        let Some(o) = self.order.as_mut() else {
            debug_assert!(false, "order event without an order: {event:?}");
            return;
        };
        match event {
            OrderEvent::Placed(_) => {}
            OrderEvent::PaymentBegun { payment_id, .. } => {
                o.payment_in_progress = Some(payment_id.clone());
            }
            OrderEvent::PaymentAborted { .. } => o.payment_in_progress = None,
            OrderEvent::Paid { payment_id, at } => {
                o.status = OrderStatus::Paid;
                o.paid_at = Some(*at);
                o.payment_in_progress = None;
                o.payment_ids.insert(payment_id.clone());
            }
            OrderEvent::Cancelled { reason, at } => {
                o.status = OrderStatus::Cancelled;
                o.cancelled_at = Some(*at);
                o.cancel_reason = Some(*reason);
            }
            OrderEvent::Shipped {
                carrier,
                tracking_no,
                auto_confirm_at,
                at,
            } => {
                o.status = OrderStatus::Shipped;
                o.shipped_at = Some(*at);
                o.auto_confirm_at = Some(*auto_confirm_at);
                o.shipment = Some(Shipment {
                    carrier: carrier.clone(),
                    tracking_no: tracking_no.clone(),
                });
            }
            OrderEvent::Completed { at, .. } => {
                o.status = OrderStatus::Completed;
                o.completed_at = Some(*at);
            }
            OrderEvent::RefundRequested { reason, .. } => {
                o.refund = Some(Refund {
                    reason: reason.clone(),
                    status: RefundStatus::Requested,
                    restock: false,
                    previous_status: o.status,
                    reject_reason: None,
                });
                o.status = OrderStatus::RefundRequested;
            }
            OrderEvent::RefundApproved { restock, .. } => {
                o.status = OrderStatus::Refunded;
                if let Some(r) = o.refund.as_mut() {
                    r.status = RefundStatus::Approved;
                    r.restock = *restock;
                }
            }
            OrderEvent::RefundRejected { reason, .. } => {
                if let Some(r) = o.refund.as_mut() {
                    r.status = RefundStatus::Rejected;
                    r.reject_reason = Some(reason.clone());
                    o.status = r.previous_status;
                }
            }
            OrderEvent::Patched {
                shipping_address,
                shipment,
                ..
            } => {
                if let Some(a) = shipping_address {
                    o.shipping_address = Some(a.clone());
                }
                if let Some(s) = shipment {
                    o.shipment = Some(s.clone());
                }
            }
            OrderEvent::PaymentFlagged {
                payment_id, amount, ..
            } => {
                o.flagged_payments
                    .insert(payment_id.clone(), amount.clone());
            }
        }
        o.version += 1;
    }

    fn view(&self) -> Option<Order> {
        self.order.clone()
    }

    fn published(&self) -> Option<Option<Order>> {
        self.order.is_some().then(|| self.view())
    }

    fn next_deadline(&self) -> Option<Millis> {
        let o = self.order.as_ref()?;
        match o.status {
            OrderStatus::PendingPayment => Some(o.payment_deadline),
            OrderStatus::Shipped => o.auto_confirm_at,
            _ => None,
        }
    }

    fn index_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let Some(o) = &self.order else {
            return vec![];
        };
        let status = o.status.as_str().as_bytes();
        let by_buyer = [
            BUYER_INDEX_PREFIX,
            o.buyer.as_bytes(),
            b"/",
            o.order_id.as_bytes(),
        ]
        .concat();
        let by_id = [ORDER_INDEX_PREFIX, o.order_id.as_bytes()].concat();
        vec![
            (by_buyer, status.to_vec()),
            (by_id, [o.buyer.as_bytes(), b"\0", status].concat()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus as S;

    const DEADLINE: Millis = 1_000;
    const DAY: Millis = 86_400_000;

    fn line(sku: &str, amount: i64, quantity: u64) -> Line {
        Line {
            sku_id: sku.into(),
            name: format!("{sku} name"),
            unit_price: Money::new(amount, "CNY"),
            quantity,
        }
    }

    fn place(lines: Vec<Line>) -> OrderCommand {
        OrderCommand::Place {
            order_id: "o1".into(),
            buyer: "alice".into(),
            lines,
            shipping_address: None,
            payment_deadline: DEADLINE,
            campaign_id: None,
            placed_at: None,
            fresh: false,
        }
    }

    fn run(
        s: &mut OrderState,
        cmd: OrderCommand,
        now: Millis,
    ) -> Result<Vec<OrderEvent>, OrderError> {
        let events = s.decide(&cmd, now)?;
        for e in &events {
            s.apply(e);
        }
        Ok(events)
    }

    fn status(s: &OrderState) -> OrderStatus {
        s.order.as_ref().unwrap().status
    }

    fn placed() -> OrderState {
        let mut s = OrderState::default();
        run(&mut s, place(vec![line("a", 100, 2), line("b", 50, 1)]), 10).unwrap();
        s
    }

    fn begin(id: &str, amount: i64) -> OrderCommand {
        OrderCommand::BeginPayment {
            payment_id: id.into(),
            amount: Money::new(amount, "CNY"),
        }
    }

    fn mark_paid(id: &str) -> OrderCommand {
        OrderCommand::MarkPaid {
            payment_id: id.into(),
            auto_confirm_after: DAY,
        }
    }

    fn paid() -> OrderState {
        let mut s = placed();
        run(&mut s, begin("pay1", 250), 20).unwrap();
        run(&mut s, mark_paid("pay1"), 30).unwrap();
        s
    }

    fn ship() -> OrderCommand {
        OrderCommand::Ship {
            carrier: "SF".into(),
            tracking_no: "T1".into(),
            expected_version: None,
            auto_confirm_after: DAY,
        }
    }

    fn shipped() -> OrderState {
        let mut s = paid();
        run(&mut s, ship(), 40).unwrap();
        s
    }

    fn completed() -> OrderState {
        let mut s = shipped();
        run(&mut s, OrderCommand::ConfirmReceipt, 50).unwrap();
        s
    }

    fn refund_requested() -> OrderState {
        let mut s = shipped();
        run(
            &mut s,
            OrderCommand::RequestRefund {
                reason: "broken".into(),
                window: DAY,
            },
            60,
        )
        .unwrap();
        s
    }

    fn invalid(status: OrderStatus) -> Result<Vec<OrderEvent>, OrderError> {
        Err(OrderError::InvalidState { status })
    }

    #[test]
    fn place_computes_total_and_indexes() {
        let s = placed();
        let o = s.view().unwrap();
        assert_eq!(o.total, Money::new(250, "CNY"));
        assert_eq!(
            (o.status, o.version, o.created_at),
            (S::PendingPayment, 1, 10)
        );
        assert_eq!(s.next_deadline(), Some(DEADLINE));
        assert_eq!(
            s.index_entries(),
            vec![
                (b"I/ob/alice/o1".to_vec(), b"pending_payment".to_vec()),
                (b"I/o/o1".to_vec(), b"alice\0pending_payment".to_vec()),
            ]
        );
    }

    #[test]
    fn place_refusals() {
        let s = OrderState::default();
        assert!(matches!(
            s.decide(&place(vec![]), 1),
            Err(OrderError::BadRequest(_))
        ));
        let mut usd = line("b", 1, 1);
        usd.unit_price.currency = "USD".into();
        assert!(matches!(
            s.decide(&place(vec![line("a", 1, 1), usd]), 1),
            Err(OrderError::BadRequest(_))
        ));
        assert!(matches!(
            s.decide(&place(vec![line("a", 1, 0)]), 1),
            Err(OrderError::BadRequest(_))
        ));
        assert!(matches!(
            s.decide(&place(vec![line("a", -1, 1)]), 1),
            Err(OrderError::BadRequest(_))
        ));
        assert!(matches!(
            s.decide(&place(vec![line("a", i64::MAX, 2)]), 1),
            Err(OrderError::BadRequest(_))
        ));
        assert!(matches!(
            s.decide(&place(vec![line("a", i64::MAX, 1), line("b", 1, 1)]), 1),
            Err(OrderError::BadRequest(_))
        ));
        assert_eq!(
            placed().decide(&place(vec![line("a", 1, 1)]), 1),
            Err(OrderError::AlreadyExists)
        );
    }

    #[test]
    fn commands_on_a_missing_order_are_not_found() {
        let s = OrderState::default();
        assert_eq!(
            s.decide(&OrderCommand::ConfirmReceipt, 1),
            Err(OrderError::NotFound)
        );
        assert_eq!(s.decide(&begin("p", 1), 1), Err(OrderError::NotFound));
        assert_eq!(s.decide(&OrderCommand::Tick, 1), Ok(vec![]));
        assert_eq!(s.decide(&OrderCommand::Get, 1), Ok(vec![]));
    }

    #[test]
    fn payment_happy_path_and_idempotency() {
        let mut s = placed();
        assert_eq!(run(&mut s, begin("pay1", 250), 20).unwrap().len(), 1);
        assert_eq!(run(&mut s, begin("pay1", 250), 21).unwrap(), vec![]);
        assert_eq!(run(&mut s, mark_paid("pay1"), 30).unwrap().len(), 1);
        assert_eq!(run(&mut s, mark_paid("pay1"), 31).unwrap(), vec![]);
        assert_eq!(run(&mut s, begin("pay1", 250), 32).unwrap(), vec![]);
        let o = s.view().unwrap();
        assert_eq!(
            (o.status, o.paid_at, o.payment_in_progress.clone()),
            (S::Paid, Some(30), None)
        );
        assert!(o.payment_ids.contains("pay1"));
        assert_eq!(o.version, 3);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn begin_payment_refusals() {
        let mut s = placed();
        assert_eq!(
            s.decide(&begin("pay1", 249), 20),
            Err(OrderError::AmountMismatch {
                expected: Money::new(250, "CNY")
            })
        );
        let usd = OrderCommand::BeginPayment {
            payment_id: "pay1".into(),
            amount: Money::new(250, "USD"),
        };
        assert!(matches!(
            s.decide(&usd, 20),
            Err(OrderError::AmountMismatch { .. })
        ));
        assert_eq!(
            s.decide(&begin("pay1", 250), DEADLINE + 1),
            invalid(S::PendingPayment)
        );
        run(&mut s, begin("pay1", 250), 20).unwrap();
        assert_eq!(
            s.decide(&begin("pay2", 250), 21),
            invalid(S::PendingPayment)
        );
        assert_eq!(paid().decide(&begin("pay2", 250), 40), invalid(S::Paid));
    }

    #[test]
    fn mark_paid_requires_the_payment_in_progress() {
        let mut s = placed();
        assert_eq!(s.decide(&mark_paid("pay1"), 20), invalid(S::PendingPayment));
        run(&mut s, begin("pay1", 250), 20).unwrap();
        assert_eq!(s.decide(&mark_paid("pay2"), 21), invalid(S::PendingPayment));
        let mut c = placed();
        run(
            &mut c,
            OrderCommand::Cancel {
                reason: CancelReason::Buyer,
            },
            20,
        )
        .unwrap();
        assert_eq!(c.decide(&mark_paid("pay1"), 21), invalid(S::Cancelled));
    }

    #[test]
    fn abort_payment_clears_it_and_is_idempotent() {
        let mut s = placed();
        run(&mut s, begin("pay1", 250), 20).unwrap();
        assert_eq!(
            run(
                &mut s,
                OrderCommand::AbortPayment {
                    payment_id: "other".into()
                },
                21
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(
            run(
                &mut s,
                OrderCommand::AbortPayment {
                    payment_id: "pay1".into()
                },
                22
            )
            .unwrap()
            .len(),
            1
        );
        assert_eq!(
            run(
                &mut s,
                OrderCommand::AbortPayment {
                    payment_id: "pay1".into()
                },
                23
            )
            .unwrap(),
            vec![]
        );
        assert_eq!(s.view().unwrap().payment_in_progress, None);
        run(
            &mut s,
            OrderCommand::Cancel {
                reason: CancelReason::Buyer,
            },
            24,
        )
        .unwrap();
    }

    #[test]
    fn cancel_refusals() {
        let cancel = OrderCommand::Cancel {
            reason: CancelReason::Admin,
        };
        let mut s = placed();
        run(&mut s, begin("pay1", 250), 20).unwrap();
        assert_eq!(s.decide(&cancel, 21), invalid(S::PendingPayment));
        assert_eq!(paid().decide(&cancel, 40), invalid(S::Paid));
        let mut c = placed();
        run(&mut c, cancel.clone(), 20).unwrap();
        let o = c.view().unwrap();
        assert_eq!(
            (o.status, o.cancel_reason, o.cancelled_at),
            (S::Cancelled, Some(CancelReason::Admin), Some(20))
        );
        assert_eq!(c.decide(&cancel, 21), invalid(S::Cancelled));
        assert_eq!(c.next_deadline(), None);
    }

    #[test]
    fn ship_refusals_and_effects() {
        assert_eq!(placed().decide(&ship(), 40), invalid(S::PendingPayment));
        let s = paid();
        let stale = OrderCommand::Ship {
            carrier: "SF".into(),
            tracking_no: "T".into(),
            expected_version: Some(1),
            auto_confirm_after: DAY,
        };
        assert_eq!(
            s.decide(&stale, 40),
            Err(OrderError::VersionConflict { current: 3 })
        );
        let s = shipped();
        let o = s.view().unwrap();
        assert_eq!(
            (o.status, o.shipped_at, o.auto_confirm_at),
            (S::Shipped, Some(40), Some(40 + DAY))
        );
        assert_eq!(
            o.shipment,
            Some(Shipment {
                carrier: "SF".into(),
                tracking_no: "T1".into()
            })
        );
        assert_eq!(s.next_deadline(), Some(40 + DAY));
        assert_eq!(s.decide(&ship(), 41), invalid(S::Shipped));
    }

    #[test]
    fn confirm_receipt_only_when_shipped() {
        assert_eq!(
            paid().decide(&OrderCommand::ConfirmReceipt, 40),
            invalid(S::Paid)
        );
        let s = completed();
        assert_eq!(s.view().unwrap().completed_at, Some(50));
        assert_eq!(
            s.decide(&OrderCommand::ConfirmReceipt, 51),
            invalid(S::Completed)
        );
    }

    #[test]
    fn refund_request_refusals() {
        let req = |window| OrderCommand::RequestRefund {
            reason: "r".into(),
            window,
        };
        assert_eq!(placed().decide(&req(DAY), 20), invalid(S::PendingPayment));
        assert!(paid().decide(&req(DAY), 40).is_ok());
        let c = completed();
        assert!(c.decide(&req(DAY), 50 + DAY).is_ok());
        assert_eq!(c.decide(&req(DAY), 51 + DAY), invalid(S::Completed));
        assert_eq!(
            refund_requested().decide(&req(DAY), 70),
            invalid(S::RefundRequested)
        );
    }

    #[test]
    fn refund_approve_and_reject() {
        let mut s = refund_requested();
        assert_eq!(s.next_deadline(), None);
        let mut r = s.clone();
        run(&mut s, OrderCommand::ApproveRefund { restock: true }, 70).unwrap();
        let o = s.view().unwrap();
        assert_eq!(o.status, S::Refunded);
        let refund = o.refund.unwrap();
        assert_eq!(
            (refund.status, refund.restock, refund.previous_status),
            (RefundStatus::Approved, true, S::Shipped)
        );
        assert_eq!(
            s.decide(&OrderCommand::ApproveRefund { restock: true }, 71),
            invalid(S::Refunded)
        );
        assert_eq!(
            s.decide(
                &OrderCommand::RejectRefund {
                    reason: "no".into()
                },
                71
            ),
            invalid(S::Refunded)
        );

        run(
            &mut r,
            OrderCommand::RejectRefund {
                reason: "used".into(),
            },
            70,
        )
        .unwrap();
        let o = r.view().unwrap();
        assert_eq!(o.status, S::Shipped);
        assert_eq!(o.refund.unwrap().reject_reason.as_deref(), Some("used"));
        assert_eq!(r.next_deadline(), Some(40 + DAY));
        assert_eq!(
            paid().decide(&OrderCommand::ApproveRefund { restock: false }, 1),
            invalid(S::Paid)
        );
        assert_eq!(
            paid().decide(&OrderCommand::RejectRefund { reason: "x".into() }, 1),
            invalid(S::Paid)
        );
    }

    #[test]
    fn patch_checks_version_and_status() {
        let addr = Address {
            name: "A".into(),
            phone: "1".into(),
            line1: "L".into(),
            city: "C".into(),
            country: "CN".into(),
        };
        let shipment = Shipment {
            carrier: "EMS".into(),
            tracking_no: "T2".into(),
        };
        let mut s = paid();
        let stale = OrderCommand::Patch {
            shipping_address: Some(addr.clone()),
            shipment: None,
            expected_version: 1,
        };
        assert_eq!(
            s.decide(&stale, 40),
            Err(OrderError::VersionConflict { current: 3 })
        );
        let early = OrderCommand::Patch {
            shipping_address: None,
            shipment: Some(shipment.clone()),
            expected_version: 3,
        };
        assert_eq!(s.decide(&early, 40), invalid(S::Paid));
        run(
            &mut s,
            OrderCommand::Patch {
                shipping_address: Some(addr.clone()),
                shipment: None,
                expected_version: 3,
            },
            40,
        )
        .unwrap();
        assert_eq!(s.view().unwrap().shipping_address, Some(addr.clone()));
        run(&mut s, ship(), 41).unwrap();
        let late = OrderCommand::Patch {
            shipping_address: Some(addr),
            shipment: None,
            expected_version: 5,
        };
        assert_eq!(s.decide(&late, 42), invalid(S::Shipped));
        run(
            &mut s,
            OrderCommand::Patch {
                shipping_address: None,
                shipment: Some(shipment.clone()),
                expected_version: 5,
            },
            42,
        )
        .unwrap();
        let o = s.view().unwrap();
        assert_eq!((o.shipment, o.version), (Some(shipment), 6));
    }

    #[test]
    fn tick_expires_unpaid_orders_unless_paying() {
        let mut s = placed();
        assert_eq!(
            run(&mut s, OrderCommand::Tick, DEADLINE - 1).unwrap(),
            vec![]
        );
        let mut paying = s.clone();
        run(&mut paying, begin("pay1", 250), 20).unwrap();
        assert_eq!(
            run(&mut paying, OrderCommand::Tick, DEADLINE + 5).unwrap(),
            vec![]
        );
        run(&mut s, OrderCommand::Tick, DEADLINE).unwrap();
        let o = s.view().unwrap();
        assert_eq!(
            (o.status, o.cancel_reason),
            (S::Cancelled, Some(CancelReason::Expired))
        );
        assert_eq!(s.index_entries()[0].1, b"cancelled".to_vec());
    }

    #[test]
    fn tick_completes_shipped_orders() {
        let mut s = shipped();
        assert_eq!(run(&mut s, OrderCommand::Tick, 39 + DAY).unwrap(), vec![]);
        assert_eq!(
            run(&mut s, OrderCommand::Tick, 40 + DAY).unwrap(),
            vec![OrderEvent::Completed {
                automatic: true,
                at: 40 + DAY
            }]
        );
        assert_eq!(status(&s), S::Completed);
        assert_eq!(run(&mut s, OrderCommand::Tick, 50 + DAY).unwrap(), vec![]);
    }

    #[test]
    fn status_names_round_trip() {
        for st in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(OrderStatus::parse("PAID"), None);
    }
}
