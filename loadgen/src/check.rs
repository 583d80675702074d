//! The invariants a run is checked against, on plain observed figures (no I/O), so the
//! checker itself is tested with broken outcomes.
//!
//! 1. A campaign is never oversold: `sold + reserved <= quantity`. When the run created
//!    it (nobody else buys from it), `sold + reserved` equals the units the run's
//!    acknowledged orders still hold, within what the run cannot know (orders not read
//!    back, buys whose answer never came).
//! 2. No buyer holds more than the per-buyer limit, counting acknowledged orders.
//! 3. Every acknowledged order reads back, belongs to its buyer and campaign, and has a
//!    status the run's own actions allow.
//! 4. A SKU's `available + reserved + sold` is what it was created with, none negative.

use std::collections::{BTreeMap, HashMap};

/// What the run was told: a 201 for this order.
#[derive(Debug, Clone)]
pub struct Acked {
    pub order_id: String,
    pub buyer: String,
    pub quantity: u64,
    pub expected: Expected,
}

/// The statuses the run's own actions allow for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Placed, not paid: `pending_payment`, or `cancelled` once its deadline passed.
    Unpaid,
    /// Paid (and answered 200).
    Paid,
    /// Cancelled by the run (and answered 200).
    Cancelled,
    /// A pay or cancel got no answer (or a 5xx): any status.
    Unknown,
}

impl Expected {
    fn allows(self, status: &str) -> bool {
        match self {
            Expected::Unpaid => matches!(status, "pending_payment" | "cancelled"),
            Expected::Paid => matches!(
                status,
                "paid" | "shipped" | "completed" | "refund_requested" | "refunded"
            ),
            Expected::Cancelled => status == "cancelled",
            Expected::Unknown => true,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Expected::Unpaid => "pending_payment or cancelled (unpaid)",
            Expected::Paid => "paid or later",
            Expected::Cancelled => "cancelled",
            Expected::Unknown => "anything",
        }
    }
}

/// An acknowledged order as read back after the run.
#[derive(Debug, Clone)]
pub enum SeenOrder {
    Found {
        status: String,
        buyer: String,
        campaign_id: Option<String>,
    },
    /// 404: the node does not know the order.
    Missing,
    /// Any other answer (the outcome of the last attempt).
    Unreadable(String),
}

impl SeenOrder {
    /// Only a `cancelled` order gives its units back (a refunded one still counts as
    /// sold for the campaign and the buyer).
    fn released(&self) -> bool {
        matches!(self, SeenOrder::Found { status, .. } if status == "cancelled")
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub sold: u64,
    pub reserved: u64,
}

impl Figures {
    pub fn held(self) -> u64 {
        self.sold.saturating_add(self.reserved)
    }
}

#[derive(Debug, Clone)]
pub struct SeenCampaign {
    pub campaign_id: String,
    pub quantity: u64,
    pub per_buyer_limit: u64,
    /// Read before and after the orders were read back. Once the load has stopped units
    /// only leave a campaign (orders expire), so these two bracket the order reads.
    pub first: Figures,
    pub last: Figures,
    /// The run created the campaign: nobody else bought from it.
    pub exclusive: bool,
    /// Units of buys whose answer never came (or was a 5xx): they may be held.
    pub uncertain_units: u64,
}

#[derive(Debug, Clone)]
pub struct SeenSku {
    pub sku_id: String,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    /// `available + reserved + sold` it must have: its created stock. `None` for a SKU
    /// the run did not create (only the signs are checked).
    pub total: Option<i64>,
}

#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub campaign: Option<SeenCampaign>,
    pub acked: Vec<Acked>,
    /// By order id: the acknowledged orders that were read back (all, or a sample).
    pub orders: HashMap<String, SeenOrder>,
    pub skus: Vec<SeenSku>,
}

