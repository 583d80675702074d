//! Work no request waits for: timers firing entity commands, and checkpoints folding the
//! log into snapshots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_persistence::Wal;
use tokio::sync::{mpsc, Semaphore};

use crate::domain::idempotency::{IdemCommand, IdemState};
use crate::domain::order::{OrderCommand, OrderStatus};
use crate::domain::sku::SkuCommand;
use crate::domain::Kind;
use crate::error::Result;
use crate::keys::EntityKey;
use crate::kinds::{self, KindVisitor, Routed};
use crate::metrics::ActorMetrics;
use crate::partition::PartitionMsg;

use super::*;

impl Shop {
    pub(super) async fn dispatch_timers(self, mut rx: mpsc::Receiver<EntityKey>) {
        // Bounded: at most this many timer actions run at once.
        let permits = Arc::new(Semaphore::new(64));
        let stop = self.inner.stop.clone();
        while let Some(Some(key)) = stop.run_until_cancelled(rx.recv()).await {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let shop = self.clone();
            tokio::spawn(async move {
                shop.on_timer(key).await;
                drop(permit);
            });
        }
    }

    async fn on_timer(&self, key: EntityKey) {
        let failed = match key.kind {
            Kind::Sku => self
                .sku(&key.id, SkuCommand::Expire)
                .await
                .err()
                .map(|e| format!("reservation expiry: {e:?}")),
            Kind::Order => self
                .order_timer(&key.id)
                .await
                .err()
                .map(|e| format!("order timer: {e}")),
            Kind::Idempotency => match self.inner.partitioner.of(&key) {
                Some(p) => self
                    .ask::<IdemState>(p, &key.id, IdemCommand::Expire)
                    .await
                    .err()
                    .map(|e| format!("idempotency expiry: {e:?}")),
                None => None,
            },
            Kind::Campaign => self
                .campaign_timer(&key.id)
                .await
                .err()
                .map(|e| format!("campaign timer: {e}")),
            Kind::Product | Kind::Cart | Kind::Payment => None,
        };
        if let Some(why) = failed {
            // The entity's deadline did not change, so nothing else would arm it again.
            tracing::warn!(entity = ?key, error = %why, "timer action failed; retrying shortly");
            self.arm_in(key, RETRY_TIMER_AFTER);
        }
    }

    /// The order's deadline passed: finish a payment left in progress, expire an unpaid
    /// order (returning its stock), or confirm receipt automatically.
    async fn order_timer(&self, order_id: &str) -> Result<()> {
        let order = self.get_order(order_id).await?;
        if order.status == OrderStatus::PendingPayment {
            if let Some(payment_id) = order.payment_in_progress.clone() {
                // On failure (a SKU did not answer) on_timer tries again shortly. A payment
                // whose reservation is gone was aborted by finish_payment; the next tick
                // expires the order.
                return self.finish_payment(order, &payment_id).await.map(drop);
            }
        }
        let after = self.order_cmd(order_id, OrderCommand::Tick).await?;
        if after.status == OrderStatus::Cancelled {
            self.release_order(&after).await;
        }
        Ok(())
    }

    /// Asks the entity's partition for a timer `after` from now, on business time (the
    /// timer wheel knows no other: on a manual clock a retry waits for the clock too).
    fn arm_in(&self, key: EntityKey, after: Duration) {
        if let Some(actor) = self
            .inner
            .partitioner
            .of(&key)
            .and_then(|p| self.inner.partitions.get(usize::from(p)))
        {
            let _ = actor.cast(PartitionMsg::Arm(key, self.now_ms() + millis(after)));
        }
    }

