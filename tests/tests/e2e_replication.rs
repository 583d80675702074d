//! Three real `shardmall` processes with `--replication-factor 3`: every partition has a
//! replica on every node. The node leading a hot campaign's group is killed with -9 in
//! the middle of the sale: buys go on through the other nodes after a short gap, nothing
//! acknowledged is lost, nothing is oversold, and the killed node comes back and catches
//! up from its own log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use shardmall_actors::domain::Kind;
use shardmall_actors::keys::Partitioner;
use shardmall_tests::*;
use tokio::sync::Mutex;

const CLUSTER_SECRET: &str = "e2e-replication-secret-0123456789abcdef";
const PARTITIONS: u16 = 32;
/// As the node sets them for a replicated cluster.
const GROUPS: u16 = 16;

fn member(name: &str, join: Option<&str>) -> NodeConfig {
    let mut c = Node::config()
        .args(&["--node-id", name, "--partitions", &PARTITIONS.to_string()])
        .env("SHARDMALL_CLUSTER_SECRET", CLUSTER_SECRET);
    match join {
        Some(seed) => c = c.args(&["--join", seed]),
        None => c = c.args(&["--replication-factor", "3"]),
    }
    c
}

/// One keyed buy of one unit of `campaign` by `buyer`.
trait BuyOne {
    async fn buy_one(&self, campaign: &str, buyer: &str) -> Resp;
}

impl BuyOne for Api {
    async fn buy_one(&self, campaign: &str, buyer: &str) -> Resp {
        self.call(
            Method::POST,
            &format!("/v1/campaigns/{campaign}/buy"),
            Some(&customer(buyer)),
            Some(&key()),
            Some(&json!({"quantity": 1})),
        )
        .await
    }
}

/// Creates product `product` (one SKU, `{product}-s`, with `stock` units) through
/// `product_node`, and a one-hour campaign of `quantity` units of it, one per buyer,
/// through `campaign_node`.
async fn open_sale(
    product_node: &Node,
    campaign_node: &Node,
    product: &str,
    stock: i64,
    campaign: &str,
    quantity: i64,
) {
    let sku = format!("{product}-s");
    product_node
        .create_product(&admin(), product, &[(sku.as_str(), 100, stock)])
        .await;
    let body = json!({
        "campaign_id": campaign, "sku_id": sku, "price": money(10), "quantity": quantity,
        "ends_at": humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(3600)).to_string(),
        "per_buyer_limit": 1, "payment_timeout_secs": 600,
    });
    let (st, v) = campaign_node.post("/v1/campaigns", &admin(), &body).await;
    assert_eq!(st, 201, "{v}");
}

async fn cluster_map(api: &Api) -> Value {
    let (st, v) = api.get("/v1/cluster", Some(&operator())).await;
    assert_eq!(st, 200, "GET /v1/cluster: {v}");
    v
}

