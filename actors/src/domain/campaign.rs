//! A flash-sale campaign: a quantity of one SKU carved out of its stock, sold at a
//! campaign price inside a window, with a per-buyer limit and a payment deadline.
//!
//! The decrement of a buy is arithmetic on this one entity: no lock, no other entity
//! consulted. Refusals (`sold_out`, `not_started`, `ended`, `limit_exceeded`) produce no
//! event, so they never touch the log.
//!
//! Units: `quantity = remaining + reserved + sold` while the campaign runs, where
//! `reserved` are units claimed by orders awaiting payment and `sold` are paid. A claim
//! that is released (order cancelled or expired) gives its units back to the campaign
//! while it runs; once it has ended, to the SKU. The SKU is kept in step with absolute,
//! versioned figures ([`CampaignView::sku_hold`]), so a late or repeated sync is harmless.
//!
//! Invariants, checked by [`Campaign::check`] in tests:
//! - `reserved + sold <= quantity`;
//! - `reserved` equals the sum of held claims, `sold` the sum of sold claims;
//! - each buyer's count equals the sum of their held and sold claims, and is at most the
//!   per-buyer limit.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::common::{Millis, Money};
use super::{Entity, Kind};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignState {
    pub campaign: Option<Campaign>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub terms: CampaignTerms,
    pub phase: Phase,
    pub sold: u64,
    pub reserved: u64,
    /// Units held or sold, per buyer.
    pub buyers: HashMap<String, u64>,
    /// Every claim, by order id: one claim per order, decided once.
    pub claims: HashMap<String, Claim>,
    /// Expiry instants of held claims, with how many expire at each.
    pub expiries: BTreeMap<Millis, u64>,
    /// Bumped by every event; orders the figures sent to the SKU.
    pub version: u64,
    pub updated_at: Millis,
}

/// What the admin set when creating the campaign; never changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignTerms {
    pub campaign_id: String,
    pub sku_id: String,
    pub product_id: String,
    pub sku_name: String,
    pub price: Money,
    pub quantity: u64,
    pub starts_at: Millis,
    pub ends_at: Millis,
    pub per_buyer_limit: u64,
    pub payment_timeout_ms: Millis,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created; its units are being carved out of the SKU.
    Draft,
    /// Its units are carved: it sells inside its window.
    Open,
    /// Ended (by time or by an admin); no more buys.
    Ended { at: Millis },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub buyer: String,
    pub quantity: u64,
    pub expires_at: Millis,
    pub state: ClaimState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimState {
    Held,
    Sold,
    Released,
}

/// The status clients see, derived from the phase, the clock and the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignStatus {
    Scheduled,
    Live,
    SoldOut,
    Ended,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Scheduled => "scheduled",
            CampaignStatus::Live => "live",
            CampaignStatus::SoldOut => "sold_out",
            CampaignStatus::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "scheduled" => CampaignStatus::Scheduled,
            "live" => CampaignStatus::Live,
            "sold_out" => CampaignStatus::SoldOut,
            "ended" => CampaignStatus::Ended,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CampaignCommand {
    Create(CampaignTerms),
    /// The SKU carved the units: start selling. Idempotent.
    Open,
    /// Saga rollback of `Create` when the SKU refused the units. Only in `Draft`.
    Discard,
    /// A buy: claims `quantity` units for `order_id`, held until the order's payment
    /// deadline plus `grace_ms`. Idempotent per order id.
    Claim {
        order_id: String,
        buyer: String,
        quantity: u64,
        grace_ms: Millis,
    },
    /// The order was paid: its held units become sold. Idempotent.
    Commit {
        order_id: String,
    },
    /// The order was cancelled or expired: its held units return. Idempotent.
    Release {
        order_id: String,
    },
    /// The admin's kill switch. Idempotent.
    End,
    /// The timer: ends the campaign at `ends_at`, expires claims past their expiry.
    Tick,
    Get,
}

