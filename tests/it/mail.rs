//! The mail worker against a real SMTP server (aiosmtpd) and a real Postgres.

use std::sync::Arc;
use std::time::Duration;

use outbox_relay::app::mail::{MailWorker, RetryPolicy, SmtpTarget, MAIL_GROUP};
use outbox_relay::app::order::{self, EmailAddress, NewOrder};
use outbox_relay::group::consumer::ConsumerConfig;
use outbox_relay::group::dead_letters::DeadLetterStatus;
use outbox_relay::group::GroupConfig;
use outbox_relay::shutdown::{self, ShutdownTrigger};

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
                .transport(8, Duration::from_secs(2))
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

pub fn fast_group_config(group: &str) -> GroupConfig {
    let mut config = GroupConfig::new(group, &["order-created"]);
    config.session_timeout = Duration::from_millis(1500);
    config.heartbeat_interval = Duration::from_millis(100);
    config
}

pub fn fast_retry(max_attempts: i32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
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

async fn wait_for_mails(smtp: &SmtpServer, n: usize, timeout: Duration) {
    eventually(
        &format!("{n} mails at the SMTP server"),
        timeout,
        || async { (smtp.messages().len() >= n).then_some(()) },
    )
    .await;
}

/// The group's committed offsets have reached the log end on every partition.
async fn wait_until_caught_up(db: &TestDb) {
    let client = db.client().await;
    eventually("the mail group to commit up to the log end", Duration::from_secs(30), || async {
        let behind = count(
            &client,
            "SELECT count(*) FROM partition_heads h
               LEFT JOIN group_partitions p ON p.group_id = 'mail-service' AND p.topic = h.topic AND p.partition = h.partition
              WHERE h.topic = 'order-created' AND coalesce(p.committed_offset, -1) < h.log_end_offset",
        )
        .await;
        (behind == 0).then_some(())
    })
    .await;
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
        assert!(mail.raw.contains("Order total"));
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

/// A server that stops answering mid-exchange costs a timeout per attempt,
/// never a stuck worker: the mail is parked once the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_smtp_server_times_out_and_the_mail_is_parked() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&["--hang"]).await;
    // The pipeline's SMTP timeout is 2 s; two attempts.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(2)).await;
    place_orders(&db, &["a@example.com"]).await;
    let client = db.client().await;
    let reason: String = eventually("the mail to be parked", Duration::from_secs(30), || async {
        client
            .query_opt(
                "SELECT last_error FROM dead_letters WHERE reason = 'retry budget spent'",
                &[],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    })
    .await;
    assert!(reason.contains("timed out"), "{reason}");
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
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
    assert!(
        outbox_relay::group::dead_letters::discard_dead_letter(&client, parked[1].id)
            .await
            .unwrap()
    );
    assert_eq!(
        outbox_relay::group::dead_letters::retry_dead_letters(&mut client, Some(parked[0].id))
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
        "SELECT count(*) FROM event_log WHERE headers ? 'retry-of'",
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(outbox_relay::http::serve(
        listener,
        db.pool(2),
        shutdown::Shutdown::never(),
    ));
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
