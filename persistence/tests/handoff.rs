//! Exporting a partition's state and replacing a partition's copy (partition handoff).

mod common;

use common::{decode_list, encode_list, fold_list, load_list, open, record};
use shardmall_persistence::{AuxOp, Durability, Fold, Record, Wal};

fn fold() -> Fold {
    Box::new(|_entity: &[u8], old: Option<&[u8]>, tail: &[(u64, Vec<u8>)]| Ok(fold_list(old, tail)))
}

async fn put(wal: &Wal, partition: u16, entity: &[u8], payload: &[u8]) {
    wal.append(record(partition, entity, payload))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
}

async fn put_indexed(wal: &Wal, partition: u16, entity: &[u8], payload: &[u8], index: &[u8]) {
    let rec = Record {
        aux: vec![AuxOp::Put(index.to_vec(), entity.to_vec())],
        ..record(partition, entity, payload)
    };
    wal.append(rec).await.unwrap().durable().await.unwrap();
}

fn checkpoint(wal: &Wal, partition: u16) {
    wal.checkpoint_partition(partition, &mut |_e, old, tail| Ok(fold_list(old, tail)))
        .unwrap();
}

fn items(list: &[&[u8]]) -> Vec<Vec<u8>> {
    list.iter().map(|i| i.to_vec()).collect()
}

