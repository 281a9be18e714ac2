//! The relay against a real Postgres (docs/invariants.md, 1–5 and 11).

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::app::order::{self, EmailAddress, NewOrder};
use outbox_relay::log::partitioner::partition_for_key;
use outbox_relay::relay::{Relay, StepOutcome};
use serde_json::json;

use crate::harness::*;

fn sample_order(user_id: i64) -> NewOrder {
    NewOrder {
        user_id,
        email: EmailAddress::parse("buyer@example.com").unwrap(),
        amount: 1999,
    }
}

/// The order's one-statement write builds the `OrderCreated` event in SQL:
/// it must be the event the Rust type describes, headers included.
#[tokio::test]
async fn placed_order_event_is_order_created_payload() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    let order = sample_order(42);
    let tx = client.transaction().await.unwrap();
    let order_id = order::insert(&tx, &order).await.unwrap();
    tx.commit().await.unwrap();
    let row = client
        .query_one("SELECT topic, key, payload, headers FROM outbox", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), order::ORDER_CREATED_TOPIC);
    assert_eq!(row.get::<_, Option<String>>(1), Some(order_id.to_string()));
    assert_eq!(
        row.get::<_, serde_json::Value>(2),
        order::order_created_payload(order_id, &order)
    );
    assert_eq!(
        row.get::<_, serde_json::Value>(3),
        json!({ "event-type": "OrderCreated" })
    );
}

/// Invariant 1: an order exists if and only if its event does.
#[tokio::test]
async fn rolled_back_writer_leaves_neither_order_nor_event() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;

    let tx = client.transaction().await.unwrap();
    order::insert(&tx, &sample_order(1)).await.unwrap();
    tx.rollback().await.unwrap();

    let tx = client.transaction().await.unwrap();
    let kept = order::insert(&tx, &sample_order(2)).await.unwrap();
    tx.commit().await.unwrap();

    let mut relay = db.relay();
    drain(&mut relay).await;

    assert_eq!(count(&client, "SELECT count(*) FROM orders").await, 1);
    let keys: Vec<String> = column(&client, "SELECT key FROM event_log").await;
    assert_eq!(
        keys,
        vec![kept.to_string()],
        "only the committed order has an event"
    );
}

/// Invariant 2: a late-committing row is relayed, and an open transaction
/// does not hold back rows that others commit meanwhile.
#[tokio::test]
async fn late_commit_is_never_skipped_and_open_transactions_do_not_stall() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut relay = db.relay();
    relay.step().await.unwrap(); // take the lease

    // A writer that inserts first (lower id and txid) and commits last.
    let mut late_writer = db.client().await;
    let late_tx = late_writer.transaction().await.unwrap();
    insert_via(&late_tx, "late").await;
    // An unrelated long transaction holding an xid on another table.
    let mut batch_job = db.client().await;
    let job_tx = batch_job.transaction().await.unwrap();
    job_tx
        .execute(
            "INSERT INTO orders (user_id, email, amount) VALUES (1, 'job@example.com', 1)",
            &[],
        )
        .await
        .unwrap();

    insert_early_events(&client, 5).await;
    drain(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log").await,
        5,
        "rows committed while other transactions are open must not wait for them"
    );

    late_tx.commit().await.unwrap();
    drain(&mut relay).await;
    let late = count(&client, "SELECT count(*) FROM event_log WHERE key = 'late'").await;
    assert_eq!(late, 1, "the late-committing row must be relayed once");
    job_tx.rollback().await.unwrap();
    assert_log_consistent(&client, "order-created").await;
}

/// `count` events keyed `early-0`, `early-1`, … each committed on its own.
async fn insert_early_events(client: &tokio_postgres::Client, count: i64) {
    for i in 0..count {
        insert_event(
            client,
            "order-created",
            &format!("early-{i}"),
            json!({ "i": i }),
        )
        .await;
    }
}

async fn insert_via(tx: &tokio_postgres::Transaction<'_>, key: &str) {
    tx.execute(
        outbox_relay::outbox::INSERT_OUTBOX,
        &[
            &"order-created",
            &Some(key),
            &json!({ "k": key }),
            &json!({}),
        ],
    )
    .await
    .unwrap();
}

