//! The cluster map: members, the owner of every partition, and the epoch that numbers
//! its versions. It changes only through [`MapCommand`]s applied in the order consensus
//! agreed, so every node that applied the same commands holds the same map.
//!
//! Pure: no I/O. The control plane persists and replicates the commands; this module
//! decides what they do and plans partition moves.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in consensus: the hash of its name (`--node-id`), so the name is all an
/// operator ever types.
pub type NodeId = u64;

/// The consensus id of the node called `name`.
pub fn node_id_of(name: &str) -> NodeId {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

/// The 16-bit tag a node puts in every order id it mints. No two members share one (a
/// join that would is refused), so order ids stay unique across the cluster.
pub fn node_tag(name: &str) -> u16 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (h & 0xffff) as u16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// Serves and may receive partitions.
    Active,
    /// Giving its partitions away; receives none.
    Leaving,
}

impl MemberStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Active => "active",
            MemberStatus::Leaving => "leaving",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `node_id_of(name)`.
    pub node_id: NodeId,
    /// The node's name (`--node-id`), as operators and the HTTP API know it.
    pub name: String,
    /// Where its HTTP edge listens (for operators and clients).
    pub http_addr: String,
    /// Where its cluster transport listens (for other nodes).
    pub cluster_addr: String,
    pub status: MemberStatus,
    /// Random, made with the node's data dir: a node that lost its data dir and comes
    /// back under the same name is told apart from the one the cluster knew.
    #[serde(default)]
    pub incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClusterMap {
    pub cluster_id: String,
    /// Bumped by every command that changes the map.
    pub epoch: u64,
    /// Fixed when the cluster is created.
    pub partitions: u16,
    pub members: BTreeMap<NodeId, Member>,
    /// `owners[p]` owns partition `p`. Empty until the cluster is initialised.
    pub owners: Vec<NodeId>,
    /// Partitions handed out without their data by `ForgetMember`, with the epoch of
    /// that command: their new owner starts them empty, once. A `Move` clears the entry
    /// (the partition's data then travels with it).
    #[serde(default)]
    pub emptied: BTreeMap<u16, u64>,
    /// Copies of every partition (ADR 0016); 0 and 1 both mean one copy, served by its
    /// owner in `owners`. Set once, right after creation.
    #[serde(default)]
    pub replication_factor: u8,
    /// With replication: partition `p` is in group `p % groups`, and `replicas[g]` are
    /// the members holding a replica of group `g` (empty until placed).
    #[serde(default)]
    pub groups: u16,
    #[serde(default)]
    pub replicas: Vec<Vec<NodeId>>,
    /// Per group, the member that formed it: the first replica of the first placement.
    /// Only it ever initializes the group; a member placed later (possibly first in a
    /// later placement) joins the group formed already, as a learner.
    #[serde(default)]
    pub formers: Vec<NodeId>,
    /// The copies the cluster grows into (ADR 0016, "Growing into replicas"): while
    /// fewer members than this are active it keeps one copy per partition, served by its
    /// owner; once enough are, each group's partitions are gathered on one owner, which
    /// forms the group from its data (`FormGroups`). 0 or 1: never.
    #[serde(default)]
    pub target_factor: u8,
    /// The groups were formed from partitions that held data (`FormGroups`): each
    /// former formed its group alone and snapshots it before the first learner joins, so
    /// learners start from that data rather than from an empty log.
    #[serde(default)]
    pub seeded: bool,
}

