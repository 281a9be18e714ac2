//! Reading the log: offsets, offsetsForTimes, retention.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use outbox_relay::log;
use serde_json::json;

use crate::harness::*;

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, minute, 0).unwrap()
}

/// Writes events with explicit created_at (as an import would) to one
/// partition of a 1-partition topic, relayed in several batches.
async fn log_with_create_times(db: &TestDb, minutes: &[u32]) {
    let mut client = db.client().await;
    log::create_topic(
        &mut client,
        "times",
        1,
        std::time::Duration::from_secs(86_400 * 35),
    )
    .await
    .unwrap();
    let mut relay = db.relay();
    for (i, minute) in minutes.iter().enumerate() {
        client
            .execute(
                "INSERT INTO outbox (topic, key, payload, created_at) VALUES ('times', 'k', $1, $2)",
                &[&json!({ "i": i }), &at(*minute)],
            )
            .await
            .unwrap();
        // Relay every other row so the time index has several entries.
        if i % 2 == 1 {
            drain(&mut relay).await;
        }
    }
    drain(&mut relay).await;
}

#[tokio::test]
async fn offsets_for_times_follows_kafka() {
    let db = TestDb::migrated().await;
    // CreateTime is not monotonic: offset 3 is older than offset 2.
    log_with_create_times(&db, &[10, 20, 30, 25, 40, 50]).await;
    let client = db.client().await;
    let lookup = |minute: u32| {
        let client = &client;
        async move {
            log::offset_for_time(client, "times", 0, at(minute))
                .await
                .unwrap()
        }
    };
    assert_eq!(lookup(0).await, 0, "before everything: the first offset");
    assert_eq!(lookup(10).await, 0, "an exact match");
    assert_eq!(lookup(11).await, 1);
    assert_eq!(
        lookup(21).await,
        2,
        "first in offset order, not the closest time (25 at offset 3)"
    );
    assert_eq!(lookup(26).await, 2);
    assert_eq!(lookup(31).await, 4);
    assert_eq!(lookup(50).await, 5);
    assert_eq!(lookup(51).await, 6, "after everything: the log end offset");

    let offsets = log::offsets_of(&client, "times", 0).await.unwrap();
    assert_eq!((offsets.log_start_offset, offsets.log_end_offset), (0, 6));
}

#[tokio::test]
async fn offsets_for_times_on_an_empty_partition_is_the_log_end() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    assert_eq!(
        log::offset_for_time(&client, "order-created", 3, at(0))
            .await
            .unwrap(),
        0
    );
    assert!(matches!(
        log::offset_for_time(&client, "order-created", 8, at(0)).await,
        Err(log::LogError::UnknownPartition { .. })
    ));
    assert!(matches!(
        log::offset_for_time(&client, "nope", 0, at(0)).await,
        Err(log::LogError::UnknownTopic(_))
    ));
}

#[tokio::test]
async fn reads_are_in_offset_order_from_any_offset() {
    let db = TestDb::migrated().await;
    log_with_create_times(&db, &[1, 2, 3, 4, 5]).await;
    let client = db.client().await;
    let records = log::read(&client, "times", 0, 2, 10).await.unwrap();
    let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, vec![2, 3, 4]);
    assert_eq!(records[0].payload, json!({ "i": 2 }));
    assert_eq!(records[0].created_at, at(3));
    assert!(records[0].appended_at > records[0].created_at);
    assert_eq!(log::read(&client, "times", 0, 0, 2).await.unwrap().len(), 2);
}

#[tokio::test]
async fn retention_moves_the_log_start_and_offsets_for_times_respects_it() {
    let db = TestDb::migrated().await;
    log_with_create_times(&db, &[1, 2, 3, 4]).await;
    let mut client = db.client().await;
    client
        .execute(
            "UPDATE topics SET retention = interval '1 second' WHERE name = 'times'",
            &[],
        )
        .await
        .unwrap();
    eventually("records to age past one second", std::time::Duration::from_secs(10), || {
        let client = &client;
        async move {
            let old = count(client, "SELECT count(*) FROM event_log WHERE appended_at < now() - interval '1 second'").await;
            (old == 4).then_some(())
        }
    })
    .await;
    let outcome = log::storage::enforce_retention(&mut client).await.unwrap();
    assert!(outcome.partitions_truncated >= 1);
    let offsets = log::offsets_of(&client, "times", 0).await.unwrap();
    assert_eq!((offsets.log_start_offset, offsets.log_end_offset), (4, 4));
    assert!(log::read(&client, "times", 0, 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        log::offset_for_time(&client, "times", 0, at(0))
            .await
            .unwrap(),
        4
    );
    // The default topic keeps its 35 days.
    let topics = log::list_topics(&client).await.unwrap();
    let default = topics.iter().find(|t| t.name == "order-created").unwrap();
    assert_eq!(default.retention_seconds, 35 * 86_400);
}

/// Retention drops a day of the log only when it can get the table's lock
/// at once: queued behind a long reader, the `DROP` would hold up every
/// append and read queued behind it. It tries again next pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_does_not_queue_behind_a_long_reader() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE event_log_20200101 PARTITION OF event_log
               FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-01-02 00:00:00+00')",
        )
        .await
        .unwrap();
    let mut reader = db.client().await;
    let long_read = reader.transaction().await.unwrap();
    long_read
        .batch_execute("SELECT count(*) FROM event_log")
        .await
        .unwrap();

    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        log::storage::enforce_retention(&mut client),
    )
    .await
    .expect("retention does not wait for the reader")
    .unwrap();
    assert!(outcome.days_dropped.is_empty(), "{outcome:?}");
    // Appends go on meanwhile.
    insert_event(&client, "order-created", "k", serde_json::json!({})).await;
    tokio::time::timeout(Duration::from_secs(10), drain(&mut db.relay()))
        .await
        .expect("the relay appends while the reader is open");

    long_read.rollback().await.unwrap();
    let outcome = log::storage::enforce_retention(&mut client).await.unwrap();
    assert_eq!(outcome.days_dropped, vec!["event_log_20200101".to_string()]);
}

