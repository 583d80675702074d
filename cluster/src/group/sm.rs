//! A group's state machine: committed entries applied to this node's copy of the group's
//! partitions, through the log's own apply path (tails, index overlay, checkpoints).
//!
//! An entry is applied at the lsn of the frame that carried it here, so a checkpoint's
//! snapshot lsn tells, after a restart, which of the entries applied again it already
//! holds. What survives a restart is what checkpoints folded: a snapshot of the group
//! checkpoints every partition of the group fully, flushes the store, and only then
//! records its index as the **applied floor**; a restarted replica reports the floor as
//! its last applied entry and applies the rest of its log again.

// The error types are openraft's, fixed by the traits implemented here.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StoredMembership,
};
use shardmall_persistence::{PartitionData, Wal};

use super::log::{
    decode, encode, meta_get, meta_put, read_err, write_err, GroupLog, StorageResult,
};
use super::{AppliedAt, GroupConfig, GroupHost};

type Membership = StoredMembership<u64, BasicNode>;

/// A snapshot's bytes: every partition of the group, as (partition, state).
type SnapshotData = Vec<(u16, PartitionData)>;

pub(crate) struct GroupSm {
    group: u16,
    wal: Wal,
    log: GroupLog,
    host: Arc<dyn GroupHost>,
    partitions: Vec<u16>,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    current: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    /// When a snapshot could not be made last (see [`GroupSm::build`]).
    build_failed_at: Option<std::time::Instant>,
    /// How long after a failed snapshot the next is tried.
    retry_build: std::time::Duration,
}

impl GroupSm {
    pub(crate) fn open(
        group: u16,
        wal: Wal,
        log: GroupLog,
        host: Arc<dyn GroupHost>,
        partitions: Vec<u16>,
        retry_build: std::time::Duration,
    ) -> Result<GroupSm, String> {
        let last_applied = meta_get(&wal, group, "floor")?;
        let membership = meta_get(&wal, group, "membership")?.unwrap_or_default();
        Ok(GroupSm {
            group,
            wal,
            log,
            host,
            partitions,
            last_applied,
            membership,
            current: None,
            build_failed_at: None,
            retry_build,
        })
    }

    /// Folds the group's partitions into the store and flushes it: everything applied so
    /// far survives a restart without the log. Answers false when something did not fold
    /// (the floor then stays where it was).
    async fn checkpoint_all(&self) -> StorageResult<bool> {
        let Some(last) = self.last_applied else {
            return Ok(true);
        };
        let host = self.host.clone();
        let wal = self.wal.clone();
        let partitions = self.partitions.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            for p in partitions {
                host.checkpoint(p)?;
            }
            wal.flush_store().map_err(|e| e.to_string())
        })
        .await
        .map_err(write_err)?
        .map_err(write_err)?;
        // Every entry up to `last` was applied at or below this lsn: no record of the
        // group's partitions at or below it may be left unfolded.
        Ok(match self.log.written_lsn_at(last.index) {
            Some(lsn) => self
                .wal
                .unfolded_from(&self.partitions)
                .is_none_or(|m| m > lsn),
            // Nothing of the group is in the log (all purged): nothing to fold.
            None => true,
        })
    }
}

impl RaftStateMachine<GroupConfig> for GroupSm {
    type SnapshotBuilder = Built;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<u64>>, Membership)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<AppliedAt>>
    where
        I: IntoIterator<Item = Entry<GroupConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut answers = Vec::new();
        for entry in entries {
            let lsn = self.log.first_lsn_of(&entry.log_id).await?;
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    let records = batch.0.into_iter().map(Into::into).collect();
                    self.wal.apply_replicated(lsn, records).map_err(write_err)?;
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    meta_put(&self.wal, self.group, "membership", &self.membership).await?;
                }
            }
            self.last_applied = Some(entry.log_id);
            answers.push(AppliedAt(lsn));
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Built here, between two applies, so the snapshot is exactly the state at
        // `last_applied` (openraft runs the builder in a task of its own).
        Built(self.build().await)
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = decode(&bytes).map_err(read_err)?;
        for (partition, entities) in data {
            if !self.partitions.contains(&partition) {
                return Err(read_err(format!(
                    "group {}: a snapshot holds partition {partition} of another group",
                    self.group
                )));
            }
            self.host
                .install(partition, entities)
                .await
                .map_err(write_err)?;
        }
        if let Some(last) = meta.last_log_id {
            self.log.rewrite_after(last.index).await?;
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        meta_put(&self.wal, self.group, "membership", &self.membership).await?;
        if let Some(floor) = &self.last_applied {
            meta_put(&self.wal, self.group, "floor", floor).await?;
        }
        self.current = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<GroupConfig>>> {
        Ok(self.current.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

impl GroupSm {
    /// A snapshot of the state at `last_applied`; when one cannot be made now (a
    /// partition does not fold, the store does not flush), the last one made, which
    /// openraft takes as nothing new: a failed build MUST NOT stop the group (openraft
    /// treats a builder's error as fatal). It is tried again at the next trigger, not
    /// sooner than `retry_build` later (each attempt folds every partition of the group).
    async fn build(&mut self) -> StorageResult<Snapshot<GroupConfig>> {
        let recent_failure = self
            .build_failed_at
            .is_some_and(|at| at.elapsed() < self.retry_build);
        if !recent_failure {
            match self.try_build().await {
                Ok(snapshot) => {
                    self.build_failed_at = None;
                    return Ok(snapshot);
                }
                Err(e) => {
                    tracing::warn!(group = self.group, error = %e, "no snapshot of the replica group this time; its log is kept until one is made");
                    self.build_failed_at = Some(std::time::Instant::now());
                }
            }
        }
        Ok(self.last_snapshot())
    }

    /// The snapshot made last, or one that claims nothing (no last log id).
    fn last_snapshot(&self) -> Snapshot<GroupConfig> {
        match &self.current {
            Some((meta, data)) => Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            },
            None => Snapshot {
                meta: SnapshotMeta {
                    last_log_id: None,
                    last_membership: self.membership.clone(),
                    snapshot_id: format!("{}-none", self.group),
                },
                snapshot: Box::new(Cursor::new(
                    encode(&SnapshotData::new()).unwrap_or_default(),
                )),
            },
        }
    }

    async fn try_build(&mut self) -> StorageResult<Snapshot<GroupConfig>> {
        if !self.checkpoint_all().await? {
            return Err(write_err(format!(
                "group {}: not every record folded; the snapshot waits",
                self.group
            )));
        }
        let mut data: SnapshotData = Vec::with_capacity(self.partitions.len());
        for p in &self.partitions {
            data.push((*p, self.host.export(*p).await.map_err(read_err)?));
        }
        let bytes = encode(&data).map_err(write_err)?;
        if let Some(floor) = &self.last_applied {
            meta_put(&self.wal, self.group, "floor", floor).await?;
        }
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: match self.last_applied {
                Some(l) => format!("{}-{}-{}", self.group, l.leader_id, l.index),
                None => format!("{}-empty", self.group),
            },
        };
        self.current = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

/// A snapshot built when its builder was made.
pub(crate) struct Built(StorageResult<Snapshot<GroupConfig>>);

impl RaftSnapshotBuilder<GroupConfig> for Built {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<GroupConfig>> {
        match &self.0 {
            Ok(s) => Ok(Snapshot {
                meta: s.meta.clone(),
                snapshot: Box::new(Cursor::new(s.snapshot.get_ref().clone())),
            }),
            Err(e) => Err(e.clone()),
        }
    }
}
