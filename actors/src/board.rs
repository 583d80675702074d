//! The campaign board: the last figures this node saw of each campaign, so a buy that
//! can only be refused (`sold_out`, `campaign_not_started`, `campaign_ended`) is answered
//! at the edge without a message to the campaign's actor or a write.
//!
//! The campaign actor still decides every accepted buy, so a stale figure can never
//! oversell: at worst it refuses a buy that a unit released a moment ago could have
//! served. To bound that, a `sold_out` or `not_started` figure is trusted only for
//! [`TRUST`]; past it the next buy goes to the actor, whose answer refreshes the figure.
//! An end is final and trusted for good. Every campaign answer that passes through this
//! node's shop (buys, reads, payments, releases, timers) refreshes the board, and in a
//! cluster every node's board learns remote campaigns the same way, from the answers of
//! their owners.
//!
//! A `DashMap` (sharded locks held for one copy of a small value, never across an
//! await): the edge's tasks on every worker read it concurrently.

use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::domain::campaign::{CampaignStatus, CampaignView};
use crate::domain::Millis;

/// How long a `sold_out` or `not_started` figure is trusted without asking the campaign.
pub const TRUST: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy)]
struct Figure {
    status: CampaignStatus,
    starts_at: Millis,
    ends_at: Millis,
    seen: Instant,
}

/// What the board can say about a buy without asking the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    SoldOut,
    NotStarted,
    Ended,
    /// Ask the campaign.
    Ask,
}

/// Bounded by the number of campaigns (each entry is about 50 bytes): ended campaigns
/// are dropped once they are past their end by a day.
#[derive(Default)]
pub struct Board {
    figures: DashMap<String, Figure>,
}

impl Board {
    /// Records what a campaign answered.
    pub fn saw(&self, view: &CampaignView, now: Millis) {
        let figure = Figure {
            status: view.status(now),
            starts_at: view.terms.starts_at,
            ends_at: view.terms.ends_at,
            seen: Instant::now(),
        };
        match self.figures.get_mut(&view.terms.campaign_id) {
            Some(mut f) => *f = figure,
            None => {
                self.figures.insert(view.terms.campaign_id.clone(), figure);
            }
        }
    }

    /// Records that the campaign refused a buy as sold out (its figures were not sent).
    pub fn saw_sold_out(&self, campaign_id: &str) {
        if let Some(mut f) = self.figures.get_mut(campaign_id) {
            f.status = CampaignStatus::SoldOut;
            f.seen = Instant::now();
        }
    }

    /// Records that the campaign refused a buy as not started yet: the figure it had is
    /// trusted again for [`TRUST`] (without this, once the figure was stale every buy of
    /// a scheduled campaign went to its actor until someone read the campaign).
    pub fn saw_not_started(&self, campaign_id: &str) {
        if let Some(mut f) = self.figures.get_mut(campaign_id) {
            f.status = CampaignStatus::Scheduled;
            f.seen = Instant::now();
        }
    }

    /// Forgets a campaign (discarded, or unknown to its owner).
    pub fn forget(&self, campaign_id: &str) {
        self.figures.remove(campaign_id);
    }

    // PerformanceCriticalPath: every buy asks here first.
    pub fn verdict(&self, campaign_id: &str, now: Millis) -> Verdict {
        let Some(f) = self.figures.get(campaign_id).map(|f| *f) else {
            return Verdict::Ask;
        };
        if f.status == CampaignStatus::Ended || now >= f.ends_at {
            return Verdict::Ended;
        }
        if f.seen.elapsed() > TRUST {
            return Verdict::Ask;
        }
        match f.status {
            CampaignStatus::SoldOut => Verdict::SoldOut,
            CampaignStatus::Scheduled if now < f.starts_at => Verdict::NotStarted,
            _ => Verdict::Ask,
        }
    }

    /// Drops the figures of campaigns that ended more than a day before `now`.
    pub fn prune(&self, now: Millis) {
        const DAY: Millis = 24 * 3600 * 1000;
        self.figures
            .retain(|_, f| now < f.ends_at.saturating_add(DAY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::campaign::{CampaignTerms, Phase};
    use crate::domain::Money;

    fn view(quantity: u64, reserved: u64, phase: Phase) -> CampaignView {
        CampaignView {
            terms: CampaignTerms {
                campaign_id: "c1".into(),
                sku_id: "s1".into(),
                product_id: "p1".into(),
                sku_name: "n".into(),
                price: Money::new(1, "CNY"),
                quantity,
                starts_at: 1_000,
                ends_at: 10_000,
                per_buyer_limit: 1,
                payment_timeout_ms: 1,
                created_at: 0,
            },
            phase,
            sold: 0,
            reserved,
            version: 1,
            updated_at: 0,
            order: None,
        }
    }

    #[test]
    fn refusals_are_trusted_for_a_moment_and_an_end_for_good() {
        let board = Board::default();
        assert_eq!(board.verdict("c1", 2_000), Verdict::Ask);
        board.saw(&view(1, 0, Phase::Open), 500);
        assert_eq!(board.verdict("c1", 500), Verdict::NotStarted);
        board.saw(&view(1, 1, Phase::Open), 2_000);
        assert_eq!(board.verdict("c1", 2_000), Verdict::SoldOut);
        board.saw(&view(1, 0, Phase::Open), 2_000);
        assert_eq!(board.verdict("c1", 2_000), Verdict::Ask);
        board.saw_sold_out("c1");
        assert_eq!(board.verdict("c1", 2_000), Verdict::SoldOut);
        // A not-started refusal refreshes a stale scheduled figure.
        board.saw(&view(1, 0, Phase::Open), 500);
        std::thread::sleep(TRUST + Duration::from_millis(20));
        assert_eq!(board.verdict("c1", 500), Verdict::Ask);
        board.saw_not_started("c1");
        assert_eq!(board.verdict("c1", 500), Verdict::NotStarted);
        board.saw_sold_out("c1");
        // A stale sold-out figure sends the next buy to the campaign.
        std::thread::sleep(TRUST + Duration::from_millis(20));
        assert_eq!(board.verdict("c1", 2_000), Verdict::Ask);
        // Past the end, for good.
        assert_eq!(board.verdict("c1", 10_000), Verdict::Ended);
        board.saw(&view(1, 0, Phase::Ended { at: 3_000 }), 3_000);
        std::thread::sleep(TRUST + Duration::from_millis(20));
        assert_eq!(board.verdict("c1", 3_000), Verdict::Ended);
        board.forget("c1");
        assert_eq!(board.verdict("c1", 3_000), Verdict::Ask);
    }
}
