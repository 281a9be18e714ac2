//! Fetch: each asked partition's records from the fetch offset, as one
//! record batch (magic v2, CRC-32C, uncompressed) with the record's key,
//! its payload's JSON as the value, its headers and its CreateTime.
//!
//! * Only what the relay committed is in the log, with gapless offsets, so
//!   the high watermark and the last stable offset are the log end offset.
//! * A batch starts at the fetch offset, so a fetch never lands inside
//!   one; the first batch of an answer is returned whole even past
//!   `max_bytes` (as Kafka does, so a large record cannot stall a client).
//! * Too little to answer (`min_bytes`): a long poll until `max_wait_ms`,
//!   woken by the relay's append notification, never a sleeping loop.
//! * An offset below the log start or past the log end:
//!   OFFSET_OUT_OF_RANGE (the client resets by its `auto.offset.reset`).
//! * Fetch sessions (KIP-227) are declined (session id 0): every request
//!   names its partitions.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{BrokerId, FetchRequest, FetchResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression, Record as KafkaRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use super::{Front, NONE, OFFSET_OUT_OF_RANGE, UNKNOWN_TOPIC_OR_PARTITION};
use crate::log::notify::PartitionAppends;

/// A partition's records from `$3` up to (not including) `$5`, the log
/// end the answer reports as its high watermark (a batch the relay commits
/// meanwhile waits for the next fetch), at most `$4`, as the wire wants
/// them: the payload as its JSON text, rendered by Postgres (parsing it
/// here only to serialise it again cost half the read).
const READ_FOR_FETCH: &str = "
    SELECT e.\"offset\", e.key, e.created_at, e.headers, e.payload::text
      FROM event_log e
     WHERE e.topic = $1 AND e.partition = $2 AND e.\"offset\" >= $3 AND e.\"offset\" < $5
     ORDER BY e.\"offset\"
     LIMIT $4";

/// A record as a fetch reads it.
pub(super) struct FetchedRecord {
    pub offset: i64,
    pub key: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub headers: serde_json::Value,
    /// The payload's JSON text.
    pub payload: String,
}

/// The longest long poll, whatever a client asks.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Records read from a partition per fetch, at most.
const MAX_RECORDS_PER_PARTITION: i64 = 5_000;

/// The most record bytes one answer carries, whatever a client asks
/// (Kafka's broker-side `fetch.max.bytes` is 55 MiB).
const MAX_FETCH_BYTES: usize = 55 * 1024 * 1024;

/// Partitions read side by side for one fetch (the role's pool size).
const READS_AT_ONCE: usize = super::POOL_SIZE;

/// What a record adds to a batch besides its key, value and headers
/// (lengths, deltas, attributes), for the size budget.
const RECORD_OVERHEAD: usize = 24;

/// What to read of one asked partition: its byte budget, from, up to.
type PartitionRead = (usize, i64, i64);

