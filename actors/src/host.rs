//! The ractor actor that hosts one entity's state machine.
//!
//! Handling a command: validate against current state -> produce events -> hand them to
//! the log -> apply them in memory -> answer once the log says they are durable. The actor
//! does not wait for the disk before taking its next message; its answers wait.
//! An answer MUST NOT be sent before the WAL position of its events is durable.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shardmall_persistence::{AuxOp, Part, Record, Wal};
use tokio::sync::{oneshot, watch};

use crate::clock::Clock;
use crate::codec;
use crate::domain::{Entity, Kind, Millis};
use crate::keys::EntityKey;
use crate::metrics::ActorMetrics;
use crate::partition::PartitionMsg;
use crate::views::{next_seq, Views};

/// What a caller of an entity gets back.
pub type Reply<E> = Result<<E as Entity>::View, Refusal<<E as Entity>::Error>>;

/// Why a command produced no answer from the domain.
#[derive(Debug, Clone)]
pub enum Refusal<Err> {
    /// The state machine refused the command.
    Domain(Err),
    /// The entity could not be reached, loaded or made durable.
    Unavailable(String),
    /// The entity's admission queue is full (names the entity): retry shortly.
    Overloaded(String),
    /// The entity's partition is not served here now (it is fenced for a handoff, or was
    /// handed over): route the command again.
    Moved,
}

/// One command on its way to an entity.
pub struct Request<E: Entity> {
    pub cmd: E::Command,
    pub reply: RpcReplyPort<Reply<E>>,
    /// When set, the answer leaves as soon as the command's record is queued for the log
    /// (not yet durable), and this is told when it is durable (or failed). Only a caller
    /// that itself waits for `durable` before acknowledging anything to a client may ask
    /// for it: the shop uses it to place a buy's order while the claim is being flushed.
    pub durable: Option<oneshot::Sender<Result<(), String>>>,
    /// Made from the command's answer when it writes: another entity's record, written
    /// in the same log frame (see [`Companion`]).
    pub also: Option<MakeCompanion<E>>,
}

impl<E: Entity> Request<E> {
    pub fn new(cmd: E::Command, reply: RpcReplyPort<Reply<E>>) -> Self {
        Request {
            cmd,
            reply,
            durable: None,
            also: None,
        }
    }
}

/// Other entities' records that a command writes in its own log frame, so one durable
/// write carries them all (ADR 0013: a flash-sale buy's claim and its order; ADR 0015: a
/// request's last write and its idempotent answer).
pub struct Companion {
    pub parts: Vec<Part>,
    /// Its index and deadline changes, applied with the frame.
    pub aux: Vec<AuxOp>,
    /// Runs on the log's thread once the frame is durable, before the answer leaves:
    /// tells the other entity's partition (arm its deadline, drop a stale activation).
    pub on_durable: Box<dyn FnOnce() + Send>,
    /// Held until the frame is queued: a fence of the other entity's partition waits for
    /// it, so no frame reaches a partition after it was handed over.
    pub hold: Box<dyn Send>,
}

/// The rest of a command whose record waits for room in the log's queue (see
/// [`Hosted::handle_now`]).
pub(crate) type Queueing =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ActorProcessingErr>> + Send>>;

/// Builds a command's [`Companion`] from its answer; `None` writes the command alone.
pub type MakeCompanion<E> = Box<dyn FnOnce(&<E as Entity>::View) -> Option<Companion> + Send>;

pub enum EntityMsg<E: Entity> {
    /// Boxed: a mailbox allocates room for several messages at a time, and some commands
    /// are large; small messages keep an idle actor's footprint small.
    Cmd(Box<Request<E>>),
    /// Sent by the partition when the entity has been idle: make everything durable,
    /// then stop. The partition holds later messages for a fresh activation.
    Passivate,
}

/// Things every entity actor of a node shares.
pub struct HostContext {
    pub wal: Wal,
    pub metrics: Arc<ActorMetrics>,
    /// Copies of active entities' durable state, read without asking them (ADR 0014).
    pub views: Arc<Views>,
    /// Business time (see [`crate::clock`]).
    pub clock: Clock,
}

