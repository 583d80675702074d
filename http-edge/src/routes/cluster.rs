//! The cluster map. A single node is a one-member cluster that owns every partition.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, Role};
use crate::error::ApiResult;
use crate::AppState;

/// Who this node is, as the cluster map shows it.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub cluster_id: String,
    pub node_id: String,
    pub http_addr: String,
    pub cluster_addr: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterNode {
    pub node_id: String,
    pub http_addr: String,
    pub cluster_addr: String,
    /// `up`
    pub status: String,
    /// Partitions this node owns.
    pub partitions: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterMap {
    pub cluster_id: String,
    pub epoch: u64,
    pub partitions: u32,
    pub leader: String,
    pub nodes: Vec<ClusterNode>,
}

#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterMap), (status = 403, body = crate::error::ErrorBody)))]
pub async fn get_cluster(
    State(st): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<ClusterMap>> {
    caller.require(&[Role::Operator, Role::Admin])?;
    let me = &st.identity;
    let partitions = u32::from(st.shop.partitioner().count());
    Ok(Json(ClusterMap {
        cluster_id: me.cluster_id.clone(),
        epoch: 1,
        partitions,
        leader: me.node_id.clone(),
        nodes: vec![ClusterNode {
            node_id: me.node_id.clone(),
            http_addr: me.http_addr.clone(),
            cluster_addr: me.cluster_addr.clone(),
            status: "up".into(),
            partitions,
        }],
    }))
}
