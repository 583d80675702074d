//! The HTTP calls loadgen makes, with the outcome of each as the name it is counted by:
//! `ok` for the expected success, the API's error code otherwise (`sold_out`,
//! `overloaded`, ...), `http_<status>` for an answer without one, and `timeout` or
//! `transport_error` when no answer came.
//!
//! Hot path: one shared keep-alive client; bodies are kept as raw bytes and parsed only
//! by the callers that need a field, and outcome names are static strings for every code
//! the API documents, so a request allocates little beyond what reqwest does.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::{IntoUrl, Method, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    /// The first target: every URL is built on it.
    base: String,
    /// Every target (`--target` takes a comma-separated list, e.g. every node of a
    /// cluster); requests to `base` are spread over them in turn.
    targets: std::sync::Arc<[Url]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// One answer.
pub struct Answer {
    /// 0 when no answer came.
    pub status: u16,
    pub outcome: Cow<'static, str>,
    pub body: Bytes,
    /// Why no answer came, for setup errors.
    pub error: Option<String>,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }

    /// The request may have taken effect without the run knowing: no answer, or a 5xx.
    pub fn uncertain(&self) -> bool {
        self.status == 0 || self.status >= 500
    }

    /// The body as `T`, if it is one.
    pub fn json<T: DeserializeOwned>(&self) -> Option<T> {
        serde_json::from_slice(&self.body).ok()
    }

    fn value(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The error codes the API documents, so counting them allocates nothing.
const CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "invalid_state",
    "version_conflict",
    "out_of_stock",
    "insufficient_stock",
    "idempotency_conflict",
    "already_exists",
    "payload_too_large",
    "amount_mismatch",
    "overloaded",
    "unavailable",
    "internal",
    "sold_out",
    "campaign_not_started",
    "campaign_ended",
    "limit_exceeded",
];

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: ErrorCode<'a>,
}

#[derive(Deserialize)]
struct ErrorCode<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
}

/// The outcome name of a non-success answer.
pub fn outcome_of(status: u16, body: &[u8]) -> Cow<'static, str> {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => match CODES.iter().find(|c| **c == e.error.code) {
            Some(c) => Cow::Borrowed(c),
            None => Cow::Owned(e.error.code.into_owned()),
        },
        Err(_) => Cow::Owned(format!("http_{status}")),
    }
}

/// The innermost cause of an error ("Connection refused (os error 111)"), which is what
/// an operator needs; reqwest's outer layers only say "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

