//! The mail worker against a real SMTP server (aiosmtpd) and a real Postgres.

use std::sync::Arc;
use std::time::Duration;

use outbox_relay::app::mail::{Delivery, Limits, MailWorker, RetryPolicy, SmtpTarget, MAIL_GROUP};
use outbox_relay::app::order::{self, EmailAddress, NewOrder};
use outbox_relay::group::consumer::ConsumerConfig;
use outbox_relay::group::consumer::Lease;
use outbox_relay::group::dead_letters::DeadLetterStatus;
use outbox_relay::group::GroupConfig;
use outbox_relay::shutdown::{self, ShutdownTrigger};
use serde_json::json;

use crate::harness::*;
use crate::smtp::SmtpServer;

/// Relay + mail worker running in this process.
pub struct Pipeline {
    trigger: ShutdownTrigger,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    pub async fn start(db: &TestDb, smtp_url: &str, retry: RetryPolicy) -> Pipeline {
        let (trigger, shutdown) = shutdown::channel();
        let relay = tokio::spawn(db.relay().run(shutdown.clone()));
        let worker = MailWorker::new(
            db.pool(8),
            SmtpTarget::parse(smtp_url)
                .unwrap()
                .transport(8, SMTP_LIMITS)
                .unwrap(),
            "shop@example.com".parse().unwrap(),
            retry,
        );
        let config = ConsumerConfig::new(fast_group_config(MAIL_GROUP));
        let url = db.url.clone();
        let consumer = tokio::spawn(async move {
            outbox_relay::group::consumer::run(&url, config, Arc::new(worker), shutdown)
                .await
                .unwrap();
        });
        Pipeline {
            trigger,
            tasks: vec![relay, consumer],
        }
    }

    pub async fn stop(self) {
        self.trigger.trigger();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// The pipeline's SMTP limits: 2 s per command, 4 s for the final answer.
pub const SMTP_LIMITS: Limits = Limits {
    command: Duration::from_secs(2),
    final_reply: Duration::from_secs(4),
};

pub fn fast_group_config(group: &str) -> GroupConfig {
    let mut config = GroupConfig::new(group, &["order-created"]);
    config.session_timeout = Duration::from_millis(1500);
    config.heartbeat_interval = Duration::from_millis(100);
    config
}

pub fn fast_retry(max_attempts: i32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: Some(max_attempts),
        retry_for: Duration::from_secs(3600),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    }
}

pub async fn place_orders(db: &TestDb, emails: &[&str]) -> Vec<i64> {
    let mut client = db.client().await;
    let mut ids = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        let tx = client.transaction().await.unwrap();
        let order = NewOrder {
            user_id: i as i64 + 1,
            email: EmailAddress::parse(email).unwrap(),
            amount: 1000 + i as i64,
        };
        ids.push(order::insert(&tx, &order).await.unwrap());
        tx.commit().await.unwrap();
    }
    ids
}

pub async fn wait_for_mails(smtp: &SmtpServer, n: usize, timeout: Duration) {
    eventually(
        &format!("{n} mails at the SMTP server"),
        timeout,
        || async { (smtp.messages().len() >= n).then_some(()) },
    )
    .await;
}

