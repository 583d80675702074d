//! Replica groups' consensus messages over the node transport: one
//! [`Request::Group`](crate::proto::Request::Group) frame per RPC, its body a bincode
//! [`GroupEnvelope`] naming the group.

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
use openraft::{BasicNode, StoredMembership};
use serde::{Deserialize, Serialize};

use super::{GroupConfig, GroupReplica, Groups};
use crate::proto::{self, Request, Response};
use crate::transport::{BoxFuture, Transport};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum GroupMsg {
    Append(AppendEntriesRequest<GroupConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<GroupConfig>),
    /// The membership the receiver's replica has applied (committed): a replica placed
    /// elsewhere asks whether it is out of the group (see `Groups::retire`).
    Membership,
    /// Hand the group's leadership to another voter (`Groups::hand_over`).
    StepDown,
    /// Stand for election now, unless already leading or following a leader other than
    /// `instead_of` (which is handing its leadership over: see `Groups::hand_over`).
    Elect {
        instead_of: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct GroupEnvelope {
    pub(crate) group: u16,
    pub(crate) msg: GroupMsg,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum GroupReply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// The receiver holds no replica of the group (yet).
    NoReplica,
    Membership(Option<StoredMembership<u64, BasicNode>>),
    SteppedDown(Result<(), String>),
    Elected(Result<(), String>),
}

/// Makes a client per peer of one group.
pub(crate) struct GroupNetwork {
    pub(crate) group: u16,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) resolve: super::Resolve,
}

impl RaftNetworkFactory<GroupConfig> for GroupNetwork {
    type Network = GroupPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> GroupPeer {
        GroupPeer {
            group: self.group,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            resolve: self.resolve.clone(),
        }
    }
}

pub(crate) struct GroupPeer {
    group: u16,
    target: u64,
    /// Where the group recorded the peer; the cluster map's address wins.
    addr: String,
    transport: Arc<dyn Transport>,
    resolve: super::Resolve,
}

type RpcError<E = openraft::error::Infallible> = RPCError<u64, BasicNode, RaftError<u64, E>>;

impl GroupPeer {
    async fn send<E: std::error::Error>(
        &self,
        msg: GroupMsg,
        option: &RPCOption,
    ) -> Result<GroupReply, RpcError<E>> {
        let body = proto::encode(&GroupEnvelope {
            group: self.group,
            msg,
        });
        let frame = proto::encode(&Request::Group(body));
        let addr = (self.resolve)(self.target).unwrap_or_else(|| self.addr.clone());
        let answer = tokio::time::timeout(option.hard_ttl(), self.transport.call(&addr, frame))
            .await
            .map_err(|_| {
                RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{addr} did not answer in time"),
                )))
            })?
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        match proto::decode::<Response>(&answer) {
            Ok(Response::Group(body)) => proto::decode(&body).map_err(|e| network_error(&e)),
            Ok(other) => Err(network_error(&std::io::Error::other(format!(
                "unexpected answer {other:?}"
            )))),
            Err(e) => Err(network_error(&e)),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: GroupReply) -> RpcError<E> {
        network_error(&std::io::Error::other(format!(
            "node {} answered a group {} message with {reply:?}",
            self.target, self.group
        )))
    }
}

/// Asks the replica of `group` at `addr` which membership it has applied; `None` when it
/// does not say (no replica there, unreachable, an older release).
pub(crate) async fn applied_membership_at(
    transport: &dyn Transport,
    addr: &str,
    group: u16,
) -> Option<StoredMembership<u64, BasicNode>> {
    let body = proto::encode(&GroupEnvelope {
        group,
        msg: GroupMsg::Membership,
    });
    let call = transport.call(addr, proto::encode(&Request::Group(body)));
    let answer = tokio::time::timeout(std::time::Duration::from_secs(1), call)
        .await
        .ok()?
        .ok()?;
    match proto::decode::<Response>(&answer).ok()? {
        Response::Group(body) => match proto::decode::<GroupReply>(&body).ok()? {
            GroupReply::Membership(applied) => applied,
            _ => None,
        },
        _ => None,
    }
}

