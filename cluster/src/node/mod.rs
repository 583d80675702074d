//! One cluster member: it routes this node's entity commands (the shop's [`Router`]),
//! serves the frames other nodes send (a transport [`Service`]), keeps the partitions it
//! serves in step with the cluster map, and moves partitions.
//!
//! Serving follows the map: a partition is served here (unfenced) exactly when the map
//! says this node owns it and no handoff of it is under way. A partition changes hands
//! like this (see docs/adr/0011-cluster.md):
//!
//! 1. the owner fences it: new commands are answered `Moved` (their callers route again
//!    after a pause) and every active entity stops with its writes durable;
//! 2. the owner folds the partition into snapshots and ships them (`Install`); the new
//!    owner replaces its copy of the partition with them, durably;
//! 3. the owner commits `Move` through consensus: the map flips at a new epoch, the new
//!    owner unfences, and commands that still reach the old owner are answered
//!    `wrong_owner` and routed again.
//!
//! Until step 3 commits nothing has changed hands: a failed handoff unfences the
//! partition where it was.
//!
//! By concern: this file holds the node's state and the tasks that follow the map
//! (serving, replica groups and their membership); `service` answers what other nodes
//! send; `handoff` moves a partition; `admin` is what operators ask (status, join,
//! rebalance, leave, remove). The router is [`crate::router`], placement
//! [`crate::placement`], a group replica's serving [`crate::serving`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use shardmall_actors::route::{RemoteAnswer, RemoteCall, ScanPage, ScanRequest};
use shardmall_actors::Shop;
use tokio::task::JoinSet;

use crate::group::Groups;
use crate::map::{ClusterMap, MapCommand, MapError, Member, MemberStatus, Move, NodeId};
use crate::proto::{self, Install, JoinRequest, Joined, Request, Response};
use crate::raft::{ControlError, ControlPlane};
use crate::router::ClusterRouter;
use crate::serving::{GroupRoute, Leaders};
use crate::transport::{BoxFuture, Service, Transport, TransportError};

mod admin;
mod grow;
mod handoff;
mod service;

pub use admin::{ClusterStatus, GroupStatus, MoveFailure, NodeStatus, RebalanceReport};
pub use service::Dispatcher;

/// How long a node whose map is behind a caller's waits for its map to catch up.
const CATCH_UP: Duration = Duration::from_secs(1);
/// How long a handoff keeps trying to commit its `Move` before giving up.
const COMMIT_MOVE_FOR: Duration = Duration::from_secs(15);
/// How long a partition's install may take on the receiving node (a large partition is
/// one large frame, written in one batch). A move asked of another node waits for
/// fencing, shipping and committing: three times that.
const HANDOFF_CALL: Duration = Duration::from_secs(60);
/// Partitions moved at once by a rebalance.
const PARALLEL_MOVES: usize = 4;
/// How long a liveness probe of a member may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long a replica whose group was placed elsewhere waits to hear of its removal
/// before it stops anyway (when it does not lead).
const RETIRE_AFTER: Duration = Duration::from_secs(30);

/// Rounds of leader moves a rebalance of a replicated cluster makes at most.
const LEADER_ROUNDS: usize = 4;
/// How long `cluster leave` of a replicated member waits for its replicas to move.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// Secrets a joining node receives, so every member signs and checks alike.
#[derive(Clone)]
pub struct SharedSecrets {
    pub jwt: Vec<u8>,
    pub payment: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadRequest(String),
}

impl From<ControlError> for ClusterError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Map(m) => ClusterError::Conflict(m.to_string()),
            other => ClusterError::Unavailable(other.to_string()),
        }
    }
}

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct ClusterMetrics {
    /// Entity commands sent to their owner on another node.
    pub forwarded: AtomicU64,
    /// Of those, the ones that found no answer (owner unreachable or failing).
    pub forward_failures: AtomicU64,
    /// Commands answered `wrong_owner` by the node they reached (stale maps).
    pub wrong_owner: AtomicU64,
    /// Commands routed again because their partition was moving.
    pub rerouted: AtomicU64,
    pub handoffs: AtomicU64,
    pub handoff_failures: AtomicU64,
    /// Sum of completed handoff durations, in microseconds.
    pub handoff_micros: AtomicU64,
}

/// One member node. Cheap to clone.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

