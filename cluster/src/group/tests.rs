//! Replica groups of three in one process, over the in-memory network, each replica with
//! a log of its own on disk: what a leader acknowledges is on every replica, survives the
//! leader's death and a replica's restart, and reaches a replica that lost its disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_persistence::{Durability, Fold, Lsn, PartitionData, Record, Wal, WalConfig};

use super::*;
use crate::memory::MemoryNet;
use crate::proto::{self, Request, Response};
use crate::transport::Service;

/// An entity's state is its payloads joined with `|`.
fn fold() -> Fold {
    Box::new(|_, snapshot, tail| {
        let mut state = snapshot.map(<[u8]>::to_vec).unwrap_or_default();
        for (_, payload) in tail {
            if !state.is_empty() {
                state.push(b'|');
            }
            state.extend_from_slice(payload);
        }
        Ok(Some(state))
    })
}

/// The test's host; `fail` makes every checkpoint fail (a partition that does not fold).
struct Host(Wal, Arc<std::sync::atomic::AtomicBool>);

impl GroupHost for Host {
    fn checkpoint(&self, partition: u16) -> Result<(), String> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!("partition {partition} does not fold"));
        }
        let mut f = fold();
        self.0
            .checkpoint_partition_fully(partition, &mut f)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn export(&self, partition: u16) -> BoxFuture<'static, Result<PartitionData, String>> {
        let wal = self.0.clone();
        Box::pin(async move {
            wal.export_partition(partition, fold())
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn install(
        &self,
        partition: u16,
        data: PartitionData,
    ) -> BoxFuture<'static, Result<(), String>> {
        let wal = self.0.clone();
        Box::pin(async move {
            wal.install_partition(partition, data, Vec::new(), Vec::new(), Vec::new())
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// Answers group frames with the node's groups.
struct Serve(Arc<Groups>);

impl Service for Serve {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        match proto::decode::<Request>(&frame) {
            Ok(Request::Group(body)) => self.0.serve_group(body),
            _ => Box::pin(async { proto::encode(&Response::Error("not a group frame".into())) }),
        }
    }
}

const PARTITIONS: u16 = 4;
const GROUPS: u16 = 2;

struct Replica {
    id: NodeId,
    dir: PathBuf,
    wal: Wal,
    groups: Arc<Groups>,
    /// Makes this replica's checkpoints fail.
    fail_folds: Arc<std::sync::atomic::AtomicBool>,
}

fn addr(id: NodeId) -> String {
    format!("n{id}")
}

fn settings(snapshot_every: u64) -> GroupSettings {
    let mut s = GroupSettings::new(PARTITIONS, GROUPS);
    s.heartbeat = Duration::from_millis(50);
    s.election_min = Duration::from_millis(200);
    s.election_max = Duration::from_millis(400);
    s.snapshot_every = snapshot_every;
    s.snapshot_retry = Duration::from_millis(100);
    s
}

async fn open_wal(dir: &Path) -> Wal {
    let mut cfg = WalConfig::new(dir);
    cfg.durability = Durability::Sync;
    cfg.cache_bytes = 8 << 20;
    cfg.segment_bytes = 64 * 1024;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Wal::open(cfg.clone()) {
            Ok(w) => return w,
            Err(e) if Instant::now() < deadline => {
                eprintln!("reopen retry: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("opening {}: {e}", dir.display()),
        }
    }
}

async fn start(net: &MemoryNet, id: NodeId, dir: PathBuf, snapshot_every: u64) -> Replica {
    let wal = open_wal(&dir).await;
    let fail_folds = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let groups = Groups::new(
        id,
        settings(snapshot_every),
        wal.clone(),
        Arc::new(Host(wal.clone(), fail_folds.clone())),
        Arc::new(net.endpoint(&addr(id))),
        Arc::new(|_| None),
    );
    let hook: Arc<dyn shardmall_persistence::Replicate> = groups.clone();
    wal.set_replicate(&hook);
    for g in 0..GROUPS {
        groups.start(g).await.unwrap();
    }
    net.register(&addr(id), Arc::new(Serve(groups.clone())));
    Replica {
        id,
        dir,
        wal,
        groups,
        fail_folds,
    }
}

async fn stop(net: &MemoryNet, r: Replica) -> PathBuf {
    net.unregister(&addr(r.id));
    r.groups.shutdown().await;
    r.wal.shutdown().await.unwrap();
    r.dir
}

async fn cluster(net: &MemoryNet, root: &Path, snapshot_every: u64) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for id in 1..=3 {
        replicas.push(start(net, id, root.join(format!("n{id}")), snapshot_every).await);
    }
    let voters: BTreeMap<NodeId, String> = (1..=3).map(|id| (id, addr(id))).collect();
    for g in 0..GROUPS {
        replicas[0].groups.initialize(g, &voters).await.unwrap();
    }
    replicas
}

/// The replica that leads `group`, once one does.
async fn leader(replicas: &[Replica], group: u16) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if r.groups.replica(group).is_some_and(|g| g.is_leader()) {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "group {group} elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record(partition: u16, entity: &str, payload: &str) -> Record {
    Record {
        partition,
        entity: entity.as_bytes().to_vec(),
        payload: payload.as_bytes().to_vec(),
        aux: Vec::new(),
        also: Vec::new(),
    }
}

/// What the node's serving watcher does once a write was not committed: the group's
/// partitions are reloaded (here there is nothing to reload), then it takes records
/// again once none is in flight.
async fn settle(r: &Replica, p: u16) {
    let Some(replica) = r.groups.replica(group_of(p, GROUPS)) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica.poisoned() && !replica.settle() {
        assert!(Instant::now() < deadline, "records stay in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `n` records to entity `e` of partition `p` through the leader's log, one after
/// the other, and answers the payloads acknowledged.
async fn write(r: &Replica, p: u16, e: &str, from: usize, n: usize) -> Vec<String> {
    let mut acked = Vec::new();
    for i in from..from + n {
        let payload = format!("{i}");
        settle(r, p).await;
        let ack = r.wal.append(record(p, e, &payload)).await.unwrap();
        let lsn: Lsn = ack.durable().await.unwrap();
        assert!(lsn > 0);
        acked.push(payload);
    }
    acked
}

/// The entity's state on a replica: snapshot and tail folded.
fn state(r: &Replica, p: u16, e: &str) -> String {
    let log = r.wal.load_entity(p, e.as_bytes()).unwrap();
    let mut f = fold();
    let s = f(e.as_bytes(), log.snapshot.as_deref(), &log.tail).unwrap();
    String::from_utf8(s.unwrap_or_default()).unwrap()
}

async fn converges(r: &Replica, p: u16, e: &str, want: &[String]) {
    let want = want.join("|");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = state(r, p, e);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {} has {got:?} of {e}, not {want:?}",
            r.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_record_is_on_every_replica() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let replicas = cluster(&net, root.path(), 20_000).await;
    let l = leader(&replicas, 1).await;
    // Partition 3 is in group 1.
    let acked = write(&replicas[l], 3, "sku-1", 0, 20).await;
    for r in &replicas {
        converges(r, 3, "sku-1", &acked).await;
    }
    // A follower does not take writes: the record is refused, nothing is written.
    let f = (l + 1) % 3;
    let refused = replicas[f]
        .wal
        .append(record(3, "sku-1", "nope"))
        .await
        .unwrap()
        .durable()
        .await;
    assert!(
        matches!(refused, Err(shardmall_persistence::Error::Replication(_))),
        "{refused:?}"
    );
    for r in replicas {
        stop(&net, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_and_another_serves_everything_it_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let mut replicas = cluster(&net, root.path(), 20_000).await;
    let l = leader(&replicas, 0).await;
    let mut acked = write(&replicas[l], 2, "sku-2", 0, 30).await;
    let dead = replicas.remove(l);
    let dead_id = dead.id;
    let dead_dir = stop(&net, dead).await;
    let l = leader(&replicas, 0).await;
    acked.extend(write(&replicas[l], 2, "sku-2", 30, 10).await);
    for r in &replicas {
        converges(r, 2, "sku-2", &acked).await;
    }
    // The old leader comes back as a follower and catches up from its own log.
    replicas.push(start(&net, dead_id, dead_dir, 20_000).await);
    for r in &replicas {
        converges(r, 2, "sku-2", &acked).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_restarts_with_what_was_acknowledged_across_snapshots() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    // A snapshot (a full checkpoint of the group) every 10 entries.
    let replicas = cluster(&net, root.path(), 10).await;
    let l = leader(&replicas, 0).await;
    let acked = write(&replicas[l], 0, "order-7", 0, 45).await;
    for r in &replicas {
        converges(r, 0, "order-7", &acked).await;
    }
    let mut dirs = Vec::new();
    for r in replicas {
        dirs.push((r.id, stop(&net, r).await));
    }
    let mut replicas = Vec::new();
    for (id, dir) in dirs {
        replicas.push(start(&net, id, dir, 10).await);
    }
    let l = leader(&replicas, 0).await;
    let mut all = acked.clone();
    all.extend(write(&replicas[l], 0, "order-7", 45, 5).await);
    for r in &replicas {
        converges(r, 0, "order-7", &all).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

/// A snapshot that cannot be made (a partition does not fold) leaves the group taking
/// writes, its log kept; once folds work again the next snapshot purges it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_made_does_not_stop_the_group() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let replicas = cluster(&net, root.path(), 5).await;
    for r in &replicas {
        r.fail_folds
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let l = leader(&replicas, 0).await;
    // Many snapshot triggers, every build failing.
    let mut acked = write(&replicas[l], 2, "sku-9", 0, 30).await;
    for r in &replicas {
        converges(r, 2, "sku-9", &acked).await;
        let m = r.groups.replica(0).unwrap().raft.metrics().borrow().clone();
        assert!(
            m.snapshot.is_none(),
            "no snapshot was made: {:?}",
            m.snapshot
        );
        assert!(m.purged.is_none(), "nothing purged without a snapshot");
    }
    for r in &replicas {
        r.fail_folds
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
    let l = leader(&replicas, 0).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    acked.extend(write(&replicas[l], 2, "sku-9", 30, 10).await);
    let mut metrics = replicas[l].groups.replica(0).unwrap().raft.metrics();
    tokio::time::timeout(
        Duration::from_secs(15),
        metrics.wait_for(|m| m.snapshot.is_some_and(|s| s.index >= 30)),
    )
    .await
    .expect("a snapshot once folds work again")
    .unwrap();
    for r in &replicas {
        converges(r, 2, "sku-9", &acked).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_is_rebuilt_from_a_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let mut replicas = cluster(&net, root.path(), 10).await;
    let l = leader(&replicas, 1).await;
    let f = (l + 1) % 3;
    let acked = write(&replicas[l], 1, "campaign-1", 0, 40).await;
    converges(&replicas[f], 1, "campaign-1", &acked).await;
    let lost = replicas.remove(f);
    let lost_id = lost.id;
    let dir = stop(&net, lost).await;
    std::fs::remove_dir_all(&dir).unwrap();
    // The log the lost replica would need is purged behind the leader's snapshots.
    let l = leader(&replicas, 1).await;
    let mut all = acked.clone();
    all.extend(write(&replicas[l], 1, "campaign-1", 40, 25).await);
    let mut metrics = replicas[l].groups.replica(1).unwrap().raft.metrics();
    tokio::time::timeout(
        Duration::from_secs(10),
        metrics.wait_for(|m| m.purged.is_some_and(|p| p.index > 20)),
    )
    .await
    .expect("the leader purges its log behind its snapshots")
    .unwrap();
    replicas.push(start(&net, lost_id, dir, 10).await);
    for r in &replicas {
        converges(r, 1, "campaign-1", &all).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

/// Seeded schedules of faults with writes running: kills, restarts, cut, slow and lossy
/// links. After every step no group has two leaders in one term; at the end, with every
/// replica back and every link healed, each replica holds every acknowledged write, in
/// the order it was acknowledged, nothing twice, and all replicas agree.
///
/// `SHARDMALL_SIM_SEEDS` sets how many seeds run (default 100) and
/// `SHARDMALL_SIM_FIRST_SEED` the first; a failure names its seed, and running that one
/// seed again replays the same schedule (the threads' interleaving is the machine's).
mod faults {
    use std::collections::{BTreeMap, HashMap};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const ENTITIES: [(u16, &str); 4] = [(0, "a"), (1, "b"), (2, "c"), (3, "d")];
    const STEPS: usize = 8;

    struct Sim {
        net: MemoryNet,
        root: PathBuf,
        alive: BTreeMap<NodeId, Replica>,
        dead: BTreeMap<NodeId, PathBuf>,
        /// Per entity: payloads acknowledged, in order; and every payload attempted.
        acked: HashMap<&'static str, Vec<String>>,
        attempted: HashMap<&'static str, Vec<String>>,
        /// (group, term) -> the leader seen in it.
        leaders: HashMap<(u16, u64), NodeId>,
        next: usize,
    }

    impl Sim {
        fn check_leaders(&mut self, seed: u64) {
            for (id, r) in &self.alive {
                for g in 0..GROUPS {
                    let Some(replica) = r.groups.replica(g) else {
                        continue;
                    };
                    let m = replica.raft.metrics().borrow().clone();
                    if m.current_leader == Some(*id) {
                        let seen = *self.leaders.entry((g, m.current_term)).or_insert(*id);
                        assert_eq!(
                            seen, *id,
                            "seed {seed}: group {g} has two leaders in term {}",
                            m.current_term
                        );
                    }
                }
            }
        }

        /// Writes a few records to one entity through whichever replica says it leads.
        async fn write_some(&mut self, rng: &mut StdRng) {
            let (p, e) = ENTITIES[rng.gen_range(0..ENTITIES.len())];
            let group = group_of(p, GROUPS);
            let n = rng.gen_range(1..6);
            for _ in 0..n {
                let Some(r) = self
                    .alive
                    .values()
                    .find(|r| r.groups.replica(group).is_some_and(|g| g.is_leader()))
                else {
                    return;
                };
                let payload = format!("{}", self.next);
                self.next += 1;
                self.attempted.entry(e).or_default().push(payload.clone());
                settle(r, p).await;
                let wal = r.wal.clone();
                let rec = record(p, e, &payload);
                let outcome = tokio::time::timeout(Duration::from_secs(2), async move {
                    wal.append(rec).await?.durable().await
                })
                .await;
                match outcome {
                    Ok(Ok(_)) => self.acked.entry(e).or_default().push(payload),
                    // Refused or in doubt: it may or may not be applied.
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        }

        async fn fault(&mut self, rng: &mut StdRng) {
            let ids: Vec<NodeId> = (1..=3).collect();
            let a = addr(ids[rng.gen_range(0..3)]);
            let b = addr(ids[rng.gen_range(0..3)]);
            match rng.gen_range(0..6) {
                // Kill one replica while all three run (a majority always stays).
                0 if self.alive.len() == 3 => {
                    let id = *self.alive.keys().nth(rng.gen_range(0..3)).unwrap();
                    let r = self.alive.remove(&id).unwrap();
                    let dir = stop(&self.net, r).await;
                    self.dead.insert(id, dir);
                }
                0 | 1 => {
                    if let Some((id, dir)) = self.dead.pop_first() {
                        let r = start(&self.net, id, dir, 10).await;
                        self.alive.insert(id, r);
                    }
                }
                2 if a != b => self.net.cut(&a, &b),
                3 if a != b => self
                    .net
                    .delay(&a, &b, Duration::from_millis(rng.gen_range(5..80))),
                4 if a != b => self.net.lossy(&a, &b, 0.3),
                _ => self.net.heal_all(),
            }
        }

        async fn settle_and_check(mut self, seed: u64) {
            self.net.heal_all();
            while let Some((id, dir)) = self.dead.pop_first() {
                let r = start(&self.net, id, dir, 10).await;
                self.alive.insert(id, r);
            }
            // A write per entity through the settled groups: once it is applied
            // everywhere, so is everything committed before it.
            for (p, e) in ENTITIES {
                let group = group_of(p, GROUPS);
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let replicas: Vec<Replica> =
                        std::mem::take(&mut self.alive).into_values().collect();
                    let l = leader(&replicas, group).await;
                    let payload = format!("{}", self.next);
                    self.next += 1;
                    self.attempted.entry(e).or_default().push(payload.clone());
                    settle(&replicas[l], p).await;
                    let wal = replicas[l].wal.clone();
                    self.alive = replicas.into_iter().map(|r| (r.id, r)).collect();
                    // The leader found may lose its place before the write arrives
                    // (a restarted replica's election): ask again.
                    match wal
                        .append(record(p, e, &payload))
                        .await
                        .unwrap()
                        .durable()
                        .await
                    {
                        Ok(_) => {
                            self.acked.entry(e).or_default().push(payload);
                            break;
                        }
                        Err(err) => {
                            assert!(
                                Instant::now() < deadline,
                                "seed {seed}: the settled group keeps refusing: {err}"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            for (p, e) in ENTITIES {
                let last = self.acked[e].last().unwrap().clone();
                let deadline = Instant::now() + Duration::from_secs(10);
                let states: Vec<String> = loop {
                    let states: Vec<String> = self.alive.values().map(|r| state(r, p, e)).collect();
                    if states.iter().all(|s| s.split('|').any(|x| x == last)) {
                        break states;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "seed {seed}: {e} did not converge: {states:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                assert!(
                    states.windows(2).all(|w| w[0] == w[1]),
                    "seed {seed}: replicas disagree on {e}: {states:?}"
                );
                let got: Vec<&str> = states[0].split('|').collect();
                let mut seen = std::collections::HashSet::new();
                for x in &got {
                    assert!(seen.insert(*x), "seed {seed}: {e} holds {x} twice: {got:?}");
                    assert!(
                        self.attempted[e].iter().any(|a| a == x),
                        "seed {seed}: {e} holds {x}, never written"
                    );
                }
                let positions: Vec<usize> = self.acked[e]
                    .iter()
                    .map(|a| {
                        got.iter().position(|x| x == a).unwrap_or_else(|| {
                            panic!("seed {seed}: acknowledged {a} of {e} is lost: {got:?}")
                        })
                    })
                    .collect();
                assert!(
                    positions.windows(2).all(|w| w[0] < w[1]),
                    "seed {seed}: {e} out of order: {got:?}"
                );
            }
            for (_, r) in std::mem::take(&mut self.alive) {
                stop(&self.net, r).await;
            }
        }
    }

    async fn run(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = tempfile::tempdir().unwrap();
        let net = MemoryNet::new();
        let replicas = cluster(&net, root.path(), 10).await;
        let mut sim = Sim {
            net,
            root: root.path().to_path_buf(),
            alive: replicas.into_iter().map(|r| (r.id, r)).collect(),
            dead: BTreeMap::new(),
            acked: HashMap::new(),
            attempted: HashMap::new(),
            leaders: HashMap::new(),
            next: 0,
        };
        let _ = &sim.root;
        for _ in 0..STEPS {
            if rng.gen_bool(0.6) {
                sim.write_some(&mut rng).await;
            } else {
                sim.fault(&mut rng).await;
            }
            sim.check_leaders(seed);
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
        }
        sim.settle_and_check(seed).await;
    }

    fn env_u64(name: &str, default: u64) -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    #[test]
    fn seeded_fault_schedules_lose_nothing_acknowledged() {
        let first = env_u64("SHARDMALL_SIM_FIRST_SEED", 0);
        let seeds = env_u64("SHARDMALL_SIM_SEEDS", 100);
        for seed in first..first + seeds {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run(seed));
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A replica that just started may have confirmed a leader's lease before it stopped: it
/// grants no vote until that lease has run out (the election timeout), then votes as Raft
/// says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_grants_no_vote_while_a_lease_it_confirmed_may_hold() {
    use openraft::raft::{VoteRequest, VoteResponse};
    use openraft::Vote;

    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let r = start(&net, 1, root.path().join("n1"), 20_000).await;
    let ask = || async {
        let body = proto::encode(&network::GroupEnvelope {
            group: 0,
            msg: network::GroupMsg::Vote(VoteRequest::new(Vote::new(7, 2), None)),
        });
        let Response::Group(reply) = answer(&r.groups, body).await else {
            panic!("not a group answer");
        };
        match proto::decode::<network::GroupReply>(&reply).unwrap() {
            network::GroupReply::Vote(Ok(v)) => v,
            other => panic!("{other:?}"),
        }
    };
    let refused: VoteResponse<u64> = ask().await;
    assert!(!refused.vote_granted, "{refused:?}");
    tokio::time::sleep(settings(20_000).election_max).await;
    let granted = ask().await;
    assert!(granted.vote_granted, "{granted:?}");
    stop(&net, r).await;
}

/// A record a group does not commit leaves the entity that decided it ahead of the log:
/// the group refuses every later record (they may build on it) until the node has
/// reloaded the group's partitions and nothing is in flight. The overload bound is one
/// such refusal.
#[tokio::test(flavor = "current_thread")]
async fn an_uncommitted_record_stops_the_group_until_it_is_settled() {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let replicas = cluster(&net, root.path(), 20_000).await;
    let l = leader(&replicas, 1).await;
    let replica = replicas[l].groups.replica(1).unwrap();
    // Queued without yielding: the proposer cannot take any before the bound is hit.
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..MAX_PENDING + 10 {
        let tx = tx.clone();
        let queued = replicas[l]
            .wal
            .try_append_then(record(3, "sku-q", &i.to_string()), move |o| {
                let _ = tx.send((i, o));
            })
            .unwrap();
        assert!(queued.is_none());
    }
    drop(tx);
    assert!(replica.poisoned(), "the bound was hit");
    let mut acked = Vec::new();
    let mut refused = 0;
    while let Some((i, outcome)) = rx.recv().await {
        match outcome {
            Ok(_) => acked.push(i.to_string()),
            Err(shardmall_persistence::Error::Replication(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    // The proposer had taken none when the bound was hit: every record still queued is
    // refused with it (any of them may have been decided after the refused one).
    assert!(acked.is_empty(), "{} acknowledged", acked.len());
    assert_eq!(refused, MAX_PENDING + 10);
    assert_eq!(replica.pending(), 0);
    // Still refusing until settled.
    let still = replicas[l]
        .wal
        .append(record(3, "sku-q", "late"))
        .await
        .unwrap()
        .durable()
        .await;
    assert!(still.is_err(), "{still:?}");
    assert!(replica.settle());
    acked.extend(write(&replicas[l], 3, "sku-q", 100_000, 3).await);
    for r in &replicas {
        converges(r, 3, "sku-q", &acked).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

/// Moves `group`'s voters to `want` through whichever replica leads it.
async fn place_until_done(replicas: &[Replica], group: u16, want: &[NodeId]) {
    let want: BTreeMap<NodeId, String> = want.iter().map(|id| (*id, addr(*id))).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for r in replicas {
            if let Ok(Placed::Done) = r.groups.place(group, &want).await {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "group {group} never reached {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A replica moved off a node is erased there once it is out of the group; placed on
/// that node again, it joins as a new learner and ends with exactly what the group
/// acknowledged, nothing applied twice, also after a restart. With `snapshot_every`
/// small it comes back through a snapshot, otherwise through the whole log.
async fn moved_away_and_back(snapshot_every: u64) {
    let root = tempfile::tempdir().unwrap();
    let net = MemoryNet::new();
    let mut replicas = cluster(&net, root.path(), snapshot_every).await;
    replicas.push(start(&net, 4, root.path().join("n4"), snapshot_every).await);
    let l = leader(&replicas, 0).await;
    let mut acked = write(&replicas[l], 2, "sku-m", 0, 25).await;
    // A follower of the group moves to node 4.
    let f = (0..3).find(|i| *i != l).unwrap();
    let gone = replicas[f].id;
    let stay: Vec<NodeId> = (1..=3).filter(|id| *id != gone).collect();
    let moved: Vec<NodeId> = stay.iter().copied().chain([4]).collect();
    place_until_done(&replicas, 0, &moved).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replicas[f].groups.retire(0, false).await {
        assert!(Instant::now() < deadline, "node {gone} never left group 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept: Option<StoredMembership<NodeId, BasicNode>> =
        log::meta_get(&replicas[f].wal, 0, "membership").unwrap();
    assert!(
        kept.is_none(),
        "the copy of a replica out of its group is erased: {kept:?}"
    );
    assert_eq!(state(&replicas[f], 2, "sku-m"), "");
    let l = leader(&replicas, 0).await;
    acked.extend(write(&replicas[l], 2, "sku-m", 25, 25).await);
    // Back on the node it left, in place of node 4.
    replicas[f].groups.start(0).await.unwrap();
    let back: Vec<NodeId> = stay.iter().copied().chain([gone]).collect();
    place_until_done(&replicas, 0, &back).await;
    let l = leader(&replicas, 0).await;
    acked.extend(write(&replicas[l], 2, "sku-m", 50, 5).await);
    converges(&replicas[f], 2, "sku-m", &acked).await;
    let r = replicas.remove(f);
    let dir = stop(&net, r).await;
    replicas.push(start(&net, gone, dir, snapshot_every).await);
    let l = leader(&replicas, 0).await;
    acked.extend(write(&replicas[l], 2, "sku-m", 55, 5).await);
    for r in replicas.iter().filter(|r| r.id != 4) {
        converges(r, 2, "sku-m", &acked).await;
    }
    for r in replicas {
        stop(&net, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_placed_back_on_a_node_it_left_catches_up_from_the_log() {
    moved_away_and_back(20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_placed_back_on_a_node_it_left_catches_up_from_a_snapshot() {
    moved_away_and_back(10).await;
}
