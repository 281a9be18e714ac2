//! One odd row must never stall a group or mail anyone twice
//! (docs/faults.md, "odd rows"): the outbox's limits at the door; odd rows
//! within them through relay → log → group → mail; rows written before the
//! limits existed; a bookkeeping write the database refuses for one record;
//! and generated rows through relay → log → group (proptest).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_relay::group::consumer::{ConsumerConfig, Lease, RecordHandler};
use outbox_relay::group::GroupConfig;
use outbox_relay::log::Record;
use outbox_relay::outbox::limits;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::harness::*;
use crate::mail::{fast_retry, place_orders, wait_for_mails, wait_until_caught_up, Pipeline};
use crate::smtp::SmtpServer;

/// Writes one outbox row in its own transaction. Refused: the violated
/// constraint's name (which names the limit), or the server's message.
async fn write_row(
    client: &Client,
    topic: &str,
    key: Option<&str>,
    payload: &Value,
    headers: &Value,
) -> Result<(), String> {
    client
        .execute(
            outbox_relay::outbox::INSERT_OUTBOX,
            &[&topic, &key, payload, headers],
        )
        .await
        .map(|_| ())
        .map_err(|e| match e.as_db_error() {
            Some(db) => db
                .constraint()
                .map_or_else(|| db.message().to_string(), str::to_string),
            None => e.to_string(),
        })
}

fn order(order_id: i64, email: &str) -> Value {
    json!({"order_id": order_id, "user_id": 1, "amount": 5, "email": email})
}

/// `levels` arrays, one inside the other, around a 1.
fn nested(levels: usize) -> Value {
    (0..levels).fold(json!(1), |inner, _| json!([inner]))
}

fn headers(count: usize) -> Value {
    Value::Object((0..count).map(|i| (format!("h{i}"), json!("v"))).collect())
}

/// The issue's reproduction: 200 md5 digests, 6,400 characters.
fn the_issues_key() -> String {
    (0..200)
        .map(|i| format!("{:032x}", i * 7_919_u128 + 1))
        .collect()
}