pub struct EntityArgs {
    pub key: EntityKey,
    pub partition: u16,
    pub owner: ActorRef<PartitionMsg>,
    pub ctx: Arc<HostContext>,
    /// The previous activation failed and may have left appends in the log's queue: they
    /// MUST be applied before this activation reads the store.
    pub flush_first: bool,
    /// Commands in this actor's mailbox, counted by the partition for admission.
    pub queued: Arc<AtomicUsize>,
    /// A write made for this entity by its partition while no actor was active (see
    /// [`Hosted::load`]): the activation MUST wait until it is durable before reading.
    pub pending_write: Option<watch::Receiver<bool>>,
}

pub struct EntityActor<E>(PhantomData<fn() -> E>);

impl<E> Default for EntityActor<E> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

pub struct Hosted<E: Entity> {
    key: EntityKey,
    key_bytes: Vec<u8>,
    partition: u16,
    owner: ActorRef<PartitionMsg>,
    ctx: Arc<HostContext>,
    state: E,
    deadline: Option<Millis>,
    index: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Becomes true once this actor's latest write is durable.
    last_write: Option<watch::Receiver<bool>>,
    queued: Arc<AtomicUsize>,
    /// This activation's latest sequence number (see [`crate::views`]): taken when it
    /// starts and at each write.
    seq: u64,
    /// True for an actor: it publishes its view for reads and removes it when it stops.
    /// A partition deciding without an actor (`serve_inline`) publishes nothing.
    publishes: bool,
}

/// Publishes the state a write left, from the log's thread once it is durable and before
/// its caller is answered (see [`crate::views`]).
fn publish_durable<E: Entity>(republish: Option<(Arc<Views>, String, u64, E::View)>) {
    if let Some((views, id, seq, view)) = republish {
        if let Some(views) = views.of::<E>() {
            views.publish_durable(&id, seq, view);
        }
    }
}

/// The aux key of a persisted deadline: `D/` + partition + instant + entity key, so one
/// partition's pending timers are one ordered prefix scan at start-up.
pub fn deadline_key(partition: u16, at: Millis, entity: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(12 + entity.len());
    k.extend_from_slice(b"D/");
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(entity);
    k
}

pub fn deadline_prefix(partition: u16) -> Vec<u8> {
    let mut k = b"D/".to_vec();
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Splits a deadline key back into (instant, entity key).
pub fn parse_deadline_key(key: &[u8]) -> Option<(Millis, EntityKey)> {
    let rest = key.strip_prefix(b"D/")?.get(2..)?;
    let at = Millis::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    Some((at, EntityKey::from_bytes(rest.get(8..)?)?))
}

impl<E: Entity> Actor for EntityActor<E> {
    type Msg = EntityMsg<E>;
    type State = Hosted<E>;
    type Arguments = EntityArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: EntityArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if args.flush_first {
            args.ctx.wal.flush().await?;
        }
        if let Some(mut rx) = args.pending_write {
            if rx.wait_for(|durable| *durable).await.is_err() {
                // The write failed and the log refuses work; a flush reports it.
                args.ctx.wal.flush().await?;
            }
        }
        let mut hosted = Hosted::load(args.key, args.partition, args.owner, args.ctx, args.queued)?;
        hosted.publishes = true;
        hosted
            .ctx
            .metrics
            .active_actors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(hosted)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state
            .ctx
            .metrics
            .active_actors
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        state.unpublish();
        Ok(())
    }

    // PerformanceCriticalPath: every write of the engine passes here.
    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        hosted: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EntityMsg::Cmd(req) => {
                hosted.queued.fetch_sub(1, Ordering::Relaxed);
                let handled = match hosted.handle_now(*req) {
                    Ok(None) => Ok(()),
                    Ok(Some(wait)) => wait.await,
                    Err(e) => Err(e),
                };
                if handled.is_err() {
                    // The actor fails without `post_stop`: its copy goes now.
                    hosted.unpublish();
                }
                handled
            }
            EntityMsg::Passivate => {
                // Every append of this actor MUST be applied before a fresh activation
                // reads the store, or it would start from a stale state. Writes become
                // durable (hence applied) in order, so waiting for the last one is enough,
                // and an actor with nothing in flight stops at once.
                if let Some(mut rx) = hosted.last_write.take() {
                    if rx.wait_for(|durable| *durable).await.is_err() {
                        // The write failed and the log refuses work; a flush reports it.
                        hosted.ctx.wal.flush().await?;
                    }
                }
                myself.stop(Some("passivated".into()));
                Ok(())
            }
        }
    }
}

