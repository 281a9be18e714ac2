//! The webhook sink against a receiver nobody here wrote checking every
//! signature: the standardwebhooks package from PyPI, run by
//! tests/support/webhook_receiver.py. The sink runs as the real binary
//! (`serve --roles webhook`).

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::*;

/// One request as the receiver logged it.
#[derive(Debug, Clone, serde::Deserialize)]
struct Received {
    id: Option<String>,
    verified: bool,
    status: u16,
    key: Option<String>,
    offset: Option<i64>,
    partition: Option<i32>,
    traceparent: Option<String>,
    /// The replay run that sent it (`outbox-relay-replay`), if any.
    replay: Option<String>,
}

struct Receiver {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    _child: Child,
}

impl Receiver {
    async fn start(secret: &str, options: &[&str]) -> Receiver {
        let port = free_port();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/webhook_receiver.py"
        );
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--secret", secret])
            .args(options)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 tests/support/webhook_receiver.py (pip install standardwebhooks)");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the receiver did not start within 20 s")
            .unwrap();
        assert_eq!(
            ready.as_deref(),
            Some("READY"),
            "is standardwebhooks installed?"
        );
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                log.lock()
                    .unwrap()
                    .push(serde_json::from_str::<Received>(&line).expect("a receiver line"));
            }
        });
        Receiver {
            port,
            received,
            _child: child,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/orders", self.port)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Ids the receiver accepted (answered 2xx, signature verified).
    fn accepted(&self) -> HashMap<String, usize> {
        let mut ids = HashMap::new();
        for r in self.received() {
            if r.status == 200 && r.verified {
                *ids.entry(r.id.unwrap()).or_default() += 1;
            }
        }
        ids
    }
}

fn secret() -> String {
    let key: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// `serve --roles webhook` with one sink, `test`.
fn sink(db: &TestDb, url: &str, secret: &str, timeout_secs: &str) -> Child {
    sink_with(db, url, secret, timeout_secs, &[])
}

fn sink_with(db: &TestDb, url: &str, secret: &str, timeout_secs: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["serve", "--roles", "webhook", "--no-migrate"])
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_SINKS", "test")
        .env("WEBHOOK_TEST_URL", url)
        .env("WEBHOOK_TEST_SECRET", secret)
        .env("WEBHOOK_TEST_TIMEOUT_SECS", timeout_secs)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// `count` events over `keys` keys (so each key has several, in order),
/// every tenth with a traceparent, relayed into the log.
async fn events(db: &TestDb, count: i64, keys: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers)
             SELECT 'order-created', 'k' || (n % $2), jsonb_build_object('order_id', n, 'user_id', 1,
                    'amount', 100 + n, 'email', 'c' || n || '@example.com'),
                    CASE WHEN n % 10 = 0 THEN jsonb_build_object('traceparent',
                        '00-' || lpad(to_hex(n), 32, '0') || '-00f067aa0ba902b7-01') ELSE '{}' END
               FROM generate_series(1, $1::int8) n",
            &[&count, &keys],
        )
        .await
        .unwrap();
    drain(&mut db.relay()).await;
}

/// Per key, the offsets of the first accepted delivery of each event, in
/// the order the receiver got them, must rise.
fn assert_key_order(received: &[Received]) {
    let mut seen = HashSet::new();
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    for r in received.iter().filter(|r| r.status == 200) {
        if !seen.insert(r.id.clone()) {
            continue;
        }
        let key = (r.key.clone().unwrap(), r.partition.unwrap());
        let offset = r.offset.unwrap();
        if let Some(previous) = last.insert(key.clone(), offset) {
            assert!(
                previous < offset,
                "key {key:?}: offset {offset} after {previous}"
            );
        }
    }
}

