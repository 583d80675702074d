//! The [`Wal`] handle: opening, appending, reading entities, auxiliary keys and metadata.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};

use crate::group_commit::{self, Ack, AckTx, Msg, Prepared, SegmentInfo, Segments, Shared};
use crate::keys;
use crate::metrics::{Counters, WalMetrics};
use crate::replicated::{RaftFrame, RAFT_PARTITION};
use crate::segment;
use crate::tails::Tails;
use crate::{Durability, EntityLog, Error, Lsn, Record, Result, WalConfig};

/// A record [`Wal::try_append_then`] found no room for in the log's queue.
pub struct QueueFull {
    tx: mpsc::Sender<Msg>,
    msg: Msg,
}

impl QueueFull {
    /// Waits for room and queues the record.
    pub async fn queued(self) -> Result<()> {
        // A send that fails drops the message, which calls its callback with `Closed`.
        self.tx.send(self.msg).await.map_err(|_| Error::Closed)
    }
}

/// How often [`Wal::load_entity`] retries when checkpoints of the same entity keep landing
/// between its reads. Checkpoints of one entity are serialized and far apart, so hitting
/// this means something is badly wrong.
const LOAD_ATTEMPTS: u32 = 1000;

/// The write-ahead log of one node. Cheap to clone: all clones share one database, one
/// append queue and one writer.
#[derive(Clone)]
pub struct Wal {
    inner: Arc<Inner>,
}

struct Inner {
    /// Only handles hold the sender: when the last handle is dropped the queue closes and
    /// the writer and flusher stop on their own.
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    closed: AtomicBool,
    stopped: watch::Receiver<bool>,
}