#[tokio::test]
async fn export_folds_snapshots_and_tails_of_one_partition_only() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    put(&wal, 1, b"a", b"1").await;
    put(&wal, 1, b"b", b"x").await;
    checkpoint(&wal, 1);
    put(&wal, 1, b"a", b"2").await; // a: snapshot + tail
    put(&wal, 1, b"c", b"only-tail").await; // c: never checkpointed
    put(&wal, 1, b"gone", b"y").await;
    put(&wal, 1, b"gone", b"").await; // folds to no state
    put(&wal, 2, b"other", b"z").await;

    let mut out = wal.export_partition(1, fold()).await.unwrap();
    out.sort();
    let decoded: Vec<(Vec<u8>, Vec<Vec<u8>>)> = out
        .iter()
        .map(|(k, v)| (k.clone(), decode_list(v)))
        .collect();
    assert_eq!(
        decoded,
        vec![
            (b"a".to_vec(), items(&[b"1", b"2"])),
            (b"b".to_vec(), items(&[b"x"])),
            (b"c".to_vec(), items(&[b"only-tail"])),
        ]
    );
    // Read-only: loads are unchanged.
    assert_eq!(load_list(&wal, 1, b"a"), items(&[b"1", b"2"]));
    assert!(!wal.load_entity(1, b"a").unwrap().tail.is_empty());
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_export_fails_rather_than_leave_an_entity_behind() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    put(&wal, 1, b"a", b"1").await;
    let broken: Fold = Box::new(|_, _, _| Err("cannot fold".into()));
    let err = wal.export_partition(1, broken).await.unwrap_err();
    assert!(err.to_string().contains("does not fold"), "{err}");
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn install_replaces_the_copy_exactly_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    put_indexed(&wal, 4, b"old-snap", b"s", b"idx/old-snap").await;
    checkpoint(&wal, 4);
    put_indexed(&wal, 4, b"old-tail", b"t", b"idx/old-tail").await; // only in the log
    put(&wal, 4, b"kept", b"stale").await;
    put_indexed(&wal, 4, b"timer", b"d", b"deadline/4/x").await;
    put(&wal, 5, b"neighbour", b"n").await;

    wal.install_partition(
        4,
        vec![
            (b"kept".to_vec(), encode_list(&items(&[b"fresh"]))),
            (b"new".to_vec(), encode_list(&items(&[b"n1", b"n2"]))),
        ],
        vec![b"deadline/4/".to_vec()],
        vec![b"idx/old-snap".to_vec(), b"idx/old-tail".to_vec()],
        vec![(b"idx/new".to_vec(), b"new".to_vec())],
    )
    .await
    .unwrap();

    let check = |wal: &Wal| {
        assert_eq!(load_list(wal, 4, b"kept"), items(&[b"fresh"]));
        assert!(wal.load_entity(4, b"kept").unwrap().tail.is_empty());
        assert_eq!(load_list(wal, 4, b"new"), items(&[b"n1", b"n2"]));
        for gone in [&b"old-snap"[..], b"old-tail", b"timer"] {
            assert_eq!(
                wal.load_entity(4, gone).unwrap(),
                Default::default(),
                "{gone:?}"
            );
        }
        assert_eq!(wal.aux_get(b"idx/old-snap").unwrap(), None);
        assert_eq!(wal.aux_get(b"idx/old-tail").unwrap(), None);
        assert_eq!(wal.aux_get(b"deadline/4/x").unwrap(), None);
        assert_eq!(wal.aux_get(b"idx/new").unwrap(), Some(b"new".to_vec()));
        assert_eq!(load_list(wal, 5, b"neighbour"), items(&[b"n"]));
    };
    check(&wal);
    // New writes fold on top of the installed state.
    put(&wal, 4, b"new", b"n3").await;
    assert_eq!(wal.load_entity(4, b"new").unwrap().tail.len(), 1);
    wal.shutdown().await.unwrap();
    drop(wal);

    // The old records are still in the log's segments: replay must not bring them back.
    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(load_list(&wal, 4, b"new"), items(&[b"n1", b"n2", b"n3"]));
    put(&wal, 4, b"new", b"").await;
    assert_eq!(load_list(&wal, 4, b"new"), Vec::<Vec<u8>>::new());
    put(&wal, 4, b"new", b"n4").await;
    assert_eq!(load_list(&wal, 4, b"kept"), items(&[b"fresh"]));
    for gone in [&b"old-snap"[..], b"old-tail", b"timer"] {
        assert_eq!(
            wal.load_entity(4, gone).unwrap(),
            Default::default(),
            "{gone:?}"
        );
    }
    assert_eq!(wal.aux_get(b"idx/old-tail").unwrap(), None);
    assert_eq!(wal.aux_get(b"deadline/4/x").unwrap(), None);
    assert_eq!(wal.aux_get(b"idx/new").unwrap(), Some(b"new".to_vec()));
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn installing_nothing_clears_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Relaxed);
    put(&wal, 9, b"a", b"1").await;
    checkpoint(&wal, 9);
    put(&wal, 9, b"b", b"2").await;
    wal.install_partition(9, Vec::new(), Vec::new(), Vec::new(), Vec::new())
        .await
        .unwrap();
    assert!(wal.export_partition(9, fold()).await.unwrap().is_empty());
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Relaxed);
    assert!(wal.export_partition(9, fold()).await.unwrap().is_empty());
    wal.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_other_partitions_during_an_install_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    for i in 0..50u32 {
        put(&wal, 3, format!("e{i}").as_bytes(), b"old").await;
    }
    let writer = {
        let wal = wal.clone();
        tokio::spawn(async move {
            for i in 0..300u32 {
                put(
                    &wal,
                    1 + (i % 2) as u16,
                    format!("w{}", i / 2).as_bytes(),
                    &i.to_be_bytes(),
                )
                .await;
            }
        })
    };
    for round in 0..5u8 {
        let entities = (0..20u32)
            .map(|i| (format!("e{i}").into_bytes(), encode_list(&[vec![round]])))
            .collect();
        wal.install_partition(3, entities, Vec::new(), Vec::new(), Vec::new())
            .await
            .unwrap();
    }
    writer.await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    for i in 0..300u32 {
        let got = load_list(&wal, 1 + (i % 2) as u16, format!("w{}", i / 2).as_bytes());
        assert!(got.contains(&i.to_be_bytes().to_vec()), "append {i} lost");
    }
    let mut installed = wal.export_partition(3, fold()).await.unwrap();
    installed.sort();
    assert_eq!(installed.len(), 20);
    assert!(installed
        .iter()
        .all(|(_, v)| decode_list(v) == vec![vec![4u8]]));
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn install_on_a_fresh_log_loads_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    wal.install_partition(
        6,
        vec![(b"a".to_vec(), encode_list(&items(&[b"1", b"2"])))],
        Vec::new(),
        Vec::new(),
        vec![(b"idx/a".to_vec(), b"a".to_vec())],
    )
    .await
    .unwrap();
    let check = |wal: &Wal| {
        let log = wal.load_entity(6, b"a").unwrap();
        assert_eq!(log.snapshot, Some(encode_list(&items(&[b"1", b"2"]))));
        assert!(log.tail.is_empty());
        assert_eq!(wal.aux_get(b"idx/a").unwrap(), Some(b"a".to_vec()));
    };
    check(&wal);
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = open(dir.path(), Durability::Sync);
    check(&wal);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn checkpoints_and_released_segments_after_an_install_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    // Enough records to fill several 4 KiB segments.
    for i in 0..200u32 {
        put(&wal, 2, format!("e{}", i % 10).as_bytes(), &[b'x'; 40]).await;
        put(&wal, 8, b"neighbour", &i.to_be_bytes()).await;
    }
    checkpoint(&wal, 2);
    put(&wal, 2, b"e0", b"stale").await;
    put(&wal, 2, b"tail-only", b"stale").await;
    wal.install_partition(
        2,
        vec![(b"e0".to_vec(), encode_list(&items(&[b"fresh"])))],
        Vec::new(),
        Vec::new(),
        Vec::new(),
    )
    .await
    .unwrap();
    // Nothing of the old copy is left for the checkpointer to fold over the install.
    assert!(!wal.partitions_with_log().unwrap().contains(&2));
    checkpoint(&wal, 2);
    checkpoint(&wal, 8);
    assert!(wal.release_log().unwrap() > 0);
    put(&wal, 2, b"e0", b"new").await;
    checkpoint(&wal, 2);
    wal.shutdown().await.unwrap();
    drop(wal);

    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(load_list(&wal, 2, b"e0"), items(&[b"fresh", b"new"]));
    let mut exported = wal.export_partition(2, fold()).await.unwrap();
    exported.sort();
    assert_eq!(
        exported,
        vec![(b"e0".to_vec(), encode_list(&items(&[b"fresh", b"new"])))]
    );
    assert_eq!(load_list(&wal, 8, b"neighbour").len(), 200);
    wal.shutdown().await.unwrap();
}