/// Which acknowledged orders to read back: an evenly spread `sample` (all when `None`
/// or when there are fewer), plus every order of a buyer whose acknowledged units
/// exceed `limit`, since only reading those can tell an expired order from a breach.
pub fn orders_to_read(acked: &[Acked], limit: Option<u64>, sample: Option<usize>) -> Vec<usize> {
    let n = acked.len();
    let mut pick = vec![false; n];
    match sample {
        Some(k) if k < n => {
            for j in 0..k {
                pick[j * n / k] = true;
            }
        }
        _ => pick.iter_mut().for_each(|p| *p = true),
    }
    if let Some(limit) = limit {
        let mut units: HashMap<&str, u64> = HashMap::new();
        for a in acked.iter().filter(|a| a.expected != Expected::Cancelled) {
            *units.entry(&a.buyer).or_default() += a.quantity;
        }
        for (i, a) in acked.iter().enumerate() {
            if units.get(a.buyer.as_str()).is_some_and(|u| *u > limit) {
                pick[i] = true;
            }
        }
    }
    (0..n).filter(|i| pick[*i]).collect()
}

/// Every invariant that does not hold, as a sentence.
pub fn check(o: &Observed) -> Vec<String> {
    let mut bad = Vec::new();
    if let Some(c) = &o.campaign {
        check_campaign(o, c, &mut bad);
    }
    for a in &o.acked {
        let Some(seen) = o.orders.get(&a.order_id) else {
            continue;
        };
        match seen {
            SeenOrder::Missing => bad.push(format!(
                "acknowledged order {} of buyer {} is lost: the node answers 404",
                a.order_id, a.buyer
            )),
            SeenOrder::Unreadable(why) => bad.push(format!(
                "acknowledged order {} of buyer {} cannot be read back: {why}",
                a.order_id, a.buyer
            )),
            SeenOrder::Found {
                status,
                buyer,
                campaign_id,
            } => {
                if !a.expected.allows(status) {
                    bad.push(format!(
                        "order {} is {status}, expected {}",
                        a.order_id,
                        a.expected.describe()
                    ));
                }
                if *buyer != a.buyer {
                    bad.push(format!(
                        "order {} belongs to {buyer}, not to the buyer it was placed for, {}",
                        a.order_id, a.buyer
                    ));
                }
                if let Some(c) = &o.campaign {
                    if campaign_id.as_deref() != Some(c.campaign_id.as_str()) {
                        bad.push(format!(
                            "order {} names campaign {}, not {}",
                            a.order_id,
                            campaign_id.as_deref().unwrap_or("(none)"),
                            c.campaign_id
                        ));
                    }
                }
            }
        }
    }
    for s in &o.skus {
        if s.available < 0 || s.reserved < 0 || s.sold < 0 {
            bad.push(format!(
                "sku {} has a negative figure: available {}, reserved {}, sold {}",
                s.sku_id, s.available, s.reserved, s.sold
            ));
        }
        let total = s.available + s.reserved + s.sold;
        if let Some(created) = s.total.filter(|t| *t != total) {
            bad.push(format!(
                "sku {} stock not conserved: available {} + reserved {} + sold {} = {total}, not {created}",
                s.sku_id, s.available, s.reserved, s.sold
            ));
        }
    }
    bad
}

