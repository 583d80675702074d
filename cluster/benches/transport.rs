//! Round trips of one small frame between two nodes' transports on loopback: the QUIC
//! transport as nodes use it (a stream per call, as consensus messages go, and batched,
//! as entity commands go), and the in-memory one (encoding and task hand-offs only)
//! for comparison. `cargo bench -p shardmall-cluster --bench transport`
//! (`TRANSPORT_BENCH_CALLS`, default 20,000 per row).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardmall_cluster::memory::MemoryNet;
use shardmall_cluster::quic::{QuicConfig, QuicTransport, TlsIdentity};
use shardmall_cluster::{BoxFuture, Service, Transport};

/// Answers with a frame as large as the question.
struct Echo;

impl Service for Echo {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        Box::pin(async move { frame })
    }
}

const FRAME: usize = 100;

/// How the rows call: a stream per call, or as entity commands (batched per peer).
#[derive(Clone, Copy)]
enum Way {
    Alone,
    Batched,
}

async fn call(caller: &dyn Transport, to: &str, way: Way) {
    let frame = vec![7; FRAME];
    match way {
        Way::Alone => caller.call(to, frame).await,
        Way::Batched => caller.call_batched(to, frame, None).await,
    }
    .expect("call");
}

async fn run(
    name: &str,
    caller: Arc<dyn Transport>,
    to: &str,
    way: Way,
    callers: usize,
    calls: usize,
) {
    // Warm up: connections made, caches hot.
    for _ in 0..200 {
        call(&*caller, to, way).await;
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (caller, to) = (caller.clone(), to.to_owned());
        tasks.spawn(async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
                .expect("histogram bounds");
            for _ in 0..calls / callers {
                let t = Instant::now();
                call(&*caller, &to, way).await;
                hist.saturating_record(t.elapsed().as_micros() as u64);
            }
            hist
        });
    }
    let mut all = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)
        .expect("histogram bounds");
    while let Some(h) = tasks.join_next().await {
        all.add(h.expect("caller task")).expect("same bounds");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "| {name} | {callers} | {:.0} | {} | {} |",
        all.len() as f64 / secs,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99)
    );
}

fn main() {
    let calls: usize = std::env::var("TRANSPORT_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("| transport | concurrent callers | round trips/s | p50 µs | p99 µs |");
        println!("|---|---|---|---|---|");
        let dirs = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let secret = b"transport-bench-secret".to_vec();
        let bind = |dir: std::path::PathBuf, service: Arc<dyn Service>| {
            let secret = secret.clone();
            async move {
                QuicTransport::bind(
                    "127.0.0.1:0".parse().expect("address"),
                    TlsIdentity::load_or_create(&dir).expect("identity"),
                    secret,
                    service,
                    QuicConfig::default(),
                )
                .await
                .expect("bind")
            }
        };
        let server = bind(dirs.0.path().to_path_buf(), Arc::new(Echo)).await;
        let client = bind(dirs.1.path().to_path_buf(), Arc::new(Echo)).await;
        let to = server.local_addr().to_string();
        for (name, way) in [
            ("QUIC (loopback), a stream per call", Way::Alone),
            ("QUIC (loopback), batched (entity commands)", Way::Batched),
        ] {
            for callers in [1, 64] {
                run(name, client.clone(), &to, way, callers, calls).await;
            }
        }
        let net = MemoryNet::new();
        net.register("server", Arc::new(Echo));
        let mem: Arc<dyn Transport> = Arc::new(net.endpoint("client"));
        for callers in [1, 64] {
            run(
                "in memory",
                mem.clone(),
                "server",
                Way::Alone,
                callers,
                calls,
            )
            .await;
        }
        client.close().await;
        server.close().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    });
}
