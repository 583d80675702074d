//! A cluster growing into replicas (ADR 0016, "Growing into replicas"): one copy per
//! partition, served by its owner, until the target factor of members is active; then
//! the control plane's leader gathers each group's partitions on one owner and proposes
//! `FormGroups`, and every node switches its partitions to their groups.

use super::*;
use crate::map::Formation;

/// Between two attempts of a formation step that failed (a move to or from a member that
/// is down, a proposal that lost the leader).
const FORM_RETRY: Duration = Duration::from_secs(3);

/// How long after forming the groups their leaders may take to be spread.
const SPREAD_WITHIN: Duration = Duration::from_secs(120);

impl ClusterNode {
    /// On the control plane's leader: starts forming the groups once the map says the
    /// cluster should (one task at a time; it ends when the groups are formed, when the
    /// cluster no longer should, or when this node no longer leads).
    pub(super) fn form_groups_when_due(&self, map: &ClusterMap) {
        let inner = &self.inner;
        if !map.grows_into_replicas()
            || inner.control.leader() != Some(inner.me.node_id)
            || inner.forming.load(Ordering::Acquire)
            || map.plan_formation() == Formation::Wait
            || inner.forming.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let node = self.clone();
        tokio::spawn(async move {
            node.form_groups().await;
            node.inner.forming.store(false, Ordering::Release);
        });
    }

    async fn form_groups(&self) {
        let inner = &self.inner;
        loop {
            if inner.control.leader() != Some(inner.me.node_id) {
                return;
            }
            let map = self.map();
            match map.plan_formation() {
                Formation::Wait => return,
                Formation::Gather(moves) => {
                    tracing::info!(
                        moves = moves.len(),
                        "growing into replicas: gathering each group's partitions on one member"
                    );
                    let report = self.run_moves(moves).await;
                    if let Some(f) = report.failed.first() {
                        tracing::warn!(
                            failed = report.failed.len(),
                            partition = f.partition,
                            error = %f.error,
                            "growing into replicas: a partition did not move; trying again"
                        );
                        tokio::time::sleep(FORM_RETRY).await;
                    }
                }
                Formation::Form(replicas) => {
                    // A replica placed on a member that is down could never catch up,
                    // and a group promotes its learners together: it would keep one
                    // voter until that member came back. Formed once all answer.
                    let mut down = Vec::new();
                    for m in map.active_members() {
                        if m.node_id != inner.me.node_id && !self.probe(m).await {
                            down.push(m.name.clone());
                        }
                    }
                    if !down.is_empty() {
                        tracing::warn!(
                            ?down,
                            "growing into replicas: waiting for every member to answer before forming the groups"
                        );
                        tokio::time::sleep(FORM_RETRY).await;
                        continue;
                    }
                    match inner
                        .control
                        .propose(MapCommand::FormGroups { replicas })
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(
                                factor = map.target_factor,
                                groups = map.groups,
                                "growing into replicas: groups formed"
                            );
                            self.spread_leaders_once_whole().await;
                            return;
                        }
                        // A partition moved meanwhile: planned again.
                        Err(ControlError::Map(MapError::NotGathered { .. })) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "growing into replicas: forming the groups");
                            tokio::time::sleep(FORM_RETRY).await;
                        }
                    }
                }
            }
        }
    }

    /// After the groups formed: each one's former leads it, often one member all of
    /// them. Once every group has its placed voters, the leaderships are spread as
    /// `cluster rebalance` does (one election per group moved).
    async fn spread_leaders_once_whole(&self) {
        let deadline = Instant::now() + SPREAD_WITHIN;
        loop {
            tokio::time::sleep(FORM_RETRY).await;
            if self.inner.control.leader() != Some(self.inner.me.node_id) {
                return;
            }
            if self.groups_whole(&self.map()).await {
                let report = self.rebalance_leaders().await;
                tracing::info!(
                    moved = report.moved,
                    failed = report.failed.len(),
                    "growing into replicas: leaders spread"
                );
                if report.failed.is_empty() {
                    return;
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    "growing into replicas: the groups' leaders were not spread; run `shardmall cluster rebalance`"
                );
                return;
            }
        }
    }

    /// Whether every group's voters are its placed replicas, as the group's first
    /// replica has applied them.
    async fn groups_whole(&self, map: &ClusterMap) -> bool {
        let Some(r) = &self.inner.replication else {
            return false;
        };
        for g in 0..map.groups {
            let placed: BTreeSet<NodeId> = map.replicas_of(g).iter().copied().collect();
            let Some(first) = map.replicas_of(g).first() else {
                return false;
            };
            let applied = if *first == self.inner.me.node_id {
                r.groups.applied_membership(g)
            } else {
                let Some(addr) = map.members.get(first).map(|m| m.cluster_addr.clone()) else {
                    return false;
                };
                crate::group::network::applied_membership_at(
                    self.inner.transport.as_ref(),
                    &addr,
                    g,
                )
                .await
            };
            let whole = applied.is_some_and(|m| {
                let m = m.membership();
                m.get_joint_config().len() == 1 && m.voter_ids().collect::<BTreeSet<_>>() == placed
            });
            if !whole || r.leaders.leader(g).is_none() {
                return false;
            }
        }
        true
    }

    /// Once the map is replicated: a node that served its partitions as their owner
    /// fences them (their actors stop with every write durable), then sends the log's
    /// records of every partition to the groups. The groups' leaders serve the
    /// partitions again, from the same data. Does nothing after the first time.
    pub(super) async fn turn_replicated(&self, map: &ClusterMap) {
        let inner = &self.inner;
        let Some(r) = &inner.replication else {
            return;
        };
        // Done already (at start for a cluster replicated from its creation).
        if inner.shop.replica_groups() != 0 {
            return;
        }
        for p in 0..map.partitions {
            if !inner.serving[usize::from(p)].load(Ordering::Acquire) {
                continue;
            }
            match inner.shop.fence_partition(p).await {
                Ok(()) => inner.serving[usize::from(p)].store(false, Ordering::Release),
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "cannot fence a partition its group takes over")
                }
            }
        }
        let hook: Arc<dyn shardmall_persistence::Replicate> = r.groups.clone();
        inner.shop.wal().set_replicate(&hook);
        inner.shop.set_replica_groups(map.groups);
        tracing::info!(
            factor = map.copies(),
            groups = map.groups,
            "the cluster is replicated now: partitions are served by their groups' leaders"
        );
    }
}
