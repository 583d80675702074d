//! `shardmall cluster ...`: the membership commands, through any node's HTTP edge.

use anyhow::Context;
use serde_json::Value;

use crate::cli::{ClusterArgs, ClusterCommand};

/// Runs one cluster command. Exit 0 on success, 1 when the cluster refused or failed
/// the command, 2 when the node could not be asked.
pub fn run(args: ClusterArgs) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    match runtime.block_on(call(&args)) {
        Ok((status, body)) if status.is_success() => {
            print_answer(&args, &body);
            // A leave or rebalance that left moves undone did not do what was asked.
            let failed = body["failed"].as_array().is_some_and(|f| !f.is_empty());
            i32::from(failed)
        }
        Ok((status, body)) => {
            let message = body["error"]["message"].as_str().unwrap_or("");
            let code = body["error"]["code"].as_str().unwrap_or("error");
            eprintln!("error: {} {code}: {message}", status.as_u16());
            1
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            2
        }
    }
}

async fn call(args: &ClusterArgs) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let token = std::env::var("SHARDMALL_TOKEN").context(
        "SHARDMALL_TOKEN is not set (mint one with `shardmall token --role operator --sub NAME`)",
    )?;
    let base = args.url.trim_end_matches('/');
    let client = reqwest::Client::builder()
        // A leave or a rebalance moves partitions one after the other.
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let req = match &args.command {
        ClusterCommand::Status => client.get(format!("{base}/v1/cluster")),
        ClusterCommand::Leave { node } => {
            client.post(format!("{base}/v1/cluster/nodes/{node}/leave"))
        }
        ClusterCommand::Remove { node, force } => client.delete(format!(
            "{base}/v1/cluster/nodes/{node}{}",
            if *force { "?force=true" } else { "" }
        )),
        ClusterCommand::Rebalance => client.post(format!("{base}/v1/cluster/rebalance")),
    };
    let resp = req
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("asking {base}"))?;
    let status = resp.status();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, body))
}

fn print_answer(args: &ClusterArgs, body: &Value) {
    if args.json {
        println!("{}", serde_json::to_string_pretty(body).unwrap_or_default());
        return;
    }
    match &args.command {
        ClusterCommand::Status | ClusterCommand::Remove { .. } => print_map(body),
        ClusterCommand::Leave { .. } | ClusterCommand::Rebalance => print_moves(body),
    }
}

fn print_map(map: &Value) {
    println!(
        "cluster {}  epoch {}  partitions {}  leader {}",
        map["cluster_id"].as_str().unwrap_or("?"),
        map["epoch"],
        map["partitions"],
        map["leader"].as_str().unwrap_or("(none)")
    );
    println!(
        "{:<20} {:<8} {:>10}  {:<22} {:<22}",
        "NODE", "STATUS", "PARTITIONS", "HTTP", "CLUSTER"
    );
    for n in map["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<8} {:>10}  {:<22} {:<22}",
            n["node_id"].as_str().unwrap_or("?"),
            n["status"].as_str().unwrap_or("?"),
            n["partitions"].as_i64().unwrap_or(0),
            n["http_addr"].as_str().unwrap_or("?"),
            n["cluster_addr"].as_str().unwrap_or("?"),
        );
    }
    let groups = map["groups"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if groups.is_empty() {
        let target = map["target_replication_factor"].as_u64().unwrap_or(1);
        if target > 1 {
            println!();
            println!("replication factor 1: grows into {target} once {target} members are active");
        }
        return;
    }
    println!();
    println!(
        "replication factor {}, {} replica groups",
        map["replication_factor"],
        groups.len()
    );
    println!(
        "{:<6} {:<12} {:<30} {:<24} PARTITIONS",
        "GROUP", "LEADER", "REPLICAS", "LAG"
    );
    for g in groups {
        let names = |v: &Value| {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        };
        let lag = g["lag"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(node, n)| format!("{node}:{n}"))
            .collect::<Vec<_>>()
            .join(",");
        let partitions = g["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        // A replica move in progress: the placement and the voters differ.
        fn sorted(v: &Value) -> Vec<&str> {
            let mut names: Vec<&str> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            names.sort_unstable();
            names
        }
        let (placed, voting) = (sorted(&g["replicas"]), sorted(&g["voters"]));
        let replicas = if voting.is_empty() || placed == voting {
            names(&g["replicas"])
        } else {
            format!(
                "{} (moving from {})",
                names(&g["replicas"]),
                voting.join(",")
            )
        };
        println!(
            "{:<6} {:<12} {:<30} {:<24} {}",
            g["group_id"],
            g["leader"].as_str().unwrap_or("(none)"),
            replicas,
            if lag.is_empty() { "-".into() } else { lag },
            partitions
        );
    }
}

fn print_moves(report: &Value) {
    let kind = match report["kind"].as_str() {
        Some("leaders") => "group leaders",
        Some("replicas") => "groups' replicas",
        _ => "partitions",
    };
    println!(
        "moved {} of {} planned {kind}; epoch {}",
        report["moved"], report["planned"], report["epoch"]
    );
    // One line per target and reason: a lost target fails every move to it alike.
    let mut groups: std::collections::BTreeMap<(String, String), Vec<i64>> = Default::default();
    for f in report["failed"].as_array().into_iter().flatten() {
        let key = (
            f["to"].as_str().unwrap_or("?").to_owned(),
            f["error"].as_str().unwrap_or("?").to_owned(),
        );
        groups
            .entry(key)
            .or_default()
            .push(f["partition"].as_i64().unwrap_or(-1));
    }
    for ((to, error), partitions) in groups {
        if kind != "partitions" {
            println!("  {} failed ({to}): {error}", partitions.len());
            continue;
        }
        println!(
            "  {} failed -> {to} (partitions {}): {error}",
            partitions.len(),
            ranges(&partitions)
        );
    }
}

/// `[1, 2, 3, 7]` as "1-3, 7".
fn ranges(sorted: &[i64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn partition_lists_read_as_ranges() {
        assert_eq!(super::ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(super::ranges(&[]), "");
    }
}
