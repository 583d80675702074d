//! The values that cross the persistence API: records going in, entity logs coming out.

/// Log sequence number. Assigned by the writer in queue order, starting at 1, never
/// reused across restarts; 0 means "nothing".
pub type Lsn = u64;

/// A change to the auxiliary key space, applied atomically with the record carrying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuxOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// One log record: opaque payload bytes of one entity, plus the auxiliary key changes it
/// implies (secondary indexes, deadline index), written in the same atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: u16,
    /// At most `u16::MAX` bytes.
    pub entity: Vec<u8>,
    pub payload: Vec<u8>,
    /// Applied in order; a later op on the same key wins.
    pub aux: Vec<AuxOp>,
    /// Records of other entities written in the same frame: durable, recovered and
    /// applied together with this one, at the same lsn.
    pub also: Vec<Part>,
}

/// Another entity's record carried in the frame of a [`Record`]: one write for a
/// decision that opens two entities at once (a flash-sale buy and its order, ADR 0013).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub partition: u16,
    /// At most `u16::MAX` bytes.
    pub entity: Vec<u8>,
    pub payload: Vec<u8>,
}

/// What is stored for one entity: its last checkpointed snapshot and the records logged
/// after it, in LSN order. The entity's state is `snapshot` with `tail` applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityLog {
    pub snapshot: Option<Vec<u8>>,
    pub tail: Vec<(Lsn, Vec<u8>)>,
}

/// What one [`crate::Wal::checkpoint_partition`] call folded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Entities whose log was folded into a new snapshot.
    pub entities: usize,
    /// Log records removed.
    pub records: usize,
    /// Entities with a large snapshot and a short tail, left for a later pass.
    pub deferred: usize,
}
