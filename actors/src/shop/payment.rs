//! Payment: the saga that moves reserved units to sold before an order is paid, and
//! the provider's callbacks.

use crate::domain::order::{Order, OrderCommand, OrderStatus};
use crate::domain::payment::{PaymentCommand, PaymentError, PaymentState};
use crate::domain::sku::SkuCommand;
use crate::domain::{Kind, Money};
use crate::error::{Result, ShopError};
use crate::errors_map::{order_err, sku_err, MOVING};
use crate::host::Refusal;

use super::*;

impl Shop {
    /// Pays an order through the API (`method: fake`): one payment id per order, so a
    /// retry continues the same payment.
    pub async fn pay(&self, order_id: &str, amount: Money) -> Result<Order> {
        // No shortcut for an already applied payment: a fresh pay of a paid order is an
        // illegal transition (409); a retry of the same request is replayed by its
        // Idempotency-Key before it gets here.
        let order = self.get_order(order_id).await?;
        if order.status != OrderStatus::PendingPayment {
            return Err(ShopError::InvalidState {
                status: order.status.as_str().into(),
            });
        }
        self.begin_and_finish_payment(order_id, &format!("api-{order_id}"), amount)
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
        self.begin_and_finish_payment(order_id, payment_id, amount)
            .await
    }

    async fn begin_and_finish_payment(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: Money,
    ) -> Result<Order> {
        let begin = OrderCommand::BeginPayment {
            payment_id: payment_id.to_owned(),
            amount,
        };
        let order = self
            .order(order_id, begin)
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))?;
        self.finish_payment(order, payment_id).await
    }

    /// Moves every line to sold, then marks the order paid. Safe to repeat.
    pub(super) async fn finish_payment(&self, order: Order, payment_id: &str) -> Result<Order> {
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
            match self.sku(&line.sku_id, cmd).await {
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
        self.mark_paid(&order_id, payment_id).await
    }

    /// The last step of a payment whose stock is committed: the order becomes `paid`.
    pub(crate) async fn mark_paid(&self, order_id: &str, payment_id: &str) -> Result<Order> {
        let paid = OrderCommand::MarkPaid {
            payment_id: payment_id.to_owned(),
            auto_confirm_after: millis(self.inner.cfg.auto_confirm_after),
        };
        self.order(order_id, paid)
            .await
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
