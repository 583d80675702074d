//! Slow and greedy clients (API.md, operations): connections that dribble their headers
//! or body are closed or answered 408 within the configured timeouts, a client address
//! cannot hold more than its share of connections, and ordinary requests keep working
//! meanwhile.

use std::time::{Duration, Instant};

use shardmall_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection or `limit` passes; answers what arrived
/// and whether the server closed it.
async fn read_until_closed(conn: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connections_are_cut_and_ordinary_requests_still_succeed() {
    let node = Node::config()
        .env("SHARDMALL_HEADER_READ_TIMEOUT", "3s")
        .env("SHARDMALL_BODY_READ_TIMEOUT", "1s")
        .env("SHARDMALL_MAX_CONNECTIONS_PER_IP", "300")
        .start()
        .await;
    let addr = node.base.trim_start_matches("http://").to_owned();
    let admin = admin();
    let (st, body) = node
        .post(
            "/v1/products",
            &admin,
            &product_body("p", &[("p-s", 100, 10)]),
        )
        .await;
    assert_eq!(st, 201, "{body}");

    // 250 connections that never finish their headers.
    let mut slow = Vec::new();
    for _ in 0..250 {
        let mut c = TcpStream::connect(&addr).await.expect("connect");
        c.write_all(b"GET /v1/skus/p-s HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("a partial head");
        slow.push(c);
    }
    // Past the per-address cap (300), a connection is closed at once; below it, it is
    // served.
    let mut extra = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let mut c = TcpStream::connect(&addr).await.expect("connect");
        extra.spawn(async move {
            let _ = c
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            let (answer, closed) = read_until_closed(&mut c, Duration::from_millis(500)).await;
            (answer, closed)
        });
    }
    let (mut refused, mut served) = (0, 0);
    while let Some(done) = extra.join_next().await {
        let (answer, closed) = done.expect("a client task");
        if closed && answer.is_empty() {
            refused += 1;
        } else if answer.starts_with("HTTP/1.1 200") {
            served += 1;
        }
    }
    assert!(
        refused > 0 && served > 0,
        "refused {refused}, served {served}"
    );
    // Ordinary requests are served meanwhile.
    for _ in 0..20 {
        let (st, body) = node.get("/v1/skus/p-s", Some(&admin)).await;
        assert_eq!(st, 200, "{body}");
    }

    // The slow ones are closed once the header timeout has passed.
    let started = Instant::now();
    for c in &mut slow {
        let (_, closed) = read_until_closed(c, Duration::from_secs(8)).await;
        assert!(closed, "a connection dribbling its headers was kept open");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    drop(slow);

    // A body that does not arrive in time is answered 408.
    let mut c = TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/products HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"product_id\""
    );
    c.write_all(head.as_bytes())
        .await
        .expect("head and part of the body");
    let (answer, _) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    let m = node.metrics().await;
    assert!(metric_sum(&m, "shardmall_http_connections_refused_total").is_some_and(|v| v > 0.0));
    let (st, _) = node.get("/healthz", None).await;
    assert_eq!(st, 200);
}
