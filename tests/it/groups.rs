//! Consumer groups against a real Postgres (docs/invariants.md, 6 and 7).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::group::consumer::{ConsumerConfig, Lease, RecordHandler};
use outbox_relay::group::{self, Membership};
use outbox_relay::log::Record;
use outbox_relay::shutdown;
use serde_json::json;

use crate::harness::*;
use crate::mail::fast_group_config;

/// Records what it handled.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(i32, i64)>>,
    delay: Duration,
}

impl Recorder {
    /// How many distinct (partition, offset) records were handled.
    fn distinct(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .collect::<HashSet<_>>()
            .len()
    }
}

impl RecordHandler for Recorder {
    async fn handle(&self, record: Record, _lease: Arc<Lease>) {
        tokio::time::sleep(self.delay).await;
        self.seen
            .lock()
            .unwrap()
            .push((record.partition, record.offset));
    }
}

struct Member {
    trigger: shutdown::ShutdownTrigger,
    task: tokio::task::JoinHandle<()>,
}

fn spawn_member(db: &TestDb, group: &str, handler: Arc<Recorder>) -> Member {
    let (trigger, shutdown) = shutdown::channel();
    let config = ConsumerConfig::new(fast_group_config(group));
    let url = db.url.clone();
    let task = tokio::spawn(async move {
        outbox_relay::group::consumer::run(&url, config, handler, shutdown)
            .await
            .unwrap();
    });
    Member { trigger, task }
}

async fn describe(db: &TestDb, group: &str) -> group::admin::GroupDescription {
    let client = db.client().await;
    group::admin::describe(&client, group)
        .await
        .unwrap()
        .expect("group exists")
}

/// Waits until `members` live members own all 8 partitions, each at most
/// ceil(8 / members); returns the partition counts per member.
async fn wait_for_even_spread(db: &TestDb, group: &str, members: usize) -> Vec<usize> {
    let limit = 8usize.div_ceil(members);
    eventually(
        &format!("{members} members to share 8 partitions evenly"),
        Duration::from_secs(30),
        || async {
            let client = db.client().await;
            let d = group::admin::describe(&client, group).await.unwrap()?;
            let counts: Vec<usize> = d.members.iter().map(|m| m.partitions.len()).collect();
            let owned = d.partitions.iter().filter(|p| p.owner.is_some()).count();
            (d.members.len() == members
                && owned == 8
                && counts.iter().all(|&c| c <= limit && c > 0))
            .then_some(counts)
        },
    )
    .await
}

async fn relay_events(db: &TestDb, n: i64) {
    relay_events_with_keys(db, n, n).await
}

/// `n` events over `keys` distinct keys (records of one key run one by one).
async fn relay_events_with_keys(db: &TestDb, n: i64, keys: i64) {
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT 'order-created', (n % $2)::text, jsonb_build_object('n', n) FROM generate_series(1, $1::int8) n",
            &[&n, &keys],
        )
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_in_one_process_share_eight_partitions_evenly_and_rebalance_on_leave() {
    let db = TestDb::migrated().await;
    relay_events(&db, 300).await;
    let recorder = Arc::new(Recorder::default());
    let a = spawn_member(&db, "g", recorder.clone());
    wait_for_even_spread(&db, "g", 1).await;
    let b = spawn_member(&db, "g", recorder.clone());
    let c = spawn_member(&db, "g", recorder.clone());
    let mut counts = wait_for_even_spread(&db, "g", 3).await;
    counts.sort();
    assert_eq!(counts, vec![2, 3, 3]);

    // One leaves gracefully: the other two take its partitions at once.
    c.trigger.trigger();
    c.task.await.unwrap();
    let left = std::time::Instant::now();
    wait_for_even_spread(&db, "g", 2).await;
    // Well before its session (1.5 s) would have expired.
    assert!(
        left.elapsed() < Duration::from_millis(1000),
        "rebalance took {:?}",
        left.elapsed()
    );
    eventually("every record handled", Duration::from_secs(30), || async {
        (recorder.distinct() == 300).then_some(())
    })
    .await;
    for m in [a, b] {
        m.trigger.trigger();
        m.task.await.unwrap();
    }
    let d = describe(&db, "g").await;
    assert_eq!(d.state, "Empty");
    assert!(
        d.partitions.iter().all(|p| p.lag == Some(0)),
        "{:?}",
        d.partitions
    );
}

