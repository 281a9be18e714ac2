//! Membership: join, heartbeat (and rebalance through [`super::assign`]),
//! claim and release partitions, fenced offset commits.

use anyhow::Context;

use super::assign::{self, PartitionOwner};
use super::{Assignment, GroupConfig, OffsetReset, Rebalance};
use crate::db::Db;

/// Only this incarnation's heartbeat counts (`$3`).
const HEARTBEAT: &str = "
    UPDATE group_members SET heartbeat_at = now()
     WHERE group_id = $1 AND member_id = $2 AND incarnation = $3";

/// Registers (or re-registers) the member as incarnation `$6`; nothing in
/// a group of Kafka clients (a group is native or Kafka-protocol).
const JOIN: &str = "
    INSERT INTO group_members (group_id, member_id, host, client_id, session_timeout, incarnation)
    SELECT $1, $2, $3, $4, make_interval(secs => $5), $6
     WHERE NOT EXISTS (SELECT 1 FROM kafka_groups WHERE group_id = $1)
    ON CONFLICT (group_id, member_id) DO UPDATE
       SET heartbeat_at = now(), host = $3, client_id = $4,
           session_timeout = make_interval(secs => $5), incarnation = $6";

/// Held while a group's kind is decided, by a native member's join and by
/// a Kafka group's creation (`kafka_api`): two first joins under one id,
/// one of each kind, cannot both succeed.
pub(crate) const GROUP_KIND_LOCK: &str = "
    SELECT pg_advisory_xact_lock(hashtextextended('outbox-relay group kind ' || $1, 0))";

/// A static member's new incarnation takes over what its previous one owned,
/// at new epochs: the previous one (dead, or still running) is fenced.
const RECLAIM: &str = "
    UPDATE group_partitions SET epoch = nextval('group_partition_epochs')
     WHERE group_id = $1 AND owner = $2";

/// Whether another incarnation of this member has registered since.
const REPLACED: &str = "
    SELECT incarnation FROM group_members WHERE group_id = $1 AND member_id = $2";

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
    UPDATE group_partitions SET owner = $4, epoch = nextval('group_partition_epochs')
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner IS NOT DISTINCT FROM $5 AND epoch = $6
    RETURNING epoch";

const RELEASE: &str = "
    UPDATE group_partitions SET owner = NULL
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND epoch = $5";

const COMMIT: &str = "
    UPDATE group_partitions SET committed_offset = $6, committed_at = now()
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND epoch = $5";

const LEAVE: &str = "DELETE FROM group_members WHERE group_id = $1 AND member_id = $2";

