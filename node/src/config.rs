//! Configuration: defaults, overridden by the TOML file, overridden by the environment
//! and flags (clap reads `SHARDMALL_*` for every flag).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use shardmall_http_edge::ConnLimits;
use shardmall_persistence::Durability;

use crate::cli::ServeArgs;

/// The TOML file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub cluster_addr: Option<String>,
    pub advertise_host: Option<String>,
    pub node_id: Option<String>,
    pub durability: Option<String>,
    pub partitions: Option<u16>,
    pub replication_factor: Option<u8>,
    pub payment_timeout: Option<String>,
    pub auto_confirm_after: Option<String>,
    pub reservation_grace: Option<String>,
    pub refund_window: Option<String>,
    pub idle_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub cache_mb: Option<u64>,
    pub worker_threads: Option<usize>,
    pub max_active: Option<usize>,
    pub max_inflight: Option<usize>,
    pub entity_queue: Option<usize>,
    pub log: Option<String>,
    pub jwt_secret: Option<String>,
    pub payment_secret: Option<String>,
    pub cluster_secret: Option<String>,
    pub join: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub http: String,
    pub cluster_addr: String,
    /// Replaces an unspecified listen IP in the addresses this node advertises.
    pub advertise_host: Option<String>,
    pub node_id: String,
    pub durability: Durability,
    pub partitions: u16,
    /// Copies of every partition when this node creates the cluster (1, 3 or 5). None:
    /// one copy, growing into 3 once three members are active (ADR 0016).
    pub replication_factor: Option<u8>,
    pub payment_timeout: Duration,
    pub auto_confirm_after: Duration,
    pub reservation_grace: Duration,
    pub refund_window: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// Timeouts and caps of the HTTP connections.
    pub conn_limits: ConnLimits,
    pub cache_mb: u64,
    /// Threads of the runtime; `None`: one per core the process may use.
    pub worker_threads: Option<usize>,
    pub max_active: usize,
    pub max_inflight: usize,
    pub entity_queue: usize,
    pub log: String,
    pub jwt_secret: Option<String>,
    pub payment_secret: Option<String>,
    pub cluster_secret: Option<String>,
    /// A member's cluster address to join at first start.
    pub join: Option<String>,
}

const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// More runtime threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

fn at_least_one(name: &str, value: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match value.unwrap_or(default) {
        0 => anyhow::bail!("{name} must be at least 1"),
        n => Ok(n),
    }
}

/// A whole number from the environment variable `name`, if it is set.
fn env_number(name: &str) -> anyhow::Result<Option<usize>> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.trim()
                .parse()
                .with_context(|| format!("{name}: {v:?} is not a whole number"))
        })
        .transpose()
}

fn duration(name: &str, value: Option<String>, default: &str) -> anyhow::Result<Duration> {
    let text = value.unwrap_or_else(|| default.to_owned());
    let d = humantime::parse_duration(&text).with_context(|| {
        format!("{name}: {text:?} is not a duration (e.g. 30s, 15m, 2h, 15days)")
    })?;
    if d.is_zero() {
        anyhow::bail!("{name} must be greater than zero");
    }
    // Deadlines are instants in ms; a bound keeps every sum of them far from overflow.
    if d > MAX_DURATION {
        anyhow::bail!("{name} must be at most 3650 days");
    }
    Ok(d)
}