/// Variants are only ever appended (bincode encodes the variant by position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CampaignEvent {
    Created(CampaignTerms),
    Opened {
        at: Millis,
    },
    Discarded {
        at: Millis,
    },
    Claimed {
        order_id: String,
        buyer: String,
        quantity: u64,
        expires_at: Millis,
        at: Millis,
    },
    Committed {
        order_id: String,
        at: Millis,
    },
    Released {
        order_id: String,
        at: Millis,
    },
    /// A held claim passed its expiry without payment or release.
    Expired {
        order_id: String,
        at: Millis,
    },
    Ended {
        at: Millis,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CampaignError {
    #[error("campaign not found")]
    NotFound,
    #[error("a campaign with this id already exists")]
    AlreadyExists,
    #[error("the campaign has not started")]
    NotStarted,
    #[error("the campaign has ended")]
    Ended,
    #[error("sold out")]
    SoldOut,
    #[error("the per-buyer limit is {limit}; this buyer holds {held}")]
    LimitExceeded { limit: u64, held: u64 },
    /// The order's claim expired or was released: it cannot be paid.
    #[error("the order's claim on the campaign is gone")]
    ClaimGone,
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    BadRequest(String),
}

/// What callers get back: the terms and the live figures, without the bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignView {
    pub terms: CampaignTerms,
    pub phase: Phase,
    pub sold: u64,
    pub reserved: u64,
    pub version: u64,
    pub updated_at: Millis,
}

impl CampaignView {
    pub fn ended(&self, now: Millis) -> bool {
        matches!(self.phase, Phase::Ended { .. }) || now >= self.terms.ends_at
    }

    /// Units still for sale (0 once ended).
    pub fn remaining(&self, now: Millis) -> u64 {
        if self.ended(now) {
            0
        } else {
            self.terms
                .quantity
                .saturating_sub(self.sold)
                .saturating_sub(self.reserved)
        }
    }

    pub fn status(&self, now: Millis) -> CampaignStatus {
        if self.ended(now) {
            CampaignStatus::Ended
        } else if self.phase == Phase::Draft || now < self.terms.starts_at {
            CampaignStatus::Scheduled
        } else if self.remaining(now) == 0 {
            CampaignStatus::SoldOut
        } else {
            CampaignStatus::Live
        }
    }

    /// The figures the SKU holds for this campaign: (version, units held, units sold).
    /// Held: everything not sold while the campaign runs; once ended, only the units of
    /// orders still awaiting payment.
    pub fn sku_hold(&self) -> (u64, u64, u64) {
        let held = match self.phase {
            Phase::Ended { .. } => self.reserved,
            Phase::Draft | Phase::Open => self.terms.quantity.saturating_sub(self.sold),
        };
        (self.version, held, self.sold)
    }
}

impl Campaign {
    fn view(&self) -> CampaignView {
        CampaignView {
            terms: self.terms.clone(),
            phase: self.phase,
            sold: self.sold,
            reserved: self.reserved,
            version: self.version,
            updated_at: self.updated_at,
        }
    }

    fn ended(&self, now: Millis) -> bool {
        matches!(self.phase, Phase::Ended { .. }) || now >= self.terms.ends_at
    }

    /// The structural invariants (tests and debug builds).
    pub fn check(&self) -> Result<(), String> {
        let mut held = 0u64;
        let mut sold = 0u64;
        let mut per_buyer: HashMap<&str, u64> = HashMap::new();
        for c in self.claims.values() {
            match c.state {
                ClaimState::Held => held += c.quantity,
                ClaimState::Sold => sold += c.quantity,
                ClaimState::Released => continue,
            }
            *per_buyer.entry(&c.buyer).or_default() += c.quantity;
        }
        if held != self.reserved || sold != self.sold {
            return Err(format!(
                "figures reserved {} sold {} but claims hold {held} and sold {sold}",
                self.reserved, self.sold
            ));
        }
        if self.reserved + self.sold > self.terms.quantity {
            return Err("oversold".into());
        }
        for (buyer, n) in &per_buyer {
            if self.buyers.get(*buyer).copied().unwrap_or(0) != *n {
                return Err(format!("buyer {buyer} count is off"));
            }
            if *n > self.terms.per_buyer_limit {
                return Err(format!("buyer {buyer} above the limit"));
            }
        }
        if self.buyers.values().any(|n| *n == 0) || self.buyers.len() != per_buyer.len() {
            return Err("stale buyer entries".into());
        }
        let open = self
            .claims
            .values()
            .filter(|c| c.state == ClaimState::Held)
            .count() as u64;
        if self.expiries.values().sum::<u64>() != open {
            return Err("expiry index is off".into());
        }
        Ok(())
    }

