//! Payment: the saga that moves reserved units to sold before an order is paid, and
//! the provider's callbacks.

use crate::domain::order::{Order, OrderCommand, OrderState, OrderStatus};
use crate::domain::payment::{PaymentCommand, PaymentError, PaymentState};
use crate::domain::sku::{SkuCommand, SkuState};
use crate::domain::{Kind, Money};
use crate::error::{Result, ShopError};
use crate::errors_map::{order_err, sku_err, MOVING};
use crate::host::{Companion, Refusal};

use super::checkout::{all_durable, Durable};

use super::*;

impl Shop {
    /// Pays an order through the API (`method: fake`): one payment id per order, so a
    /// retry continues the same payment.
    ///
    /// With `answer`, the request's idempotent answer is recorded in the frame that marks
    /// the order paid, when that is written here (see [`AnswerInFrame::recorded`]).
    pub async fn pay(
        &self,
        order_id: &str,
        amount: Money,
        answer: Option<AnswerInFrame>,
    ) -> Result<Order> {
        // No shortcut for an already applied payment: a fresh pay of a paid order is an
        // illegal transition (409); a retry of the same request is replayed by its
        // Idempotency-Key before it gets here.
        let order = self.get_order(order_id).await?;
        if order.status != OrderStatus::PendingPayment {
            return Err(ShopError::InvalidState {
                status: order.status.as_str().into(),
            });
        }
        self.begin_and_finish_payment(order_id, &format!("api-{order_id}"), amount, answer)
            .await
    }

    /// A payment provider's callback, applied at most once per payment id.
    pub async fn payment_callback(
        &self,
        payment_id: &str,
        order_id: &str,
        amount: Money,
        succeeded: bool,
    ) -> Result<Order> {
        if succeeded {
            // Claim the payment id for this order first: the claim is one entity's
            // decision, so two callbacks naming the same id for two orders cannot both
            // apply.
            let p = self.inner.partitioner.catalog(Kind::Payment, payment_id);
            let claim = PaymentCommand::Claim {
                order_id: order_id.to_owned(),
            };
            match self.ask::<PaymentState>(p, payment_id, claim).await {
                Ok(_) => {}
                Err(Refusal::Domain(PaymentError::ClaimedByAnother { .. })) => {
                    return Err(ShopError::InvalidStateMsg(format!(
                        "payment {payment_id} was already applied to another order"
                    )))
                }
                Err(Refusal::Unavailable(why)) => return Err(ShopError::Unavailable(why)),
                Err(Refusal::Overloaded(what)) => return Err(ShopError::Overloaded(what)),
                Err(Refusal::Moved) => return Err(ShopError::Unavailable(MOVING.into())),
            }
        }
        let order = self.get_order(order_id).await?;
        if order.payment_ids.contains(payment_id) || !succeeded {
            return Ok(order);
        }
        if order.flagged_payments.contains_key(payment_id) {
            // A retry of a callback already recorded for refund gets the same answer.
            return Err(ShopError::InvalidStateMsg(format!(
                "payment {payment_id} was recorded for refund: the order could not take it"
            )));
        }
        let refusal = if order.status == OrderStatus::PendingPayment {
            match self
                .settle_payment(order_id, payment_id, amount.clone())
                .await
            {
                Ok(order) => return Ok(order),
                // Not applied and may still apply on a retry: nothing to flag.
                Err(e @ (ShopError::Unavailable(_) | ShopError::NotFound(_))) => return Err(e),
                Err(e) => e,
            }
        } else {
            ShopError::InvalidState {
                status: order.status.as_str().into(),
            }
        };
        // The provider took the money but the order cannot take the payment (cancelled,
        // expired, paid by another payment, another amount): record it, never as a sale,
        // so it is refunded to the payer.
        let flag = OrderCommand::FlagPayment {
            payment_id: payment_id.to_owned(),
            amount,
        };
        self.order_cmd(order_id, flag).await?;
        tracing::warn!(
            order = order_id,
            payment = payment_id,
            error = %refusal,
            "provider payment not applied; recorded and flagged for refund"
        );
        Err(refusal)
    }

    async fn settle_payment(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: Money,
    ) -> Result<Order> {
        let current = self.get_order(order_id).await?;
        if current.payment_ids.contains(payment_id) {
            return Ok(current);
        }
        self.begin_and_finish_payment(order_id, payment_id, amount, None)
            .await
    }

    /// Marks the order "payment in progress", moves every line to sold, then marks it
    /// paid. The first steps are answered early and run while their records are flushed
    /// (ADR 0015); the payment is answered once every record is durable.
    async fn begin_and_finish_payment(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: Money,
        answer: Option<AnswerInFrame>,
    ) -> Result<Order> {
        let begin = OrderCommand::BeginPayment {
            payment_id: payment_id.to_owned(),
            amount,
        };
        let Some(p) = self.inner.partitioner.of_id(Kind::Order, order_id) else {
            return Err(ShopError::NotFound(format!("order {order_id}")));
        };
        let (begun, durable) = self.ask_early::<OrderState>(p, order_id, begin).await;
        let mut durables: Vec<_> = durable.into_iter().collect();
        let paid = match begun {
            Ok(Some(order)) => {
                self.commit_and_mark_paid(order, payment_id, &mut durables, answer)
                    .await
            }
            Ok(None) => Err(ShopError::NotFound(format!("order {order_id}"))),
            Err(r) => Err(order_err(r, order_id)),
        };
        // Nothing is answered before every early record is durable.
        all_durable(durables).await?;
        paid
    }

