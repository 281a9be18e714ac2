//! Dead letters: records a group's handler gave up on (a permanent failure,
//! an undecodable payload, a spent retry budget), parked with the reason so
//! the partition moves on (docs/invariants.md, 9). Operators list, retry
//! (republish through the outbox) and discard them.

use crate::log::Record;

const PARK: &str = "
    INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts, last_error)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO NOTHING";

/// Parks a record for `group` (idempotent per event).
pub async fn park_dead_letter(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
    record: &Record,
    reason: &str,
    attempts: i32,
    last_error: Option<&str>,
) -> anyhow::Result<()> {
    client
        .execute(
            PARK,
            &[
                &group,
                &record.topic,
                &record.partition,
                &record.offset,
                &record.key,
                &record.headers,
                &record.payload,
                &reason,
                &attempts,
                &last_error,
            ],
        )
        .await?;
    Ok(())
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStatus {
    /// Waiting for an operator.
    Parked,
    /// Published again through the outbox.
    Retried,
    /// Given up on by an operator.
    Discarded,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Parked => "parked",
            DeadLetterStatus::Retried => "retried",
            DeadLetterStatus::Discarded => "discarded",
        }
    }

    fn from_db(text: &str) -> DeadLetterStatus {
        match text {
            "retried" => DeadLetterStatus::Retried,
            "discarded" => DeadLetterStatus::Discarded,
            _ => DeadLetterStatus::Parked,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub status: DeadLetterStatus,
    pub reason: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub resolved_at: Option<chrono::DateTime<chrono::Utc>>,
    pub payload: serde_json::Value,
}

/// Which dead letters an operator means: by id, or every one matching
/// the filters (each None for any). The CLI and the console both select
/// through this, so a retry or discard does the same from either.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub ids: Option<Vec<i64>>,
    pub group: Option<String>,
    /// The record's key (an order id for `order-created`).
    pub key: Option<String>,
    /// The reason it was parked, exactly.
    pub reason: Option<String>,
    /// None above this id: what a preview counted, and not what was parked
    /// after it.
    pub up_to: Option<i64>,
}

impl Selection {
    /// One dead letter.
    pub fn one(id: i64) -> Selection {
        Selection {
            ids: Some(vec![id]),
            ..Selection::default()
        }
    }

    /// Every dead letter.
    pub fn all() -> Selection {
        Selection::default()
    }

    /// `$1` to `$5` of every statement on a selection.
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 5] {
        [&self.ids, &self.group, &self.key, &self.reason, &self.up_to]
    }
}

/// `$1` ids, `$2` group, `$3` key, `$4` reason (each NULL for any), then
/// `$5` status (NULL for any), after id `$6`, at most `$7`.
const LIST: &str = "
    SELECT id, group_id, topic, partition, \"offset\", key, status, reason, attempts,
           last_error, parked_at, resolved_at, payload
      FROM dead_letters
     WHERE ($1::int8[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR group_id = $2)
       AND ($3::text IS NULL OR key = $3) AND ($4::text IS NULL OR reason = $4)
       AND ($5::text IS NULL OR status = $5) AND id > $6
     ORDER BY id LIMIT $7";

/// Dead letters, optionally of one group and in one status, oldest first.
pub async fn list_dead_letters(
    client: &impl tokio_postgres::GenericClient,
    group: Option<&str>,
    status: Option<DeadLetterStatus>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let selection = Selection {
        group: group.map(str::to_string),
        ..Selection::default()
    };
    list_page(client, &selection, status, 0, i64::MAX).await
}

/// A page of the selected dead letters in `status` (None: any), oldest
/// first, with ids above `after`, at most `limit`.
pub async fn list_page(
    client: &impl tokio_postgres::GenericClient,
    selection: &Selection,
    status: Option<DeadLetterStatus>,
    after: i64,
    limit: i64,
) -> anyhow::Result<Vec<DeadLetter>> {
    let status = status.map(DeadLetterStatus::as_str);
    let rows = client
        .query(
            LIST,
            &[
                &selection.ids,
                &selection.group,
                &selection.key,
                &selection.reason,
                &status,
                &after,
                &limit,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            group: r.get(1),
            topic: r.get(2),
            partition: r.get(3),
            offset: r.get(4),
            key: r.get(5),
            status: DeadLetterStatus::from_db(r.get(6)),
            reason: r.get(7),
            attempts: r.get(8),
            last_error: r.get(9),
            parked_at: r.get(10),
            resolved_at: r.get(11),
            payload: r.get(12),
        })
        .collect())
}

