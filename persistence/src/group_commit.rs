//! Group commit: many appends, one batch, one flush.
//!
//! Two stages run as a pipeline:
//!
//! * The **writer** (a dedicated OS thread) takes the first queued message, then whatever
//!   else is already queued up to `max_batch`, gives each record the next [`Lsn`] in queue
//!   order, and applies all of them, their auxiliary changes and the lsn high-water mark as
//!   one atomic `sled::Batch`. It then hands the batch's waiters to the flusher and goes
//!   straight back to the queue.
//! * The **flusher** (a tokio task) takes every hand-off received so far, flushes once
//!   (`fsync`), publishes the durable lsn and resolves those waiters. While it flushes,
//!   the writer applies the next batch: that overlap is what makes one flush cover many
//!   records under load, without any timer adding latency when the load is light.
//!
//! In [`Durability::Relaxed`] the writer resolves acks right after the apply and the
//! flusher flushes every `relaxed_flush_interval` instead.
//!
//! Ordering rules:
//! * In `Sync` mode an ack MUST NOT resolve before a flush that started after its batch
//!   was applied has completed; only the flusher resolves acks, after publishing
//!   `durable_lsn`, and a `debug_assert!` checks the lsn against it.
//! * `applied_lsn` MUST be published after `apply_batch` returns and before the batch's
//!   acks are handed on, so that readers that bound their scans by it see every record up
//!   to it ([`crate::Wal::load_entity`], checkpoints), and the flusher's flush covers it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::keys::{self, HIGH_WATER};
use crate::metrics::Counters;
use crate::{AuxOp, Durability, Error, Lsn, Record, Result};

/// How many applied-but-not-yet-flushed batches the writer may run ahead of the flusher.
/// The flusher merges everything queued here into one flush, so a few slots are enough;
/// when they are full the writer waits, the append queue fills up and appenders wait:
/// that is the backpressure from the disk to the callers.
const HANDOFF_CAPACITY: usize = 64;

/// State shared by the handles, the writer and the flusher.
pub(crate) struct Shared {
    pub db: sled::Db,
    /// The one tree holding log, snapshots, aux keys and the high-water mark, so that one
    /// `apply_batch` is atomic across all of them.
    pub tree: sled::Tree,
    pub meta: sled::Tree,
    pub durability: Durability,
    /// Every record with an lsn up to this one has been applied to `tree`.
    pub applied_lsn: AtomicU64,
    /// Every record with an lsn up to this one is durable.
    pub durable_lsn: AtomicU64,
    /// Set once by the first failed apply or flush; the log then refuses work.
    pub failure: OnceLock<String>,
    pub counters: Counters,
    /// Serializes checkpoints: each one reads the snapshot it replaces, so two running on
    /// the same entity could fold the same records twice or drop each other's. A std
    /// Mutex because checkpoints are synchronous and never held across an await.
    pub checkpoint_lock: Mutex<()>,
}

