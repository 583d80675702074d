//! The `shardmall` binary's library: configuration (file, `SHARDMALL_*` environment,
//! flags), start-up (data dir, secrets, log, actors, HTTP edge), the shutdown order, and
//! the `token` subcommand.
//!
//! Shutdown order: stop accepting -> drain in-flight requests (bounded) -> stop the actors
//! -> flush the log.

pub mod cli;
pub mod cluster_cmd;
pub mod config;
pub mod secrets;
mod token_cmd;

use std::sync::Arc;

use anyhow::Context;
use shardmall_actors::{Shop, ShopConfig};
use shardmall_cluster::group::{GroupSettings, Groups};
use shardmall_cluster::map::{node_id_of, MapCommand, Member, MemberStatus};
use shardmall_cluster::node::Replication;
use shardmall_cluster::node::{ClusterError, ClusterNode, Dispatcher, SharedSecrets};
use shardmall_cluster::proto::Joined;
use shardmall_cluster::quic::{QuicConfig, QuicTransport, TlsIdentity};
use shardmall_cluster::raft::{ControlConfig, ControlPlane};
use shardmall_cluster::serving::{Leaders, ShopHost};
use shardmall_cluster::ClusterRouter;
use shardmall_http_edge::{AppState, Edge, JwtKeys};
use shardmall_persistence::{Replicate, Wal, WalConfig};

/// Replica groups of a replicated cluster (ADR 0016), at most one per partition.
const REPLICA_GROUPS: u16 = 16;
/// The copies a cluster created without `--replication-factor` grows into.
const DEFAULT_REPLICATION_FACTOR: u8 = 3;
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command};
use config::Config;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = Config::load(&args)?;
            init_tracing(&config.log);
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                runtime.worker_threads(n);
            }
            let runtime = runtime.enable_all().build()?;
            runtime.block_on(serve(config))
        }
        Command::Cluster(args) => std::process::exit(cluster_cmd::run(args)),
        Command::Token(args) => token_cmd::run(args),
    }
}

