//! Issue 28: Kafka consumer groups on the log. Real clients nobody here
//! wrote (librdkafka through the `rdkafka` crate, kafka-python) join a
//! group served by the `kafka-api` role, read each record once, commit,
//! take over from a member that dies, resume from their commits, and
//! read from where `groups reset-offsets` put them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde_json::Value;

use crate::harness::*;
use crate::kafka_api::{events, kafka_api, message_headers, wire_headers, Expected, TOPIC};
use crate::kafka_clients::ScriptMember;

/// A record as a member read it.
#[derive(Debug, Clone)]
pub(crate) struct Read {
    member: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    value: Value,
    headers: HashMap<String, Option<String>>,
    timestamp: rdkafka::Timestamp,
}

/// A librdkafka group member polling in a thread of its own, until stopped.
pub(crate) struct Member {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Its partitions of `TOPIC` as of its last poll.
    assignment: Arc<Mutex<Vec<i32>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Member {
    pub(crate) fn start(
        name: &str,
        bootstrap: &str,
        group: &str,
        extra: &[(&str, &str)],
        reads: Arc<Mutex<Vec<Read>>>,
    ) -> Member {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("client.id", name)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("auto.commit.interval.ms", "100")
            .set("auto.offset.reset", "earliest");
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let consumer: BaseConsumer = config.create().unwrap();
        consumer.subscribe(&[TOPIC]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let assignment = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (name, stop, assignment, errors) = (
                name.to_string(),
                stop.clone(),
                assignment.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => reads.lock().unwrap().push(read(&name, &m)),
                        Some(Err(e)) => errors.lock().unwrap().push(e.to_string()),
                        None => {}
                    }
                    if let Ok(list) = consumer.assignment() {
                        *assignment.lock().unwrap() =
                            list.elements().iter().map(|e| e.partition()).collect();
                    }
                }
                // Dropping closes: commits what it read and leaves the
                // group (a static member does not leave).
                drop(consumer);
            })
        };
        Member {
            stop,
            thread: Some(thread),
            assignment,
            errors,
        }
    }

    fn assignment(&self) -> Vec<i32> {
        let mut partitions = self.assignment.lock().unwrap().clone();
        partitions.sort();
        partitions
    }

    /// Stops polling and closes the consumer (commit, leave).
    pub(crate) async fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read(member: &str, m: &rdkafka::message::BorrowedMessage<'_>) -> Read {
    let headers = message_headers(m);
    Read {
        member: member.to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
        value: serde_json::from_slice(m.payload().unwrap()).unwrap(),
        headers,
        timestamp: m.timestamp(),
    }
}

/// Every record of `expected` read exactly once, as the log holds it.
fn assert_read_once(reads: &[Read], expected: &Expected) {
    let mut seen = HashMap::new();
    for r in reads {
        let at = (r.partition, r.offset);
        if let Some(earlier) = seen.insert(at, &r.member) {
            panic!("{at:?} read twice (by {earlier} and {})", r.member);
        }
        let record = expected
            .get(&at)
            .unwrap_or_else(|| panic!("{at:?} is not a record expected"));
        assert_eq!(r.key, record.key, "{at:?}");
        assert_eq!(r.value, record.payload, "{at:?}");
        assert_eq!(
            r.timestamp,
            rdkafka::Timestamp::CreateTime(record.created_at.timestamp_millis())
        );
        assert_eq!(r.headers, wire_headers(record), "{at:?}");
    }
    assert_eq!(seen.len(), expected.len(), "every record read");
}

async fn wait_for_reads(reads: &Arc<Mutex<Vec<Read>>>, count: usize) {
    eventually(
        &format!("{count} records read by the group"),
        Duration::from_secs(90),
        || async { (reads.lock().unwrap().len() >= count).then_some(()) },
    )
    .await;
}

