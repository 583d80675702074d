//! What a checkpoint costs per entity: folding freshly logged entities (one record each,
//! like the orders of a flash sale) into their snapshots in the store, then releasing
//! the log.
//!
//!     cargo bench -p shardmall-persistence --bench checkpoint
//!
//! Environment: `CKPT_ENTITIES` (default 80000), `CKPT_RECORD_BYTES` (default 600, about
//! a bought order's record), `CKPT_PARTITIONS` (default 4), `CKPT_RUNS` (default 3).
//! The fold is the identity (the record becomes the snapshot), so the figure is the
//! log's and the store's share; the domain's decode and encode come on top.

use std::time::{Duration, Instant};

use shardmall_persistence::{Record, Wal, WalConfig};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Logs `entities` one-record entities with time-ordered ids, then times the
/// checkpoint of every partition and the release of the log.
async fn run(entities: usize, record_bytes: usize, partitions: u16) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let wal = Wal::open(WalConfig::new(dir.path())).expect("open the log");
    let payload = vec![0x5a; record_bytes];
    let mut acks = Vec::new();
    for i in 0..entities {
        let entity = format!(
            "O\u{0}{:016x}{:06x}",
            1_700_000_000_000u64 + i as u64 / 10,
            i
        );
        let rec = Record {
            partition: (i % usize::from(partitions)) as u16,
            entity: entity.into_bytes(),
            payload: payload.clone(),
            aux: Vec::new(),
            also: Vec::new(),
        };
        acks.push(wal.append(rec).await.expect("append"));
        if acks.len() >= 1024 {
            for ack in acks.drain(..) {
                ack.durable().await.expect("durable");
            }
        }
    }
    for ack in acks {
        ack.durable().await.expect("durable");
    }
    let mut identity = |_: &[u8], _: Option<&[u8]>, tail: &[(u64, Vec<u8>)]| {
        Ok(tail.last().map(|(_, r)| r.clone()))
    };
    let started = Instant::now();
    for p in 0..partitions {
        wal.checkpoint_partition(p, &mut identity)
            .expect("checkpoint");
    }
    let folded = started.elapsed();
    let started = Instant::now();
    wal.release_log().expect("release the log");
    (folded, started.elapsed())
}

#[tokio::main]
async fn main() {
    let entities: usize = env_or("CKPT_ENTITIES", 80_000);
    let record_bytes: usize = env_or("CKPT_RECORD_BYTES", 600);
    let partitions: u16 = env_or("CKPT_PARTITIONS", 4).max(1);
    let runs: usize = env_or("CKPT_RUNS", 3).max(1);
    println!(
        "checkpoint of {entities} fresh entities, {record_bytes}-byte records, {partitions} partitions"
    );
    println!("| run | fold + store | µs per entity | release (flush) |");
    println!("|---|---|---|---|");
    for run_no in 1..=runs {
        let (folded, released) = run(entities, record_bytes, partitions).await;
        println!(
            "| {run_no} | {:.0} ms | {:.1} | {:.0} ms |",
            folded.as_secs_f64() * 1e3,
            folded.as_secs_f64() * 1e6 / entities as f64,
            released.as_secs_f64() * 1e3
        );
    }
}
