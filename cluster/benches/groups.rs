//! Records acknowledged per second by one node's log alone (RF 1) against replica groups
//! of three (RF 3, ADR 0016), in one run: `cargo bench -p shardmall-cluster --bench groups`.
//!
//! * **RF 1**: one `Wal` (`sync`); each writer appends a record and waits until it is
//!   durable.
//! * **RF 3**: three replicas of every replica group in this process over the in-memory
//!   network, each with its own `Wal` (`sync`) in its own directory; each writer appends
//!   through the `Wal` of its group's leader, whose `Replicate` hook hands the record to
//!   the group's proposer: it is acknowledged once a majority has it and it is applied.
//!
//! Writers each write ~64-byte records to one entity of their own, partitions assigned
//! round-robin (16 partitions in 4 groups), 1 s of warm-up then a fixed measured window;
//! tokio with 2 worker threads. `--writers N` or `BENCH_WRITERS` (default 64),
//! `--seconds S` or `BENCH_SECONDS` (default 5).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use shardmall_cluster::group::{group_of, GroupHost, GroupService, GroupSettings, Groups};
use shardmall_cluster::memory::MemoryNet;
use shardmall_cluster::proto::{self, Request, Response};
use shardmall_cluster::transport::{BoxFuture, Service};
use shardmall_cluster::NodeId;
use shardmall_persistence::{Durability, Fold, PartitionData, Record, Replicate, Wal, WalConfig};

const PARTITIONS: u16 = 16;
const GROUPS: u16 = 4;
const PAYLOAD: usize = 64;
const WARM_UP: Duration = Duration::from_secs(1);
/// A write not answered in this long counts as an error (the bench never hangs on one).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// An entity's state is its last payload: bounded, so a group snapshot stays cheap.
fn fold() -> Fold {
    Box::new(|_, snapshot, tail| {
        Ok(tail
            .last()
            .map(|(_, payload)| payload.clone())
            .or_else(|| snapshot.map(<[u8]>::to_vec)))
    })
}

struct Host(Wal);

