//! `shardmall-loadgen`: drives a shardmall node with a flash sale or a mixed storefront
//! load, then checks through the API that nothing was oversold or lost.
//!
//! A run: `cli` parses the arguments; the scenario (`flash`, `mixed`) creates what it
//! needs through `api`; `driver` sends the load (closed or open loop), each request a
//! `scenario::Step` recorded in `stats`; then the checks read the campaign, the
//! acknowledged orders and the SKUs back and `check` (pure) lists what does not hold;
//! `report` prints the summary and writes the JSON report, `plot` the latency plot.
//!
//! Exit status: 0 when every invariant holds, 1 when one breaks (each is printed), 2
//! when the run could not be set up (usage, node unreachable, wrong secret, ...).

mod api;
mod check;
mod cli;
mod driver;
mod flash;
mod jwt;
mod mixed;
mod plot;
mod report;
mod scenario;
mod stats;
mod zipf;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use reqwest::Method;

use check::{Acked, Observed};
use cli::{Cli, Common, ScenarioCmd};
use driver::Run;
use flash::FlashSale;
use mixed::Mixed;
use scenario::{read_orders, Scenario};

/// Runs the command line `args` (the program name first) and answers the exit status:
/// 0 when every invariant held, 1 when one broke, 2 when the run could not be set up.
/// Builds its own runtime: call it from a plain thread, not from inside one.
pub fn run_cli<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    if let Err(msg) = validate(&cli) {
        eprintln!("shardmall-loadgen: {msg}");
        return 2;
    }
    // One thread by default: the node under test often shares the machine's cores.
    let threads = cli.scenario.common().threads as usize;
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => match rt.block_on(run(cli)) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("shardmall-loadgen: {e:#}");
                2
            }
        },
        Err(e) => {
            eprintln!("shardmall-loadgen: starting the runtime: {e}");
            2
        }
    }
}

fn validate(cli: &Cli) -> Result<(), String> {
    cli.scenario.common().validate()?;
    if let ScenarioCmd::Mixed { mixed, .. } = &cli.scenario {
        if !(mixed.zipf_s.is_finite() && mixed.zipf_s >= 0.0) {
            return Err(format!("--zipf-s must be 0 or more, not {}", mixed.zipf_s));
        }
        if mixed.users == Some(0) {
            return Err("--users must be at least 1".into());
        }
    }
    Ok(())
}

/// The buyers' tokens and an admin's: minted with the node's secret, or the customer
/// tokens of `--tokens-file` and the admin token in `SHARDMALL_TOKEN` (so a load test
/// needs no signing secret).
fn credentials(common: &Common) -> anyhow::Result<(jwt::Tokens, String)> {
    if let Some(path) = &common.tokens_file {
        let tokens = jwt::Tokens::from_file(path)?;
        let admin = match std::env::var("SHARDMALL_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => bail!(
                "--tokens-file needs an admin token in SHARDMALL_TOKEN (shardmall token --role admin) to set the run up"
            ),
        };
        return Ok((tokens, admin));
    }
    let secret = read_secret(common)?;
    let minter = jwt::Minter::new(&secret, 24 * 3600);
    let admin = minter.token("admin", "loadgen-admin");
    Ok((jwt::Tokens::Minted(minter), admin))
}

fn read_secret(common: &Common) -> anyhow::Result<Vec<u8>> {
    if let Some(path) = &common.secret_file {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading the JWT secret from {}", path.display()))?;
        let s = s.trim();
        if s.is_empty() {
            bail!("the JWT secret file {} is empty", path.display());
        }
        return Ok(s.as_bytes().to_vec());
    }
    match std::env::var("SHARDMALL_JWT_SECRET") {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().as_bytes().to_vec()),
        _ => bail!(
            "no JWT secret: give --secret-file FILE (the node's DATA_DIR/jwt.secret) or set SHARDMALL_JWT_SECRET"
        ),
    }
}

/// The node's durability mode, if its metrics name it (a `durability="..."` label).
async fn durability(api: &api::Api, admin: &str) -> Option<String> {
    let a = api
        .call(
            Method::GET,
            &api.url("/metrics"),
            Some(admin),
            None,
            None,
            200,
        )
        .await;
    if !a.ok() {
        return None;
    }
    let text = std::str::from_utf8(&a.body).ok()?;
    let at = text.find("durability=\"")? + "durability=\"".len();
    let len = text[at..].find('"')?;
    Some(text[at..at + len].to_owned())
}

