//! Layout of the single sled tree. The first byte names the key space:
//!
//! * `L` + partition (u16 BE) + entity length (u16 BE) + entity + lsn (u64 BE) -> payload.
//!   One entity's log is the prefix scan of everything before the lsn, ordered by lsn;
//!   one partition's log is the prefix `L` + partition. The length field makes entity
//!   prefixes free of each other: entity `ab` never shares a prefix with entity `abc`.
//! * `S` + partition + entity length + entity -> lsn (u64 BE) + tag + snapshot bytes. The
//!   lsn is the last record folded in; tag 0 is a tombstone (the fold deleted the
//!   snapshot), kept so that the lsn of an entity's snapshot only ever grows, which is what
//!   [`crate::Wal::load_entity`] checks to detect a racing checkpoint.
//! * `A` + user key -> auxiliary value.
//! * `H` -> the highest lsn ever assigned (u64 BE), written in every append batch, so the
//!   lsn counter survives restarts without scanning the log.

use crate::{Error, Lsn, Result};

pub(crate) const LOG: u8 = b'L';
pub(crate) const SNAPSHOT: u8 = b'S';
pub(crate) const AUX: u8 = b'A';
pub(crate) const HIGH_WATER: &[u8] = b"H";

/// Longest entity key the length field can carry.
pub(crate) const MAX_ENTITY_LEN: usize = u16::MAX as usize;

pub(crate) fn check_entity(entity: &[u8]) -> Result<()> {
    if entity.len() > MAX_ENTITY_LEN {
        return Err(Error::EntityTooLong {
            len: entity.len(),
            max: MAX_ENTITY_LEN,
        });
    }
    Ok(())
}

/// `space` + partition: every key of one partition in the log or snapshot space.
pub(crate) fn partition_prefix(space: u8, partition: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(3);
    k.push(space);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// `space` + partition + entity length + entity. For `S` this is the snapshot key, for
/// `L` the prefix of the entity's log.
///
/// The caller MUST have checked the entity length with [`check_entity`].
pub(crate) fn entity_prefix(space: u8, partition: u16, entity: &[u8]) -> Vec<u8> {
    debug_assert!(entity.len() <= MAX_ENTITY_LEN);
    let mut k = Vec::with_capacity(5 + entity.len() + 8);
    k.push(space);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&(entity.len() as u16).to_be_bytes());
    k.extend_from_slice(entity);
    k
}

#[cfg(test)]
pub(crate) fn log_key(partition: u16, entity: &[u8], lsn: Lsn) -> Vec<u8> {
    let mut k = Vec::new();
    write_log_key(&mut k, partition, entity, lsn);
    k
}

/// [`log_key`] into a reused buffer (the writer's hot path).
pub(crate) fn write_log_key(k: &mut Vec<u8>, partition: u16, entity: &[u8], lsn: Lsn) {
    debug_assert!(entity.len() <= MAX_ENTITY_LEN);
    k.clear();
    k.push(LOG);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&(entity.len() as u16).to_be_bytes());
    k.extend_from_slice(entity);
    k.extend_from_slice(&lsn.to_be_bytes());
}

pub(crate) fn snapshot_key(partition: u16, entity: &[u8]) -> Vec<u8> {
    entity_prefix(SNAPSHOT, partition, entity)
}

pub(crate) fn aux_key(user: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len());
    k.push(AUX);
    k.extend_from_slice(user);
    k
}

/// A decoded `L` key.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LogKey<'a> {
    pub partition: u16,
    pub entity: &'a [u8],
    pub lsn: Lsn,
}

pub(crate) fn decode_log_key(key: &[u8]) -> Result<LogKey<'_>> {
    let corrupt = || Error::Corrupt(format!("malformed log key {key:02x?}"));
    if key.len() < 1 + 2 + 2 + 8 || key[0] != LOG {
        return Err(corrupt());
    }
    let partition = u16::from_be_bytes([key[1], key[2]]);
    let len = u16::from_be_bytes([key[3], key[4]]) as usize;
    if key.len() != 5 + len + 8 {
        return Err(corrupt());
    }
    let entity = &key[5..5 + len];
    let lsn = decode_lsn(&key[5 + len..]).ok_or_else(corrupt)?;
    Ok(LogKey {
        partition,
        entity,
        lsn,
    })
}

