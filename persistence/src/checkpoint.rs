//! Checkpoints: folding the log tails into per-entity snapshots, and releasing the log
//! segments that no longer hold anything unfolded.
//!
//! A checkpoint never talks to live actors: it folds the stored snapshot with the
//! entity's tail using the caller's `fold` (the domain's `apply`), stores the new
//! snapshots, then drops the folded records from the tails. An actor's in-memory state is
//! snapshot + tail either way, so it does not care when a checkpoint happens. Snapshots
//! reach the disk when [`Wal::release_log`] flushes the store, before it deletes the
//! segments whose records they cover.

use std::sync::atomic::Ordering;

use crate::keys::{self, FOLDED, HIGH_WATER};
use crate::{CheckpointStats, Lsn, Result, Wal};

/// Entities folded per store batch: bounds the memory and the size of one batch.
const ENTITIES_PER_BATCH: usize = 512;

/// A snapshot at least this large is rewritten only once its log tail has grown to half
/// its size: a big state (a hot campaign's claims) is not re-encoded on every pass, and
/// each logged byte is rewritten a bounded number of times.
const LARGE_SNAPSHOT: usize = 64 * 1024;

/// The fold [`Wal::checkpoint_partition`] takes.
pub type Folder<'a> = dyn FnMut(&[u8], Option<&[u8]>, &[(Lsn, Vec<u8>)]) -> std::result::Result<Option<Vec<u8>>, String>
    + 'a;

impl Wal {
    /// Folds every logged entity of the partition into its snapshot.
    ///
    /// For each entity with unfolded records, calls `fold(entity, old_snapshot, tail)`:
    /// `Ok(Some(s))` stores `s`, `Ok(None)` deletes the snapshot, `Err(msg)` skips the
    /// entity (logged as a warning; its records stay in the log). Tails are lists in lsn
    /// order that only grow at the end, so the copy taken here is a gap-free prefix of
    /// each entity's log, and exactly that prefix is dropped once its snapshot is stored.
    ///
    /// A storage error (disk full, an I/O error) fails the log like a failed write: the
    /// store may hold part of what was written, and nothing more is acknowledged.
    // The fold's type is spelled out in the signature on purpose: it is the contract
    // the domain's checkpointer is written against.
    #[allow(clippy::type_complexity)]
    pub fn checkpoint_partition(
        &self,
        partition: u16,
        fold: &mut dyn FnMut(
            &[u8],
            Option<&[u8]>,
            &[(Lsn, Vec<u8>)],
        ) -> std::result::Result<Option<Vec<u8>>, String>,
    ) -> Result<CheckpointStats> {
        let folded = self.checkpoint_partition_folding(partition, fold, true);
        self.shared()
            .fail_on_storage_error("checkpointing a partition", folded)
    }

    /// [`Wal::checkpoint_partition`] without deferring large snapshots: every entity
    /// whose log folds is folded (a replica group's snapshot needs all of them).
    pub fn checkpoint_partition_fully(
        &self,
        partition: u16,
        fold: &mut Folder<'_>,
    ) -> Result<CheckpointStats> {
        let folded = self.checkpoint_partition_folding(partition, fold, false);
        self.shared()
            .fail_on_storage_error("checkpointing a partition", folded)
    }

