//! Flash-sale campaigns: the sagas around the campaign entity.
//!
//! - Creation: the campaign is created in `Draft`, the SKU carves its units out of
//!   `available` (refused with `insufficient_stock`, which discards the draft), then the
//!   campaign opens. A draft left behind by a crash ends at `ends_at` like any campaign,
//!   and the SKU gets back whatever it carved.
//! - A buy claims units on the campaign (one actor, arithmetic only; refusals write
//!   nothing). When the buyer's partition is served on the same node, the order is a
//!   second record in the campaign's own log frame (ADR 0013); otherwise it is placed in
//!   the buyer's partition beside the claim. Either way the buy is answered once both
//!   are durable. If the order cannot be placed, the claim is released.
//! - Payment commits the claim; cancel and expiry release it. The SKU is told the
//!   campaign's absolute figures afterwards ([`CampaignView::sku_hold`]): versioned, so a
//!   report that is late, lost or repeated is harmless, and the next one catches up.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::board::Verdict;
use crate::domain::campaign::{
    BoughtOrder, CampaignBuy, CampaignCommand, CampaignError, CampaignState, CampaignStatus,
    CampaignTerms, CampaignView, IdemTag,
};
use crate::domain::order::{Line, Order, OrderCommand, OrderError, OrderState, BUYER_INDEX_PREFIX};
use crate::domain::sku::SkuCommand;
use crate::domain::Entity;
use crate::domain::{Address, Kind, Millis, Money};
use crate::error::{Result, ShopError};
use crate::errors_map::{campaign_err, order_err, sku_err};
use crate::host::Refusal;
use crate::route::{ForwardError, IndexFilter, RemoteAnswer, Route, ScanRequest};
use crate::shop::routing::{remote_answer, remote_view};
use crate::shop::{millis, take_opened, Page, Shop};

/// What a buy answers: the order, and whether this repeats an earlier keyed buy.
#[derive(Debug, Clone)]
pub struct Bought {
    pub order: Order,
    pub replayed: bool,
}

/// Finishes a buy whose caller went away between the claim and the placement of its
/// order: places the order (idempotent by order id), or gives the claim back.
struct FinishBuy {
    shop: Shop,
    campaign_id: String,
    /// `None` once the buy's own task has placed the order (or failed to).
    place: Option<OrderCommand>,
}

impl Drop for FinishBuy {
    fn drop(&mut self) {
        let Some(place) = self.place.take() else {
            return;
        };
        let (shop, campaign_id) = (self.shop.clone(), std::mem::take(&mut self.campaign_id));
        tokio::spawn(async move {
            let OrderCommand::Place { order_id, .. } = &place else {
                return;
            };
            let order_id = order_id.clone();
            match shop.order(&order_id, place).await {
                Ok(_) | Err(Refusal::Domain(OrderError::AlreadyExists)) => {}
                Err(r) => {
                    tracing::warn!(order = %order_id, error = ?r, "an abandoned buy's order could not be placed; giving its claim back");
                    shop.release_claim(&campaign_id, &order_id).await;
                }
            }
        });
    }
}

/// The order a campaign's buy opens, as the buyer's partition is asked to place it.
fn place_command(terms: &CampaignTerms, bought: &BoughtOrder, fresh: bool) -> OrderCommand {
    OrderCommand::Place {
        order_id: bought.order_id.clone(),
        buyer: bought.buyer.clone(),
        lines: vec![Line {
            sku_id: terms.sku_id.clone(),
            name: terms.sku_name.clone(),
            unit_price: terms.price.clone(),
            quantity: bought.quantity,
        }],
        shipping_address: bought.shipping_address.clone(),
        payment_deadline: bought.payment_deadline,
        campaign_id: Some(terms.campaign_id.clone()),
        placed_at: Some(bought.at),
        fresh,
    }
}

fn bought_of(view: &CampaignView) -> Result<BoughtOrder> {
    view.order
        .clone()
        .ok_or_else(|| ShopError::Internal("a buy answered without its order".into()))
}

