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

/// The whole pipeline as deployed: `outbox-relay serve` with SMTP_URL at a
/// real SMTP server mails one confirmation per order placed over HTTP, and
/// SIGTERM leaves the consumer group at once (partitions released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mails_one_confirmation_per_order_and_leaves_cleanly_on_sigterm() {
    let db = TestDb::migrated().await;
    let smtp = crate::smtp::SmtpServer::start(&[]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["serve", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("SMTP_URL", smtp.url())
        .env("MAIL_FROM", "orders@shop.example.com")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    eventually(
        "serve to be ready",
        std::time::Duration::from_secs(30),
        || async {
            let answer = http.get(&ready).send().await.ok()?;
            answer.status().is_success().then_some(())
        },
    )
    .await;
    for i in 0..5 {
        let answer = http
            .post(format!("http://127.0.0.1:{port}/orders"))
            .header("content-type", "application/json")
            .body(
                json!({"user_id": 1, "email": format!("client{i}@example.com"), "amount": 100 + i})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::CREATED);
    }
    eventually(
        "five confirmation mails",
        std::time::Duration::from_secs(30),
        || async { (smtp.messages().len() >= 5).then_some(()) },
    )
    .await;
    let client = db.client().await;
    eventually(
        "the group to commit everything",
        std::time::Duration::from_secs(30),
        || async {
            let lag = count(
                &client,
                "SELECT coalesce(sum(h.log_end_offset - coalesce(p.committed_offset, 0)), -1)::int8
               FROM partition_heads h JOIN group_partitions p USING (topic, partition)
              WHERE p.group_id = 'mail-service'",
            )
            .await;
            (lag == 0).then_some(())
        },
    )
    .await;

    let pid = serve.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), serve.wait())
        .await
        .expect("serve stops within 20 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "serve exited with {status}");
    let mails = smtp.messages();
    assert_eq!(mails.len(), 5, "one mail per order");
    assert!(mails
        .iter()
        .all(|m| m.raw.contains("orders@shop.example.com")));
    let owned = count(
        &client,
        "SELECT count(*) FROM group_partitions WHERE owner IS NOT NULL",
    )
    .await;
    assert_eq!(owned, 0, "SIGTERM releases the partitions at once");
    assert_eq!(
        count(&client, "SELECT count(*) FROM group_members").await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM relay_state WHERE holder IS NOT NULL"
        )
        .await,
        0
    );

    // The operator's view of the group, as JSON.
    let url = db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        outbox_relay(
            Some(&url),
            &["groups", "describe", "mail-service", "--output", "json"],
        )
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let described: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(described["state"], "Empty");
    let partitions = described["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 8);
    assert!(partitions.iter().all(|p| p["lag"] == 0), "{described}");
}

/// Dead letters through the CLI: list, discard, retry (republished through the outbox).
#[tokio::test]
async fn dead_letters_cli_lists_retries_and_discards() {
    let db = db_with_events(2).await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts)
             SELECT 'mail-service', topic, partition, \"offset\", key, headers, payload, 'permanent SMTP failure', 1
               FROM event_log",
            &[],
        )
        .await
        .unwrap();
    let ids: Vec<i64> = column(&client, "SELECT id FROM dead_letters ORDER BY id").await;
    let url = db.url.clone();
    let (first, second) = (ids[0].to_string(), ids[1].to_string());
    tokio::task::spawn_blocking(move || {
        let out = outbox_relay(Some(&url), &["dead-letters", "list", "--output", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert_eq!(listed[0]["reason"], "permanent SMTP failure");
        assert!(
            outbox_relay(Some(&url), &["dead-letters", "discard", &first])
                .status
                .success()
        );
        assert_one_line_failure(
            &outbox_relay(Some(&url), &["dead-letters", "discard", &first]),
            "no parked dead letter",
        );
        let out = outbox_relay(Some(&url), &["dead-letters", "retry", &second]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("republished 1"),
            "{}",
            stderr(&out)
        );
        assert_one_line_failure(
            &outbox_relay(Some(&url), &["dead-letters", "retry"]),
            "error:",
        );
        let out = outbox_relay(Some(&url), &["dead-letters", "list", "--output", "json"]);
        assert_eq!(
            serde_json::from_slice::<Value>(&out.stdout)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            0
        );
    })
    .await
    .unwrap();
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM outbox WHERE headers ? 'retry-of'"
        )
        .await,
        1
    );
}