/// Invariant 3: a running relay whose connection is killed at arbitrary
/// instants (mid-batch included) never loses or duplicates a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_at_random_instants_moves_each_row_exactly_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    const ROWS: i64 = 20_000;
    for chunk in 0..20i64 {
        // Many transactions, so the backlog spans many batches.
        client
            .execute(
                "INSERT INTO outbox (topic, key, payload)
                 SELECT 'order-created', (n % 97)::text, jsonb_build_object('n', n)
                   FROM generate_series($1::int8 * 1000 + 1, $1::int8 * 1000 + 1000) n",
                &[&chunk],
            )
            .await
            .unwrap();
    }
    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let mut config = fast_relay_config();
    config.min_batch = 50;
    config.max_batch = 400;
    let relay = tokio::spawn(Relay::new(&db.url, config).run(shutdown));

    // Each round: wait for progress since the last kill, let the relay run
    // a varying few milliseconds into its next batches, then kill it.
    let mut kills_mid_way = 0;
    let mut appended_at_last_kill = 0;
    for round in 0..25u64 {
        let progressed = eventually(
            "the relay to make progress",
            Duration::from_secs(30),
            || async {
                let appended = count(&client, "SELECT count(*) FROM event_log").await;
                (appended > appended_at_last_kill || appended == ROWS).then_some(appended)
            },
        )
        .await;
        if progressed == ROWS {
            break;
        }
        tokio::time::sleep(Duration::from_micros(round * 7919 % 6000)).await;
        let killed = count(
            &client,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name = 'outbox-relay' AND datname = current_database()",
        )
        .await;
        appended_at_last_kill = count(&client, "SELECT count(*) FROM event_log").await;
        if killed > 0 && appended_at_last_kill < ROWS {
            kills_mid_way += 1;
        }
    }
    assert!(
        kills_mid_way >= 5,
        "only {kills_mid_way} kills landed while the relay was part-way"
    );
    eventually(
        "the relay to finish after the kills",
        Duration::from_secs(60),
        || async { (count(&client, "SELECT count(*) FROM event_log").await >= ROWS).then_some(()) },
    )
    .await;
    trigger.trigger();
    relay.await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, ROWS);
    assert_log_consistent(&client, "order-created").await;
}

/// Invariant 3, deterministic: the relay's connection is terminated in the
/// middle of a batch transaction, after its records were appended and
/// before the cursor moved: none of it may remain.
#[tokio::test]
async fn relay_connection_terminated_mid_batch_appends_nothing() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for i in 0..50 {
        insert_event(&client, "order-created", &i.to_string(), json!({ "i": i })).await;
    }
    let mut relay = Relay::new(db.url.clone(), fast_relay_config());
    relay.step().await.unwrap(); // the lease (and the statements prepared)

    // Block the relay inside its batch after it advanced the heads and
    // appended the records: the time index, written next in the same
    // statement, waits on a lock this test holds (a trigger of this test's
    // database only).
    client
        .batch_execute(
            "CREATE FUNCTION wait_for_the_test() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_advisory_xact_lock(7357); RETURN NEW; END $$;
             CREATE TRIGGER wait_for_the_test BEFORE INSERT ON event_log_time_index
                 FOR EACH ROW EXECUTE FUNCTION wait_for_the_test();",
        )
        .await
        .unwrap();
    let mut blocker = db.client().await;
    let blocker_tx = blocker.transaction().await.unwrap();
    blocker_tx
        .execute("SELECT pg_advisory_xact_lock(7357)", &[])
        .await
        .unwrap();

    let stuck = tokio::spawn(async move {
        relay.step().await // the batch: blocks, then fails
    });
    let pid: i32 = eventually(
        "the relay to wait on the lock",
        Duration::from_secs(10),
        || async {
            client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'
                    AND application_name = 'outbox-relay'",
                    &[],
                )
                .await
                .unwrap()
                .map(|r| r.get(0))
        },
    )
    .await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(stuck.await.unwrap().is_err(), "the killed batch must fail");
    blocker_tx.rollback().await.unwrap();
    client
        .batch_execute("DROP TRIGGER wait_for_the_test ON event_log_time_index")
        .await
        .unwrap();

    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log").await,
        0,
        "nothing half-appended"
    );
    client
        .execute("UPDATE relay_state SET lease_expires_at = '-infinity'", &[])
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 50);
    assert_log_consistent(&client, "order-created").await;
}

