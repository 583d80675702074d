//! Write-ahead log, checkpoints and auxiliary keys for shardmall: the log in append-only
//! segment files, snapshots and auxiliary keys in one sled database.
//!
//! Persistence knows nothing of the domain: a [`Record`] is opaque payload bytes under an
//! entity key, plus auxiliary key changes ([`AuxOp`]) that must land atomically with it.
//!
//! A record flows through these components:
//!
//! * [`Wal::append`] puts it on a bounded queue and returns an [`Ack`] at once
//!   ([`wal`]).
//! * The writer thread drains the queue in groups, gives each record its [`Lsn`], and
//!   appends the whole group to the current log segment with one write ([`group_commit`],
//!   frames as in [`segment`]).
//! * The flusher thread makes written groups durable with one `fdatasync` for many
//!   records, records their auxiliary changes in memory ([`overlay`]; the next checkpoint
//!   writes them to the store, [`keys`] layout), adds them
//!   to the in-memory log tails ([`tails`]), publishes the durable position and resolves
//!   the waiting [`Ack`]s. In [`Durability::Sync`] an ack resolves only after its sync;
//!   in [`Durability::Relaxed`] right after the write, with a sync every few
//!   milliseconds ([`config`]).
//! * An entity actor is rebuilt from its snapshot plus its log tail
//!   ([`Wal::load_entity`]); a background checkpointer folds the tails into snapshots,
//!   and [`Wal::release_log`] deletes the segments nothing unfolded needs ([`checkpoint`]).
//!   Opening the log replays the segments left ([`Wal::open`]).
//! * Counters and histograms for `/metrics` come from [`Wal::metrics`] ([`metrics`]).

mod checkpoint;
mod config;
mod group_commit;
mod handoff;
mod keys;
mod metrics;
mod overlay;
mod record;
mod replicated;
mod segment;
mod tails;
mod wal;

pub use config::{Durability, WalConfig};
pub use group_commit::Ack;
pub use handoff::{Fold, PartitionData};
pub use metrics::WalMetrics;
pub use record::{AuxOp, CheckpointStats, EntityLog, Lsn, Part, Record};
pub use replicated::{RaftFrame, RaftFrameKind, Replicate, RAFT_PARTITION};
pub use wal::{QueueFull, Wal};

/// Everything that can go wrong in the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage engine reported an error.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The log is shut down (or its tasks are gone) and takes no more work.
    #[error("the write-ahead log is shut down")]
    Closed,
    /// Stored bytes do not have the expected layout.
    #[error("corrupt log data: {0}")]
    Corrupt(String),
    /// An earlier write or flush failed; durability of later writes cannot be promised,
    /// so the log refuses work until the node restarts and recovers.
    #[error("the write-ahead log failed earlier and refuses work until restart: {0}")]
    Failed(String),
    /// An entity key longer than the key layout can carry.
    #[error("entity key is {len} bytes, at most {max} are allowed")]
    EntityTooLong { len: usize, max: usize },
    /// A configuration value out of range, or an unknown durability name.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    /// [`Wal::open`] was called outside a tokio runtime.
    #[error("Wal::open must be called inside a tokio runtime")]
    NoRuntime,
    /// The writer thread could not be started.
    #[error("starting the log writer: {0}")]
    Io(#[from] std::io::Error),
    /// A replicated record was not committed by its replica group: this node does not
    /// lead the group, or the group lost its leader or its quorum.
    #[error("replication: {0}")]
    Replication(String),
    /// Loading an entity raced checkpoints of that entity too many times in a row.
    #[error("loading the entity raced {attempts} checkpoints in a row")]
    Contended { attempts: u32 },
}

/// Result of the persistence layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
