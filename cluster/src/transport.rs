//! The node-to-node transport: one request frame, one answer frame.
//!
//! Frames are opaque bytes here; [`crate::proto`] gives them meaning. A transport only
//! moves them: between processes over QUIC (`crate::quic`), or within one process in
//! tests ([`crate::memory`]), where every frame is still serialized, so a test exercises
//! the same encoding as a real cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (the transport traits are object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Largest frame either side accepts. A partition's checkpoint travels as one frame, so
/// this bounds the data one partition may hold (see docs/operations.md, sizing).
pub const MAX_FRAME: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made, or it broke before the answer arrived.
    #[error("peer {peer} unreachable: {why}")]
    Unreachable { peer: String, why: String },
    /// The peer did not answer within the call's deadline.
    #[error("peer {peer} did not answer in time")]
    Timeout { peer: String },
    /// The peer would not talk to us (it did not accept our proof of membership), or we
    /// would not accept its.
    #[error("peer {peer} refused: {why}")]
    Refused { peer: String, why: String },
    /// A frame over [`MAX_FRAME`] or otherwise malformed.
    #[error("bad frame: {0}")]
    Frame(String),
}

impl TransportError {
    pub fn peer_unreachable(peer: impl Into<String>, why: impl std::fmt::Display) -> Self {
        TransportError::Unreachable {
            peer: peer.into(),
            why: why.to_string(),
        }
    }
}

/// Sends a request frame to the peer at `to` (its cluster address) and waits for its
/// answer frame.
pub trait Transport: Send + Sync + 'static {
    fn call(&self, to: &str, frame: Vec<u8>)
        -> BoxFuture<'static, Result<Vec<u8>, TransportError>>;

    /// Like [`Transport::call`], for a request that legitimately runs long (a partition
    /// handoff): waits up to `timeout` instead of the transport's usual call timeout. A
    /// transport without a timeout of its own just calls.
    fn call_for(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: std::time::Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let _ = timeout;
        self.call(to, frame)
    }

    /// Like [`Transport::call_for`] (`None`: the usual call timeout), for an entity
    /// command: a transport may hold it a moment to send it together with others to the
    /// same peer (the QUIC transport batches such calls, see `crate::quic`).
    fn call_batched(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: Option<std::time::Duration>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        match timeout {
            Some(t) => self.call_for(to, frame, t),
            None => self.call(to, frame),
        }
    }
}

/// What answers the frames a node receives.
pub trait Service: Send + Sync + 'static {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
}

impl<T: Transport + ?Sized> Transport for Arc<T> {
    fn call(
        &self,
        to: &str,
        frame: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        (**self).call(to, frame)
    }

    fn call_for(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: std::time::Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        (**self).call_for(to, frame, timeout)
    }

    fn call_batched(
        &self,
        to: &str,
        frame: Vec<u8>,
        timeout: Option<std::time::Duration>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        (**self).call_batched(to, frame, timeout)
    }
}