/// Invariants 4 and 5 under 16 concurrent writers with a live relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_keep_per_key_order_and_gapless_offsets() {
    let db = TestDb::migrated().await;
    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let relay_task = tokio::spawn(db.relay().run(shutdown));

    const WRITERS: i64 = 16;
    const EVENTS_PER_WRITER: i64 = 150;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let url = db.url.clone();
        writers.push(tokio::spawn(async move {
            let mut client = outbox_relay::db::connect(&url).await.unwrap();
            for seq in 0..EVENTS_PER_WRITER {
                // Each writer owns four keys and commits their events in sequence.
                let key = format!("w{w}-k{}", seq % 4);
                let tx = client.transaction().await.unwrap();
                insert_via_tx(&tx, &key, json!({ "writer": w, "seq": seq })).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let client = db.client().await;
    let total = WRITERS * EVENTS_PER_WRITER;
    eventually(
        "every event in the log",
        Duration::from_secs(60),
        || async {
            (count(&client, "SELECT count(*) FROM event_log").await == total).then_some(())
        },
    )
    .await;
    trigger.trigger();
    relay_task.await.unwrap();

    assert_log_consistent(&client, "order-created").await;
    let rows = client
        .query(
            "SELECT key, partition, (payload->>'seq')::bigint FROM event_log ORDER BY partition, \"offset\"",
            &[],
        )
        .await
        .unwrap();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for row in rows {
        let (key, partition, seq): (String, i32, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            partition as u32,
            partition_for_key(&key, 8),
            "key {key} in the murmur2 partition"
        );
        if let Some(previous) = last_seq.insert(key.clone(), seq) {
            assert!(
                seq > previous,
                "key {key}: seq {seq} after {previous} (out of commit order)"
            );
        }
    }
}

async fn insert_via_tx(
    tx: &tokio_postgres::Transaction<'_>,
    key: &str,
    payload: serde_json::Value,
) {
    tx.execute(
        outbox_relay::outbox::INSERT_OUTBOX,
        &[&"order-created", &Some(key), &payload, &json!({})],
    )
    .await
    .unwrap();
}

/// One fenced leader: a standby takes over when the leader dies, and the
/// old leader can no longer append.
#[tokio::test]
async fn standby_takes_over_and_the_old_leader_is_fenced() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut leader = db.relay();
    let mut standby = db.relay();
    assert!(matches!(
        leader.step().await.unwrap(),
        StepOutcome::BecameLeader { .. }
    ));
    assert_eq!(standby.step().await.unwrap(), StepOutcome::Standby);

    insert_event(&client, "order-created", "a", json!({})).await;
    drain(&mut leader).await;

    // The leader stalls (stops renewing); the standby takes over after the lease.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let took_over = loop {
        if let StepOutcome::BecameLeader { epoch } = standby.step().await.unwrap() {
            break epoch;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby did not take the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    insert_event(&client, "order-created", "b", json!({})).await;
    drain(&mut standby).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 2);

    // The old leader wakes up: its next step is refused at the old epoch.
    insert_event(&client, "order-created", "c", json!({})).await;
    let outcome = leader.step().await.unwrap();
    assert_eq!(
        outcome,
        StepOutcome::LostLeadership,
        "stale leader must be fenced"
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log WHERE key = 'c'").await,
        0
    );
    let holder_epoch: i64 = client
        .query_one("SELECT epoch FROM relay_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(holder_epoch, took_over);
    drain(&mut standby).await;
    assert_log_consistent(&client, "order-created").await;
}

/// The running relay hands over to a standby process within a few seconds
/// when the leader's task dies without releasing its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_standby_takes_over_within_a_few_seconds() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (_t1, s1) = outbox_relay::shutdown::channel();
    let first = tokio::spawn(db.relay().run(s1));
    insert_event(&client, "order-created", "before", json!({})).await;
    eventually(
        "the first leader to relay",
        Duration::from_secs(10),
        || async { (count(&client, "SELECT count(*) FROM event_log").await == 1).then_some(()) },
    )
    .await;
    let (_t2, s2) = outbox_relay::shutdown::channel();
    let second = tokio::spawn(db.relay().run(s2));
    first.abort(); // dies without releasing the lease
    let started = std::time::Instant::now();
    insert_event(&client, "order-created", "after", json!({})).await;
    eventually("the standby to relay", Duration::from_secs(10), || async {
        (count(&client, "SELECT count(*) FROM event_log").await == 2).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "takeover took {:?}",
        started.elapsed()
    );
    second.abort();
}

/// A row for a topic that does not exist is parked, not looped on.
#[tokio::test]
async fn row_for_unknown_topic_is_parked_and_the_relay_moves_on() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_event(&client, "no-such-topic", "x", json!({ "bad": true })).await;
    insert_event(&client, "order-created", "ok", json!({})).await;
    let mut relay = db.relay();
    drain(&mut relay).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 1);
    let reason: String = client
        .query_one(
            "SELECT reason FROM outbox_parked WHERE topic = 'no-such-topic'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("unknown topic"), "{reason}");
}

/// A batch that appends nothing (here it only parks a row) sends no
/// `NOTIFY`: an empty payload would wake every consumer worker. Postgres
/// delivers notifications in commit order, so the first one the listener
/// gets must be the later batch's, naming its partition.
#[tokio::test]
async fn a_batch_that_appends_nothing_notifies_no_one() {
    use futures_util::StreamExt;
    use tokio_postgres::{AsyncMessage, NoTls};

    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (listener, mut connection) = outbox_relay::db::parse_url(&db.url)
        .unwrap()
        .connect(NoTls)
        .await
        .unwrap();
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = notified.send(n.payload().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN event_log_appended")
        .await
        .unwrap();

    let mut relay = db.relay();
    insert_event(&client, "no-such-topic", "x", json!({})).await;
    drain(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_parked").await,
        1
    );
    insert_event(&client, "order-created", "ok", json!({})).await;
    drain(&mut relay).await;

    let first = tokio::time::timeout(Duration::from_secs(10), notifications.recv())
        .await
        .expect("a notification for the batch that appended")
        .unwrap();
    let partition = partition_for_key("ok", 8);
    assert_eq!(first, format!("order-created\t{partition}:1"));
}

/// Retry links are looked up only when the batch's id range has one; then
/// the retried row gets its header and its neighbours in the batch none.
#[tokio::test]
async fn only_the_retried_row_of_a_batch_carries_the_retry_header() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for key in ["before", "retried", "after"] {
        insert_event(&client, "order-created", key, json!({})).await;
    }
    client
        .execute(
            "INSERT INTO outbox_retries (outbox_id, retry_of)
             SELECT id, 'order-created/3/7' FROM outbox WHERE key = 'retried'",
            &[],
        )
        .await
        .unwrap();
    drain(&mut db.relay()).await;
    let headers: Vec<(String, serde_json::Value)> = client
        .query("SELECT key, headers FROM event_log ORDER BY outbox_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        headers,
        vec![
            ("before".to_string(), json!({})),
            (
                "retried".to_string(),
                json!({ "outbox-relay-retry-of": "order-created/3/7" })
            ),
            ("after".to_string(), json!({})),
        ]
    );
}

/// Keyless records are spread over partitions; headers and created_at are kept.
#[tokio::test]
async fn keyless_rows_headers_and_create_time_are_carried_over() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, headers, created_at)
             SELECT 'order-created', NULL, jsonb_build_object('n', n), '{\"source\": \"import\"}',
                    '2026-10-01T00:00:00Z'::timestamptz + n * interval '1 minute'
             FROM generate_series(1, 16) n",
            &[],
        )
        .await
        .unwrap();
    let mut relay = db.relay();
    drain(&mut relay).await;
    let partitions = count(&client, "SELECT count(DISTINCT partition) FROM event_log").await;
    assert!(partitions > 1, "keyless rows all landed in one partition");
    let imported = count(
        &client,
        "SELECT count(*) FROM event_log WHERE headers->>'source' = 'import' AND created_at < '2026-10-02'",
    )
    .await;
    assert_eq!(imported, 16);
}

