//! Planning a batch, without Postgres: which partition each outbox row goes
//! to (Kafka's partitioner), which rows are parked (an unknown topic, a key
//! over the outbox's limit), and, once
//! the partition heads have been advanced, the offset of every record.
//!
//! Offsets are handed out in batch (outbox id) order, so events of one key
//! keep their insert order (docs/invariants.md, 4), and each partition's
//! offsets continue from its head with no gap (5).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};

use crate::log::partitioner::partition_for_key;

/// An outbox row as the relay sees it (the payload stays in Postgres).
#[derive(Debug, Clone)]
pub struct PendingRow {
    pub id: i64,
    pub topic: String,
    pub key: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl PendingRow {
    /// From a row of `drain::SELECT_BATCH` or of `SELECT_BATCH_NOW` (by
    /// name: the latter has more columns).
    pub(super) fn from_row(row: &tokio_postgres::Row) -> PendingRow {
        PendingRow {
            id: row.get("id"),
            topic: row.get("topic"),
            key: row.get("key"),
            created_at: row.get("created_at"),
        }
    }
}

/// What one batch appends to one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAppend {
    pub count: i64,
    pub max_created_at: DateTime<Utc>,
    /// From the advanced head: the first offset this batch hands out.
    pub base_offset: i64,
    /// The head's running maximum of created_at, for the time index.
    pub running_max_created_at: DateTime<Utc>,
}

/// A batch, planned.
#[derive(Debug)]
pub struct BatchPlan<'a> {
    /// Rows with a partition, in batch order.
    pub placed: Vec<(&'a PendingRow, i32)>,
    /// Rows that cannot be placed, and why.
    pub parked: Vec<(&'a PendingRow, Unplaceable)>,
    /// Per (topic, partition) the batch touches.
    pub per_partition: BTreeMap<(&'a str, i32), PartitionAppend>,
}

/// Why a row cannot go into the log: it is parked instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unplaceable {
    /// Its topic does not exist (or its partitions do not match its count).
    UnknownTopic,
    /// Its key is over [`crate::outbox::limits::KEY_MAX_BYTES`] (written
    /// before the outbox refused such rows): later stages index keys.
    KeyTooLong,
}

/// Places each row: keyed rows by Kafka's partitioner, keyless ones spread
/// deterministically by outbox id; rows of unknown topics, and rows whose
/// key is over the outbox's limit, are parked.
pub fn plan<'a>(rows: &'a [PendingRow], partition_counts: &HashMap<String, i32>) -> BatchPlan<'a> {
    let mut plan = BatchPlan {
        placed: Vec::with_capacity(rows.len()),
        parked: Vec::new(),
        per_partition: BTreeMap::new(),
    };
    for row in rows {
        let Some(&partitions) = partition_counts.get(&row.topic) else {
            plan.parked.push((row, Unplaceable::UnknownTopic));
            continue;
        };
        if row
            .key
            .as_ref()
            .is_some_and(|key| key.len() > crate::outbox::limits::KEY_MAX_BYTES)
        {
            plan.parked.push((row, Unplaceable::KeyTooLong));
            continue;
        }
        let partition = match &row.key {
            Some(key) => partition_for_key(key, partitions as u32) as i32,
            // Kafka spreads keyless records; the outbox id does so deterministically.
            None => row.id.rem_euclid(i64::from(partitions)) as i32,
        };
        plan.placed.push((row, partition));
        let append = plan
            .per_partition
            .entry((row.topic.as_str(), partition))
            .or_insert(PartitionAppend {
                count: 0,
                max_created_at: row.created_at,
                base_offset: 0,
                running_max_created_at: row.created_at,
            });
        append.count += 1;
        append.max_created_at = append.max_created_at.max(row.created_at);
    }
    plan
}

/// One advanced partition head, as `ADVANCE_HEADS` returns it.
#[derive(Debug, Clone)]
pub struct AdvancedHead {
    pub topic: String,
    pub partition: i32,
    /// The head's log end offset before this batch.
    pub base_offset: i64,
    pub running_max_created_at: DateTime<Utc>,
}

/// Per topic: its partition count and the heads found (as a batch's lock
/// read them, or as they will be once the batch before commits).
pub type TopicHeads = HashMap<String, (i32, Vec<AdvancedHead>)>;

/// The topics whose heads match their partition count, with the count:
/// the only ones records are placed in (a wrong count would move keys).
pub fn partition_counts(topics: &TopicHeads) -> HashMap<String, i32> {
    topics
        .iter()
        .filter(|(_, (count, heads))| heads.len() == *count as usize)
        .map(|(topic, (count, _))| (topic.clone(), *count))
        .collect()
}

/// The heads `plan` appends to, for [`BatchPlan::set_heads`]: each where
/// `topics` has it, with its running newest `created_at` taking in the
/// batch's.
pub fn touched_heads(topics: &TopicHeads, plan: &BatchPlan<'_>) -> Vec<AdvancedHead> {
    topics
        .values()
        .flat_map(|(_, heads)| heads)
        .filter_map(|h| {
            let append = plan.per_partition.get(&(h.topic.as_str(), h.partition))?;
            Some(AdvancedHead {
                running_max_created_at: h.running_max_created_at.max(append.max_created_at),
                ..h.clone()
            })
        })
        .collect()
}

