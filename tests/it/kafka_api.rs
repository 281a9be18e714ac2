//! Issue 28: Kafka clients nobody here wrote read the log through the
//! `kafka-api` role: librdkafka (the `rdkafka` crate) and kafka-python
//! (PyPI, tests/support/kafka_python_reader.py). The role runs in process,
//! started by the application builder.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

pub(crate) const TOPIC: &str = "order-created";

/// The log as the database holds it, by (partition, offset).
pub(crate) type Expected = HashMap<(i32, i64), outbox_relay::log::Record>;

/// `count` events over 37 keys, created one second apart ending now, with
/// a text header, a numeric one and a null one; relayed into the log.
pub(crate) async fn events(
    db: &TestDb,
    relay: &mut outbox_relay::relay::Relay,
    count: i64,
) -> Expected {
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers, created_at)
             SELECT 'order-created', 'k' || (n % 37),
                    jsonb_build_object('order_id', n, 'user_id', 1, 'amount', 100 + n,
                                       'email', 'c' || n || '@example.com'),
                    jsonb_build_object('source', 'test-' || n, 'n', n, 'empty', null),
                    now() - make_interval(secs => ($1::int8 - n)::float8)
               FROM generate_series(1, $1::int8) n",
            &[&count],
        )
        .await
        .unwrap();
    drain(relay).await;
    let rows = client
        .query(
            "SELECT e.topic, e.partition, e.\"offset\", e.key, e.created_at, e.appended_at, e.headers, e.payload
               FROM event_log e WHERE e.topic = 'order-created'",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(outbox_relay::log::Record::from_row)
        .map(|r| ((r.partition, r.offset), r))
        .collect()
}

/// The pipeline's kafka-api role alone, on a free port.
pub(crate) async fn kafka_api(db: &TestDb) -> (InProcess, String) {
    kafka_api_secured(db, Default::default()).await
}

/// The kafka-api role alone, on a free port, secured as given.
pub(crate) async fn kafka_api_secured(
    db: &TestDb,
    security: outbox_relay::kafka_api::security::Security,
) -> (InProcess, String) {
    let listener = outbox_relay::builder::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let settings = outbox_relay::builder::Settings {
        kafka_api: Some(outbox_relay::kafka_api::Listen {
            listener,
            advertised: outbox_relay::kafka_api::Advertised {
                host: "127.0.0.1".into(),
                port,
            },
            security,
        }),
        ..Default::default()
    };
    (
        InProcess::start(db, settings).await,
        format!("127.0.0.1:{port}"),
    )
}