/// A member that dies (no goodbye) loses its partitions within the session
/// timeout; the survivor takes them over and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_killed_mid_stream_is_taken_over_and_nothing_is_lost() {
    let db = TestDb::migrated().await;
    let recorder = Arc::new(Recorder {
        delay: Duration::from_millis(50),
        ..Default::default()
    });
    let a = spawn_member(&db, "g", recorder.clone());
    let b = spawn_member(&db, "g", recorder.clone());
    wait_for_even_spread(&db, "g", 2).await;
    relay_events_with_keys(&db, 400, 16).await;
    eventually("work to start", Duration::from_secs(10), || async {
        (recorder.seen.lock().unwrap().len() > 20).then_some(())
    })
    .await;
    a.task.abort(); // dies mid-stream: no commit, no release, no leave; its workers die with it
    let handled_at_death = recorder.seen.lock().unwrap().len();
    assert!(handled_at_death < 400, "the stream was already done");
    let died = std::time::Instant::now();
    wait_for_even_spread(&db, "g", 1).await;
    assert!(
        died.elapsed() < Duration::from_secs(5),
        "takeover took {:?}",
        died.elapsed()
    );
    eventually(
        "every record handled at least once",
        Duration::from_secs(30),
        || async { (recorder.distinct() == 400).then_some(()) },
    )
    .await;
    b.trigger.trigger();
    b.task.await.unwrap();
    let client = db.client().await;
    let behind = count(
        &client,
        "SELECT count(*) FROM group_partitions p JOIN partition_heads h USING (topic, partition)
          WHERE p.group_id = 'g' AND p.committed_offset IS DISTINCT FROM h.log_end_offset",
    )
    .await;
    assert_eq!(behind, 0, "every partition committed to its log end");
}

/// Invariant 6: once its partition moved on, a stale member cannot commit.
#[tokio::test]
async fn a_fenced_stale_member_cannot_commit() {
    let db = TestDb::migrated().await;
    let mut config = fast_group_config("g");
    config.session_timeout = Duration::from_millis(500);
    let stale = Membership::join(&db.url, config.clone()).await.unwrap();
    let owned = stale.heartbeat().await.unwrap().owned;
    assert_eq!(owned.len(), 8);
    assert!(
        stale.commit(&owned[0], 1).await.unwrap(),
        "the owner can commit"
    );

    // The stale member stops heartbeating; another takes over after the timeout.
    let mut other_config = fast_group_config("g");
    other_config.member_id = "other".into();
    let other = Membership::join(&db.url, other_config).await.unwrap();
    let taken = eventually("the takeover", Duration::from_secs(10), || async {
        let owned = other.heartbeat().await.unwrap().owned;
        (owned.len() == 8).then_some(owned)
    })
    .await;
    assert!(
        !stale.commit(&owned[0], 5).await.unwrap(),
        "a stale member's commit must be refused"
    );
    let committed = count(
        &db.client().await,
        "SELECT committed_offset FROM group_partitions WHERE group_id = 'g' AND partition = 0",
    )
    .await;
    assert_eq!(committed, 1);
    assert!(other.commit(&taken[0], 5).await.unwrap());
}

