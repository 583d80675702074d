//! Where consensus keeps its state: the raft log, the vote and the state machine (the
//! cluster map), in one small sled database of the node's own (`DATA/cluster`), apart
//! from the entities' log so neither's compaction or cache affects the other.
//!
//! Layout: tree `log` maps a log index (big-endian u64) to its entry; tree `meta` holds
//! the vote, the committed and the purged log ids; tree `sm` holds the applied state
//! (the map, the last applied log id, the membership) and the latest snapshot. Values
//! are JSON: this state is small and written a few times a second at most, and JSON
//! carries openraft's types without their serde quirks mattering.

// The error types are openraft's, fixed by the traits implemented here.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{MapReply, NodeIdOf, TypeConfig};
use crate::map::ClusterMap;

type StorageResult<T> = Result<T, StorageError<NodeIdOf>>;

/// The open database, shared by the log store and the state machine.
#[derive(Clone)]
pub(crate) struct Store {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    sm: sled::Tree,
}

impl Store {
    pub(crate) fn open(dir: &std::path::Path) -> Result<Store, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 * 1024 * 1024)
            .open()?;
        Ok(Store {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            sm: db.open_tree("sm")?,
            db,
        })
    }

    pub(crate) async fn flush(&self) {
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(error = %e, "flushing the cluster state");
        }
    }

    /// The applied state as last persisted (the default before the first start).
    pub(crate) fn applied(&self) -> Result<Applied, String> {
        match self.sm.get("state").map_err(|e| e.to_string())? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
            None => Ok(Applied::default()),
        }
    }
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeIdOf> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeIdOf> {
    StorageIOError::write(AnyError::new(&e)).into()
}

fn get_json<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    key: &str,
) -> StorageResult<Option<T>> {
    match tree.get(key).map_err(read_err)? {
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(tree: &sled::Tree, key: &str, value: &T) -> StorageResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    tree.insert(key, bytes).map_err(write_err)?;
    Ok(())
}

// ---- the log ------------------------------------------------------------------------

/// The raft log and vote.
#[derive(Clone)]
pub(crate) struct LogStore(pub(crate) Store);

impl LogStore {
    fn last_purged(&self) -> StorageResult<Option<LogId<NodeIdOf>>> {
        get_json(&self.0.meta, "purged")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.0.log.range(start.to_be_bytes()..) {
            let (key, value) = item.map_err(read_err)?;
            let index =
                u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                    read_err(std::io::Error::other("a raft log key is not 8 bytes"))
                })?);
            if !range.contains(&index) {
                break;
            }
            out.push(serde_json::from_slice(&value).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = match self.0.log.last().map_err(read_err)? {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> = serde_json::from_slice(&value).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeIdOf>) -> StorageResult<()> {
        put_json(&self.0.meta, "vote", vote)?;
        self.0.meta.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeIdOf>>> {
        get_json(&self.0.meta, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeIdOf>>) -> StorageResult<()> {
        // Not flushed: losing it only means re-learning it from the leader.
        put_json(&self.0.meta, "committed", &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeIdOf>>> {
        Ok(get_json::<Option<LogId<NodeIdOf>>>(&self.0.meta, "committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.0.log.apply_batch(batch).map_err(write_err)?;
        let flushed = self
            .0
            .log
            .flush_async()
            .await
            .map(drop)
            .map_err(std::io::Error::other);
        let failed = flushed
            .as_ref()
            .err()
            .map(|e| write_err(std::io::Error::other(e.to_string())));
        callback.log_io_completed(flushed);
        failed.map_or(Ok(()), Err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeIdOf>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.0.log.range(log_id.index.to_be_bytes()..) {
            let (key, _) = item.map_err(read_err)?;
            batch.remove(key);
        }
        self.0.log.apply_batch(batch).map_err(write_err)?;
        self.0.log.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeIdOf>) -> StorageResult<()> {
        put_json(&self.0.meta, "purged", &log_id)?;
        self.0.meta.flush_async().await.map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for item in self.0.log.range(..=log_id.index.to_be_bytes()) {
            let (key, _) = item.map_err(read_err)?;
            batch.remove(key);
        }
        self.0.log.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}

// ---- the state machine --------------------------------------------------------------

/// Everything the state machine holds, persisted after every applied batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Applied {
    pub(crate) last_applied: Option<LogId<NodeIdOf>>,
    pub(crate) membership: StoredMembership<NodeIdOf, openraft::BasicNode>,
    pub(crate) map: ClusterMap,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeIdOf, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The cluster map as consensus applies it; every change is published on `tx`.
pub(crate) struct StateMachine {
    store: Store,
    state: Applied,
    tx: watch::Sender<Arc<ClusterMap>>,
    snapshots_built: u64,
}

impl StateMachine {
    pub(crate) fn new(store: Store, state: Applied, tx: watch::Sender<Arc<ClusterMap>>) -> Self {
        StateMachine {
            store,
            state,
            tx,
            snapshots_built: 0,
        }
    }

    async fn persist(&self) -> StorageResult<()> {
        put_json(&self.store.sm, "state", &self.state)?;
        self.store.sm.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    fn publish(&self) {
        let map = Arc::new(self.state.map.clone());
        self.tx.send_if_modified(|current| {
            if **current == *map {
                false
            } else {
                *current = map;
                true
            }
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeIdOf>>,
        StoredMembership<NodeIdOf, openraft::BasicNode>,
    )> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<MapReply>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.state.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => Ok(self.state.map.clone()),
                EntryPayload::Normal(cmd) => {
                    // A refused command leaves the map as it was (`apply` promises it).
                    match self.state.map.apply(&cmd) {
                        Ok(()) => Ok(self.state.map.clone()),
                        Err(e) => Err(e),
                    }
                }
                EntryPayload::Membership(m) => {
                    self.state.membership = StoredMembership::new(Some(entry.log_id), m);
                    Ok(self.state.map.clone())
                }
            };
            replies.push(MapReply(reply));
        }
        self.persist().await?;
        self.publish();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            store: self.store.clone(),
            state: self.state.clone(),
            seq: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeIdOf, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let map: ClusterMap = serde_json::from_slice(&data).map_err(read_err)?;
        self.state = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            map,
        };
        put_json(
            &self.store.sm,
            "snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.persist().await?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            get_json::<StoredSnapshot>(&self.store.sm, "snapshot")?.map(|s| Snapshot {
                meta: s.meta,
                snapshot: Box::new(Cursor::new(s.data)),
            }),
        )
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
pub(crate) struct SnapshotBuilder {
    store: Store,
    state: Applied,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let data = serde_json::to_vec(&self.state.map).map_err(write_err)?;
        let snapshot_id = match self.state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.state.last_applied,
            last_membership: self.state.membership.clone(),
            snapshot_id,
        };
        put_json(
            &self.store.sm,
            "snapshot",
            &StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            },
        )?;
        self.store.sm.flush_async().await.map_err(write_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
