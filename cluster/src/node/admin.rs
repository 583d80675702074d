//! What operators ask of the cluster: status, join, rebalance, leave, remove.

use super::*;

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
    /// The copies the cluster keeps once enough members are active: above
    /// `replication_factor` while a cluster grows into replicas (ADR 0016).
    pub target_replication_factor: u8,
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
    /// What moved: `partitions` (one copy each), `replicas` (a replicated leave) or
    /// `leaders` (a replicated rebalance: groups whose leadership moved).
    pub kind: &'static str,
    pub planned: usize,
    pub moved: usize,
    pub failed: Vec<MoveFailure>,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MoveFailure {
    /// The partition that did not move; for a group, its first partition.
    pub partition: u16,
    /// The replica group whose leadership did not move (`leaders` only).
    pub group: Option<u16>,
    pub to: String,
    pub error: String,
}

impl ClusterNode {
    /// A new node asks to join: make it a voter and a member, and hand it the secrets.
    pub(super) async fn admit(&self, member: Member) -> Result<Joined, ClusterError> {
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
            target_replication_factor: map.target_factor.max(map.copies()),
            groups,
        }
    }

    pub(super) fn group_status(&self, map: &ClusterMap) -> Vec<GroupStatus> {
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

    pub(super) async fn probe(&self, m: &Member) -> bool {
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
            // (`reconcile_groups`); what a rebalance moves is leaderships.
            return self.rebalance_leaders().await;
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
        self.run_moves(map.plan_rebalance()).await
    }

    /// Runs partition moves, a few side by side, and reports them with a map that shows
    /// them.
    pub(super) async fn run_moves(&self, plan: Vec<Move>) -> RebalanceReport {
        let mut report = RebalanceReport {
            kind: "partitions",
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
                    group: None,
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

    /// A rebalance of a replicated cluster: evens out the groups each active member
    /// leads (at most `ceil(groups / members)` each), in rounds. In a round every member
    /// above that hands the surplus of its groups over (`Groups::hand_over`: one election
    /// each, side by side); the other voters elect one of themselves, so a round may
    /// leave another member above, and the next round moves again. A member that came
    /// back after a failure leads nothing until this runs.
    pub(super) async fn rebalance_leaders(&self) -> RebalanceReport {
        let mut report = RebalanceReport {
            kind: "leaders",
            ..RebalanceReport::default()
        };
        let Some(r) = self.inner.replication.as_ref() else {
            return report;
        };
        for _ in 0..LEADER_ROUNDS {
            let map = self.map();
            let active: Vec<NodeId> = map.active_members().map(|m| m.node_id).collect();
            if active.is_empty() || map.replicas.is_empty() {
                break;
            }
            let cap = usize::from(map.groups).div_ceil(active.len());
            let led = self.leaders_now(&map).await;
            let mut by_node: BTreeMap<NodeId, Vec<u16>> =
                active.iter().map(|n| (*n, Vec::new())).collect();
            for (g, leader) in led.iter().enumerate() {
                if let Some(groups) = leader.and_then(|l| by_node.get_mut(&l)) {
                    groups.push(g as u16);
                }
            }
            let surplus: Vec<(NodeId, u16)> = by_node
                .iter()
                .flat_map(|(n, groups)| groups.iter().skip(cap).map(move |g| (*n, *g)))
                .collect();
            if surplus.is_empty() {
                break;
            }
            report.planned += surplus.len();
            // Each group's leadership is meant for its least loaded other replica.
            let mut load: BTreeMap<NodeId, usize> = by_node
                .iter()
                .map(|(n, groups)| (*n, groups.len()))
                .collect();
            let mut running = JoinSet::new();
            for (from, g) in surplus {
                let node = self.clone();
                let addr = map.members.get(&from).map(|m| m.cluster_addr.clone());
                let groups = r.groups.clone();
                let to = map
                    .replicas_of(g)
                    .iter()
                    .copied()
                    .filter(|n| *n != from)
                    .min_by_key(|n| load.get(n).copied().unwrap_or(usize::MAX));
                if let Some(to) = to {
                    *load.entry(to).or_default() += 1;
                }
                let to = to.and_then(|n| map.members.get(&n).map(|m| (n, m.cluster_addr.clone())));
                running.spawn(async move {
                    let asked = match addr {
                        _ if from == node.inner.me.node_id => groups.hand_over(g).await,
                        Some(addr) => {
                            crate::group::network::hand_over_at(
                                node.inner.transport.as_ref(),
                                &addr,
                                g,
                            )
                            .await
                        }
                        None => Err(format!("node {from} is not a member")),
                    };
                    if asked.is_ok() {
                        if let Some((to, addr)) = to {
                            node.elect(g, from, to, &addr).await;
                        }
                    }
                    let moved = match asked {
                        Ok(()) => node.new_leader(g, from).await,
                        Err(e) => Err(e),
                    };
                    (from, g, moved)
                });
            }
            while let Some(done) = running.join_next().await {
                match done {
                    Ok((_, _, Ok(()))) => report.moved += 1,
                    Ok((from, g, Err(error))) => report.failed.push(MoveFailure {
                        partition: r
                            .groups
                            .settings()
                            .partitions_of(g)
                            .first()
                            .copied()
                            .unwrap_or(g),
                        group: Some(g),
                        to: self.name_of(from),
                        error,
                    }),
                    Err(e) => tracing::error!(error = %e, "a leader move task failed"),
                }
            }
        }
        report.epoch = self.map().epoch;
        report
    }

    /// Who leads each group as this node knows, once every group has a leader (or after
    /// a few seconds, what is known then).
    async fn leaders_now(&self, map: &ClusterMap) -> Vec<Option<NodeId>> {
        let Some(r) = self.inner.replication.as_ref() else {
            return Vec::new();
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let led: Vec<Option<NodeId>> = (0..map.groups).map(|g| r.leaders.leader(g)).collect();
            if led.iter().all(Option::is_some) || tokio::time::Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks the replica at `addr` to stand for election until `group` has a leader other
    /// than `old` (a few seconds at most): it is refused until the old leader's lease has
    /// run out (it is handing over, see `Groups::hand_over`), then wins with its vote.
    async fn elect(&self, group: u16, old: NodeId, to: NodeId, addr: &str) {
        let Some(r) = self.inner.replication.as_ref() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline
            && r.leaders.leader(group).is_none_or(|l| l == old)
        {
            let asked = if to == self.inner.me.node_id {
                r.groups.elect_instead_of(group, old).await
            } else {
                crate::group::network::elect_at(self.inner.transport.as_ref(), addr, group, old)
                    .await
            };
            if let Err(e) = asked {
                tracing::debug!(group, error = %e, "asking a replica to stand for election");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `group` has a leader other than `old` and, as far as this node's
    /// replica tells, its voters are the placed replicas (no membership change is under
    /// way).
    async fn new_leader(&self, group: u16, old: NodeId) -> Result<(), String> {
        let Some(r) = self.inner.replication.as_ref() else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let led = r.leaders.leader(group).is_some_and(|l| l != old);
            let placed: BTreeSet<NodeId> = self.map().replicas_of(group).iter().copied().collect();
            let whole = r.groups.replica(group).is_none_or(|replica| {
                let m = replica.raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                membership.get_joint_config().len() == 1
                    && membership.voter_ids().collect::<BTreeSet<_>>() == placed
            });
            if led && whole {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(if led {
                    format!("group {group} has a new leader, but its voters are not its placed replicas after 15 s")
                } else {
                    format!("group {group} elected no other leader within 15 s")
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// This node's map once it has applied `epoch` (or after a few seconds, whatever it
    /// holds then).
    pub(super) async fn caught_up(&self, epoch: u64) -> Arc<ClusterMap> {
        self.inner
            .control
            .wait_for_epoch(epoch, Duration::from_secs(5))
            .await
    }

    pub(super) fn name_of(&self, id: NodeId) -> String {
        self.map()
            .members
            .get(&id)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| id.to_string())
    }

    /// Asks the owner of `partition` (`from`) to hand it to `to`.
    pub(super) async fn request_move(
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

    pub(super) fn member_named(&self, name: &str) -> Result<Member, ClusterError> {
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
            return self.leave_replicated(&member, &map).await;
        }
        if map.active_except(member.node_id).is_empty() {
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

    /// [`ClusterNode::leave`] in a replicated cluster: the node is marked leaving, the
    /// control plane's leader places its replicas on the other members, each group's
    /// leader adds them as learners, promotes them once caught up and drops the leaving
    /// node's replica (a group it led elects another leader first: one election, no
    /// other pause). Once it holds no replica, the leaving node takes itself out of the
    /// map (`leave_once_empty`); this call waits for that.
    async fn leave_replicated(
        &self,
        member: &Member,
        map: &ClusterMap,
    ) -> Result<RebalanceReport, ClusterError> {
        let name = &member.name;
        // The leaving node takes itself out once its replicas have moved: one that is
        // down never would.
        if member.node_id != self.inner.me.node_id && !self.probe(member).await {
            return Err(ClusterError::Conflict(format!(
                "{name} is down: a leave needs it running; restart it, or `shardmall cluster remove {name}` (its groups keep a majority on the others)"
            )));
        }
        let others = map.active_except(member.node_id).len();
        let copies = usize::from(map.copies());
        if others < copies {
            return Err(ClusterError::Conflict(format!(
                "{name} cannot leave: {others} other active members are left for {copies} replicas per group; join another node first"
            )));
        }
        if member.status != MemberStatus::Leaving {
            self.inner
                .control
                .propose(MapCommand::SetStatus {
                    node: member.node_id,
                    status: MemberStatus::Leaving,
                })
                .await?;
        }
        let planned = map
            .replicas
            .iter()
            .filter(|r| r.contains(&member.node_id))
            .count();
        let deadline = tokio::time::Instant::now() + LEAVE_TIMEOUT;
        loop {
            let latest = match self.inner.control.latest().await {
                Ok(latest) => latest,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the leader's map while a node leaves");
                    (*self.map()).clone()
                }
            };
            if !latest.members.contains_key(&member.node_id) {
                tracing::info!(node = %name, "node left the cluster");
                return Ok(RebalanceReport {
                    kind: "replicas",
                    planned,
                    moved: planned,
                    failed: Vec::new(),
                    epoch: self.caught_up(latest.epoch).await.epoch,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                let holding = latest
                    .replicas
                    .iter()
                    .filter(|r| r.contains(&member.node_id))
                    .count();
                return Err(ClusterError::Unavailable(format!(
                    "{name} is still leaving after {}s ({holding} groups still placed on it): run leave again, or stop it and `shardmall cluster remove {name}`",
                    LEAVE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
            let to = map.active_except(member.node_id);
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
    pub(super) async fn remove_replica_holder(
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
        let others = map.active_except(member.node_id).len();
        let copies = usize::from(map.copies());
        if others < copies && !force {
            return Err(ClusterError::Conflict(format!(
                "{name} is down; without it {others} active members are left for {copies} replicas per group:                  restart it with its data dir, or remove it with force=true and join a fresh node,                  which rebuilds its replicas from the others"
            )));
        }
        let to = map.active_except(member.node_id);
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
