//! The HTTP calls loadgen makes, with the outcome of each as the name it is counted by:
//! `ok` for the expected success, the API's error code otherwise (`sold_out`,
//! `overloaded`, ...), `http_<status>` for an answer without one, and `timeout` or
//! `transport_error` when no answer came.

use std::time::Duration;

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::Value;

#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
}

/// One answer: the outcome name and the JSON body (`Null` when there was none).
pub struct Answer {
    pub status: u16,
    pub outcome: String,
    pub body: Value,
}

impl Answer {
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }
}

impl Api {
    pub fn new(base: &str, pool: usize, timeout: Duration) -> anyhow::Result<Api> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(pool)
            .timeout(timeout)
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request; `expect` is the status that counts as `ok`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        idem: Option<&str>,
        body: Option<&Value>,
        expect: u16,
    ) -> Answer {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(k) = idem {
            req = req.header("idempotency-key", k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let outcome = if e.is_timeout() {
                    "timeout"
                } else {
                    "transport_error"
                };
                return Answer {
                    status: 0,
                    outcome: outcome.into(),
                    body: Value::Null,
                };
            }
        };
        let status = resp.status().as_u16();
        let body = match resp.bytes().await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
            Err(e) => {
                let outcome = if e.is_timeout() {
                    "timeout"
                } else {
                    "transport_error"
                };
                return Answer {
                    status,
                    outcome: outcome.into(),
                    body: Value::Null,
                };
            }
        };
        let outcome = if status == expect {
            "ok".to_owned()
        } else {
            body["error"]["code"]
                .as_str()
                .map_or_else(|| format!("http_{status}"), str::to_owned)
        };
        Answer {
            status,
            outcome,
            body,
        }
    }

    /// A setup or check call that must succeed: anything else stops the run with the
    /// node's own message.
    pub async fn must(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        expect: u16,
    ) -> anyhow::Result<Value> {
        let a = self
            .call(method.clone(), path, token, None, body, expect)
            .await;
        match a.outcome.as_str() {
            "ok" => Ok(a.body),
            "transport_error" | "timeout" => bail!(
                "cannot reach {}{path} ({}): is the node running at {}?",
                self.base,
                a.outcome,
                self.base
            ),
            _ => bail!("{method} {path} answered {}: {}", a.status, a.body),
        }
    }
}
