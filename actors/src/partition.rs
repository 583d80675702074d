//! One partition: the registry of its active entity actors, their supervisor, and the
//! partition's timer wheel.
//!
//! Every message to an entity of the partition passes through this actor, so it knows
//! exactly what each entity has been sent. That makes passivation race-free without a
//! lock: once `Passivate` is sent, later messages for that entity are held here and
//! delivered to a fresh activation after the old actor has stopped (and made its last
//! appends durable). A message that races a stop is never dropped.
//!
//! The timer wheel is an ordered set of (deadline, entity) checked on a fixed tick. It is
//! re-armed at start-up from the persisted deadline index (`D/` aux keys), not from a scan
//! of every entity; a fired timer only nudges the entity, whose state decides what is due.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{mpsc, watch};

use crate::domain::order::OrderCommand;
use crate::domain::{idempotency::IdemState, order::OrderState, Entity, Millis};
use crate::host::{self, EntityArgs, HostContext, Hosted, Refusal, Request};
use crate::keys::EntityKey;
use crate::kinds::{self, AnyRef, Envelope};

pub enum PartitionMsg {
    /// Boxed: commands are large, and most partition messages are not.
    Deliver(Box<Envelope>),
    /// An entity wants its timer command at this instant.
    Arm(EntityKey, Millis),
    /// The wheel's tick: fire what is due.
    Tick,
    /// Passivate entities idle for longer than the configured period.
    Sweep,
    ActiveCount(ractor::RpcReplyPort<usize>),
    /// Stop serving: refuse new commands with `Moved`, drop the timers, passivate every
    /// entity, and answer once the last one has stopped (its writes durable).
    Fence(ractor::RpcReplyPort<()>),
    /// Serve again: re-arm the timers from the persisted deadline index.
    Unfence(ractor::RpcReplyPort<()>),
    /// Another entity's log frame wrote this entity's first record, now durable and
    /// applied (see [`crate::host::Companion`]): arm its deadline, and drop an activation
    /// that loaded before the record was there.
    Delivered(EntityKey, Option<Millis>),
}

enum Slot {
    Active {
        actor: AnyRef,
        last_used: Instant,
        /// Commands sent to the actor and not yet taken from its mailbox.
        queued: Arc<AtomicUsize>,
    },
    /// Passivation requested; messages wait here for the next activation.
    // Boxed as they arrive: no need to move them out and in again.
    #[allow(clippy::vec_box)]
    Stopping {
        /// The actor being stopped.
        actor_id: ActorId,
        held: Vec<Box<Envelope>>,
    },
}

impl Slot {
    /// Asks an active entity to stop (its writes become durable first); commands that
    /// arrive meanwhile wait in the slot for a fresh activation. True if it was active.
    fn passivate(&mut self) -> bool {
        let Slot::Active { actor, .. } = self else {
            return false;
        };
        actor.passivate();
        *self = Slot::Stopping {
            actor_id: actor.id(),
            held: Vec::new(),
        };
        true
    }
}

#[derive(Debug, Clone)]
pub struct PartitionConfig {
    pub idle_timeout: Duration,
    pub tick: Duration,
    /// The memory budget: at most this many active entities; past it the least recently
    /// used one is passivated.
    pub max_active: usize,
    /// Admission bound of one entity: commands waiting in its mailbox. Past it, callers
    /// are answered `Overloaded` at once instead of queueing.
    pub max_queue: usize,
}

pub struct PartitionArgs {
    pub index: u16,
    pub config: PartitionConfig,
    pub ctx: Arc<HostContext>,
    /// Due timers are handed to the node's timer dispatcher (which may need several
    /// entities, e.g. an expired order releasing stock on its SKUs).
    pub timers: mpsc::Sender<EntityKey>,
    /// Start fenced (another node may own the partition): see [`PartitionMsg::Fence`].
    pub fenced: bool,
}

pub struct PartitionActor;

pub struct PartitionState {
    index: u16,
    config: PartitionConfig,
    ctx: Arc<HostContext>,
    timers_out: mpsc::Sender<EntityKey>,
    slots: HashMap<EntityKey, Slot>,
    by_actor: HashMap<ActorId, EntityKey>,
    /// Entities whose last actor died without passivating (see `EntityArgs::flush_first`).
    failed: HashSet<EntityKey>,
    /// Writes this partition made for entities without an actor ([`Self::serve_inline`])
    /// that may not be durable yet: an activation of one waits for its write first.
    inline_writes: HashMap<EntityKey, watch::Receiver<bool>>,
    wheel: BTreeSet<(Millis, EntityKey)>,
    /// Slots that are `Active`.
    active: usize,
    /// Not serving: every command is answered `Moved`.
    fenced: bool,
    /// Callers of `Fence` waiting for the last entity to stop.
    draining: Vec<ractor::RpcReplyPort<()>>,
}

