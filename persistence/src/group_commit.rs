//! Group commit: many appends, one write, one `fdatasync`.
//!
//! Two stages run as a pipeline, each on an OS thread of its own:
//!
//! * The **writer** takes the first queued message, then whatever else is already queued
//!   up to `max_batch`, gives each record the next [`Lsn`] in queue order, encodes the
//!   records as frames ([`crate::segment`]) and appends them to the current segment with
//!   one `write`. It then hands the batch to the flusher and goes straight back to the
//!   queue.
//! * The **flusher** takes every hand-off received so far, makes the segment durable
//!   with one `fdatasync`, applies the records' auxiliary changes to the store, adds the
//!   records to the log tails ([`crate::tails`]), publishes the durable lsn and resolves
//!   the waiters. While it syncs, the writer writes the next batch: that overlap is what
//!   makes one sync cover many records under load, without a timer adding latency when
//!   the load is light.
//!
//! In [`Durability::Relaxed`] the writer applies and resolves acks right after its write
//! and the flusher syncs every `relaxed_flush_interval` instead.
//!
//! Ordering rules:
//! * In `Sync` mode an ack MUST NOT resolve before a sync that started after its frame was
//!   written has completed; only the flusher resolves acks, after publishing
//!   `durable_lsn`, and a `debug_assert!` checks the lsn against it.
//! * Auxiliary changes reach the store only once their record is durable (in `Sync`
//!   mode), so the store never holds an index entry for a record a crash lost.
//! * `applied_lsn` is published after a batch's tails and aux changes are in place and
//!   before its acks resolve: whoever is told "durable" can read the record back.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::keys;
use crate::metrics::Counters;
use crate::segment;
use crate::tails::Tails;
use crate::{AuxOp, Durability, Error, Lsn, Record, Result};

/// How many written-but-not-yet-synced batches the writer may run ahead of the flusher.
/// The flusher merges everything queued here into one sync, so a few slots are enough;
/// when they are full the writer waits, the append queue fills up and appenders wait:
/// that is the backpressure from the disk to the callers.
const HANDOFF_CAPACITY: usize = 64;

/// One segment file of the log.
pub(crate) struct SegmentInfo {
    /// The last lsn written to it (the lsn before its first while empty).
    pub last: Lsn,
    pub path: PathBuf,
    pub bytes: u64,
}

/// The segments, oldest first; the last one is the one being written.
pub(crate) struct Segments {
    pub list: Vec<SegmentInfo>,
    pub current: Arc<File>,
}

/// State shared by the handles, the writer and the flusher.
pub(crate) struct Shared {
    pub db: sled::Db,
    /// Snapshots, aux keys and the lsn high-water mark.
    pub tree: sled::Tree,
    pub meta: sled::Tree,
    pub durability: Durability,
    /// Every record with an lsn up to this one is in the tails and its aux changes are
    /// in the store.
    pub applied_lsn: AtomicU64,
    /// Every record with an lsn up to this one is durable.
    pub durable_lsn: AtomicU64,
    /// Every record up to this lsn has its index changes flushed in the store (the
    /// stored high-water mark).
    pub stable_lsn: AtomicU64,
    /// Set once by the first failed write, sync or apply; the log then refuses work.
    pub failure: OnceLock<String>,
    pub counters: Counters,
    /// Serializes checkpoints: each one reads the snapshot it replaces, so two running on
    /// the same entity could fold the same records twice or drop each other's. A std
    /// Mutex because checkpoints are synchronous and never held across an await.
    pub checkpoint_lock: Mutex<()>,
    pub tails: Tails,
    /// Held around every `fdatasync` of a segment and the failure check on either side
    /// of it (see [`Shared::sync_segment`]).
    pub sync_lock: Mutex<()>,
    pub log_dir: PathBuf,
    pub segments: Mutex<Segments>,
    /// Size past which the writer starts a new segment.
    pub segment_bytes: u64,
    /// Aux changes applied but not yet written to the store ([`crate::overlay`]).
    pub overlay: crate::overlay::Overlay,
    /// Replica groups' frames, holds and hook ([`crate::replicated`]).
    pub raft: crate::replicated::RaftState,
    /// Every record below this lsn is folded and stable on disk (see
    /// [`crate::Wal::folded_below`]).
    pub folded_below: AtomicU64,
}

impl Shared {
    pub(crate) fn check_failed(&self) -> Result<()> {
        match self.failure.get() {
            Some(msg) => Err(Error::Failed(msg.clone())),
            None => Ok(()),
        }
    }

