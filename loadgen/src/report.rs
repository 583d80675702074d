//! What a run prints at the end (a table on stdout) and writes with `--report` (JSON):
//! both from the same [`Outcome`].

use std::fmt::Write;
use std::time::Duration;

use serde_json::{json, Value};

use crate::check::SeenCampaign;
use crate::stats::{percentiles, secs, Stats};

/// Everything a run found.
pub struct Outcome<'a> {
    pub scenario: &'static str,
    pub target: &'a str,
    pub started_at: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    pub concurrency: u64,
    pub rate: Option<f64>,
    pub elapsed: Duration,
    pub interrupted: bool,
    pub parameters: Value,
    pub durability: Option<String>,
    pub stats: &'a Stats,
    pub campaign: Option<&'a SeenCampaign>,
    pub acked_orders: usize,
    pub acked_units: u64,
    pub orders_read: usize,
    pub skus_checked: usize,
    pub uncertain_units: u64,
    pub checks: Vec<&'static str>,
    pub violations: &'a [String],
}

impl Outcome<'_> {
    fn mode_text(&self) -> String {
        match self.rate {
            Some(r) => format!(
                "open loop at {r} req/s, at most {} in flight (latency from the scheduled start)",
                self.concurrency
            ),
            None => format!("closed loop, {} clients", self.concurrency),
        }
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let s = self.stats;
        let t = secs(self.elapsed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "shardmall-loadgen {} against {}{}",
            self.scenario,
            self.target,
            self.durability
                .as_deref()
                .map(|d| format!(" (durability {d})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  {}, {:.1} s{}",
            self.mode_text(),
            t,
            if self.interrupted {
                ", stopped by Ctrl-C"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "  requests {} ({:.0}/s), ok {} ({:.0}/s)\n",
            s.total(),
            s.total() as f64 / t,
            s.ok(),
            s.ok() as f64 / t
        );
        let _ = writeln!(
            out,
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "requests", "ok", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let mut row = |name: &str, n: u64, ok: u64, h| {
            let p = percentiles(h);
            let _ = writeln!(
                out,
                "  {name:<10} {n:>9} {ok:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                p.p50, p.p90, p.p99, p.p999, p.max
            );
        };
        if s.by_op.len() > 1 {
            for (op, o) in &s.by_op {
                let ok = o.outcomes.get("ok").copied().unwrap_or(0);
                row(op, o.latency.len(), ok, &o.latency);
            }
        }
        row("all", s.total(), s.ok(), &s.overall);
        let _ = writeln!(out);
        let outcomes = |m: &std::collections::BTreeMap<String, u64>| {
            let mut v: Vec<_> = m.iter().collect();
            v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            v.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "  outcomes   {}", outcomes(&s.outcomes));
        if s.by_op.len() > 1 {
            for (op, o) in &s.by_op {
                if o.outcomes.keys().any(|k| k != "ok") {
                    let _ = writeln!(out, "    {op:<8} {}", outcomes(&o.outcomes));
                }
            }
        }
        if let Some(at) = s.first_seen.get("sold_out") {
            let _ = writeln!(
                out,
                "  sold out   after {:.3} s (first sold_out answer); last ok answer after {:.3} s",
                secs(*at),
                s.last_ok.map_or(0.0, secs)
            );
        }
        if let Some(c) = self.campaign {
            let _ = writeln!(
                out,
                "  campaign   {}: quantity {}, sold {}, reserved {}, limit {} per buyer{}",
                c.campaign_id,
                c.quantity,
                c.last.sold,
                c.last.reserved,
                c.per_buyer_limit,
                if c.exclusive {
                    ""
                } else {
                    " (not created by this run)"
                }
            );
        }
        let _ = writeln!(
            out,
            "  checked    {} acknowledged orders ({} units), {} read back, {} skus{}",
            self.acked_orders,
            self.acked_units,
            self.orders_read,
            self.skus_checked,
            if self.uncertain_units > 0 {
                format!("; {} units of buys without an answer", self.uncertain_units)
            } else {
                String::new()
            }
        );
        if self.violations.is_empty() {
            let _ = writeln!(out, "  invariants hold: {}", self.checks.join(", "));
        } else {
            for v in self.violations {
                let _ = writeln!(out, "  VIOLATION  {v}");
            }
        }
        out
    }

    /// The `--report` document.
    pub fn json(&self) -> Value {
        let s = self.stats;
        let t = secs(self.elapsed);
        let by_op: serde_json::Map<String, Value> = s
            .by_op
            .iter()
            .map(|(op, o)| {
                (
                    (*op).to_owned(),
                    json!({"requests": o.latency.len(), "outcomes": o.outcomes,
                           "latency_ms": percentiles(&o.latency)}),
                )
            })
            .collect();
        let timeline: Vec<Value> = s
            .timeline
            .iter()
            .enumerate()
            .map(|(i, sec)| {
                json!({"second": i, "requests": sec.requests, "ok": sec.ok,
                       "p99_ms": sec.latency.value_at_quantile(0.99) as f64 / 1000.0})
            })
            .collect();
        let mut report = json!({
            "scenario": self.scenario,
            "target": self.target,
            "started_at": self.started_at,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "duration_secs": t,
            "interrupted": self.interrupted,
            "parameters": self.parameters,
            "requests": s.total(),
            "ok": s.ok(),
            "throughput_per_sec": s.total() as f64 / t,
            "throughput_ok_per_sec": s.ok() as f64 / t,
            "latency_ms": percentiles(&s.overall),
            "by_op": by_op,
            "outcomes": s.outcomes,
            "campaign": self.campaign.map(|c| json!({
                "campaign_id": c.campaign_id, "quantity": c.quantity,
                "per_buyer_limit": c.per_buyer_limit, "sold": c.last.sold,
                "reserved": c.last.reserved, "created_by_run": c.exclusive})),
            "invariants": {
                "ok": self.violations.is_empty(),
                "checked": self.checks,
                "violations": self.violations,
                "acknowledged_orders": self.acked_orders,
                "acknowledged_units": self.acked_units,
                "orders_read_back": self.orders_read,
                "skus_checked": self.skus_checked,
                "uncertain_units": self.uncertain_units,
            },
            "timeline": timeline,
            "sold_out_after_secs": s.first_seen.get("sold_out").map(|d| secs(*d)),
            "last_ok_after_secs": s.last_ok.map(secs),
        });
        if let (Some(d), Some(m)) = (&self.durability, report.as_object_mut()) {
            m.insert("durability".into(), json!(d));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn outcome<'a>(stats: &'a Stats, violations: &'a [String]) -> Outcome<'a> {
        Outcome {
            scenario: "mixed",
            target: "http://127.0.0.1:8080",
            started_at: "2026-11-23T00:00:00Z".into(),
            mode: "closed",
            concurrency: 8,
            rate: None,
            elapsed: Duration::from_secs(2),
            interrupted: false,
            parameters: json!({"skus": 200}),
            durability: Some("sync".into()),
            stats,
            campaign: None,
            acked_orders: 1,
            acked_units: 1,
            orders_read: 1,
            skus_checked: 200,
            uncertain_units: 0,
            checks: vec!["sku stock conserved"],
            violations,
        }
    }

    fn stats() -> Stats {
        let t0 = Instant::now();
        let mut s = Stats::new(t0);
        for i in 1..=100u64 {
            s.record("browse", t0, t0 + Duration::from_millis(i), "ok");
        }
        s.record(
            "pay",
            t0,
            t0 + Duration::from_millis(1500),
            "amount_mismatch",
        );
        s
    }

    #[test]
    fn the_report_has_every_figure() {
        let s = stats();
        let r = outcome(&s, &[]).json();
        assert_eq!(r["requests"], 101);
        assert_eq!(r["ok"], 100);
        assert_eq!(r["throughput_ok_per_sec"], 50.0);
        assert_eq!(r["durability"], "sync");
        assert_eq!(r["outcomes"]["amount_mismatch"], 1);
        assert_eq!(r["by_op"]["pay"]["outcomes"]["amount_mismatch"], 1);
        let p = &r["by_op"]["browse"]["latency_ms"];
        for k in ["p50", "p90", "p99", "p999", "max", "mean"] {
            assert!(p[k].is_f64(), "{k}: {p}");
        }
        assert!((p["p50"].as_f64().unwrap() - 50.0).abs() < 0.1);
        assert_eq!(r["timeline"][0]["requests"], 100);
        assert_eq!(r["timeline"][1]["requests"], 1);
        assert!(r["timeline"][1]["p99_ms"].as_f64().unwrap() >= 1490.0);
        assert_eq!(r["invariants"]["ok"], true);
        // It round-trips as text.
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), r);
    }

    #[test]
    fn the_table_shows_percentiles_outcomes_and_violations() {
        let s = stats();
        let bad = vec!["sku s stock not conserved".to_owned()];
        let t = outcome(&s, &bad).table();
        assert!(t.contains("p99.9 ms"), "{t}");
        assert!(
            t.contains("browse") && t.contains("pay") && t.contains("all"),
            "{t}"
        );
        assert!(t.contains("outcomes   ok 100, amount_mismatch 1"), "{t}");
        assert!(t.contains("VIOLATION  sku s stock not conserved"), "{t}");
        assert!(outcome(&s, &[]).table().contains("invariants hold"));
    }
}
