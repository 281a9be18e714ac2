//! The mirror's producer and what both its partition loop and its topic
//! checks share: the topics it mirrors, its errors without secrets, its
//! backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use super::KafkaSettings;

/// A log topic to mirror, with its partition count.
#[derive(Debug, Clone)]
pub struct MirroredTopic {
    pub log_topic: String,
    pub kafka_topic: String,
    pub partitions: i32,
}

/// A librdkafka error without the setting's value: librdkafka quotes the
/// value of a setting it refuses, and values may be passwords.
pub(super) fn without_values(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(result, _description, key, _value) => {
            format!("setting {key} ({result:?}; its value is not shown)")
        }
        other => other.to_string(),
    }
}

pub(super) fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << failures.min(8)).min(30_000))
}

/// The process's producer; replaced when librdkafka reports a fatal error
/// (an idempotent producer that lost its sequence cannot go on).
pub(super) struct Producers {
    settings: Arc<KafkaSettings>,
    current: Mutex<(u64, FutureProducer)>,
}

impl Producers {
    pub(super) fn new(settings: &Arc<KafkaSettings>) -> anyhow::Result<Producers> {
        Ok(Producers {
            settings: settings.clone(),
            current: Mutex::new((0, Self::create(settings)?)),
        })
    }

    fn create(settings: &KafkaSettings) -> anyhow::Result<FutureProducer> {
        // librdkafka names the offending setting (never its value).
        settings
            .client_config()?
            .create()
            .map_err(|e| anyhow::anyhow!("Kafka settings refused: {}", without_values(&e)))
    }

    pub(super) fn current(&self) -> FutureProducer {
        self.current.lock().expect("producer lock").1.clone()
    }

    pub(super) fn current_with_generation(&self) -> (u64, FutureProducer) {
        self.current.lock().expect("producer lock").clone()
    }

    /// After a fatal error of generation `generation`'s producer: a new one
    /// (once, whichever partition noticed first).
    pub(super) fn replace(&self, generation: u64) -> anyhow::Result<()> {
        let mut current = self.current.lock().expect("producer lock");
        if current.0 == generation {
            *current = (generation + 1, Self::create(&self.settings)?);
            tracing::warn!("Kafka producer replaced after a fatal error");
        }
        Ok(())
    }
}
