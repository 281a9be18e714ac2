//! `kafka status`: per partition, the log end offset, the mirrored offset
//! (the mirror group's committed offset: everything below it is in Kafka)
//! and the lag.

use serde::Serialize;

use super::MIRROR_GROUP;

#[derive(Debug, Clone, Serialize)]
pub struct MirrorPartition {
    pub topic: String,
    pub partition: i32,
    pub log_end_offset: i64,
    /// None: the mirror has not committed for this partition yet.
    pub mirrored_offset: Option<i64>,
    /// Records in the log not yet in Kafka (from the log start when nothing
    /// was mirrored yet).
    pub lag: i64,
    /// The mirror member working on the partition, when one is live.
    pub owner: Option<String>,
}

/// Every partition of `topic` (or of every topic), with the mirror's progress.
const MIRROR_STATUS: &str = "
    SELECT h.topic, h.partition, h.log_end_offset, p.committed_offset,
           greatest(h.log_end_offset - coalesce(p.committed_offset, h.log_start_offset), 0),
           (SELECT m.member_id FROM group_members m
             WHERE m.group_id = p.group_id AND m.member_id = p.owner
               AND m.heartbeat_at + m.session_timeout > now())
      FROM partition_heads h
      LEFT JOIN group_partitions p
        ON p.group_id = $1 AND p.topic = h.topic AND p.partition = h.partition
     WHERE $2::text IS NULL OR h.topic = $2
     ORDER BY h.topic, h.partition";

pub async fn mirror_status(
    client: &impl tokio_postgres::GenericClient,
    topic: Option<&str>,
) -> Result<Vec<MirrorPartition>, crate::log::LogError> {
    if let Some(name) = topic {
        crate::log::topics::topic(client, name).await?;
    }
    Ok(client
        .query(MIRROR_STATUS, &[&MIRROR_GROUP, &topic])
        .await?
        .iter()
        .map(|r| MirrorPartition {
            topic: r.get(0),
            partition: r.get(1),
            log_end_offset: r.get(2),
            mirrored_offset: r.get(3),
            lag: r.get(4),
            owner: r.get(5),
        })
        .collect())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![("kafka::status::MIRROR_STATUS", MIRROR_STATUS.to_string())]
}
