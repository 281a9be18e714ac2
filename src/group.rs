//! Consumer-group membership: who is alive, who owns which partition, and
//! fenced offset commits. Coordinated only through Postgres.
//!
//! * A member heartbeats its row in `group_members`; it is dead once
//!   `heartbeat_at + session_timeout` has passed.
//! * Each (group, topic, partition) row in `group_partitions` has an owner
//!   and an epoch that bumps on every change of owner. A partition whose
//!   owner is dead (or absent) is free.
//! * Rebalancing is cooperative and incremental: on each heartbeat a member
//!   gives up partitions above its fair share (`ceil(P / members)`), claims
//!   free ones up to that share, and the fullest member hands one over when
//!   another holds fewer than `floor(P / members)`. Only partitions that must
//!   move are released.
//! * A commit succeeds only while `owner = me AND epoch = my epoch`
//!   (invariant 6): a member that lost a partition cannot commit for it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

/// What a group with no committed offset for a partition starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OffsetReset {
    /// The log start offset: nothing already in the log is missed.
    Earliest,
    /// The log end offset: only records appended from now on.
    Latest,
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    pub member_id: String,
    pub host: String,
    pub client_id: String,
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub offset_reset: OffsetReset,
}

impl GroupConfig {
    pub fn new(group_id: &str, topics: &[&str]) -> GroupConfig {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        GroupConfig {
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            member_id: format!(
                "{group_id}-{host}-{}-{:06x}",
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            ),
            host,
            client_id: "outbox-relay".into(),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            offset_reset: OffsetReset::Earliest,
        }
    }
}

/// A partition this member owns, at the epoch it was granted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Assignment {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
}

/// What one heartbeat decided.
#[derive(Debug, Default)]
pub struct Rebalance {
    /// Every partition this member owns now (after claims).
    pub owned: Vec<Assignment>,
    /// Partitions this member should hand over: stop processing, commit,
    /// then call [`Membership::release`].
    pub to_release: Vec<Assignment>,
}

const HEARTBEAT: &str = "
    UPDATE group_members SET heartbeat_at = now() WHERE group_id = $1 AND member_id = $2";

const JOIN: &str = "
    INSERT INTO group_members (group_id, member_id, host, client_id, session_timeout)
    VALUES ($1, $2, $3, $4, make_interval(secs => $5))
    ON CONFLICT (group_id, member_id) DO UPDATE SET heartbeat_at = now()";

/// Rows for every partition of the subscribed topics, so ownership can be
/// claimed row by row.
const ENSURE_PARTITIONS: &str = "
    INSERT INTO group_partitions (group_id, topic, partition)
    SELECT $1, h.topic, h.partition FROM partition_heads h WHERE h.topic = ANY ($2)
    ON CONFLICT DO NOTHING";

const LIVE_MEMBERS: &str = "
    SELECT member_id FROM group_members
     WHERE group_id = $1 AND heartbeat_at + session_timeout > now()
     ORDER BY member_id";

const PARTITION_OWNERS: &str = "
    SELECT topic, partition, owner, epoch FROM group_partitions
     WHERE group_id = $1 AND topic = ANY ($2) ORDER BY topic, partition";

/// Compare-and-set on the owner seen a moment ago (free or dead).
const CLAIM: &str = "
    UPDATE group_partitions SET owner = $4, epoch = epoch + 1
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner IS NOT DISTINCT FROM $5 AND epoch = $6
    RETURNING epoch";

const RELEASE: &str = "
    UPDATE group_partitions SET owner = NULL
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND epoch = $5";

const COMMIT: &str = "
    UPDATE group_partitions SET committed_offset = $6, committed_at = now()
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND epoch = $5";

const LEAVE: &str = "DELETE FROM group_members WHERE group_id = $1 AND member_id = $2";

/// Members dead for a while are forgotten (their partitions are free already).
const FORGET_DEAD: &str = "
    DELETE FROM group_members
     WHERE group_id = $1 AND heartbeat_at + session_timeout * 3 < now()";

