//! Checkout: the reservation saga that places an order, the order carried in its last
//! SKU's log frame, and what a failed or cancelled placing gives back.

use std::collections::BTreeMap;

use shardmall_persistence::{AuxOp, Part};

use crate::domain::cart::{CartCommand, MAX_QUANTITY};
use crate::domain::order::{CancelReason, Line, Order, OrderCommand, OrderState};
use crate::domain::sku::SkuCommand;
use crate::domain::{Address, Entity, Kind};
use crate::error::{Result, ShopError};
use crate::errors_map::{cart_err, order_err, sku_err};
use crate::host::{deadline_key, Companion, Refusal};
use crate::keys::EntityKey;

use super::*;

impl Shop {
    /// Places an order: reserves every line (saga), then records the order. With
    /// `answer`, the request's idempotent answer is recorded with the order when the
    /// order rides in the last SKU's frame (see [`AnswerInFrame::recorded`]).
    pub async fn checkout(
        &self,
        buyer: &str,
        items: Option<Vec<(String, u64)>>,
        shipping_address: Option<Address>,
        mut answer: Option<AnswerInFrame>,
    ) -> Result<Order> {
        let from_cart = items.is_none();
        let items = match items {
            Some(items) => items,
            None => self
                .cart(buyer, CartCommand::Get)
                .await
                .map_err(cart_err)?
                .into_iter()
                .collect(),
        };
        let mut merged: BTreeMap<String, u64> = BTreeMap::new();
        for (sku, qty) in items {
            if qty == 0 {
                return Err(ShopError::BadRequest(format!(
                    "quantity of {sku} must be at least 1"
                )));
            }
            let q = merged.entry(sku).or_insert(0);
            *q = q
                .checked_add(qty)
                .ok_or_else(|| ShopError::BadRequest("quantity too large".into()))?;
        }
        // Checked on the merged lines: two lines of one SKU are one line of their sum.
        if let Some((sku, q)) = merged.iter().find(|(_, q)| **q > MAX_QUANTITY) {
            return Err(ShopError::BadRequest(format!(
                "quantity of {sku} must be at most {MAX_QUANTITY} (lines of one SKU are added up; {q} asked)"
            )));
        }
        if merged.is_empty() {
            return Err(ShopError::BadRequest(if from_cart {
                "the cart is empty".into()
            } else {
                "an order needs at least one item".into()
            }));
        }
        let now = self.now_ms();
        let partition = self.inner.partitioner.buyer(buyer);
        let order_id = self.mint_order_id(partition);
        let deadline = now + millis(self.inner.cfg.payment_timeout);
        let expires_at = deadline + millis(self.inner.cfg.reservation_grace);

        // Every line but the last is reserved with an early answer (ADR 0015): the next
        // step runs while its record is flushed, and the checkout answers only once all
        // are durable. The last SKU carries the order in its own frame when the buyer's
        // partition is served here (ADR 0013): one record, one group commit.
        let mut reserved: Vec<String> = Vec::with_capacity(merged.len());
        let mut lines = Vec::with_capacity(merged.len());
        let mut durables = Vec::new();
        let mut failure = None;
        let opened = Arc::new(OnceLock::new());
        let last = merged.len() - 1;
        for (i, (sku_id, quantity)) in merged.iter().enumerate() {
            let cmd = SkuCommand::Reserve {
                order_id: order_id.clone(),
                quantity: *quantity,
                expires_at,
            };
            let p = self.inner.partitioner.catalog(Kind::Sku, sku_id);
            let answer = if i == last && self.may_ride_along(partition, p) {
                let place = PlaceAfter {
                    order_id: order_id.clone(),
                    buyer: buyer.to_owned(),
                    lines: lines.clone(),
                    quantity: *quantity,
                    shipping_address: shipping_address.clone(),
                    payment_deadline: deadline,
                };
                let clock = self.clock().clone();
                let also = self.order_companion::<SkuState>(
                    partition,
                    opened.clone(),
                    move |view| {
                        let sku = view.as_ref()?;
                        Some((place.with_last(sku)?, clock.now_ms()))
                    },
                    answer.take(),
                );
                match self
                    .ask_here_with::<SkuState>(p, sku_id, cmd.clone(), also)
                    .await
                {
                    Some(answer) => answer,
                    None => self.sku(sku_id, cmd).await,
                }
            } else {
                let (answer, durable) = self.ask_early::<SkuState>(p, sku_id, cmd).await;
                durables.extend(durable);
                answer
            };
            match answer {
                Ok(Some(sku)) => {
                    reserved.push(sku_id.clone());
                    lines.push(line_of(&sku, *quantity));
                }
                Ok(None) => {
                    failure = Some(ShopError::NotFound(format!("sku {sku_id}")));
                    break;
                }
                Err(r) => {
                    let err = sku_err(r, sku_id);
                    if matches!(err, ShopError::Unavailable(_)) {
                        // The reserve may still land after the timeout: release it too.
                        reserved.push(sku_id.clone());
                    }
                    failure = Some(err);
                    break;
                }
            }
        }
        if failure.is_none() {
            let currency = &lines[0].unit_price.currency;
            if lines.iter().any(|l| &l.unit_price.currency != currency) {
                // The companion refused to place such an order too.
                failure = Some(ShopError::BadRequest(
                    "all lines of one order must share one currency".into(),
                ));
            }
        }
        if failure.is_some() && opened.get().is_some() {
            // The last SKU's answer was lost (it timed out) after its frame took the
            // order: cancel the order behind it, so none survives without reservations.
            let cancel = OrderCommand::Cancel {
                reason: CancelReason::PaymentFailed,
            };
            if let Err(e) = self.order(&order_id, cancel).await {
                tracing::warn!(order = %order_id, error = ?e, "cancelling an order whose checkout failed failed; it expires at its deadline");
            }
        }
        if failure.is_none() {
            let placed = match take_opened(opened) {
                // In the last SKU's frame, durable with it.
                Some(order) => Ok(Some(order)),
                None => {
                    let cmd = OrderCommand::Place {
                        order_id: order_id.clone(),
                        buyer: buyer.to_owned(),
                        lines,
                        shipping_address,
                        payment_deadline: deadline,
                        campaign_id: None,
                        placed_at: None,
                        fresh: false,
                    };
                    self.order(&order_id, cmd).await
                }
            };
            match placed {
                Ok(Some(order)) => match all_durable(durables).await {
                    Ok(()) => {
                        if from_cart {
                            let sku_ids = merged.keys().cloned().collect();
                            if let Err(e) =
                                self.cart(buyer, CartCommand::RemoveItems { sku_ids }).await
                            {
                                tracing::warn!(buyer, error = ?e, "order placed but the cart was not emptied");
                            }
                        }
                        return Ok(order);
                    }
                    // The log failed: it refuses everything from here, and after a
                    // restart the order finds a reservation missing and cannot be paid.
                    Err(e) => return Err(e),
                },
                Ok(None) => failure = Some(ShopError::Internal("placed order has no state".into())),
                Err(r) => failure = Some(self.place_failed(r, &order_id).await),
            }
        }
        for sku_id in &reserved {
            self.release(sku_id, &order_id).await;
        }
        Err(failure.unwrap_or_else(|| ShopError::Internal("checkout failed".into())))
    }