/// Graceful shutdown releases leases at once: a new member owns them on
/// its first heartbeat, well before any session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_leases_immediately() {
    let db = TestDb::migrated().await;
    let mut config = fast_group_config("g");
    config.session_timeout = Duration::from_secs(60);
    let (trigger, shutdown) = shutdown::channel();
    let url = db.url.clone();
    let member = tokio::spawn(async move {
        outbox_relay::group::consumer::run(
            &url,
            ConsumerConfig::new(config),
            Arc::new(Recorder::default()),
            shutdown,
        )
        .await
        .unwrap();
    });
    wait_for_even_spread(&db, "g", 1).await;
    relay_events(&db, 50).await;
    let client = db.client().await;
    eventually("the member to commit everything", Duration::from_secs(30), || async {
        let lag = count(
            &client,
            "SELECT coalesce(sum(h.log_end_offset - coalesce(p.committed_offset, 0)), -1)::int8
               FROM group_partitions p JOIN partition_heads h USING (topic, partition) WHERE p.group_id = 'g'",
        )
        .await;
        (lag == 0).then_some(())
    })
    .await;
    trigger.trigger();
    member.await.unwrap();
    assert_eq!(describe(&db, "g").await.state, "Empty");
    let owned = count(
        &client,
        "SELECT count(*) FROM group_partitions WHERE group_id = 'g' AND owner IS NOT NULL",
    )
    .await;
    assert_eq!(owned, 0, "leases released, not left to expire");
    let mut next = fast_group_config("g");
    next.session_timeout = Duration::from_secs(60);
    let newcomer = Membership::join(&db.url, next).await.unwrap();
    assert_eq!(
        newcomer.heartbeat().await.unwrap().owned.len(),
        8,
        "nothing to wait for"
    );
}

/// Members in two processes (the binary's mail role and two in this one)
/// share the partitions evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_across_two_processes_share_partitions_evenly() {
    let db = TestDb::migrated().await;
    let mail_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mail-{:x}", rand::random::<u32>()));
    let mut other_process = binary(&db)
        .args([
            "serve",
            "--roles",
            "mail",
            "--no-migrate",
            "--session-timeout-secs",
            "1.5",
        ])
        .env("SMTP_URL", format!("file://{}", mail_dir.display()))
        .spawn()
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let a = spawn_member(&db, "mail-service", recorder.clone());
    let b = spawn_member(&db, "mail-service", recorder.clone());
    let mut counts = wait_for_even_spread(&db, "mail-service", 3).await;
    counts.sort();
    assert_eq!(counts, vec![2, 3, 3]);
    other_process.kill().await.unwrap();
    for m in [a, b] {
        m.trigger.trigger();
        m.task.await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&mail_dir);
}

/// A member whose partition was taken over (its epoch moved on) stops
/// working on it at its next heartbeat and never handles its records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_stops_working_on_a_partition_it_lost() {
    let db = TestDb::migrated().await;
    let recorder = Arc::new(Recorder::default());
    let member = spawn_member(&db, "g", recorder.clone());
    wait_for_even_spread(&db, "g", 1).await;
    // Another process takes partition 0 over (as after a session timeout).
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO group_members (group_id, member_id, host, client_id, session_timeout, heartbeat_at)
             VALUES ('g', 'usurper', 'elsewhere', 'test', interval '1 hour', now() + interval '1 hour');
             UPDATE group_partitions SET owner = 'usurper', epoch = epoch + 1 WHERE group_id = 'g' AND partition = 0",
        )
        .await
        .unwrap();
    // Two heartbeats of the member after the takeover: the first one's
    // answer stopped the lost partition's worker before the second began.
    let taken_over: chrono::DateTime<chrono::Utc> =
        client.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let mut seen = taken_over;
    for _ in 0..2 {
        seen = eventually("a heartbeat of the member", Duration::from_secs(10), || {
            let client = &client;
            async move {
                let last: chrono::DateTime<chrono::Utc> = client
                    .query_one(
                        "SELECT max(heartbeat_at) FROM group_members
                          WHERE group_id = 'g' AND member_id <> 'usurper'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                (last > seen).then_some(last)
            }
        })
        .await;
    }
    let keys: Vec<String> = (0..200)
        .map(|n: i32| format!("k{n}"))
        .filter(|k| outbox_relay::log::partitioner::partition_for_key(k, 8) == 0)
        .take(10)
        .collect();
    for key in &keys {
        insert_event(&client, "order-created", key, json!({})).await;
    }
    insert_event(&client, "order-created", "k1", json!({})).await; // another partition
    drain(&mut db.relay()).await;
    let other = outbox_relay::log::partitioner::partition_for_key("k1", 8) as i32;
    eventually(
        "the record of a partition still owned",
        Duration::from_secs(10),
        || async {
            recorder
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|(p, _)| *p == other)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        recorder.seen.lock().unwrap().iter().all(|(p, _)| *p != 0),
        "records of a lost partition were handled"
    );
    let committed = count(
        &client,
        "SELECT coalesce(committed_offset, -1) FROM group_partitions WHERE group_id = 'g' AND partition = 0",
    )
    .await;
    assert!(
        committed <= 0,
        "a lost partition's offset moved: {committed}"
    );
    member.trigger.trigger();
    member.task.await.unwrap();
}

