//! The log's storage: `event_log` is partitioned by append day, so
//! retention moves each partition's log start offset and drops whole days;
//! nothing is deleted row by row.

use anyhow::Context;
use chrono::{Duration, NaiveDate, Utc};
use tokio_postgres::GenericClient;

/// How many days of event_log partitions exist ahead of today.
const DAYS_AHEAD: i64 = 7;

/// Lock serialising DDL on the log's partitions (same key as migrations).
pub(crate) const SCHEMA_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

/// Takes the schema lock (`$1`) until the transaction ends.
const LOCK_SCHEMA: &str = "SELECT pg_advisory_xact_lock($1)";

const RELATION_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

fn partition_name(day: NaiveDate) -> String {
    format!("event_log_{}", day.format("%Y%m%d"))
}

/// How long DDL on `event_log` (creating or dropping a day partition, which
/// locks the whole table) waits for readers and writers to let go.
pub const DDL_LOCK_WAIT: &str = "200ms";

/// `SET LOCAL lock_timeout` for the DDL's transaction (`$1`).
const BOUND_LOCK_WAIT: &str = "SELECT set_config('lock_timeout', $1, true)";

/// Creates the day partitions of `event_log` from yesterday to a few days
/// ahead, those that do not exist yet. Takes the schema lock: call inside a
/// transaction. Waits at most [`DDL_LOCK_WAIT`] for the lock on `event_log`
/// (the partitions are made days ahead; a busy pass is retried later).
pub async fn ensure_day_partitions(tx: &impl GenericClient) -> anyhow::Result<()> {
    tx.execute(BOUND_LOCK_WAIT, &[&DDL_LOCK_WAIT]).await?;
    tx.execute(LOCK_SCHEMA, &[&SCHEMA_LOCK_KEY]).await?;
    let today = Utc::now().date_naive();
    for ahead in -1..=DAYS_AHEAD {
        let day = today + Duration::days(ahead);
        let next = day + Duration::days(1);
        let name = partition_name(day);
        let exists: bool = tx.query_one(RELATION_EXISTS, &[&name]).await?.get(0);
        if exists {
            continue;
        }
        // Names and bounds come from dates we format ourselves, never from input.
        let ddl = format!(
            "CREATE TABLE {name} PARTITION OF event_log
               FOR VALUES FROM ('{day} 00:00:00+00') TO ('{next} 00:00:00+00')
               WITH (autovacuum_enabled = true)"
        );
        tx.batch_execute(&ddl)
            .await
            .with_context(|| format!("creating log partition {name}"))?;
    }
    Ok(())
}

/// What one retention pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Partitions whose log start offset moved.
    pub partitions_truncated: u64,
    /// Whole day partitions dropped.
    pub days_dropped: Vec<String>,
}

/// Moves each partition's log start offset to its first record inside its
/// topic's retention (to the log end when none is).
const ADVANCE_LOG_START: &str = "
    UPDATE partition_heads h
       SET log_start_offset = s.new_start
      FROM (SELECT h2.topic, h2.partition,
                   coalesce((SELECT min(e.\"offset\") FROM event_log e
                              WHERE e.topic = h2.topic AND e.partition = h2.partition
                                AND e.\"offset\" >= h2.log_start_offset
                                AND e.appended_at >= now() - t.retention),
                            h2.log_end_offset) AS new_start
              FROM partition_heads h2 JOIN topics t ON t.name = h2.topic) s
     WHERE h.topic = s.topic AND h.partition = s.partition
       AND s.new_start > h.log_start_offset";

/// Time index entries wholly below their partition's log start.
const DELETE_EXPIRED_TIME_INDEX: &str = "
    DELETE FROM event_log_time_index i USING partition_heads h
     WHERE i.topic = h.topic AND i.partition = h.partition AND i.last_offset < h.log_start_offset";

/// The longest retention of any topic, in days (0 without topics).
const MAX_RETENTION_DAYS: &str =
    "SELECT coalesce(extract(epoch FROM max(retention)) / 86400.0, 0)::float8 FROM topics";

/// The day partitions of `event_log`, by name.
const DAY_PARTITIONS: &str = "
    SELECT c.relname FROM pg_inherits i
      JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = 'event_log'::regclass ORDER BY c.relname";

/// Moves each partition's log start offset past records older than its
/// topic's retention (readers never see them again) and drops day partitions
/// older than every topic's retention. Nothing is deleted row by row.
///
/// The heads move in a short transaction of their own (the relay updates
/// those rows on every batch), and the day partitions are dropped in
/// another that waits at most [`DDL_LOCK_WAIT`] for the lock on `event_log`:
/// a `DROP` queued behind a long reader would hold up every append and read
/// behind it. A drop that cannot get the lock is left for the next pass.
pub async fn enforce_retention(
    client: &mut tokio_postgres::Client,
) -> anyhow::Result<RetentionOutcome> {
    let tx = client.transaction().await?;
    let truncated = tx.execute(ADVANCE_LOG_START, &[]).await?;
    tx.execute(DELETE_EXPIRED_TIME_INDEX, &[]).await?;
    tx.commit().await?;

    let tx = client.transaction().await?;
    tx.execute(BOUND_LOCK_WAIT, &[&DDL_LOCK_WAIT]).await?;
    tx.execute(LOCK_SCHEMA, &[&SCHEMA_LOCK_KEY]).await?;
    let max_retention_days: f64 = tx.query_one(MAX_RETENTION_DAYS, &[]).await?.get(0);
    let oldest_kept =
        Utc::now().date_naive() - Duration::days(max_retention_days.ceil() as i64 + 1);
    let days = tx.query(DAY_PARTITIONS, &[]).await?;
    let mut dropped = Vec::new();
    for row in days {
        let name: String = row.get(0);
        let Some(day) = name
            .strip_prefix("event_log_")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
        else {
            continue;
        };
        if day < oldest_kept {
            match tx.batch_execute(&format!("DROP TABLE {name}")).await {
                Ok(()) => dropped.push(name),
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
                {
                    tracing::info!(table = %name, "event_log is busy; dropping the day partition next time");
                    return Ok(RetentionOutcome {
                        partitions_truncated: truncated,
                        days_dropped: Vec::new(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    tx.commit().await?;
    Ok(RetentionOutcome {
        partitions_truncated: truncated,
        days_dropped: dropped,
    })
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("log::storage::LOCK_SCHEMA", LOCK_SCHEMA.to_string()),
        ("log::storage::BOUND_LOCK_WAIT", BOUND_LOCK_WAIT.to_string()),
        ("log::storage::RELATION_EXISTS", RELATION_EXISTS.to_string()),
        (
            "log::storage::ADVANCE_LOG_START",
            ADVANCE_LOG_START.to_string(),
        ),
        (
            "log::storage::DELETE_EXPIRED_TIME_INDEX",
            DELETE_EXPIRED_TIME_INDEX.to_string(),
        ),
        (
            "log::storage::MAX_RETENTION_DAYS",
            MAX_RETENTION_DAYS.to_string(),
        ),
        ("log::storage::DAY_PARTITIONS", DAY_PARTITIONS.to_string()),
    ]
}
