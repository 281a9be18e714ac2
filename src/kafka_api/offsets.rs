//! ListOffsets: earliest (the log start offset), latest (the log end
//! offset), and by timestamp: the first offset created at or after it,
//! from the log's time index — `replay --from`'s and `groups reset-offsets
//! --to-datetime`'s answer (`log::read::offset_for_time`). No record at or
//! after the time: offset and timestamp -1, as Kafka answers.

use chrono::{DateTime, Utc};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use super::{Front, NONE, UNKNOWN_TOPIC_OR_PARTITION};

/// Kafka's special timestamps.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
/// v7 (KIP-734): the record with the largest timestamp.
const MAX_TIMESTAMP: i64 = -3;

impl Front {
    pub(super) async fn list_offsets(
        &self,
        request: &ListOffsetsRequest,
        _version: i16,
    ) -> anyhow::Result<ListOffsetsResponse> {
        let client = self.pool.get().await?;
        let mut topics = Vec::with_capacity(request.topics.len());
        for topic in &request.topics {
            let name = topic.name.0.to_string();
            let heads = super::heads(&client, &name).await?;
            let mut partitions = Vec::with_capacity(topic.partitions.len());
            for asked in &topic.partitions {
                let mut answer = ListOffsetsPartitionResponse::default();
                answer.partition_index = asked.partition_index;
                answer.leader_epoch = -1;
                let Some(offsets) = heads.get(&asked.partition_index) else {
                    answer.error_code = UNKNOWN_TOPIC_OR_PARTITION;
                    partitions.push(answer);
                    continue;
                };
                answer.error_code = NONE;
                let (offset, timestamp) = match asked.timestamp {
                    EARLIEST => (offsets.log_start_offset, -1),
                    LATEST => (offsets.log_end_offset, -1),
                    time if time >= 0 => {
                        let at = DateTime::<Utc>::from_timestamp_millis(time)
                            .unwrap_or(DateTime::<Utc>::MAX_UTC);
                        let offset =
                            crate::log::read::offset_for_time_within(&**client, &name, offsets, at)
                                .await?;
                        if offset >= offsets.log_end_offset {
                            (-1, -1)
                        } else {
                            let record = crate::log::read(
                                &**client,
                                &name,
                                asked.partition_index,
                                offset,
                                1,
                            )
                            .await?;
                            let created = record
                                .first()
                                .map_or(-1, |r| r.created_at.timestamp_millis());
                            (offset, created)
                        }
                    }
                    MAX_TIMESTAMP => crate::log::read::largest_time(&**client, &name, offsets)
                        .await?
                        .map_or((-1, -1), |(offset, at)| (offset, at.timestamp_millis())),
                    // Anything else (-4, -5: tiered storage): none.
                    _ => (-1, -1),
                };
                answer.offset = offset;
                answer.timestamp = timestamp;
                partitions.push(answer);
            }
            let mut answered = ListOffsetsTopicResponse::default();
            answered.name = topic.name.clone();
            answered.partitions = partitions;
            topics.push(answered);
        }
        let mut response = ListOffsetsResponse::default();
        response.topics = topics;
        Ok(response)
    }
}