/// Relayed outbox rows are removed by maintenance, and only those.
#[tokio::test]
async fn relayed_outbox_rows_are_cleaned_up_but_pending_ones_stay() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    for i in 0..10 {
        insert_event(&client, "order-created", &i.to_string(), json!({})).await;
    }
    let mut relay = db.relay();
    drain(&mut relay).await;
    let mut writer = db.client().await;
    let open = writer.transaction().await.unwrap();
    insert_via(&open, "pending").await;
    insert_event(&client, "order-created", "after", json!({})).await;
    // The cleanup horizon is the relayed snapshot's xmin, which any open
    // transaction in the cluster (other tests' too) holds back: poll.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        drain(&mut relay).await;
        outbox_relay::relay::delete_relayed_outbox_rows(&client, "default", 1000)
            .await
            .unwrap();
        let kept = count(
            &client,
            "SELECT count(*) FROM outbox WHERE key NOT IN ('pending', 'after')",
        )
        .await;
        if kept == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relayed rows were not cleaned up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open.commit().await.unwrap();
    let left = count(&client, "SELECT count(*) FROM outbox WHERE key = 'pending'").await;
    assert_eq!(
        left, 1,
        "a row of an open transaction must not be cleaned up"
    );
    drain(&mut relay).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 12);
    assert_log_consistent(&client, "order-created").await;
}

