//! The edge's HTTP server: accepts connections within limits and serves each with hyper.
//!
//! `axum::serve` has no header-read timer and no connection cap: a few hundred clients
//! that open connections and send their headers a byte a minute would hold sockets,
//! memory and tasks without end. Here:
//! - a request's headers must arrive within `header_read_timeout`, and the same timer
//!   bounds the wait for the next request on a kept-alive connection (hyper starts it
//!   whenever it waits for a request head), so an idle connection is closed too;
//! - at most `max_connections` connections are open, and at most
//!   `max_connections_per_ip` from one client address; a connection past either is
//!   closed at once (counted in `shardmall_http_connections_refused_total`);
//! - a request body must arrive within `body_read_timeout` (408 otherwise), and the
//!   admission permit is taken only once it has (see `crate::EdgeService`).
//!
//! Shutdown stops accepting, lets every connection finish its request in flight and
//! closes it, for at most the drain period.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::AppState;

/// Limits on the edge's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request's headers (and the wait for the next request on a kept-alive
    /// connection) must arrive within this.
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this (408 otherwise).
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 16_384,
            max_connections_per_ip: 4_096,
        }
    }
}

/// Open connections, in total and by client address.
#[derive(Default)]
pub struct Connections {
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    open: AtomicU64,
    pub refused: AtomicU64,
}

impl Connections {
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for a connection from `ip`, or `None` past a limit.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Option<Slot> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = by_ip.get(&ip).copied().unwrap_or(0);
        if self.open.load(Ordering::Relaxed) as usize >= limits.max_connections
            || from_ip >= limits.max_connections_per_ip
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        by_ip.insert(ip, from_ip + 1);
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            conns: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; gives its place back when dropped.
struct Slot {
    conns: Arc<Connections>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_ip = self.conns.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_ip.remove(&self.ip);
            }
        }
        self.conns.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `state`'s routes on `listener` until the state's shutdown token is cancelled,
/// then drains for at most `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    drain: Duration,
) -> std::io::Result<()> {
    let shutdown = state.shutting_down.clone();
    let limits = state.limits;
    let conns = state.connections.clone();
    let app = crate::router(state);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of
                    // spinning; the connections that hold them close by themselves.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conns.admit(peer.ip(), &limits) else {
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => {
            tracing::warn!(?drain, "drain period over; dropping the requests still in flight");
        }
    }
    Ok(())
}
