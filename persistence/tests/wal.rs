//! Behaviour of the public API on a real database.

mod common;

use common::{load_list, open, record};
use shardmall_persistence::{AuxOp, Durability, Error, Part, Record};

#[tokio::test]
async fn appended_records_load_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let mut lsns = Vec::new();
    for i in 0..5u8 {
        let ack = wal.append(record(3, b"sku-1", &[i])).await.unwrap();
        lsns.push(ack.durable().await.unwrap());
    }
    wal.append(record(3, b"sku-10", b"other"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]));
    let log = wal.load_entity(3, b"sku-1").unwrap();
    assert_eq!(log.snapshot, None);
    assert_eq!(
        log.tail,
        lsns.iter()
            .zip(0u8..)
            .map(|(l, i)| (*l, vec![i]))
            .collect::<Vec<_>>()
    );
    assert!(wal.metrics().durable_lsn >= lsns[4]);
    assert_eq!(wal.partitions_with_log().unwrap(), vec![3]);
    assert!(wal.load_entity(3, b"sku").unwrap().tail.is_empty());
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn lsns_and_data_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let first = wal
        .append(record(1, b"e", b"a"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    wal.meta_put("partitions", &256u16.to_be_bytes()).unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);

    let wal = open(dir.path(), Durability::Relaxed);
    assert_eq!(
        wal.meta_get("partitions").unwrap(),
        Some(256u16.to_be_bytes().to_vec())
    );
    assert_eq!(wal.meta_get("absent").unwrap(), None);
    let second = wal
        .append(record(1, b"e", b"b"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert!(
        second > first,
        "lsn {second} reused after restart (first was {first})"
    );
    assert_eq!(load_list(&wal, 1, b"e"), vec![b"a".to_vec(), b"b".to_vec()]);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_is_idempotent_and_refuses_appends() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Relaxed);
    let ack = wal.append(record(0, b"e", b"x")).await.unwrap();
    let other = wal.clone();
    let (a, b) = tokio::join!(wal.shutdown(), other.shutdown());
    a.unwrap();
    b.unwrap();
    wal.shutdown().await.unwrap();
    // Queued before the shutdown: drained and acknowledged.
    ack.durable().await.unwrap();
    assert!(matches!(
        wal.append(record(0, b"e", b"y")).await,
        Err(Error::Closed)
    ));
    wal.flush().await.unwrap();
    assert_eq!(wal.metrics().durable_lsn, wal.applied_lsn());
}

#[tokio::test]
async fn relaxed_flush_makes_everything_durable() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Relaxed);
    assert_eq!(wal.durability(), Durability::Relaxed);
    let mut last = 0;
    for i in 0..100u32 {
        let ack = wal
            .append(record(9, b"cart", &i.to_be_bytes()))
            .await
            .unwrap();
        if i == 99 {
            last = ack.durable().await.unwrap();
        }
    }
    wal.flush().await.unwrap();
    let m = wal.metrics();
    assert!(m.durable_lsn >= last);
    assert_eq!(m.appended, 100);
    assert!(m.flushes >= 1 && m.batches >= 1);
    assert_eq!(m.batch_size_sum, 100);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn aux_ops_apply_with_their_record() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let ops = vec![
        AuxOp::Put(b"I/o/b/2".to_vec(), b"2".to_vec()),
        AuxOp::Put(b"I/o/b/1".to_vec(), b"1".to_vec()),
        AuxOp::Put(b"I/o/b/3".to_vec(), b"3".to_vec()),
        AuxOp::Put(b"I/o/a/9".to_vec(), b"9".to_vec()),
        AuxOp::Put(b"I/o/c".to_vec(), b"c".to_vec()),
        AuxOp::Put(b"tmp".to_vec(), b"t".to_vec()),
        AuxOp::Delete(b"tmp".to_vec()),
    ];
    let rec = Record {
        partition: 0,
        entity: b"o".to_vec(),
        payload: b"p".to_vec(),
        aux: ops,
        also: vec![],
    };
    wal.append(rec).await.unwrap().durable().await.unwrap();
    assert_eq!(wal.aux_get(b"I/o/b/2").unwrap(), Some(b"2".to_vec()));
    assert_eq!(wal.aux_get(b"tmp").unwrap(), None);

    let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| {
        v.into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", None, false, 10).unwrap()),
        ["I/o/b/1", "I/o/b/2", "I/o/b/3"]
    );
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", Some(b"I/o/b/1"), false, 1).unwrap()),
        ["I/o/b/2"]
    );
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", None, true, 2).unwrap()),
        ["I/o/b/3", "I/o/b/2"]
    );
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", Some(b"I/o/b/3"), true, 10).unwrap()),
        ["I/o/b/2", "I/o/b/1"]
    );
    // Cursors outside the prefix.
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", Some(b"I/o/a"), false, 10).unwrap()).len(),
        3
    );
    assert!(wal
        .aux_scan(b"I/o/b/", Some(b"I/o/c"), false, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        keys(wal.aux_scan(b"I/o/b/", Some(b"I/o/c"), true, 10).unwrap()).len(),
        3
    );
    assert!(wal
        .aux_scan(b"I/o/b/", Some(b"I/o/a"), true, 10)
        .unwrap()
        .is_empty());
    assert_eq!(keys(wal.aux_scan(b"", None, false, 100).unwrap()).len(), 5);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn checkpoint_folds_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    for (e, p) in [
        (&b"a"[..], &b"1"[..]),
        (b"a", b"2"),
        (b"b", b"x"),
        (b"b", b""),
        (b"bad", b"!"),
    ] {
        wal.append(record(2, e, p))
            .await
            .unwrap()
            .durable()
            .await
            .unwrap();
    }
    let stats = wal
        .checkpoint_partition(2, &mut |entity, old, tail| {
            if entity == b"bad" {
                return Err("does not fold".into());
            }
            Ok(common::fold_list(old, tail))
        })
        .unwrap();
    assert_eq!((stats.entities, stats.records), (2, 4));
    let a = wal.load_entity(2, b"a").unwrap();
    assert!(a.tail.is_empty());
    assert_eq!(load_list(&wal, 2, b"a"), vec![b"1".to_vec(), b"2".to_vec()]);
    // Cleared: no snapshot and no tail.
    let b = wal.load_entity(2, b"b").unwrap();
    assert_eq!((b.snapshot, b.tail.len()), (None, 0));
    // Skipped entity keeps its log.
    assert_eq!(wal.load_entity(2, b"bad").unwrap().tail.len(), 1);
    assert_eq!(wal.partitions_with_log().unwrap(), vec![2]);

    wal.append(record(2, b"b", b"y"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert_eq!(load_list(&wal, 2, b"b"), vec![b"y".to_vec()]);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_entity_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let big = vec![b'x'; 70_000];
    assert!(matches!(
        wal.append(record(0, &big, b"")).await,
        Err(Error::EntityTooLong { .. })
    ));
    assert!(wal.load_entity(0, &big).is_err());
    wal.shutdown().await.unwrap();
}

#[test]
fn open_outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = shardmall_persistence::WalConfig::new(dir.path());
    assert!(matches!(
        shardmall_persistence::Wal::open(cfg),
        Err(Error::NoRuntime)
    ));
}

#[tokio::test]
async fn a_large_snapshot_waits_for_a_tail_half_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let append = |bytes: Vec<u8>| {
        let wal = wal.clone();
        async move {
            wal.append(record(2, b"hot", &bytes))
                .await
                .unwrap()
                .durable()
                .await
                .unwrap()
        }
    };
    // The fold keeps the concatenation of everything logged.
    let mut fold = |_: &[u8], old: Option<&[u8]>, tail: &[(u64, Vec<u8>)]| {
        let mut s = old.map(<[u8]>::to_vec).unwrap_or_default();
        for (_, r) in tail {
            s.extend_from_slice(r);
        }
        Ok(Some(s))
    };
    append(vec![1; 100 * 1024]).await;
    let stats = wal.checkpoint_partition(2, &mut fold).unwrap();
    assert_eq!((stats.entities, stats.deferred), (1, 0));

    // A short tail on a large snapshot stays in the log, and loads with it.
    append(vec![2; 1024]).await;
    let stats = wal.checkpoint_partition(2, &mut fold).unwrap();
    assert_eq!((stats.entities, stats.deferred), (0, 1));
    let log = wal.load_entity(2, b"hot").unwrap();
    assert_eq!(log.snapshot.as_ref().map(Vec::len), Some(100 * 1024));
    assert_eq!(log.tail.len(), 1);

    // Once the tail reaches half the snapshot, it is folded.
    append(vec![3; 50 * 1024]).await;
    let stats = wal.checkpoint_partition(2, &mut fold).unwrap();
    assert_eq!((stats.entities, stats.deferred, stats.records), (1, 0, 2));
    let log = wal.load_entity(2, b"hot").unwrap();
    assert_eq!(log.snapshot.as_ref().map(Vec::len), Some(151 * 1024));
    assert!(log.tail.is_empty());
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn released_segments_are_gone_and_the_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let mut last = 0;
    for i in 0..200u32 {
        let rec = Record {
            partition: (i % 3) as u16,
            entity: format!("e{}", i % 7).into_bytes(),
            payload: i.to_be_bytes().to_vec(),
            aux: vec![AuxOp::Put(format!("k{i:03}").into_bytes(), vec![1])],
            also: vec![],
        };
        last = wal.append(rec).await.unwrap().durable().await.unwrap();
    }
    let segments = || std::fs::read_dir(dir.path().join("log")).unwrap().count();
    let before = segments();
    assert!(before >= 3, "small segments roll: {before}");
    for p in wal.partitions_with_log().unwrap() {
        wal.checkpoint_partition(p, &mut |_, old, tail| Ok(common::fold_list(old, tail)))
            .unwrap();
    }
    assert!(wal.partitions_with_log().unwrap().is_empty());
    let released = wal.release_log().unwrap();
    assert_eq!(released, before - 1, "all but the current segment");
    assert_eq!(segments(), 1);
    wal.shutdown().await.unwrap();
    drop(wal);

    let wal = open(dir.path(), Durability::Sync);
    for e in 0..7u32 {
        let items = common::load_list(&wal, (e % 3) as u16, format!("e{e}").as_bytes());
        let expected: Vec<Vec<u8>> = (0..200u32)
            .filter(|i| i % 7 == e)
            .map(|i| i.to_be_bytes().to_vec())
            .collect();
        // Entity e lives in partition i % 3 for its own records only: filter by both.
        let expected: Vec<Vec<u8>> = expected
            .into_iter()
            .filter(|b| u32::from_be_bytes(b[..].try_into().unwrap()) % 3 == e % 3)
            .collect();
        assert_eq!(items, expected, "entity e{e}");
    }
    assert_eq!(wal.aux_scan(b"k", None, false, 1000).unwrap().len(), 200);
    let next = wal
        .append(record(0, b"e0", b"new"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    assert!(next > last, "lsns keep growing after segments are released");
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn append_then_calls_back_once_durable_and_once_refused() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let (tx, rx) = tokio::sync::oneshot::channel();
    wal.append_then(record(1, b"e", b"x"), move |outcome| {
        let _ = tx.send(outcome.map_err(|e| e.to_string()));
    })
    .await
    .unwrap();
    let lsn = rx.await.unwrap().unwrap();
    assert!(wal.metrics().durable_lsn >= lsn);
    assert_eq!(
        wal.load_entity(1, b"e").unwrap().tail,
        vec![(lsn, b"x".to_vec())]
    );

    wal.shutdown().await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let queued = wal
        .append_then(record(1, b"e", b"y"), move |outcome| {
            let _ = tx.send(outcome.is_err());
        })
        .await;
    assert!(matches!(queued, Err(Error::Closed)));
    assert!(rx.await.unwrap(), "the callback hears the refusal too");
}

/// Aux changes not yet in the store (the overlay) are read over the stored ones: a
/// deletion hides a stored key, pages merge both in order, in both directions.
#[tokio::test]
async fn aux_scans_merge_unstored_changes_over_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let put = |k: &str| AuxOp::Put(k.as_bytes().to_vec(), k.as_bytes().to_vec());
    let append = |aux: Vec<AuxOp>| {
        let wal = wal.clone();
        async move {
            let rec = Record {
                partition: 0,
                entity: b"e".to_vec(),
                payload: b"p".to_vec(),
                aux,
                also: vec![],
            };
            wal.append(rec).await.unwrap().durable().await.unwrap();
        }
    };
    append(vec![put("x/a"), put("x/b"), put("x/c")]).await;
    // Into the store.
    wal.checkpoint_partition(0, &mut |_, _, _| Ok(Some(b"s".to_vec())))
        .unwrap();
    wal.release_log().unwrap();
    append(vec![AuxOp::Delete(b"x/b".to_vec()), put("x/d"), put("x/0")]).await;
    let keys = |v: Vec<(Vec<u8>, Vec<u8>)>| {
        v.into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(wal.aux_scan(b"x/", None, false, 10).unwrap()),
        ["x/0", "x/a", "x/c", "x/d"]
    );
    assert_eq!(
        keys(wal.aux_scan(b"x/", None, true, 10).unwrap()),
        ["x/d", "x/c", "x/a", "x/0"]
    );
    // One at a time, as a list pages through them.
    let mut seen = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = wal.aux_scan(b"x/", after.as_deref(), false, 1).unwrap();
        let Some((k, _)) = page.last() else { break };
        after = Some(k.clone());
        seen.extend(keys(page));
    }
    assert_eq!(seen, ["x/0", "x/a", "x/c", "x/d"]);
    assert_eq!(wal.aux_get(b"x/b").unwrap(), None);
    assert_eq!(wal.aux_get(b"x/a").unwrap(), Some(b"x/a".to_vec()));
    // A fresh entity's log is its tail alone.
    let fresh = wal.load_new_entity(0, b"e").unwrap();
    assert_eq!((fresh.snapshot, fresh.tail.len()), (None, 1));
    wal.shutdown().await.unwrap();
}

