//! The log tails: every durable record not yet folded into a snapshot, by entity.
//!
//! The segments on disk are the durable copy; this index is how an entity's tail is read
//! without scanning them. Records are added in lsn order (by the one thread that makes
//! them durable), so each entity's list is ordered and gap-free. A checkpoint removes a
//! prefix once the snapshot covering it is stored. Sharded by partition so checkpoints
//! and loads of different partitions do not contend.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::Lsn;

const SHARDS: usize = 64;

/// One entity's unfolded records, in lsn order.
pub(crate) type Tail = Vec<(Lsn, sled::IVec)>;

type EntityTails = HashMap<Vec<u8>, Tail>;

pub(crate) struct Tails {
    shards: Vec<Mutex<HashMap<u16, EntityTails>>>,
}

impl Default for Tails {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Tails {
    fn shard(&self, partition: u16) -> std::sync::MutexGuard<'_, HashMap<u16, EntityTails>> {
        // A panic while holding the lock leaves the maps consistent (every operation is
        // a single insert or removal), so poisoning is ignored.
        self.shards[usize::from(partition) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a record to its entity's tail. Records arrive in lsn order and two records of
    /// one entity never share an lsn, so a record at or below the tail's last is one
    /// applied again (a replica group restarted in the same process re-applies from its
    /// applied floor): it is already there and is not added twice.
    pub fn push(&self, partition: u16, entity: Vec<u8>, lsn: Lsn, payload: sled::IVec) {
        let mut shard = self.shard(partition);
        let tail = shard
            .entry(partition)
            .or_default()
            .entry(entity)
            .or_default();
        if tail.last().is_some_and(|(last, _)| *last >= lsn) {
            return;
        }
        tail.push((lsn, payload));
    }

    /// The records of one entity after `after`, in lsn order.
    pub fn get(&self, partition: u16, entity: &[u8], after: Lsn) -> Vec<(Lsn, Vec<u8>)> {
        let shard = self.shard(partition);
        let Some(list) = shard.get(&partition).and_then(|p| p.get(entity)) else {
            return Vec::new();
        };
        let from = list.partition_point(|(lsn, _)| *lsn <= after);
        list[from..]
            .iter()
            .map(|(lsn, p)| (*lsn, p.to_vec()))
            .collect()
    }

    /// A copy of every entity's tail in one partition (payloads are shared, not copied).
    pub fn partition(&self, partition: u16) -> Vec<(Vec<u8>, Tail)> {
        let shard = self.shard(partition);
        shard
            .get(&partition)
            .map(|p| p.iter().map(|(e, l)| (e.clone(), l.clone())).collect())
            .unwrap_or_default()
    }

    /// Drops the records of an entity up to `upto` (folded into its snapshot).
    pub fn remove_upto(&self, partition: u16, entity: &[u8], upto: Lsn) {
        let mut shard = self.shard(partition);
        let Some(p) = shard.get_mut(&partition) else {
            return;
        };
        if let Some(list) = p.get_mut(entity) {
            let n = list.partition_point(|(lsn, _)| *lsn <= upto);
            list.drain(..n);
            if list.is_empty() {
                p.remove(entity);
            }
        }
        if p.is_empty() {
            shard.remove(&partition);
        }
    }

    /// Drops every record of a partition (its state was replaced wholesale).
    pub fn clear_partition(&self, partition: u16) {
        self.shard(partition).remove(&partition);
    }

    /// Partitions holding unfolded records, ascending.
    pub fn partitions(&self) -> Vec<u16> {
        let mut out: Vec<u16> = (0..SHARDS)
            .flat_map(|i| {
                let shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
                shard.keys().copied().collect::<Vec<_>>()
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// The lowest lsn not yet folded in `partition`, if any.
    pub fn min_lsn_of(&self, partition: u16) -> Option<Lsn> {
        self.shard(partition)
            .get(&partition)?
            .values()
            .filter_map(|l| l.first().map(|(lsn, _)| *lsn))
            .min()
    }

    /// The lowest lsn not yet folded, if any.
    pub fn min_lsn(&self) -> Option<Lsn> {
        (0..SHARDS)
            .filter_map(|i| {
                let shard = self.shards[i].lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .values()
                    .flat_map(|p| p.values())
                    .filter_map(|l| l.first().map(|(lsn, _)| *lsn))
                    .min()
            })
            .min()
    }
}
