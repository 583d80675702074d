//! The [`Wal`] handle: opening, appending, reading entities, auxiliary keys and metadata.

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot, watch};

use crate::group_commit::{self, Ack, Msg, Prepared, Shared};
use crate::keys::{self, LOG};
use crate::metrics::{Counters, WalMetrics};
use crate::{Durability, EntityLog, Error, Record, Result, WalConfig};

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
    /// Opens (creating) the sled database at `cfg.path` and starts the writer thread and
    /// the flusher task. MUST be called inside a tokio runtime.
    pub fn open(cfg: WalConfig) -> Result<Wal> {
        cfg.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let db = sled::Config::new()
            .path(&cfg.path)
            .cache_capacity(cfg.cache_bytes)
            // The flusher decides when to flush; sled's own periodic flush would only add
            // fsyncs competing with it.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree("wal")?;
        let meta = db.open_tree("meta")?;
        let high = match tree.get(keys::HIGH_WATER)? {
            Some(v) => keys::decode_high_water(&v)?,
            None => 0,
        };
        // After recovery everything on disk is durable.
        let shared = Arc::new(Shared {
            db,
            tree,
            meta,
            durability: cfg.durability,
            applied_lsn: high.into(),
            durable_lsn: high.into(),
            failure: OnceLock::new(),
            counters: Counters::default(),
            checkpoint_lock: Mutex::new(()),
        });
        let (tx, rx) = mpsc::channel(cfg.queue_capacity);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        group_commit::start(
            shared.clone(),
            rx,
            high + 1,
            cfg.max_batch,
            cfg.relaxed_flush_interval,
            stopped_tx,
        )?;
        tracing::info!(path = %cfg.path.display(), durability = %cfg.durability, next_lsn = high + 1, "write-ahead log open");
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
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.shared().check_failed()?;
        keys::check_entity(&rec.entity)?;
        let (ack, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Append {
                rec: Prepared::new(rec),
                ack,
            })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Ack { rx })
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
    /// tail scanned, the snapshot read again, and the whole retried if a checkpoint of this
    /// entity landed in between (snapshot lsns only grow, tombstones included, so an
    /// unchanged lsn means no checkpoint touched the entity). The tail is bounded by the
    /// applied lsn read first: a sled scan is not a point-in-time view, and without the
    /// bound it could see a record of a batch applied during the scan while missing an
    /// earlier one whose key it had already passed.
    pub fn load_entity(&self, partition: u16, entity: &[u8]) -> Result<EntityLog> {
        keys::check_entity(entity)?;
        let shared = self.shared();
        let skey = keys::snapshot_key(partition, entity);
        let prefix = keys::entity_prefix(LOG, partition, entity);
        for _ in 0..LOAD_ATTEMPTS {
            let bound = shared.applied_lsn.load(Ordering::Acquire);
            let (snap_lsn, snapshot) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
            let mut tail = Vec::new();
            for kv in shared.tree.scan_prefix(&prefix) {
                let (k, v) = kv?;
                let lsn = keys::decode_log_key(&k)?.lsn;
                if lsn > snap_lsn && lsn <= bound {
                    tail.push((lsn, v.to_vec()));
                }
            }
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

    /// Value of an auxiliary key.
    pub fn aux_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .shared()
            .tree
            .get(keys::aux_key(key))?
            .map(|v| v.to_vec()))
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
        let iter = self.shared().tree.range::<Vec<u8>, _>((lo, hi));
        let strip = |kv: sled::Result<(sled::IVec, sled::IVec)>| -> Result<(Vec<u8>, Vec<u8>)> {
            let (k, v) = kv?;
            Ok((k[1..].to_vec(), v.to_vec()))
        };
        if reverse {
            iter.rev().take(limit).map(strip).collect()
        } else {
            iter.take(limit).map(strip).collect()
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

    /// A cheap snapshot of the log's counters and histograms.
    pub fn metrics(&self) -> WalMetrics {
        let shared = self.shared();
        let depth = self.inner.tx.max_capacity() - self.inner.tx.capacity();
        shared
            .counters
            .snapshot(shared.durable_lsn.load(Ordering::Acquire), depth)
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