/// Asks the node at `addr` to hand its leadership of `group` to another voter (see
/// `Groups::hand_over`).
pub async fn hand_over_at(transport: &dyn Transport, addr: &str, group: u16) -> Result<(), String> {
    match ask(transport, addr, group, GroupMsg::StepDown).await? {
        GroupReply::SteppedDown(outcome) => outcome,
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Asks the replica of `group` at `addr` to stand for election in place of `instead_of`.
pub async fn elect_at(
    transport: &dyn Transport,
    addr: &str,
    group: u16,
    instead_of: u64,
) -> Result<(), String> {
    match ask(transport, addr, group, GroupMsg::Elect { instead_of }).await? {
        GroupReply::Elected(outcome) => outcome,
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// One group message to the node at `addr`, outside openraft's own traffic.
async fn ask(
    transport: &dyn Transport,
    addr: &str,
    group: u16,
    msg: GroupMsg,
) -> Result<GroupReply, String> {
    let body = proto::encode(&GroupEnvelope { group, msg });
    let call = transport.call(addr, proto::encode(&Request::Group(body)));
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .map_err(|_| format!("{addr} did not answer in time"))?
        .map_err(|e| e.to_string())?;
    match proto::decode::<Response>(&answer).map_err(|e| e.to_string())? {
        Response::Group(body) => {
            match proto::decode::<GroupReply>(&body).map_err(|e| e.to_string())? {
                GroupReply::NoReplica => Err(format!("{addr} holds no replica of group {group}")),
                reply => Ok(reply),
            }
        }
        Response::Error(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

fn network_error<E: std::error::Error>(e: &(impl std::error::Error + 'static)) -> RpcError<E> {
    RPCError::Network(NetworkError::new(e))
}

impl RaftNetwork<GroupConfig> for GroupPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<GroupConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        match self.send(GroupMsg::Append(rpc), &option).await? {
            GroupReply::Append(Ok(r)) => Ok(r),
            GroupReply::Append(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<GroupConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        match self.send(GroupMsg::Snapshot(rpc), &option).await? {
            GroupReply::Snapshot(Ok(r)) => Ok(r),
            GroupReply::Snapshot(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        match self.send(GroupMsg::Vote(rpc), &option).await? {
            GroupReply::Vote(Ok(r)) => Ok(r),
            GroupReply::Vote(Err(e)) => {
                Err(RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }
}

/// Serves the group messages that arrive at this node.
pub trait GroupService: Send + Sync + 'static {
    /// Answers one [`Request::Group`] body.
    fn serve_group(&self, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>>;
}

impl GroupService for Arc<Groups> {
    fn serve_group(&self, body: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        let groups = self.clone();
        Box::pin(async move { proto::encode(&answer(&groups, body).await) })
    }
}

/// The answer to one [`Request::Group`] body.
pub async fn answer(groups: &Groups, body: Vec<u8>) -> Response {
    let envelope: GroupEnvelope = match proto::decode(&body) {
        Ok(e) => e,
        Err(e) => return Response::Error(e.to_string()),
    };
    let reply = match groups.replica(envelope.group) {
        None => GroupReply::NoReplica,
        Some(replica) => match envelope.msg {
            GroupMsg::Append(rpc) => GroupReply::Append(replica.raft.append_entries(rpc).await),
            GroupMsg::Vote(_) if replica.refuses_votes(crate::serving::now_ms()) => {
                GroupReply::Vote(Ok(refusal(&replica)))
            }
            GroupMsg::Vote(rpc) => GroupReply::Vote(replica.raft.vote(rpc).await),
            GroupMsg::Snapshot(rpc) => {
                GroupReply::Snapshot(replica.raft.install_snapshot(rpc).await)
            }
            GroupMsg::Membership => {
                GroupReply::Membership(groups.applied_membership(replica.group))
            }
            GroupMsg::StepDown => GroupReply::SteppedDown(groups.hand_over(replica.group).await),
            GroupMsg::Elect { instead_of } => {
                GroupReply::Elected(groups.elect_instead_of(replica.group, instead_of).await)
            }
        },
    };
    Response::Group(proto::encode(&reply))
}

/// A vote this replica does not grant: it holds a leader's lease (or may have confirmed
/// one before it restarted), see [`GroupReplica::refuses_votes`]. It names this
/// replica's own vote, which the candidate's is above: the candidate neither counts it
/// nor steps down for it, and asks again at its next election.
fn refusal(replica: &GroupReplica) -> VoteResponse<u64> {
    let vote = replica.raft.metrics().borrow().vote;
    VoteResponse {
        vote,
        vote_granted: false,
        last_log_id: None,
    }
}