/// Batches follow numeric transaction-id order even where the decimal
/// forms sort differently ("1000" < "999"): a drain spanning such ids in
/// many small batches moves each row exactly once.
#[tokio::test]
async fn drain_in_small_batches_across_txid_digit_boundaries_is_exact() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // The ids below must all be in the past: a fresh cluster (this test run
    // alone) may not have reached 1001 yet. Each statement outside a
    // transaction that asks for an id takes a new one.
    while client
        .query_one("SELECT pg_current_xact_id()::text::int8", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        < 1100
    {}
    // Completed transaction ids below every live one; set explicitly here
    // (writers never set txid) to place ids on both sides of 10, 100, 1000.
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload, txid)
             SELECT 'order-created', t::text || '-' || r, jsonb_build_object('t', t, 'r', r), t::text::xid8
               FROM unnest(ARRAY[3, 9, 10, 11, 99, 100, 101, 998, 999, 1000, 1001]) t, generate_series(1, 3) r",
            &[],
        )
        .await
        .unwrap();
    let mut config = fast_relay_config();
    config.min_batch = 2;
    config.max_batch = 4;
    let mut relay = outbox_relay::relay::Relay::new(&db.url, config);
    drain(&mut relay).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 33);
    assert_log_consistent(&client, "order-created").await;
}

/// Fencing at the batch itself: a leader whose lease was renewed a moment
/// ago, but whose epoch has since moved on, cannot append, whether it
/// peeked first or was woken.
#[tokio::test]
async fn a_batch_at_a_stale_epoch_appends_nothing() {
    for woken in [false, true] {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        let mut leader = db.relay();
        assert!(matches!(
            leader.step().await.unwrap(),
            StepOutcome::BecameLeader { .. }
        ));
        assert_eq!(leader.step().await.unwrap(), StepOutcome::Idle);
        // Another process takes over right after (no renewal is due here).
        client
            .execute(
                "UPDATE relay_state SET epoch = epoch + 1, holder = 'someone-else'",
                &[],
            )
            .await
            .unwrap();
        insert_event(&client, "order-created", "x", json!({})).await;
        let outcome = if woken {
            leader.step_woken().await
        } else {
            leader.step().await
        };
        assert_eq!(
            outcome.unwrap(),
            StepOutcome::LostLeadership,
            "woken: {woken}"
        );
        assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 0);
    }
}

/// Invariants 2, 3 and 5 for a relay that is woken rather than polled:
/// rows committed while other writers stay open move at once, a late commit
/// still moves once, a wake-up with nothing new writes nothing, and a
/// backlog drains in full batches exactly. (A woken step reads at once only
/// when the relayed snapshot had no transaction in progress, anywhere in
/// the cluster; otherwise it peeks first. Other tests' transactions decide
/// which happens here; the read itself is tested below.)
#[tokio::test]
async fn a_woken_relay_skips_no_late_commit_and_writes_nothing_when_nothing_is_new() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut config = fast_relay_config();
    config.min_batch = 2;
    config.max_batch = 4;
    // No renewal within the test: it would save the relay's empty reads.
    config.lease_ttl = Duration::from_secs(120);
    let mut relay = outbox_relay::relay::Relay::new(&db.url, config);
    relay.step_woken().await.unwrap(); // take the lease

    let mut late_writer = db.client().await;
    let late_tx = late_writer.transaction().await.unwrap();
    // More rows than a batch holds: the late commit spans pages.
    for _ in 0..6 {
        insert_via(&late_tx, "late").await;
    }
    insert_early_events(&client, 5).await;
    drain_woken(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log").await,
        5,
        "rows committed while a writer is open must not wait for it"
    );

    // Woken with nothing new: nothing is written, the cursor stays.
    let cursor = "SELECT relayed_snapshot::text FROM relay_state";
    let before: Vec<String> = column(&client, cursor).await;
    assert_eq!(relay.step_woken().await.unwrap(), StepOutcome::Idle);
    assert_eq!(column::<String>(&client, cursor).await, before);

    late_tx.commit().await.unwrap();
    // A backlog that takes many full batches, the late commit among them.
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT 'order-created', 'bulk-' || (i % 7), jsonb_build_object('i', i)
               FROM generate_series(1, 40) i",
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(
        relay.step_woken().await.unwrap(),
        StepOutcome::Moved {
            drain_continues: true,
            ..
        }
    ));
    drain_woken(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log WHERE key = 'late'").await,
        6,
        "each late-committing row must be relayed once"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 51);
    assert_log_consistent(&client, "order-created").await;
}

