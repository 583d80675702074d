//! Shared by the end-to-end tests: start a real `shardmall` process on port 0 and talk
//! to it over HTTP, the way a storefront would.
//!
//! - [`Node`] owns the child process (and, unless one is given, a temporary data dir).
//!   It learns its port from the single `listening on http://...` line on stdout and
//!   waits for `/readyz`. Dropping it kills the child; if the test is panicking, the tail
//!   of the node's stderr is printed to help read the failure.
//! - [`Api`] is a cheap clonable HTTP client bound to one node (a `Node` derefs to it),
//!   with JSON helpers answering `(status, body)` and domain helpers (products, stock,
//!   checkout, pay).
//! - Tokens are signed here with [`JWT_SECRET`], the secret every node is started with.
//!
//! Every wait is a poll with a deadline; nothing sleeps a fixed time hoping for the best.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use shardmall_http_edge::{Claims, JwtKeys, Role};

pub use reqwest::header::HeaderMap;

/// The `shardmall` binary these tests start, built by the first call in this process.
///
/// The binary is built with the tests' profile (`cargo test --release` starts a release
/// build), target triple and target directory, by the same `cargo` that runs the tests,
/// and its path is the one cargo reports; an up-to-date binary costs one no-op
/// `cargo build`. A build that fails stops every test with cargo's own message.
pub fn shardmall_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // <target dir>[/<triple>]/<profile>/deps/<test binary>
        let exe = std::env::current_exe().expect("the test binary's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lies in <target dir>/<profile>/deps");
        let mut target_dir = profile_dir.parent().expect("<target dir>/<profile>");
        let mut triple = None;
        // Cargo tags the root of a target directory; a directory between it and the
        // profile's is a cross-compilation triple.
        if !target_dir.join("CACHEDIR.TAG").exists() {
            if let Some(root) = target_dir
                .parent()
                .filter(|r| r.join("CACHEDIR.TAG").exists())
            {
                triple = target_dir.file_name().map(|t| t.to_os_string());
                target_dir = root;
            }
        }
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(name) => name,
        };
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", "shardmall", "--bin", "shardmall"])
            .args(["--message-format", "json-render-diagnostics"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit());
        if let Some(triple) = &triple {
            build.arg("--target").arg(triple);
        }
        let out = build
            .output()
            .expect("run cargo to build the shardmall binary");
        assert!(
            out.status.success(),
            "building the shardmall binary failed: {}",
            out.status
        );
        // The last artifact message for the binary names its executable.
        let bin = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "shardmall")
            .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
            .next()
            .expect("cargo reported no shardmall executable");
        assert!(bin.is_file(), "cargo built no binary at {}", bin.display());
        bin
    })
}

/// The JWT secret every test node is started with (`SHARDMALL_JWT_SECRET`).
pub const JWT_SECRET: &str = "e2e-jwt-secret-do-not-use-in-production";
/// The payment-callback secret every test node is started with.
pub const PAYMENT_SECRET: &str = "e2e-payment-secret-do-not-use-in-production";

/// How long a node may take to print its address, and then to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful stop may take before the test calls it a hang.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request limit, so that no test can hang on a stuck server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start a node. `Node::start()` is `NodeConfig::default().start()`.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// Data dir to use (for restarts); a fresh temporary one when `None`.
    pub data_dir: Option<PathBuf>,
    /// Extra `serve` arguments, e.g. `["--payment-timeout", "2s"]`.
    pub args: Vec<String>,
    /// Extra environment for the child.
    pub env: Vec<(String, String)>,
    /// Do not set `SHARDMALL_JWT_SECRET` (the node then creates `DIR/jwt.secret`).
    pub no_jwt_secret: bool,
}

impl NodeConfig {
    pub fn dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn without_jwt_secret(mut self) -> Self {
        self.no_jwt_secret = true;
        self
    }

    pub async fn start(self) -> Node {
        let node = self.spawn();
        node.wait_ready().await;
        node
    }

    /// Starts the process and learns its address, without waiting for readiness.
    pub fn spawn(self) -> Node {
        self.launch(true)
    }

    /// Starts a process that is expected to fail before it serves: no address is awaited.
    pub fn spawn_expecting_failure(self) -> Node {
        self.launch(false)
    }

