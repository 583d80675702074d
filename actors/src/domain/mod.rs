//! The pure core: one synchronous state machine per entity kind.
//!
//! Every entity follows the same shape: `decide` validates a command against the current
//! state and produces events without touching anything; `apply` folds one event into the
//! state. Replaying the same events onto `Default::default()` MUST rebuild the same state,
//! so `apply` never looks at a clock or at anything but its arguments.

pub mod campaign;
pub mod cart;
pub mod common;
pub mod idempotency;
pub mod order;
pub mod payment;
pub mod product;
pub mod sku;

use serde::{de::DeserializeOwned, Serialize};

pub use common::{Address, Millis, Money, ProductStatus};

/// The kinds of entity; the discriminant is part of every entity key on disk.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub enum Kind {
    Product = 1,
    Sku = 2,
    Cart = 3,
    Order = 4,
    Idempotency = 5,
    Payment = 6,
    Campaign = 7,
}

/// One entity's state machine.
pub trait Entity: Default + Clone + Send + Sync + Serialize + DeserializeOwned + 'static {
    /// Commands, answers and errors are serializable: a command may be served by the
    /// node that owns the entity's partition, not the one that received the request.
    type Command: Send + Sync + Clone + Serialize + DeserializeOwned + std::fmt::Debug + 'static;
    type Event: Serialize + DeserializeOwned + Send + Sync + Clone + std::fmt::Debug + 'static;
    type Error: Send + Clone + Serialize + DeserializeOwned + std::fmt::Debug + 'static;
    /// What a caller gets back after a command: a compact copy of the state.
    type View: Send + Clone + Serialize + DeserializeOwned + std::fmt::Debug + 'static;

    const KIND: Kind;

    /// Validates `cmd` against the current state at time `now` (ms since the Unix epoch).
    /// Pure: no I/O, no clock. `Ok(vec![])` means "accepted, nothing changes".
    fn decide(&self, cmd: &Self::Command, now: Millis) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one event into the state. MUST be deterministic.
    fn apply(&mut self, event: &Self::Event);

    /// The compact copy returned to callers.
    fn view(&self) -> Self::View;

    /// The answer to `cmd` once it is applied: [`view`](Self::view) unless the command
    /// asks for more (a campaign buy answers with the order it opened).
    fn answer(&self, _cmd: &Self::Command) -> Self::View {
        self.view()
    }

    /// Decodes a snapshot body (after the format byte) written in an earlier layout of
    /// this state, for kinds whose state layout has changed; `None` if it is not one.
    fn legacy_snapshot(_body: &[u8]) -> Option<Self> {
        None
    }

    /// The earliest instant this entity wants its timer command, derived from state.
    fn next_deadline(&self) -> Option<Millis> {
        None
    }

    /// The state as a read of the entity (`Get`) answers it, when this kind's reads may
    /// be served from a published copy (see `crate::views`): `None` for other kinds and
    /// for an entity that does not exist.
    fn published(&self) -> Option<Self::View> {
        None
    }

    /// Secondary index entries this state contributes (key -> value), derived from state.
    /// The host diffs them before and after each command and persists the difference
    /// atomically with the events.
    fn index_entries(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        Vec::new()
    }
}
