//! The shop: every storefront operation, as calls to entity actors, including the sagas
//! that span several entities (product creation, checkout, payment, cancel, refund).
//!
//! Saga rules (DESIGN.md, "Actors and partitions"):
//! - checkout reserves on each SKU, idempotently per order id, then places the order (in
//!   the last SKU's log frame when the buyer's partition is served here); on any refusal
//!   it releases what it reserved. Every reservation expires at the payment deadline plus
//!   a grace period, so a crash between steps never holds stock forever;
//! - payment marks the order "payment in progress" (which blocks cancel and expiry), moves
//!   every SKU's units to sold, then marks the order paid. A success is answered only once
//!   all of that is durable. A crash in the middle is finished by the order's timer;
//! - steps served on this node run on their decided answers while their records are
//!   flushed, and the request is answered once all are durable (ADR 0015);
//! - a refund with restock puts the units back on each SKU (once per order id) before the
//!   order is marked refunded.
//!
//! This file holds the shop's state, start-up and shutdown; the operations live beside it
//! by area: `routing` (the entity bus: every entity command passes through
//! `Shop::ask`), `catalog`, `cart`, `checkout`, `orders` (reads, listings, the lifecycle
//! after payment), `payment`, [`campaigns`] (flash sales), `idempotency` and `background`
//! (timers, checkpoints).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ractor::{Actor, ActorRef};
use shardmall_persistence::Wal;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::domain::cart::{CartCommand, CartState};
use crate::domain::idempotency::StoredResponse;
use crate::domain::order::{Order, OrderCommand, OrderState};
use crate::domain::product::{Product, ProductCommand, ProductState};
use crate::domain::sku::{SkuCommand, SkuState, SkuView};
use crate::domain::{Entity, Kind, Millis, Money, ProductStatus};
use crate::error::{Result, ShopError};
use crate::errors_map::MOVING;
use crate::gate::Gate;
use crate::host::{HostContext, MakeCompanion, Refusal, Request};
use crate::ids::OrderIdGen;
use crate::keys::{EntityKey, Partitioner};
use crate::kinds::{self, KindVisitor, Routed};
use crate::metrics::ActorMetrics;
use crate::partition::{PartitionActor, PartitionArgs, PartitionConfig, PartitionMsg};
use crate::route::{BoxFuture, ForwardError, RemoteAnswer, RemoteCall, Route, Router};
use crate::views::{PublishedCopy, Views};

mod background;
pub mod campaigns;
mod cart;
mod catalog;
mod checkout;
mod idempotency;
mod orders;
mod payment;
mod routing;

pub use background::checkpoint_all;
use background::count_orders_by_status;
pub use background::fold_entity;
pub(crate) use checkout::take_opened;
pub use idempotency::AnswerInFrame;

/// How long before a timer action that could not finish is tried again.
const RETRY_TIMER_AFTER: Duration = Duration::from_secs(5);

/// How many times a command whose partition moved is routed again, and the first pause
/// between tries (doubling, capped at [`MAX_ROUTE_PAUSE`]): about 3.1 s of pauses in all,
/// longer than a partition handoff takes, and than a replica group's election once its
/// leader has left it (1 to 2 s: openraft's followers grant no vote within its 1 s
/// leader lease of the last message they had).
const ROUTE_ATTEMPTS: u32 = 12;
const FIRST_ROUTE_PAUSE: Duration = Duration::from_millis(5);
const MAX_ROUTE_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ShopConfig {
    pub partitions: u16,
    pub node_tag: u16,
    pub payment_timeout: Duration,
    pub auto_confirm_after: Duration,
    /// How long a reservation outlives its order's payment deadline.
    pub reservation_grace: Duration,
    pub refund_window: Duration,
    pub idle_timeout: Duration,
    /// Memory budget: active entity actors on this node, shared evenly by its partitions.
    pub max_active: usize,
    /// Admission bound of one entity (commands waiting in its mailbox).
    pub max_entity_queue: usize,
    pub timer_tick: Duration,
    /// Longest time between checkpoints while anything is unfolded: bounds the replay
    /// after a crash in quiet hours.
    pub checkpoint_interval: Duration,
    /// A checkpoint starts as soon as this many bytes were logged since the last one:
    /// bounds the log and the unfolded records held in memory under load, while a burst
    /// shorter than that pays nothing for checkpoints until it is over.
    pub checkpoint_log_bytes: u64,
    pub call_timeout: Duration,
    /// Start every partition fenced: the cluster unfences those this node owns.
    pub start_fenced: bool,
    /// Business time: the system clock, or a manual one in tests (see [`crate::clock`]).
    pub clock: Clock,
    /// Replica groups of a replicated cluster (ADR 0016; partition `p` is in group
    /// `p % replica_groups`); 0 when the node's one log holds every partition. Records
    /// of two groups are committed independently, so a frame never carries another
    /// group's record and a request waits for each of its writes before the next.
    pub replica_groups: u16,
}

