//! Outbox rows the relay could not place (an unknown topic, a topic whose
//! partitions do not match its count), kept whole in `outbox_parked`, and
//! re-driven once their topic is there: moved back into the outbox in one
//! transaction (with their original `created_at`), so the relay appends
//! each exactly once.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A parked outbox row.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedRow {
    pub outbox_id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    pub parked_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

const LIST: &str = "
    SELECT outbox_id, topic, key, reason, created_at, parked_at, payload FROM outbox_parked
     ORDER BY outbox_id LIMIT $1";

/// Every parked row, oldest first.
pub async fn list(client: &impl tokio_postgres::GenericClient) -> anyhow::Result<Vec<ParkedRow>> {
    list_page(client, i64::MAX).await
}

/// The oldest `limit` parked rows.
pub async fn list_page(
    client: &impl tokio_postgres::GenericClient,
    limit: i64,
) -> anyhow::Result<Vec<ParkedRow>> {
    Ok(client
        .query(LIST, &[&limit])
        .await?
        .iter()
        .map(|r| ParkedRow {
            outbox_id: r.get(0),
            topic: r.get(1),
            key: r.get(2),
            reason: r.get(3),
            created_at: r.get(4),
            parked_at: r.get(5),
            payload: r.get(6),
        })
        .collect())
}

/// Moves parked rows whose topic exists (one by id, or all) back into the
/// outbox, in outbox id order so one key's rows keep their order, with
/// their retry links.
const REDRIVE: &str = "
    WITH moved AS (
        DELETE FROM outbox_parked p USING topics t
         WHERE p.topic = t.name AND ($1::int8 IS NULL OR p.outbox_id = $1)
        RETURNING p.outbox_id, p.topic, p.key, p.payload, p.headers, p.created_at, p.retry_of),
    numbered AS (
        SELECT nextval(pg_get_serial_sequence('outbox', 'id')) AS new_id, m.*
          FROM (SELECT * FROM moved ORDER BY outbox_id) m),
    requeued AS (
        INSERT INTO outbox (id, topic, key, payload, headers, created_at) OVERRIDING SYSTEM VALUE
        SELECT new_id, topic, key, payload, headers, created_at FROM numbered),
    linked AS (
        INSERT INTO outbox_retries (outbox_id, retry_of)
        SELECT new_id, retry_of FROM numbered WHERE retry_of IS NOT NULL)
    SELECT outbox_id, topic FROM numbered ORDER BY outbox_id";

const STILL_PARKED: &str = "
    SELECT outbox_id, topic, reason FROM outbox_parked
     WHERE $1::int8 IS NULL OR outbox_id = $1 ORDER BY outbox_id";

/// What a re-drive of one row (`$1`) or all would move, and what would stay.
const REDRIVE_PREVIEW: &str = "
    SELECT count(*) FILTER (WHERE t.name IS NOT NULL), count(*) FILTER (WHERE t.name IS NULL)
      FROM outbox_parked p LEFT JOIN topics t ON t.name = p.topic
     WHERE $1::int8 IS NULL OR p.outbox_id = $1";

/// How many parked rows a re-drive of `id` (or all) would move back into
/// the outbox, and how many would stay parked (their topic is still missing).
pub async fn redrive_preview(
    client: &impl tokio_postgres::GenericClient,
    id: Option<i64>,
) -> anyhow::Result<(i64, i64)> {
    let row = client.query_one(REDRIVE_PREVIEW, &[&id]).await?;
    Ok((row.get(0), row.get(1)))
}

/// What a re-drive did.
#[derive(Debug, Default, Serialize)]
pub struct Redrive {
    /// (outbox id, topic) of the rows moved back into the outbox.
    pub redriven: Vec<(i64, String)>,
    /// (outbox id, topic, reason) of the rows that stay parked.
    pub still_parked: Vec<(i64, String, String)>,
}

/// Re-drives one parked row (`id`) or all of them.
pub async fn redrive(
    client: &mut tokio_postgres::Client,
    id: Option<i64>,
) -> anyhow::Result<Redrive> {
    let tx = client.transaction().await?;
    let redriven = tx
        .query(REDRIVE, &[&id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let still_parked = tx
        .query(STILL_PARKED, &[&id])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    tx.commit().await?;
    Ok(Redrive {
        redriven,
        still_parked,
    })
}

pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::parked::LIST", LIST.to_string()),
        ("relay::parked::REDRIVE", REDRIVE.to_string()),
        ("relay::parked::STILL_PARKED", STILL_PARKED.to_string()),
        (
            "relay::parked::REDRIVE_PREVIEW",
            REDRIVE_PREVIEW.to_string(),
        ),
    ]
}
