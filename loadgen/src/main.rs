//! `shardmall-loadgen`: drives a shardmall node with a flash sale or a mixed storefront
//! load, closed loop (`--concurrency`) or open loop (`--rate`, latency measured from each
//! request's intended start, so a stalled server cannot hide its queueing), then checks
//! through the API that nothing was oversold or lost. Exits 1 when an invariant breaks,
//! 2 when the run could not be set up.

mod api;
mod check;
mod jwt;
mod plot;
mod scenario;
mod stats;
mod zipf;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use rand::SeedableRng;
use serde_json::json;

use check::{Acked, Expected, Observed};
use scenario::{FlashArgs, FlashSale, Mixed, MixedArgs};
use stats::{percentiles, Live, Stats};

#[derive(Parser)]
#[command(
    name = "shardmall-loadgen",
    version,
    about = "Load generator and invariant checker for shardmall"
)]
struct Cli {
    #[command(subcommand)]
    scenario: ScenarioCmd,
}

#[derive(Subcommand)]
enum ScenarioCmd {
    /// Many buyers on one campaign: creates a product and a campaign (or targets
    /// `--campaign`), buys, then checks nothing was oversold.
    FlashSale {
        #[command(flatten)]
        common: Common,
        /// Target an existing campaign instead of creating one.
        #[arg(long)]
        campaign: Option<String>,
        /// Stock of the SKU created for the run.
        #[arg(long, default_value_t = 1_000_000)]
        stock: u64,
        /// Units of the campaign created for the run.
        #[arg(long, default_value_t = 1000)]
        quantity: u64,
        #[arg(long, default_value_t = 1)]
        per_buyer_limit: u64,
        /// Campaign price, in cents.
        #[arg(long, default_value_t = 100)]
        price_cents: i64,
        /// How long the created campaign runs.
        #[arg(long, default_value_t = 3600)]
        window_secs: u64,
        #[arg(long, default_value_t = 600)]
        payment_timeout_secs: u64,
        /// Distinct buyers; request i is made by buyer i % buyers.
        #[arg(long, default_value_t = 1_000_000)]
        buyers: u64,
        /// Units per buy.
        #[arg(long, default_value_t = 1)]
        buy_quantity: u64,
        /// Send an Idempotency-Key with every buy.
        #[arg(long)]
        idempotency_keys: bool,
    },
    /// A storefront mix: browse 50%, cart 20%, checkout 15%, pay 10%, cancel 5%, with
    /// Zipf-skewed SKU popularity.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 200)]
        skus: usize,
        /// Zipf exponent of SKU popularity (0 is uniform).
        #[arg(long, default_value_t = 1.1)]
        zipf_s: f64,
        /// Virtual users (buyers); defaults to the concurrency.
        #[arg(long)]
        users: Option<usize>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Base URL of a node.
    #[arg(
        long,
        env = "SHARDMALL_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    target: String,
    /// File holding the node's JWT secret (its `DATA_DIR/jwt.secret`).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Closed loop: this many clients, each sending its next request when the last one
    /// is answered. In open loop, the most requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open loop: requests per second, on a fixed schedule whatever the answers.
    #[arg(long)]
    rate: Option<f64>,
    /// How long to send requests (e.g. 10s, 2m).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests (whichever of this and --duration comes first).
    #[arg(long)]
    requests: Option<u64>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Write the whole result as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write a latency plot (.html or .svg).
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long)]
    no_progress: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client worker threads (the node under test may share the machine's cores).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Read back at most this many acknowledged orders (spread over the run).
    #[arg(long, default_value_t = 2000)]
    check_sample: usize,
    /// Read back every acknowledged order.
    #[arg(long)]
    check_all: bool,
}

enum Scenario {
    Flash(FlashSale),
    Mixed(Mixed),
}

struct Run {
    api: api::Api,
    minter: jwt::Minter,
    scenario: Scenario,
    stop: AtomicBool,
    next: AtomicU64,
    limit: Option<u64>,
    deadline: Instant,
    live: Live,
    acked: Mutex<Vec<Acked>>,
    settled: Mutex<Vec<(String, Expected)>>,
}

