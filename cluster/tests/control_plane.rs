//! The control plane alone: consensus on the cluster map over the in-memory network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_cluster::map::{node_id_of, MapCommand, MapError, Member, MemberStatus};
use shardmall_cluster::memory::MemoryNet;
use shardmall_cluster::raft::{ControlConfig, ControlError, ControlPlane};
use shardmall_cluster::{BoxFuture, Service};

fn member(name: &str) -> Member {
    Member {
        node_id: node_id_of(name),
        name: name.into(),
        http_addr: format!("http-{name}"),
        cluster_addr: name.into(),
        status: MemberStatus::Active,
        incarnation: node_id_of(name) ^ 0x5eed,
    }
}

/// Answers consensus frames with the control plane set after the transport exists.
#[derive(Default)]
struct RaftOnly(std::sync::OnceLock<ControlPlane>);

impl Service for RaftOnly {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        use shardmall_cluster::proto::{decode, encode, Request, Response};
        let control = self.0.get().cloned();
        Box::pin(async move {
            let answer = match (decode::<Request>(&frame), control) {
                (Ok(Request::Raft(body)), Some(c)) => Response::Raft(c.serve_raft(body).await),
                _ => Response::Error("not served here".into()),
            };
            encode(&answer)
        })
    }
}

async fn open(net: &MemoryNet, root: &std::path::Path, name: &str) -> ControlPlane {
    let service = Arc::new(RaftOnly::default());
    net.register(name, service.clone());
    // A stopped control plane's last tasks let go of its store shortly after: a reopen
    // right after a shutdown may find it still locked (as in the scenarios' restarts).
    let opened = Instant::now();
    let control = loop {
        match ControlPlane::open(
            ControlConfig::new(member(name), root.join(name)),
            Arc::new(net.endpoint(name)),
        )
        .await
        {
            Ok(c) => break c,
            Err(e) if opened.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open: {e:?}"),
        }
    };
    let _ = service.0.set(control.clone());
    control
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_bootstraps_and_keeps_its_map_across_restarts() {
    let net = MemoryNet::new();
    let root = tempfile::tempdir().unwrap();
    let c = open(&net, root.path(), "n1").await;
    assert!(!c.is_initialised());
    let map = c.bootstrap("shop".into(), 8).await.expect("bootstrap");
    assert_eq!(map.owned_by(node_id_of("n1")).len(), 8);
    assert_eq!(c.leader(), Some(node_id_of("n1")));
    // A refused command changes nothing and says why.
    let err = c
        .propose(MapCommand::RemoveMember {
            node: node_id_of("n1"),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, ControlError::Map(MapError::StillOwns { .. })),
        "{err:?}"
    );
    let epoch = c.map().epoch;
    c.shutdown().await;
    drop(c);
    net.unregister("n1");

    let again = open(&net, root.path(), "n1").await;
    // The map is there before any election.
    assert_eq!(again.map().epoch, epoch);
    assert!(again.is_initialised());
    // Bootstrapping again is harmless.
    again
        .bootstrap("shop".into(), 8)
        .await
        .expect("bootstrap again");
    let moved = again
        .propose(MapCommand::SetStatus {
            node: node_id_of("n1"),
            status: MemberStatus::Active,
        })
        .await
        .expect("proposal after restart");
    assert_eq!(moved.epoch, epoch + 1);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_agree_and_survive_the_loss_of_the_leader() {
    let net = MemoryNet::new();
    let root = tempfile::tempdir().unwrap();
    let n1 = open(&net, root.path(), "n1").await;
    n1.bootstrap("shop".into(), 8).await.expect("bootstrap");
    let n2 = open(&net, root.path(), "n2").await;
    let n3 = open(&net, root.path(), "n3").await;
    let n4 = open(&net, root.path(), "n4").await;
    // Two nodes joining at once queue on the leader rather than fail.
    let (a, b) = tokio::join!(n1.add_voter(member("n2")), n1.add_voter(member("n3")));
    a.expect("add n2");
    b.expect("add n3 at the same time");
    // A join can be asked of any member: here of a follower.
    n2.add_voter(member("n4"))
        .await
        .expect("add n4 through a follower");
    let nodes = [n1.clone(), n2.clone(), n3.clone(), n4.clone()];
    eventually("every node holds four members", || {
        nodes.iter().all(|c| c.map().members.len() == 4)
    })
    .await;

    // A follower's proposal reaches the leader.
    let map = n3
        .propose(MapCommand::Move {
            partition: 0,
            from: node_id_of("n1"),
            to: node_id_of("n3"),
        })
        .await
        .expect("move through a follower");
    assert_eq!(map.owner(0), Some(node_id_of("n3")));
    // A stale move (same partition, old owner) is refused: it cannot take effect twice.
    let stale = n2
        .propose(MapCommand::Move {
            partition: 0,
            from: node_id_of("n1"),
            to: node_id_of("n2"),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(stale, ControlError::Map(MapError::NotOwner { .. })),
        "{stale:?}"
    );

    // The leader goes away; the two others elect a new one and keep changing the map.
    let leader = n1.leader().expect("a leader");
    let named = [("n1", n1), ("n2", n2), ("n3", n3), ("n4", n4)];
    let (gone, rest): (Vec<_>, Vec<_>) = named
        .into_iter()
        .partition(|(name, _)| node_id_of(name) == leader);
    let (gone_name, gone) = gone.into_iter().next().expect("the leader is one of them");
    net.unregister(gone_name);
    gone.shutdown().await;
    eventually("a new leader", || {
        rest.iter()
            .all(|(_, c)| c.leader().is_some_and(|l| l != leader))
    })
    .await;
    let survivor = &rest[0].1;
    let to = node_id_of(rest[1].0);
    let map = survivor
        .remove_node(
            leader,
            MapCommand::ForgetMember {
                node: leader,
                to: vec![to],
            },
        )
        .await
        .expect("forget the lost leader");
    assert!(!map.members.contains_key(&leader));
    assert!(map.owned_by(leader).is_empty());
    let rest: Vec<ControlPlane> = rest.into_iter().map(|(_, c)| c).collect();
    for c in &rest {
        c.shutdown().await;
    }
}
