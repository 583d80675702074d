//! Auxiliary key changes held in memory between checkpoints.
//!
//! The flusher used to apply every record's auxiliary changes (secondary indexes,
//! deadlines) to sled before resolving its acks: three or four sled inserts per order,
//! on the one thread every acknowledgement waits for, and sled copies a leaf on each
//! (measured: 14% of the node's CPU under a flash sale, docs/benchmarks.md). Now the
//! flusher puts them in this ordered map, and [`crate::Wal::release_log`] writes the map
//! to sled in one batch before it records the new stable position. Readers see the map
//! over the store.
//!
//! Crash safety is unchanged: every change is in its log frame, and recovery re-applies
//! the frames above the stable position, which only moves once the batch holding their
//! changes is flushed.
//!
//! A `std::sync::Mutex` guards the map: the flusher holds it for one batch's inserts,
//! readers for copying at most one page of entries, the checkpointer for a swap. None of
//! them awaits or does I/O under it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::IVec;

use crate::Result;

/// A change of one key: `None` deletes it.
type Change = Option<IVec>;

#[derive(Default)]
struct Maps {
    /// Changes not yet handed to the store.
    live: BTreeMap<IVec, Change>,
    /// Changes being written to the store by a checkpoint: still read from here until
    /// the store has them. Older than `live`.
    writing: Option<Arc<BTreeMap<IVec, Change>>>,
}

#[derive(Default)]
pub(crate) struct Overlay {
    maps: Mutex<Maps>,
}

impl Overlay {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        // Every update under the lock is a plain map operation: poisoning is harmless.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records changes in order (a later change of the same key wins).
    pub(crate) fn apply(&self, changes: impl IntoIterator<Item = (IVec, Change)>) {
        let mut maps = self.maps();
        for (k, v) in changes {
            maps.live.insert(k, v);
        }
    }

    /// True when no change waits for the store.
    pub(crate) fn is_empty(&self) -> bool {
        let maps = self.maps();
        maps.live.is_empty() && maps.writing.is_none()
    }

    /// The current value of `key`: `Some(change)` if the overlay knows it, `None` if the
    /// store decides.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Change> {
        let maps = self.maps();
        if let Some(c) = maps.live.get(key) {
            return Some(c.clone());
        }
        maps.writing.as_ref().and_then(|w| w.get(key).cloned())
    }

    /// Writes every change recorded so far to `tree` in one batch, then forgets them.
    /// Changes recorded meanwhile stay for the next call. A failed write leaves the
    /// changes readable here, and the next call writes them again.
    pub(crate) fn write_to(&self, tree: &sled::Tree) -> Result<()> {
        let writing = {
            let mut maps = self.maps();
            let live = std::mem::take(&mut maps.live);
            let merged = match maps.writing.take() {
                // An earlier write failed: its changes go again, under the newer ones.
                Some(old) => {
                    let mut all = (*old).clone();
                    all.extend(live);
                    all
                }
                None => live,
            };
            let writing = Arc::new(merged);
            maps.writing = Some(writing.clone());
            writing
        };
        if writing.is_empty() {
            self.maps().writing = None;
            return Ok(());
        }
        // In small batches: sled runs a batch under an exclusive lock that stops every
        // other reader and writer of the store (activations, checkpoints) while it lasts.
        // The batches need not be atomic together: until they are all in, the stable
        // position does not move and recovery re-applies them from the log.
        const CHUNK: usize = 256;
        let mut batch = sled::Batch::default();
        for (i, (k, v)) in writing.iter().enumerate() {
            match v {
                Some(v) => batch.insert(k.clone(), v.clone()),
                None => batch.remove(k.clone()),
            }
            if (i + 1) % CHUNK == 0 {
                tree.apply_batch(std::mem::take(&mut batch))?;
            }
        }
        tree.apply_batch(batch)?;
        self.maps().writing = None;
        Ok(())
    }

    /// At most `limit` changes with keys in `(lo, hi)`, in key order (descending when
    /// `reverse`), deletions included.
    pub(crate) fn page(
        &self,
        lo: &Bound<Vec<u8>>,
        hi: &Bound<Vec<u8>>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Change)> {
        let maps = self.maps();
        let range = |m: &BTreeMap<IVec, Change>| -> Vec<(Vec<u8>, Change)> {
            let bounds = (as_ivec(lo), as_ivec(hi));
            let it = m.range::<IVec, _>(bounds);
            let take = |(k, v): (&IVec, &Change)| (k.to_vec(), v.clone());
            if reverse {
                it.rev().take(limit).map(take).collect()
            } else {
                it.take(limit).map(take).collect()
            }
        };
        let live = range(&maps.live);
        let Some(writing) = maps.writing.as_ref() else {
            return live;
        };
        // Merge: the newer map wins on equal keys.
        let mut merged: BTreeMap<Vec<u8>, Change> = range(writing).into_iter().collect();
        merged.extend(live);
        let all: Vec<_> = if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        };
        all
    }
}

fn as_ivec(b: &Bound<Vec<u8>>) -> Bound<IVec> {
    match b {
        Bound::Included(v) => Bound::Included(IVec::from(v.as_slice())),
        Bound::Excluded(v) => Bound::Excluded(IVec::from(v.as_slice())),
        Bound::Unbounded => Bound::Unbounded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(s: &str) -> IVec {
        IVec::from(s.as_bytes())
    }

    #[test]
    fn newer_changes_win_and_pages_merge_both_maps() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let o = Overlay::default();
        o.apply([(iv("a"), Some(iv("1"))), (iv("b"), Some(iv("2")))]);
        // Simulate a write in progress: move live to writing by hand.
        {
            let mut m = o.maps();
            let live = std::mem::take(&mut m.live);
            m.writing = Some(Arc::new(live));
        }
        o.apply([(iv("b"), None), (iv("c"), Some(iv("3")))]);
        assert_eq!(o.get(b"a"), Some(Some(iv("1"))));
        assert_eq!(o.get(b"b"), Some(None));
        assert_eq!(o.get(b"z"), None);
        let page = o.page(&Bound::Unbounded, &Bound::Unbounded, false, 10);
        let keys: Vec<_> = page.iter().map(|(k, v)| (k.clone(), v.is_some())).collect();
        assert_eq!(
            keys,
            vec![
                (b"a".to_vec(), true),
                (b"b".to_vec(), false),
                (b"c".to_vec(), true)
            ]
        );
        let rev = o.page(&Bound::Unbounded, &Bound::Unbounded, true, 2);
        assert_eq!(rev[0].0, b"c".to_vec());
        assert_eq!(rev.len(), 2);
        // The interrupted write is redone with the newer changes on top.
        o.write_to(&tree).unwrap();
        assert!(o.is_empty());
        assert_eq!(tree.get("a").unwrap(), Some(iv("1")));
        assert_eq!(tree.get("b").unwrap(), None);
        assert_eq!(tree.get("c").unwrap(), Some(iv("3")));
    }
}