/// Invariant 4 where transaction ids and insert order disagree: A takes its
/// transaction id first, B writes key K and commits, then A writes K and
/// commits. The log must hold B's event before A's.
#[tokio::test]
async fn per_key_order_follows_insert_order_not_transaction_id_order() {
    let db = TestDb::migrated().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let tx_a = a.transaction().await.unwrap();
    tx_a.execute(
        "INSERT INTO orders (user_id, email, amount) VALUES (1, 'a@example.com', 1)",
        &[],
    )
    .await
    .unwrap();
    let tx_b = b.transaction().await.unwrap();
    insert_via_tx(&tx_b, "K", json!({ "v": 1 })).await;
    tx_b.commit().await.unwrap();
    insert_via_tx(&tx_a, "K", json!({ "v": 2 })).await;
    tx_a.commit().await.unwrap();

    let mut relay = db.relay();
    drain(&mut relay).await;
    let client = db.client().await;
    let order: Vec<i64> = column(
        &client,
        "SELECT (payload->>'v')::int8 FROM event_log WHERE key = 'K' ORDER BY \"offset\"",
    )
    .await;
    assert_eq!(order, vec![1, 2]);
}

/// The idle path: while a writer stays open, the leader idles and renews
/// its lease (saving empty peeks as relayed) several times; the writer's
/// row is still relayed once when it commits, and cleanup never removes it first.
#[tokio::test]
async fn long_idle_with_an_open_writer_still_relays_its_row_once() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let mut relay = db.relay();
    drain(&mut relay).await;
    let mut writer = db.client().await;
    let open = writer.transaction().await.unwrap();
    insert_via(&open, "slow").await;
    let snapshot_before: String = client
        .query_one("SELECT relayed_snapshot::text FROM relay_state", &[])
        .await
        .unwrap()
        .get(0);
    let started = tokio::time::Instant::now();
    // Idle through several renewals (ttl/3 = 0.5 s apart), with other traffic.
    while started.elapsed() < Duration::from_millis(1800) {
        assert_eq!(relay.step().await.unwrap(), StepOutcome::Idle);
        client
            .execute("SELECT pg_current_xact_id()", &[])
            .await
            .unwrap();
        outbox_relay::relay::delete_relayed_outbox_rows(&client, "default", 1000)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot_after: String = client
        .query_one("SELECT relayed_snapshot::text FROM relay_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        snapshot_before, snapshot_after,
        "renewals while idle must save the empty peeks"
    );
    open.commit().await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox WHERE key = 'slow'").await,
        1,
        "cleanup removed a row that was never relayed"
    );
    drain(&mut relay).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log WHERE key = 'slow'").await,
        1
    );
    assert_log_consistent(&client, "order-created").await;
}