impl Shared {
    pub(crate) fn check_failed(&self) -> Result<()> {
        match self.failure.get() {
            Some(msg) => Err(Error::Failed(msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, what: &str, e: &sled::Error) -> String {
        let msg = format!("{what}: {e}");
        tracing::error!(error = %msg, "write-ahead log failed; refusing further appends");
        let _ = self.failure.set(msg.clone());
        msg
    }
}

/// A record as queued: payload and aux changes already converted to sled's byte type by
/// the appender, so that the allocations and copies happen on the callers' threads and
/// the single writer thread, the pipeline's bottleneck, only builds keys and applies.
pub(crate) struct Prepared {
    partition: u16,
    entity: Vec<u8>,
    payload: sled::IVec,
    aux: Vec<(sled::IVec, Option<sled::IVec>)>,
}

impl Prepared {
    pub(crate) fn new(rec: Record) -> Prepared {
        let aux = rec
            .aux
            .into_iter()
            .map(|op| match op {
                AuxOp::Put(k, v) => (keys::aux_key(&k).into(), Some(v.into())),
                AuxOp::Delete(k) => (keys::aux_key(&k).into(), None),
            })
            .collect();
        Prepared {
            partition: rec.partition,
            entity: rec.entity,
            payload: rec.payload.into(),
            aux,
        }
    }
}

/// A message on the append queue.
pub(crate) enum Msg {
    Append {
        rec: Prepared,
        ack: oneshot::Sender<Result<Lsn>>,
    },
    /// Resolve once everything queued before it is durable.
    Flush(oneshot::Sender<Result<()>>),
    /// Close the queue; the writer drains what is already queued, then stops.
    Shutdown,
}

/// Resolves when an appended record is durable per the log's [`Durability`].
#[must_use = "an append is only safe to acknowledge once `durable()` resolves"]
pub struct Ack {
    pub(crate) rx: oneshot::Receiver<Result<Lsn>>,
}

impl Ack {
    /// Waits until the record is durable (in `Sync` mode: flushed; in `Relaxed` mode:
    /// applied) and returns its lsn.
    pub async fn durable(self) -> Result<Lsn> {
        // A dropped sender means the writer or flusher stopped without answering.
        self.rx.await.unwrap_or(Err(Error::Closed))
    }
}

type AckTx = oneshot::Sender<Result<Lsn>>;
type FlushTx = oneshot::Sender<Result<()>>;

/// What the writer hands to the flusher after applying a batch.
pub(crate) struct Handoff {
    /// In `Sync` mode, the acks of the batch; empty in `Relaxed` mode.
    acks: Vec<(Lsn, AckTx)>,
    flushes: Vec<FlushTx>,
}

/// Starts the writer thread and the flusher task. The caller MUST be inside a tokio
/// runtime. `stopped` turns true once both have finished, after a final flush.
pub(crate) fn start(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    next_lsn: Lsn,
    max_batch: usize,
    relaxed_flush_interval: Duration,
    stopped: watch::Sender<bool>,
) -> Result<()> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    let (handoff_tx, handoff_rx) = mpsc::channel(HANDOFF_CAPACITY);
    // The writer is an OS thread, not a task: `apply_batch` is a blocking call, and on
    // a thread of its own it never stalls the runtime's workers (or the only worker of a
    // current-thread runtime) that run the appenders and the flusher.
    let writer_shared = shared.clone();
    std::thread::Builder::new()
        .name("wal-writer".into())
        .spawn(move || run_writer(writer_shared, rx, handoff_tx, next_lsn, max_batch))?;
    // The flusher is a task: it mostly awaits `flush_async`, which runs the fsync on
    // sled's own thread pool, and in relaxed mode it needs a tokio timer.
    runtime.spawn(run_flusher(
        shared,
        handoff_rx,
        relaxed_flush_interval,
        stopped,
    ));
    Ok(())
}

/// PERFORMANCE CRITICAL PATH: every append goes through this loop.
fn run_writer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Msg>,
    handoff: mpsc::Sender<Handoff>,
    mut next_lsn: Lsn,
    max_batch: usize,
) {
    let mut msgs = Vec::with_capacity(max_batch);
    let mut key = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        msgs.push(first);
        while msgs.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        let mut batch = sled::Batch::default();
        let mut acks = Vec::with_capacity(msgs.len());
        let mut flushes = Vec::new();
        for msg in msgs.drain(..) {
            match msg {
                Msg::Append { rec, ack } => {
                    // Queue order is lsn order, so the records of one caller, appended one
                    // after the other, get increasing lsns.
                    let lsn = next_lsn;
                    next_lsn += 1;
                    keys::write_log_key(&mut key, rec.partition, &rec.entity, lsn);
                    // Short keys are stored inline in the IVec: no allocation.
                    batch.insert(&key[..], rec.payload);
                    for (k, v) in rec.aux {
                        match v {
                            Some(v) => batch.insert(k, v),
                            None => batch.remove(k),
                        }
                    }
                    acks.push((lsn, ack));
                }
                Msg::Flush(tx) => flushes.push(tx),
                // Appends already queued behind it are still drained below; later sends
                // fail with `Closed`.
                Msg::Shutdown => rx.close(),
            }
        }
        if let Some((last, _)) = acks.last() {
            let last = *last;
            let count = acks.len();
            batch.insert(HIGH_WATER, &last.to_be_bytes()[..]);
            let applied = match shared.check_failed() {
                Ok(()) => shared
                    .tree
                    .apply_batch(batch)
                    .map_err(|e| Error::Failed(shared.fail("applying a batch", &e))),
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    // Release: a reader that sees `last` also sees the batch's writes.
                    shared.applied_lsn.store(last, Ordering::Release);
                    shared.counters.record_batch(count);
                }
                Err(e) => {
                    let msg = e.to_string();
                    for (_, ack) in acks.drain(..) {
                        let _ = ack.send(Err(Error::Failed(msg.clone())));
                    }
                }
            }
        }
        if shared.durability == Durability::Relaxed {
            for (lsn, ack) in acks.drain(..) {
                let _ = ack.send(Ok(lsn));
            }
        }
        if !acks.is_empty() || !flushes.is_empty() {
            // Blocks while the flusher is HANDOFF_CAPACITY batches behind (backpressure).
            if let Err(mpsc::error::SendError(h)) = handoff.blocking_send(Handoff { acks, flushes })
            {
                // The flusher is gone (its runtime shut down): nobody can make these
                // durable, the dropped senders resolve the acks with `Closed`.
                drop(h);
                break;
            }
        }
    }
    // Drop our share of the database before the hand-off channel: the flusher reports
    // `stopped` only after the channel closes, and by then no thread of ours holds the
    // database open, so it can be reopened at once.
    drop(shared);
    drop(handoff);
}