/// One frame, two entities (a buy's claim and its order): both are durable and loaded
/// at the same lsn, both survive a crash (reopen without a checkpoint), and the segment
/// holding the frame stays until both are folded.
#[tokio::test]
async fn a_frame_with_another_entity_applies_recovers_and_folds_both() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let rec = Record {
        aux: vec![AuxOp::Put(b"I/ob/alice/o1".to_vec(), b"pending".to_vec())],
        also: vec![Part {
            partition: 9,
            entity: b"o1".to_vec(),
            payload: b"placed".to_vec(),
        }],
        ..record(4, b"camp", b"bought")
    };
    let lsn = wal.append(rec).await.unwrap().durable().await.unwrap();
    assert_eq!(wal.load_entity(4, b"camp").unwrap().tail[0].0, lsn);
    assert_eq!(
        wal.load_entity(9, b"o1").unwrap().tail,
        vec![(lsn, b"placed".to_vec())]
    );
    assert_eq!(
        wal.aux_get(b"I/ob/alice/o1").unwrap(),
        Some(b"pending".to_vec())
    );
    // No checkpoint, no shutdown: recovery replays the frame into both tails.
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(load_list(&wal, 4, b"camp"), vec![b"bought".to_vec()]);
    assert_eq!(load_list(&wal, 9, b"o1"), vec![b"placed".to_vec()]);
    // Fill a few segments so the frame's is not the one being written.
    for i in 0..200u32 {
        wal.append(record(1, b"filler", &i.to_be_bytes()))
            .await
            .unwrap()
            .durable()
            .await
            .unwrap();
    }
    let fold = &mut |_: &[u8], old: Option<&[u8]>, tail: &[(u64, Vec<u8>)]| {
        Ok(common::fold_list(old, tail))
    };
    wal.checkpoint_partition(4, fold).unwrap();
    wal.checkpoint_partition(1, fold).unwrap();
    wal.release_log().unwrap();
    // The order is not folded yet: its record must still be readable after a restart.
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(load_list(&wal, 9, b"o1"), vec![b"placed".to_vec()]);
    wal.checkpoint_partition(9, fold).unwrap();
    wal.release_log().unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(load_list(&wal, 9, b"o1"), vec![b"placed".to_vec()]);
    assert_eq!(load_list(&wal, 4, b"camp"), vec![b"bought".to_vec()]);
    wal.shutdown().await.unwrap();
}

