//! Sends the load: closed loop (N clients, each sending its next request when the last
//! one is answered) or open loop (requests due on a fixed schedule, latency counted from
//! when each was due). Stops at the time or request bound, or at Ctrl-C; requests in
//! flight then finish (each within `--timeout`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::api::Api;
use crate::check::{Acked, Expected};
use crate::jwt::Tokens;
use crate::scenario::Scenario;
use crate::stats::{self, Stats};

/// The state every client shares. The std mutexes are held for a push or a `record`
/// only, never across an `.await`; on the default single-threaded runtime they are
/// never contended.
pub struct Run {
    pub api: Api,
    pub tokens: Tokens,
    pub scenario: Scenario,
    pub stop: AtomicBool,
    pub start: Instant,
    pub deadline: Option<Instant>,
    pub limit: Option<u64>,
    next: AtomicU64,
    pub stats: Mutex<Stats>,
    pub acked: Mutex<Vec<Acked>>,
    pub settled: Mutex<Vec<(String, Expected)>>,
    pub uncertain_units: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; counters and lists stay usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Run {
    pub fn new(
        api: Api,
        tokens: Tokens,
        scenario: Scenario,
        duration: Option<Duration>,
        limit: Option<u64>,
    ) -> Run {
        let start = Instant::now();
        Run {
            api,
            tokens,
            scenario,
            stop: AtomicBool::new(false),
            start,
            deadline: duration.map(|d| start + d),
            limit,
            next: AtomicU64::new(0),
            stats: Mutex::new(Stats::new(start)),
            acked: Mutex::new(Vec::new()),
            settled: Mutex::new(Vec::new()),
            uncertain_units: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    /// The acknowledged orders, with what the run's later pays and cancels imply.
    pub fn take_acked(&self) -> Vec<Acked> {
        let mut acked = std::mem::take(&mut *lock(&self.acked));
        let settled: std::collections::HashMap<String, Expected> =
            std::mem::take(&mut *lock(&self.settled))
                .into_iter()
                .collect();
        for a in &mut acked {
            if let Some(e) = settled.get(&a.order_id) {
                a.expected = *e;
            }
        }
        acked
    }

    /// Takes the next request number (closed loop), or `None` when the run is over.
    fn next_request(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match self.limit {
            Some(l) if i >= l => None,
            _ => Some(i),
        }
    }

    async fn one(&self, u: usize, i: u64, rng: &mut rand::rngs::StdRng, intended: Instant) {
        let step = self.scenario.step(&self.api, &self.tokens, u, i, rng).await;
        let done = Instant::now();
        self.stats().record(step.op, intended, done, &step.outcome);
        if let Some(a) = step.acked {
            lock(&self.acked).push(a);
        }
        if let Some(s) = step.settled {
            lock(&self.settled).push(s);
        }
        if step.uncertain_units > 0 {
            self.uncertain_units
                .fetch_add(step.uncertain_units, Ordering::Relaxed);
        }
    }
}

/// Sends the load and answers how long it took.
pub async fn drive(run: &Arc<Run>, concurrency: usize, rate: Option<f64>, seed: u64) -> Duration {
    match rate {
        None => closed_loop(run, concurrency, seed).await,
        Some(rate) => open_loop(run, rate, concurrency, seed).await,
    }
    run.start.elapsed()
}

async fn closed_loop(run: &Arc<Run>, clients: usize, seed: u64) {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let run = run.clone();
        set.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(c as u64));
            while let Some(i) = run.next_request() {
                run.one(c, i, &mut rng, Instant::now()).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Request `k` is due at `start + k / rate`; `workers` send them. A request waiting
/// for a free worker is late, and its latency counts from when it was due, so a node
/// that stalls cannot hide the queue it causes (coordinated omission). When the time
/// is up, requests that were due but never sent are counted as `unsent`, with the time
/// they had waited.
async fn open_loop(run: &Arc<Run>, rate: f64, workers: usize, seed: u64) {
    // Bounded: when every worker is busy the schedule waits here, and the lateness
    // shows in the latencies, not in a growing queue.
    let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Instant)>(workers);
    // An async mutex: a worker holds it while awaiting the next request (only that).
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (run, rx) = (run.clone(), rx.clone());
        set.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w as u64));
            loop {
                let next = rx.lock().await.recv().await;
                let Some((i, intended)) = next else { break };
                if run.stop.load(Ordering::Relaxed) {
                    break;
                }
                run.one(i as usize, i, &mut rng, intended).await;
            }
        });
    }
    let interval = 1.0 / rate;
    let due = |k: u64| run.start + Duration::from_secs_f64(interval * k as f64);
    let mut k: u64 = 0;
    loop {
        if run.stop.load(Ordering::Relaxed) || run.limit.is_some_and(|l| k >= l) {
            break;
        }
        let intended = due(k);
        if let Some(deadline) = run.deadline {
            if intended >= deadline {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                // Time is up: what is due and finds no free worker was never sent. It
                // counts as `unsent`, with the time it had waited.
                let mut full = false;
                while run.limit.is_none_or(|l| k < l) && due(k) < deadline {
                    if !full {
                        match tx.try_send((k, due(k))) {
                            Ok(()) => {
                                k += 1;
                                continue;
                            }
                            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => full = true,
                            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                        }
                    }
                    run.stats().record("unsent", due(k), now, "unsent");
                    k += 1;
                }
                break;
            }
        }
        tokio::time::sleep_until(intended.into()).await;
        if tx.send((k, intended)).await.is_err() {
            break;
        }
        k += 1;
    }
    drop(tx);
    while set.join_next().await.is_some() {}
}

/// Ctrl-C once: stop sending, finish what is in flight, check and report. Twice: quit
/// at once (exit 130).
pub fn on_ctrl_c(run: Arc<Run>) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!(
            "\ninterrupted: finishing requests in flight, then checking (Ctrl-C again to quit now)"
        );
        run.stop.store(true, Ordering::Relaxed);
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted twice: quitting without checks");
            std::process::exit(130);
        }
    });
}

/// One updating line on stderr, every 500 ms, until the task is aborted.
pub async fn progress(run: Arc<Run>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    let mut last = (Instant::now(), 0u64);
    loop {
        tick.tick().await;
        let done = run.stats().total();
        let now = Instant::now();
        let rate = done.saturating_sub(last.1) as f64 / stats::secs(now - last.0);
        last = (now, done);
        progress_line(&run, run.start.elapsed(), rate);
    }
}

/// The progress line: how far, how many, how fast.
pub fn progress_line(run: &Run, elapsed: Duration, rate: f64) {
    let (done, ok) = {
        let s = run.stats();
        (s.total(), s.ok())
    };
    let frac = match (run.deadline, run.limit) {
        (Some(d), _) => Some(elapsed.as_secs_f64() / stats::secs(d - run.start)),
        (None, Some(l)) => Some(done as f64 / l.max(1) as f64),
        (None, None) => None,
    };
    let bar = match frac {
        Some(f) => {
            let f = f.clamp(0.0, 1.0);
            let filled = (f * 20.0) as usize;
            format!(
                "[{}{}] {:>3.0}% ",
                "#".repeat(filled),
                ".".repeat(20 - filled),
                f * 100.0
            )
        }
        None => String::new(),
    };
    eprint!(
        "\r{bar}{:>6.1}s  {done} requests  {ok} ok  {} not ok  {rate:.0}/s   ",
        elapsed.as_secs_f64(),
        done - ok.min(done)
    );
}
