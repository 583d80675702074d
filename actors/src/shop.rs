//! The shop: every storefront operation, as calls to entity actors, including the sagas
//! that span several entities (product creation, checkout, payment, cancel, refund).
//!
//! Saga rules (DESIGN.md, "Actors and partitions"):
//! - checkout reserves on each SKU, idempotently per order id, then places the order; on
//!   any refusal it releases what it reserved. Every reservation expires at the payment
//!   deadline plus a grace period, so a crash between steps never holds stock forever;
//! - payment marks the order "payment in progress" (which blocks cancel and expiry), moves
//!   every SKU's units to sold, then marks the order paid. A success is answered only once
//!   all of that is durable. A crash in the middle is finished by the order's timer;
//! - a refund with restock puts the units back on each SKU (once per order id) before the
//!   order is marked refunded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorRef};
use shardmall_persistence::Wal;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::domain::campaign::CampaignState;
use crate::domain::cart::{CartCommand, CartState};
use crate::domain::idempotency::{idem_entity_id, IdemCommand, IdemState, StoredResponse};
use crate::domain::order::{
    CancelReason, Line, Order, OrderCommand, OrderState, OrderStatus, Shipment,
};
use crate::domain::payment::{PaymentCommand, PaymentError, PaymentState};
use crate::domain::product::{Product, ProductCommand, ProductState};
use crate::domain::sku::{SkuCommand, SkuState, SkuView};
use crate::domain::{Address, Entity, Kind, Millis, Money, ProductStatus};
use crate::error::{Result, ShopError};
use crate::errors_map::{cart_err, idem_err, order_err, product_err, sku_err, MOVING};
use crate::gate::Gate;
use crate::host::{now_ms, HostContext, MakeCompanion, Refusal, Request};
use crate::ids::OrderIdGen;
use crate::keys::{EntityKey, Partitioner};
use crate::metrics::ActorMetrics;
use crate::partition::{PartitionActor, PartitionArgs, PartitionConfig, PartitionMsg, Routed};
use crate::route::{
    ForwardError, IndexFilter, RemoteAnswer, RemoteCall, Route, Router, ScanPage, ScanRequest,
};

/// How long before a timer action that could not finish is tried again.
const RETRY_TIMER_AFTER: Duration = Duration::from_secs(5);

/// How many times a command whose partition moved is routed again, and the first pause
/// between tries (doubling, capped at [`MAX_ROUTE_PAUSE`]): about 3 s in all, longer than
/// a partition handoff takes.
const ROUTE_ATTEMPTS: u32 = 10;
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
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_log_bytes: 64 * 1024 * 1024,
            call_timeout: Duration::from_secs(10),
            start_fenced: false,
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
#[derive(Debug, Clone)]
pub enum IdemStart {
    Fresh,
    Replay(StoredResponse),
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
    ready: AtomicBool,
    /// Where partitions are served; unset on a node that serves every partition itself.
    router: OnceLock<Arc<dyn Router>>,
    /// Stops the background loops (timer dispatcher, checkpointer) at shutdown.
    stop: CancellationToken,
}