async fn generation(db: &TestDb, group: &str) -> i32 {
    db.client()
        .await
        .query_one(
            "SELECT generation FROM kafka_groups WHERE group_id = $1",
            &[&group],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_librdkafka_members_read_each_record_once_and_resume_from_their_commits() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 10_000).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;

    let reads = Arc::new(Mutex::new(Vec::new()));
    let a = Member::start("member-a", &bootstrap, "mail-service", &[], reads.clone());
    let b = Member::start("member-b", &bootstrap, "mail-service", &[], reads.clone());
    wait_for_reads(&reads, expected.len()).await;
    let (assigned_a, assigned_b) = (a.assignment(), b.assignment());
    assert!(
        !assigned_a.is_empty() && !assigned_b.is_empty(),
        "{assigned_a:?} {assigned_b:?}"
    );
    assert!(
        assigned_a.iter().all(|p| !assigned_b.contains(p)),
        "one owner per partition"
    );
    assert_eq!(assigned_a.len() + assigned_b.len(), 8);
    // The operator sees the group, its members and their partitions.
    let client = db.client().await;
    let described = outbox_relay::group::admin::describe(&client, "mail-service")
        .await
        .unwrap()
        .expect("the group is listed");
    assert_eq!(described.members.len(), 2);
    assert_eq!(
        described
            .members
            .iter()
            .map(|m| m.partitions.len())
            .sum::<usize>(),
        8,
        "{described:?}"
    );
    a.close().await;
    b.close().await;
    wait_until_group_caught_up(&db, "mail-service", TOPIC).await;
    assert_read_once(&reads.lock().unwrap(), &expected);

    // Restarted, they resume from the commits: only what came since.
    let since = events(&db, &mut relay, 100).await;
    let newer: Expected = since
        .into_iter()
        .filter(|(at, _)| !expected.contains_key(at))
        .collect();
    assert_eq!(newer.len(), 100);
    let reads = Arc::new(Mutex::new(Vec::new()));
    let a = Member::start("member-a", &bootstrap, "mail-service", &[], reads.clone());
    let b = Member::start("member-b", &bootstrap, "mail-service", &[], reads.clone());
    wait_for_reads(&reads, 100).await;
    // A moment for a record read twice to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.close().await;
    b.close().await;
    assert_read_once(&reads.lock().unwrap(), &newer);
}

/// A reset made with `groups reset-offsets` is what the members read next;
/// it is refused while a member is live, as in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_a_stopped_kafka_group_is_what_its_members_read_next() {
    use outbox_relay::group::admin::{execute_reset, plan_reset, AdminError, ResetTo};
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 400).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let reads = Arc::new(Mutex::new(Vec::new()));
    let member = Member::start("member", &bootstrap, "billing", &[], reads.clone());
    wait_for_reads(&reads, expected.len()).await;

    let mut client = db.client().await;
    let to_earliest = plan_reset(&client, "billing", TOPIC, None, &ResetTo::Earliest)
        .await
        .unwrap();
    let refused = execute_reset(&mut client, "billing", &to_earliest).await;
    assert!(
        matches!(refused, Err(AdminError::ActiveOnReset { .. })),
        "{refused:?}"
    );
    member.close().await;
    wait_until_group_caught_up(&db, "billing", TOPIC).await;

    // Back to a time: each partition's first record created since.
    let time = expected[&(3, 20)].created_at;
    let back = plan_reset(&client, "billing", TOPIC, None, &ResetTo::Datetime(time))
        .await
        .unwrap();
    execute_reset(&mut client, "billing", &back).await.unwrap();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for &(partition, offset) in expected.keys() {
        let end = ends.entry(partition).or_default();
        *end = (*end).max(offset + 1);
    }
    let end =
        |p: &outbox_relay::group::admin::PlannedReset| ends.get(&p.partition).copied().unwrap_or(0);
    let again: i64 = back.iter().map(|p| end(p) - p.new_offset).sum();
    assert!(again > 0, "{back:?}");
    let reads = Arc::new(Mutex::new(Vec::new()));
    let member = Member::start("member", &bootstrap, "billing", &[], reads.clone());
    wait_for_reads(&reads, again as usize).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    member.close().await;
    let mut first: HashMap<i32, i64> = HashMap::new();
    for r in reads.lock().unwrap().iter() {
        first.entry(r.partition).or_insert(r.offset);
    }
    for planned in back.iter().filter(|p| p.new_offset < end(p)) {
        assert_eq!(
            first.get(&planned.partition),
            Some(&planned.new_offset),
            "partition {} starts at the reset offset",
            planned.partition
        );
    }
    assert_eq!(
        reads.lock().unwrap().len() as i64,
        again,
        "from the reset offsets on, no more"
    );
}