impl Wal {
    /// Opens (creating) the store at `cfg.path`, recovers the log (its segments live in
    /// `cfg.path/log`) and starts the writer and flusher threads. MUST be called inside a
    /// tokio runtime.
    pub fn open(cfg: WalConfig) -> Result<Wal> {
        cfg.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let db = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_bytes)
            // Durability never rests on this: a checkpoint flushes the store itself before
            // it releases log segments, and the log's own syncs make each record durable.
            // Flushing what a checkpoint writes as it goes spreads sled's disk writes: one
            // flush of a whole checkpoint made the log's group commits wait behind it for
            // hundreds of milliseconds (docs/benchmarks.md).
            .flush_every_ms(Some(100))
            .open()?;
        let tree = db.open_tree("wal")?;
        let meta = db.open_tree("meta")?;
        let log_dir = cfg.path.join("log");
        std::fs::create_dir_all(&log_dir)?;
        let high = match tree.get(keys::HIGH_WATER)? {
            Some(v) => keys::decode_high_water(&v)?,
            None => 0,
        };
        let tails = Tails::default();
        let folded = match tree.get(keys::FOLDED)? {
            Some(v) => keys::decode_high_water(&v)?,
            None => 0,
        };
        let (segments, last, raft_frames) = recover(&tree, &tails, &log_dir, high, folded)?;
        let next = high.max(last) + 1;
        let current = Arc::new(segment::create_segment(&log_dir, next)?);
        let mut list = segments;
        list.push(SegmentInfo {
            last: next - 1,
            path: segment::segment_path(&log_dir, next),
            bytes: 0,
        });
        // After recovery everything on disk is durable.
        let shared = Arc::new(Shared {
            db,
            tree,
            meta,
            durability: cfg.durability,
            applied_lsn: (next - 1).into(),
            durable_lsn: (next - 1).into(),
            stable_lsn: high.into(),
            failure: OnceLock::new(),
            counters: Counters::default(),
            checkpoint_lock: Mutex::new(()),
            sync_lock: Mutex::new(()),
            tails,
            log_dir,
            segments: Mutex::new(Segments { list, current }),
            segment_bytes: cfg.segment_bytes,
            overlay: Default::default(),
            raft: crate::replicated::RaftState {
                recovered: std::sync::Mutex::new(raft_frames),
                ..Default::default()
            },
            folded_below: folded.into(),
        });
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        group_commit::start(
            shared.clone(),
            rx,
            next,
            cfg.max_batch,
            cfg.relaxed_flush_interval,
            stopped_tx,
        )?;
        tracing::info!(path = %cfg.path.display(), durability = %cfg.durability, next_lsn = next, "write-ahead log open");
        Ok(Wal {
            inner: Arc::new(Inner {
                tx,
                shared,
                closed: AtomicBool::new(false),
                stopped: stopped_rx,
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Queues a record. Waits only for room in the bounded queue, never for the disk.
    /// Records appended by one caller, in order, get increasing lsns in that order.
    ///
    /// PERFORMANCE CRITICAL PATH.
    pub async fn append(&self, rec: Record) -> Result<Ack> {
        let (ack, rx) = oneshot::channel();
        self.enqueue(rec, AckTx::Channel(ack)).await?;
        Ok(Ack { rx })
    }

    /// Queues a record on this node's own queue, whatever its partition, taking `span`
    /// lsns (it is written at the last).
    pub(crate) async fn enqueue_local(&self, rec: Record, span: u64, ack: AckTx) -> Result<()> {
        let mut msg = self.prepare(rec, ack)?;
        if let Msg::Append { rec, .. } = &mut msg {
            rec.span = span.max(1);
        }
        self.inner.tx.send(msg).await.map_err(|_| Error::Closed)
    }

    /// Like [`Wal::append`], but instead of an [`Ack`] to await, `on_durable` is called
    /// with the outcome as soon as it is known, on the log's own thread: no task has to
    /// wait for it. The callback MUST be quick and never block (answer a reply port,
    /// send on a channel). It is called exactly once in every case: with
    /// [`Error::Closed`] when the log stops first or cannot take the record (the error is
    /// then also returned here).
    ///
    /// PERFORMANCE CRITICAL PATH.
    pub async fn append_then(
        &self,
        rec: Record,
        on_durable: impl FnOnce(Result<Lsn>) + Send + 'static,
    ) -> Result<()> {
        let guard = CalledOnce(Some(Box::new(on_durable)));
        self.enqueue(rec, AckTx::Callback(Box::new(guard.into_fn())))
            .await
    }

    /// [`Wal::append_then`] without a future when the queue has room, which is nearly
    /// always: `Ok(None)` once the record is queued. `Ok(Some(full))` when the queue is
    /// full: the record is queued once `full.queued()` has been awaited, and a caller
    /// that appends in order MUST await it before appending again. Errors as
    /// [`Wal::append_then`]; `on_durable` is called exactly once in every case.
    ///
    /// PERFORMANCE CRITICAL PATH: an entity actor's write. Its handler then needs no
    /// future of its own, and ractor moves a handler's future for every message.
    pub fn try_append_then(
        &self,
        rec: Record,
        on_durable: impl FnOnce(Result<Lsn>) + Send + 'static,
    ) -> Result<Option<QueueFull>> {
        let guard = CalledOnce(Some(Box::new(on_durable)));
        if let Some(replicate) = self.replicate_for(&rec) {
            // Checked before it is proposed: a record its group committed must apply.
            self.check(&rec)?;
            replicate.submit(rec, Box::new(guard.into_fn()));
            return Ok(None);
        }
        let msg = self.prepare(rec, AckTx::Callback(Box::new(guard.into_fn())))?;
        match self.inner.tx.try_send(msg) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(msg)) => Ok(Some(QueueFull {
                tx: self.inner.tx.clone(),
                msg,
            })),
            // Dropping the message calls `on_durable` with `Closed`.
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Error::Closed),
        }
    }

    async fn enqueue(&self, rec: Record, ack: AckTx) -> Result<()> {
        if let Some(replicate) = self.replicate_for(&rec) {
            self.check(&rec)?;
            replicate.submit(rec, Box::new(move |outcome| ack.send(outcome)));
            return Ok(());
        }
        let msg = self.prepare(rec, ack)?;
        self.inner.tx.send(msg).await.map_err(|_| Error::Closed)
    }

    /// Checks that the log takes the record: it is open and sound, and every entity key
    /// fits the key layout.
    fn check(&self, rec: &Record) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.shared().check_failed()?;
        keys::check_entity(&rec.entity)?;
        for part in &rec.also {
            keys::check_entity(&part.entity)?;
        }
        Ok(())
    }

