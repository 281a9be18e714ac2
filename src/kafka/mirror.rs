//! The `kafka` role: a member of the consumer group [`MIRROR_GROUP`] that
//! produces the records of each partition it owns into the Kafka partition
//! of the same number, in offset order, and commits past them once the
//! brokers acknowledged them.
//!
//! Order: one idempotent producer (`enable.idempotence`, `acks=all`) keeps
//! the order records are handed to it per partition, across its own
//! retries; records are handed over in offset order, and a record is never
//! given up while brokers are away (`message.timeout.ms=0` by default), so
//! an outage only makes the mirror wait.
//!
//! At least once: the commit follows the acknowledgements. A crash between
//! an acknowledgement and the next commit (what was acknowledged within
//! `commit_interval`, and what was in flight) produces those records again
//! on restart; so does a record the brokers refused (its partition goes
//! back to it after a backoff, and records after it that had landed land
//! again, after it). A partition that moves to another process while its
//! records wait in this producer's queue (brokers slow or away) may get
//! them after the new owner's. Each record carries [`OFFSET_HEADER`]: a
//! consumer recognises a repeat as an offset of that partition it has
//! already seen.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio::time::Instant;

pub use super::producer::MirroredTopic;
use super::producer::{backoff, Producers};
use super::topics::check_topics;
use super::{KafkaSettings, MIRROR_GROUP, OFFSET_HEADER};
use crate::db::Db;
use crate::group::consumer::{Consumer, ConsumerConfig, OwnedPartition, PartitionWork, Stop};
use crate::group::GroupConfig;
use crate::log::{self, Record};
use crate::shutdown::Shutdown;

/// Records handed to the producer and not yet acknowledged, per partition.
const WINDOW: usize = 20_000;
/// Records read from the log at a time.
const READ_BATCH: usize = 2_000;

/// The `kafka` role.
pub struct KafkaMirror {
    settings: Arc<KafkaSettings>,
    topics: Vec<MirroredTopic>,
    work: Arc<MirrorWork>,
    consumer: Consumer<MirrorWork>,
}

/// Every connection the mirror's group member takes: its reads and
/// commits, and its own.
pub const CONNECTIONS: usize = 8 + crate::group::consumer::MEMBER_OWN_CONNECTIONS;

/// The mirror with its producer built (librdkafka checks every setting
/// then, so a bad one stops the process before anything starts), waiting
/// for the log topics it will mirror.
pub struct PreparedMirror {
    settings: Arc<KafkaSettings>,
    producers: Producers,
}

impl PreparedMirror {
    pub fn new(settings: KafkaSettings) -> anyhow::Result<PreparedMirror> {
        let settings = Arc::new(settings);
        Ok(PreparedMirror {
            producers: Producers::new(&settings)?,
            settings,
        })
    }

    /// The log topics to mirror with their partition counts: the ones the
    /// settings name, else every topic of the log.
    pub async fn topics(
        &self,
        client: &impl tokio_postgres::GenericClient,
    ) -> anyhow::Result<Vec<MirroredTopic>> {
        let topics = if self.settings.topics.is_empty() {
            log::topics::list_topics(client).await?
        } else {
            let mut topics = Vec::new();
            for name in &self.settings.topics {
                topics.push(log::topics::topic(client, name).await?);
            }
            topics
        };
        let mirrored: Vec<MirroredTopic> = topics
            .into_iter()
            .map(|t| MirroredTopic {
                kafka_topic: self.settings.kafka_topic(&t.name).to_string(),
                log_topic: t.name,
                partitions: t.partitions,
            })
            .collect();
        if mirrored.is_empty() {
            anyhow::bail!("the kafka role has no topic to mirror: the log has none yet");
        }
        Ok(mirrored)
    }