/// A change to the map. Variants are only ever appended (they are replicated and
/// persisted in the consensus log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapCommand {
    /// Creates the cluster: `first` owns every partition.
    Init {
        cluster_id: String,
        partitions: u16,
        first: Member,
    },
    /// A node joins (or a known node comes back with new addresses).
    AddMember(Member),
    SetStatus {
        node: NodeId,
        status: MemberStatus,
    },
    /// Partition `partition` moves from `from` to `to`. Refused unless `from` owns it
    /// now, so a move planned on a stale map cannot take effect twice.
    Move {
        partition: u16,
        from: NodeId,
        to: NodeId,
    },
    /// A node leaves the map. Refused while it owns partitions.
    RemoveMember {
        node: NodeId,
    },
    /// Forced removal of a lost node: its partitions go, empty, to `to` in turn. The
    /// data they held on the lost node is given up.
    ForgetMember {
        node: NodeId,
        to: Vec<NodeId>,
    },
    /// Changes nothing but the epoch: once a node has applied the map it produced, that
    /// node has applied every change committed before it (a read barrier).
    Barrier,
    /// Makes the cluster keep `factor` copies of every partition in `groups` replica
    /// groups. Only right after creation, before any group is placed.
    SetReplication {
        factor: u8,
        groups: u16,
    },
    /// Places the replica groups: `replicas[g]` hold group `g`.
    PlaceGroups {
        replicas: Vec<Vec<NodeId>>,
    },
    /// Makes a cluster that keeps one copy per partition grow into `factor` copies in
    /// `groups` replica groups once that many members are active. Only before groups
    /// exist.
    SetTargetReplication {
        factor: u8,
        groups: u16,
    },
    /// Turns a cluster growing into replicas replicated: `replicas[g]` hold group `g`,
    /// and its first, which owns every partition of the group now, forms it from its
    /// data. Refused unless each group's partitions are gathered on its first replica.
    FormGroups {
        replicas: Vec<Vec<NodeId>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MapError {
    #[error("the cluster is already initialised")]
    AlreadyInitialised,
    #[error("the cluster is not initialised")]
    NotInitialised,
    #[error("a cluster has at least one partition")]
    NoPartitions,
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    #[error("partition {0} does not exist")]
    UnknownPartition(u16),
    #[error("partition {partition} is owned by node {owner}, not {claimed}")]
    NotOwner {
        partition: u16,
        owner: NodeId,
        claimed: NodeId,
    },
    #[error("node {node} still owns {owned} partitions")]
    StillOwns { node: NodeId, owned: usize },
    #[error("node {0} is leaving and takes no partitions")]
    NotActive(NodeId),
    #[error("no other active node can take the partitions")]
    NoTarget,
    #[error("node name {name} clashes with member {member} (same name or order-id tag): pick another --node-id")]
    NameClash { name: String, member: String },
    #[error("replication is set once, when the cluster is created")]
    ReplicationSet,
    #[error("replication factor {0} is not 1, 3 or 5")]
    BadReplicationFactor(u8),
    #[error(
        "{groups} replica groups for {partitions} partitions: between 1 and the partition count"
    )]
    BadGroups { groups: u16, partitions: u16 },
    #[error(
        "a placement must name {want} replicas for each of {groups} groups, all active members"
    )]
    BadPlacement { groups: u16, want: u8 },
    #[error("partition {partition} of group {group} is not on the group's first replica yet")]
    NotGathered { group: u16, partition: u16 },
    #[error("partitions of a replicated cluster do not move: their groups' replicas do")]
    Replicated,
    #[error("{name} is a member with another data dir: if its data is lost, remove it with `shardmall cluster remove {name} --force` first, then join again")]
    OtherIncarnation { name: String },
}

/// The next step of a cluster growing into replicas ([`ClusterMap::plan_formation`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formation {
    /// Not growing, or fewer active members than the target factor.
    Wait,
    /// Partitions to move first, so that each group's partitions share one owner.
    Gather(Vec<Move>),
    /// The placement to propose with `MapCommand::FormGroups`.
    Form(Vec<Vec<NodeId>>),
}

/// One planned partition move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub partition: u16,
    pub from: NodeId,
    pub to: NodeId,
}

impl ClusterMap {
    pub fn is_initialised(&self) -> bool {
        !self.owners.is_empty()
    }

    /// Whether partitions are replicated (ADR 0016): served by their group's leader, not
    /// by an owner.
    pub fn is_replicated(&self) -> bool {
        self.replication_factor > 1
    }

    /// The replication factor, 1 when unset.
    pub fn copies(&self) -> u8 {
        self.replication_factor.max(1)
    }

    /// The replica group of `partition` (replicated clusters only).
    pub fn group_of(&self, partition: u16) -> u16 {
        crate::group::group_of(partition, self.groups)
    }

    /// The members holding a replica of `group` (empty until placed).
    pub fn replicas_of(&self, group: u16) -> &[NodeId] {
        self.replicas
            .get(usize::from(group))
            .map_or(&[], Vec::as_slice)
    }

    pub fn owner(&self, partition: u16) -> Option<NodeId> {
        self.owners.get(usize::from(partition)).copied()
    }

    pub fn owner_member(&self, partition: u16) -> Option<&Member> {
        self.members.get(&self.owner(partition)?)
    }

    /// The partitions `node` owns, in order.
    pub fn owned_by(&self, node: NodeId) -> Vec<u16> {
        (0..self.partitions)
            .filter(|p| self.owner(*p) == Some(node))
            .collect()
    }