    /// Ends a held claim: its units leave `reserved` and the buyer's count.
    fn unhold(&mut self, order_id: &str, to: ClaimState) {
        let Some(claim) = self.claims.get_mut(order_id) else {
            return;
        };
        if claim.state != ClaimState::Held {
            return;
        }
        claim.state = to;
        let (q, at, buyer) = (claim.quantity, claim.expires_at, claim.buyer.clone());
        if let Some(n) = self.expiries.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.expiries.remove(&at);
            }
        }
        self.reserved = self.reserved.saturating_sub(q);
        if to == ClaimState::Sold {
            self.sold += q;
        } else if let Some(n) = self.buyers.get_mut(&buyer) {
            *n = n.saturating_sub(q);
            if *n == 0 {
                self.buyers.remove(&buyer);
            }
        }
    }
}

impl CampaignState {
    fn existing(&self) -> Result<&Campaign, CampaignError> {
        self.campaign.as_ref().ok_or(CampaignError::NotFound)
    }
}

fn bad(msg: impl Into<String>) -> CampaignError {
    CampaignError::BadRequest(msg.into())
}

impl Entity for CampaignState {
    type Command = CampaignCommand;
    type Event = CampaignEvent;
    type Error = CampaignError;
    type View = Option<CampaignView>;

    const KIND: Kind = Kind::Campaign;

    // PerformanceCriticalPath: every buy of a flash sale is decided here.
    fn decide(
        &self,
        cmd: &CampaignCommand,
        now: Millis,
    ) -> Result<Vec<CampaignEvent>, CampaignError> {
        match cmd {
            CampaignCommand::Create(terms) => {
                if self.campaign.is_some() {
                    return Err(CampaignError::AlreadyExists);
                }
                if terms.quantity == 0 {
                    return Err(bad("quantity must be at least 1"));
                }
                if terms.per_buyer_limit == 0 {
                    return Err(bad("per_buyer_limit must be at least 1"));
                }
                if terms.ends_at <= terms.starts_at {
                    return Err(bad("ends_at must be after starts_at"));
                }
                if terms.ends_at <= now {
                    return Err(bad("ends_at must be in the future"));
                }
                if terms.payment_timeout_ms == 0 {
                    return Err(bad("payment_timeout_secs must be at least 1"));
                }
                Ok(vec![CampaignEvent::Created(terms.clone())])
            }
            CampaignCommand::Open => {
                let c = self.existing()?;
                match c.phase {
                    Phase::Draft => Ok(vec![CampaignEvent::Opened { at: now }]),
                    Phase::Open => Ok(vec![]),
                    Phase::Ended { .. } => Err(CampaignError::Ended),
                }
            }
            CampaignCommand::Discard => match &self.campaign {
                None => Ok(vec![]),
                Some(c) if c.phase == Phase::Draft => {
                    Ok(vec![CampaignEvent::Discarded { at: now }])
                }
                Some(_) => Err(CampaignError::InvalidState(
                    "only a campaign being created can be discarded".into(),
                )),
            },
            CampaignCommand::Claim {
                order_id,
                buyer,
                quantity,
                grace_ms,
            } => {
                let c = self.existing()?;
                if c.claims.contains_key(order_id) {
                    return Ok(vec![]);
                }
                if *quantity == 0 {
                    return Err(bad("quantity must be at least 1"));
                }
                if c.ended(now) {
                    return Err(CampaignError::Ended);
                }
                if c.phase == Phase::Draft || now < c.terms.starts_at {
                    return Err(CampaignError::NotStarted);
                }
                let remaining = c.terms.quantity - c.sold - c.reserved;
                if remaining < *quantity {
                    return Err(CampaignError::SoldOut);
                }
                let held = c.buyers.get(buyer).copied().unwrap_or(0);
                if held + quantity > c.terms.per_buyer_limit {
                    return Err(CampaignError::LimitExceeded {
                        limit: c.terms.per_buyer_limit,
                        held,
                    });
                }
                Ok(vec![CampaignEvent::Claimed {
                    order_id: order_id.clone(),
                    buyer: buyer.clone(),
                    quantity: *quantity,
                    expires_at: now + c.terms.payment_timeout_ms + grace_ms,
                    at: now,
                }])
            }
            CampaignCommand::Commit { order_id } => {
                let c = self.existing()?;
                match c.claims.get(order_id).map(|cl| cl.state) {
                    Some(ClaimState::Held) => Ok(vec![CampaignEvent::Committed {
                        order_id: order_id.clone(),
                        at: now,
                    }]),
                    Some(ClaimState::Sold) => Ok(vec![]),
                    Some(ClaimState::Released) | None => Err(CampaignError::ClaimGone),
                }
            }
            CampaignCommand::Release { order_id } => {
                let c = self.existing()?;
                match c.claims.get(order_id).map(|cl| cl.state) {
                    Some(ClaimState::Held) => Ok(vec![CampaignEvent::Released {
                        order_id: order_id.clone(),
                        at: now,
                    }]),
                    _ => Ok(vec![]),
                }
            }
            CampaignCommand::End => {
                let c = self.existing()?;
                match c.phase {
                    Phase::Ended { .. } => Ok(vec![]),
                    _ => Ok(vec![CampaignEvent::Ended { at: now }]),
                }
            }
            CampaignCommand::Tick => {
                let Some(c) = &self.campaign else {
                    return Ok(vec![]);
                };
                let mut events = Vec::new();
                if c.expiries
                    .first_key_value()
                    .is_some_and(|(at, _)| *at <= now)
                {
                    let mut due: Vec<&String> = c
                        .claims
                        .iter()
                        .filter(|(_, cl)| cl.state == ClaimState::Held && cl.expires_at <= now)
                        .map(|(id, _)| id)
                        .collect();
                    due.sort();
                    events.extend(due.into_iter().map(|id| CampaignEvent::Expired {
                        order_id: id.clone(),
                        at: now,
                    }));
                }
                if !matches!(c.phase, Phase::Ended { .. }) && now >= c.terms.ends_at {
                    events.push(CampaignEvent::Ended { at: now });
                }
                Ok(events)
            }
            CampaignCommand::Get => Ok(vec![]),
        }
    }

