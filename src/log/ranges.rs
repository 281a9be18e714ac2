//! Offsets for bounds given as Kafka's tools give them (the log start or
//! end, an offset, a time), resolved against one reading of the partition
//! heads, so "the log end" is the end captured when the plan was made.
//! Replays and `groups reset-offsets` both plan with it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::GenericClient;

use super::read::offset_for_time_within;
use super::topics::{partition_offsets, PartitionOffsets};
use super::LogError;

/// One end of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The log start offset (the first retained record).
    Earliest,
    /// The log end offset, as captured by the plan.
    Latest,
    /// This offset, clamped into [log start, log end].
    Offset(i64),
    /// The first offset whose `created_at` is at or after this time (Kafka's
    /// offsetsForTimes); the log end when there is none.
    Time(DateTime<Utc>),
}

/// Bounds for every partition alike, or per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bounds {
    All(Bound),
    /// Listed partitions only; for a `to` bound, unlisted ones use `Latest`.
    PerPartition(BTreeMap<i32, Bound>),
}

/// One partition's planned range `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionRange {
    pub partition: i32,
    pub from: i64,
    pub to: i64,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
}

impl PartitionRange {
    pub fn count(&self) -> i64 {
        (self.to - self.from).max(0)
    }
}

/// Resolves one bound for one partition, clamped into the retained log.
pub async fn resolve_bound(
    client: &impl GenericClient,
    topic: &str,
    offsets: &PartitionOffsets,
    bound: &Bound,
) -> Result<i64, LogError> {
    let (start, end) = (offsets.log_start_offset, offsets.log_end_offset);
    Ok(match bound {
        Bound::Earliest => start,
        Bound::Latest => end,
        Bound::Offset(offset) => (*offset).clamp(start, end),
        Bound::Time(time) => offset_for_time_within(client, topic, offsets, *time).await?,
    })
}

/// The ranges `[from, to)` of `topic`'s partitions (all, or `only`), from
/// one reading of the heads. A partition whose `from` is past its `to` has
/// an empty range.
pub async fn plan(
    client: &impl GenericClient,
    topic: &str,
    only: Option<&[i32]>,
    from: &Bounds,
    to: &Bounds,
) -> Result<Vec<PartitionRange>, LogError> {
    let heads = partition_offsets(client, topic).await?;
    let count = heads.len() as i32;
    for &p in only.unwrap_or(&[]) {
        if !(0..count).contains(&p) {
            return Err(LogError::UnknownPartition {
                topic: topic.to_string(),
                partition: p,
                partitions: count,
            });
        }
    }
    for bounds in [from, to] {
        if let Bounds::PerPartition(listed) = bounds {
            if let Some(&p) = listed.keys().find(|p| !(0..count).contains(*p)) {
                return Err(LogError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: p,
                    partitions: count,
                });
            }
        }
    }
    let mut ranges = Vec::new();
    for offsets in &heads {
        let p = offsets.partition;
        if only.is_some_and(|only| !only.contains(&p)) {
            continue;
        }
        let from_bound = match from {
            Bounds::All(bound) => bound,
            Bounds::PerPartition(listed) => match listed.get(&p) {
                Some(bound) => bound,
                None => continue,
            },
        };
        let to_bound = match to {
            Bounds::All(bound) => bound,
            Bounds::PerPartition(listed) => listed.get(&p).unwrap_or(&Bound::Latest),
        };
        let start = resolve_bound(client, topic, offsets, from_bound).await?;
        let end = resolve_bound(client, topic, offsets, to_bound).await?;
        ranges.push(PartitionRange {
            partition: p,
            from: start,
            to: end.max(start),
            log_start_offset: offsets.log_start_offset,
            log_end_offset: offsets.log_end_offset,
        });
    }
    Ok(ranges)
}
