//! A failing disk, simulated with failpoints (`fail`, the `failpoints` feature): the
//! first `fdatasync` error fails the log for good. Linux reports a writeback error once
//! per file description, so a later sync of the same file succeeds although the data may
//! be lost: nothing may be acknowledged after the first error.

mod common;

use common::{load_list, open, record};
use shardmall_persistence::{Durability, Error};

/// Appends one record at a time until one fails; answers the payloads acknowledged
/// before that, and checks that every append after it fails too.
async fn append_until_failure(wal: &shardmall_persistence::Wal) -> Vec<Vec<u8>> {
    let mut acked = Vec::new();
    for i in 0u32..2_000 {
        let payload = i.to_be_bytes().to_vec();
        let outcome = match wal.append(record(1, b"e", &payload)).await {
            Ok(ack) => ack.durable().await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(_) => acked.push(payload),
            Err(Error::Failed(_)) => {
                for j in 0u32..20 {
                    let later = match wal.append(record(1, b"e", &j.to_le_bytes())).await {
                        Ok(ack) => ack.durable().await,
                        Err(e) => Err(e),
                    };
                    assert!(
                        later.is_err(),
                        "an append after the failure was acknowledged"
                    );
                }
                return acked;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    panic!("2,000 appends and no failure: the injected sync error was ignored");
}

#[tokio::test]
async fn a_failed_sync_of_a_full_segment_fails_the_log() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    // The first sync of a full segment fails, once; every later sync would succeed.
    fail::cfg("wal::sync_roll", "1*return").unwrap();
    let acked = append_until_failure(&wal).await;
    let why = wal.failure().expect("the log says it failed");
    assert!(why.contains("syncing a full log segment"), "{why}");
    fail::remove("wal::sync_roll");
    drop(wal);
    scenario.teardown();

    // Everything acknowledged is there after a restart (the disk itself was fine).
    let wal = open(dir.path(), Durability::Sync);
    let found = load_list(&wal, 1, b"e");
    for p in &acked {
        assert!(found.contains(p), "acknowledged record {p:?} lost");
    }
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_sync_of_the_log_fails_it_for_good() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    fail::cfg("wal::sync_flush", "1*return").unwrap();
    let acked = append_until_failure(&wal).await;
    assert!(
        acked.is_empty(),
        "the first sync failed: nothing was durable"
    );
    let why = wal.failure().expect("the log says it failed");
    assert!(why.contains("syncing the log"), "{why}");
    fail::remove("wal::sync_flush");
    scenario.teardown();
}

#[tokio::test]
async fn a_checkpoint_that_cannot_write_the_store_fails_the_log() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), Durability::Sync);
    let acked = wal
        .append(record(1, b"e", b"kept"))
        .await
        .unwrap()
        .durable()
        .await
        .unwrap();
    fail::cfg("checkpoint::release", "return").unwrap();
    let err = wal.release_log().unwrap_err();
    assert!(matches!(err, Error::Failed(_)), "{err}");
    let why = wal.failure().expect("the log says it failed");
    assert!(why.contains("checkpointing"), "{why}");
    let later = match wal.append(record(1, b"e", b"after")).await {
        Ok(ack) => ack.durable().await,
        Err(e) => Err(e),
    };
    assert!(
        later.is_err(),
        "an append after a failed checkpoint was acknowledged"
    );
    fail::remove("checkpoint::release");
    drop(wal);
    scenario.teardown();

    let wal = open(dir.path(), Durability::Sync);
    assert_eq!(
        load_list(&wal, 1, b"e"),
        vec![b"kept".to_vec()],
        "lsn {acked}"
    );
    wal.shutdown().await.unwrap();
}
