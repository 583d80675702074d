//! Entity keys and their partitions.
//!
//! An entity key is (kind, id). Its partition is a stable 64-bit hash (xxh3, a published
//! algorithm whose output never changes between Rust releases) modulo the partition count
//! fixed when the node's data was created. Carts, orders and idempotency records hash by
//! their buyer, so everything of one buyer lives in one partition; order ids carry that
//! partition so any node can route an order id without a lookup.

use crate::domain::Kind;
use crate::ids::OrderId;

/// The partition count a new data set gets unless configured otherwise.
pub const DEFAULT_PARTITIONS: u16 = 256;

/// (kind, id) of one entity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    pub kind: Kind,
    pub id: String,
}

impl EntityKey {
    pub fn new(kind: Kind, id: impl Into<String>) -> Self {
        Self {
            kind,
            id: id.into(),
        }
    }

    /// The bytes this key has on disk: the kind's discriminant, then the id.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.id.len());
        out.push(self.kind as u8);
        out.extend_from_slice(self.id.as_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (&tag, rest) = bytes.split_first()?;
        let kind = kind_from_u8(tag)?;
        let id = std::str::from_utf8(rest).ok()?.to_owned();
        Some(Self { kind, id })
    }
}

pub fn kind_from_u8(tag: u8) -> Option<Kind> {
    Some(match tag {
        1 => Kind::Product,
        2 => Kind::Sku,
        3 => Kind::Cart,
        4 => Kind::Order,
        5 => Kind::Idempotency,
        6 => Kind::Payment,
        7 => Kind::Campaign,
        _ => return None,
    })
}

/// Maps entity keys to partitions. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioner {
    count: u16,
}

impl Partitioner {
    pub fn new(count: u16) -> Self {
        assert!(count > 0, "a partition count is at least 1");
        Self { count }
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The partition of entities keyed by their own id (products, SKUs, payment claims):
    /// hash of the kind and id.
    pub fn catalog(&self, kind: Kind, id: &str) -> u16 {
        self.hash(kind as u8, id)
    }

    /// The partition of everything one buyer owns (cart, orders, idempotency records).
    pub fn buyer(&self, buyer: &str) -> u16 {
        self.hash(b'b', buyer)
    }

    /// The partition an entity lives in. An order's partition is read from its id; an
    /// order id that does not parse has no partition (it cannot exist).
    pub fn of(&self, key: &EntityKey) -> Option<u16> {
        self.of_id(key.kind, &key.id)
    }

    /// [`Partitioner::of`] the entity `id` of `kind`.
    pub fn of_id(&self, kind: Kind, id: &str) -> Option<u16> {
        match kind {
            Kind::Product | Kind::Sku | Kind::Payment | Kind::Campaign => {
                Some(self.catalog(kind, id))
            }
            Kind::Cart => Some(self.buyer(id)),
            Kind::Idempotency => Some(self.buyer(crate::domain::idempotency::idem_subject(id))),
            Kind::Order => OrderId::parse(id)
                .map(|id| id.partition)
                .filter(|p| *p < self.count),
        }
    }

    fn hash(&self, tag: u8, id: &str) -> u16 {
        let mut bytes = Vec::with_capacity(1 + id.len());
        bytes.push(tag);
        bytes.extend_from_slice(id.as_bytes());
        (xxhash_rust::xxh3::xxh3_64(&bytes) % u64::from(self.count)) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_hash_is_pinned() {
        // These figures MUST never change: data on disk and other nodes rely on them.
        let p = Partitioner::new(256);
        assert_eq!(p.catalog(Kind::Sku, "sku-1"), p.catalog(Kind::Sku, "sku-1"));
        let pinned = [
            p.catalog(Kind::Sku, "sku-1"),
            p.catalog(Kind::Product, "p-1"),
            p.buyer("alice"),
        ];
        assert_eq!(pinned, [35, 3, 250]);
    }

    #[test]
    fn key_bytes_round_trip() {
        let k = EntityKey::new(Kind::Order, "abc");
        assert_eq!(EntityKey::from_bytes(&k.to_bytes()), Some(k));
        assert_eq!(EntityKey::from_bytes(&[]), None);
        assert_eq!(EntityKey::from_bytes(&[99, b'a']), None);
    }
}
