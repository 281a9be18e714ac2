//! Dead letters: records a group's handler gave up on (a permanent failure,
//! an undecodable payload, a spent retry budget), parked with the reason so
//! the partition moves on (docs/invariants.md, 9). Operators list, retry
//! (republish through the outbox) and discard them.

use crate::log::Record;

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
            "INSERT INTO dead_letters (group_id, topic, partition, \"offset\", key, headers, payload, reason, attempts, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (group_id, topic, partition, \"offset\") DO NOTHING",
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

/// Dead letters, optionally of one group and in one status, oldest first.
pub async fn list_dead_letters(
    client: &impl tokio_postgres::GenericClient,
    group: Option<&str>,
    status: Option<DeadLetterStatus>,
) -> anyhow::Result<Vec<DeadLetter>> {
    let status = status.map(DeadLetterStatus::as_str);
    let rows = client
        .query(
            "SELECT id, group_id, topic, partition, \"offset\", key, status, reason, attempts,
                    last_error, parked_at, resolved_at, payload
               FROM dead_letters
              WHERE ($1::text IS NULL OR group_id = $1) AND ($2::text IS NULL OR status = $2)
              ORDER BY id",
            &[&group, &status],
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

/// Retries dead letters (one by id, or all parked ones when `id` is None)
/// by publishing each record again through the outbox, with a `retry-of`
/// header; the consumer then handles it as a new event. Returns how many.
pub async fn retry_dead_letters(
    client: &mut tokio_postgres::Client,
    id: Option<i64>,
) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let retried = tx
        .execute(
            "WITH retried AS (
                 UPDATE dead_letters SET status = 'retried', resolved_at = now()
                  WHERE status = 'parked' AND ($1::int8 IS NULL OR id = $1)
                 RETURNING topic, partition, \"offset\", key, headers, payload)
             INSERT INTO outbox (topic, key, payload, headers)
             SELECT topic, key, payload,
                    headers || jsonb_build_object('retry-of', topic || '/' || partition || '/' || \"offset\")
               FROM retried",
            &[&id],
        )
        .await?;
    tx.commit().await?;
    Ok(retried)
}

/// Discards one parked dead letter. Returns false if there is none with that id.
pub async fn discard_dead_letter(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> anyhow::Result<bool> {
    let n = client
        .execute(
            "UPDATE dead_letters SET status = 'discarded', resolved_at = now() WHERE id = $1 AND status = 'parked'",
            &[&id],
        )
        .await?;
    Ok(n == 1)
}

/// How many dead letters wait for an operator.
pub async fn parked_count(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE status = 'parked'",
            &[],
        )
        .await?
        .get(0))
}
