//! The event log: topics × partitions × offsets, read and administered like
//! a Kafka topic. This is the one read/admin API over the log that the CLI,
//! the consumers, replay and any future front end call.
//!
//! * [`topics`]: list, describe, create, alter; the partition heads (log
//!   start and log end offsets).
//! * [`read`]: records of a partition from an offset, and Kafka's
//!   `offsetsForTimes`.
//! * [`record`]: the record as stored, with the one column list every
//!   statement reading records uses.
//! * [`storage`]: day partitions ahead of time and retention.
//! * [`partitioner`]: Kafka's murmur2 partitioner.
//! * [`notify`]: the relay's "appended" notification, for readers that wait
//!   for new records instead of polling.
//!
//! Records are appended only by the relay ([`crate::relay`]), one fenced
//! writer, which makes offsets gapless (docs/invariants.md, 5).
//!
//! Errors are typed ([`LogError`]) so a caller can map them: an HTTP
//! handler to 404/409/422, a Kafka front end to Kafka's error codes.

mod listen;
pub mod notify;
pub mod partitioner;
pub mod ranges;
pub mod read;
pub mod record;
pub mod storage;
pub mod topics;

pub use read::{offset_for_time, read};
pub use record::Record;
pub use topics::{
    create_topic, list_topics, offsets_of, partition_offsets, topic, PartitionOffsets, Topic,
};

/// What the log API refuses, and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        topic: String,
        partition: i32,
        partitions: i32,
    },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("invalid topic {0:?}: names are 1 to 249 of A-Z a-z 0-9 . _ -")]
    InvalidTopicName(String),
    #[error("invalid retention: more than 0 and at most 36500 days")]
    InvalidRetention,
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}