    /// A fresh order as a record in the log frame of the entity that decides it (ADR
    /// 0013: a buy's campaign, a checkout's last SKU), when the buyer's `partition` is
    /// open to it. `place_of` turns that entity's answer into the order's `Place` and the
    /// instant it is decided at (`None`: the command is written alone). Leaves the order
    /// as it opened in `opened` when it is part of the frame.
    ///
    /// With `answer`, the frame also records the idempotent request's answer made from
    /// the order (ADR 0015).
    pub(crate) fn order_companion<E: Entity>(
        &self,
        partition: u16,
        opened: Arc<OnceLock<Order>>,
        place_of: impl FnOnce(&E::View) -> Option<(OrderCommand, Millis)> + Send + 'static,
        answer: Option<AnswerInFrame>,
    ) -> MakeCompanion<E> {
        let gate = self.inner.gates[usize::from(partition)].clone();
        let target = self.inner.partitions[usize::from(partition)].clone();
        let metrics = self.inner.metrics.clone();
        Box::new(move |view: &E::View| {
            let (place, at) = place_of(view)?;
            let OrderCommand::Place { order_id, .. } = &place else {
                return None;
            };
            let key = EntityKey::new(Kind::Order, order_id.clone());
            let inside = gate.enter()?;
            let mut order = OrderState::default();
            let events = match order.decide(&place, at) {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(order = %key.id, error = ?e, "an order does not place in its decider's frame; placing it apart");
                    return None;
                }
            };
            for event in &events {
                order.apply(event);
            }
            let payload = crate::codec::encode(&events).ok()?;
            let entity = key.to_bytes();
            let deadline = order.next_deadline();
            let mut aux: Vec<AuxOp> = order
                .index_entries()
                .into_iter()
                .map(|(k, v)| AuxOp::Put(k, v))
                .collect();
            if let Some(at) = deadline {
                aux.push(AuxOp::Put(deadline_key(partition, at, &entity), Vec::new()));
            }
            let view = order.view()?;
            let status = view.status.as_str();
            let mut parts = vec![Part {
                partition,
                entity,
                payload,
            }];
            let answered = answer
                .and_then(|a| a.part(partition, &view, at))
                .map(|(part, key)| {
                    parts.push(part);
                    key
                });
            let _ = opened.set(view);
            Some(Companion {
                parts,
                aux,
                on_durable: Box::new(move || {
                    metrics.order_status_changed(None, Some(status));
                    let _ = target.cast(PartitionMsg::Delivered(key, deadline));
                    if let Some(key) = answered {
                        let _ = target.cast(PartitionMsg::Delivered(key, None));
                    }
                }),
                hold: Box::new(inside),
            })
        })
    }

    /// The error of a `Place` that failed. One that timed out may still land after the
    /// timeout: it is cancelled behind it (same mailbox, so in order), so no order
    /// survives without its reservations or claim. An order that never landed answers
    /// NotFound to the cancel.
    pub(crate) async fn place_failed(
        &self,
        r: Refusal<<OrderState as Entity>::Error>,
        order_id: &str,
    ) -> ShopError {
        let err = order_err(r, order_id);
        if matches!(err, ShopError::Unavailable(_)) {
            let cancel = OrderCommand::Cancel {
                reason: CancelReason::PaymentFailed,
            };
            if let Err(e) = self.order(order_id, cancel).await {
                tracing::warn!(order = %order_id, error = ?e, "cancelling an order whose placing timed out failed; it expires at its deadline");
            }
        }
        err
    }

    /// Gives a cancelled order's units back: to its campaign, or to each SKU.
    pub(super) async fn release_order(&self, order: &Order) {
        match &order.campaign_id {
            Some(campaign_id) => self.release_claim(campaign_id, &order.order_id).await,
            None => {
                for line in &order.lines {
                    self.release(&line.sku_id, &order.order_id).await;
                }
            }
        }
    }

    pub(crate) async fn release(&self, sku_id: &str, order_id: &str) {
        let cmd = SkuCommand::Release {
            order_id: order_id.to_owned(),
        };
        if let Err(e) = self.sku(sku_id, cmd).await {
            // The reservation's own expiry returns the units later.
            tracing::warn!(sku = sku_id, order = order_id, error = ?e, "release failed; the reservation will expire");
        }
    }
}