impl GroupHost for Host {
    fn checkpoint(&self, partition: u16) -> Result<(), String> {
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

struct Replica {
    id: NodeId,
    wal: Wal,
    groups: Arc<Groups>,
}

fn addr(id: NodeId) -> String {
    format!("n{id}")
}

fn open_wal(dir: &Path) -> Wal {
    let mut cfg = WalConfig::new(dir);
    cfg.durability = Durability::Sync;
    cfg.cache_bytes = 64 << 20;
    Wal::open(cfg).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

async fn start(net: &MemoryNet, id: NodeId, dir: &Path) -> Replica {
    let wal = open_wal(dir);
    let settings = GroupSettings::new(PARTITIONS, GROUPS);
    let groups = Groups::new(
        id,
        settings,
        wal.clone(),
        Arc::new(Host(wal.clone())),
        Arc::new(net.endpoint(&addr(id))),
        // Members stay where the group recorded them.
        Arc::new(|_| None),
    );
    let hook: Arc<dyn Replicate> = groups.clone();
    wal.set_replicate(&hook);
    for g in 0..GROUPS {
        groups.start(g).await.expect("start a group replica");
    }
    net.register(&addr(id), Arc::new(Serve(groups.clone())));
    Replica { id, wal, groups }
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where writer tasks send their records.
#[derive(Clone)]
enum Target {
    /// One log, no replica groups.
    Single(Wal),
    /// Every replica's log; the writer asks which one leads its group.
    Groups(Arc<Vec<Replica>>),
}

/// What one writer measured in the window.
struct Tally {
    acked: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn writer(i: usize, target: Target, measure_from: Instant, until: Instant) -> Tally {
    let partition = (i % PARTITIONS as usize) as u16;
    let group = group_of(partition, GROUPS);
    let entity = format!("writer-{i}").into_bytes();
    let payload = vec![0x5a; PAYLOAD];
    let mut tally = Tally {
        acked: 0,
        errors: 0,
        first_error: None,
        hist: histogram(),
    };
    let mut wal = match &target {
        Target::Single(wal) => wal.clone(),
        Target::Groups(replicas) => replicas[leader(replicas, group).await].wal.clone(),
    };
    while Instant::now() < until {
        let rec = Record {
            partition,
            entity: entity.clone(),
            payload: payload.clone(),
            aux: Vec::new(),
            also: Vec::new(),
        };
        let t = Instant::now();
        let outcome = tokio::time::timeout(WRITE_TIMEOUT, async {
            wal.append(rec).await?.durable().await
        })
        .await;
        let done = Instant::now();
        let counted = done >= measure_from && done < until;
        match outcome {
            Ok(Ok(_lsn)) => {
                if counted {
                    tally.acked += 1;
                    tally.hist.saturating_record((done - t).as_micros() as u64);
                }
            }
            failed => {
                tally.errors += 1;
                if tally.first_error.is_none() {
                    tally.first_error = Some(match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer in {WRITE_TIMEOUT:?}"),
                    });
                }
                // The group may have a new leader: write through it from now on.
                if let Target::Groups(replicas) = &target {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let l = leader(replicas, group).await;
                    // As the node's serving watcher does after a write that was not
                    // committed (there are no actors here to reload).
                    if let Some(replica) = replicas[l].groups.replica(group) {
                        if replica.poisoned() {
                            replica.settle();
                        }
                    }
                    wal = replicas[l].wal.clone();
                }
            }
        }
    }
    tally
}

/// Per group: its highest term on any replica, the replica leading in that term (if one
/// says so) and the highest index applied on any replica.
fn group_state(replicas: &[Replica]) -> Vec<(u64, Option<NodeId>, u64)> {
    (0..GROUPS)
        .map(|g| {
            let seen: Vec<_> = replicas
                .iter()
                .filter_map(|r| r.groups.replica(g))
                .map(|r| r.raft.metrics().borrow().clone())
                .collect();
            let term = seen.iter().map(|m| m.current_term).max().unwrap_or(0);
            let leader = seen
                .iter()
                .find(|m| m.current_term == term && m.current_leader == Some(m.id))
                .map(|m| m.id);
            let applied = seen
                .iter()
                .filter_map(|m| m.last_applied.map(|l| l.index))
                .max()
                .unwrap_or(0);
            (term, leader, applied)
        })
        .collect()
}

/// How many of the group replicas (three per group) hold a snapshot.
fn snapshots(replicas: &[Replica]) -> u64 {
    replicas
        .iter()
        .flat_map(|r| (0..GROUPS).filter_map(|g| r.groups.replica(g)))
        .filter(|g| g.raft.metrics().borrow().snapshot.is_some())
        .count() as u64
}

struct Outcome {
    rate: f64,
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs the writers against `target` (warm-up, then `secs`), and answers how far the
/// counters `probe` reads (fsyncs, group entries) moved in the measured window.
async fn measure(
    target: Target,
    writers: usize,
    secs: f64,
    probe: impl Fn() -> [u64; 2],
) -> (Outcome, [u64; 2]) {
    let begun = Instant::now();
    let measure_from = begun + WARM_UP;
    let until = measure_from + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..writers {
        tasks.spawn(writer(i, target.clone(), measure_from, until));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let from = probe();
    tokio::time::sleep_until(until.into()).await;
    let to = probe();
    let moved = [to[0] - from[0], to[1] - from[1]];
    let mut out = Outcome {
        rate: 0.0,
        hist: histogram(),
        errors: 0,
        first_error: None,
    };
    let mut acked = 0;
    while let Some(t) = tasks.join_next().await {
        let t = t.expect("writer task");
        acked += t.acked;
        out.errors += t.errors;
        out.first_error = out.first_error.or(t.first_error);
        out.hist.add(t.hist).expect("same histogram bounds");
    }
    out.rate = acked as f64 / secs;
    (out, moved)
}

fn row(case: &str, writers: usize, o: &Outcome, vs: f64) {
    println!(
        "| {case} | {writers} | {:.0} | {} | {} | {vs:.2}x | {} |",
        o.rate,
        o.hist.value_at_quantile(0.5),
        o.hist.value_at_quantile(0.99),
        o.errors,
    );
}

async fn rf1(root: &Path, writers: usize, secs: f64) -> Outcome {
    let wal = open_wal(&root.join("rf1"));
    let (out, [syncs, _]) = measure(Target::Single(wal.clone()), writers, secs, || {
        [wal.metrics().flushes, 0]
    })
    .await;
    wal.shutdown().await.expect("shut the log down");
    eprintln!(
        "RF1: {:.0} fsyncs/s, {:.1} records per fsync",
        syncs as f64 / secs,
        out.rate * secs / syncs.max(1) as f64
    );
    out
}

async fn rf3(root: &Path, writers: usize, secs: f64) -> Outcome {
    let net = MemoryNet::new();
    let mut replicas = Vec::new();
    for id in 1..=3 {
        replicas.push(start(&net, id, &root.join(format!("rf3-n{id}"))).await);
    }
    let voters: BTreeMap<NodeId, String> = (1..=3).map(|id| (id, addr(id))).collect();
    for g in 0..GROUPS {
        replicas[0]
            .groups
            .initialize(g, &voters)
            .await
            .expect("form a group");
    }
    let elected = Instant::now();
    for g in 0..GROUPS {
        leader(&replicas, g).await;
    }
    let before = group_state(&replicas);
    eprintln!(
        "RF3: group leaders {}, elected in {} ms",
        before
            .iter()
            .enumerate()
            .map(|(g, s)| format!("{g}: n{}", s.1.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        elected.elapsed().as_millis()
    );
    let replicas = Arc::new(replicas);
    let all = replicas.clone();
    let (out, [syncs, entries]) =
        measure(Target::Groups(replicas.clone()), writers, secs, move || {
            [
                all.iter().map(|r| r.wal.metrics().flushes).sum(),
                group_state(&all).iter().map(|s| s.2).sum(),
            ]
        })
        .await;
    let after = group_state(&replicas);
    let elections: u64 = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
    let moved = after
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.1 != b.1)
        .count();
    eprintln!(
        "RF3: {:.0} fsyncs/s over the three logs, {:.2} records per group entry, \
         {elections} term changes and {moved} leader changes since \
         the warm-up began, {} of {} group replicas with a snapshot",
        syncs as f64 / secs,
        out.rate * secs / entries.max(1) as f64,
        snapshots(&replicas),
        3 * GROUPS,
    );
    let replicas = Arc::into_inner(replicas).expect("writers are done");
    for r in &replicas {
        net.unregister(&addr(r.id));
    }
    for r in &replicas {
        r.groups.shutdown().await;
    }
    for r in &replicas {
        r.wal.shutdown().await.expect("shut a log down");
    }
    out
}

/// `--name N` or `--name=N` on the command line, else the environment variable.
fn setting<T: std::str::FromStr>(flag: &str, env: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(flag)
            .and_then(|rest| match rest.strip_prefix('=') {
                Some(v) => Some(v.to_owned()),
                None if rest.is_empty() => args.get(i + 1).cloned(),
                None => None,
            })
    });
    match from_args.or_else(|| std::env::var(env).ok()) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{flag} / {env}: cannot read {v:?}")),
        None => default,
    }
}

fn main() {
    let writers: usize = setting("--writers", "BENCH_WRITERS", 64);
    let secs: f64 = setting("--seconds", "BENCH_SECONDS", 5.0);
    assert!(
        writers > 0 && secs > 0.0,
        "writers and seconds must be positive"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let root = tempfile::tempdir().expect("temporary directory");
        eprintln!(
            "groups: durability sync, {writers} writers, {PAYLOAD}-byte payloads, \
             {PARTITIONS} partitions in {GROUPS} groups, {} s warm-up, {secs} s measured, \
             2 tokio workers",
            WARM_UP.as_secs()
        );
        let one = rf1(root.path(), writers, secs).await;
        let three = rf3(root.path(), writers, secs).await;
        println!("| case | writers | records/s | p50 µs | p99 µs | vs RF1 | errors |");
        println!("|---|---|---|---|---|---|---|");
        row("RF1 (one log)", writers, &one, 1.0);
        row(
            "RF3 (groups of three)",
            writers,
            &three,
            three.rate / one.rate,
        );
        for (case, o) in [("RF1", &one), ("RF3", &three)] {
            if let Some(e) = &o.first_error {
                eprintln!("{case}: {} errors, the first: {e}", o.errors);
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}