    pub(crate) fn fail(&self, what: &str, e: &dyn std::fmt::Display) -> String {
        let msg = format!("{what}: {e}");
        tracing::error!(error = %msg, "write-ahead log failed; refusing further appends");
        let _ = self.failure.set(msg.clone());
        msg
    }

    /// Makes `file`'s written data durable, or fails the log for good.
    ///
    /// Linux reports a writeback error once per open file description: after one
    /// `fdatasync` returned it, the next one on the same file succeeds although the data
    /// may be gone. So the first error fails the log (nothing is acknowledged after it),
    /// and syncs are serialised with the failure check on both sides: the writer's sync
    /// of a full segment and the flusher's sync cannot consume each other's error.
    /// `point` names the call site for fault injection in tests (`wal::sync_roll`,
    /// `wal::sync_flush`).
    pub(crate) fn sync_segment(&self, file: &File, what: &str, point: &str) -> Result<()> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_failed()?;
        let synced = {
            #[cfg(feature = "failpoints")]
            let injected = (|| {
                fail::fail_point!(point, |_| Err(std::io::Error::other(
                    "injected fdatasync failure"
                )));
                Ok(())
            })();
            #[cfg(not(feature = "failpoints"))]
            let injected = {
                let _ = point;
                Ok(())
            };
            injected.and_then(|()| file.sync_data())
        };
        synced.map_err(|e| Error::Failed(self.fail(what, &e)))?;
        self.check_failed()
    }

    /// Fails the log when `result` is a storage error (the store or the file system),
    /// answering `Failed` from then on; other errors pass through.
    pub(crate) fn fail_on_storage_error<T>(&self, what: &str, result: Result<T>) -> Result<T> {
        match result {
            Err(e @ (Error::Sled(_) | Error::Io(_))) => Err(Error::Failed(self.fail(what, &e))),
            other => other,
        }
    }

    pub(crate) fn segments(&self) -> std::sync::MutexGuard<'_, Segments> {
        // Every update under this lock is a single field change: poisoning is harmless.
        self.segments.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A record as queued: payload and aux changes already converted to the store's byte
/// type by the appender, so that the allocations and copies happen on the callers'
/// threads and the single writer thread, the pipeline's bottleneck, only encodes frames.
pub(crate) struct Prepared {
    /// Lsns the record takes: 1, or, for a consensus frame, one per record its entries
    /// carry (the frame is written at the last of them; see [`crate::Wal::append_raft`]).
    pub(crate) span: u64,
    partition: u16,
    entity: Vec<u8>,
    payload: sled::IVec,
    aux: Vec<(sled::IVec, Option<sled::IVec>)>,
    also: Vec<(u16, Vec<u8>, sled::IVec)>,
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
            span: 1,
            partition: rec.partition,
            entity: rec.entity,
            payload: rec.payload.into(),
            aux,
            also: rec
                .also
                .into_iter()
                .map(|p| (p.partition, p.entity, p.payload.into()))
                .collect(),
        }
    }
}

