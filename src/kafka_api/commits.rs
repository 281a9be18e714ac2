//! OffsetCommit and OffsetFetch: a Kafka group's committed offsets are
//! rows of `group_partitions`, as a native group's (so lag, the lag
//! metrics and `groups reset-offsets` see them). A commit is fenced by the
//! coordinator (`Group::may_commit`: member, generation, instance) under
//! the group's row lock, and written in the same transaction.

use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::*;

use super::coordinator::INCONSISTENT_GROUP_PROTOCOL;
use super::group_store::{self, NotKafka};
use super::{Front, NONE, UNKNOWN_TOPIC_OR_PARTITION};

/// Commits the offsets of partitions the log has; returns those written.
const COMMIT: &str = "
    INSERT INTO group_partitions (group_id, topic, partition, committed_offset, committed_at)
    SELECT $1, v.topic, v.partition, v.committed_offset, now()
      FROM unnest($2::text[], $3::int4[], $4::int8[]) AS v(topic, partition, committed_offset)
      JOIN partition_heads h USING (topic, partition)
    ON CONFLICT (group_id, topic, partition) DO UPDATE
       SET committed_offset = excluded.committed_offset, committed_at = now()
    RETURNING topic, partition";

const COMMITTED: &str = "
    SELECT topic, partition, committed_offset FROM group_partitions
     WHERE group_id = $1 AND committed_offset IS NOT NULL ORDER BY topic, partition";

impl Front {
    pub(super) async fn offset_commit(
        &self,
        request: &OffsetCommitRequest,
    ) -> anyhow::Result<OffsetCommitResponse> {
        let group_id = request.group_id.0.as_str();
        let (mut topics, mut partitions, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        for topic in &request.topics {
            for p in &topic.partitions {
                let name = topic.name.0.as_str();
                // A partition named twice: the last offset given (one
                // statement may not update a row twice).
                match topics
                    .iter()
                    .zip(&partitions)
                    .position(|(t, n)| *t == name && *n == p.partition_index)
                {
                    Some(at) => offsets[at] = p.committed_offset,
                    None => {
                        topics.push(name);
                        partitions.push(p.partition_index);
                        offsets.push(p.committed_offset);
                    }
                }
            }
        }
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // A commit outside a generation may make the group (a consumer that
        // assigns itself partitions); a member's needs it to exist.
        let create = request.generation_id_or_member_epoch < 0;
        let (code, written) = match group_store::lock(&tx, group_id, create).await? {
            Err(NotKafka::Native) => {
                tracing::warn!(group = %group_id,
                    "refused a Kafka client's OffsetCommit: the group is a native outbox-relay group");
                (INCONSISTENT_GROUP_PROTOCOL, Vec::new())
            }
            Err(NotKafka::Unknown) => (super::coordinator::UNKNOWN_MEMBER_ID, Vec::new()),
            Ok(mut locked) => {
                let now = locked.now;
                let code = locked.group.may_commit(
                    &request.member_id,
                    request.group_instance_id.as_deref(),
                    request.generation_id_or_member_epoch,
                    now,
                );
                let changed = locked.save(&tx).await?;
                let written: Vec<(String, i32)> = if code == NONE {
                    tx.query(COMMIT, &[&group_id, &topics, &partitions, &offsets])
                        .await?
                        .iter()
                        .map(|r| (r.get(0), r.get(1)))
                        .collect()
                } else {
                    Vec::new()
                };
                tx.commit().await?;
                if changed {
                    self.group_changed.notify_waiters();
                }
                (code, written)
            }
        };
        let mut response = OffsetCommitResponse::default();
        response.topics = request
            .topics
            .iter()
            .map(|topic| {
                let mut answered = OffsetCommitResponseTopic::default();
                answered.name = topic.name.clone();
                answered.partitions = topic
                    .partitions
                    .iter()
                    .map(|p| {
                        let mut partition = OffsetCommitResponsePartition::default();
                        partition.partition_index = p.partition_index;
                        partition.error_code = if code != NONE {
                            code
                        } else if written
                            .iter()
                            .any(|(t, n)| t == topic.name.0.as_str() && *n == p.partition_index)
                        {
                            NONE
                        } else {
                            UNKNOWN_TOPIC_OR_PARTITION
                        };
                        partition
                    })
                    .collect();
                answered
            })
            .collect();
        Ok(response)
    }

    /// The committed offsets asked for (all the group has, for a null list);
    /// -1 for a partition without one.
    pub(super) async fn offset_fetch(
        &self,
        request: &OffsetFetchRequest,
    ) -> anyhow::Result<OffsetFetchResponse> {
        let client = self.pool.get().await?;
        let committed: Vec<(String, i32, i64)> = client
            .query(COMMITTED, &[&request.group_id.0.as_str()])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let asked: Vec<(String, Vec<i32>)> = match &request.topics {
            Some(topics) => topics
                .iter()
                .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
                .collect(),
            None => {
                let mut all: Vec<(String, Vec<i32>)> = Vec::new();
                for (topic, partition, _) in &committed {
                    match all.iter_mut().find(|(t, _)| t == topic) {
                        Some((_, partitions)) => partitions.push(*partition),
                        None => all.push((topic.clone(), vec![*partition])),
                    }
                }
                all
            }
        };
        let mut response = OffsetFetchResponse::default();
        response.topics = asked
            .into_iter()
            .map(|(name, partitions)| {
                let mut topic = OffsetFetchResponseTopic::default();
                topic.partitions = partitions
                    .into_iter()
                    .map(|index| {
                        let mut partition = OffsetFetchResponsePartition::default();
                        partition.partition_index = index;
                        partition.committed_offset = committed
                            .iter()
                            .find(|(t, p, _)| *t == name && *p == index)
                            .map_or(-1, |(_, _, offset)| *offset);
                        partition.committed_leader_epoch = -1;
                        partition.metadata = Some(Default::default());
                        partition
                    })
                    .collect();
                topic.name = TopicName(name.into());
                topic
            })
            .collect();
        Ok(response)
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("kafka_api::commits::COMMIT", COMMIT.to_string()),
        ("kafka_api::commits::COMMITTED", COMMITTED.to_string()),
    ]
}
