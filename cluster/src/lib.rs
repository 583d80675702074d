//! The cluster: which node owns which partition (the cluster map, agreed through
//! consensus), how nodes talk (a request/answer transport: QUIC between processes, in
//! memory in tests), how an entity command reaches the node that owns its partition, and
//! how a partition moves from one node to another.
//!
//! Dependencies point one way: this crate drives `shardmall-actors` (through its
//! [`shardmall_actors::route::Router`] hook) and knows nothing of HTTP.

pub mod group;
pub mod map;
pub mod memory;
pub mod node;
pub mod placement;
pub mod proto;
pub mod quic;
pub mod raft;
pub mod replica;
pub mod router;
pub mod serving;
pub mod transport;

pub use map::{ClusterMap, MapCommand, Member, MemberStatus, NodeId};
pub use router::ClusterRouter;
pub use transport::{BoxFuture, Service, Transport, TransportError};