/// `auto.offset.reset`: a new group reading with `latest` skips what is
/// already in the log; with `earliest` it reads it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_reset_policy_applies_to_partitions_without_a_commit() {
    let db = TestDb::migrated().await;
    relay_events(&db, 30).await;
    let spawn = |group: &str, reset: group::OffsetReset, recorder: Arc<Recorder>| {
        let (trigger, shutdown) = shutdown::channel();
        let mut config = fast_group_config(group);
        config.offset_reset = reset;
        let url = db.url.clone();
        let task = tokio::spawn(async move {
            outbox_relay::group::consumer::run(
                &url,
                ConsumerConfig::new(config),
                recorder,
                shutdown,
            )
            .await
            .unwrap();
        });
        Member { trigger, task }
    };
    let (early, late) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let earliest = spawn("from-start", group::OffsetReset::Earliest, early.clone());
    let latest = spawn("from-now", group::OffsetReset::Latest, late.clone());
    wait_for_even_spread(&db, "from-start", 1).await;
    wait_for_even_spread(&db, "from-now", 1).await;
    // Both have committed their starting positions; now 5 more events.
    let client = db.client().await;
    eventually(
        "latest to commit its start at the log end",
        Duration::from_secs(10),
        || async {
            let at_end = count(
            &client,
            "SELECT count(*) FROM group_partitions p JOIN partition_heads h USING (topic, partition)
              WHERE p.group_id = 'from-now' AND p.committed_offset = h.log_end_offset",
        )
        .await;
            (at_end == 8).then_some(())
        },
    )
    .await;
    relay_events(&db, 5).await;
    eventually(
        "both groups to see the new events",
        Duration::from_secs(10),
        || async {
            (early.seen.lock().unwrap().len() == 35 && late.seen.lock().unwrap().len() == 5)
                .then_some(())
        },
    )
    .await;
    for m in [earliest, latest] {
        m.trigger.trigger();
        m.task.await.unwrap();
    }
}

/// Static membership (Kafka's group.instance.id): a member that died
/// (aborted: no leave, no release) and comes back with the same instance
/// id takes its partitions back at once, well inside the session timeout;
/// the newer incarnation fences an older one that is still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_static_member_takes_its_partitions_back_at_once() {
    let db = TestDb::migrated().await;
    let session = Duration::from_secs(20);
    let start = |handler: Arc<Recorder>| {
        let (trigger, shutdown) = shutdown::channel();
        let mut group = fast_group_config("static").with_instance_id("mail-1");
        group.session_timeout = session;
        let config = ConsumerConfig::new(group);
        let url = db.url.clone();
        let task = tokio::spawn(async move {
            outbox_relay::group::consumer::run(&url, config, handler, shutdown).await
        });
        (trigger, task)
    };
    let (_first_trigger, first) = start(Arc::new(Recorder::default()));
    wait_for_even_spread(&db, "static", 1).await;
    // A crash: the task is gone without leaving the group.
    first.abort();
    let _ = first.await;

    let restarted_at = tokio::time::Instant::now();
    let recorder = Arc::new(Recorder::default());
    let (_second_trigger, second) = start(recorder.clone());
    relay_events(&db, 40).await;
    eventually(
        "the restarted member to handle everything",
        session,
        || async { (recorder.distinct() == 40).then_some(()) },
    )
    .await;
    assert!(
        restarted_at.elapsed() < session / 2,
        "took {:?}: partitions came back only after the session timeout",
        restarted_at.elapsed()
    );

    // A third process with the same instance id fences the second.
    let (_third_trigger, third) = start(Arc::new(Recorder::default()));
    let fenced = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the replaced incarnation stops")
        .unwrap();
    let error = fenced.expect_err("a replaced member stops with an error");
    assert!(
        error
            .to_string()
            .contains("another process joined the group as member \"mail-1\""),
        "{error:#}"
    );
    third.abort();
}

