//! The entity bus: how the shop's operations reach an entity. A command goes to the
//! entity's partition on this node, or through the cluster's [`Router`] to the node that
//! owns it; `Moved` (a partition handed over meanwhile) is retried here and nowhere else.
//! Reads of an active entity take its published copy when this node serves it
//! (ADR 0014). Partitions are fenced and unfenced here for handoffs.

use super::*;
use crate::domain::campaign::{CampaignCommand, CampaignState};

impl Shop {
    pub(super) fn route(&self, partition: u16) -> Route {
        match &self.inner.router {
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

    pub(super) fn gate(&self, partition: u16) -> Result<&Arc<Gate>> {
        self.inner
            .gates
            .get(usize::from(partition))
            .ok_or_else(|| ShopError::BadRequest(format!("partition {partition} does not exist")))
    }

    pub(super) async fn partition_call(
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

    /// Reads one entity: its published copy when its partition is served here and its
    /// actor has published one (ADR 0014), otherwise `get` is asked like any command.
    // PerformanceCriticalPath: every read of a SKU, campaign, order or product.
    pub(crate) async fn read<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        get: E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        if let Some(view) = self.published::<E>(partition, id) {
            return Ok(view);
        }
        self.ask::<E>(partition, id, get).await
    }

    pub(super) fn published<E: Routed>(&self, partition: u16, id: &str) -> Option<E::View> {
        Some(self.published_copy::<E>(partition, id)?.view.clone())
    }

    pub(super) fn published_copy<E: Entity>(
        &self,
        partition: u16,
        id: &str,
    ) -> Option<Arc<PublishedCopy<E::View>>> {
        let copy = self.inner.views.of::<E>()?.copy(id)?;
        // Taken after the copy: a fence that closed the gate since is seen here.
        let open = self.inner.gates.get(usize::from(partition))?.is_open();
        (open && self.route(partition) == Route::Local).then_some(copy)
    }

    /// The published copy of the active entity `id` of `E`'s kind (an order, a SKU, a
    /// campaign, a product) when it is served here (ADR 0014): what a read of it answers
    /// now, with a slot where the edge keeps its rendered body. `None`: read it the usual
    /// way.
    pub fn copy_of<E: Entity>(&self, id: &str) -> Option<Arc<PublishedCopy<E::View>>> {
        let p = self.inner.partitioner.of_id(E::KIND, id)?;
        self.published_copy::<E>(p, id)
    }

    /// Published copies held now (active entities that were read).
    pub fn published_views(&self) -> usize {
        self.inner.views.len()
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
        if self.inner.router.is_none() {
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
        // Replica groups commit independently: no early answer, whose durability would
        // be told by another group's log.
        if self.replica_groups() == 0 && self.route(partition) == Route::Local {
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

    /// True when a record of `partition` may ride in a frame of `decider`'s: both are
    /// served here and written to the same log (one log, or one replica group).
    pub(crate) fn may_ride_along(&self, partition: u16, decider: u16) -> bool {
        let groups = self.replica_groups();
        (groups == 0 || partition % groups == decider % groups) && self.serves_partition(partition)
    }

    /// Sends one command to this node's partition actor.
    pub(super) async fn ask_local<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        self.ask_local_with::<E>(partition, id, cmd, None, None)
            .await
    }

    // PerformanceCriticalPath: every local entity command passes here.
    pub(super) async fn ask_local_with<E: Routed>(
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
    pub(super) async fn ask_remote<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: &E::Command,
    ) -> std::result::Result<E::View, Refusal<E::Error>> {
        self.ask_remote_as::<E, E::View>(partition, id, cmd).await
    }

    /// [`Shop::ask_remote`] for a command whose owner answers `V` (not the entity's
    /// view): one the owner's shop serves around the entity.
    pub(super) async fn ask_remote_as<E: Routed, V: serde::de::DeserializeOwned>(
        &self,
        partition: u16,
        id: &str,
        cmd: &E::Command,
    ) -> std::result::Result<V, Refusal<E::Error>> {
        remote_view::<E, V>(self.forward_call::<E>(partition, id, cmd).await)
    }

    /// Sends one command to the node that owns its partition: the answer's bytes.
    pub(super) async fn forward_call<E: Routed>(
        &self,
        partition: u16,
        id: &str,
        cmd: &E::Command,
    ) -> std::result::Result<Vec<u8>, ForwardError> {
        let Some(router) = &self.inner.router else {
            return Err(ForwardError::Unavailable("no router".into()));
        };
        let cmd = crate::codec::encode(cmd)
            .map_err(|e| ForwardError::Unavailable(format!("command failed to encode: {e}")))?;
        let call = RemoteCall {
            partition,
            kind: E::KIND,
            id: id.to_owned(),
            cmd,
        };
        router.forward(call).await
    }

    /// Serves a command another node forwarded here. The caller (the cluster) has checked
    /// that this node owns the partition at its current epoch.
    pub async fn serve_remote(&self, call: RemoteCall) -> RemoteAnswer {
        if call.kind == Kind::Campaign {
            // A buy sent whole is served around the campaign (its order rides along).
            let (p, id) = (call.partition, &call.id);
            return match self.read_call::<CampaignState>(&call) {
                Ok(CampaignCommand::BuyAndPlace(buy)) => self.serve_buy_and_place(p, id, buy).await,
                Ok(cmd) => remote_answer(self.ask_local::<CampaignState>(p, id, cmd).await),
                Err(refused) => refused,
            };
        }
        struct Serve<'a> {
            shop: &'a Shop,
            call: RemoteCall,
        }
        impl<'a> KindVisitor for Serve<'a> {
            type Out = BoxFuture<'a, RemoteAnswer>;
            fn visit<E: Routed>(self) -> Self::Out {
                Box::pin(self.shop.serve_typed::<E>(self.call))
            }
        }
        kinds::visit(call.kind, Serve { shop: self, call }).await
    }

    pub(super) async fn serve_typed<E: Routed>(&self, call: RemoteCall) -> RemoteAnswer {
        match self.read_call::<E>(&call) {
            Ok(cmd) => remote_answer(self.ask_local::<E>(call.partition, &call.id, cmd).await),
            Err(refused) => refused,
        }
    }

    /// The command of a forwarded call, once its entity is known to be in its partition.
    fn read_call<E: Routed>(
        &self,
        call: &RemoteCall,
    ) -> std::result::Result<E::Command, RemoteAnswer> {
        let expected = EntityKey::new(E::KIND, call.id.clone());
        if self.inner.partitioner.of(&expected) != Some(call.partition) {
            return Err(RemoteAnswer::Malformed(format!(
                "{:?} {} is not in partition {}",
                E::KIND,
                call.id,
                call.partition
            )));
        }
        crate::codec::decode::<E::Command>(&call.cmd)
            .map_err(|e| RemoteAnswer::Malformed(format!("command: {e}")))
    }

    pub(super) async fn product(
        &self,
        id: &str,
        cmd: ProductCommand,
    ) -> std::result::Result<Option<Product>, Refusal<<ProductState as Entity>::Error>> {
        let p = self.inner.partitioner.catalog(Kind::Product, id);
        match cmd {
            ProductCommand::Get => self.read::<ProductState>(p, id, cmd).await,
            cmd => self.ask::<ProductState>(p, id, cmd).await,
        }
    }

    pub(crate) async fn sku(
        &self,
        id: &str,
        cmd: SkuCommand,
    ) -> std::result::Result<Option<SkuView>, Refusal<<SkuState as Entity>::Error>> {
        let p = self.inner.partitioner.catalog(Kind::Sku, id);
        match cmd {
            SkuCommand::Get => self.read::<SkuState>(p, id, cmd).await,
            cmd => self.ask::<SkuState>(p, id, cmd).await,
        }
    }

    pub(crate) async fn order(
        &self,
        id: &str,
        cmd: OrderCommand,
    ) -> std::result::Result<Option<Order>, Refusal<<OrderState as Entity>::Error>> {
        let Some(p) = self.inner.partitioner.of_id(Kind::Order, id) else {
            return Ok(None);
        };
        match cmd {
            OrderCommand::Get => self.read::<OrderState>(p, id, cmd).await,
            cmd => self.ask::<OrderState>(p, id, cmd).await,
        }
    }

    pub(super) async fn cart(
        &self,
        buyer: &str,
        cmd: CartCommand,
    ) -> std::result::Result<<CartState as Entity>::View, Refusal<<CartState as Entity>::Error>>
    {
        let p = self.inner.partitioner.buyer(buyer);
        self.ask::<CartState>(p, buyer, cmd).await
    }
}

/// What the owner of a partition sends back for a forwarded command: the answer, or why
/// there is none.
pub(super) fn remote_answer<V: serde::Serialize, Er: serde::Serialize>(
    answer: std::result::Result<V, Refusal<Er>>,
) -> RemoteAnswer {
    let answer: std::result::Result<V, Er> = match answer {
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

/// The answer (`Result<V, E::Error>`) in the bytes a forwarded command got back.
pub(super) fn remote_view<E: Routed, V: serde::de::DeserializeOwned>(
    answer: std::result::Result<Vec<u8>, ForwardError>,
) -> std::result::Result<V, Refusal<E::Error>> {
    match answer {
        Ok(bytes) => match crate::codec::decode::<std::result::Result<V, E::Error>>(&bytes) {
            Ok(Ok(view)) => Ok(view),
            Ok(Err(e)) => Err(Refusal::Domain(e)),
            Err(e) => Err(Refusal::Unavailable(format!(
                "malformed answer from the owner: {e}"
            ))),
        },
        Err(ForwardError::Moved) => Err(Refusal::Moved),
        Err(ForwardError::Unavailable(why) | ForwardError::Unreadable(why)) => {
            Err(Refusal::Unavailable(why))
        }
        Err(ForwardError::Overloaded(what)) => Err(Refusal::Overloaded(what)),
    }
}