    fn checkpoint_partition_folding(
        &self,
        partition: u16,
        fold: &mut Folder<'_>,
        defer_large: bool,
    ) -> Result<CheckpointStats> {
        let shared = self.shared();
        // Poisoning only means another checkpoint panicked inside `fold`; the store itself
        // is consistent (batches are atomic), so carry on.
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut stats = CheckpointStats::default();
        // In key order: each batch then inserts into neighbouring store leaves (ids are
        // minted in time order, so new entities land at the end of the key space)
        // instead of the tails' hash order; about 15% less time per entity
        // (`cargo bench -p shardmall-persistence --bench checkpoint`).
        let mut entities = shared.tails.partition(partition);
        entities.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for chunk in entities.chunks(ENTITIES_PER_BATCH) {
            let mut batch = sled::Batch::default();
            let mut folded: Vec<(&[u8], Lsn, usize)> = Vec::new();
            for (entity, tail) in chunk {
                let Some(&(last, _)) = tail.last() else {
                    continue;
                };
                let skey = keys::snapshot_key(partition, entity);
                let (old_lsn, old) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
                // Records at or below the snapshot lsn were folded already (a tail is
                // dropped only after its snapshot is stored): just drop them.
                let first_new = tail.partition_point(|(lsn, _)| *lsn <= old_lsn);
                if first_new == tail.len() {
                    folded.push((entity, last, 0));
                    continue;
                }
                let old_len = old.as_ref().map_or(0, |s| s.len());
                let tail_len: usize = tail[first_new..].iter().map(|(_, r)| r.len()).sum();
                if defer_large && old_len >= LARGE_SNAPSHOT && tail_len * 2 < old_len {
                    stats.deferred += 1;
                    continue;
                }
                let records: Vec<(Lsn, Vec<u8>)> = tail[first_new..]
                    .iter()
                    .map(|(lsn, r)| (*lsn, r.to_vec()))
                    .collect();
                match fold(entity, old.as_deref(), &records) {
                    Ok(new) => {
                        batch.insert(skey, keys::encode_snapshot(last, new.as_deref()));
                        stats.entities += 1;
                        folded.push((entity, last, tail.len()));
                    }
                    Err(msg) => {
                        tracing::warn!(partition, entity = ?String::from_utf8_lossy(entity), error = %msg,
                            "checkpoint skipped an entity whose log does not fold");
                    }
                }
            }
            shared.tree.apply_batch(batch)?;
            for (entity, last, n) in folded {
                shared.tails.remove_upto(partition, entity, last);
                stats.records += n;
            }
        }
        Ok(stats)
    }

    /// Partitions that currently hold unfolded records (for the checkpoint scheduler).
    pub fn partitions_with_log(&self) -> Result<Vec<u16>> {
        Ok(self.shared().tails.partitions())
    }

    /// Deletes the log segments whose records are all folded into snapshots, after
    /// flushing the store so those snapshots (and the records' index changes) are on
    /// disk. Answers how many segments went. Blocking: call it after a round of
    /// checkpoints, off the async workers. A storage error fails the log (see
    /// [`Wal::checkpoint_partition`]).
    pub fn release_log(&self) -> Result<usize> {
        let released = self.release_folded();
        self.shared()
            .fail_on_storage_error("checkpointing (flushing the store)", released)
    }

    fn release_folded(&self) -> Result<usize> {
        #[cfg(feature = "failpoints")]
        fail::fail_point!("checkpoint::release", |_| Err(crate::Error::Io(
            std::io::Error::other("injected: no space left on device")
        )));
        let shared = self.shared();
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Records written but not yet applied have lsns above `applied`.
        let applied = shared.applied_lsn.load(Ordering::Acquire);
        let keep_from = shared
            .tails
            .min_lsn()
            .map_or(applied + 1, |m| m.min(applied + 1));
        // Segments also stay for the consensus frames a replica group still needs.
        let keep_segments_from = shared.raft.hold().map_or(keep_from, |h| h.min(keep_from));
        let done: Vec<std::path::PathBuf> = {
            let segs = shared.segments();
            let n = segs.list.len().saturating_sub(1);
            segs.list[..n]
                .iter()
                .take_while(|s| s.last < keep_segments_from)
                .map(|s| s.path.clone())
                .collect()
        };
        if done.is_empty()
            && shared.stable_lsn.load(Ordering::Acquire) == applied
            && shared.overlay.is_empty()
        {
            return Ok(0);
        }
        // Every aux change of a record up to `applied` was put in the overlay before
        // `applied_lsn` moved: into the store with them.
        shared.overlay.write_to(&shared.tree)?;
        // After this flush every record up to `applied` has its index changes on disk
        // (they are applied before `applied_lsn` moves), so a restart replays only the
        // records above it; and the next lsn stays above every lsn ever used.
        shared.tree.insert(HIGH_WATER, &applied.to_be_bytes()[..])?;
        shared.tree.insert(FOLDED, &keep_from.to_be_bytes()[..])?;
        shared.db.flush()?;
        shared.stable_lsn.store(applied, Ordering::Release);
        shared.folded_below.fetch_max(keep_from, Ordering::AcqRel);
        for path in &done {
            std::fs::remove_file(path)?;
        }
        crate::segment::sync_dir(&shared.log_dir)?;
        shared.segments().list.drain(..done.len());
        Ok(done.len())
    }
}