    /// Checks that the log takes the record, and wraps it for the writer.
    fn prepare(&self, rec: Record, ack: AckTx) -> Result<Msg> {
        self.check(&rec)?;
        Ok(Msg::Append {
            rec: Prepared::new(rec),
            ack,
        })
    }

    /// Makes everything appended so far durable. After [`Wal::shutdown`] it waits for the
    /// shutdown to finish, which flushes everything.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.inner.closed.load(Ordering::Acquire)
            || self.inner.tx.send(Msg::Flush(tx)).await.is_err()
        {
            return self.wait_stopped().await;
        }
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Stops accepting appends, drains the queue, flushes, stops the writer and flusher.
    /// Idempotent; every caller returns once the log has stopped.
    pub async fn shutdown(&self) -> Result<()> {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            // Queued behind every append already accepted, which the writer still drains.
            // An error means the writer is already gone.
            let _ = self.inner.tx.send(Msg::Shutdown).await;
        }
        self.wait_stopped().await
    }

    async fn wait_stopped(&self) -> Result<()> {
        let mut stopped = self.inner.stopped.clone();
        // An error means the flusher was dropped with its runtime, before finishing.
        stopped.wait_for(|s| *s).await.map_err(|_| Error::Closed)?;
        self.shared().check_failed()
    }

    /// Snapshot and log tail (records after the snapshot, in lsn order) of one entity.
    ///
    /// Consistent even while [`Wal::checkpoint_partition`] runs: the snapshot is read, the
    /// tail copied, the snapshot read again, and the whole retried if a checkpoint of this
    /// entity landed in between (a checkpoint stores the snapshot before it drops the
    /// folded records, and snapshot lsns only grow, tombstones included, so an unchanged
    /// lsn means no checkpoint touched the entity).
    pub fn load_entity(&self, partition: u16, entity: &[u8]) -> Result<EntityLog> {
        keys::check_entity(entity)?;
        let shared = self.shared();
        let skey = keys::snapshot_key(partition, entity);
        for _ in 0..LOAD_ATTEMPTS {
            let (snap_lsn, snapshot) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
            let tail = shared.tails.get(partition, entity, snap_lsn);
            let (again, _) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
            if again == snap_lsn {
                return Ok(EntityLog { snapshot, tail });
            }
            std::thread::yield_now();
        }
        Err(Error::Contended {
            attempts: LOAD_ATTEMPTS,
        })
    }

    /// Like [`Wal::load_entity`] for an entity that has never been checkpointed, such as
    /// one whose id its caller has just minted: its log tail only, without reading the
    /// store (whose batches can hold a reader up while a checkpoint writes).
    pub fn load_new_entity(&self, partition: u16, entity: &[u8]) -> Result<EntityLog> {
        keys::check_entity(entity)?;
        Ok(EntityLog {
            snapshot: None,
            tail: self.shared().tails.get(partition, entity, 0),
        })
    }

    /// Value of an auxiliary key.
    pub fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let key = keys::aux_key(key);
        if let Some(change) = self.shared().overlay.get(&key) {
            return Ok(change.map(|v| v.to_vec()));
        }
        Ok(self.shared().tree.get(key)?.map(|v| v.to_vec()))
    }

    /// Auxiliary keys starting with `prefix`, strictly after `after` (strictly before it
    /// when `reverse`), at most `limit`, in key order (descending when `reverse`).
    pub fn aux_scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let full = keys::aux_key(prefix);
        // Always exists: the first byte is `A`, below 0xff.
        let end = keys::prefix_end(&full)
            .ok_or_else(|| Error::Corrupt("aux prefix has no end".into()))?;
        let mut lo = Bound::Included(full.clone());
        let mut hi = Bound::Excluded(end.clone());
        if let Some(cursor) = after {
            let cursor = keys::aux_key(cursor);
            if reverse {
                if cursor <= full {
                    return Ok(Vec::new());
                }
                if cursor < end {
                    hi = Bound::Excluded(cursor);
                }
            } else {
                if cursor >= end {
                    return Ok(Vec::new());
                }
                if cursor >= full {
                    lo = Bound::Excluded(cursor);
                }
            }
        }
        let shared = self.shared();
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // The changes not yet in the store win over it. They are taken a page at a time:
        // the store is read up to the last key of a full page, then the next page follows.
        loop {
            let page = shared.overlay.page(&lo, &hi, reverse, limit);
            let boundary = (page.len() == limit)
                .then(|| page.last().map(|(k, _)| k.clone()))
                .flatten();
            let (slo, shi) = match (&boundary, reverse) {
                (Some(b), false) => (lo.clone(), Bound::Included(b.clone())),
                (Some(b), true) => (Bound::Included(b.clone()), hi.clone()),
                (None, _) => (lo.clone(), hi.clone()),
            };
            let range = shared.tree.range::<Vec<u8>, _>((slo, shi));
            let mut store: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
                if reverse {
                    Box::new(range.rev())
                } else {
                    Box::new(range)
                };
            let mut page = page.into_iter().peekable();
            let mut next_store = store.next().transpose()?;
            loop {
                if out.len() == limit {
                    return Ok(out);
                }
                let take_page = match (page.peek(), &next_store) {
                    (None, None) => break,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some((pk, _)), Some((sk, _))) => {
                        let order = pk.as_slice().cmp(sk.as_ref());
                        if order == std::cmp::Ordering::Equal {
                            // The overlay's change replaces the stored value.
                            next_store = store.next().transpose()?;
                            true
                        } else {
                            (order == std::cmp::Ordering::Less) != reverse
                        }
                    }
                };
                if take_page {
                    // A deletion hides the stored value and lists nothing.
                    if let Some((k, Some(v))) = page.next() {
                        out.push((k[1..].to_vec(), v.to_vec()));
                    }
                } else if let Some((k, v)) = next_store.take() {
                    out.push((k[1..].to_vec(), v.to_vec()));
                    next_store = store.next().transpose()?;
                }
            }
            match boundary {
                None => return Ok(out),
                Some(b) if reverse => hi = Bound::Excluded(b),
                Some(b) => lo = Bound::Excluded(b),
            }
        }
    }

    /// Node metadata value.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.shared().meta.get(key.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Writes a node metadata value and flushes it before returning. Blocking: meant for
    /// start-up and rare administrative changes, not for the request path.
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.shared().meta.insert(key.as_bytes(), value)?;
        self.shared().db.flush()?;
        Ok(())
    }

    /// Removes node metadata values and flushes before returning. Blocking, like
    /// [`Wal::meta_put`].
    pub fn meta_remove(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            self.shared().meta.remove(key.as_bytes())?;
        }
        self.shared().db.flush()?;
        Ok(())
    }

    /// A cheap snapshot of the log's counters and histograms.
    pub fn metrics(&self) -> WalMetrics {
        let shared = self.shared();
        let depth = self.inner.tx.max_capacity() - self.inner.tx.capacity();
        shared
            .counters
            .snapshot(shared.durable_lsn.load(Ordering::Acquire), depth)
    }

    /// Why the log refuses work, once a write, sync or apply has failed; `None` while it
    /// is healthy. A failed log stays failed until the process restarts.
    pub fn failure(&self) -> Option<String> {
        self.shared().failure.get().cloned()
    }

    pub fn durability(&self) -> Durability {
        self.shared().durability
    }

    /// The highest lsn applied so far (tests and diagnostics).
    #[doc(hidden)]
    pub fn applied_lsn(&self) -> crate::Lsn {
        self.shared().applied_lsn.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("durability", &self.durability())
            .finish_non_exhaustive()
    }
}

