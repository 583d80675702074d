//! What one replica of a partition group may serve (ADR 0016), as a pure state machine.
//!
//! openraft decides who leads; this decides what a replica does about it. The input is
//! an [`Observation`] of the replica's Raft metrics at a moment of this node's monotonic
//! clock (role, term, leader, the age of the last quorum acknowledgement, the applied
//! index and where the leader's term began). The output, [`Replica::serving`], is what
//! the group's partitions answer: serve reads and writes, send the caller to the leader,
//! or refuse for now.
//!
//! The lease. A leader whose heartbeat sent at instant `t` was acknowledged by a
//! quorum knows that every member of that quorum received it after `t`, and an openraft
//! follower refuses to vote for `leader_lease` (openraft's `election_timeout_max`) after
//! the last heartbeat it received. Any new leader needs a vote from a member of that
//! quorum, so none can exist before `t + leader_lease`. The leader serves until
//! `t + leader_lease - drift_margin`, the margin covering clocks that run at different
//! rates on the two machines. Once its lease has run out, a leader that has been cut
//! off stops answering before another can be elected: no stale read of stock, no
//! second sale of the last unit.
//!
//! A new leader serves only once it has applied the first entry of its own term (so it
//! has every write a previous leader acknowledged) and holds a lease.

use crate::map::NodeId;

/// The replica's Raft role, as its metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Candidate,
    Leader,
    /// A non-voting member catching up.
    Learner,
}

/// The replica's Raft metrics at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// When, in milliseconds of this node's monotonic clock.
    pub at: u64,
    pub role: Role,
    pub term: u64,
    pub leader: Option<NodeId>,
    /// For a leader: milliseconds since the send time of the last heartbeat a quorum
    /// acknowledged (openraft's `millis_since_quorum_ack`); `None` before any.
    pub quorum_ack_age: Option<u64>,
    /// The term of the last entry applied to the state machine: a leader has every
    /// write a previous leader acknowledged once it has applied an entry of its own term
    /// (the blank entry it proposes when elected).
    pub applied_term: Option<u64>,
    /// The replica is still a member (voter or learner) of its group.
    pub member: bool,
    /// A leader handing its group over to another voter (`Groups::hand_over`).
    pub handing_over: bool,
}

/// The group's timing, from its Raft configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a follower refuses to vote after a heartbeat (openraft's leader lease,
    /// its `election_timeout_max`), in milliseconds.
    pub follower_lease_ms: u64,
    /// What the leader takes off its lease for clock-rate differences, in milliseconds.
    pub drift_margin_ms: u64,
}

impl Timing {
    fn leader_lease_ms(self) -> u64 {
        self.follower_lease_ms.saturating_sub(self.drift_margin_ms)
    }
}

/// What a replica is, for serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replica {
    Follower {
        term: u64,
        leader: Option<NodeId>,
    },
    Candidate {
        term: u64,
    },
    Leader {
        term: u64,
        /// Serves until this instant (exclusive) of this node's monotonic clock.
        lease_until: u64,
        /// It has applied the first entry of its term.
        caught_up: bool,
    },
    Learner {
        term: u64,
        leader: Option<NodeId>,
    },
    /// A leader that hands its group over: it serves no more, and follows the voter
    /// elected in its place.
    HandingOver {
        term: u64,
    },
    /// No longer a member of the group: it never serves again (a replica added back is
    /// a new one).
    Removed,
}

/// What the group's partitions on this replica answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// Serve reads and writes.
    Serve,
    /// Not the leader: the caller should ask this one (if known).
    Elsewhere(Option<NodeId>),
    /// Nobody should be asked here now.
    Unavailable(&'static str),
}

impl Default for Replica {
    fn default() -> Self {
        Replica::Follower {
            term: 0,
            leader: None,
        }
    }
}

impl Replica {
    /// The term the replica last saw; `None` once removed.
    pub fn term(&self) -> Option<u64> {
        match self {
            Replica::Follower { term, .. }
            | Replica::Candidate { term }
            | Replica::Leader { term, .. }
            | Replica::Learner { term, .. }
            | Replica::HandingOver { term } => Some(*term),
            Replica::Removed => None,
        }
    }