/// The group's committed offsets have reached the log end on every partition.
pub async fn wait_until_caught_up(db: &TestDb) {
    wait_until_group_caught_up(db, "mail-service", "order-created").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_gets_one_confirmation_mail() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    let emails: Vec<String> = (0..40).map(|i| format!("buyer{i}@example.com")).collect();
    let refs: Vec<&str> = emails.iter().map(String::as_str).collect();
    let ids = place_orders(&db, &refs).await;
    wait_for_mails(&smtp, 40, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    let mails = smtp.messages();
    assert_eq!(mails.len(), 40, "exactly one mail per order");
    for (id, email) in ids.iter().zip(&emails) {
        let mail = mails
            .iter()
            .find(|m| m.subject.contains(&format!("#{id} ")))
            .unwrap_or_else(|| panic!("no mail for order {id}"));
        assert_eq!(&mail.to, email);
        assert!(
            mail.message_id.starts_with("<order-created.")
                && mail.message_id.ends_with("@outbox-relay>")
        );
        assert!(mail.raw.contains("multipart/alternative") && mail.raw.contains("text/html"));
        // Amounts are minor units, shown as money (1000 + i cents).
        let i = emails.iter().position(|e| e == email).unwrap() as i64;
        let total = format!(
            "Order total: {}.{:02} EUR",
            (1000 + i) / 100,
            (1000 + i) % 100
        );
        assert!(mail.raw.contains(&total), "{total} in {}", mail.raw);
    }
    let distinct: std::collections::HashSet<&str> =
        mails.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(distinct.len(), 40, "Message-IDs are per event");
}

/// Invariant 8: after an offset reset (everything is redelivered), the
/// ledger stops any mail already sent from going out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_events_are_not_mailed_again() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    place_orders(&db, &["a@example.com", "b@example.com", "c@example.com"]).await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    wait_for_mails(&smtp, 3, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    // Rewind the (now empty) group to the start of every partition.
    let client = db.client().await;
    client
        .execute(
            "UPDATE group_partitions SET committed_offset = 0 WHERE group_id = 'mail-service'",
            &[],
        )
        .await
        .unwrap();
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(
        smtp.messages().len(),
        3,
        "a sent mail must not be sent again"
    );
    let sent = count(
        &client,
        "SELECT count(*) FROM mail_deliveries WHERE status = 'sent' AND attempts = 1",
    )
    .await;
    assert_eq!(sent, 3);
}

/// Invariant 9: transient 4xx answers are retried with backoff until they succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_until_they_succeed() {
    let db = TestDb::migrated().await;
    // The first three DATA commands are answered 451.
    let smtp = SmtpServer::start(&["--tempfail-first", "3"]).await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(50)).await;
    place_orders(&db, &["a@example.com", "b@example.com"]).await;
    wait_for_mails(&smtp, 2, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    let client = db.client().await;
    let attempts = count(
        &client,
        "SELECT sum(attempts)::int8 FROM mail_deliveries WHERE status = 'sent'",
    )
    .await;
    assert_eq!(attempts, 2 + 3, "two successes after three refusals");
    assert_eq!(count(&client, "SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(smtp.messages().len(), 2);
}

/// A server that takes the whole message and never answers: each attempt
/// ends after the final-answer limit with an unknown outcome (the server
/// may have the mail), never a stuck worker; when the retries end, the
/// ledger says `unknown`, nothing is parked as failed, and the partition
/// moves on (docs/invariants.md, 8 and 9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_the_message_is_an_unknown_outcome_not_a_dead_letter() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--hang"]).await;
    // Final answers are awaited 4 s; two attempts.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(2)).await;
    place_orders(&db, &["a@example.com"]).await;
    let client = db.client().await;
    let (attempts, unknown, last_error): (i32, i32, String) = eventually(
        "the outcome to be settled as unknown",
        Duration::from_secs(30),
        || async {
            client
                .query_opt(
                    "SELECT attempts, unknown_outcomes, last_error FROM mail_deliveries WHERE status = 'unknown'",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
        },
    )
    .await;
    assert_eq!((attempts, unknown), (2, 2));
    assert!(
        last_error.contains("no answer to the end of the message"),
        "{last_error}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM dead_letters").await, 0);
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
}

/// A server that answers `250` later than the per-command limit (2 s here,
/// 15 s by default) but within the final-answer limit (4 s here, RFC 5321's
/// 10 minutes by default): the worker waits for it, and one mail goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_final_answer_is_waited_for_and_the_order_gets_one_mail() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--delay-ms", "3000"]).await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    place_orders(&db, &["late@example.com", "later@example.com"]).await;
    wait_for_mails(&smtp, 2, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(
        smtp.messages().len(),
        2,
        "one mail per order, none repeated"
    );
    let client = db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT sum(attempts)::int8 FROM mail_deliveries WHERE status = 'sent'"
        )
        .await,
        2,
        "each sent at the first attempt"
    );
}