/// Replays the log's segments: re-applies the aux changes of records above `stable` (the
/// store holds those up to it) in lsn order, so the store ends as it was when the last
/// durable record was written, and rebuilds the tails of records not yet folded into a
/// snapshot (those below `folded` are, without looking). Empty segments are removed.
/// Returns the segments kept and the last lsn found.
fn recover(
    tree: &sled::Tree,
    tails: &Tails,
    dir: &Path,
    stable: Lsn,
    folded: Lsn,
) -> Result<Recovered> {
    const AUX_PER_BATCH: usize = 10_000;
    let mut raft = Vec::new();
    let found = segment::list_segments(dir)?;
    let mut kept = Vec::new();
    let mut last_lsn: Lsn = 0;
    let mut snapshot_lsns: HashMap<(u16, Vec<u8>), Lsn> = HashMap::new();
    let mut batch = sled::Batch::default();
    let mut pending = 0usize;
    let (mut records, mut tail_records) = (0u64, 0u64);
    let count = found.len();
    for (i, (first, path)) in found.into_iter().enumerate() {
        let mut seg_last = first.saturating_sub(1);
        segment::read_segment(&path, i + 1 == count, |frame| {
            if frame.lsn <= last_lsn {
                return Err(Error::Corrupt(format!(
                    "{} holds lsn {} after lsn {last_lsn}",
                    path.display(),
                    frame.lsn
                )));
            }
            last_lsn = frame.lsn;
            seg_last = frame.lsn;
            records += 1;
            if frame.partition == RAFT_PARTITION {
                // Kept for its group, which applies what it commits.
                raft.push((
                    frame.lsn,
                    RaftFrame::from_parts(&frame.entity, frame.payload)?,
                ));
                return Ok(());
            }
            let aux = if frame.lsn > stable {
                frame.aux
            } else {
                Vec::new()
            };
            for (k, v) in aux {
                match v {
                    Some(v) => batch.insert(k, v),
                    None => batch.remove(k),
                }
                pending += 1;
            }
            if pending >= AUX_PER_BATCH {
                tree.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
            if frame.lsn < folded {
                return Ok(());
            }
            let own = (frame.partition, frame.entity, frame.payload);
            for (partition, entity, payload) in std::iter::once(own).chain(frame.also) {
                let key = (partition, entity);
                let snap = match snapshot_lsns.get(&key) {
                    Some(l) => *l,
                    None => {
                        let skey = keys::snapshot_key(key.0, &key.1);
                        let (l, _) = keys::decode_snapshot(tree.get(&skey)?.as_deref())?;
                        snapshot_lsns.insert(key.clone(), l);
                        l
                    }
                };
                if frame.lsn > snap {
                    tail_records += 1;
                    tails.push(key.0, key.1, frame.lsn, payload.into());
                }
            }
            Ok(())
        })?;
        let bytes = std::fs::metadata(&path)?.len();
        if bytes == 0 {
            std::fs::remove_file(&path)?;
            continue;
        }
        kept.push(SegmentInfo {
            last: seg_last,
            path,
            bytes,
        });
    }
    tree.apply_batch(batch)?;
    if records > 0 {
        tracing::info!(
            segments = kept.len(),
            records,
            unfolded = tail_records,
            "log replayed"
        );
    }
    Ok((kept, last_lsn, raft))
}

/// What recovery found: the segments kept, the last lsn, the consensus frames.
type Recovered = (Vec<SegmentInfo>, Lsn, Vec<(Lsn, RaftFrame)>);

type Callback = Box<dyn FnOnce(Result<Lsn>) + Send>;

/// A durability callback that is called exactly once: by the log with the outcome, or,
/// if the log drops it unanswered (it stopped), with [`Error::Closed`].
struct CalledOnce(Option<Callback>);

impl CalledOnce {
    fn into_fn(mut self) -> impl FnOnce(Result<Lsn>) + Send {
        move |outcome| {
            if let Some(f) = self.0.take() {
                f(outcome);
            }
        }
    }
}

impl Drop for CalledOnce {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(Err(Error::Closed));
        }
    }
}
