//! Produce: refused. The log is written through the outbox, in the
//! writer's own transaction (the whole point); a Kafka producer pointed
//! here gets TOPIC_AUTHORIZATION_FAILED for every partition, at once.
//!
//! Produce is in the table all the same: librdkafka derives the record
//! format it can read from the Produce and Fetch versions a broker
//! advertises together, and without Produce v3 it would fetch only the
//! pre-0.11 format, which this front end does not serve.

use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;

use super::TOPIC_AUTHORIZATION_FAILED;

/// Why a produce is refused, in the answer (Produce v8 and later).
const REFUSED: &str =
    "outbox-relay's log is read-only over Kafka: write to the outbox table in your transaction";

/// The answer to `request`: every partition refused. None for `acks=0`,
/// which Kafka never answers (the connection is closed instead).
pub(super) fn refuse(request: &ProduceRequest) -> Option<ProduceResponse> {
    if request.acks == 0 {
        return None;
    }
    let mut response = ProduceResponse::default();
    response.responses = request
        .topic_data
        .iter()
        .map(|topic| {
            let mut answered = TopicProduceResponse::default();
            answered.name = topic.name.clone();
            answered.partition_responses = topic
                .partition_data
                .iter()
                .map(|partition| {
                    let mut refused = PartitionProduceResponse::default();
                    refused.index = partition.index;
                    refused.error_code = TOPIC_AUTHORIZATION_FAILED;
                    refused.base_offset = -1;
                    refused.log_append_time_ms = -1;
                    refused.log_start_offset = -1;
                    refused.error_message = Some(StrBytes::from_static_str(REFUSED));
                    refused
                })
                .collect();
            answered
        })
        .collect();
    Some(response)
}