    fn launch(self, await_address: bool) -> Node {
        let tmp = match &self.data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("create a temporary data dir")),
        };
        let data_dir = match (&self.data_dir, &tmp) {
            (Some(d), _) => d.clone(),
            (None, Some(t)) => t.path().to_path_buf(),
            (None, None) => unreachable!("a temporary dir exists when none was given"),
        };
        // The log lives outside the data dir: the node owns that directory.
        let log_dir = tempfile::tempdir().expect("create a log dir");
        let log_path = log_dir.path().join("stderr.log");
        let log = std::fs::File::create(&log_path).expect("create the stderr log");

        let mut cmd = Command::new(shardmall_bin());
        cmd.arg("serve").arg("--data-dir").arg(&data_dir);
        // Free ports unless the test pins them (a restart keeps its addresses).
        if !self.args.iter().any(|a| a == "--http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        if !self.args.iter().any(|a| a == "--cluster-addr") {
            cmd.args(["--cluster-addr", "127.0.0.1:0"]);
        }
        cmd.args(&self.args)
            .env("SHARDMALL_PAYMENT_SECRET", PAYMENT_SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // A test process may itself run with these set; the child must not inherit them.
        cmd.env_remove("SHARDMALL_JWT_SECRET")
            .env_remove("SHARDMALL_DATA_DIR")
            .env_remove("SHARDMALL_HTTP")
            .env_remove("SHARDMALL_CLUSTER_ADDR")
            .env_remove("SHARDMALL_JOIN")
            .env_remove("SHARDMALL_NODE_ID")
            .env_remove("SHARDMALL_CLUSTER_SECRET");
        if !self.no_jwt_secret {
            cmd.env("SHARDMALL_JWT_SECRET", JWT_SECRET);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the shardmall binary");

        // Read stdout on a thread so that the wait for the address has a deadline, and
        // keep draining it afterwards so the child can never block on a full pipe.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel::<String>();
        let (cluster_tx, cluster_rx) = mpsc::channel::<String>();
        // Whatever else the node prints on stdout is kept beside its stderr.
        let mut out_log = std::fs::File::create(log_dir.path().join("stdout.log"))
            .expect("create the stdout log");
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let mut sent = false;
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let _ = out_log.write_all(line.as_bytes());
                        if let Some(addr) = line.trim().strip_prefix("cluster on ") {
                            let _ = cluster_tx.send(addr.to_string());
                        }
                        if !sent && line.starts_with("listening on ") {
                            let _ = tx.send(line.trim().to_string());
                            sent = true;
                        }
                    }
                }
            }
        });

        let mut node = Node {
            child,
            exited: false,
            api: Api::new("http://unknown"),
            cluster_addr: String::new(),
            data_dir,
            log_path,
            _tmp: tmp,
            _log_dir: log_dir,
        };
        if !await_address {
            return node;
        }
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => {
                let base = line
                    .strip_prefix("listening on ")
                    .expect("checked prefix")
                    .trim_end_matches('/')
                    .to_string();
                assert!(
                    base.starts_with("http://127.0.0.1:"),
                    "unexpected listening line {line:?}"
                );
                node.api = Api::new(&base);
                node.cluster_addr = cluster_rx
                    .recv_timeout(Duration::from_secs(1))
                    .expect("the node prints `cluster on ...` before `listening on ...`");
                node
            }
            Err(e) => {
                let _ = node.child.kill();
                let _ = node.child.wait();
                panic!(
                    "node did not print `listening on ...` within {START_TIMEOUT:?} ({e}); stderr:\n{}",
                    node.log_tail(80)
                );
            }
        }
    }
}

/// A running `shardmall serve` child process.
pub struct Node {
    child: Child,
    exited: bool,
    api: Api,
    /// The address other nodes reach this one at (`--cluster-addr`, port resolved).
    pub cluster_addr: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    _log_dir: tempfile::TempDir,
}

impl Deref for Node {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Node {
    /// A node on a fresh temporary data dir with default settings.
    pub async fn start() -> Node {
        NodeConfig::default().start().await
    }

    pub fn config() -> NodeConfig {
        NodeConfig::default()
    }

    pub fn api(&self) -> Api {
        self.api.clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.api.client.get(self.api.url("/readyz")).send().await {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "node at {} not ready within {READY_TIMEOUT:?}; stderr:\n{}",
                    self.api.base,
                    self.log_tail(80)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: the process gets no chance to flush anything.
    pub fn kill9(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.exited = true;
        }
    }

    /// The exit status, if the process has exited by itself.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let st = self.child.try_wait().ok().flatten();
        if st.is_some() {
            self.exited = true;
        }
        st
    }

