//! The `outbox-relay` binary as an operator runs it.

use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::harness::*;

pub fn outbox_relay(database_url: Option<&str>, args: &[&str]) -> Output {
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

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// A failed command prints exactly one line and exits non-zero.
pub fn assert_one_line_failure(output: &Output, needle: &str) {
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

/// A usage error is clap's whole message: what is wrong (naming the
/// argument or listing the allowed values), the usage or a pointer to
/// `--help`, exit code 2.
fn assert_usage_error(output: &Output, needles: &[&str]) {
    assert_eq!(output.status.code(), Some(2), "expected exit 2: {output:?}");
    let text = stderr(output);
    assert!(text.starts_with("error:"), "{text}");
    assert!(
        text.contains("Usage:") || text.contains("try '--help'"),
        "no usage hint in {text:?}"
    );
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in {text:?}");
    }
}

#[tokio::test]
async fn usage_errors_say_what_is_wrong_and_show_the_usage() {
    let db = TestDb::migrated().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let url = Some(url.as_str());
        let out = outbox_relay(url, &["topics", "describe"]);
        assert_usage_error(&out, &["<TOPIC>"]);
        let out = outbox_relay(url, &["topics", "list", "--output", "yaml"]);
        assert_usage_error(&out, &["yaml", "table", "json"]);
        let out = outbox_relay(url, &["serve", "--roles", "foo"]);
        assert_usage_error(&out, &["foo", "api", "relay", "mail"]);
        let out = outbox_relay(url, &["tail", "order-created", "--partition", "-1"]);
        assert_usage_error(&out, &["-1", "--partition"]);
        let out = outbox_relay(url, &["tail", "order-created", "--from-time", "yesterday"]);
        assert_usage_error(&out, &["RFC 3339"]);
        let out = outbox_relay(url, &["demo", "--orders", "0"]);
        assert_usage_error(&out, &["--orders"]);
        let out = outbox_relay(url, &["topics", "create", "t", "--retention-days", "1e300"]);
        assert_usage_error(&out, &["at most 36500 days"]);
        let out = outbox_relay(url, &["topics", "create", "t", "--partitions", "0"]);
        assert_usage_error(&out, &["--partitions"]);
        let out = outbox_relay(url, &["serve", "--relay-lease-secs", "1e30"]);
        assert_usage_error(&out, &["between 0.1 and 3600 seconds"]);
        let out = outbox_relay(url, &["dead-letters", "retry"]);
        assert_usage_error(&out, &["<ID>"]);
        let out = outbox_relay(url, &["no-such-command"]);
        assert_usage_error(&out, &["no-such-command"]);
        // No command at all: the help, with every command listed.
        let out = outbox_relay(url, &[]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        for command in [
            "serve",
            "demo",
            "topics",
            "tail",
            "groups",
            "dead-letters",
            "relay",
        ] {
            assert!(
                stderr(&out).contains(command),
                "{command} missing in {}",
                stderr(&out)
            );
        }
    })
    .await
    .unwrap();
}

/// `--help` describes every command, positional argument and flag.
#[test]
fn every_argument_and_flag_is_described_in_help() {
    fn check(command: &clap::Command, path: &str, checked: &mut usize) {
        assert!(
            command.get_about().is_some() || path == "outbox-relay",
            "{path} has no description"
        );
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "{path}: {id} has no description");
            *checked += 1;
        }
        for sub in command.get_subcommands() {
            if sub.get_name() != "help" {
                check(sub, &format!("{path} {}", sub.get_name()), checked);
            }
        }
    }
    let mut checked = 0;
    check(
        &<outbox_relay::cli::Cli as clap::CommandFactory>::command(),
        "outbox-relay",
        &mut checked,
    );
    assert!(checked > 30, "only {checked} arguments found");
}

