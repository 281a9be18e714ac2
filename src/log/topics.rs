//! Topics and their partitions: list, describe, create; the partition
//! heads hold each partition's log start and log end offset.

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::GenericClient;

use super::LogError;

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

const LIST_TOPICS: &str =
    "SELECT name, partitions, extract(epoch FROM retention)::bigint FROM topics ORDER BY name";

pub async fn list_topics(client: &impl GenericClient) -> Result<Vec<Topic>, LogError> {
    let rows = client.query(LIST_TOPICS, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| Topic {
            name: r.get(0),
            partitions: r.get(1),
            retention_seconds: r.get(2),
        })
        .collect())
}

const TOPIC: &str =
    "SELECT name, partitions, extract(epoch FROM retention)::bigint FROM topics WHERE name = $1";

pub async fn topic(client: &impl GenericClient, name: &str) -> Result<Topic, LogError> {
    let row = client
        .query_opt(TOPIC, &[&name])
        .await?
        .ok_or_else(|| LogError::UnknownTopic(name.to_string()))?;
    Ok(Topic {
        name: row.get(0),
        partitions: row.get(1),
        retention_seconds: row.get(2),
    })
}

const INSERT_TOPIC: &str =
    "INSERT INTO topics (name, partitions, retention) VALUES ($1, $2, make_interval(secs => $3))";

/// One head per partition, `0..$2`, each at offset 0.
const INSERT_PARTITION_HEADS: &str =
    "INSERT INTO partition_heads (topic, partition) SELECT $1, p FROM generate_series(0, $2 - 1) AS p";

/// Creates a topic with its partition heads. Fails if it exists.
pub async fn create_topic(
    client: &mut tokio_postgres::Client,
    name: &str,
    partitions: i32,
    retention: std::time::Duration,
) -> Result<(), LogError> {
    let tx = client.transaction().await?;
    let retention_seconds = retention.as_secs_f64();
    tx.execute(INSERT_TOPIC, &[&name, &partitions, &retention_seconds])
        .await
        .map_err(|e| match e.code() {
            Some(&SqlState::UNIQUE_VIOLATION) => LogError::TopicExists(name.to_string()),
            Some(&SqlState::CHECK_VIOLATION) if e.to_string().contains("retention") => {
                LogError::InvalidRetention
            }
            Some(&SqlState::CHECK_VIOLATION) => LogError::InvalidTopicName(name.to_string()),
            _ => LogError::Db(e),
        })?;
    tx.execute(INSERT_PARTITION_HEADS, &[&name, &partitions])
        .await?;
    tx.commit().await?;
    Ok(())
}

const PARTITION_OFFSETS: &str = "
    SELECT partition, log_start_offset, log_end_offset FROM partition_heads
     WHERE topic = $1 ORDER BY partition";

/// Log start and end offsets of every partition of `topic`.
pub async fn partition_offsets(
    client: &impl GenericClient,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, LogError> {
    let rows = client.query(PARTITION_OFFSETS, &[&topic]).await?;
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

/// One partition's offsets, with its topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicPartitionOffsets {
    pub topic: String,
    pub partition: i32,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
}

const ALL_PARTITION_OFFSETS: &str = "
    SELECT topic, partition, log_start_offset, log_end_offset FROM partition_heads
     ORDER BY topic, partition";

/// Offsets of every partition of every topic.
pub async fn all_partition_offsets(
    client: &impl GenericClient,
) -> Result<Vec<TopicPartitionOffsets>, LogError> {
    Ok(client
        .query(ALL_PARTITION_OFFSETS, &[])
        .await?
        .iter()
        .map(|r| TopicPartitionOffsets {
            topic: r.get(0),
            partition: r.get(1),
            log_start_offset: r.get(2),
            log_end_offset: r.get(3),
        })
        .collect())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("log::topics::ALTER_RETENTION", ALTER_RETENTION.to_string()),
        ("log::topics::LIST_TOPICS", LIST_TOPICS.to_string()),
        ("log::topics::TOPIC", TOPIC.to_string()),
        ("log::topics::INSERT_TOPIC", INSERT_TOPIC.to_string()),
        (
            "log::topics::INSERT_PARTITION_HEADS",
            INSERT_PARTITION_HEADS.to_string(),
        ),
        (
            "log::topics::PARTITION_OFFSETS",
            PARTITION_OFFSETS.to_string(),
        ),
        (
            "log::topics::ALL_PARTITION_OFFSETS",
            ALL_PARTITION_OFFSETS.to_string(),
        ),
    ]
}

const ALTER_RETENTION: &str = "
    UPDATE topics SET retention = make_interval(secs => $2) WHERE name = $1";

/// Changes a topic's retention (records older than it, by append time, fall
/// below the log start offset at the relay's next retention pass).
pub async fn alter_retention(
    client: &impl GenericClient,
    name: &str,
    retention: std::time::Duration,
) -> Result<(), LogError> {
    let updated = client
        .execute(ALTER_RETENTION, &[&name, &retention.as_secs_f64()])
        .await
        .map_err(|e| match e.code() {
            Some(&SqlState::CHECK_VIOLATION) => LogError::InvalidRetention,
            _ => LogError::Db(e),
        })?;
    if updated == 0 {
        return Err(LogError::UnknownTopic(name.to_string()));
    }
    Ok(())
}