/// One member's view of its group. Connections come from a small pool, so
/// one that dropped is replaced by the next heartbeat.
pub struct Membership {
    pub config: GroupConfig,
    pool: deadpool_postgres::Pool,
}

impl Membership {
    /// Joins the group (registers the member; creates partition rows).
    pub async fn join(database_url: &str, config: GroupConfig) -> anyhow::Result<Membership> {
        let pool = crate::db::pool(database_url, 2)?;
        let membership = Membership { config, pool };
        membership.register().await?;
        membership
            .client()
            .await?
            .execute(
                ENSURE_PARTITIONS,
                &[&membership.config.group_id, &membership.config.topics],
            )
            .await
            .context("creating the group's partition rows")?;
        Ok(membership)
    }

    async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .context("no database connection for the group")
    }

    async fn register(&self) -> anyhow::Result<()> {
        let c = &self.config;
        self.client()
            .await?
            .execute(
                JOIN,
                &[
                    &c.group_id,
                    &c.member_id,
                    &c.host,
                    &c.client_id,
                    &c.session_timeout.as_secs_f64(),
                ],
            )
            .await
            .context("joining the consumer group")?;
        Ok(())
    }

    /// Heartbeats and rebalances once: returns what this member owns and
    /// what it should hand over.
    pub async fn heartbeat(&self) -> anyhow::Result<Rebalance> {
        let c = &self.config;
        let client = self.client().await?;
        if client
            .execute(HEARTBEAT, &[&c.group_id, &c.member_id])
            .await?
            == 0
        {
            // We were forgotten (a long pause): join again; our old epochs are fenced.
            self.register().await?;
        }
        // Picks up partitions of topics created since we joined.
        client
            .execute(ENSURE_PARTITIONS, &[&c.group_id, &c.topics])
            .await?;
        client.execute(FORGET_DEAD, &[&c.group_id]).await?;
        let live: Vec<String> = client
            .query(LIVE_MEMBERS, &[&c.group_id])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows = client
            .query(PARTITION_OWNERS, &[&c.group_id, &c.topics])
            .await?;
        let partitions: Vec<(String, i32, Option<String>, i64)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();

        let total = partitions.len();
        let members = live.len().max(1);
        let ceil = total.div_ceil(members);
        let floor = total / members;
        let mut held: BTreeMap<&str, usize> = live.iter().map(|m| (m.as_str(), 0)).collect();
        for (_, _, owner, _) in &partitions {
            if let Some(count) = owner.as_deref().and_then(|o| held.get_mut(o)) {
                *count += 1;
            }
        }
        let mine: Vec<Assignment> = partitions
            .iter()
            .filter(|p| p.2.as_deref() == Some(c.member_id.as_str()))
            .map(|p| Assignment {
                topic: p.0.clone(),
                partition: p.1,
                epoch: p.3,
            })
            .collect();
        let free: Vec<&(String, i32, Option<String>, i64)> = partitions
            .iter()
            .filter(|p| p.2.as_ref().is_none_or(|o| !held.contains_key(o.as_str())))
            .collect();

        let mut rebalance = Rebalance::default();
        if mine.len() > ceil {
            // Above the fair share (members joined): hand over the extras.
            rebalance.owned = mine[..ceil].to_vec();
            rebalance.to_release = mine[ceil..].to_vec();
            return Ok(rebalance);
        }
        let starving = held.values().any(|&n| n < floor);
        let fullest = held
            .iter()
            .max_by_key(|(m, n)| (**n, std::cmp::Reverse(**m)))
            .map(|(m, _)| *m);
        if free.is_empty()
            && starving
            && mine.len() > floor
            && fullest == Some(c.member_id.as_str())
        {
            // Someone holds fewer than floor(P/M) and nothing is free: the
            // fullest member (one at a time) hands one partition over.
            let (keep, give) = mine.split_at(mine.len() - 1);
            rebalance.owned = keep.to_vec();
            rebalance.to_release = give.to_vec();
            return Ok(rebalance);
        }
        let mut owned = mine;
        for (topic, partition, owner, epoch) in
            free.into_iter().take(ceil.saturating_sub(owned.len()))
        {
            let claimed = client
                .query_opt(
                    CLAIM,
                    &[&c.group_id, topic, partition, &c.member_id, owner, epoch],
                )
                .await?;
            if let Some(row) = claimed {
                tracing::debug!(group = %c.group_id, topic, partition, member = %c.member_id, "claimed partition");
                owned.push(Assignment {
                    topic: topic.clone(),
                    partition: *partition,
                    epoch: row.get(0),
                });
            }
        }
        rebalance.owned = owned;
        Ok(rebalance)
    }

    /// Commits `offset` (the next offset to read) for `assignment`. Returns
    /// false when fenced: the member no longer owns the partition at that epoch.
    pub async fn commit(&self, assignment: &Assignment, offset: i64) -> anyhow::Result<bool> {
        commit(&**self.client().await?, &self.config, assignment, offset).await
    }

    /// Hands a partition back (after its last commit).
    pub async fn release(&self, assignment: &Assignment) -> anyhow::Result<()> {
        let c = &self.config;
        self.client()
            .await?
            .execute(
                RELEASE,
                &[
                    &c.group_id,
                    &assignment.topic,
                    &assignment.partition,
                    &c.member_id,
                    &assignment.epoch,
                ],
            )
            .await?;
        tracing::debug!(group = %c.group_id, topic = %assignment.topic, partition = assignment.partition, "released partition");
        Ok(())
    }

    /// Leaves the group: others see our partitions free at once.
    pub async fn leave(&self) -> anyhow::Result<()> {
        let c = &self.config;
        self.client()
            .await?
            .execute(LEAVE, &[&c.group_id, &c.member_id])
            .await?;
        Ok(())
    }
}