pub fn json_bytes(v: &Value) -> Bytes {
    // Serializing a `Value` cannot fail: its map keys are strings.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

impl Api {
    /// `targets`: one base URL, or several separated by commas.
    pub fn new(targets: &str, pool: usize, timeout: Duration) -> anyhow::Result<Api> {
        let bases: Vec<&str> = targets
            .split(',')
            .map(|t| t.trim().trim_end_matches('/'))
            .filter(|t| !t.is_empty())
            .collect();
        let Some(base) = bases.first().copied() else {
            bail!("--target names no URL");
        };
        let parsed = bases
            .iter()
            .map(|b| Url::parse(b).with_context(|| format!("--target {b} is not a URL")))
            .collect::<anyhow::Result<Vec<Url>>>()?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(pool)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {}", root_cause(&e)))?;
        Ok(Api {
            client,
            base: base.to_owned(),
            targets: parsed.into(),
            next: Default::default(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `url` moved to the next target in turn, when there are several and it points at
    /// the first.
    fn spread(&self, url: Url) -> Url {
        if self.targets.len() < 2 || url.origin() != self.targets[0].origin() {
            return url;
        }
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.targets.len();
        let to = &self.targets[i];
        let mut url = url;
        // Same scheme, so setting host and port cannot fail.
        let _ = url.set_host(to.host_str());
        let _ = url.set_port(to.port_or_known_default());
        url
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A URL parsed once, for the hot paths (reqwest parses a string on every request).
    pub fn parsed(&self, path: &str) -> anyhow::Result<Url> {
        Url::parse(&self.url(path)).with_context(|| format!("{} is not a URL", self.url(path)))
    }

    /// Sends one request to `url` (see [`Api::url`] and [`Api::parsed`]); `expect` is the
    /// status that counts as `ok`.
    pub async fn call(
        &self,
        method: Method,
        url: impl IntoUrl,
        token: Option<&str>,
        idempotency_key: Option<&str>,
        body: Option<Bytes>,
        expect: u16,
    ) -> Answer {
        let url = match url.into_url() {
            Ok(u) => self.spread(u),
            Err(e) => {
                return Answer {
                    status: 0,
                    outcome: Cow::Borrowed("transport_error"),
                    body: Bytes::new(),
                    error: Some(root_cause(&e)),
                }
            }
        };
        let mut req = self.client.request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        if let Some(b) = body {
            req = req
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(b);
        }
        let no_answer = |e: reqwest::Error, status: u16| Answer {
            status,
            outcome: Cow::Borrowed(if e.is_timeout() {
                "timeout"
            } else {
                "transport_error"
            }),
            body: Bytes::new(),
            error: Some(root_cause(&e)),
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return no_answer(e, 0),
        };
        let status = resp.status().as_u16();
        let body = match resp.bytes().await {
            Ok(b) => b,
            // The status came but the body did not: count it as no answer.
            Err(e) => return no_answer(e, 0),
        };
        let outcome = if status == expect {
            Cow::Borrowed("ok")
        } else {
            outcome_of(status, &body)
        };
        Answer {
            status,
            outcome,
            body,
            error: None,
        }
    }

    /// A setup or check call that must succeed. `429 overloaded` and `503 unavailable`
    /// are retried after their `Retry-After` (a few times); anything else stops the run
    /// with the node's own message.
    pub async fn must(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let url = self.url(path);
        let body = body.map(json_bytes);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let a = self
                .call(method.clone(), &url, token, None, body.clone(), expect)
                .await;
            if a.ok() {
                return Ok(a.value());
            }
            if (a.status == 429 || a.status == 503) && attempt < 10 {
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                continue;
            }
            if let Some(e) = &a.error {
                bail!("cannot reach {url}: {e}");
            }
            let text = String::from_utf8_lossy(&a.body);
            let hint = if a.status == 401 {
                " (is the JWT secret the node's DATA_DIR/jwt.secret?)"
            } else {
                ""
            };
            bail!(
                "{method} {url} answered {} (expected {expect}): {}{hint}",
                a.status,
                text.trim()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_targets_take_requests_in_turn() {
        let api = Api::new(
            "http://127.0.0.1:8080, http://127.0.0.2:8081/",
            1,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(api.base(), "http://127.0.0.1:8080");
        let hosts: Vec<String> = (0..4)
            .map(|_| {
                let u = api.spread(api.parsed("/v1/skus/a?x=1").unwrap());
                format!(
                    "{}:{}{}?{}",
                    u.host_str().unwrap(),
                    u.port().unwrap(),
                    u.path(),
                    u.query().unwrap()
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                "127.0.0.1:8080/v1/skus/a?x=1",
                "127.0.0.2:8081/v1/skus/a?x=1",
                "127.0.0.1:8080/v1/skus/a?x=1",
                "127.0.0.2:8081/v1/skus/a?x=1"
            ]
        );
        // A URL elsewhere is left alone.
        let other = api.spread(Url::parse("http://example.invalid/x").unwrap());
        assert_eq!(other.host_str(), Some("example.invalid"));
        assert!(Api::new(" , ", 1, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn outcomes_are_the_api_error_codes() {
        let body = br#"{"error":{"code":"limit_exceeded","message":"the per-buyer limit is 1"}}"#;
        assert!(matches!(
            outcome_of(409, body),
            Cow::Borrowed("limit_exceeded")
        ));
        let body = br#"{"error":{"code":"brand_new","message":"m"}}"#;
        assert_eq!(outcome_of(409, body), "brand_new");
        assert_eq!(outcome_of(502, b"<html>bad gateway</html>"), "http_502");
        assert_eq!(outcome_of(500, b""), "http_500");
    }

    #[tokio::test]
    async fn an_unreachable_node_is_named_with_the_cause() {
        // Port 1 on loopback: nothing listens there.
        let api = Api::new("http://127.0.0.1:1/", 1, Duration::from_secs(2)).unwrap();
        let err = api
            .must(Method::GET, "/readyz", None, None, 200)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot reach http://127.0.0.1:1/readyz: "),
            "{err}"
        );
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