impl Default for ShopConfig {
    fn default() -> Self {
        Self {
            partitions: crate::keys::DEFAULT_PARTITIONS,
            node_tag: 0,
            payment_timeout: Duration::from_secs(30 * 60),
            auto_confirm_after: Duration::from_secs(15 * 24 * 3600),
            reservation_grace: Duration::from_secs(5 * 60),
            refund_window: Duration::from_secs(15 * 24 * 3600),
            idle_timeout: Duration::from_secs(60),
            max_active: 4096,
            max_entity_queue: 512,
            timer_tick: Duration::from_millis(250),
            replica_groups: 0,
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_log_bytes: 64 * 1024 * 1024,
            call_timeout: Duration::from_secs(10),
            start_fenced: false,
            clock: Clock::system(),
        }
    }
}

/// A new product with its SKUs, as the catalog API takes it.
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub product_id: String,
    pub title: String,
    pub category: String,
    pub brand: String,
    pub description: String,
    pub status: ProductStatus,
    pub skus: Vec<NewSku>,
}

#[derive(Debug, Clone)]
pub struct NewSku {
    pub sku_id: String,
    pub name: String,
    pub specs: BTreeMap<String, String>,
    pub price: Money,
    pub market_price: Option<Money>,
    pub stock: u64,
    pub low_stock_threshold: u64,
}

#[derive(Debug, Clone)]
pub struct ProductDetail {
    pub product: Product,
    pub skus: Vec<SkuView>,
}

#[derive(Debug, Clone)]
pub struct CartLine {
    pub sku_id: String,
    pub quantity: u64,
    pub unit_price: Money,
}

/// A page of a list and the cursor of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// The outcome of starting an idempotent request.
#[derive(Debug)]
pub enum IdemStart {
    /// A first attempt: run it, then record its answer.
    Fresh(Begun),
    Replay(StoredResponse),
}

/// A started idempotent request whose record may not be durable yet: it was answered
/// early so the request could run while the record is flushed (ADR 0015).
#[derive(Debug)]
pub struct Begun(Option<oneshot::Receiver<std::result::Result<(), String>>>);

impl Begun {
    /// Waits until the start record is durable. The request's answer MUST wait for this:
    /// it acknowledges the key as used.
    pub async fn durable(self) -> Result<()> {
        checkout::all_durable(self.0).await
    }
}

#[derive(Clone)]
pub struct Shop {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) partitions: Vec<ActorRef<PartitionMsg>>,
    /// Per partition: whether other partitions' entities may write into it now (see
    /// [`crate::gate`]).
    pub(crate) gates: Vec<Arc<Gate>>,
    pub(crate) partitioner: Partitioner,
    pub(crate) wal: Wal,
    pub(crate) cfg: ShopConfig,
    pub(crate) ids: OrderIdGen,
    pub(crate) metrics: Arc<ActorMetrics>,
    /// Campaign figures for refusing buys without asking (see [`crate::board`]).
    pub(crate) board: crate::board::Board,
    /// Copies of active entities' durable state, for reads that skip the actors.
    pub(crate) views: Arc<Views>,
    ready: AtomicBool,
    /// `cfg.replica_groups`, until a cluster growing into replicas forms its groups
    /// ([`Shop::set_replica_groups`]).
    replica_groups: AtomicU16,
    /// Where partitions are served; `None` on a node that serves every partition itself.
    router: Option<Arc<dyn Router>>,
    /// Stops the background loops (timer dispatcher, checkpointer) at shutdown.
    stop: CancellationToken,
}

impl Shop {
    /// Starts every partition of this node (re-arming their timers from the persisted
    /// deadline index), the timer dispatcher and the checkpointer.
    pub async fn start(wal: Wal, cfg: ShopConfig) -> Result<Shop> {
        Self::launch(wal, cfg, None).await
    }

    /// Like [`Shop::start`], for a member of a cluster: a partition this node does not
    /// own is served by its owner, through `router`.
    pub async fn start_routed(wal: Wal, cfg: ShopConfig, router: Arc<dyn Router>) -> Result<Shop> {
        Self::launch(wal, cfg, Some(router)).await
    }

