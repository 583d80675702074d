//! The log as the Raft log of replica groups: consensus frames kept across a restart and
//! held against release, committed entries applied like local records, and records of
//! replicated partitions handed to the replication hook.

mod common;

use std::sync::{Arc, Mutex};

use common::{open, record};
use shardmall_persistence::{
    AuxOp, Durability, Lsn, RaftFrame, RaftFrameKind, Record, Replicate, Result,
};
use tokio::sync::oneshot;

fn frame(group: u16, kind: RaftFrameKind, payload: &[u8]) -> RaftFrame {
    RaftFrame {
        group,
        kind,
        payload: payload.to_vec(),
    }
}

async fn append_raft(wal: &shardmall_persistence::Wal, f: RaftFrame) -> Lsn {
    let (tx, rx) = oneshot::channel();
    wal.append_raft(f, 1, move |outcome| {
        let _ = tx.send(outcome);
    })
    .await
    .unwrap();
    rx.await.unwrap().unwrap()
}

#[tokio::test]
async fn consensus_frames_come_back_in_order_after_a_restart_and_stay_out_of_the_tails() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let a = append_raft(&wal, frame(3, RaftFrameKind::Entries, b"e1")).await;
    wal.append(record(1, b"sku", b"x"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    let b = append_raft(&wal, frame(7, RaftFrameKind::Truncate, b"t")).await;
    assert!(a < b);
    // A frame is no entity's record.
    assert_eq!(wal.partitions_with_log().unwrap(), vec![1]);
    assert!(wal.take_raft_frames().is_empty(), "nothing was recovered");
    wal.shutdown().await.unwrap();
    drop(wal);

    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(
        wal.take_raft_frames(),
        vec![
            (a, frame(3, RaftFrameKind::Entries, b"e1")),
            (b, frame(7, RaftFrameKind::Truncate, b"t")),
        ]
    );
    assert!(wal.take_raft_frames().is_empty(), "taken once");
    assert_eq!(wal.partitions_with_log().unwrap(), vec![1]);
    wal.shutdown().await.unwrap();
}

/// Enough local records to roll many 4 KiB segments, all folded, then a release.
async fn fill_fold_and_release(wal: &shardmall_persistence::Wal) {
    for i in 0..200u32 {
        wal.append(record(2, b"e", &i.to_be_bytes()))
            .await
            .unwrap()
            .durable()
            .await
            .unwrap();
    }
    wal.checkpoint_partition(2, &mut |_, _, tail| {
        Ok(Some(tail.last().unwrap().1.clone()))
    })
    .unwrap();
    wal.release_log().unwrap();
}

#[tokio::test]
async fn a_held_frame_keeps_its_segment_through_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let held = append_raft(&wal, frame(0, RaftFrameKind::Entries, &[7; 64])).await;
    wal.hold_log_from(0, Some(held));
    fill_fold_and_release(&wal).await;
    assert!(
        wal.folded_below() > held,
        "the data is folded past the frame"
    );
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    let frames = wal.take_raft_frames();
    assert_eq!(frames.len(), 1, "the held frame survived release");
    assert_eq!(frames[0].0, held);

    // Released once no group holds it.
    wal.hold_log_from(0, None);
    fill_fold_and_release(&wal).await;
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    assert!(wal.take_raft_frames().is_empty());
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_applied_entry_loads_and_indexes_like_a_local_record() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let lsn = append_raft(&wal, frame(1, RaftFrameKind::Entries, b"batch")).await;
    let mut rec = record(5, b"order-1", b"placed");
    rec.aux = vec![AuxOp::Put(b"idx/1".to_vec(), b"v".to_vec())];
    rec.also = vec![shardmall_persistence::Part {
        partition: 5,
        entity: b"sku-1".to_vec(),
        payload: b"sold".to_vec(),
    }];
    wal.apply_replicated(lsn, vec![rec]).unwrap();
    assert_eq!(
        wal.load_entity(5, b"order-1").unwrap().tail,
        vec![(lsn, b"placed".to_vec())]
    );
    assert_eq!(
        wal.load_entity(5, b"sku-1").unwrap().tail,
        vec![(lsn, b"sold".to_vec())]
    );
    assert_eq!(wal.aux_get(b"idx/1").unwrap(), Some(b"v".to_vec()));
    // Folded by a checkpoint like any record: the snapshot covers the frame's lsn.
    wal.checkpoint_partition(5, &mut |_, _, tail| {
        Ok(Some(tail.last().unwrap().1.clone()))
    })
    .unwrap();
    wal.release_log().unwrap();
    assert!(wal.folded_below() > lsn);
    let log = wal.load_entity(5, b"order-1").unwrap();
    assert_eq!(log.snapshot, Some(b"placed".to_vec()));
    assert!(log.tail.is_empty());
    // Applied again after a restart (the group replays what it had not folded): the
    // snapshot's lsn keeps it from counting twice.
    wal.apply_replicated(lsn, vec![record(5, b"order-1", b"placed")])
        .unwrap();
    assert!(wal.load_entity(5, b"order-1").unwrap().tail.is_empty());
    wal.shutdown().await.unwrap();
}