    /// The role, as a member of [`MIRROR_GROUP`] over `topics`.
    pub fn build(self, db: &Db, topics: Vec<MirroredTopic>) -> anyhow::Result<KafkaMirror> {
        let work = Arc::new(MirrorWork {
            settings: self.settings.clone(),
            producers: self.producers,
        });
        let names: Vec<&str> = topics.iter().map(|t| t.log_topic.as_str()).collect();
        let mut group = GroupConfig::new(MIRROR_GROUP, &names);
        group.session_timeout = self.settings.session_timeout;
        group.heartbeat_interval =
            (self.settings.session_timeout / 10).max(Duration::from_millis(100));
        let consumer = Consumer::with_work("kafka", db, ConsumerConfig::new(group), work.clone())?;
        Ok(KafkaMirror {
            settings: self.settings,
            topics,
            work,
            consumer,
        })
    }
}

impl crate::service::Service for KafkaMirror {
    fn name(&self) -> &'static str {
        "kafka"
    }

    async fn run(self, mut shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!(kafka = %self.settings.describe(), "kafka mirror starting");
        let checked = {
            let check = check_topics(&self.work.producers, &self.settings, &self.topics);
            tokio::select! {
                result = check => Some(result),
                _ = shutdown.recv() => None,
            }
        };
        match checked {
            None => return Ok(()),
            Some(result) => result?,
        }
        self.consumer.run(shutdown).await
    }
}

/// The per-partition work of the mirror.
pub struct MirrorWork {
    settings: Arc<KafkaSettings>,
    producers: Producers,
}

/// A record handed to the producer, waiting for its acknowledgement.
struct InFlight {
    offset: i64,
    delivery: DeliveryFuture,
}

impl PartitionWork for MirrorWork {
    async fn run_partition(self: Arc<Self>, partition: OwnedPartition) -> anyhow::Result<()> {
        self.mirror(partition).await
    }
}

/// What the partition loop woke up for.
enum Wake {
    /// The oldest record in flight: acknowledged, or refused.
    Acknowledged(Result<(), KafkaError>),
    Appended,
    /// The member changed the stop signal (`false`: the member is gone).
    StopChanged(bool),
    Timer,
}