struct Inner {
    me: Member,
    shop: Shop,
    control: ControlPlane,
    transport: Arc<dyn Transport>,
    secrets: SharedSecrets,
    /// `serving[p]`: partition `p` is unfenced here.
    serving: Vec<AtomicBool>,
    /// Partitions this node is handing over now (never unfenced by the map watcher).
    handing_off: Mutex<HashSet<u16>>,
    /// The epoch at which this node last handed each partition over.
    given_away: Mutex<HashMap<u16, u64>>,
    /// Serialises changes of `serving` (map watcher and handoffs).
    fence_lock: tokio::sync::Mutex<()>,
    /// The watcher has reconciled once (partitions owned at start-up are this node's own
    /// data; partitions gained later without an install are wiped first).
    reconciled: AtomicBool,
    /// Shared with the [`ClusterRouter`], which counts the forwarded calls.
    metrics: Arc<ClusterMetrics>,
    /// This node's replica groups, in a replicated cluster or one growing into replicas
    /// (ADR 0016).
    replication: Option<Replication>,
    /// The control plane's leader runs the formation of the groups now.
    forming: AtomicBool,
}

/// What a node of a replicated cluster runs: its group replicas, and the table of who
/// serves each group (shared with the router).
#[derive(Clone)]
pub struct Replication {
    pub groups: Arc<Groups>,
    pub leaders: Arc<Leaders>,
}

impl ClusterNode {
    pub fn new(
        me: Member,
        shop: Shop,
        control: ControlPlane,
        transport: Arc<dyn Transport>,
        secrets: SharedSecrets,
        router: &ClusterRouter,
        replication: Option<Replication>,
    ) -> ClusterNode {
        let partitions = usize::from(shop.partitioner().count());
        ClusterNode {
            inner: Arc::new(Inner {
                me,
                shop,
                control,
                transport,
                secrets,
                serving: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
                handing_off: Mutex::new(HashSet::new()),
                given_away: Mutex::new(HashMap::new()),
                fence_lock: tokio::sync::Mutex::new(()),
                reconciled: AtomicBool::new(false),
                metrics: router.metrics(),
                replication,
                forming: AtomicBool::new(false),
            }),
        }
    }

    /// Starts following the map: partitions this node owns are served, the others
    /// fenced.
    pub fn start(&self) {
        let node = self.clone();
        tokio::spawn(async move { node.follow_map().await });
        if self.inner.replication.is_some() {
            tokio::spawn(self.clone().keep_group_members());
        }
    }

    pub fn me(&self) -> &Member {
        &self.inner.me
    }

    pub fn control(&self) -> &ControlPlane {
        &self.inner.control
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.inner.metrics
    }

    pub fn map(&self) -> Arc<ClusterMap> {
        self.inner.control.map()
    }

    /// Ready to serve: the map is known and confirmed through consensus, a leader is
    /// known, and every partition this node owns is served or in handoff.
    pub fn is_ready(&self) -> bool {
        let map = self.map();
        if !map.is_initialised() || self.inner.control.leader().is_none() {
            return false;
        }
        if !self.inner.reconciled.load(Ordering::Acquire) {
            return false;
        }
        if map.is_replicated() {
            // Every group this node holds a replica of has a leader somewhere.
            let Some(r) = &self.inner.replication else {
                return false;
            };
            return !map.replicas.is_empty()
                && (0..map.groups).all(|g| {
                    !map.replicas_of(g).contains(&self.inner.me.node_id)
                        || r.leaders.leader(g).is_some()
                });
        }
        // A partition in handoff answers (after a short wait) from its new owner; it does
        // not take the whole node out of a load balancer's rotation.
        let moving = lock(&self.inner.handing_off).clone();
        map.owned_by(self.inner.me.node_id).iter().all(|p| {
            self.inner.serving[usize::from(*p)].load(Ordering::Acquire) || moving.contains(p)
        })
    }

    /// Partitions served here now.
    pub fn serving_count(&self) -> usize {
        self.inner
            .serving
            .iter()
            .filter(|s| s.load(Ordering::Relaxed))
            .count()
    }

    async fn follow_map(self) {
        let mut watch = self.inner.control.watch();
        // Nothing is served before this node's map shows every change committed so far:
        // a map persisted before a crash may still name this node the owner of a
        // partition it had handed over, whose new owner is serving it.
        self.barrier().await;
        loop {
            // Marks the current map seen; reconcile reads the newest under its lock.
            watch.borrow_and_update();
            self.reconcile().await;
            if watch.changed().await.is_err() {
                return;
            }
        }
    }