    /// SIGTERM, then wait (bounded) for a graceful exit.
    pub async fn stop(&mut self) -> ExitStatus {
        assert!(!self.exited, "node already stopped");
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM failed: {status}");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait on the child") {
                self.exited = true;
                return st;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!(
                    "node did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.log_tail(80)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last `lines` lines of the node's stderr and of its stdout.
    pub fn log_tail(&self, lines: usize) -> String {
        let stdout = self.log_path.with_file_name("stdout.log");
        format!(
            "[stderr]\n{}\n[stdout]\n{}",
            file_tail(&self.log_path, lines),
            file_tail(&stdout, lines)
        )
    }
}

fn file_tail(path: &Path, lines: usize) -> String {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(no log: {e})"),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(from));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- shardmall node {} stderr (tail) ----\n{}\n---- end ----",
                self.api.base,
                self.log_tail(60)
            );
        }
        self.kill9();
    }
}

/// `(status, JSON body)`; a body that is not JSON becomes a JSON string, an empty body
/// `null`.
pub type Resp = (u16, Value);

/// A full answer, for the tests that look at headers.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

/// An HTTP client bound to one node.
#[derive(Clone, Debug)]
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("build an HTTP client");
        Api {
            base: base.to_string(),
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends any request; panics only if the node cannot be reached.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> RawResp {
        match self.try_raw(method.clone(), path, headers, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: request failed: {e}"),
        }
    }

    /// Like [`Api::raw`] but hands transport errors back (crash tests expect them).
    pub async fn try_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<RawResp, reqwest::Error> {
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(RawResp {
            status,
            headers,
            body,
        })
    }

    /// Sends one HTTP/1.1 request over a bare socket, writing the body while reading the
    /// answer, the way curl does: a server may answer (413) before the body is sent,
    /// and a client that only reads after writing would see a reset instead.
    pub async fn http1_early_answer(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> std::io::Result<Resp> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.base.trim_start_matches("http://").to_string();
        let stream = tokio::net::TcpStream::connect(&addr).await?;
        let (mut rd, mut wr) = stream.into_split();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let writer = tokio::spawn(async move {
            // A write error is expected once the server has answered and closed.
            if wr.write_all(head.as_bytes()).await.is_ok() {
                let _ = wr.write_all(&body).await;
            }
        });
        let mut buf = Vec::new();
        let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut chunk = [0u8; 8192];
            loop {
                match rd.read(&mut chunk).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    // A reset after the answer arrived still leaves the answer.
                    Err(e) if !buf.is_empty() => {
                        let _ = e;
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        writer.abort();
        match read {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer in time",
                ))
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not an HTTP answer: {:?}", &text[..text.len().min(200)]),
                )
            })?;
        let payload = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json = match (payload.find('{'), payload.rfind('}')) {
            (Some(a), Some(b)) if a < b => serde_json::from_str(&payload[a..=b])
                .unwrap_or_else(|_| Value::String(payload.to_string())),
            _ => Value::String(payload.to_string()),
        };
        Ok((status, json))
    }

    /// A JSON request with an optional bearer token, idempotency key and body.
    pub async fn try_call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idem: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Resp, reqwest::Error> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &auth {
            headers.push(("authorization", a));
        }
        if let Some(k) = idem {
            headers.push(("idempotency-key", k));
        }
        let bytes = body.map(|b| serde_json::to_vec(b).expect("serialize a JSON body"));
        if bytes.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let r = self.try_raw(method, path, &headers, bytes).await?;
        Ok((r.status, r.body))
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idem: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        match self.try_call(method.clone(), path, token, idem, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: request failed: {e}"),
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        self.call(Method::GET, path, token, None, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.call(Method::POST, path, Some(token), None, Some(body))
            .await
    }

    pub async fn post_idem(&self, path: &str, token: &str, key: &str, body: &Value) -> Resp {
        self.call(Method::POST, path, Some(token), Some(key), Some(body))
            .await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.call(Method::PUT, path, Some(token), None, Some(body))
            .await
    }

    pub async fn patch(&self, path: &str, token: &str, body: &Value) -> Resp {
        self.call(Method::PATCH, path, Some(token), None, Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.call(Method::DELETE, path, Some(token), None, None)
            .await
    }

    // ---- domain helpers ------------------------------------------------------------

    /// `POST /v1/products` with the given SKUs `(sku_id, price in fen, stock)`; asserts 201.
    #[track_caller]
    pub fn create_product<'a>(
        &'a self,
        admin: &'a str,
        product_id: &'a str,
        skus: &'a [(&'a str, i64, i64)],
    ) -> impl std::future::Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let body = product_body(product_id, skus);
            let (st, v) = self.post("/v1/products", admin, &body).await;
            assert_eq!(st, 201, "create product {product_id} (at {caller}): {v}");
            v
        }
    }

    /// A product `product_id` with `n` SKUs `{product_id}-s{i}`, all at `price` and
    /// `stock`; answers the SKU ids.
    pub async fn product_with_skus(
        &self,
        admin: &str,
        product_id: &str,
        n: usize,
        price: i64,
        stock: i64,
    ) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{product_id}-s{i}")).collect();
        let skus: Vec<(&str, i64, i64)> = ids.iter().map(|s| (s.as_str(), price, stock)).collect();
        self.create_product(admin, product_id, &skus).await;
        ids
    }

    /// `GET /v1/skus/{sku}`; panics unless 200.
    pub async fn sku(&self, sku: &str) -> Value {
        let (st, v) = self.get(&format!("/v1/skus/{sku}"), None).await;
        assert_eq!(st, 200, "GET /v1/skus/{sku}: {v}");
        v
    }

    /// The SKU's stock figures.
    pub async fn stock(&self, sku: &str) -> Stock {
        Stock::of(&self.sku(sku).await)
    }

    /// `POST /v1/orders` with explicit lines.
    pub async fn checkout(&self, token: &str, items: &[(&str, i64)], key: &str) -> Resp {
        self.post_idem("/v1/orders", token, key, &order_body(items))
            .await
    }

    /// Places an order with a fresh idempotency key; panics unless 201. Answers its id.
    pub async fn place(&self, token: &str, items: &[(&str, i64)], what: &str) -> String {
        let r = self.checkout(token, items, &key()).await;
        assert_status(&r, 201, what);
        order_id(&r.1)
    }

    /// `POST /v1/orders/{id}/pay` with the order's own total.
    pub async fn pay(&self, token: &str, order: &Value, key: &str) -> Resp {
        let id = order["order_id"].as_str().expect("order has an order_id");
        let body = json!({"method": "fake", "amount": order["total"].clone()});
        self.post_idem(&format!("/v1/orders/{id}/pay"), token, key, &body)
            .await
    }

    /// `GET /v1/orders/{id}` as `token`; panics unless 200.
    pub async fn order(&self, token: &str, id: &str) -> Value {
        let (st, v) = self.get(&format!("/v1/orders/{id}"), Some(token)).await;
        assert_eq!(st, 200, "GET /v1/orders/{id}: {v}");
        v
    }

    /// The whole `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = self.raw(Method::GET, "/metrics", &[], None).await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        match r.body {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }

    /// Polls `check` (bounded by `timeout`) until it answers `Some`.
    pub async fn poll<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        poll_until(what, timeout, &mut check).await
    }
}