    /// Checkpoints when the log has grown by `checkpoint_log_bytes`, when it has been
    /// quiet for [`CHECKPOINT_QUIET`] with something unfolded, or at the latest every
    /// `checkpoint_interval`: a burst of writes pays for no checkpoint until it is over
    /// or has logged that much, and a quiet node folds everything promptly.
    pub(super) async fn checkpoint_loop(self) {
        let (interval, log_bytes) = (
            self.inner.cfg.checkpoint_interval,
            self.inner.cfg.checkpoint_log_bytes,
        );
        let mut every = tokio::time::interval(interval.min(CHECKPOINT_POLL));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = self.inner.stop.clone();
        let logged = |wal: &Wal| wal.metrics().appended_bytes;
        let (mut folded_at, mut folded_upto) = (Instant::now(), logged(&self.inner.wal));
        let (mut quiet_since, mut seen) = (Instant::now(), folded_upto);
        while stop.run_until_cancelled(every.tick()).await.is_some() {
            let now = logged(&self.inner.wal);
            if now != seen {
                (quiet_since, seen) = (Instant::now(), now);
            }
            let due = now - folded_upto >= log_bytes
                || (now != folded_upto && quiet_since.elapsed() >= CHECKPOINT_QUIET)
                || folded_at.elapsed() >= interval;
            if !due {
                continue;
            }
            (folded_at, folded_upto) = (Instant::now(), now);
            let wal = self.inner.wal.clone();
            // sled calls block: run the fold off the async workers.
            let res = tokio::task::spawn_blocking(move || checkpoint_all(&wal)).await;
            match res {
                Ok(Err(e)) => tracing::error!(error = %e, "checkpoint failed"),
                Err(e) => tracing::error!(error = %e, "checkpoint task failed"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// A log with no new record for this long is folded (see [`Shop::checkpoint_loop`]).
const CHECKPOINT_QUIET: Duration = Duration::from_secs(1);

/// How often the checkpoint scheduler looks at the log's growth.
const CHECKPOINT_POLL: Duration = Duration::from_millis(250);

/// Folds every partition's log into entity snapshots, then releases the log segments
/// nothing unfolded needs any more: that bounds the log.
pub fn checkpoint_all(wal: &Wal) -> std::result::Result<(), shardmall_persistence::Error> {
    for partition in wal.partitions_with_log()? {
        wal.checkpoint_partition(partition, &mut fold_entity)?;
    }
    wal.release_log()?;
    Ok(())
}

/// Folds an entity's snapshot and log tail into its current state (the checkpoint's and
/// a handoff's fold).
pub fn fold_entity(
    entity: &[u8],
    snapshot: Option<&[u8]>,
    tail: &[(u64, Vec<u8>)],
) -> std::result::Result<Option<Vec<u8>>, String> {
    struct Fold<'a> {
        snapshot: Option<&'a [u8]>,
        tail: &'a [(u64, Vec<u8>)],
    }
    impl KindVisitor for Fold<'_> {
        type Out = std::result::Result<Option<Vec<u8>>, String>;
        fn visit<E: Routed>(self) -> Self::Out {
            let state: E = crate::codec::rebuild(self.snapshot, self.tail.iter().map(|(_, r)| r))
                .map_err(|e| e.to_string())?;
            let bytes = crate::codec::encode(&state).map_err(|e| e.to_string())?;
            // A state equal to the empty one (an expired idempotency key, a discarded
            // SKU) needs no snapshot.
            let empty = crate::codec::encode(&E::default()).map_err(|e| e.to_string())?;
            Ok((bytes != empty).then_some(bytes))
        }
    }
    let key = EntityKey::from_bytes(entity).ok_or("unknown entity key")?;
    kinds::visit(key.kind, Fold { snapshot, tail })
}

pub(super) fn count_orders_by_status(wal: &Wal, metrics: &ActorMetrics) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = wal
            .aux_scan(b"I/o/", after.as_deref(), false, 4096)
            .map_err(storage)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, v) in &page {
            let status = v
                .split(|b| *b == 0)
                .nth(1)
                .and_then(|s| std::str::from_utf8(s).ok());
            metrics.order_status_changed(None, status);
        }
    }
    Ok(())
}
