//! Log segments: append-only files of checksummed frames, one per record.
//!
//! A frame is `len: u32 | crc32(body): u32 | body`, big-endian, where the body is
//! `lsn: u64 | partition: u16 | entity_len: u32 | entity | payload_len: u32 | payload |
//! aux_count: u32 | aux ops`, and an aux op is `kind: u8 (1 put, 0 delete) | key_len: u32
//! | key | [value_len: u32 | value]` (keys are the full storage keys).
//!
//! Segments are named by the first lsn they may hold (`seg-<lsn>.log`, zero-padded so
//! names sort in lsn order). Frames are written with one `write` per group-commit batch
//! and made durable with `fdatasync`. A crash can leave the last segment ending in a
//! partial frame; recovery cuts it off there. A bad frame anywhere else, or one followed
//! by a valid frame, is corruption: start-up refuses and names the file and offset.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{Error, Lsn, Result};

/// No frame may claim more than this (a corrupt length must not allocate gigabytes).
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// One record as read back from a segment.
#[derive(Debug)]
pub(crate) struct Frame {
    pub lsn: Lsn,
    pub partition: u16,
    pub entity: Vec<u8>,
    pub payload: Vec<u8>,
    pub aux: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Other entities' records in the same frame: (partition, entity, payload).
    pub also: Vec<(u16, Vec<u8>, Vec<u8>)>,
}

/// Appends one frame to `out`.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    lsn: Lsn,
    partition: u16,
    entity: &[u8],
    payload: &[u8],
    aux: &[(sled::IVec, Option<sled::IVec>)],
    also: &[(u16, Vec<u8>, sled::IVec)],
) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&lsn.to_be_bytes());
    out.extend_from_slice(&partition.to_be_bytes());
    put_bytes(out, entity);
    put_bytes(out, payload);
    out.extend_from_slice(&(aux.len() as u32).to_be_bytes());
    for (k, v) in aux {
        out.push(u8::from(v.is_some()));
        put_bytes(out, k);
        if let Some(v) = v {
            put_bytes(out, v);
        }
    }
    // Frames without other entities end here, as frames always did: older logs read the
    // same, and a reader that predates the section refuses it instead of dropping it.
    if !also.is_empty() {
        out.extend_from_slice(&(also.len() as u32).to_be_bytes());
        for (partition, entity, payload) in also {
            out.extend_from_slice(&partition.to_be_bytes());
            put_bytes(out, entity);
            put_bytes(out, payload);
        }
    }
    let body_len = (out.len() - start - 8) as u32;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&body_len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Decodes a frame body (after its length and checksum were checked).
fn decode_body(body: &[u8]) -> Option<Frame> {
    let mut r = body;
    let lsn = Lsn::from_be_bytes(take(&mut r, 8)?.try_into().ok()?);
    let partition = u16::from_be_bytes(take(&mut r, 2)?.try_into().ok()?);
    let entity = take_bytes(&mut r)?.to_vec();
    let payload = take_bytes(&mut r)?.to_vec();
    let n = take_u32(&mut r)?;
    let mut aux = Vec::with_capacity((n as usize).min(1024));
    for _ in 0..n {
        let kind = *take(&mut r, 1)?.first()?;
        let key = take_bytes(&mut r)?.to_vec();
        let value = match kind {
            1 => Some(take_bytes(&mut r)?.to_vec()),
            0 => None,
            _ => return None,
        };
        aux.push((key, value));
    }
    let mut also = Vec::new();
    if !r.is_empty() {
        let n = take_u32(&mut r)?;
        for _ in 0..n {
            let partition = u16::from_be_bytes(take(&mut r, 2)?.try_into().ok()?);
            let entity = take_bytes(&mut r)?.to_vec();
            let payload = take_bytes(&mut r)?.to_vec();
            also.push((partition, entity, payload));
        }
    }
    r.is_empty().then_some(Frame {
        lsn,
        partition,
        entity,
        payload,
        aux,
        also,
    })
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if r.len() < n {
        return None;
    }
    let (head, rest) = r.split_at(n);
    *r = rest;
    Some(head)
}

fn take_u32(r: &mut &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(take(r, 4)?.try_into().ok()?))
}

fn take_bytes<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = take_u32(r)? as usize;
    take(r, n)
}

pub(crate) fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("seg-{first_lsn:020}.log"))
}