/// Issue "faults", 1 (invariant 5): a leader frozen mid-batch keeps its
/// transaction and the lock on the lease row. Once its lease has expired, a
/// standby ends that backend and takes over within about a lease, instead
/// of waiting on the lock for as long as the leader is frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_holding_the_lease_row_does_not_stall_the_takeover() {
    // The lease row locked by the session the lease records, or by the
    // leader's second connection (a batch written ahead runs there).
    for locked_by_second_connection in [false, true] {
        let db = TestDb::migrated().await;
        let client = db.client().await;
        // The frozen leader: a relay session that took the lease (its lease
        // runs out in a second) and stopped inside a batch transaction.
        let mut frozen = db.client().await;
        frozen
            .batch_execute(
                "SET application_name = 'outbox-relay';
                 UPDATE relay_state SET holder = 'frozen-leader', epoch = epoch + 1,
                        holder_pid = pg_backend_pid(), lease_expires_at = now() + interval '1 second'",
            )
            .await
            .unwrap();
        let mut second = db.client().await;
        second
            .batch_execute("SET application_name = 'outbox-relay'")
            .await
            .unwrap();
        let locking = if locked_by_second_connection {
            &mut second
        } else {
            &mut frozen
        };
        let batch = locking.transaction().await.unwrap();
        batch
            .batch_execute("SELECT 1 FROM relay_state WHERE relay = 'default' FOR UPDATE")
            .await
            .unwrap();
        insert_event(&client, "order-created", "after-the-freeze", json!({})).await;

        let mut standby = db.relay();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match standby.step().await {
                    Ok(StepOutcome::BecameLeader { .. }) => return,
                    // Not yet: the lease has not expired, or the row was busy.
                    Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        })
        .await
        .expect("a standby takes over from a frozen leader");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?} (locked by the second connection: {locked_by_second_connection})",
            started.elapsed()
        );
        drain(&mut standby).await;
        assert_eq!(
            count(
                &client,
                "SELECT count(*) FROM event_log WHERE key = 'after-the-freeze'"
            )
            .await,
            1
        );
        // The frozen leader's locking session was ended: it can append nothing.
        assert!(batch.batch_execute("SELECT 1").await.is_err());
        assert_log_consistent(&client, "order-created").await;
    }
}

/// Issue "faults", 6: a topic's partition count has one source of truth.
/// An extra partition head is refused, so keys are never re-partitioned.
#[tokio::test]
async fn an_extra_partition_head_is_refused() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let refused = client
        .execute(
            "INSERT INTO partition_heads (topic, partition) VALUES ('order-created', 8)",
            &[],
        )
        .await
        .unwrap_err();
    let message = refused
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("no partition 8"), "{refused:?}");
    // And should the heads and the count disagree anyway, the relay parks
    // the topic's rows rather than place them by the wrong count.
    client
        .batch_execute(
            "ALTER TABLE partition_heads DISABLE TRIGGER partition_heads_within_topic;
             INSERT INTO partition_heads (topic, partition) VALUES ('order-created', 8);",
        )
        .await
        .unwrap();
    insert_event(&client, "order-created", "k", json!({})).await;
    drain(&mut db.relay()).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 0);
    let reason: String = client
        .query_one("SELECT reason FROM outbox_parked", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        reason.contains("8 partitions but 9 partition heads"),
        "{reason}"
    );
}

/// The woken relay's read (`outbox_relay_read_woken`, migration 7): the rows
/// committed since the relayed snapshot, in id order and limited, each with
/// the read's own snapshot; an open writer's row is not among them and its
/// transaction is in progress in that snapshot; with nothing new, one row
/// with only the snapshot.
#[tokio::test]
async fn the_woken_read_returns_what_committed_since_with_its_own_snapshot() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    // Committed before the relayed snapshot: never read again.
    insert_event(&client, "order-created", "before", json!({})).await;
    let relayed: String = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .unwrap()
        .get(0);
    let read = "SELECT id, key, snapshot FROM outbox_relay_read_woken($1, $2)";

    let rows = client.query(read, &[&relayed, &10i64]).await.unwrap();
    assert_eq!(rows.len(), 1, "nothing new: one row");
    assert_eq!(rows[0].get::<_, Option<i64>>(0), None);
    assert!(!rows[0].get::<_, String>(2).is_empty());

    let mut open_writer = db.client().await;
    let open = open_writer.transaction().await.unwrap();
    insert_via(&open, "open").await;
    let open_xid: String = open
        .query_one("SELECT pg_current_xact_id()::text", &[])
        .await
        .unwrap()
        .get(0);
    for i in 0..3 {
        insert_event(&client, "order-created", &format!("k{i}"), json!({})).await;
    }
    let rows = client.query(read, &[&relayed, &2i64]).await.unwrap();
    let keys: Vec<Option<String>> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(keys, [Some("k0".to_string()), Some("k1".to_string())]);
    let snapshots: Vec<String> = rows.iter().map(|r| r.get(2)).collect();
    assert_eq!(
        snapshots[0], snapshots[1],
        "one snapshot for the whole read"
    );
    let in_progress: Vec<&str> = snapshots[0].split(':').nth(2).unwrap().split(',').collect();
    assert!(
        in_progress.contains(&open_xid.as_str()),
        "the open writer is in progress in {}",
        snapshots[0]
    );
    let rows = client.query(read, &[&relayed, &10i64]).await.unwrap();
    let keys: Vec<Option<String>> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(
        keys,
        ["k0", "k1", "k2"].map(|k| Some(k.to_string())),
        "only what committed since the relayed snapshot, not the open writer's row"
    );
    open.rollback().await.unwrap();
}

