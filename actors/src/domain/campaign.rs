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

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::common::{Address, Millis, Money};
use super::{Entity, Kind};

/// How long the idempotency key of a settled (released or expired) keyed buy is kept,
/// so a late retry still gets the first answer (API.md: keys are kept 24 hours).
pub const KEY_RETENTION_MS: Millis = 24 * 3600 * 1000;

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
    /// Idempotency keys of keyed buys -> their order id (the claim holds the body hash).
    pub keys: HashMap<u128, String>,
    /// Settled claims kept only for their idempotency key, oldest first: (settled at,
    /// order id). Dropped [`KEY_RETENTION_MS`] later; a settled claim without a key is
    /// dropped at once, so a buyer looping buy and cancel does not grow the campaign.
    pub settled: VecDeque<(Millis, String)>,
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
    /// When the buy was decided: the order's creation time.
    pub at: Millis,
    /// The address the buy named (boxed: most flash-sale buys name none).
    pub address: Option<Box<Address>>,
    /// The buy's idempotency key and request body hash, if it had a key.
    pub idem: Option<IdemTag>,
}

/// An `Idempotency-Key` as the campaign keeps it: a 128-bit hash of (subject, route,
/// key) and a 64-bit hash of the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdemTag {
    pub key: u128,
    pub body: u64,
}

/// The order a buy opened, as the campaign decided it: everything the buyer's order is
/// placed from, and everything its first answer shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoughtOrder {
    pub order_id: String,
    pub buyer: String,
    pub quantity: u64,
    pub at: Millis,
    pub payment_deadline: Millis,
    pub shipping_address: Option<Address>,
    /// True when this answers a repeat of a keyed buy (nothing new was decided).
    pub replayed: bool,
    /// The claim still holds its units (neither paid nor given back).
    pub held: bool,
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
    /// A buy decided in one step: claims `quantity` units for `order_id` and records
    /// what the order opens with and the request's idempotency key, in one event.
    /// Idempotent per order id and per key (a repeat with the key gets the first
    /// answer; with another body, `IdempotencyConflict`). Refusals write nothing.
    Buy(CampaignBuy),
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
    /// A `Buy` sent by a node that does not serve the campaign. The campaign decides it
    /// as a `Buy`; the node serving it also places the bought order in the claim's own
    /// record when it serves the order's partition too, and says whether it did, so the
    /// sender needs no second call (`Shop::buy_keyed`).
    BuyAndPlace(CampaignBuy),
}

