//! Model test: random operation sequences against a `BTreeMap` model, with reboots.
//!
//! After every step every entity, loaded as snapshot + tail and folded with the test's
//! fold, equals the model, and `partitions_with_log` names exactly the partitions with
//! unfolded appends.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{fold_list, load_list, open};
use proptest::prelude::*;
use shardmall_persistence::{AuxOp, Durability, Record, Wal};

/// Entities chosen so that some are byte prefixes of others, including the empty one.
const ENTITIES: [&[u8]; 5] = [b"a", b"ab", b"abc", b"b", b""];
const AUX_KEYS: [&[u8]; 7] = [b"x", b"x/1", b"x/2", b"x/10", b"xy", b"y/1", b"y/2"];
const AUX_PREFIXES: [&[u8]; 5] = [b"", b"x", b"x/", b"y/", b"z"];
const PARTITIONS: u16 = 3;

#[derive(Debug, Clone)]
enum Op {
    Append {
        partition: u16,
        entity: usize,
        payload: Vec<u8>,
        aux: Vec<(usize, Option<u8>)>,
    },
    Checkpoint(u16),
    Load(u16, usize),
    AuxScan {
        prefix: usize,
        after: Option<usize>,
        reverse: bool,
        limit: usize,
    },
    Reboot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (
            0..PARTITIONS,
            0..ENTITIES.len(),
            // Mostly non-empty; an empty payload clears the entity in the fold.
            prop_oneof![1 => Just(vec![]), 8 => proptest::collection::vec(any::<u8>(), 1..6)],
            proptest::collection::vec((0..AUX_KEYS.len(), proptest::option::of(any::<u8>())), 0..3),
        )
            .prop_map(|(partition, entity, payload, aux)| Op::Append { partition, entity, payload, aux }),
        2 => (0..PARTITIONS).prop_map(Op::Checkpoint),
        2 => (0..PARTITIONS, 0..ENTITIES.len()).prop_map(|(p, e)| Op::Load(p, e)),
        2 => (0..AUX_PREFIXES.len(), proptest::option::of(0..AUX_KEYS.len()), any::<bool>(), 0usize..5)
            .prop_map(|(prefix, after, reverse, limit)| Op::AuxScan { prefix, after, reverse, limit }),
        1 => Just(Op::Reboot),
    ]
}

#[derive(Default)]
struct Model {
    entities: BTreeMap<(u16, Vec<u8>), Vec<Vec<u8>>>,
    unfolded: BTreeSet<u16>,
    aux: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Model {
    fn aux_scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let matching = self.aux.iter().filter(|(k, _)| k.starts_with(prefix));
        let picked: Vec<_> = if reverse {
            matching
                .rev()
                .filter(|(k, _)| after.is_none_or(|a| k.as_slice() < a))
                .take(limit)
                .collect()
        } else {
            matching
                .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
                .take(limit)
                .collect()
        };
        picked
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[track_caller]
fn check_all(wal: &Wal, model: &Model) {
    for p in 0..PARTITIONS {
        for e in ENTITIES {
            let expected = model
                .entities
                .get(&(p, e.to_vec()))
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                load_list(wal, p, e),
                expected,
                "entity {e:?} of partition {p}"
            );
        }
    }
    let with_log: BTreeSet<u16> = wal.partitions_with_log().unwrap().into_iter().collect();
    assert_eq!(with_log, model.unfolded);
}

fn run(durability: Durability, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let mut wal = open(dir.path(), durability);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append {
                partition,
                entity,
                payload,
                aux,
            } => {
                let entity = ENTITIES[entity].to_vec();
                let aux: Vec<AuxOp> = aux
                    .into_iter()
                    .map(|(k, v)| match v {
                        Some(v) => AuxOp::Put(AUX_KEYS[k].to_vec(), vec![v]),
                        None => AuxOp::Delete(AUX_KEYS[k].to_vec()),
                    })
                    .collect();
                for a in &aux {
                    match a {
                        AuxOp::Put(k, v) => model.aux.insert(k.clone(), v.clone()),
                        AuxOp::Delete(k) => model.aux.remove(k),
                    };
                }
                common::apply(
                    model
                        .entities
                        .entry((partition, entity.clone()))
                        .or_default(),
                    &payload,
                );
                model.unfolded.insert(partition);
                let rec = Record {
                    partition,
                    entity,
                    payload,
                    aux,
                    also: vec![],
                };
                rt.block_on(async { wal.append(rec).await.unwrap().durable().await.unwrap() });
            }
            Op::Checkpoint(p) => {
                wal.checkpoint_partition(p, &mut |_, old, tail| Ok(fold_list(old, tail)))
                    .unwrap();
                wal.release_log().unwrap();
                model.unfolded.remove(&p);
            }
            Op::Load(p, e) => {
                let expected = model
                    .entities
                    .get(&(p, ENTITIES[e].to_vec()))
                    .cloned()
                    .unwrap_or_default();
                assert_eq!(load_list(&wal, p, ENTITIES[e]), expected);
            }
            Op::AuxScan {
                prefix,
                after,
                reverse,
                limit,
            } => {
                let (prefix, after) = (AUX_PREFIXES[prefix], after.map(|a| AUX_KEYS[a]));
                let got = wal.aux_scan(prefix, after, reverse, limit).unwrap();
                assert_eq!(
                    got,
                    model.aux_scan(prefix, after, reverse, limit),
                    "aux_scan({prefix:?}, {after:?}, {reverse})"
                );
                for k in AUX_KEYS {
                    assert_eq!(wal.aux_get(k).unwrap().as_ref(), model.aux.get(k));
                }
            }
            Op::Reboot => {
                rt.block_on(wal.shutdown()).unwrap();
                drop(wal);
                wal = open(dir.path(), durability);
            }
        }
        check_all(&wal, &model);
    }
    rt.block_on(wal.shutdown()).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model(sync in any::<bool>(), ops in proptest::collection::vec(op(), 1..40)) {
        run(if sync { Durability::Sync } else { Durability::Relaxed }, ops);
    }
}