/// Locks the partition's row while `$4` owns it at epoch `$5`, so a write
/// made in the same transaction cannot race a takeover.
const HOLD_OWNERSHIP: &str = "
    SELECT 1 FROM group_partitions
     WHERE group_id = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND epoch = $5
       FOR SHARE";

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
    pub async fn join(db: impl Into<Db>, config: GroupConfig) -> anyhow::Result<Membership> {
        let bounds = config.session_bounds();
        let pool = db.into().bounded_pool("group membership", 2, bounds)?;
        Membership::join_with(pool, config).await
    }

    /// Joins the group on a pool of the caller's.
    pub async fn join_with(
        pool: deadpool_postgres::Pool,
        config: GroupConfig,
    ) -> anyhow::Result<Membership> {
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        register_in(&*tx, &self.config).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Heartbeats and rebalances once: returns what this member owns and
    /// what it should hand over.
    ///
    /// One transaction: the heartbeat locks this incarnation's member row
    /// until the plan is read and the claims are made, so a newer
    /// incarnation of a static member (whose join waits for that lock) can
    /// never have its epochs read and adopted by the older one.
    pub async fn heartbeat(&self) -> anyhow::Result<Rebalance> {
        let c = &self.config;
        let mut connection = self.client().await?;
        let client = connection.transaction().await?;
        // Its regular statements are prepared once per connection: one round
        // trip each, no parse or plan, every heartbeat of every member.
        if client
            .execute(
                &client.prepare_cached(HEARTBEAT).await?,
                &[&c.group_id, &c.member_id, &c.incarnation],
            )
            .await?
            == 0
        {
            let current: Option<String> = client
                .query_opt(REPLACED, &[&c.group_id, &c.member_id])
                .await?
                .map(|r| r.get(0));
            if current.is_some_and(|other| other != c.incarnation) {
                // Kafka's FENCED_INSTANCE_ID: another process runs as us.
                return Err(GroupError::Replaced {
                    member: c.member_id.clone(),
                }
                .into());
            }
            // We were forgotten (a long pause): join again; our old epochs are fenced.
            register_in(&*client, c).await?;
        }
        // Picks up partitions of topics created since we joined.
        client
            .execute(
                &client.prepare_cached(ENSURE_PARTITIONS).await?,
                &[&c.group_id, &c.topics],
            )
            .await?;
        client
            .execute(&client.prepare_cached(FORGET_DEAD).await?, &[&c.group_id])
            .await?;
        let live: Vec<String> = client
            .query(&client.prepare_cached(LIVE_MEMBERS).await?, &[&c.group_id])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let partitions: Vec<PartitionOwner> = client
            .query(
                &client.prepare_cached(PARTITION_OWNERS).await?,
                &[&c.group_id, &c.topics],
            )
            .await?
            .iter()
            .map(|r| PartitionOwner {
                topic: r.get(0),
                partition: r.get(1),
                owner: r.get(2),
                epoch: r.get(3),
            })
            .collect();
        let plan = assign::plan(&live, &partitions, &c.member_id);
        let mut owned = plan.keep;
        for free in plan.claim {
            let claimed = client
                .query_opt(
                    CLAIM,
                    &[
                        &c.group_id,
                        &free.topic,
                        &free.partition,
                        &c.member_id,
                        &free.owner,
                        &free.epoch,
                    ],
                )
                .await?;
            if let Some(row) = claimed {
                tracing::debug!(group = %c.group_id, topic = %free.topic, partition = free.partition, member = %c.member_id, "claimed partition");
                owned.push(Assignment {
                    topic: free.topic,
                    partition: free.partition,
                    epoch: row.get(0),
                });
            }
        }
        client.commit().await?;
        Ok(Rebalance {
            owned,
            to_release: plan.release,
        })
    }

    /// Commits `offset` (the next offset to read) for `assignment`. Returns
    /// false when fenced: the member no longer owns the partition at that epoch.
    pub async fn commit(&self, assignment: &Assignment, offset: i64) -> anyhow::Result<bool> {
        let client = self.client().await?;
        commit(&client, &self.config, assignment, offset).await
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

/// A fenced commit on a pooled connection, its statement prepared once per
/// connection (one round trip, no parse or plan per commit).
pub async fn commit(
    client: &deadpool_postgres::ClientWrapper,
    config: &GroupConfig,
    assignment: &Assignment,
    offset: i64,
) -> anyhow::Result<bool> {
    let statement = client.prepare_cached(COMMIT).await?;
    let updated = client
        .execute(
            &statement,
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

/// A partition's committed offset (NULL without a commit) and its log
/// start and end offsets.
const START_OFFSETS: &str = "
    SELECT p.committed_offset, h.log_start_offset, h.log_end_offset
      FROM partition_heads h
      LEFT JOIN group_partitions p
        ON p.group_id = $1 AND p.topic = h.topic AND p.partition = h.partition
     WHERE h.topic = $2 AND h.partition = $3";

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
        .query_one(START_OFFSETS, &[&group_id, &topic, &partition])
        .await?;
    let (committed, start, end): (Option<i64>, i64, i64) = (row.get(0), row.get(1), row.get(2));
    Ok(match (committed, reset) {
        (Some(offset), _) => offset.clamp(start, end),
        (None, OffsetReset::Earliest) => start,
        (None, OffsetReset::Latest) => end,
    })
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
/// Inside a transaction: true while `lease` still holds its partition, and
/// then until the transaction ends (the row is locked against a takeover).
/// Writes a handler makes for the group are fenced with it, like commits.
pub async fn hold_ownership(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &super::partition::Lease,
) -> anyhow::Result<bool> {
    Ok(tx
        .query_opt(
            HOLD_OWNERSHIP,
            &[
                &lease.group_id,
                &lease.topic,
                &lease.partition,
                &lease.member_id,
                &lease.epoch,
            ],
        )
        .await?
        .is_some())
}

/// Registers the member as this incarnation and, for a static member, takes
/// over what its previous incarnation owned at new epochs. Run in the
/// caller's transaction: the two happen together or not at all.
async fn register_in(
    client: &impl tokio_postgres::GenericClient,
    c: &GroupConfig,
) -> anyhow::Result<()> {
    client.execute(GROUP_KIND_LOCK, &[&c.group_id]).await?;
    let joined = client
        .execute(
            JOIN,
            &[
                &c.group_id,
                &c.member_id,
                &c.host,
                &c.client_id,
                &c.session_timeout.as_secs_f64(),
                &c.incarnation,
            ],
        )
        .await
        .context("joining the consumer group")?;
    if joined == 0 {
        tracing::warn!(group = %c.group_id, member = %c.member_id,
            "refused to join: the group is a group of Kafka clients (kafka-api), not a native group");
        anyhow::bail!(
            "group {} is a group of Kafka clients (kafka-api); a native member cannot join it: use another group id",
            c.group_id
        );
    }
    let reclaimed = client
        .execute(RECLAIM, &[&c.group_id, &c.member_id])
        .await?;
    if reclaimed > 0 {
        tracing::info!(group = %c.group_id, member = %c.member_id, partitions = reclaimed,
            "took back the partitions of this member's previous incarnation");
    }
    Ok(())
}

/// Why a member must stop.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("another process joined the group as member {member:?} (the same instance id); this one stops")]
    Replaced { member: String },
}

pub(crate) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("group::membership::RECLAIM", RECLAIM.to_string()),
        ("group::membership::REPLACED", REPLACED.to_string()),
        (
            "group::membership::HOLD_OWNERSHIP",
            HOLD_OWNERSHIP.to_string(),
        ),
        ("group::membership::HEARTBEAT", HEARTBEAT.to_string()),
        ("group::membership::JOIN", JOIN.to_string()),
        (
            "group::membership::GROUP_KIND_LOCK",
            GROUP_KIND_LOCK.to_string(),
        ),
        (
            "group::membership::ENSURE_PARTITIONS",
            ENSURE_PARTITIONS.to_string(),
        ),
        ("group::membership::LIVE_MEMBERS", LIVE_MEMBERS.to_string()),
        (
            "group::membership::PARTITION_OWNERS",
            PARTITION_OWNERS.to_string(),
        ),
        ("group::membership::CLAIM", CLAIM.to_string()),
        ("group::membership::RELEASE", RELEASE.to_string()),
        ("group::membership::COMMIT", COMMIT.to_string()),
        ("group::membership::LEAVE", LEAVE.to_string()),
        ("group::membership::FORGET_DEAD", FORGET_DEAD.to_string()),
        (
            "group::membership::START_OFFSETS",
            START_OFFSETS.to_string(),
        ),
    ]
}
