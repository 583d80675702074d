//! Three real `shardmall` processes on loopback forming one cluster: every node answers
//! for every entity, a flash sale whose buyers hit all nodes sells exactly its
//! quantity, a node leaves under load and nothing is lost, and a node killed with -9
//! makes only its own partitions unavailable until it restarts with its data dir.

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shardmall_tests::*;
use tokio::sync::Mutex;

/// Every node of a test cluster proves membership with this.
const CLUSTER_SECRET: &str = "e2e-cluster-secret-0123456789abcdef";
/// Fewer partitions than the default keep rebalances short.
const PARTITIONS: &str = "32";

/// A member of a cluster that keeps one copy per partition (`--replication-factor 1`:
/// the first node's flag decides; without it three members grow into replicas, which
/// `e2e_replication.rs` tests).
fn member(name: &str, join: Option<&str>) -> NodeConfig {
    let mut c = Node::config()
        .args(&["--node-id", name, "--partitions", PARTITIONS])
        .args(&["--replication-factor", "1"])
        .env("SHARDMALL_CLUSTER_SECRET", CLUSTER_SECRET);
    if let Some(seed) = join {
        c = c.args(&["--join", seed]);
    }
    c
}

/// `shardmall cluster ARGS --url URL` with an operator token: (exit code, stdout, stderr).
fn cluster_cli(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(shardmall_bin())
        .arg("cluster")
        .args(args)
        .args(["--url", url])
        .env("SHARDMALL_TOKEN", operator())
        .output()
        .expect("run shardmall cluster");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cluster_map(api: &Api) -> Value {
    let (st, v) = api.get("/v1/cluster", Some(&operator())).await;
    assert_eq!(st, 200, "GET /v1/cluster: {v}");
    v
}

/// The node's map once it has applied `epoch` (bounded wait); its latest map otherwise.
async fn map_at_least(api: &Api, epoch: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let map = cluster_map(api).await;
        if map["epoch"].as_u64().is_some_and(|e| e >= epoch) || Instant::now() > deadline {
            return map;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Partitions each node owns, by name.
fn owned(map: &Value) -> BTreeMap<String, i64> {
    map["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_owned(),
                n["partitions"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// n1 creates the cluster, n2 and n3 join it, and a rebalance spreads the partitions.
/// Data dirs are `DIR/n1` .. `DIR/n3` in the returned dir, so a node can restart.
async fn three_nodes() -> ([Node; 3], tempfile::TempDir) {
    let root = tempfile::tempdir().expect("data dirs");
    let dir = |n: &str| root.path().join(n);
    let n1 = member("n1", None).dir(&dir("n1")).start().await;
    // Both join at once, as an operator starting two nodes together would.
    let (n2, n3) = tokio::join!(
        member("n2", Some(&n1.cluster_addr)).dir(&dir("n2")).start(),
        member("n3", Some(&n1.cluster_addr)).dir(&dir("n3")).start()
    );
    let (code, out, err) = cluster_cli(&n2.base, &["rebalance"]);
    assert_eq!(code, 0, "rebalance: {out} {err}");
    // The moves are committed; a follower may apply the last of them a moment later.
    let epoch: u64 = out
        .split("epoch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("rebalance printed no epoch: {out}"));
    for node in [&n1, &n2, &n3] {
        let map = map_at_least(node, epoch).await;
        let owned = owned(&map);
        assert_eq!(owned.len(), 3, "{map}");
        assert!(
            owned.values().all(|n| (10..=11).contains(n)),
            "uneven: {map}\nrebalance said: {out} {err}"
        );
        assert!(
            map["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["status"] == "up"),
            "{map}"
        );
    }
    ([n1, n2, n3], root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_for_every_entity() {
    let ([n1, n2, n3], _dirs) = three_nodes().await;
    // The same map on every node, the same leader.
    let maps: Vec<Value> = vec![
        cluster_map(&n1).await,
        cluster_map(&n2).await,
        cluster_map(&n3).await,
    ];
    assert!(maps
        .iter()
        .all(|m| m["epoch"] == maps[0]["epoch"] && m["leader"] == maps[0]["leader"]));
    assert_eq!(maps[0]["partitions"], 32);
    let (code, out, _) = cluster_cli(&n3.base, &["status"]);
    assert_eq!(code, 0);
    for name in ["n1", "n2", "n3"] {
        assert!(out.contains(name), "status table lists {name}: {out}");
    }

    // Products written on one node, read on every node.
    for p in 0..6 {
        n1.product_with_skus(&admin(), &format!("cp{p}"), 2, 100, 50)
            .await;
    }
    for node in [&n1, &n2, &n3] {
        for p in 0..6 {
            for s in 0..2 {
                assert_eq!(
                    node.stock(&format!("cp{p}-s{s}")).await,
                    Stock::new(50, 0, 0)
                );
            }
        }
    }
    // A list pages through every node's products in id order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/products?limit=4&cursor={c}"),
            None => "/v1/products?limit=4".to_owned(),
        };
        let (st, v) = n2.get(&path, None).await;
        assert_eq!(st, 200, "{v}");
        for item in v["items"].as_array().unwrap() {
            seen.push(item["product_id"].as_str().unwrap().to_owned());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, (0..6).map(|p| format!("cp{p}")).collect::<Vec<_>>());

    // One checkout over SKUs that live on different nodes, paid on another node, read
    // on a third: the saga holds across nodes.
    let buyer = customer("cross-node");
    let lines: Vec<(String, i64)> = (0..6).map(|p| (format!("cp{p}-s0"), 2)).collect();
    let items: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let id = n3.place(&buyer, &items, "cross-node checkout").await;
    let order = n1.order(&buyer, &id).await;
    assert_eq!(order["status"], "pending_payment");
    assert_status(
        &n2.pay(&buyer, &order, &key()).await,
        200,
        "pay on another node",
    );
    for node in [&n1, &n2, &n3] {
        assert_eq!(node.order(&buyer, &id).await["status"], "paid");
        for p in 0..6 {
            assert_eq!(node.stock(&format!("cp{p}-s0")).await, Stock::new(48, 0, 2));
        }
    }
    // "My orders" from any node.
    let (st, v) = n2.get("/v1/orders", Some(&buyer)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["items"][0]["order_id"], id.as_str());

    // Forwarding is visible in the metrics.
    let forwarded = metric(&n3.metrics().await, "shardmall_cluster_forwarded_total");
    assert!(forwarded > 0, "n3 forwarded commands to the owners");
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_with_buyers_on_every_node_sells_exactly_its_quantity() {
    const UNITS: i64 = 30;
    const BUYERS_PER_NODE: usize = 80;
    let (nodes, _dirs) = three_nodes().await;
    nodes[0]
        .create_product(&admin(), "cf", &[("cf-s", 100, 500)])
        .await;
    let body = json!({
        "campaign_id": "cfs", "sku_id": "cf-s", "price": money(10), "quantity": UNITS,
        "ends_at": humantime::format_rfc3339_millis(std::time::SystemTime::now() + Duration::from_secs(3600)).to_string(),
        "per_buyer_limit": 1, "payment_timeout_secs": 600,
    });
    let (st, v) = nodes[1].post("/v1/campaigns", &admin(), &body).await;
    assert_eq!(st, 201, "{v}");

    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..BUYERS_PER_NODE {
            let api = node.api();
            tasks.push(tokio::spawn(async move {
                let buyer = format!("b{n}-{i}");
                let r = api
                    .post_idem(
                        "/v1/campaigns/cfs/buy",
                        &customer(&buyer),
                        &key(),
                        &json!({"quantity": 1}),
                    )
                    .await;
                (buyer, r)
            }));
        }
    }
    let mut orders = Vec::new();
    for t in tasks {
        let (buyer, (st, v)) = t.await.unwrap();
        match st {
            201 => orders.push((buyer, v["order_id"].as_str().unwrap().to_owned())),
            409 | 429 => assert!(
                matches!(v["error"]["code"].as_str(), Some("sold_out" | "overloaded")),
                "{v}"
            ),
            _ => panic!("unexpected answer {st}: {v}"),
        }
    }
    assert_eq!(orders.len() as i64, UNITS, "exactly the quantity is sold");
    let ids: HashSet<&String> = orders.iter().map(|(_, o)| o).collect();
    assert_eq!(ids.len(), orders.len(), "order ids are unique across nodes");
    for node in &nodes {
        let (st, c) = node.get("/v1/campaigns/cfs", Some(&customer("r"))).await;
        assert_eq!(st, 200);
        assert_eq!(
            (c["reserved"].as_i64(), c["remaining"].as_i64()),
            (Some(UNITS), Some(0)),
            "{c}"
        );
        let stock = node.stock("cf-s").await;
        assert_eq!(stock.total(), 500);
        for (buyer, id) in &orders {
            assert_eq!(node.order(&customer(buyer), id).await["campaign_id"], "cfs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_under_load_and_nothing_is_lost() {
    const SKUS: usize = 8;
    const STOCK: i64 = 400;
    let ([n1, mut n2, n3], dirs) = three_nodes().await;
    let skus = n1.product_with_skus(&admin(), "lv", SKUS, 100, STOCK).await;

    // Buyers on n1 and n3 keep checking out while n2 hands its partitions over.
    let acked = Arc::new(Mutex::new(Vec::<(String, String, String)>::new()));
    let uncertain = Arc::new(Mutex::new(BTreeMap::<String, i64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (w, api) in [n1.api(), n3.api(), n1.api(), n3.api()]
        .into_iter()
        .enumerate()
    {
        let (acked, uncertain, stop, skus) =
            (acked.clone(), uncertain.clone(), stop.clone(), skus.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let buyer = format!("lv-{w}-{i}");
                let sku = skus[i % skus.len()].clone();
                let r = api
                    .checkout(&customer(&buyer), &[(sku.as_str(), 1)], &key())
                    .await;
                match r.0 {
                    201 => acked.lock().await.push((buyer, sku, order_id(&r.1))),
                    503 => *uncertain.lock().await.entry(sku).or_default() += 1,
                    409 => {}
                    st => panic!("unexpected answer {st} during the leave: {}", r.1),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, out, err) = cluster_cli(&n1.base, &["leave", "n2"]);
    assert_eq!(code, 0, "leave: {out} {err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }

    let map = cluster_map(&n1).await;
    let owned = owned(&map);
    assert_eq!(owned.len(), 2, "n2 is gone from the map: {map}");
    assert_eq!(owned.values().sum::<i64>(), 32);
    let acked = acked.lock().await;
    assert!(
        acked.len() > 20,
        "the load ran during the leave ({} orders)",
        acked.len()
    );
    let uncertain = uncertain.lock().await;
    for node in [&n1, &n3] {
        for sku in &skus {
            let s = node.stock(sku).await;
            assert_eq!(s.total(), STOCK, "{sku} conserved");
            let held = acked.iter().filter(|(_, k, _)| k == sku).count() as i64;
            let maybe = uncertain.get(sku).copied().unwrap_or(0);
            assert!(
                s.reserved + s.sold >= held && s.reserved + s.sold <= held + maybe,
                "{sku}: {held} acknowledged ({maybe} unanswered), stock {s:?}"
            );
        }
        for (buyer, _, id) in acked.iter() {
            assert_eq!(
                node.order(&customer(buyer), id).await["status"],
                "pending_payment"
            );
        }
    }
    // The node that left does not come back to serve from its old data dir.
    n2.stop().await;
    let mut again = member("n2", None)
        .dir(&dirs.path().join("n2"))
        .spawn_expecting_failure();
    let status = poll_until(
        "the node that left refuses to start",
        Duration::from_secs(30),
        || {
            let st = again.try_exit();
            async move { st }
        },
    )
    .await;
    assert!(!status.success());
    let log = again.log_tail(1000);
    assert!(log.contains("left or was removed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_takes_its_partitions_back_when_it_restarts() {
    let ([n1, n2, mut n3], dirs) = three_nodes().await;
    let skus = n1.product_with_skus(&admin(), "kl", 12, 100, 10).await;
    let buyer = customer("kl-buyer");
    let mut orders = Vec::new();
    for sku in &skus {
        orders.push(
            n2.place(&buyer, &[(sku.as_str(), 1)], "order before the kill")
                .await,
        );
    }
    let n3_http = n3.base.trim_start_matches("http://").to_owned();
    let n3_cluster = n3.cluster_addr.clone();
    n3.kill9();

    // n3's partitions answer 503 with Retry-After from the others; the rest answer.
    let mut down = Vec::new();
    for sku in &skus {
        let r = n1
            .raw(reqwest::Method::GET, &format!("/v1/skus/{sku}"), &[], None)
            .await;
        match r.status {
            200 => {}
            503 => {
                assert!(
                    r.headers.contains_key("retry-after"),
                    "503 carries Retry-After"
                );
                assert_eq!(r.body["error"]["code"], "unavailable");
                down.push(sku.clone());
            }
            st => panic!("{sku}: {st} {}", r.body),
        }
    }
    assert!(
        !down.is_empty() && down.len() < skus.len(),
        "only n3's SKUs are down: {down:?}"
    );
    let map = cluster_map(&n1).await;
    let n3_status = map["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == "n3")
        .unwrap()["status"]
        .clone();
    assert_eq!(n3_status, "down", "{map}");

    // Back with its data dir and its addresses: everything answers, nothing was lost.
    let _n3 = member("n3", None)
        .dir(&dirs.path().join("n3"))
        .args(&["--http", &n3_http, "--cluster-addr", &n3_cluster])
        .start()
        .await;
    for node in [&n1, &n2] {
        for (sku, id) in skus.iter().zip(&orders) {
            let s = poll_until("the SKU answers again", Duration::from_secs(20), || async {
                let (st, v) = node.get(&format!("/v1/skus/{sku}"), None).await;
                (st == 200).then(|| Stock::of(&v))
            })
            .await;
            assert_eq!(s, Stock::new(9, 1, 0), "{sku}");
            assert_eq!(node.order(&buyer, id).await["status"], "pending_payment");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cluster_secret_cannot_join() {
    let n1 = member("n1", None).start().await;
    let mut intruder = Node::config()
        .args(&[
            "--node-id",
            "intruder",
            "--partitions",
            PARTITIONS,
            "--join",
            &n1.cluster_addr,
        ])
        .env(
            "SHARDMALL_CLUSTER_SECRET",
            "another-secret-0123456789abcdef",
        )
        .spawn_expecting_failure();
    let status = poll_until("the intruder gives up", Duration::from_secs(30), || {
        let st = intruder.try_exit();
        async move { st }
    })
    .await;
    assert!(!status.success());
    // The whole log: with RUST_BACKTRACE set, the error's backtrace follows it.
    let log = intruder.log_tail(1000);
    assert!(log.contains("refused"), "{log}");
    let map = cluster_map(&n1).await;
    assert_eq!(owned(&map).len(), 1, "nothing joined: {map}");
}

/// A node whose data dir was lost cannot come back under its old name (the cluster
/// would take its empty disk for the partitions it held, and consensus would see its
/// log go back in time): the join is refused, consensus keeps working, and after a
/// forced removal the same name joins again as a new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_lost_data_dir_rejoins_only_after_a_forced_removal() {
    let ([n1, n2, mut n3], dirs) = three_nodes().await;
    let n3_cluster = n3.cluster_addr.clone();
    n3.kill9();
    let n3_dir = dirs.path().join("n3");
    std::fs::remove_dir_all(&n3_dir).expect("lose n3's disk");
    std::fs::create_dir_all(&n3_dir).expect("an empty data dir");

    // Same name, same cluster address, empty disk, --join: refused.
    let mut wiped = member("n3", Some(&n1.cluster_addr))
        .dir(&n3_dir)
        .args(&["--cluster-addr", &n3_cluster])
        .spawn_expecting_failure();
    let status = poll_until("the wiped node gives up", Duration::from_secs(60), || {
        let st = wiped.try_exit();
        async move { st }
    })
    .await;
    assert!(!status.success());
    let log = wiped.log_tail(1000);
    assert!(log.contains("remove n3 --force"), "{log}");

    // Consensus is intact: the lost node can be removed, and a new n3 joins.
    let (code, out, err) = cluster_cli(&n2.base, &["remove", "n3", "--force"]);
    assert_eq!(code, 0, "remove --force: {out} {err}");
    std::fs::remove_dir_all(&n3_dir).expect("clear the failed attempt");
    let again = member("n3", Some(&n1.cluster_addr))
        .dir(&n3_dir)
        .start()
        .await;
    let (code, out, err) = cluster_cli(&again.base, &["status"]);
    assert_eq!(code, 0, "status: {out} {err}");
    let map = cluster_map(&n1).await;
    let nodes = owned(&map);
    assert_eq!(nodes.len(), 3, "{map}");
    assert_eq!(nodes["n3"], 0, "the new n3 owns nothing yet: {map}");
    assert_eq!(nodes.values().sum::<i64>(), 32, "{map}");
}
