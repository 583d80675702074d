//! Orders: reads and listings across nodes, and the order's lifecycle after payment
//! (cancel, ship, receipt, refunds, operator edits).

use crate::domain::order::{CancelReason, Order, OrderCommand, OrderStatus, Shipment};
use crate::domain::sku::SkuCommand;
use crate::domain::{Address, Kind};
use crate::error::{Result, ShopError};
use crate::errors_map::{order_err, sku_err, MOVING};
use crate::keys::EntityKey;
use crate::route::{ForwardError, IndexFilter, Route, ScanPage, ScanRequest};

use super::*;

impl Shop {
    pub async fn get_order(&self, order_id: &str) -> Result<Order> {
        self.order(order_id, OrderCommand::Get)
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))
    }

    /// One buyer's orders, newest first; or, without a buyer, every order of this node.
    pub async fn list_orders(
        &self,
        buyer: Option<&str>,
        status: Option<OrderStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<Order>> {
        let prefix = match buyer {
            Some(b) => format!("I/ob/{b}/").into_bytes(),
            None => b"I/o/".to_vec(),
        };
        // By buyer the index value is the status; by id it is `buyer \0 status`.
        let filter = match (status, buyer) {
            (None, _) => IndexFilter::All,
            (Some(s), Some(_)) => IndexFilter::ValueIs(s.as_str().as_bytes().to_vec()),
            (Some(s), None) => IndexFilter::FieldIs {
                field: 1,
                value: s.as_str().as_bytes().to_vec(),
            },
        };
        let (ids, next_cursor) = self
            .scan_index(ScanRequest {
                prefix,
                kind: Kind::Order,
                cursor: cursor.map(str::to_owned),
                reverse: true,
                limit,
                filter,
                // A buyer's orders are in their partition, except bought orders in a
                // replicated cluster (`Shop::bought_order_partition`): every group.
                partition: buyer
                    .filter(|_| self.replica_groups() == 0)
                    .map(|b| self.inner.partitioner.buyer(b)),
            })
            .await?;
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            match self.get_order(id).await {
                Ok(order) => items.push(order),
                // An index entry whose order a crash lost (possible only in `relaxed`
                // mode, where index changes can reach the disk before their record).
                Err(ShopError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Page { items, next_cursor })
    }

    /// Ids under an index, across the cluster: this node's page and those of the other
    /// nodes that must answer, merged in index order; at most `limit`, and the cursor of
    /// the next page when there may be more.
    pub(crate) async fn scan_index(
        &self,
        req: ScanRequest,
    ) -> Result<(Vec<String>, Option<String>)> {
        let limit = req.limit;
        let reverse = req.reverse;
        let local = match req.partition {
            Some(p) if self.route(p) != Route::Local => ScanPage::default(),
            _ => self.scan_local(&req)?,
        };
        let mut pages = vec![local];
        if let Some(router) = &self.inner.router {
            let others = router.scan_others(req).await.map_err(|e| match e {
                ForwardError::Moved => ShopError::Unavailable(MOVING.into()),
                ForwardError::Unavailable(why) | ForwardError::Unreadable(why) => {
                    ShopError::Unavailable(why)
                }
                ForwardError::Overloaded(what) => ShopError::Overloaded(what),
            })?;
            pages.extend(others);
        }
        Ok(merge_pages(pages, limit, reverse))
    }

    /// Ids under an index in the partitions this node serves (see [`ScanRequest`]).
    pub fn scan_local(&self, req: &ScanRequest) -> Result<ScanPage> {
        const PAGE: usize = 512;
        let prefix = req.prefix.as_slice();
        let mut from = req.cursor.as_ref().map(|c| [prefix, c.as_bytes()].concat());
        let mut ids = Vec::new();
        let clustered = self.inner.router.is_some();
        loop {
            let page = self
                .inner
                .wal
                .aux_scan(prefix, from.as_deref(), req.reverse, PAGE)
                .map_err(storage)?;
            let last_page = page.len() < PAGE;
            for (i, (k, v)) in page.iter().enumerate() {
                if !req.filter.keeps(v) {
                    continue;
                }
                let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                // A copy left behind by a partition this node handed over is not listed.
                if clustered && !self.serves(req.kind, &id) {
                    continue;
                }
                ids.push(id);
                if ids.len() == req.limit {
                    let more = !last_page || i + 1 < page.len();
                    return Ok(ScanPage { ids, more });
                }
            }
            match page.last() {
                Some((k, _)) if !last_page => from = Some(k.clone()),
                _ => return Ok(ScanPage { ids, more: false }),
            }
        }
    }

    /// True when this node serves the entity's partition now.
    fn serves(&self, kind: Kind, id: &str) -> bool {
        self.inner
            .partitioner
            .of(&EntityKey::new(kind, id))
            .is_some_and(|p| self.route(p) == Route::Local)
    }

    pub async fn cancel(&self, order_id: &str, by_admin: bool) -> Result<Order> {
        let reason = if by_admin {
            CancelReason::Admin
        } else {
            CancelReason::Buyer
        };
        let order = self
            .order(order_id, OrderCommand::Cancel { reason })
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))?;
        self.release_order(&order).await;
        Ok(order)
    }

    pub async fn ship(
        &self,
        order_id: &str,
        shipment: Shipment,
        expected_version: Option<u64>,
    ) -> Result<Order> {
        let cmd = OrderCommand::Ship {
            carrier: shipment.carrier,
            tracking_no: shipment.tracking_no,
            expected_version,
            auto_confirm_after: millis(self.inner.cfg.auto_confirm_after),
        };
        self.order_cmd(order_id, cmd).await
    }

    pub async fn confirm_receipt(&self, order_id: &str) -> Result<Order> {
        self.order_cmd(order_id, OrderCommand::ConfirmReceipt).await
    }

    pub async fn request_refund(&self, order_id: &str, reason: String) -> Result<Order> {
        let window = millis(self.inner.cfg.refund_window);
        self.order_cmd(order_id, OrderCommand::RequestRefund { reason, window })
            .await
    }

    /// Approves a refund: the order records it first (so a concurrent reject can no
    /// longer win), then each SKU takes its units back, once per order. If a SKU does not
    /// answer, approving again (the order is then `refunded` with restock) finishes the
    /// restock; until then the units stay counted as sold, never sold twice.
    pub async fn approve_refund(&self, order_id: &str, restock: bool) -> Result<Order> {
        let order = self.get_order(order_id).await?;
        let order = match order.status {
            OrderStatus::RefundRequested => {
                self.order_cmd(order_id, OrderCommand::ApproveRefund { restock })
                    .await?
            }
            OrderStatus::Refunded
                if restock && order.refund.as_ref().is_some_and(|r| r.restock) =>
            {
                order
            }
            status => {
                return Err(ShopError::InvalidState {
                    status: status.as_str().into(),
                })
            }
        };
        if order.refund.as_ref().is_some_and(|r| r.restock) {
            if let Some(campaign_id) = &order.campaign_id {
                self.restock_campaign_order(&order, campaign_id).await?;
                return Ok(order);
            }
            for line in &order.lines {
                let cmd = SkuCommand::Restock {
                    order_id: order_id.to_owned(),
                };
                self.sku(&line.sku_id, cmd)
                    .await
                    .map_err(|r| sku_err(r, &line.sku_id))?;
            }
        }
        Ok(order)
    }

    pub async fn reject_refund(&self, order_id: &str, reason: String) -> Result<Order> {
        self.order_cmd(order_id, OrderCommand::RejectRefund { reason })
            .await
    }

    pub async fn patch_order(
        &self,
        order_id: &str,
        shipping_address: Option<Address>,
        shipment: Option<Shipment>,
        expected_version: u64,
    ) -> Result<Order> {
        self.order_cmd(
            order_id,
            OrderCommand::Patch {
                shipping_address,
                shipment,
                expected_version,
            },
        )
        .await
    }

    pub(crate) async fn order_cmd(&self, order_id: &str, cmd: OrderCommand) -> Result<Order> {
        self.order(order_id, cmd)
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))
    }
}

/// The first `limit` ids of several nodes' pages in index order (each page holds a
/// node's first ids after the same cursor, so the merge is exact), and the cursor of the
/// next page when any node has more.
fn merge_pages(pages: Vec<ScanPage>, limit: usize, reverse: bool) -> (Vec<String>, Option<String>) {
    let more = pages.iter().any(|p| p.more);
    let mut ids: Vec<String> = pages.into_iter().flat_map(|p| p.ids).collect();
    ids.sort_unstable();
    ids.dedup();
    if reverse {
        ids.reverse();
    }
    let cut = ids.len() > limit;
    ids.truncate(limit);
    let next = if cut || more {
        ids.last().cloned()
    } else {
        None
    };
    (ids, next)
}