/// A server that is down and comes back: nothing is lost meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_server_down_then_back_loses_nothing() {
    let db = TestDb::migrated().await;
    let mut smtp = SmtpServer::start(&[]).await;
    smtp.stop().await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(1000)).await;
    place_orders(&db, &["a@example.com", "b@example.com", "c@example.com"]).await;
    let client = db.client().await;
    eventually(
        "failed attempts while the server is down",
        Duration::from_secs(30),
        || async {
            (count(
                &client,
                "SELECT count(*) FROM mail_deliveries WHERE attempts >= 2 AND status = 'pending'",
            )
            .await
                == 3)
                .then_some(())
        },
    )
    .await;
    smtp.restart().await;
    wait_for_mails(&smtp, 3, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(smtp.messages().len(), 3);
}

/// A permanent refusal and an undecodable payload are parked as dead
/// letters, and the partition moves on to the records after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_and_poison_payloads_are_parked_and_the_partition_moves_on() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--reject", "bounce@example.com"]).await;
    let client = db.client().await;
    // Same key for all, so they share a partition and come in this order.
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload) VALUES
               ('order-created', 'k', '{\"garbage\": true}'),
               ('order-created', 'k', '{\"order_id\": 1, \"user_id\": 1, \"amount\": 5, \"email\": \"bounce@example.com\"}'),
               ('order-created', 'k', '{\"order_id\": 2, \"user_id\": 1, \"amount\": 5, \"email\": \"a\\r\\nBcc: x@example.com\"}'),
               ('order-created', 'k', '{\"order_id\": 3, \"user_id\": 1, \"amount\": 5, \"email\": \"ok@example.com\"}')",
            &[],
        )
        .await
        .unwrap();
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    let mails = smtp.messages();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, "ok@example.com");
    let reasons: Vec<String> = column(
        &client,
        "SELECT reason FROM dead_letters ORDER BY \"offset\"",
    )
    .await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].starts_with("undecodable payload"), "{reasons:?}");
    assert_eq!(reasons[1], "permanent SMTP failure");
    assert!(reasons[2].starts_with("invalid recipient"), "{reasons:?}");
    let last_error: String = client
        .query_one(
            "SELECT last_error FROM dead_letters WHERE reason = 'permanent SMTP failure'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(last_error.contains("550"), "{last_error}");
}