    pub fn member_named(&self, name: &str) -> Option<&Member> {
        self.members
            .get(&node_id_of(name))
            .filter(|m| m.name == name)
    }

    pub fn active_members(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.status == MemberStatus::Active)
    }

    /// The active members other than `node`: who can take over what `node` holds.
    pub fn active_except(&self, node: NodeId) -> Vec<NodeId> {
        self.active_members()
            .map(|m| m.node_id)
            .filter(|id| *id != node)
            .collect()
    }

    /// Applies one command. A refused command leaves the map as it was.
    pub fn apply(&mut self, cmd: &MapCommand) -> Result<(), MapError> {
        match cmd {
            MapCommand::Init {
                cluster_id,
                partitions,
                first,
            } => {
                if self.is_initialised() {
                    return Err(MapError::AlreadyInitialised);
                }
                if *partitions == 0 {
                    return Err(MapError::NoPartitions);
                }
                self.cluster_id = cluster_id.clone();
                self.partitions = *partitions;
                self.members.insert(first.node_id, first.clone());
                self.owners = vec![first.node_id; usize::from(*partitions)];
            }
            MapCommand::AddMember(m) => {
                self.initialised()?;
                if let Some(other) = self.members.values().find(|o| {
                    o.node_id != m.node_id
                        && (o.name == m.name || node_tag(&o.name) == node_tag(&m.name))
                }) {
                    return Err(MapError::NameClash {
                        name: m.name.clone(),
                        member: other.name.clone(),
                    });
                }
                if let Some(known) = self.members.get(&m.node_id) {
                    // 0: recorded before incarnations existed.
                    if known.incarnation != 0 && known.incarnation != m.incarnation {
                        return Err(MapError::OtherIncarnation {
                            name: m.name.clone(),
                        });
                    }
                }
                // A known member only updates its addresses: its status is decided
                // by `SetStatus` (a leaving node that restarts stays leaving).
                let status = self.members.get(&m.node_id).map_or(m.status, |o| o.status);
                self.members.insert(
                    m.node_id,
                    Member {
                        status,
                        ..m.clone()
                    },
                );
            }
            MapCommand::Barrier => {
                self.initialised()?;
            }
            MapCommand::SetReplication { factor, groups } => {
                self.check_replication_unset(*factor, *groups)?;
                self.replication_factor = *factor;
                self.groups = if *factor > 1 { *groups } else { 0 };
            }
            MapCommand::PlaceGroups { replicas } => {
                self.initialised()?;
                self.check_placement(replicas, self.replication_factor)?;
                if self.formers.is_empty() {
                    self.formers = replicas.iter().filter_map(|r| r.first().copied()).collect();
                }
                self.replicas = replicas.clone();
            }
            MapCommand::SetTargetReplication { factor, groups } => {
                self.check_replication_unset(*factor, *groups)?;
                self.target_factor = *factor;
                self.groups = if *factor > 1 { *groups } else { 0 };
            }
            MapCommand::FormGroups { replicas } => {
                self.initialised()?;
                let want = self.target_factor;
                if self.is_replicated() || !self.replicas.is_empty() {
                    return Err(MapError::ReplicationSet);
                }
                if want <= 1 {
                    return Err(MapError::BadReplicationFactor(want));
                }
                self.check_placement(replicas, want)?;
                for p in 0..self.partitions {
                    let group = self.group_of(p);
                    let former = replicas[usize::from(group)][0];
                    if self.owner(p) != Some(former) {
                        return Err(MapError::NotGathered {
                            group,
                            partition: p,
                        });
                    }
                }
                self.replication_factor = want;
                self.formers = replicas.iter().map(|r| r[0]).collect();
                self.replicas = replicas.clone();
                self.seeded = true;
            }
            MapCommand::SetStatus { node, status } => {
                self.initialised()?;
                let m = self
                    .members
                    .get_mut(node)
                    .ok_or(MapError::UnknownNode(*node))?;
                m.status = *status;
            }
            MapCommand::Move {
                partition,
                from,
                to,
            } => {
                self.initialised()?;
                if self.is_replicated() {
                    return Err(MapError::Replicated);
                }
                let owner = self
                    .owner(*partition)
                    .ok_or(MapError::UnknownPartition(*partition))?;
                if owner != *from {
                    return Err(MapError::NotOwner {
                        partition: *partition,
                        owner,
                        claimed: *from,
                    });
                }
                match self.members.get(to) {
                    None => return Err(MapError::UnknownNode(*to)),
                    Some(m) if m.status != MemberStatus::Active => {
                        return Err(MapError::NotActive(*to))
                    }
                    Some(_) => {}
                }
                self.owners[usize::from(*partition)] = *to;
                self.emptied.remove(partition);
            }
            MapCommand::RemoveMember { node } => {
                self.initialised()?;
                if !self.members.contains_key(node) {
                    return Err(MapError::UnknownNode(*node));
                }
                let owned = self.owned_by(*node).len();
                if owned > 0 {
                    return Err(MapError::StillOwns { node: *node, owned });
                }
                self.members.remove(node);
            }
            MapCommand::ForgetMember { node, to } => {
                self.initialised()?;
                if !self.members.contains_key(node) {
                    return Err(MapError::UnknownNode(*node));
                }
                let targets: Vec<NodeId> = to
                    .iter()
                    .copied()
                    .filter(|t| {
                        t != node
                            && self
                                .members
                                .get(t)
                                .is_some_and(|m| m.status == MemberStatus::Active)
                    })
                    .collect();
                let owned = self.owned_by(*node);
                if !owned.is_empty() && targets.is_empty() {
                    return Err(MapError::NoTarget);
                }
                for (i, p) in owned.into_iter().enumerate() {
                    self.owners[usize::from(p)] = targets[i % targets.len()];
                    self.emptied.insert(p, self.epoch + 1);
                }
                self.members.remove(node);
            }
        }
        self.epoch += 1;
        Ok(())
    }

    /// Replication is set once, at creation, to 1, 3 or 5 copies in between 1 and the
    /// partition count groups.
    fn check_replication_unset(&self, factor: u8, groups: u16) -> Result<(), MapError> {
        self.initialised()?;
        if self.replication_factor > 1 || self.target_factor > 1 || !self.replicas.is_empty() {
            return Err(MapError::ReplicationSet);
        }
        if ![1, 3, 5].contains(&factor) {
            return Err(MapError::BadReplicationFactor(factor));
        }
        if groups == 0 || groups > self.partitions {
            return Err(MapError::BadGroups {
                groups,
                partitions: self.partitions,
            });
        }
        Ok(())
    }

    /// A placement names `want` (at least 3) distinct active members for every group.
    fn check_placement(&self, replicas: &[Vec<NodeId>], want: u8) -> Result<(), MapError> {
        let bad = MapError::BadPlacement {
            groups: self.groups,
            want,
        };
        if want <= 1 || replicas.len() != usize::from(self.groups) {
            return Err(bad);
        }
        for group in replicas {
            let distinct: std::collections::BTreeSet<_> = group.iter().collect();
            let active = group.iter().all(|n| {
                self.members
                    .get(n)
                    .is_some_and(|m| m.status == MemberStatus::Active)
            });
            if group.len() != usize::from(want) || distinct.len() != group.len() || !active {
                return Err(bad);
            }
        }
        Ok(())
    }

    fn initialised(&self) -> Result<(), MapError> {
        if self.is_initialised() {
            Ok(())
        } else {
            Err(MapError::NotInitialised)
        }
    }

    /// Whether the cluster keeps one copy per partition now and grows into replica
    /// groups once enough members are active.
    pub fn grows_into_replicas(&self) -> bool {
        !self.is_replicated() && self.target_factor > 1 && self.groups > 0
    }

    /// The next step of growing into replicas: nothing yet (fewer active members than
    /// the target factor, or not growing), the moves that gather each group's partitions
    /// on one owner, or, once they are gathered, the placement `FormGroups` takes (each
    /// group's owner first, the other replicas on the members holding fewest).
    /// Deterministic: every node plans the same step from the same map.
    pub fn plan_formation(&self) -> Formation {
        let active: Vec<NodeId> = self.active_members().map(|m| m.node_id).collect();
        let want = usize::from(self.target_factor);
        if !self.grows_into_replicas() || !self.is_initialised() || active.len() < want {
            return Formation::Wait;
        }
        // Each group's former: the active member owning most of its partitions (ties:
        // the one forming fewest groups so far, then the lowest id).
        let mut forms: BTreeMap<NodeId, usize> = active.iter().map(|a| (*a, 0)).collect();
        let mut formers = Vec::with_capacity(usize::from(self.groups));
        let mut moves = Vec::new();
        for g in 0..self.groups {
            let parts: Vec<u16> = (0..self.partitions)
                .filter(|p| self.group_of(*p) == g)
                .collect();
            let mut owning: BTreeMap<NodeId, usize> = BTreeMap::new();
            for p in &parts {
                if let Some(o) = self.owner(*p).filter(|o| forms.contains_key(o)) {
                    *owning.entry(o).or_default() += 1;
                }
            }
            let former = *active
                .iter()
                .min_by_key(|a| {
                    let owned = owning.get(a).copied().unwrap_or(0);
                    (std::cmp::Reverse(owned), forms[a], **a)
                })
                .expect("at least `want` active members");
            *forms.get_mut(&former).expect("active") += 1;
            formers.push(former);
            for p in parts {
                match self.owner(p) {
                    Some(from) if from != former => moves.push(Move {
                        partition: p,
                        from,
                        to: former,
                    }),
                    _ => {}
                }
            }
        }
        if !moves.is_empty() {
            return Formation::Gather(moves);
        }
        let mut load: BTreeMap<NodeId, usize> = forms;
        let replicas = formers
            .into_iter()
            .map(|former| {
                let mut group = vec![former];
                while group.len() < want {
                    let next = *load
                        .iter()
                        .filter(|(n, _)| !group.contains(n))
                        .min_by_key(|(n, l)| (**l, **n))
                        .expect("at least `want` active members")
                        .0;
                    *load.get_mut(&next).expect("active") += 1;
                    group.push(next);
                }
                group
            })
            .collect();
        Formation::Form(replicas)
    }

    /// The moves that spread the partitions evenly over the active members (each ends
    /// with `floor(P/n)` or `ceil(P/n)`) and empty every leaving member, moving as few
    /// partitions as possible. Deterministic: every node plans the same moves from the
    /// same map.
    pub fn plan_rebalance(&self) -> Vec<Move> {
        let active: Vec<NodeId> = self.active_members().map(|m| m.node_id).collect();
        if active.is_empty() || !self.is_initialised() {
            return Vec::new();
        }
        let n = active.len();
        let total = usize::from(self.partitions);
        let base = total / n;
        let extra = total % n;
        let mut owned: BTreeMap<NodeId, Vec<u16>> =
            active.iter().map(|a| (*a, Vec::new())).collect();
        let mut loose: Vec<(u16, NodeId)> = Vec::new();
        for p in 0..self.partitions {
            let o = self.owners[usize::from(p)];
            match owned.get_mut(&o) {
                Some(v) => v.push(p),
                None => loose.push((p, o)),
            }
        }
        // Who keeps `base + 1`: the members that hold the most now (ties by id), so
        // fewer partitions move.
        let mut by_load: Vec<NodeId> = active.clone();
        by_load.sort_by_key(|id| (std::cmp::Reverse(owned[id].len()), *id));
        let quota: BTreeMap<NodeId, usize> = by_load
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, base + usize::from(i < extra)))
            .collect();
        for (id, parts) in owned.iter_mut() {
            while parts.len() > quota[id] {
                let p = parts.pop().expect("longer than its quota");
                loose.push((p, *id));
            }
        }
        loose.sort();
        let mut moves = Vec::new();
        let mut loose = loose.into_iter();
        for id in &active {
            let have = owned[id].len();
            for _ in have..quota[id] {
                let Some((p, from)) = loose.next() else { break };
                moves.push(Move {
                    partition: p,
                    from,
                    to: *id,
                });
            }
        }
        moves.sort_by_key(|m| m.partition);
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(id: NodeId) -> Member {
        Member {
            node_id: id,
            name: format!("node-{id}"),
            http_addr: format!("127.0.0.1:{}", 8000 + id),
            cluster_addr: format!("127.0.0.1:{}", 7000 + id),
            status: MemberStatus::Active,
            incarnation: id,
        }
    }

    fn cluster(partitions: u16, nodes: u64) -> ClusterMap {
        let mut m = ClusterMap::default();
        m.apply(&MapCommand::Init {
            cluster_id: "c".into(),
            partitions,
            first: member(1),
        })
        .unwrap();
        for id in 2..=nodes {
            m.apply(&MapCommand::AddMember(member(id))).unwrap();
        }
        m
    }

    fn apply_all(m: &mut ClusterMap, moves: &[Move]) {
        for mv in moves {
            m.apply(&MapCommand::Move {
                partition: mv.partition,
                from: mv.from,
                to: mv.to,
            })
            .unwrap();
        }
    }

    #[test]
    fn init_gives_every_partition_to_the_first_node_and_counts_epochs() {
        let m = cluster(8, 1);
        assert_eq!(m.owned_by(1), (0..8).collect::<Vec<_>>());
        assert_eq!(m.epoch, 1);
        let mut again = m.clone();
        assert_eq!(
            again.apply(&MapCommand::Init {
                cluster_id: "x".into(),
                partitions: 4,
                first: member(9)
            }),
            Err(MapError::AlreadyInitialised)
        );
        assert_eq!(
            again, m,
            "a refused command changes nothing, not even the epoch"
        );
    }

    #[test]
    fn a_move_planned_on_a_stale_map_is_refused() {
        let mut m = cluster(4, 2);
        let mv = MapCommand::Move {
            partition: 0,
            from: 1,
            to: 2,
        };
        m.apply(&mv).unwrap();
        assert!(matches!(
            m.apply(&mv),
            Err(MapError::NotOwner { owner: 2, .. })
        ));
    }

    #[test]
    fn a_member_that_owns_partitions_cannot_be_removed_but_can_be_forgotten() {
        let mut m = cluster(4, 3);
        let plan = m.plan_rebalance();
        apply_all(&mut m, &plan);
        assert!(matches!(
            m.apply(&MapCommand::RemoveMember { node: 2 }),
            Err(MapError::StillOwns { node: 2, .. })
        ));
        m.apply(&MapCommand::ForgetMember {
            node: 2,
            to: vec![1, 3],
        })
        .unwrap();
        assert!(!m.members.contains_key(&2));
        assert!(m.owners.iter().all(|o| *o == 1 || *o == 3));
    }

    #[test]
    fn leaving_members_are_emptied_and_receive_nothing() {
        let mut m = cluster(16, 3);
        let plan = m.plan_rebalance();
        apply_all(&mut m, &plan);
        m.apply(&MapCommand::SetStatus {
            node: 3,
            status: MemberStatus::Leaving,
        })
        .unwrap();
        let plan = m.plan_rebalance();
        assert!(plan.iter().all(|mv| mv.from == 3 && mv.to != 3));
        apply_all(&mut m, &plan);
        assert!(m.owned_by(3).is_empty());
        assert_eq!(m.owned_by(1).len() + m.owned_by(2).len(), 16);
        assert!(m
            .apply(&MapCommand::Move {
                partition: 0,
                from: m.owners[0],
                to: 3
            })
            .is_err());
    }

    proptest! {
        /// Whatever the starting owners, one plan balances the active members to within
        /// one partition, empties the leaving ones, moves only what must move, and a
        /// second plan is empty.
        #[test]
        fn rebalancing_is_even_minimal_and_stable(
            partitions in 1u16..300,
            nodes in 1u64..7,
            owners in proptest::collection::vec(1u64..7, 300),
            leaving in proptest::collection::vec(any::<bool>(), 7),
        ) {
            let mut m = cluster(partitions, nodes);
            for p in 0..partitions {
                let o = owners[usize::from(p)];
                if o <= nodes {
                    m.owners[usize::from(p)] = o;
                }
            }
            for id in 2..=nodes {
                if leaving[id as usize] {
                    m.apply(&MapCommand::SetStatus { node: id, status: MemberStatus::Leaving }).unwrap();
                }
            }
            let active: Vec<NodeId> = m.active_members().map(|a| a.node_id).collect();
            let n = active.len();
            let base = usize::from(partitions) / n;
            // The least any plan can move: everything on leaving nodes, plus what each
            // active node holds above its quota when the `P % n` larger quotas go to the
            // largest holders.
            let mut loads: Vec<usize> = active.iter().map(|id| m.owned_by(*id).len()).collect();
            loads.sort_unstable_by(|a, b| b.cmp(a));
            let extra = usize::from(partitions) % n;
            let least: usize = loads.iter().enumerate()
                .map(|(i, have)| have.saturating_sub(base + usize::from(i < extra)))
                .sum::<usize>()
                + m.members.keys().filter(|id| !active.contains(id)).map(|id| m.owned_by(*id).len()).sum::<usize>();
            let plan = m.plan_rebalance();
            prop_assert_eq!(plan.len(), least);
            let mut seen = std::collections::HashSet::new();
            prop_assert!(plan.iter().all(|mv| seen.insert(mv.partition)));
            apply_all(&mut m, &plan);
            for id in m.members.keys() {
                let have = m.owned_by(*id).len();
                if active.contains(id) {
                    prop_assert!(have == base || have == base + 1, "node {} has {}", id, have);
                } else {
                    prop_assert_eq!(have, 0);
                }
            }
            prop_assert!(m.plan_rebalance().is_empty());
        }
    }

    /// A cluster of `nodes` growing into `factor` copies in `groups` groups.
    fn growing(partitions: u16, nodes: u64, factor: u8, groups: u16) -> ClusterMap {
        let mut m = cluster(partitions, nodes);
        m.apply(&MapCommand::SetTargetReplication { factor, groups })
            .unwrap();
        m
    }

    #[test]
    fn a_growing_cluster_waits_for_enough_members_then_forms_from_its_owners() {
        let mut m = growing(32, 2, 3, 16);
        assert!(m.grows_into_replicas() && !m.is_replicated());
        assert_eq!(m.copies(), 1);
        assert_eq!(m.plan_formation(), Formation::Wait);
        // The factor is set once: not replicated from the start as well.
        assert_eq!(
            m.clone().apply(&MapCommand::SetReplication {
                factor: 3,
                groups: 16
            }),
            Err(MapError::ReplicationSet)
        );
        m.apply(&MapCommand::AddMember(member(3))).unwrap();
        // Node 1 owns everything: nothing to gather, it forms every group.
        let Formation::Form(replicas) = m.plan_formation() else {
            panic!("{:?}", m.plan_formation())
        };
        assert!(replicas.iter().all(|r| r[0] == 1 && r.len() == 3));
        // A move planned before the formation is refused after it.
        let stale = MapCommand::Move {
            partition: 0,
            from: 1,
            to: 2,
        };
        m.apply(&MapCommand::FormGroups {
            replicas: replicas.clone(),
        })
        .unwrap();
        assert!(m.is_replicated() && m.seeded && !m.grows_into_replicas());
        assert_eq!(m.copies(), 3);
        assert_eq!(m.formers, vec![1; 16]);
        assert_eq!(m.apply(&stale), Err(MapError::Replicated));
        assert_eq!(
            m.apply(&MapCommand::FormGroups { replicas }),
            Err(MapError::ReplicationSet)
        );
        assert_eq!(m.plan_formation(), Formation::Wait);
    }

    #[test]
    fn groups_form_only_where_their_partitions_are_gathered() {
        let mut m = growing(32, 3, 3, 16);
        m.apply(&MapCommand::Move {
            partition: 17,
            from: 1,
            to: 2,
        })
        .unwrap();
        // Group 1 (partitions 1 and 17) is split: a placement naming node 1 first is
        // refused, the plan gathers it first.
        let all_on_one: Vec<Vec<NodeId>> = vec![vec![1, 2, 3]; 16];
        assert_eq!(
            m.clone().apply(&MapCommand::FormGroups {
                replicas: all_on_one
            }),
            Err(MapError::NotGathered {
                group: 1,
                partition: 17
            })
        );
        let Formation::Gather(moves) = m.plan_formation() else {
            panic!("{:?}", m.plan_formation())
        };
        assert_eq!(moves.len(), 1);
        apply_all(&mut m, &moves);
        let Formation::Form(replicas) = m.plan_formation() else {
            panic!("{:?}", m.plan_formation())
        };
        m.apply(&MapCommand::FormGroups { replicas }).unwrap();
        // A target of 1 never forms; a target is refused once replicated.
        let mut one = growing(8, 3, 1, 4);
        assert!(!one.grows_into_replicas());
        assert_eq!(one.plan_formation(), Formation::Wait);
        assert_eq!(
            one.apply(&MapCommand::FormGroups {
                replicas: vec![vec![1, 2, 3]; 4]
            }),
            Err(MapError::BadReplicationFactor(1))
        );
        assert_eq!(
            m.apply(&MapCommand::SetTargetReplication {
                factor: 3,
                groups: 16
            }),
            Err(MapError::ReplicationSet)
        );
    }

    proptest! {
        /// Wherever the partitions are, gathering then forming succeeds in one round of
        /// moves: every group's partitions end on its first replica, each group has
        /// `factor` distinct active replicas, and no partition moves twice.
        #[test]
        fn gathering_then_forming_always_succeeds(
            nodes in 3u64..7,
            factor in prop_oneof![Just(3u8), Just(5u8)],
            groups in 1u16..20,
            owners in proptest::collection::vec(1u64..7, 64),
            leaving in proptest::collection::vec(any::<bool>(), 7),
        ) {
            let mut m = growing(64, nodes, factor, groups);
            for p in 0..64u16 {
                m.owners[usize::from(p)] = 1 + (owners[usize::from(p)] - 1) % nodes;
            }
            for id in 2..=nodes {
                if leaving[id as usize] {
                    m.apply(&MapCommand::SetStatus { node: id, status: MemberStatus::Leaving }).unwrap();
                }
            }
            let active = m.active_members().count();
            let plan = m.plan_formation();
            if active < usize::from(factor) {
                prop_assert_eq!(plan, Formation::Wait);
                return Ok(());
            }
            if let Formation::Gather(moves) = plan {
                let mut seen = std::collections::HashSet::new();
                prop_assert!(moves.iter().all(|mv| seen.insert(mv.partition)));
                apply_all(&mut m, &moves);
            }
            let Formation::Form(replicas) = m.plan_formation() else {
                return Err(TestCaseError::fail("not gathered after one round"));
            };
            m.apply(&MapCommand::FormGroups { replicas: replicas.clone() }).unwrap();
            for (g, r) in replicas.iter().enumerate() {
                prop_assert_eq!(r.len(), usize::from(factor));
                for p in 0..64u16 {
                    if m.group_of(p) == g as u16 {
                        prop_assert_eq!(m.owner(p), Some(r[0]));
                    }
                }
            }
        }
    }

    #[test]
    fn a_member_whose_order_id_tag_clashes_is_refused() {
        let mut m = cluster(4, 1);
        let mut same = member(5);
        same.name = "node-1".into();
        assert!(matches!(
            m.apply(&MapCommand::AddMember(same)),
            Err(MapError::NameClash { .. })
        ));
        // Names are hashed to 16 bits: find two that collide.
        let mut seen = std::collections::HashMap::new();
        let (a, b) = (0..100_000u32)
            .map(|i| format!("n{i}"))
            .find_map(|n| seen.insert(node_tag(&n), n.clone()).map(|prev| (prev, n)))
            .expect("16-bit tags collide within 100k names");
        let mut ma = member(6);
        ma.name = a;
        m.apply(&MapCommand::AddMember(ma)).unwrap();
        let mut mb = member(7);
        mb.name = b;
        assert!(m.apply(&MapCommand::AddMember(mb)).is_err());
    }

    #[test]
    fn a_known_member_updates_its_addresses_but_not_its_status_or_data_dir() {
        let mut m = cluster(4, 2);
        m.apply(&MapCommand::SetStatus {
            node: 2,
            status: MemberStatus::Leaving,
        })
        .unwrap();
        let mut moved = member(2);
        moved.cluster_addr = "10.0.0.2:7000".into();
        m.apply(&MapCommand::AddMember(moved)).unwrap();
        assert_eq!(m.members[&2].cluster_addr, "10.0.0.2:7000");
        assert_eq!(m.members[&2].status, MemberStatus::Leaving);
        // The same name with another data dir is another node: refused, map unchanged.
        let before = m.clone();
        let mut wiped = member(2);
        wiped.incarnation = 999;
        assert!(matches!(
            m.apply(&MapCommand::AddMember(wiped)),
            Err(MapError::OtherIncarnation { .. })
        ));
        assert_eq!(m, before);
        // A barrier changes nothing but the epoch.
        m.apply(&MapCommand::Barrier).unwrap();
        assert_eq!(m.epoch, before.epoch + 1);
        assert_eq!(m.owners, before.owners);
    }

    #[test]
    fn forgotten_partitions_are_marked_empty_until_they_move() {
        let mut m = cluster(6, 3);
        for p in 0..6 {
            m.apply(&MapCommand::Move {
                partition: p,
                from: 1,
                to: 1 + u64::from(p) % 3,
            })
            .unwrap();
        }
        let lost = m.owned_by(3);
        m.apply(&MapCommand::ForgetMember {
            node: 3,
            to: vec![1, 2],
        })
        .unwrap();
        let epoch = m.epoch;
        assert_eq!(m.emptied.keys().copied().collect::<Vec<_>>(), lost);
        assert!(m.emptied.values().all(|e| *e == epoch));
        let p = lost[0];
        let owner = m.owner(p).unwrap();
        m.apply(&MapCommand::Move {
            partition: p,
            from: owner,
            to: if owner == 1 { 2 } else { 1 },
        })
        .unwrap();
        assert!(
            !m.emptied.contains_key(&p),
            "a moved partition carries its data"
        );
    }

    #[test]
    fn pinned_node_ids_and_tags() {
        // Persisted in maps and order ids: these MUST never change.
        assert_eq!((node_tag("node-1"), node_tag("node-2")), (0x79c3, 0x7b76));
        assert_eq!(node_id_of("node-1"), 986_463_002_654_245_765);
    }
}
