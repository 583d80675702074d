//! A partition's state leaving one node and arriving on another (the cluster drives the
//! handoff; see the cluster crate's `node` module). The partition MUST be fenced on both
//! sides: no entity of it active, no command for it arriving.
//!
//! What travels is one snapshot per entity. The indexes and the deadline index are not
//! shipped: they are derived from the entities' states, so the receiver derives them
//! again (and removes those its own older copy of the partition had).

use shardmall_persistence::Fold;

use crate::domain::Millis;
use crate::error::{Result, ShopError};
use crate::host::{deadline_key, deadline_prefix};
use crate::keys::EntityKey;
use crate::kinds::{self, KindVisitor, Routed};
use crate::shop::{fold_entity, Shop};

pub use shardmall_persistence::PartitionData;

/// Auxiliary (key, value) entries: index entries and deadline keys.
type AuxEntries = Vec<(Vec<u8>, Vec<u8>)>;

impl Shop {
    /// Folds the partition's log into snapshots and returns them all.
    pub async fn export_partition(&self, partition: u16) -> Result<PartitionData> {
        self.wal()
            .export_partition(partition, Box::new(fold_entity))
            .await
            .map_err(|e| ShopError::Internal(format!("exporting partition {partition}: {e}")))
    }

    /// Replaces this node's copy of the partition with `entities`, durably, indexes and
    /// deadlines included. An empty `entities` clears the partition.
    pub async fn install_partition(&self, partition: u16, entities: PartitionData) -> Result<()> {
        let wal = self.wal().clone();
        // The copy being replaced, to find the index entries it implies. An entity of it
        // that does not fold is left out (its entries stay, pointing at nothing).
        let lenient: Fold = Box::new(
            |entity: &[u8], snapshot: Option<&[u8]>, tail: &[(u64, Vec<u8>)]| {
                fold_entity(entity, snapshot, tail).or_else(|e| {
                tracing::warn!(entity = %String::from_utf8_lossy(entity), error = %e, "an entity of the replaced copy does not fold");
                Ok(None)
            })
            },
        );
        let old = wal
            .export_partition(partition, lenient)
            .await
            .map_err(|e| ShopError::Internal(format!("reading partition {partition}: {e}")))?;
        let mut aux_delete = Vec::new();
        for (key, snapshot) in &old {
            match derived(partition, key, snapshot) {
                Ok(aux) => aux_delete.extend(aux.into_iter().map(|(k, _)| k)),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "an old snapshot does not decode; its index entries stay")
                }
            }
        }
        let mut aux_put = Vec::new();
        for (key, snapshot) in &entities {
            aux_put.extend(derived(partition, key, snapshot).map_err(ShopError::BadRequest)?);
        }
        // An entry both old and new must end up present.
        let puts: std::collections::HashSet<&Vec<u8>> = aux_put.iter().map(|(k, _)| k).collect();
        aux_delete.retain(|k| !puts.contains(k));
        wal.install_partition(
            partition,
            entities,
            vec![deadline_prefix(partition)],
            aux_delete,
            aux_put,
        )
        .await
        .map(drop)
        .map_err(|e| ShopError::Internal(format!("installing partition {partition}: {e}")))
    }
}

/// The aux entries (index entries and the deadline key) an entity's state implies.
fn derived(partition: u16, key: &[u8], snapshot: &[u8]) -> std::result::Result<AuxEntries, String> {
    struct Derive<'a>(&'a [u8]);
    impl KindVisitor for Derive<'_> {
        type Out = std::result::Result<(AuxEntries, Option<Millis>), String>;
        fn visit<E: Routed>(self) -> Self::Out {
            let state: E = crate::codec::decode_state(self.0).map_err(|e| e.to_string())?;
            Ok((state.index_entries(), state.next_deadline()))
        }
    }
    let entity = EntityKey::from_bytes(key).ok_or("unknown entity key")?;
    let (mut aux, deadline) = kinds::visit(entity.kind, Derive(snapshot))?;
    if let Some(at) = deadline {
        aux.push((deadline_key(partition, at, key), Vec::new()));
    }
    Ok(aux)
}
