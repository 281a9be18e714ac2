//! Issue 28, kafka-python (PyPI, pure Python) as a consumer group: two
//! members read 10,000 records once each, at the log's partitions and
//! offsets with their keys, both restarted resume from their commits, and
//! a reset made with `groups reset-offsets` is what they read next.
//! (Its reads with assigned partitions, offsets for times, a killed
//! member, a bad password and an unsupported API are in kafka_api.rs,
//! kafka_groups.rs and kafka_security.rs.)

use std::collections::HashSet;
use std::time::Duration;

use crate::harness::*;
use crate::kafka_api::{events, kafka_api, TOPIC};
use crate::kafka_clients::ScriptMember;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_kafka_python_members_read_each_record_once_resume_from_their_commits_and_from_a_reset()
{
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 10_000).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let a = ScriptMember::python(&bootstrap, "mail-service");
    let b = ScriptMember::python(&bootstrap, "mail-service");
    eventually(
        "the group to read every record",
        Duration::from_secs(120),
        || async { (a.reads().len() + b.reads().len() >= expected.len()).then_some(()) },
    )
    .await;
    crate::kafka_clients::assert_partitions_shared(&a, &b);
    let keys = |m: &ScriptMember| -> Vec<((i32, i64), Option<String>)> {
        m.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.get("offset").is_some())
            .map(|l| {
                let at = (
                    l["partition"].as_i64().unwrap() as i32,
                    l["offset"].as_i64().unwrap(),
                );
                (at, l["key"].as_str().map(String::from))
            })
            .collect()
    };
    let mut seen = HashSet::new();
    for (at, key) in keys(&a).into_iter().chain(keys(&b)) {
        assert!(seen.insert(at), "{at:?} read twice");
        assert_eq!(key, expected[&at].key, "{at:?}");
    }
    assert_eq!(seen.len(), expected.len());
    a.stop().await;
    b.stop().await;
    wait_until_group_caught_up(&db, "mail-service", TOPIC).await;

    // Restarted, they read only what came since.
    let all = events(&db, &mut relay, 100).await;
    let again = vec![
        ScriptMember::python(&bootstrap, "mail-service"),
        ScriptMember::python(&bootstrap, "mail-service"),
    ];
    crate::kafka_clients::assert_resumed_from_commits(again, &expected, &all).await;

    // A reset made with `groups reset-offsets` is what it reads next.
    let time = all[&(4, 30)].created_at;
    crate::kafka_clients::assert_reads_from_a_reset(&db, "mail-service", time, &all, || {
        ScriptMember::python(&bootstrap, "mail-service")
    })
    .await;
}

/// A static kafka-python member (`group_instance_id`) restarting within its
/// session gets its partitions back without a rebalance: the generation
/// stays. (The follower restarts; a restarting leader rebalances.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_kafka_python_member_restarting_keeps_its_partitions_without_a_rebalance() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 80).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let start =
        |instance: &str| ScriptMember::python_with(&bootstrap, "static", &["--instance", instance]);
    let mut members = std::collections::HashMap::new();
    members.insert("a", start("a"));
    members.insert("b", start("b"));
    eventually(
        "both members to own partitions",
        Duration::from_secs(60),
        || async {
            let owned: usize = members.values().map(|m| m.assignment().len()).sum();
            let reads: usize = members.values().map(|m| m.reads().len()).sum();
            (owned == 8 && members.values().all(|m| !m.assignment().is_empty()) && reads >= 80)
                .then_some(())
        },
    )
    .await;
    let client = db.client().await;
    let state = "SELECT g.generation, k.group_instance_id FROM kafka_groups g
                   JOIN kafka_group_members k ON k.group_id = g.group_id AND k.member_id = g.leader
                  WHERE g.group_id = 'static'";
    let row = client.query_one(state, &[]).await.unwrap();
    let (before, leader): (i32, String) = (row.get(0), row.get(1));
    let follower = if leader == "a" { "b" } else { "a" };
    let had = members[follower].assignment();
    members.remove(follower).unwrap().stop().await;
    let restarted = start(follower);
    eventually(
        "the restarted member to get its partitions",
        Duration::from_secs(30),
        || async { (restarted.assignment() == had).then_some(()) },
    )
    .await;
    let after: i32 = client.query_one(state, &[]).await.unwrap().get(0);
    assert_eq!(after, before, "no rebalance");
    restarted.stop().await;
    members.remove(leader.as_str()).unwrap().stop().await;
}
