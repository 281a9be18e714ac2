//! Replays (docs/invariants.md, 10), `groups reset-offsets`, `groups
//! delete` and `parked redrive`, through the binary as an operator runs
//! them, against a real Postgres and a real SMTP server.

use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;

use chrono::{Duration as Days, Utc};
use serde_json::{json, Value};

use crate::cli::{assert_one_line_failure, outbox_relay, stderr};
use crate::harness::*;
use crate::smtp::SmtpServer;

/// Two orders a day over the last 60 days, written through the documented
/// outbox SQL with their `created_at`, relayed into the log. Returns the
/// order ids created at or after `days_ago` days.
async fn sixty_days_of_orders(db: &TestDb, days_ago: i64) -> Vec<i64> {
    let client = db.client().await;
    let mut recent = Vec::new();
    // Oldest first, as a log fills; the replay copes with any order (see
    // `a_time_range_is_exact_whatever_order_records_were_created_in`).
    for day in (0..60i64).rev() {
        for n in 0..2 {
            let id = day * 10 + n + 1;
            let created_at = Utc::now() - Days::days(day) - Days::hours(1);
            client
                .execute(
                    "INSERT INTO outbox (topic, key, payload, created_at) VALUES ('order-created', $1, $2, $3)",
                    &[
                        &id.to_string(),
                        &json!({"order_id": id, "user_id": 1, "amount": 100, "email": format!("o{id}@example.com")}),
                        &created_at,
                    ],
                )
                .await
                .unwrap();
            if day < days_ago {
                recent.push(id);
            }
        }
    }
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
    recent.sort();
    recent
}

async fn run(db: &TestDb, args: Vec<String>) -> Output {
    let url = db.url.clone();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        outbox_relay(Some(&url), &args)
    })
    .await
    .unwrap()
}

