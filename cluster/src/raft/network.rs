//! Consensus messages over the node-to-node [`Transport`]: every raft RPC is one
//! [`Request::Raft`](crate::proto::Request::Raft) frame whose body is a [`RaftMsg`].

// The error types are openraft's, fixed by the traits implemented here.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tokio::sync::watch;

use super::{Envelope, NodeIdOf, RaftMsg, RaftReply, TypeConfig};
use crate::map::ClusterMap;
use crate::proto::{self, Request, Response};
use crate::transport::Transport;

/// Makes a client per peer.
pub(crate) struct Network {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) map: watch::Receiver<Arc<ClusterMap>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeIdOf, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            map: self.map.clone(),
        }
    }
}

pub(crate) struct Peer {
    target: NodeIdOf,
    /// The address consensus recorded when the peer joined. The map's member entry wins
    /// when there is one: a node that restarts on a new address updates only the map.
    addr: String,
    transport: Arc<dyn Transport>,
    map: watch::Receiver<Arc<ClusterMap>>,
}

type RpcError<E = openraft::error::Infallible> =
    RPCError<NodeIdOf, BasicNode, RaftError<NodeIdOf, E>>;

impl Peer {
    /// The peer's address and incarnation, as the map has them.
    fn address(&self) -> (String, u64) {
        self.map
            .borrow()
            .members
            .get(&self.target)
            .map(|m| (m.cluster_addr.clone(), m.incarnation))
            .unwrap_or_else(|| (self.addr.clone(), 0))
    }

    async fn send<E: std::error::Error>(
        &self,
        msg: RaftMsg,
        option: &RPCOption,
    ) -> Result<RaftReply, RPCError<NodeIdOf, BasicNode, RaftError<NodeIdOf, E>>> {
        let (addr, incarnation) = self.address();
        let msg = Envelope { incarnation, msg };
        call(&*self.transport, &addr, &msg, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

/// Sends one consensus message and waits for its answer.
pub(crate) async fn call(
    transport: &dyn Transport,
    to: &str,
    msg: &Envelope,
    timeout: std::time::Duration,
) -> Result<RaftReply, std::io::Error> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    let frame = proto::encode(&Request::Raft(body));
    let answer = tokio::time::timeout(timeout, transport.call(to, frame))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{to} did not answer in time"),
            )
        })?
        .map_err(std::io::Error::other)?;
    match proto::decode::<Response>(&answer).map_err(std::io::Error::other)? {
        Response::Raft(body) => serde_json::from_slice(&body).map_err(std::io::Error::other),
        Response::Error(e) => Err(std::io::Error::other(e)),
        other => Err(std::io::Error::other(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

fn unexpected<E: std::error::Error>(
    target: NodeIdOf,
    reply: RaftReply,
) -> RPCError<NodeIdOf, BasicNode, RaftError<NodeIdOf, E>> {
    let _ = target;
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
        "unexpected consensus answer: {reply:?}"
    ))))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeIdOf>, RpcError> {
        match self.send(RaftMsg::Append(rpc), &option).await? {
            RaftReply::Append(Ok(r)) => Ok(r),
            RaftReply::Append(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(self.target, other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeIdOf>, RpcError<InstallSnapshotError>> {
        match self.send(RaftMsg::Snapshot(rpc), &option).await? {
            RaftReply::Snapshot(Ok(r)) => Ok(r),
            RaftReply::Snapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(self.target, other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeIdOf>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeIdOf>, RpcError> {
        match self.send(RaftMsg::Vote(rpc), &option).await? {
            RaftReply::Vote(Ok(r)) => Ok(r),
            RaftReply::Vote(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(unexpected(self.target, other)),
        }
    }
}