/// Set in the child of [`an_install_survives_a_kill_without_shutdown`]: the directory.
const CHILD_ENV: &str = "SHARDMALL_HANDOFF_CRASH_CHILD_DIR";

/// The child: builds an old copy of partition 4, installs a new one, appends on top, then
/// waits to be killed. No clean shutdown ever flushes the store: what survives is what
/// the install and the log made durable themselves. A no-op in a normal test run.
#[test]
fn install_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let wal = open(dir.as_ref(), Durability::Sync);
        put_indexed(&wal, 4, b"old-snap", b"s", b"idx/old-snap").await;
        checkpoint(&wal, 4);
        put_indexed(&wal, 4, b"old-tail", b"t", b"idx/old-tail").await;
        put(&wal, 4, b"kept", b"stale").await;
        wal.install_partition(
            4,
            vec![(b"kept".to_vec(), encode_list(&items(&[b"fresh"])))],
            Vec::new(),
            vec![b"idx/old-snap".to_vec(), b"idx/old-tail".to_vec()],
            vec![(b"idx/kept".to_vec(), b"kept".to_vec())],
        )
        .await
        .unwrap();
        put(&wal, 4, b"kept", b"after").await;
        put(&wal, 5, b"neighbour", b"n").await;
        println!("READY");
        // Bounded even if the parent never kills us.
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    });
}

#[test]
fn an_install_survives_a_kill_without_shutdown() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "install_crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning the child");
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // The child prints READY within seconds, or exits (a panic) and ends the stream.
    let ready = stdout
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.contains("READY"));
    child.kill().expect("SIGKILL the child");
    child.wait().unwrap();
    assert!(ready, "the child failed before installing");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let wal = open(dir.path(), Durability::Sync);
    let log = wal.load_entity(4, b"kept").unwrap();
    assert_eq!(log.snapshot, Some(encode_list(&items(&[b"fresh"]))));
    assert_eq!(
        log.tail.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        items(&[b"after"])
    );
    for gone in [&b"old-snap"[..], b"old-tail"] {
        assert_eq!(
            wal.load_entity(4, gone).unwrap(),
            Default::default(),
            "{gone:?}"
        );
    }
    assert_eq!(wal.aux_get(b"idx/old-snap").unwrap(), None);
    assert_eq!(wal.aux_get(b"idx/old-tail").unwrap(), None);
    assert_eq!(wal.aux_get(b"idx/kept").unwrap(), Some(b"kept".to_vec()));
    assert_eq!(load_list(&wal, 5, b"neighbour"), items(&[b"n"]));
    rt.block_on(wal.shutdown()).unwrap();
}
