//! The domain of shardmall and the actors that host it.
//!
//! - [`domain`]: pure state machines (product, SKU, cart, order, idempotency record):
//!   `decide` a command into events, `apply` events to state. No I/O.
//! - [`host`]: the ractor actor hosting one entity: decide -> append to the log -> apply
//!   -> answer once durable.
//! - [`partition`]: one actor per partition: the registry of active entities (activation,
//!   passivation, supervision) and the partition's timer wheel.
//! - [`shop`]: the operations the edge calls, including the multi-entity sagas
//!   (checkout, payment, cancel, refund) and the checkpointer.
//! - [`keys`], [`ids`], [`codec`]: entity keys and partitions, order ids, record format.
//! - [`kinds`]: the one table of entity kinds and their state types, and what is
//!   generated from it (the envelope a partition routes, the handle of any entity actor,
//!   dispatch on a kind known at run time).
//! - [`clock`]: business time, the system clock or a manual one in tests.
//!
//! A request flows: edge -> [`Shop`] -> the entity's partition actor -> the entity actor
//! -> the write-ahead log (group commit) -> answer.

pub mod board;
pub mod clock;
pub mod codec;
pub mod domain;
pub mod error;
mod errors_map;
pub mod gate;
pub mod handoff;
pub mod host;
pub mod ids;
pub mod keys;
pub mod kinds;
pub mod metrics;
pub mod partition;
pub mod route;
pub mod shop;
pub mod views;

pub use clock::{Clock, Hand};
pub use error::{Result, ShopError};
pub use shop::campaigns::{self, Bought, NewCampaign};
pub use shop::{
    AnswerInFrame, Begun, CartLine, IdemStart, NewProduct, NewSku, Page, ProductDetail, Shop,
    ShopConfig,
};
