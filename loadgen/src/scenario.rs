//! What one request of a scenario is, and the reads shared by the checks: acknowledged
//! orders and SKU figures, a bounded number at a time.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use rand::rngs::StdRng;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::Api;
use crate::check::{Acked, Expected, SeenOrder, SeenSku};
use crate::flash::FlashSale;
use crate::jwt::Tokens;
use crate::mixed::Mixed;

/// What one request did, for the stats and the checks.
pub struct Step {
    pub op: &'static str,
    pub outcome: std::borrow::Cow<'static, str>,
    pub acked: Option<Acked>,
    /// An order the run then paid or cancelled: (order id, what to expect of it now).
    pub settled: Option<(String, Expected)>,
    /// Units a buy may have taken without the run knowing (no answer, or a 5xx).
    pub uncertain_units: u64,
}

pub enum Scenario {
    Flash(FlashSale),
    Mixed(Mixed),
}

impl Scenario {
    /// Request `i`, sent by client (or, in open loop, virtual user) `u`.
    pub async fn step(
        &self,
        api: &Api,
        tokens: &Tokens,
        u: usize,
        i: u64,
        rng: &mut StdRng,
    ) -> Step {
        match self {
            Scenario::Flash(f) => f.step(api, tokens, i).await,
            Scenario::Mixed(m) => m.step(api, u, i, rng).await,
        }
    }
}

pub fn address() -> Value {
    json!({"name": "Load Gen", "phone": "+1 555 0100", "line1": "1 Bench Road",
           "city": "Loopback", "country": "US"})
}

/// Runs `f` on every item, at most `width` at a time, and answers the results in any
/// order. Check-phase reads go through this so a large check never floods the node.
pub async fn bounded<I, T, F, Fut>(items: I, width: usize, f: F) -> Vec<T>
where
    I: IntoIterator,
    F: Fn(I::Item) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    for item in items {
        if set.len() >= width {
            if let Some(Ok(t)) = set.join_next().await {
                out.push(t);
            }
        }
        set.spawn(f(item));
    }
    while let Some(r) = set.join_next().await {
        if let Ok(t) = r {
            out.push(t);
        }
    }
    out
}

#[derive(Deserialize)]
struct OrderRead {
    status: String,
    buyer: String,
    campaign_id: Option<String>,
}

/// Reads back the acknowledged orders `which` (indexes into `acked`), each with its
/// buyer's token. `429`, `503` and no answer are retried a few times.
pub async fn read_orders(
    api: &Api,
    tokens: &Tokens,
    acked: &[Acked],
    which: &[usize],
) -> HashMap<String, SeenOrder> {
    let jobs = which.iter().map(|&k| {
        let a = &acked[k];
        (
            a.order_id.clone(),
            api.url(&format!("/v1/orders/{}", a.order_id)),
            tokens.customer(&a.buyer),
        )
    });
    let results = bounded(jobs, 32, |(id, url, token)| {
        let api = api.clone();
        async move {
            let mut attempt = 0;
            let seen = loop {
                attempt += 1;
                let a = api
                    .call(Method::GET, &url, Some(&token), None, None, 200)
                    .await;
                if a.ok() {
                    break match a.json::<OrderRead>() {
                        Some(o) => SeenOrder::Found {
                            status: o.status,
                            buyer: o.buyer,
                            campaign_id: o.campaign_id,
                        },
                        None => SeenOrder::Unreadable("200 without an order in it".into()),
                    };
                }
                if a.status == 404 {
                    break SeenOrder::Missing;
                }
                if (a.status == 0 || a.status == 429 || a.status == 503) && attempt < 5 {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    continue;
                }
                break SeenOrder::Unreadable(match &a.error {
                    Some(e) => format!("{} ({e})", a.outcome),
                    None => format!("{} {}", a.status, a.outcome),
                });
            };
            (id, seen)
        }
    })
    .await;
    results.into_iter().collect()
}

#[derive(Deserialize)]
struct SkuRead {
    stock: StockRead,
}

#[derive(Deserialize)]
struct StockRead {
    available: i64,
    reserved: i64,
    sold: i64,
}

/// Reads the stock figures of `skus`: (sku id, the total it must have, if known).
pub async fn read_skus(
    api: &Api,
    skus: Vec<(String, Option<i64>)>,
) -> anyhow::Result<Vec<SeenSku>> {
    let results = bounded(skus, 16, |(sku, total)| {
        let api = api.clone();
        async move {
            let v = api
                .must(Method::GET, &format!("/v1/skus/{sku}"), None, None, 200)
                .await?;
            let s: SkuRead = serde_json::from_value(v)
                .map_err(|e| anyhow::anyhow!("GET /v1/skus/{sku}: unexpected body: {e}"))?;
            Ok(SeenSku {
                sku_id: sku,
                available: s.stock.available,
                reserved: s.stock.reserved,
                sold: s.stock.sold,
                total,
            })
        }
    })
    .await;
    let mut skus = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    skus.sort_by(|a, b| a.sku_id.cmp(&b.sku_id));
    Ok(skus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_runs_everything_at_most_width_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let out = bounded(0..50u32, 4, |i| {
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                now.fetch_sub(1, Ordering::SeqCst);
                i
            }
        })
        .await;
        let mut out = out;
        out.sort_unstable();
        assert_eq!(out, (0..50).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 4);
    }
}