/// Dead letters can be retried (republished through the outbox) and discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_retried_and_discarded() {
    let db = TestDb::migrated().await;
    let mut smtp = SmtpServer::start(&[]).await;
    smtp.stop().await;
    // With the server down and a budget of 2 attempts, both mails are parked.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(2)).await;
    place_orders(&db, &["a@example.com", "b@example.com"]).await;
    let mut client = db.client().await;
    eventually("two dead letters", Duration::from_secs(30), || async {
        (count(
            &client,
            "SELECT count(*) FROM dead_letters WHERE reason = 'retry budget spent'",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    smtp.restart().await;
    let parked = outbox_relay::group::dead_letters::list_dead_letters(
        &client,
        Some(MAIL_GROUP),
        Some(DeadLetterStatus::Parked),
    )
    .await
    .unwrap();
    assert_eq!(parked.len(), 2);
    assert_eq!(
        outbox_relay::group::dead_letters::discard_dead_letters(
            &client,
            &outbox_relay::group::dead_letters::Selection::one(parked[1].id),
        )
        .await
        .unwrap(),
        1
    );
    assert_eq!(
        outbox_relay::group::dead_letters::retry_dead_letters(
            &mut client,
            &outbox_relay::group::dead_letters::Selection::one(parked[0].id),
        )
        .await
        .unwrap(),
        1
    );
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(smtp.messages().len(), 1);
    assert!(outbox_relay::group::dead_letters::list_dead_letters(
        &client,
        None,
        Some(DeadLetterStatus::Parked)
    )
    .await
    .unwrap()
    .is_empty());
    let retried = count(
        &client,
        "SELECT count(*) FROM event_log WHERE headers ? 'outbox-relay-retry-of'",
    )
    .await;
    assert_eq!(retried, 1);
}

/// `GET /orders/{id}` tells whether the order's confirmation went out:
/// pending before the worker ran, then sent (with its Message-ID), or a
/// dead letter with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_order_reports_the_confirmation_mail_state() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--reject", "bounce@example.com"]).await;
    let api = InProcess::api(&db).await;
    let base = api.base();
    let ids = place_orders(&db, &["ok@example.com", "bounce@example.com"]).await;
    let http = reqwest::Client::new();
    let mail_of = |id: i64| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let order: serde_json::Value = http
                .get(format!("{base}/orders/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            order["confirmation_mail"].clone()
        }
    };
    assert_eq!(mail_of(ids[0]).await["status"], "pending");

    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    let sent = mail_of(ids[0]).await;
    assert_eq!(sent["status"], "sent", "{sent}");
    assert_eq!(sent["message_id"], smtp.messages()[0].message_id);
    assert!(sent["sent_at"].is_string(), "{sent}");
    let parked = mail_of(ids[1]).await;
    assert_eq!(parked["status"], "dead_letter", "{parked}");
    assert_eq!(parked["reason"], "permanent SMTP failure");
    assert!(
        parked["last_error"].as_str().unwrap().contains("550"),
        "{parked}"
    );
}

/// On the embedded default mails are `.eml` files named by order id, so
/// one order's mail is found with `ls order-<id>.*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eml_files_are_named_by_order_id() {
    let db = TestDb::migrated().await;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("eml-{:x}", rand::random::<u32>()));
    let url = url::Url::from_directory_path(&dir).unwrap().to_string();
    let ids = place_orders(&db, &["a@example.com", "b@example.com"]).await;
    let pipeline = Pipeline::start(&db, &url, fast_retry(5)).await;
    // Caught up holds trivially before the relay has appended anything.
    let client = db.client().await;
    eventually(
        "both orders in the log",
        Duration::from_secs(30),
        || async { (count(&client, "SELECT count(*) FROM event_log").await == 2).then_some(()) },
    )
    .await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(names.len(), 2, "{names:?}");
    for (name, id) in names.iter().zip(&ids) {
        assert!(
            name.starts_with(&format!("order-{id}.order-created.")) && name.ends_with(".eml"),
            "{name}"
        );
    }
}

/// A worker of our own, driven record by record.
fn worker(db: &TestDb, smtp_url: &str, retry: RetryPolicy) -> MailWorker {
    MailWorker::new(
        db.pool(4),
        SmtpTarget::parse(smtp_url)
            .unwrap()
            .transport(4, SMTP_LIMITS)
            .unwrap(),
        "shop@example.com".parse().unwrap(),
        retry,
    )
}