    async fn launch(wal: Wal, cfg: ShopConfig, router: Option<Arc<dyn Router>>) -> Result<Shop> {
        let metrics = Arc::new(ActorMetrics::default());
        let views = Arc::new(Views::default());
        let ctx = Arc::new(HostContext {
            wal: wal.clone(),
            metrics: metrics.clone(),
            views: views.clone(),
            clock: cfg.clock.clone(),
        });
        count_orders_by_status(&wal, &metrics)?;
        let (timer_tx, timer_rx) = mpsc::channel(4096);
        let mut partitions = Vec::with_capacity(usize::from(cfg.partitions));
        for index in 0..cfg.partitions {
            let args = PartitionArgs {
                index,
                config: PartitionConfig {
                    idle_timeout: cfg.idle_timeout,
                    max_active: (cfg.max_active / usize::from(cfg.partitions)).max(1),
                    max_queue: cfg.max_entity_queue.max(1),
                    tick: cfg.timer_tick,
                },
                ctx: ctx.clone(),
                timers: timer_tx.clone(),
                fenced: cfg.start_fenced,
            };
            let (actor, _) = Actor::spawn(None, PartitionActor, args)
                .await
                .map_err(|e| {
                    ShopError::Internal(format!("partition {index} failed to start: {e}"))
                })?;
            partitions.push(actor);
        }
        let gates = (0..cfg.partitions)
            .map(|_| Gate::new(cfg.start_fenced))
            .collect();
        let shop = Shop {
            inner: Arc::new(Inner {
                partitions,
                gates,
                partitioner: Partitioner::new(cfg.partitions),
                wal,
                ids: OrderIdGen::new(cfg.node_tag),
                replica_groups: AtomicU16::new(cfg.replica_groups),
                cfg,
                metrics,
                board: Default::default(),
                views,
                ready: AtomicBool::new(false),
                router,
                stop: CancellationToken::new(),
            }),
        };
        tokio::spawn(shop.clone().dispatch_timers(timer_rx));
        tokio::spawn(shop.clone().checkpoint_loop());
        shop.inner.ready.store(true, Ordering::Release);
        Ok(shop)
    }

    /// The replica groups of a replicated cluster (see [`ShopConfig::replica_groups`]);
    /// 0 when the node's one log holds every partition.
    pub fn replica_groups(&self) -> u16 {
        self.inner.replica_groups.load(Ordering::Acquire)
    }

    /// A cluster growing into replicas formed its `groups` (ADR 0016): records of two
    /// groups commit independently from now on. Set while every partition is fenced.
    pub fn set_replica_groups(&self, groups: u16) {
        self.inner.replica_groups.store(groups, Ordering::Release);
    }

    /// True once every partition has recovered and re-armed its timers, and while every
    /// partition's actor runs: a partition that died (a bug: no input makes one panic)
    /// leaves its entities unserved, and the node must say so.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
            && self.inner.partitions.iter().all(|p| {
                !matches!(
                    p.get_status(),
                    ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
                )
            })
    }

    pub fn metrics(&self) -> &ActorMetrics {
        &self.inner.metrics
    }

    pub fn wal(&self) -> &Wal {
        &self.inner.wal
    }

    pub fn config(&self) -> &ShopConfig {
        &self.inner.cfg
    }

    /// Business time now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> Millis {
        self.inner.cfg.clock.now_ms()
    }

    /// A new order id in the buyer's `partition`. On the system clock, not the business
    /// one: ids must stay unique and in creation order whatever a test's clock says.
    pub(crate) fn mint_order_id(&self, partition: u16) -> String {
        self.inner
            .ids
            .next(crate::clock::system_ms(), partition)
            .to_string()
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.cfg.clock
    }

    pub fn partitioner(&self) -> Partitioner {
        self.inner.partitioner
    }

    /// Stops the background loops and the actors, then flushes the log.
    pub async fn shutdown(&self) {
        self.inner.ready.store(false, Ordering::Release);
        self.inner.stop.cancel();
        for p in &self.inner.partitions {
            let _ = p
                .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(5)))
                .await;
        }
        // Fold what the log still holds, so the next start has nothing to replay. Best
        // effort: whatever is not folded is replayed from the log instead.
        let wal = self.inner.wal.clone();
        let folded = async move {
            wal.flush().await?;
            tokio::task::spawn_blocking(move || checkpoint_all(&wal))
                .await
                .map_err(|e| shardmall_persistence::Error::Failed(e.to_string()))?
        };
        if let Err(e) = folded.await {
            tracing::warn!(error = %e, "final checkpoint failed; the log is replayed at the next start");
        }
        if let Err(e) = self.inner.wal.shutdown().await {
            tracing::error!(error = %e, "flushing the log at shutdown failed");
        }
    }

    /// Entity actors currently active on this node.
    pub fn active_actors(&self) -> i64 {
        self.inner.metrics.active_actors.load(Ordering::Relaxed)
    }
}

pub(crate) fn millis(d: Duration) -> Millis {
    d.as_millis() as Millis
}

