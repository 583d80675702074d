//! The QUIC transport on loopback: calls, membership proofs, reconnects.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardmall_cluster::quic::{check_len, QuicConfig, QuicTransport, TlsIdentity, BATCH_FRAME};
use shardmall_cluster::transport::MAX_FRAME;
use shardmall_cluster::{BoxFuture, Service, Transport, TransportError};

/// Answers every frame with "echo:" + the frame, counting calls; a frame "huge" gets
/// an answer over the frame limit.
#[derive(Default)]
struct Echo(AtomicUsize);

impl Service for Echo {
    fn serve(&self, frame: Vec<u8>) -> BoxFuture<'static, Vec<u8>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if frame == b"huge" {
                // Zeroed pages are mapped lazily: this costs no real memory.
                return vec![0; MAX_FRAME + 1];
            }
            if frame == b"slow" {
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            let mut out = b"echo:".to_vec();
            out.extend_from_slice(&frame);
            out
        })
    }
}

const SECRET: &[u8] = b"a-cluster-secret-of-some-length";

fn quick() -> QuicConfig {
    QuicConfig {
        call_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_millis(700),
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_secs(1),
        ..QuicConfig::default()
    }
}

async fn node(
    addr: &str,
    secret: &[u8],
    service: Arc<Echo>,
) -> (Arc<QuicTransport>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let t = QuicTransport::bind(
        addr.parse().unwrap(),
        TlsIdentity::load_or_create(dir.path()).unwrap(),
        secret.to_vec(),
        service,
        quick(),
    )
    .await
    .expect("bind");
    (t, dir)
}