impl<E: Entity> Hosted<E> {
    /// The entity's state from its snapshot and log tail: what an activation starts from,
    /// and what a partition decides on when it serves a command without an actor.
    pub(crate) fn load(
        key: EntityKey,
        partition: u16,
        owner: ActorRef<PartitionMsg>,
        ctx: Arc<HostContext>,
        queued: Arc<AtomicUsize>,
    ) -> Result<Self, ActorProcessingErr> {
        Self::load_from(key, partition, owner, ctx, queued, false)
    }

    /// [`Hosted::load`], or with `fresh` for an entity whose id was just minted for this
    /// command: from the log's tail alone (see `Wal::load_new_entity`).
    pub(crate) fn load_from(
        key: EntityKey,
        partition: u16,
        owner: ActorRef<PartitionMsg>,
        ctx: Arc<HostContext>,
        queued: Arc<AtomicUsize>,
        fresh: bool,
    ) -> Result<Self, ActorProcessingErr> {
        let key_bytes = key.to_bytes();
        let log = if fresh {
            ctx.wal.load_new_entity(partition, &key_bytes)?
        } else {
            ctx.wal.load_entity(partition, &key_bytes)?
        };
        let state: E = codec::rebuild(log.snapshot.as_deref(), log.tail.iter().map(|(_, r)| r))?;
        let index = state.index_entries().into_iter().collect();
        let deadline = state.next_deadline();
        // Whatever an earlier activation published is older than this one.
        let seq = next_seq();
        if let Some(views) = ctx.views.of::<E>() {
            views.reset(&key.id, seq);
        }
        if let Some(at) = deadline {
            // The persisted deadline index already holds it; arming again is harmless and
            // covers a deadline that was armed in memory only before a passivation.
            let _ = owner.cast(PartitionMsg::Arm(key.clone(), at));
        }
        Ok(Hosted {
            key,
            key_bytes,
            partition,
            owner,
            ctx,
            state,
            deadline,
            index,
            last_write: None,
            queued,
            seq,
            publishes: false,
        })
    }

    /// Removes this activation's published copy (it stops or failed).
    fn unpublish(&self) {
        if let Some(views) = self.ctx.views.of::<E>() {
            views.remove(&self.key.id, self.seq);
        }
    }

    /// Becomes true once this entity's latest write is durable; `None` if it wrote
    /// nothing (or everything it wrote is durable).
    pub(crate) fn last_write(&self) -> Option<watch::Receiver<bool>> {
        self.last_write.clone().filter(|rx| !*rx.borrow())
    }

    /// Handles one command: decides, applies, and hands its record to the log.
    pub(crate) async fn handle_command(
        &mut self,
        req: Request<E>,
    ) -> Result<(), ActorProcessingErr> {
        match self.handle_now(req)? {
            None => Ok(()),
            Some(wait) => wait.await,
        }
    }

