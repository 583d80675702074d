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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use shardmall_actors::route::{RemoteAnswer, RemoteCall, ScanPage, ScanRequest};
use shardmall_actors::Shop;
use tokio::task::JoinSet;

use crate::group::Groups;
use crate::map::{ClusterMap, MapCommand, MapError, Member, MemberStatus, NodeId};
use crate::proto::{self, Install, JoinRequest, Joined, Request, Response};
use crate::raft::{ControlError, ControlPlane};
use crate::router::ClusterRouter;
use crate::serving::{GroupRoute, Leaders};
use crate::transport::{BoxFuture, Service, Transport, TransportError};

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
    /// This node's replica groups, in a replicated cluster (ADR 0016).
    replication: Option<Replication>,
}

/// What a node of a replicated cluster runs: its group replicas, and the table of who
/// serves each group (shared with the router).
#[derive(Clone)]
pub struct Replication {
    pub groups: Arc<Groups>,
    pub leaders: Arc<Leaders>,
}

/// What a member looks like to an operator.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub http_addr: String,
    pub cluster_addr: String,
    /// `up`, `leaving` or `down` (did not answer a probe).
    pub status: String,
    pub partitions: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub epoch: u64,
    pub partitions: u32,
    /// The leader's name, or `null` while there is none.
    pub leader: Option<String>,
    pub nodes: Vec<NodeStatus>,
    /// Copies of every partition (1: each partition has one owner).
    pub replication_factor: u8,
    /// The replica groups of a replicated cluster (empty otherwise).
    pub groups: Vec<GroupStatus>,
}

/// One replica group as this node sees it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group_id: u16,
    pub partitions: Vec<u16>,
    /// The leader's name as this node knows it, `null` while there is none.
    pub leader: Option<String>,
    /// Where the map places the group's replicas.
    pub replicas: Vec<String>,
    /// The group's voting members as this node's replica knows them (empty when it holds
    /// none): equal to `replicas` once a move has finished.
    pub voters: Vec<String>,
    /// Entries each replica is behind the leader's log; known when this node leads.
    pub lag: BTreeMap<String, u64>,
}

