//! stub for compile checks
use std::sync::Arc;
use std::time::Duration;
use crate::map::*;
use crate::transport::Transport;
#[derive(Debug, thiserror::Error)]
pub enum ControlError { #[error("map {0}")] Map(MapError), #[error("no leader")] NoLeader, #[error("x {0}")] Unreachable(String) }
pub struct ControlConfig;
impl ControlConfig { pub fn new(_me: Member, _dir: std::path::PathBuf) -> Self { ControlConfig } }
#[derive(Clone)]
pub struct ControlPlane;
impl ControlPlane {
    pub async fn open(_cfg: ControlConfig, _t: Arc<dyn Transport>) -> Result<ControlPlane, ControlError> { todo!() }
    pub fn is_initialised(&self) -> bool { todo!() }
    pub async fn bootstrap(&self, _c: String, _p: u16) -> Result<ClusterMap, ControlError> { todo!() }
    pub fn map(&self) -> Arc<ClusterMap> { todo!() }
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<ClusterMap>> { todo!() }
    pub fn leader(&self) -> Option<NodeId> { todo!() }
    pub async fn propose(&self, _cmd: MapCommand) -> Result<ClusterMap, ControlError> { todo!() }
    pub async fn add_voter(&self, _m: Member) -> Result<ClusterMap, ControlError> { todo!() }
    pub async fn remove_node(&self, _n: NodeId, _c: MapCommand) -> Result<ClusterMap, ControlError> { todo!() }
    pub async fn serve_raft(&self, _b: Vec<u8>) -> Vec<u8> { todo!() }
    pub async fn wait_for_epoch(&self, _e: u64, _t: Duration) -> Arc<ClusterMap> { todo!() }
    pub async fn shutdown(&self) {}
}