    /// [`Hosted::handle_command`] without a future of its own: `Ok(None)` when the
    /// command is done (answered, or its record queued for the log), `Ok(Some(wait))`
    /// when the log's queue was full and `wait` MUST be awaited before the next command
    /// (records of one entity are queued in order). The actor's handler stays small:
    /// ractor moves it for every message.
    // PerformanceCriticalPath: every write of the engine passes here.
    pub(crate) fn handle_now(
        &mut self,
        req: Request<E>,
    ) -> Result<Option<Queueing>, ActorProcessingErr> {
        // With `early` the caller is answered once the record is queued and told of its
        // durability separately (see `Request::durable`).
        let Request {
            cmd,
            reply,
            durable: early,
            also,
        } = req;
        let now = self.ctx.clock.now_ms();
        let events = match self.state.decide(&cmd, now) {
            Ok(events) => events,
            Err(refusal) => {
                if let Some(early) = early {
                    let _ = early.send(Ok(()));
                }
                self.answer_after_last_write(reply, Err(Refusal::Domain(refusal)));
                return Ok(None);
            }
        };
        if events.is_empty() {
            if let Some(early) = early {
                // The answer itself waits for the last write, so it is durable when seen.
                let _ = early.send(Ok(()));
            }
            let view = self.state.answer(&cmd);
            self.answer_after_last_write(reply, Ok(view));
            return Ok(None);
        }
        let payload = match codec::encode(&events) {
            Ok(p) => p,
            Err(e) => {
                if let Some(early) = early {
                    let _ = early.send(Err(e.to_string()));
                }
                let _ = reply.send(Err(Refusal::Unavailable(e.to_string())));
                return Ok(None);
            }
        };
        // Announce the write before it is handed to the log (see `crate::views`); if
        // someone reads this entity, its copy is replaced once the write is durable.
        self.seq = next_seq();
        let views = self.ctx.views.of::<E>();
        let wanted = views.is_some_and(|v| v.announce(&self.key.id, self.seq));
        for event in &events {
            self.state.apply(event);
        }
        let republish = if wanted && self.publishes {
            self.state
                .published()
                .map(|v| (self.ctx.views.clone(), self.key.id.clone(), self.seq, v))
        } else {
            None
        };
        let mut aux = self.derived_changes();
        let view = self.state.answer(&cmd);
        let companion = also.and_then(|make| make(&view));
        let (also, on_durable, hold) = match companion {
            Some(c) => {
                aux.extend(c.aux);
                (c.parts, Some(c.on_durable), Some(c.hold))
            }
            None => (Vec::new(), None, None),
        };
        // The answer leaves from the log's own thread the moment the record is durable:
        // no task waits for it. If the append fails the in-memory state is ahead of the
        // log: failing the actor discards it, and the next activation reloads what is
        // durable (the callback has answered the caller with the error).
        let (durable_tx, durable_rx) = watch::channel(false);
        self.last_write = Some(durable_rx);
        let record = Record {
            partition: self.partition,
            entity: self.key_bytes.clone(),
            payload,
            aux,
            also,
        };
        let wal = &self.ctx.wal;
        let (queued, answer_now) = match early {
            None => {
                let queued = wal.try_append_then(record, move |outcome| {
                    let answer = match outcome {
                        Ok(_) => {
                            publish_durable::<E>(republish);
                            let _ = durable_tx.send(true);
                            if let Some(f) = on_durable {
                                f();
                            }
                            Ok(view)
                        }
                        Err(e) => Err(Refusal::Unavailable(format!("log: {e}"))),
                    };
                    let _ = reply.send(answer);
                });
                (queued, None)
            }
            Some(early) => {
                // The caller is answered once the record is queued and told of
                // durability separately; it acknowledges nothing before that (see
                // `Request::durable`).
                let queued = wal.try_append_then(record, move |outcome| match outcome {
                    Ok(_) => {
                        publish_durable::<E>(republish);
                        let _ = durable_tx.send(true);
                        if let Some(f) = on_durable {
                            f();
                        }
                        let _ = early.send(Ok(()));
                    }
                    Err(e) => {
                        let _ = early.send(Err(format!("log: {e}")));
                    }
                });
                (queued, Some((reply, view)))
            }
        };
        // Queued, or failed: a fence of the companion's partition may go on (`hold` is
        // dropped on return, or by the wait below once the record is queued).
        match queued? {
            None => {
                if let Some((reply, view)) = answer_now {
                    let _ = reply.send(Ok(view));
                }
                drop(hold);
                Ok(None)
            }
            Some(full) => Ok(Some(Box::pin(async move {
                full.queued().await?;
                if let Some((reply, view)) = answer_now {
                    let _ = reply.send(Ok(view));
                }
                drop(hold);
                Ok(())
            }))),
        }
    }

