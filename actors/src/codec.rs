//! The record codec: a format version byte, then bincode 2 (serde, standard config).
//!
//! A log record holds every event one command produced, so a command's events are durable
//! together or not at all. Snapshots hold a whole entity state. Event enums only ever get
//! new variants appended: bincode encodes variants by position.

use serde::{de::DeserializeOwned, Serialize};

use crate::domain::Entity;

/// The version byte of the current layout.
pub const FORMAT_V1: u8 = 1;

/// The most memory one decode may claim. A damaged record whose length prefixes claim
/// more is refused instead of aborting the process on an allocation it cannot make; a
/// real record is far below it (the largest, a campaign with a million buyers, is about
/// 600 MB in memory).
pub const DECODE_LIMIT: usize = 4 << 30;

/// bincode's standard configuration with [`DECODE_LIMIT`].
pub fn decode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DECODE_LIMIT>,
> {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode: {0}")]
    Decode(String),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![FORMAT_V1];
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_V1 {
        return Err(CodecError::UnknownVersion(version));
    }
    let (value, _) = bincode::serde::decode_from_slice(body, decode_config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    Ok(value)
}

/// Decodes an entity's snapshot, in the current layout or an earlier one the entity still
/// reads ([`Entity::legacy_snapshot`]).
pub fn decode_state<E: Entity>(bytes: &[u8]) -> Result<E, CodecError> {
    match decode(bytes) {
        Ok(state) => Ok(state),
        Err(e) => bytes
            .get(1..)
            .filter(|_| bytes.first() == Some(&FORMAT_V1))
            .and_then(E::legacy_snapshot)
            .ok_or(e),
    }
}

/// Rebuilds an entity from its snapshot (if any) and the events logged after it.
pub fn rebuild<E: Entity>(
    snapshot: Option<&[u8]>,
    tail: impl IntoIterator<Item = impl AsRef<[u8]>>,
) -> Result<E, CodecError> {
    let mut state: E = match snapshot {
        Some(bytes) => decode_state(bytes)?,
        None => E::default(),
    };
    for record in tail {
        let events: Vec<E::Event> = decode(record.as_ref())?;
        for event in &events {
            state.apply(event);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_versions_and_garbage() {
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<u64>(&[9, 1]),
            Err(CodecError::UnknownVersion(9))
        ));
        assert!(matches!(
            decode::<String>(&[1, 200]),
            Err(CodecError::Decode(_))
        ));
        assert_eq!(decode::<u64>(&encode(&42u64).unwrap()).unwrap(), 42);
    }

    /// A dozen bytes claiming a string of a terabyte: refused, not an allocation that
    /// aborts the process.
    #[test]
    fn a_length_claiming_more_than_the_limit_is_refused() {
        let mut record = vec![FORMAT_V1, 253];
        record.extend_from_slice(&(1u64 << 40).to_le_bytes());
        record.extend_from_slice(b"abc");
        assert!(matches!(
            decode::<String>(&record),
            Err(CodecError::Decode(_))
        ));
        assert!(matches!(
            decode::<Vec<u64>>(&record),
            Err(CodecError::Decode(_))
        ));
    }
}