/// Polls `check` every 50 ms until it answers `Some`, or panics after `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A SKU's stock figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stock {
    pub available: i64,
    pub reserved: i64,
    pub sold: i64,
}

impl Stock {
    #[track_caller]
    pub fn of(sku: &Value) -> Stock {
        let f = |k: &str| {
            sku["stock"][k]
                .as_i64()
                .unwrap_or_else(|| panic!("sku stock.{k} is not an integer: {sku}"))
        };
        Stock {
            available: f("available"),
            reserved: f("reserved"),
            sold: f("sold"),
        }
    }

    pub fn total(&self) -> i64 {
        self.available + self.reserved + self.sold
    }

    pub const fn new(available: i64, reserved: i64, sold: i64) -> Stock {
        Stock {
            available,
            reserved,
            sold,
        }
    }
}

// ---- request bodies ------------------------------------------------------------------

pub fn money(amount: i64) -> Value {
    json!({"amount": amount, "currency": "CNY"})
}

pub fn address() -> Value {
    json!({
        "name": "Li Lei",
        "phone": "+86 138 0000 0000",
        "line1": "1 Test Road",
        "city": "Hangzhou",
        "country": "CN"
    })
}

pub fn product_body(product_id: &str, skus: &[(&str, i64, i64)]) -> Value {
    let skus: Vec<Value> = skus
        .iter()
        .map(|(id, price, stock)| {
            json!({
                "sku_id": id,
                "name": format!("{id} name"),
                "specs": {"color": "black", "size": "M"},
                "price": money(*price),
                "stock": stock,
            })
        })
        .collect();
    json!({
        "product_id": product_id,
        "title": format!("{product_id} title"),
        "category": "e2e",
        "brand": "acme",
        "description": "made by the end-to-end tests",
        "skus": skus,
    })
}