/// A fenced commit over any client.
pub async fn commit(
    client: &impl tokio_postgres::GenericClient,
    config: &GroupConfig,
    assignment: &Assignment,
    offset: i64,
) -> anyhow::Result<bool> {
    let updated = client
        .execute(
            COMMIT,
            &[
                &config.group_id,
                &assignment.topic,
                &assignment.partition,
                &config.member_id,
                &assignment.epoch,
                &offset,
            ],
        )
        .await?;
    Ok(updated == 1)
}

/// Where a partition's consumption starts: the committed offset, clamped
/// into the retained log, or the reset policy's end when nothing is committed.
pub async fn start_offset(
    client: &impl tokio_postgres::GenericClient,
    group_id: &str,
    topic: &str,
    partition: i32,
    reset: OffsetReset,
) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "SELECT p.committed_offset, h.log_start_offset, h.log_end_offset
               FROM partition_heads h
               LEFT JOIN group_partitions p
                 ON p.group_id = $1 AND p.topic = h.topic AND p.partition = h.partition
              WHERE h.topic = $2 AND h.partition = $3",
            &[&group_id, &topic, &partition],
        )
        .await?;
    let (committed, start, end): (Option<i64>, i64, i64) = (row.get(0), row.get(1), row.get(2));
    Ok(match (committed, reset) {
        (Some(offset), _) => offset.clamp(start, end),
        (None, OffsetReset::Earliest) => start,
        (None, OffsetReset::Latest) => end,
    })
}

// ─── Describing groups (the operator's view) ────────────────────────────────

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

pub async fn list_groups(
    client: &impl tokio_postgres::GenericClient,
) -> anyhow::Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT group_id FROM group_partitions UNION SELECT group_id FROM group_members ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

pub async fn describe(
    client: &impl tokio_postgres::GenericClient,
    group: &str,
) -> anyhow::Result<Option<GroupDescription>> {
    let members = client
        .query(
            "SELECT member_id, host, client_id, heartbeat_at FROM group_members
              WHERE group_id = $1 AND heartbeat_at + session_timeout > now() ORDER BY member_id",
            &[&group],
        )
        .await?;
    let partitions = client
        .query(
            "SELECT p.topic, p.partition, p.committed_offset, h.log_end_offset, p.owner
               FROM group_partitions p JOIN partition_heads h USING (topic, partition)
              WHERE p.group_id = $1 ORDER BY p.topic, p.partition",
            &[&group],
        )
        .await?;
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