    /// The state after `obs`. Metrics older than what the replica already saw (a lower
    /// term) change nothing; a removal is final.
    pub fn observe(self, obs: &Observation, timing: Timing) -> Replica {
        let Some(term) = self.term() else {
            return Replica::Removed;
        };
        if !obs.member {
            return Replica::Removed;
        }
        if obs.term < term {
            return self;
        }
        match obs.role {
            Role::Leader if obs.handing_over => Replica::HandingOver { term: obs.term },
            Role::Leader => {
                let (held, was_caught_up) = match self {
                    Replica::Leader {
                        term,
                        lease_until,
                        caught_up,
                    } if term == obs.term => (lease_until, caught_up),
                    _ => (0, false),
                };
                let acked = obs.quorum_ack_age.map_or(0, |age| {
                    obs.at.saturating_sub(age) + timing.leader_lease_ms()
                });
                Replica::Leader {
                    term: obs.term,
                    // Acknowledged instants only move forward; a report without one keeps
                    // the lease already earned in this term.
                    lease_until: held.max(acked),
                    caught_up: was_caught_up || obs.applied_term == Some(obs.term),
                }
            }
            Role::Follower => Replica::Follower {
                term: obs.term,
                leader: obs.leader,
            },
            Role::Candidate => Replica::Candidate { term: obs.term },
            Role::Learner => Replica::Learner {
                term: obs.term,
                leader: obs.leader,
            },
        }
    }

    /// What the partitions answer at `now` (this node's monotonic clock, milliseconds).
    pub fn serving(&self, now: u64) -> Serving {
        match self {
            Replica::Leader {
                lease_until,
                caught_up: true,
                ..
            } if now < *lease_until => Serving::Serve,
            Replica::Leader {
                caught_up: false, ..
            } => Serving::Unavailable("the new leader is applying its term's first entry"),
            Replica::Leader { .. } => Serving::Unavailable("the leader's lease has run out"),
            Replica::Follower { leader, .. } | Replica::Learner { leader, .. } => {
                Serving::Elsewhere(*leader)
            }
            Replica::Candidate { .. } => Serving::Unavailable("the group is electing a leader"),
            Replica::HandingOver { .. } => {
                Serving::Unavailable("the leader is handing the group over")
            }
            Replica::Removed => Serving::Unavailable("this replica was removed from its group"),
        }
    }