pub fn order_body(items: &[(&str, i64)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, q)| json!({"sku_id": sku, "quantity": q}))
        .collect();
    json!({"items": items, "shipping_address": address()})
}

pub fn cart_order_body() -> Value {
    json!({"from_cart": true, "shipping_address": address()})
}

// ---- tokens, keys, signatures ---------------------------------------------------------

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

pub fn token_signed(secret: &[u8], role: Role, sub: &str, exp: u64) -> String {
    JwtKeys::new(secret.to_vec()).sign(&Claims::new(sub, role, now_secs().min(exp), exp))
}

/// A token valid for an hour, signed with the nodes' secret.
pub fn token(role: Role, sub: &str) -> String {
    token_signed(JWT_SECRET.as_bytes(), role, sub, now_secs() + 3600)
}

pub fn customer(sub: &str) -> String {
    token(Role::Customer, sub)
}

pub fn admin() -> String {
    token(Role::Admin, "e2e-admin")
}

pub fn operator() -> String {
    token(Role::Operator, "e2e-operator")
}

/// A fresh idempotency key, unique within this test process.
pub fn key() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!(
        "k-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `hex(HMAC-SHA256(body, secret))`, the payment callback's `X-Signature`.
pub fn sign_callback(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

// ---- assertions ------------------------------------------------------------------------

/// Asserts a 2xx answer.
#[track_caller]
pub fn assert_ok(r: &Resp, what: &str) {
    assert!(
        (200..300).contains(&r.0),
        "{what}: expected 2xx, got {} {}",
        r.0,
        r.1
    );
}

/// Asserts the exact status.
#[track_caller]
pub fn assert_status(r: &Resp, status: u16, what: &str) {
    assert_eq!(
        r.0, status,
        "{what}: expected {status}, got {} {}",
        r.0, r.1
    );
}

/// Asserts the JSON error shape `{"error":{"code","message"}}` (any code).
#[track_caller]
pub fn assert_error_shape(body: &Value, what: &str) {
    let err = &body["error"];
    assert!(
        err["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: body lacks error.code: {body}"
    );
    assert!(
        err["message"].is_string(),
        "{what}: body lacks error.message: {body}"
    );
}

/// Asserts the status and the error code, in the JSON error shape.
#[track_caller]
pub fn assert_error(r: &Resp, status: u16, code: &str, what: &str) {
    assert_eq!(
        r.0, status,
        "{what}: expected {status} {code}, got {} {}",
        r.0, r.1
    );
    assert_error_shape(&r.1, what);
    assert_eq!(
        r.1["error"]["code"], code,
        "{what}: expected code {code}, got {}",
        r.1
    );
}

/// Asserts any 4xx in the JSON error shape.
#[track_caller]
pub fn assert_client_error(r: &Resp, what: &str) {
    assert!(
        (400..500).contains(&r.0),
        "{what}: expected a 4xx, got {} {}",
        r.0,
        r.1
    );
    assert_error_shape(&r.1, what);
}

/// Asserts a SKU's stock figures.
#[track_caller]
pub fn assert_stock(got: Stock, want: Stock, what: &str) {
    assert_eq!(got, want, "{what}: stock (available, reserved, sold)");
}

/// The `order_id` of an order body.
#[track_caller]
pub fn order_id(order: &Value) -> String {
    order["order_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no order_id in {order}"))
        .to_string()
}

/// The summed value of a metric (all label sets) in Prometheus text, if present.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Exactly this metric: the name is followed by labels or a space.
        let rest = if let Some(labels) = rest.strip_prefix('{') {
            match labels.rfind('}') {
                Some(end) => &labels[end + 1..],
                None => continue,
            }
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        // `value [timestamp]`
        if let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