/// The first record of the log (after relaying what the outbox holds), and
/// a lease on its partition for `member` at the partition's current epoch.
async fn first_record(db: &TestDb, member: &str) -> (outbox_relay::log::Record, Lease) {
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
    let client = db.client().await;
    let (partition, offset): (i32, i64) = {
        let row = client
            .query_one(
                "SELECT partition, \"offset\" FROM event_log ORDER BY outbox_id LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let record = outbox_relay::log::read(&client, "order-created", partition, offset, 1)
        .await
        .unwrap()
        .remove(0);
    let epoch: i64 = client
        .query_one(
            "INSERT INTO group_partitions (group_id, topic, partition, owner, epoch)
             VALUES ('mail-service', 'order-created', $1, $2, 1)
             ON CONFLICT (group_id, topic, partition) DO UPDATE SET owner = $2, epoch = group_partitions.epoch + 1
             RETURNING epoch",
            &[&partition, &member],
        )
        .await
        .unwrap()
        .get(0);
    let lease = Lease {
        group_id: MAIL_GROUP.into(),
        member_id: member.into(),
        topic: "order-created".into(),
        partition,
        epoch,
    };
    (record, lease)
}

/// Issue "faults", 3: a mail the server accepted is recorded even if the
/// worker that sent it is stopped before the ledger write (a partition
/// worker restarted after a database error); the restarted worker waits for
/// that record and does not send the mail again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_mail_outlives_its_stopped_worker_and_is_not_sent_again() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    place_orders(&db, &["once@example.com"]).await;
    let (record, lease) = first_record(&db, "member-a").await;
    let worker = Arc::new(worker(&db, &smtp.url(), fast_retry(5)));

    // The ledger cannot be written for now (as during a database restart).
    let mut blocker = db.client().await;
    let lock = blocker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE mail_deliveries IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let first = {
        let (worker, record, lease) = (worker.clone(), record.clone(), lease.clone());
        tokio::spawn(async move { worker.process(&record, &lease).await })
    };
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    // The server has the mail before the worker has its 250: stop the
    // worker once it handed the mark over (a busy machine may take a while).
    eventually(
        "the sent mark to be handed to the ledger",
        Duration::from_secs(30),
        || async { worker.is_recording(&record).then_some(()) },
    )
    .await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(
        worker.is_recording(&record),
        "the sent mark outlives the stopped worker"
    );

    let second = {
        let (worker, record, lease) = (worker.clone(), record.clone(), lease.clone());
        tokio::spawn(async move { worker.process(&record, &lease).await })
    };
    lock.rollback().await.unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second worker finishes once the ledger is written")
        .unwrap();
    assert_eq!(delivery, Delivery::AlreadySent);
    assert_eq!(smtp.messages().len(), 1, "the mail went out once");
    let client = db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'"
        )
        .await,
        1
    );
}

/// The record after `record` in its partition, appended now (same key).
async fn next_record_in_partition(
    db: &TestDb,
    record: &outbox_relay::log::Record,
    email: &str,
) -> outbox_relay::log::Record {
    let client = db.client().await;
    insert_event(
        &client,
        "order-created",
        record.key.as_deref().unwrap(),
        json!({"order_id": 990_000 + record.offset, "user_id": 1, "amount": 5, "email": email}),
    )
    .await;
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
    outbox_relay::log::read(
        &client,
        "order-created",
        record.partition,
        record.offset + 1,
        1,
    )
    .await
    .unwrap()
    .remove(0)
}

/// Issue "performance": a record appended after the partition's ledger
/// ceiling was read is mailed without a ledger read, but the ceiling rises
/// with every mail this process sends: the same record handled again (its
/// partition worker restarted after the mark was written) reads the ledger
/// and is not mailed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_handled_again_by_the_same_process_is_not_mailed_twice() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    place_orders(&db, &["first@example.com"]).await;
    let (first, lease) = first_record(&db, "member-a").await;
    let worker = worker(&db, &smtp.url(), fast_retry(5));
    // Reads the ceiling: the partition's last offset now.
    assert_eq!(
        worker.process(&first, &lease).await,
        Delivery::Sent { attempts: 1 }
    );
    let second = next_record_in_partition(&db, &first, "twice@example.com").await;
    assert_eq!(
        worker.process(&second, &lease).await,
        Delivery::Sent { attempts: 1 }
    );
    assert!(!worker.is_recording(&second), "the mark is in the ledger");
    assert_eq!(worker.process(&second, &lease).await, Delivery::AlreadySent);
    assert_eq!(smtp.messages().len(), 2, "each mail went out once");
}

