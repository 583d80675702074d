//! Checkpoints: folding a partition's log into per-entity snapshots.
//!
//! A checkpoint never talks to live actors: it folds the stored snapshot with the stored
//! log using the caller's `fold` (the domain's `apply`), then writes the new snapshots
//! and removes exactly the folded log keys in one atomic batch. An actor's in-memory
//! state is snapshot + tail either way, so it does not care when a checkpoint happens.

use std::ops::Bound;
use std::sync::atomic::Ordering;

use crate::keys::{self, LOG};
use crate::{CheckpointStats, Lsn, Result, Wal};

/// Entities folded per atomic batch: bounds the memory and the size of one sled batch.
const ENTITIES_PER_BATCH: usize = 512;

/// A snapshot at least this large is rewritten only once its log tail has grown to half
/// its size: a big state (a hot campaign's claims) is not re-encoded on every pass, and
/// each logged byte is rewritten a bounded number of times.
const LARGE_SNAPSHOT: usize = 64 * 1024;

/// The log records of one entity collected for folding.
struct Group {
    entity: Vec<u8>,
    keys: Vec<sled::IVec>,
    tail: Vec<(Lsn, Vec<u8>)>,
}

impl Wal {
    /// Folds every logged entity of the partition into its snapshot.
    ///
    /// For each entity with log records, calls `fold(entity, old_snapshot, tail)`:
    /// `Ok(Some(s))` stores `s`, `Ok(None)` deletes the snapshot, `Err(msg)` skips the
    /// entity (logged as a warning; its records stay in the log). New snapshots and the
    /// removal of exactly the folded log keys are applied in one atomic batch per group
    /// of entities.
    ///
    /// Only records applied before the call starts are folded. A sled scan is not a
    /// point-in-time view: while it runs, the writer may apply a batch holding an entity's
    /// lsn 6 at a key the scan has already passed, then a batch holding lsn 7 at a key it
    /// has not. Folding 7 without 6 would set the snapshot lsn past 6 and lose it. Every
    /// record up to the applied lsn read first exists before the scan starts, so the
    /// bound makes each entity's folded tail a gap-free prefix of its log.
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
        let shared = self.shared();
        // Poisoning only means another checkpoint panicked inside `fold`; the tree itself
        // is consistent (batches are atomic), so carry on.
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let bound = shared.applied_lsn.load(Ordering::Acquire);
        let prefix = keys::partition_prefix(LOG, partition);
        // Exists: the first byte is `L`, below 0xff.
        let end = keys::prefix_end(&prefix).unwrap_or_else(|| vec![LOG + 1]);
        let mut cursor = Bound::Included(prefix);
        let mut stats = CheckpointStats::default();
        loop {
            let mut groups: Vec<Group> = Vec::new();
            let mut next = None;
            for kv in shared
                .tree
                .range::<Vec<u8>, _>((cursor.clone(), Bound::Excluded(end.clone())))
            {
                let (k, v) = kv?;
                let key = keys::decode_log_key(&k)?;
                if groups.last().is_none_or(|g| g.entity != key.entity) {
                    if groups.len() == ENTITIES_PER_BATCH {
                        next = Some(keys::entity_prefix(LOG, partition, key.entity));
                        break;
                    }
                    groups.push(Group {
                        entity: key.entity.to_vec(),
                        keys: Vec::new(),
                        tail: Vec::new(),
                    });
                }
                if key.lsn <= bound {
                    // Just pushed or matched above.
                    let g = groups.last_mut().expect("a group for this entity exists");
                    g.tail.push((key.lsn, v.to_vec()));
                    g.keys.push(k);
                }
            }
            let mut batch = sled::Batch::default();
            for g in groups {
                let Some(&(last, _)) = g.tail.last() else {
                    continue;
                };
                let skey = keys::snapshot_key(partition, &g.entity);
                let (old_lsn, old) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
                // Records at or below the snapshot lsn were folded already (they cannot
                // exist, since snapshot and removal are one batch, but never fold twice).
                let first_new = g.tail.partition_point(|(lsn, _)| *lsn <= old_lsn);
                if first_new == g.tail.len() {
                    for k in g.keys {
                        batch.remove(k);
                    }
                    continue;
                }
                let old_len = old.as_ref().map_or(0, |s| s.len());
                let tail_len: usize = g.tail[first_new..].iter().map(|(_, r)| r.len()).sum();
                if old_len >= LARGE_SNAPSHOT && tail_len * 2 < old_len {
                    stats.deferred += 1;
                    continue;
                }
                match fold(&g.entity, old.as_deref(), &g.tail[first_new..]) {
                    Ok(new) => {
                        batch.insert(skey, keys::encode_snapshot(last, new.as_deref()));
                        stats.entities += 1;
                        stats.records += g.keys.len();
                        for k in g.keys {
                            batch.remove(k);
                        }
                    }
                    Err(msg) => {
                        tracing::warn!(partition, entity = ?String::from_utf8_lossy(&g.entity), error = %msg,
                            "checkpoint skipped an entity whose log does not fold");
                    }
                }
            }
            shared.tree.apply_batch(batch)?;
            match next {
                Some(n) => cursor = Bound::Included(n),
                None => break,
            }
        }
        Ok(stats)
    }

    /// Partitions that currently hold log records (for the checkpoint scheduler).
    pub fn partitions_with_log(&self) -> Result<Vec<u16>> {
        let tree = &self.shared().tree;
        let mut out = Vec::new();
        let mut from = vec![LOG];
        // One seek per partition instead of a scan of the whole log.
        while let Some(kv) = tree.range::<Vec<u8>, _>(from.clone()..vec![LOG + 1]).next() {
            let (k, _) = kv?;
            let p = keys::decode_log_key(&k)?.partition;
            out.push(p);
            match p.checked_add(1) {
                Some(n) => from = keys::partition_prefix(LOG, n),
                None => break,
            }
        }
        Ok(out)
    }
}
