//! Layout of the store's sled tree (the log itself lives in segment files, see
//! [`crate::segment`]). The first byte names the key space:
//!
//! * `S` + partition (u16 BE) + entity length (u16 BE) + entity -> lsn (u64 BE) + tag +
//!   snapshot bytes. The length field makes entity keys free of each other: entity `ab`
//!   never shares a prefix with entity `abc`. The
//!   lsn is the last record folded in; tag 0 is a tombstone (the fold deleted the
//!   snapshot), kept so that the lsn of an entity's snapshot only ever grows, which is what
//!   [`crate::Wal::load_entity`] checks to detect a racing checkpoint.
//! * `A` + user key -> auxiliary value.
//! * `H` -> an lsn at least as high as any in a released segment (u64 BE), written before
//!   segments are deleted, so the lsn counter survives restarts even when every segment
//!   holding the highest lsns is gone. Every record up to it has its aux changes on disk.
//! * `F` -> the lowest lsn not yet folded into a snapshot when the store was last flushed
//!   (u64 BE): replay skips the records below it without looking up their snapshots.

use crate::{Error, Lsn, Result};

pub(crate) const SNAPSHOT: u8 = b'S';
pub(crate) const AUX: u8 = b'A';
pub(crate) const HIGH_WATER: &[u8] = b"H";
pub(crate) const FOLDED: &[u8] = b"F";

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

/// `space` + partition + entity length + entity.
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

pub(crate) fn snapshot_key(partition: u16, entity: &[u8]) -> Vec<u8> {
    entity_prefix(SNAPSHOT, partition, entity)
}

pub(crate) fn aux_key(user: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user.len());
    k.push(AUX);
    k.extend_from_slice(user);
    k
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

    #[test]
    fn entity_keys_are_free_of_each_other() {
        // "ab" is a byte prefix of "abc", but their keys are not prefixes of each other.
        let short = snapshot_key(7, b"ab");
        let long = snapshot_key(7, b"abc");
        assert!(!long.starts_with(&short));
        assert!(!short.starts_with(&long));
        assert!(snapshot_key(1, &[0xff; 300]) < snapshot_key(2, b""));
    }

    #[test]
    fn key_spaces_do_not_overlap() {
        let s = snapshot_key(0, b"");
        let a = aux_key(b"");
        assert!(a < HIGH_WATER.to_vec() && HIGH_WATER < &s[..]);
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
}