    /// Moves every line to sold, then marks the order paid. Safe to repeat.
    pub(super) async fn finish_payment(&self, order: Order, payment_id: &str) -> Result<Order> {
        let mut durables = Vec::new();
        let paid = self
            .commit_and_mark_paid(order, payment_id, &mut durables, None)
            .await;
        all_durable(durables).await?;
        paid
    }

    /// [`Shop::finish_payment`], leaving the durability of its early answers in
    /// `durables` for the caller to wait for.
    async fn commit_and_mark_paid(
        &self,
        order: Order,
        payment_id: &str,
        durables: &mut Vec<Durable>,
        answer: Option<AnswerInFrame>,
    ) -> Result<Order> {
        let order_id = order.order_id.clone();
        if let Some(campaign_id) = order.campaign_id.clone() {
            return self
                .finish_campaign_payment(order, &campaign_id, payment_id)
                .await;
        }
        // Commit every line before acting on a refusal, so the outcome is all or nothing.
        let mut committed = Vec::with_capacity(order.lines.len());
        let mut gone = None;
        for line in &order.lines {
            let cmd = SkuCommand::Commit {
                order_id: order_id.clone(),
            };
            let p = self.inner.partitioner.catalog(Kind::Sku, &line.sku_id);
            let (answer, durable) = self.ask_early::<SkuState>(p, &line.sku_id, cmd).await;
            durables.extend(durable);
            match answer {
                Ok(_) => committed.push(line.sku_id.clone()),
                Err(r) => match sku_err(r, &line.sku_id) {
                    // Left in progress: the order's timer finishes the payment later
                    // (every step is idempotent).
                    err @ ShopError::Unavailable(_) => return Err(err),
                    err => {
                        tracing::error!(order = %order_id, sku = %line.sku_id, error = %err, "stock could not be committed; aborting the payment");
                        gone = Some(line.sku_id.clone());
                    }
                },
            }
        }
        if let Some(sku_id) = gone {
            // Undo the lines that did commit: their units go back to available, so
            // nothing stays sold for an order that is not paid.
            for sku in &committed {
                let cmd = SkuCommand::Restock {
                    order_id: order_id.clone(),
                };
                self.sku(sku, cmd).await.map_err(|r| sku_err(r, sku))?;
            }
            self.abort_payment(&order_id, payment_id).await?;
            return Err(ShopError::InvalidStateMsg(format!(
                "the reservation of {sku_id} is gone; the order cannot be paid"
            )));
        }
        self.mark_paid_answering(&order_id, payment_id, answer)
            .await
    }

    /// The last step of a payment whose stock is committed: the order becomes `paid`.
    pub(crate) async fn mark_paid(&self, order_id: &str, payment_id: &str) -> Result<Order> {
        self.mark_paid_answering(order_id, payment_id, None).await
    }

    /// [`Shop::mark_paid`], recording `answer` in the same frame when the order is
    /// served here.
    async fn mark_paid_answering(
        &self,
        order_id: &str,
        payment_id: &str,
        answer: Option<AnswerInFrame>,
    ) -> Result<Order> {
        let paid = OrderCommand::MarkPaid {
            payment_id: payment_id.to_owned(),
            auto_confirm_after: millis(self.inner.cfg.auto_confirm_after),
        };
        let answered = match (answer, self.inner.partitioner.of_id(Kind::Order, order_id)) {
            (Some(answer), Some(p)) => {
                let target = self.inner.partitions[usize::from(p)].clone();
                let clock = self.clock().clone();
                let also: MakeCompanion<OrderState> = Box::new(move |view: &Option<Order>| {
                    // Only a payment that this command completed is the request's answer.
                    let order = view.as_ref().filter(|o| o.status == OrderStatus::Paid)?;
                    let (part, key) = answer.part(p, order, clock.now_ms())?;
                    Some(Companion {
                        parts: vec![part],
                        aux: Vec::new(),
                        on_durable: Box::new(move || {
                            let _ = target.cast(PartitionMsg::Delivered(key, None));
                        }),
                        // The key lives in the order's own partition (the buyer's).
                        hold: Box::new(()),
                    })
                });
                self.ask_here_with::<OrderState>(p, order_id, paid.clone(), also)
                    .await
            }
            _ => None,
        };
        let answer = match answered {
            Some(answer) => answer,
            None => self.order(order_id, paid).await,
        };
        answer
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))
    }

    /// A payment whose stock could not be committed: the order leaves "payment in
    /// progress" and can be cancelled or expire again.
    pub(crate) async fn abort_payment(&self, order_id: &str, payment_id: &str) -> Result<()> {
        let abort = OrderCommand::AbortPayment {
            payment_id: payment_id.to_owned(),
        };
        self.order(order_id, abort)
            .await
            .map_err(|r| order_err(r, order_id))?;
        Ok(())
    }
}