/// A checkout's order, waiting for the answer of its last SKU: the order that SKU's
/// frame carries (see [`Shop::order_companion`]).
struct PlaceAfter {
    order_id: String,
    buyer: String,
    lines: Vec<Line>,
    quantity: u64,
    shipping_address: Option<Address>,
    payment_deadline: Millis,
}

impl PlaceAfter {
    /// `None` when the last line's currency differs from the others' (the checkout then
    /// refuses the order).
    fn with_last(self, sku: &SkuView) -> Option<OrderCommand> {
        let mut lines = self.lines;
        if lines
            .first()
            .is_some_and(|l| l.unit_price.currency != sku.price.currency)
        {
            return None;
        }
        lines.push(line_of(sku, self.quantity));
        Some(OrderCommand::Place {
            order_id: self.order_id,
            buyer: self.buyer,
            lines,
            shipping_address: self.shipping_address,
            payment_deadline: self.payment_deadline,
            campaign_id: None,
            placed_at: None,
            fresh: true,
        })
    }
}

fn line_of(sku: &SkuView, quantity: u64) -> Line {
    Line {
        sku_id: sku.sku_id.clone(),
        name: sku.name.clone(),
        unit_price: sku.price.clone(),
        quantity,
    }
}

/// The order an [`Shop::order_companion`] left in `opened`, once its frame is queued. The
/// companion is consumed by then, so this is the only handle left and nothing is cloned;
/// the fallback only guards that assumption.
pub(crate) fn take_opened(opened: Arc<OnceLock<Order>>) -> Option<Order> {
    match Arc::try_unwrap(opened) {
        Ok(cell) => cell.into_inner(),
        Err(shared) => shared.get().cloned(),
    }
}

/// Told when the record of an early answer is durable (see [`Shop::ask_early`]).
pub(crate) type Durable = oneshot::Receiver<std::result::Result<(), String>>;

/// Waits for the records of early answers to be durable.
pub(crate) async fn all_durable(durables: impl IntoIterator<Item = Durable>) -> Result<()> {
    for rx in durables {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(ShopError::Unavailable(why)),
            Err(_) => {
                return Err(ShopError::Unavailable(
                    "an entity stopped before its write was durable".into(),
                ))
            }
        }
    }
    Ok(())
}