#[tokio::test]
async fn the_outbox_refuses_a_row_over_each_limit_by_the_limits_name() {
    let db = TestDb::migrated().await;
    let client = db.client().await;
    let (t, empty, small) = ("order-created", json!({}), json!({"n": 1}));
    // Postgres prints `{"h": "…"}`: 9 bytes around the value.
    let header_at = |n: usize| json!({"h": "x".repeat(n - 9)});
    // and `"…"` around a string payload.
    let payload_at = |n: usize| json!("x".repeat(n - 2));
    let key_at = "é".repeat(limits::KEY_MAX_BYTES / 2);
    let key_over = format!("{key_at}k");
    let topic_at = "t".repeat(limits::TOPIC_MAX_CHARS);
    let topic_over = "t".repeat(limits::TOPIC_MAX_CHARS + 1);
    let issues_key = the_issues_key();
    // (what, topic, key, payload, headers, the constraint that refuses it)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        Value,
        Value,
        Option<&'a str>,
    );
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("key at the limit", t, Some(&key_at), small.clone(), empty.clone(), None),
        ("key one byte over", t, Some(&key_over), small.clone(), empty.clone(), Some("outbox_key_at_most_1024_bytes")),
        ("the issue's 6,400-character key", t, Some(&issues_key), order(900_000_100, "hugekey@example.com"), empty.clone(), Some("outbox_key_at_most_1024_bytes")),
        ("empty key", t, Some(""), small.clone(), empty.clone(), None),
        ("no key", t, None, small.clone(), empty.clone(), None),
        ("line separator and combining marks", t, Some("a\u{2028}b e\u{301}\u{302}"), small.clone(), empty.clone(), None),
        ("NUL in the key", t, Some("a\0b"), small.clone(), empty.clone(), Some("invalid byte sequence")),
        ("NUL in the payload", t, Some("k"), json!({"s": "a\0b"}), empty.clone(), Some("unsupported Unicode escape sequence")),
        ("topic name at 249 characters", &topic_at, Some("k"), small.clone(), empty.clone(), None),
        ("topic name of 250 characters", &topic_over, Some("k"), small.clone(), empty.clone(), Some("outbox_topic_is_a_topic_name")),
        ("topic name with a space", "order created", Some("k"), small.clone(), empty.clone(), Some("outbox_topic_is_a_topic_name")),
        ("64 headers", t, Some("k"), small.clone(), headers(limits::HEADERS_MAX), None),
        ("65 headers", t, Some("k"), small.clone(), headers(limits::HEADERS_MAX + 1), Some("outbox_headers_at_most_64")),
        ("headers at 16,384 bytes", t, Some("k"), small.clone(), header_at(limits::HEADERS_MAX_BYTES), None),
        ("headers one byte over", t, Some("k"), small.clone(), header_at(limits::HEADERS_MAX_BYTES + 1), Some("outbox_headers_at_most_16384_bytes")),
        ("scalar header values", t, Some("k"), small.clone(), json!({"a": 1, "b": true, "c": null}), None),
        ("a nested header value", t, Some("k"), small.clone(), json!({"a": {"b": "c"}}), Some("outbox_header_values_are_not_nested")),
        ("headers that are not an object", t, Some("k"), small.clone(), json!(["a"]), Some("outbox_headers_check")),
        ("payload at 900,000 bytes", t, Some("k"), payload_at(limits::PAYLOAD_MAX_BYTES), empty.clone(), None),
        ("payload one byte over", t, Some("k"), payload_at(limits::PAYLOAD_MAX_BYTES + 1), empty.clone(), Some("outbox_payload_at_most_900000_bytes")),
        ("payload 64 levels deep", t, Some("k"), nested(limits::PAYLOAD_MAX_DEPTH), empty.clone(), None),
        ("payload 65 levels deep", t, Some("k"), nested(limits::PAYLOAD_MAX_DEPTH + 1), empty.clone(), Some("outbox_payload_at_most_64_levels_deep")),
        ("payload 5,000 levels deep", t, Some("k"), json!({"deep": format!("{}1{}", "[".repeat(5000), "]".repeat(5000))}), empty.clone(), None),
    ];
    let mut accepted = 0;
    for (what, topic, key, payload, headers, refused) in &cases {
        let written = write_row(&client, topic, *key, payload, headers).await;
        match (refused, &written) {
            (None, Ok(())) => accepted += 1,
            (Some(why), Err(error)) => assert!(error.contains(why), "{what}: {error}"),
            _ => panic!("{what}: expected refused {refused:?}, got {written:?}"),
        }
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox").await,
        accepted,
        "a refused row leaves nothing behind"
    );
    // Nested past what a serde_json reader takes, written as SQL text.
    let deep = client
        .execute(
            "INSERT INTO outbox (topic, key, payload)
             VALUES ('order-created', 'k', (repeat('[', 5000) || '1' || repeat(']', 5000))::jsonb)",
            &[],
        )
        .await
        .unwrap_err();
    let constraint = deep.as_db_error().and_then(|e| e.constraint());
    assert_eq!(constraint, Some("outbox_payload_at_most_64_levels_deep"));
}

