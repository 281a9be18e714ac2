//! The event log: topics × partitions × offsets, read like a Kafka topic.
//!
//! Records are appended only by the relay ([`crate::relay`]); this module
//! reads them and keeps the log's storage: day partitions ahead of time,
//! retention by moving the log start offset and dropping whole days.

use anyhow::Context;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;

/// A topic and its configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Topic {
    pub name: String,
    pub partitions: i32,
    /// Retention in seconds (records older than this by append time expire).
    pub retention_seconds: i64,
}

/// Offsets of one partition, in Kafka's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionOffsets {
    pub partition: i32,
    /// First retained offset.
    pub log_start_offset: i64,
    /// Next offset to be assigned.
    pub log_end_offset: i64,
}

/// One record of the log.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The outbox row's creation time (Kafka's CreateTime).
    pub created_at: DateTime<Utc>,
    /// When the relay appended it (Kafka's LogAppendTime).
    pub appended_at: DateTime<Utc>,
    pub headers: serde_json::Value,
    pub payload: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        topic: String,
        partition: i32,
        partitions: i32,
    },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

pub async fn list_topics(client: &impl GenericClient) -> Result<Vec<Topic>, LogError> {
    let rows = client
        .query(
            "SELECT name, partitions, extract(epoch FROM retention)::bigint FROM topics ORDER BY name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Topic {
            name: r.get(0),
            partitions: r.get(1),
            retention_seconds: r.get(2),
        })
        .collect())
}

pub async fn topic(client: &impl GenericClient, name: &str) -> Result<Topic, LogError> {
    let row = client
        .query_opt(
            "SELECT name, partitions, extract(epoch FROM retention)::bigint FROM topics WHERE name = $1",
            &[&name],
        )
        .await?
        .ok_or_else(|| LogError::UnknownTopic(name.to_string()))?;
    Ok(Topic {
        name: row.get(0),
        partitions: row.get(1),
        retention_seconds: row.get(2),
    })
}

/// Creates a topic with its partition heads. Fails if it exists.
pub async fn create_topic(
    client: &mut tokio_postgres::Client,
    name: &str,
    partitions: i32,
    retention: std::time::Duration,
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    let retention_seconds = retention.as_secs_f64();
    tx.execute(
        "INSERT INTO topics (name, partitions, retention) VALUES ($1, $2, make_interval(secs => $3))",
        &[&name, &partitions, &retention_seconds],
    )
    .await
    .map_err(|e| match e.code() {
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => anyhow::anyhow!("topic {name:?} already exists"),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION) => {
            anyhow::anyhow!("invalid topic {name:?}: names are 1 to 249 of A-Z a-z 0-9 . _ -")
        }
        _ => anyhow::Error::new(e).context(format!("creating topic {name:?}")),
    })?;
    tx.execute(
        "INSERT INTO partition_heads (topic, partition) SELECT $1, p FROM generate_series(0, $2 - 1) AS p",
        &[&name, &partitions],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Log start and end offsets of every partition of `topic`.
pub async fn partition_offsets(
    client: &impl GenericClient,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, LogError> {
    let rows = client
        .query(
            "SELECT partition, log_start_offset, log_end_offset FROM partition_heads
             WHERE topic = $1 ORDER BY partition",
            &[&topic],
        )
        .await?;
    if rows.is_empty() {
        return Err(LogError::UnknownTopic(topic.to_string()));
    }
    Ok(rows
        .iter()
        .map(|r| PartitionOffsets {
            partition: r.get(0),
            log_start_offset: r.get(1),
            log_end_offset: r.get(2),
        })
        .collect())
}

/// Offsets of one partition.
pub async fn offsets_of(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
) -> Result<PartitionOffsets, LogError> {
    let all = partition_offsets(client, topic).await?;
    let partitions = all.len() as i32;
    all.into_iter()
        .find(|p| p.partition == partition)
        .ok_or_else(|| LogError::UnknownPartition {
            topic: topic.to_string(),
            partition,
            partitions,
        })
}

const READ_RECORDS: &str = "
    SELECT e.topic, e.partition, e.\"offset\", e.key, e.created_at, e.appended_at, e.headers, e.payload
    FROM event_log e
    WHERE e.topic = $1 AND e.partition = $2
      AND e.\"offset\" >= greatest($3, (SELECT log_start_offset FROM partition_heads h
                                         WHERE h.topic = $1 AND h.partition = $2))
    ORDER BY e.\"offset\"
    LIMIT $4";