/// A static member (`group.instance.id`) restarting within its session
/// gets its partitions back without a rebalance: the generation stays and
/// the other member keeps its partitions. (The follower restarts: a
/// restarting leader makes the group rebalance, for librdkafka's
/// JoinGroup below v9 cannot be told to skip the assignment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarting_within_its_session_keeps_its_partitions_without_a_rebalance() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 80).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let reads = Arc::new(Mutex::new(Vec::new()));
    let statically = |instance: &'static str| [("group.instance.id", instance)];
    let mut members = HashMap::new();
    for instance in ["a", "b"] {
        let member = Member::start(
            instance,
            &bootstrap,
            "static",
            &statically(instance),
            reads.clone(),
        );
        members.insert(instance, member);
    }
    wait_for_reads(&reads, 80).await;
    let client = db.client().await;
    let leader: String = client
        .query_one(
            "SELECT k.group_instance_id FROM kafka_groups g
               JOIN kafka_group_members k ON k.group_id = g.group_id AND k.member_id = g.leader
              WHERE g.group_id = 'static'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let follower = if leader == "a" { "b" } else { "a" };
    let (leaders, followers) = (
        members[leader.as_str()].assignment(),
        members[follower].assignment(),
    );
    assert_eq!(
        leaders.len() + followers.len(),
        8,
        "{leaders:?} {followers:?}"
    );
    let before = generation(&db, "static").await;

    members.remove(follower).unwrap().close().await;
    let restarted = Member::start(
        follower,
        &bootstrap,
        "static",
        &statically(follower),
        reads.clone(),
    );
    eventually(
        "the restarted member to get its partitions",
        Duration::from_secs(20),
        || async { (restarted.assignment() == followers).then_some(()) },
    )
    .await;
    assert_eq!(generation(&db, "static").await, before, "no rebalance");
    let staying = members.remove(leader.as_str()).unwrap();
    assert_eq!(staying.assignment(), leaders);
    assert!(
        staying.errors.lock().unwrap().is_empty() && restarted.errors.lock().unwrap().is_empty()
    );
    staying.close().await;
    restarted.close().await;
}

/// A group is native or Kafka-protocol: a Kafka client cannot join a
/// native group (INCONSISTENT_GROUP_PROTOCOL), nor a native member a
/// Kafka group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_kafka_groups_do_not_mix() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    events(&db, &mut relay, 10).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let config = |group: &str| outbox_relay::group::GroupConfig::new(group, &[TOPIC]);
    let _native =
        outbox_relay::group::membership::Membership::join(db.url.as_str(), config("native"))
            .await
            .unwrap();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let kafka = Member::start("kafka", &bootstrap, "native", &[], reads.clone());
    eventually(
        "the join to be refused",
        Duration::from_secs(20),
        || async {
            kafka
                .errors
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.contains("InconsistentGroupProtocol") || e.contains("nconsistent"))
                .then_some(())
        },
    )
    .await;
    assert!(kafka.assignment().is_empty());
    kafka.close().await;

    let member = Member::start("kafka", &bootstrap, "kafka-group", &[], reads.clone());
    wait_for_reads(&reads, 10).await;
    let refused =
        outbox_relay::group::membership::Membership::join(db.url.as_str(), config("kafka-group"))
            .await;
    let refused = refused
        .err()
        .expect("a native member cannot join a Kafka group")
        .to_string();
    assert!(refused.contains("Kafka"), "{refused}");
    member.close().await;
}

