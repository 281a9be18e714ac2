//! Reading a partition: records from an offset, in offset order, and the
//! offset for a time (Kafka's `offsetsForTimes`).

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::record::{Record, RECORD_COLUMNS};
use super::topics::offsets_of;
use super::LogError;

/// `$1` topic, `$2` partition, from offset `$3` (at least the log start),
/// at most `$4` records.
pub(crate) static READ_RECORDS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {RECORD_COLUMNS}
           FROM event_log e
          WHERE e.topic = $1 AND e.partition = $2
            AND e.\"offset\" >= greatest($3, (SELECT log_start_offset FROM partition_heads h
                                               WHERE h.topic = $1 AND h.partition = $2))
          ORDER BY e.\"offset\"
          LIMIT $4"
    )
});

/// Up to `max` records of a partition from offset `from` on, in offset order.
/// Offsets below the log start offset are skipped (they expired).
pub async fn read(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
    from: i64,
    max: i64,
) -> Result<Vec<Record>, LogError> {
    read_with(client, READ_RECORDS.as_str(), topic, partition, from, max).await
}

/// [`read`] with [`READ_RECORDS`] already prepared (hot loops prepare it
/// once per connection).
pub async fn read_with<S: tokio_postgres::ToStatement + Sync + Send + ?Sized>(
    client: &impl GenericClient,
    read_records: &S,
    topic: &str,
    partition: i32,
    from: i64,
    max: i64,
) -> Result<Vec<Record>, LogError> {
    let rows = client
        .query(read_records, &[&topic, &partition, &from, &max])
        .await?;
    Ok(rows.iter().map(Record::from_row).collect())
}

/// The first retained time index entry whose running maximum `created_at`
/// reaches `$3`.
const TIME_INDEX_ENTRY: &str = "
    SELECT base_offset FROM event_log_time_index
     WHERE topic = $1 AND partition = $2 AND max_created_at >= $3 AND last_offset >= $4
     ORDER BY max_created_at, base_offset LIMIT 1";

/// The scan from that entry: the first offset from `$3` created at or after `$4`.
const FIRST_OFFSET_AT: &str = "
    SELECT \"offset\" FROM event_log
     WHERE topic = $1 AND partition = $2 AND \"offset\" >= $3 AND created_at >= $4
     ORDER BY \"offset\" LIMIT 1";

/// Kafka's `offsetsForTimes`: the first offset (in offset order) whose
/// `created_at` is at or after `time`, or the log end offset when none is.
///
/// CreateTime is not monotonic, so the sparse time index keeps the running
/// maximum of `created_at` per batch: the first index entry whose running
/// maximum reaches `time` holds the answer, found by a short scan from there.
pub async fn offset_for_time(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
    time: DateTime<Utc>,
) -> Result<i64, LogError> {
    let offsets = offsets_of(client, topic, partition).await?;
    offset_for_time_within(client, topic, &offsets, time).await
}

/// [`offset_for_time`] for a partition whose offsets the caller has read.
pub async fn offset_for_time_within(
    client: &impl GenericClient,
    topic: &str,
    offsets: &super::PartitionOffsets,
    time: DateTime<Utc>,
) -> Result<i64, LogError> {
    let partition = offsets.partition;
    let row = client
        .query_opt(
            TIME_INDEX_ENTRY,
            &[&topic, &partition, &time, &offsets.log_start_offset],
        )
        .await?;
    let Some(row) = row else {
        return Ok(offsets.log_end_offset);
    };
    let scan_from: i64 = row.get::<_, i64>(0).max(offsets.log_start_offset);
    let found = client
        .query_opt(FIRST_OFFSET_AT, &[&topic, &partition, &scan_from, &time])
        .await?;
    Ok(found.map_or(offsets.log_end_offset, |r| r.get(0)))
}

/// The largest `created_at` of a partition's records from `$3` on: the
/// time index keeps a running maximum, so its last entry holds it.
const LARGEST_TIME: &str = "
    SELECT max_created_at FROM event_log_time_index
     WHERE topic = $1 AND partition = $2 AND last_offset >= $3
     ORDER BY base_offset DESC LIMIT 1";

/// The offset and time of the partition's record with the largest
/// `created_at` (the first such: Kafka's ListOffsets MAX_TIMESTAMP); none
/// for an empty partition, or when that record is past retention.
pub async fn largest_time(
    client: &impl GenericClient,
    topic: &str,
    offsets: &super::PartitionOffsets,
) -> Result<Option<(i64, DateTime<Utc>)>, LogError> {
    let row = client
        .query_opt(
            LARGEST_TIME,
            &[&topic, &offsets.partition, &offsets.log_start_offset],
        )
        .await?;
    let Some(largest) = row.map(|r| r.get::<_, DateTime<Utc>>(0)) else {
        return Ok(None);
    };
    let offset = offset_for_time_within(client, topic, offsets, largest).await?;
    Ok((offset < offsets.log_end_offset).then_some((offset, largest)))
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
/// `$1` topic, records whose key is one of `$2`, in key then offset order
/// (a scan of the topic: for small lookups such as the demo's).
static RECORDS_WITH_KEYS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {RECORD_COLUMNS} FROM event_log e
          WHERE e.topic = $1 AND e.key = ANY($2)
          ORDER BY e.key, e.partition, e.\"offset\""
    )
});

/// Every record of `topic` whose key is one of `keys`.
pub async fn records_with_keys(
    client: &impl GenericClient,
    topic: &str,
    keys: &[String],
) -> Result<Vec<Record>, LogError> {
    let rows = client
        .query(RECORDS_WITH_KEYS.as_str(), &[&topic, &keys])
        .await?;
    Ok(rows.iter().map(Record::from_row).collect())
}

/// `$1` topic, `$2` partition, offsets in [`$3`, `$4`), key `$5`: newest
/// first, at most `$6`.
static KEY_IN_RANGE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {RECORD_COLUMNS}
           FROM event_log e
          WHERE e.topic = $1 AND e.partition = $2 AND e.\"offset\" >= $3 AND e.\"offset\" < $4
            AND e.key = $5
          ORDER BY e.\"offset\" DESC
          LIMIT $6"
    )
});

/// The records of `key` among offsets [`from`, `to`) of a partition (the
/// one Kafka's partitioner gives the key), newest first, at most `max`.
/// The log has no index on keys (one would cost every append about as
/// much as the append itself): this reads the range's records by
/// position, so callers bound the range.
pub async fn records_of_key(
    client: &impl GenericClient,
    topic: &str,
    partition: i32,
    key: &str,
    (from, to): (i64, i64),
    max: i64,
) -> Result<Vec<Record>, LogError> {
    let rows = client
        .query(
            KEY_IN_RANGE.as_str(),
            &[&topic, &partition, &from, &to, &key, &max],
        )
        .await?;
    Ok(rows.iter().map(Record::from_row).collect())
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("log::read::KEY_IN_RANGE", KEY_IN_RANGE.to_string()),
        ("log::read::READ_RECORDS", READ_RECORDS.to_string()),
        (
            "log::read::RECORDS_WITH_KEYS",
            RECORDS_WITH_KEYS.to_string(),
        ),
        ("log::read::TIME_INDEX_ENTRY", TIME_INDEX_ENTRY.to_string()),
        ("log::read::FIRST_OFFSET_AT", FIRST_OFFSET_AT.to_string()),
        ("log::read::LARGEST_TIME", LARGEST_TIME.to_string()),
    ]
}