/// A metric's value in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// The name of the node leading `group`, once every node agrees on one.
async fn leader_of(nodes: &[&Node], group: u16) -> String {
    poll_until(
        "every node knows the group's leader",
        Duration::from_secs(30),
        || async {
            let mut seen = Vec::new();
            for n in nodes {
                let map = cluster_map(n).await;
                seen.push(
                    map["groups"][usize::from(group)]["leader"]
                        .as_str()?
                        .to_owned(),
                );
            }
            seen.windows(2)
                .all(|w| w[0] == w[1])
                .then(|| seen[0].clone())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_campaigns_leader_loses_nothing_and_buys_resume_within_seconds() {
    const UNITS: i64 = 100_000;
    let root = tempfile::tempdir().expect("data dirs");
    let dir = |n: &str| root.path().join(n);
    // The first node creates the cluster; it serves once three members hold replicas.
    let n1 = member("n1", None).dir(&dir("n1")).spawn();
    let (n2, n3) = (
        member("n2", Some(&n1.cluster_addr)).dir(&dir("n2")).spawn(),
        member("n3", Some(&n1.cluster_addr)).dir(&dir("n3")).spawn(),
    );
    for n in [&n1, &n2, &n3] {
        n.wait_ready().await;
    }
    let map = cluster_map(&n2).await;
    assert_eq!(map["replication_factor"], 3, "{map}");
    let groups = map["groups"].as_array().expect("groups");
    assert_eq!(groups.len(), usize::from(GROUPS), "{map}");
    for g in groups {
        assert_eq!(g["replicas"].as_array().map(Vec::len), Some(3), "{map}");
    }
    let status = std::process::Command::new(shardmall_bin())
        .args(["cluster", "status", "--url", &n3.base])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .expect("shardmall cluster status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{table}");
    assert!(
        table.contains("replication factor 3, 16 replica groups") && table.contains("GROUP"),
        "{table}"
    );

    open_sale(&n1, &n2, "rp", UNITS + 10, "rcamp", UNITS).await;
    let group = Partitioner::new(PARTITIONS).catalog(Kind::Campaign, "rcamp") % GROUPS;
    let names = ["n1", "n2", "n3"];
    let mut nodes = [n1, n2, n3];
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>(), group).await;
    let victim = names
        .iter()
        .position(|n| *n == leader)
        .expect("the leader is one of the nodes");

    // A buy sent to a node that does not lead the campaign's group goes there whole: one
    // forwarded call, whose node places the order in the claim's own record.
    let other = &nodes[(victim + 1) % 3];
    let forwarded =
        || async { metric(&other.metrics().await, "shardmall_cluster_forwarded_total") };
    let before = forwarded().await;
    let (st, v) = other.api().buy_one("rcamp", "via-follower").await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(forwarded().await - before, 1, "one forwarded call per buy");
    let order_id = v["order_id"].as_str().expect("order_id").to_owned();
    for n in &nodes {
        let (st, o) = n
            .get(
                &format!("/v1/orders/{order_id}"),
                Some(&customer("via-follower")),
            )
            .await;
        assert_eq!(st, 200, "{o}");
        assert_eq!(o["campaign_id"], "rcamp", "{o}");
        assert_eq!(o["status"], "pending_payment", "{o}");
    }

    // Buyers on every node, each request a new buyer and key, until told to stop.
    let acked: Arc<Mutex<Vec<(Instant, String, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let apis: Vec<Api> = nodes.iter().map(Node::api).collect();
    let mut tasks = Vec::new();
    for worker in 0..12usize {
        let apis = apis.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let api = &apis[(worker + i) % apis.len()];
                let buyer = format!("w{worker}-{i}");
                i += 1;
                let r = api
                    .try_call(
                        Method::POST,
                        "/v1/campaigns/rcamp/buy",
                        Some(&customer(&buyer)),
                        Some(&key()),
                        Some(&json!({"quantity": 1})),
                    )
                    .await;
                match r {
                    Ok((201, v)) => acked.lock().await.push((
                        Instant::now(),
                        buyer,
                        v["order_id"].as_str().unwrap().to_owned(),
                    )),
                    // Refused while the group elects, or the node is gone: not acknowledged.
                    Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes[victim].kill9();
    let kill = Instant::now();
    *killed_at.lock().await = Some(kill);
    // When a survivor learns of the group's new leader.
    let survivor = apis[(victim + 1) % 3].clone();
    let elected = poll_until(
        "a new leader of the group",
        Duration::from_secs(6),
        || async {
            let (st, map) = survivor.get("/v1/cluster", Some(&operator())).await;
            let l = map["groups"][usize::from(group)]["leader"]
                .as_str()
                .map(str::to_owned);
            (st == 200 && l.is_some_and(|l| l != leader)).then(Instant::now)
        },
    )
    .await;
    eprintln!(
        "a new leader of group {group} known {:?} after the kill",
        elected - kill
    );
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(kill.elapsed())).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let killed = killed_at.lock().await.expect("killed");
    let acked = acked.lock().await.clone();
    let before = acked.iter().filter(|(t, _, _)| *t < killed).count();
    assert!(before > 20, "buys went through before the kill: {before}");
    // The longest stretch without an acknowledged buy, from the kill on.
    let mut last = killed;
    let mut gap = Duration::ZERO;
    for (t, _, _) in acked.iter().filter(|(t, _, _)| *t >= killed) {
        gap = gap.max(t.saturating_duration_since(last));
        last = *t;
    }
    assert!(last > killed, "buys resumed after the kill");
    eprintln!(
        "acknowledged {} buys ({before} before the kill); longest gap after the kill: {gap:?}",
        acked.len()
    );
    eprintln!(
        "first buy after the kill: {:?}",
        acked
            .iter()
            .find(|(t, _, _)| *t >= killed)
            .map(|(t, _, _)| *t - killed)
    );
    assert!(gap < Duration::from_secs(5), "buys stopped for {gap:?}");
    // The survivors took the dead node's groups over, and say so.
    let mut takeovers = 0;
    for (i, n) in nodes.iter().enumerate() {
        if i != victim {
            takeovers += metric(&n.metrics().await, "shardmall_replica_takeovers_total");
        }
    }
    assert!(takeovers > 0, "no survivor reports a takeover");

    // The killed node comes back on its addresses and catches up from its own log.
    let name = names[victim];
    let back = member(name, None)
        .dir(&dir(name))
        .args(&["--cluster-addr", &nodes[victim].cluster_addr])
        .start()
        .await;
    nodes[victim] = back;
    // Every acknowledged order is there, on every node, and nothing is oversold.
    let want = acked.len() as i64;
    for (i, n) in nodes.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let campaign = loop {
            let (st, v) = n
                .get("/v1/campaigns/rcamp", Some(&customer("reader")))
                .await;
            let taken = UNITS - v["remaining"].as_i64().unwrap_or(UNITS);
            if st == 200 && taken >= want {
                break v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the campaign shows {taken} of {want} acknowledged buys: {st} {v}",
                names[i]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let taken = UNITS - campaign["remaining"].as_i64().unwrap();
        // A buy whose answer was lost in the kill may have been committed too.
        assert!(taken >= want, "{campaign}, {want} acknowledged");
    }
    for (_, buyer, order) in acked.iter().step_by(acked.len().div_ceil(200)) {
        for n in &nodes {
            let o = n.order(&customer(buyer), order).await;
            assert_eq!(o["status"], "pending_payment", "{o}");
        }
    }
    // Lists gather every group's leader: "my orders" and the catalog, from every node.
    let (_, buyer, order) = &acked[acked.len() / 2];
    for n in &nodes {
        let (st, v) = n.get("/v1/orders", Some(&customer(buyer))).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["items"][0]["order_id"], order.as_str(), "{v}");
        let (st, v) = n.get("/v1/products", None).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["items"][0]["product_id"], "rp", "{v}");
    }

    // The node that came back leads nothing until a rebalance hands it a share of the
    // leaderships; buys go on meanwhile.
    let before = leaders_per_node(&nodes[0], &names).await;
    let out = tokio::process::Command::new(shardmall_bin())
        .args([
            "cluster",
            "rebalance",
            "--json",
            "--url",
            &nodes[victim].base,
        ])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .await
        .expect("shardmall cluster rebalance");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let after = leaders_per_node(&nodes[0], &names).await;
    eprintln!("leaders per node {before:?} -> {after:?}: {report}");
    assert_eq!(report["kind"], "leaders", "{report}");
    assert!(report["moved"].as_u64() > Some(0), "{report}");
    assert!(
        after[victim] > 0,
        "{} leads nothing after a rebalance: {after:?}",
        names[victim]
    );
    let cap = usize::from(GROUPS).div_ceil(3);
    assert!(
        after.iter().all(|n| *n <= cap + 1),
        "leaders per node {after:?}, at most {cap} wanted"
    );
    // Handed over, not left: every group has its three voters the moment it is done.
    assert!(
        voters_are(&nodes.iter().collect::<Vec<_>>(), &names).await,
        "{}",
        cluster_map(&nodes[0]).await
    );
    let (st, v) = nodes[victim]
        .api()
        .buy_one("rcamp", "after-rebalance")
        .await;
    assert_eq!(st, 201, "a buy after the rebalance: {v}");
}

/// How many groups each of `names` leads, as `node` reports once every group has a
/// leader.
async fn leaders_per_node(node: &Node, names: &[&str]) -> Vec<usize> {
    poll_until(
        "every group has a leader",
        Duration::from_secs(30),
        || async {
            let map = cluster_map(node).await;
            let mut counts = vec![0; names.len()];
            for g in map["groups"].as_array()? {
                let leader = g["leader"].as_str()?;
                counts[names.iter().position(|n| *n == leader)?] += 1;
            }
            Some(counts)
        },
    )
    .await
}

/// Every node's view of every group it holds: its voters are exactly `want`.
async fn voters_are(nodes: &[&Node], want: &[&str]) -> bool {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    for n in nodes {
        let map = cluster_map(n).await;
        for g in map["groups"].as_array().into_iter().flatten() {
            let mut voters: Vec<String> = g["voters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            voters.sort();
            let mut replicas: Vec<String> = g["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            replicas.sort();
            if voters != want || replicas != want {
                return false;
            }
        }
    }
    true
}

/// A node's disk is lost: the operator removes it and joins a fresh node, whose replicas
/// are rebuilt from the two survivors. Then one of the original nodes dies too: the
/// fresh node and the last original hold a majority of every group, and every order
/// acknowledged before either loss is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_disk_is_rebuilt_on_a_fresh_node_and_nothing_is_lost() {
    const UNITS: i64 = 10_000;
    let root = tempfile::tempdir().expect("data dirs");
    let dir = |n: &str| root.path().join(n);
    let n1 = member("n1", None).dir(&dir("n1")).spawn();
    let mut n2 = member("n2", Some(&n1.cluster_addr)).dir(&dir("n2")).spawn();
    let mut n3 = member("n3", Some(&n1.cluster_addr)).dir(&dir("n3")).spawn();
    for n in [&n1, &n2, &n3] {
        n.wait_ready().await;
    }
    open_sale(&n1, &n1, "lp", UNITS + 10, "lcamp", UNITS).await;
    let mut acked: Vec<(String, String)> = Vec::new();
    let buy = |api: Api, buyer: String| async move {
        let (st, v) = api.buy_one("lcamp", &buyer).await;
        (st == 201).then(|| (buyer, v["order_id"].as_str().unwrap_or_default().to_owned()))
    };
    for i in 0..60 {
        let api = [&n1, &n2, &n3][i % 3].api();
        acked.extend(buy(api, format!("before-{i}")).await);
    }
    assert_eq!(
        acked.len(),
        60,
        "every buy acknowledged on a healthy cluster"
    );

    // n3's disk is gone.
    n3.kill9();
    std::fs::remove_dir_all(dir("n3")).expect("wipe n3");
    for i in 0..30 {
        let api = [&n1, &n2][i % 2].api();
        if let Some(a) = buy(api, format!("degraded-{i}")).await {
            acked.push(a);
        }
    }
    // A node that is down cannot drain itself: the operator is told to remove it.
    let leave = std::process::Command::new(shardmall_bin())
        .args(["cluster", "leave", "n3", "--url", &n1.base])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .expect("shardmall cluster leave");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&leave.stdout),
        String::from_utf8_lossy(&leave.stderr)
    );
    assert!(
        !leave.status.success() && said.contains("is down"),
        "{said}"
    );
    let removed = std::process::Command::new(shardmall_bin())
        .args(["cluster", "remove", "n3", "--force", "--url", &n1.base])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .expect("shardmall cluster remove");
    assert!(
        removed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&removed.stdout),
        String::from_utf8_lossy(&removed.stderr)
    );
    let n4 = member("n4", Some(&n1.cluster_addr)).dir(&dir("n4")).spawn();
    n4.wait_ready().await;
    let joined = Instant::now();
    poll_until(
        "every group's voters are n1, n2 and n4",
        Duration::from_secs(90),
        || async {
            voters_are(&[&n1, &n2, &n4], &["n1", "n2", "n4"])
                .await
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "every group moved to n4 {:?} after it was ready",
        joined.elapsed()
    );
    for i in 0..30 {
        let api = [&n1, &n2, &n4][i % 3].api();
        if let Some(a) = buy(api, format!("rebuilt-{i}")).await {
            acked.push(a);
        }
    }

    // Now an original node dies: n4's rebuilt replicas make the majority with n2's.
    let mut n1 = n1;
    n1.kill9();
    let survivors = [&n2, &n4];
    poll_until(
        "buys go on through n2 and n4",
        Duration::from_secs(20),
        || async {
            buy(n4.api(), format!("after-{}", rand_suffix()))
                .await
                .map(|a| a.1)
        },
    )
    .await;
    let want = acked.len() as i64;
    for n in survivors {
        let v = poll_until("the campaign", Duration::from_secs(15), || async {
            let (st, v) = n
                .get("/v1/campaigns/lcamp", Some(&customer("reader")))
                .await;
            (st == 200).then_some(v)
        })
        .await;
        let taken = UNITS - v["remaining"].as_i64().unwrap_or(UNITS);
        // Buys whose answers were lost may have been committed as well; none beyond.
        assert!(taken >= want, "{v}: {want} acknowledged");
        assert!(taken <= want + 40, "{v}: {want} acknowledged");
    }
    for (buyer, order) in &acked {
        for n in survivors {
            // The groups n1 led elect a new leader first (a second or two).
            let path = format!("/v1/orders/{order}");
            let o = poll_until("the order", Duration::from_secs(15), || async {
                let (st, o) = n.get(&path, Some(&customer(buyer))).await;
                (st == 200).then_some(o)
            })
            .await;
            assert_eq!(o["status"], "pending_payment", "{buyer} {order}: {o}");
        }
    }
    n2.kill9();
}

fn rand_suffix() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A fourth member: the control plane moves a share of the replicas to it (learner,
/// caught up, voter; the replaced replicas stop), and for the groups it holds no replica
/// of it learns the leader from a replica and serves its clients through it (buys,
/// reads, lists). Then the campaign's leader leaves while buys go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_member_takes_a_share_of_replicas_and_serves_the_rest_through_their_leaders() {
    let root = tempfile::tempdir().expect("data dirs");
    let dir = |n: &str| root.path().join(n);
    let n1 = member("n1", None).dir(&dir("n1")).spawn();
    let n2 = member("n2", Some(&n1.cluster_addr)).dir(&dir("n2")).spawn();
    let n3 = member("n3", Some(&n1.cluster_addr)).dir(&dir("n3")).spawn();
    for n in [&n1, &n2, &n3] {
        n.wait_ready().await;
    }
    let n4 = member("n4", Some(&n1.cluster_addr)).dir(&dir("n4")).spawn();
    n4.wait_ready().await;
    let nodes = [&n1, &n2, &n3, &n4];
    // Every group ends with three voters, as placed, and n4 holds some but not all.
    let held: Vec<u16> = poll_until(
        "the replicas placed on n4 are voters everywhere",
        Duration::from_secs(60),
        || async {
            let mut held = Vec::new();
            for n in nodes {
                let map = cluster_map(n).await;
                for g in map["groups"].as_array()? {
                    let names = |k: &str| {
                        let mut v: Vec<String> = g[k]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|x| x.as_str().map(str::to_owned))
                            .collect();
                        v.sort();
                        v
                    };
                    let replicas = names("replicas");
                    let voters = names("voters");
                    if replicas.len() != 3 || (!voters.is_empty() && voters != replicas) {
                        return None;
                    }
                    if n.base == n4.base && replicas.iter().any(|r| r == "n4") {
                        held.push(g["group_id"].as_u64()? as u16);
                    }
                }
            }
            Some(held)
        },
    )
    .await;
    assert!(
        !held.is_empty() && held.len() < usize::from(GROUPS),
        "n4 holds a share: {held:?}"
    );
    // A campaign in a group n4 holds no replica of.
    let parts = Partitioner::new(PARTITIONS);
    let campaign = (0..)
        .map(|k| format!("fcamp-{k}"))
        .find(|c| !held.contains(&(parts.catalog(Kind::Campaign, c) % GROUPS)))
        .expect("a campaign elsewhere");
    open_sale(&n4, &n4, "fp", 10_000, &campaign, 5_000).await;
    for i in 0..20 {
        let buyer = format!("fourth-{i}");
        let (st, v) = n4.api().buy_one(&campaign, &buyer).await;
        assert_eq!(st, 201, "buy {i} through n4: {v}");
        let order = v["order_id"].as_str().expect("order id").to_owned();
        let o = n4.order(&customer(&buyer), &order).await;
        assert_eq!(o["status"], "pending_payment", "{o}");
        let (st, list) = n4.get("/v1/orders", Some(&customer(&buyer))).await;
        assert_eq!(st, 200, "{list}");
        assert_eq!(list["items"][0]["order_id"], order.as_str(), "{list}");
    }
    for n in nodes {
        let (st, v) = n
            .get(
                &format!("/v1/campaigns/{campaign}"),
                Some(&customer("reader")),
            )
            .await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["remaining"], 4_980, "{v}");
    }

    // The campaign's leader leaves while buyers go on through the other three: its
    // replicas move (some of them back onto nodes they left when n4 joined), the groups
    // it led elect another leader, and nothing acknowledged is lost.
    let group = parts.catalog(Kind::Campaign, &campaign) % GROUPS;
    let leaver_name = leader_of(&nodes, group).await;
    let named = ["n1", "n2", "n3", "n4"];
    let at = named
        .iter()
        .position(|n| *n == leaver_name)
        .unwrap_or_else(|| panic!("no node is named {leaver_name}"));
    let stay: Vec<&Node> = (0..4).filter(|i| *i != at).map(|i| nodes[i]).collect();
    let stay_names: Vec<String> = (0..4)
        .filter(|i| *i != at)
        .map(|i| named[i].to_owned())
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String, Instant)>>> = Arc::default();
    let refused: Arc<Mutex<Vec<(u16, Value)>>> = Arc::default();
    let mut buyers = tokio::task::JoinSet::new();
    for (w, n) in stay.iter().enumerate() {
        let (api, stop, acked, refused, campaign) = (
            n.api(),
            stop.clone(),
            acked.clone(),
            refused.clone(),
            campaign.clone(),
        );
        buyers.spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let buyer = format!("during-{w}-{i}");
                i += 1;
                let (st, v) = api.buy_one(&campaign, &buyer).await;
                if st == 201 {
                    let order = v["order_id"].as_str().unwrap_or_default().to_owned();
                    acked.lock().await.push((buyer, order, Instant::now()));
                } else {
                    refused.lock().await.push((st, v));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let left = tokio::process::Command::new(shardmall_bin())
        .args(["cluster", "leave", &leaver_name, "--url", &stay[0].base])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .await
        .expect("shardmall cluster leave");
    let took = started.elapsed();
    assert!(
        left.status.success(),
        "{}{}",
        String::from_utf8_lossy(&left.stdout),
        String::from_utf8_lossy(&left.stderr)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while buyers.join_next().await.is_some() {}
    let acked = acked.lock().await.clone();
    let during = acked
        .iter()
        .filter(|(_, _, at)| *at > started && at.duration_since(started) < took)
        .count();
    let gap = acked
        .windows(2)
        .map(|w| w[1].2.saturating_duration_since(w[0].2))
        .max()
        .unwrap_or_default();
    let refused = refused.lock().await.clone();
    eprintln!(
        "{leaver_name} left in {took:?}; {} buys acknowledged, {during} while it left, longest gap {gap:?}, refused: {refused:?}",
        acked.len()
    );
    assert!(during > 0, "the sale went on while {leaver_name} left");
    // The groups it led elect another leader once it has left them (1-2 s), which the
    // edge waits out; a buy refused meanwhile is refused as unavailable, to retry.
    assert!(
        refused
            .iter()
            .all(|(st, v)| *st == 503 && v["error"]["code"] == "unavailable"),
        "{refused:?}"
    );
    let names: Vec<&str> = stay_names.iter().map(String::as_str).collect();
    poll_until(
        "every group's voters are the three members left",
        Duration::from_secs(60),
        || async { voters_are(&stay, &names).await.then_some(()) },
    )
    .await;
    let map = cluster_map(stay[0]).await;
    assert!(
        map["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|n| n["node_id"] != leaver_name.as_str()),
        "{leaver_name} is out of the map: {map}"
    );
    for (buyer, order, _) in &acked {
        let path = format!("/v1/orders/{order}");
        let o = poll_until("the order", Duration::from_secs(15), || async {
            let (st, o) = stay[1].get(&path, Some(&customer(buyer))).await;
            (st == 200).then_some(o)
        })
        .await;
        assert_eq!(o["status"], "pending_payment", "{buyer} {order}: {o}");
    }
    for n in &stay {
        let v = poll_until("the campaign", Duration::from_secs(15), || async {
            let (st, v) = n
                .get(
                    &format!("/v1/campaigns/{campaign}"),
                    Some(&customer("reader")),
                )
                .await;
            (st == 200).then_some(v)
        })
        .await;
        let taken = 4_980 - v["remaining"].as_i64().unwrap_or(4_980);
        // A buy whose answer was lost may have been committed as well.
        assert!(
            taken >= acked.len() as i64,
            "{v}: {} acknowledged",
            acked.len()
        );
        assert!(
            taken <= acked.len() as i64 + 3,
            "{v}: {} acknowledged",
            acked.len()
        );
    }
}

/// A member of a cluster created without `--replication-factor`: one copy per partition
/// until three members are active, three copies from then on.
fn grower(name: &str, join: Option<&str>) -> NodeConfig {
    let mut c = Node::config()
        .args(&["--node-id", name, "--partitions", &PARTITIONS.to_string()])
        .env("SHARDMALL_CLUSTER_SECRET", CLUSTER_SECRET);
    if let Some(seed) = join {
        c = c.args(&["--join", seed]);
    }
    c
}

/// `shardmall cluster ARGS --json --url URL` with an operator token, parsed.
async fn cluster_json(url: &str, args: &[&str]) -> Value {
    let out = tokio::process::Command::new(shardmall_bin())
        .arg("cluster")
        .args(args)
        .args(["--json", "--url", url])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .await
        .expect("shardmall cluster");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Buys one unit through `api` as `buyer` until it is acknowledged (an attempt refused
/// while a group forms or elects is tried again with a new key): the order id, and how
/// many attempts were refused.
async fn buy_acknowledged(api: &Api, campaign: &str, buyer: &str) -> (String, usize) {
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, v) = api.buy_one(campaign, buyer).await;
        if st == 201 {
            return (
                v["order_id"].as_str().expect("order_id").to_owned(),
                refused,
            );
        }
        assert!(st == 503 && Instant::now() < deadline, "{buyer}: {st} {v}");
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_grows_into_three_copies_of_its_data_when_a_third_member_joins() {
    const UNITS: i64 = 1_000;
    let root = tempfile::tempdir().expect("data dirs");
    let dir = |n: &str| root.path().join(n);
    // One node serves at once, with one copy.
    let n1 = grower("n1", None).dir(&dir("n1")).start().await;
    let map = cluster_map(&n1).await;
    assert_eq!(map["replication_factor"], 1, "{map}");
    assert_eq!(map["target_replication_factor"], 3, "{map}");
    assert_eq!(map["groups"], json!([]), "{map}");
    open_sale(&n1, &n1, "gp", UNITS, "gcamp", UNITS).await;
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut refused = 0;
    for i in 0..15 {
        let buyer = format!("one-copy-{i}");
        let (order, r) = buy_acknowledged(&n1.api(), "gcamp", &buyer).await;
        acked.push((buyer, order));
        refused += r;
    }

    // A second member: still one copy. A rebalance spreads the partitions over both, so
    // the groups' partitions have to be gathered before they form.
    let n2 = grower("n2", Some(&n1.cluster_addr))
        .dir(&dir("n2"))
        .start()
        .await;
    let report = cluster_json(&n1.base, &["rebalance"]).await;
    assert_eq!(report["kind"], "partitions", "{report}");
    assert!(report["moved"].as_u64() > Some(0), "{report}");
    assert_eq!(cluster_map(&n2).await["replication_factor"], 1);
    for i in 0..15 {
        let buyer = format!("two-members-{i}");
        let (order, r) = buy_acknowledged(&n2.api(), "gcamp", &buyer).await;
        acked.push((buyer, order));
        refused += r;
    }

    // The third member: every group forms from the data, on three members.
    let joined = Instant::now();
    let n3 = grower("n3", Some(&n1.cluster_addr))
        .dir(&dir("n3"))
        .start()
        .await;
    let names = ["n1", "n2", "n3"];
    let mut nodes = [n1, n2, n3];
    poll_until(
        "three voters in every group, on every node",
        Duration::from_secs(90),
        || async {
            for n in &nodes {
                let map = cluster_map(n).await;
                if map["replication_factor"] != 3 {
                    return None;
                }
            }
            voters_are(&nodes.iter().collect::<Vec<_>>(), &names)
                .await
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "three copies of every group {:?} after the third member joined",
        joined.elapsed()
    );
    let map = cluster_map(&nodes[2]).await;
    assert_eq!(map["groups"].as_array().map(Vec::len), Some(16), "{map}");
    // The member that formed the groups led them all; their leaders are spread then
    // (the target is 6 each; a moved group's new leader is asked for, not chosen).
    let spread = poll_until(
        "the groups' leaders spread over the three",
        Duration::from_secs(90),
        || async {
            let led = leaders_per_node(&nodes[0], &names).await;
            (led.iter().all(|n| (1..=7).contains(n))).then_some(led)
        },
    )
    .await;
    eprintln!(
        "leaders per node {spread:?}, {:?} after the third member joined",
        joined.elapsed()
    );
    // A leader hands its group over without leaving it: every group kept its three
    // voters (had it left, a node lost now would take a group's majority with it).
    assert!(
        voters_are(&nodes.iter().collect::<Vec<_>>(), &names).await,
        "{}",
        cluster_map(&nodes[0]).await
    );
    // Everything acknowledged with one copy is there, from every node.
    for n in &nodes {
        for (buyer, order) in &acked {
            let o = n.order(&customer(buyer), order).await;
            assert_eq!(o["status"], "pending_payment", "{o}");
        }
    }

    // The campaign's leader dies: the other two hold every write it acknowledged.
    for i in 0..10 {
        let buyer = format!("three-copies-{i}");
        let (order, r) = buy_acknowledged(&nodes[i % 3].api(), "gcamp", &buyer).await;
        acked.push((buyer, order));
        refused += r;
    }
    let group = Partitioner::new(PARTITIONS).catalog(Kind::Campaign, "gcamp") % GROUPS;
    let leader = leader_of(&nodes.iter().collect::<Vec<_>>(), group).await;
    let victim = names.iter().position(|n| *n == leader).expect("a member");
    nodes[victim].kill9();
    let survivors: Vec<&Node> = (0..3).filter(|i| *i != victim).map(|i| &nodes[i]).collect();
    let killed = Instant::now();
    for i in 0..10 {
        let buyer = format!("after-the-kill-{i}");
        let (order, r) = buy_acknowledged(&survivors[i % 2].api(), "gcamp", &buyer).await;
        if i == 0 {
            eprintln!(
                "first buy acknowledged {:?} after the kill",
                killed.elapsed()
            );
        }
        acked.push((buyer, order));
        refused += r;
    }
    for n in &survivors {
        for (buyer, order) in &acked {
            // The dead node's other groups may still be electing: 503 until they have.
            let o = poll_until(
                "the order, from its group's new leader",
                Duration::from_secs(15),
                || async {
                    let (st, o) = n
                        .get(&format!("/v1/orders/{order}"), Some(&customer(buyer)))
                        .await;
                    assert!(st == 200 || st == 503, "{order}: {st} {o}");
                    (st == 200).then_some(o)
                },
            )
            .await;
            assert_eq!(o["status"], "pending_payment", "{o}");
        }
        let (st, c) = n
            .get("/v1/campaigns/gcamp", Some(&customer("reader")))
            .await;
        assert_eq!(st, 200, "{c}");
        let taken = UNITS - c["remaining"].as_i64().expect("remaining");
        let want = acked.len() as i64;
        // A refused attempt may still have been committed (its answer was lost).
        assert!(
            taken >= want && taken <= want + refused as i64,
            "{c}: {want} acknowledged, {refused} refused"
        );
    }
}
