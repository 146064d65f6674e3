//! `dynamo bench` against a real 3-node cluster: a fixed number of requests,
//! checked through the JSON report and the machine-readable stdout lines.

mod common;

use common::{Cluster, DYNAMO};
use serde_json::Value;
use std::process::Command;

#[test]
fn bench_runs_against_a_real_cluster_and_reports_json() {
    let cluster = Cluster::start(3, &[]);
    cluster.wait_connected();
    let nodes: Vec<String> = (0..cluster.len())
        .map(|i| cluster.client_addr(i).to_string())
        .collect();
    let json_path = cluster.dir().join("bench.json");
    let svg_path = cluster.dir().join("bench.svg");
    let output = Command::new(DYNAMO)
        .args(["bench", "--node", &nodes.join(",")])
        .args(["--requests", "2000", "--concurrency", "8", "--no-progress"])
        .args(["--keys", "500", "--warmup", "200ms", "--seed", "5"])
        .arg("--json")
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .env_remove("DYNAMO_NODES")
        .output()
        .expect("running dynamo bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "dynamo bench failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let doc: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).expect("the --json file was written"),
    )
    .expect("valid JSON");
    let num = |name: &str| {
        doc[name]
            .as_f64()
            .unwrap_or_else(|| panic!("{name} missing in {doc}"))
    };
    assert_eq!(doc["ops"], 2000, "{doc}");
    assert_eq!(doc["errors"], 0, "{doc}");
    assert_eq!(num("reads") + num("writes"), 2000.0);
    assert!(num("reads") > 0.0 && num("writes") > 0.0);
    assert!(num("throughput_ops_per_s") > 0.0);
    let (p50, p90, p99, p999, max) = (
        num("p50_ms"),
        num("p90_ms"),
        num("p99_ms"),
        num("p999_ms"),
        num("max_ms"),
    );
    assert!(p50 > 0.0, "{doc}");
    assert!(
        p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "percentiles out of order: {p50} {p90} {p99} {p999} {max}"
    );
    // Overwrites through each key's first primary never leave siblings.
    assert_eq!(doc["read_siblings"], 0, "{doc}");
    assert_eq!(doc["config"]["write_mode"], "overwrite");
    assert_eq!(doc["config"]["routing"], "ring");
    let series = doc["timeseries"].as_array().expect("a timeseries");
    let per_second: u64 = series
        .iter()
        .map(|p| p["reads"].as_u64().unwrap() + p["writes"].as_u64().unwrap())
        .sum();
    assert_eq!(per_second, 2000);

    // The stdout lines agree with the JSON.
    let line = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(line("ops"), 2000.0);
    assert_eq!(line("p99_ms"), p99);
    assert_eq!(line("throughput_ops_per_s"), num("throughput_ops_per_s"));
    assert!(stdout.contains("WriteMode::Overwrite"), "{stdout}");

    let svg = std::fs::read_to_string(&svg_path).expect("the --svg file was written");
    assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(r#"id="p99""#) && svg.contains(r#"id="throughput""#));
}
