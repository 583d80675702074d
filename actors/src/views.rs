//! Published views: reads of an active entity answered without a message to its actor.
//!
//! A read (`GET` of a SKU, a campaign, an order, a product) used to travel to the
//! partition actor, then to the entity's actor, and back: two mailboxes and a reply
//! channel for a copy of state already in memory. Now an active entity's actor publishes
//! its view here once it is durable, and a read takes it from this map on the caller's
//! own task (ADR 0014).
//!
//! The actor stays the only writer of its state; this map only holds copies, under rules
//! that keep every read as fresh as one the actor would have answered:
//! - A copy is published only from durable state: when the actor answers a command that
//!   writes nothing (a read; refusals publish nothing) with nothing of its own in flight,
//!   or from the log's thread once the write it reflects is durable,
//!   before that write's caller is answered (so a reader after a 201 sees the write).
//!   Until then readers see the state before the write, which is what they would see
//!   had they come a moment earlier: the write is not acknowledged yet.
//! - Every activation and every write takes a fresh sequence number from one counter.
//!   The entry remembers the latest write announced and the number of the copy it holds;
//!   a copy replaces another only if it is newer, so copies never go back in time. The
//!   log makes one entity's writes durable in order, so each write's copy is in place
//!   before its caller is answered, even with several writes in flight.
//! - An actor removes its entry when it stops (passivation, fence, failure); a new
//!   activation clears whatever it finds. The map holds entries of active entities that
//!   were read; idle entities cost nothing here.
//! - A reader takes a copy only while the entity's partition is served here (its gate is
//!   open and the route is local); otherwise it asks, as before.
//! - Only an entity that exists is published: a read of a missing id always asks, so an
//!   order written into another entity's frame (ADR 0013) never has a stale "not found".

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use dashmap::DashMap;

use crate::domain::campaign::CampaignView;
use crate::domain::order::Order;
use crate::domain::product::Product;
use crate::domain::sku::SkuView;
use crate::domain::{Entity, Kind};

/// Sequence numbers of activations and writes, one counter for the node.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_seq() -> u64 {
    NEXT_SEQ.fetch_add(1, Ordering::Relaxed)
}

struct Entry<V> {
    /// The latest activation or write announced by the entity's actor.
    seq: u64,
    /// The sequence number of `view`.
    view_seq: u64,
    /// Where the latest activation started: nothing older is published.
    floor: u64,
    view: Option<Arc<PublishedCopy<V>>>,
}

/// One published copy, shared by its readers.
pub struct PublishedCopy<V> {
    pub view: V,
    /// A rendering of `view` made by the first reader that wants one (the edge's JSON
    /// body) and reused by the others: a new state is a new copy, so it is never stale.
    /// A rendering that also depends on the time keeps, beside it, the tag of what it
    /// showed (see [`PublishedCopy::rendered_as`]). Shared, not copied: every reader's
    /// answer body points at the same bytes.
    pub rendered: OnceLock<(u64, Bytes)>,
}

impl<V> PublishedCopy<V> {
    fn new(view: V) -> Arc<Self> {
        Arc::new(PublishedCopy {
            view,
            rendered: OnceLock::new(),
        })
    }

    /// The copy rendered by `render`, made once and shared.
    pub fn rendered(&self, render: impl FnOnce(&V) -> Vec<u8>) -> Bytes {
        self.rendered_as(0, render)
    }

    /// The copy rendered by `render` as of `tag` (what the rendering shows of the time,
    /// such as a campaign's status): the shared rendering if it was made for the same
    /// tag, otherwise made now (and kept only if none was kept yet).
    pub fn rendered_as(&self, tag: u64, render: impl FnOnce(&V) -> Vec<u8>) -> Bytes {
        match self.rendered.get() {
            Some((t, body)) if *t == tag => body.clone(),
            Some(_) => render(&self.view).into(),
            None => self
                .rendered
                .get_or_init(|| (tag, render(&self.view).into()))
                .1
                .clone(),
        }
    }
}

/// The published copies of one kind, by entity id.
pub struct Published<V> {
    map: DashMap<String, Entry<V>>,
}

impl<V> Default for Published<V> {
    fn default() -> Self {
        Published {
            map: DashMap::new(),
        }
    }
}

impl<V: Clone> Published<V> {
    /// The published copy of `id`, if there is one.
    pub fn get(&self, id: &str) -> Option<V> {
        Some(self.copy(id)?.view.clone())
    }

    /// The published copy of `id` itself, with its rendering slot.
    pub fn copy(&self, id: &str) -> Option<Arc<PublishedCopy<V>>> {
        self.map.get(id)?.view.clone()
    }

    /// From the actor, answering with durable state at `seq`: publishes the copy unless a
    /// current one is there. `make` runs only when a copy is wanted (`None`: the entity
    /// does not exist, nothing is published).
    pub(crate) fn offer(&self, id: &str, seq: u64, make: impl FnOnce() -> Option<V>) {
        if let Some(mut e) = self.map.get_mut(id) {
            let stale = e.view.is_none() || e.view_seq < seq;
            if stale && e.seq <= seq && e.floor <= seq {
                if let Some(v) = make() {
                    e.seq = seq;
                    e.view_seq = seq;
                    e.view = Some(PublishedCopy::new(v));
                }
            }
            return;
        }
        // Only this entity's actor inserts its entry, so nothing can slip in between.
        if let Some(v) = make() {
            self.map.insert(
                id.to_owned(),
                Entry {
                    seq,
                    view_seq: seq,
                    floor: seq,
                    view: Some(PublishedCopy::new(v)),
                },
            );
        }
    }