fn main() {
    let cli = Cli::parse();
    let common = match &cli.scenario {
        ScenarioCmd::FlashSale { common, .. } | ScenarioCmd::Mixed { common, .. } => common.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build();
    let code = match runtime {
        Ok(rt) => match rt.block_on(run(cli)) {
            Ok(0) => 0,
            Ok(_) => 1,
            Err(e) => {
                eprintln!("shardmall-loadgen: {e:#}");
                2
            }
        },
        Err(e) => {
            eprintln!("shardmall-loadgen: starting the runtime: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn read_secret(common: &Common) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = &common.secret_file {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading the JWT secret from {}", path.display()))?;
        let s = s.trim();
        if s.is_empty() {
            bail!("{} is empty", path.display());
        }
        return Ok(s.as_bytes().to_vec());
    }
    match std::env::var("SHARDMALL_JWT_SECRET") {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().as_bytes().to_vec()),
        _ => bail!(
            "give --secret-file FILE (the node's DATA_DIR/jwt.secret) or set SHARDMALL_JWT_SECRET"
        ),
    }
}

/// Runs the scenario and answers the number of invariant violations.
async fn run(cli: Cli) -> anyhow::Result<usize> {
    let (name, common) = match &cli.scenario {
        ScenarioCmd::FlashSale { common, .. } => ("flash-sale", common.clone()),
        ScenarioCmd::Mixed { common, .. } => ("mixed", common.clone()),
    };
    if common.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if common.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    let secret = read_secret(&common)?;
    let minter = jwt::Minter::new(&secret, 24 * 3600);
    let admin = minter.token("admin", "loadgen-admin");
    let api = api::Api::new(&common.target, common.concurrency, common.timeout)?;
    api.must(reqwest::Method::GET, "/readyz", None, None, 200)
        .await
        .context("the node is not ready")?;
    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let (scenario, params) = match &cli.scenario {
        ScenarioCmd::FlashSale {
            campaign,
            stock,
            quantity,
            per_buyer_limit,
            price_cents,
            window_secs,
            payment_timeout_secs,
            buyers,
            buy_quantity,
            idempotency_keys,
            ..
        } => {
            let a = FlashArgs {
                campaign: campaign.clone(),
                stock: *stock,
                quantity: *quantity,
                per_buyer_limit: *per_buyer_limit,
                price_cents: *price_cents,
                window_secs: *window_secs,
                payment_timeout_secs: *payment_timeout_secs,
                buyers: *buyers,
                buy_quantity: *buy_quantity,
                idempotency_keys: *idempotency_keys,
            };
            let f = FlashSale::setup(&api, &admin, &run_id, &a).await?;
            let params = json!({"campaign_id": f.campaign_id, "sku_id": f.sku_id, "created": f.exclusive,
                "stock": stock, "quantity": quantity, "per_buyer_limit": per_buyer_limit,
                "buyers": buyers, "buy_quantity": buy_quantity, "idempotency_keys": idempotency_keys});
            (Scenario::Flash(f), params)
        }
        ScenarioCmd::Mixed {
            skus,
            zipf_s,
            users,
            ..
        } => {
            let a = MixedArgs {
                skus: (*skus).max(1),
                zipf_s: *zipf_s,
                users: users.unwrap_or(common.concurrency),
            };
            let m = Mixed::setup(&api, &admin, &minter, &run_id, &a).await?;
            let params = json!({"skus": a.skus, "zipf_s": zipf_s, "users": a.users});
            (Scenario::Mixed(m), params)
        }
    };

    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let start = Instant::now();
    let run = Arc::new(Run {
        api: api.clone(),
        minter,
        scenario,
        stop: AtomicBool::new(false),
        next: AtomicU64::new(0),
        limit: common.requests,
        deadline: start + common.duration,
        live: Live::default(),
        acked: Mutex::new(Vec::new()),
        settled: Mutex::new(Vec::new()),
    });
    {
        let run = run.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: stopping and checking what was done");
                run.stop.store(true, Ordering::Relaxed);
            }
        });
    }
    let progress =
        (!common.no_progress).then(|| tokio::spawn(progress(run.clone(), start, common.duration)));
    let mut stats = match common.rate {
        None => closed_loop(&run, start, common.concurrency, common.seed).await,
        Some(rate) => open_loop(&run, start, rate, common.concurrency, common.seed).await,
    };
    let elapsed = start.elapsed();
    run.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.await;
        eprintln!();
    }
    stats.timeline.truncate(elapsed.as_secs() as usize + 1);

    // ---- checks -------------------------------------------------------------------------
    let mut acked = std::mem::take(&mut *run.acked.lock().unwrap_or_else(|p| p.into_inner()));
    let settled = std::mem::take(&mut *run.settled.lock().unwrap_or_else(|p| p.into_inner()));
    let settled: std::collections::HashMap<String, Expected> = settled.into_iter().collect();
    for a in &mut acked {
        if let Some(e) = settled.get(&a.order_id) {
            a.expected = *e;
        }
    }
    let sample = (!common.check_all).then_some(common.check_sample);
    let mut obs = Observed::default();
    let minter = &run.minter;
    match &run.scenario {
        Scenario::Flash(f) => {
            f.observe(&api, &admin, &mut obs).await?;
            obs.orders =
                scenario::read_orders(&api, &acked, |b| minter.token("customer", b), sample).await;
        }
        Scenario::Mixed(m) => {
            m.observe(&api, &mut obs).await?;
            obs.orders = scenario::read_orders(
                &api,
                &acked,
                |b| m.token_of(b).unwrap_or_else(|| minter.token("customer", b)),
                sample,
            )
            .await;
        }
    }
    obs.all_orders_read = obs.orders.len() == acked.len();
    obs.acked = acked;
    let violations = check::check(&obs);

    // ---- summary and report -------------------------------------------------------------
    let total = stats.total();
    let ok = stats.ok();
    let secs = stats::secs(elapsed);
    let mode = match common.rate {
        Some(r) => format!("open loop at {r} req/s (latency from intended start)"),
        None => format!("closed loop, {} clients", common.concurrency),
    };
    println!("shardmall-loadgen {name} against {}: {mode}", api.base());
    println!(
        "  requests   {total} in {secs:.1} s: {:.0} req/s, {:.0} ok/s",
        total as f64 / secs,
        ok as f64 / secs
    );
    let p = percentiles(&stats.overall);
    println!(
        "  latency ms p50 {} p90 {} p99 {} p99.9 {} max {}",
        p["p50"], p["p90"], p["p99"], p["p999"], p["max"]
    );
    for (op, h) in &stats.by_op {
        let q = percentiles(h);
        println!(
            "  {op:<10} {:>9} requests, p50 {} p99 {} ms",
            h.len(),
            q["p50"],
            q["p99"]
        );
    }
    println!(
        "  outcomes   {}",
        stats
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(c) = &obs.campaign {
        println!(
            "  campaign   {}: quantity {}, sold {}, reserved {}",
            c.campaign_id, c.quantity, c.sold, c.reserved
        );
    }
    println!(
        "  checks     {} acknowledged orders, {} read back, {} skus",
        obs.acked.len(),
        obs.orders.len(),
        obs.skus.len()
    );
    if violations.is_empty() {
        println!("  invariants hold");
    } else {
        for v in &violations {
            println!("  VIOLATION  {v}");
        }
    }

    if let Some(path) = &common.report {
        let by_op: serde_json::Map<String, serde_json::Value> = stats
            .by_op
            .iter()
            .map(|(op, h)| {
                (
                    (*op).to_owned(),
                    json!({"count": h.len(), "latency_ms": percentiles(h)}),
                )
            })
            .collect();
        let timeline: Vec<_> = stats
            .timeline
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({"second": i, "requests": s.requests, "ok": s.ok,
                "p99_ms": s.latency.value_at_quantile(0.99) as f64 / 1000.0})
            })
            .collect();
        let report = json!({
            "scenario": name,
            "target": api.base(),
            "started_at": started_at,
            "mode": if common.rate.is_some() { "open" } else { "closed" },
            "concurrency": common.concurrency,
            "rate": common.rate,
            "duration_secs": secs,
            "parameters": params,
            "requests": total,
            "ok": ok,
            "throughput_per_sec": total as f64 / secs,
            "throughput_ok_per_sec": ok as f64 / secs,
            "latency_ms": p,
            "by_op": by_op,
            "outcomes": stats.outcomes,
            "campaign": obs.campaign.as_ref().map(|c| json!({"campaign_id": c.campaign_id,
                "quantity": c.quantity, "sold": c.sold, "reserved": c.reserved})),
            "invariants": {"acknowledged_orders": obs.acked.len(), "orders_read_back": obs.orders.len(),
                "skus_checked": obs.skus.len(), "violations": violations, "ok": violations.is_empty()},
            "timeline": timeline,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.plot {
        let html = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("html"));
        let title = format!(
            "shardmall-loadgen {name}: {mode}, {:.0} ok/s, p99 {} ms",
            ok as f64 / secs,
            p["p99"]
        );
        std::fs::write(path, plot::render(&stats, &title, html))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(violations.len())
}

/// Takes the next request number, or `None` when the run is over.
fn next_request(run: &Run) -> Option<u64> {
    if run.stop.load(Ordering::Relaxed) || Instant::now() >= run.deadline {
        return None;
    }
    let i = run.next.fetch_add(1, Ordering::Relaxed);
    match run.limit {
        Some(l) if i >= l => None,
        _ => Some(i),
    }
}

async fn one(
    run: &Run,
    u: usize,
    i: u64,
    rng: &mut rand::rngs::StdRng,
    intended: Instant,
    stats: &mut Stats,
) {
    let step = match &run.scenario {
        Scenario::Flash(f) => f.step(&run.api, &run.minter, i).await,
        Scenario::Mixed(m) => m.step(&run.api, u, i, rng).await,
    };
    stats.record(step.op, intended, Instant::now(), &step.answer.outcome);
    run.live.add(step.answer.ok());
    if let Some(a) = step.acked {
        run.acked.lock().unwrap_or_else(|p| p.into_inner()).push(a);
    }
    if let Some(s) = step.settled {
        run.settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }
}

async fn closed_loop(run: &Arc<Run>, start: Instant, clients: usize, seed: u64) -> Stats {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let run = run.clone();
        set.spawn(async move {
            let mut stats = Stats::new(start);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(c as u64));
            while let Some(i) = next_request(&run) {
                let sent = Instant::now();
                one(&run, c, i, &mut rng, sent, &mut stats).await;
            }
            stats
        });
    }
    let mut all = Stats::new(start);
    while let Some(Ok(s)) = set.join_next().await {
        all.merge(s);
    }
    all
}