/// Issue "performance": a former owner's `sent` mark may land after the new
/// owner read the ledger ceiling (marks are not fenced). Every record that
/// was in the log when the ceiling was read is at or below it, so its
/// ledger is read at handling time and the mail is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owners_late_sent_mark_is_seen_by_the_new_owner() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    place_orders(&db, &["first@example.com"]).await;
    let (first, _) = first_record(&db, "old-owner").await;
    let second = next_record_in_partition(&db, &first, "late@example.com").await;
    let (_, lease) = first_record(&db, "new-owner").await;
    let worker = worker(&db, &smtp.url(), fast_retry(5));
    // The new owner's first handling reads the ceiling...
    assert_eq!(
        worker.process(&first, &lease).await,
        Delivery::Sent { attempts: 1 }
    );
    // ...then the old owner's mark for the second record lands.
    db.client()
        .await
        .execute(
            "INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", key, message_id, recipient, status, attempts, sent_at)
             VALUES ('mail-service', $1, $2, $3, $4, 'old-owner', 'late@example.com', 'sent', 1, now())",
            &[&second.topic, &second.partition, &second.offset, &second.key],
        )
        .await
        .unwrap();
    assert_eq!(worker.process(&second, &lease).await, Delivery::AlreadySent);
    assert_eq!(
        smtp.messages().len(),
        1,
        "the old owner's mail is not sent again"
    );
}

/// Issue "faults", 4: a member that lost its partition writes nothing on
/// the group's behalf: no failed-attempt mark, no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_lost_its_partition_writes_nothing_to_the_ledger() {
    let db = TestDb::migrated().await;
    let smtp =
        SmtpServer::start(&["--tempfail-first", "100", "--reject", "bounce@example.com"]).await;
    place_orders(&db, &["a@example.com"]).await;
    let (record, stale) = first_record(&db, "old-owner").await;
    // Someone else owns the partition now (a new epoch).
    first_record(&db, "new-owner").await;
    let worker = worker(&db, &smtp.url(), fast_retry(5));
    assert_eq!(worker.process(&record, &stale).await, Delivery::Fenced);
    let client = db.client().await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM mail_deliveries").await,
        0
    );

    // A permanent refusal is not parked by a stale member either.
    let mut bounced = record.clone();
    bounced.payload["email"] = json!("bounce@example.com");
    assert_eq!(worker.process(&bounced, &stale).await, Delivery::Fenced);
    assert_eq!(count(&client, "SELECT count(*) FROM dead_letters").await, 0);
}

/// Issue "faults", 7: a payload that is not an object is parked, not read
/// by position; a header in outbox-relay's reserved namespace set by a
/// writer is dropped by the relay, so it cannot steer the Message-ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_cannot_disguise_payloads_or_set_reserved_headers() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers) VALUES
               ('order-created', 'k', '[424242, 1, 99, \"array-payload@example.com\"]', '{}'),
               ('order-created', 'k', '{\"order_id\": 5, \"user_id\": 1, \"amount\": 7, \"email\": \"real@example.com\"}',
                '{\"outbox-relay-retry-of\": \"order-created/0/0\", \"outbox-relay-future\": \"x\", \"event-type\": \"OrderCreated\", \"note\": \"outbox-relay-in-a-value\"}')",
            &[],
        )
        .await
        .unwrap();
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(5)).await;
    wait_for_mails(&smtp, 1, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    let mails = smtp.messages();
    assert_eq!(mails.len(), 1, "the array payload is not mailed");
    assert_eq!(mails[0].to, "real@example.com");
    let (partition, offset): (i32, i64) = {
        let row = client
            .query_one(
                "SELECT partition, \"offset\" FROM event_log WHERE payload ? 'order_id'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        mails[0].message_id,
        format!("<order-created.{partition}.{offset}@outbox-relay>"),
        "its own Message-ID, not order-created.0.0's"
    );
    let headers: serde_json::Value = client
        .query_one(
            "SELECT headers FROM event_log WHERE payload ? 'order_id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        headers,
        json!({"event-type": "OrderCreated", "note": "outbox-relay-in-a-value"}),
        "every header named outbox-relay-… removed, values untouched"
    );
    let reason: String = client
        .query_one("SELECT reason FROM dead_letters", &[])
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("not a JSON object"), "{reason}");
}