fn check_campaign(o: &Observed, c: &SeenCampaign, bad: &mut Vec<String>) {
    for f in [c.first, c.last] {
        if f.held() > c.quantity {
            bad.push(format!(
                "campaign {} oversold: sold {} + reserved {} > quantity {}",
                c.campaign_id, f.sold, f.reserved, c.quantity
            ));
            break;
        }
    }
    // Units each buyer holds by the run's acknowledged orders. An order not read back
    // counts as held (orders_to_read reads every order of a buyer that could exceed).
    let mut per_buyer: BTreeMap<&str, u64> = BTreeMap::new();
    for a in &o.acked {
        let released = o.orders.get(&a.order_id).is_some_and(SeenOrder::released);
        if !released && a.expected != Expected::Cancelled {
            *per_buyer.entry(&a.buyer).or_default() += a.quantity;
        }
    }
    for (buyer, n) in &per_buyer {
        if *n > c.per_buyer_limit {
            bad.push(format!(
                "buyer {buyer} holds {n} units of campaign {}, above its limit of {}",
                c.campaign_id, c.per_buyer_limit
            ));
        }
    }
    if c.exclusive {
        // Held for sure: read back and not cancelled. Perhaps held: also every order not
        // read back (or lost), and every buy that got no answer.
        let mut sure = 0u64;
        let mut perhaps = c.uncertain_units;
        for a in &o.acked {
            match o.orders.get(&a.order_id) {
                Some(s @ SeenOrder::Found { .. }) if !s.released() => {
                    sure += a.quantity;
                    perhaps += a.quantity;
                }
                Some(SeenOrder::Found { .. }) => {}
                _ => perhaps += a.quantity,
            }
        }
        let range = if sure == perhaps {
            format!("{sure}")
        } else {
            format!("between {sure} and {perhaps}")
        };
        if c.first.held() < sure {
            bad.push(format!(
                "campaign {} counts sold {} + reserved {} = {}, fewer than the {range} units the run's acknowledged orders hold",
                c.campaign_id, c.first.sold, c.first.reserved, c.first.held()
            ));
        } else if c.last.held() > perhaps {
            bad.push(format!(
                "campaign {} counts sold {} + reserved {} = {}, more than the {range} units the run's acknowledged orders hold",
                c.campaign_id, c.last.sold, c.last.reserved, c.last.held()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(status: &str, buyer: &str, campaign: Option<&str>) -> SeenOrder {
        SeenOrder::Found {
            status: status.into(),
            buyer: buyer.into(),
            campaign_id: campaign.map(Into::into),
        }
    }

    fn acked(i: usize, buyer: &str) -> Acked {
        Acked {
            order_id: format!("o{i}"),
            buyer: buyer.into(),
            quantity: 1,
            expected: Expected::Unpaid,
        }
    }

    /// Three buyers each bought one unit of a 3-unit campaign of a 10-unit SKU.
    fn clean() -> Observed {
        let acked: Vec<Acked> = (0..3).map(|i| acked(i, &format!("b{i}"))).collect();
        let orders = acked
            .iter()
            .map(|a| {
                (
                    a.order_id.clone(),
                    found("pending_payment", &a.buyer, Some("c")),
                )
            })
            .collect();
        let figures = Figures {
            sold: 0,
            reserved: 3,
        };
        Observed {
            campaign: Some(SeenCampaign {
                campaign_id: "c".into(),
                quantity: 3,
                per_buyer_limit: 1,
                first: figures,
                last: figures,
                exclusive: true,
                uncertain_units: 0,
            }),
            acked,
            orders,
            skus: vec![SeenSku {
                sku_id: "s".into(),
                available: 7,
                reserved: 3,
                sold: 0,
                total: Some(10),
            }],
        }
    }

    #[track_caller]
    fn fails_with(o: &Observed, needle: &str) {
        let bad = check(o);
        assert!(bad.iter().any(|b| b.contains(needle)), "{needle}: {bad:?}");
    }

    #[test]
    fn a_clean_outcome_passes() {
        assert_eq!(check(&clean()), Vec::<String>::new());
    }

    #[test]
    fn an_oversold_campaign_fails() {
        let mut o = clean();
        o.campaign.as_mut().unwrap().last.sold = 1;
        fails_with(&o, "oversold: sold 1 + reserved 3 > quantity 3");
        // Even when it is not the run's own campaign.
        o.campaign.as_mut().unwrap().exclusive = false;
        fails_with(&o, "oversold");
    }

    #[test]
    fn a_buyer_above_the_limit_fails() {
        let mut o = clean();
        o.acked[1].buyer = "b0".into();
        o.orders
            .insert("o1".into(), found("pending_payment", "b0", Some("c")));
        fails_with(
            &o,
            "buyer b0 holds 2 units of campaign c, above its limit of 1",
        );
        // An expired first order does not count.
        o.orders
            .insert("o0".into(), found("cancelled", "b0", Some("c")));
        o.campaign.as_mut().unwrap().last.reserved = 2;
        o.campaign.as_mut().unwrap().first.reserved = 2;
        assert_eq!(check(&o), Vec::<String>::new());
    }

    #[test]
    fn a_lost_or_unreadable_acknowledged_order_fails() {
        let mut o = clean();
        o.orders.insert("o2".into(), SeenOrder::Missing);
        fails_with(&o, "acknowledged order o2 of buyer b2 is lost");
        o.orders
            .insert("o2".into(), SeenOrder::Unreadable("http_500".into()));
        fails_with(&o, "cannot be read back: http_500");
    }

    #[test]
    fn a_campaign_that_counts_other_units_than_the_orders_fails() {
        // One order expired but the campaign still counts its unit.
        let mut o = clean();
        o.orders
            .insert("o2".into(), found("cancelled", "b2", Some("c")));
        fails_with(&o, "more than the 2 units");
        // The campaign counts fewer units than the orders hold.
        let mut o = clean();
        o.campaign.as_mut().unwrap().first.reserved = 2;
        fails_with(&o, "fewer than the 3 units");
        // Not the run's campaign: others may have bought, only the bound applies.
        o.campaign.as_mut().unwrap().exclusive = false;
        assert_eq!(check(&o), Vec::<String>::new());
    }

    #[test]
    fn what_the_run_cannot_know_widens_the_count() {
        // A buy that timed out may have taken the third unit.
        let mut o = clean();
        o.acked.pop();
        o.orders.remove("o2");
        fails_with(&o, "more than the 2 units");
        o.campaign.as_mut().unwrap().uncertain_units = 1;
        assert_eq!(check(&o), Vec::<String>::new());
        // An order not read back (sampled out) may still hold its unit.
        let mut o = clean();
        o.orders.remove("o2");
        assert_eq!(check(&o), Vec::<String>::new());
    }

    #[test]
    fn stock_that_is_not_conserved_fails() {
        let mut o = clean();
        o.skus[0].available = 8;
        fails_with(
            &o,
            "sku s stock not conserved: available 8 + reserved 3 + sold 0 = 11, not 10",
        );
        o.skus[0].total = None;
        assert_eq!(check(&o), Vec::<String>::new());
        o.skus[0].available = -1;
        fails_with(&o, "negative");
    }

    #[test]
    fn a_status_or_owner_the_run_did_not_cause_fails() {
        let mut o = clean();
        o.acked[0].expected = Expected::Paid;
        fails_with(&o, "order o0 is pending_payment, expected paid or later");
        o.acked[0].expected = Expected::Unknown;
        assert_eq!(check(&o), Vec::<String>::new());
        o.orders
            .insert("o1".into(), found("pending_payment", "mallory", Some("c")));
        fails_with(&o, "belongs to mallory");
        o.orders
            .insert("o1".into(), found("pending_payment", "b1", None));
        fails_with(&o, "order o1 names campaign (none), not c");
    }

    #[test]
    fn the_read_back_sample_is_spread_and_keeps_suspect_buyers() {
        let mut acked: Vec<Acked> = (0..10).map(|i| acked(i, &format!("b{i}"))).collect();
        assert_eq!(orders_to_read(&acked, Some(1), None).len(), 10);
        assert_eq!(orders_to_read(&acked, Some(1), Some(20)).len(), 10);
        assert_eq!(
            orders_to_read(&acked, Some(1), Some(5)),
            vec![0, 2, 4, 6, 8]
        );
        // b3 bought twice (perhaps after an expiry): both of its orders are read.
        acked[9].buyer = "b3".into();
        assert_eq!(
            orders_to_read(&acked, Some(1), Some(5)),
            vec![0, 2, 3, 4, 6, 8, 9]
        );
        assert_eq!(orders_to_read(&acked, None, Some(0)), Vec::<usize>::new());
    }
}