/// What a buy asks of a campaign. (A struct variant's fields and a newtype variant
/// holding this struct encode to the same bytes.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignBuy {
    pub order_id: String,
    pub buyer: String,
    pub quantity: u64,
    pub grace_ms: Millis,
    pub shipping_address: Option<Address>,
    pub idem: Option<IdemTag>,
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
    /// A buy: the claim, the order's opening (its creation time is `at`, its payment
    /// deadline `at` + the terms' payment timeout) and the idempotency key, together.
    Bought {
        order_id: String,
        buyer: String,
        quantity: u64,
        expires_at: Millis,
        at: Millis,
        shipping_address: Option<Address>,
        idem: Option<IdemTag>,
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
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyConflict,
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
    /// The order a `Buy` opened (or, for a repeated key, opened the first time).
    pub order: Option<BoughtOrder>,
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
            order: None,
        }
    }

    /// The order opened by the claim of `order_id`, if the claim is still kept.
    pub fn bought(&self, order_id: &str, replayed: bool) -> Option<BoughtOrder> {
        let claim = self.claims.get(order_id)?;
        Some(BoughtOrder {
            order_id: order_id.to_owned(),
            buyer: claim.buyer.clone(),
            quantity: claim.quantity,
            at: claim.at,
            payment_deadline: claim.at + self.terms.payment_timeout_ms,
            shipping_address: claim.address.as_deref().cloned(),
            replayed,
            held: claim.state == ClaimState::Held,
        })
    }

    /// The checks of a buy, in the order clients see their refusals: window, stock, then
    /// the buyer's limit. Returns the claim's expiry.
    // PerformanceCriticalPath: every buy of a flash sale is decided here.
    fn admit(
        &self,
        buyer: &str,
        quantity: u64,
        grace_ms: Millis,
        now: Millis,
    ) -> Result<Millis, CampaignError> {
        if quantity == 0 {
            return Err(bad("quantity must be at least 1"));
        }
        if self.ended(now) {
            return Err(CampaignError::Ended);
        }
        if self.phase == Phase::Draft || now < self.terms.starts_at {
            return Err(CampaignError::NotStarted);
        }
        let remaining = self.terms.quantity - self.sold - self.reserved;
        if remaining < quantity {
            return Err(CampaignError::SoldOut);
        }
        let held = self.buyers.get(buyer).copied().unwrap_or(0);
        if held + quantity > self.terms.per_buyer_limit {
            return Err(CampaignError::LimitExceeded {
                limit: self.terms.per_buyer_limit,
                held,
            });
        }
        Ok(now + self.terms.payment_timeout_ms + grace_ms)
    }

    /// Forgets settled claims whose key has been kept long enough.
    fn prune_settled(&mut self, now: Millis) {
        while let Some((at, _)) = self.settled.front() {
            if at.saturating_add(KEY_RETENTION_MS) > now {
                break;
            }
            if let Some((_, order_id)) = self.settled.pop_front() {
                if let Some(claim) = self.claims.remove(&order_id) {
                    if let Some(tag) = claim.idem {
                        self.keys.remove(&tag.key);
                    }
                }
            }
        }
    }

    fn claim(&mut self, order_id: &str, claim: Claim) {
        self.updated_at = claim.at;
        self.reserved += claim.quantity;
        *self.buyers.entry(claim.buyer.clone()).or_default() += claim.quantity;
        *self.expiries.entry(claim.expires_at).or_default() += 1;
        if let Some(tag) = claim.idem {
            self.keys.insert(tag.key, order_id.to_owned());
        }
        let now = claim.at;
        self.claims.insert(order_id.to_owned(), claim);
        self.prune_settled(now);
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
        for (key, order_id) in &self.keys {
            if self
                .claims
                .get(order_id)
                .and_then(|c| c.idem)
                .map(|t| t.key)
                != Some(*key)
            {
                return Err(format!("key of order {order_id} has no claim"));
            }
        }
        if self
            .claims
            .values()
            .any(|c| c.state == ClaimState::Released && c.idem.is_none())
        {
            return Err("a settled claim without a key is kept".into());
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
        let (q, at, buyer, keyed) = (
            claim.quantity,
            claim.expires_at,
            claim.buyer.clone(),
            claim.idem.is_some(),
        );
        if to == ClaimState::Released {
            if keyed {
                self.settled
                    .push_back((self.updated_at, order_id.to_owned()));
            } else {
                self.claims.remove(order_id);
            }
        }
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
        self.prune_settled(self.updated_at);
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
            CampaignCommand::Buy(buy) | CampaignCommand::BuyAndPlace(buy) => {
                let CampaignBuy {
                    order_id,
                    buyer,
                    quantity,
                    grace_ms,
                    shipping_address,
                    idem,
                } = buy;
                let c = self.existing()?;
                if c.claims.contains_key(order_id) {
                    return Ok(vec![]);
                }
                if let Some(tag) = idem {
                    if let Some(first) = c.keys.get(&tag.key) {
                        let same = c
                            .claims
                            .get(first)
                            .and_then(|cl| cl.idem)
                            .is_some_and(|t| t.body == tag.body);
                        return if same {
                            Ok(vec![])
                        } else {
                            Err(CampaignError::IdempotencyConflict)
                        };
                    }
                }
                let expires_at = c.admit(buyer, *quantity, *grace_ms, now)?;
                Ok(vec![CampaignEvent::Bought {
                    order_id: order_id.clone(),
                    buyer: buyer.clone(),
                    quantity: *quantity,
                    expires_at,
                    at: now,
                    shipping_address: shipping_address.clone(),
                    idem: *idem,
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
                keys: HashMap::new(),
                settled: VecDeque::new(),
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
            } => c.claim(
                order_id,
                Claim {
                    buyer: buyer.clone(),
                    quantity: *quantity,
                    expires_at: *expires_at,
                    state: ClaimState::Held,
                    at: *at,
                    address: None,
                    idem: None,
                },
            ),
            CampaignEvent::Bought {
                order_id,
                buyer,
                quantity,
                expires_at,
                at,
                shipping_address,
                idem,
            } => c.claim(
                order_id,
                Claim {
                    buyer: buyer.clone(),
                    quantity: *quantity,
                    expires_at: *expires_at,
                    state: ClaimState::Held,
                    at: *at,
                    address: shipping_address.clone().map(Box::new),
                    idem: *idem,
                },
            ),
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

    fn published(&self) -> Option<Option<CampaignView>> {
        self.campaign.is_some().then(|| self.view())
    }

    /// A buy's answer carries the order it opened: the new one, or for a repeated key
    /// the first one.
    fn answer(&self, cmd: &CampaignCommand) -> Option<CampaignView> {
        let c = self.campaign.as_ref()?;
        let mut view = c.view();
        if let CampaignCommand::Buy(CampaignBuy { order_id, idem, .. })
        | CampaignCommand::BuyAndPlace(CampaignBuy { order_id, idem, .. }) = cmd
        {
            let first = idem
                .and_then(|t| c.keys.get(&t.key))
                .filter(|first| *first != order_id);
            view.order = match first {
                Some(first) => c.bought(first, true),
                None => c.bought(order_id, false),
            };
        }
        Some(view)
    }

    fn legacy_snapshot(body: &[u8]) -> Option<Self> {
        legacy::decode(body)
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

/// Snapshots written before buys carried their order's opening and idempotency key.
mod legacy {
    use super::*;

    // Serialize too: the tests write snapshots of this layout.
    #[derive(Serialize, Deserialize)]
    pub(super) struct StateV1 {
        pub campaign: Option<CampaignV1>,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct CampaignV1 {
        pub terms: CampaignTerms,
        pub phase: Phase,
        pub sold: u64,
        pub reserved: u64,
        pub buyers: HashMap<String, u64>,
        pub claims: HashMap<String, ClaimV1>,
        pub expiries: BTreeMap<Millis, u64>,
        pub version: u64,
        pub updated_at: Millis,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct ClaimV1 {
        pub buyer: String,
        pub quantity: u64,
        pub expires_at: Millis,
        pub state: ClaimState,
    }

    /// Decodes a snapshot body (after the format byte) of the first layout.
    pub(super) fn decode(body: &[u8]) -> Option<CampaignState> {
        let (v1, _): (StateV1, usize) =
            bincode::serde::decode_from_slice(body, crate::codec::decode_config()).ok()?;
        let campaign = v1.campaign.map(|c| Campaign {
            terms: c.terms.clone(),
            phase: c.phase,
            sold: c.sold,
            reserved: c.reserved,
            buyers: c.buyers,
            claims: c
                .claims
                .into_iter()
                // Settled claims are no longer kept without a key.
                .filter(|(_, cl)| cl.state != ClaimState::Released)
                .map(|(id, cl)| {
                    let at = cl.expires_at.saturating_sub(c.terms.payment_timeout_ms);
                    let claim = Claim {
                        buyer: cl.buyer,
                        quantity: cl.quantity,
                        expires_at: cl.expires_at,
                        state: cl.state,
                        at,
                        address: None,
                        idem: None,
                    };
                    (id, claim)
                })
                .collect(),
            expiries: c.expiries,
            version: c.version,
            updated_at: c.updated_at,
            keys: HashMap::new(),
            settled: VecDeque::new(),
        });
        Some(CampaignState { campaign })
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

    /// A buy of `q` units, with an idempotency key (key, body hash) or not.
    fn keyed(order: &str, buyer: &str, q: u64, key: Option<(u128, u64)>) -> CampaignCommand {
        CampaignCommand::Buy(CampaignBuy {
            order_id: order.into(),
            buyer: buyer.into(),
            quantity: q,
            grace_ms: 1000,
            shipping_address: None,
            idem: key.map(|(key, body)| IdemTag { key, body }),
        })
    }

    fn claim(order: &str, buyer: &str, q: u64) -> CampaignCommand {
        keyed(order, buyer, q, None)
    }

    /// Nodes of the previous release send `Buy` with its fields in the variant: the same
    /// bytes as the variant holding a `CampaignBuy`, so they are still understood.
    #[test]
    fn a_buy_encodes_as_the_previous_releases_struct_variant() {
        #[derive(Serialize)]
        #[allow(dead_code)]
        enum Previous {
            Create(CampaignTerms),
            Open,
            Discard,
            Buy {
                order_id: String,
                buyer: String,
                quantity: u64,
                grace_ms: Millis,
                shipping_address: Option<Address>,
                idem: Option<IdemTag>,
            },
        }
        let previous = Previous::Buy {
            order_id: "o-1".into(),
            buyer: "b".into(),
            quantity: 2,
            grace_ms: 1000,
            shipping_address: None,
            idem: Some(IdemTag { key: 7, body: 9 }),
        };
        let now = keyed("o-1", "b", 2, Some((7, 9)));
        let bytes = crate::codec::encode(&previous).unwrap();
        assert_eq!(bytes, crate::codec::encode(&now).unwrap());
        assert_eq!(
            crate::codec::decode::<CampaignCommand>(&bytes).unwrap(),
            now
        );
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

    fn buy(order: &str, buyer: &str, key: Option<(u128, u64)>) -> CampaignCommand {
        keyed(order, buyer, 1, key)
    }

    fn answer_order(s: &CampaignState, cmd: &CampaignCommand) -> BoughtOrder {
        s.answer(cmd)
            .unwrap()
            .order
            .expect("a buy answers with its order")
    }

    #[test]
    fn a_keyed_buy_is_decided_once_and_answered_the_same_way_again() {
        let mut s = open(5, 2);
        let first = buy("o1", "b1", Some((7, 70)));
        run(&mut s, first.clone(), T0).unwrap();
        let opened = answer_order(&s, &first);
        assert_eq!((opened.order_id.as_str(), opened.replayed), ("o1", false));
        assert_eq!(opened.payment_deadline, T0 + 60_000);
        // The repeat mints another order id: nothing is written, the first order answers.
        let again = buy("o2", "b1", Some((7, 70)));
        assert_eq!(s.decide(&again, T0 + 5), Ok(vec![]));
        let replayed = answer_order(&s, &again);
        assert_eq!(replayed.order_id, "o1");
        assert!(replayed.replayed && replayed.held);
        assert_eq!(s.view().unwrap().reserved, 1);
        // The same key with another body is refused.
        assert_eq!(
            s.decide(&buy("o3", "b1", Some((7, 71))), T0 + 6),
            Err(CampaignError::IdempotencyConflict)
        );
        // Refusals write nothing: a sold-out keyed buy leaves no key behind.
        let mut small = open(1, 1);
        run(&mut small, buy("o1", "b1", None), T0).unwrap();
        assert_eq!(
            small.decide(&buy("o2", "b2", Some((9, 90))), T0),
            Err(CampaignError::SoldOut)
        );
        assert!(small.campaign.as_ref().unwrap().keys.is_empty());
    }

    #[test]
    fn settled_claims_are_dropped_and_keys_kept_for_a_day() {
        let mut s = open(1, 1);
        if let Some(c) = s.campaign.as_mut() {
            c.terms.ends_at = T0 + 2 * KEY_RETENTION_MS;
        }
        // A buyer looping buy and cancel without keys leaves nothing behind.
        for i in 0..50 {
            let order = format!("o{i}");
            run(&mut s, buy(&order, "b1", None), T0 + i).unwrap();
            run(&mut s, CampaignCommand::Release { order_id: order }, T0 + i).unwrap();
        }
        let c = s.campaign.as_ref().unwrap();
        assert!(c.claims.is_empty() && c.buyers.is_empty() && c.settled.is_empty());
        // A keyed buy's settled claim stays for its key, then goes after the retention.
        run(&mut s, buy("k1", "b1", Some((1, 1))), T0 + 100).unwrap();
        run(
            &mut s,
            CampaignCommand::Release {
                order_id: "k1".into(),
            },
            T0 + 200,
        )
        .unwrap();
        let replay = answer_order(&s, &buy("k2", "b1", Some((1, 1))));
        assert_eq!((replay.order_id.as_str(), replay.held), ("k1", false));
        run(&mut s, buy("o99", "b2", None), T0 + 200 + KEY_RETENTION_MS).unwrap();
        let c = s.campaign.as_ref().unwrap();
        assert!(c.keys.is_empty() && !c.claims.contains_key("k1"));
    }

    #[test]
    fn snapshots_of_the_first_layout_still_load() {
        use super::legacy::{CampaignV1, ClaimV1, StateV1};
        let held = ClaimV1 {
            buyer: "b1".into(),
            quantity: 1,
            expires_at: T0 + 61_000,
            state: ClaimState::Held,
        };
        let released = ClaimV1 {
            buyer: "b2".into(),
            quantity: 1,
            expires_at: T0 + 61_000,
            state: ClaimState::Released,
        };
        let v1 = StateV1 {
            campaign: Some(CampaignV1 {
                terms: terms(5, 1),
                phase: Phase::Open,
                sold: 0,
                reserved: 1,
                buyers: [("b1".to_string(), 1)].into(),
                claims: [("o1".to_string(), held), ("o2".to_string(), released)].into(),
                expiries: [(T0 + 61_000, 1)].into(),
                version: 4,
                updated_at: T0,
            }),
        };
        let bytes = crate::codec::encode(&v1).unwrap();
        let state: CampaignState = crate::codec::decode_state(&bytes).unwrap();
        let c = state.campaign.as_ref().unwrap();
        c.check().unwrap();
        assert_eq!(c.claims.len(), 1);
        // The claim time is estimated from its expiry (the grace is not known).
        assert_eq!(c.claims["o1"].at, T0 + 1000);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Claim(u8, u8, u8),
        Buy(u8, u8, Option<u8>),
        Commit(u8),
        Release(u8),
        Tick(u32),
        End,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..40, 0u8..8, 1u8..4).prop_map(|(o, b, q)| Op::Claim(o, b, q)),
            4 => (40u8..80, 0u8..8, proptest::option::of(0u8..6)).prop_map(|(o, b, k)| Op::Buy(o, b, k)),
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
                    Op::Buy(o, b, k) => buy(
                        &format!("o{o}"),
                        &format!("b{b}"),
                        k.map(|k| (u128::from(k) << 8 | u128::from(b), 1)),
                    ),
                    Op::Commit(o) => CampaignCommand::Commit { order_id: format!("o{}", o * 2) },
                    Op::Release(o) => CampaignCommand::Release { order_id: format!("o{}", o * 2) },
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
