//! The cluster map and the membership commands (operator, admin). Any node answers;
//! the commands are carried out through consensus and partition handoffs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use shardmall_cluster::node::{ClusterError, ClusterStatus, RebalanceReport};
use utoipa::ToSchema;

use crate::auth::{Caller, Role};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiQuery, IdPath};
use crate::validate;
use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterNode {
    pub node_id: String,
    pub http_addr: String,
    pub cluster_addr: String,
    /// `up`, `leaving`, or `down` (did not answer a probe just now).
    pub status: String,
    /// Partitions this node serves: those it owns, or, replicated, those of the groups it
    /// leads as the answering node knows.
    pub partitions: u32,
}

/// One replica group (a replicated cluster, ADR 0016).
#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterGroup {
    pub group_id: u16,
    /// Its partitions: partition `p` is in group `p % groups`.
    pub partitions: Vec<u16>,
    /// The node leading it as the answering node knows; `null` while none is known.
    pub leader: Option<String>,
    /// The nodes the group's replicas are placed on.
    pub replicas: Vec<String>,
    /// The group's voting members as the answering node's replica knows them (empty when
    /// it holds none): equal to `replicas` once a replica move has finished.
    pub voters: Vec<String>,
    /// Log entries each replica is behind its leader: filled in when the answering node
    /// leads the group.
    #[schema(value_type = Object)]
    pub lag: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterMap {
    pub cluster_id: String,
    /// Version of the map: every change bumps it.
    pub epoch: u64,
    pub partitions: u32,
    /// The consensus leader's node id; `null` while none is known.
    pub leader: Option<String>,
    pub nodes: Vec<ClusterNode>,
    /// Copies of every partition: 1, 3 or 5.
    pub replication_factor: u8,
    /// The copies kept once enough members are active: above `replication_factor`
    /// while the cluster grows into replicas.
    pub target_replication_factor: u8,
    /// The replica groups; empty with one copy.
    pub groups: Vec<ClusterGroup>,
}

impl From<ClusterStatus> for ClusterMap {
    fn from(s: ClusterStatus) -> Self {
        ClusterMap {
            cluster_id: s.cluster_id,
            epoch: s.epoch,
            partitions: s.partitions,
            leader: s.leader,
            replication_factor: s.replication_factor,
            target_replication_factor: s.target_replication_factor,
            groups: s
                .groups
                .into_iter()
                .map(|g| ClusterGroup {
                    group_id: g.group_id,
                    partitions: g.partitions,
                    leader: g.leader,
                    replicas: g.replicas,
                    voters: g.voters,
                    lag: g.lag,
                })
                .collect(),
            nodes: s
                .nodes
                .into_iter()
                .map(|n| ClusterNode {
                    node_id: n.node_id,
                    http_addr: n.http_addr,
                    cluster_addr: n.cluster_addr,
                    status: n.status,
                    partitions: n.partitions,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MoveFailure {
    /// The partition that did not move; for a replica group, its first partition.
    pub partition: u16,
    /// The replica group whose leadership did not move (`kind` `leaders`), else null.
    pub group: Option<u16>,
    /// The node the move was asked of (partitions: the target; leaders: the leader).
    pub to: String,
    pub error: String,
}

/// What a rebalance or a leave did.
#[derive(Debug, Serialize, ToSchema)]
pub struct MovesReport {
    /// What moved: `partitions` (a cluster with one copy of each), `replicas` (a
    /// replicated member leaving: the groups whose replica moved) or `leaders` (a
    /// replicated rebalance: the groups whose leadership moved).
    pub kind: String,
    /// Moves planned.
    pub planned: usize,
    /// Of those, the ones that completed.
    pub moved: usize,
    pub failed: Vec<MoveFailure>,
    /// The map's epoch afterwards.
    pub epoch: u64,
}

impl From<RebalanceReport> for MovesReport {
    fn from(r: RebalanceReport) -> Self {
        MovesReport {
            kind: r.kind.to_owned(),
            planned: r.planned,
            moved: r.moved,
            failed: r
                .failed
                .into_iter()
                .map(|f| MoveFailure {
                    partition: f.partition,
                    group: f.group,
                    to: f.to,
                    error: f.error,
                })
                .collect(),
            epoch: r.epoch,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RemoveQuery {
    /// Remove a node that is down and owns partitions, giving up their data.
    #[serde(default)]
    pub force: bool,
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        match e {
            ClusterError::NotFound(m) => ApiError::not_found(m),
            ClusterError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "invalid_state", m),
            ClusterError::BadRequest(m) => ApiError::bad_request(m),
            ClusterError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

fn node_name(id: &str) -> ApiResult<&str> {
    if validate::is_id(id) && !id.bytes().all(|b| b == b'.') {
        Ok(id)
    } else {
        Err(ApiError::bad_request(
            "node_id must match [A-Za-z0-9._-]{1,64}",
        ))
    }
}

#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterMap), (status = 403, body = crate::error::ErrorBody)))]
pub async fn get_cluster(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<ClusterMap>> {
    caller.require(&[Role::Operator, Role::Admin])?;
    Ok(Json(st.cluster.status().await.into()))
}

#[utoipa::path(post, path = "/v1/cluster/rebalance", responses((status = 200, body = MovesReport), (status = 403, body = crate::error::ErrorBody)))]
pub async fn rebalance(State(st): State<AppState>, caller: Caller) -> ApiResult<Json<MovesReport>> {
    caller.require(&[Role::Operator, Role::Admin])?;
    let report = st.cluster.rebalance().await;
    tracing::info!(
        planned = report.planned,
        moved = report.moved,
        failed = report.failed.len(),
        epoch = report.epoch,
        "rebalance"
    );
    Ok(Json(report.into()))
}

#[utoipa::path(post, path = "/v1/cluster/nodes/{node_id}/leave", params(("node_id" = String, Path)), responses((status = 200, body = MovesReport), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn leave(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(node_id): IdPath,
) -> ApiResult<Json<MovesReport>> {
    caller.require(&[Role::Operator, Role::Admin])?;
    let report = st.cluster.leave(node_name(&node_id)?).await?;
    Ok(Json(report.into()))
}

#[utoipa::path(delete, path = "/v1/cluster/nodes/{node_id}", params(("node_id" = String, Path), ("force" = Option<bool>, Query, description = "remove a node that is down and owns partitions, giving up their data")), responses((status = 200, body = ClusterMap), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn remove(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(node_id): IdPath,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<Json<ClusterMap>> {
    caller.require(&[Role::Operator, Role::Admin])?;
    let status = st.cluster.remove(node_name(&node_id)?, q.force).await?;
    Ok(Json(status.into()))
}