/// A listener for the relay's notifications closes its `LISTEN` connection
/// once dropped: a group member that stopped must not keep one open (and
/// its place in the process's registry) for the process's lifetime.
#[tokio::test]
async fn a_dropped_append_listener_closes_its_connection() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let listening = || {
        count(
            &client,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND query = 'LISTEN event_log_appended'",
        )
    };
    let appends = log::notify::listen(&db.url).expect("listen");
    eventually("the LISTEN connection", Duration::from_secs(10), || async {
        (listening().await == 1).then_some(())
    })
    .await;
    drop(appends);
    eventually(
        "the LISTEN connection to close",
        Duration::from_secs(10),
        || async { (listening().await == 0).then_some(()) },
    )
    .await;
}

/// Listens for appends to `url`'s log and returns a worker's wake-ups for
/// partition 0 of `order-created` once the listener is told its channel
/// is listened on (which wakes every worker once).
async fn listening_partition(url: &str) -> (log::notify::Appends, log::notify::PartitionAppends) {
    let appends = log::notify::listen(url).expect("listen for appends");
    let mut partition = appends.subscribe("order-created", 0);
    tokio::time::timeout(Duration::from_secs(10), partition.past(0))
        .await
        .expect("the appends listener is told it listens");
    (appends, partition)
}

/// A process reads every channel of a database on one `LISTEN` connection:
/// Postgres wakes every listening backend of the database for each
/// `NOTIFY`, whatever its channel, so a connection per channel woke one
/// backend more for every relay batch. Both channels still deliver.
#[tokio::test]
async fn one_listen_connection_carries_every_channel_of_a_database() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    log::notify::listen_outbox_written(&db.url, move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })
    .expect("listen for outbox_written");
    // Each subscriber is told once its channel is listened on.
    let (_appends, mut partition) = listening_partition(&db.url).await;
    eventually(
        "outbox_written listened on",
        Duration::from_secs(10),
        || async { (calls.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    let listening = count(
        &client,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .await;
    assert_eq!(listening, 1, "one LISTEN connection for both channels");

    let before = calls.load(std::sync::atomic::Ordering::SeqCst);
    client
        .batch_execute("NOTIFY outbox_written; NOTIFY event_log_appended, E'order-created\\t0:7'")
        .await
        .unwrap();
    eventually(
        "the outbox_written notification",
        Duration::from_secs(10),
        || async { (calls.load(std::sync::atomic::Ordering::SeqCst) > before).then_some(()) },
    )
    .await;
    let woken = tokio::time::timeout(Duration::from_secs(10), partition.past(6)).await;
    assert!(
        matches!(woken, Ok(log::notify::Wake::Read)),
        "the appends notification wakes the partition's worker"
    );
}

/// A runtime's listeners are served by a connection of that runtime: a
/// listener must not depend on another runtime's task (a current-thread
/// runtime runs its tasks only while it is driven, and stops them when it
/// shuts down).
#[tokio::test]
async fn a_listener_does_not_depend_on_another_runtime_listening_to_its_database() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // Another runtime listens first, then stops being driven.
    let url = db.url.clone();
    let other = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a second runtime");
        let listening = runtime.block_on(listening_partition(&url));
        (runtime, listening)
    })
    .await
    .unwrap();

    let (_appends, mut partition) = listening_partition(&db.url).await;
    client
        .batch_execute("NOTIFY event_log_appended, E'order-created\\t0:7'")
        .await
        .unwrap();
    let woken = tokio::time::timeout(Duration::from_secs(10), partition.past(6)).await;
    assert!(
        matches!(woken, Ok(log::notify::Wake::Read)),
        "this runtime's listener hears the notification"
    );
    // A runtime is dropped outside of any asynchronous context.
    tokio::task::spawn_blocking(move || drop(other))
        .await
        .unwrap();
}