/// Requests go out on a fixed schedule; `workers` send them. A request waiting for a
/// free worker is late, and its latency counts from its scheduled start.
async fn open_loop(run: &Arc<Run>, start: Instant, rate: f64, workers: usize, seed: u64) -> Stats {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (run, rx) = (run.clone(), rx.clone());
        set.spawn(async move {
            let mut stats = Stats::new(start);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w as u64));
            loop {
                let next = rx.lock().await.recv().await;
                let Some((i, intended)) = next else { break };
                if run.stop.load(Ordering::Relaxed) {
                    break;
                }
                one(&run, i as usize, i, &mut rng, intended, &mut stats).await;
            }
            stats
        });
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut k: u64 = 0;
    while let Some(i) = next_request(run) {
        let intended = start + interval.mul_f64(k as f64);
        k += 1;
        if intended >= run.deadline {
            break;
        }
        tokio::time::sleep_until(intended.into()).await;
        if tx.send((i, intended)).is_err() {
            break;
        }
    }
    drop(tx);
    let mut all = Stats::new(start);
    while let Some(Ok(s)) = set.join_next().await {
        all.merge(s);
    }
    all
}

async fn progress(run: Arc<Run>, start: Instant, duration: Duration) {
    let mut last = (Instant::now(), 0u64);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = run.live.done.load(Ordering::Relaxed);
        let ok = run.live.ok.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (done - last.1) as f64 / stats::secs(now - last.0);
        last = (now, done);
        let frac = (start.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0);
        let width = 30;
        let filled = (frac * width as f64) as usize;
        eprint!(
            "\r[{}{}] {:>3.0}% {done} requests, {ok} ok, {:.0}/s   ",
            "=".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0,
            rate
        );
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_with_their_defaults() {
        let cli = Cli::try_parse_from([
            "shardmall-loadgen",
            "flash-sale",
            "--target",
            "http://127.0.0.1:1",
            "--secret-file",
            "s",
            "--concurrency",
            "256",
            "--duration",
            "5s",
        ])
        .unwrap();
        match cli.scenario {
            ScenarioCmd::FlashSale {
                common,
                quantity,
                per_buyer_limit,
                ..
            } => {
                assert_eq!(common.concurrency, 256);
                assert_eq!(common.duration, Duration::from_secs(5));
                assert_eq!((quantity, per_buyer_limit), (1000, 1));
                assert!(common.rate.is_none());
            }
            ScenarioCmd::Mixed { .. } => panic!("parsed the wrong scenario"),
        }
        let cli = Cli::try_parse_from([
            "shardmall-loadgen",
            "mixed",
            "--rate",
            "500",
            "--zipf-s",
            "0.8",
        ])
        .unwrap();
        assert!(
            matches!(cli.scenario, ScenarioCmd::Mixed { zipf_s, .. } if (zipf_s - 0.8).abs() < 1e-9)
        );
        assert!(
            Cli::try_parse_from(["shardmall-loadgen", "flash-sale", "--duration", "soon"]).is_err()
        );
    }
}