    /// The term whose leadership this replica holds the group's partitions for (their
    /// actors loaded from its copy): a leader that has applied an entry of its term.
    /// Whether they answer at a given instant is the lease's to say ([`Replica::serving`]);
    /// a lease that lapses for a moment does not unload them. `None`: the partitions
    /// must be fenced (their actors may hold decisions of a term that never commits).
    pub fn holds_partitions(&self) -> Option<u64> {
        match self {
            Replica::Leader {
                term,
                caught_up: true,
                ..
            } => Some(*term),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TIMING: Timing = Timing {
        follower_lease_ms: 1_000,
        drift_margin_ms: 100,
    };

    /// A leader's report; `applied` is the index applied, its term's first entry is 10.
    fn leader(at: u64, term: u64, ack_age: Option<u64>, applied: u64) -> Observation {
        Observation {
            at,
            role: Role::Leader,
            term,
            leader: Some(1),
            quorum_ack_age: ack_age,
            applied_term: Some(if applied >= 10 { term } else { term - 1 }),
            member: true,
            handing_over: false,
        }
    }

    #[test]
    fn a_leader_serves_once_caught_up_and_only_while_its_lease_holds() {
        let r = Replica::default().observe(&leader(5_000, 3, Some(0), 9), TIMING);
        assert_eq!(
            r.serving(5_000),
            Serving::Unavailable("the new leader is applying its term's first entry")
        );
        let r = r.observe(&leader(5_010, 3, Some(10), 10), TIMING);
        // Acknowledged at 5,000: serves until 5,000 + 1,000 - 100.
        assert_eq!(r.serving(5_899), Serving::Serve);
        assert_eq!(
            r.serving(5_900),
            Serving::Unavailable("the leader's lease has run out")
        );
        // Cut off: reports keep coming with the same acknowledgement, growing older.
        let r = r.observe(&leader(6_500, 3, Some(1_500), 12), TIMING);
        assert_eq!(
            r.serving(6_500),
            Serving::Unavailable("the leader's lease has run out")
        );
        // A fresh acknowledgement renews it.
        let r = r.observe(&leader(6_600, 3, Some(50), 12), TIMING);
        assert_eq!(r.serving(6_600), Serving::Serve);
    }

    #[test]
    fn followers_send_callers_to_the_leader_and_removal_is_final() {
        let follower = Observation {
            role: Role::Follower,
            leader: Some(7),
            quorum_ack_age: None,
            ..leader(1_000, 4, None, 0)
        };
        let r = Replica::default().observe(&follower, TIMING);
        assert_eq!(r.serving(1_000), Serving::Elsewhere(Some(7)));
        let removed = Observation {
            member: false,
            ..follower.clone()
        };
        let r = r.observe(&removed, TIMING);
        assert_eq!(r, Replica::Removed);
        assert_eq!(r.clone().observe(&leader(2_000, 9, Some(0), 20), TIMING), r);
    }

    #[test]
    fn a_leader_holds_its_partitions_through_a_lapsed_lease_but_not_through_a_hand_over() {
        let r = Replica::default().observe(&leader(5_000, 3, Some(0), 9), TIMING);
        assert_eq!(r.holds_partitions(), None, "not caught up yet");
        let r = r.observe(&leader(5_010, 3, Some(0), 10), TIMING);
        assert_eq!(r.holds_partitions(), Some(3));
        // The lease lapses: nothing is answered, the actors stay.
        let r = r.observe(&leader(7_000, 3, Some(1_500), 11), TIMING);
        assert_eq!(
            r.serving(7_000),
            Serving::Unavailable("the leader's lease has run out")
        );
        assert_eq!(r.holds_partitions(), Some(3));
        // Handing over: neither.
        let over = Observation {
            handing_over: true,
            ..leader(7_100, 3, Some(0), 11)
        };
        let r = r.observe(&over, TIMING);
        assert_eq!(r, Replica::HandingOver { term: 3 });
        assert_eq!(r.holds_partitions(), None);
        assert_eq!(
            r.serving(7_100),
            Serving::Unavailable("the leader is handing the group over")
        );
        // Nobody took over in time: it leads again, caught up, in the same term.
        let r = r.observe(&leader(10_200, 3, Some(0), 11), TIMING);
        assert_eq!(r.holds_partitions(), Some(3));
        assert_eq!(r.serving(10_200), Serving::Serve);
        // Another voter won: it follows.
        let follower = Observation {
            role: Role::Follower,
            leader: Some(2),
            quorum_ack_age: None,
            ..leader(10_300, 4, None, 11)
        };
        let r = r.observe(&follower, TIMING);
        assert_eq!(r.holds_partitions(), None);
        assert_eq!(r.serving(10_300), Serving::Elsewhere(Some(2)));
    }

    #[test]
    fn stale_metrics_of_an_older_term_change_nothing() {
        let r = Replica::default().observe(&leader(1_000, 5, Some(0), 10), TIMING);
        let stale = Observation {
            role: Role::Follower,
            ..leader(1_100, 4, None, 10)
        };
        assert_eq!(r.clone().observe(&stale, TIMING), r);
    }

    // ---- a group of three replicas over a simulated network ---------------------------

    /// One step of a seeded schedule.
    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes.
        Wait(u64),
        /// The leader `node` believes it is (if any) sends a heartbeat, delivered to each
        /// other node after the given delay, or lost (`None`).
        Heartbeat {
            node: usize,
            delays: [Option<u64>; 3],
        },
        /// `node` stands for election; it wins if a majority may vote for it.
        Elect { node: usize },
        /// `node` reports its metrics.
        Report { node: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        let delay = prop_oneof![3 => (0u64..300).prop_map(Some), 1 => Just(None)];
        prop_oneof![
            3 => (1u64..400).prop_map(Step::Wait),
            3 => (0usize..3, [delay.clone(), delay.clone(), delay]).prop_map(|(node, delays)| Step::Heartbeat { node, delays }),
            1 => (0usize..3).prop_map(|node| Step::Elect { node }),
            4 => (0usize..3).prop_map(|node| Step::Report { node }),
        ]
    }

    /// What the simulated Raft knows of one node.
    #[derive(Debug, Clone, Default)]
    struct Node {
        /// The term it believes in, and whether it leads it.
        term: u64,
        leads: bool,
        /// When it last received a heartbeat of a leader of its term or later.
        heard_at: Option<u64>,
        /// For a leader: acknowledgements per heartbeat send time, by node.
        acks: Vec<(u64, [bool; 3])>,
        /// When it last won an election.
        elected_at: u64,
        replica: Replica,
    }

    /// The send time of the latest heartbeat a majority acknowledged.
    fn quorum_ack(n: &Node) -> Option<u64> {
        n.acks
            .iter()
            .filter(|(_, a)| a.iter().filter(|x| **x).count() >= 2)
            .map(|(t, _)| *t)
            .max()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// However heartbeats are delayed or lost and whoever stands for election, at no
        /// instant do two replicas of a group serve: a leader that is cut off stops
        /// before a new one can be elected.
        #[test]
        fn never_two_serving_leaders(steps in proptest::collection::vec(step(), 1..200)) {
            let lease = TIMING.follower_lease_ms;
            let mut nodes: Vec<Node> = vec![Node::default(), Node::default(), Node::default()];
            // Heartbeats in flight: (arrives at, to, from, term, sent at).
            let mut flight: Vec<(u64, usize, usize, u64, u64)> = Vec::new();
            let mut now = 0u64;
            for step in steps {
                match step {
                    Step::Wait(ms) => now += ms,
                    Step::Heartbeat { node, delays } => {
                        if nodes[node].leads {
                            let term = nodes[node].term;
                            let mut acked = [false; 3];
                            acked[node] = true;
                            nodes[node].acks.push((now, acked));
                            for (to, delay) in delays.iter().enumerate() {
                                if let (true, Some(d)) = (to != node, delay) {
                                    flight.push((now + d, to, node, term, now));
                                }
                            }
                        }
                    }
                    Step::Elect { node } => {
                        // openraft: a node stands for election, and votes, only once its
                        // leader's lease has passed: for a follower since the last
                        // heartbeat it heard, for a leader since the send time of the last
                        // heartbeat a quorum acknowledged (or since it was elected).
                        let may_vote = |n: &Node| match n.leads {
                            true => now >= quorum_ack(n).unwrap_or(n.elected_at) + lease,
                            false => n.heard_at.is_none_or(|h| now >= h + lease),
                        };
                        let term = nodes.iter().map(|n| n.term).max().unwrap_or(0) + 1;
                        let voters: Vec<bool> = nodes.iter().map(may_vote).collect();
                        if voters[node] && voters.iter().filter(|v| **v).count() >= 2 {
                            for (i, n) in nodes.iter_mut().enumerate() {
                                if voters[i] {
                                    n.term = term;
                                    n.leads = i == node;
                                    n.elected_at = now;
                                    n.acks.clear();
                                }
                            }
                        }
                    }
                    Step::Report { node } => {
                        let n = &nodes[node];
                        let quorum_ack = quorum_ack(n);
                        let obs = Observation {
                            at: now,
                            role: if n.leads { Role::Leader } else { Role::Follower },
                            term: n.term,
                            leader: None,
                            quorum_ack_age: if n.leads { quorum_ack.map(|t| now - t) } else { None },
                            applied_term: Some(n.term),
                            member: true,
                            handing_over: false,
                        };
                        let r = std::mem::take(&mut nodes[node].replica);
                        nodes[node].replica = r.observe(&obs, TIMING);
                    }
                }
                // Deliver what has arrived by now: a heartbeat of a term at least the
                // receiver's is heard (and acknowledged); the receiver follows that term.
                flight.sort_by_key(|f| f.0);
                while let Some(&(at, to, from, term, sent)) = flight.first() {
                    if at > now {
                        break;
                    }
                    flight.remove(0);
                    if term >= nodes[to].term {
                        let n = &mut nodes[to];
                        if term > n.term || n.leads {
                            n.leads = false;
                            n.acks.clear();
                        }
                        n.term = term;
                        n.heard_at = Some(at);
                        if nodes[from].term == term && nodes[from].leads {
                            if let Some((_, a)) = nodes[from].acks.iter_mut().find(|(t, _)| *t == sent) {
                                a[to] = true;
                            }
                        }
                    }
                }
                let serving = nodes.iter().filter(|n| n.replica.serving(now) == Serving::Serve).count();
                prop_assert!(serving <= 1, "{serving} replicas serve at {now}: {nodes:?}");
            }
        }
    }
}