/// The order exactly as `place` opens it: a buy's first answer, rebuilt for a repeat.
fn opening(place: OrderCommand) -> Result<Order> {
    let mut state = OrderState::default();
    let events = state
        .decide(&place, 0)
        .map_err(|e| ShopError::Internal(format!("a bought order does not place: {e:?}")))?;
    for event in &events {
        state.apply(event);
    }
    state
        .view()
        .ok_or_else(|| ShopError::Internal("a bought order has no state".into()))
}

/// A campaign as the admin creates it.
#[derive(Debug, Clone)]
pub struct NewCampaign {
    pub campaign_id: String,
    pub sku_id: String,
    pub price: Money,
    pub quantity: u64,
    pub starts_at: Option<Millis>,
    pub ends_at: Millis,
    pub per_buyer_limit: u64,
    pub payment_timeout: Option<Duration>,
}

impl Shop {
    async fn campaign(&self, id: &str, cmd: CampaignCommand) -> Result<CampaignView> {
        let p = self.inner.partitioner.catalog(Kind::Campaign, id);
        let answer = match cmd {
            CampaignCommand::Get => self.read::<CampaignState>(p, id, cmd).await,
            cmd => self.ask::<CampaignState>(p, id, cmd).await,
        };
        self.saw_campaign(id, answer)
    }

    /// Maps a campaign's answer, and keeps the board's figures of it up to date.
    fn saw_campaign(
        &self,
        id: &str,
        answer: std::result::Result<Option<CampaignView>, Refusal<CampaignError>>,
    ) -> Result<CampaignView> {
        let board = &self.inner.board;
        match answer {
            Ok(Some(view)) => {
                board.saw(&view, self.now_ms());
                Ok(view)
            }
            Ok(None) => {
                board.forget(id);
                Err(ShopError::NotFound(format!("campaign {id}")))
            }
            Err(Refusal::Domain(CampaignError::SoldOut)) => {
                board.saw_sold_out(id);
                Err(ShopError::SoldOut(id.to_owned()))
            }
            Err(Refusal::Domain(CampaignError::NotStarted)) => {
                board.saw_not_started(id);
                Err(ShopError::CampaignNotStarted(id.to_owned()))
            }
            Err(r) => Err(campaign_err(r, id)),
        }
    }

