//! The `outbox-relay` binary as an operator runs it.

use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::harness::*;

fn outbox_relay(database_url: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("HTTP_ADDR");
    match database_url {
        Some(url) => command.env("DATABASE_URL", url),
        None => command.env_remove("DATABASE_URL"),
    };
    command.output().expect("run outbox-relay")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// A failed command prints exactly one line and exits non-zero.
fn assert_one_line_failure(output: &Output, needle: &str) {
    assert!(!output.status.success(), "expected failure, got {output:?}");
    let text = stderr(output);
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one line expected: {text:?}"
    );
    assert!(text.contains(needle), "{needle:?} not in {text:?}");
}

async fn db_with_events(n: i64) -> TestDb {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for i in 0..n {
        insert_event(&client, "order-created", &i.to_string(), json!({ "i": i })).await;
    }
    drain(&mut db.relay()).await;
    db
}

#[tokio::test]
async fn topics_list_and_describe() {
    let db = db_with_events(20).await;
    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        outbox_relay(
            Some(&url),
            &["topics", "describe", "order-created", "--output", "json"],
        )
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let described: Value = serde_json::from_slice(&output.stdout).unwrap();
    let partitions = described["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 8);
    let total: i64 = partitions
        .iter()
        .map(|p| p["log_end_offset"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 20);
    assert!(partitions.iter().all(|p| p["log_start_offset"] == 0));

    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || outbox_relay(Some(&url), &["topics", "list"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("order-created") && text.contains("35d"),
        "{text}"
    );
}

#[tokio::test]
async fn tail_prints_one_json_object_per_record() {
    let db = db_with_events(30).await;
    let client = db.client().await;
    let partition: i32 = client
        .query_one(
            "SELECT partition FROM partition_heads WHERE log_end_offset >= 3 LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let url = db.url.clone();
    let p = partition.to_string();
    let output = tokio::task::spawn_blocking(move || {
        outbox_relay(
            Some(&url),
            &[
                "tail",
                "order-created",
                "--partition",
                &p,
                "--from-offset",
                "1",
                "--max",
                "2",
            ],
        )
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, offset) in lines.iter().zip([1, 2]) {
        assert_eq!(line["topic"], "order-created");
        assert_eq!(line["partition"], partition);
        assert_eq!(line["offset"], offset);
        for field in ["key", "created_at", "appended_at", "headers", "payload"] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
    }

    // All partitions, from a time before everything: every record.
    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        outbox_relay(
            Some(&url),
            &[
                "tail",
                "order-created",
                "--from-time",
                "2020-01-01T00:00:00Z",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 30);
}

#[tokio::test]
async fn bad_arguments_and_unreachable_database_fail_in_one_line() {
    let db = TestDb::migrated().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let out = outbox_relay(Some(&url), &["tail", "order-created", "--partition", "99"]);
        assert_one_line_failure(&out, "no partition 99");
        let out = outbox_relay(Some(&url), &["tail", "no-such-topic"]);
        assert_one_line_failure(&out, "unknown topic");
        let out = outbox_relay(
            Some(&url),
            &["tail", "order-created", "--from-time", "yesterday"],
        );
        assert_one_line_failure(&out, "RFC 3339");
        let out = outbox_relay(Some(&url), &["topics", "describe"]);
        assert_one_line_failure(&out, "error:");
        let out = outbox_relay(Some(&url), &["demo", "--orders", "0"]);
        assert_one_line_failure(&out, "--orders");
        let out = outbox_relay(
            Some(&url),
            &["topics", "create", "t", "--retention-days", "1e300"],
        );
        assert_one_line_failure(&out, "at most 36500 days");
        let out = outbox_relay(Some(&url), &["topics", "create", "t", "--partitions", "0"]);
        assert_one_line_failure(&out, "--partitions");
        let out = outbox_relay(Some(&url), &["serve", "--relay-lease-secs", "1e30"]);
        assert_one_line_failure(&out, "between 0.1 and 3600 seconds");
        let out = outbox_relay(Some(&url), &["topics", "create", "order-created"]);
        assert_one_line_failure(&out, "already exists");
        let out = outbox_relay(Some(&url), &["topics", "create", "bad topic!"]);
        assert_one_line_failure(&out, "invalid topic");
        let out = outbox_relay(Some(&url), &["no-such-command"]);
        assert_one_line_failure(&out, "error:");
        let out = outbox_relay(
            Some("postgres://postgres@127.0.0.1:1/nowhere"),
            &["topics", "list"],
        );
        assert_one_line_failure(&out, "cannot connect");
        let out = outbox_relay(Some("not a url"), &["migrate"]);
        assert_one_line_failure(&out, "invalid database URL");
    })
    .await
    .unwrap();
}

/// The README's first command: the pipeline on the embedded default.
#[tokio::test]
async fn demo_runs_the_pipeline_on_the_embedded_default() {
    let data_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("demo-{:x}", rand::random::<u32>()));
    let dir = data_dir.to_string_lossy().to_string();
    let output = tokio::task::spawn_blocking(move || {
        outbox_relay(
            None,
            &[
                "--data-dir",
                &dir,
                "demo",
                "--no-wait",
                "--orders",
                "3",
                "--http-addr",
                "127.0.0.1:0",
            ],
        )
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&data_dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {}\n{stdout}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("embedded Postgres"),
        "{}",
        stderr(&output)
    );
    assert!(stdout.contains("placed 3 sample orders"), "{stdout}");
    assert_eq!(stdout.matches("partition ").count(), 3, "{stdout}");
}
