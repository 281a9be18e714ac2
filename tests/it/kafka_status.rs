//! Issue 28: `outbox-relay kafka-api status` shows the running front
//! ends, their clients by client id and software, and the groups served;
//! `kafka-api hash-password` makes the hashes KAFKA_API_USERS takes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::kafka_api::{events, kafka_api};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_listeners_clients_with_their_software_and_groups() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 50).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let reads = Arc::new(Mutex::new(Vec::new()));
    let member = crate::kafka_groups::Member::start(
        "status-reader",
        &bootstrap,
        "mail-service",
        &[],
        reads.clone(),
    );
    let status = eventually(
        "the status to show the member",
        Duration::from_secs(30),
        || async {
            let output = binary(&db)
                .args(["kafka-api", "status", "--output", "json"])
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let status: Value = serde_json::from_slice(&output.stdout).unwrap();
            let listener = status["listeners"].as_array()?.first()?.clone();
            let clients = listener["clients"].as_array()?;
            let ours = clients.iter().find(|c| c["client_id"] == "status-reader")?;
            let stable = status["groups"]
                .as_array()?
                .iter()
                .any(|g| g["state"] == "Stable");
            (ours["software_name"] == "librdkafka" && stable).then(|| status.clone())
        },
    )
    .await;
    let listener = &status["listeners"][0];
    assert_eq!(listener["listen"], bootstrap.as_str());
    assert_eq!(
        (listener["tls"].as_bool(), listener["sasl"].as_bool()),
        (Some(false), Some(false))
    );
    let group = &status["groups"][0];
    assert_eq!(
        (group["group"].as_str(), group["members"].as_i64()),
        (Some("mail-service"), Some(1))
    );
    // The table names the same.
    let table = binary(&db)
        .args(["kafka-api", "status"])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("status-reader")
            && table.contains("librdkafka")
            && table.contains("mail-service"),
        "{table}"
    );
    member.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_makes_a_hash_the_users_setting_takes_and_needs_no_database() {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["kafka-api", "hash-password"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .await
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(output.status.success());
    let hash = String::from_utf8(output.stdout).unwrap();
    let users =
        outbox_relay::kafka_api::security::Users::parse(&format!("mail:{}", hash.trim())).unwrap();
    assert!(users.authenticate("mail", "s3cret pass").is_some());
    assert!(users.authenticate("mail", "s3cret pass\n").is_none());
}

/// The dashboard's Kafka clients row answers, with data, from a real
/// Prometheus scraping a kafka-api process a consumer reads from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboards_kafka_clients_row_answers_from_prometheus() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 50).await;
    let (kafka, metrics_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let _serve = binary(&db)
        .args(["serve", "--roles", "kafka-api", "--kafka-listen", &kafka])
        .args(["--metrics-addr", &metrics_addr])
        .spawn()
        .unwrap();
    eventually("the Kafka listener", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&kafka)
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let reads = Arc::new(Mutex::new(Vec::new()));
    let member =
        crate::kafka_groups::Member::start("dashboard", &kafka, "mail-service", &[], reads.clone());
    eventually("the records read", Duration::from_secs(60), || async {
        (reads.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    let prometheus = crate::metrics::Prometheus::start(&metrics_addr).await;
    crate::observability::dashboard_panels_answer(
        &prometheus,
        |panel| panel.starts_with("Kafka clients"),
        "no query of this row may be empty",
    )
    .await;
    member.close().await;
}