/// Takes every record of odd partitions.
#[derive(Default)]
struct OddPartitions {
    taken: Mutex<Vec<Record>>,
}

impl Replicate for OddPartitions {
    fn replicated(&self, partition: u16) -> bool {
        partition % 2 == 1
    }

    fn submit(&self, rec: Record, done: Box<dyn FnOnce(Result<Lsn>) + Send>) {
        self.taken.lock().unwrap().push(rec);
        done(Ok(42));
    }
}

#[tokio::test]
async fn records_of_replicated_partitions_go_to_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let hook = Arc::new(OddPartitions::default());
    let dyn_hook: Arc<dyn Replicate> = hook.clone();
    wal.set_replicate(&dyn_hook);
    let replicated = wal
        .append(record(1, b"a", b"1"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert_eq!(replicated, 42);
    let (tx, rx) = oneshot::channel();
    let queued = wal
        .try_append_then(record(3, b"b", b"2"), move |o| {
            let _ = tx.send(o);
        })
        .unwrap();
    assert!(queued.is_none());
    assert_eq!(rx.await.unwrap().unwrap(), 42);
    let local = wal
        .append(record(2, b"c", b"3"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert_ne!(local, 42);
    let taken = hook.taken.lock().unwrap().clone();
    assert_eq!(
        taken.iter().map(|r| r.partition).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert!(
        wal.load_entity(1, b"a").unwrap().tail.is_empty(),
        "not written here"
    );
    assert_eq!(wal.partitions_with_log().unwrap(), vec![2]);
    wal.shutdown().await.unwrap();
}

/// A record its group commits must apply on every replica: one the log would refuse is
/// refused before it is proposed, whichever of its entities does not fit.
#[tokio::test]
async fn a_record_the_log_would_refuse_never_reaches_the_hook() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let hook = Arc::new(OddPartitions::default());
    let dyn_hook: Arc<dyn Replicate> = hook.clone();
    wal.set_replicate(&dyn_hook);
    let too_long = vec![b'k'; usize::from(u16::MAX) + 1];
    let refused = wal.append(record(1, &too_long, b"1")).await;
    assert!(
        matches!(
            refused,
            Err(shardmall_persistence::Error::EntityTooLong { .. })
        ),
        "{:?}",
        refused.map(drop)
    );
    let mut with_part = record(3, b"ok", b"2");
    with_part.also.push(shardmall_persistence::Part {
        partition: 3,
        entity: too_long,
        payload: b"x".to_vec(),
    });
    let (tx, rx) = oneshot::channel();
    let refused = wal.try_append_then(with_part, move |o| {
        let _ = tx.send(o);
    });
    assert!(matches!(
        refused,
        Err(shardmall_persistence::Error::EntityTooLong { .. })
    ));
    assert!(rx.await.unwrap().is_err(), "the callback hears of it too");
    assert!(hook.taken.lock().unwrap().is_empty(), "nothing proposed");
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_frame_reserves_one_lsn_per_record_and_a_checkpoint_between_them_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let (tx, rx) = oneshot::channel();
    wal.append_raft(frame(0, RaftFrameKind::Entries, b"two"), 3, move |o| {
        let _ = tx.send(o);
    })
    .await
    .unwrap();
    let at = rx.await.unwrap().unwrap();
    let next = wal
        .append(record(9, b"x", b"y"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert_eq!(next, at + 1, "the frame took the lsns before it");
    let first = at - 2;
    // Two entries of the frame, one record each on the same entity, committed apart
    // with a checkpoint in between.
    let fold = |_: &[u8], s: Option<&[u8]>, tail: &[(Lsn, Vec<u8>)]| {
        let mut v = s.map(<[u8]>::to_vec).unwrap_or_default();
        for (_, r) in tail {
            v.extend_from_slice(r);
        }
        Ok(Some(v))
    };
    wal.apply_replicated(first, vec![record(4, b"sku", b"a")])
        .unwrap();
    wal.checkpoint_partition(4, &mut { fold }).unwrap();
    wal.apply_replicated(
        first + 1,
        vec![record(4, b"sku", b"b"), record(4, b"sku", b"c")],
    )
    .unwrap();
    let log = wal.load_entity(4, b"sku").unwrap();
    assert_eq!(log.snapshot, Some(b"a".to_vec()));
    assert_eq!(
        log.tail,
        vec![(first + 1, b"b".to_vec()), (first + 2, b"c".to_vec())]
    );
    wal.shutdown().await.unwrap();
}