/// A member killed (SIGKILL: no leave, no last commit) loses its
/// partitions to the other member once its session runs out, and nothing
/// is skipped: the survivor reads on from the dead member's last commit.
/// The two members are different clients (kafka-python and librdkafka)
/// in one group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_s_partitions_go_to_the_other_within_the_session_timeout() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let first = events(&db, &mut relay, 2000).await;
    let (_pipeline, bootstrap) = kafka_api(&db).await;
    let mut python = ScriptMember::python(&bootstrap, "mail-service");
    let reads = Arc::new(Mutex::new(Vec::new()));
    let rust = Member::start("librdkafka", &bootstrap, "mail-service", &[], reads.clone());
    eventually(
        "the group to read every record",
        Duration::from_secs(90),
        || async {
            (python.reads().len() + reads.lock().unwrap().len() >= first.len()).then_some(())
        },
    )
    .await;
    let (python_had, rust_had) = (python.assignment(), rust.assignment());
    assert!(
        !python_had.is_empty() && !rust_had.is_empty(),
        "{python_had:?} {rust_had:?}"
    );
    assert_eq!(python_had.len() + rust_had.len(), 8);

    python.child.start_kill().unwrap();
    python.child.wait().await.unwrap();
    let killed = tokio::time::Instant::now();
    let all = events(&db, &mut relay, 300).await;
    eventually(
        "librdkafka to own every partition",
        Duration::from_secs(30),
        || async { (rust.assignment().len() == 8).then_some(()) },
    )
    .await;
    // Session 6 s, then a rebalance the survivor joins on its next
    // heartbeat (0.5 s), and the sweep that notices (every second).
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(6 + 4),
        "took over after {took:?}"
    );
    eventually("every record read", Duration::from_secs(60), || async {
        let mut seen: std::collections::HashSet<(i32, i64)> = python.reads().into_iter().collect();
        seen.extend(
            reads
                .lock()
                .unwrap()
                .iter()
                .map(|r| (r.partition, r.offset)),
        );
        all.keys().all(|at| seen.contains(at)).then_some(())
    })
    .await;
    // Read twice only what the dead member read and may not have committed.
    let python_read: std::collections::HashSet<(i32, i64)> = python.reads().into_iter().collect();
    let mut by_rust = std::collections::HashSet::new();
    for r in reads.lock().unwrap().iter() {
        let at = (r.partition, r.offset);
        assert!(by_rust.insert(at), "{at:?} read twice by librdkafka");
        assert!(
            !python_read.contains(&at) || python_had.contains(&r.partition),
            "{at:?}"
        );
    }
    rust.close().await;
}

/// Two `kafka-api` processes on one database (this test's and the
/// binary's): members connected to different ones are one group (its
/// state is in Postgres), and each record is read once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_connected_to_two_kafka_api_processes_are_one_group() {
    let db = TestDb::migrated().await;
    let mut relay = db.relay();
    let expected = events(&db, &mut relay, 3000).await;
    let (_one, first) = kafka_api(&db).await;
    let second = format!("127.0.0.1:{}", free_port());
    let _two = binary(&db)
        .args(["serve", "--roles", "kafka-api", "--kafka-listen", &second])
        .spawn()
        .unwrap();
    eventually(
        "the second process to listen",
        Duration::from_secs(30),
        || async {
            tokio::net::TcpStream::connect(&second)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let reads = Arc::new(Mutex::new(Vec::new()));
    let a = Member::start("a", &first, "mail-service", &[], reads.clone());
    let b = Member::start("b", &second, "mail-service", &[], reads.clone());
    wait_for_reads(&reads, expected.len()).await;
    let (assigned_a, assigned_b) = (a.assignment(), b.assignment());
    assert!(
        !assigned_a.is_empty() && !assigned_b.is_empty(),
        "{assigned_a:?} {assigned_b:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.close().await;
    b.close().await;
    assert_read_once(&reads.lock().unwrap(), &expected);
}
