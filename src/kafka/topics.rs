//! The mirror's Kafka topics, checked before it produces: they exist (or
//! are created when allowed) with the log topic's partition count.

use std::time::Duration;

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::util::Timeout;

use super::producer::{backoff, without_values, MirroredTopic, Producers};
use super::KafkaSettings;

/// How long a metadata request or a topic creation may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until the brokers answer, then checks each Kafka topic: missing →
/// created with the log's partition count when allowed, else an error; a
/// different partition count → refused (the mirror never re-partitions).
pub(super) async fn check_topics(
    producers: &Producers,
    settings: &KafkaSettings,
    topics: &[MirroredTopic],
) -> anyhow::Result<()> {
    for topic in topics {
        let mut failures = 0;
        loop {
            let producer = producers.current();
            let name = topic.kafka_topic.clone();
            let found = tokio::task::spawn_blocking(move || kafka_partitions(&producer, &name))
                .await
                .context("metadata request")?;
            match found {
                Ok(Some(count)) if count == topic.partitions => break,
                Ok(Some(count)) => anyhow::bail!(
                    "Kafka topic {} has {count} partitions but the log's topic {} has {}: \
                     the mirror writes each record into the partition of the same number, \
                     so it refuses to mirror into a topic with another count",
                    topic.kafka_topic,
                    topic.log_topic,
                    topic.partitions
                ),
                Ok(None) if settings.create_topics => {
                    create_topic(settings, topic).await?;
                }
                Ok(None) => anyhow::bail!(
                    "Kafka topic {} does not exist: create it with {} partitions \
                     (the log topic {}'s count) or start with --kafka-create-topics",
                    topic.kafka_topic,
                    topic.partitions,
                    topic.log_topic
                ),
                Err(e) => {
                    failures += 1;
                    let wait = backoff(failures);
                    tracing::warn!(topic = %topic.kafka_topic, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "Kafka brokers did not answer; the mirror waits for them");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    Ok(())
}

/// The partition count of `topic` on the brokers; `None` when it does not exist.
fn kafka_partitions(producer: &FutureProducer, topic: &str) -> Result<Option<i32>, KafkaError> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Timeout::After(BROKER_TIMEOUT))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error() {
        None => Ok(Some(found.partitions().len() as i32)),
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            Ok(None)
        }
        Some(e) => Err(KafkaError::MetadataFetch(RDKafkaErrorCode::from(e))),
    }
}

async fn create_topic(settings: &KafkaSettings, topic: &MirroredTopic) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()?
        .create()
        .map_err(|e| anyhow::anyhow!("creating a Kafka admin client: {}", without_values(&e)))?;
    let new_topic = NewTopic::new(
        &topic.kafka_topic,
        topic.partitions,
        TopicReplication::Fixed(settings.replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Timeout::After(BROKER_TIMEOUT)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .with_context(|| format!("creating Kafka topic {}", topic.kafka_topic))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating Kafka topic {name}: {code}"),
        }
    }
    tracing::info!(topic = %topic.kafka_topic, partitions = topic.partitions, "created Kafka topic");
    Ok(())
}
