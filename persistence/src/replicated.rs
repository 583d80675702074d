//! The node's log as the Raft log of its replica groups (ADR 0016).
//!
//! A replica group's consensus state lives in the same segments as every other record, so
//! one `fdatasync` covers the appends of every group on the node (as TiKV's raft-engine
//! does for its regions). Its frames are records of the reserved partition
//! [`RAFT_PARTITION`], whose entity key names the frame's kind and group and whose payload
//! the consensus layer encodes: the log stores and returns them, it never reads them.
//!
//! * [`Wal::append_raft`] writes one frame; the callback runs once it is durable.
//! * At open the frames found in the segments are kept aside, in lsn order, for the
//!   consensus layer to rebuild its groups' logs ([`Wal::take_raft_frames`]).
//! * A committed entry's records are applied with [`Wal::apply_replicated`], at the lsn of
//!   the frame that carried the entry here: into the log tails and the index overlay,
//!   exactly as a local record is once durable. Checkpoints fold them as usual.
//! * Segments are deleted only below every group's hold ([`Wal::hold_log_from`]): a
//!   frame whose entries a group still needs (not yet applied and folded) stays.
//! * Records of replicated partitions appended through [`Wal::append`] and friends go to
//!   the [`Replicate`] hook instead of the local queue ([`Wal::set_replicate`]): they are
//!   answered once committed and applied.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::group_commit::AckTx;
use crate::{keys, AuxOp, Error, Lsn, Record, Result, Wal};

/// The partition number of consensus frames. No data partition may use it: a cluster
/// has at most `u16::MAX - 1` partitions.
pub const RAFT_PARTITION: u16 = u16::MAX;

/// What a consensus frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftFrameKind {
    /// Log entries appended to the group's log.
    Entries,
    /// The group's log is cut from an index on (the payload names it).
    Truncate,
}

impl RaftFrameKind {
    fn tag(self) -> u8 {
        match self {
            RaftFrameKind::Entries => 1,
            RaftFrameKind::Truncate => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<RaftFrameKind> {
        match tag {
            1 => Some(RaftFrameKind::Entries),
            2 => Some(RaftFrameKind::Truncate),
            _ => None,
        }
    }
}

/// One consensus frame of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftFrame {
    pub group: u16,
    pub kind: RaftFrameKind,
    pub payload: Vec<u8>,
}

impl RaftFrame {
    fn entity(&self) -> Vec<u8> {
        let g = self.group.to_be_bytes();
        vec![self.kind.tag(), g[0], g[1]]
    }

    /// The frame a record of [`RAFT_PARTITION`] read back from a segment is.
    pub(crate) fn from_parts(entity: &[u8], payload: Vec<u8>) -> Result<RaftFrame> {
        match entity {
            [tag, g0, g1] => Ok(RaftFrame {
                group: u16::from_be_bytes([*g0, *g1]),
                kind: RaftFrameKind::from_tag(*tag)
                    .ok_or_else(|| Error::Corrupt(format!("unknown consensus frame kind {tag}")))?,
                payload,
            }),
            other => Err(Error::Corrupt(format!(
                "a consensus frame's key is {} bytes, not 3",
                other.len()
            ))),
        }
    }
}

/// Where records of replicated partitions go instead of the local queue.
pub trait Replicate: Send + Sync + 'static {
    /// Whether records of `partition` are replicated (decided per record).
    fn replicated(&self, partition: u16) -> bool;

    /// Takes the record and calls `done` exactly once: with the lsn the record was
    /// applied at here once its group committed it, or with the reason it was not. MUST
    /// NOT block.
    fn submit(&self, rec: Record, done: Box<dyn FnOnce(Result<Lsn>) + Send>);
}

/// The log's state for replica groups.
#[derive(Default)]
pub(crate) struct RaftState {
    /// Consensus frames found at open, until taken.
    pub recovered: std::sync::Mutex<Vec<(Lsn, RaftFrame)>>,
    /// Per group, the lowest lsn of a frame it still needs.
    pub holds: std::sync::Mutex<BTreeMap<u16, Lsn>>,
    /// Weak: the hook holds the log, the log must not keep the hook alive.
    pub replicate: std::sync::OnceLock<Weak<dyn Replicate>>,
}

impl RaftState {
    /// The lowest lsn any group still needs.
    pub(crate) fn hold(&self) -> Option<Lsn> {
        let holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.values().min().copied()
    }
}

impl Wal {
    /// Sends the records of partitions `replicate` claims to it from now on. Set once,
    /// before the first such record; later calls are ignored. The log keeps only a weak
    /// reference: once the hook is dropped, records are refused.
    pub fn set_replicate(&self, replicate: &Arc<dyn Replicate>) {
        let _ = self.shared().raft.replicate.set(Arc::downgrade(replicate));
    }

