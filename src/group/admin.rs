//! The operator's view of groups (list, describe with lag), like
//! `kafka-consumer-groups`.

use std::collections::HashMap;

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

/// A group exists while it has partition rows or members.
const LIST_GROUPS: &str =
    "SELECT group_id FROM group_partitions UNION SELECT group_id FROM group_members ORDER BY 1";

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub committed_offset: Option<i64>,
    /// Log end offset minus the committed offset; without a commit, all the
    /// partition retains (the group would start at the log start).
    pub lag: i64,
}

const PARTITION_LAGS: &str = "
    SELECT p.group_id, p.topic, p.partition, p.committed_offset,
           greatest(h.log_end_offset - coalesce(p.committed_offset, h.log_start_offset), 0)
      FROM group_partitions p JOIN partition_heads h USING (topic, partition)
     ORDER BY p.group_id, p.topic, p.partition";

/// The lag of every partition of every group.
pub async fn partition_lags(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<PartitionLag>> {
    Ok(client
        .query(PARTITION_LAGS, &[])
        .await?
        .iter()
        .map(|r| PartitionLag {
            group: r.get(0),
            topic: r.get(1),
            partition: r.get(2),
            committed_offset: r.get(3),
            lag: r.get(4),
        })
        .collect())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("group::admin::LIST_GROUPS", LIST_GROUPS.to_string()),
        ("group::admin::LIVE_MEMBERS", LIVE_MEMBERS.to_string()),
        (
            "group::admin::GROUP_PARTITIONS",
            GROUP_PARTITIONS.to_string(),
        ),
        ("group::admin::PARTITION_LAGS", PARTITION_LAGS.to_string()),
    ]
}