/// How many parked dead letters a selection holds, and the highest id (a
/// retry's or discard's preview).
const COUNT_PARKED: &str = "
    SELECT count(*), max(id) FROM dead_letters
     WHERE status = 'parked' AND ($1::int8[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR group_id = $2)
       AND ($3::text IS NULL OR key = $3) AND ($4::text IS NULL OR reason = $4)
       AND ($5::int8 IS NULL OR id <= $5)";

/// The parked dead letters `selection` holds — what a retry or a discard
/// of it would act on — and the highest id among them.
pub async fn count_parked(
    client: &impl tokio_postgres::GenericClient,
    selection: &Selection,
) -> anyhow::Result<(i64, Option<i64>)> {
    let row = client.query_one(COUNT_PARKED, &selection.params()).await?;
    Ok((row.get(0), row.get(1)))
}

/// Marks the parked dead letters selected (`$1` ids, `$2` group, `$3`
/// key, `$4` reason, `$5` highest id; NULL for any; as in every statement
/// on a [`Selection`]) retried and writes
/// each record to the outbox again, in one statement, with its link in
/// `outbox_retries` to the record it retries (the original one, when this
/// record was itself a retry: `$6` is the retry header).
const RETRY: &str = "
    WITH retried AS (
        UPDATE dead_letters SET status = 'retried', resolved_at = now()
         WHERE status = 'parked' AND ($1::int8[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR group_id = $2)
           AND ($3::text IS NULL OR key = $3) AND ($4::text IS NULL OR reason = $4)
           AND ($5::int8 IS NULL OR id <= $5)
        RETURNING topic, partition, \"offset\", key, headers, payload),
    numbered AS (
        SELECT nextval(pg_get_serial_sequence('outbox', 'id')) AS outbox_id, retried.*,
               coalesce(headers ->> $6::text, topic || '/' || partition || '/' || \"offset\") AS retry_of
          FROM retried),
    requeued AS (
        INSERT INTO outbox (id, topic, key, payload, headers) OVERRIDING SYSTEM VALUE
        SELECT outbox_id, topic, key, payload, headers - $6::text FROM numbered)
    INSERT INTO outbox_retries (outbox_id, retry_of) SELECT outbox_id, retry_of FROM numbered";

/// Retries the parked dead letters `selection` holds by publishing each
/// record again through the outbox; the relay marks it with the reserved
/// header [`crate::outbox::RETRY_OF_HEADER`] and the consumer handles it as
/// a new event. Only parked ones move, so retrying twice publishes once.
/// Returns how many.
pub async fn retry_dead_letters(
    client: &mut tokio_postgres::Client,
    selection: &Selection,
) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let retried = tx
        .execute(
            RETRY,
            &[&selection.params()[..], &[&crate::outbox::RETRY_OF_HEADER]].concat(),
        )
        .await?;
    tx.commit().await?;
    Ok(retried)
}

const DISCARD: &str = "
    UPDATE dead_letters SET status = 'discarded', resolved_at = now()
     WHERE status = 'parked' AND ($1::int8[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR group_id = $2)
       AND ($3::text IS NULL OR key = $3) AND ($4::text IS NULL OR reason = $4)
       AND ($5::int8 IS NULL OR id <= $5)";

/// Discards the parked dead letters `selection` holds (kept for the
/// record, never retried). Returns how many.
pub async fn discard_dead_letters(
    client: &impl tokio_postgres::GenericClient,
    selection: &Selection,
) -> anyhow::Result<u64> {
    Ok(client.execute(DISCARD, &selection.params()).await?)
}

const PARKED_COUNT: &str =
    "SELECT group_id, count(*) FROM dead_letters WHERE status = 'parked' GROUP BY group_id";

/// How many dead letters wait for an operator, by group.
pub async fn parked_count(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(client
        .query(PARKED_COUNT, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("group::dead_letters::PARK", PARK.to_string()),
        ("group::dead_letters::LIST", LIST.to_string()),
        ("group::dead_letters::RETRY", RETRY.to_string()),
        ("group::dead_letters::DISCARD", DISCARD.to_string()),
        (
            "group::dead_letters::COUNT_PARKED",
            COUNT_PARKED.to_string(),
        ),
        (
            "group::dead_letters::PARKED_COUNT",
            PARKED_COUNT.to_string(),
        ),
    ]
}