/// The outcome of a rebalance (or of the moves a leave made).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RebalanceReport {
    pub planned: usize,
    pub moved: usize,
    pub failed: Vec<MoveFailure>,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoveFailure {
    pub partition: u16,
    pub to: String,
    pub error: String,
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
            self.reconcile_groups(&map).await;
            inner.reconciled.store(true, Ordering::Release);
            return;
        }
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
                let voters: BTreeMap<NodeId, String> = replicas
                    .iter()
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

    // ---- serving other nodes ------------------------------------------------------

    async fn serve_frame(&self, frame: Vec<u8>) -> Response {
        let req = match proto::decode::<Request>(&frame) {
            Ok(r) => r,
            Err(e) => return Response::Error(e.to_string()),
        };
        match req {
            Request::Raft(body) => Response::Raft(self.inner.control.serve_raft(body).await),
            Request::Entity { epoch, call } => {
                Response::Entity(self.serve_entity(epoch, call).await)
            }
            Request::Scan(req) => match self.scan_here(&req) {
                Ok(page) => Response::Scan(page),
                Err(e) => Response::Error(e),
            },
            Request::Join(JoinRequest { member }) => match self.admit(member).await {
                Ok(joined) => Response::Joined(joined),
                Err(e) => Response::Error(e.to_string()),
            },
            Request::MovePartition { partition, to } => match self.hand_off(partition, to).await {
                Ok(epoch) => Response::Moved { epoch },
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Install(install) => match self.install(install).await {
                Ok(()) => Response::Installed,
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Ping => Response::Pong {
                node_id: self.inner.me.node_id,
                map: (*self.map()).clone(),
            },
            Request::Group(body) => match &self.inner.replication {
                Some(r) => crate::group::network::answer(&r.groups, body).await,
                None => Response::Error("this node runs no replica groups".into()),
            },
        }
    }

    async fn serve_entity(&self, epoch: u64, call: RemoteCall) -> RemoteAnswer {
        let me = self.inner.me.node_id;
        let mut map = self.map();
        if map.is_replicated() {
            let group = map.group_of(call.partition);
            let Some(r) = self.inner.replication.as_ref() else {
                return RemoteAnswer::Moving;
            };
            if r.leaders.route(group) != GroupRoute::Here {
                self.inner
                    .metrics
                    .wrong_owner
                    .fetch_add(1, Ordering::Relaxed);
                // Not the group's leader (any more, or yet): the caller routes again, to
                // the leader this node's replica knows of (a node without a replica of
                // the group names none: its knowledge is second hand).
                let leader = r
                    .groups
                    .replica(group)
                    .and_then(|_| r.leaders.leader(group))
                    .filter(|l| *l != me);
                return RemoteAnswer::NotLeader { leader };
            }
            return self.inner.shop.serve_remote(call).await;
        }
        if map.owner(call.partition) != Some(me) && epoch > map.epoch {
            // The caller knows a newer map: this node may be about to own it.
            map = self.inner.control.wait_for_epoch(epoch, CATCH_UP).await;
        }
        if map.owner(call.partition) != Some(me) {
            self.inner
                .metrics
                .wrong_owner
                .fetch_add(1, Ordering::Relaxed);
            return RemoteAnswer::WrongOwner { epoch: map.epoch };
        }
        self.inner.shop.serve_remote(call).await
    }

    fn scan_here(&self, req: &ScanRequest) -> Result<ScanPage, String> {
        self.inner.shop.scan_local(req).map_err(|e| e.to_string())
    }

    /// A new node asks to join: make it a voter and a member, and hand it the secrets.
    async fn admit(&self, member: Member) -> Result<Joined, ClusterError> {
        if member.name.is_empty() || member.node_id != crate::map::node_id_of(&member.name) {
            return Err(ClusterError::BadRequest("malformed member".into()));
        }
        let map = self.inner.control.add_voter(member.clone()).await?;
        tracing::info!(node = %member.name, cluster_addr = %member.cluster_addr, epoch = map.epoch, "node joined");
        Ok(Joined {
            map,
            jwt_secret: self.inner.secrets.jwt.clone(),
            payment_secret: self.inner.secrets.payment.clone(),
        })
    }

    // ---- partition handoff ----------------------------------------------------------

    /// Hands `partition`, which this node owns, to `to`. Returns the map's epoch after
    /// the move.
    pub async fn hand_off(&self, partition: u16, to: NodeId) -> Result<u64, ClusterError> {
        // Runs to its end even if the caller stops waiting (an operator's Ctrl-C, a
        // proxy's timeout): a handoff cut short would leave the partition fenced.
        let node = self.clone();
        tokio::spawn(async move { node.hand_off_to_the_end(partition, to).await })
            .await
            .map_err(|e| ClusterError::Unavailable(format!("the handoff task failed: {e}")))?
    }

    async fn hand_off_to_the_end(&self, partition: u16, to: NodeId) -> Result<u64, ClusterError> {
        let inner = &self.inner;
        let me = inner.me.node_id;
        let map = self.map();
        if partition >= map.partitions {
            return Err(ClusterError::BadRequest(format!(
                "partition {partition} does not exist"
            )));
        }
        if map.owner(partition) != Some(me) {
            return Err(ClusterError::Conflict(format!(
                "partition {partition} is not owned by {}",
                inner.me.name
            )));
        }
        let target = match map.members.get(&to) {
            Some(m) if m.status == MemberStatus::Active && to != me => m.clone(),
            Some(_) => {
                return Err(ClusterError::Conflict(format!(
                    "node {to} cannot take partitions"
                )))
            }
            None => return Err(ClusterError::NotFound(format!("node {to} is not a member"))),
        };
        if !lock(&inner.handing_off).insert(partition) {
            return Err(ClusterError::Conflict(format!(
                "partition {partition} is already moving"
            )));
        }
        let started = Instant::now();
        let outcome = self.move_out(partition, &target, map.epoch).await;
        if let Ok(epoch) = &outcome {
            lock(&inner.given_away).insert(partition, *epoch);
            // Until this node's map shows the move, a map from before it would say this
            // node still owns the partition: it stays marked as handed off until then.
            self.caught_up(*epoch).await;
        }
        let outcome = match outcome {
            Ok(epoch) => Ok(epoch),
            Err(MoveFailed {
                error,
                maybe_committed: false,
            }) => Err(error),
            Err(MoveFailed {
                error,
                maybe_committed: true,
            }) => {
                // Whether the map flipped is unknown: this node must not serve the
                // partition again on a map that may predate the flip. It stays fenced
                // (and marked as moving) until a barrier through consensus shows this
                // node every committed change; then the map decides.
                inner
                    .metrics
                    .handoff_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, to = %target.name, error = %error, "partition handoff outcome unknown; it stays fenced until the map settles");
                let node = self.clone();
                tokio::spawn(async move { node.settle(partition).await });
                return Err(error);
            }
        };
        lock(&inner.handing_off).remove(&partition);
        match &outcome {
            Ok(epoch) => {
                inner.metrics.handoffs.fetch_add(1, Ordering::Relaxed);
                inner
                    .metrics
                    .handoff_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                tracing::info!(partition, to = %target.name, epoch, took = ?started.elapsed(), "partition handed over");
                // The new owner holds it durably: this copy is dead weight now.
                let _serial = inner.fence_lock.lock().await;
                if self.map().owner(partition) != Some(me)
                    && !inner.serving[usize::from(partition)].load(Ordering::Acquire)
                {
                    if let Err(e) = inner.shop.install_partition(partition, Vec::new()).await {
                        tracing::warn!(partition, error = %e, "could not drop the handed-over copy; it stays, unused");
                    }
                }
            }
            Err(e) => {
                inner
                    .metrics
                    .handoff_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, to = %target.name, error = %e, "partition handoff failed");
                // Serve it here again, unless the map already says otherwise (the
                // watcher then does what the map says).
                let _serial = inner.fence_lock.lock().await;
                if self.map().owner(partition) == Some(me)
                    && !inner.serving[usize::from(partition)].load(Ordering::Acquire)
                    && inner.shop.unfence_partition(partition).await.is_ok()
                {
                    inner.serving[usize::from(partition)].store(true, Ordering::Release);
                }
            }
        }
        outcome
    }

    /// After a move whose commit is in doubt: waits until this node has applied
    /// everything consensus committed (a no-op change goes through and is applied here),
    /// then lets the map decide who serves the partition.
    async fn settle(&self, partition: u16) {
        self.barrier().await;
        lock(&self.inner.handing_off).remove(&partition);
        self.reconcile().await;
    }

    /// Returns once this node has applied every map change committed before the call
    /// (a no-op change goes through consensus and is applied here). Retries for as long
    /// as consensus cannot be reached: what needs it must not act on a stale map.
    async fn barrier(&self) {
        loop {
            match self.inner.control.propose(MapCommand::Barrier).await {
                Ok(map) => {
                    self.caught_up(map.epoch).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for consensus to confirm the map");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn move_out(
        &self,
        partition: u16,
        target: &Member,
        epoch: u64,
    ) -> Result<u64, MoveFailed> {
        let inner = &self.inner;
        {
            let _serial = inner.fence_lock.lock().await;
            inner.serving[usize::from(partition)].store(false, Ordering::Release);
            inner
                .shop
                .fence_partition(partition)
                .await
                .map_err(|e| MoveFailed::before(ClusterError::Unavailable(e.to_string())))?;
        }
        let entities = inner.shop.export_partition(partition).await.map_err(|e| {
            MoveFailed::before(ClusterError::Unavailable(format!(
                "exporting partition {partition}: {e}"
            )))
        })?;
        let frame = proto::encode(&Request::Install(Install {
            partition,
            epoch,
            entities,
        }));
        match inner
            .transport
            .call_for(&target.cluster_addr, frame, HANDOFF_CALL)
            .await
        {
            Ok(answer) => match proto::decode::<Response>(&answer) {
                Ok(Response::Installed) => {}
                Ok(Response::Error(e)) => {
                    return Err(MoveFailed::before(ClusterError::Unavailable(format!(
                        "{} refused the partition: {e}",
                        target.name
                    ))))
                }
                Ok(other) => {
                    return Err(MoveFailed::before(ClusterError::Unavailable(format!(
                        "unexpected answer to an install: {other:?}"
                    ))))
                }
                Err(e) => return Err(MoveFailed::before(ClusterError::Unavailable(e.to_string()))),
            },
            Err(e) => return Err(MoveFailed::before(ClusterError::Unavailable(e.to_string()))),
        }
        self.commit_move(partition, target.node_id)
            .await
            .map_err(|error| MoveFailed {
                // A refusal by the map is certain; anything else may have committed.
                maybe_committed: !matches!(error, ClusterError::Conflict(_)),
                error,
            })
    }

    /// Commits the map flip. `Move` is a compare-and-set on the owner, so trying again
    /// after an answer was lost is safe: finding the target already the owner means an
    /// earlier try committed.
    async fn commit_move(&self, partition: u16, to: NodeId) -> Result<u64, ClusterError> {
        let me = self.inner.me.node_id;
        let deadline = Instant::now() + COMMIT_MOVE_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let cmd = MapCommand::Move {
                partition,
                from: me,
                to,
            };
            match self.inner.control.propose(cmd).await {
                Ok(map) => return Ok(map.epoch),
                Err(ControlError::Map(MapError::NotOwner { owner, .. })) if owner == to => {
                    // An earlier try committed. Its epoch is not in the refusal: catch up
                    // with everything committed, which includes it.
                    self.barrier().await;
                    return Ok(self.map().epoch);
                }
                Err(ControlError::Map(e @ MapError::NotOwner { .. })) => {
                    // Someone else owns it at the leader: an earlier try (whose answer
                    // was lost) may have committed and the partition moved on since, or
                    // this node's map was stale. Either way this node must not serve it
                    // on its own map: the caller lets consensus settle it.
                    return Err(ClusterError::Unavailable(format!(
                        "the move of partition {partition} may have committed: {e}"
                    )));
                }
                Err(ControlError::Map(e)) => {
                    // The target cannot take it: certainly not moved.
                    return Err(ClusterError::Conflict(e.to_string()));
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(partition, error = %e, "committing a partition move; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    // The move may or may not have committed: the partition stays fenced
                    // here until the map says who owns it (the watcher unfences it if
                    // this node still does).
                    return Err(ClusterError::Unavailable(format!(
                        "the move of partition {partition} could not be committed: {e}"
                    )));
                }
            }
        }
    }

    /// Receives a partition: replaces this node's copy of it. It is served once the map
    /// says this node owns it.
    async fn install(&self, install: Install) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let p = install.partition;
        if p >= inner.shop.partitioner().count() {
            return Err(ClusterError::BadRequest(format!(
                "partition {p} does not exist"
            )));
        }
        let _serial = inner.fence_lock.lock().await;
        if inner.serving[usize::from(p)].load(Ordering::Acquire) {
            return Err(ClusterError::Conflict(format!(
                "partition {p} is served here already"
            )));
        }
        let count = install.entities.len();
        inner
            .shop
            .install_partition(p, install.entities)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        tracing::info!(partition = p, entities = count, "partition installed");
        Ok(())
    }

    // ---- operator commands ----------------------------------------------------------

    /// The map, the leader and each member's liveness.
    pub async fn status(&self) -> ClusterStatus {
        let map = self.map();
        let leader = self
            .inner
            .control
            .leader()
            .and_then(|id| map.members.get(&id))
            .map(|m| m.name.clone());
        let mut probes = JoinSet::new();
        for m in map.members.values() {
            let node = self.clone();
            let m = m.clone();
            probes.spawn(async move {
                let up = m.node_id == node.inner.me.node_id || node.probe(&m).await;
                (m.node_id, up)
            });
        }
        let mut up = BTreeMap::new();
        while let Some(res) = probes.join_next().await {
            if let Ok((id, alive)) = res {
                up.insert(id, alive);
            }
        }
        let groups = self.group_status(&map);
        // Replicated: a node serves the partitions of the groups it leads.
        let mut led: HashMap<String, u32> = HashMap::new();
        for g in &groups {
            if let Some(l) = &g.leader {
                *led.entry(l.clone()).or_default() += g.partitions.len() as u32;
            }
        }
        let nodes = map
            .members
            .values()
            .map(|m| NodeStatus {
                node_id: m.name.clone(),
                http_addr: m.http_addr.clone(),
                cluster_addr: m.cluster_addr.clone(),
                status: if !up.get(&m.node_id).copied().unwrap_or(false) {
                    "down".into()
                } else {
                    match m.status {
                        MemberStatus::Active => "up".into(),
                        MemberStatus::Leaving => "leaving".into(),
                    }
                },
                partitions: if map.is_replicated() {
                    led.get(&m.name).copied().unwrap_or(0)
                } else {
                    map.owned_by(m.node_id).len() as u32
                },
            })
            .collect();
        ClusterStatus {
            cluster_id: map.cluster_id.clone(),
            epoch: map.epoch,
            partitions: u32::from(map.partitions),
            leader,
            nodes,
            replication_factor: map.copies(),
            groups,
        }
    }

    fn group_status(&self, map: &ClusterMap) -> Vec<GroupStatus> {
        let Some(r) = self
            .inner
            .replication
            .as_ref()
            .filter(|_| map.is_replicated())
        else {
            return Vec::new();
        };
        let name = |id: NodeId| {
            map.members
                .get(&id)
                .map_or_else(|| id.to_string(), |m| m.name.clone())
        };
        (0..map.groups)
            .map(|g| {
                let mut lag = BTreeMap::new();
                let mut voters = Vec::new();
                if let Some(replica) = r.groups.replica(g) {
                    let m = replica.raft.metrics().borrow().clone();
                    let last = m.last_log_index.unwrap_or(0);
                    for (id, matched) in m.replication.iter().flatten() {
                        let at = matched.map_or(0, |l| l.index);
                        lag.insert(name(*id), last.saturating_sub(at));
                    }
                    voters = m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .map(name)
                        .collect();
                }
                GroupStatus {
                    group_id: g,
                    partitions: r.groups.settings().partitions_of(g),
                    leader: r.leaders.leader(g).map(name),
                    replicas: map.replicas_of(g).iter().map(|n| name(*n)).collect(),
                    voters,
                    lag,
                }
            })
            .collect()
    }

    async fn probe(&self, m: &Member) -> bool {
        let call = self
            .inner
            .transport
            .call(&m.cluster_addr, proto::encode(&Request::Ping));
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, call).await,
            Ok(Ok(answer)) if matches!(proto::decode::<Response>(&answer), Ok(Response::Pong { .. }))
        )
    }

    /// Spreads the partitions evenly over the active members (and empties leaving
    /// ones), moving as few as possible.
    pub async fn rebalance(&self) -> RebalanceReport {
        if self.map().is_replicated() {
            // Replicas are placed by the control plane's leader whenever members change
            // (`reconcile_groups`); partitions are not handed over one by one.
            return RebalanceReport {
                epoch: self.map().epoch,
                ..RebalanceReport::default()
            };
        }
        // Planned on the cluster's latest map, not on what this node has applied so far:
        // a member that joined a moment ago must get its share.
        let map = match self.inner.control.latest().await {
            Ok(latest) => self.caught_up(latest.epoch).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the leader's map; planning on this node's");
                self.map()
            }
        };
        let plan = map.plan_rebalance();
        let mut report = RebalanceReport {
            planned: plan.len(),
            ..RebalanceReport::default()
        };
        let mut moves = plan.into_iter();
        let mut running = JoinSet::new();
        let mut last_epoch = 0;
        loop {
            while running.len() < PARALLEL_MOVES {
                let Some(mv) = moves.next() else { break };
                let node = self.clone();
                running.spawn(async move {
                    (mv, node.request_move(mv.partition, mv.from, mv.to).await)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((_, Ok(epoch))) => {
                    report.moved += 1;
                    last_epoch = last_epoch.max(epoch);
                }
                Ok((mv, Err(e))) => report.failed.push(MoveFailure {
                    partition: mv.partition,
                    to: self.name_of(mv.to),
                    error: e.to_string(),
                }),
                Err(e) => tracing::error!(error = %e, "a partition move task failed"),
            }
        }
        report.failed.sort_by_key(|f| f.partition);
        // The moves committed on the leader; answer with a map that shows them.
        report.epoch = self.caught_up(last_epoch).await.epoch;
        report
    }

    /// This node's map once it has applied `epoch` (or after a few seconds, whatever it
    /// holds then).
    async fn caught_up(&self, epoch: u64) -> Arc<ClusterMap> {
        self.inner
            .control
            .wait_for_epoch(epoch, Duration::from_secs(5))
            .await
    }

    fn name_of(&self, id: NodeId) -> String {
        self.map()
            .members
            .get(&id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// Asks the owner of `partition` (`from`) to hand it to `to`.
    async fn request_move(
        &self,
        partition: u16,
        from: NodeId,
        to: NodeId,
    ) -> Result<u64, ClusterError> {
        if from == self.inner.me.node_id {
            return self.hand_off(partition, to).await;
        }
        let map = self.map();
        let owner = map
            .members
            .get(&from)
            .ok_or_else(|| ClusterError::NotFound(format!("node {from} is not a member")))?;
        let frame = proto::encode(&Request::MovePartition { partition, to });
        let answer = self
            .inner
            .transport
            .call_for(&owner.cluster_addr, frame, HANDOFF_CALL * 3)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        match proto::decode::<Response>(&answer) {
            Ok(Response::Moved { epoch }) => Ok(epoch),
            Ok(Response::Error(e)) => Err(ClusterError::Unavailable(e)),
            Ok(other) => Err(ClusterError::Unavailable(format!(
                "unexpected answer: {other:?}"
            ))),
            Err(e) => Err(ClusterError::Unavailable(e.to_string())),
        }
    }

    fn member_named(&self, name: &str) -> Result<Member, ClusterError> {
        self.map()
            .member_named(name)
            .cloned()
            .ok_or_else(|| ClusterError::NotFound(format!("node {name} is not a member")))
    }

    /// A graceful leave: the node takes no more partitions, hands over those it owns,
    /// then leaves the map and the voters.
    pub async fn leave(&self, name: &str) -> Result<RebalanceReport, ClusterError> {
        let member = self.member_named(name)?;
        let map = self.map();
        if map.is_replicated() {
            // Handoffs move partitions between single copies; replicas move by their
            // groups' membership changes, which `remove` starts.
            return Err(ClusterError::Conflict(format!(
                "a replicated cluster does not hand partitions over: stop {name}, then                  `shardmall cluster remove {name}` places its replicas on the other members                  (the groups it led elect a new leader within seconds)"
            )));
        }
        if map
            .active_members()
            .filter(|m| m.node_id != member.node_id)
            .count()
            == 0
        {
            return Err(ClusterError::Conflict(format!(
                "{name} is the only active member: no node could take its partitions"
            )));
        }
        if member.status != MemberStatus::Leaving {
            let map = self
                .inner
                .control
                .propose(MapCommand::SetStatus {
                    node: member.node_id,
                    status: MemberStatus::Leaving,
                })
                .await?;
            // Plan from a map in which the node is leaving, not from this node's older one.
            self.caught_up(map.epoch).await;
        }
        let report = self.rebalance().await;
        let left = self.map().owned_by(member.node_id).len();
        if left > 0 {
            return Err(ClusterError::Unavailable(format!(
                "{name} still owns {left} partitions ({} moves failed); run leave again",
                report.failed.len()
            )));
        }
        let map = self
            .inner
            .control
            .remove_node(
                member.node_id,
                MapCommand::RemoveMember {
                    node: member.node_id,
                },
            )
            .await?;
        tracing::info!(node = %name, "node left the cluster");
        Ok(RebalanceReport {
            epoch: self.caught_up(map.epoch).await.epoch,
            ..report
        })
    }

    /// Removes a member. One that owns partitions must leave instead; one that is down
    /// with partitions is only removed with `force`, which gives up the data those
    /// partitions held (there are no replicas yet): they restart empty on the others.
    pub async fn remove(&self, name: &str, force: bool) -> Result<ClusterStatus, ClusterError> {
        let member = self.member_named(name)?;
        let map = self.map();
        if map.is_replicated() {
            return self.remove_replica_holder(&member, &map, force).await;
        }
        let owned = map.owned_by(member.node_id).len();
        let cmd = if owned == 0 {
            MapCommand::RemoveMember {
                node: member.node_id,
            }
        } else if member.node_id == self.inner.me.node_id || self.probe(&member).await {
            return Err(ClusterError::Conflict(format!(
                "{name} is up and owns {owned} partitions: use `shardmall cluster leave {name}` to hand them over first"
            )));
        } else if !force {
            return Err(ClusterError::Conflict(format!(
                "{name} is down and owns {owned} partitions: restart it with its data dir, or remove it with force=true, which gives up the data of those partitions"
            )));
        } else {
            let to: Vec<NodeId> = map
                .active_members()
                .map(|m| m.node_id)
                .filter(|id| *id != member.node_id)
                .collect();
            tracing::warn!(node = %name, partitions = owned, "forgetting a lost node: its partitions restart empty");
            MapCommand::ForgetMember {
                node: member.node_id,
                to,
            }
        };
        let map = self.inner.control.remove_node(member.node_id, cmd).await?;
        self.caught_up(map.epoch).await;
        Ok(self.status().await)
    }

    /// [`ClusterNode::remove`] in a replicated cluster: a member that is down loses
    /// nothing when it goes (its groups keep a majority on the others), so `force` is
    /// only needed while too few members would be left to hold every group's replicas;
    /// its replicas are placed on the other members once enough are active, and rebuilt
    /// there from the survivors (`keep_group_members`).
    async fn remove_replica_holder(
        &self,
        member: &Member,
        map: &ClusterMap,
        force: bool,
    ) -> Result<ClusterStatus, ClusterError> {
        let name = &member.name;
        if member.node_id == self.inner.me.node_id || self.probe(member).await {
            return Err(ClusterError::Conflict(format!(
                "{name} is up: use `shardmall cluster leave {name}` to move its replicas first"
            )));
        }
        let others = map
            .active_members()
            .filter(|m| m.node_id != member.node_id)
            .count();
        let copies = usize::from(map.copies());
        if others < copies && !force {
            return Err(ClusterError::Conflict(format!(
                "{name} is down; without it {others} active members are left for {copies} replicas per group:                  restart it with its data dir, or remove it with force=true and join a fresh node,                  which rebuilds its replicas from the others"
            )));
        }
        let to: Vec<NodeId> = map
            .active_members()
            .map(|m| m.node_id)
            .filter(|id| *id != member.node_id)
            .collect();
        tracing::warn!(node = %name, "removing a lost node: its replicas are rebuilt on the others");
        let map = self
            .inner
            .control
            .remove_node(
                member.node_id,
                MapCommand::ForgetMember {
                    node: member.node_id,
                    to,
                },
            )
            .await?;
        self.caught_up(map.epoch).await;
        Ok(self.status().await)
    }

    /// Whether the other members say this node is no longer one of them: a node that
    /// left or was removed must not serve again from the map it kept, which still names
    /// it the owner of partitions others now own. Asks every other member it knows (a
    /// few seconds at most); `None` when none answers (then its own map stands).
    pub async fn removed_elsewhere(
        transport: &dyn Transport,
        map: &ClusterMap,
        me: NodeId,
    ) -> Option<bool> {
        let mut asks = JoinSet::new();
        for m in map.members.values().filter(|m| m.node_id != me) {
            let call = transport.call(&m.cluster_addr, proto::encode(&Request::Ping));
            asks.spawn(async move { tokio::time::timeout(PROBE_TIMEOUT * 2, call).await });
        }
        let mut verdict = None;
        while let Some(done) = asks.join_next().await {
            let Ok(Ok(Ok(answer))) = done else { continue };
            if let Ok(Response::Pong { map: theirs, .. }) = proto::decode::<Response>(&answer) {
                if theirs.cluster_id == map.cluster_id && theirs.epoch > map.epoch {
                    verdict = Some(verdict.unwrap_or(false) || !theirs.members.contains_key(&me));
                } else {
                    verdict = Some(verdict.unwrap_or(false));
                }
            }
        }
        verdict
    }

    /// Joins the cluster that the member at `seed` belongs to. Returns what the cluster
    /// shares with its members.
    pub async fn join(
        transport: &dyn Transport,
        seed: &str,
        me: &Member,
    ) -> Result<Joined, ClusterError> {
        let frame = proto::encode(&Request::Join(JoinRequest { member: me.clone() }));
        let answer = transport.call(seed, frame).await.map_err(|e| match e {
            // Retrying cannot help: the secrets differ.
            TransportError::Refused { .. } => ClusterError::Conflict(e.to_string()),
            other => ClusterError::Unavailable(other.to_string()),
        })?;
        match proto::decode::<Response>(&answer) {
            Ok(Response::Joined(j)) => Ok(j),
            Ok(Response::Error(e)) => Err(ClusterError::Conflict(e)),
            Ok(other) => Err(ClusterError::Unavailable(format!(
                "unexpected answer: {other:?}"
            ))),
            Err(e) => Err(ClusterError::Unavailable(e.to_string())),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a partition did not move, and whether the map may have flipped anyway.
struct MoveFailed {
    error: ClusterError,
    maybe_committed: bool,
}

impl MoveFailed {
    /// Failed before the map flip was proposed: certainly not moved.
    fn before(error: ClusterError) -> Self {
        MoveFailed {
            error,
            maybe_committed: false,
        }
    }
}

/// The frames other nodes send, answered by this node once it exists: transports start
/// before the node (consensus needs them), so the node is set later.
#[derive(Default)]
pub struct Dispatcher {
    node: OnceLock<ClusterNode>,
    /// Before the node exists, consensus frames still need an answer.
    control: OnceLock<ControlPlane>,
}

impl Dispatcher {
    pub fn new() -> Arc<Dispatcher> {
        Arc::new(Dispatcher::default())
    }

    pub fn set_control(&self, control: ControlPlane) {
        let _ = self.control.set(control);
    }

    pub fn set_node(&self, node: ClusterNode) {
        let _ = self.node.set(node);
    }
}

impl Service for Dispatcher {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        if let Some(node) = self.node.get().cloned() {
            return Box::pin(async move { proto::encode(&node.serve_frame(frame).await) });
        }
        let control = self.control.get().cloned();
        Box::pin(async move {
            let answer = match (proto::decode::<Request>(&frame), control) {
                (Ok(Request::Raft(body)), Some(c)) => Response::Raft(c.serve_raft(body).await),
                (Ok(_), _) => Response::Error("this node is starting".into()),
                (Err(e), _) => Response::Error(e.to_string()),
            };
            proto::encode(&answer)
        })
    }
}
