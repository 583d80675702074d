//! Order ids: fixed-width, sortable by creation time, unique across the cluster, and
//! carrying the buyer's partition so any node routes an order id without a lookup.
//!
//! Layout (29 characters, `[0-9a-f]` after a leading `o`): `o`, then 12 hex digits of
//! milliseconds since the Unix epoch, 4 of partition, 4 of node tag, and 8 of a
//! per-process sequence.
//!
//! Unlike a seconds + machine + 3-digit sequence scheme, a node can mint 2^32 ids per
//! millisecond per process, far beyond any flash sale.

use std::sync::atomic::{AtomicU32, Ordering};

pub const ORDER_ID_LEN: usize = 29;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderId {
    pub millis: u64,
    pub partition: u16,
    pub node: u16,
    pub seq: u32,
}

impl OrderId {
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != ORDER_ID_LEN || b[0] != b'o' {
            return None;
        }
        let hex = &s[1..];
        if !hex
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            return None;
        }
        Some(Self {
            millis: u64::from_str_radix(&hex[0..12], 16).ok()?,
            partition: u16::from_str_radix(&hex[12..16], 16).ok()?,
            node: u16::from_str_radix(&hex[16..20], 16).ok()?,
            seq: u32::from_str_radix(&hex[20..28], 16).ok()?,
        })
    }
}

impl std::fmt::Display for OrderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "o{:012x}{:04x}{:04x}{:08x}",
            self.millis & 0xffff_ffff_ffff,
            self.partition,
            self.node,
            self.seq
        )
    }
}

/// Mints order ids for one node process.
#[derive(Debug)]
pub struct OrderIdGen {
    node: u16,
    // A plain atomic counter: ids need uniqueness, not a lock. Wrapping after 2^32 ids in
    // one millisecond is not reachable.
    seq: AtomicU32,
}

impl OrderIdGen {
    pub fn new(node: u16) -> Self {
        Self {
            node,
            seq: AtomicU32::new(rand::random::<u32>() >> 4),
        }
    }

    pub fn next(&self, now_ms: u64, partition: u16) -> OrderId {
        OrderId {
            millis: now_ms,
            partition,
            node: self.node,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let g = OrderIdGen::new(7);
        let a = g.next(1_700_000_000_000, 42);
        let b = g.next(1_700_000_000_001, 3);
        let (sa, sb) = (a.to_string(), b.to_string());
        assert_eq!(sa.len(), ORDER_ID_LEN);
        assert_eq!(OrderId::parse(&sa), Some(a));
        assert!(sa < sb, "ids sort by time");
        assert_eq!(OrderId::parse("o123"), None);
        assert_eq!(OrderId::parse(&sa.replace('o', "x")), None);
        assert_eq!(OrderId::parse("oZZZZZZZZZZZZZZZZZZZZZZZZZZZZ"), None);
    }
}
