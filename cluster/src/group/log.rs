//! A group's Raft log as a view on the node's write-ahead log (openraft storage v2).
//!
//! `append` encodes the entries as one consensus frame, queues it on the shared log and
//! returns; openraft's `LogFlushed` callback runs from the log's flusher after the
//! `fdatasync` that covered it, together with every other group's appends. The entries
//! stay in memory (readable at once, as openraft requires) until purged, each with the
//! lsn of the frame that carried it here, which is where the state machine applies it.
//! A truncation is a frame too, so a replay meets entries and cuts in their order. The
//! vote and the purge point are small, rare writes kept in the store's meta tree.

// The error types are openraft's, fixed by the traits implemented here.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote,
};
use shardmall_persistence::{Lsn, RaftFrame, RaftFrameKind, Wal};
use tokio::sync::{oneshot, Notify};

use super::GroupConfig;

pub(crate) type StorageResult<T> = Result<T, StorageError<u64>>;

pub(crate) fn read_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::read(AnyError::error(e.to_string())).into()
}

pub(crate) fn write_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::write(AnyError::error(e.to_string())).into()
}

/// An entry and, once its frame is written, where.
struct Stored {
    entry: Entry<GroupConfig>,
    at: Option<At>,
}

/// Where an entry was written: its frame's lsn, and the lsn of the first of its records
/// (each record has its own, reserved by the frame: see `Wal::append_raft`).
#[derive(Debug, Clone, Copy)]
struct At {
    frame: Lsn,
    first: Lsn,
}

/// The lsns a frame of `entries` takes, and the offset of each entry's first record.
fn layout(entries: &[Entry<GroupConfig>]) -> (u64, Vec<u64>) {
    let mut offsets = Vec::with_capacity(entries.len());
    let mut n = 0u64;
    for e in entries {
        offsets.push(n);
        if let openraft::EntryPayload::Normal(batch) = &e.payload {
            n += batch.0.len() as u64;
        }
    }
    (n.max(1), offsets)
}

/// Where each entry of a frame written at `frame` is.
fn places(frame: Lsn, span: u64, offsets: &[u64]) -> impl Iterator<Item = At> + '_ {
    let base = (frame + 1).saturating_sub(span);
    offsets.iter().map(move |o| At {
        frame,
        first: base + o,
    })
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, Stored>,
    vote: Option<Vote<u64>>,
    purged: Option<LogId<u64>>,
    /// Why a frame could not be written: entries waiting for their lsn never get one.
    failed: Option<String>,
}

/// The log of one group replica; clones share it.
#[derive(Clone)]
pub(crate) struct GroupLog {
    group: u16,
    wal: Wal,
    state: Arc<Mutex<State>>,
    /// Woken whenever an entry learns its lsn.
    written: Arc<Notify>,
}

