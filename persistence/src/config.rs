//! How the log is opened: location, durability mode, cache and batching limits.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::Error;

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// An ack resolves only after a flush (`fsync`) covering its record. No acknowledged
    /// record is lost by a crash.
    Sync,
    /// An ack resolves once the record is written to the storage engine; a flush runs
    /// every `relaxed_flush_interval` (like Redis `appendfsync everysec`). A crash can
    /// lose the acknowledged records of the last interval.
    Relaxed,
}

impl FromStr for Durability {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sync" => Ok(Durability::Sync),
            "relaxed" => Ok(Durability::Relaxed),
            other => Err(Error::InvalidConfig(format!(
                "durability must be \"sync\" or \"relaxed\", not {other:?}"
            ))),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::Sync => "sync",
            Durability::Relaxed => "relaxed",
        })
    }
}

/// Configuration of [`crate::Wal::open`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of the sled database (created if missing).
    pub path: PathBuf,
    pub durability: Durability,
    /// sled page cache capacity. Never left at sled's 1 GiB default.
    pub cache_bytes: u64,
    /// Most records applied in one group-commit batch.
    pub max_batch: usize,
    /// Flush period in [`Durability::Relaxed`].
    pub relaxed_flush_interval: Duration,
    /// Capacity of the bounded append queue; appenders wait when it is full.
    pub queue_capacity: usize,
    /// A log segment is closed and a new one started once it grows past this.
    pub segment_bytes: u64,
}

impl WalConfig {
    /// The defaults: `sync`, 64 MiB cache, batches of up to 4096 records, 5 ms relaxed
    /// flush period, a queue of 65 536 records.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        WalConfig {
            path: path.into(),
            durability: Durability::Sync,
            cache_bytes: 64 * 1024 * 1024,
            max_batch: 4096,
            relaxed_flush_interval: Duration::from_millis(5),
            queue_capacity: 65_536,
            segment_bytes: 64 * 1024 * 1024,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max_batch == 0 {
            return Err(Error::InvalidConfig("max_batch must be at least 1".into()));
        }
        if self.queue_capacity == 0 {
            return Err(Error::InvalidConfig(
                "queue_capacity must be at least 1".into(),
            ));
        }
        if self.segment_bytes == 0 {
            return Err(Error::InvalidConfig(
                "segment_bytes must be positive".into(),
            ));
        }
        if self.relaxed_flush_interval.is_zero() {
            return Err(Error::InvalidConfig(
                "relaxed_flush_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_round_trips_through_text() {
        for d in [Durability::Sync, Durability::Relaxed] {
            assert_eq!(d.to_string().parse::<Durability>().unwrap(), d);
        }
        assert_eq!(
            "RELAXED".parse::<Durability>().unwrap(),
            Durability::Relaxed
        );
        assert!("fast".parse::<Durability>().is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = WalConfig::new("/tmp/x");
        assert_eq!(cfg.cache_bytes, 64 << 20);
        assert!(cfg.validate().is_ok());
    }
}