impl Front {
    pub(super) async fn fetch(
        &self,
        request: &FetchRequest,
        _version: i16,
    ) -> anyhow::Result<FetchResponse> {
        let wait =
            Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0)).min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
        let (response, bytes, settled) = self.read_fetch(request).await?;
        // `min_bytes` 0: answer at once, as Kafka does.
        if bytes >= min_bytes || settled || wait.is_zero() {
            return Ok(response);
        }
        // A long poll: woken when one of the asked partitions gets records
        // past its fetch offset (appends elsewhere do not wake it). Only
        // partitions that exist are watched (a client cannot grow the
        // table of watched partitions), and the read is repeated once
        // watched, so an append between the first read and the watch is
        // not missed.
        let mut watched: Vec<(PartitionAppends, i64)> = request
            .topics
            .iter()
            .zip(&response.responses)
            .flat_map(|(asked, answered)| {
                asked
                    .partitions
                    .iter()
                    .zip(&answered.partitions)
                    .filter(|(_, data)| data.error_code == NONE)
                    .map(|(p, _)| {
                        let appends = self.appends.subscribe(asked.topic.0.as_str(), p.partition);
                        (appends, p.fetch_offset)
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        loop {
            let (response, bytes, settled) = self.read_fetch(request).await?;
            if bytes >= min_bytes || settled || tokio::time::Instant::now() >= deadline {
                return Ok(response);
            }
            tokio::select! {
                _ = any_past(&mut watched) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// One pass over the asked partitions: the answer, its record bytes,
    /// and whether an error answers it now (an unknown partition, an
    /// offset out of range: waiting would not change it). The partitions
    /// with records to read are read side by side, each on a connection
    /// of the pool; the answer then takes them in the asked order within
    /// `max_bytes`.
    async fn read_fetch(
        &self,
        request: &FetchRequest,
    ) -> anyhow::Result<(FetchResponse, usize, bool)> {
        let mut settled = false;
        // Per asked partition: its answer so far, and what to read for it
        // (its byte budget, from, up to). A partition asked twice is read
        // once.
        let mut answers: Vec<(usize, PartitionData, Option<PartitionRead>)> = Vec::new();
        let mut asked_before = std::collections::HashSet::new();
        {
            let client = self.pool.get().await?;
            for (t, topic) in request.topics.iter().enumerate() {
                let name = topic.topic.0.as_str();
                let heads = super::heads(&client, name).await?;
                for asked in &topic.partitions {
                    let mut data = PartitionData::default();
                    data.partition_index = asked.partition;
                    data.preferred_read_replica = BrokerId(-1);
                    let Some(offsets) = heads.get(&asked.partition) else {
                        data.error_code = UNKNOWN_TOPIC_OR_PARTITION;
                        data.high_watermark = -1;
                        data.last_stable_offset = -1;
                        data.log_start_offset = -1;
                        settled = true;
                        answers.push((t, data, None));
                        continue;
                    };
                    data.high_watermark = offsets.log_end_offset;
                    data.last_stable_offset = offsets.log_end_offset;
                    data.log_start_offset = offsets.log_start_offset;
                    let from = asked.fetch_offset;
                    if from < offsets.log_start_offset || from > offsets.log_end_offset {
                        data.error_code = OFFSET_OUT_OF_RANGE;
                        settled = true;
                        answers.push((t, data, None));
                        continue;
                    }
                    data.error_code = NONE;
                    let budget = usize::try_from(asked.partition_max_bytes)
                        .unwrap_or(0)
                        .min(MAX_FETCH_BYTES);
                    let first_time = asked_before.insert((t, asked.partition));
                    let read = (from < offsets.log_end_offset && first_time).then_some((
                        budget,
                        from,
                        offsets.log_end_offset,
                    ));
                    answers.push((t, data, read));
                }
            }
        }
        // Read a few partitions ahead of the one being encoded, in order;
        // once the budget is spent no further read starts.
        let mut budget = usize::try_from(request.max_bytes)
            .unwrap_or(0)
            .min(MAX_FETCH_BYTES);
        let reads: Vec<_> = answers
            .iter()
            .map(|(t, data, read)| (*t, data.partition_index, *read))
            .collect();
        let mut reads =
            futures_util::stream::iter(reads.into_iter().map(|(t, partition, read)| async move {
                match read {
                    None => anyhow::Ok(Vec::new()),
                    Some((budget, from, end)) => {
                        let topic = request.topics[t].topic.0.as_str();
                        let wanted = (budget / 100).clamp(1, MAX_RECORDS_PER_PARTITION as usize);
                        self.read_records(topic, partition, from, end, wanted as i64)
                            .await
                    }
                }
            }))
            .buffered(READS_AT_ONCE);
        let mut total = 0usize;
        let mut topics: Vec<FetchableTopicResponse> = request
            .topics
            .iter()
            .map(|topic| {
                let mut answered = FetchableTopicResponse::default();
                answered.topic = topic.topic.clone();
                answered
            })
            .collect();
        // The reads come back in the answers' order (one per answer, empty
        // where there is nothing to read); once the budget is spent the
        // rest is not waited for.
        let mut spent = false;
        for (t, mut data, read) in answers {
            if !spent {
                let records = match reads.next().await {
                    Some(records) => records?,
                    None => Vec::new(),
                };
                if let Some((partition_budget, _, _)) = read {
                    // The first record of the answer goes whatever its size.
                    let limit = if total == 0 {
                        partition_budget.min(budget).max(1)
                    } else {
                        partition_budget.min(budget)
                    };
                    let batch = encode_batch(&records, limit)?;
                    total += batch.len();
                    budget = budget.saturating_sub(batch.len());
                    if !batch.is_empty() {
                        data.records = Some(batch);
                    }
                }
                spent = budget == 0 && total > 0;
            }
            topics[t].partitions.push(data);
        }
        let mut response = FetchResponse::default();
        response.error_code = NONE;
        response.session_id = 0;
        response.responses = topics;
        Ok((response, total, settled))
    }

    /// Up to `max` records of a partition from `from` up to `end`, on a
    /// connection of the pool (the statement prepared once per connection).
    async fn read_records(
        &self,
        topic: &str,
        partition: i32,
        from: i64,
        end: i64,
        max: i64,
    ) -> anyhow::Result<Vec<FetchedRecord>> {
        let client = self.pool.get().await?;
        let read = client.prepare_cached(READ_FOR_FETCH).await?;
        Ok(client
            .query(&read, &[&topic, &partition, &from, &max, &end])
            .await?
            .into_iter()
            .map(|row| FetchedRecord {
                offset: row.get(0),
                key: row.get(1),
                created_at: row.get(2),
                headers: row.get(3),
                payload: row.get(4),
            })
            .collect())
    }
}

/// Returns once one of `watched` has records past its offset (never, for
/// none).
async fn any_past(watched: &mut [(PartitionAppends, i64)]) {
    if watched.is_empty() {
        return std::future::pending().await;
    }
    let waits = watched
        .iter_mut()
        .map(|(appends, next)| Box::pin(appends.past(*next)));
    futures_util::future::select_all(waits).await;
}

/// `records` (consecutive, from the fetch offset) as one batch, cut to
/// about `limit` bytes but never below one record; empty for none.
pub(super) fn encode_batch(records: &[FetchedRecord], limit: usize) -> anyhow::Result<Bytes> {
    let mut kafka_records = Vec::with_capacity(records.len());
    let mut size = 0usize;
    for record in records {
        let converted = convert(record);
        let record_size = RECORD_OVERHEAD
            + converted.key.as_ref().map_or(0, Bytes::len)
            + converted.value.as_ref().map_or(0, Bytes::len)
            + converted
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len) + 4)
                .sum::<usize>();
        if !kafka_records.is_empty() && size + record_size > limit {
            break;
        }
        size += record_size;
        kafka_records.push(converted);
    }
    if kafka_records.is_empty() {
        return Ok(Bytes::new());
    }
    let mut buf = BytesMut::with_capacity(size + 64);
    RecordBatchEncoder::encode(
        &mut buf,
        &kafka_records,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )?;
    Ok(buf.freeze())
}

/// A log record as a Kafka record: the key, the payload's JSON text, the
/// headers (text values as their bytes, other JSON values as their JSON
/// text, null as a null value), CreateTime.
fn convert(record: &FetchedRecord) -> KafkaRecord {
    let mut headers = IndexMap::new();
    if let Some(object) = record.headers.as_object() {
        for (name, value) in object {
            let value = match value {
                serde_json::Value::Null => None,
                serde_json::Value::String(text) => Some(Bytes::copy_from_slice(text.as_bytes())),
                other => Some(Bytes::from(other.to_string())),
            };
            headers.insert(StrBytes::from_string(name.clone()), value);
        }
    }
    KafkaRecord {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: record.offset,
        sequence: -1,
        timestamp: record.created_at.timestamp_millis(),
        key: record
            .key
            .as_ref()
            .map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Some(Bytes::copy_from_slice(record.payload.as_bytes())),
        headers,
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![(
        "kafka_api::fetch::READ_FOR_FETCH",
        READ_FOR_FETCH.to_string(),
    )]
}