/// An odd row between ordinary orders, and what must become of it.
struct OddRow {
    what: &'static str,
    key: Option<String>,
    payload: Value,
    headers: Value,
    fate: Fate,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// The INSERT fails naming this (the writer's transaction writes nothing).
    Refused(&'static str),
    /// Mailed exactly once to this address.
    Mailed(&'static str),
    /// Parked as a dead letter with a reason starting so.
    Parked(&'static str),
}

fn odd_rows() -> Vec<OddRow> {
    let row = |what, key: Option<String>, payload, headers, fate| OddRow {
        what,
        key,
        payload,
        headers,
        fate,
    };
    let mut padded = order(900_005, "odd5@example.com");
    padded["pad"] = json!("x".repeat(limits::PAYLOAD_MAX_BYTES - 200));
    let mut deep = order(900_006, "odd6@example.com");
    deep["deep"] = nested(limits::PAYLOAD_MAX_DEPTH - 1);
    vec![
        row(
            "a key of 1,024 bytes",
            Some("é".repeat(512)),
            order(900_001, "odd1@example.com"),
            json!({}),
            Fate::Mailed("odd1@example.com"),
        ),
        row(
            "the issue's 6,400-character key",
            Some(the_issues_key()),
            order(900_000_100, "hugekey@example.com"),
            json!({}),
            Fate::Refused("outbox_key_at_most_1024_bytes"),
        ),
        row(
            "an empty key",
            Some(String::new()),
            order(900_003, "odd3@example.com"),
            json!({}),
            Fate::Mailed("odd3@example.com"),
        ),
        row(
            "a line separator and combining marks in the key",
            Some("900004\u{2028}e\u{301}\u{301}".into()),
            order(900_004, "odd4@example.com"),
            json!({}),
            Fate::Mailed("odd4@example.com"),
        ),
        row(
            "a payload of nearly 900 kB",
            Some("900005".into()),
            padded,
            json!({}),
            Fate::Mailed("odd5@example.com"),
        ),
        row(
            "a payload 64 levels deep",
            Some("900006".into()),
            deep,
            json!({}),
            Fate::Mailed("odd6@example.com"),
        ),
        row(
            "64 headers",
            Some("900007".into()),
            order(900_007, "odd7@example.com"),
            headers(limits::HEADERS_MAX),
            Fate::Mailed("odd7@example.com"),
        ),
        row(
            "an undecodable payload under a key of 1,024 bytes",
            Some("u".repeat(1024)),
            json!({"garbage": true}),
            json!({}),
            Fate::Parked("undecodable payload"),
        ),
        row(
            "a NUL in the key",
            Some("9000\u{0}09".into()),
            order(900_009, "odd9@example.com"),
            json!({}),
            Fate::Refused("invalid byte sequence"),
        ),
    ]
}

/// Every message at the SMTP server, by recipient.
fn mails_by_recipient(smtp: &SmtpServer) -> HashMap<String, usize> {
    let mut by_recipient = HashMap::new();
    for mail in smtp.messages() {
        *by_recipient.entry(mail.to).or_default() += 1;
    }
    by_recipient
}

fn assert_no_message_id_twice(smtp: &SmtpServer) {
    let mut seen = HashMap::<String, usize>::new();
    for mail in smtp.messages() {
        *seen.entry(mail.message_id).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "mailed twice: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_rows_are_refused_mailed_once_or_parked_and_the_orders_around_them_mailed_once() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let client = db.client().await;
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    let rows = odd_rows();
    let mut ordinary = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let email = format!("before{i}@example.com");
        place_orders(&db, &[&email]).await;
        ordinary.push(email);
        let written = write_row(
            &client,
            "order-created",
            row.key.as_deref(),
            &row.payload,
            &row.headers,
        )
        .await;
        match (row.fate, written) {
            (Fate::Refused(why), Err(error)) => {
                assert!(error.contains(why), "{}: {error}", row.what)
            }
            (Fate::Refused(_), Ok(())) => panic!("{}: written, should be refused", row.what),
            (_, Err(error)) => panic!("{}: refused: {error}", row.what),
            (_, Ok(())) => {}
        }
    }
    let last = "after@example.com".to_string();
    place_orders(&db, &[&last]).await;
    ordinary.push(last);
    let mailed: Vec<&str> = rows
        .iter()
        .filter_map(|r| match r.fate {
            Fate::Mailed(to) => Some(to),
            _ => None,
        })
        .collect();
    let expected = ordinary.len() + mailed.len();
    wait_for_mails(&smtp, expected, Duration::from_secs(60)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    let check = |smtp: &SmtpServer, expected: usize| {
        let by_recipient = mails_by_recipient(smtp);
        for to in ordinary
            .iter()
            .map(String::as_str)
            .chain(mailed.iter().copied())
        {
            assert_eq!(by_recipient.get(to), Some(&1), "mails to {to}");
        }
        assert_eq!(smtp.messages().len(), expected, "{by_recipient:?}");
        assert_no_message_id_twice(smtp);
    };
    check(&smtp, expected);
    let reasons: Vec<String> = column(&client, "SELECT reason FROM dead_letters").await;
    let parked: Vec<&str> = rows
        .iter()
        .filter_map(|r| match r.fate {
            Fate::Parked(reason) => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), parked.len(), "{reasons:?}");
    for reason in parked {
        assert!(
            reasons.iter().any(|r| r.starts_with(reason)),
            "{reason}: {reasons:?}"
        );
    }
    let unsent = count(
        &client,
        "SELECT count(*) FROM event_log e WHERE NOT EXISTS (
            SELECT 1 FROM mail_deliveries d WHERE d.partition = e.partition AND d.\"offset\" = e.\"offset\"
               AND d.status IN ('sent', 'failed'))",
    )
    .await;
    assert_eq!(unsent, 0, "every record settled in the ledger");

    // A restart mails nothing twice.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    place_orders(&db, &["restart@example.com"]).await;
    wait_for_mails(&smtp, expected + 1, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    check(&smtp, expected + 1);
    assert_eq!(
        mails_by_recipient(&smtp).get("restart@example.com"),
        Some(&1)
    );
}

/// Appends a record straight to the log, as the relay did before the
/// outbox had limits (the relay now parks such an outbox row).
async fn append_to_log(client: &mut Client, key: &str, payload: &Value) {
    let tx = client.transaction().await.unwrap();
    outbox_relay::log::storage::ensure_day_partitions(&tx)
        .await
        .unwrap();
    let partition = outbox_relay::log::partitioner::partition_for_key(key, 8) as i32;
    tx.execute(
        "WITH head AS (
            UPDATE partition_heads SET log_end_offset = log_end_offset + 1
             WHERE topic = 'order-created' AND partition = $1
         RETURNING log_end_offset - 1 AS log_offset)
         INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
         SELECT 'order-created', $1, log_offset, $2, '{}', $3, now(), now(), -1 FROM head",
        &[&partition, &key, payload],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// The issue's three failures, on rows from before the limits: a 6,400-byte
/// key's sent mark and dead letter were unwritable (a btree entry is capped
/// near 2.7 KB), which stalled every mark of the process and one partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_from_before_the_limits_are_parked_by_the_relay_or_settled_from_the_log() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let mut client = db.client().await;
    // The outbox as it was before migration 9 (rows waiting in it at the upgrade).
    client
        .batch_execute("ALTER TABLE outbox DROP CONSTRAINT outbox_key_at_most_1024_bytes")
        .await
        .unwrap();
    let long = the_issues_key();
    for payload in [
        order(900_000_100, "hugekey@example.com"),
        json!({"garbage": 1}),
    ] {
        write_row(&client, "order-created", Some(&long), &payload, &json!({}))
            .await
            .unwrap();
    }
    let mut relay = db.relay();
    drain(&mut relay).await;
    let parked: Vec<String> = column(&client, "SELECT reason FROM outbox_parked").await;
    assert_eq!(
        parked,
        vec!["key of 6400 bytes is over the outbox's limit of 1024".to_string(); 2]
    );

    // The same two in the log, relayed before the upgrade, among orders.
    place_orders(&db, &["first@example.com", "second@example.com"]).await;
    drain(&mut relay).await;
    append_to_log(
        &mut client,
        &long,
        &order(900_000_100, "hugekey@example.com"),
    )
    .await;
    append_to_log(&mut client, &long, &json!({"garbage": 1})).await;
    drop(relay);
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    place_orders(&db, &["third@example.com", "fourth@example.com"]).await;
    wait_for_mails(&smtp, 5, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;

    let by_recipient = mails_by_recipient(&smtp);
    for to in [
        "first@example.com",
        "second@example.com",
        "third@example.com",
        "fourth@example.com",
        "hugekey@example.com",
    ] {
        assert_eq!(by_recipient.get(to), Some(&1), "mails to {to}");
    }
    let statuses: Vec<String> = column(
        &client,
        "SELECT status FROM mail_deliveries WHERE length(key) = 6400 ORDER BY \"offset\"",
    )
    .await;
    assert_eq!(statuses, ["sent", "failed"], "both settled in the ledger");
    let dead: i64 = count(
        &client,
        "SELECT count(*) FROM dead_letters WHERE length(key) = 6400 AND reason LIKE 'undecodable payload%'",
    )
    .await;
    assert_eq!(dead, 1, "the undecodable one is a dead letter, key and all");

    // A restart mails nothing twice.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    place_orders(&db, &["fifth@example.com"]).await;
    wait_for_mails(&smtp, 6, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(smtp.messages().len(), 6);
    assert_no_message_id_twice(&smtp);
}

/// The database refuses one record's bookkeeping (a trigger raises a
/// check violation, as an index refused a long key): its sent mark is
/// written without the record's key; a mark refused even so is logged and
/// the record settled; a dead letter refused is parked without the record.
/// Every other record is mailed once and the partitions commit to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookkeeping_the_database_refuses_for_one_record_holds_back_no_other() {
    let db = TestDb::migrated().await;
    let smtp = SmtpServer::start(&[]).await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE FUNCTION refuse_odd_rows() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.key IN ('refused-mark', 'unparkable') OR EXISTS (
                     SELECT 1 FROM event_log e WHERE e.topic = NEW.topic AND e.partition = NEW.partition
                        AND e.\"offset\" = NEW.\"offset\" AND e.key = 'unmarkable') THEN
                     RAISE EXCEPTION 'refused for this test' USING ERRCODE = 'check_violation';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_odd_rows BEFORE INSERT OR UPDATE ON mail_deliveries
                 FOR EACH ROW EXECUTE FUNCTION refuse_odd_rows();
             CREATE TRIGGER refuse_odd_rows BEFORE INSERT OR UPDATE ON dead_letters
                 FOR EACH ROW EXECUTE FUNCTION refuse_odd_rows();",
        )
        .await
        .unwrap();
    let ordinary: Vec<String> = (0..24).map(|i| format!("buyer{i}@example.com")).collect();
    let refs: Vec<&str> = ordinary.iter().map(String::as_str).collect();
    place_orders(&db, &refs[..12]).await;
    for (key, payload) in [
        ("refused-mark", order(900_001, "refused-mark@example.com")),
        ("unmarkable", order(900_002, "unmarkable@example.com")),
        ("unparkable", json!({"garbage": true})),
    ] {
        write_row(&client, "order-created", Some(key), &payload, &json!({}))
            .await
            .unwrap();
    }
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    place_orders(&db, &refs[12..]).await;
    wait_for_mails(&smtp, 26, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;

    let by_recipient = mails_by_recipient(&smtp);
    for to in refs
        .iter()
        .copied()
        .chain(["refused-mark@example.com", "unmarkable@example.com"])
    {
        assert_eq!(by_recipient.get(to), Some(&1), "mails to {to}");
    }
    let sent = count(
        &client,
        "SELECT count(*) FROM mail_deliveries WHERE status = 'sent'",
    )
    .await;
    assert_eq!(
        sent, 25,
        "24 orders' marks, and the refused one's without its key"
    );
    let bare_mark = count(
        &client,
        "SELECT count(*) FROM mail_deliveries WHERE status = 'sent' AND key IS NULL AND recipient IS NULL",
    )
    .await;
    assert_eq!(bare_mark, 1);
    let dead: Vec<(Option<String>, String)> = client
        .query("SELECT key, reason FROM dead_letters", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, None, "parked without the record");
    assert!(
        dead[0].1.starts_with("undecodable payload")
            && dead[0].1.contains("could not be stored with it")
            && dead[0].1.contains("refused for this test"),
        "{}",
        dead[0].1
    );
    pipeline.stop().await;

    // A restart mails nothing twice: the unmarkable record's offset was
    // committed past, as its mail went out.
    let pipeline = Pipeline::start(&db, &smtp.url(), fast_retry(3)).await;
    place_orders(&db, &["restart@example.com"]).await;
    wait_for_mails(&smtp, 27, Duration::from_secs(30)).await;
    wait_until_caught_up(&db).await;
    pipeline.stop().await;
    assert_eq!(smtp.messages().len(), 27);
    assert_no_message_id_twice(&smtp);
}

// ─── Generated rows through relay → log → group ──────────────────────────────

/// Counts how often each record was handled.
#[derive(Default)]
struct Counting {
    handled: Mutex<HashMap<(i32, i64), u32>>,
}

impl RecordHandler for Counting {
    async fn handle(&self, record: Record, _lease: Arc<Lease>) {
        *self
            .handled
            .lock()
            .unwrap()
            .entry((record.partition, record.offset))
            .or_default() += 1;
    }
}

/// One generated outbox row.
#[derive(Debug, Clone)]
struct GeneratedRow {
    key: Option<String>,
    payload: Value,
    headers: Value,
}

impl GeneratedRow {
    /// Whether the outbox must refuse it (the size limits are left to the
    /// table test above: rows generated here stay far below them).
    fn must_be_refused(&self) -> bool {
        let key_refused = self
            .key
            .as_ref()
            .is_some_and(|k| k.len() > limits::KEY_MAX_BYTES || k.contains('\0'));
        let headers = self.headers.as_object().expect("an object");
        let headers_refused = headers.len() > limits::HEADERS_MAX
            || headers.values().any(|v| v.is_object() || v.is_array());
        key_refused
            || headers_refused
            || has_nul(&self.payload)
            || has_nul(&self.headers)
            || depth(&self.payload) > limits::PAYLOAD_MAX_DEPTH
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(members) => members.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Levels of arrays and objects below the top that hold a value.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => items.iter().map(|v| 1 + depth(v)).max().unwrap_or(0),
        Value::Object(members) => members.values().map(|v| 1 + depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

mod generate {
    use super::*;
    use proptest::prelude::*;

    fn text(max: usize) -> impl Strategy<Value = String> {
        prop_oneof![
            // Mostly printable, sometimes anything (NUL, U+2028, marks, astral).
            4 => proptest::collection::vec(proptest::char::range('!', '~'), 0..max),
            1 => proptest::collection::vec(any::<char>(), 0..max),
        ]
        .prop_map(String::from_iter)
    }

    fn json(leaf_text: usize) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            text(leaf_text).prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 24, 4, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(text(8), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn payload() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => json(32),
            // Around the depth limit.
            1 => (55usize..75).prop_map(nested),
        ]
    }

    fn headers() -> impl Strategy<Value = Value> {
        let value = prop_oneof![
            8 => text(16).prop_map(Value::String),
            1 => Just(Value::Null),
            1 => Just(json!({"nested": true})),
        ];
        prop_oneof![
            6 => proptest::collection::btree_map(text(12), value.clone(), 0..6),
            1 => proptest::collection::btree_map(text(12), value, 60..70),
        ]
        .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    fn key() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            1 => Just(None),
            6 => text(24).prop_map(Some),
            // Around the key limit, in one- to four-byte characters.
            1 => (1000usize..1030, any::<char>())
                .prop_map(|(n, c)| Some("k".repeat(n - c.len_utf8()) + &c.to_string())),
        ]
    }

    pub(super) fn rows() -> impl Strategy<Value = Vec<GeneratedRow>> {
        proptest::collection::vec(
            (key(), payload(), headers()).prop_map(|(key, payload, headers)| GeneratedRow {
                key,
                payload,
                headers,
            }),
            1..40,
        )
    }
}

/// Writes `rows`, relays them and runs a group over the log: the outbox
/// refuses exactly the rows over a limit, every other row is in the log
/// once, and the group handles each record once and commits to the end.
async fn through_the_pipeline(rows: Vec<GeneratedRow>) {
    let db = TestDb::migrated().await;
    let mut client = db.client().await;
    outbox_relay::log::create_topic(&mut client, "odd", 4, Duration::from_secs(86_400))
        .await
        .unwrap();
    let mut accepted = 0;
    for row in &rows {
        let written = write_row(
            &client,
            "odd",
            row.key.as_deref(),
            &row.payload,
            &row.headers,
        )
        .await;
        assert_eq!(
            written.is_err(),
            row.must_be_refused(),
            "{row:?}: {written:?}"
        );
        accepted += i64::from(written.is_ok());
    }
    drain(&mut db.relay()).await;
    assert_log_consistent(&client, "odd").await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM event_log").await,
        accepted
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM outbox_parked").await,
        0
    );

    let handler = Arc::new(Counting::default());
    let mut group = GroupConfig::new("odd-rows", &["odd"]);
    group.session_timeout = Duration::from_millis(1500);
    group.heartbeat_interval = Duration::from_millis(100);
    let (trigger, shutdown) = outbox_relay::shutdown::channel();
    let consumer = tokio::spawn(outbox_relay::group::consumer::run(
        db.url.clone(),
        ConsumerConfig::new(group),
        handler.clone(),
        shutdown,
    ));
    wait_until_group_caught_up(&db, "odd-rows", "odd").await;
    trigger.trigger();
    consumer.await.unwrap().unwrap();
    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len() as i64, accepted, "every record handled");
    assert!(handled.values().all(|n| *n == 1), "each once: {handled:?}");
}

#[test]
fn generated_rows_are_refused_at_the_door_or_handled_exactly_once() {
    use proptest::test_runner::{Config, TestRunner};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 10,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&generate::rows(), |rows| {
            runtime.block_on(through_the_pipeline(rows));
            Ok(())
        })
        .unwrap();
}