/// A message on the append queue.
pub(crate) enum Msg {
    Append {
        rec: Prepared,
        ack: AckTx,
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
    /// Waits until the record is durable (in `Sync` mode: synced; in `Relaxed` mode:
    /// written) and returns its lsn.
    pub async fn durable(self) -> Result<Lsn> {
        // A dropped sender means the writer or flusher stopped without answering.
        self.rx.await.unwrap_or(Err(Error::Closed))
    }
}

/// Who learns that a record is durable (or that it failed).
pub(crate) enum AckTx {
    /// An [`Ack`] awaiting it.
    Channel(oneshot::Sender<Result<Lsn>>),
    /// A callback, run on the log's own thread as soon as the outcome is known: it MUST
    /// be quick and never block (send on a channel, wake a task).
    Callback(Box<dyn FnOnce(Result<Lsn>) + Send>),
}

impl AckTx {
    pub(crate) fn send(self, outcome: Result<Lsn>) {
        match self {
            AckTx::Channel(tx) => {
                let _ = tx.send(outcome);
            }
            AckTx::Callback(f) => f(outcome),
        }
    }
}
type FlushTx = oneshot::Sender<Result<()>>;

/// A written record on its way to the tails.
pub(crate) struct Written {
    lsn: Lsn,
    rec: Prepared,
}

/// What the writer hands to the flusher after writing a batch.
#[derive(Default)]
pub(crate) struct Handoff {
    /// In `Sync` mode, the batch's records and acks; empty in `Relaxed` mode.
    written: Vec<Written>,
    acks: Vec<(Lsn, AckTx)>,
    flushes: Vec<FlushTx>,
}

/// Starts the writer and flusher threads. `stopped` turns true once both have finished,
/// after a final sync.
pub(crate) fn start(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    next_lsn: Lsn,
    max_batch: usize,
    relaxed_flush_interval: Duration,
    stopped: watch::Sender<bool>,
) -> Result<()> {
    let (handoff_tx, handoff_rx) = std_mpsc::sync_channel(HANDOFF_CAPACITY);
    let writer_shared = shared.clone();
    std::thread::Builder::new()
        .name("wal-writer".into())
        .spawn(move || run_writer(writer_shared, rx, handoff_tx, next_lsn, max_batch))?;
    std::thread::Builder::new()
        .name("wal-flusher".into())
        .spawn(move || run_flusher(shared, handoff_rx, relaxed_flush_interval, stopped))?;
    Ok(())
}

/// PERFORMANCE CRITICAL PATH: every append goes through this loop.
fn run_writer(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Msg>,
    handoff: std_mpsc::SyncSender<Handoff>,
    mut next_lsn: Lsn,
    max_batch: usize,
) {
    let mut msgs = Vec::with_capacity(max_batch);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut file = shared.segments().current.clone();
    while let Some(first) = rx.blocking_recv() {
        msgs.push(first);
        while msgs.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => msgs.push(m),
                Err(_) => break,
            }
        }
        buf.clear();
        let mut written = Vec::with_capacity(msgs.len());
        let mut acks = Vec::with_capacity(msgs.len());
        let mut flushes = Vec::new();
        for msg in msgs.drain(..) {
            match msg {
                Msg::Append { rec, ack } => {
                    // Queue order is lsn order, so the records of one caller, appended one
                    // after the other, get increasing lsns.
                    let lsn = next_lsn + rec.span - 1;
                    next_lsn += rec.span;
                    segment::encode_frame(
                        &mut buf,
                        lsn,
                        rec.partition,
                        &rec.entity,
                        &rec.payload,
                        &rec.aux,
                        &rec.also,
                    );
                    written.push(Written { lsn, rec });
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
            let result = shared.check_failed().and_then(|()| {
                (&*file)
                    .write_all(&buf)
                    .map_err(|e| Error::Failed(shared.fail("writing the log", &e)))
            });
            if let Err(e) = result {
                let msg = e.to_string();
                for (_, ack) in acks.drain(..) {
                    ack.send(Err(Error::Failed(msg.clone())));
                }
                written.clear();
            } else {
                shared.counters.record_batch(acks.len(), buf.len());
                let full = {
                    let mut segs = shared.segments();
                    if let Some(seg) = segs.list.last_mut() {
                        seg.last = last;
                        seg.bytes += buf.len() as u64;
                        seg.bytes >= shared.segment_bytes
                    } else {
                        false
                    }
                };
                if shared.durability == Durability::Relaxed {
                    let result = apply(&shared, std::mem::take(&mut written));
                    for (lsn, ack) in acks.drain(..) {
                        let answer = match &result {
                            Ok(()) => Ok(lsn),
                            Err(e) => Err(Error::Failed(e.to_string())),
                        };
                        ack.send(answer);
                    }
                }
                if full {
                    if let Some(f) = roll(&shared, &file, next_lsn) {
                        file = f;
                    }
                }
            }
        }
        if !acks.is_empty() || !flushes.is_empty() {
            // Blocks while the flusher is HANDOFF_CAPACITY batches behind (backpressure).
            let h = Handoff {
                written,
                acks,
                flushes,
            };
            if handoff.send(h).is_err() {
                // The flusher is gone: nobody can make these durable, the dropped senders
                // resolve the acks with `Closed`.
                break;
            }
        }
    }
    drop(handoff);
}

/// Closes the full segment (synced, so everything in it is durable before the flusher
/// moves on to the next file) and starts the next one at `next_lsn`.
fn roll(shared: &Shared, file: &File, next_lsn: Lsn) -> Option<Arc<File>> {
    // A failed sync fails the log: the flusher acknowledges nothing more.
    shared
        .sync_segment(file, "syncing a full log segment", "wal::sync_roll")
        .ok()?;
    match segment::create_segment(&shared.log_dir, next_lsn) {
        Ok(f) => {
            let f = Arc::new(f);
            let mut segs = shared.segments();
            segs.list.push(SegmentInfo {
                last: next_lsn - 1,
                path: segment::segment_path(&shared.log_dir, next_lsn),
                bytes: 0,
            });
            segs.current = f.clone();
            Some(f)
        }
        Err(e) => {
            // Keep writing to the full segment; it only grows past its target size.
            tracing::warn!(error = %e, "could not start a new log segment; continuing in the current one");
            None
        }
    }
}

/// Applies written records: their aux changes to the store (one batch), then the tails,
/// then publishes `applied_lsn`.
fn apply(shared: &Shared, written: Vec<Written>) -> Result<()> {
    let Some(last) = written.last().map(|w| w.lsn) else {
        return Ok(());
    };
    // In memory until the next checkpoint writes them to the store in one batch.
    let mut tails = Vec::with_capacity(written.len());
    let mut aux = Vec::new();
    for w in written {
        // A consensus frame is applied by its group once committed, not here.
        if w.rec.partition == crate::replicated::RAFT_PARTITION {
            continue;
        }
        aux.extend(w.rec.aux);
        tails.push((w.rec.partition, w.rec.entity, w.lsn, w.rec.payload));
        for (partition, entity, payload) in w.rec.also {
            tails.push((partition, entity, w.lsn, payload));
        }
    }
    if !aux.is_empty() {
        shared.overlay.apply(aux);
    }
    for (partition, entity, lsn, payload) in tails {
        shared.tails.push(partition, entity, lsn, payload);
    }
    // Release: a reader that sees `last` also sees the tails and aux changes.
    shared.applied_lsn.store(last, Ordering::Release);
    Ok(())
}

fn run_flusher(
    shared: Arc<Shared>,
    rx: std_mpsc::Receiver<Handoff>,
    interval: Duration,
    stopped: watch::Sender<bool>,
) {
    loop {
        let first = match shared.durability {
            Durability::Sync => match rx.recv() {
                Ok(h) => Some(h),
                Err(_) => break,
            },
            Durability::Relaxed => match rx.recv_timeout(interval) {
                Ok(h) => Some(h),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        match first {
            Some(first) => {
                let h = take_ready(first, &rx);
                sync_and_release(&shared, h);
            }
            None => {
                if shared.written_beyond_durable() {
                    sync_and_release(&shared, Handoff::default());
                }
            }
        }
    }
    // The writer has stopped: make everything it wrote durable before reporting.
    if shared.failure.get().is_none() && shared.written_beyond_durable() {
        sync_and_release(&shared, Handoff::default());
    }
    // And the store: snapshots and index changes since the last checkpoint's flush. The
    // log would replay them anyway, but a store left dirty is flushed by sled when its
    // last handle drops, wherever that happens; doing it here keeps that out of the
    // runtime's workers at shutdown.
    if let Err(e) = shared.db.flush() {
        tracing::warn!(error = %e, "flushing the store at shutdown failed; the log replays it");
    }
    drop(shared);
    stopped.send_replace(true);
}

impl Shared {
    /// Whether the current segment holds frames not yet synced.
    fn written_beyond_durable(&self) -> bool {
        let last = self.segments().list.last().map_or(0, |s| s.last);
        last > self.durable_lsn.load(Ordering::Acquire)
    }
}

/// Merges `first` with every hand-off already waiting, so one sync covers them all.
fn take_ready(first: Handoff, rx: &std_mpsc::Receiver<Handoff>) -> Handoff {
    let mut h = first;
    while let Ok(more) = rx.try_recv() {
        h.written.extend(more.written);
        h.acks.extend(more.acks);
        h.flushes.extend(more.flushes);
    }
    h
}

fn sync_and_release(shared: &Shared, h: Handoff) {
    // Everything written before the sync starts is covered by it; a full segment was
    // synced by the writer before it moved on.
    let (file, upto) = {
        let segs = shared.segments();
        (segs.current.clone(), segs.list.last().map_or(0, |s| s.last))
    };
    let started = Instant::now();
    let result = shared.sync_segment(&file, "syncing the log", "wal::sync_flush");
    let result = result.and_then(|()| {
        shared.counters.record_flush(started.elapsed());
        apply(shared, h.written)
    });
    match result {
        Ok(()) => {
            shared.durable_lsn.fetch_max(upto, Ordering::AcqRel);
            let durable = shared.durable_lsn.load(Ordering::Acquire);
            for (lsn, ack) in h.acks {
                // An ack MUST NOT resolve before its record is durable.
                debug_assert!(
                    lsn <= durable,
                    "ack for lsn {lsn} released with durable lsn {durable}"
                );
                ack.send(Ok(lsn));
            }
            for f in h.flushes {
                let _ = f.send(Ok(()));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, ack) in h.acks {
                ack.send(Err(Error::Failed(msg.clone())));
            }
            for f in h.flushes {
                let _ = f.send(Err(Error::Failed(msg.clone())));
            }
        }
    }
}