/// A message's headers as librdkafka gives them, values as text (None
/// for a null value).
pub(crate) fn message_headers(
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> HashMap<String, Option<String>> {
    message
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let value = h.value.map(|v| String::from_utf8(v.to_vec()).unwrap());
                    (h.key.to_string(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A record's headers as they go on the wire (see [`header_text`]).
pub(crate) fn wire_headers(record: &outbox_relay::log::Record) -> HashMap<String, Option<String>> {
    record
        .headers
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), header_text(v)))
        .collect()
}

/// What a header of `expected` becomes on the wire.
pub(crate) fn header_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_reads_the_log_with_its_partitions_offsets_keys_headers_and_times() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 2000).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "assigned-only")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(TOPIC), Duration::from_secs(10))
        .unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 8);
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..8 {
        list.add_partition_offset(TOPIC, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let read = tokio::task::spawn_blocking(move || {
        let mut read = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while read.len() < 2000 && std::time::Instant::now() < deadline {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let message = message.unwrap();
            let headers = message_headers(&message);
            let previous = read.insert(
                (message.partition(), message.offset()),
                (
                    message
                        .key()
                        .map(|k| String::from_utf8(k.to_vec()).unwrap()),
                    serde_json::from_slice::<Value>(message.payload().unwrap()).unwrap(),
                    headers,
                    message.timestamp(),
                ),
            );
            assert!(previous.is_none(), "a record read twice");
        }
        (read, consumer)
    })
    .await
    .unwrap();
    let (read, consumer) = read;
    assert_eq!(read.len(), expected.len(), "every record, once");
    for (at, (key, value, headers, timestamp)) in &read {
        let record = &expected[at];
        assert_eq!(key, &record.key, "{at:?}");
        assert_eq!(value, &record.payload, "{at:?}");
        assert_eq!(
            timestamp,
            &rdkafka::Timestamp::CreateTime(record.created_at.timestamp_millis())
        );
        assert_eq!(headers, &wire_headers(record), "{at:?}");
    }

    // Watermarks and offsets for times: the log's own answers.
    let client = db.client().await;
    let middle = expected[&(3, 0)].created_at + chrono::Duration::milliseconds(500);
    let mut times = rdkafka::TopicPartitionList::new();
    for p in 0..8 {
        times
            .add_partition_offset(TOPIC, p, rdkafka::Offset::Offset(middle.timestamp_millis()))
            .unwrap();
    }
    let found = tokio::task::spawn_blocking(move || {
        let watermarks = consumer
            .fetch_watermarks(TOPIC, 5, Duration::from_secs(10))
            .unwrap();
        let found = consumer
            .offsets_for_times(times, Duration::from_secs(10))
            .unwrap();
        (watermarks, found)
    })
    .await
    .unwrap();
    let heads = outbox_relay::log::topics::partition_offsets(&client, TOPIC)
        .await
        .unwrap();
    assert_eq!(found.0, (0, heads[5].log_end_offset));
    for element in found.1.elements() {
        let partition = element.partition();
        let want = outbox_relay::log::offset_for_time(&client, TOPIC, partition, middle)
            .await
            .unwrap();
        // No record at or after the time: Kafka's -1, librdkafka's End.
        let want = if want == heads[partition as usize].log_end_offset {
            rdkafka::Offset::End
        } else {
            rdkafka::Offset::Offset(want)
        };
        assert_eq!(element.offset(), want, "partition {partition}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_python_reads_the_same_records_and_offsets() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 500).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let time = expected[&(0, 0)].created_at.timestamp_millis() + 1;
    let output = tokio::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/kafka_python_reader.py"
        ))
        .args([
            "--bootstrap",
            &bootstrap,
            "--topic",
            TOPIC,
            "--count",
            "500",
        ])
        .args(["--time", &time.to_string()])
        .output()
        .await
        .expect("python3 tests/support/kafka_python_reader.py (pip install kafka-python)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, records) = lines.split_last().unwrap();
    assert_eq!(records.len(), 500);
    let mut seen = std::collections::HashSet::new();
    for r in records {
        let at = (
            r["partition"].as_i64().unwrap() as i32,
            r["offset"].as_i64().unwrap(),
        );
        assert!(seen.insert(at), "{at:?} read twice");
        let record = &expected[&at];
        assert_eq!(r["key"].as_str(), record.key.as_deref());
        assert_eq!(r["value"], record.payload);
        assert_eq!(r["timestamp"], record.created_at.timestamp_millis());
        assert_eq!(r["timestamp_type"], 0, "CreateTime");
        assert_eq!(r["headers"]["source"], record.headers["source"]);
    }
    let client = db.client().await;
    let heads = outbox_relay::log::topics::partition_offsets(&client, TOPIC)
        .await
        .unwrap();
    let when = chrono::DateTime::from_timestamp_millis(time).unwrap();
    for head in heads {
        let p = head.partition.to_string();
        assert_eq!(summary["end_offsets"][&p], head.log_end_offset);
        let want = outbox_relay::log::offset_for_time(&client, TOPIC, head.partition, when)
            .await
            .unwrap();
        let answer = &summary["for_time"][&p];
        if want == head.log_end_offset {
            assert!(
                answer.is_null(),
                "no record at or after the time: none, as Kafka says"
            );
        } else {
            assert_eq!(answer, &Value::from(want), "partition {p}");
        }
    }
}

/// A consumer at the log end waits in a long poll and gets a record as
/// soon as the relay appends it: its fetches wait up to 25 s, longer than
/// the test gives it, so only the append notification can answer in time.
/// (One partition is assigned: a Fetch names the partitions ready when it
/// is sent, and a partition that becomes ready while one waits is fetched
/// after it, with Kafka as here.) An unknown topic is an error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consumer_is_woken_by_the_append_and_an_unknown_topic_is_an_error() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 10).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "assigned-only")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "25000")
        .create()
        .unwrap();
    let missing = consumer
        .fetch_metadata(Some("no-such-topic"), Duration::from_secs(10))
        .unwrap();
    assert!(
        missing.topics()[0].error().is_some(),
        "an unknown topic is an error"
    );

    let client = db.client().await;
    let heads = outbox_relay::log::topics::partition_offsets(&client, TOPIC)
        .await
        .unwrap();
    let late = outbox_relay::log::partitioner::partition_for_key("late-key", 8) as i32;
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(
        TOPIC,
        late,
        rdkafka::Offset::Offset(heads[late as usize].log_end_offset),
    )
    .unwrap();
    consumer.assign(&list).unwrap();
    let (polling, polled) = std::sync::mpsc::channel();
    let waiting = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut told = false;
        while std::time::Instant::now() < deadline {
            let message = consumer.poll(Duration::from_millis(200));
            if !told {
                let _ = polling.send(());
                told = true;
            }
            if let Some(message) = message {
                let message = message.unwrap();
                return Some(String::from_utf8(message.key().unwrap().to_vec()).unwrap());
            }
        }
        None
    });
    tokio::task::spawn_blocking(move || polled.recv().unwrap())
        .await
        .unwrap();
    insert_event(
        &client,
        TOPIC,
        "late-key",
        serde_json::json!({"late": true}),
    )
    .await;
    drain(&mut relay).await;
    assert_eq!(waiting.await.unwrap().as_deref(), Some("late-key"));
}

