//! The command line (API.md, "Command line"). Every flag also reads `SHARDMALL_<NAME>`.
//! Secrets are never flags: they come from the config file or the environment.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shardmall",
    version,
    about = "A clustered, in-memory commerce engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a node.
    Serve(Box<ServeArgs>),
    /// Print a token signed with the configured secret (or that of the data dir).
    Token(TokenArgs),
    /// Inspect and change the cluster through any node's HTTP edge (operator token in
    /// SHARDMALL_TOKEN).
    Cluster(ClusterArgs),
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
    /// Any node's HTTP address.
    #[arg(
        long,
        env = "SHARDMALL_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// Print the JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The map: members, their state and partitions, the epoch and the leader.
    Status,
    /// Hand every partition of NODE to the others, then remove it from the cluster.
    Leave { node: String },
    /// Remove NODE from the cluster. A node that owns partitions must leave instead;
    /// one that is down is removed only with --force, which gives up its partitions' data.
    Remove {
        node: String,
        #[arg(long)]
        force: bool,
    },
    /// Spread the partitions evenly over the members.
    Rebalance,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "SHARDMALL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long, env = "SHARDMALL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "SHARDMALL_HTTP")]
    pub http: Option<String>,
    /// Node-to-node address [default: 127.0.0.1:7000].
    #[arg(long, env = "SHARDMALL_CLUSTER_ADDR")]
    pub cluster_addr: Option<String>,
    /// The host other nodes and operators reach this node at, when it listens on an
    /// address they cannot use (0.0.0.0) [default: the machine's host name then].
    #[arg(long, env = "SHARDMALL_ADVERTISE_HOST")]
    pub advertise_host: Option<String>,
    /// This node's id [default: node-1].
    #[arg(long, env = "SHARDMALL_NODE_ID")]
    pub node_id: Option<String>,
    /// A member's --cluster-addr to join at first start (needs the cluster's
    /// SHARDMALL_CLUSTER_SECRET).
    #[arg(long, env = "SHARDMALL_JOIN")]
    pub join: Option<String>,
    /// `sync` (answer after the flush) or `relaxed` (flush every few ms) [default: sync].
    #[arg(long, env = "SHARDMALL_DURABILITY")]
    pub durability: Option<String>,
    /// Partitions of a new data set [default: 256]; fixed once data exists.
    #[arg(long, env = "SHARDMALL_PARTITIONS")]
    pub partitions: Option<u16>,
    /// Copies of every partition in a new cluster: 1, 3 or 5; fixed when the cluster is
    /// created (its first node decides). Unset: one copy until three members are
    /// active, then three. With 3 or 5, partitions are served once that many members
    /// have joined.
    #[arg(long, env = "SHARDMALL_REPLICATION_FACTOR")]
    pub replication_factor: Option<u8>,
    /// Unpaid orders are cancelled after this long [default: 30m].
    #[arg(long, env = "SHARDMALL_PAYMENT_TIMEOUT")]
    pub payment_timeout: Option<String>,
    /// Shipped orders complete automatically after this long [default: 15days].
    #[arg(long, env = "SHARDMALL_AUTO_CONFIRM_AFTER")]
    pub auto_confirm_after: Option<String>,
    /// Entity actors idle this long are passivated [default: 60s].
    #[arg(long, env = "SHARDMALL_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Memory budget: active entity actors on this node; past it the least recently used
    /// are passivated [default: 4096].
    #[arg(long, env = "SHARDMALL_MAX_ACTIVE")]
    pub max_active: Option<usize>,
    /// Admission control: requests in flight; past it the edge answers 429 overloaded
    /// [default: 4096].
    #[arg(long, env = "SHARDMALL_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
    /// Admission bound of one entity (a hot campaign or SKU): commands waiting in its
    /// mailbox; past it, 429 overloaded [default: 512].
    #[arg(long, env = "SHARDMALL_ENTITY_QUEUE")]
    pub entity_queue: Option<usize>,
    /// Storage cache, MiB [default: 64].
    #[arg(long, env = "SHARDMALL_CACHE_MB")]
    pub cache_mb: Option<u64>,
    /// Threads serving requests [default: one per core this process may use]. For
    /// nodes that share a machine's cores: give each its share (measure; see
    /// docs/operations.md, "Threads").
    #[arg(long, env = "SHARDMALL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// customer | admin | operator
    #[arg(long)]
    pub role: String,
    /// The user the token is for.
    #[arg(long, required_unless_present = "count", conflicts_with = "count")]
    pub sub: Option<String>,
    /// Lifetime, e.g. 1h, 30m, 7days (at most 365 days).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Mint this many tokens, one a line, for subjects PREFIX0 .. PREFIX(N-1): load tests
    /// then need the tokens, not the signing secret.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: Option<u64>,
    /// Subject prefix with --count.
    #[arg(long, default_value = "buyer-", requires = "count")]
    pub prefix: String,
    /// With --count: write the tokens to this file (created with mode 0600, never
    /// overwritten) instead of standard output.
    #[arg(long, requires = "count")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub serve: TokenServeArgs,
}

/// The subset of serve options `token` reads to find the secret.
#[derive(Debug, Clone, Args)]
pub struct TokenServeArgs {
    #[arg(long, env = "SHARDMALL_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "SHARDMALL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}
