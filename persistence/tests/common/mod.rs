//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use shardmall_persistence::{Durability, Record, Wal, WalConfig};

/// Opens the log at `dir`, retrying briefly: after a shutdown the last sled threads may
/// still be releasing the database lock.
#[track_caller]
pub fn open(dir: &Path, durability: Durability) -> Wal {
    let mut cfg = WalConfig::new(dir);
    cfg.durability = durability;
    cfg.cache_bytes = 8 << 20;
    // Small segments: the tests roll, replay and release many of them.
    cfg.segment_bytes = 4096;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Wal::open(cfg.clone()) {
            Ok(wal) => return wal,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopen retry: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("opening the log at {}: {e}", dir.display()),
        }
    }
}

pub fn record(partition: u16, entity: &[u8], payload: &[u8]) -> Record {
    Record {
        partition,
        entity: entity.to_vec(),
        payload: payload.to_vec(),
        aux: Vec::new(),
        also: vec![],
    }
}

/// Fold used by the tests: a snapshot is a list of length-prefixed payloads; an empty
/// payload clears the list; an empty list is stored as no snapshot.
pub fn fold_list(old: Option<&[u8]>, tail: &[(u64, Vec<u8>)]) -> Option<Vec<u8>> {
    let mut items = old.map(decode_list).unwrap_or_default();
    for (_, p) in tail {
        apply(&mut items, p);
    }
    (!items.is_empty()).then(|| encode_list(&items))
}

pub fn apply(items: &mut Vec<Vec<u8>>, payload: &[u8]) {
    if payload.is_empty() {
        items.clear();
    } else {
        items.push(payload.to_vec());
    }
}

pub fn encode_list(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_be_bytes());
        out.extend_from_slice(i);
    }
    out
}

#[track_caller]
pub fn decode_list(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        out.push(bytes[4..4 + len].to_vec());
        bytes = &bytes[4 + len..];
    }
    out
}

/// The entity's state as the tests' fold defines it: snapshot + tail.
pub fn load_list(wal: &Wal, partition: u16, entity: &[u8]) -> Vec<Vec<u8>> {
    let log = wal.load_entity(partition, entity).expect("load_entity");
    let mut items = log.snapshot.as_deref().map(decode_list).unwrap_or_default();
    let mut last = 0;
    for (lsn, p) in &log.tail {
        assert!(*lsn > last, "tail out of lsn order");
        last = *lsn;
        apply(&mut items, p);
    }
    items
}
