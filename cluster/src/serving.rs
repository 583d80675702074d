//! Serving replicated partitions (ADR 0016): which node serves each replica group now,
//! and the watcher that serves a group's partitions here exactly while this node leads
//! the group under a lease.
//!
//! What a replica is, for serving, is decided by the pure state machine of
//! [`crate::replica`] (follower, candidate, leader with lease, handing over, learner),
//! fed each change of the replica's openraft metrics; the watcher carries out its
//! decision: load the group's partitions (unfence) for the term it leads in, or fence
//! them.
//!
//! [`Leaders`] is the table the router reads on every command (lock-free): per group, the
//! leader this node knows of, and, when that is this node, the term it serves in and
//! until when its lease holds. A watcher per local replica keeps it current:
//!
//! * every heartbeat interval a leader confirms its leadership with a quorum (openraft's
//!   read-index round, `get_read_log_id`); a confirmation asked at `t` holds the lease to
//!   `t + lease` (`lease` is below the election timeout: no other replica can be elected
//!   before, see `crate::replica`); these rounds are also what keeps the voters from
//!   starting an election (openraft's own heartbeats are off while a watcher runs);
//! * a leader serves once it has applied an entry of its own term (so it has everything
//!   a previous leader acknowledged): the group's partitions are unfenced, their actors
//!   load from this node's copy;
//! * a replica that stops leading, or leads again in a later term, fences the group's
//!   partitions first: actors hold decisions of their term that may never commit, and
//!   are reloaded from what did.
//!
//! Writes need no lease: an entry commits only with a quorum, which a deposed leader no
//! longer has. Reads need it: a read served here after the lease ran out could miss a
//! sale made by a new leader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use openraft::ServerState;
use shardmall_actors::Shop;
use shardmall_persistence::PartitionData;

use crate::group::{GroupHost, GroupReplica};
use crate::map::NodeId;
use crate::replica::{Observation, Replica, Role, Timing};
use crate::transport::BoxFuture;

/// Milliseconds of this process's monotonic clock.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Where a replicated partition is served, as this node knows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRoute {
    Here,
    Leader(NodeId),
    Unknown,
}

#[derive(Default)]
struct Slot {
    /// The leader this node knows of; 0 when none.
    leader: AtomicU64,
    /// The term this node serves the group in; 0 when it does not.
    serving_term: AtomicU64,
    /// Until when (`now_ms`) its lease holds.
    lease_until: AtomicU64,
}

/// Per group: its leader as this node knows it, and whether this node serves it.
pub struct Leaders {
    me: NodeId,
    slots: Vec<Slot>,
    /// Changes of a group's leader this node's replicas saw.
    pub leader_changes: AtomicU64,
    /// Times this node started serving a group it was elected to lead.
    pub takeovers: AtomicU64,
    /// From this replica's election to serving, the last time (milliseconds).
    pub last_takeover_ms: AtomicU64,
}

impl Leaders {
    /// A table for up to `groups` groups.
    pub fn new(me: NodeId, groups: u16) -> Arc<Leaders> {
        Arc::new(Leaders {
            me,
            slots: (0..groups).map(|_| Slot::default()).collect(),
            leader_changes: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            last_takeover_ms: AtomicU64::new(0),
        })
    }

    /// Groups this node serves now.
    pub fn serving(&self) -> usize {
        (0..self.slots.len() as u16)
            .filter(|g| self.route(*g) == GroupRoute::Here)
            .count()
    }

    /// Where `group` is served now. PERFORMANCE CRITICAL PATH: every command of a
    /// replicated cluster asks.
    pub fn route(&self, group: u16) -> GroupRoute {
        let Some(slot) = self.slots.get(usize::from(group)) else {
            return GroupRoute::Unknown;
        };
        if slot.serving_term.load(Ordering::Acquire) != 0
            && now_ms() < slot.lease_until.load(Ordering::Acquire)
        {
            return GroupRoute::Here;
        }
        match slot.leader.load(Ordering::Acquire) {
            0 => GroupRoute::Unknown,
            l if l == self.me => GroupRoute::Unknown,
            l => GroupRoute::Leader(l),
        }
    }

    /// The leader of `group` this node knows of.
    pub fn leader(&self, group: u16) -> Option<NodeId> {
        self.slots
            .get(usize::from(group))
            .map(|s| s.leader.load(Ordering::Acquire))
            .filter(|l| *l != 0)
    }

