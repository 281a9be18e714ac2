//! Metadata: this process as the one broker, leading every partition of
//! the log's topics; a topic the log does not have is
//! UNKNOWN_TOPIC_OR_PARTITION (never created: topics are made with
//! `outbox-relay topics create`).

use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse, TopicName};
use kafka_protocol::protocol::StrBytes;

use super::{Front, NODE_ID, NONE, UNKNOWN_TOPIC_OR_PARTITION};

/// The cluster id every answer gives.
const CLUSTER_ID: &str = "outbox-relay";

impl Front {
    pub(super) async fn metadata(
        &self,
        request: &MetadataRequest,
        _version: i16,
    ) -> anyhow::Result<MetadataResponse> {
        let client = self.pool.get().await?;
        let known = crate::log::topics::list_topics(&**client).await?;
        let wanted: Option<Vec<String>> = request.topics.as_ref().map(|topics| {
            topics
                .iter()
                .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
                .collect()
        });
        let topics = match wanted {
            // All topics (a null list).
            None => known
                .iter()
                .map(|t| described(&t.name, Some(t.partitions)))
                .collect(),
            Some(names) => names
                .iter()
                .map(|name| {
                    let partitions = known.iter().find(|t| &t.name == name).map(|t| t.partitions);
                    described(name, partitions)
                })
                .collect(),
        };
        let mut response = MetadataResponse::default();
        response.brokers = vec![self.broker()];
        response.cluster_id = Some(StrBytes::from_static_str(CLUSTER_ID));
        response.controller_id = BrokerId(NODE_ID);
        response.topics = topics;
        Ok(response)
    }
}

impl Front {
    /// This process as the cluster's one broker.
    pub(super) fn broker(&self) -> MetadataResponseBroker {
        let mut broker = MetadataResponseBroker::default();
        broker.node_id = BrokerId(NODE_ID);
        broker.host = StrBytes::from_string(self.advertised.host.clone());
        broker.port = i32::from(self.advertised.port);
        broker
    }
}

/// A topic's entry: its partitions, each led by this node, or the error
/// for a topic the log does not have.
fn described(name: &str, partitions: Option<i32>) -> MetadataResponseTopic {
    let mut topic = MetadataResponseTopic::default();
    topic.name = Some(TopicName(StrBytes::from_string(name.to_string())));
    match partitions {
        None => topic.error_code = UNKNOWN_TOPIC_OR_PARTITION,
        Some(count) => {
            topic.error_code = NONE;
            topic.partitions = (0..count)
                .map(|index| {
                    let mut partition = MetadataResponsePartition::default();
                    partition.partition_index = index;
                    partition.leader_id = BrokerId(NODE_ID);
                    // No leader epochs: clients skip their epoch checks.
                    partition.leader_epoch = -1;
                    partition.replica_nodes = vec![BrokerId(NODE_ID)];
                    partition.isr_nodes = vec![BrokerId(NODE_ID)];
                    partition
                })
                .collect();
        }
    }
    topic
}