impl MirrorWork {
    async fn mirror(&self, partition: OwnedPartition) -> anyhow::Result<()> {
        // Every offset below `acknowledged` is in Kafka.
        let mut acknowledged = partition.start_offset().await?;
        let OwnedPartition {
            pool,
            config,
            assignment,
            mut appended,
            mut stop,
        } = partition;
        let kafka_topic = self.settings.kafka_topic(&assignment.topic).to_string();
        let mirrored = super::metrics::mirror_metrics()
            .mirrored
            .with_label_values(&[assignment.topic.as_str()]);
        let (generation, producer) = self.producers.current_with_generation();

        let mut next = acknowledged;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut committed: Option<i64> = None;
        let mut last_commit = Instant::now();
        let mut caught_up = false;
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        // The oldest record in flight, refused (it stays at the front).
        let mut refused: Option<KafkaError> = None;
        let mut grace_deadline: Option<Instant> = None;
        // The producer's queue was full: read again after an acknowledgement.
        let mut queue_full = false;

        loop {
            let stopping = *stop.borrow();
            if stopping == Stop::Now {
                return Ok(());
            }
            let may_read = stopping == Stop::Running
                && !caught_up
                && refused.is_none()
                && retry_at.is_none_or(|at| at <= Instant::now());
            // Read when a whole batch fits (not one record per acknowledgement).
            if may_read && !queue_full && WINDOW - in_flight.len() >= READ_BATCH.min(WINDOW) {
                retry_at = None;
                let asked = (WINDOW - in_flight.len()).min(READ_BATCH) as i64;
                let client = pool.get().await?;
                let read_records = client.prepare_cached(&log::read::READ_RECORDS).await?;
                let records = log::read::read_with(
                    &**client,
                    &read_records,
                    &assignment.topic,
                    assignment.partition,
                    next,
                    asked,
                )
                .await
                .context("reading the partition")?;
                drop(client);
                caught_up = (records.len() as i64) < asked;
                let mut not_queued = None;
                for record in &records {
                    match produce(&producer, &kafka_topic, record) {
                        Ok(delivery) => {
                            next = record.offset + 1;
                            in_flight.push_back(InFlight {
                                offset: record.offset,
                                delivery,
                            });
                        }
                        Err(error) => {
                            not_queued = Some(error);
                            break;
                        }
                    }
                }
                // `next` stays at a record that was not queued: it is read again.
                match not_queued {
                    None => {}
                    Some(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                        caught_up = false;
                        // Room comes with acknowledgements; when this
                        // partition has none in flight, other partitions
                        // filled the queue.
                        if in_flight.is_empty() {
                            retry_at = Some(Instant::now() + Duration::from_millis(10));
                        } else {
                            queue_full = true;
                        }
                    }
                    Some(error) => {
                        caught_up = false;
                        failures += 1;
                        let wait = backoff(failures);
                        count_error(&error);
                        tracing::warn!(topic = %kafka_topic, partition = assignment.partition,
                            offset = next, error = %error, retry_in_ms = wait.as_millis() as u64,
                            "the Kafka producer refused a record; trying it again after a backoff");
                        if producer.client().fatal_error().is_some() {
                            self.producers.replace(generation)?;
                            anyhow::bail!("the Kafka producer failed fatally: {error}");
                        }
                        retry_at = Some(Instant::now() + wait);
                    }
                }
            }
            // Acknowledgements already in, oldest first (up to a refusal).
            while let Some(front) = in_flight.front_mut().filter(|_| refused.is_none()) {
                match (&mut front.delivery).now_or_never() {
                    None => break,
                    Some(result) => match delivery_result(result) {
                        Ok(()) => {
                            acknowledged = front.offset + 1;
                            in_flight.pop_front();
                            mirrored.inc();
                            failures = 0;
                            queue_full = false;
                        }
                        Err(e) => {
                            refused = Some(e);
                            break;
                        }
                    },
                }
            }
            if let Some(error) = refused.take() {
                failures += 1;
                let wait = backoff(failures);
                count_error(&error);
                tracing::warn!(topic = %kafka_topic, partition = assignment.partition,
                    offset = acknowledged, error = %error, retry_in_ms = wait.as_millis() as u64,
                    "Kafka refused a record; producing again from it after a backoff");
                // What was handed over after it may still land (and land
                // again after it): wait for all of it before going back.
                in_flight.pop_front();
                for pending in in_flight.drain(..) {
                    tokio::select! {
                        _ = pending.delivery => {}
                        // Told to stop meanwhile (brokers may be away for
                        // long): what was acknowledged is committed unless
                        // the partition is lost.
                        changed = stop.changed() => {
                            if changed.is_ok() && *stop.borrow() == Stop::Gracefully {
                                commit(&pool, &config, &assignment, acknowledged, &mut committed).await?;
                            }
                            return Ok(());
                        }
                    }
                }
                if producer.client().fatal_error().is_some() {
                    self.producers.replace(generation)?;
                    commit(&pool, &config, &assignment, acknowledged, &mut committed).await?;
                    anyhow::bail!("the Kafka producer failed fatally: {error}");
                }
                next = acknowledged;
                caught_up = false;
                retry_at = Some(Instant::now() + wait);
            }

            let due = committed.is_none()
                || last_commit.elapsed() >= config.commit_interval
                || stopping != Stop::Running
                || (caught_up && in_flight.is_empty());
            if committed != Some(acknowledged) && due {
                if !commit(&pool, &config, &assignment, acknowledged, &mut committed).await? {
                    tracing::warn!(topic = %assignment.topic, partition = assignment.partition,
                        "mirror commit fenced: partition lost");
                    return Ok(());
                }
                last_commit = Instant::now();
            }
            if stopping == Stop::Gracefully && in_flight.is_empty() {
                return Ok(());
            }

            let read_now = stopping == Stop::Running
                && !caught_up
                && !queue_full
                && retry_at.is_none()
                && WINDOW - in_flight.len() >= READ_BATCH.min(WINDOW);
            let timer = match (grace_deadline, retry_at) {
                (Some(deadline), _) => deadline,
                (None, Some(at)) => at,
                (None, None) if read_now => Instant::now(),
                (None, None) if committed != Some(acknowledged) => {
                    Instant::now() + config.commit_interval
                }
                (None, None) => Instant::now() + Duration::from_secs(1),
            };
            let wake = {
                let oldest = async {
                    match in_flight.front_mut().filter(|_| refused.is_none()) {
                        Some(front) => delivery_result((&mut front.delivery).await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    changed = stop.changed() => Wake::StopChanged(changed.is_ok()),
                    result = oldest => Wake::Acknowledged(result),
                    _ = appended.past(next), if stopping == Stop::Running => Wake::Appended,
                    _ = tokio::time::sleep_until(timer) => Wake::Timer,
                }
            };
            match wake {
                Wake::Acknowledged(Ok(())) => {
                    let front = in_flight.pop_front().expect("awaited above");
                    acknowledged = front.offset + 1;
                    mirrored.inc();
                    failures = 0;
                    queue_full = false;
                }
                // Handled by the next turn, with what is still in flight.
                Wake::Acknowledged(Err(error)) => refused = Some(error),
                Wake::Appended => caught_up = false,
                Wake::StopChanged(true) => {
                    if *stop.borrow() == Stop::Gracefully {
                        grace_deadline = Some(Instant::now() + config.shutdown_grace);
                    }
                }
                // The member is gone: nobody may commit for it any more.
                Wake::StopChanged(false) => return Ok(()),
                Wake::Timer => {
                    if grace_deadline.is_some_and(|d| d <= Instant::now()) {
                        // Unacknowledged records stay uncommitted: the next
                        // owner produces them again.
                        return Ok(());
                    }
                    caught_up = false;
                }
            }
        }
    }
}

/// Counts a record the producer or the brokers refused, by librdkafka's code.
fn count_error(error: &KafkaError) {
    let class = error
        .rdkafka_error_code()
        .map(|code| format!("{code:?}"))
        .unwrap_or_else(|| "Other".to_string());
    super::metrics::mirror_metrics()
        .produce_errors
        .with_label_values(&[&class])
        .inc();
}

/// A fenced commit of the mirror's position; false when fenced.
async fn commit(
    pool: &deadpool_postgres::Pool,
    config: &ConsumerConfig,
    assignment: &crate::group::Assignment,
    offset: i64,
    committed: &mut Option<i64>,
) -> anyhow::Result<bool> {
    let client = pool.get().await?;
    let done = crate::group::commit(&client, &config.group, assignment, offset).await?;
    if done {
        *committed = Some(offset);
    }
    Ok(done)
}

fn delivery_result<E>(
    result: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> Result<(), KafkaError> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _message))) => Err(error),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Hands `record` to the producer, into the partition of its number, with
