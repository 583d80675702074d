//! Many appenders at once, and checkpoints racing appends and loads.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{fold_list, load_list, open, record};
use shardmall_persistence::Durability;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_get_unique_lsns_in_caller_order() {
    const TASKS: usize = 64;
    const PER_TASK: u32 = 100;
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let wal = wal.clone();
        handles.push(tokio::spawn(async move {
            let entity = format!("t{t}").into_bytes();
            // Queue every append first, then wait: one caller's records MUST get
            // increasing lsns in append order even when many are in flight.
            let mut acks = Vec::new();
            for seq in 0..PER_TASK {
                acks.push(
                    wal.append(record((t % 7) as u16, &entity, &seq.to_be_bytes()))
                        .await
                        .unwrap(),
                );
            }
            let mut lsns = Vec::new();
            for ack in acks {
                lsns.push(ack.durable().await.unwrap());
            }
            lsns
        }));
    }
    let mut all = HashSet::new();
    for (t, h) in handles.into_iter().enumerate() {
        let lsns = h.await.unwrap();
        assert!(
            lsns.windows(2).all(|w| w[0] < w[1]),
            "task {t}: lsns not increasing"
        );
        for l in &lsns {
            assert!(all.insert(*l), "lsn {l} given twice");
        }
        let log = wal
            .load_entity((t % 7) as u16, format!("t{t}").as_bytes())
            .unwrap();
        assert_eq!(log.snapshot, None);
        let expected: Vec<_> = lsns
            .iter()
            .zip(0..PER_TASK)
            .map(|(l, s)| (*l, s.to_be_bytes().to_vec()))
            .collect();
        assert_eq!(log.tail, expected, "task {t}");
    }
    assert_eq!(all.len(), TASKS * PER_TASK as usize);
    let m = wal.metrics();
    assert_eq!(m.appended, (TASKS * PER_TASK as usize) as u64);
    assert!(m.batches < m.appended, "no batching happened: {m:?}");
    assert!(m.durable_lsn >= *all.iter().max().unwrap());
    wal.shutdown().await.unwrap();
}

async fn checkpoints_race(durability: Durability) {
    const ENTITIES: usize = 16;
    const PER_ENTITY: u32 = 300;
    const PARTITIONS: u16 = 4;
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), durability);
    let acked: Arc<Vec<AtomicUsize>> =
        Arc::new((0..ENTITIES).map(|_| AtomicUsize::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let entity = |i: usize| (i as u16 % PARTITIONS, format!("e{i}").into_bytes());

    let mut appenders = Vec::new();
    for i in 0..ENTITIES {
        let (wal, acked) = (wal.clone(), acked.clone());
        let (p, e) = entity(i);
        appenders.push(tokio::spawn(async move {
            for seq in 0..PER_ENTITY {
                wal.append(record(p, &e, &seq.to_be_bytes()))
                    .await
                    .unwrap()
                    .durable()
                    .await
                    .unwrap();
                acked[i].store(seq as usize + 1, Ordering::Release);
            }
        }));
    }
    let checkpointer = {
        let (wal, done) = (wal.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let (mut rounds, mut folded) = (0, 0);
            while !done.load(Ordering::Acquire) {
                for p in 0..PARTITIONS {
                    folded += wal
                        .checkpoint_partition(p, &mut |_, old, tail| Ok(fold_list(old, tail)))
                        .unwrap()
                        .records;
                }
                rounds += 1;
            }
            (rounds, folded)
        })
    };
    let mut loaders = Vec::new();
    for l in 0..2 {
        let (wal, done, acked) = (wal.clone(), done.clone(), acked.clone());
        loaders.push(tokio::task::spawn_blocking(move || {
            let mut loads = 0;
            let mut i = l;
            while !done.load(Ordering::Acquire) {
                let (p, e) = entity(i % ENTITIES);
                let at_least = acked[i % ENTITIES].load(Ordering::Acquire);
                let items = load_list(&wal, p, &e);
                let seqs: Vec<u32> = items
                    .iter()
                    .map(|b| u32::from_be_bytes(b[..].try_into().unwrap()))
                    .collect();
                assert_eq!(
                    seqs,
                    (0..seqs.len() as u32).collect::<Vec<_>>(),
                    "entity {i}: lost or duplicated record"
                );
                assert!(
                    seqs.len() >= at_least,
                    "entity {i}: acknowledged record missing"
                );
                loads += 1;
                i += 1;
            }
            loads
        }));
    }
    for a in appenders {
        a.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let (rounds, folded) = checkpointer.await.unwrap();
    for l in loaders {
        assert!(l.await.unwrap() > 0);
    }
    assert!(
        rounds > 1 && folded > 0,
        "checkpoints did not race: {rounds} rounds, {folded} records"
    );
    for p in 0..PARTITIONS {
        wal.checkpoint_partition(p, &mut |_, old, tail| Ok(fold_list(old, tail)))
            .unwrap();
    }
    assert!(wal.partitions_with_log().unwrap().is_empty());
    for i in 0..ENTITIES {
        let (p, e) = entity(i);
        let expected: Vec<Vec<u8>> = (0..PER_ENTITY).map(|s| s.to_be_bytes().to_vec()).collect();
        assert_eq!(load_list(&wal, p, &e), expected, "entity {i}");
    }
    wal.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_racing_appends_and_loads_lose_nothing_sync() {
    checkpoints_race(Durability::Sync).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_racing_appends_and_loads_lose_nothing_relaxed() {
    checkpoints_race(Durability::Relaxed).await;
}