    /// From the actor, before a write at `seq` is handed to the log. True if the entity
    /// has an entry (someone reads it): its copy must be published once the write is
    /// durable ([`Published::publish_durable`]).
    pub(crate) fn announce(&self, id: &str, seq: u64) -> bool {
        match self.map.get_mut(id) {
            Some(mut e) => {
                e.seq = e.seq.max(seq);
                true
            }
            None => false,
        }
    }

    /// From a new activation: whatever an earlier one published is withdrawn.
    pub(crate) fn reset(&self, id: &str, seq: u64) {
        if let Some(mut e) = self.map.get_mut(id) {
            e.seq = e.seq.max(seq);
            e.floor = e.floor.max(seq);
            e.view = None;
        }
    }

    /// From the log's thread, once the write at `seq` is durable: publishes the state it
    /// left, unless a newer copy is there or a newer activation reset the entry.
    pub(crate) fn publish_durable(&self, id: &str, seq: u64, view: V) {
        if let Some(mut e) = self.map.get_mut(id) {
            let newer = e.view.is_none() || e.view_seq < seq;
            if newer && seq <= e.seq && e.floor <= seq {
                e.view_seq = seq;
                e.view = Some(PublishedCopy::new(view));
            }
        }
    }

    /// From the actor as it stops: removes its entry (not a newer activation's).
    pub(crate) fn remove(&self, id: &str, seq: u64) {
        self.map.remove_if(id, |_, e| e.seq <= seq);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The published copies of every kind that has them.
#[derive(Default)]
pub struct Views {
    sku: Published<Option<SkuView>>,
    campaign: Published<Option<CampaignView>>,
    order: Published<Option<Order>>,
    product: Published<Option<Product>>,
}

impl Views {
    /// The copies of `E`'s kind; `None` for a kind whose reads always ask.
    pub fn of<E: Entity>(&self) -> Option<&Published<E::View>> {
        let any: &dyn Any = match E::KIND {
            Kind::Sku => &self.sku,
            Kind::Campaign => &self.campaign,
            Kind::Order => &self.order,
            Kind::Product => &self.product,
            Kind::Cart | Kind::Idempotency | Kind::Payment => return None,
        };
        any.downcast_ref()
    }

    /// Entries held, all kinds together (active entities that were read).
    pub fn len(&self) -> usize {
        self.sku.len() + self.campaign.len() + self.order.len() + self.product.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_only_move_forward_and_each_write_is_in_place_when_durable() {
        let p: Published<u32> = Published::default();
        // Nobody read it: a write publishes nothing.
        assert!(!p.announce("a", 1));
        p.publish_durable("a", 1, 10);
        assert_eq!(p.get("a"), None);
        // A read at seq 1 publishes.
        p.offer("a", 1, || Some(10));
        assert_eq!(p.get("a"), Some(10));
        // Writes 2 and 3 in flight: readers keep the durable state until each lands.
        assert!(p.announce("a", 2));
        assert!(p.announce("a", 3));
        assert_eq!(p.get("a"), Some(10));
        p.publish_durable("a", 2, 20);
        assert_eq!(p.get("a"), Some(20));
        p.publish_durable("a", 3, 30);
        assert_eq!(p.get("a"), Some(30));
        // A late copy never goes back in time.
        p.publish_durable("a", 2, 20);
        p.offer("a", 2, || Some(20));
        assert_eq!(p.get("a"), Some(30));
        // A new activation resets; the older one's late offer, copy or removal is ignored.
        p.reset("a", 5);
        assert_eq!(p.get("a"), None);
        p.offer("a", 4, || Some(40));
        p.publish_durable("a", 4, 40);
        assert_eq!(p.get("a"), None);
        p.remove("a", 4);
        assert!(!p.is_empty());
        p.offer("a", 5, || Some(50));
        assert_eq!(p.get("a"), Some(50));
        p.remove("a", 5);
        assert!(p.is_empty());
    }

    #[test]
    fn a_rendering_belongs_to_its_copy() {
        let p: Published<u32> = Published::default();
        p.offer("a", 1, || Some(10));
        let render = |v: &u32| v.to_string().into_bytes();
        let first = p.copy("a").unwrap();
        assert_eq!(first.rendered(render), &b"10"[..]);
        // Readers of the same copy share its rendering.
        let again = p.copy("a").unwrap();
        assert_eq!(again.rendered(|_| panic!("rendered twice")), &b"10"[..]);
        // A write's copy starts with none: nobody is served the old body.
        assert!(p.announce("a", 2));
        p.publish_durable("a", 2, 20);
        let second = p.copy("a").unwrap();
        assert_eq!(second.view, 20);
        assert!(second.rendered.get().is_none());
        assert_eq!(second.rendered(render), &b"20"[..]);
        // A rendering made for another tag (another status) is not reused.
        p.offer("t", 3, || Some(30));
        let timed = p.copy("t").unwrap();
        assert_eq!(timed.rendered_as(1, |_| b"live".to_vec()), &b"live"[..]);
        assert_eq!(timed.rendered_as(2, |_| b"ended".to_vec()), &b"ended"[..]);
        assert_eq!(
            timed.rendered_as(1, |_| panic!("rendered twice")),
            &b"live"[..]
        );
    }

    #[test]
    fn a_missing_entity_is_never_published() {
        let p: Published<u32> = Published::default();
        p.offer("gone", 1, || None);
        assert!(p.is_empty());
    }

    #[test]
    fn kinds_without_copies_have_none() {
        use crate::domain::cart::CartState;
        use crate::domain::sku::SkuState;
        let v = Views::default();
        assert!(v.of::<CartState>().is_none());
        assert!(v.of::<SkuState>().is_some());
    }
}
