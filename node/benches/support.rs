//! Shared by the HTTP benchmarks: start a real `shardmall` node and talk to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardmall_http_edge::{Claims, JwtKeys, Role};

pub const SECRET: &str = "bench-secret-of-at-least-thirty-two-bytes";

pub struct Node {
    pub child: Child,
    pub base: String,
}

impl Node {
    pub fn start(dir: &Path, extra: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardmall"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http", "127.0.0.1:0", "--cluster-addr", "127.0.0.1:0"])
            .args(extra)
            .env("SHARDMALL_JWT_SECRET", SECRET)
            .env("SHARDMALL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start shardmall");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stdout = BufReader::new(stdout);
        // The node prints its cluster address, then its HTTP address.
        let base = loop {
            let mut line = String::new();
            let n = stdout
                .read_line(&mut line)
                .expect("read the node's start-up lines");
            assert!(n > 0, "the node exited before listening");
            if let Some(base) = line.trim().strip_prefix("listening on ") {
                break base.to_owned();
            }
        };
        Node { child, base }
    }

    pub async fn wait_ready(&self, client: &reqwest::Client) -> Duration {
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return start.elapsed();
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "node never became ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn token(role: Role, sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    JwtKeys::new(SECRET.as_bytes().to_vec()).sign(&Claims::new(sub, role, now, now + 3600))
}

/// Resident memory of a process, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