/// Mid-drain the relay writes the next batch's records on its second
/// connection before the batch ahead of it commits (docs/relay.md). Those
/// records must stay out of the log until their own batch commits, after
/// the one before it; a leader fenced between the two rolls them back, and
/// the next leader moves every row once, offsets gapless (invariants 1, 4
/// and 5).
#[tokio::test]
async fn a_batch_written_ahead_commits_after_the_one_before_or_not_at_all() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    insert_keyed_rows(&client, "order-created", 40).await;
    let mut config = fast_relay_config();
    config.min_batch = 8;
    config.max_batch = 8;
    let mut leader = Relay::new(&db.url, config.clone());
    assert!(matches!(
        leader.step().await.unwrap(),
        StepOutcome::BecameLeader { .. }
    ));
    // (records in the log, batches written ahead) after each step: the
    // drain's first batch reads nothing ahead; from the second on, every
    // other batch is written ahead and committed by the next step.
    for (in_log, written_ahead) in [(8, 0), (16, 1), (24, 0), (32, 1)] {
        let moved = leader.step().await.unwrap();
        assert!(
            matches!(
                moved,
                StepOutcome::Moved {
                    appended: 8,
                    drain_continues: true,
                    ..
                }
            ),
            "{moved:?}"
        );
        assert_eq!(
            count(&client, "SELECT count(*) FROM event_log").await,
            in_log
        );
        assert_eq!(open_relay_transactions(&client).await, written_ahead);
    }
    // Another process takes the lease: the batch written ahead is fenced
    // by its own lock, and rolled back.
    client
        .execute(
            "UPDATE relay_state SET epoch = epoch + 1, holder = NULL, lease_expires_at = '-infinity'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(leader.step().await.unwrap(), StepOutcome::LostLeadership);
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 32);
    until_no_open_relay_transaction(&client).await;

    let mut next = Relay::new(&db.url, config);
    drain(&mut next).await;
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 40);
    assert_log_consistent(&client, "order-created").await;
}

/// A batch written ahead is placed on the topics its predecessor's lock
/// saw. A topic created before its own lock changes where its rows go: the
/// batch fails and rolls back rather than commit what it wrote, and the
/// relay moves the rows, placed, on its next steps.
#[tokio::test]
async fn a_topic_created_under_a_batch_written_ahead_fails_it_and_its_rows_still_move() {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    insert_keyed_rows(&client, "order-created", 32).await;
    insert_keyed_rows(&client, "created-late", 8).await;
    let mut config = fast_relay_config();
    config.min_batch = 8;
    config.max_batch = 8;
    let mut relay = Relay::new(&db.url, config);
    relay.step().await.unwrap();
    for _ in 0..4 {
        relay.step().await.unwrap();
    }
    // The fifth batch (the late topic's rows, planned as unknown) is
    // written ahead.
    assert_eq!(open_relay_transactions(&client).await, 1);
    outbox_relay::log::topics::create_topic(
        &mut client,
        "created-late",
        2,
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let failed = relay.step().await;
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("written ahead")),
        "{failed:?}"
    );
    assert_eq!(count(&client, "SELECT count(*) FROM event_log").await, 32);
    until_no_open_relay_transaction(&client).await;
    drain(&mut relay).await;
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM event_log WHERE topic = 'created-late'"
        )
        .await,
        8
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_parked").await,
        0
    );
    assert_log_consistent(&client, "order-created").await;
    assert_log_consistent(&client, "created-late").await;
}

/// `n` rows of `topic` over five keys, in one transaction.
async fn insert_keyed_rows(client: &tokio_postgres::Client, topic: &str, n: i64) {
    client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             SELECT $1, 'k' || (i % 5), jsonb_build_object('i', i) FROM generate_series(1, $2::int8) i",
            &[&topic, &n],
        )
        .await
        .unwrap();
}

/// The relay's transactions left open between its steps: its batches
/// written ahead.
async fn open_relay_transactions(client: &tokio_postgres::Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'outbox-relay'
            AND state = 'idle in transaction'",
    )
    .await
}

/// A connection dropped with its transaction open ends a moment later.
async fn until_no_open_relay_transaction(client: &tokio_postgres::Client) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open_relay_transactions(client).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a batch written ahead stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