impl Actor for PartitionActor {
    type Msg = PartitionMsg;
    type State = PartitionState;
    type Arguments = PartitionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PartitionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let wheel = if args.fenced {
            BTreeSet::new()
        } else {
            load_wheel(&args.ctx, args.index)?
        };
        myself.send_interval(args.config.tick, || PartitionMsg::Tick);
        let sweep = (args.config.idle_timeout / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10));
        myself.send_interval(sweep, || PartitionMsg::Sweep);
        Ok(PartitionState {
            index: args.index,
            config: args.config,
            ctx: args.ctx,
            timers_out: args.timers,
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            failed: HashSet::new(),
            inline_writes: HashMap::new(),
            wheel,
            active: 0,
            fenced: args.fenced,
            draining: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            PartitionMsg::Deliver(env) => {
                if let Some((key, env)) = state.deliver(env) {
                    Box::pin(state.deliver_inactive(&myself, key, env)).await;
                }
            }
            PartitionMsg::Arm(key, at) => {
                if !state.fenced {
                    state.wheel.insert((at, key));
                }
            }
            PartitionMsg::Fence(reply) => state.fence(reply),
            PartitionMsg::Unfence(reply) => {
                if state.fenced {
                    match load_wheel(&state.ctx, state.index) {
                        Ok(wheel) => {
                            state.wheel = wheel;
                            state.fenced = false;
                        }
                        Err(e) => {
                            // Stay fenced: serving without the timers would leave
                            // deadlines unmet. The caller sees the dropped reply.
                            tracing::error!(partition = state.index, error = %e, "cannot load the partition's timers; it stays fenced");
                            return Ok(());
                        }
                    }
                }
                let _ = reply.send(());
            }
            PartitionMsg::Delivered(key, deadline) => state.delivered(key, deadline),
            PartitionMsg::Tick => state.fire_due(),
            PartitionMsg::Sweep => state.sweep(),
            PartitionMsg::ActiveCount(reply) => {
                let n = state
                    .slots
                    .values()
                    .filter(|s| matches!(s, Slot::Active { .. }))
                    .count();
                let _ = reply.send(n);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // One failing entity MUST NOT take its partition (and so its neighbours) down:
        // forget it; its next message activates it afresh from what is durable.
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.stopped(&myself, &cell, None).await
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                state.stopped(&myself, &cell, Some(err.to_string())).await
            }
            _ => {}
        }
        Ok(())
    }
}

/// The partition's pending timers, from the persisted deadline index.
fn load_wheel(
    ctx: &HostContext,
    partition: u16,
) -> Result<BTreeSet<(Millis, EntityKey)>, shardmall_persistence::Error> {
    let mut wheel = BTreeSet::new();
    let prefix = host::deadline_prefix(partition);
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = ctx.wal.aux_scan(&prefix, after.as_deref(), false, 4096)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (k, _) in &page {
            if let Some(entry) = host::parse_deadline_key(k) {
                wheel.insert(entry);
            }
        }
    }
    Ok(wheel)
}

impl PartitionState {
    fn fence(&mut self, reply: ractor::RpcReplyPort<()>) {
        self.fenced = true;
        self.wheel.clear();
        for slot in self.slots.values_mut() {
            if slot.passivate() {
                self.active -= 1;
            }
        }
        self.draining.push(reply);
        self.drained();
    }

    fn delivered(&mut self, key: EntityKey, deadline: Option<Millis>) {
        if self.fenced {
            // The handoff carries the record; the new owner arms from its index.
            return;
        }
        // An activation that loaded before the record was applied (someone asked for
        // the id before it existed) is stale: its commands wait for a fresh one.
        if self.slots.get_mut(&key).is_some_and(Slot::passivate) {
            self.active -= 1;
        }
        if let Some(at) = deadline {
            self.wheel.insert((at, key));
        }
    }

    /// Answers the `Fence` callers once no entity is left.
    fn drained(&mut self) {
        if self.fenced && self.slots.is_empty() {
            for reply in self.draining.drain(..) {
                let _ = reply.send(());
            }
        }
    }

