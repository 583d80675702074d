//! The control plane: the cluster map under openraft consensus.
//!
//! Every member is a voter; the replicated state machine is the [`ClusterMap`], changed
//! only by [`MapCommand`]s. A single node is a one-voter cluster running the same code.
//! The raft log, the vote and the applied map are persisted in `DATA/cluster`
//! ([`store`]); raft messages travel as [`Request::Raft`](crate::proto::Request::Raft)
//! frames over the node transport ([`network`]).
//!
//! Only the leader can change the map, so [`ControlPlane::propose`] and the membership
//! calls run on the leader: locally when this node leads, else sent to the leader (or,
//! when this node does not know it, to every member until the leader answers).

mod network;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError,
    InstallSnapshotError, RaftError,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, ChangeMembers, Config, Raft, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::map::{ClusterMap, MapCommand, MapError, Member, NodeId};
use crate::transport::Transport;

openraft::declare_raft_types!(
    /// The consensus types: commands are map commands, answers the map they produced.
    pub TypeConfig:
        D = MapCommand,
        R = MapReply,
);

pub(crate) type NodeIdOf = u64;

/// What applying one log entry produced: the map after it, or why the command was
/// refused (a refused command still occupies its log slot and changes nothing).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapReply(pub Result<ClusterMap, MapError>);

/// How long a map change waits for a leader before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub me: Member,
    /// Where consensus keeps its state (`DATA/cluster`).
    pub dir: PathBuf,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
}

impl ControlConfig {
    pub fn new(me: Member, dir: PathBuf) -> Self {
        ControlConfig {
            me,
            dir,
            heartbeat: Duration::from_millis(150),
            election_min: Duration::from_millis(750),
            election_max: Duration::from_millis(1500),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    /// The map refused the command.
    #[error(transparent)]
    Map(MapError),
    #[error("the cluster has no leader (a majority of its members is unreachable)")]
    NoLeader,
    #[error("{0}")]
    Unreachable(String),
    #[error("this node is not part of an initialised cluster")]
    NotInitialised,
    #[error("cluster state storage: {0}")]
    Storage(String),
    #[error("consensus: {0}")]
    Raft(String),
}

/// A change that only the leader can make.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum LeaderOp {
    Propose(MapCommand),
    AddVoter(Member),
    RemoveNode {
        node: NodeId,
        cmd: MapCommand,
    },
    /// The leader's map once it has confirmed it still leads and applied everything it
    /// committed: the latest map of the cluster.
    Read,
}

/// A consensus frame's body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RaftMsg {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeIdOf>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// Run on the leader; a receiver that does not lead answers [`LeaderAnswer::NotLeader`].
    Leader(LeaderOp),
}