async fn wait_accepted(receiver: &Receiver, count: usize, limit: Duration) {
    eventually(
        &format!("{count} events accepted by the receiver"),
        limit,
        || async { (receiver.accepted().len() >= count).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_receiver_once_signed_and_in_key_order() {
    let db = TestDb::migrated().await;
    let secret = secret();
    let receiver = Receiver::start(&secret, &[]).await;
    events(&db, 2000, 50).await;
    let _sink = sink(&db, &receiver.url(), &secret, "10");
    wait_accepted(&receiver, 2000, Duration::from_secs(120)).await;
    wait_until_group_caught_up(&db, "webhook-test", "order-created").await;

    let received = receiver.received();
    assert!(
        received.iter().all(|r| r.verified),
        "every signature verified"
    );
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 2000);
    assert!(accepted.values().all(|n| *n == 1), "each event once");
    assert_key_order(&received);
    let traced = received.iter().filter(|r| r.traceparent.is_some()).count();
    assert_eq!(traced, 200, "the events' traceparent is forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_503_loses_nothing_and_keeps_key_order() {
    let db = TestDb::migrated().await;
    let secret = secret();
    let receiver = Receiver::start(&secret, &["--fail-seconds", "5"]).await;
    events(&db, 200, 10).await;
    let _sink = sink(&db, &receiver.url(), &secret, "10");
    wait_accepted(&receiver, 200, Duration::from_secs(60)).await;
    let received = receiver.received();
    assert!(
        received.iter().any(|r| r.status == 503),
        "the outage was seen"
    );
    assert!(receiver.accepted().values().all(|n| *n == 1));
    assert_key_order(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_receiver_refuses_is_parked_and_the_rest_go_on() {
    let db = TestDb::migrated().await;
    let secret = secret();
    // Key k3: every event of it is refused with a 400.
    let receiver = Receiver::start(&secret, &["--reject-key", "k3"]).await;
    // Scraped by a real Prometheus with the shipped rules from before the
    // first event, so the alert sees the dead letters grow.
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let _sink = sink_with(
        &db,
        &receiver.url(),
        &secret,
        "10",
        &["--metrics-addr", &metrics_addr],
    );
    let prometheus = crate::metrics::Prometheus::start_with_rules(
        &metrics_addr,
        Some(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/alerts.yml")),
    )
    .await;
    prometheus
        .value_within(
            r#"sum(outbox_relay_deliveries_total{group="webhook-test",outcome="parked"})"#,
            30,
        )
        .await;
    events(&db, 100, 10).await;
    wait_accepted(&receiver, 90, Duration::from_secs(60)).await;
    wait_until_group_caught_up(&db, "webhook-test", "order-created").await;
    let client = db.client().await;
    let parked: Vec<(String, String)> = client
        .query(
            "SELECT reason, last_error FROM dead_letters WHERE group_id = 'webhook-test' AND key = 'k3'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(parked.len(), 10, "{parked:?}");
    assert!(parked.iter().all(
        |(reason, error)| reason == "the receiver refused it (HTTP 400)"
            && error.contains("order rejected by the receiver")
    ));
    let out = crate::cli::outbox_relay(
        Some(&db.url),
        &["dead-letters", "list", "--group", "webhook-test"],
    );
    assert!(out.status.success(), "{}", crate::cli::stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("HTTP 400"));
    // The dashboard's webhook row answers, and the alert fires.
    crate::observability::dashboard_panels_answer(
        &prometheus,
        |panel| panel.starts_with("Webhooks"),
        "no series may be empty",
    )
    .await;
    eventually("the webhook alert", Duration::from_secs(60), || async {
        let alerts = prometheus.api("alerts", &[]).await?;
        alerts["data"]["alerts"]
            .as_array()?
            .iter()
            .any(|a| {
                a["labels"]["alertname"] == "OutboxRelayWebhookDeadLetters"
                    && a["labels"]["group"] == "webhook-test"
                    && a["state"] == "firing"
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_slower_than_the_timeout_gets_the_event_again_with_the_same_id() {
    let db = TestDb::migrated().await;
    let secret = secret();
    let receiver = Receiver::start(&secret, &["--slow-first", "1", "--slow-ms", "2500"]).await;
    events(&db, 1, 1).await;
    let _sink = sink(&db, &receiver.url(), &secret, "1");
    eventually("the event twice", Duration::from_secs(30), || async {
        (receiver.received().len() >= 2).then_some(())
    })
    .await;
    let ids: HashSet<Option<String>> = receiver.received().into_iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1, "the same webhook-id: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_refused_by_the_receiver_and_parked() {
    let db = TestDb::migrated().await;
    let receiver = Receiver::start(&secret(), &[]).await;
    events(&db, 3, 3).await;
    let _sink = sink(&db, &receiver.url(), &secret(), "10");
    wait_until_group_caught_up(&db, "webhook-test", "order-created").await;
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| !r.verified && r.status == 401));
    let parked = count(
        &db.client().await,
        "SELECT count(*) FROM dead_letters WHERE group_id = 'webhook-test' AND reason = 'the receiver refused it (HTTP 401)'",
    )
    .await;
    assert_eq!(parked, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sink_resumes_and_repeats_only_with_the_same_ids() {
    let db = TestDb::migrated().await;
    let secret = secret();
    let receiver = Receiver::start(&secret, &[]).await;
    events(&db, 2000, 50).await;
    let mut first = sink(&db, &receiver.url(), &secret, "10");
    wait_accepted(&receiver, 300, Duration::from_secs(60)).await;
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let _second = sink(&db, &receiver.url(), &secret, "10");
    wait_accepted(&receiver, 2000, Duration::from_secs(120)).await;
    wait_until_group_caught_up(&db, "webhook-test", "order-created").await;
    // Every event under one id, the same every time it came.
    let mut events_of_id: HashMap<String, HashSet<(i32, i64)>> = HashMap::new();
    for r in receiver.received() {
        events_of_id
            .entry(r.id.unwrap())
            .or_default()
            .insert((r.partition.unwrap(), r.offset.unwrap()));
    }
    assert_eq!(events_of_id.len(), 2000);
    assert!(events_of_id.values().all(|events| events.len() == 1));
    assert_key_order(&receiver.received());
}

/// A sink configured wrong stops the process at start, in one line.
#[tokio::test]
async fn a_bad_sink_configuration_is_one_line_at_start() {
    let db = TestDb::migrated().await;
    for (vars, needle) in [
        (vec![], "WEBHOOK_TEST_URL is not set"),
        (
            vec![
                ("WEBHOOK_TEST_URL", "ftp://x"),
                (
                    "WEBHOOK_TEST_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
            ],
            "not an http(s) URL",
        ),
        (
            vec![
                ("WEBHOOK_TEST_URL", "http://x"),
                ("WEBHOOK_TEST_SECRET", "s3cret"),
            ],
            "starts with whsec_",
        ),
        (
            vec![
                ("WEBHOOK_TEST_URL", "http://x"),
                (
                    "WEBHOOK_TEST_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                ("WEBHOOK_TEST_TOPICS", "no-such-topic"),
            ],
            "topic \"no-such-topic\" does not exist",
        ),
    ] {
        let url = db.url.clone();
        let out = tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
            command
                .args(["serve", "--roles", "webhook"])
                .env("DATABASE_URL", &url)
                .env("WEBHOOK_SINKS", "test")
                .env("RUST_LOG", "warn");
            for (name, value) in &vars {
                command.env(name, value);
            }
            command.output().unwrap()
        })
        .await
        .unwrap();
        crate::cli::assert_one_line_failure(&out, needle);
        assert!(!crate::cli::stderr(&out).contains("s3cret"));
    }
}

/// `replay --sink` sends a range to a sink again, through the same
/// signing and delivery as the live sink: each event once more, under a
/// `webhook-id` of its own with the run's id, in key order; a run cannot
/// be resumed into another target, and a sink that does not take the
/// topic is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sends_a_range_to_a_sink_again_under_ids_of_its_own() {
    let db = TestDb::migrated().await;
    let secret = secret();
    let receiver = Receiver::start(&secret, &[]).await;
    events(&db, 300, 20).await;
    let replay = |args: &[&str]| {
        let mut command = binary(&db);
        command
            .arg("replay")
            .args(args)
            .env("WEBHOOK_TEST_URL", receiver.url())
            .env("WEBHOOK_TEST_SECRET", &secret)
            .env("WEBHOOK_OTHER_URL", receiver.url())
            .env("WEBHOOK_OTHER_SECRET", &secret)
            .env("WEBHOOK_OTHER_TOPICS", "payments");
        command.output()
    };
    let done = replay(&["--from-offset", "0", "--sink", "test", "--output", "json"])
        .await
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let stdout = String::from_utf8_lossy(&done.stdout);
    let summary: serde_json::Value = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<serde_json::Value>()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!(summary["sent"], 300, "{stdout}");
    let run = summary["run_id"].as_i64().unwrap();

    let received = receiver.received();
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 300, "each event once");
    assert!(accepted.values().all(|n| *n == 1));
    assert!(
        received.iter().all(|r| r.verified),
        "every signature verified"
    );
    assert!(
        received.iter().all(|r| {
            r.replay.as_deref() == Some(run.to_string().as_str())
                && r.id
                    .as_deref()
                    .unwrap()
                    .ends_with(&format!("_replay_{run}"))
        }),
        "each request names the run and has an id of the run's own"
    );
    assert_key_order(&received);
    assert_eq!(
        count(
            &db.client().await,
            &format!(
                "SELECT count(*) FROM replay_deliveries WHERE run_id = {run} AND status = 'sent'"
            ),
        )
        .await,
        300
    );

    let resumed_elsewhere = replay(&[
        "--resume",
        &run.to_string(),
        "--resend-in-doubt",
        "--sink",
        "other",
    ])
    .await
    .unwrap();
    assert!(!resumed_elsewhere.status.success());
    let error = String::from_utf8_lossy(&resumed_elsewhere.stderr);
    assert!(
        error.contains("sends to webhook sink test, not to --sink other"),
        "{error}"
    );

    let wrong_topic = replay(&["--from-offset", "0", "--sink", "other", "--new"])
        .await
        .unwrap();
    assert!(!wrong_topic.status.success());
    let error = String::from_utf8_lossy(&wrong_topic.stderr);
    assert!(error.contains("does not take topic"), "{error}");
    assert_eq!(receiver.received().len(), 300, "nothing more was sent");
}
