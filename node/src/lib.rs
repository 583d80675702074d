//! The `shardmall` binary's library: configuration (file, `SHARDMALL_*` environment,
//! flags), start-up (data dir, secrets, log, actors, HTTP edge), the shutdown order, and
//! the `token` subcommand.
//!
//! Shutdown order: stop accepting -> drain in-flight requests (bounded) -> stop the actors
//! -> flush the log.

pub mod cli;
pub mod config;
pub mod secrets;

use std::sync::Arc;

use anyhow::Context;
use shardmall_actors::{Shop, ShopConfig};
use shardmall_http_edge::routes::cluster::NodeIdentity;
use shardmall_http_edge::{AppState, Claims, JwtKeys, Role};
use shardmall_persistence::{Wal, WalConfig};
use tokio_util::sync::CancellationToken;

use cli::{Cli, Command};
use config::Config;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            if let Some(addr) = &args.join {
                anyhow::bail!("--join {addr}: this release runs a single node; joining a cluster is not supported yet");
            }
            let config = Config::load(&args)?;
            init_tracing(&config.log);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(config))
        }
        Command::Token(args) => {
            let config = Config::load(&cli::ServeArgs {
                config: args.serve.config.clone(),
                data_dir: args.serve.data_dir.clone(),
                ..Default::default()
            })?;
            let secret = secrets::jwt_secret(&config, false)?;
            let role = Role::parse(&args.role).with_context(|| {
                format!("unknown role {:?}: customer, admin or operator", args.role)
            })?;
            if !shardmall_http_edge::validate::is_id(&args.sub) {
                anyhow::bail!("--sub must match [A-Za-z0-9._-]{{1,64}}");
            }
            let ttl = humantime::parse_duration(&args.ttl)
                .with_context(|| format!("--ttl {:?}", args.ttl))?;
            let exp = shardmall_http_edge::extract::now_secs() + ttl.as_secs();
            println!(
                "{}",
                JwtKeys::new(secret).sign(&Claims {
                    sub: args.sub,
                    role,
                    exp
                })
            );
            Ok(())
        }
    }
}

fn init_tracing(default: &str) {
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
    let jwt = secrets::jwt_secret(&config, true)?;
    let payment = secrets::payment_secret(&config)?;

    let mut wal_cfg = WalConfig::new(config.data_dir.join("db"));
    wal_cfg.durability = config.durability;
    wal_cfg.cache_bytes = config.cache_mb * 1024 * 1024;
    let wal = Wal::open(wal_cfg).context("opening the log")?;
    let partitions = secrets::partition_count(&wal, config.partitions)?;
    let cluster_id = secrets::cluster_id(&wal)?;

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
        ..ShopConfig::default()
    };
    let started = std::time::Instant::now();
    let shop = Shop::start(wal, shop_cfg)
        .await
        .context("starting the actors")?;
    let listener = tokio::net::TcpListener::bind(&config.http)
        .await
        .with_context(|| format!("binding {}", config.http))?;
    let local = listener.local_addr()?;
    tracing::info!(http = %local, data_dir = %config.data_dir.display(), durability = %config.durability, partitions, recovered_in = ?started.elapsed(), "shardmall is serving");
    // Tests and scripts read this line to learn the bound port.
    println!("listening on http://{local}");

    let shutting_down = CancellationToken::new();
    let state = AppState {
        shop: shop.clone(),
        jwt: JwtKeys::new(jwt),
        payment_secret: Some(Arc::new(payment)),
        http_metrics: Default::default(),
        shutting_down: shutting_down.clone(),
        admission: Arc::new(tokio::sync::Semaphore::new(config.max_inflight)),
        identity: Arc::new(NodeIdentity {
            cluster_id,
            node_id: config.node_id.clone(),
            http_addr: local.to_string(),
            cluster_addr: config.cluster_addr.clone(),
        }),
    };
    tokio::spawn(watch_signals(shutting_down.clone()));
    shardmall_http_edge::serve(listener, state, config.drain_timeout).await?;
    tracing::info!("stopped accepting; stopping actors and flushing the log");
    shop.shutdown().await;
    tracing::info!("shutdown complete");
    Ok(())
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