/// Runs the scenario; answers whether every invariant held.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let common = cli.scenario.common().clone();
    let concurrency = common.concurrency as usize;
    let (tokens, admin) = credentials(&common)?;
    let api = api::Api::new(&common.target, concurrency, common.timeout)?;
    api.must(Method::GET, "/readyz", None, None, 200)
        .await
        .context("checking that the node is ready")?;
    let durability = durability(&api, &admin).await;
    let run_id = format!(
        "{:x}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        std::process::id()
    );

    let (scenario, parameters) = match &cli.scenario {
        ScenarioCmd::FlashSale { flash, .. } => {
            let f = FlashSale::setup(&api, &admin, &tokens, &run_id, flash).await?;
            let p = f.parameters(flash);
            (Scenario::Flash(f), p)
        }
        ScenarioCmd::Mixed { mixed, .. } => {
            let users = mixed.users.unwrap_or(concurrency);
            let m = Mixed::setup(&api, &admin, &tokens, &run_id, mixed, users).await?;
            let p = m.parameters(mixed);
            (Scenario::Mixed(m), p)
        }
    };

    let started_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let run = Arc::new(Run::new(
        api.clone(),
        tokens,
        scenario,
        common.time_bound(),
        common.requests,
    ));
    driver::on_ctrl_c(run.clone());
    let progress = (!common.no_progress).then(|| tokio::spawn(driver::progress(run.clone())));
    let elapsed = driver::drive(&run, concurrency, common.rate, common.seed).await;
    let interrupted = run.stop.swap(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
        let total = run.stats().total();
        driver::progress_line(&run, elapsed, total as f64 / stats::secs(elapsed));
        eprintln!();
    }

    // ---- checks: read back, and read again when something does not hold yet (a
    // release can be in flight between an order and its campaign) ---------------------
    let uncertain_units = run.uncertain_units.load(Ordering::Relaxed);
    let mut acked = run.take_acked();
    let acked_units: u64 = acked.iter().map(|a| a.quantity).sum();
    let limit = match &run.scenario {
        Scenario::Flash(f) => Some(f.per_buyer_limit),
        Scenario::Mixed(_) => None,
    };
    let sample = (!common.check_all).then_some(common.check_sample);
    let which = check::orders_to_read(&acked, limit, sample);
    let mut attempt = 0;
    let (observed, violations) = loop {
        attempt += 1;
        let observed = observe(&run, &admin, acked, &which, uncertain_units).await?;
        let violations = check::check(&observed);
        if violations.is_empty() || attempt == 3 {
            break (observed, violations);
        }
        eprintln!(
            "{} invariant(s) do not hold yet; reading again in 1 s",
            violations.len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        acked = observed.acked;
    };

    let mut checks = vec!["acknowledged orders readable, with their buyer and an expected status"];
    match &run.scenario {
        Scenario::Flash(f) => {
            checks.insert(0, "campaign not oversold");
            if f.exclusive {
                checks.insert(1, "campaign sold+reserved matches acknowledged orders");
            }
            checks.insert(1, "per-buyer limit");
            checks.push(if f.sku_stock.is_some() {
                "sku stock conserved"
            } else {
                "sku figures not negative"
            });
        }
        Scenario::Mixed(_) => checks.push("sku stock conserved"),
    }
    let stats = run.stats();
    let outcome = report::Outcome {
        scenario: cli.scenario.name(),
        target: api.base(),
        started_at,
        mode: if common.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        concurrency: common.concurrency,
        rate: common.rate,
        elapsed,
        interrupted,
        parameters,
        durability,
        stats: &stats,
        campaign: observed.campaign.as_ref(),
        acked_orders: observed.acked.len(),
        acked_units,
        orders_read: observed.orders.len(),
        skus_checked: observed.skus.len(),
        uncertain_units,
        checks,
        violations: &violations,
    };
    print!("{}", outcome.table());
    if let Some(path) = &common.report {
        let text = serde_json::to_vec_pretty(&outcome.json())?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.plot {
        let html = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("html"));
        let title = format!(
            "shardmall-loadgen {} against {}: {:.0} ok/s, p99 {:.3} ms",
            outcome.scenario,
            outcome.target,
            stats.ok() as f64 / stats::secs(elapsed),
            stats::percentiles(&stats.overall).p99
        );
        std::fs::write(path, plot::render(&stats, &title, html))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(violations.is_empty())
}

/// Reads back what the checks need: the campaign before and after the orders (units
/// only leave it once the load has stopped, so the two reads bracket the order reads),
/// the acknowledged orders `which`, and the SKUs.
async fn observe(
    run: &Run,
    admin: &str,
    acked: Vec<Acked>,
    which: &[usize],
    uncertain_units: u64,
) -> anyhow::Result<Observed> {
    let api = &run.api;
    match &run.scenario {
        Scenario::Flash(f) => {
            let mut campaign = f.campaign(api, admin, uncertain_units).await?;
            let orders = read_orders(api, &run.tokens, &acked, which).await;
            campaign.last = f.campaign(api, admin, uncertain_units).await?.last;
            Ok(Observed {
                campaign: Some(campaign),
                acked,
                orders,
                skus: f.skus(api).await?,
            })
        }
        Scenario::Mixed(m) => {
            let orders = read_orders(api, &run.tokens, &acked, which).await;
            Ok(Observed {
                campaign: None,
                acked,
                orders,
                skus: m.skus(api).await?,
            })
        }
    }
}