    /// Answers a command that wrote nothing. Its answer was computed from state that may
    /// include writes not yet durable; it MUST NOT leave before they are, or a reader
    /// could see (and act on) a state a crash then loses. Records become durable in
    /// order, so waiting for the last write suffices.
    fn answer_after_last_write(&mut self, reply: RpcReplyPort<Reply<E>>, answer: Reply<E>) {
        match self.last_write.as_ref().filter(|rx| !*rx.borrow()) {
            None => {
                self.last_write = None;
                // A read answered from durable state: later reads may take it without
                // asking. (A refusal publishes nothing: nobody may ever read this entity.)
                if self.publishes && answer.is_ok() {
                    if let Some(views) = self.ctx.views.of::<E>() {
                        views.offer(&self.key.id, self.seq, || self.state.published());
                    }
                }
                let _ = reply.send(answer);
            }
            Some(rx) => {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    // An error means the write failed: its own caller was told; this
                    // answer is not safe to give.
                    let answer = match rx.wait_for(|durable| *durable).await {
                        Ok(_) => answer,
                        Err(_) => Err(Refusal::Unavailable("an earlier write failed".into())),
                    };
                    let _ = reply.send(answer);
                });
            }
        }
    }

    /// Index and deadline changes implied by the last command, as aux operations written
    /// atomically with its events.
    fn derived_changes(&mut self) -> Vec<AuxOp> {
        let mut ops = Vec::new();
        let new_index: BTreeMap<Vec<u8>, Vec<u8>> =
            self.state.index_entries().into_iter().collect();
        if new_index != self.index {
            for k in self.index.keys() {
                if !new_index.contains_key(k) {
                    ops.push(AuxOp::Delete(k.clone()));
                }
            }
            for (k, v) in &new_index {
                if self.index.get(k) != Some(v) {
                    ops.push(AuxOp::Put(k.clone(), v.clone()));
                }
            }
            self.observe_index(&new_index);
            self.index = new_index;
        }
        let deadline = self.state.next_deadline();
        if deadline != self.deadline {
            if let Some(old) = self.deadline {
                ops.push(AuxOp::Delete(deadline_key(
                    self.partition,
                    old,
                    &self.key_bytes,
                )));
            }
            if let Some(at) = deadline {
                ops.push(AuxOp::Put(
                    deadline_key(self.partition, at, &self.key_bytes),
                    Vec::new(),
                ));
                let _ = self.owner.cast(PartitionMsg::Arm(self.key.clone(), at));
            }
            self.deadline = deadline;
        }
        ops
    }

    /// Metrics derived from index changes: orders by status, low-stock alerts.
    fn observe_index(&self, new_index: &BTreeMap<Vec<u8>, Vec<u8>>) {
        match E::KIND {
            Kind::Order => {
                let status = |idx: &BTreeMap<Vec<u8>, Vec<u8>>| {
                    idx.iter()
                        .find(|(k, _)| k.starts_with(b"I/o/"))
                        .and_then(|(_, v)| v.split(|b| *b == 0).nth(1))
                        .and_then(|s| std::str::from_utf8(s).ok())
                        .map(str::to_owned)
                };
                let (before, after) = (status(&self.index), status(new_index));
                if before != after {
                    self.ctx
                        .metrics
                        .order_status_changed(before.as_deref(), after.as_deref());
                }
            }
            Kind::Sku => {
                let low =
                    |idx: &BTreeMap<Vec<u8>, Vec<u8>>| idx.keys().any(|k| k.starts_with(b"I/low/"));
                if low(new_index) && !low(&self.index) {
                    self.ctx
                        .metrics
                        .low_stock_alerts
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(sku = %self.key.id, "low stock: available fell to the threshold");
                }
            }
            _ => {}
        }
    }
}
