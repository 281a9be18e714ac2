//! The operator's view of groups (list, describe with lag), like
//! `kafka-consumer-groups`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    pub member_id: String,
    pub host: String,
    pub client_id: String,
    pub last_heartbeat: chrono::DateTime<chrono::Utc>,
    pub partitions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionInfo {
    pub topic: String,
    pub partition: i32,
    pub committed_offset: Option<i64>,
    pub log_end_offset: i64,
    /// Log end offset minus committed offset; absent without a commit.
    pub lag: Option<i64>,
    pub owner: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupDescription {
    pub group: String,
    /// `Stable` with live members, `Empty` without.
    pub state: &'static str,
    pub members: Vec<MemberInfo>,
    pub partitions: Vec<PartitionInfo>,
}

/// A group exists while it has partition rows or members (or, for a group
/// of Kafka clients, its coordinator's row).
const LIST_GROUPS: &str = "
    SELECT group_id FROM group_partitions UNION SELECT group_id FROM group_members
     UNION SELECT group_id FROM kafka_groups ORDER BY 1";

pub async fn list_groups(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query(LIST_GROUPS, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

const LIVE_MEMBERS: &str = "
    SELECT member_id, host, client_id, heartbeat_at FROM group_members
     WHERE group_id = $1 AND heartbeat_at + session_timeout > now() ORDER BY member_id";

const GROUP_PARTITIONS: &str = "
    SELECT p.topic, p.partition, p.committed_offset, h.log_end_offset, p.owner
      FROM group_partitions p JOIN partition_heads h USING (topic, partition)
     WHERE p.group_id = $1 ORDER BY p.topic, p.partition";

pub async fn describe(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
) -> anyhow::Result<Option<GroupDescription>> {
    let members = client.query(LIVE_MEMBERS, &[&group]).await?;
    let partitions = client.query(GROUP_PARTITIONS, &[&group]).await?;
    if members.is_empty() && partitions.is_empty() {
        return Ok(None);
    }
    let mut member_infos: Vec<MemberInfo> = members
        .iter()
        .map(|r| MemberInfo {
            member_id: r.get(0),
            host: r.get(1),
            client_id: r.get(2),
            last_heartbeat: r.get(3),
            partitions: Vec::new(),
        })
        .collect();
    let index: HashMap<String, usize> = member_infos
        .iter()
        .enumerate()
        .map(|(i, m)| (m.member_id.clone(), i))
        .collect();
    let mut partition_infos = Vec::new();
    for r in &partitions {
        let (topic, partition, committed, end, owner): (
            String,
            i32,
            Option<i64>,
            i64,
            Option<String>,
        ) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        // Only a live owner counts; a dead one's partition is unowned.
        let owner = owner.filter(|o| index.contains_key(o));
        if let Some(o) = &owner {
            member_infos[index[o]]
                .partitions
                .push(format!("{topic}:{partition}"));
        }
        partition_infos.push(PartitionInfo {
            lag: committed.map(|c| (end - c).max(0)),
            topic,
            partition,
            committed_offset: committed,
            log_end_offset: end,
            owner,
        });
    }
    Ok(Some(GroupDescription {
        group: group.to_string(),
        state: if member_infos.is_empty() {
            "Empty"
        } else {
            "Stable"
        },
        members: member_infos,
        partitions: partition_infos,
    }))
}

/// One partition's lag in one group.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PartitionLag {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub committed_offset: Option<i64>,
    /// Log end offset minus the committed offset; without a commit, all the
    /// partition retains (the group would start at the log start).
    pub lag: i64,
    /// How long the oldest record not yet consumed has been in the log (by
    /// `appended_at`); 0 when caught up.
    pub lag_seconds: f64,
}

const PARTITION_LAGS: &str = "
    SELECT p.group_id, p.topic, p.partition, p.committed_offset,
           greatest(h.log_end_offset - coalesce(p.committed_offset, h.log_start_offset), 0),
           coalesce((SELECT greatest(extract(epoch FROM now() - e.appended_at), 0)::float8
                       FROM event_log e
                      WHERE e.topic = p.topic AND e.partition = p.partition
                        AND e.\"offset\" >= greatest(coalesce(p.committed_offset, 0), h.log_start_offset)
                      ORDER BY e.\"offset\" LIMIT 1), 0)
      FROM group_partitions p JOIN partition_heads h USING (topic, partition)
     WHERE $1::text IS NULL OR p.group_id = $1
     ORDER BY p.group_id, p.topic, p.partition";

/// Members with a live session, per group.
const LIVE_MEMBER_COUNTS: &str = "
    SELECT group_id, count(*) FROM group_members
     WHERE heartbeat_at + session_timeout > now()
     GROUP BY group_id ORDER BY group_id";

/// Members with a live session, per group.
pub async fn live_member_counts(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(client
        .query(LIVE_MEMBER_COUNTS, &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The lag of every partition of every group.
pub async fn partition_lags(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<PartitionLag>> {
    partition_lags_of(client, None).await
}

/// The lag of every partition of `group` (None: of every group).
pub async fn partition_lags_of(
    client: &impl tokio_postgres::GenericClient,
    group: Option<&str>,
) -> anyhow::Result<Vec<PartitionLag>> {
    Ok(client
        .query(PARTITION_LAGS, &[&group])
        .await?
        .iter()
        .map(|r| PartitionLag {
            group: r.get(0),
            topic: r.get(1),
            partition: r.get(2),
            committed_offset: r.get(3),
            lag: r.get(4),
            lag_seconds: r.get(5),
        })
        .collect())
}

// ─── Resetting and deleting (kafka-consumer-groups --reset-offsets, --delete) ─

/// Where `--reset-offsets` moves a group's committed offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTo {
    Earliest,
    Latest,
    Offset(i64),
    /// The first offset created at or after this time (the log end if none).
    Datetime(DateTime<Utc>),
    /// The committed offset moved by this much (needs a commit).
    ShiftBy(i64),
}

/// One partition of a planned reset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedReset {
    pub topic: String,
    pub partition: i32,
    pub current_offset: Option<i64>,
    pub new_offset: i64,
}

/// Why a group cannot be changed now.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("Assignments can only be reset if the group '{group}' is inactive, but the current state is Stable ({members} live members): stop them first")]
    ActiveOnReset { group: String, members: i64 },
    #[error("Group '{group}' has {members} live members and cannot be deleted: stop them first")]
    ActiveOnDelete { group: String, members: i64 },
    #[error(
        "--shift-by needs a committed offset, and {topic}:{partition} has none in group '{group}'"
    )]
    NoCommitToShift {
        group: String,
        topic: String,
        partition: i32,
    },
    #[error("consumer group {0:?} does not exist")]
    UnknownGroup(String),
    #[error(
        "group '{group}' committed on {topic}:{partition} since the plan was made: plan again"
    )]
    ChangedSincePlan {
        group: String,
        topic: String,
        partition: i32,
    },
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

const LIVE_MEMBER_COUNT: &str = "
    SELECT count(*) FROM group_members
     WHERE group_id = $1 AND heartbeat_at + session_timeout > now()";

const COMMITTED: &str = "
    SELECT partition, committed_offset FROM group_partitions
     WHERE group_id = $1 AND topic = $2";

/// The new committed offset of every partition of `topic` (or of `only`)
/// for `to`, clamped into [log start, log end] as Kafka does; nothing
/// changes. A group that never read the topic has no current offsets.
pub async fn plan_reset(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
    topic: &str,
    only: Option<&[i32]>,
    to: &ResetTo,
) -> Result<Vec<PlannedReset>, AdminError> {
    use crate::log::ranges::{resolve_bound, Bound};
    let committed: HashMap<i32, Option<i64>> = client
        .query(COMMITTED, &[&group, &topic])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let heads = crate::log::partition_offsets(client, topic).await?;
    let count = heads.len() as i32;
    if let Some(&p) = only
        .unwrap_or(&[])
        .iter()
        .find(|p| !(0..count).contains(*p))
    {
        return Err(crate::log::LogError::UnknownPartition {
            topic: topic.to_string(),
            partition: p,
            partitions: count,
        }
        .into());
    }
    let mut planned = Vec::new();
    for offsets in heads {
        let p = offsets.partition;
        if only.is_some_and(|only| !only.contains(&p)) {
            continue;
        }
        let current = committed.get(&p).copied().flatten();
        let bound = match to {
            ResetTo::Earliest => Bound::Earliest,
            ResetTo::Latest => Bound::Latest,
            ResetTo::Offset(n) => Bound::Offset(*n),
            ResetTo::Datetime(t) => Bound::Time(*t),
            ResetTo::ShiftBy(n) => match current {
                Some(c) => Bound::Offset(c.saturating_add(*n)),
                None => {
                    return Err(AdminError::NoCommitToShift {
                        group: group.to_string(),
                        topic: topic.to_string(),
                        partition: p,
                    })
                }
            },
        };
        planned.push(PlannedReset {
            topic: topic.to_string(),
            partition: p,
            current_offset: current,
            new_offset: resolve_bound(client, topic, &offsets, &bound).await?,
        });
    }
    Ok(planned)
}

/// Locks the group's partition rows against claims and commits while a
/// reset is applied.
const LOCK_GROUP_PARTITIONS: &str = "
    SELECT 1 FROM group_partitions WHERE group_id = $1 FOR UPDATE";

/// And a Kafka group's coordinator row: a Kafka client's join waits for
/// the reset (or delete), or the reset sees its member.
const LOCK_KAFKA_GROUP: &str = "
    SELECT 1 FROM kafka_groups WHERE group_id = $1 FOR UPDATE";

const ENSURE_RESET_PARTITIONS: &str = "
    INSERT INTO group_partitions (group_id, topic, partition)
    SELECT $1, v.topic, v.partition FROM unnest($2::text[], $3::int4[]) AS v(topic, partition)
    ON CONFLICT DO NOTHING";

/// Sets the offsets, frees the partitions and moves their epochs: a member
/// that wakes up later cannot commit over the reset (fenced).
const APPLY_RESET: &str = "
    UPDATE group_partitions g
       SET committed_offset = v.new_offset, committed_at = now(), owner = NULL, epoch = nextval('group_partition_epochs')
      FROM unnest($2::text[], $3::int4[], $4::int8[]) AS v(topic, partition, new_offset)
     WHERE g.group_id = $1 AND g.topic = v.topic AND g.partition = v.partition";

/// The committed offsets of the planned partitions, read under the lock.
const PLANNED_CURRENT: &str = "
    SELECT v.topic, v.partition, g.committed_offset
      FROM unnest($2::text[], $3::int4[]) AS v(topic, partition)
      LEFT JOIN group_partitions g ON g.group_id = $1 AND g.topic = v.topic AND g.partition = v.partition";

/// Applies a planned reset, refusing while the group has live members or
/// when a planned partition's committed offset is no longer the one the
/// plan was made from (a commit in between would be overwritten unseen).
pub async fn execute_reset(
    client: &mut tokio_postgres::Client,
    group: &str,
    planned: &[PlannedReset],
) -> Result<(), AdminError> {
    let topics: Vec<&str> = planned.iter().map(|p| p.topic.as_str()).collect();
    let partitions: Vec<i32> = planned.iter().map(|p| p.partition).collect();
    let offsets: Vec<i64> = planned.iter().map(|p| p.new_offset).collect();
    let tx = client.transaction().await?;
    // The Kafka group's row first, as the Kafka coordinator takes them;
    // every planned partition's row exists before the lock, so that a
    // first commit cannot slip in unlocked (rolled back if refused).
    tx.execute(LOCK_KAFKA_GROUP, &[&group]).await?;
    tx.execute(ENSURE_RESET_PARTITIONS, &[&group, &topics, &partitions])
        .await?;
    tx.execute(LOCK_GROUP_PARTITIONS, &[&group]).await?;
    let members: i64 = tx.query_one(LIVE_MEMBER_COUNT, &[&group]).await?.get(0);
    if members > 0 {
        return Err(AdminError::ActiveOnReset {
            group: group.to_string(),
            members,
        });
    }
    for row in tx
        .query(PLANNED_CURRENT, &[&group, &topics, &partitions])
        .await?
    {
        let (topic, partition, now): (String, i32, Option<i64>) =
            (row.get(0), row.get(1), row.get(2));
        let planned_from = planned
            .iter()
            .find(|p| p.topic == topic && p.partition == partition)
            .and_then(|p| p.current_offset);
        if now != planned_from {
            return Err(AdminError::ChangedSincePlan {
                group: group.to_string(),
                topic,
                partition,
            });
        }
    }
    tx.execute(APPLY_RESET, &[&group, &topics, &partitions, &offsets])
        .await?;
    tx.commit().await?;
    Ok(())
}

const GROUP_TOPICS: &str = "
    SELECT DISTINCT topic FROM group_partitions WHERE group_id = $1 ORDER BY topic";

/// The topics a group has offsets for.
pub async fn group_topics(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
) -> Result<Vec<String>, AdminError> {
    Ok(client
        .query(GROUP_TOPICS, &[&group])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// True while the group has live members (Kafka's state Stable).
pub async fn has_live_members(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
) -> Result<i64, AdminError> {
    Ok(client.query_one(LIVE_MEMBER_COUNT, &[&group]).await?.get(0))
}

const DELETE_GROUP_PARTITIONS: &str = "DELETE FROM group_partitions WHERE group_id = $1";
const DELETE_GROUP_MEMBERS: &str = "DELETE FROM group_members WHERE group_id = $1";
const DELETE_KAFKA_GROUP: &str = "DELETE FROM kafka_groups WHERE group_id = $1";

/// Removes an inactive group's offsets and memberships (its delivery ledger
/// and dead letters stay). Returns the partitions it had.
pub async fn delete_group(
    client: &mut tokio_postgres::Client,
    group: &str,
) -> Result<u64, AdminError> {
    let tx = client.transaction().await?;
    // The Kafka group's row first, as the Kafka coordinator takes them.
    tx.execute(LOCK_KAFKA_GROUP, &[&group]).await?;
    tx.execute(LOCK_GROUP_PARTITIONS, &[&group]).await?;
    let members: i64 = tx.query_one(LIVE_MEMBER_COUNT, &[&group]).await?.get(0);
    if members > 0 {
        return Err(AdminError::ActiveOnDelete {
            group: group.to_string(),
            members,
        });
    }
    let partitions = tx.execute(DELETE_GROUP_PARTITIONS, &[&group]).await?;
    let member_rows = tx.execute(DELETE_GROUP_MEMBERS, &[&group]).await?;
    let kafka_group = tx.execute(DELETE_KAFKA_GROUP, &[&group]).await?;
    if partitions == 0 && member_rows == 0 && kafka_group == 0 {
        return Err(AdminError::UnknownGroup(group.to_string()));
    }
    tx.commit().await?;
    Ok(partitions)
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        (
            "group::admin::LIVE_MEMBER_COUNT",
            LIVE_MEMBER_COUNT.to_string(),
        ),
        ("group::admin::GROUP_TOPICS", GROUP_TOPICS.to_string()),
        ("group::admin::COMMITTED", COMMITTED.to_string()),
        (
            "group::admin::LOCK_GROUP_PARTITIONS",
            LOCK_GROUP_PARTITIONS.to_string(),
        ),
        (
            "group::admin::ENSURE_RESET_PARTITIONS",
            ENSURE_RESET_PARTITIONS.to_string(),
        ),
        ("group::admin::APPLY_RESET", APPLY_RESET.to_string()),
        ("group::admin::PLANNED_CURRENT", PLANNED_CURRENT.to_string()),
        (
            "group::admin::LOCK_KAFKA_GROUP",
            LOCK_KAFKA_GROUP.to_string(),
        ),
        (
            "group::admin::DELETE_GROUP_PARTITIONS",
            DELETE_GROUP_PARTITIONS.to_string(),
        ),
        (
            "group::admin::DELETE_GROUP_MEMBERS",
            DELETE_GROUP_MEMBERS.to_string(),
        ),
        (
            "group::admin::DELETE_KAFKA_GROUP",
            DELETE_KAFKA_GROUP.to_string(),
        ),
        ("group::admin::LIST_GROUPS", LIST_GROUPS.to_string()),
        ("group::admin::LIVE_MEMBERS", LIVE_MEMBERS.to_string()),
        (
            "group::admin::GROUP_PARTITIONS",
            GROUP_PARTITIONS.to_string(),
        ),
        ("group::admin::PARTITION_LAGS", PARTITION_LAGS.to_string()),
        (
            "group::admin::LIVE_MEMBER_COUNTS",
            LIVE_MEMBER_COUNTS.to_string(),
        ),
    ]
}