/// `topics` as they will be once `plan` (its heads set) commits: each head
/// it appends to past its records. What the batch after it is planned on
/// when it is written ahead.
pub fn heads_after(topics: &TopicHeads, plan: &BatchPlan<'_>) -> TopicHeads {
    let mut after = topics.clone();
    for head in after.values_mut().flat_map(|(_, heads)| heads) {
        if let Some(append) = plan
            .per_partition
            .get(&(head.topic.as_str(), head.partition))
        {
            head.base_offset = append.base_offset + append.count;
            head.running_max_created_at = append.running_max_created_at;
        }
    }
    after
}

/// Columns of the records to append, in batch order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub ids: Vec<i64>,
    pub partitions: Vec<i32>,
    pub offsets: Vec<i64>,
}

impl BatchPlan<'_> {
    /// Takes the advanced heads; refuses unless there is exactly one for
    /// every partition the batch touches (nothing else may get offsets).
    pub fn set_heads(&mut self, heads: &[AdvancedHead]) -> anyhow::Result<()> {
        anyhow::ensure!(
            heads.len() == self.per_partition.len(),
            "a partition head is missing"
        );
        for head in heads {
            let (_, append) = self
                .per_partition
                .iter_mut()
                .find(|(key, _)| key.0 == head.topic && key.1 == head.partition)
                .ok_or_else(|| anyhow::anyhow!("a partition head the batch did not ask for"))?;
            append.base_offset = head.base_offset;
            append.running_max_created_at = head.running_max_created_at;
        }
        Ok(())
    }

    /// Each partition appended to, with its new log end offset.
    pub fn log_ends(&self) -> Vec<(&str, i32, i64)> {
        self.per_partition
            .iter()
            .map(|((topic, partition), append)| {
                (*topic, *partition, append.base_offset + append.count)
            })
            .collect()
    }

    /// Every placed row's offset: consecutive from its partition's head, in
    /// batch order.
    pub fn records(&self) -> Records {
        let mut next: HashMap<(&str, i32), i64> = self
            .per_partition
            .iter()
            .map(|(k, v)| (*k, v.base_offset))
            .collect();
        let mut records = Records::default();
        for (row, partition) in &self.placed {
            let offset = next
                .get_mut(&(row.topic.as_str(), *partition))
                .expect("every placed row is counted in per_partition");
            records.ids.push(row.id);
            records.partitions.push(*partition);
            records.offsets.push(*offset);
            *offset += 1;
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, topic: &str, key: Option<&str>) -> PendingRow {
        PendingRow {
            id,
            topic: topic.into(),
            key: key.map(str::to_string),
            created_at: DateTime::from_timestamp(1_700_000_000 + id, 0).unwrap(),
        }
    }

    #[test]
    fn a_key_at_the_limit_is_placed_one_byte_over_is_parked() {
        let at = "é".repeat(512); // 1,024 bytes
        let over = format!("{at}k");
        let rows = vec![row(1, "t", Some(&at)), row(2, "t", Some(&over))];
        let plan = plan(&rows, &HashMap::from([("t".to_string(), 8)]));
        assert_eq!(plan.placed.len(), 1);
        assert_eq!(plan.placed[0].0.id, 1);
        assert_eq!(plan.parked.len(), 1);
        assert_eq!(
            (plan.parked[0].0.id, plan.parked[0].1),
            (2, Unplaceable::KeyTooLong)
        );
    }

    #[test]
    fn places_by_key_parks_unknown_topics_and_numbers_in_batch_order() {
        let rows = vec![
            row(1, "t", Some("hejsan")),
            row(2, "nope", Some("x")),
            row(3, "t", Some("hejsan")),
            row(4, "t", None),
            row(5, "t", Some("23456")),
            row(6, "t", Some(&"k".repeat(1025))),
        ];
        let counts = HashMap::from([("t".to_string(), 17)]);
        let mut plan = plan(&rows, &counts);
        assert_eq!(
            plan.parked
                .iter()
                .map(|(r, why)| (r.id, *why))
                .collect::<Vec<_>>(),
            vec![(2, Unplaceable::UnknownTopic), (6, Unplaceable::KeyTooLong)]
        );
        // librdkafka's vectors: "hejsan" → 5, "23456" → 9; keyless id 4 → 4 % 17.
        let placed: Vec<(i64, i32)> = plan.placed.iter().map(|(r, p)| (r.id, *p)).collect();
        assert_eq!(placed, vec![(1, 5), (3, 5), (4, 4), (5, 9)]);
        assert_eq!(plan.per_partition[&("t", 5)].count, 2);
        assert_eq!(
            plan.per_partition[&("t", 5)].max_created_at,
            rows[2].created_at
        );

        let head = |partition, base_offset| AdvancedHead {
            topic: "t".into(),
            partition,
            base_offset,
            running_max_created_at: rows[0].created_at,
        };
        assert!(
            plan.set_heads(&[head(5, 10), head(4, 0)]).is_err(),
            "a missing head is refused"
        );
        assert!(plan
            .set_heads(&[head(5, 10), head(4, 0), head(3, 0)])
            .is_err());
        plan.set_heads(&[head(5, 10), head(4, 0), head(9, 7)])
            .unwrap();
        assert_eq!(
            plan.records(),
            Records {
                ids: vec![1, 3, 4, 5],
                partitions: vec![5, 5, 4, 9],
                offsets: vec![10, 11, 0, 7],
            }
        );
    }
}