/// A consensus message and whom it is for.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope {
    /// The receiver's incarnation as the sender's map has it; 0 when it does not know.
    /// A node with another incarnation (its data dir was lost and remade) refuses the
    /// message: its log would look to the leader like a log that went back in time.
    pub(crate) incarnation: u64,
    pub(crate) msg: RaftMsg,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RaftReply {
    Append(Result<AppendEntriesResponse<NodeIdOf>, RaftError<NodeIdOf>>),
    Vote(Result<VoteResponse<NodeIdOf>, RaftError<NodeIdOf>>),
    Snapshot(Result<InstallSnapshotResponse<NodeIdOf>, RaftError<NodeIdOf, InstallSnapshotError>>),
    Leader(LeaderAnswer),
    Error(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum LeaderAnswer {
    Done(Result<ClusterMap, ControlError>),
    /// The receiver does not lead; it names the leader it knows of.
    NotLeader(Option<NodeId>),
}

/// This node's handle on the control plane. Cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

struct Inner {
    me: Member,
    raft: Raft<TypeConfig>,
    transport: Arc<dyn Transport>,
    map: watch::Receiver<Arc<ClusterMap>>,
    store: store::Store,
    /// One membership change at a time from this node (raft refuses a second one while
    /// the first is being committed; nodes joining together must queue, not fail).
    membership: tokio::sync::Mutex<()>,
}

impl ControlPlane {
    /// Opens (or creates) the consensus state in `cfg.dir` and starts this node's raft.
    /// The map last applied here is available at once, before any leader is elected.
    pub async fn open(
        cfg: ControlConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<ControlPlane, ControlError> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| ControlError::Storage(e.to_string()))?;
        let store =
            store::Store::open(&cfg.dir).map_err(|e| ControlError::Storage(e.to_string()))?;
        let applied = store.applied().map_err(ControlError::Storage)?;
        let (tx, rx) = watch::channel(Arc::new(applied.map.clone()));
        let config = Config {
            cluster_name: "shardmall".into(),
            heartbeat_interval: millis(cfg.heartbeat),
            election_timeout_min: millis(cfg.election_min),
            election_timeout_max: millis(cfg.election_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
            ..Config::default()
        }
        .validate()
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        let network = network::Network {
            transport: transport.clone(),
            map: rx.clone(),
        };
        let raft = Raft::new(
            cfg.me.node_id,
            Arc::new(config),
            network,
            store::LogStore(store.clone()),
            store::StateMachine::new(store.clone(), applied, tx),
        )
        .await
        .map_err(|e| ControlError::Raft(e.to_string()))?;
        Ok(ControlPlane {
            inner: Arc::new(Inner {
                me: cfg.me,
                raft,
                transport,
                map: rx,
                store,
                membership: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Whether this node holds an initialised map (it created or joined a cluster).
    pub fn is_initialised(&self) -> bool {
        self.map().is_initialised()
    }

    /// Creates a one-member cluster of this node, owning every partition. Safe to call
    /// again after a crash half-way.
    pub async fn bootstrap(
        &self,
        cluster_id: String,
        partitions: u16,
    ) -> Result<ClusterMap, ControlError> {
        let me = &self.inner.me;
        let voters = BTreeMap::from([(me.node_id, BasicNode::new(&me.cluster_addr))]);
        match self.inner.raft.initialize(voters).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(ControlError::Raft(e.to_string())),
        }
        let init = MapCommand::Init {
            cluster_id,
            partitions,
            first: me.clone(),
        };
        match self.propose(init).await {
            Ok(map) => Ok(map),
            Err(ControlError::Map(MapError::AlreadyInitialised)) => Ok((*self.map()).clone()),
            Err(e) => Err(e),
        }
    }

    /// The map as this node last applied it.
    pub fn map(&self) -> Arc<ClusterMap> {
        self.inner.map.borrow().clone()
    }

    /// Every map this node applies, as it applies it.
    pub fn watch(&self) -> watch::Receiver<Arc<ClusterMap>> {
        self.inner.map.clone()
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Has the leader apply `cmd`; returns the map it produced.
    pub async fn propose(&self, cmd: MapCommand) -> Result<ClusterMap, ControlError> {
        self.on_leader(LeaderOp::Propose(cmd)).await
    }

    /// Makes `member` a member of the map and a voter (or records its new addresses if
    /// it is one already).
    pub async fn add_voter(&self, member: Member) -> Result<ClusterMap, ControlError> {
        self.on_leader(LeaderOp::AddVoter(member)).await
    }

    /// The cluster's latest map, as its leader holds it (see [`LeaderOp::Read`]).
    pub async fn latest(&self) -> Result<ClusterMap, ControlError> {
        self.on_leader(LeaderOp::Read).await
    }

    /// Applies `cmd` (which takes `node` out of the map) and takes `node` out of the
    /// voters.
    pub async fn remove_node(
        &self,
        node: NodeId,
        cmd: MapCommand,
    ) -> Result<ClusterMap, ControlError> {
        self.on_leader(LeaderOp::RemoveNode { node, cmd }).await
    }

    /// Answers a consensus frame's body from another node.
    pub async fn serve_raft(&self, body: Vec<u8>) -> Vec<u8> {
        let reply = match serde_json::from_slice::<Envelope>(&body) {
            Ok(env) if env.incarnation != 0 && env.incarnation != self.inner.me.incarnation => {
                tracing::warn!(
                    "refused consensus traffic meant for another data dir of this node \
                     (remove this node with --force and join it again)"
                );
                RaftReply::Error(format!(
                    "{} is another incarnation of this node (its data dir was remade)",
                    self.inner.me.name
                ))
            }
            Ok(env) => self.dispatch(env.msg).await,
            Err(e) => RaftReply::Error(format!("malformed consensus message: {e}")),
        };
        serde_json::to_vec(&reply).unwrap_or_else(|e| {
            tracing::error!(error = %e, "a consensus answer failed to encode");
            Vec::new()
        })
    }

    async fn dispatch(&self, msg: RaftMsg) -> RaftReply {
        match msg {
            RaftMsg::Append(rpc) => RaftReply::Append(self.inner.raft.append_entries(rpc).await),
            RaftMsg::Vote(rpc) => RaftReply::Vote(self.inner.raft.vote(rpc).await),
            RaftMsg::Snapshot(rpc) => {
                RaftReply::Snapshot(self.inner.raft.install_snapshot(rpc).await)
            }
            RaftMsg::Leader(op) => RaftReply::Leader(match self.leader_op(&op).await {
                Ok(map) => LeaderAnswer::Done(Ok(map)),
                Err(Local::NotLeader(hint)) => LeaderAnswer::NotLeader(hint),
                Err(Local::Failed(e)) => LeaderAnswer::Done(Err(e)),
            }),
        }
    }

    /// Waits until this node has applied a map of at least `epoch`, or `timeout`
    /// passes; returns the map it holds then.
    pub async fn wait_for_epoch(&self, epoch: u64, timeout: Duration) -> Arc<ClusterMap> {
        let mut rx = self.inner.map.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|m| m.epoch >= epoch)).await;
        self.map()
    }

    /// Stops this node's raft and flushes its state.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping consensus");
        }
        self.inner.store.flush().await;
    }

    // ---- running changes on the leader ----------------------------------------------

    async fn on_leader(&self, op: LeaderOp) -> Result<ClusterMap, ControlError> {
        let deadline = Instant::now() + LEADER_WAIT;
        let mut last = ControlError::NoLeader;
        loop {
            let hint = match self.leader_op(&op).await {
                Ok(map) => return Ok(map),
                Err(Local::Failed(e)) => return Err(e),
                Err(Local::NotLeader(hint)) => hint,
            };
            // Ask the leader this node knows of; failing that, every other member.
            let map = self.map();
            let mut targets: Vec<String> = Vec::new();
            if let Some(m) = hint.and_then(|id| map.members.get(&id)) {
                targets.push(m.cluster_addr.clone());
            } else {
                targets.extend(
                    map.members
                        .values()
                        .filter(|m| m.node_id != self.inner.me.node_id)
                        .map(|m| m.cluster_addr.clone()),
                );
            }
            for to in targets {
                let msg = Envelope {
                    incarnation: 0,
                    msg: RaftMsg::Leader(op.clone()),
                };
                match network::call(&*self.inner.transport, &to, &msg, LEADER_WAIT).await {
                    Ok(RaftReply::Leader(LeaderAnswer::Done(result))) => return result,
                    Ok(RaftReply::Leader(LeaderAnswer::NotLeader(_))) => {}
                    Ok(other) => {
                        last =
                            ControlError::Unreachable(format!("{to}: unexpected answer {other:?}"))
                    }
                    Err(e) => last = ControlError::Unreachable(format!("{to}: {e}")),
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `op` here if this node leads.
    async fn leader_op(&self, op: &LeaderOp) -> Result<ClusterMap, Local> {
        match op {
            LeaderOp::Read => {
                self.inner
                    .raft
                    .ensure_linearizable()
                    .await
                    .map_err(|e| match e {
                        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                            Local::NotLeader(f.leader_id)
                        }
                        RaftError::APIError(e) => Local::Failed(ControlError::Raft(e.to_string())),
                        RaftError::Fatal(e) => Local::Failed(ControlError::Raft(e.to_string())),
                    })?;
                Ok((*self.map()).clone())
            }
            LeaderOp::Propose(cmd) => self.write(cmd.clone()).await,
            LeaderOp::AddVoter(member) => {
                let _one_at_a_time = self.inner.membership.lock().await;
                let map = self.write(MapCommand::AddMember(member.clone())).await?;
                if !self.voters().contains(&member.node_id) {
                    let id = member.node_id;
                    let node = BasicNode::new(&member.cluster_addr);
                    self.membership_change(|raft| {
                        let node = node.clone();
                        async move { raft.add_learner(id, node, true).await }
                    })
                    .await?;
                    self.membership_change(|raft| async move {
                        let voters = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                        raft.change_membership(voters, false).await
                    })
                    .await?;
                }
                Ok(map)
            }
            LeaderOp::RemoveNode { node, cmd } => {
                if self.inner.raft.current_leader().await != Some(self.inner.me.node_id) {
                    return Err(Local::NotLeader(self.leader()));
                }
                let _one_at_a_time = self.inner.membership.lock().await;
                let mut map = (*self.map()).clone();
                // Idempotent: a retry after the map change landed goes on to consensus.
                if map.members.contains_key(node) {
                    map = self.write(cmd.clone()).await?;
                }
                if self.voters().contains(node) || self.learners().contains(node) {
                    let id = *node;
                    self.membership_change(|raft| async move {
                        let voters = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                        raft.change_membership(voters, false).await
                    })
                    .await?;
                }
                Ok(map)
            }
        }
    }

    /// Runs a membership change, again while an earlier one is still being committed
    /// (for up to the leader wait).
    async fn membership_change<F, Fut>(&self, change: F) -> Result<(), Local>
    where
        F: Fn(Raft<TypeConfig>) -> Fut,
        Fut: std::future::Future<
            Output = Result<openraft::raft::ClientWriteResponse<TypeConfig>, WriteError>,
        >,
    {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            match change(self.inner.raft.clone()).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(local(e)),
            }
        }
    }

    async fn write(&self, cmd: MapCommand) -> Result<ClusterMap, Local> {
        let response = self.inner.raft.client_write(cmd).await.map_err(local)?;
        response
            .data
            .0
            .map_err(|e| Local::Failed(ControlError::Map(e)))
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().voter_ids().collect()
    }

    fn learners(&self) -> BTreeSet<NodeId> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().learner_ids().collect()
    }
}

/// Why a leader operation did not run here.
enum Local {
    NotLeader(Option<NodeId>),
    Failed(ControlError),
}

type WriteError = RaftError<NodeIdOf, ClientWriteError<NodeIdOf, BasicNode>>;

fn local(e: WriteError) -> Local {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Local::NotLeader(f.leader_id),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Local::Failed(ControlError::Raft(e.to_string()))
        }
        RaftError::Fatal(e) => Local::Failed(ControlError::Raft(e.to_string())),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
