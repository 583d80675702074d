//! What this node answers: the frames other nodes send (entity commands, scans, joins,
//! installs, consensus), through the [`Dispatcher`] the transport serves.

use super::*;

impl ClusterNode {
    pub(super) async fn serve_frame(&self, frame: Vec<u8>) -> Response {
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

    pub(super) async fn serve_entity(&self, epoch: u64, call: RemoteCall) -> RemoteAnswer {
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

    pub(super) fn scan_here(&self, req: &ScanRequest) -> Result<ScanPage, String> {
        self.inner.shop.scan_local(req).map_err(|e| e.to_string())
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