/// The segments in `dir`, in lsn order, with the first lsn their name gives.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(lsn) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<Lsn>().ok())
        {
            out.push((lsn, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Creates an empty segment (and makes its directory entry durable).
pub(crate) fn create_segment(dir: &Path, first_lsn: Lsn) -> Result<File> {
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(segment_path(dir, first_lsn))?;
    sync_dir(dir)?;
    Ok(file)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads every frame of a segment in order, calling `each` for each. A partial or bad
/// frame ends the read: if `last` and nothing valid follows it, the file is cut back to
/// the end of the last good frame (a write the crash interrupted); otherwise it is
/// corruption, and the frames after it may have been acknowledged, so nothing is cut.
pub(crate) fn read_segment(
    path: &Path,
    last: bool,
    mut each: impl FnMut(Frame) -> Result<()>,
) -> Result<()> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut good: u64 = 0;
    let mut last_lsn: Lsn = 0;
    let mut header = [0u8; 8];
    let mut body = Vec::new();
    let bad = loop {
        if good == size {
            break None;
        }
        if reader.read_exact(&mut header).is_err() {
            break Some("a partial frame header");
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_FRAME || good + 8 + u64::from(len) > size {
            break Some("a frame running past the end of the file");
        }
        body.resize(len as usize, 0);
        if reader.read_exact(&mut body).is_err() {
            break Some("a partial frame");
        }
        if crc32fast::hash(&body) != crc {
            break Some("a frame with a bad checksum");
        }
        let Some(frame) = decode_body(&body) else {
            break Some("a frame that does not decode");
        };
        last_lsn = frame.lsn;
        each(frame)?;
        good += 8 + u64::from(len);
    };
    if let Some(what) = bad {
        if !last {
            return Err(Error::Corrupt(format!(
                "{} holds {what} at offset {good}",
                path.display()
            )));
        }
        // A crash leaves a torn write only at the very end: a valid later frame means
        // this one was damaged after it was written, and what follows was acknowledged.
        let mut rest = Vec::new();
        let mut file = File::open(path)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(good))?;
        file.read_to_end(&mut rest)?;
        if let Some((at, lsn)) = valid_frame_after(&rest, last_lsn) {
            return Err(Error::Corrupt(format!(
                "{} holds {what} at offset {good}, followed by a valid frame (lsn {lsn}) at \
                 offset {}: records after the damage may have been acknowledged, so the log \
                 is not cut; see docs/operations.md, \"A damaged log\"",
                path.display(),
                good + at as u64
            )));
        }
        tracing::warn!(segment = %path.display(), offset = good, "cutting off {what} left by a crash");
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(good)?;
        file.sync_all()?;
    }
    Ok(())
}

/// The offset in `bytes` (after its first byte) and the lsn of the first whole frame
/// that checks, decodes and comes after `after`.
fn valid_frame_after(bytes: &[u8], after: Lsn) -> Option<(usize, Lsn)> {
    (1..bytes.len().saturating_sub(8)).find_map(|at| {
        let header = &bytes[at..at + 8];
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        let body = bytes.get(at + 8..(at + 8).checked_add(len)?)?;
        if len == 0 || crc32fast::hash(body) != crc {
            return None;
        }
        let frame = decode_body(body)?;
        (frame.lsn > after).then_some((at, frame.lsn))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn frame_bytes(lsn: Lsn) -> Vec<u8> {
        let mut out = Vec::new();
        let aux = vec![
            (
                sled::IVec::from(&b"Akey"[..]),
                Some(sled::IVec::from(&b"v"[..])),
            ),
            (sled::IVec::from(&b"Agone"[..]), None),
        ];
        encode_frame(&mut out, lsn, 7, b"ent", b"payload", &aux, &[]);
        out
    }

    #[test]
    fn frames_round_trip_and_a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut bytes = frame_bytes(1);
        bytes.extend(frame_bytes(2));
        let whole = bytes.len() as u64;
        bytes.extend(&frame_bytes(3)[..10]);
        File::create(&path).unwrap().write_all(&bytes).unwrap();

        let mut seen = Vec::new();
        read_segment(&path, true, |f| {
            assert_eq!(
                (f.partition, &f.entity[..], &f.payload[..]),
                (7, &b"ent"[..], &b"payload"[..])
            );
            assert_eq!(
                f.aux,
                vec![
                    (b"Akey".to_vec(), Some(b"v".to_vec())),
                    (b"Agone".to_vec(), None)
                ]
            );
            seen.push(f.lsn);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
    }

    #[test]
    fn a_damaged_frame_with_valid_frames_after_it_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut bytes = frame_bytes(1);
        let second = bytes.len();
        bytes.extend(frame_bytes(2));
        bytes[second + 12] ^= 0xff;
        let third = bytes.len();
        bytes.extend(frame_bytes(3));
        let size = bytes.len() as u64;
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        let mut seen = Vec::new();
        let err = read_segment(&path, true, |f| {
            seen.push(f.lsn);
            Ok(())
        })
        .unwrap_err();
        let Error::Corrupt(why) = err else {
            panic!("not corruption: {err}")
        };
        assert!(
            why.contains(&format!("at offset {second}"))
                && why.contains(&format!("(lsn 3) at offset {third}")),
            "{why}"
        );
        assert_eq!(seen, vec![1]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            size,
            "nothing is cut"
        );
    }

    #[test]
    fn a_bad_frame_before_the_last_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 1);
        let mut bytes = frame_bytes(1);
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        assert!(matches!(
            read_segment(&path, false, |_| Ok(())),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(list_segments(dir.path()).unwrap(), vec![(1, path)]);
    }

    #[test]
    fn a_frame_carries_other_entities_and_its_bytes_are_pinned() {
        let mut out = Vec::new();
        let also = vec![(3u16, b"o1".to_vec(), sled::IVec::from(&b"placed"[..]))];
        encode_frame(&mut out, 9, 7, b"c", b"bought", &[], &also);
        // A change of this layout makes existing logs unreadable: never edit it, only
        // add a section after the last one.
        let golden: &[u8] = &[
            0, 0, 0, 51, // body length
            0x16, 0x2d, 0x77, 0x69, // crc32 of the body
            0, 0, 0, 0, 0, 0, 0, 9, // lsn
            0, 7, // partition
            0, 0, 0, 1, b'c', // entity
            0, 0, 0, 6, b'b', b'o', b'u', b'g', b'h', b't', // payload
            0, 0, 0, 0, // no aux changes
            0, 0, 0, 1, // one other entity
            0, 3, // its partition
            0, 0, 0, 2, b'o', b'1', // its entity
            0, 0, 0, 6, b'p', b'l', b'a', b'c', b'e', b'd', // its payload
        ];
        assert_eq!(out, golden);
        let frame = decode_body(&out[8..]).unwrap();
        assert_eq!(frame.also, vec![(3, b"o1".to_vec(), b"placed".to_vec())]);
        assert_eq!((frame.lsn, &frame.payload[..]), (9, &b"bought"[..]));
        // A truncated section does not decode.
        assert!(decode_body(&out[8..out.len() - 1]).is_none());
    }
}