/// A request for an API the front end does not serve closes the
/// connection at once (a clear end for the client, never a hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_is_not_served_closes_the_connection() {
    let db = TestDb::migrated().await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let mut stream = tokio::net::TcpStream::connect(&bootstrap).await.unwrap();
    // CreateTopics (19) v3, correlation id 1, no client id, then a few bytes.
    let body: &[u8] = &[0, 19, 0, 3, 0, 0, 0, 1, 0xff, 0xff, 0, 0, 0, 0];
    stream.write_i32(body.len() as i32).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("closed, not left hanging")
        .unwrap();
    assert_eq!(read, 0, "no answer, the connection closed");
}

/// One request over a raw connection: the answer's bytes after its size,
/// or None when the connection closed.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    key: kafka_protocol::messages::ApiKey,
    version: i16,
    body: impl kafka_protocol::protocol::Encodable,
) -> Option<bytes::Bytes> {
    let mut header = kafka_protocol::messages::RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = 42;
    let mut frame = bytes::BytesMut::new();
    kafka_protocol::protocol::encode_request_header_into_buffer(&mut frame, &header).unwrap();
    body.encode(&mut frame, version).unwrap();
    stream.write_i32(frame.len() as i32).await.unwrap();
    stream.write_all(&frame).await.unwrap();
    let size = tokio::time::timeout(Duration::from_secs(10), stream.read_i32())
        .await
        .expect("an answer or a close, not a hang")
        .ok()?;
    let mut answer = vec![0u8; size as usize];
    stream.read_exact(&mut answer).await.ok()?;
    Some(bytes::Bytes::from(answer))
}

/// A request whose handler fails (here: the log's catalogue is gone) is
/// answered with UNKNOWN_SERVER_ERROR for what it asked, and the
/// connection stays open for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_is_answered_with_an_error_code_not_dropped() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{
        ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
        ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let db = TestDb::migrated().await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    db.client()
        .await
        .batch_execute("ALTER TABLE topics RENAME TO topics_elsewhere")
        .await
        .unwrap();
    let mut stream = tokio::net::TcpStream::connect(&bootstrap).await.unwrap();
    let mut asked = MetadataRequestTopic::default();
    asked.name = Some(TopicName(StrBytes::from_static_str(TOPIC)));
    let mut request = MetadataRequest::default();
    request.topics = Some(vec![asked]);
    let mut answer = exchange(&mut stream, ApiKey::Metadata, 12, request)
        .await
        .expect("answered, not closed");
    let header = ResponseHeader::decode(&mut answer, 1).unwrap();
    assert_eq!(header.correlation_id, 42);
    let metadata = MetadataResponse::decode(&mut answer, 12).unwrap();
    assert_eq!(metadata.topics.len(), 1);
    assert_eq!(metadata.topics[0].error_code, -1, "UNKNOWN_SERVER_ERROR");

    let mut answer = exchange(
        &mut stream,
        ApiKey::ApiVersions,
        3,
        ApiVersionsRequest::default(),
    )
    .await
    .expect("the connection is still open");
    ResponseHeader::decode(&mut answer, 0).unwrap();
    let versions = ApiVersionsResponse::decode(&mut answer, 3).unwrap();
    assert_eq!(versions.error_code, 0);
    assert!(versions
        .api_keys
        .iter()
        .any(|k| k.api_key == ApiKey::Fetch as i16));
}