/// `try_append_then` queues without awaiting while there is room, and hands the record
/// back when the queue is full; awaiting `queued` then keeps one caller's records in
/// order, and every callback hears its own record's lsn.
#[tokio::test]
async fn try_append_then_keeps_order_through_a_full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = shardmall_persistence::WalConfig::new(dir.path());
    cfg.durability = Durability::Sync;
    cfg.queue_capacity = 1;
    let wal = shardmall_persistence::Wal::open(cfg).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut full = 0;
    for i in 0u32..500 {
        let tx = tx.clone();
        let queued = wal
            .try_append_then(record(1, b"e", &i.to_be_bytes()), move |outcome| {
                let _ = tx.send((i, outcome.map_err(|e| e.to_string())));
            })
            .unwrap();
        if let Some(wait) = queued {
            full += 1;
            wait.queued().await.unwrap();
        }
    }
    drop(tx);
    assert!(
        full > 0,
        "a one-place queue fills under 500 appends in a row"
    );
    let mut heard = Vec::new();
    while let Some((i, lsn)) = rx.recv().await {
        heard.push((i, lsn.unwrap()));
    }
    heard.sort();
    assert_eq!(heard.len(), 500);
    assert!(
        heard.windows(2).all(|w| w[0].1 < w[1].1),
        "lsns follow the order of appends"
    );
    let tail = wal.load_entity(1, b"e").unwrap().tail;
    let payloads: Vec<u32> = tail
        .iter()
        .map(|(_, p)| u32::from_be_bytes(p[..4].try_into().unwrap()))
        .collect();
    assert_eq!(payloads, (0..500).collect::<Vec<_>>());
}
