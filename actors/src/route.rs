//! Where an entity command goes: to this node's partition actor, or to the node that owns
//! the partition. The shop asks a [`Router`] (the cluster implements it); without one,
//! every partition is served here.
//!
//! Remote calls carry the command and its answer as bytes (bincode 2, serde), so this
//! crate stays free of any transport.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::domain::Kind;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a partition is served now, as this node's copy of the cluster map says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Local,
    Remote,
    /// No node can serve it now (the map is not known yet, or its owner is gone).
    Unavailable(String),
}

/// One entity command on its way to another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteCall {
    pub partition: u16,
    pub kind: Kind,
    pub id: String,
    /// The command, encoded.
    pub cmd: Vec<u8>,
}

/// The owner's answer to a [`RemoteCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RemoteAnswer {
    /// The entity's answer (`Result<View, Error>`), encoded.
    Reply(Vec<u8>),
    /// This node does not own the partition at `epoch` (its map's): refresh and retry.
    WrongOwner {
        epoch: u64,
    },
    /// The partition is being handed over: retry shortly.
    Moving,
    Unavailable(String),
    Overloaded(String),
    /// The call could not be decoded.
    Malformed(String),
    /// A replicated cluster: this node does not lead the partition's replica group;
    /// `leader` is the one it knows of (routes go there next).
    NotLeader {
        leader: Option<u64>,
    },
}

/// Why a forwarded call produced no entity answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardError {
    /// The partition moved or is moving: route again (after the router refreshed).
    Moved,
    Unavailable(String),
    Overloaded(String),
    /// The owner could not read the call (a node of an older release that does not know
    /// the command): nothing was done there.
    Unreadable(String),
}

/// What a list asks of an index: keys under `prefix` after (or, `reverse`, before)
/// `cursor`, whose value passes `filter`, at most `limit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanRequest {
    pub prefix: Vec<u8>,
    /// The kind of the entities the index lists (their ids decide their partition).
    pub kind: Kind,
    pub cursor: Option<String>,
    pub reverse: bool,
    pub limit: usize,
    pub filter: IndexFilter,
    /// Every listed entity lives in this partition (one buyer's orders): ask only its
    /// owner.
    pub partition: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexFilter {
    All,
    /// The index value equals this.
    ValueIs(Vec<u8>),
    /// Field `field` of the `\0`-separated index value equals this.
    FieldIs {
        field: usize,
        value: Vec<u8>,
    },
}

impl IndexFilter {
    pub fn keeps(&self, value: &[u8]) -> bool {
        match self {
            IndexFilter::All => true,
            IndexFilter::ValueIs(v) => v == value,
            IndexFilter::FieldIs { field, value: want } => {
                value.split(|b| *b == 0).nth(*field).unwrap_or_default() == want.as_slice()
            }
        }
    }
}

/// Ids in index order, and whether the node has more past the last one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScanPage {
    pub ids: Vec<String>,
    pub more: bool,
}

/// The cluster's side of routing.
pub trait Router: Send + Sync + 'static {
    fn route(&self, partition: u16) -> Route;

    /// Sends the call to the partition's owner and returns the entity's answer bytes.
    fn forward(&self, call: RemoteCall) -> BoxFuture<'static, Result<Vec<u8>, ForwardError>>;

    /// The pages of the other nodes that must answer `req` (all members, or only the
    /// owner of `req.partition` when that is another node).
    fn scan_others(
        &self,
        req: ScanRequest,
    ) -> BoxFuture<'static, Result<Vec<ScanPage>, ForwardError>>;
}
