//! The shop's view of the cluster: where a partition is served, and the call that takes
//! an entity command to the node that owns it.
//!
//! Built before the shop and handed to it ([`shardmall_actors::Shop::start_routed`]):
//! routing goes one way, from the shop through this router to the transport, and the
//! router needs nothing of the shop. The retries on `Moved` are the shop's (one place,
//! `Shop::ask`); this router turns an owner's `WrongOwner` into a catch-up with the map
//! and `Moved`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardmall_actors::route::{
    BoxFuture, ForwardError, RemoteAnswer, RemoteCall, Route, Router, ScanPage, ScanRequest,
};
use tokio::task::JoinSet;

use crate::map::{Member, NodeId};
use crate::node::{lock, ClusterMetrics};
use crate::proto::{self, Request, Response};
use crate::raft::ControlPlane;
use crate::serving::{GroupRoute, Leaders};
use crate::transport::{Transport, TransportError};

/// How long to wait for this node's map to reach an epoch an owner reported.
const CATCH_UP: Duration = Duration::from_secs(1);
/// After a node failed to answer, commands for it fail at once for this long instead of
/// each waiting for a connection that will not come.
const SUSPECT_FOR: Duration = Duration::from_secs(1);
/// How long a command forwarded to a replica group's leader may take. A leader that has
/// died is replaced within about a second and a half; a call must not wait for it much
/// longer than that (the transport's own timeout is for any call) before the command is
/// routed again, to the new leader. A timed-out command is not acknowledged: its
/// idempotency key makes the client's retry safe.
const GROUP_CALL_TIMEOUT: Duration = Duration::from_millis(1500);

/// Routes a node's shop through the cluster map. Cheap to clone.
#[derive(Clone)]
pub struct ClusterRouter {
    parts: Arc<Parts>,
}

/// What a forwarded call needs, owned by its future.
struct Parts {
    me: NodeId,
    control: ControlPlane,
    transport: Arc<dyn Transport>,
    /// Nodes that just failed to answer, until when they are not tried.
    suspects: Mutex<HashMap<NodeId, Instant>>,
    metrics: Arc<ClusterMetrics>,
    /// Who serves each replica group (a replicated cluster, ADR 0016).
    leaders: Arc<Leaders>,
    /// Spreads first asks for a group's leader over its replicas.
    spread: std::sync::atomic::AtomicUsize,
}

