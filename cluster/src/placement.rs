//! Where a cluster's replica groups live (ADR 0016): which nodes hold a replica of each
//! group, and which of them should lead it. A pure planner, deterministic, so every
//! node computes the same plan from the same map.
//!
//! A plan gives every group `min(RF, active nodes)` replicas on distinct active nodes,
//! spreads the replicas so that no active node holds more than one more than another,
//! takes every replica off nodes that are leaving or gone, and keeps replicas where they
//! are whenever that is possible (every change is a membership change of a group: a
//! learner added, caught up and promoted, a voter removed). Then it spreads the
//! preferred leaders over the replicas, keeping a group's preferred leader unless its
//! node leads more than its share.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::map::NodeId;

/// One group's replicas; the first is its preferred leader.
pub type Replicas = Vec<NodeId>;

/// One membership change of a group: `add` joins it (as a learner, then a voter),
/// `remove` leaves it. A replacement has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaChange {
    pub group: u16,
    pub add: Option<NodeId>,
    pub remove: Option<NodeId>,
}

/// The placement after a plan, and the changes that lead there from the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub groups: Vec<Replicas>,
    pub changes: Vec<ReplicaChange>,
}

/// Plans the placement of `current` (one entry per group) over the `active` nodes with
/// replication factor `rf`.
pub fn plan(current: &[Replicas], active: &[NodeId], rf: usize) -> Plan {
    let active: BTreeSet<NodeId> = active.iter().copied().collect();
    if active.is_empty() {
        return Plan {
            groups: current.to_vec(),
            changes: Vec::new(),
        };
    }
    let want = rf.clamp(1, active.len());
    let mut load: BTreeMap<NodeId, usize> = active.iter().map(|n| (*n, 0)).collect();
    let mut groups: Vec<Replicas> = Vec::with_capacity(current.len());
    let mut removed: Vec<Vec<NodeId>> = vec![Vec::new(); current.len()];
    // Keep the replicas on active nodes, at most `want` per group.
    for (g, replicas) in current.iter().enumerate() {
        let mut kept = Vec::new();
        for n in replicas {
            if active.contains(n) && kept.len() < want && !kept.contains(n) {
                kept.push(*n);
                *load.get_mut(n).expect("active") += 1;
            } else if !kept.contains(n) && !removed[g].contains(n) {
                removed[g].push(*n);
            }
        }
        groups.push(kept);
    }
    // Fill each group up to `want` on the least loaded nodes it lacks.
    let mut added: Vec<Vec<NodeId>> = vec![Vec::new(); current.len()];
    for (g, replicas) in groups.iter_mut().enumerate() {
        while replicas.len() < want {
            let to = least_loaded(&load, |n| !replicas.contains(n)).expect("want <= active");
            replicas.push(to);
            *load.get_mut(&to).expect("active") += 1;
            added[g].push(to);
        }
    }
    // Even out: move a replica from the most to the least loaded node while they differ
    // by more than one. A group holding the first and not the second always exists, as
    // the first is in more groups than the second.
    loop {
        let (&most, &high) = load
            .iter()
            .max_by_key(|(n, l)| (**l, std::cmp::Reverse(**n)))
            .expect("active is not empty");
        let (&least, &low) = load
            .iter()
            .min_by_key(|(n, l)| (**l, **n))
            .expect("active is not empty");
        if high <= low + 1 {
            break;
        }
        let g = (0..groups.len())
            .find(|g| groups[*g].contains(&most) && !groups[*g].contains(&least))
            .expect("the busier node holds a replica of a group the other lacks");
        let at = groups[g].iter().position(|n| *n == most).expect("holds it");
        groups[g][at] = least;
        *load.get_mut(&most).expect("active") -= 1;
        *load.get_mut(&least).expect("active") += 1;
        // A replica added by this plan and moved again is one change, not two.
        match added[g].iter().position(|n| *n == most) {
            Some(i) => added[g][i] = least,
            None => {
                removed[g].push(most);
                added[g].push(least);
            }
        }
    }
    spread_leaders(&mut groups, &active);
    let mut changes = Vec::new();
    for g in 0..groups.len() {
        // A node both removed and added (an extra replica moved back by the balancing)
        // stays where it is.
        let adds: Vec<NodeId> = added[g]
            .iter()
            .filter(|n| !removed[g].contains(n))
            .copied()
            .collect();
        let removes: Vec<NodeId> = removed[g]
            .iter()
            .filter(|n| !added[g].contains(n))
            .copied()
            .collect();
        for i in 0..adds.len().max(removes.len()) {
            changes.push(ReplicaChange {
                group: g as u16,
                add: adds.get(i).copied(),
                remove: removes.get(i).copied(),
            });
        }
    }
    Plan { groups, changes }
}

/// The node with the fewest replicas among those `eligible` (ties: the lowest id).
fn least_loaded(
    load: &BTreeMap<NodeId, usize>,
    eligible: impl Fn(&NodeId) -> bool,
) -> Option<NodeId> {
    load.iter()
        .filter(|(n, _)| eligible(n))
        .min_by_key(|(n, l)| (**l, **n))
        .map(|(n, _)| *n)
}