impl Config {
    pub fn load(args: &ServeArgs) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let durability_text = args
            .durability
            .clone()
            .or(file.durability)
            .unwrap_or_else(|| "sync".into());
        let durability = durability_text.parse::<Durability>().map_err(|_| {
            anyhow::anyhow!("durability must be sync or relaxed, not {durability_text:?}")
        })?;
        let partitions = args
            .partitions
            .or(file.partitions)
            .unwrap_or(shardmall_actors::keys::DEFAULT_PARTITIONS);
        if partitions == 0 || partitions == shardmall_persistence::RAFT_PARTITION {
            anyhow::bail!(
                "partitions must be between 1 and {}",
                shardmall_persistence::RAFT_PARTITION - 1
            );
        }
        let replication_factor = args.replication_factor.or(file.replication_factor);
        if let Some(rf) = replication_factor.filter(|rf| ![1, 3, 5].contains(rf)) {
            anyhow::bail!("replication_factor must be 1, 3 or 5, not {rf}");
        }
        let cache_mb = args.cache_mb.or(file.cache_mb).unwrap_or(64);
        if cache_mb == 0 {
            anyhow::bail!("cache_mb must be at least 1");
        }
        let worker_threads = match args.worker_threads.or(file.worker_threads) {
            Some(n) if !(1..=MAX_WORKER_THREADS).contains(&n) => {
                anyhow::bail!("worker_threads must be between 1 and {MAX_WORKER_THREADS}, not {n}")
            }
            n => n,
        };
        let max_active = at_least_one("max_active", args.max_active.or(file.max_active), 4096)?;
        let entity_queue =
            at_least_one("entity_queue", args.entity_queue.or(file.entity_queue), 512)?;
        let max_inflight = at_least_one(
            "max_inflight",
            args.max_inflight.or(file.max_inflight),
            4096,
        )?;
        Ok(Config {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./data")),
            http: args
                .http
                .clone()
                .or(file.http)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            cluster_addr: args
                .cluster_addr
                .clone()
                .or(file.cluster_addr)
                .unwrap_or_else(|| "127.0.0.1:7000".into()),
            advertise_host: args.advertise_host.clone().or(file.advertise_host),
            node_id: args
                .node_id
                .clone()
                .or(file.node_id)
                .unwrap_or_else(|| "node-1".into()),
            durability,
            partitions,
            replication_factor,
            payment_timeout: duration(
                "payment_timeout",
                args.payment_timeout.clone().or(file.payment_timeout),
                "30m",
            )?,
            auto_confirm_after: duration(
                "auto_confirm_after",
                args.auto_confirm_after.clone().or(file.auto_confirm_after),
                "15days",
            )?,
            reservation_grace: duration(
                "reservation_grace",
                env("SHARDMALL_RESERVATION_GRACE").or(file.reservation_grace),
                "5m",
            )?,
            refund_window: duration(
                "refund_window",
                env("SHARDMALL_REFUND_WINDOW").or(file.refund_window),
                "15days",
            )?,
            idle_timeout: duration(
                "idle_timeout",
                args.idle_timeout.clone().or(file.idle_timeout),
                "60s",
            )?,
            drain_timeout: duration(
                "drain_timeout",
                env("SHARDMALL_DRAIN_TIMEOUT").or(file.drain_timeout),
                "10s",
            )?,
            conn_limits: ConnLimits {
                header_read_timeout: duration(
                    "header_read_timeout",
                    env("SHARDMALL_HEADER_READ_TIMEOUT").or(file.header_read_timeout),
                    "10s",
                )?,
                body_read_timeout: duration(
                    "body_read_timeout",
                    env("SHARDMALL_BODY_READ_TIMEOUT").or(file.body_read_timeout),
                    "30s",
                )?,
                max_connections: at_least_one(
                    "max_connections",
                    env_number("SHARDMALL_MAX_CONNECTIONS")?.or(file.max_connections),
                    16_384,
                )?,
                max_connections_per_ip: at_least_one(
                    "max_connections_per_ip",
                    env_number("SHARDMALL_MAX_CONNECTIONS_PER_IP")?.or(file.max_connections_per_ip),
                    4_096,
                )?,
            },
            cache_mb,
            worker_threads,
            max_active,
            max_inflight,
            entity_queue,
            log: env("SHARDMALL_LOG")
                .or(file.log)
                .unwrap_or_else(|| "info".into()),
            jwt_secret: env("SHARDMALL_JWT_SECRET").or(file.jwt_secret),
            payment_secret: env("SHARDMALL_PAYMENT_SECRET").or(file.payment_secret),
            cluster_secret: env("SHARDMALL_CLUSTER_SECRET").or(file.cluster_secret),
            join: args.join.clone().or(file.join),
        })
    }

    /// A 16-bit tag of the node id, part of every order id it mints.
    pub fn node_tag(&self) -> u16 {
        shardmall_cluster::map::node_tag(&self.node_id)
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "http = \"127.0.0.1:9\"\ndurability = \"relaxed\"\npayment_timeout = \"2s\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.http, "127.0.0.1:9");
        assert_eq!(c.durability, Durability::Relaxed);
        assert_eq!(c.payment_timeout, Duration::from_secs(2));
        assert_eq!(c.partitions, 256);
        let args = ServeArgs {
            config: Some(path),
            http: Some("127.0.0.1:10".into()),
            ..Default::default()
        };
        assert_eq!(Config::load(&args).unwrap().http, "127.0.0.1:10");
    }

    /// The example config shipped in deploy/ MUST load with the real loader.
    #[test]
    fn the_shipped_example_config_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/shardmall.example.toml");
        let c = Config::load(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.durability, Durability::Sync);
        assert_eq!(c.max_active, 4096);
        assert_eq!(c.max_inflight, 4096);
        assert_eq!(c.entity_queue, 512);
        assert_eq!(c.worker_threads, None);
    }

    #[test]
    fn refuses_bad_values() {
        let bad = ServeArgs {
            durability: Some("fast".into()),
            ..Default::default()
        };
        assert!(Config::load(&bad).is_err());
        let bad = ServeArgs {
            payment_timeout: Some("soon".into()),
            ..Default::default()
        };
        assert!(Config::load(&bad).is_err());
        let bad = ServeArgs {
            auto_confirm_after: Some("100000years".into()),
            ..Default::default()
        };
        assert!(Config::load(&bad).is_err());
        for n in [0, 100_000] {
            let bad = ServeArgs {
                worker_threads: Some(n),
                ..Default::default()
            };
            let e = Config::load(&bad).unwrap_err().to_string();
            assert!(e.contains("worker_threads"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        assert!(Config::load(&ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .is_err());
    }
}