fn decode_lsn(bytes: &[u8]) -> Option<Lsn> {
    Some(Lsn::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn decode_high_water(value: &[u8]) -> Result<Lsn> {
    decode_lsn(value)
        .ok_or_else(|| Error::Corrupt(format!("malformed lsn high-water mark {value:02x?}")))
}

const TOMBSTONE: u8 = 0;
const PRESENT: u8 = 1;

/// Snapshot value: lsn of the last folded record, then the snapshot (or a tombstone).
pub(crate) fn encode_snapshot(lsn: Lsn, snapshot: Option<&[u8]>) -> Vec<u8> {
    let body = snapshot.unwrap_or_default();
    let mut v = Vec::with_capacity(9 + body.len());
    v.extend_from_slice(&lsn.to_be_bytes());
    match snapshot {
        Some(s) => {
            v.push(PRESENT);
            v.extend_from_slice(s);
        }
        None => v.push(TOMBSTONE),
    }
    v
}

/// Decodes a snapshot value; an absent key is lsn 0 with no snapshot.
pub(crate) fn decode_snapshot(value: Option<&[u8]>) -> Result<(Lsn, Option<Vec<u8>>)> {
    let Some(value) = value else {
        return Ok((0, None));
    };
    let corrupt = || Error::Corrupt(format!("malformed snapshot value of {} bytes", value.len()));
    if value.len() < 9 {
        return Err(corrupt());
    }
    let lsn = decode_lsn(&value[..8]).ok_or_else(corrupt)?;
    match value[8] {
        PRESENT => Ok((lsn, Some(value[9..].to_vec()))),
        TOMBSTONE if value.len() == 9 => Ok((lsn, None)),
        _ => Err(corrupt()),
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` when no such
/// key exists (the prefix is empty or all `0xff`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn log_keys_of_one_entity_sort_by_lsn() {
        let mut keys: Vec<_> = [5u64, 1, 256, 70_000, u64::MAX, 2]
            .iter()
            .map(|&l| log_key(3, b"sku-1", l))
            .collect();
        keys.sort();
        let lsns: Vec<_> = keys
            .iter()
            .map(|k| decode_log_key(k).unwrap().lsn)
            .collect();
        assert_eq!(lsns, vec![1, 2, 5, 256, 70_000, u64::MAX]);
    }

    #[test]
    fn entity_prefixes_are_free_of_each_other() {
        // "ab" is a byte prefix of "abc", but their log prefixes are not prefixes of each
        // other, nor of any log key of the other entity.
        let short = entity_prefix(LOG, 7, b"ab");
        let long = entity_prefix(LOG, 7, b"abc");
        assert!(!long.starts_with(&short));
        assert!(!short.starts_with(&long));
        for lsn in [0, 1, 0x6300_0000_0000_0000, u64::MAX] {
            assert!(!log_key(7, b"abc", lsn).starts_with(&short));
            assert!(!log_key(7, b"ab", lsn).starts_with(&long));
        }
        // An entity whose bytes look like a length + entity + lsn of another one.
        let tricky = [0u8, 2, b'a', b'b'];
        assert!(!log_key(7, &tricky, 1).starts_with(&short));
    }

    #[test]
    fn partitions_sort_numerically_and_do_not_share_prefixes() {
        let p1 = partition_prefix(LOG, 1);
        let p256 = partition_prefix(LOG, 256);
        assert!(p1 < p256);
        assert!(log_key(1, &[0xff; 300], u64::MAX) < log_key(2, b"", 0));
        assert!(!log_key(256, b"x", 1).starts_with(&p1));
        assert!(log_key(256, b"x", 1).starts_with(&p256));
    }

    #[test]
    fn key_spaces_do_not_overlap() {
        let l = log_key(0, b"", 0);
        let s = snapshot_key(0, b"");
        let a = aux_key(b"");
        assert!(a < HIGH_WATER.to_vec() && HIGH_WATER < &l[..] && l < s);
        assert_eq!(prefix_end(&[LOG]).unwrap(), vec![LOG + 1]);
    }

    #[test]
    fn snapshot_values_round_trip() {
        assert_eq!(decode_snapshot(None).unwrap(), (0, None));
        let v = encode_snapshot(42, Some(b"state"));
        assert_eq!(
            decode_snapshot(Some(&v)).unwrap(),
            (42, Some(b"state".to_vec()))
        );
        let v = encode_snapshot(43, Some(b""));
        assert_eq!(decode_snapshot(Some(&v)).unwrap(), (43, Some(vec![])));
        let t = encode_snapshot(44, None);
        assert_eq!(decode_snapshot(Some(&t)).unwrap(), (44, None));
        assert!(decode_snapshot(Some(&[1, 2, 3])).is_err());
    }

    #[test]
    fn prefix_end_skips_trailing_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(prefix_end(&[]), None);
    }

    #[test]
    fn malformed_log_keys_are_corrupt() {
        assert!(decode_log_key(b"L").is_err());
        let mut k = log_key(1, b"abc", 9);
        k.push(0);
        assert!(decode_log_key(&k).is_err());
        assert!(decode_log_key(&snapshot_key(1, b"abcdefghijkl")).is_err());
    }

    proptest! {
        /// Key order is (partition, entity length, entity, lsn), and decoding inverts encoding.
        #[test]
        fn log_key_order_matches_tuple_order(
            a in (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..6), any::<u64>()),
            b in (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..6), any::<u64>()),
        ) {
            let ka = log_key(a.0, &a.1, a.2);
            let kb = log_key(b.0, &b.1, b.2);
            let ta = (a.0, a.1.len(), &a.1, a.2);
            let tb = (b.0, b.1.len(), &b.1, b.2);
            prop_assert_eq!(ka.cmp(&kb), ta.cmp(&tb));
            let d = decode_log_key(&ka).unwrap();
            prop_assert_eq!(d, LogKey { partition: a.0, entity: &a.1, lsn: a.2 });
            // The entity prefix matches exactly the keys of that entity.
            let pa = entity_prefix(LOG, a.0, &a.1);
            prop_assert_eq!(kb.starts_with(&pa), a.0 == b.0 && a.1 == b.1);
        }
    }
}