#[tokio::test]
async fn runtime_errors_are_one_line() {
    let db = TestDb::migrated().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let out = outbox_relay(Some(&url), &["tail", "order-created", "--partition", "99"]);
        assert_one_line_failure(&out, "no partition 99");
        let out = outbox_relay(Some(&url), &["tail", "no-such-topic"]);
        assert_one_line_failure(&out, "unknown topic");
        let out = outbox_relay(Some(&url), &["topics", "create", "order-created"]);
        assert_one_line_failure(&out, "already exists");
        let out = outbox_relay(Some(&url), &["topics", "create", "bad topic!"]);
        assert_one_line_failure(&out, "invalid topic");
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

#[tokio::test]
async fn a_database_without_the_schema_gets_the_migrate_hint() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        for args in [
            &["topics", "list"][..],
            &["tail", "order-created"],
            &["groups", "list"],
            &["dead-letters", "list"],
            &["relay", "status"],
            &["serve", "--no-migrate", "--roles", "relay"],
        ] {
            let out = outbox_relay(Some(&url), args);
            assert_one_line_failure(&out, "no outbox-relay schema: run `outbox-relay migrate`");
        }
    })
    .await
    .unwrap();
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                             applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations VALUES (1, 'core', now());",
        )
        .await
        .unwrap();
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || outbox_relay(Some(&url), &["topics", "list"]))
        .await
        .unwrap();
    assert_one_line_failure(&out, "schema is version 1, older than this binary's");
}

/// Bad settings stop `serve` and `demo` before anything starts: no port is
/// bound, no migration runs, no role logs a line, and the error is the
/// last and only thing printed.
#[tokio::test]
async fn bad_settings_stop_before_anything_starts() {
    let db = TestDb::empty().await;
    let port = free_port();
    let url = db.url.clone();
    let addr = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking(move || {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--smtp-url", "http://x"],
                "SMTP_URL scheme \"http\" is not one of",
            ),
            (&["--mail-from", "not an address"], "MAIL_FROM"),
        ];
        for (command, (flags, needle)) in ["serve", "demo"]
            .iter()
            .flat_map(|c| cases.iter().map(move |case| (c, case)))
        {
            let mut args = vec![*command, "--http-addr", &addr];
            args.extend_from_slice(flags);
            let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .args(&args)
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "info")
                .env_remove("SMTP_URL")
                .env_remove("MAIL_FROM")
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let output = wait_with_deadline(&mut child, std::time::Duration::from_secs(20));
            assert_one_line_failure(&output, needle);
        }
        // A port already taken: one line naming it, before anything starts.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["serve", "--http-addr", &taken_addr])
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let output = wait_with_deadline(&mut child, std::time::Duration::from_secs(20));
        assert_one_line_failure(&output, &format!("cannot listen on {taken_addr}"));
    })
    .await
    .unwrap();
    // Nothing ran: the database was never migrated.
    let client = db.client().await;
    let migrated: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !migrated,
        "a bad setting must stop the process before migrations"
    );
}

