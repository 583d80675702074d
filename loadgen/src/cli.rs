//! The command line. Other scripts depend on these names: change them only by adding.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "shardmall-loadgen",
    version,
    about = "Load generator and invariant checker for shardmall",
    after_help = "Exit status: 0 when every invariant holds, 1 when one breaks, 2 when the run could not be set up."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: ScenarioCmd,
}

#[derive(Subcommand, Debug)]
pub enum ScenarioCmd {
    /// Many buyers on one campaign: creates a product and a campaign (or targets
    /// `--campaign`), buys, then checks that nothing was oversold.
    FlashSale {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        flash: FlashOpts,
    },
    /// A storefront mix: browse 50%, cart 20%, checkout 15%, pay 10%, cancel 5%, with
    /// Zipf-skewed SKU popularity.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        mixed: MixedOpts,
    },
}

impl ScenarioCmd {
    pub fn common(&self) -> &Common {
        match self {
            ScenarioCmd::FlashSale { common, .. } | ScenarioCmd::Mixed { common, .. } => common,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ScenarioCmd::FlashSale { .. } => "flash-sale",
            ScenarioCmd::Mixed { .. } => "mixed",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct FlashOpts {
    /// Target an existing campaign instead of creating one.
    #[arg(long)]
    pub campaign: Option<String>,
    /// Stock of the SKU created for the run.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stock: u64,
    /// Units of the campaign created for the run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub quantity: u64,
    /// Units one buyer may hold in the created campaign.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub per_buyer_limit: u64,
    /// Campaign price, in cents (the SKU's list price is twice that).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
    pub price_cents: i64,
    /// How long the created campaign runs, from now.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub window_secs: u64,
    /// Payment deadline of the created campaign's orders.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub payment_timeout_secs: u64,
    /// Distinct buyers; request i is made by buyer i % buyers.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub buyers: u64,
    /// Units per buy.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub buy_quantity: u64,
    /// Accepted for older scripts: every buy carries an Idempotency-Key, which the node
    /// requires.
    #[arg(long)]
    pub idempotency_keys: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MixedOpts {
    /// SKUs created for the run (20 per product).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub skus: u64,
    /// Zipf exponent of SKU popularity (0 is uniform).
    #[arg(long, default_value_t = 1.1)]
    pub zipf_s: f64,
    /// Virtual users (buyers); defaults to the concurrency.
    #[arg(long)]
    pub users: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Base URL of a node, or of several separated by commas (every node of a
    /// cluster): requests are spread over them in turn.
    #[arg(
        long,
        env = "SHARDMALL_TARGET",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,
    /// File holding the node's JWT secret (its `DATA_DIR/jwt.secret`); or set
    /// SHARDMALL_JWT_SECRET.
    #[arg(long, conflicts_with = "tokens_file")]
    pub secret_file: Option<PathBuf>,
    /// File of customer tokens, one a line (`shardmall token --role customer --count N
    /// --prefix buyer- --out FILE`): the run's buyers are their subjects, and no secret
    /// is needed; the admin token that sets the run up comes from SHARDMALL_TOKEN.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
    /// Closed loop: this many clients, each sending its next request when the last one
    /// is answered. Open loop (--rate): the most requests in flight.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Open loop: requests per second on a fixed schedule, whatever the answers; latency
    /// counts from each request's scheduled start.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to send requests (e.g. 10s, 2m). Default 10s, or no time bound when only
    /// --requests is given.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many requests (whichever of this and --duration comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write the whole result as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write a latency plot: .html or .svg.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No live progress line on stderr.
    #[arg(long)]
    pub no_progress: bool,
    /// Seed of the random choices (mixed: operation and SKU).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Client worker threads (the node under test may share the machine's cores).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub threads: u64,
    /// Read back at most this many acknowledged orders (spread over the run).
    #[arg(long, default_value_t = 2000)]
    pub check_sample: usize,
    /// Read back every acknowledged order.
    #[arg(long)]
    pub check_all: bool,
}

impl Common {
    /// The time bound: `--duration`, else 10 s unless `--requests` bounds the run.
    pub fn time_bound(&self) -> Option<Duration> {
        match (self.duration, self.requests) {
            (Some(d), _) => Some(d),
            (None, Some(_)) => None,
            (None, None) => Some(Duration::from_secs(10)),
        }
    }

    /// Checks what clap cannot express; the message is for a usage error (exit 2).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0 && r <= 10_000_000.0) {
                return Err(format!(
                    "--rate must be between 0 and 10000000 requests per second, not {r}"
                ));
            }
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err("--duration must be longer than 0s".into());
        }
        if self.timeout.is_zero() {
            return Err("--timeout must be longer than 0s".into());
        }
        if self
            .target
            .split(',')
            .any(|t| !(t.trim().starts_with("http://") || t.trim().starts_with("https://")))
        {
            return Err(format!(
                "--target must be an http:// URL, not {:?}",
                self.target
            ));
        }
        if let Some(p) = &self.plot {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !ext.eq_ignore_ascii_case("html") && !ext.eq_ignore_ascii_case("svg") {
                return Err(format!("--plot {} must end in .html or .svg", p.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("shardmall-loadgen").chain(args.iter().copied()))
    }

    #[test]
    fn flash_sale_arguments_and_their_defaults() {
        let cli = parse(&[
            "flash-sale",
            "--target",
            "http://127.0.0.1:1",
            "--secret-file",
            "s",
            "--concurrency",
            "256",
            "--duration",
            "5s",
            "--idempotency-keys",
        ])
        .unwrap();
        let ScenarioCmd::FlashSale { common, flash } = cli.scenario else {
            panic!("parsed the wrong scenario")
        };
        assert_eq!(common.concurrency, 256);
        assert_eq!(common.time_bound(), Some(Duration::from_secs(5)));
        assert_eq!(common.timeout, Duration::from_secs(10));
        assert!(common.rate.is_none() && common.validate().is_ok());
        assert_eq!(
            (flash.stock, flash.quantity, flash.per_buyer_limit),
            (1_000_000, 1000, 1)
        );
        assert_eq!((flash.window_secs, flash.payment_timeout_secs), (3600, 600));
        assert_eq!((flash.buyers, flash.buy_quantity), (1_000_000, 1));
        assert!(flash.idempotency_keys && flash.campaign.is_none());
    }

    #[test]
    fn mixed_arguments_and_bounds() {
        let cli = parse(&[
            "mixed",
            "--rate",
            "500",
            "--zipf-s",
            "0.8",
            "--requests",
            "9",
        ])
        .unwrap();
        let ScenarioCmd::Mixed { common, mixed } = cli.scenario else {
            panic!("parsed the wrong scenario")
        };
        assert!((mixed.zipf_s - 0.8).abs() < 1e-9 && mixed.skus == 200);
        assert_eq!(common.rate, Some(500.0));
        // Only --requests: no time bound. Neither: 10 s.
        assert_eq!(common.time_bound(), None);
        assert_eq!(
            parse(&["mixed"]).unwrap().scenario.common().time_bound(),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        assert!(parse(&["flash-sale", "--duration", "soon"]).is_err());
        assert!(parse(&["flash-sale", "--concurrency", "0"]).is_err());
        assert!(parse(&["flash-sale", "--quantity", "0"]).is_err());
        assert!(parse(&["mixed", "--campaign", "x"]).is_err());
        let bad = |args: &[&str]| parse(args).unwrap().scenario.common().validate().is_err();
        assert!(bad(&["mixed", "--rate", "0"]));
        assert!(bad(&["mixed", "--rate", "inf"]));
        assert!(bad(&["mixed", "--target", "127.0.0.1:8080"]));
        assert!(bad(&["mixed", "--plot", "out.png"]));
        assert!(!bad(&["mixed", "--plot", "out.SVG"]));
    }
}
