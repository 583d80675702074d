//! `shardmall-loadgen` against the real binary: a flash sale that sells out and a mixed
//! storefront load both pass loadgen's own invariant checks, and its report says what
//! happened. (The checker's failures are shown by loadgen's unit tests with broken
//! outcomes.)

use serde_json::Value;
use shardmall_tests::*;

/// Runs loadgen with `args` on a thread of its own (it builds its own runtime); answers
/// its exit status.
async fn loadgen(args: Vec<String>) -> i32 {
    tokio::task::spawn_blocking(move || {
        let mut argv = vec!["shardmall-loadgen".to_owned()];
        argv.extend(args);
        shardmall_loadgen::run_cli(argv)
    })
    .await
    .expect("loadgen thread")
}

fn common_args(node: &Node, secret: &std::path::Path, report: &std::path::Path) -> Vec<String> {
    [
        "--target",
        &node.base,
        "--secret-file",
        &secret.display().to_string(),
        "--no-progress",
        "--check-all",
        "--report",
        &report.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flash_sale_and_a_mixed_load_pass_loadgens_checks() {
    let node = Node::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, JWT_SECRET).expect("write secret");

    // 300 units, 1,500 buys by 1,500 buyers: it sells out, and every refusal after that is
    // `sold_out`.
    let report = dir.path().join("flash.json");
    let mut args = vec!["flash-sale".to_owned()];
    args.extend(common_args(&node, &secret, &report));
    args.extend(
        [
            "--concurrency",
            "32",
            "--requests",
            "1500",
            "--quantity",
            "300",
            "--stock",
            "1000",
            "--buyers",
            "1500",
            "--plot",
            &dir.path().join("flash.svg").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    assert_eq!(loadgen(args).await, 0, "flash-sale run failed its checks");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    assert_eq!(r["invariants"]["ok"], true, "{r}");
    let outcomes = &r["outcomes"];
    assert_eq!(outcomes["ok"], 300, "{r}");
    assert_eq!(outcomes["sold_out"], 1200, "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().is_some(), "{r}");
    let svg = std::fs::read_to_string(dir.path().join("flash.svg")).expect("plot");
    assert!(svg.starts_with("<svg"));

    let report = dir.path().join("mixed.json");
    let mut args = vec!["mixed".to_owned()];
    args.extend(common_args(&node, &secret, &report));
    args.extend(
        ["--concurrency", "16", "--requests", "1500", "--skus", "40"]
            .iter()
            .map(|s| s.to_string()),
    );
    assert_eq!(loadgen(args).await, 0, "mixed run failed its checks");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    assert_eq!(r["invariants"]["ok"], true, "{r}");
    assert_eq!(r["requests"], 1500, "{r}");

    // Without the signing secret: the buyers' tokens from `shardmall token --count`, the
    // admin's in SHARDMALL_TOKEN. 50 buyers with a limit of one each buy out 50 units
    // and no more.
    let tokens = dir.path().join("buyers.txt");
    let minted = std::process::Command::new(shardmall_bin())
        .args([
            "token", "--role", "customer", "--count", "50", "--prefix", "lgf-", "--out",
        ])
        .arg(&tokens)
        .env("SHARDMALL_JWT_SECRET", JWT_SECRET)
        .env_remove("SHARDMALL_DATA_DIR")
        .output()
        .expect("run shardmall token --count");
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    // This test is its binary's only one: no other thread reads the environment.
    std::env::set_var("SHARDMALL_TOKEN", admin());
    let report = dir.path().join("listed.json");
    let args: Vec<String> = [
        "flash-sale",
        "--target",
        &node.base,
        "--tokens-file",
        &tokens.display().to_string(),
        "--no-progress",
        "--check-all",
        "--report",
        &report.display().to_string(),
        "--concurrency",
        "8",
        "--requests",
        "200",
        "--quantity",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(loadgen(args).await, 0, "tokens-file run failed its checks");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    assert_eq!(r["invariants"]["ok"], true, "{r}");
    assert_eq!(
        r["outcomes"]["ok"], 50,
        "one buy per buyer of the file: {r}"
    );
    assert_eq!(r["outcomes"]["limit_exceeded"], 150, "{r}");
    std::env::remove_var("SHARDMALL_TOKEN");

    // A node that is not there is a setup error (exit 2), not a failed check.
    let mut args = vec![
        "flash-sale".to_owned(),
        "--target".into(),
        "http://127.0.0.1:9".into(),
    ];
    args.extend([
        "--secret-file".into(),
        secret.display().to_string(),
        "--no-progress".into(),
    ]);
    assert_eq!(loadgen(args).await, 2);
}