/// Asking for an API the front end does not serve (here: creating a
/// topic, which is `outbox-relay topics create`'s) is a clean error for
/// each client, at once: none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_is_not_served_is_a_clean_error_for_every_client() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let db = TestDb::migrated().await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;

    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let topic = NewTopic::new("made-by-a-client", 1, TopicReplication::Fixed(1));
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        admin.create_topics([&topic], &options),
    )
    .await
    .expect("librdkafka is answered, not left waiting");
    let error = match created {
        Err(e) => e.to_string(),
        Ok(results) => format!("{:?}", results[0].as_ref().expect_err("not created")),
    };
    assert!(
        error.contains("nsupported") || error.contains("not support"),
        "librdkafka: {error}"
    );

    for (name, mut command) in [
        ("kafka-python", {
            let mut c = tokio::process::Command::new("python3");
            c.arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/kafka_python_member.py"
            ));
            c
        }),
        ("KafkaJS", {
            let mut c = tokio::process::Command::new("node");
            c.arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/kafkajs/member.js"
            ));
            c
        }),
    ] {
        command.args(["--bootstrap", &bootstrap, "--topic", TOPIC, "--group", "g"]);
        command
            .args(["--create-topic", "made-by-a-client"])
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .unwrap_or_else(|_| panic!("{name} is answered, not left waiting"))
            .unwrap();
        assert!(!output.status.success(), "{name}");
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(said.contains("not support"), "{name}: {said}");
    }
    let client = db.client().await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM topics WHERE name = 'made-by-a-client'"
        )
        .await,
        0
    );
}

/// ListOffsets v7's MAX_TIMESTAMP (-3): the record with the largest
/// CreateTime of each partition, as the log holds it; an empty partition
/// has none (-1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_v7_finds_each_partitions_record_with_the_largest_time() {
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::{
        ApiKey, ListOffsetsRequest, ListOffsetsResponse, ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 300).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let mut topic = ListOffsetsTopic::default();
    topic.name = TopicName(StrBytes::from_static_str(TOPIC));
    topic.partitions = (0..8)
        .map(|p| {
            let mut partition = ListOffsetsPartition::default();
            partition.partition_index = p;
            partition.timestamp = -3;
            partition
        })
        .collect();
    let mut request = ListOffsetsRequest::default();
    request.replica_id = kafka_protocol::messages::BrokerId(-1);
    request.topics = vec![topic];
    let mut stream = tokio::net::TcpStream::connect(&bootstrap).await.unwrap();
    let mut answer = exchange(&mut stream, ApiKey::ListOffsets, 7, request)
        .await
        .expect("answered");
    ResponseHeader::decode(&mut answer, ApiKey::ListOffsets.response_header_version(7)).unwrap();
    let answer = ListOffsetsResponse::decode(&mut answer, 7).unwrap();
    for p in &answer.topics[0].partitions {
        let latest = expected
            .values()
            .filter(|r| r.partition == p.partition_index)
            .max_by_key(|r| (r.created_at, std::cmp::Reverse(r.offset)));
        let want = latest.map_or((-1, -1), |r| (r.offset, r.created_at.timestamp_millis()));
        assert_eq!(
            (p.offset, p.timestamp),
            want,
            "partition {}",
            p.partition_index
        );
        assert_eq!(p.error_code, 0);
    }
}
