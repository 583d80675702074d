//! Replica groups (ADR 0016): each group of partitions is one openraft instance per
//! replica, its log kept in the node's one write-ahead log ([`log`]), its committed
//! entries applied with the log's own apply path ([`sm`]), its messages carried as
//! [`Request::Group`](crate::proto::Request::Group) frames ([`network`]).
//!
//! A record of a replicated partition reaches its group through the log's
//! [`Replicate`] hook ([`Groups`]): the group's proposer gathers the records queued
//! since its last proposal into one entry ([`Batch`]), so consensus costs one entry, one
//! `AppendEntries` per follower and one commit per batch, not per record. Each record is
//! answered once its entry is committed and applied here.

pub(crate) mod log;
pub mod network;
pub(crate) mod sm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy, StoredMembership};
use serde::{Deserialize, Serialize};
use shardmall_persistence::{
    AuxOp, Error as WalError, Lsn, Part, PartitionData, Record, Replicate, Wal,
};
use tokio::sync::mpsc;

use crate::map::NodeId;
use crate::transport::{BoxFuture, Transport};

pub use network::{answer, GroupService};

openraft::declare_raft_types!(
    /// A replica group's consensus types: an entry is a batch of log records, applying
    /// it answers the lsn it was applied at on this node.
    pub GroupConfig:
        D = Batch,
        R = AppliedAt,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The group a partition belongs to, fixed at creation: partition `p` of a cluster with
/// `groups` groups is in group `p % groups`.
pub fn group_of(partition: u16, groups: u16) -> u16 {
    partition % groups.max(1)
}

/// One log record as it travels in an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub partition: u16,
    #[serde(with = "serde_bytes")]
    pub entity: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub aux: Vec<WireAux>,
    pub also: Vec<WirePart>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireAux {
    Put(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
    Delete(#[serde(with = "serde_bytes")] Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WirePart {
    pub partition: u16,
    #[serde(with = "serde_bytes")]
    pub entity: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl From<Record> for WireRecord {
    fn from(r: Record) -> Self {
        WireRecord {
            partition: r.partition,
            entity: r.entity,
            payload: r.payload,
            aux: r
                .aux
                .into_iter()
                .map(|op| match op {
                    AuxOp::Put(k, v) => WireAux::Put(k, v),
                    AuxOp::Delete(k) => WireAux::Delete(k),
                })
                .collect(),
            also: r
                .also
                .into_iter()
                .map(|p| WirePart {
                    partition: p.partition,
                    entity: p.entity,
                    payload: p.payload,
                })
                .collect(),
        }
    }
}

impl From<WireRecord> for Record {
    fn from(r: WireRecord) -> Self {
        Record {
            partition: r.partition,
            entity: r.entity,
            payload: r.payload,
            aux: r
                .aux
                .into_iter()
                .map(|op| match op {
                    WireAux::Put(k, v) => AuxOp::Put(k, v),
                    WireAux::Delete(k) => AuxOp::Delete(k),
                })
                .collect(),
            also: r
                .also
                .into_iter()
                .map(|p| Part {
                    partition: p.partition,
                    entity: p.entity,
                    payload: p.payload,
                })
                .collect(),
        }
    }
}

/// One entry's payload: the records a leader queued for the group between two proposals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<WireRecord>);

/// What applying an entry answered: the lsn its records were applied at on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedAt(pub Lsn);

/// What a group needs from the node that hosts it: the domain's fold, to turn a group's
/// partitions into snapshots and back (ADR 0016, "Snapshots are the checkpoints").
pub trait GroupHost: Send + Sync + 'static {
    /// Folds every unfolded record of `partition` into its entity's snapshot. Blocking.
    fn checkpoint(&self, partition: u16) -> Result<(), String>;
    /// The partition's whole state.
    fn export(&self, partition: u16) -> BoxFuture<'static, Result<PartitionData, String>>;
    /// Replaces this node's copy of the partition with `data`, durably (the partition
    /// is fenced first: nothing here serves it).
    fn install(
        &self,
        partition: u16,
        data: PartitionData,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// Timing and batching of the data groups.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub groups: u16,
    pub partitions: u16,
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Records gathered into one entry at most.
    pub max_batch: usize,
    /// A snapshot (a checkpoint of the group's partitions) after this many entries; the
    /// log before it is then purged.
    pub snapshot_every: u64,
    /// After a snapshot could not be made (a partition did not fold), the next attempt
    /// waits this long.
    pub snapshot_retry: Duration,
    /// Groups formed from partitions that already held data (a cluster growing into
    /// replicas): a group's leader adds no learner before its log has been cut behind a
    /// snapshot, so that a learner starts from that snapshot, which holds the data, not
    /// from the first entry, which does not.
    pub snapshot_first: bool,
}

impl GroupSettings {
    pub fn new(partitions: u16, groups: u16) -> Self {
        GroupSettings {
            groups,
            partitions,
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            max_batch: 512,
            snapshot_every: 20_000,
            snapshot_retry: Duration::from_secs(10),
            snapshot_first: false,
        }
    }

    fn raft_config(&self) -> Result<Arc<Config>, String> {
        let config = Config {
            cluster_name: "shardmall-data".into(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: 0,
            max_payload_entries: 64,
            ..Default::default()
        };
        config.validate().map(Arc::new).map_err(|e| e.to_string())
    }

    /// How long a leader serves after a quorum confirmed it: below the shortest election
    /// timeout, so no other replica can have been elected meanwhile (a tenth of it is the
    /// margin for clocks running at different rates).
    pub fn lease(&self) -> Duration {
        self.election_min - self.election_min / 10
    }

    /// The partitions of `group`.
    pub fn partitions_of(&self, group: u16) -> Vec<u16> {
        (0..self.partitions)
            .filter(|p| group_of(*p, self.groups) == group)
            .collect()
    }
}

/// A record waiting for its group to commit it.
struct Proposal {
    rec: Record,
    done: Box<dyn FnOnce(Result<Lsn, WalError>) + Send>,
}

/// This node's replica of one group.
pub struct GroupReplica {
    pub group: u16,
    pub raft: Raft<GroupConfig>,
    /// The replica's log, kept when it stops while it may still be a member (see
    /// [`Groups::retire`]).
    log: log::GroupLog,
    proposals: mpsc::UnboundedSender<Proposal>,
    flow: Arc<Flow>,
    /// Until when (`serving::now_ms`) this replica refuses to vote (see
    /// [`GroupReplica::refuses_votes`]).
    no_votes_until: AtomicU64,
    /// Until when (`serving::now_ms`) this replica hands its leadership over (see
    /// [`Groups::hand_over`]).
    handing_over_until: AtomicU64,
}

/// Records on their way through a group's proposer.
#[derive(Default)]
struct Flow {
    /// Submitted, not yet answered.
    pending: AtomicUsize,
    /// A record was not committed: the entities that decided it hold state ahead of the
    /// log, and records queued after it may build on it. Every record is refused until
    /// the group's partitions have been reloaded ([`GroupReplica::settle`]).
    poisoned: AtomicBool,
}

/// How long a leader handing its group over ([`Groups::hand_over`]) waits for another
/// voter to be elected before it serves again: its lease runs out, then the voter asked
/// is refused by nobody.
pub const HAND_OVER_FOR: Duration = Duration::from_secs(3);

/// Records a group takes into its proposer's queue at most; beyond, a record is refused
/// (the group is overloaded) rather than queued without bound.
pub const MAX_PENDING: usize = 32_768;

impl GroupReplica {
    /// Whether a record was refused or not committed since the group's partitions were
    /// last loaded: the group refuses every record until they are reloaded.
    pub fn poisoned(&self) -> bool {
        self.flow.poisoned.load(Ordering::Acquire)
    }

    /// Once no record is in flight, takes records again: the caller has fenced the
    /// group's partitions (their actors are gone) and loads them afresh. Answers whether
    /// the group takes records now.
    pub fn settle(&self) -> bool {
        if self.flow.pending.load(Ordering::Acquire) != 0 {
            return false;
        }
        self.flow.poisoned.store(false, Ordering::Release);
        true
    }

    /// Records submitted and not yet answered.
    pub fn pending(&self) -> usize {
        self.flow.pending.load(Ordering::Acquire)
    }

    /// Whether this replica must refuse a vote now: while it holds (or may have granted)
    /// a leader's lease, another replica elected could serve beside that leader.
    pub fn refuses_votes(&self, now_ms: u64) -> bool {
        now_ms < self.no_votes_until.load(Ordering::Acquire)
    }

    /// Refuses votes until `until_ms` at least: this replica leads under a lease until
    /// then.
    pub fn hold_votes_until(&self, until_ms: u64) {
        self.no_votes_until.fetch_max(until_ms, Ordering::AcqRel);
    }

    /// Whether this replica is handing its leadership over ([`Groups::hand_over`]): it
    /// neither serves nor confirms its lease, though it may still lead.
    pub fn handing_over(&self) -> bool {
        crate::serving::now_ms() < self.handing_over_until.load(Ordering::Acquire)
    }

    /// A replica that no longer leads has handed over: elected again later, it serves
    /// at once.
    pub(crate) fn handed_over(&self) {
        self.handing_over_until.store(0, Ordering::Release);
    }

    /// Whether this replica leads its group now (as far as it knows). A leader that
    /// stepped down keeps its own vote, so `current_leader` may still name it: the
    /// server state decides.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_leader == Some(m.id)
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }
}

/// How far a replica joining a group may be behind the leader's log when it becomes a
/// voter: the last entries reach it within a round trip.
pub const CAUGHT_UP: u64 = 64;

/// Where [`Groups::place`] left a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// This replica does not lead the group: its leader places it.
    NotLeader,
    /// The voters are the replicas wanted.
    Done,
    /// A replica joining is still catching up as a learner.
    CatchingUp,
    /// The voters were changed to the replicas wanted.
    Changed,
}

/// A member's current cluster address, when known (a node that restarts on another
/// address is reached there, not where its group first recorded it).
pub type Resolve = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

/// Every group replica this node holds, and the log's hook into them.
pub struct Groups {
    resolve: Resolve,
    me: NodeId,
    settings: GroupSettings,
    wal: Wal,
    host: Arc<dyn GroupHost>,
    transport: Arc<dyn Transport>,
    by_group: RwLock<HashMap<u16, Arc<GroupReplica>>>,
    /// Recovered consensus frames per group, until the group starts here.
    recovered: std::sync::Mutex<BTreeMap<u16, Vec<(Lsn, shardmall_persistence::RaftFrame)>>>,
    /// The logs of replicas stopped while they may still have been members: a replica
    /// started again in this process continues from them (the recovered frames are
    /// taken once).
    parked: std::sync::Mutex<HashMap<u16, log::GroupLog>>,
}

/// Marks a group whose copy on this node is being erased ([`Groups::forget`]): a crash
/// midway is finished before the group starts here again.
const FORGETTING: &str = "forgetting";

impl Groups {
    /// Takes the consensus frames the log recovered. Install it as the log's
    /// [`Replicate`] hook with [`Wal::set_replicate`].
    pub fn new(
        me: NodeId,
        settings: GroupSettings,
        wal: Wal,
        host: Arc<dyn GroupHost>,
        transport: Arc<dyn Transport>,
        resolve: Resolve,
    ) -> Arc<Groups> {
        let mut recovered: BTreeMap<u16, Vec<_>> = BTreeMap::new();
        for (lsn, frame) in wal.take_raft_frames() {
            recovered.entry(frame.group).or_default().push((lsn, frame));
        }
        Arc::new(Groups {
            resolve,
            me,
            settings,
            wal,
            host,
            transport,
            by_group: RwLock::new(HashMap::new()),
            recovered: std::sync::Mutex::new(recovered),
            parked: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &GroupSettings {
        &self.settings
    }

    pub fn replica(&self, group: u16) -> Option<Arc<GroupReplica>> {
        self.by_group
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// Starts this node's replica of `group` (from what the log holds of it), if it is
    /// not running yet.
    pub async fn start(&self, group: u16) -> Result<Arc<GroupReplica>, String> {
        if let Some(r) = self.replica(group) {
            return Ok(r);
        }
        let parked = self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        let log = match parked {
            Some(log) => log,
            None => {
                let mut frames = self
                    .recovered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&group)
                    .unwrap_or_default();
                if log::meta_get::<bool>(&self.wal, group, FORGETTING)?.is_some() {
                    // Erasing it was cut short by a crash: finished first. Every frame
                    // recovered is from before.
                    self.forget(group).await?;
                    frames.clear();
                }
                log::GroupLog::open(group, self.wal.clone(), frames)?
            }
        };
        let sm = sm::GroupSm::open(
            group,
            self.wal.clone(),
            log.clone(),
            self.host.clone(),
            self.settings.partitions_of(group),
            self.settings.snapshot_retry,
        )?;
        let network = network::GroupNetwork {
            group,
            transport: self.transport.clone(),
            resolve: self.resolve.clone(),
        };
        let raft = Raft::new(
            self.me,
            self.settings.raft_config()?,
            network,
            log.clone(),
            sm,
        )
        .await
        .map_err(|e| format!("starting replica group {group}: {e}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let flow = Arc::new(Flow::default());
        tokio::spawn(propose(
            group,
            raft.clone(),
            rx,
            flow.clone(),
            self.settings.max_batch,
        ));
        // A replica that just started may have confirmed a leader's lease before it
        // stopped (it keeps no record of when): it grants no vote for as long as that
        // lease can last, or a new leader could serve beside the old one.
        let no_votes_until =
            crate::serving::now_ms() + self.settings.election_max.as_millis() as u64;
        let replica = Arc::new(GroupReplica {
            group,
            raft,
            log,
            proposals: tx,
            flow,
            no_votes_until: AtomicU64::new(no_votes_until),
            handing_over_until: AtomicU64::new(0),
        });
        let mut by_group = self.by_group.write().unwrap_or_else(|p| p.into_inner());
        Ok(by_group.entry(group).or_insert(replica).clone())
    }

    /// Forms `group` with `voters` (id and cluster address) as its first members. Called
    /// on one of them; a group already formed is left as it is.
    pub async fn initialize(
        &self,
        group: u16,
        voters: &BTreeMap<NodeId, String>,
    ) -> Result<(), String> {
        let replica = self.start(group).await?;
        let members: BTreeMap<NodeId, BasicNode> = voters
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        match replica.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(format!("forming replica group {group}: {e}")),
        }
    }

    /// Moves `group`'s membership one step towards `want` (id and cluster address of the
    /// replicas the map places it on), when this replica leads it: a replica it lacks
    /// joins as a learner and catches up from a snapshot and the log; once every such
    /// learner is within [`CAUGHT_UP`] entries of the leader's log, the voters become
    /// exactly `want` (openraft's joint consensus: a majority of the old and of the new
    /// set). Called again until it answers [`Placed::Done`].
    pub async fn place(
        &self,
        group: u16,
        want: &BTreeMap<NodeId, String>,
    ) -> Result<Placed, String> {
        let Some(replica) = self.replica(group) else {
            return Ok(Placed::NotLeader);
        };
        let m = replica.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(self.me) {
            return Ok(Placed::NotLeader);
        }
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wanted: BTreeSet<NodeId> = want.keys().copied().collect();
        if voters == wanted && membership.get_joint_config().len() == 1 {
            return Ok(Placed::Done);
        }
        if self.settings.snapshot_first && m.purged.is_none() {
            // Cut behind a snapshot first (openraft purges up to a snapshot as soon as
            // it is built): placed again next round.
            if m.snapshot.is_none() {
                replica
                    .raft
                    .trigger()
                    .snapshot()
                    .await
                    .map_err(|e| format!("snapshotting group {group}: {e}"))?;
            }
            return Ok(Placed::CatchingUp);
        }
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let mut joining = false;
        for (id, addr) in want {
            if !voters.contains(id) && !learners.contains(id) {
                replica
                    .raft
                    .add_learner(*id, BasicNode::new(addr), false)
                    .await
                    .map_err(|e| format!("adding node {id} to group {group}: {e}"))?;
                joining = true;
            }
        }
        if joining {
            return Ok(Placed::CatchingUp);
        }
        let last = m.last_log_index.unwrap_or(0);
        let behind = wanted.iter().filter(|id| !voters.contains(id)).any(|id| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id).copied().flatten())
                .map_or(0, |l| l.index);
            last.saturating_sub(matched) > CAUGHT_UP
        });
        if behind {
            return Ok(Placed::CatchingUp);
        }
        replica
            .raft
            .change_membership(wanted, false)
            .await
            .map_err(|e| format!("changing the replicas of group {group}: {e}"))?;
        Ok(Placed::Changed)
    }

    /// Hands the leadership of `group` to another voter, keeping every voter: this
    /// replica, which must lead, stops serving the group's partitions and confirming its
    /// lease for [`HAND_OVER_FOR`]. openraft 0.9 has no leader transfer, but a leader
    /// grants a vote of a later term once nothing holds it (its own vote clock is that
    /// of its election; this node's lease, checked before openraft sees the request,
    /// runs out within [`GroupSettings::lease`]): a voter asked to stand for election
    /// then wins with this replica's vote, without waiting for the other voters' leader
    /// lease, and this replica follows it. If none is elected meanwhile, this replica
    /// serves again. Answers at once.
    ///
    /// (Leaving the membership instead, as an earlier release did, left the group one
    /// voter short until the new leader added the old one back: a node lost then took
    /// the group's majority with it.)
    pub async fn hand_over(&self, group: u16) -> Result<(), String> {
        let replica = self
            .replica(group)
            .ok_or_else(|| format!("this node holds no replica of group {group}"))?;
        let m = replica.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(self.me) {
            return Err(format!("this node does not lead group {group}"));
        }
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() != 1 {
            return Err(format!("group {group} is changing its members; try again"));
        }
        if !membership.voter_ids().any(|id| id != self.me) {
            return Err(format!("group {group} has no other voter to lead it"));
        }
        let until = crate::serving::now_ms() + HAND_OVER_FOR.as_millis() as u64;
        replica.handing_over_until.store(until, Ordering::Release);
        Ok(())
    }

    /// Stands for election in `group`, in place of `instead_of`, which is handing its
    /// leadership over ([`Groups::hand_over`]): not when this replica leads or follows another
    /// leader already. (openraft stops a group whose leader is asked to elect while it
    /// changes the membership: it may be asked again before its election is known.)
    pub async fn elect_instead_of(&self, group: u16, instead_of: NodeId) -> Result<(), String> {
        let replica = self
            .replica(group)
            .ok_or_else(|| format!("this node holds no replica of group {group}"))?;
        let m = replica.raft.metrics().borrow().clone();
        let open =
            m.state != ServerState::Leader && m.current_leader.is_none_or(|l| l == instead_of);
        if !open {
            return Ok(());
        }
        replica
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| e.to_string())
    }

    /// Stops this node's replica of `group` once it is no longer a member of the group
    /// (moved elsewhere): a replica left running would stand for elections nobody
    /// grants. With `anyway`, also when it may still be a member but does not lead (a
    /// removed replica may never hear of the final membership). Answers whether it
    /// stopped.
    ///
    /// A replica that is provably out of the group (see [`Groups::removed`]) is erased
    /// ([`Groups::forget`]): placed here again later, it joins as a new learner. One
    /// that may still be a voter keeps everything (a voter's log counts towards what
    /// the group has committed): its log is parked, and a replica started again in this
    /// process continues from it.
    pub async fn retire(&self, group: u16, anyway: bool) -> bool {
        let Some(replica) = self.replica(group) else {
            return false;
        };
        let m = replica.raft.metrics().borrow().clone();
        let member = m
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id == self.me);
        if m.state == ServerState::Leader {
            return false;
        }
        let removed = self.removed(group, &m).await;
        if member && !removed && !anyway {
            return false;
        }
        self.by_group
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        let _ = replica.raft.shutdown().await;
        if removed {
            self.wal.hold_log_from(group, None);
            if let Err(e) = self.forget(group).await {
                // Finished before the group starts here again (the mark stays).
                tracing::error!(group, error = %e, "cannot erase this node's copy of a replica group it left");
            }
        } else {
            self.parked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(group, replica.log.clone());
        }
        true
    }

    /// Whether this replica is out of `group` for good: a membership applied (committed)
    /// here, or else by another replica of the group, leaves it out of the voters the
    /// group is moving to, and no later membership it holds names it a voter. Once a
    /// joint membership is committed, a majority of its new voters holds every
    /// committed entry, and every later entry needs such a majority: nothing depends on
    /// this replica's copy any more. (A replica removed from its group may never hear
    /// that the change committed: the leader stops sending to it. So it asks.)
    async fn removed(&self, group: u16, m: &openraft::RaftMetrics<NodeId, BasicNode>) -> bool {
        if self
            .applied_membership(group)
            .is_some_and(|applied| self.out_of(&applied, m))
        {
            return true;
        }
        // Asked side by side: one that is down costs its timeout once, not per member.
        let mut asks = tokio::task::JoinSet::new();
        for (id, node) in m.membership_config.membership().nodes() {
            if *id == self.me {
                continue;
            }
            let addr = (self.resolve)(*id).unwrap_or_else(|| node.addr.clone());
            let transport = self.transport.clone();
            asks.spawn(async move {
                network::applied_membership_at(transport.as_ref(), &addr, group).await
            });
        }
        while let Some(answer) = asks.join_next().await {
            if answer
                .ok()
                .flatten()
                .is_some_and(|applied| self.out_of(&applied, m))
            {
                return true;
            }
        }
        false
    }

    /// Whether `applied`, a committed membership of the group, leaves this replica out
    /// (see [`Groups::removed`]).
    fn out_of(
        &self,
        applied: &StoredMembership<NodeId, BasicNode>,
        m: &openraft::RaftMetrics<NodeId, BasicNode>,
    ) -> bool {
        let Some(next) = applied.membership().get_joint_config().last() else {
            return false;
        };
        let voter_later = m.membership_config.log_id() > applied.log_id()
            && m.membership_config
                .membership()
                .voter_ids()
                .any(|id| id == self.me);
        !next.contains(&self.me) && !voter_later
    }

    /// The membership this node's replica of `group` has applied.
    pub(crate) fn applied_membership(
        &self,
        group: u16,
    ) -> Option<StoredMembership<NodeId, BasicNode>> {
        log::meta_get(&self.wal, group, "membership").ok().flatten()
    }

    /// Erases this node's copy of `group`, durably: its log (a cut before the first
    /// entry, which a replay meets after them), its consensus state but the vote (a
    /// term never goes back) and its partitions' data. Kept, a copy would make a
    /// replica placed here again start with an applied index its log does not hold
    /// (openraft stops) or apply the leader's entries over partitions that hold them
    /// already.
    async fn forget(&self, group: u16) -> Result<(), String> {
        log::meta_put(&self.wal, group, FORGETTING, &true)
            .await
            .map_err(|e| e.to_string())?;
        log::write_cut(&self.wal, group, 0)
            .await
            .map_err(|e| e.to_string())?;
        log::meta_remove(&self.wal, group, &["purged", "floor", "membership"]).await?;
        for p in self.settings.partitions_of(group) {
            self.host.install(p, Vec::new()).await?;
        }
        log::meta_remove(&self.wal, group, &[FORGETTING]).await?;
        tracing::info!(
            group,
            "this node's copy of a replica group it left is erased"
        );
        Ok(())
    }

    /// Stops every replica (their state stays in the log).
    pub async fn shutdown(&self) {
        let all: Vec<_> = self
            .by_group
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in all {
            let _ = r.raft.shutdown().await;
        }
    }

    /// The groups this node holds a replica of.
    pub fn running(&self) -> BTreeSet<u16> {
        self.by_group
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }
}

impl Replicate for Groups {
    fn replicated(&self, partition: u16) -> bool {
        partition < self.settings.partitions
    }

    fn submit(&self, rec: Record, done: Box<dyn FnOnce(Result<Lsn, WalError>) + Send>) {
        let group = group_of(rec.partition, self.settings.groups);
        // A frame's parts are applied together: they must all belong to one group.
        if let Some(p) = rec
            .also
            .iter()
            .find(|p| group_of(p.partition, self.settings.groups) != group)
        {
            done(Err(WalError::Replication(format!(
                "a record of partition {} carries one of partition {}, in another replica group",
                rec.partition, p.partition
            ))));
            return;
        }
        match self.replica(group) {
            Some(replica) => {
                let flow = &replica.flow;
                if flow.poisoned.load(Ordering::Acquire) {
                    done(Err(WalError::Replication(format!(
                        "replica group {group} is reloading its partitions after a write that was not committed"
                    ))));
                    return;
                }
                if flow.pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
                    // The entity that decided this record is ahead of the log now.
                    flow.poisoned.store(true, Ordering::Release);
                    flow.pending.fetch_sub(1, Ordering::AcqRel);
                    done(Err(WalError::Replication(format!(
                        "replica group {group} is overloaded: {MAX_PENDING} records wait for consensus"
                    ))));
                    return;
                }
                if let Err(mpsc::error::SendError(p)) =
                    replica.proposals.send(Proposal { rec, done })
                {
                    flow.pending.fetch_sub(1, Ordering::AcqRel);
                    (p.done)(Err(WalError::Replication(format!(
                        "replica group {group} is shutting down"
                    ))));
                }
            }
            None => done(Err(WalError::Replication(format!(
                "this node holds no replica of group {group}"
            )))),
        }
    }
}

/// Entries a group's proposer keeps in flight (proposed, not yet applied). While one
/// is, records queue and go together in the next entry: under load an entry carries
/// many records (one consensus round, one `AppendEntries` per follower for all of
/// them), unloaded a record is proposed at once; the sixteen groups of a node still
/// run their rounds side by side. `cargo bench -p shardmall-cluster --bench groups`
/// (64 writers, three replicas on two cores): unbounded, every record was an entry of
/// its own (1.06 records per entry, 14k records/s); 4 in flight 3.1 records per entry,
/// 30k/s; 2: 5.5, 41k/s; 1: 8.5, 47k/s.
const IN_FLIGHT: usize = 1;

/// The group's proposer: gathers what is queued into one entry, hands it to consensus in
/// queue order (records of one entity keep their order), and answers each record once its
/// entry is applied here.
async fn propose(
    group: u16,
    raft: Raft<GroupConfig>,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    flow: Arc<Flow>,
    max_batch: usize,
) {
    let window = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut queued = Vec::with_capacity(max_batch);
    loop {
        let Ok(slot) = window.clone().acquire_owned().await else {
            return;
        };
        if rx.recv_many(&mut queued, max_batch).await == 0 {
            return;
        }
        let taken = queued.len();
        if flow.poisoned.load(Ordering::Acquire) {
            // Queued behind a record that was not committed: they may build on it.
            for p in queued.drain(..) {
                (p.done)(Err(WalError::Replication(format!(
                    "replica group {group} is reloading its partitions after a write that was not committed"
                ))));
            }
            flow.pending.fetch_sub(taken, Ordering::AcqRel);
            continue;
        }
        let (records, waiters): (Vec<WireRecord>, Vec<_>) = queued
            .drain(..)
            .map(|p| (WireRecord::from(p.rec), p.done))
            .unzip();
        let answer = match raft.client_write_ff(Batch(records)).await {
            Ok(rx) => rx,
            Err(e) => {
                flow.poisoned.store(true, Ordering::Release);
                let msg = e.to_string();
                for done in waiters {
                    done(Err(WalError::Replication(msg.clone())));
                }
                flow.pending.fetch_sub(taken, Ordering::AcqRel);
                continue;
            }
        };
        let flow = flow.clone();
        tokio::spawn(async move {
            let outcome = match answer.await {
                Ok(Ok(written)) => Ok(written.data.0),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the replica group stopped".to_string()),
            };
            if outcome.is_err() {
                // Before the next entry may be proposed (the slot is still held).
                flow.poisoned.store(true, Ordering::Release);
            }
            drop(slot);
            // Record `i` of the entry was applied at its first lsn plus `i`.
            for (i, done) in (0u64..).zip(waiters) {
                done(
                    outcome
                        .clone()
                        .map(|first| first + i)
                        .map_err(WalError::Replication),
                );
            }
            flow.pending.fetch_sub(taken, Ordering::AcqRel);
        });
    }
}

#[cfg(test)]
mod tests;