/// Order ids and Message-IDs of what the SMTP server has.
fn mailed(smtp: &SmtpServer) -> Vec<(i64, String, String)> {
    smtp.messages()
        .into_iter()
        .map(|m| {
            let id = m
                .subject
                .split('#')
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            let replay = m
                .raw
                .lines()
                .find_map(|l| l.strip_prefix("X-Outbox-Replay: "))
                .unwrap_or_default()
                .to_string();
            (id, m.message_id, replay)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_last_30_days_mails_exactly_those_orders_once_marked_as_a_replay() {
    let db = TestDb::migrated().await;
    let in_range = sixty_days_of_orders(&db, 30).await;
    let smtp = SmtpServer::start(&[]).await;
    let since = (Utc::now() - Days::days(30)).to_rfc3339();

    // The plan first, and a dry run sends nothing.
    let dry = run(
        &db,
        vec![
            "replay".into(),
            "--from".into(),
            since.clone(),
            "--dry-run".into(),
            "--output".into(),
            "json".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(dry.status.success(), "{}", stderr(&dry));
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["total"], in_range.len() as i64, "{plan}");
    assert_eq!(plan["partitions"].as_array().unwrap().len(), 8);
    assert!(smtp.messages().is_empty());
    let client = db.client().await;
    assert_eq!(count(&client, "SELECT count(*) FROM replay_runs").await, 0);

    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from".into(),
            since,
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("replay plan") && text.contains("done"),
        "{text}"
    );
    let mails = mailed(&smtp);
    let mut ids: Vec<i64> = mails.iter().map(|m| m.0).collect();
    ids.sort();
    assert_eq!(
        ids, in_range,
        "exactly the orders of the last 30 days, once each"
    );
    let run_id: i64 = client
        .query_one("SELECT id FROM replay_runs", &[])
        .await
        .unwrap()
        .get(0);
    for (_, message_id, replay) in &mails {
        assert_eq!(replay, &run_id.to_string());
        assert!(
            message_id.starts_with(&format!("<replay-{run_id}.order-created.")),
            "{message_id}"
        );
    }
    // The live group and its ledger are untouched.
    assert_eq!(
        count(&client, "SELECT count(*) FROM mail_deliveries").await,
        0
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM group_partitions").await,
        0
    );

    let listed = run(
        &db,
        vec![
            "replay".into(),
            "list".into(),
            "--output".into(),
            "json".into(),
        ],
    )
    .await;
    let runs: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(runs[0]["state"], "done");
    assert_eq!(runs[0]["sent"], in_range.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_and_partition_bounds_limit_a_replay() {
    let db = TestDb::migrated().await;
    sixty_days_of_orders(&db, 0).await;
    let smtp = SmtpServer::start(&[]).await;
    let client = db.client().await;
    let end3: i64 = client
        .query_one("SELECT log_end_offset FROM partition_heads WHERE topic = 'order-created' AND partition = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert!(end3 >= 4, "partition 3 holds enough records ({end3})");
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from-offset".into(),
            "3:1".into(),
            "--to-offset".into(),
            "3:4".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    // <replay-RUN.order-created.PARTITION.OFFSET@outbox-relay>
    let offsets: HashSet<String> = mailed(&smtp)
        .iter()
        .map(|(_, message_id, _)| message_id.split(['.', '@']).nth(3).unwrap().to_string())
        .collect();
    assert_eq!(
        offsets,
        HashSet::from(["1".into(), "2".into(), "3".into()]),
        "offsets 1..4 of partition 3"
    );

    // --partitions with a time bound: only those partitions.
    let smtp2 = SmtpServer::start(&[]).await;
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from".into(),
            "2000-01-01".into(),
            "--partitions".into(),
            "0,5".into(),
            "--smtp-url".into(),
            smtp2.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let partitions: HashSet<String> = mailed(&smtp2)
        .iter()
        .map(|(_, message_id, _)| message_id.split(['.', '@']).nth(2).unwrap().to_string())
        .collect();
    assert_eq!(partitions, HashSet::from(["0".into(), "5".into()]));
    let expected = count(
        &client,
        "SELECT count(*) FROM event_log WHERE partition IN (0, 5)",
    )
    .await;
    assert_eq!(mailed(&smtp2).len() as i64, expected);

    let bad = run(
        &db,
        vec![
            "replay".into(),
            "--from-offset".into(),
            "9:0".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert_one_line_failure(&bad, "no partition 9");
}

/// `replay` of the whole range at 40 mails/s, as a process of its own (so
/// a test can stop it mid-run); its arguments, to run it again.
fn slow_replay(
    db: &TestDb,
    smtp: &SmtpServer,
    output: std::process::Stdio,
) -> ([String; 7], tokio::process::Child) {
    let args = [
        "replay",
        "--from",
        "2000-01-01",
        "--max-rate",
        "40",
        "--smtp-url",
        &smtp.url(),
    ]
    .map(String::from);
    let child = binary(db)
        .args(&args)
        .stdout(output)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (args, child)
}

/// A replay killed with SIGKILL mid-run and resumed (by running the same
/// command again) mails each event of the range exactly once in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_mid_run_resumes_and_mails_each_event_once() {
    let db = TestDb::migrated().await;
    let all = sixty_days_of_orders(&db, 60).await;
    let smtp = SmtpServer::start(&[]).await;
    let (args, mut child) = slow_replay(&db, &smtp, std::process::Stdio::null());
    let pid = child.id().unwrap().to_string();
    let client = db.client().await;
    eventually(
        "a third of the run to be sent",
        Duration::from_secs(30),
        || async { (smtp.messages().len() >= all.len() / 3).then_some(()) },
    )
    .await;
    // Kill it between two mails: frozen, no mail in flight, then killed.
    let signal = |signal: &str| {
        assert!(std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    };
    eventually(
        "the replay frozen between two mails",
        Duration::from_secs(30),
        || async {
            signal("-STOP");
            let in_flight = count(
                &client,
                "SELECT count(*) FROM replay_deliveries WHERE status = 'sending'",
            )
            .await;
            if in_flight == 0 {
                return Some(());
            }
            signal("-CONT");
            tokio::time::sleep(Duration::from_millis(3)).await;
            None
        },
    )
    .await;
    signal("-KILL");
    child.wait().await.unwrap();
    let before = smtp.messages().len();
    assert!(
        before < all.len(),
        "killed before the end ({before} of {})",
        all.len()
    );

    let out = run(&db, args.to_vec()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming unfinished run"),
        "{}",
        stderr(&out)
    );
    let mails = mailed(&smtp);
    let distinct: HashSet<&String> = mails.iter().map(|m| &m.1).collect();
    assert_eq!(distinct.len(), mails.len(), "no event mailed twice");
    let mut ids: Vec<i64> = mails.iter().map(|m| m.0).collect();
    ids.sort();
    assert_eq!(ids, all, "every event of the range once");
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("in doubt 0"), "{summary}");
    // Resuming re-read at most what settled since the last saved cursor.
    assert!(summary.contains("done before"), "{summary}");
}

/// The live group keeps delivering new orders while a replay runs, and the
/// replay neither moves its offsets nor touches its ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_group_keeps_delivering_and_is_untouched_during_a_replay() {
    let db = TestDb::migrated().await;
    let live_smtp = SmtpServer::start(&[]).await;
    let replay_smtp = SmtpServer::start(&[]).await;
    let pipeline =
        crate::mail::Pipeline::start(&db, &live_smtp.url(), crate::mail::fast_retry(5)).await;
    let first =
        crate::mail::place_orders(&db, &["a@example.com", "b@example.com", "c@example.com"]).await;
    eventually("the live mails", Duration::from_secs(30), || async {
        (live_smtp.messages().len() == 3).then_some(())
    })
    .await;
    let client = db.client().await;
    let ledger_before: Vec<String> = column(
        &client,
        "SELECT message_id || status || sent_at::text FROM mail_deliveries ORDER BY 1",
    )
    .await;

    let url = db.url.clone();
    let replay_url = replay_smtp.url();
    let replay = tokio::task::spawn_blocking(move || {
        outbox_relay(
            Some(&url),
            &[
                "replay",
                "--from",
                "2000-01-01",
                "--max-rate",
                "10",
                "--smtp-url",
                &replay_url,
            ],
        )
    });
    let during = crate::mail::place_orders(&db, &["d@example.com", "e@example.com"]).await;
    eventually(
        "new orders mailed by the live group during the replay",
        Duration::from_secs(30),
        || async { (live_smtp.messages().len() == 5).then_some(()) },
    )
    .await;
    let out = replay.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    pipeline.stop().await;

    // The replay mailed what was in the log when it started (maybe the new
    // orders too, if they were in by then), each once, never via the live ledger.
    let replayed: Vec<i64> = mailed(&replay_smtp).iter().map(|m| m.0).collect();
    assert!(first.iter().all(|id| replayed.contains(id)), "{replayed:?}");
    let ledger_after: Vec<String> = column(
        &client,
        &format!("SELECT message_id || status || sent_at::text FROM mail_deliveries WHERE key IN ('{}','{}','{}') ORDER BY 1", first[0], first[1], first[2]),
    )
    .await;
    assert_eq!(ledger_before, ledger_after, "the live ledger is untouched");
    assert_eq!(
        live_smtp.messages().len(),
        5,
        "the live group mailed every order once"
    );
    let _ = during;
}

/// CreateTime need not grow with the offset (an import, a late writer): a
/// replay by time still mails exactly the records created in its range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_is_exact_whatever_order_records_were_created_in() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // Offsets in this order: today, 40 days ago, 20 days ago, 5 days ago.
    for (id, days) in [(1i64, 0i64), (2, 40), (3, 20), (4, 5)] {
        client
            .execute(
                "INSERT INTO outbox (topic, key, payload, created_at) VALUES ('order-created', 'same-key', $1, $2)",
                &[
                    &json!({"order_id": id, "user_id": 1, "amount": 1, "email": format!("o{id}@example.com")}),
                    &(Utc::now() - Days::days(days)),
                ],
            )
            .await
            .unwrap();
    }
    drain(&mut db.relay()).await;
    let smtp = SmtpServer::start(&[]).await;
    let from = (Utc::now() - Days::days(30)).to_rfc3339();
    let to = (Utc::now() - Days::days(3)).to_rfc3339();
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from".into(),
            from,
            "--to".into(),
            to,
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut ids: Vec<i64> = mailed(&smtp).iter().map(|m| m.0).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![3, 4],
        "created 20 and 5 days ago: in [30 days ago, 3 days ago)"
    );
}

// ─── reset-offsets, delete ──────────────────────────────────────────────────

/// A group with committed offset `at` on every partition of order-created
/// (and no live member), over 40 relayed events.
async fn group_at(db: &TestDb, group: &str, at: i64) {
    let client = db.client().await;
    for i in 0..40 {
        insert_event(
            &client,
            "order-created",
            &format!("k{i}"),
            json!({ "i": i }),
        )
        .await;
    }
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
    client
        .execute(
            "INSERT INTO group_partitions (group_id, topic, partition, epoch, committed_offset)
             SELECT $1, topic, partition, 3, least($2, log_end_offset) FROM partition_heads WHERE topic = 'order-created'",
            &[&group, &at],
        )
        .await
        .unwrap();
}

async fn reset(db: &TestDb, extra: &[&str]) -> Value {
    let mut args: Vec<String> = [
        "groups",
        "reset-offsets",
        "g",
        "--topic",
        "order-created",
        "--output",
        "json",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = run(db, args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn reset_offsets_gives_kafkas_offsets_and_only_executes_when_asked() {
    let db = TestDb::migrated().await;
    group_at(&db, "g", 2).await;
    let client = db.client().await;
    let ends: Vec<i64> = column(&client, "SELECT log_end_offset FROM partition_heads WHERE topic = 'order-created' ORDER BY partition").await;
    let new_offsets = |planned: &Value| -> Vec<i64> {
        planned
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["new_offset"].as_i64().unwrap())
            .collect()
    };
    assert!(new_offsets(&reset(&db, &["--to-earliest"]).await)
        .iter()
        .all(|&o| o == 0));
    assert_eq!(new_offsets(&reset(&db, &["--to-latest"]).await), ends);
    let to_three: Vec<i64> = ends.iter().map(|&e| e.min(3)).collect();
    assert_eq!(
        new_offsets(&reset(&db, &["--to-offset", "3"]).await),
        to_three,
        "clamped to the log end"
    );
    let shifted: Vec<i64> = ends.iter().map(|&e| (e.min(2) - 1).max(0)).collect();
    assert_eq!(
        new_offsets(&reset(&db, &["--shift-by", "-1"]).await),
        shifted
    );
    let future = (Utc::now() + Days::days(1))
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    assert_eq!(
        new_offsets(&reset(&db, &["--to-datetime", &future]).await),
        ends,
        "no record after it: the log end"
    );
    assert!(
        new_offsets(&reset(&db, &["--by-duration", "P1D"]).await)
            .iter()
            .all(|&o| o == 0),
        "everything is newer than a day"
    );
    let one_partition = reset(&db, &["--to-earliest"]).await;
    assert_eq!(one_partition.as_array().unwrap().len(), 8);

    // All of those were dry runs.
    let committed: Vec<i64> = column(
        &client,
        "SELECT committed_offset FROM group_partitions WHERE group_id = 'g' ORDER BY partition",
    )
    .await;
    assert_eq!(
        committed,
        ends.iter().map(|&e| e.min(2)).collect::<Vec<_>>()
    );
    let partial = run(
        &db,
        [
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "order-created:0,1",
            "--to-earliest",
            "--execute",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(partial.status.success(), "{}", stderr(&partial));
    let committed: Vec<i64> = column(
        &client,
        "SELECT committed_offset FROM group_partitions WHERE group_id = 'g' ORDER BY partition",
    )
    .await;
    assert_eq!(&committed[..2], &[0, 0]);
    assert_eq!(
        &committed[2..],
        &ends[2..].iter().map(|&e| e.min(2)).collect::<Vec<_>>()[..]
    );
}

#[tokio::test]
async fn reset_offsets_refuses_an_active_group_and_fences_a_stale_member() {
    let db = TestDb::migrated().await;
    group_at(&db, "g", 5).await;
    // A member owns the partitions (at their current epochs).
    let mut config = crate::mail::fast_group_config("g");
    config.session_timeout = Duration::from_secs(30);
    let member = outbox_relay::group::Membership::join(&db.url, config)
        .await
        .unwrap();
    let owned = member.heartbeat().await.unwrap().owned;
    assert_eq!(owned.len(), 8);

    let refused = run(
        &db,
        [
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "order-created",
            "--to-earliest",
            "--execute",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert_one_line_failure(&refused, "can only be reset if the group 'g' is inactive");

    // The member goes silent (its session is over) but will wake up later.
    let client = db.client().await;
    client
        .execute("UPDATE group_members SET heartbeat_at = now() - interval '1 hour' WHERE group_id = 'g'", &[])
        .await
        .unwrap();
    let done = run(
        &db,
        [
            "groups",
            "reset-offsets",
            "g",
            "--topic",
            "order-created",
            "--to-earliest",
            "--execute",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    assert!(done.status.success(), "{}", stderr(&done));
    assert!(
        !member.commit(&owned[0], 5).await.unwrap(),
        "the stale member's commit is fenced"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM group_partitions WHERE group_id = 'g' AND committed_offset <> 0"
        )
        .await,
        0
    );

    let deleted = run(&db, ["groups", "delete", "g"].map(String::from).to_vec()).await;
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM group_partitions WHERE group_id = 'g'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM group_members WHERE group_id = 'g'"
        )
        .await,
        0
    );
    assert_one_line_failure(
        &run(&db, ["groups", "delete", "g"].map(String::from).to_vec()).await,
        "does not exist",
    );
}

// ─── parked rows ────────────────────────────────────────────────────────────

#[tokio::test]
async fn parked_rows_are_redriven_once_their_topic_exists() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let created_at = Utc::now() - Days::days(3);
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, created_at) VALUES ('later', 'k', '{\"n\": 1}', $1)",
            &[&created_at],
        )
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_parked").await,
        1
    );

    let early = run(
        &db,
        ["parked", "redrive", "--all"].map(String::from).to_vec(),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&early.stdout).contains("still parked"),
        "{}",
        stderr(&early)
    );
    let listed = run(
        &db,
        ["parked", "list", "--output", "json"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let rows: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        rows[0]["reason"]
            .as_str()
            .unwrap()
            .contains("unknown topic"),
        "{rows}"
    );

    let created = run(
        &db,
        ["topics", "create", "later", "--partitions", "2"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let redriven = run(
        &db,
        ["parked", "redrive", "--all"].map(String::from).to_vec(),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&redriven.stdout).contains("re-driven into the outbox: 1"),
        "{}",
        stderr(&redriven)
    );
    let again = run(
        &db,
        ["parked", "redrive", "--all"].map(String::from).to_vec(),
    )
    .await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("re-driven into the outbox: 0"));
    drain(&mut relay).await;
    let logged: Vec<chrono::DateTime<Utc>> = column(
        &client,
        "SELECT created_at FROM event_log WHERE topic = 'later'",
    )
    .await;
    assert_eq!(logged.len(), 1, "in the log once");
    assert!(
        (logged[0] - created_at).num_milliseconds().abs() < 1,
        "with its original created_at"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_parked").await,
        0
    );

    let altered = run(
        &db,
        ["topics", "alter", "later", "--retention", "90d"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(altered.status.success(), "{}", stderr(&altered));
    let retention: i64 = client
        .query_one(
            "SELECT extract(epoch FROM retention)::int8 FROM topics WHERE name = 'later'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(retention, 90 * 86_400);
}

/// Events left in doubt stay in doubt until asked: `--resend-in-doubt`
/// sends them even once the run is done and its cursor is past them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_doubt_are_sent_again_only_on_request_even_after_the_run_is_done() {
    let db = TestDb::migrated().await;
    sixty_days_of_orders(&db, 0).await;
    let smtp = SmtpServer::start(&[]).await;
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from-offset".into(),
            "0:0".into(),
            "--to-offset".into(),
            "0:3".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(smtp.messages().len(), 3);
    // As if the run had stopped while offset 1 was in flight.
    let client = db.client().await;
    client
        .execute("UPDATE replay_deliveries SET status = 'sending' WHERE partition = 0 AND \"offset\" = 1", &[])
        .await
        .unwrap();
    let run_id: i64 = client
        .query_one("SELECT id FROM replay_runs", &[])
        .await
        .unwrap()
        .get(0);
    let refused = run(
        &db,
        vec![
            "replay".into(),
            "--resume".into(),
            run_id.to_string(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert_one_line_failure(&refused, "is done");
    let again = run(
        &db,
        vec![
            "replay".into(),
            "--resume".into(),
            run_id.to_string(),
            "--resend-in-doubt".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(again.status.success(), "{}", stderr(&again));
    let mails = mailed(&smtp);
    assert_eq!(mails.len(), 4, "offset 1 sent once more, nothing else");
    assert_eq!(
        mails
            .iter()
            .filter(|m| m.1.ends_with(".order-created.0.1@outbox-relay>"))
            .count(),
        2
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM replay_deliveries WHERE status = 'sending'"
        )
        .await,
        0
    );
}

/// A final answer later than the limit leaves the event's outcome unknown
/// (the server may have it): the run settles it as `unknown` after that one
/// attempt and never sends it again, and lists it with its dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_without_a_final_answer_is_unknown_and_not_sent_again_by_the_run() {
    let db = TestDb::migrated().await;
    sixty_days_of_orders(&db, 0).await;
    // Takes each message whole, then answers 250 after 1.5 s (past the
    // client's limit: it hangs up first).
    let smtp = SmtpServer::start(&["--delay-ms", "1500"]).await;
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from-offset".into(),
            "0:0".into(),
            "--to-offset".into(),
            "0:2".into(),
            "--smtp-final-reply-timeout-secs".into(),
            "0.3".into(),
            "--retry-for".into(),
            "5s".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("unknown 2"), "{summary}");
    let client = db.client().await;
    let settled = client
        .query(
            "SELECT status, attempts FROM replay_deliveries ORDER BY \"offset\"",
            &[],
        )
        .await
        .unwrap();
    let settled: Vec<(String, i32)> = settled.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        settled,
        vec![("unknown".to_string(), 1), ("unknown".to_string(), 1)],
        "one attempt each (never sent again by the run), settled as unknown"
    );
    let run_id: i64 = client
        .query_one("SELECT id FROM replay_runs", &[])
        .await
        .unwrap()
        .get(0);
    let described = run(
        &db,
        vec![
            "replay".into(),
            "describe".into(),
            run_id.to_string(),
            "--output".into(),
            "json".into(),
        ],
    )
    .await;
    assert!(described.status.success(), "{}", stderr(&described));
    let described: Value = serde_json::from_slice(&described.stdout).unwrap();
    let text = described.to_string();
    assert!(
        text.contains("unknown") && text.contains("it may have gone out"),
        "{text}"
    );
}

/// Ctrl-C stops a run cleanly: the mails in flight finish, the summary says
/// `interrupted` with the resume command, and resuming mails the rest, each
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_a_run_with_a_summary_and_the_resume_command() {
    let db = TestDb::migrated().await;
    let all = sixty_days_of_orders(&db, 60).await;
    let smtp = SmtpServer::start(&[]).await;
    let (_, child) = slow_replay(&db, &smtp, std::process::Stdio::piped());
    let pid = child.id().unwrap().to_string();
    eventually("ten mails of the run", Duration::from_secs(30), || async {
        (smtp.messages().len() >= 10).then_some(())
    })
    .await;
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let stopped = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("stopped within 30 s of Ctrl-C")
        .unwrap();
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    let summary = String::from_utf8_lossy(&stopped.stdout);
    let run_id: i64 = db
        .client()
        .await
        .query_one("SELECT id FROM replay_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        summary.contains(&format!("run {run_id} interrupted")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!(
            "resume with: outbox-relay replay --resume {run_id}"
        )),
        "{summary}"
    );
    assert!(
        summary.contains("in doubt 0"),
        "in-flight mails finished: {summary}"
    );
    let sent_before = smtp.messages().len();
    assert!(sent_before < all.len(), "stopped before the end");

    let resumed = run(
        &db,
        vec![
            "replay".into(),
            "--resume".into(),
            run_id.to_string(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let mut ids: Vec<i64> = mailed(&smtp).iter().map(|m| m.0).collect();
    ids.sort();
    assert_eq!(ids, all, "every event of the range, once");
}

/// `--max-rate` spaces the mails out: six mails at 10/s take at least the
/// five intervals between them (a lower bound the limiter guarantees,
/// whatever the machine's speed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rate_spaces_the_mails_of_a_run() {
    let db = TestDb::migrated().await;
    sixty_days_of_orders(&db, 0).await;
    let smtp = SmtpServer::start(&[]).await;
    let started = std::time::Instant::now();
    let out = run(
        &db,
        vec![
            "replay".into(),
            "--from-offset".into(),
            "0:0".into(),
            "--to-offset".into(),
            "0:6".into(),
            "--max-rate".into(),
            "10".into(),
            "--smtp-url".into(),
            smtp.url(),
        ],
    )
    .await;
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(smtp.messages().len(), 6);
    assert!(
        elapsed >= Duration::from_millis(500),
        "six mails at 10/s took {elapsed:?}"
    );
}

/// A replay killed outright leaves in doubt only what had reached its SMTP
/// exchange: `sending` is written once a connection of the pool is held,
/// so at most the pool's exchanges and the settles not yet written, not
/// every record read ahead (128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replay_leaves_in_doubt_at_most_the_exchanges_it_had_begun() {
    let db = TestDb::migrated().await;
    let all = sixty_days_of_orders(&db, 60).await;
    let smtp = SmtpServer::start(&["--delay-ms", "100"]).await;
    let mut child = binary(&db)
        .args(["replay", "--from", "2000-01-01", "--smtp-pool-size", "2"])
        .args(["--smtp-url", &smtp.url()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually("a few mails sent", Duration::from_secs(30), || async {
        (smtp.messages().len() >= 4).then_some(())
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let in_doubt = count(
        &db.client().await,
        "SELECT count(*) FROM replay_deliveries WHERE status = 'sending'",
    )
    .await;
    let received = smtp.messages().len();
    assert!(received < all.len(), "killed mid-run");
    assert!(
        in_doubt <= 4,
        "{in_doubt} events in doubt with 2 connections (the server has {received} of {})",
        all.len()
    );
}