    /// Delivers a command to its entity's active actor without awaiting anything (the
    /// common case); answers the envelope back when the entity has no actor and must be
    /// served inline or activated by [`PartitionState::deliver_inactive`]. Kept apart
    /// so that the handler's future stays small: ractor moves it for every message.
    // PerformanceCriticalPath: every entity command passes here.
    fn deliver(&mut self, env: Box<Envelope>) -> Option<(EntityKey, Box<Envelope>)> {
        if self.fenced {
            env.moved();
            return None;
        }
        let key = env.key();
        match self.slots.get_mut(&key) {
            Some(Slot::Stopping { held, .. }) => {
                held.push(env);
                None
            }
            Some(Slot::Active {
                actor,
                last_used,
                queued,
            }) => {
                *last_used = Instant::now();
                if queued.load(Ordering::Relaxed) >= self.config.max_queue {
                    self.ctx.metrics.overloaded.fetch_add(1, Ordering::Relaxed);
                    env.overload();
                    return None;
                }
                queued.fetch_add(1, Ordering::Relaxed);
                match actor.send(env) {
                    Ok(()) | Err(None) => None,
                    Err(Some(env)) => {
                        // The actor is gone and its termination event is still on its
                        // way: forget it now; `stopped` ignores the late event.
                        self.slots.remove(&key);
                        self.active -= 1;
                        self.failed.insert(key.clone());
                        Some((key, env))
                    }
                }
            }
            None => Some((key, env)),
        }
    }

    /// Serves a command whose entity has no actor: inline when it may be decided without
    /// one, otherwise by activating it.
    async fn deliver_inactive(
        &mut self,
        myself: &ActorRef<PartitionMsg>,
        key: EntityKey,
        env: Box<Envelope>,
    ) {
        // An actor that just died is in `failed`: it is activated afresh, never inline.
        let env = match *env {
            // An order being placed: its id was just minted, so there is nothing to
            // keep in memory after the write. Deciding it here saves spawning an
            // actor that would only be passivated again (the flash-sale hot path).
            Envelope::Order(_, req)
                if matches!(req.cmd, OrderCommand::Place { .. }) && self.may_serve_inline(&key) =>
            {
                let fresh = matches!(req.cmd, OrderCommand::Place { fresh: true, .. });
                self.serve_inline::<OrderState>(myself, key, req, fresh)
                    .await;
                return;
            }
            // An idempotency record is touched twice per request (begin, then
            // complete or abort) and read by nobody in between: an actor kept for it
            // would only push a busier entity out of the memory budget.
            Envelope::Idempotency(_, req) if self.may_serve_inline(&key) => {
                self.serve_inline::<IdemState>(myself, key, req, false)
                    .await;
                return;
            }
            other => Box::new(other),
        };
        // Not active (or its actor just died): activate and send.
        match self.activate(myself, &key).await {
            Ok((actor, queued)) => {
                queued.fetch_add(1, Ordering::Relaxed);
                if let Err(Some(env)) = actor.send(env) {
                    env.refuse("entity stopped while starting".into());
                }
            }
            Err(why) => env.refuse(why),
        }
    }

    /// True when a command for `key`, which has no actor, may be decided here without
    /// one: its last actor did not fail and this partition's last write for it without an
    /// actor is durable (so the log holds everything it must load).
    fn may_serve_inline(&self, key: &EntityKey) -> bool {
        !self.failed.contains(key) && self.inline_writes.get(key).is_none_or(|rx| *rx.borrow())
    }

    /// Decides one command of an entity that has no actor, writes its record and forgets
    /// the state: the next command activates an actor, which reads the record back (after
    /// waiting for it to be durable, see `EntityArgs::pending_write`).
    // PerformanceCriticalPath: every flash-sale buy places its order here.
    async fn serve_inline<E: Entity>(
        &mut self,
        myself: &ActorRef<PartitionMsg>,
        key: EntityKey,
        req: Request<E>,
        fresh: bool,
    ) {
        let queued = Arc::new(AtomicUsize::new(0));
        let mut hosted = match Hosted::<E>::load_from(
            key.clone(),
            self.index,
            myself.clone(),
            self.ctx.clone(),
            queued,
            fresh,
        ) {
            Ok(h) => h,
            Err(e) => {
                let _ = req
                    .reply
                    .send(Err(Refusal::Unavailable(format!("loading failed: {e}"))));
                return;
            }
        };
        if let Err(e) = hosted.handle_command(req).await {
            // The record may be in the log's queue: the next activation flushes first.
            tracing::error!(partition = self.index, entity = ?key, error = %e, "writing an entity without an actor failed");
            self.failed.insert(key);
            return;
        }
        if let Some(rx) = hosted.last_write() {
            self.inline_writes.insert(key, rx);
        }
    }

