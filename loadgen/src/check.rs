//! The invariants a run is checked against, on plain observed figures, so the checker
//! itself can be tested with broken outcomes.

use std::collections::{BTreeMap, HashMap};

/// What the run was told: a 201 for this order.
#[derive(Debug, Clone)]
pub struct Acked {
    pub order_id: String,
    pub buyer: String,
    pub quantity: u64,
    /// The status loadgen's own actions imply: `pending_payment`, `paid` or `cancelled`.
    pub expected: Expected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Bought or placed, not paid: `pending_payment`, or `cancelled` once its deadline passed.
    Unpaid,
    Paid,
    Cancelled,
}

/// An order as read back after the run (`None` status: it could not be found).
#[derive(Debug, Clone)]
pub struct SeenOrder {
    pub status: Option<String>,
    pub buyer: String,
    pub campaign_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SeenCampaign {
    pub campaign_id: String,
    pub quantity: u64,
    pub sold: u64,
    pub reserved: u64,
    pub per_buyer_limit: u64,
    /// Nobody but this run bought from it: its figures must equal the run's orders.
    pub exclusive: bool,
}

#[derive(Debug, Clone)]
pub struct SeenSku {
    pub sku_id: String,
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
    /// `available + reserved + sold` before the run (no admin adjustments during it).
    pub total_before: i64,
}

#[derive(Debug, Default, Clone)]
pub struct Observed {
    pub campaign: Option<SeenCampaign>,
    pub acked: Vec<Acked>,
    /// By order id; only the orders that were read back (all, or a sample).
    pub orders: HashMap<String, SeenOrder>,
    /// Every acknowledged order was read back.
    pub all_orders_read: bool,
    pub skus: Vec<SeenSku>,
}

fn held(status: Option<&str>) -> bool {
    !matches!(status, Some("cancelled") | Some("refunded"))
}

/// Every invariant that does not hold, as a sentence.
pub fn check(o: &Observed) -> Vec<String> {
    let mut bad = Vec::new();
    if let Some(c) = &o.campaign {
        if c.sold + c.reserved > c.quantity {
            bad.push(format!(
                "campaign {} oversold: sold {} + reserved {} > quantity {}",
                c.campaign_id, c.sold, c.reserved, c.quantity
            ));
        }
        // Units each buyer still holds, by the run's acknowledged orders.
        let mut per_buyer: BTreeMap<&str, u64> = BTreeMap::new();
        for a in &o.acked {
            let status = o.orders.get(&a.order_id).and_then(|s| s.status.as_deref());
            if held(status) && a.expected != Expected::Cancelled {
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
        if c.exclusive && o.all_orders_read {
            let held_units: u64 = o
                .acked
                .iter()
                .filter(|a| {
                    let status = o.orders.get(&a.order_id).and_then(|s| s.status.as_deref());
                    status.is_some() && held(status)
                })
                .map(|a| a.quantity)
                .sum();
            if c.sold + c.reserved != held_units {
                bad.push(format!(
                    "campaign {} counts sold {} + reserved {} but the run holds {held_units} units in acknowledged orders",
                    c.campaign_id, c.sold, c.reserved
                ));
            }
        }
    }
    for a in &o.acked {
        let Some(seen) = o.orders.get(&a.order_id) else {
            continue;
        };
        let Some(status) = seen.status.as_deref() else {
            bad.push(format!(
                "acknowledged order {} (buyer {}) cannot be read back",
                a.order_id, a.buyer
            ));
            continue;
        };
        let allowed: &[&str] = match a.expected {
            Expected::Unpaid => &["pending_payment", "cancelled"],
            Expected::Paid => &[
                "paid",
                "shipped",
                "completed",
                "refund_requested",
                "refunded",
            ],
            Expected::Cancelled => &["cancelled"],
        };
        if !allowed.contains(&status) {
            bad.push(format!(
                "order {} is {status}, expected one of {allowed:?}",
                a.order_id
            ));
        }
        if seen.buyer != a.buyer {
            bad.push(format!(
                "order {} belongs to {}, not to its buyer {}",
                a.order_id, seen.buyer, a.buyer
            ));
        }
        if let Some(c) = &o.campaign {
            if seen.campaign_id.as_deref() != Some(c.campaign_id.as_str()) {
                bad.push(format!(
                    "order {} names campaign {:?}, not {}",
                    a.order_id, seen.campaign_id, c.campaign_id
                ));
            }
        }
    }
    for s in &o.skus {
        if s.available < 0 || s.reserved < 0 || s.sold < 0 {
            bad.push(format!("sku {} has a negative figure", s.sku_id));
        }
        let total = s.available + s.reserved + s.sold;
        if total != s.total_before {
            bad.push(format!(
                "sku {} stock not conserved: available {} + reserved {} + sold {} = {total}, was {}",
                s.sku_id, s.available, s.reserved, s.sold, s.total_before
            ));
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Observed {
        let acked: Vec<Acked> = (0..3)
            .map(|i| Acked {
                order_id: format!("o{i}"),
                buyer: format!("b{i}"),
                quantity: 1,
                expected: Expected::Unpaid,
            })
            .collect();
        let orders = acked
            .iter()
            .map(|a| {
                (
                    a.order_id.clone(),
                    SeenOrder {
                        status: Some("pending_payment".into()),
                        buyer: a.buyer.clone(),
                        campaign_id: Some("c".into()),
                    },
                )
            })
            .collect();
        Observed {
            campaign: Some(SeenCampaign {
                campaign_id: "c".into(),
                quantity: 3,
                sold: 0,
                reserved: 3,
                per_buyer_limit: 1,
                exclusive: true,
            }),
            acked,
            orders,
            all_orders_read: true,
            skus: vec![SeenSku {
                sku_id: "s".into(),
                available: 7,
                reserved: 3,
                sold: 0,
                total_before: 10,
            }],
        }
    }

    #[test]
    fn a_clean_outcome_passes() {
        assert_eq!(check(&clean()), Vec::<String>::new());
    }

    #[test]
    fn an_oversold_campaign_fails() {
        let mut o = clean();
        o.campaign.as_mut().unwrap().sold = 1;
        let bad = check(&o);
        assert!(bad.iter().any(|b| b.contains("oversold")), "{bad:?}");
    }

    #[test]
    fn a_buyer_above_the_limit_fails() {
        let mut o = clean();
        o.acked[1].buyer = "b0".into();
        o.orders.get_mut("o1").unwrap().buyer = "b0".into();
        let bad = check(&o);
        assert!(bad.iter().any(|b| b.contains("above its limit")), "{bad:?}");
    }

    #[test]
    fn a_lost_acknowledged_order_fails() {
        let mut o = clean();
        o.orders.get_mut("o2").unwrap().status = None;
        let bad = check(&o);
        assert!(
            bad.iter().any(|b| b.contains("cannot be read back")),
            "{bad:?}"
        );
        // And the campaign holds a unit no readable order accounts for.
        assert!(bad.iter().any(|b| b.contains("the run holds")), "{bad:?}");
    }

    #[test]
    fn stock_that_is_not_conserved_fails() {
        let mut o = clean();
        o.skus[0].available = 8;
        let bad = check(&o);
        assert!(bad.iter().any(|b| b.contains("not conserved")), "{bad:?}");
        o.skus[0].available = -1;
        o.skus[0].total_before = 2;
        assert!(check(&o).iter().any(|b| b.contains("negative")));
    }

    #[test]
    fn a_status_the_run_did_not_cause_fails() {
        let mut o = clean();
        o.acked[0].expected = Expected::Paid;
        let bad = check(&o);
        assert!(bad.iter().any(|b| b.contains("expected one of")), "{bad:?}");
    }
}