/// Waits for `child` to exit, killing it (and failing) after `limit`.
fn wait_with_deadline(child: &mut std::process::Child, limit: std::time::Duration) -> Output {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status: child.wait().unwrap(),
        stdout,
        stderr,
    }
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
    let port = free_port();
    let mut serve = binary(&db)
        .args(["serve", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("SMTP_URL", smtp.url())
        .env("MAIL_FROM", "orders@shop.example.com")
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
        assert_usage_error(
            &outbox_relay(Some(&url), &["dead-letters", "retry"]),
            &["<ID>"],
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
        count(&client, "SELECT count(*) FROM outbox_retries").await,
        1
    );
}

#[tokio::test]
async fn tail_filters_by_key_and_shows_the_last_records() {
    let db = db_with_events(40).await;
    let url = db.url.clone();
    let (by_key, last) = tokio::task::spawn_blocking(move || {
        let by_key = outbox_relay(Some(&url), &["tail", "order-created", "--key", "17"]);
        let last = outbox_relay(Some(&url), &["tail", "order-created", "--last", "2"]);
        (by_key, last)
    })
    .await
    .unwrap();
    assert!(by_key.status.success(), "{}", stderr(&by_key));
    let records: Vec<Value> = String::from_utf8_lossy(&by_key.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["key"], "17");
    assert_eq!(
        records[0]["partition"],
        outbox_relay::log::partitioner::partition_for_key("17", 8)
    );

    // The last two of every partition that has two (all 8 do: 40 keys).
    let client = db.client().await;
    let ends: Vec<i64> = column(
        &client,
        "SELECT log_end_offset FROM partition_heads WHERE topic = 'order-created' ORDER BY partition",
    )
    .await;
    let records: Vec<Value> = String::from_utf8_lossy(&last.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected: usize = ends.iter().map(|&e| e.min(2) as usize).sum();
    assert_eq!(records.len(), expected);
    for record in &records {
        let partition = record["partition"].as_i64().unwrap() as usize;
        assert!(
            record["offset"].as_i64().unwrap() >= ends[partition] - 2,
            "{record}"
        );
    }
}

#[tokio::test]
async fn relay_status_names_the_leader_and_the_backlog() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut relay = db.relay();
    drain(&mut relay).await;
    for i in 0..3 {
        insert_event(&client, "order-created", &i.to_string(), json!({})).await;
    }
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        outbox_relay(Some(&url), &["relay", "status", "--output", "json"])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["leader_alive"], true, "{status}");
    assert_eq!(status["backlog"], 3, "{status}");
    assert!(status["oldest_age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(status["epoch"], relay.epoch().unwrap());
    let holder: String = client
        .query_one("SELECT holder FROM relay_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status["holder"], holder);

    drain(&mut relay).await;
    relay.release().await.unwrap();
    let url = db.url.clone();
    let out = tokio::task::spawn_blocking(move || outbox_relay(Some(&url), &["relay", "status"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Leader: none") && text.contains("Backlog: 0 rows"),
        "{text}"
    );
}

#[tokio::test]
async fn dead_letters_list_shows_resolved_ones_on_request() {
    let db = db_with_events(2).await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts, last_error, status)
             SELECT 'mail-service', topic, partition, \"offset\", key, headers, payload, 'retry budget spent', 10,
                    '451 4.3.0 try again', CASE WHEN key = '0' THEN 'discarded' ELSE 'parked' END
               FROM event_log",
            &[],
        )
        .await
        .unwrap();
    let url = db.url.clone();
    let (parked, all) = tokio::task::spawn_blocking(move || {
        (
            outbox_relay(Some(&url), &["dead-letters", "list"]),
            outbox_relay(
                Some(&url),
                &[
                    "dead-letters",
                    "list",
                    "--status",
                    "all",
                    "--output",
                    "json",
                ],
            ),
        )
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&parked.stdout);
    assert!(
        table.contains("LAST-ERROR") && table.contains("451 4.3.0 try again"),
        "{table}"
    );
    assert_eq!(
        table.lines().count(),
        2,
        "header and the one parked letter: {table}"
    );
    let all: Value = serde_json::from_slice(&all.stdout).unwrap();
    let statuses: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2);
    assert!(statuses.contains(&"discarded") && statuses.contains(&"parked"));
}

/// `tail --follow` prints records appended after it started, then stops at
/// `--max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_prints_records_appended_later() {
    let db = TestDb::migrated().await;
    let mut follower = binary(&db)
        .args(["tail", "order-created", "--follow", "--max", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = db.client().await;
    let mut relay = db.relay();
    // Append only once it follows: its LISTEN connection is up.
    eventually(
        "tail --follow to listen",
        std::time::Duration::from_secs(20),
        || async {
            let listening = count(
                &client,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .await;
            (listening > 0).then_some(())
        },
    )
    .await;
    for i in 0..3 {
        insert_event(
            &client,
            "order-created",
            &format!("late-{i}"),
            json!({ "i": i }),
        )
        .await;
    }
    drain(&mut relay).await;
    let output = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut stdout = follower.stdout.take().unwrap();
        let mut text = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text)
            .await
            .unwrap();
        (follower.wait().await.unwrap(), text)
    })
    .await
    .expect("tail --follow --max 3 exits once it printed 3 records");
    assert!(output.0.success());
    let keys: Vec<String> = output
        .1
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["key"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["late-0", "late-1", "late-2"]);
}

/// Logs at the default level are quiet: no Postgres NOTICE lines (migrating
/// twice, the second time finding everything there) and no colour codes
/// when stderr is not a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_logs_carry_no_notices_and_no_colour_codes() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..2 {
            let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .arg("migrate")
                .env("DATABASE_URL", &url)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            assert!(output.status.success(), "{}", stderr(&output));
            let err = stderr(&output);
            assert!(!err.contains("NOTICE"), "{err}");
            assert!(!err.contains('\u{1b}'), "colour codes in {err:?}");
        }
        let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["relay", "status"])
            .env("DATABASE_URL", &url)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(stderr(&output), "", "a status command logs nothing");
    })
    .await
    .unwrap();
}