fn meta_key(group: u16, what: &str) -> String {
    format!("group/{group}/{what}")
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).map_err(|e| e.to_string())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<{ 1 << 31 }>();
    match bincode::serde::decode_from_slice(bytes, config) {
        Ok((v, used)) if used == bytes.len() => Ok(v),
        Ok(_) => Err("bytes left over after a consensus value".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub(crate) fn meta_get<T: serde::de::DeserializeOwned>(
    wal: &Wal,
    group: u16,
    what: &str,
) -> Result<Option<T>, String> {
    match wal
        .meta_get(&meta_key(group, what))
        .map_err(|e| e.to_string())?
    {
        Some(bytes) => decode(&bytes).map(Some),
        None => Ok(None),
    }
}

/// Stores a small value durably (the store is flushed), off the async workers.
pub(crate) async fn meta_put<T: serde::Serialize>(
    wal: &Wal,
    group: u16,
    what: &str,
    value: &T,
) -> StorageResult<()> {
    let bytes = encode(value).map_err(write_err)?;
    let wal = wal.clone();
    let key = meta_key(group, what);
    tokio::task::spawn_blocking(move || wal.meta_put(&key, &bytes))
        .await
        .map_err(write_err)?
        .map_err(write_err)
}

/// Removes small values of `group` durably, off the async workers.
pub(crate) async fn meta_remove(wal: &Wal, group: u16, what: &[&str]) -> Result<(), String> {
    let wal = wal.clone();
    let keys: Vec<String> = what.iter().map(|w| meta_key(group, w)).collect();
    tokio::task::spawn_blocking(move || {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        wal.meta_remove(&keys)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Writes a cut of `group`'s log at `since` (every entry from that index on is gone),
/// durably: a replay meets it after the entries it removes.
pub(crate) async fn write_cut(wal: &Wal, group: u16, since: u64) -> StorageResult<()> {
    let frame = RaftFrame {
        group,
        kind: RaftFrameKind::Truncate,
        payload: encode(&since).map_err(write_err)?,
    };
    let (tx, rx) = oneshot::channel();
    wal.append_raft(frame, 1, move |outcome| {
        let _ = tx.send(outcome);
    })
    .await
    .map_err(write_err)?;
    rx.await
        .map_err(|_| write_err("the log stopped"))?
        .map_err(write_err)?;
    Ok(())
}

impl GroupLog {
    /// The group's log as the frames recovered at open (in lsn order) and the stored
    /// vote and purge point describe it.
    pub(crate) fn open(
        group: u16,
        wal: Wal,
        frames: Vec<(Lsn, RaftFrame)>,
    ) -> Result<GroupLog, String> {
        let mut state = State {
            vote: meta_get(&wal, group, "vote")?,
            purged: meta_get(&wal, group, "purged")?,
            ..Default::default()
        };
        for (lsn, frame) in frames {
            match frame.kind {
                RaftFrameKind::Entries => {
                    let entries: Vec<Entry<GroupConfig>> = decode(&frame.payload)
                        .map_err(|e| format!("group {group}: a log frame at lsn {lsn}: {e}"))?;
                    let (span, offsets) = layout(&entries);
                    let at: Vec<At> = places(lsn, span, &offsets).collect();
                    for (entry, at) in entries.into_iter().zip(at) {
                        state.entries.insert(
                            entry.log_id.index,
                            Stored {
                                entry,
                                at: Some(at),
                            },
                        );
                    }
                }
                RaftFrameKind::Truncate => {
                    let since: u64 = decode(&frame.payload)
                        .map_err(|e| format!("group {group}: a cut at lsn {lsn}: {e}"))?;
                    state.entries.split_off(&since);
                }
            }
        }
        if let Some(purged) = state.purged {
            state.entries = state.entries.split_off(&(purged.index + 1));
        }
        let log = GroupLog {
            group,
            wal,
            state: Arc::new(Mutex::new(state)),
            written: Arc::new(Notify::new()),
        };
        log.update_hold();
        Ok(log)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update under this lock leaves the state whole: poisoning is harmless.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the segments from the first frame the group still needs.
    fn update_hold(&self) {
        let from = self
            .state()
            .entries
            .values()
            .filter_map(|s| s.at.map(|a| a.frame))
            .min();
        if from.is_some() {
            self.wal.hold_log_from(self.group, from);
        } else if self.state().entries.is_empty() {
            self.wal.hold_log_from(self.group, None);
        }
    }

    /// The lsn of the first record of entry `log_id` here, once its frame is durable.
    pub(crate) async fn first_lsn_of(&self, log_id: &LogId<u64>) -> StorageResult<Lsn> {
        loop {
            // Registered before the check: a wake-up between the check and the wait is
            // not lost.
            let notified = self.written.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state();
                if let Some(why) = &state.failed {
                    return Err(write_err(format!(
                        "group {}: writing entry {log_id} failed: {why}",
                        self.group
                    )));
                }
                match state.entries.get(&log_id.index) {
                    Some(s) if s.entry.log_id == *log_id => {
                        if let Some(at) = s.at {
                            return Ok(at.first);
                        }
                    }
                    _ => {
                        return Err(read_err(format!(
                            "group {}: entry {log_id} is not in the log",
                            self.group
                        )))
                    }
                }
            }
            notified.await;
        }
    }

    /// The frame lsn of the last entry at or below `index` whose frame is written.
    pub(crate) fn written_lsn_at(&self, index: u64) -> Option<Lsn> {
        self.state()
            .entries
            .range(..=index)
            .next_back()
            .and_then(|(_, s)| s.at.map(|a| a.frame))
    }
}

impl GroupLog {
    /// Writes the entries after `index` again, in a new frame: a snapshot installed here
    /// took an lsn above their old frames, and an entry must be applied above the
    /// snapshot it follows (or its records would count as already in it).
    pub(crate) async fn rewrite_after(&self, index: u64) -> StorageResult<()> {
        let entries: Vec<Entry<GroupConfig>> = self
            .state()
            .entries
            .range(index + 1..)
            .map(|(_, s)| s.entry.clone())
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let frame = RaftFrame {
            group: self.group,
            kind: RaftFrameKind::Entries,
            payload: encode(&entries).map_err(write_err)?,
        };
        let (span, offsets) = layout(&entries);
        let (tx, rx) = oneshot::channel();
        self.wal
            .append_raft(frame, span, move |outcome| {
                let _ = tx.send(outcome);
            })
            .await
            .map_err(write_err)?;
        let lsn = rx
            .await
            .map_err(|_| write_err("the log stopped"))?
            .map_err(write_err)?;
        {
            let mut state = self.state();
            for (e, at) in entries.iter().zip(places(lsn, span, &offsets)) {
                if let Some(s) = state.entries.get_mut(&e.log_id.index) {
                    if s.entry.log_id == e.log_id {
                        s.at = Some(at);
                    }
                }
            }
        }
        self.update_hold();
        Ok(())
    }
}

impl RaftLogReader<GroupConfig> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<GroupConfig>>> {
        Ok(self
            .state()
            .entries
            .range(range)
            .map(|(_, s)| s.entry.clone())
            .collect())
    }
}

impl RaftLogStorage<GroupConfig> for GroupLog {
    type LogReader = GroupLog;

    async fn get_log_state(&mut self) -> StorageResult<LogState<GroupConfig>> {
        let state = self.state();
        let last = state.entries.values().next_back().map(|s| s.entry.log_id);
        Ok(LogState {
            last_purged_log_id: state.purged,
            last_log_id: last.or(state.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        meta_put(&self.wal, self.group, "vote", vote).await?;
        self.state().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(self.state().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<GroupConfig>,
    ) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<GroupConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry<GroupConfig>> = entries.into_iter().collect();
        let payload = encode(&entries).map_err(write_err)?;
        let (span, offsets) = layout(&entries);
        let ids: Vec<LogId<u64>> = entries.iter().map(|e| e.log_id).collect();
        {
            let mut state = self.state();
            if state.entries.is_empty() {
                // Until its lsn is known, a frame queued now lands above what is applied.
                self.wal
                    .hold_log_from(self.group, Some(self.wal.applied_lsn() + 1));
            }
            for entry in entries {
                state
                    .entries
                    .insert(entry.log_id.index, Stored { entry, at: None });
            }
        }
        let frame = RaftFrame {
            group: self.group,
            kind: RaftFrameKind::Entries,
            payload,
        };
        let state = self.state.clone();
        let written = self.written.clone();
        self.wal
            .append_raft(frame, span, move |outcome| match outcome {
                Ok(lsn) => {
                    {
                        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                        for (id, at) in ids.iter().zip(places(lsn, span, &offsets)) {
                            // Not an entry that replaced it since (cut and written again).
                            match state.entries.get_mut(&id.index) {
                                Some(s) if s.entry.log_id == *id && s.at.is_none() => {
                                    s.at = Some(at);
                                }
                                _ => {}
                            }
                        }
                    }
                    written.notify_waiters();
                    callback.log_io_completed(Ok(()));
                }
                Err(e) => {
                    // Whoever waits for these entries' lsn learns they have none.
                    state.lock().unwrap_or_else(|p| p.into_inner()).failed = Some(e.to_string());
                    written.notify_waiters();
                    callback.log_io_completed(Err(std::io::Error::other(e)));
                }
            })
            .await
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        self.state().entries.split_off(&log_id.index);
        write_cut(&self.wal, self.group, log_id.index).await?;
        self.update_hold();
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        meta_put(&self.wal, self.group, "purged", &log_id).await?;
        {
            let mut state = self.state();
            state.purged = Some(log_id);
            state.entries = state.entries.split_off(&(log_id.index + 1));
        }
        self.update_hold();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::group::{Batch, WireAux, WirePart, WireRecord};

    /// The bytes of a log frame's entries are on disk: a change of their layout (ours or
    /// openraft's serde form) must be deliberate.
    #[test]
    fn an_entries_frame_encodes_as_pinned() {
        let entry: Entry<GroupConfig> = Entry {
            log_id: LogId::new(CommittedLeaderId::new(3, 2), 17),
            payload: EntryPayload::Normal(Batch(vec![WireRecord {
                partition: 5,
                entity: b"sku".to_vec(),
                payload: vec![1, 2],
                aux: vec![
                    WireAux::Put(b"k".to_vec(), b"v".to_vec()),
                    WireAux::Delete(b"d".to_vec()),
                ],
                also: vec![WirePart {
                    partition: 5,
                    entity: b"o".to_vec(),
                    payload: vec![9],
                }],
            }])),
        };
        let bytes = encode(&vec![entry.clone()]).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "0103021101010503736b750201020200016b01760101640105016f0109"
        );
        let back: Vec<Entry<GroupConfig>> = decode(&bytes).unwrap();
        assert_eq!(back[0].log_id, entry.log_id);
        match &back[0].payload {
            EntryPayload::Normal(b) => assert_eq!(
                b,
                &Batch(vec![match &entry.payload {
                    EntryPayload::Normal(b) => b.0[0].clone(),
                    _ => unreachable!(),
                }])
            ),
            other => panic!("{other:?}"),
        }
    }
}
