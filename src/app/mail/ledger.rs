//! The delivery ledger (`mail_deliveries`): one row per (group, event),
//! `pending` → `sent` | `failed`; `sent` marks written in batches; and what
//! it tells about one order's mail.

use super::MAIL_GROUP;

pub(super) const LEDGER_STATUS: &str = "
    SELECT status, attempts FROM mail_deliveries
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND \"offset\" = $4";

/// Records `sent` for a batch of events in one statement (one commit).
pub(super) const MARK_SENT: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", key, message_id, recipient, status, attempts, sent_at)
    SELECT $1, v.topic, v.partition, v.log_offset, v.key, v.message_id, v.recipient, 'sent', 1, now()
      FROM unnest($2::text[], $3::int4[], $4::int8[], $5::text[], $6::text[], $7::text[])
           AS v(topic, partition, log_offset, message_id, recipient, key)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET status = 'sent', attempts = mail_deliveries.attempts + 1, sent_at = now(),
           last_error = NULL, updated_at = now()";

/// Records a failed attempt; the event stays `pending`.
pub(super) const MARK_ATTEMPT_FAILED: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, recipient, status, attempts, last_error, key)
    VALUES ($1, $2, $3, $4, $5, $6, 'pending', 1, $7, $8)
    ON CONFLICT (group_id, topic, partition, \"offset\") DO UPDATE
       SET attempts = mail_deliveries.attempts + 1, last_error = $7, updated_at = now()
    RETURNING attempts";

/// Records the event as parked (`failed`), with the attempts it took.
pub(super) const MARK_FAILED: &str = "
    INSERT INTO mail_deliveries (group_id, topic, partition, \"offset\", message_id, status, attempts, last_error, key)
    VALUES ($1, $2, $3, $4, $5, 'failed', $6, $7, $8)
    ON CONFLICT (group_id, topic, partition, \"offset\")
    DO UPDATE SET status = 'failed', attempts = $6, last_error = $7, updated_at = now()";

/// One `sent` to record, and who waits for it.
pub(super) struct SentMark {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) key: Option<String>,
    pub(super) message_id: String,
    pub(super) recipient: String,
    pub(super) recorded: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Writes `sent` marks in batches: whatever arrived while the previous
/// batch was being written goes in the next statement, so many mails share
/// one commit (and one fsync).
pub(super) fn spawn_ledger_writer(
    pool: deadpool_postgres::Pool,
    group: String,
) -> tokio::sync::mpsc::Sender<SentMark> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SentMark>(4096);
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < 1000 {
                match rx.try_recv() {
                    Ok(mark) => batch.push(mark),
                    Err(_) => break,
                }
            }
            let result = async {
                let client = pool.get().await?;
                let topics: Vec<&str> = batch.iter().map(|m| m.topic.as_str()).collect();
                let partitions: Vec<i32> = batch.iter().map(|m| m.partition).collect();
                let offsets: Vec<i64> = batch.iter().map(|m| m.offset).collect();
                let ids: Vec<&str> = batch.iter().map(|m| m.message_id.as_str()).collect();
                let recipients: Vec<&str> = batch.iter().map(|m| m.recipient.as_str()).collect();
                let keys: Vec<Option<&str>> = batch.iter().map(|m| m.key.as_deref()).collect();
                client
                    .execute(
                        MARK_SENT,
                        &[
                            &group,
                            &topics,
                            &partitions,
                            &offsets,
                            &ids,
                            &recipients,
                            &keys,
                        ],
                    )
                    .await?;
                anyhow::Ok(())
            }
            .await
            .map_err(|e| format!("{e:#}"));
            for mark in batch {
                let _ = mark.recorded.send(result.clone());
            }
        }
    });
    tx
}

/// Where an order's confirmation mail stands (`GET /orders/{id}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ConfirmationMail {
    /// Not sent yet: not in the log yet, waiting for its turn, or between
    /// retries (`attempts` failed so far, the last with `last_error`).
    Pending {
        attempts: i32,
        last_error: Option<String>,
    },
    /// Accepted by the SMTP server.
    Sent {
        sent_at: Option<chrono::DateTime<chrono::Utc>>,
        message_id: String,
    },
    /// Parked as a dead letter (see `outbox-relay dead-letters list`).
    DeadLetter {
        dead_letter_id: Option<i64>,
        reason: Option<String>,
        last_error: Option<String>,
    },
}

/// The ledger's best word on the mail of events with `key`: `sent` if any
/// was, else the latest attempt. A dead letter that was retried is pending
/// again (its retry is a new event).
const MAIL_FOR_KEY: &str = "
    SELECT d.status, d.attempts, d.last_error, d.sent_at, d.message_id, l.id, l.reason, l.status
      FROM mail_deliveries d
      LEFT JOIN dead_letters l ON l.group_id = d.group_id AND l.topic = d.topic
                              AND l.partition = d.partition AND l.\"offset\" = d.\"offset\"
     WHERE d.group_id = $1 AND d.topic = $2 AND d.key = $3
     ORDER BY d.status = 'sent' DESC, d.updated_at DESC
     LIMIT 1";

/// The confirmation mail of order `order_id`.
pub async fn confirmation_mail(
    client: &impl tokio_postgres::GenericClient,
    order_id: i64,
) -> Result<ConfirmationMail, tokio_postgres::Error> {
    let row = client
        .query_opt(
            MAIL_FOR_KEY,
            &[
                &MAIL_GROUP,
                &crate::app::order::ORDER_CREATED_TOPIC,
                &order_id.to_string(),
            ],
        )
        .await?;
    let Some(row) = row else {
        return Ok(ConfirmationMail::Pending {
            attempts: 0,
            last_error: None,
        });
    };
    let status: &str = row.get(0);
    let dead_letter_status: Option<&str> = row.get(7);
    Ok(match status {
        "sent" => ConfirmationMail::Sent {
            sent_at: row.get(3),
            message_id: row.get(4),
        },
        "failed" if dead_letter_status != Some("retried") => ConfirmationMail::DeadLetter {
            dead_letter_id: row.get(5),
            reason: row.get(6),
            last_error: row.get(2),
        },
        _ => ConfirmationMail::Pending {
            attempts: row.get(1),
            last_error: row.get(2),
        },
    })
}

const SENT_COUNT_FOR_KEYS: &str = "
    SELECT count(DISTINCT key) FROM mail_deliveries
     WHERE group_id = $1 AND topic = $2 AND status = 'sent' AND key = ANY($3)";

/// How many of `keys` have a `sent` confirmation (the demo waits on it).
pub async fn sent_count_for_keys(
    client: &impl tokio_postgres::GenericClient,
    keys: &[String],
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            SENT_COUNT_FOR_KEYS,
            &[&MAIL_GROUP, &crate::app::order::ORDER_CREATED_TOPIC, &keys],
        )
        .await?
        .get(0))
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "app::mail::ledger::LEDGER_STATUS",
            LEDGER_STATUS.to_string(),
        ),
        ("app::mail::ledger::MARK_SENT", MARK_SENT.to_string()),
        (
            "app::mail::ledger::MARK_ATTEMPT_FAILED",
            MARK_ATTEMPT_FAILED.to_string(),
        ),
        ("app::mail::ledger::MARK_FAILED", MARK_FAILED.to_string()),
        ("app::mail::ledger::MAIL_FOR_KEY", MAIL_FOR_KEY.to_string()),
        (
            "app::mail::ledger::SENT_COUNT_FOR_KEYS",
            SENT_COUNT_FOR_KEYS.to_string(),
        ),
    ]
}