impl Shop {
    /// Starts every partition of this node (re-arming their timers from the persisted
    /// deadline index), the timer dispatcher and the checkpointer.
    pub async fn start(wal: Wal, cfg: ShopConfig) -> Result<Shop> {
        let metrics = Arc::new(ActorMetrics::default());
        let ctx = Arc::new(HostContext {
            wal: wal.clone(),
            metrics: metrics.clone(),
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
                cfg,
                metrics,
                board: Default::default(),
                ready: AtomicBool::new(false),
                router: OnceLock::new(),
                stop: CancellationToken::new(),
            }),
        };
        tokio::spawn(shop.clone().dispatch_timers(timer_rx));
        tokio::spawn(shop.clone().checkpoint_loop());
        shop.inner.ready.store(true, Ordering::Release);
        Ok(shop)
    }

    /// True once every partition has recovered and re-armed its timers.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
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

    // ---- plumbing ---------------------------------------------------------------------

    /// Hands routing to the cluster: from now on a partition this node does not own is
    /// served by its owner. Set once, before serving.
    pub fn set_router(&self, router: Arc<dyn Router>) {
        if self.inner.router.set(router).is_err() {
            tracing::warn!("the shop's router was already set; keeping the first");
        }
    }

    fn route(&self, partition: u16) -> Route {
        match self.inner.router.get() {
            Some(r) => r.route(partition),
            None => Route::Local,
        }
    }

    /// Stops serving `partition` here: new commands are answered `Moved`, timers are
    /// dropped, and this returns once every active entity has stopped with its writes
    /// durable.
    pub async fn fence_partition(&self, partition: u16) -> Result<()> {
        let gate = self.gate(partition)?;
        gate.close();
        self.partition_call(partition, PartitionMsg::Fence).await?;
        // Writes into it from other partitions' entities: queued, then applied.
        gate.drained().await;
        self.inner
            .wal
            .flush()
            .await
            .map_err(|e| ShopError::Unavailable(format!("log: {e}")))
    }

    /// Serves `partition` here again, timers re-armed from the store.
    pub async fn unfence_partition(&self, partition: u16) -> Result<()> {
        self.partition_call(partition, PartitionMsg::Unfence)
            .await?;
        self.gate(partition)?.open();
        Ok(())
    }

    fn gate(&self, partition: u16) -> Result<&Arc<Gate>> {
        self.inner
            .gates
            .get(usize::from(partition))
            .ok_or_else(|| ShopError::BadRequest(format!("partition {partition} does not exist")))
    }

    async fn partition_call(
        &self,
        partition: u16,
        msg: fn(ractor::RpcReplyPort<()>) -> PartitionMsg,
    ) -> Result<()> {
        let actor = self
            .inner
            .partitions
            .get(usize::from(partition))
            .ok_or_else(|| {
                ShopError::BadRequest(format!("partition {partition} does not exist"))
            })?;
        match actor.call(msg, Some(Duration::from_secs(30))).await {
            Ok(ractor::rpc::CallResult::Success(())) => Ok(()),
            Ok(_) => Err(ShopError::Unavailable(format!(
                "partition {partition} did not finish in time"
            ))),
            Err(e) => Err(ShopError::Internal(format!("partition {partition}: {e}"))),
        }
    }

    /// Sends one command to one entity, wherever its partition is served, and waits for
    /// its answer. A partition that moved (or is moving) is routed again, a bounded
    /// number of times.
    // PerformanceCriticalPath: every entity command passes here.
    pub(crate) async fn ask<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        if self.inner.router.get().is_none() {
            return self.ask_local::<E>(partition, id, cmd).await;
        }
        let mut pause = FIRST_ROUTE_PAUSE;
        for _ in 0..ROUTE_ATTEMPTS {
            let answer = match self.route(partition) {
                Route::Local => self.ask_local::<E>(partition, id, cmd.clone()).await,
                Route::Remote => self.ask_remote::<E>(partition, id, &cmd).await,
                Route::Unavailable(why) => return Err(Refusal::Unavailable(why)),
            };
            match answer {
                Err(Refusal::Moved) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_ROUTE_PAUSE);
                }
                other => return other,
            }
        }
        Err(Refusal::Unavailable(MOVING.into()))
    }

    /// Like [`Shop::ask`], but when the entity is served here its answer comes as soon as
    /// its record is queued for the log, and the receiver tells when it is durable (see
    /// `Request::durable`). The caller MUST wait for it before acknowledging anything.
    /// Served elsewhere, the answer comes once durable and there is no receiver.
    pub(crate) async fn ask_early<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
    ) -> (
        std::result::Result<E::View, Refusal<E::Error>>,
        Option<oneshot::Receiver<std::result::Result<(), String>>>,
    ) {
        if self.route(partition) == Route::Local {
            let (tx, rx) = oneshot::channel();
            match self
                .ask_local_with::<E>(partition, id, cmd.clone(), Some(tx), None)
                .await
            {
                // Moving: route it like any command.
                Err(Refusal::Moved) => {}
                answer => return (answer, Some(rx)),
            }
        }
        (self.ask::<E>(partition, id, cmd).await, None)
    }

    /// Sends a command that may write a companion record (see
    /// [`crate::host::Companion`]) to its partition, if that is served here; `None`
    /// when it is not (or is moving), and nothing was sent.
    pub(crate) async fn ask_here_with<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
        also: MakeCompanion<E>,
    ) -> Option<std::result::Result<E::View, Refusal<E::Error>>> {
        if self.route(partition) != Route::Local {
            return None;
        }
        match self
            .ask_local_with::<E>(partition, id, cmd, None, Some(also))
            .await
        {
            Err(Refusal::Moved) => None,
            answer => Some(answer),
        }
    }

    /// True when `partition` is served by this node now.
    pub(crate) fn serves_partition(&self, partition: u16) -> bool {
        self.route(partition) == Route::Local
    }

    /// Sends one command to this node's partition actor.
    async fn ask_local<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        self.ask_local_with::<E>(partition, id, cmd, None, None)
            .await
    }

    // PerformanceCriticalPath: every local entity command passes here.
    async fn ask_local_with<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
        durable: Option<oneshot::Sender<std::result::Result<(), String>>>,
        also: Option<MakeCompanion<E>>,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        let Some(actor) = self.inner.partitions.get(usize::from(partition)) else {
            return Err(Refusal::Unavailable(format!(
                "partition {partition} does not exist"
            )));
        };
        let id = id.to_owned();
        let res = actor
            .call(
                move |reply| {
                    let req = Request {
                        cmd,
                        reply,
                        durable,
                        also,
                    };
                    PartitionMsg::Deliver(Box::new(E::wrap(id, req)))
                },
                Some(self.inner.cfg.call_timeout),
            )
            .await;
        match res {
            Ok(ractor::rpc::CallResult::Success(answer)) => answer,
            Ok(ractor::rpc::CallResult::Timeout) => {
                Err(Refusal::Unavailable("entity did not answer in time".into()))
            }
            Ok(ractor::rpc::CallResult::SenderError) => Err(Refusal::Unavailable(
                "entity stopped before answering".into(),
            )),
            Err(e) => Err(Refusal::Unavailable(format!("partition unreachable: {e}"))),
        }
    }

    /// Sends one command to the node that owns its partition.
    async fn ask_remote<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: &E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        let Some(router) = self.inner.router.get() else {
            return Err(Refusal::Unavailable("no router".into()));
        };
        let cmd = crate::codec::encode(cmd)
            .map_err(|e| Refusal::Unavailable(format!("command failed to encode: {e}")))?;
        let call = RemoteCall {
            partition,
            kind: E::KIND,
            id: id.to_owned(),
            cmd,
        };
        match router.forward(call).await {
            Ok(bytes) => {
                match crate::codec::decode::<std::result::Result<E::View, E::Error>>(&bytes) {
                    Ok(Ok(view)) => Ok(view),
                    Ok(Err(e)) => Err(Refusal::Domain(e)),
                    Err(e) => Err(Refusal::Unavailable(format!(
                        "malformed answer from the owner: {e}"
                    ))),
                }
            }
            Err(ForwardError::Moved) => Err(Refusal::Moved),
            Err(ForwardError::Unavailable(why)) => Err(Refusal::Unavailable(why)),
            Err(ForwardError::Overloaded(what)) => Err(Refusal::Overloaded(what)),
        }
    }

    /// Serves a command another node forwarded here. The caller (the cluster) has checked
    /// that this node owns the partition at its current epoch.
    pub async fn serve_remote(&self, call: RemoteCall) -> RemoteAnswer {
        match call.kind {
            Kind::Product => self.serve_typed::<ProductState>(call).await,
            Kind::Sku => self.serve_typed::<SkuState>(call).await,
            Kind::Cart => self.serve_typed::<CartState>(call).await,
            Kind::Order => self.serve_typed::<OrderState>(call).await,
            Kind::Idempotency => self.serve_typed::<IdemState>(call).await,
            Kind::Payment => self.serve_typed::<PaymentState>(call).await,
            Kind::Campaign => self.serve_typed::<CampaignState>(call).await,
        }
    }

    async fn serve_typed<E: Routed>(&self, call: RemoteCall) -> RemoteAnswer {
        let expected = EntityKey::new(E::KIND, call.id.clone());
        if self.inner.partitioner.of(&expected) != Some(call.partition) {
            return RemoteAnswer::Malformed(format!(
                "{:?} {} is not in partition {}",
                E::KIND,
                call.id,
                call.partition
            ));
        }
        let cmd = match crate::codec::decode::<E::Command>(&call.cmd) {
            Ok(cmd) => cmd,
            Err(e) => return RemoteAnswer::Malformed(format!("command: {e}")),
        };
        let answer: std::result::Result<E::View, E::Error> =
            match self.ask_local::<E>(call.partition, &call.id, cmd).await {
                Ok(view) => Ok(view),
                Err(Refusal::Domain(e)) => Err(e),
                Err(Refusal::Moved) => return RemoteAnswer::Moving,
                Err(Refusal::Unavailable(why)) => return RemoteAnswer::Unavailable(why),
                Err(Refusal::Overloaded(what)) => return RemoteAnswer::Overloaded(what),
            };
        match crate::codec::encode(&answer) {
            Ok(bytes) => RemoteAnswer::Reply(bytes),
            Err(e) => RemoteAnswer::Unavailable(format!("answer failed to encode: {e}")),
        }
    }

    async fn product(
        &self,
        id: &str,
        cmd: ProductCommand,
    ) -> std::result::Result<Option<Product>, Refusal<<ProductState as Entity>::Error>> {
        let p = self.inner.partitioner.catalog(Kind::Product, id);
        self.ask::<ProductState>(p, id, cmd).await
    }

    pub(crate) async fn sku(
        &self,
        id: &str,
        cmd: SkuCommand,
    ) -> std::result::Result<Option<SkuView>, Refusal<<SkuState as Entity>::Error>> {
        let p = self.inner.partitioner.catalog(Kind::Sku, id);
        self.ask::<SkuState>(p, id, cmd).await
    }

    pub(crate) async fn order(
        &self,
        id: &str,
        cmd: OrderCommand,
    ) -> std::result::Result<Option<Order>, Refusal<<OrderState as Entity>::Error>> {
        let key = EntityKey::new(Kind::Order, id);
        let Some(p) = self.inner.partitioner.of(&key) else {
            return Ok(None);
        };
        self.ask::<OrderState>(p, id, cmd).await
    }

    async fn cart(
        &self,
        buyer: &str,
        cmd: CartCommand,
    ) -> std::result::Result<<CartState as Entity>::View, Refusal<<CartState as Entity>::Error>>
    {
        let p = self.inner.partitioner.buyer(buyer);
        self.ask::<CartState>(p, buyer, cmd).await
    }

    // ---- catalog ----------------------------------------------------------------------

    pub async fn create_product(&self, input: NewProduct) -> Result<ProductDetail> {
        let now = now_ms();
        let product = Product {
            product_id: input.product_id.clone(),
            title: input.title,
            category: input.category,
            brand: input.brand,
            description: input.description,
            status: input.status,
            sku_ids: input.skus.iter().map(|s| s.sku_id.clone()).collect(),
            created_at: now,
            updated_at: now,
            version: 0,
        };
        let created = self
            .product(&input.product_id, ProductCommand::Create(product))
            .await
            .map_err(|r| product_err(r, &input.product_id))?;
        let mut skus = Vec::with_capacity(input.skus.len());
        for s in &input.skus {
            let cmd = SkuCommand::Create {
                sku_id: s.sku_id.clone(),
                product_id: input.product_id.clone(),
                name: s.name.clone(),
                specs: s.specs.clone(),
                price: s.price.clone(),
                market_price: s.market_price.clone(),
                product_status: input.status,
                low_stock_threshold: s.low_stock_threshold,
                stock: s.stock,
            };
            match self.sku(&s.sku_id, cmd).await {
                Ok(Some(view)) => skus.push(view),
                Ok(None) => {}
                Err(refusal) => {
                    let err = sku_err(refusal, &s.sku_id);
                    // Roll the saga back: what this request created goes away, including
                    // a SKU whose create timed out (it may still land; the discard is
                    // queued behind it).
                    let mut undo: Vec<&str> = skus.iter().map(|v| v.sku_id.as_str()).collect();
                    if matches!(err, ShopError::Unavailable(_)) {
                        undo.push(&s.sku_id);
                    }
                    for sku_id in undo {
                        if let Err(e) = self.sku(sku_id, SkuCommand::Discard).await {
                            tracing::error!(sku = %sku_id, error = ?e, "rolling back a SKU failed");
                        }
                    }
                    if let Err(e) = self
                        .product(&input.product_id, ProductCommand::Discard)
                        .await
                    {
                        tracing::error!(product = %input.product_id, error = ?e, "rolling back a product failed");
                    }
                    return Err(err);
                }
            }
        }
        let product =
            created.ok_or_else(|| ShopError::Internal("created product has no state".into()))?;
        Ok(ProductDetail { product, skus })
    }

    pub async fn get_product(&self, id: &str) -> Result<ProductDetail> {
        let product = self
            .product(id, ProductCommand::Get)
            .await
            .map_err(|r| product_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("product {id}")))?;
        let mut skus = Vec::with_capacity(product.sku_ids.len());
        for sku_id in &product.sku_ids {
            if let Some(v) = self
                .sku(sku_id, SkuCommand::Get)
                .await
                .map_err(|r| sku_err(r, sku_id))?
            {
                skus.push(v);
            }
        }
        Ok(ProductDetail { product, skus })
    }

    pub async fn list_products(
        &self,
        category: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<ProductDetail>> {
        let filter = match category {
            Some(c) => IndexFilter::ValueIs(c.as_bytes().to_vec()),
            None => IndexFilter::All,
        };
        let (ids, next_cursor) = self
            .scan_index(ScanRequest {
                prefix: b"I/p/".to_vec(),
                kind: Kind::Product,
                cursor: cursor.map(str::to_owned),
                reverse: false,
                limit,
                filter,
                partition: None,
            })
            .await?;
        let mut items = Vec::with_capacity(ids.len());
        for id in &ids {
            match self.get_product(id).await {
                Ok(p) => items.push(p),
                Err(ShopError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Page { items, next_cursor })
    }

    pub async fn update_product(
        &self,
        id: &str,
        title: Option<String>,
        description: Option<String>,
        status: Option<ProductStatus>,
    ) -> Result<ProductDetail> {
        let product = self
            .product(
                id,
                ProductCommand::Update {
                    title,
                    description,
                    status,
                },
            )
            .await
            .map_err(|r| product_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("product {id}")))?;
        if let Some(status) = status {
            for sku_id in &product.sku_ids {
                self.sku(sku_id, SkuCommand::SetProductStatus(status))
                    .await
                    .map_err(|r| sku_err(r, sku_id))?;
            }
        }
        self.get_product(id).await
    }

    pub async fn get_sku(&self, id: &str) -> Result<SkuView> {
        self.sku(id, SkuCommand::Get)
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }

    pub async fn adjust_stock(&self, id: &str, delta: i64, reason: String) -> Result<SkuView> {
        self.sku(id, SkuCommand::AdjustStock { delta, reason })
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }

    pub async fn set_price(&self, id: &str, price: Money) -> Result<SkuView> {
        self.sku(id, SkuCommand::SetPrice(price))
            .await
            .map_err(|r| sku_err(r, id))?
            .ok_or_else(|| ShopError::NotFound(format!("sku {id}")))
    }

    // ---- cart -------------------------------------------------------------------------

    pub async fn get_cart(&self, buyer: &str) -> Result<Vec<CartLine>> {
        let items = self.cart(buyer, CartCommand::Get).await.map_err(cart_err)?;
        self.price_cart(items).await
    }

    pub async fn set_cart_item(
        &self,
        buyer: &str,
        sku_id: &str,
        quantity: u64,
    ) -> Result<Vec<CartLine>> {
        if quantity > 0 {
            self.get_sku(sku_id).await?;
        }
        let cmd = CartCommand::SetItem {
            sku_id: sku_id.to_owned(),
            quantity,
        };
        let items = self.cart(buyer, cmd).await.map_err(cart_err)?;
        self.price_cart(items).await
    }

    pub async fn remove_cart_item(&self, buyer: &str, sku_id: &str) -> Result<Vec<CartLine>> {
        let items = self
            .cart(
                buyer,
                CartCommand::RemoveItem {
                    sku_id: sku_id.to_owned(),
                },
            )
            .await
            .map_err(cart_err)?;
        self.price_cart(items).await
    }

    async fn price_cart(&self, items: BTreeMap<String, u64>) -> Result<Vec<CartLine>> {
        let mut lines = Vec::with_capacity(items.len());
        for (sku_id, quantity) in items {
            match self.get_sku(&sku_id).await {
                Ok(sku) => lines.push(CartLine {
                    sku_id,
                    quantity,
                    unit_price: sku.price,
                }),
                // A SKU removed from the catalog simply drops out of the priced cart.
                Err(ShopError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(lines)
    }

    // ---- orders -----------------------------------------------------------------------

    /// Places an order: reserves every line (saga), then records the order.
    pub async fn checkout(
        &self,
        buyer: &str,
        items: Option<Vec<(String, u64)>>,
        shipping_address: Option<Address>,
    ) -> Result<Order> {
        let from_cart = items.is_none();
        let items = match items {
            Some(items) => items,
            None => self
                .cart(buyer, CartCommand::Get)
                .await
                .map_err(cart_err)?
                .into_iter()
                .collect(),
        };
        let mut merged: BTreeMap<String, u64> = BTreeMap::new();
        for (sku, qty) in items {
            if qty == 0 {
                return Err(ShopError::BadRequest(format!(
                    "quantity of {sku} must be at least 1"
                )));
            }
            let q = merged.entry(sku).or_insert(0);
            *q = q
                .checked_add(qty)
                .ok_or_else(|| ShopError::BadRequest("quantity too large".into()))?;
        }
        if merged.is_empty() {
            return Err(ShopError::BadRequest(if from_cart {
                "the cart is empty".into()
            } else {
                "an order needs at least one item".into()
            }));
        }
        let now = now_ms();
        let partition = self.inner.partitioner.buyer(buyer);
        let order_id = self.inner.ids.next(now, partition).to_string();
        let deadline = now + millis(self.inner.cfg.payment_timeout);
        let expires_at = deadline + millis(self.inner.cfg.reservation_grace);

        let mut reserved: Vec<String> = Vec::with_capacity(merged.len());
        let mut lines = Vec::with_capacity(merged.len());
        let mut failure = None;
        for (sku_id, quantity) in &merged {
            let cmd = SkuCommand::Reserve {
                order_id: order_id.clone(),
                quantity: *quantity,
                expires_at,
            };
            match self.sku(sku_id, cmd).await {
                Ok(Some(sku)) => {
                    reserved.push(sku_id.clone());
                    lines.push(Line {
                        sku_id: sku_id.clone(),
                        name: sku.name,
                        unit_price: sku.price,
                        quantity: *quantity,
                    });
                }
                Ok(None) => {
                    failure = Some(ShopError::NotFound(format!("sku {sku_id}")));
                    break;
                }
                Err(r) => {
                    let err = sku_err(r, sku_id);
                    if matches!(err, ShopError::Unavailable(_)) {
                        // The reserve may still land after the timeout: release it too.
                        reserved.push(sku_id.clone());
                    }
                    failure = Some(err);
                    break;
                }
            }
        }
        if failure.is_none() {
            let currency = &lines[0].unit_price.currency;
            if lines.iter().any(|l| &l.unit_price.currency != currency) {
                failure = Some(ShopError::BadRequest(
                    "all lines of one order must share one currency".into(),
                ));
            }
        }
        if failure.is_none() {
            let cmd = OrderCommand::Place {
                order_id: order_id.clone(),
                buyer: buyer.to_owned(),
                lines,
                shipping_address,
                payment_deadline: deadline,
                campaign_id: None,
                placed_at: None,
                fresh: false,
            };
            match self.order(&order_id, cmd).await {
                Ok(Some(order)) => {
                    if from_cart {
                        let sku_ids = merged.keys().cloned().collect();
                        if let Err(e) = self.cart(buyer, CartCommand::RemoveItems { sku_ids }).await
                        {
                            tracing::warn!(buyer, error = ?e, "order placed but the cart was not emptied");
                        }
                    }
                    return Ok(order);
                }
                Ok(None) => failure = Some(ShopError::Internal("placed order has no state".into())),
                Err(r) => failure = Some(self.place_failed(r, &order_id).await),
            }
        }
        for sku_id in &reserved {
            self.release(sku_id, &order_id).await;
        }
        Err(failure.unwrap_or_else(|| ShopError::Internal("checkout failed".into())))
    }

    /// The error of a `Place` that failed. One that timed out may still land after the
    /// timeout: it is cancelled behind it (same mailbox, so in order), so no order
    /// survives without its reservations or claim. An order that never landed answers
    /// NotFound to the cancel.
    pub(crate) async fn place_failed(
        &self,
        r: Refusal<<OrderState as Entity>::Error>,
        order_id: &str,
    ) -> ShopError {
        let err = order_err(r, order_id);
        if matches!(err, ShopError::Unavailable(_)) {
            let cancel = OrderCommand::Cancel {
                reason: CancelReason::PaymentFailed,
            };
            if let Err(e) = self.order(order_id, cancel).await {
                tracing::warn!(order = %order_id, error = ?e, "cancelling an order whose placing timed out failed; it expires at its deadline");
            }
        }
        err
    }

    /// Gives a cancelled order's units back: to its campaign, or to each SKU.
    async fn release_order(&self, order: &Order) {
        match &order.campaign_id {
            Some(campaign_id) => self.release_claim(campaign_id, &order.order_id).await,
            None => {
                for line in &order.lines {
                    self.release(&line.sku_id, &order.order_id).await;
                }
            }
        }
    }

    pub(crate) async fn release(&self, sku_id: &str, order_id: &str) {
        let cmd = SkuCommand::Release {
            order_id: order_id.to_owned(),
        };
        if let Err(e) = self.sku(sku_id, cmd).await {
            // The reservation's own expiry returns the units later.
            tracing::warn!(sku = sku_id, order = order_id, error = ?e, "release failed; the reservation will expire");
        }
    }

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
                partition: buyer.map(|b| self.inner.partitioner.buyer(b)),
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
        if let Some(router) = self.inner.router.get() {
            let others = router.scan_others(req).await.map_err(|e| match e {
                ForwardError::Moved => ShopError::Unavailable(MOVING.into()),
                ForwardError::Unavailable(why) => ShopError::Unavailable(why),
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
        let clustered = self.inner.router.get().is_some();
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

    /// Pays an order through the API (`method: fake`): one payment id per order, so a
    /// retry continues the same payment.
    pub async fn pay(&self, order_id: &str, amount: Money) -> Result<Order> {
        // No shortcut for an already applied payment: a fresh pay of a paid order is an
        // illegal transition (409); a retry of the same request is replayed by its
        // Idempotency-Key before it gets here.
        let order = self.get_order(order_id).await?;
        if order.status != OrderStatus::PendingPayment {
            return Err(ShopError::InvalidState {
                status: order.status.as_str().into(),
            });
        }
        self.begin_and_finish_payment(order_id, &format!("api-{order_id}"), amount)
            .await
    }

    /// A payment provider's callback, applied at most once per payment id.
    pub async fn payment_callback(
        &self,
        payment_id: &str,
        order_id: &str,
        amount: Money,
        succeeded: bool,
    ) -> Result<Order> {
        if succeeded {
            // Claim the payment id for this order first: the claim is one entity's
            // decision, so two callbacks naming the same id for two orders cannot both
            // apply.
            let p = self.inner.partitioner.catalog(Kind::Payment, payment_id);
            let claim = PaymentCommand::Claim {
                order_id: order_id.to_owned(),
            };
            match self.ask::<PaymentState>(p, payment_id, claim).await {
                Ok(_) => {}
                Err(Refusal::Domain(PaymentError::ClaimedByAnother { .. })) => {
                    return Err(ShopError::InvalidStateMsg(format!(
                        "payment {payment_id} was already applied to another order"
                    )))
                }
                Err(Refusal::Unavailable(why)) => return Err(ShopError::Unavailable(why)),
                Err(Refusal::Overloaded(what)) => return Err(ShopError::Overloaded(what)),
                Err(Refusal::Moved) => return Err(ShopError::Unavailable(MOVING.into())),
            }
        }
        let order = self.get_order(order_id).await?;
        if order.payment_ids.contains(payment_id) || !succeeded {
            return Ok(order);
        }
        if order.flagged_payments.contains_key(payment_id) {
            // A retry of a callback already recorded for refund gets the same answer.
            return Err(ShopError::InvalidStateMsg(format!(
                "payment {payment_id} was recorded for refund: the order could not take it"
            )));
        }
        let refusal = if order.status == OrderStatus::PendingPayment {
            match self
                .settle_payment(order_id, payment_id, amount.clone())
                .await
            {
                Ok(order) => return Ok(order),
                // Not applied and may still apply on a retry: nothing to flag.
                Err(e @ (ShopError::Unavailable(_) | ShopError::NotFound(_))) => return Err(e),
                Err(e) => e,
            }
        } else {
            ShopError::InvalidState {
                status: order.status.as_str().into(),
            }
        };
        // The provider took the money but the order cannot take the payment (cancelled,
        // expired, paid by another payment, another amount): record it, never as a sale,
        // so it is refunded to the payer.
        let flag = OrderCommand::FlagPayment {
            payment_id: payment_id.to_owned(),
            amount,
        };
        self.order_cmd(order_id, flag).await?;
        tracing::warn!(
            order = order_id,
            payment = payment_id,
            error = %refusal,
            "provider payment not applied; recorded and flagged for refund"
        );
        Err(refusal)
    }

    async fn settle_payment(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: Money,
    ) -> Result<Order> {
        let current = self.get_order(order_id).await?;
        if current.payment_ids.contains(payment_id) {
            return Ok(current);
        }
        self.begin_and_finish_payment(order_id, payment_id, amount)
            .await
    }

    async fn begin_and_finish_payment(
        &self,
        order_id: &str,
        payment_id: &str,
        amount: Money,
    ) -> Result<Order> {
        let begin = OrderCommand::BeginPayment {
            payment_id: payment_id.to_owned(),
            amount,
        };
        let order = self
            .order(order_id, begin)
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))?;
        self.finish_payment(order, payment_id).await
    }

    /// Moves every line to sold, then marks the order paid. Safe to repeat.
    async fn finish_payment(&self, order: Order, payment_id: &str) -> Result<Order> {
        let order_id = order.order_id.clone();
        if let Some(campaign_id) = order.campaign_id.clone() {
            return self
                .finish_campaign_payment(order, &campaign_id, payment_id)
                .await;
        }
        // Commit every line before acting on a refusal, so the outcome is all or nothing.
        let mut committed = Vec::with_capacity(order.lines.len());
        let mut gone = None;
        for line in &order.lines {
            let cmd = SkuCommand::Commit {
                order_id: order_id.clone(),
            };
            match self.sku(&line.sku_id, cmd).await {
                Ok(_) => committed.push(line.sku_id.clone()),
                Err(r) => match sku_err(r, &line.sku_id) {
                    // Left in progress: the order's timer finishes the payment later
                    // (every step is idempotent).
                    err @ ShopError::Unavailable(_) => return Err(err),
                    err => {
                        tracing::error!(order = %order_id, sku = %line.sku_id, error = %err, "stock could not be committed; aborting the payment");
                        gone = Some(line.sku_id.clone());
                    }
                },
            }
        }
        if let Some(sku_id) = gone {
            // Undo the lines that did commit: their units go back to available, so
            // nothing stays sold for an order that is not paid.
            for sku in &committed {
                let cmd = SkuCommand::Restock {
                    order_id: order_id.clone(),
                };
                self.sku(sku, cmd).await.map_err(|r| sku_err(r, sku))?;
            }
            self.abort_payment(&order_id, payment_id).await?;
            return Err(ShopError::InvalidStateMsg(format!(
                "the reservation of {sku_id} is gone; the order cannot be paid"
            )));
        }
        self.mark_paid(&order_id, payment_id).await
    }

    /// The last step of a payment whose stock is committed: the order becomes `paid`.
    pub(crate) async fn mark_paid(&self, order_id: &str, payment_id: &str) -> Result<Order> {
        let paid = OrderCommand::MarkPaid {
            payment_id: payment_id.to_owned(),
            auto_confirm_after: millis(self.inner.cfg.auto_confirm_after),
        };
        self.order(order_id, paid)
            .await
            .map_err(|r| order_err(r, order_id))?
            .ok_or_else(|| ShopError::NotFound(format!("order {order_id}")))
    }

    /// A payment whose stock could not be committed: the order leaves "payment in
    /// progress" and can be cancelled or expire again.
    pub(crate) async fn abort_payment(&self, order_id: &str, payment_id: &str) -> Result<()> {
        let abort = OrderCommand::AbortPayment {
            payment_id: payment_id.to_owned(),
        };
        self.order(order_id, abort)
            .await
            .map_err(|r| order_err(r, order_id))?;
        Ok(())
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

    // ---- idempotency ------------------------------------------------------------------

    /// Every idempotency key is its own small entity in the subject's partition.
    fn idem_key(&self, sub: &str, scope: &str) -> (u16, String) {
        (
            self.inner.partitioner.buyer(sub),
            idem_entity_id(sub, scope),
        )
    }

    pub async fn idempotency_begin(
        &self,
        sub: &str,
        scope: &str,
        body_hash: u64,
    ) -> Result<IdemStart> {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Begin {
            scope: scope.to_owned(),
            body_hash,
        };
        match self.ask::<IdemState>(p, &id, cmd).await {
            Ok(_) => Ok(IdemStart::Fresh),
            Err(Refusal::Domain(e)) => idem_err(e),
            Err(Refusal::Unavailable(why)) => Err(ShopError::Unavailable(why)),
            Err(Refusal::Overloaded(what)) => Err(ShopError::Overloaded(what)),
            Err(Refusal::Moved) => Err(ShopError::Unavailable(MOVING.into())),
        }
    }

    pub async fn idempotency_complete(
        &self,
        sub: &str,
        scope: &str,
        response: StoredResponse,
    ) -> Result<()> {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Complete {
            scope: scope.to_owned(),
            response,
        };
        self.ask::<IdemState>(p, &id, cmd)
            .await
            .map(drop)
            .map_err(|r| match r {
                Refusal::Domain(e) => ShopError::Internal(format!("{e:?}")),
                Refusal::Unavailable(why) => ShopError::Unavailable(why),
                Refusal::Overloaded(what) => ShopError::Overloaded(what),
                Refusal::Moved => ShopError::Unavailable(MOVING.into()),
            })
    }

    pub async fn idempotency_abort(&self, sub: &str, scope: &str) {
        let (p, id) = self.idem_key(sub, scope);
        let cmd = IdemCommand::Abort {
            scope: scope.to_owned(),
        };
        if let Err(e) = self.ask::<IdemState>(p, &id, cmd).await {
            tracing::warn!(sub, scope, error = ?e, "could not release an idempotency key");
        }
    }

    // ---- timers and checkpoints -------------------------------------------------------

    async fn dispatch_timers(self, mut rx: mpsc::Receiver<EntityKey>) {
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

    /// Asks the entity's partition for a timer `after` from now.
    fn arm_in(&self, key: EntityKey, after: Duration) {
        if let Some(actor) = self
            .inner
            .partitioner
            .of(&key)
            .and_then(|p| self.inner.partitions.get(usize::from(p)))
        {
            let _ = actor.cast(PartitionMsg::Arm(key, now_ms() + millis(after)));
        }
    }

    /// Checkpoints when the log has grown by `checkpoint_log_bytes`, when it has been
    /// quiet for [`CHECKPOINT_QUIET`] with something unfolded, or at the latest every
    /// `checkpoint_interval`: a burst of writes pays for no checkpoint until it is over
    /// or has logged that much, and a quiet node folds everything promptly.
    async fn checkpoint_loop(self) {
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

/// Folds every partition's log into entity snapshots, then releases the log segments
/// nothing unfolded needs any more: that bounds the log.
pub fn checkpoint_all(wal: &Wal) -> std::result::Result<(), shardmall_persistence::Error> {
    for partition in wal.partitions_with_log()? {
        wal.checkpoint_partition(partition, &mut fold_entity)?;
    }
    wal.release_log()?;
    Ok(())
}

pub(crate) fn fold_entity(
    entity: &[u8],
    snapshot: Option<&[u8]>,
    tail: &[(u64, Vec<u8>)],
) -> std::result::Result<Option<Vec<u8>>, String> {
    fn fold<E: Entity>(
        snapshot: Option<&[u8]>,
        tail: &[(u64, Vec<u8>)],
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let state: E = crate::codec::rebuild(snapshot, tail.iter().map(|(_, r)| r))
            .map_err(|e| e.to_string())?;
        let bytes = crate::codec::encode(&state).map_err(|e| e.to_string())?;
        // A state equal to the empty one (an expired idempotency key, a discarded SKU)
        // needs no snapshot.
        let empty = crate::codec::encode(&E::default()).map_err(|e| e.to_string())?;
        Ok((bytes != empty).then_some(bytes))
    }
    let key = EntityKey::from_bytes(entity).ok_or("unknown entity key")?;
    match key.kind {
        Kind::Product => fold::<ProductState>(snapshot, tail),
        Kind::Sku => fold::<SkuState>(snapshot, tail),
        Kind::Cart => fold::<CartState>(snapshot, tail),
        Kind::Order => fold::<OrderState>(snapshot, tail),
        Kind::Idempotency => fold::<IdemState>(snapshot, tail),
        Kind::Payment => fold::<PaymentState>(snapshot, tail),
        Kind::Campaign => fold::<CampaignState>(snapshot, tail),
    }
}

fn count_orders_by_status(wal: &Wal, metrics: &ActorMetrics) -> Result<()> {
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

pub(crate) fn millis(d: Duration) -> Millis {
    d.as_millis() as Millis
}

pub(crate) fn storage(e: shardmall_persistence::Error) -> ShopError {
    ShopError::Unavailable(format!("storage: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmall_persistence::WalConfig;

    async fn shop(dir: &std::path::Path) -> Shop {
        let wal = Wal::open(WalConfig::new(dir.join("db"))).expect("open log");
        let cfg = ShopConfig {
            partitions: 4,
            ..ShopConfig::default()
        };
        Shop::start(wal, cfg).await.expect("start")
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

    /// A payment whose reservation vanished on one line MUST NOT leave the other lines
    /// sold: they are restocked and the payment aborted, all or nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aborted_payment_restocks_the_lines_it_committed() {
        let dir = tempfile::tempdir().unwrap();
        let shop = shop(dir.path()).await;
        shop.create_product(NewProduct {
            product_id: "p".into(),
            title: "t".into(),
            category: String::new(),
            brand: String::new(),
            description: String::new(),
            status: ProductStatus::OnShelf,
            skus: vec![sku("a", 10), sku("b", 10)],
        })
        .await
        .unwrap();
        let order = shop
            .checkout("alice", Some(vec![("a".into(), 1), ("b".into(), 2)]), None)
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
}