    async fn activate(
        &mut self,
        myself: &ActorRef<PartitionMsg>,
        key: &EntityKey,
    ) -> Result<(AnyRef, Arc<AtomicUsize>), String> {
        let args = EntityArgs {
            key: key.clone(),
            partition: self.index,
            owner: myself.clone(),
            ctx: self.ctx.clone(),
            flush_first: self.failed.remove(key),
            queued: Arc::new(AtomicUsize::new(0)),
            pending_write: self.inline_writes.remove(key).filter(|rx| !*rx.borrow()),
        };
        let queued = args.queued.clone();
        let sup = myself.get_cell();
        let actor = kinds::spawn(key.kind, args, sup).await?;
        self.ctx
            .metrics
            .activations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.by_actor.insert(actor.id(), key.clone());
        self.slots.insert(
            key.clone(),
            Slot::Active {
                actor: actor.clone(),
                last_used: Instant::now(),
                queued: queued.clone(),
            },
        );
        self.active += 1;
        if self.active > self.config.max_active {
            self.evict_least_recently_used(key);
        }
        Ok((actor, queued))
    }

    async fn stopped(
        &mut self,
        myself: &ActorRef<PartitionMsg>,
        cell: &ActorCell,
        failure: Option<String>,
    ) {
        let Some(key) = self.by_actor.remove(&cell.get_id()) else {
            return;
        };
        if let Some(why) = &failure {
            self.failed.insert(key.clone());
            self.ctx
                .metrics
                .actor_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(partition = self.index, entity = ?key, error = %why, "entity actor failed; it restarts from the log on its next message");
        } else {
            self.ctx
                .metrics
                .passivations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // The slot may already belong to a newer activation of the same entity (the old
        // actor's event arrived late): only the actor that ended may clear it.
        let ended = cell.get_id();
        let held = match self.slots.get(&key) {
            Some(Slot::Stopping { actor_id, .. }) if *actor_id == ended => {
                match self.slots.remove(&key) {
                    Some(Slot::Stopping { held, .. }) => held,
                    _ => Vec::new(),
                }
            }
            Some(Slot::Active { actor, .. }) if actor.id() == ended => {
                self.slots.remove(&key);
                self.active -= 1;
                Vec::new()
            }
            _ => Vec::new(),
        };
        for env in held {
            if let Some((key, env)) = self.deliver(env) {
                self.deliver_inactive(myself, key, env).await;
            }
        }
        self.drained();
    }

    fn sweep(&mut self) {
        self.inline_writes.retain(|_, rx| !*rx.borrow());
        let idle = self.config.idle_timeout;
        for slot in self.slots.values_mut() {
            let idle_long =
                matches!(slot, Slot::Active { last_used, .. } if last_used.elapsed() >= idle);
            if idle_long && slot.passivate() {
                self.active -= 1;
            }
        }
    }

    /// Over the memory budget: passivate the active entity used longest ago (never
    /// `keep`, the one just activated). A linear scan: the budget bounds its length.
    fn evict_least_recently_used(&mut self, keep: &EntityKey) {
        let oldest = self
            .slots
            .iter()
            .filter_map(|(k, slot)| match slot {
                Slot::Active { last_used, .. } if k != keep => Some((*last_used, k.clone())),
                _ => None,
            })
            .min_by_key(|(used, _)| *used)
            .map(|(_, k)| k);
        if let Some(slot) = oldest.and_then(|key| self.slots.get_mut(&key)) {
            if slot.passivate() {
                self.active -= 1;
            }
        }
    }

    fn fire_due(&mut self) {
        let now = self.ctx.clock.now_ms();
        while let Some(first) = self.wheel.first() {
            if first.0 > now {
                break;
            }
            let (at, key) = self.wheel.pop_first().expect("first() was Some");
            match self.timers_out.try_send(key) {
                Ok(()) => {
                    self.ctx
                        .metrics
                        .timers_fired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(key)) => {
                    // The dispatcher is saturated: keep the timer and try on the next tick.
                    self.wheel.insert((at, key));
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    }
}