async fn run_flusher(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Handoff>,
    interval: Duration,
    stopped: watch::Sender<bool>,
) {
    match shared.durability {
        Durability::Sync => {
            while let Some(first) = rx.recv().await {
                let (acks, flushes) = take_ready(first, &mut rx);
                flush_and_release(&shared, acks, flushes).await;
            }
        }
        Durability::Relaxed => {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    h = rx.recv() => match h {
                        Some(first) => {
                            let (acks, flushes) = take_ready(first, &mut rx);
                            flush_and_release(&shared, acks, flushes).await;
                        }
                        None => break,
                    },
                    _ = tick.tick() => {
                        if shared.applied_lsn.load(Ordering::Acquire) > shared.durable_lsn.load(Ordering::Acquire) {
                            flush_and_release(&shared, Vec::new(), Vec::new()).await;
                        }
                    }
                }
            }
        }
    }
    // The writer has stopped: make everything it applied durable before reporting.
    if shared.failure.get().is_none()
        && shared.applied_lsn.load(Ordering::Acquire) > shared.durable_lsn.load(Ordering::Acquire)
    {
        flush_and_release(&shared, Vec::new(), Vec::new()).await;
    }
    drop(shared);
    stopped.send_replace(true);
}

/// Merges `first` with every hand-off already waiting, so one flush covers them all.
fn take_ready(
    first: Handoff,
    rx: &mut mpsc::Receiver<Handoff>,
) -> (Vec<(Lsn, AckTx)>, Vec<FlushTx>) {
    let Handoff {
        mut acks,
        mut flushes,
    } = first;
    while let Ok(more) = rx.try_recv() {
        acks.extend(more.acks);
        flushes.extend(more.flushes);
    }
    (acks, flushes)
}

async fn flush_and_release(shared: &Shared, acks: Vec<(Lsn, AckTx)>, flushes: Vec<FlushTx>) {
    // Everything applied before the flush starts is covered by it. The acks handed over
    // were applied before they were sent, so they are all <= upto.
    let upto = shared.applied_lsn.load(Ordering::Acquire);
    let started = Instant::now();
    let result = match shared.check_failed() {
        Ok(()) => shared
            .db
            .flush_async()
            .await
            .map_err(|e| Error::Failed(shared.fail("flushing", &e))),
        Err(e) => Err(e),
    };
    match result {
        Ok(_) => {
            shared.counters.record_flush(started.elapsed());
            shared.durable_lsn.fetch_max(upto, Ordering::AcqRel);
            let durable = shared.durable_lsn.load(Ordering::Acquire);
            for (lsn, ack) in acks {
                // An ack MUST NOT resolve before its record is durable.
                debug_assert!(
                    lsn <= durable,
                    "ack for lsn {lsn} released with durable lsn {durable}"
                );
                let _ = ack.send(Ok(lsn));
            }
            for f in flushes {
                let _ = f.send(Ok(()));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, ack) in acks {
                let _ = ack.send(Err(Error::Failed(msg.clone())));
            }
            for f in flushes {
                let _ = f.send(Err(Error::Failed(msg.clone())));
            }
        }
    }
}