fn init_tracing(default: &str) {
    // Consensus narrates every election and membership step at info: keep the node's
    // log about the node unless the operator asks for more.
    let default = if default.contains("openraft") {
        default.to_owned()
    } else {
        format!("{default},openraft=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    // Only dots would be a path segment of its own in `/v1/cluster/nodes/{node_id}`.
    if !shardmall_http_edge::validate::is_id(&config.node_id)
        || config.node_id.bytes().all(|b| b == b'.')
    {
        anyhow::bail!("--node-id must match [A-Za-z0-9._-]{{1,64}} and not be only dots");
    }
    let started = std::time::Instant::now();

    // Addresses first: a port 0 becomes the real port others are told.
    let listener = tokio::net::TcpListener::bind(&config.http)
        .await
        .with_context(|| format!("binding {}", config.http))?;
    let local = listener.local_addr()?;
    let cluster_addr: std::net::SocketAddr = tokio::net::lookup_host(&config.cluster_addr)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("--cluster-addr {:?} is not an address", config.cluster_addr))?;
    let dispatcher = Dispatcher::new();
    let quic = QuicTransport::bind(
        cluster_addr,
        TlsIdentity::load_or_create(&config.data_dir).context("loading the cluster certificate")?,
        secrets::cluster_secret(&config)?,
        dispatcher.clone(),
        QuicConfig::default(),
    )
    .await
    .with_context(|| format!("binding the cluster address {cluster_addr}"))?;
    let me = Member {
        node_id: node_id_of(&config.node_id),
        name: config.node_id.clone(),
        http_addr: advertised(local, config.advertise_host.as_deref()),
        cluster_addr: advertised(quic.local_addr(), config.advertise_host.as_deref()),
        status: MemberStatus::Active,
        incarnation: secrets::incarnation(&config)?,
    };
    let control = ControlPlane::open(
        ControlConfig::new(me.clone(), config.data_dir.join("cluster")),
        quic.clone(),
    )
    .await
    .context("opening the cluster state")?;
    dispatcher.set_control(control.clone());

    // The cluster decides the partition count and the shared secrets.
    let mut join_epoch = 0;
    let (jwt, payment, partitions) = if control.is_initialised() {
        let map = control.map();
        if config.join.is_some() {
            tracing::info!("already a member; --join is ignored");
        }
        (
            secrets::jwt_secret(&config, true)?,
            secrets::payment_secret(&config)?,
            map.partitions,
        )
    } else if let Some(seed) = &config.join {
        let joined = join(&quic, seed, &me).await?;
        join_epoch = joined.map.epoch;
        (
            secrets::adopt(
                &config,
                "jwt.secret",
                config.jwt_secret.as_deref(),
                &joined.jwt_secret,
            )?,
            secrets::adopt(
                &config,
                "payment.secret",
                config.payment_secret.as_deref(),
                &joined.payment_secret,
            )?,
            joined.map.partitions,
        )
    } else {
        (
            secrets::jwt_secret(&config, true)?,
            secrets::payment_secret(&config)?,
            config.partitions,
        )
    };

    let mut wal_cfg = WalConfig::new(config.data_dir.join("db"));
    wal_cfg.durability = config.durability;
    wal_cfg.cache_bytes = config.cache_mb * 1024 * 1024;
    let wal = Wal::open(wal_cfg).context("opening the log")?;
    let partitions = secrets::partition_count(&wal, partitions)?;
    if !control.is_initialised() {
        if let Some(seed) = &config.join {
            // Admitted: the map arrives with the consensus log, soon after the answer.
            let map = control
                .wait_for_epoch(join_epoch.max(1), std::time::Duration::from_secs(30))
                .await;
            if !map.is_initialised() {
                anyhow::bail!(
                    "joined through {seed} but the cluster map did not arrive within 30 s"
                );
            }
        } else {
            control
                .bootstrap(secrets::cluster_id(&wal)?, partitions)
                .await
                .context("creating the cluster")?;
            let groups = REPLICA_GROUPS.min(partitions);
            let command = match config.replication_factor {
                // Replicated from the start: nothing is served before `factor` members
                // are active.
                Some(factor @ (3 | 5)) => Some(MapCommand::SetReplication { factor, groups }),
                Some(_) => None,
                // One copy now, three once three members are active.
                None => Some(MapCommand::SetTargetReplication {
                    factor: DEFAULT_REPLICATION_FACTOR,
                    groups,
                }),
            };
            if let Some(command) = command {
                control
                    .propose(command)
                    .await
                    .context("setting the replication factor")?;
            }
        }
    }
    let map = control.map();
    if map.partitions != partitions {
        anyhow::bail!(
            "this data dir holds {partitions} partitions but the cluster has {}",
            map.partitions
        );
    }
    if let Some(known) = map.members.get(&me.node_id) {
        if known.incarnation != 0 && known.incarnation != me.incarnation {
            anyhow::bail!(
                "the cluster knows {} with another data dir: if that data is lost, remove it \
                 with `shardmall cluster remove {} --force`, then start this node with an empty \
                 --data-dir and --join",
                me.name,
                me.name
            );
        }
    }
    if !map.members.contains_key(&me.node_id)
        || ClusterNode::removed_elsewhere(&*quic, &map, me.node_id).await == Some(true)
    {
        anyhow::bail!(
            "{} left or was removed from the cluster: its data dir no longer belongs to it; \
             start it with an empty --data-dir and --join to come back",
            me.name
        );
    }
    if let Some(known) = map.members.get(&me.node_id) {
        if known.http_addr != me.http_addr || known.cluster_addr != me.cluster_addr {
            tracing::info!(http = %me.http_addr, cluster = %me.cluster_addr, "addresses changed since the last start; telling the cluster");
            let control = control.clone();
            let me = me.clone();
            tokio::spawn(async move {
                if let Err(e) = control.add_voter(me).await {
                    tracing::warn!(error = %e, "could not record the new addresses");
                }
            });
        }
    }

    // A replicated cluster: the groups take the log's records of every partition before
    // the shop writes its first (ADR 0016).
    let replicated = map.is_replicated() || map.grows_into_replicas();
    let replication = replicated.then(|| {
        let host = Arc::new(ShopHost::default());
        let groups = Groups::new(
            me.node_id,
            GroupSettings {
                snapshot_first: map.seeded || map.grows_into_replicas(),
                ..GroupSettings::new(partitions, map.groups)
            },
            wal.clone(),
            host.clone(),
            quic.clone(),
            {
                let control = control.clone();
                Arc::new(move |id| {
                    control
                        .map()
                        .members
                        .get(&id)
                        .map(|m| m.cluster_addr.clone())
                })
            },
        );
        if map.is_replicated() {
            // Growing into replicas, the node sets it once the groups form.
            let hook: Arc<dyn Replicate> = groups.clone();
            wal.set_replicate(&hook);
        }
        let leaders = Leaders::new(me.node_id, map.groups);
        (Replication { groups, leaders }, host)
    });
    let leaders = replication
        .as_ref()
        .map_or_else(|| Leaders::new(me.node_id, 0), |(r, _)| r.leaders.clone());
    let shop_cfg = ShopConfig {
        partitions,
        node_tag: config.node_tag(),
        payment_timeout: config.payment_timeout,
        auto_confirm_after: config.auto_confirm_after,
        reservation_grace: config.reservation_grace,
        refund_window: config.refund_window,
        idle_timeout: config.idle_timeout,
        max_active: config.max_active,
        max_entity_queue: config.entity_queue,
        start_fenced: true,
        replica_groups: if map.is_replicated() { map.groups } else { 0 },
        ..ShopConfig::default()
    };
    let router = ClusterRouter::new(&me, control.clone(), quic.clone(), leaders);
    let shop = Shop::start_routed(wal, shop_cfg, Arc::new(router.clone()))
        .await
        .context("starting the actors")?;
    let node = ClusterNode::new(
        me.clone(),
        shop.clone(),
        control.clone(),
        quic.clone(),
        SharedSecrets {
            jwt: jwt.clone(),
            payment: payment.clone(),
        },
        &router,
        replication.as_ref().map(|(r, _)| r.clone()),
    );
    if let Some((_, host)) = &replication {
        host.set(shop.clone());
    }
    dispatcher.set_node(node.clone());
    node.start();
    tracing::info!(node = %me.name, http = %local, cluster = %me.cluster_addr, data_dir = %config.data_dir.display(), durability = %config.durability, partitions, recovered_in = ?started.elapsed(), "shardmall is serving");
    // Tests and scripts read these lines to learn the bound ports.
    println!("cluster on {}", me.cluster_addr);
    println!("listening on http://{local}");

    let shutting_down = CancellationToken::new();
    let state = AppState::from(Edge {
        shop: shop.clone(),
        jwt: JwtKeys::new(jwt),
        payment_secret: Some(Arc::new(payment)),
        http_metrics: Default::default(),
        shutting_down: shutting_down.clone(),
        admission: Arc::new(tokio::sync::Semaphore::new(config.max_inflight)),
        limits: config.conn_limits,
        connections: Default::default(),
        cluster: node,
    });
    tokio::spawn(watch_signals(shutting_down.clone()));
    shardmall_http_edge::serve(listener, state, config.drain_timeout).await?;
    tracing::info!("stopped accepting; stopping actors and flushing the log");
    shop.shutdown().await;
    if let Some((r, _)) = &replication {
        r.groups.shutdown().await;
    }
    control.shutdown().await;
    quic.close().await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// The address others use to reach a socket bound at `bound`: `host` when given; when
/// the socket listens on every interface (0.0.0.0, ::), the machine's host name.
fn advertised(bound: std::net::SocketAddr, host: Option<&str>) -> String {
    let host = match host {
        Some(h) => h.to_owned(),
        None if bound.ip().is_unspecified() => {
            let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            if name.is_empty() {
                tracing::warn!(%bound, "listening on every interface and no --advertise-host: advertising 127.0.0.1, which other machines cannot reach");
                "127.0.0.1".to_owned()
            } else {
                name
            }
        }
        None => return bound.to_string(),
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", bound.port())
    } else {
        format!("{host}:{}", bound.port())
    }
}

/// Asks the member at `seed` to admit this node, retrying while the cluster elects a
/// leader or the seed starts.
async fn join(quic: &QuicTransport, seed: &str, me: &Member) -> anyhow::Result<Joined> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match ClusterNode::join(quic, seed, me).await {
            Ok(joined) => {
                tracing::info!(seed, epoch = joined.map.epoch, "joined the cluster");
                return Ok(joined);
            }
            Err(ClusterError::Unavailable(e)) if std::time::Instant::now() < deadline => {
                tracing::warn!(seed, error = %e, "joining; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("joining the cluster at {seed}: {e}"),
        }
    }
}

async fn watch_signals(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

#[cfg(test)]
mod advertise_tests {
    use super::advertised;

    #[test]
    fn advertised_addresses_are_reachable_names() {
        let bound = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(advertised(bound("127.0.0.1:7000"), None), "127.0.0.1:7000");
        assert_eq!(
            advertised(bound("0.0.0.0:7000"), Some("n2.shardmall.svc")),
            "n2.shardmall.svc:7000"
        );
        assert_eq!(
            advertised(bound("10.0.0.5:8080"), Some("fd00::5")),
            "[fd00::5]:8080"
        );
        let any = advertised(bound("0.0.0.0:7001"), None);
        assert!(
            any.ends_with(":7001") && !any.starts_with("0.0.0.0"),
            "{any}"
        );
    }
}