    /// The hook that takes `rec`, if its partition is replicated.
    pub(crate) fn replicate_for(&self, rec: &Record) -> Option<Arc<dyn Replicate>> {
        self.shared()
            .raft
            .replicate
            .get()
            .and_then(Weak::upgrade)
            .filter(|r| r.replicated(rec.partition))
    }

    /// Appends one consensus frame; `on_durable` runs on the log's thread once it is
    /// durable (or failed), exactly once, with the frame's lsn.
    ///
    /// The frame takes `span` lsns and is written at the last: the records its entries
    /// carry are applied at the lsns before it, one each, so that two records of one
    /// entity never share an lsn (a checkpoint between them would count the second as
    /// folded already). The lsns a frame reserves follow from its contents: a replay
    /// after a restart assigns the same ones.
    pub async fn append_raft(
        &self,
        frame: RaftFrame,
        span: u64,
        on_durable: impl FnOnce(Result<Lsn>) + Send + 'static,
    ) -> Result<()> {
        let rec = Record {
            partition: RAFT_PARTITION,
            entity: frame.entity(),
            payload: frame.payload,
            aux: Vec::new(),
            also: Vec::new(),
        };
        self.enqueue_local(rec, span, AckTx::Callback(Box::new(on_durable)))
            .await
    }

    /// The consensus frames found in the segments at open, in lsn order. The first call
    /// takes them; later calls answer nothing.
    pub fn take_raft_frames(&self) -> Vec<(Lsn, RaftFrame)> {
        let mut recovered = self
            .shared()
            .raft
            .recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *recovered)
    }

    /// Keeps every segment holding a frame at or above `from` for `group` (`None`: the
    /// group needs no frame).
    pub fn hold_log_from(&self, group: u16, from: Option<Lsn>) {
        let mut holds = self
            .shared()
            .raft
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match from {
            Some(lsn) => holds.insert(group, lsn),
            None => holds.remove(&group),
        };
    }

    /// Applies a committed entry's records here, record `i` at lsn `first + i` (lsns the
    /// frame that carried the entry reserved, see [`Wal::append_raft`]): into the tails
    /// and the index overlay, as a durable local record is. Entries of one group MUST be
    /// applied in log order.
    pub fn apply_replicated(&self, first: Lsn, records: Vec<Record>) -> Result<()> {
        let shared = self.shared();
        shared.check_failed()?;
        let mut aux = Vec::new();
        for (lsn, rec) in (first..).zip(records) {
            // Checked before it was proposed ([`Wal::try_append_then`]); a committed record
            // that still does not fit (written by a node that did not check) is left out
            // with an error rather than stopping the group: every replica leaves it out.
            if let Err(e) = std::iter::once(&rec.entity)
                .chain(rec.also.iter().map(|p| &p.entity))
                .try_for_each(|e| keys::check_entity(e))
            {
                tracing::error!(partition = rec.partition, lsn, error = %e, "a committed record is not applied");
                continue;
            }
            aux.extend(rec.aux.into_iter().map(|op| match op {
                AuxOp::Put(k, v) => (keys::aux_key(&k).into(), Some(v.into())),
                AuxOp::Delete(k) => (keys::aux_key(&k).into(), None),
            }));
            shared
                .tails
                .push(rec.partition, rec.entity, lsn, rec.payload.into());
            for part in rec.also {
                shared
                    .tails
                    .push(part.partition, part.entity, lsn, part.payload.into());
            }
        }
        if !aux.is_empty() {
            shared.overlay.apply(aux);
        }
        Ok(())
    }

    /// The lowest lsn of a record of `partitions` not yet folded into a snapshot.
    pub fn unfolded_from(&self, partitions: &[u16]) -> Option<Lsn> {
        let tails = &self.shared().tails;
        partitions.iter().filter_map(|p| tails.min_lsn_of(*p)).min()
    }

    /// Makes everything the store holds durable: snapshots of checkpoints and the index
    /// changes of applied records. Blocking.
    pub fn flush_store(&self) -> Result<()> {
        let shared = self.shared();
        let _serial = shared
            .checkpoint_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let flushed = shared
            .overlay
            .write_to(&shared.tree)
            .and_then(|()| shared.db.flush().map(drop).map_err(Into::into));
        shared.fail_on_storage_error("flushing the store", flushed)
    }

    /// Every record below this lsn is folded into a snapshot and its index changes are
    /// in the store, on disk: what a group's log holds below it is no longer needed to
    /// rebuild this node's state. Moves with [`Wal::release_log`].
    pub fn folded_below(&self) -> Lsn {
        self.shared().folded_below.load(Ordering::Acquire)
    }
}
