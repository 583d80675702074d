//! Whole clusters in one process: real shops on real logs (temporary dirs), real
//! consensus, and the in-memory network, which serializes every frame and can cut
//! links. Each scenario is a list of steps; after every step the invariants are checked:
//!
//! - every live member converges on the same map;
//! - every partition whose owner is alive is served by exactly that node;
//! - no SKU ever sold more than its stock, and stock is conserved
//!   (available + reserved + sold = what was put in);
//! - every acknowledged order is readable, from any node, with its units.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_actors::domain::campaign::CampaignCommand;
use shardmall_actors::domain::{Kind, Money, ProductStatus};
use shardmall_actors::keys::EntityKey;
use shardmall_actors::route::RemoteAnswer;
use shardmall_actors::{NewCampaign, NewProduct, NewSku, Shop, ShopConfig, ShopError};
use shardmall_cluster::map::{node_id_of, Member, MemberStatus};
use shardmall_cluster::memory::MemoryNet;
use shardmall_cluster::node::{ClusterNode, Dispatcher, SharedSecrets};
use shardmall_cluster::proto::{self, Request, Response};
use shardmall_cluster::raft::{ControlConfig, ControlPlane};
use shardmall_cluster::{BoxFuture, ClusterRouter, Service};
use shardmall_persistence::{Wal, WalConfig};

const PARTITIONS: u16 = 16;
const STOCK: u64 = 200;
const SKUS: usize = 6;

struct Running {
    node: ClusterNode,
    shop: Shop,
    control: ControlPlane,
    dispatcher: Arc<Dispatcher>,
}

struct Cluster {
    net: MemoryNet,
    root: tempfile::TempDir,
    live: BTreeMap<String, Running>,
    /// Every order acknowledged so far: (order id, sku, units).
    acked: Vec<(String, String, u64)>,
    /// Nodes killed and not restarted: their partitions must answer unavailable.
    dead: std::collections::BTreeSet<String>,
    /// Units of checkouts answered `unavailable`, by SKU: they may or may not hold stock
    /// (a lost answer), so the check allows for them.
    uncertain: BTreeMap<String, u64>,
}