    pub async fn create_campaign(&self, input: NewCampaign) -> Result<CampaignView> {
        let now = self.now_ms();
        let sku = self
            .sku(&input.sku_id, SkuCommand::Get)
            .await
            .map_err(|r| sku_err(r, &input.sku_id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {}", input.sku_id)))?;
        let payment_timeout = input
            .payment_timeout
            .unwrap_or(self.inner.cfg.payment_timeout);
        let terms = CampaignTerms {
            campaign_id: input.campaign_id.clone(),
            sku_id: input.sku_id.clone(),
            product_id: sku.product_id.clone(),
            sku_name: sku.name.clone(),
            price: input.price,
            quantity: input.quantity,
            starts_at: input.starts_at.unwrap_or(now),
            ends_at: input.ends_at,
            per_buyer_limit: input.per_buyer_limit,
            payment_timeout_ms: millis(payment_timeout),
            created_at: now,
        };
        let id = &input.campaign_id;
        self.campaign(id, CampaignCommand::Create(terms)).await?;
        let carve = SkuCommand::CarveCampaign {
            campaign_id: id.clone(),
            quantity: input.quantity,
        };
        if let Err(r) = self.sku(&input.sku_id, carve).await {
            let err = sku_err(r, &input.sku_id);
            if !matches!(err, ShopError::Unavailable(_)) {
                // Nothing was carved: the draft goes, and its id may be used again.
                if let Err(e) = self.campaign(id, CampaignCommand::Discard).await {
                    tracing::warn!(campaign = %id, error = %e, "discarding a refused campaign failed; it ends at its end time");
                }
            }
            return Err(err);
        }
        self.campaign(id, CampaignCommand::Open).await
    }

    pub async fn get_campaign(&self, id: &str) -> Result<CampaignView> {
        self.campaign(id, CampaignCommand::Get).await
    }

    /// Campaigns in id order, optionally only those with `status` now.
    pub async fn list_campaigns(
        &self,
        status: Option<CampaignStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<CampaignView>> {
        const CHUNK: usize = 100;
        let mut items = Vec::new();
        let mut cursor = cursor.map(str::to_owned);
        loop {
            let (ids, next) = self
                .scan_index(ScanRequest {
                    prefix: b"I/c/".to_vec(),
                    kind: Kind::Campaign,
                    cursor: cursor.clone(),
                    reverse: false,
                    limit: CHUNK,
                    filter: IndexFilter::All,
                    partition: None,
                })
                .await?;
            let now = self.now_ms();
            for id in &ids {
                let view = match self.get_campaign(id).await {
                    Ok(v) => v,
                    // Discarded between the scan and the read.
                    Err(ShopError::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                if status.is_none_or(|s| view.status(now) == s) {
                    items.push(view);
                    if items.len() == limit {
                        let more = next.is_some() || id != ids.last().unwrap_or(id);
                        return Ok(Page {
                            items,
                            next_cursor: more.then(|| id.clone()),
                        });
                    }
                }
            }
            match next {
                Some(n) => cursor = Some(n),
                None => {
                    return Ok(Page {
                        items,
                        next_cursor: None,
                    })
                }
            }
        }
    }

    /// The kill switch: ends the campaign now; unsold units go back to the SKU.
    pub async fn end_campaign(&self, id: &str) -> Result<CampaignView> {
        let view = self.campaign(id, CampaignCommand::End).await?;
        self.sync_sku(&view).await;
        Ok(view)
    }

    /// A flash-sale buy without an idempotency key: see [`Shop::buy_keyed`].
    pub async fn buy(
        &self,
        campaign_id: &str,
        buyer: &str,
        quantity: u64,
        shipping_address: Option<Address>,
    ) -> Result<Order> {
        self.buy_keyed(campaign_id, buyer, quantity, shipping_address, None)
            .await
            .map(|b| b.order)
    }

    /// The partition a bought order goes to. With one log per node, the buyer's: a
    /// buyer's orders sit together, and when that partition is served where the campaign
    /// is, the order rides in the claim's frame (ADR 0013). In a replicated cluster, the
    /// partition of the campaign's replica group nearest the buyer's: the order rides in
    /// the claim's entry, one consensus round per buy instead of two (a buyer's orders
    /// are then found by asking every group, see `Shop::list_orders`).
    fn bought_order_partition(&self, buyer: &str, campaign_partition: u16) -> u16 {
        let own = self.inner.partitioner.buyer(buyer);
        let groups = self.replica_groups();
        if groups == 0 {
            return own;
        }
        let nearest = own - own % groups + campaign_partition % groups;
        if nearest < self.inner.partitioner.count() {
            nearest
        } else {
            campaign_partition
        }
    }

    /// False only when `buyer` certainly holds no order: their partition is served here
    /// and its order index lists nothing for them (an accepted buy's order is indexed
    /// before its 201 leaves). A repeat of an accepted buy always finds one.
    fn may_have_bought(&self, buyer: &str, partition: u16) -> bool {
        if !self.serves_partition(partition) {
            return true;
        }
        let prefix = [BUYER_INDEX_PREFIX, buyer.as_bytes(), b"/"].concat();
        self.inner
            .wal
            .aux_scan(&prefix, None, false, 1)
            .map_or(true, |page| !page.is_empty())
    }

    /// A flash-sale buy. The campaign decides it in one event that carries the claim,
    /// the order's opening and the idempotency key (ADR 0012). When the buyer's
    /// partition is served here, the order's record is written in the campaign's frame
    /// (ADR 0013): one durable write. Otherwise, while the claim is being flushed, the
    /// order is placed in the buyer's partition (by the partition itself, no actor is
    /// started for it), so both usually share one group commit. Answered once both are
    /// durable; refusals write nothing. A repeat of a keyed buy is answered from the
    /// campaign with the order as it was first answered (`replayed`).
    // PerformanceCriticalPath: the flash-sale hot path.
    pub async fn buy_keyed(
        &self,
        campaign_id: &str,
        buyer: &str,
        quantity: u64,
        shipping_address: Option<Address>,
        idem: Option<IdemTag>,
    ) -> Result<Bought> {
        if quantity == 0 {
            return Err(ShopError::BadRequest("quantity must be at least 1".into()));
        }
        // A buy the campaign could only refuse is refused here: no message, no write. A
        // keyed buy by a buyer who may hold an order could be the repeat of one the
        // campaign accepted, which it answers with its first answer even once sold out
        // or ended: the campaign decides those.
        let p = self.inner.partitioner.catalog(Kind::Campaign, campaign_id);
        let partition = self.bought_order_partition(buyer, p);
        let verdict = match self.inner.board.verdict(campaign_id, self.now_ms()) {
            Verdict::SoldOut | Verdict::Ended
                if idem.is_some() && self.may_have_bought(buyer, partition) =>
            {
                Verdict::Ask
            }
            v => v,
        };
        match verdict {
            Verdict::SoldOut => return Err(ShopError::SoldOut(campaign_id.to_owned())),
            Verdict::NotStarted => {
                return Err(ShopError::CampaignNotStarted(campaign_id.to_owned()))
            }
            Verdict::Ended => return Err(ShopError::CampaignEnded(campaign_id.to_owned())),
            Verdict::Ask => {}
        }
        let buy = CampaignBuy {
            order_id: self.mint_order_id(partition),
            buyer: buyer.to_owned(),
            quantity,
            grace_ms: millis(self.inner.cfg.reservation_grace),
            shipping_address,
            idem,
        };
        // The order's partition served here too: the order rides in the claim's frame.
        if self.may_ride_along(partition, p) {
            let cmd = CampaignCommand::Buy(buy.clone());
            if let Some((answer, opened)) =
                self.buy_placing_here(p, campaign_id, cmd, partition).await
            {
                let view = self.saw_campaign(campaign_id, answer)?;
                return self.bought_here_or_place(campaign_id, view, opened).await;
            }
        }
        // Served elsewhere: the whole buy goes there, and its node places the order in
        // the claim's record when it can. One call and one write instead of two of each.
        if self.route(p) == Route::Remote {
            let whole = CampaignCommand::BuyAndPlace(buy.clone());
            match self
                .forward_call::<CampaignState>(p, campaign_id, &whole)
                .await
            {
                // Moved meanwhile: routed again below, like any command. Unreadable: a
                // node of an older release, which did nothing; the claim and the order
                // go apart, as it knows them.
                Err(ForwardError::Moved | ForwardError::Unreadable(_)) => {}
                answer => {
                    let (answer, opened) =
                        match remote_view::<CampaignState, (Option<CampaignView>, Option<Order>)>(
                            answer,
                        ) {
                            Ok((view, opened)) => (Ok(view), opened),
                            Err(refusal) => (Err(refusal), None),
                        };
                    let view = self.saw_campaign(campaign_id, answer)?;
                    return self.bought_here_or_place(campaign_id, view, opened).await;
                }
            }
        }
        let cmd = CampaignCommand::Buy(buy);
        let (answer, durable) = self.ask_early::<CampaignState>(p, campaign_id, cmd).await;
        let view = self.saw_campaign(campaign_id, answer)?;
        self.place_bought(campaign_id, view, durable).await
    }

    /// Asks the campaign (served here) to decide `buy`, placing its order (in
    /// `order_partition`) in the claim's own record. `None`: the campaign's partition is
    /// not served here (any more). With the answer, the order when it was placed.
    async fn buy_placing_here(
        &self,
        p: u16,
        campaign_id: &str,
        buy: CampaignCommand,
        order_partition: u16,
    ) -> Option<(
        std::result::Result<Option<CampaignView>, Refusal<CampaignError>>,
        Option<Order>,
    )> {
        let opened = Arc::new(OnceLock::new());
        let also = self.order_companion::<CampaignState>(
            order_partition,
            opened.clone(),
            |view: &Option<CampaignView>| {
                let view = view.as_ref()?;
                let bought = view.order.as_ref().filter(|b| !b.replayed)?;
                Some((place_command(&view.terms, bought, true), bought.at))
            },
            None,
        );
        let answer = self
            .ask_here_with::<CampaignState>(p, campaign_id, buy, also)
            .await?;
        Some((answer, take_opened(opened)))
    }

    /// After a buy's claim is durable: its order as placed in the claim's record
    /// (`opened`), or placed now (a repeat, or the order's partition was not served
    /// beside the campaign).
    async fn bought_here_or_place(
        &self,
        campaign_id: &str,
        view: CampaignView,
        opened: Option<Order>,
    ) -> Result<Bought> {
        match opened {
            Some(order) => Ok(Bought {
                order,
                replayed: false,
            }),
            None => self.place_bought(campaign_id, view, None).await,
        }
    }

    /// Serves a `BuyAndPlace` another node forwarded here: the campaign decides the buy,
    /// and its order is placed in the claim's record when its partition is served here
    /// beside the campaign's. Answers the view and the order so placed.
    pub(super) async fn serve_buy_and_place(
        &self,
        p: u16,
        campaign_id: &str,
        buy: CampaignBuy,
    ) -> RemoteAnswer {
        let along = self
            .inner
            .partitioner
            .of_id(Kind::Order, &buy.order_id)
            .filter(|o| self.may_ride_along(*o, p));
        let cmd = CampaignCommand::BuyAndPlace(buy);
        let answer = match along {
            Some(o) => match self.buy_placing_here(p, campaign_id, cmd, o).await {
                Some((answer, opened)) => answer.map(|view| (view, opened)),
                None => return RemoteAnswer::Moving,
            },
            None => self
                .ask_local::<CampaignState>(p, campaign_id, cmd)
                .await
                .map(|view| (view, None)),
        };
        remote_answer(answer)
    }

    /// After the claim: places the bought order in the buyer's partition, wherever it
    /// is served, and answers once the claim (`durable`, when it was answered early) and
    /// the order are both durable. A repeat of a keyed buy answers its first order.
    async fn place_bought(
        &self,
        campaign_id: &str,
        view: CampaignView,
        durable: Option<oneshot::Receiver<std::result::Result<(), String>>>,
    ) -> Result<Bought> {
        let claim_durable = async move {
            match durable {
                None => Ok(()),
                Some(rx) => match rx.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(why)) => Err(ShopError::Unavailable(why)),
                    Err(_) => Err(ShopError::Unavailable(
                        "the campaign stopped before its write was durable".into(),
                    )),
                },
            }
        };
        let bought = bought_of(&view)?;
        let order_id = bought.order_id.clone();
        let place = place_command(&view.terms, &bought, false);
        if bought.replayed {
            claim_durable.await?;
            if bought.held {
                // Delivery is idempotent by order id: if the first attempt never placed
                // its order (its caller went away, or the node crashed before answering),
                // the repeat places it now.
                match self.order(&bought.order_id, place.clone()).await {
                    Ok(_) | Err(Refusal::Domain(OrderError::AlreadyExists)) => {}
                    Err(r) => return Err(order_err(r, &bought.order_id)),
                }
            }
            return Ok(Bought {
                order: opening(place)?,
                replayed: true,
            });
        }
        // From here the claim exists: if this future is dropped (the client went away),
        // the guard finishes the buy in a task of its own, so a claim is never left
        // without its order until it expires.
        let mut first = place.clone();
        if let OrderCommand::Place { fresh, .. } = &mut first {
            *fresh = true;
        }
        let mut guard = FinishBuy {
            shop: self.clone(),
            campaign_id: campaign_id.to_owned(),
            place: Some(place),
        };
        let placed = self.order(&order_id, first).await;
        guard.place = None;
        let claimed = claim_durable.await;
        let failure = match (placed, claimed) {
            (Ok(Some(order)), Ok(())) => {
                return Ok(Bought {
                    order,
                    replayed: false,
                })
            }
            // The claim is not durable: the log has failed and refuses everything; after
            // a restart the order finds no claim and cannot be paid (it expires).
            (_, Err(e)) => return Err(e),
            (Ok(None), Ok(())) => ShopError::Internal("placed order has no state".into()),
            (Err(r), Ok(())) => self.place_failed(r, &order_id).await,
        };
        self.release_claim(campaign_id, &order_id).await;
        Err(failure)
    }

    /// Returns an order's units to its campaign (or, once it has ended, to the SKU).
    pub(crate) async fn release_claim(&self, campaign_id: &str, order_id: &str) {
        let release = CampaignCommand::Release {
            order_id: order_id.to_owned(),
        };
        match self.campaign(campaign_id, release).await {
            Ok(view) => {
                if view.ended(self.now_ms()) {
                    self.sync_sku(&view).await;
                }
            }
            // The claim's own expiry returns the units later.
            Err(e) => {
                tracing::warn!(campaign = campaign_id, order = order_id, error = %e, "release failed; the claim will expire")
            }
        }
    }

    /// Commits a campaign order's claim, then marks the order paid.
    pub(crate) async fn finish_campaign_payment(
        &self,
        order: Order,
        campaign_id: &str,
        payment_id: &str,
    ) -> Result<Order> {
        let order_id = order.order_id;
        let commit = CampaignCommand::Commit {
            order_id: order_id.clone(),
        };
        match self.campaign(campaign_id, commit).await {
            Ok(view) => self.sync_sku(&view).await,
            Err(err @ ShopError::Unavailable(_)) => return Err(err),
            Err(err) => {
                tracing::error!(order = %order_id, campaign = campaign_id, error = %err, "campaign claim could not be committed; aborting the payment");
                self.abort_payment(&order_id, payment_id).await?;
                return Err(err);
            }
        }
        self.mark_paid(&order_id, payment_id).await
    }

    /// A refund with restock of a campaign order: its units go back to the SKU's
    /// `available` (the campaign's `sold` keeps counting the sale).
    pub(crate) async fn restock_campaign_order(
        &self,
        order: &Order,
        campaign_id: &str,
    ) -> Result<()> {
        // The SKU restocks only units the campaign has reported sold: report first.
        let view = self.get_campaign(campaign_id).await?;
        self.sync_sku(&view).await;
        for line in &order.lines {
            let cmd = SkuCommand::RestockCampaign {
                campaign_id: campaign_id.to_owned(),
                order_id: order.order_id.clone(),
                quantity: line.quantity,
            };
            self.sku(&line.sku_id, cmd)
                .await
                .map_err(|r| sku_err(r, &line.sku_id))?;
        }
        Ok(())
    }

    /// Tells the SKU what the campaign holds and has sold. Best effort: a lost report is
    /// caught up by the next one (the campaign's timer sends one at the end).
    pub(crate) async fn sync_sku(&self, view: &CampaignView) {
        let (version, held, sold) = view.sku_hold();
        let sku_id = &view.terms.sku_id;
        let cmd = SkuCommand::SyncCampaign {
            campaign_id: view.terms.campaign_id.clone(),
            version,
            held,
            sold,
        };
        match self.sku(sku_id, cmd).await {
            Ok(_) => {}
            Err(Refusal::Moved) => {
                tracing::warn!(sku = %sku_id, campaign = %view.terms.campaign_id, "sku not told of campaign figures (its partition is moving); the next report catches up");
            }
            Err(Refusal::Unavailable(why) | Refusal::Overloaded(why)) => {
                tracing::warn!(sku = %sku_id, campaign = %view.terms.campaign_id, error = %why, "sku not told of campaign figures; the next report catches up");
            }
            Err(Refusal::Domain(e)) => {
                tracing::error!(sku = %sku_id, campaign = %view.terms.campaign_id, error = %e, "sku refused campaign figures");
            }
        }
    }

    /// The campaign's timer: end it on time, expire unpaid claims, and report to the SKU.
    pub(crate) async fn campaign_timer(&self, id: &str) -> Result<()> {
        let view = match self.campaign(id, CampaignCommand::Tick).await {
            Ok(v) => v,
            // Discarded: nothing left to do.
            Err(ShopError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if view.ended(self.now_ms()) {
            let (version, held, sold) = view.sku_hold();
            let cmd = SkuCommand::SyncCampaign {
                campaign_id: id.to_owned(),
                version,
                held,
                sold,
            };
            // Unlike other reports, the end's MUST land: on failure the timer retries.
            self.sku(&view.terms.sku_id, cmd)
                .await
                .map_err(|r| sku_err(r, &view.terms.sku_id))?;
        }
        Ok(())
    }
}
