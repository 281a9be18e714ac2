//! Issue 28, the third independent client: KafkaJS (npm, pure
//! JavaScript; tests/support/kafkajs) reads the log as a consumer group
//! through the `kafka-api` role.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::kafka_api::{events, header_text, kafka_api, TOPIC};
use crate::kafka_clients::ScriptMember;

/// Two KafkaJS members of `mail-service` read 10,000 records once each,
/// as the log holds them (partition, offset, key, value, headers,
/// CreateTime); when one is killed, the other takes its partitions once
/// its session runs out, nothing skipped; both restarted, they resume from
/// their commits; a reset made with `groups reset-offsets` is what they
/// read next. Its offsets for a time are the log's (what `replay --from`
/// plans with).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafkajs_members_read_each_record_once_take_over_from_a_killed_one_resume_and_read_from_a_reset(
) {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 10_000).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let time = expected[&(2, 40)].created_at;
    let member = |extra: &[&str]| {
        let mut args = vec![
            "--bootstrap",
            &bootstrap,
            "--topic",
            TOPIC,
            "--group",
            "mail-service",
        ];
        args.extend_from_slice(extra);
        ScriptMember::kafkajs(&args)
    };
    let millis = time.timestamp_millis().to_string();
    let a = member(&["--time", &millis]);
    let b = member(&[]);
    let records = |m: &ScriptMember| -> Vec<Value> {
        m.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.get("offset").is_some())
            .cloned()
            .collect()
    };
    eventually(
        "the group to read every record",
        Duration::from_secs(120),
        || async { (records(&a).len() + records(&b).len() >= expected.len()).then_some(()) },
    )
    .await;
    crate::kafka_clients::assert_partitions_shared(&a, &b);

    let mut seen = HashSet::new();
    for r in records(&a).iter().chain(records(&b).iter()) {
        let at = (
            r["partition"].as_i64().unwrap() as i32,
            r["offset"].as_i64().unwrap(),
        );
        assert!(seen.insert(at), "{at:?} read twice");
        let record = &expected[&at];
        assert_eq!(r["key"].as_str(), record.key.as_deref(), "{at:?}");
        assert_eq!(r["value"], record.payload, "{at:?}");
        assert_eq!(
            r["timestamp"],
            record.created_at.timestamp_millis(),
            "{at:?}"
        );
        for (name, value) in record.headers.as_object().unwrap() {
            let want = header_text(value).map_or(Value::Null, Value::from);
            assert_eq!(r["headers"][name], want, "{at:?} header {name}");
        }
    }
    assert_eq!(seen.len(), expected.len());

    // Offsets for a time: the log's own.
    let client = db.client().await;
    let found = a
        .lines
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| l.get("for_time").cloned())
        .unwrap();
    let heads = outbox_relay::log::topics::partition_offsets(&client, TOPIC)
        .await
        .unwrap();
    for head in &heads {
        let want = outbox_relay::log::offset_for_time(&client, TOPIC, head.partition, time)
            .await
            .unwrap();
        // No record at or after the time: KafkaJS says the log end.
        assert_eq!(
            found[head.partition.to_string()],
            want,
            "partition {}",
            head.partition
        );
    }

    // b is killed (no leave, no last commit): a takes every partition once
    // b's 6 s session has run out, and reads on from b's last commit.
    let mut b = b;
    b.child.start_kill().unwrap();
    b.child.wait().await.unwrap();
    eventually(
        "the other member to own every partition",
        Duration::from_secs(30),
        || async { (a.assignment().len() == 8).then_some(()) },
    )
    .await;
    a.stop().await;
    wait_until_group_caught_up(&db, "mail-service", TOPIC).await;

    // Restarted, they read only what came since.
    let all = events(&db, &mut relay, 100).await;
    crate::kafka_clients::assert_resumed_from_commits(
        vec![member(&[]), member(&[])],
        &expected,
        &all,
    )
    .await;

    // A reset made with `groups reset-offsets` is what it reads next.
    let time = all[&(4, 30)].created_at;
    crate::kafka_clients::assert_reads_from_a_reset(
        &db,
        "mail-service",
        time,
        &all,
        || member(&[]),
    )
    .await;
}

/// An unknown topic is a clean error for KafkaJS (its words for
/// UNKNOWN_TOPIC_OR_PARTITION), not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafkajs_is_told_a_topic_does_not_exist() {
    let db = TestDb::migrated().await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let mut member = ScriptMember::kafkajs(&[
        "--bootstrap",
        &bootstrap,
        "--topic",
        "no-such-topic",
        "--group",
        "g",
        "--time",
        "0",
    ]);
    let exited = tokio::time::timeout(Duration::from_secs(60), member.child.wait())
        .await
        .expect("KafkaJS gives up, it does not hang")
        .unwrap();
    assert!(!exited.success());
    let lines = member.lines.lock().unwrap().clone();
    assert!(
        lines.iter().any(|l| l["error"]
            .as_str()
            .is_some_and(|e| e.contains("does not host this topic-partition"))),
        "{lines:?}"
    );
}