#[derive(Debug, Clone)]
enum Step {
    /// Start a node; the first one creates the cluster, later ones join it.
    Add(&'static str),
    /// Spread the partitions over the members (asked of the named node).
    Rebalance(&'static str),
    /// Buy `n` units from each live node, spread over the SKUs.
    Buy(u64),
    /// Restore every link of a node (cut with `Cluster::isolate`).
    Heal(&'static str),
    /// Cut a node off the network and stop it (its log keeps what was durable).
    Kill(&'static str),
    /// Start a killed node again from its data dir.
    Restart(&'static str),
    /// Hand a node's partitions over and remove it (asked of the other named node).
    Leave(&'static str, &'static str),
}

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

fn money(amount: i64) -> Money {
    Money {
        amount,
        currency: "CNY".into(),
    }
}

fn sku(i: usize) -> String {
    format!("sku-{i}")
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            net: MemoryNet::new(),
            root: tempfile::tempdir().expect("temp dir"),
            live: BTreeMap::new(),
            acked: Vec::new(),
            dead: Default::default(),
            uncertain: BTreeMap::new(),
        }
    }

    async fn start(&mut self, name: &str) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let me = member(name);
        let dispatcher = Dispatcher::new();
        self.net.register(name, dispatcher.clone());
        let transport = Arc::new(self.net.endpoint(name));
        // A stopped node's last tasks let go of its consensus store shortly after.
        let opened = Instant::now();
        let control = loop {
            match ControlPlane::open(
                ControlConfig::new(me.clone(), dir.join("cluster")),
                transport.clone(),
            )
            .await
            {
                Ok(c) => break c,
                Err(e) if opened.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("open control plane: {e:?}"),
            }
        };
        dispatcher.set_control(control.clone());
        if !control.is_initialised() {
            match self.live.keys().next() {
                None => {
                    control
                        .bootstrap("test".into(), PARTITIONS)
                        .await
                        .expect("bootstrap");
                }
                Some(seed) => {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        match ClusterNode::join(&*transport, seed, &me).await {
                            Ok(_) => break,
                            Err(e) if Instant::now() < deadline => {
                                eprintln!("join {name}: {e}; retrying");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => panic!("{name} cannot join: {e}"),
                        }
                    }
                }
            }
        }
        let wal = open_wal(&dir).await;
        let router = ClusterRouter::new(
            &me,
            control.clone(),
            transport.clone(),
            shardmall_cluster::serving::Leaders::new(me.node_id, 0),
        );
        let shop = Shop::start_routed(
            wal,
            ShopConfig {
                partitions: PARTITIONS,
                node_tag: shardmall_cluster::map::node_tag(name),
                timer_tick: Duration::from_millis(50),
                checkpoint_interval: Duration::from_millis(200),
                start_fenced: true,
                ..ShopConfig::default()
            },
            Arc::new(router.clone()),
        )
        .await
        .expect("start shop");
        let node = ClusterNode::new(
            me,
            shop.clone(),
            control.clone(),
            transport,
            SharedSecrets {
                jwt: b"jwt".to_vec(),
                payment: b"pay".to_vec(),
            },
            &router,
            None,
        );
        dispatcher.set_node(node.clone());
        node.start();
        self.live.insert(
            name.to_owned(),
            Running {
                node,
                shop,
                control,
                dispatcher,
            },
        );
    }

    /// Cuts every link of a node. Not a step: the invariants cannot be read while a
    /// node's partitions are out of reach.
    fn isolate(&self, name: &str) {
        for other in self.live.keys() {
            if other != name {
                self.net.cut(name, other);
            }
        }
    }

    fn any(&self) -> &Running {
        self.live.values().next().expect("a live node")
    }

    async fn seed_catalog(&mut self) {
        let shop = &self.any().shop;
        wait_until("the catalog can be written", || async {
            shop.create_product(NewProduct {
                product_id: "p-1".into(),
                title: "t".into(),
                category: "c".into(),
                brand: "b".into(),
                description: String::new(),
                status: ProductStatus::OnShelf,
                skus: (0..SKUS)
                    .map(|i| NewSku {
                        sku_id: sku(i),
                        name: sku(i),
                        specs: BTreeMap::new(),
                        price: money(100),
                        market_price: None,
                        stock: STOCK,
                        low_stock_threshold: 0,
                    })
                    .collect(),
            })
            .await
            .map_err(|e| eprintln!("seed: {e:?}"))
            .is_ok()
        })
        .await;
    }

    async fn step(&mut self, step: &Step) {
        eprintln!("step: {step:?}");
        match step {
            Step::Add(name) => self.start(name).await,
            Step::Rebalance(on) => {
                let report = self.live[*on].node.rebalance().await;
                assert!(
                    report.failed.is_empty(),
                    "rebalance failures: {:?}",
                    report.failed
                );
            }
            Step::Buy(n) => self.buy(*n).await,
            Step::Heal(name) => self.net.heal(name),
            Step::Kill(name) => {
                let gone = self.live.remove(*name).expect("kill a live node");
                self.dead.insert(name.to_string());
                // Gone from the network at once, mid-traffic. Its actors then stop (one
                // process cannot kill -9 a part of itself; the end-to-end tests do):
                // nothing that was not acknowledged is flushed on their way out that a
                // crash would have kept, since an acknowledged write is durable first.
                self.net.unregister(name);
                gone.shop.shutdown().await;
                gone.control.shutdown().await;
                drop(gone);
            }
            Step::Restart(name) => {
                self.dead.remove(*name);
                self.start(name).await
            }
            Step::Leave(name, asked) => {
                let report = self.live[*asked]
                    .node
                    .leave(name)
                    .await
                    .expect("leave succeeds");
                assert!(report.failed.is_empty());
                let gone = self.live.remove(*name).expect("leaving node is live");
                gone.shop.shutdown().await;
                gone.control.shutdown().await;
                self.net.unregister(name);
            }
        }
        self.check().await;
    }

    /// Concurrent checkouts from every live node; each acknowledged order is recorded.
    async fn buy(&mut self, n: u64) {
        let mut tasks = tokio::task::JoinSet::new();
        for (name, r) in &self.live {
            for i in 0..n {
                let shop = r.shop.clone();
                let buyer = format!("{name}-buyer-{i}-{}", self.acked.len());
                let sku_id = sku(i as usize % SKUS);
                tasks.spawn(async move {
                    let res = shop
                        .checkout(&buyer, Some(vec![(sku_id.clone(), 1)]), None, None)
                        .await;
                    (sku_id, res)
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            let (sku_id, res) = done.expect("buy task");
            match res {
                Ok(order) => self.acked.push((order.order_id, sku_id, 1)),
                Err(ShopError::InsufficientStock { .. }) => {}
                Err(ShopError::Unavailable(_)) => *self.uncertain.entry(sku_id).or_default() += 1,
                Err(e) => panic!("unexpected checkout error: {e:?}"),
            }
        }
    }

    async fn check(&self) {
        // One map everywhere.
        let target = self
            .live
            .values()
            .map(|r| r.control.map().epoch)
            .max()
            .unwrap_or(0);
        for (name, r) in &self.live {
            let map = r
                .control
                .wait_for_epoch(target, Duration::from_secs(10))
                .await;
            assert!(
                map.epoch >= target,
                "{name} stuck at epoch {} < {target}",
                map.epoch
            );
        }
        let map = self.any().control.map();
        // Exactly the owner serves each partition (once the watchers caught up).
        wait_until("every live owner serves its partitions", || async {
            self.live.values().all(|r| {
                let owned = map.owned_by(r.node.me().node_id).len();
                r.node.is_ready() && r.node.serving_count() == owned
            })
        })
        .await;
        // Stock: never oversold, conserved, and every acknowledged order holds its units.
        let shop = &self.any().shop;
        let mut sold_or_reserved: BTreeMap<String, u64> = BTreeMap::new();
        for (_, s, n) in &self.acked {
            *sold_or_reserved.entry(s.clone()).or_default() += n;
        }
        let down = |key: &EntityKey| {
            let p = shop.partitioner().of(key).expect("a partition");
            map.owner_member(p)
                .is_some_and(|m| self.dead.contains(&m.name))
        };
        for i in 0..SKUS {
            let id = sku(i);
            if down(&EntityKey::new(Kind::Sku, id.clone())) {
                // A lost node's entities answer unavailable from every node.
                for r in self.live.values() {
                    let err = r.shop.get_sku(&id).await.expect_err("owner is down");
                    assert!(matches!(err, ShopError::Unavailable(_)), "{id}: {err:?}");
                }
                continue;
            }
            let view = read(|| shop.get_sku(&id)).await;
            assert_eq!(
                view.available + view.reserved + view.sold,
                STOCK,
                "stock of {} not conserved: {view:?}",
                sku(i)
            );
            let acked = sold_or_reserved.get(&sku(i)).copied().unwrap_or(0);
            let uncertain = self.uncertain.get(&sku(i)).copied().unwrap_or(0);
            let held = view.reserved + view.sold;
            assert!(
                held >= acked && held <= acked + uncertain,
                "{}: {acked} units acknowledged ({uncertain} uncertain), the SKU holds {view:?}",
                sku(i)
            );
        }
        for (order_id, _, _) in &self.acked {
            if down(&EntityKey::new(Kind::Order, order_id.clone())) {
                continue;
            }
            // Any node answers for any order.
            for r in self.live.values() {
                let order = read(|| r.shop.get_order(order_id)).await;
                assert_eq!(&order.order_id, order_id);
            }
        }
    }
}

async fn open_wal(dir: &std::path::Path) -> Wal {
    let start = Instant::now();
    loop {
        match Wal::open(WalConfig::new(dir.join("db"))) {
            Ok(wal) => return wal,
            // A killed node's last handles are dropped by its tasks shortly after.
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("open log: {e}"),
        }
    }
}

/// Retries a read while the cluster settles (a partition in handoff answers 503).
async fn read<T, F, Fut>(f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ShopError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("read failed: {e:?}"),
        }
    }
}

async fn wait_until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(steps: &[Step]) -> Cluster {
    let mut c = Cluster::new();
    let Step::Add(first) = steps[0] else {
        panic!("a scenario starts by adding its first node");
    };
    eprintln!("step: {:?}", steps[0]);
    c.start(first).await;
    c.seed_catalog().await;
    c.check().await;
    for s in &steps[1..] {
        c.step(s).await;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_to_three_nodes_and_rebalance_under_buys() {
    use Step::*;
    let c = run(&[
        Add("n1"),
        Buy(10),
        Add("n2"),
        Add("n3"),
        Buy(5),
        Rebalance("n2"),
        Buy(10),
    ])
    .await;
    let map = c.any().control.map();
    for name in ["n1", "n2", "n3"] {
        let owned = map.owned_by(node_id_of(name)).len();
        assert!(
            (5..=6).contains(&owned),
            "{name} owns {owned} of {PARTITIONS}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_leaves_and_nothing_it_held_is_lost() {
    use Step::*;
    run(&[
        Add("n1"),
        Add("n2"),
        Add("n3"),
        Rebalance("n1"),
        Buy(10),
        Leave("n2", "n1"),
        Buy(5),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_restarts_with_its_partitions() {
    use Step::*;
    run(&[
        Add("n1"),
        Add("n2"),
        Add("n3"),
        Rebalance("n1"),
        Buy(8),
        Kill("n3"),
        Restart("n3"),
        Buy(5),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_node_catches_up_after_heal() {
    use Step::*;
    let mut c = run(&[Add("n1"), Add("n2"), Add("n3"), Rebalance("n1"), Buy(5)]).await;
    // While n3 is cut off, its partitions cannot be reached from the others: commands
    // for them fail as unavailable (and are not acknowledged), nothing else is affected.
    c.isolate("n3");
    let shop = c.live["n1"].shop.clone();
    let map = c.live["n1"].control.map();
    let n3 = node_id_of("n3");
    let remote_sku = (0..SKUS).map(sku).find(|s| {
        map.owner(
            shop.partitioner()
                .catalog(shardmall_actors::domain::Kind::Sku, s),
        ) == Some(n3)
    });
    if let Some(s) = remote_sku {
        assert!(matches!(
            shop.get_sku(&s).await,
            Err(ShopError::Unavailable(_))
        ));
    }
    c.step(&Step::Heal("n3")).await;
    c.step(&Step::Buy(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flash_sale_across_nodes_sells_exactly_its_quantity() {
    use Step::*;
    let c = run(&[Add("n1"), Add("n2"), Add("n3"), Rebalance("n1")]).await;
    let admin = &c.live["n2"].shop;
    let now = shardmall_actors::clock::system_ms();
    read(|| {
        admin.create_campaign(NewCampaign {
            campaign_id: "flash".into(),
            sku_id: sku(0),
            price: money(1),
            quantity: 40,
            starts_at: None,
            ends_at: now + 600_000,
            per_buyer_limit: 1,
            payment_timeout: None,
        })
    })
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    for (name, r) in &c.live {
        for i in 0..60 {
            let shop = r.shop.clone();
            let buyer = format!("{name}-{i}");
            tasks.spawn(async move { shop.buy("flash", &buyer, 1, None).await });
        }
    }
    let mut orders = 0;
    while let Some(done) = tasks.join_next().await {
        match done.expect("buy task") {
            Ok(_) => orders += 1,
            Err(ShopError::SoldOut(_) | ShopError::Overloaded(_)) => {}
            Err(e) => panic!("unexpected buy error: {e:?}"),
        }
    }
    assert_eq!(orders, 40, "exactly the quantity is sold");
    let view = c.live["n3"]
        .shop
        .get_campaign("flash")
        .await
        .expect("campaign");
    assert_eq!(view.sold + view.reserved, 40);
}

/// A node of the previous release, which does not know `CampaignCommand::BuyAndPlace`:
/// it answers that it cannot read the call, and serves everything else.
struct PreviousRelease(Arc<Dispatcher>);

impl Service for PreviousRelease {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        if let Ok(Request::Entity { call, .. }) = proto::decode::<Request>(&frame) {
            let cmd = shardmall_actors::codec::decode::<CampaignCommand>(&call.cmd);
            if call.kind == Kind::Campaign && matches!(cmd, Ok(CampaignCommand::BuyAndPlace(_))) {
                let answer =
                    Response::Entity(RemoteAnswer::Malformed("command: unknown variant".into()));
                return Box::pin(async move { proto::encode(&answer) });
            }
        }
        self.0.serve(frame)
    }
}

/// During a rolling upgrade a buy that reaches an upgraded node, for a campaign served by
/// a node of the previous release, still succeeds: the claim and the order go apart, as
/// that release knows them. Nothing is sold twice or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buys_forwarded_to_a_node_of_the_previous_release_still_succeed() {
    use Step::*;
    let c = run(&[Add("n1"), Add("n2"), Add("n3"), Rebalance("n1")]).await;
    for (name, r) in &c.live {
        c.net
            .register(name, Arc::new(PreviousRelease(r.dispatcher.clone())));
    }
    let admin = &c.live["n1"].shop;
    let now = shardmall_actors::clock::system_ms();
    read(|| {
        admin.create_campaign(NewCampaign {
            campaign_id: "upgrade".into(),
            sku_id: sku(1),
            price: money(1),
            quantity: 30,
            starts_at: None,
            ends_at: now + 600_000,
            per_buyer_limit: 1,
            payment_timeout: None,
        })
    })
    .await;
    let mut orders = Vec::new();
    for (name, r) in &c.live {
        for i in 0..10 {
            let buyer = format!("{name}-up-{i}");
            let order = r
                .shop
                .buy("upgrade", &buyer, 1, None)
                .await
                .unwrap_or_else(|e| panic!("buy through {name}: {e:?}"));
            orders.push(order.order_id);
        }
    }
    for r in c.live.values() {
        for id in &orders {
            let order = read(|| r.shop.get_order(id)).await;
            assert_eq!(order.campaign_id.as_deref(), Some("upgrade"));
        }
    }
    let view = read(|| c.live["n2"].shop.get_campaign("upgrade")).await;
    assert_eq!(
        view.sold + view.reserved,
        30,
        "exactly what was bought is held"
    );
}

/// A move whose commit cannot be confirmed (the old owner cannot reach the leader after
/// shipping the partition) leaves the partition fenced on the old owner, served by
/// nobody, until consensus is reachable again; then the map decides and exactly one
/// node serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_in_doubt_stays_fenced_until_the_map_settles() {
    use Step::*;
    let c = run(&[Add("n1"), Add("n2"), Add("n3"), Rebalance("n1"), Buy(5)]).await;
    let map = c.live["n1"].control.map();
    let leader = map.members[&c.live["n1"].control.leader().expect("a leader")]
        .name
        .clone();
    // The old owner: a node other than the leader; the target: the third node.
    let names: Vec<String> = c.live.keys().cloned().collect();
    let from = names
        .iter()
        .find(|n| **n != leader)
        .expect("a follower")
        .clone();
    let to = names
        .iter()
        .find(|n| **n != leader && **n != from)
        .expect("a third node")
        .clone();
    let partition = map.owned_by(node_id_of(&from))[0];
    let served_before = c.live[&from].node.serving_count();

    // `from` can still ship to `to` and hear the leader, but not reach it.
    c.net.cut_one_way(&from, &leader);
    let outcome = c.live[&from]
        .node
        .hand_off(partition, node_id_of(&to))
        .await;
    assert!(
        outcome.is_err(),
        "the move cannot be confirmed: {outcome:?}"
    );
    // Nobody serves the partition while its owner is in doubt.
    assert_eq!(c.live[&from].node.serving_count(), served_before - 1);
    for r in c.live.values() {
        assert!(
            r.control.map().owner(partition) == Some(node_id_of(&from)),
            "the move did not commit"
        );
    }
    assert_eq!(
        c.live[&to].node.serving_count(),
        c.live[&to].control.map().owned_by(node_id_of(&to)).len()
    );

    c.net.heal(&from);
    wait_until("the old owner serves the partition again", || async {
        c.live[&from].node.serving_count() == served_before
    })
    .await;
    c.check().await;
}

/// A lost node is only removed with force while it owns partitions; its partitions then
/// restart empty on the others (their data is given up), everything else is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forgetting_a_lost_node_restarts_its_partitions_empty_elsewhere() {
    use Step::*;
    let mut c = run(&[Add("n1"), Add("n2"), Add("n3"), Rebalance("n1"), Buy(6)]).await;
    let before = c.live["n1"].control.map();
    let lost = node_id_of("n3");
    // Refused while it is up.
    let up = c.live["n1"].node.remove("n3", true).await;
    assert!(
        up.is_err(),
        "an up node with partitions is not removed: {up:?}"
    );
    c.step(&Kill("n3")).await;
    let refused = c.live["n1"].node.remove("n3", false).await;
    assert!(
        refused.is_err(),
        "without force a lost node's data is kept: {refused:?}"
    );
    c.live["n2"]
        .node
        .remove("n3", true)
        .await
        .expect("forced removal");
    c.dead.clear();

    let shop = c.live["n1"].shop.clone();
    wait_until("every partition is served again", || async {
        c.live
            .values()
            .map(|r| r.node.serving_count())
            .sum::<usize>()
            == usize::from(PARTITIONS)
    })
    .await;
    let map = c.live["n1"].control.map();
    assert!(!map.members.contains_key(&lost));
    let mut given_up = 0;
    for i in 0..SKUS {
        let id = sku(i);
        let p = shop.partitioner().catalog(Kind::Sku, &id);
        if before.owner(p) == Some(lost) {
            given_up += 1;
            let err = read_err(|| shop.get_sku(&id)).await;
            assert!(
                matches!(err, ShopError::NotFound(_)),
                "{id} was given up: {err:?}"
            );
        } else {
            let view = read(|| shop.get_sku(&id)).await;
            assert_eq!(view.available + view.reserved + view.sold, STOCK, "{id}");
        }
    }
    // Orders live in their buyers' partitions, spread over every node.
    let mut lost_orders = 0;
    for (order_id, _, _) in &c.acked {
        let p = shop
            .partitioner()
            .of(&EntityKey::new(Kind::Order, order_id.clone()))
            .expect("an order id names its partition");
        if before.owner(p) == Some(lost) {
            lost_orders += 1;
            let err = read_err(|| shop.get_order(order_id)).await;
            assert!(matches!(err, ShopError::NotFound(_)), "{order_id}: {err:?}");
        } else {
            read(|| shop.get_order(order_id)).await;
        }
    }
    assert!(
        given_up + lost_orders > 0 && lost_orders < c.acked.len(),
        "the lost node held some of the data ({given_up} SKUs, {lost_orders} orders), not all"
    );

    // What is written to a partition that restarted empty stays through a restart of
    // its new owner: the partition is cleared once per assignment, not at every start.
    let (p, &heir_id) = map
        .emptied
        .keys()
        .map(|p| (*p, map.owners.get(usize::from(*p)).expect("an owner")))
        .next()
        .expect("a partition was handed out empty");
    let heir = map.members[&heir_id].name.clone();
    let fresh = (0..10_000)
        .map(|i| format!("fresh-{i}"))
        .find(|id| shop.partitioner().catalog(Kind::Sku, id) == p)
        .expect("an id in that partition");
    read(|| {
        shop.create_product(NewProduct {
            product_id: format!("{fresh}-product"),
            title: "t".into(),
            category: "c".into(),
            brand: "b".into(),
            description: String::new(),
            status: ProductStatus::OnShelf,
            skus: vec![NewSku {
                sku_id: fresh.clone(),
                name: fresh.clone(),
                specs: BTreeMap::new(),
                price: money(100),
                market_price: None,
                stock: 9,
                low_stock_threshold: 0,
            }],
        })
    })
    .await;
    let gone = c.live.remove(&heir).expect("the heir is live");
    c.net.unregister(&heir);
    gone.shop.shutdown().await;
    gone.control.shutdown().await;
    drop(gone);
    c.start(&heir).await;
    let reader = c.live.values().next().expect("a live node").shop.clone();
    let view = read(|| reader.get_sku(&fresh)).await;
    assert_eq!(view.available, 9, "{fresh} survived its owner's restart");
}

/// Retries a read while the cluster settles, until it fails with something other than
/// unavailable.
async fn read_err<T: std::fmt::Debug, F, Fut>(f: F) -> ShopError
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, ShopError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f().await {
            Err(ShopError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return e,
            Ok(v) => panic!("expected an error, read {v:?}"),
        }
    }
}
