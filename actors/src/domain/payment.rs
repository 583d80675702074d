//! Payment claims: one entity per provider payment id, so "applied at most once per
//! payment id" holds across orders (two orders may live in different partitions, and a
//! check-then-apply on either of them would race).
//!
//! A callback claims its payment id for its order before anything is applied. The first
//! claim wins; the same order claiming again is accepted (a retry); another order is
//! refused.

use serde::{Deserialize, Serialize};

use super::common::Millis;
use super::{Entity, Kind};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentState {
    /// The order the payment id belongs to, once claimed.
    pub order_id: Option<String>,
    pub claimed_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Claim { order_id: String },
    Get,
}

/// Variants are only ever appended (bincode encodes the variant by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    Claimed { order_id: String, at: Millis },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PaymentError {
    #[error("this payment id belongs to order {order_id}")]
    ClaimedByAnother { order_id: String },
}

impl Entity for PaymentState {
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = PaymentError;
    /// The order the payment id belongs to.
    type View = Option<String>;

    const KIND: Kind = Kind::Payment;

    fn decide(&self, cmd: &PaymentCommand, now: Millis) -> Result<Vec<PaymentEvent>, PaymentError> {
        match (cmd, &self.order_id) {
            (PaymentCommand::Get, _) => Ok(vec![]),
            (PaymentCommand::Claim { order_id }, None) => Ok(vec![PaymentEvent::Claimed {
                order_id: order_id.clone(),
                at: now,
            }]),
            (PaymentCommand::Claim { order_id }, Some(owner)) if owner == order_id => Ok(vec![]),
            (PaymentCommand::Claim { .. }, Some(owner)) => Err(PaymentError::ClaimedByAnother {
                order_id: owner.clone(),
            }),
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::Claimed { order_id, at } => {
                self.order_id = Some(order_id.clone());
                self.claimed_at = *at;
            }
        }
    }

    fn view(&self) -> Option<String> {
        self.order_id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(s: &mut PaymentState, order: &str) -> Result<usize, PaymentError> {
        let events = s.decide(
            &PaymentCommand::Claim {
                order_id: order.into(),
            },
            5,
        )?;
        for e in &events {
            s.apply(e);
        }
        Ok(events.len())
    }

    #[test]
    fn first_claim_wins_and_retries_are_accepted() {
        let mut s = PaymentState::default();
        assert_eq!(claim(&mut s, "o1"), Ok(1));
        assert_eq!(claim(&mut s, "o1"), Ok(0));
        assert_eq!(
            claim(&mut s, "o2"),
            Err(PaymentError::ClaimedByAnother {
                order_id: "o1".into()
            })
        );
        assert_eq!(s.view(), Some("o1".into()));
    }
}