/// Binds again at `addr`, with the identity kept in `dir`, as a restarted node does.
/// The old endpoint's socket is released by a background task once its connections are
/// gone. That can take up to the idle timeout (3 s in [`quick`]): a connection attempt
/// the caller gave up while the port was dead can still reach the next endpoint there,
/// and quinn keeps the connection it makes until it idles out.
async fn rebind(addr: SocketAddr, dir: &std::path::Path) -> Arc<QuicTransport> {
    for _ in 0..250 {
        let bound = QuicTransport::bind(
            addr,
            TlsIdentity::load_or_create(dir).unwrap(),
            SECRET.to_vec(),
            Arc::new(Echo::default()),
            quick(),
        )
        .await;
        match bound {
            Ok(t) => return t,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("{addr} did not come free");
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the test finishes in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_travel_both_ways_large_and_concurrent() {
    bounded(async {
        let (a_svc, b_svc) = (Arc::new(Echo::default()), Arc::new(Echo::default()));
        let (a, _da) = node("127.0.0.1:0", SECRET, a_svc.clone()).await;
        let (b, _db) = node("127.0.0.1:0", SECRET, b_svc.clone()).await;
        let (a_addr, b_addr) = (a.local_addr().to_string(), b.local_addr().to_string());
        assert_eq!(a.call(&b_addr, b"hi".to_vec()).await.unwrap(), b"echo:hi");
        assert_eq!(b.call(&a_addr, b"yo".to_vec()).await.unwrap(), b"echo:yo");

        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let answer = a.call(&b_addr, big.clone()).await.unwrap();
        assert_eq!(&answer[5..], &big[..]);

        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let (a, to) = (a.clone(), b_addr.clone());
            calls.spawn(async move { (i, a.call(&to, i.to_be_bytes().to_vec()).await) });
        }
        while let Some(done) = calls.join_next().await {
            let (i, answer) = done.unwrap();
            assert_eq!(&answer.unwrap()[5..], &i.to_be_bytes());
        }
        assert_eq!(b_svc.0.load(Ordering::Relaxed), 202);
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_secret_is_refused_and_never_served() {
    bounded(async {
        let served = Arc::new(Echo::default());
        let (server, _d1) = node("127.0.0.1:0", SECRET, served.clone()).await;
        let (intruder, _d2) = node("127.0.0.1:0", b"another-secret-entirely", Arc::default()).await;
        let err = intruder
            .call(&server.local_addr().to_string(), b"steal".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(err.to_string().contains("secret"), "{err}");
        // Trying again changes nothing.
        let again = intruder
            .call(&server.local_addr().to_string(), b"steal".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(again, TransportError::Refused { .. }), "{again:?}");
        assert_eq!(served.0.load(Ordering::Relaxed), 0);
        // The server, calling the intruder, refuses it too.
        let err = server
            .call(&intruder.local_addr().to_string(), b"x".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_listening_is_unreachable_within_the_connect_timeout() {
    bounded(async {
        // A port that was just free: bind and drop a UDP socket.
        let free: SocketAddr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (a, _d) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        let started = std::time::Instant::now();
        let err = a.call(&free.to_string(), b"x".to_vec()).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Unreachable { .. } | TransportError::Timeout { .. }
            ),
            "{err:?}"
        );
        // Within the connect timeout (700 ms), with room for a slow machine.
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        let err = a.call("not an address", b"x".to_vec()).await.unwrap_err();
        assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_reached_again() {
    bounded(async {
        let (a, _da) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        let (b, db) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        let addr = b.local_addr();
        let to = addr.to_string();
        assert_eq!(a.call(&to, b"1".to_vec()).await.unwrap(), b"echo:1");

        // Restarted between two calls: the first call after it reconnects.
        b.close().await;
        drop(b);
        let b = rebind(addr, db.path()).await;
        assert_eq!(a.call(&to, b"2".to_vec()).await.unwrap(), b"echo:2");

        // Down for a while: calls fail meanwhile, and succeed once it is back.
        b.close().await;
        drop(b);
        let err = a.call(&to, b"3".to_vec()).await.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::Unreachable { .. } | TransportError::Timeout { .. }
            ),
            "{err:?}"
        );
        let b = rebind(addr, db.path()).await;
        assert_eq!(a.call(&to, b"4".to_vec()).await.unwrap(), b"echo:4");

        // Dropped without `close` (an error path): the port still comes free.
        drop(b);
        let b = rebind(addr, db.path()).await;
        assert_eq!(a.call(&to, b"5".to_vec()).await.unwrap(), b"echo:5");
        b.close().await;
        a.close().await;
    })
    .await;
}

#[test]
fn the_identity_is_made_once_and_its_key_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("not-yet-made");
    let first = TlsIdentity::load_or_create(&dir).unwrap();
    let crt = std::fs::read(dir.join("cluster.crt")).unwrap();
    let key = std::fs::read(dir.join("cluster.key")).unwrap();
    assert!(String::from_utf8_lossy(&crt).contains("BEGIN CERTIFICATE"));
    let second = TlsIdentity::load_or_create(&dir).unwrap();
    assert_eq!(second.cert_der(), first.cert_der());
    assert_eq!(std::fs::read(dir.join("cluster.crt")).unwrap(), crt);
    assert_eq!(std::fs::read(dir.join("cluster.key")).unwrap(), key);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("cluster.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::write(dir.join("cluster.key"), b"garbage").unwrap();
    let err = TlsIdentity::load_or_create(&dir).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_the_limit_are_refused() {
    assert!(check_len(MAX_FRAME).is_ok());
    assert!(matches!(
        check_len(MAX_FRAME + 1),
        Err(TransportError::Frame(_))
    ));
    bounded(async {
        let served = Arc::new(Echo::default());
        let (a, _da) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        let (b, _db) = node("127.0.0.1:0", SECRET, served.clone()).await;
        let to = b.local_addr().to_string();
        // A request over the limit never leaves (zeroed pages: no real memory).
        let err = a.call(&to, vec![0; MAX_FRAME + 1]).await.unwrap_err();
        assert!(matches!(err, TransportError::Frame(_)), "{err:?}");
        assert_eq!(served.0.load(Ordering::Relaxed), 0);
        // An answer over the limit is not sent; the caller learns why.
        let err = a.call(&to, b"huge".to_vec()).await.unwrap_err();
        assert!(matches!(err, TransportError::Frame(_)), "{err:?}");
        assert_eq!(served.0.load(Ordering::Relaxed), 1);
        // The connection is still good.
        assert_eq!(a.call(&to, b"ok".to_vec()).await.unwrap(), b"echo:ok");
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_calls_each_get_their_own_answer_and_none_waits_for_a_slow_one() {
    bounded(async {
        let served = Arc::new(Echo::default());
        let (a, _da) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        let (b, _db) = node("127.0.0.1:0", SECRET, served.clone()).await;
        let to = b.local_addr().to_string();

        // A slow command first: the ones after it are answered while it still runs.
        let slow = a.call_batched(&to, b"slow".to_vec(), Some(Duration::from_secs(20)));
        let slow = tokio::spawn(slow);
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..500u32 {
            let (a, to) = (a.clone(), to.clone());
            calls.spawn(async move {
                let answer = a.call_batched(&to, i.to_be_bytes().to_vec(), None).await;
                (i, answer)
            });
        }
        while let Some(done) = calls.join_next().await {
            let (i, answer) = done.unwrap();
            assert_eq!(&answer.unwrap()[5..], &i.to_be_bytes(), "call {i}");
        }
        assert!(!slow.is_finished(), "500 commands waited for a slow one");
        assert_eq!(slow.await.unwrap().unwrap(), b"echo:slow");

        // Larger than a batch takes: alone on its stream, answered all the same.
        let big = vec![7u8; BATCH_FRAME + 1];
        let answer = a.call_batched(&to, big.clone(), None).await.unwrap();
        assert_eq!(&answer[5..], &big[..]);
        // An answer over the limit fails its own call only.
        let err = a
            .call_batched(&to, b"huge".to_vec(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Frame(_)), "{err:?}");
        assert_eq!(
            a.call_batched(&to, b"ok".to_vec(), None).await.unwrap(),
            b"echo:ok"
        );
        // A deadline shorter than the command fails the call, not the transport.
        let err = a
            .call_batched(&to, b"slow".to_vec(), Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
        assert_eq!(
            a.call_batched(&to, b"still".to_vec(), None).await.unwrap(),
            b"echo:still"
        );
        assert_eq!(
            served.0.load(Ordering::Relaxed),
            1 + 500 + 1 + 1 + 1 + 1 + 1
        );
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_calls_to_nobody_fail_as_unreachable_not_by_their_deadline() {
    bounded(async {
        let (a, _da) = node("127.0.0.1:0", SECRET, Arc::default()).await;
        // A port nobody listens on.
        let nobody = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = nobody.local_addr().unwrap().to_string();
        drop(nobody);
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (a, to) = (a.clone(), to.clone());
            calls.spawn(async move {
                // The deadline is far past the connect timeout (700 ms in `quick`): the
                // batch reports the failed connection, it does not sit out the deadline.
                a.call_batched(&to, b"hi".to_vec(), Some(Duration::from_secs(20)))
                    .await
            });
        }
        while let Some(done) = calls.join_next().await {
            let err = done.unwrap().unwrap_err();
            assert!(matches!(err, TransportError::Unreachable { .. }), "{err:?}");
        }
        a.close().await;
    })
    .await;
}