/// Puts a preferred leader first in every group: the current one unless its node already
/// leads its share (`ceil(groups / active)`), else the group's replica leading fewest.
fn spread_leaders(groups: &mut [Replicas], active: &BTreeSet<NodeId>) {
    let share = groups.len().div_ceil(active.len().max(1));
    let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
    for replicas in groups.iter_mut() {
        let Some(&first) = replicas.first() else {
            continue;
        };
        let chosen = if leads.get(&first).copied().unwrap_or(0) < share {
            first
        } else {
            *replicas
                .iter()
                .min_by_key(|n| (leads.get(*n).copied().unwrap_or(0), **n))
                .expect("not empty")
        };
        *leads.entry(chosen).or_default() += 1;
        let at = replicas
            .iter()
            .position(|n| *n == chosen)
            .expect("a replica");
        replicas[..=at].rotate_right(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loads(groups: &[Replicas]) -> BTreeMap<NodeId, usize> {
        let mut l = BTreeMap::new();
        for n in groups.iter().flatten() {
            *l.entry(*n).or_default() += 1;
        }
        l
    }

    #[test]
    fn three_nodes_rf3_hold_every_group_and_share_the_leaders() {
        let plan = plan(&vec![vec![1]; 16], &[1, 2, 3], 3);
        assert!(plan.groups.iter().all(|g| g.len() == 3));
        let mut leaders: BTreeMap<NodeId, usize> = BTreeMap::new();
        for g in &plan.groups {
            *leaders.entry(g[0]).or_default() += 1;
        }
        assert_eq!(leaders.values().copied().collect::<Vec<_>>(), vec![6, 5, 5]);
        // Two replicas added to each group, nothing removed.
        assert_eq!(plan.changes.len(), 32);
        assert!(plan.changes.iter().all(|c| c.remove.is_none()));
    }

    #[test]
    fn a_lost_node_is_replaced_from_the_survivors() {
        let current = vec![vec![1, 2, 3]; 8];
        let plan = plan(&current, &[1, 2, 4], 3);
        for (g, replicas) in plan.groups.iter().enumerate() {
            let set: BTreeSet<_> = replicas.iter().copied().collect();
            assert_eq!(set, BTreeSet::from([1, 2, 4]), "group {g}");
        }
        assert_eq!(plan.changes.len(), 8);
        assert!(plan
            .changes
            .iter()
            .all(|c| c.add == Some(4) && c.remove == Some(3)));
    }

    proptest! {
        /// Whatever the current placement, a plan gives each group `min(rf, active)`
        /// distinct replicas on active nodes, balances the replicas to within one, puts
        /// no replica elsewhere, its changes turn the current placement into the planned
        /// one, and planning again changes nothing.
        #[test]
        fn plans_are_complete_even_and_stable(
            groups in 1usize..40,
            rf in prop::sample::select(vec![1usize, 3, 5]),
            nodes in 1u64..8,
            current in proptest::collection::vec(proptest::collection::vec(1u64..10, 0..6), 40),
            gone in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let active: Vec<NodeId> = (1..=nodes).filter(|n| *n == 1 || !gone[*n as usize]).collect();
            let current: Vec<Replicas> = current.into_iter().take(groups).collect();
            let want = rf.min(active.len());
            let p = plan(&current, &active, rf);
            prop_assert_eq!(p.groups.len(), current.len());
            for replicas in &p.groups {
                let set: BTreeSet<_> = replicas.iter().copied().collect();
                prop_assert_eq!(set.len(), want);
                prop_assert_eq!(replicas.len(), want);
                prop_assert!(replicas.iter().all(|n| active.contains(n)));
            }
            let l = loads(&p.groups);
            let high = active.iter().map(|n| l.get(n).copied().unwrap_or(0)).max().unwrap();
            let low = active.iter().map(|n| l.get(n).copied().unwrap_or(0)).min().unwrap();
            prop_assert!(high <= low + 1, "loads {:?}", l);
            // The changes turn the current placement into the planned one.
            for (g, replicas) in p.groups.iter().enumerate() {
                let mut members: BTreeSet<NodeId> = current[g].iter().copied().collect();
                for c in p.changes.iter().filter(|c| usize::from(c.group) == g) {
                    if let Some(r) = c.remove {
                        prop_assert!(members.remove(&r), "removes {} it lacks", r);
                    }
                    if let Some(a) = c.add {
                        prop_assert!(members.insert(a), "adds {} it has", a);
                    }
                }
                let planned: BTreeSet<NodeId> = replicas.iter().copied().collect();
                prop_assert_eq!(members, planned);
            }
            let again = plan(&p.groups, &active, rf);
            prop_assert!(again.changes.is_empty(), "{:?}", again.changes);
            prop_assert_eq!(again.groups, p.groups);
        }
    }
}