pub(crate) fn storage(e: shardmall_persistence::Error) -> ShopError {
    ShopError::Unavailable(format!("storage: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::order::OrderStatus;
    use shardmall_persistence::WalConfig;

    async fn shop(dir: &std::path::Path) -> Shop {
        let wal = Wal::open(WalConfig::new(dir.join("db"))).expect("open log");
        let cfg = ShopConfig {
            partitions: 4,
            ..ShopConfig::default()
        };
        Shop::start(wal, cfg).await.expect("start")
    }

    #[tokio::test]
    async fn a_dead_partition_makes_the_shop_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let shop = shop(dir.path()).await;
        assert!(shop.is_ready());
        shop.inner.partitions[2].kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while shop.is_ready() {
            assert!(
                std::time::Instant::now() < deadline,
                "a dead partition left the shop ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn sku(id: &str, stock: u64) -> NewSku {
        NewSku {
            sku_id: id.into(),
            name: id.into(),
            specs: BTreeMap::new(),
            price: Money {
                amount: 100,
                currency: "CNY".into(),
            },
            market_price: None,
            stock,
            low_stock_threshold: 0,
        }
    }

    fn product(skus: Vec<NewSku>) -> NewProduct {
        NewProduct {
            product_id: "p".into(),
            title: "t".into(),
            category: String::new(),
            brand: String::new(),
            description: String::new(),
            status: ProductStatus::OnShelf,
            skus,
        }
    }

    /// A payment whose reservation vanished on one line MUST NOT leave the other lines
    /// sold: they are restocked and the payment aborted, all or nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_payment_restocks_the_lines_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let shop = shop(dir.path()).await;
        shop.create_product(product(vec![sku("a", 10), sku("b", 10)]))
            .await
            .unwrap();
        let order = shop
            .checkout(
                "alice",
                Some(vec![("a".into(), 1), ("b".into(), 2)]),
                None,
                None,
            )
            .await
            .unwrap();
        let id = order.order_id.clone();
        let begin = OrderCommand::BeginPayment {
            payment_id: "pay-1".into(),
            amount: order.total.clone(),
        };
        let order = shop.order(&id, begin).await.unwrap().unwrap();
        // Line a committed, line b's reservation gone (as after an expiry).
        shop.sku(
            "a",
            SkuCommand::Commit {
                order_id: id.clone(),
            },
        )
        .await
        .unwrap();
        shop.sku(
            "b",
            SkuCommand::Release {
                order_id: id.clone(),
            },
        )
        .await
        .unwrap();

        let err = shop.finish_payment(order, "pay-1").await.unwrap_err();
        assert!(matches!(err, ShopError::InvalidStateMsg(_)), "{err:?}");
        let figures = |v: SkuView| (v.available, v.reserved, v.sold);
        assert_eq!(figures(shop.get_sku("a").await.unwrap()), (10, 0, 0));
        assert_eq!(figures(shop.get_sku("b").await.unwrap()), (10, 0, 0));
        let order = shop.get_order(&id).await.unwrap();
        assert_eq!(order.status, OrderStatus::PendingPayment);
        assert_eq!(order.payment_in_progress, None);
        shop.shutdown().await;
    }

    /// Reads served from published copies (ADR 0014) see every acknowledged write: each
    /// write's answer is followed by reads that must show it, while other tasks read the
    /// same SKU all along; a fenced partition's copies are not used.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_published_copy_never_hides_an_acknowledged_write() {
        let dir = tempfile::tempdir().unwrap();
        let shop = shop(dir.path()).await;
        shop.create_product(product(vec![sku("a", 10)]))
            .await
            .unwrap();
        assert_eq!(shop.get_sku("a").await.unwrap().available, 10);
        assert_eq!(
            shop.published_views(),
            1,
            "a read of a durable state publishes it"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (shop, stop) = (shop.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let v = shop.get_sku("a").await.unwrap();
                        assert!(v.version >= last, "a read went back in time");
                        last = v.version;
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        // Writers in parallel keep several writes of the SKU in flight at once.
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let shop = shop.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        let after = shop.adjust_stock("a", 1, "restock".into()).await.unwrap();
                        let read = shop.get_sku("a").await.unwrap();
                        assert!(
                            read.version >= after.version,
                            "writer {w}, write {i}: acknowledged at version {} but read {}",
                            after.version,
                            read.version
                        );
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.await.unwrap();
        }
        assert_eq!(shop.get_sku("a").await.unwrap().available, 210);
        // A fenced partition answers `Moved`, never from its copy.
        let p = shop.inner.partitioner.catalog(Kind::Sku, "a");
        shop.fence_partition(p).await.unwrap();
        assert_eq!(
            shop.published_views(),
            0,
            "its actors stopped and took their copies"
        );
        assert!(shop.published::<SkuState>(p, "a").is_none());
        shop.unfence_partition(p).await.unwrap();
        assert_eq!(shop.get_sku("a").await.unwrap().available, 210);
        shop.shutdown().await;
    }
}