/// its key, CreateTime, headers and [`OFFSET_HEADER`]. An error means it was
/// not queued (a full queue, a record over `message.max.bytes`, a producer
/// that failed fatally).
fn produce(
    producer: &FutureProducer,
    kafka_topic: &str,
    record: &Record,
) -> Result<DeliveryFuture, KafkaError> {
    let payload = serde_json::to_vec(&record.payload).expect("JSON values serialise");
    let offset = record.offset.to_string();
    let mut headers = OwnedHeaders::new();
    if let Some(object) = record.headers.as_object() {
        for (name, value) in object {
            // The offset header is the mirror's own; a null has no value.
            if name == OFFSET_HEADER || value.is_null() {
                continue;
            }
            let text: std::borrow::Cow<str> = match value {
                serde_json::Value::String(text) => text.into(),
                other => other.to_string().into(),
            };
            headers = headers.insert(Header {
                key: name,
                value: Some(text.as_bytes()),
            });
        }
    }
    headers = headers.insert(Header {
        key: OFFSET_HEADER,
        value: Some(offset.as_bytes()),
    });
    let mut message = FutureRecord::to(kafka_topic)
        .partition(record.partition)
        .payload(&payload)
        .timestamp(record.created_at.timestamp_millis())
        .headers(headers);
    if let Some(key) = &record.key {
        message = message.key(key.as_bytes());
    }
    producer
        .send_result(message)
        .map_err(|(error, _message)| error)
}