    /// Records a leader learnt elsewhere (a node that answered it does not lead).
    pub fn hint(&self, group: u16, leader: Option<NodeId>) {
        if let Some(slot) = self.slots.get(usize::from(group)) {
            slot.leader.store(leader.unwrap_or(0), Ordering::Release);
        }
    }

    fn slot(&self, group: u16) -> Option<&Slot> {
        self.slots.get(usize::from(group))
    }
}

/// The shop as a group's host: folds, exports and installs partitions. Set once the shop
/// has started (the groups exist before it, so that its first write is replicated).
#[derive(Default)]
pub struct ShopHost {
    shop: OnceLock<Shop>,
}

impl ShopHost {
    pub fn set(&self, shop: Shop) {
        let _ = self.shop.set(shop);
    }

    fn shop(&self) -> Result<Shop, String> {
        self.shop
            .get()
            .cloned()
            .ok_or_else(|| "the shop has not started".to_string())
    }
}

impl GroupHost for ShopHost {
    fn checkpoint(&self, partition: u16) -> Result<(), String> {
        let shop = self.shop()?;
        shop.wal()
            .checkpoint_partition_fully(partition, &mut shardmall_actors::shop::fold_entity)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn export(&self, partition: u16) -> BoxFuture<'static, Result<PartitionData, String>> {
        let shop = self.shop();
        Box::pin(async move {
            shop?
                .export_partition(partition)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn install(
        &self,
        partition: u16,
        data: PartitionData,
    ) -> BoxFuture<'static, Result<(), String>> {
        let shop = self.shop();
        Box::pin(async move {
            let shop = shop?;
            // No actor of it may outlive its state (a replica erased just after it
            // stepped down, before its watcher fenced).
            shop.fence_partition(partition)
                .await
                .map_err(|e| e.to_string())?;
            shop.install_partition(partition, data)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Serves the group's `partitions` here exactly while this replica leads it under a
/// lease (see the module's documentation). Runs until the replica stops.
pub async fn watch_group(
    replica: Arc<GroupReplica>,
    leaders: Arc<Leaders>,
    shop: Shop,
    partitions: Vec<u16>,
    heartbeat: Duration,
    lease: Duration,
) {
    let group = replica.group;
    let Some(slot) = leaders.slot(group) else {
        return;
    };
    let me = leaders.me;
    let mut metrics = replica.raft.metrics();
    let mut serving: Option<u64> = None;
    // The last term this replica served in (a reload after a failed write is no
    // takeover).
    let mut served_term: Option<u64> = None;
    let mut last_leader: Option<NodeId> = None;
    let mut state = Replica::default();
    // `lease` has the margin for clock-rate drift taken off already.
    let timing = Timing {
        follower_lease_ms: lease.as_millis() as u64,
        drift_margin_ms: 0,
    };
    // When this replica was elected, until it serves.
    let mut elected_at: Option<u64> = None;
    // The lease keeper's rounds reach every voter once a heartbeat: openraft's own
    // heartbeats would only repeat them (half of an idle group's messages).
    replica.raft.runtime_config().heartbeat(false);
    // The lease is kept by a task of its own: the watcher may be busy fencing.
    let keeper = tokio::spawn(keep_lease(
        replica.clone(),
        leaders.clone(),
        heartbeat,
        lease,
    ));
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let m = metrics.borrow().clone();
        slot.leader
            .store(m.current_leader.unwrap_or(0), Ordering::Release);
        if m.current_leader.is_some() && m.current_leader != last_leader {
            if last_leader.is_some() {
                leaders.leader_changes.fetch_add(1, Ordering::Relaxed);
            }
            last_leader = m.current_leader;
        }
        if m.state != ServerState::Leader {
            replica.handed_over();
        }
        // What the replica is, for serving: the pure state machine of `crate::replica`
        // decides; this loop carries its decisions out.
        let leads = m.state == ServerState::Leader && m.current_leader == Some(me);
        let obs = Observation {
            at: now_ms(),
            role: match m.state {
                ServerState::Leader if leads => Role::Leader,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                _ => Role::Follower,
            },
            term: m.current_term,
            leader: m.current_leader,
            quorum_ack_age: m.millis_since_quorum_ack,
            applied_term: m.last_applied.map(|l| l.leader_id.term),
            // The watcher ends with the replica: a replica out of its group is stopped
            // (`Groups::retire`), and one added back is a new replica.
            member: true,
            handing_over: replica.handing_over(),
        };
        state = std::mem::take(&mut state).observe(&obs, timing);
        if matches!(state, Replica::Leader { .. }) {
            elected_at.get_or_insert_with(now_ms);
        } else {
            elected_at = None;
        }
        let Some(term) = state.holds_partitions() else {
            // Not leading (or handing over, or not caught up in a new term): actors
            // may hold decisions of a term that never commits.
            if serving.take().is_some() {
                slot.serving_term.store(0, Ordering::Release);
                fence(&shop, &partitions, group).await;
            }
            continue;
        };
        let elected = elected_at.unwrap_or_else(now_ms);
        if replica.poisoned() {
            // A write was not committed: the actors that decided it are ahead of the
            // log. Fence (they go), and serve again from the log once nothing is in
            // flight.
            if serving.take().is_some() {
                slot.serving_term.store(0, Ordering::Release);
                fence(&shop, &partitions, group).await;
            }
            if !replica.settle() {
                continue;
            }
            tracing::warn!(
                group,
                "a write of the replica group was not committed; its partitions were reloaded from the log"
            );
        }
        if serving != Some(term) {
            if serving.is_some() {
                slot.serving_term.store(0, Ordering::Release);
                fence(&shop, &partitions, group).await;
            }
            let mut all = true;
            for p in &partitions {
                if let Err(e) = shop.unfence_partition(*p).await {
                    tracing::error!(group, partition = p, error = %e, "cannot serve a partition of a group this node leads");
                    all = false;
                }
            }
            if all {
                serving = Some(term);
                slot.serving_term.store(term, Ordering::Release);
                if served_term != Some(term) {
                    served_term = Some(term);
                    leaders.takeovers.fetch_add(1, Ordering::Relaxed);
                    leaders
                        .last_takeover_ms
                        .store(now_ms().saturating_sub(elected), Ordering::Relaxed);
                    tracing::info!(
                        group,
                        term,
                        "leading the replica group; serving its partitions"
                    );
                }
            }
        }
    }
    keeper.abort();
    slot.serving_term.store(0, Ordering::Release);
    fence(&shop, &partitions, group).await;
}

/// Lease rounds per openraft heartbeat (one a second at the default 100 ms).
const REKICK_EVERY: u32 = 10;

/// While `replica` leads, confirms its leadership with a quorum once every `heartbeat`
/// (openraft's read-index round): a confirmation of a round started at `t` holds the
/// group's lease to `t + lease`, and this replica grants no vote until then (a voter
/// elected meanwhile would serve beside it). One round per heartbeat, whatever else
/// happens: a round changes the replica's metrics, so a loop driven by them would run
/// rounds back to back.
///
/// A round's `AppendEntries` also keeps the voters from starting an election, so the
/// group runs without openraft's own heartbeats; those also restart replication to a
/// member that failed a send (it waits for the next entry otherwise), so one is sent
/// every [`REKICK_EVERY`] rounds, learners included.
async fn keep_lease(
    replica: Arc<GroupReplica>,
    leaders: Arc<Leaders>,
    heartbeat: Duration,
    lease: Duration,
) {
    let group = replica.group;
    let Some(slot) = leaders.slot(group) else {
        return;
    };
    let me = leaders.me;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds = 0u32;
    loop {
        tick.tick().await;
        let leading = {
            let m = replica.raft.metrics();
            let m = m.borrow();
            m.state == ServerState::Leader && m.current_leader == Some(me)
        };
        if !leading || replica.handing_over() {
            continue;
        }
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(REKICK_EVERY) && replica.raft.trigger().heartbeat().await.is_err()
        {
            return;
        }
        let asked = now_ms();
        match tokio::time::timeout(lease, replica.raft.get_read_log_id()).await {
            Ok(Ok(_)) => {
                let until = asked + lease.as_millis() as u64;
                replica.hold_votes_until(until);
                slot.lease_until.fetch_max(until, Ordering::AcqRel);
            }
            Ok(Err(openraft::error::RaftError::Fatal(_))) => return,
            // Not confirmed: the lease runs out on its own.
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

async fn fence(shop: &Shop, partitions: &[u16], group: u16) {
    for p in partitions {
        if let Err(e) = shop.fence_partition(*p).await {
            tracing::error!(group, partition = p, error = %e, "cannot fence a partition of a group this node no longer leads");
        }
    }
    tracing::info!(
        group,
        "no longer leading the replica group; its partitions are fenced"
    );
}