    /// Fences what this node no longer owns and serves what it owns.
    async fn reconcile(&self) {
        let inner = &self.inner;
        let _serial = inner.fence_lock.lock().await;
        // The newest map, read under the lock: one read before it could be older than a
        // handoff that finished while this waited, and would hand the partition back.
        let map = self.map();
        if !map.is_initialised() {
            return;
        }
        if map.is_replicated() {
            self.turn_replicated(&map).await;
            self.reconcile_groups(&map).await;
            inner.reconciled.store(true, Ordering::Release);
            return;
        }
        self.form_groups_when_due(&map);
        for p in 0..map.partitions {
            let owned = map.owner(p) == Some(inner.me.node_id);
            let serving = inner.serving[usize::from(p)].load(Ordering::Acquire);
            if owned && !serving {
                if lock(&inner.handing_off).contains(&p) {
                    continue;
                }
                // A map older than this node's own handoff of the partition is stale
                // about it (only reachable if catching up timed out).
                if lock(&inner.given_away)
                    .get(&p)
                    .is_some_and(|e| map.epoch < *e)
                {
                    continue;
                }
                if let Some(&epoch) = map.emptied.get(&p) {
                    if let Err(e) = self.start_empty(p, epoch).await {
                        tracing::error!(partition = p, error = %e, "cannot clear the partition; it stays fenced");
                        continue;
                    }
                }
                match inner.shop.unfence_partition(p).await {
                    Ok(()) => inner.serving[usize::from(p)].store(true, Ordering::Release),
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot serve an owned partition")
                    }
                }
            } else if !owned && serving {
                match inner.shop.fence_partition(p).await {
                    Ok(()) => inner.serving[usize::from(p)].store(false, Ordering::Release),
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot fence a partition this node no longer owns")
                    }
                }
            }
        }
        inner.reconciled.store(true, Ordering::Release);
    }

    /// A replicated cluster: places the groups once enough members are active (the
    /// control plane's leader does), and starts this node's replicas of the groups the
    /// map places here; each replica's watcher serves its partitions while it leads.
    async fn reconcile_groups(&self, map: &ClusterMap) {
        let inner = &self.inner;
        let Some(r) = &inner.replication else {
            tracing::error!(
                "the cluster is replicated but this node was started without replica groups"
            );
            return;
        };
        let me = inner.me.node_id;
        // The control plane's leader places the groups once enough members are active,
        // and places them again when a member is gone or leaving (its replicas go to
        // the least loaded active members); each group's leader then moves its
        // membership to match (`keep_group_members`).
        let active: Vec<NodeId> = map.active_members().map(|m| m.node_id).collect();
        let copies = usize::from(map.copies());
        if active.len() >= copies && inner.control.leader() == Some(me) {
            let current = if map.replicas.is_empty() {
                vec![Vec::new(); usize::from(map.groups)]
            } else {
                map.replicas.clone()
            };
            let plan = crate::placement::plan(&current, &active, copies);
            if plan.groups != map.replicas {
                let node = self.clone();
                tokio::spawn(async move {
                    match node
                        .inner
                        .control
                        .propose(MapCommand::PlaceGroups {
                            replicas: plan.groups,
                        })
                        .await
                    {
                        Ok(_) => tracing::info!("replica groups placed"),
                        Err(e) => tracing::warn!(error = %e, "placing the replica groups"),
                    }
                });
            }
        }
        if map.replicas.is_empty() {
            return;
        }
        let settings = r.groups.settings().clone();
        for g in 0..map.groups {
            let replicas = map.replicas_of(g);
            if !replicas.contains(&me) || r.groups.replica(g).is_some() {
                continue;
            }
            let replica = match r.groups.start(g).await {
                Ok(replica) => replica,
                Err(e) => {
                    tracing::error!(group = g, error = %e, "cannot start this node's replica of a group");
                    continue;
                }
            };
            tokio::spawn(crate::serving::watch_group(
                replica,
                r.leaders.clone(),
                inner.shop.clone(),
                settings.partitions_of(g),
                settings.heartbeat,
                settings.lease(),
            ));
            // The group's former initializes it, once; a map from before formers were
            // recorded names none, and the first replica does.
            let former = map
                .formers
                .get(usize::from(g))
                .or(replicas.first())
                .copied();
            if former == Some(me) {
                // Formed from data, a group starts with its former alone: the others
                // join as learners from its first snapshot (`Groups::place`).
                let voters: BTreeMap<NodeId, String> = replicas
                    .iter()
                    .filter(|n| !map.seeded || **n == me)
                    .filter_map(|n| map.members.get(n).map(|m| (*n, m.cluster_addr.clone())))
                    .collect();
                let groups = r.groups.clone();
                tokio::spawn(async move {
                    if let Err(e) = groups.initialize(g, &voters).await {
                        tracing::error!(group = g, error = %e, "cannot form a replica group");
                    }
                });
            }
        }
    }

    /// Every second, moves the membership of each group this node leads towards the
    /// replicas the map places it on: a replica placed on a new member joins as a
    /// learner, catches up, then becomes a voter in place of the one it replaces.
    async fn keep_group_members(self) {
        let Some(r) = self.inner.replication.as_ref() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when each local replica's group has been placed elsewhere.
        let mut moved_away: HashMap<u16, Instant> = HashMap::new();
        loop {
            tick.tick().await;
            let map = self.map();
            // Also on a tick: the control plane's leadership can move without a map
            // change.
            self.form_groups_when_due(&map);
            if !map.is_replicated() || map.replicas.is_empty() {
                continue;
            }
            for g in r.groups.running() {
                let placed = map.replicas_of(g);
                let leading = r.groups.replica(g).is_some_and(|x| x.is_leader());
                if !placed.contains(&self.inner.me.node_id) && !leading {
                    // Moved away: once the group's membership no longer names this
                    // node (or a while after), its replica stops (the watcher fences the
                    // partitions). A leader moves the group first (below), then steps
                    // down once the membership without it is committed.
                    let since = *moved_away.entry(g).or_insert_with(Instant::now);
                    if r.groups.retire(g, since.elapsed() > RETIRE_AFTER).await {
                        moved_away.remove(&g);
                        tracing::info!(group = g, "this node's replica moved elsewhere; stopped");
                    }
                    continue;
                }
                moved_away.remove(&g);
                let want: BTreeMap<NodeId, String> = placed
                    .iter()
                    .filter_map(|n| map.members.get(n).map(|m| (*n, m.cluster_addr.clone())))
                    .collect();
                if want.len() != placed.len() {
                    continue;
                }
                match r.groups.place(g, &want).await {
                    Ok(crate::group::Placed::Changed) => {
                        tracing::info!(group = g, replicas = ?placed, "replica group moved to its placement");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(group = g, error = %e, "moving a replica group"),
                }
            }
            self.leave_once_empty(&map, &r.groups).await;
        }
    }

    /// A leaving member whose replicas have all moved away takes itself out of the map
    /// (and the control plane's voters): `cluster leave` waits for this. The node does
    /// it, not the caller, because only it knows its last replica has stopped.
    async fn leave_once_empty(&self, map: &ClusterMap, groups: &Groups) {
        let me = self.inner.me.node_id;
        let leaving = map
            .members
            .get(&me)
            .is_some_and(|m| m.status == MemberStatus::Leaving);
        if !leaving || map.replicas.iter().any(|r| r.contains(&me)) || !groups.running().is_empty()
        {
            return;
        }
        let to = map.active_except(me);
        match self
            .inner
            .control
            .remove_node(me, MapCommand::ForgetMember { node: me, to })
            .await
        {
            Ok(_) => tracing::info!("every replica of this node moved away; it left the cluster"),
            Err(e) => tracing::warn!(error = %e, "leaving the cluster (tried again in a second)"),
        }
    }

    /// This node's replica groups, in a replicated cluster.
    pub fn replication(&self) -> Option<&Replication> {
        self.inner.replication.as_ref()
    }

    /// The most entries a replica is behind in the groups this node leads (0 when it
    /// leads none).
    pub fn max_replication_lag(&self) -> u64 {
        let Some(r) = &self.inner.replication else {
            return 0;
        };
        r.groups
            .running()
            .into_iter()
            .filter_map(|g| r.groups.replica(g))
            .map(|replica| {
                let m = replica.raft.metrics().borrow().clone();
                let last = m.last_log_index.unwrap_or(0);
                m.replication
                    .iter()
                    .flatten()
                    .map(|(_, at)| last.saturating_sub(at.map_or(0, |l| l.index)))
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// A partition the map handed to this node without its data (its owner was lost and
    /// forgotten at `epoch`) starts empty: whatever copy an earlier owner left here is
    /// cleared, once per such assignment (recorded in the log's metadata, so a restart
    /// does not clear what was written since).
    async fn start_empty(&self, partition: u16, epoch: u64) -> Result<(), String> {
        let wal = self.inner.shop.wal().clone();
        let key = format!("emptied/{partition}");
        let done = wal.meta_get(&key).map_err(|e| e.to_string())?;
        if done.as_deref() == Some(&epoch.to_be_bytes()[..]) {
            return Ok(());
        }
        tracing::warn!(
            partition,
            epoch,
            "partition assigned without its data (its owner was forgotten); starting it empty"
        );
        self.inner
            .shop
            .install_partition(partition, Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || wal.meta_put(&key, &epoch.to_be_bytes()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
