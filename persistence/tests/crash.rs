//! Crash test: a child process (this test binary, re-executed) appends with many
//! concurrent appenders in `sync` mode while checkpoints run, printing every
//! acknowledged record; the parent kills it with SIGKILL mid-write, reopens the database
//! and checks that every acknowledged record is there, intact, and that every record
//! there is complete.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{decode_list, fold_list, open};
use shardmall_persistence::{AuxOp, Durability, Record};

/// Set in the child: the database directory.
const CHILD_ENV: &str = "SHARDMALL_WAL_CRASH_CHILD_DIR";
const TASKS: u16 = 64;
const PARTITIONS: u16 = 4;
const ROUNDS: usize = 3;

fn entity(task: u16) -> (u16, Vec<u8>) {
    (task % PARTITIONS, format!("t{task:02}").into_bytes())
}

fn aux_key(task: u16, seq: u32) -> Vec<u8> {
    format!("rec/{task:02}/{seq:08}").into_bytes()
}

/// FNV-1a, enough to tell a torn or mixed-up payload from an intact one.
fn checksum(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// task (u16) + seq (u32) + body length (u16) + body + checksum of all before it (u32).
fn make_payload(task: u16, seq: u32) -> Vec<u8> {
    let len = 16 + (seq as usize * 7 + task as usize * 13) % 200;
    let mut p = Vec::with_capacity(12 + len);
    p.extend_from_slice(&task.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend((0..len).map(|i| (i as u32 ^ seq ^ u32::from(task)).wrapping_mul(31) as u8));
    let sum = checksum(&p);
    p.extend_from_slice(&sum.to_be_bytes());
    p
}

/// The (task, seq) of a complete payload, or `None` if it does not verify.
fn verify(p: &[u8]) -> Option<(u16, u32)> {
    if p.len() < 12 {
        return None;
    }
    let task = u16::from_be_bytes([p[0], p[1]]);
    let seq = u32::from_be_bytes(p[2..6].try_into().ok()?);
    let len = u16::from_be_bytes([p[6], p[7]]) as usize;
    if p.len() != 8 + len + 4 || p != make_payload(task, seq) {
        return None;
    }
    Some((task, seq))
}

/// The child: appends until killed. A no-op in a normal test run.
#[test]
fn crash_child() {
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
        let checkpointer = wal.clone();
        std::thread::spawn(move || loop {
            for p in 0..PARTITIONS {
                checkpointer
                    .checkpoint_partition(p, &mut |_, old, tail| Ok(fold_list(old, tail)))
                    .unwrap();
            }
            checkpointer.release_log().unwrap();
            std::thread::sleep(Duration::from_millis(3));
        });
        for task in 0..TASKS {
            let wal = wal.clone();
            tokio::spawn(async move {
                let (partition, entity) = entity(task);
                for seq in 0u32.. {
                    let payload = make_payload(task, seq);
                    let aux = vec![AuxOp::Put(
                        aux_key(task, seq),
                        checksum(&payload).to_be_bytes().to_vec(),
                    )];
                    let rec = Record {
                        partition,
                        entity: entity.clone(),
                        payload,
                        aux,
                        also: vec![],
                    };
                    let lsn = wal.append(rec).await.unwrap().durable().await.unwrap();
                    // One write + flush per line: the parent must see every ack that was
                    // printed before the kill.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ACK {task} {seq} {lsn}").unwrap();
                    out.flush().unwrap();
                }
            });
        }
        // Bounded even if the parent never kills us.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
}

/// Runs one child until it has acknowledged `kill_after` records, kills it, and returns
/// the acknowledgements it printed: task -> seq -> lsn.
fn run_child(dir: &std::path::Path, kill_after: usize) -> BTreeMap<u16, BTreeMap<u32, u64>> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acks: BTreeMap<u16, BTreeMap<u32, u64>> = BTreeMap::new();
    let mut count = 0;
    let mut record_line = |line: String, count: &mut usize| {
        // libtest may print "test crash_child ... " on the same line as the first ack.
        let Some(at) = line.find("ACK ") else { return };
        let mut parts = line[at..].split_whitespace().skip(1);
        let mut num = || parts.next().unwrap().parse::<u64>().unwrap();
        let (task, seq, lsn) = (num() as u16, num() as u32, num());
        acks.entry(task).or_default().insert(seq, lsn);
        *count += 1;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count < kill_after {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => record_line(line, &mut count),
            Err(e) => {
                let _ = child.kill();
                panic!("child acknowledged only {count} records before {e:?}");
            }
        }
    }
    child.kill().expect("SIGKILL the child");
    child.wait().unwrap();
    // Acks printed before the kill are still in the pipe.
    reader.join().unwrap();
    while let Ok(line) = rx.try_recv() {
        record_line(line, &mut count);
    }
    acks
}

#[test]
fn acknowledged_records_survive_sigkill() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let acks = run_child(dir.path(), 300 + 600 * round);
        let max_acked_lsn = acks
            .values()
            .flat_map(|m| m.values())
            .copied()
            .max()
            .unwrap();

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let wal = open(dir.path(), Durability::Sync);
        let mut recovered = 0;
        for task in 0..TASKS {
            let (partition, entity) = entity(task);
            let log = wal.load_entity(partition, &entity).unwrap();
            let mut records: Vec<(Option<u64>, Vec<u8>)> = log
                .snapshot
                .as_deref()
                .map(decode_list)
                .unwrap_or_default()
                .into_iter()
                .map(|p| (None, p))
                .collect();
            records.extend(log.tail.into_iter().map(|(lsn, p)| (Some(lsn), p)));
            // Every record present is complete, belongs here, and they form the gap-free
            // sequence 0..n: a task appends seq + 1 only after seq was durable.
            for (i, (lsn, p)) in records.iter().enumerate() {
                let (t, seq) = verify(p).unwrap_or_else(|| {
                    panic!("round {round}: torn record in task {task}: {p:02x?}")
                });
                assert_eq!(
                    (t, seq),
                    (task, i as u32),
                    "round {round}: record out of place"
                );
                if let (Some(lsn), Some(acked)) = (lsn, acks.get(&task).and_then(|m| m.get(&seq))) {
                    assert_eq!(
                        lsn, acked,
                        "round {round}: task {task} seq {seq} has another lsn"
                    );
                }
                let aux = wal.aux_get(&aux_key(task, seq)).unwrap();
                assert_eq!(
                    aux,
                    Some(checksum(p).to_be_bytes().to_vec()),
                    "round {round}: aux of {task}/{seq}"
                );
            }
            // Every acknowledged record is present; at most one unacknowledged one (the
            // append in flight at the kill) may have made it too.
            let acked = acks.get(&task).map_or(0, |m| m.len());
            if let Some(m) = acks.get(&task) {
                assert_eq!(
                    m.keys().copied().collect::<Vec<_>>(),
                    (0..acked as u32).collect::<Vec<_>>()
                );
            }
            assert!(
                records.len() == acked || records.len() == acked + 1,
                "round {round}: task {task} acknowledged {acked} records, {} recovered",
                records.len()
            );
            // The aux keys were written in the same batches: no more, no fewer.
            let prefix = format!("rec/{task:02}/").into_bytes();
            assert_eq!(
                wal.aux_scan(&prefix, None, false, usize::MAX)
                    .unwrap()
                    .len(),
                records.len()
            );
            recovered += records.len();
        }
        let next = rt.block_on(async {
            wal.append(Record {
                partition: 0,
                entity: b"after".to_vec(),
                payload: vec![1],
                aux: vec![],
                also: vec![],
            })
            .await
            .unwrap()
            .durable()
            .await
            .unwrap()
        });
        assert!(
            next > max_acked_lsn,
            "round {round}: lsn {next} reused after the crash (acked up to {max_acked_lsn})"
        );
        rt.block_on(wal.shutdown()).unwrap();
        eprintln!(
            "round {round}: {} acknowledged, {recovered} recovered",
            acks.values().map(|m| m.len()).sum::<usize>()
        );
    }
}