    fn apply(&mut self, event: &CampaignEvent) {
        if let CampaignEvent::Created(terms) = event {
            self.campaign = Some(Campaign {
                terms: terms.clone(),
                phase: Phase::Draft,
                sold: 0,
                reserved: 0,
                buyers: HashMap::new(),
                claims: HashMap::new(),
                expiries: BTreeMap::new(),
                version: 1,
                updated_at: terms.created_at,
            });
            return;
        }
        if let CampaignEvent::Discarded { .. } = event {
            self.campaign = None;
            return;
        }
        let Some(c) = self.campaign.as_mut() else {
            return;
        };
        c.version += 1;
        match event {
            CampaignEvent::Created(_) | CampaignEvent::Discarded { .. } => {}
            CampaignEvent::Opened { at } => {
                c.updated_at = *at;
                if c.phase == Phase::Draft {
                    c.phase = Phase::Open;
                }
            }
            CampaignEvent::Claimed {
                order_id,
                buyer,
                quantity,
                expires_at,
                at,
            } => {
                c.updated_at = *at;
                c.reserved += quantity;
                *c.buyers.entry(buyer.clone()).or_default() += quantity;
                *c.expiries.entry(*expires_at).or_default() += 1;
                c.claims.insert(
                    order_id.clone(),
                    Claim {
                        buyer: buyer.clone(),
                        quantity: *quantity,
                        expires_at: *expires_at,
                        state: ClaimState::Held,
                    },
                );
            }
            CampaignEvent::Committed { order_id, at } => {
                c.updated_at = *at;
                c.unhold(order_id, ClaimState::Sold);
            }
            CampaignEvent::Released { order_id, at } | CampaignEvent::Expired { order_id, at } => {
                c.updated_at = *at;
                c.unhold(order_id, ClaimState::Released);
            }
            CampaignEvent::Ended { at } => {
                c.updated_at = *at;
                if !matches!(c.phase, Phase::Ended { .. }) {
                    c.phase = Phase::Ended { at: *at };
                }
            }
        }
    }