/// Up to `max` records of a partition from offset `from` on, in offset order.
/// Offsets below the log start offset are skipped (they expired).
pub async fn read(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
    from: i64,
    max: i64,
) -> Result<Vec<Record>, LogError> {
    let rows = client
        .query(READ_RECORDS, &[&topic, &partition, &from, &max])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Record {
            topic: r.get(0),
            partition: r.get(1),
            offset: r.get(2),
            key: r.get(3),
            created_at: r.get(4),
            appended_at: r.get(5),
            headers: r.get(6),
            payload: r.get(7),
        })
        .collect())
}

/// Kafka's `offsetsForTimes`: the first offset (in offset order) whose
/// `created_at` is at or after `time`, or the log end offset when none is.
///
/// CreateTime is not monotonic, so the sparse time index keeps the running
/// maximum of `created_at` per batch: the first index entry whose running
/// maximum reaches `time` holds the answer, found by a short scan from there.
pub async fn offset_for_time(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
    time: DateTime<Utc>,
) -> Result<i64, LogError> {
    let offsets = offsets_of(client, topic, partition).await?;
    let row = client
        .query_opt(
            "SELECT base_offset FROM event_log_time_index
             WHERE topic = $1 AND partition = $2 AND max_created_at >= $3 AND last_offset >= $4
             ORDER BY max_created_at, base_offset LIMIT 1",
            &[&topic, &partition, &time, &offsets.log_start_offset],
        )
        .await?;
    let Some(row) = row else {
        return Ok(offsets.log_end_offset);
    };
    let scan_from: i64 = row.get::<_, i64>(0).max(offsets.log_start_offset);
    let found = client
        .query_opt(
            "SELECT \"offset\" FROM event_log
             WHERE topic = $1 AND partition = $2 AND \"offset\" >= $3 AND created_at >= $4
             ORDER BY \"offset\" LIMIT 1",
            &[&topic, &partition, &scan_from, &time],
        )
        .await?;
    Ok(found.map_or(offsets.log_end_offset, |r| r.get(0)))
}

// ─── Storage upkeep ─────────────────────────────────────────────────────────

/// How many days of event_log partitions exist ahead of today.
const DAYS_AHEAD: i64 = 3;

/// Lock serialising DDL on the log's partitions (same key as migrations).
pub(crate) const SCHEMA_LOCK_KEY: i64 = 0x6f75_7462_6f78; // "outbox"

fn partition_name(day: NaiveDate) -> String {
    format!("event_log_{}", day.format("%Y%m%d"))
}

/// Creates the day partitions of `event_log` from yesterday to a few days
/// ahead, those that do not exist yet. Takes the schema lock: call inside a
/// transaction.
pub async fn ensure_day_partitions(tx: &impl GenericClient) -> anyhow::Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await?;
    let today = Utc::now().date_naive();
    for ahead in -1..=DAYS_AHEAD {
        let day = today + Duration::days(ahead);
        let next = day + Duration::days(1);
        let name = partition_name(day);
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .get(0);
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

/// Moves each partition's log start offset past records older than its
/// topic's retention (readers never see them again) and drops day partitions
/// older than every topic's retention. Nothing is deleted row by row.
pub async fn enforce_retention(
    client: &mut tokio_postgres::Client,
) -> anyhow::Result<RetentionOutcome> {
    let tx = client.transaction().await?;
    let truncated = tx
        .execute(
            "UPDATE partition_heads h
                SET log_start_offset = s.new_start
               FROM (SELECT h2.topic, h2.partition,
                            coalesce((SELECT min(e.\"offset\") FROM event_log e
                                       WHERE e.topic = h2.topic AND e.partition = h2.partition
                                         AND e.\"offset\" >= h2.log_start_offset
                                         AND e.appended_at >= now() - t.retention),
                                     h2.log_end_offset) AS new_start
                       FROM partition_heads h2 JOIN topics t ON t.name = h2.topic) s
              WHERE h.topic = s.topic AND h.partition = s.partition
                AND s.new_start > h.log_start_offset",
            &[],
        )
        .await?;
    tx.execute(
        "DELETE FROM event_log_time_index i USING partition_heads h
          WHERE i.topic = h.topic AND i.partition = h.partition AND i.last_offset < h.log_start_offset",
        &[],
    )
    .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await?;
    let max_retention_days: f64 = tx
        .query_one(
            "SELECT coalesce(extract(epoch FROM max(retention)) / 86400.0, 0)::float8 FROM topics",
            &[],
        )
        .await?
        .get(0);
    let oldest_kept =
        Utc::now().date_naive() - Duration::days(max_retention_days.ceil() as i64 + 1);
    let days = tx
        .query(
            "SELECT c.relname FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'event_log'::regclass ORDER BY c.relname",
            &[],
        )
        .await?;
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
            tx.batch_execute(&format!("DROP TABLE {name}")).await?;
            dropped.push(name);
        }
    }
    tx.commit().await?;
    Ok(RetentionOutcome {
        partitions_truncated: truncated,
        days_dropped: dropped,
    })
}
