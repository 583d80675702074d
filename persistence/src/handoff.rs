//! A partition's whole state leaving this node ([`Wal::export_partition`]) or replacing
//! this node's copy ([`Wal::install_partition`]), for moving partitions between nodes.
//!
//! Both MUST be called with the partition fenced by the caller: no record of it is
//! appended while they run. Appends to other partitions go on undisturbed.
//!
//! Installing writes every snapshot of the partition, and a tombstone for every entity
//! the old copy held that the new one does not, at one lsn: the highest applied so far.
//! Every record of the old copy has an lsn at or below it, so neither a later load nor
//! the replay after a restart sees them (replay keeps only records above an entity's
//! snapshot lsn), and snapshot lsns still only grow. The same batch raises the
//! high-water mark to that lsn, so replay does not re-apply the old records' index
//! changes either.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use crate::keys::{self, HIGH_WATER, SNAPSHOT};
use crate::{Error, Lsn, Result, Wal};

/// Folds an entity's snapshot and log tail into its current state (`None`: the entity
/// has no state). The domain's `apply`, as the checkpointer uses it.
pub type Fold = Box<
    dyn FnMut(
            &[u8],
            Option<&[u8]>,
            &[(Lsn, Vec<u8>)],
        ) -> std::result::Result<Option<Vec<u8>>, String>
        + Send,
>;

/// (entity key, state) pairs: a partition's whole state.
pub type PartitionData = Vec<(Vec<u8>, Vec<u8>)>;

/// `S` + partition: every snapshot key of the partition starts with it.
fn partition_prefix(partition: u16) -> Vec<u8> {
    let mut k = vec![SNAPSHOT];
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

impl Wal {
    /// The current state of every entity of `partition`: snapshot and log tail folded
    /// with `fold`, entities whose fold gives no state left out. Read-only. A fold error
    /// fails the export (nothing is silently left behind).
    pub async fn export_partition(&self, partition: u16, fold: Fold) -> Result<PartitionData> {
        // Everything appended before the fence is in the tails once this returns.
        self.flush().await?;
        let wal = self.clone();
        tokio::task::spawn_blocking(move || wal.fold_partition(partition, fold))
            .await
            .map_err(|e| Error::Corrupt(format!("exporting partition {partition}: {e}")))?
    }

    /// Every entity of the partition this node holds anything of: a snapshot (or
    /// tombstone) or unfolded records. The caller holds the checkpoint lock.
    fn partition_entities(&self, partition: u16) -> Result<BTreeSet<Vec<u8>>> {
        let shared = self.shared();
        let mut entities = BTreeSet::new();
        for item in shared.tree.scan_prefix(partition_prefix(partition)) {
            let (key, _) = item?;
            // `S` + partition (2) + entity length (2) + entity.
            let entity = key
                .get(5..)
                .ok_or_else(|| Error::Corrupt(format!("short snapshot key {key:02x?}")))?;
            entities.insert(entity.to_vec());
        }
        entities.extend(
            shared
                .tails
                .partition(partition)
                .into_iter()
                .map(|(e, _)| e),
        );
        Ok(entities)
    }

    fn fold_partition(&self, partition: u16, mut fold: Fold) -> Result<PartitionData> {
        let shared = self.shared();
        // No checkpoint moves records from the tails to snapshots under our feet.
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let entities = self.partition_entities(partition)?;
        let mut out = Vec::with_capacity(entities.len());
        for entity in entities {
            let skey = keys::snapshot_key(partition, &entity);
            let (lsn, snapshot) = keys::decode_snapshot(shared.tree.get(&skey)?.as_deref())?;
            let tail = shared.tails.get(partition, &entity, lsn);
            let state = if tail.is_empty() {
                snapshot
            } else {
                fold(&entity, snapshot.as_deref(), &tail).map_err(|e| {
                    Error::Corrupt(format!(
                        "entity {:?} of partition {partition} does not fold: {e}",
                        String::from_utf8_lossy(&entity)
                    ))
                })?
            };
            if let Some(state) = state {
                out.push((entity, state));
            }
        }
        Ok(out)
    }

    /// Makes this node's copy of `partition` exactly `entities`, durably, in one atomic
    /// batch: their states become the snapshots (with empty log tails), every other
    /// entity of the partition is gone, the auxiliary keys under `clear_prefixes` and in
    /// `aux_delete` are deleted, then those in `aux_put` written. An empty `entities`
    /// clears the partition. Survives a restart as written.
    pub async fn install_partition(
        &self,
        partition: u16,
        entities: PartitionData,
        clear_prefixes: Vec<Vec<u8>>,
        aux_delete: Vec<Vec<u8>>,
        aux_put: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        for (entity, _) in &entities {
            keys::check_entity(entity)?;
        }
        self.flush().await?;
        let wal = self.clone();
        tokio::task::spawn_blocking(move || {
            wal.replace_partition(partition, entities, clear_prefixes, aux_delete, aux_put)
        })
        .await
        .map_err(|e| Error::Corrupt(format!("installing partition {partition}: {e}")))?
    }

    fn replace_partition(
        &self,
        partition: u16,
        entities: PartitionData,
        clear_prefixes: Vec<Vec<u8>>,
        aux_delete: Vec<Vec<u8>>,
        aux_put: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<()> {
        let shared = self.shared();
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Every record of the partition is applied (flushed above, nothing appended
        // since), so each has an lsn at or below this one.
        let lsn: Lsn = shared.applied_lsn.load(Ordering::Acquire);
        let mut batch = sled::Batch::default();
        let keep: BTreeSet<&[u8]> = entities.iter().map(|(e, _)| e.as_slice()).collect();
        let old = self.partition_entities(partition)?;
        for entity in old.iter().filter(|e| !keep.contains(e.as_slice())) {
            batch.insert(
                keys::snapshot_key(partition, entity),
                keys::encode_snapshot(lsn, None),
            );
        }
        for (entity, state) in &entities {
            batch.insert(
                keys::snapshot_key(partition, entity),
                keys::encode_snapshot(lsn, Some(state)),
            );
        }
        // The store becomes the whole truth for the aux keys first: the partition is
        // fenced, so no change of it arrives meanwhile.
        shared.overlay.write_to(&shared.tree)?;
        let mut gone: BTreeSet<Vec<u8>> = BTreeSet::new();
        for prefix in &clear_prefixes {
            for item in shared.tree.scan_prefix(keys::aux_key(prefix)) {
                gone.insert(item?.0.to_vec());
            }
        }
        gone.extend(aux_delete.iter().map(|k| keys::aux_key(k)));
        for key in gone {
            batch.remove(key);
        }
        for (k, v) in aux_put {
            batch.insert(keys::aux_key(&k), v);
        }
        // Replay must not re-apply the old records' index changes: every record up to
        // `lsn` has its changes in the store, which the flush below makes durable.
        if shared.stable_lsn.load(Ordering::Acquire) < lsn {
            batch.insert(HIGH_WATER, &lsn.to_be_bytes()[..]);
        }
        shared.tree.apply_batch(batch)?;
        shared.tails.clear_partition(partition);
        shared.db.flush()?;
        shared.stable_lsn.fetch_max(lsn, Ordering::AcqRel);
        Ok(())
    }
}