impl ClusterRouter {
    pub fn new(
        me: &Member,
        control: ControlPlane,
        transport: Arc<dyn Transport>,
        leaders: Arc<Leaders>,
    ) -> ClusterRouter {
        ClusterRouter {
            parts: Arc::new(Parts {
                me: me.node_id,
                control,
                transport,
                suspects: Mutex::new(HashMap::new()),
                metrics: Arc::default(),
                leaders,
                spread: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// Who serves each replica group, as this node knows.
    pub fn leaders(&self) -> &Arc<Leaders> {
        &self.parts.leaders
    }

    /// The counters of forwarded calls, shared with the node's other cluster metrics.
    pub fn metrics(&self) -> Arc<ClusterMetrics> {
        self.parts.metrics.clone()
    }
}

impl Router for ClusterRouter {
    fn route(&self, partition: u16) -> Route {
        let map = self.parts.control.map();
        if !map.is_initialised() {
            return Route::Unavailable("the cluster map is not known yet".into());
        }
        if map.is_replicated() {
            // Not served here: the forward finds the leader, or asks to route again.
            return match self.parts.leaders.route(map.group_of(partition)) {
                GroupRoute::Here => Route::Local,
                _ => Route::Remote,
            };
        }
        match map.owner(partition) {
            Some(owner) if owner == self.parts.me => Route::Local,
            Some(owner) if map.members.contains_key(&owner) => Route::Remote,
            _ => Route::Unavailable(format!("partition {partition} has no owner")),
        }
    }

    fn forward(&self, call: RemoteCall) -> BoxFuture<'static, Result<Vec<u8>, ForwardError>> {
        let inner = self.parts.clone();
        Box::pin(async move {
            let map = inner.control.map();
            let group = map.group_of(call.partition);
            let target = if map.is_replicated() {
                match inner.leaders.route(group) {
                    GroupRoute::Leader(l) if map.members.contains_key(&l) => map.members.get(&l),
                    // This node holds no replica of the group (more members than
                    // replicas) and has no hint yet, or one naming a node that has left:
                    // a replica answers with its leader.
                    GroupRoute::Leader(_) | GroupRoute::Unknown
                        if !map.replicas_of(group).contains(&inner.me) =>
                    {
                        let replicas: Vec<NodeId> = map
                            .replicas_of(group)
                            .iter()
                            .copied()
                            .filter(|n| *n != inner.me)
                            .collect();
                        let pick = inner.spread.fetch_add(1, Ordering::Relaxed);
                        replicas
                            .get(pick % replicas.len().max(1))
                            .and_then(|n| map.members.get(n))
                    }
                    // Electing (the leader this replica knew may have left), or this node
                    // just became leader: route again shortly.
                    GroupRoute::Here | GroupRoute::Leader(_) | GroupRoute::Unknown => {
                        return Err(ForwardError::Moved)
                    }
                }
            } else {
                map.owner_member(call.partition)
            };
            let Some(owner) = target.cloned() else {
                return Err(ForwardError::Unavailable(format!(
                    "partition {} has no owner",
                    call.partition
                )));
            };
            inner.metrics.forwarded.fetch_add(1, Ordering::Relaxed);
            if lock(&inner.suspects)
                .get(&owner.node_id)
                .is_some_and(|until| Instant::now() < *until)
            {
                inner
                    .metrics
                    .forward_failures
                    .fetch_add(1, Ordering::Relaxed);
                return Err(ForwardError::Unavailable(format!(
                    "node {} is not answering",
                    owner.name
                )));
            }
            let frame = proto::encode(&Request::Entity {
                epoch: map.epoch,
                call,
            });
            let fail = |why: String| {
                inner
                    .metrics
                    .forward_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(ForwardError::Unavailable(why))
            };
            let timeout = map.is_replicated().then_some(GROUP_CALL_TIMEOUT);
            let call = inner
                .transport
                .call_batched(&owner.cluster_addr, frame, timeout);
            let answer = match call.await {
                Ok(a) => {
                    lock(&inner.suspects).remove(&owner.node_id);
                    a
                }
                Err(e) => {
                    if matches!(
                        e,
                        TransportError::Unreachable { .. } | TransportError::Timeout { .. }
                    ) {
                        lock(&inner.suspects).insert(owner.node_id, Instant::now() + SUSPECT_FOR);
                    }
                    return fail(format!("node {} is unreachable: {e}", owner.name));
                }
            };
            match proto::decode::<Response>(&answer) {
                Ok(Response::Entity(RemoteAnswer::Reply(bytes))) => Ok(bytes),
                Ok(Response::Entity(RemoteAnswer::WrongOwner { epoch })) => {
                    // Our map is stale (or theirs is): catch up, then route again.
                    inner.metrics.rerouted.fetch_add(1, Ordering::Relaxed);
                    if epoch > map.epoch {
                        inner.control.wait_for_epoch(epoch, CATCH_UP).await;
                    }
                    Err(ForwardError::Moved)
                }
                Ok(Response::Entity(RemoteAnswer::Moving)) => {
                    inner.metrics.rerouted.fetch_add(1, Ordering::Relaxed);
                    Err(ForwardError::Moved)
                }
                Ok(Response::Entity(RemoteAnswer::NotLeader { leader })) => {
                    inner.metrics.rerouted.fetch_add(1, Ordering::Relaxed);
                    // A replica's word replaces what this node had (its own replica's
                    // watcher corrects it at the next heartbeat, when it has one).
                    inner.leaders.hint(group, leader);
                    Err(ForwardError::Moved)
                }
                Ok(Response::Entity(RemoteAnswer::Overloaded(what))) => {
                    Err(ForwardError::Overloaded(what))
                }
                Ok(Response::Entity(RemoteAnswer::Unavailable(why))) => fail(why),
                Ok(Response::Entity(RemoteAnswer::Malformed(why))) => {
                    inner
                        .metrics
                        .forward_failures
                        .fetch_add(1, Ordering::Relaxed);
                    Err(ForwardError::Unreadable(format!(
                        "node {} could not read the call: {why}",
                        owner.name
                    )))
                }
                Ok(Response::Error(e)) => fail(format!("node {}: {e}", owner.name)),
                Ok(other) => fail(format!(
                    "unexpected answer from node {}: {other:?}",
                    owner.name
                )),
                Err(e) => fail(format!("node {}: {e}", owner.name)),
            }
        })
    }

    fn scan_others(
        &self,
        req: ScanRequest,
    ) -> BoxFuture<'static, Result<Vec<ScanPage>, ForwardError>> {
        let inner = self.parts.clone();
        Box::pin(async move {
            let map = inner.control.map();
            let me = inner.me;
            // Replicated: each node lists the groups it leads.
            let targets: Vec<Member> = if map.is_replicated() {
                match req.partition {
                    Some(p) => match inner.leaders.route(map.group_of(p)) {
                        GroupRoute::Here => Vec::new(),
                        GroupRoute::Leader(l) => map.members.get(&l).cloned().into_iter().collect(),
                        // Only the leader lists the group: ask every replica.
                        GroupRoute::Unknown => map
                            .replicas_of(map.group_of(p))
                            .iter()
                            .filter(|n| **n != me)
                            .filter_map(|n| map.members.get(n))
                            .cloned()
                            .collect(),
                    },
                    None => map
                        .members
                        .values()
                        .filter(|m| m.node_id != me)
                        .cloned()
                        .collect(),
                }
            } else {
                // Only nodes that own partitions hold anything to list.
                match req.partition {
                    Some(p) => map
                        .owner_member(p)
                        .filter(|m| m.node_id != me)
                        .cloned()
                        .into_iter()
                        .collect(),
                    None => map
                        .members
                        .values()
                        .filter(|m| m.node_id != me && !map.owned_by(m.node_id).is_empty())
                        .cloned()
                        .collect(),
                }
            };
            let mut calls = JoinSet::new();
            for m in targets {
                let frame = proto::encode(&Request::Scan(req.clone()));
                let transport = inner.transport.clone();
                calls.spawn(async move {
                    (m.name.clone(), transport.call(&m.cluster_addr, frame).await)
                });
            }
            let mut pages = Vec::new();
            while let Some(done) = calls.join_next().await {
                let (name, answer) = done
                    .map_err(|e| ForwardError::Unavailable(format!("a list task failed: {e}")))?;
                let answer = answer.map_err(|e| {
                    ForwardError::Unavailable(format!("node {name} did not answer the list: {e}"))
                })?;
                match proto::decode::<Response>(&answer) {
                    Ok(Response::Scan(page)) => pages.push(page),
                    Ok(Response::Error(e)) => {
                        return Err(ForwardError::Unavailable(format!("node {name}: {e}")))
                    }
                    Ok(_) | Err(_) => {
                        return Err(ForwardError::Unavailable(format!(
                            "node {name} answered the list with something else"
                        )))
                    }
                }
            }
            Ok(pages)
        })
    }
}
