//! Issue 28: the Kafka front end over TLS with SASL/PLAIN users, each
//! limited to topics and groups by prefix; a bad password is a clean error
//! for each of the three clients (librdkafka, kafka-python, KafkaJS), not
//! a hang.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::kafka_api::security::{tls_acceptor, PasswordHash, Security, Users};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::harness::*;
use crate::kafka_api::{events, kafka_api_secured, TOPIC};
use crate::kafka_clients::ScriptMember;

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in a
/// folder of this test's own: (certificate path, folder).
fn certificate() -> (String, std::path::PathBuf) {
    let folder =
        std::env::temp_dir().join(format!("outbox-relay-tls-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&folder).unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert, key) = (folder.join("cert.pem"), folder.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    (cert.to_string_lossy().into_owned(), folder)
}

const PASSWORD: &str = "correct horse battery staple";

/// The role over TLS, with a user limited to `order-` topics and `mail-`
/// groups and one without limits.
async fn secured(db: &TestDb) -> (InProcess, String, String) {
    let (cert, folder) = certificate();
    let hash = PasswordHash::new(PASSWORD, 1_000);
    let users = Users::parse(&format!(
        "mail:{hash}:topics=order-:groups=mail- ops:{hash}"
    ))
    .unwrap();
    let security = Security {
        tls: Some(tls_acceptor(&folder.join("cert.pem"), &folder.join("key.pem")).unwrap()),
        users: Some(Arc::new(users)),
    };
    let (pipeline, bootstrap) = kafka_api_secured(db, security).await;
    (pipeline, bootstrap, cert)
}

fn librdkafka(bootstrap: &str, ca: &str, user: &str, password: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanisms", "PLAIN")
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("ssl.ca.location", ca)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_its_topics_as_its_groups_over_tls_and_nothing_else() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 200).await;
    let mut client = db.client().await;
    outbox_relay::log::topics::create_topic(&mut client, "billing", 2, Duration::from_secs(86_400))
        .await
        .unwrap();
    insert_event(&client, "billing", "b1", serde_json::json!({"invoice": 1})).await;
    drain(&mut relay).await;
    let (_pipeline, bootstrap, ca) = secured(&db).await;

    // Its topic, as its group: every record.
    let consumer = librdkafka(&bootstrap, &ca, "mail", PASSWORD, "mail-service");
    consumer.subscribe(&[TOPIC]).unwrap();
    let read = tokio::task::spawn_blocking(move || {
        let mut read = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while read < 200 && std::time::Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                message.unwrap();
                read += 1;
            }
        }
        read
    })
    .await
    .unwrap();
    assert_eq!(read, expected.len());

    // Another topic: refused by name, and left out of the list of all.
    let consumer = librdkafka(&bootstrap, &ca, "mail", PASSWORD, "mail-service");
    let (billing, all) = tokio::task::spawn_blocking(move || {
        let billing = consumer
            .fetch_metadata(Some("billing"), Duration::from_secs(20))
            .unwrap();
        let all = consumer
            .fetch_metadata(None, Duration::from_secs(20))
            .unwrap();
        let error = billing.topics()[0].error();
        let names: Vec<String> = all.topics().iter().map(|t| t.name().to_string()).collect();
        (error, names)
    })
    .await
    .unwrap();
    assert_eq!(
        billing,
        Some(rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
    );
    assert_eq!(all, vec![TOPIC.to_string()]);

    // Another group: refused.
    let errors = Arc::new(Mutex::new(Vec::new()));
    let consumer = librdkafka(&bootstrap, &ca, "mail", PASSWORD, "billing-team");
    consumer.subscribe(&[TOPIC]).unwrap();
    let seen = errors.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Err(e)) => seen.lock().unwrap().push(e.to_string()),
                Some(Ok(_)) => return false,
                None => {}
            }
            if seen
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.contains("authoriz") || e.contains("Authoriz"))
            {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(
        refused,
        "a group outside the user's prefixes is refused: {:?}",
        errors.lock().unwrap()
    );

    // The unlimited user reads the other topic.
    let consumer = librdkafka(&bootstrap, &ca, "ops", PASSWORD, "ops-audit");
    consumer.subscribe(&["billing"]).unwrap();
    let key = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                let message = message.unwrap();
                return rdkafka::Message::key(&message)
                    .map(|k| String::from_utf8_lossy(k).into_owned());
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(key.as_deref(), Some("b1"));
}

/// A wrong password: each client is told, none hangs; the connection is
/// closed after the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_password_is_a_clean_error_for_every_client() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 10).await;
    let (_pipeline, bootstrap, ca) = secured(&db).await;

    // librdkafka tells its error callback why the connection failed.
    struct Errors(Arc<Mutex<Vec<String>>>);
    impl rdkafka::ClientContext for Errors {
        fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
            self.0.lock().unwrap().push(format!("{error}: {reason}"));
        }
    }
    impl rdkafka::consumer::ConsumerContext for Errors {}
    let errors = Arc::new(Mutex::new(Vec::new()));
    let consumer: BaseConsumer<Errors> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanisms", "PLAIN")
        .set("sasl.username", "mail")
        .set("sasl.password", "wrong")
        .set("ssl.ca.location", &ca)
        .set("group.id", "mail-service")
        .create_with_context(Errors(errors.clone()))
        .unwrap();
    let told = errors.clone();
    let failed = tokio::task::spawn_blocking(move || {
        let failed = consumer
            .fetch_metadata(Some(TOPIC), Duration::from_secs(20))
            .is_err();
        // The error callback is served by polls.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline
            && !told
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.contains("Authentication failed"))
        {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        failed
    })
    .await
    .unwrap();
    assert!(failed, "no metadata for a refused client");
    let said = errors.lock().unwrap().clone();
    assert!(
        said.iter().any(|e| e.contains("Authentication failed")),
        "librdkafka is told: {said:?}"
    );

    let wrong = "mail:wrong";
    let script_args = [
        "--bootstrap",
        &bootstrap,
        "--topic",
        TOPIC,
        "--group",
        "mail-service",
        "--sasl",
        wrong,
        "--ca",
        &ca,
    ];
    let mut python = {
        let mut command = tokio::process::Command::new("python3");
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/kafka_python_member.py"
            ))
            .args(script_args);
        ScriptMember::command(command, "python3 tests/support/kafka_python_member.py")
    };
    let mut kafkajs = ScriptMember::kafkajs(&script_args);
    for (name, member) in [("kafka-python", &mut python), ("KafkaJS", &mut kafkajs)] {
        let exited = tokio::time::timeout(Duration::from_secs(60), member.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} gives up on a bad password, it does not hang"))
            .unwrap();
        assert!(!exited.success(), "{name}");
        // What it gave up with, or (kafka-python, which gives up on the
        // bootstrap after retrying) what it logged on the way.
        let lines = member.lines.lock().unwrap().clone();
        assert!(
            lines.iter().any(|l| l["error"].is_string()),
            "{name} ends with an error: {lines:?}"
        );
        assert!(
            lines.iter().any(|l| {
                let said = l["error"]
                    .as_str()
                    .or(l["log"].as_str())
                    .unwrap_or_default();
                said.contains("Authentication failed")
                    || said.contains("SASL") && said.contains("authentication")
            }),
            "{name} is told the authentication failed: {lines:?}"
        );
    }
}