/// Keeps every record it is handed, whole.
#[derive(Default)]
struct Keeper {
    records: Mutex<Vec<Record>>,
}

impl RecordHandler for Keeper {
    async fn handle(&self, record: Record, _lease: Arc<Lease>) {
        self.records.lock().unwrap().push(record);
    }
}

/// How many records this process's members of `group` took from the relay
/// of their process (`outbox_relay_consumer_handed_records_total`).
async fn handed_records(group: &str) -> u64 {
    let text = outbox_relay::metrics::render(None).await.unwrap();
    let series = format!("outbox_relay_consumer_handed_records_total{{group=\"{group}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_beside_the_relay_takes_its_records_as_the_log_holds_them() {
    let db = TestDb::migrated().await;
    let group = "handed-over";
    let keeper = Arc::new(Keeper::default());
    let (trigger, shutdown) = shutdown::channel();
    let member = {
        let (url, keeper) = (db.url.clone(), keeper.clone());
        let config = ConsumerConfig::new(fast_group_config(group));
        tokio::spawn(async move {
            outbox_relay::group::consumer::run(&url, config, keeper, shutdown)
                .await
                .unwrap()
        })
    };
    // Every worker has read its (empty) partition once: it commits its
    // starting offset right after that first read.
    let client = db.client().await;
    eventually("every partition worker to start", Duration::from_secs(30), || async {
        let started = count(
            &client,
            &format!("SELECT count(*) FROM group_partitions WHERE group_id = '{group}' AND committed_offset IS NOT NULL"),
        )
        .await;
        (started == 8).then_some(())
    })
    .await;

    // What the append rewrites: the reserved header namespace dropped, a
    // retried row's link added; keys, none, and payloads of every shape.
    client
        .batch_execute(
            "INSERT INTO outbox (topic, key, payload, headers)
             SELECT 'order-created', CASE WHEN n % 5 = 0 THEN NULL ELSE (n % 7)::text END,
                    jsonb_build_object('n', n, 'list', jsonb_build_array(n, 'x', NULL), 'text', repeat('é', n)),
                    CASE WHEN n % 3 = 0 THEN jsonb_build_object('outbox-relay-forged', 'no', 'kept', n::text)
                         ELSE '{}'::jsonb END
               FROM generate_series(1, 40) n;
             INSERT INTO outbox_retries (outbox_id, retry_of)
             SELECT max(id), 'order-created/0/0' FROM outbox;",
        )
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();

    let mut handled = eventually(
        "all 40 records handled",
        Duration::from_secs(30),
        || async {
            let records = keeper.records.lock().unwrap().clone();
            (records.len() >= 40).then_some(records)
        },
    )
    .await;
    handled.sort_by_key(|r| (r.partition, r.offset));
    let mut in_log = Vec::new();
    for partition in 0..8 {
        in_log.extend(
            outbox_relay::log::read(&client, "order-created", partition, 0, 100)
                .await
                .unwrap(),
        );
    }
    assert_eq!(
        serde_json::to_value(&handled).unwrap(),
        serde_json::to_value(&in_log).unwrap(),
        "the records handled are the log's, field for field"
    );
    assert!(
        in_log.iter().any(|r| r.headers.get("kept").is_some())
            && in_log
                .iter()
                .all(|r| r.headers.get("outbox-relay-forged").is_none())
            && in_log.iter().any(|r| r
                .headers
                .get(outbox_relay::outbox::RETRY_OF_HEADER)
                .is_some()),
        "the batch had rewritten headers to hand over"
    );
    assert_eq!(
        handed_records(group).await,
        40,
        "every record came from the relay, none was read back"
    );

    // A full batch (a drain's: 64 rows at this relay's smallest batch) is
    // read back, never gathered for handing over; the rest after it is.
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT 'order-created', n::text, jsonb_build_object('n', n) FROM generate_series(1, 100) n",
            &[],
        )
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    relay.release().await.unwrap();
    eventually(
        "all 140 records handled",
        Duration::from_secs(30),
        || async { (keeper.records.lock().unwrap().len() >= 140).then_some(()) },
    )
    .await;
    assert_eq!(handed_records(group).await, 40 + 36);
    trigger.trigger();
    member.await.unwrap();
}