    fn view(&self) -> Option<CampaignView> {
        self.campaign.as_ref().map(Campaign::view)
    }

    fn next_deadline(&self) -> Option<Millis> {
        let c = self.campaign.as_ref()?;
        let expiry = c.expiries.keys().next().copied();
        let end = match c.phase {
            Phase::Ended { .. } => None,
            Phase::Draft | Phase::Open => Some(c.terms.ends_at),
        };
        match (expiry, end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn index_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        match &self.campaign {
            Some(c) => vec![(
                format!("I/c/{}", c.terms.campaign_id).into_bytes(),
                Vec::new(),
            )],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: Millis = 1_800_000_000_000;

    fn terms(quantity: u64, limit: u64) -> CampaignTerms {
        CampaignTerms {
            campaign_id: "c1".into(),
            sku_id: "s1".into(),
            product_id: "p1".into(),
            sku_name: "Phone".into(),
            price: Money {
                amount: 100,
                currency: "USD".into(),
            },
            quantity,
            starts_at: T0,
            ends_at: T0 + 3_600_000,
            per_buyer_limit: limit,
            payment_timeout_ms: 60_000,
            created_at: T0 - 1000,
        }
    }

    fn run(s: &mut CampaignState, cmd: CampaignCommand, now: Millis) -> Result<(), CampaignError> {
        let events = s.decide(&cmd, now)?;
        for e in &events {
            s.apply(e);
        }
        if let Some(c) = &s.campaign {
            c.check().expect("invariants hold");
        }
        Ok(())
    }

    fn open(quantity: u64, limit: u64) -> CampaignState {
        let mut s = CampaignState::default();
        run(
            &mut s,
            CampaignCommand::Create(terms(quantity, limit)),
            T0 - 1000,
        )
        .unwrap();
        run(&mut s, CampaignCommand::Open, T0 - 900).unwrap();
        s
    }

    fn claim(order: &str, buyer: &str, q: u64) -> CampaignCommand {
        CampaignCommand::Claim {
            order_id: order.into(),
            buyer: buyer.into(),
            quantity: q,
            grace_ms: 1000,
        }
    }

    #[test]
    fn refusals_write_nothing() {
        let mut s = open(2, 1);
        assert_eq!(
            s.decide(&claim("o0", "b0", 1), T0 - 1),
            Err(CampaignError::NotStarted)
        );
        run(&mut s, claim("o1", "b1", 1), T0).unwrap();
        assert!(matches!(
            s.decide(&claim("o2", "b1", 1), T0),
            Err(CampaignError::LimitExceeded { limit: 1, held: 1 })
        ));
        run(&mut s, claim("o3", "b2", 1), T0).unwrap();
        assert_eq!(
            s.decide(&claim("o4", "b3", 1), T0),
            Err(CampaignError::SoldOut)
        );
        assert_eq!(
            s.decide(&claim("o5", "b4", 1), T0 + 3_600_000),
            Err(CampaignError::Ended)
        );
        // A repeated claim of the same order is accepted and changes nothing.
        assert_eq!(s.decide(&claim("o1", "b1", 1), T0), Ok(vec![]));
    }

    #[test]
    fn a_released_claim_returns_units_and_the_buyers_count() {
        let mut s = open(1, 1);
        run(&mut s, claim("o1", "b1", 1), T0).unwrap();
        let v = s.view().unwrap();
        assert_eq!(v.status(T0), CampaignStatus::SoldOut);
        run(
            &mut s,
            CampaignCommand::Release {
                order_id: "o1".into(),
            },
            T0 + 1,
        )
        .unwrap();
        let v = s.view().unwrap();
        assert_eq!((v.reserved, v.remaining(T0 + 1)), (0, 1));
        assert_eq!(v.status(T0 + 1), CampaignStatus::Live);
        // The same buyer may buy again; the released claim cannot be paid.
        run(&mut s, claim("o2", "b1", 1), T0 + 2).unwrap();
        assert_eq!(
            s.decide(
                &CampaignCommand::Commit {
                    order_id: "o1".into()
                },
                T0 + 3
            ),
            Err(CampaignError::ClaimGone)
        );
    }

    #[test]
    fn claims_expire_and_the_campaign_ends_on_its_timer() {
        let mut s = open(5, 5);
        run(&mut s, claim("o1", "b1", 2), T0).unwrap();
        run(
            &mut s,
            CampaignCommand::Commit {
                order_id: "o1".into(),
            },
            T0 + 10,
        )
        .unwrap();
        run(&mut s, claim("o2", "b2", 1), T0 + 20).unwrap();
        let due = s.next_deadline().unwrap();
        assert_eq!(due, T0 + 20 + 60_000 + 1000);
        run(&mut s, CampaignCommand::Tick, due).unwrap();
        let v = s.view().unwrap();
        assert_eq!((v.sold, v.reserved, v.remaining(due)), (2, 0, 3));
        assert_eq!(s.next_deadline(), Some(T0 + 3_600_000));
        run(&mut s, CampaignCommand::Tick, T0 + 3_600_000).unwrap();
        let v = s.view().unwrap();
        assert_eq!(v.status(T0 + 3_600_000), CampaignStatus::Ended);
        assert_eq!(v.sku_hold().1, 0);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn sku_hold_after_the_end_is_only_what_awaits_payment() {
        let mut s = open(10, 10);
        run(&mut s, claim("o1", "b1", 3), T0).unwrap();
        run(
            &mut s,
            CampaignCommand::Commit {
                order_id: "o1".into(),
            },
            T0,
        )
        .unwrap();
        run(&mut s, claim("o2", "b2", 2), T0).unwrap();
        let (_, held, sold) = s.view().unwrap().sku_hold();
        assert_eq!((held, sold), (7, 3));
        run(&mut s, CampaignCommand::End, T0 + 5).unwrap();
        let (v1, held, sold) = s.view().unwrap().sku_hold();
        assert_eq!((held, sold), (2, 3));
        run(
            &mut s,
            CampaignCommand::Release {
                order_id: "o2".into(),
            },
            T0 + 6,
        )
        .unwrap();
        let (v2, held, _) = s.view().unwrap().sku_hold();
        assert!(v2 > v1);
        assert_eq!(held, 0);
        // Ended is refused for buys but not for the payment of a held claim.
        assert_eq!(
            s.decide(&claim("o3", "b3", 1), T0 + 7),
            Err(CampaignError::Ended)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(u8, u8, u8),
        Commit(u8),
        Release(u8),
        Tick(u32),
        End,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40, 0u8..8, 1u8..4).prop_map(|(o, b, q)| Op::Claim(o, b, q)),
            2 => (0u8..40).prop_map(Op::Commit),
            2 => (0u8..40).prop_map(Op::Release),
            1 => (0u32..200_000).prop_map(Op::Tick),
            1 => Just(Op::End),
        ]
    }

    proptest! {
        /// Whatever the interleaving: never oversold, no buyer above the limit, figures
        /// equal to the claims, and replaying the events rebuilds the same state.
        #[test]
        fn never_oversold_and_replay_matches(ops in proptest::collection::vec(op(), 1..120),
                                             quantity in 1u64..20, limit in 1u64..4) {
            let mut s = open(quantity, limit);
            let mut log = Vec::new();
            let mut now = T0;
            for op in ops {
                now += 500;
                let cmd = match op {
                    Op::Claim(o, b, q) => claim(&format!("o{o}"), &format!("b{b}"), u64::from(q)),
                    Op::Commit(o) => CampaignCommand::Commit { order_id: format!("o{o}") },
                    Op::Release(o) => CampaignCommand::Release { order_id: format!("o{o}") },
                    Op::Tick(dt) => { now += u64::from(dt); CampaignCommand::Tick }
                    Op::End => CampaignCommand::End,
                };
                if let Ok(events) = s.decide(&cmd, now) {
                    for e in &events { s.apply(e); }
                    log.extend(events);
                }
                let c = s.campaign.as_ref().unwrap();
                prop_assert!(c.check().is_ok(), "{:?}", c.check());
                let (_, held, sold) = c.view().sku_hold();
                prop_assert!(held + sold <= quantity);
            }
            let mut replayed = open(quantity, limit);
            for e in &log { replayed.apply(e); }
            prop_assert_eq!(replayed, s);
        }
    }
}
