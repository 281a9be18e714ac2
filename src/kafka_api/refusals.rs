//! A topic's partitions answered with an error code and nothing else: what
//! a failed request (UNKNOWN_SERVER_ERROR, COORDINATOR_NOT_AVAILABLE) and a
//! topic the user may not read (TOPIC_AUTHORIZATION_FAILED) are told.

use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::TopicName;

pub(super) fn fetch(
    topic: TopicName,
    partitions: impl Iterator<Item = i32>,
    code: i16,
) -> FetchableTopicResponse {
    let mut answer = FetchableTopicResponse::default();
    answer.topic = topic;
    answer.partitions = partitions
        .map(|index| {
            let mut partition = PartitionData::default();
            partition.partition_index = index;
            partition.error_code = code;
            partition.high_watermark = -1;
            partition.last_stable_offset = -1;
            partition.log_start_offset = -1;
            partition
        })
        .collect();
    answer
}

pub(super) fn list_offsets(
    topic: TopicName,
    partitions: impl Iterator<Item = i32>,
    code: i16,
) -> ListOffsetsTopicResponse {
    let mut answer = ListOffsetsTopicResponse::default();
    answer.name = topic;
    answer.partitions = partitions
        .map(|index| {
            let mut partition = ListOffsetsPartitionResponse::default();
            partition.partition_index = index;
            partition.error_code = code;
            partition.offset = -1;
            partition.timestamp = -1;
            partition
        })
        .collect();
    answer
}

pub(super) fn offset_commit(
    topic: TopicName,
    partitions: impl Iterator<Item = i32>,
    code: i16,
) -> OffsetCommitResponseTopic {
    let mut answer = OffsetCommitResponseTopic::default();
    answer.name = topic;
    answer.partitions = partitions
        .map(|index| {
            let mut partition = OffsetCommitResponsePartition::default();
            partition.partition_index = index;
            partition.error_code = code;
            partition
        })
        .collect();
    answer
}
