//! A Kafka-protocol group in Postgres: loaded under its row lock, changed
//! by the coordinator (`coordinator`), written back where it changed. The
//! members are rows of `group_members` (with their Kafka side in
//! `kafka_group_members`), the offsets rows of `group_partitions`, as a
//! native group's: operators see both kinds alike.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio_postgres::Transaction;

use super::coordinator::{Group, Head, Member, State};

/// The group row, locked for the transaction, with the database's time
/// once the lock is held (every session and deadline is on that clock; the
/// transaction's start could be a lock wait earlier).
const LOCK_GROUP: &str = "
    SELECT state, generation, protocol_type, protocol_name, leader, rebalance_deadline,
           initial_rebalance, clock_timestamp()
      FROM kafka_groups WHERE group_id = $1 FOR UPDATE";

const CREATE_GROUP: &str = "
    INSERT INTO kafka_groups (group_id) VALUES ($1) ON CONFLICT DO NOTHING";

/// A group with members or offsets but no Kafka row is a native group.
const IS_NATIVE: &str = "
    SELECT EXISTS (SELECT 1 FROM group_members WHERE group_id = $1)
        OR EXISTS (SELECT 1 FROM group_partitions WHERE group_id = $1)";

const MEMBERS: &str = "
    SELECT k.member_id, k.group_instance_id, m.client_id, m.host,
           (extract(epoch FROM m.session_timeout) * 1000)::int4,
           (extract(epoch FROM k.rebalance_timeout) * 1000)::int4,
           k.protocol_names, k.protocol_metadata, k.joined_generation, k.assignment, m.heartbeat_at
      FROM kafka_group_members k JOIN group_members m USING (group_id, member_id)
     WHERE k.group_id = $1 ORDER BY m.joined_at, k.member_id";

const SAVE_GROUP: &str = "
    UPDATE kafka_groups
       SET state = $2, generation = $3, protocol_type = $4, protocol_name = $5, leader = $6,
           rebalance_deadline = $7, initial_rebalance = $8
     WHERE group_id = $1";

/// A member whose only change is its session's renewal (a heartbeat, a
/// poll of a waiting join): one small update of a HOT column.
const RENEW_SESSION: &str = "
    UPDATE group_members SET heartbeat_at = $3 WHERE group_id = $1 AND member_id = $2";

/// Their Kafka rows go with them (ON DELETE CASCADE).
const REMOVE_MEMBERS: &str = "
    DELETE FROM group_members WHERE group_id = $1 AND member_id = ANY ($2)";

const SAVE_MEMBER: &str = "
    INSERT INTO group_members (group_id, member_id, host, client_id, session_timeout, heartbeat_at)
    VALUES ($1, $2, $3, $4, make_interval(secs => $5::float8 / 1000), $6)
    ON CONFLICT (group_id, member_id) DO UPDATE
       SET host = $3, client_id = $4, session_timeout = make_interval(secs => $5::float8 / 1000),
           heartbeat_at = $6";

const SAVE_KAFKA_MEMBER: &str = "
    INSERT INTO kafka_group_members (group_id, member_id, group_instance_id, rebalance_timeout,
                                     protocol_names, protocol_metadata, joined_generation, assignment)
    VALUES ($1, $2, $3, make_interval(secs => $4::float8 / 1000), $5, $6, $7, $8)
    ON CONFLICT (group_id, member_id) DO UPDATE
       SET group_instance_id = $3, rebalance_timeout = make_interval(secs => $4::float8 / 1000),
           protocol_names = $5, protocol_metadata = $6, joined_generation = $7, assignment = $8";

/// Which member the last assignment gave each partition to (what
/// `groups describe` shows): cleared, then set from the assignments.
const CLEAR_OWNERS: &str = "
    UPDATE group_partitions SET owner = NULL WHERE group_id = $1 AND owner IS NOT NULL";

const SET_OWNERS: &str = "
    INSERT INTO group_partitions (group_id, topic, partition, owner)
    SELECT $1, v.topic, v.partition, v.owner
      FROM unnest($2::text[], $3::int4[], $4::text[]) AS v(topic, partition, owner)
      JOIN partition_heads h USING (topic, partition)
    ON CONFLICT (group_id, topic, partition) DO UPDATE SET owner = excluded.owner";

/// A group, as loaded, and what it was (to write back only the changes).
pub(super) struct Locked {
    pub group: Group,
    pub now: DateTime<Utc>,
    loaded: (Head, Vec<Member>),
}

/// Why a group cannot be served to Kafka clients.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotKafka {
    /// A native group of that id exists.
    Native,
    /// No such group (and it was not to be created).
    Unknown,
}

/// Locks `group_id`'s row (creating the group if `create` and it is not a
/// native group).
pub(super) async fn lock(
    tx: &Transaction<'_>,
    group_id: &str,
    create: bool,
) -> anyhow::Result<Result<Locked, NotKafka>> {
    let mut row = tx.query_opt(LOCK_GROUP, &[&group_id]).await?;
    if row.is_none() && create {
        // Deciding the group's kind: not at the same time as a native
        // member's first join (which takes the same lock).
        tx.execute(crate::group::membership::GROUP_KIND_LOCK, &[&group_id])
            .await?;
        row = tx.query_opt(LOCK_GROUP, &[&group_id]).await?;
    }
    if row.is_none() {
        if tx
            .query_one(IS_NATIVE, &[&group_id])
            .await?
            .get::<_, bool>(0)
        {
            return Ok(Err(NotKafka::Native));
        }
        if !create {
            return Ok(Err(NotKafka::Unknown));
        }
        tx.execute(CREATE_GROUP, &[&group_id]).await?;
        row = tx.query_opt(LOCK_GROUP, &[&group_id]).await?;
    }
    let Some(row) = row else {
        return Ok(Err(NotKafka::Unknown));
    };
    let head = Head {
        state: State::parse(row.get(0)),
        generation: row.get(1),
        protocol_type: row.get(2),
        protocol_name: row.get(3),
        leader: row.get(4),
        rebalance_deadline: row.get(5),
        initial_rebalance: row.get(6),
    };
    let now: DateTime<Utc> = row.get(7);
    let members = tx
        .query(MEMBERS, &[&group_id])
        .await?
        .iter()
        .map(|r| {
            let names: Vec<String> = r.get(6);
            let metadata: Vec<Vec<u8>> = r.get(7);
            Member {
                id: r.get(0),
                instance_id: r.get(1),
                client_id: r.get(2),
                host: r.get(3),
                session_timeout_ms: r.get(4),
                rebalance_timeout_ms: r.get(5),
                protocols: names
                    .into_iter()
                    .zip(metadata.into_iter().map(Bytes::from))
                    .collect(),
                joined_generation: r.get(8),
                assignment: r.get::<_, Option<Vec<u8>>>(9).map(Bytes::from),
                heartbeat_at: r.get(10),
            }
        })
        .collect::<Vec<_>>();
    let group = Group {
        id: group_id.to_string(),
        head: head.clone(),
        members: members.clone(),
    };
    Ok(Ok(Locked {
        group,
        now,
        loaded: (head, members),
    }))
}

impl Locked {
    /// Writes back what changed: the group row, members gone, members new
    /// or changed, and who owns which partition after a new assignment.
    /// True if more than sessions were renewed (what a waiting request
    /// could be waiting for).
    pub(super) async fn save(self, tx: &Transaction<'_>) -> anyhow::Result<bool> {
        let Locked {
            group,
            loaded: (head, before),
            ..
        } = self;
        let id = group.id.as_str();
        let mut changed = group.head != head;
        if group.head != head {
            let h = &group.head;
            tx.execute(
                SAVE_GROUP,
                &[
                    &id,
                    &h.state.as_str(),
                    &h.generation,
                    &h.protocol_type,
                    &h.protocol_name,
                    &h.leader,
                    &h.rebalance_deadline,
                    &h.initial_rebalance,
                ],
            )
            .await?;
        }
        let gone: Vec<&str> = before
            .iter()
            .filter(|m| !group.members.iter().any(|now| now.id == m.id))
            .map(|m| m.id.as_str())
            .collect();
        if !gone.is_empty() {
            changed = true;
            tx.execute(REMOVE_MEMBERS, &[&id, &gone]).await?;
        }
        let mut assigned = false;
        for member in &group.members {
            let previous = before.iter().find(|m| m.id == member.id);
            if previous == Some(member) {
                continue;
            }
            if let Some(previous) = previous {
                let renewed_only = Member {
                    heartbeat_at: member.heartbeat_at,
                    ..previous.clone()
                } == *member;
                if renewed_only {
                    tx.execute(RENEW_SESSION, &[&id, &member.id, &member.heartbeat_at])
                        .await?;
                    continue;
                }
            }
            changed = true;
            assigned |= member.assignment.is_some()
                && previous.is_none_or(|p| p.assignment != member.assignment);
            save_member(tx, id, member).await?;
        }
        if assigned {
            save_owners(tx, &group).await?;
        }
        Ok(changed)
    }
}

async fn save_member(tx: &Transaction<'_>, group_id: &str, m: &Member) -> anyhow::Result<()> {
    tx.execute(
        SAVE_MEMBER,
        &[
            &group_id,
            &m.id,
            &m.host,
            &m.client_id,
            &f64::from(m.session_timeout_ms),
            &m.heartbeat_at,
        ],
    )
    .await?;
    let names: Vec<&str> = m.protocols.iter().map(|(n, _)| n.as_str()).collect();
    let metadata: Vec<&[u8]> = m.protocols.iter().map(|(_, b)| b.as_ref()).collect();
    tx.execute(
        SAVE_KAFKA_MEMBER,
        &[
            &group_id,
            &m.id,
            &m.instance_id,
            &f64::from(m.rebalance_timeout_ms),
            &names,
            &metadata,
            &m.joined_generation,
            &m.assignment.as_deref(),
        ],
    )
    .await?;
    Ok(())
}

/// The partitions each member's assignment names, when it is in Kafka's
/// consumer protocol (what every Kafka consumer's assignors write); other
/// protocols are left opaque.
async fn save_owners(tx: &Transaction<'_>, group: &Group) -> anyhow::Result<()> {
    if group.head.protocol_type.as_deref() != Some("consumer") {
        return Ok(());
    }
    let (mut topics, mut partitions, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    for member in &group.members {
        let assigned = member.assignment.as_deref().and_then(assigned_partitions);
        for (topic, partition) in assigned.unwrap_or_default() {
            // A partition twice (one statement may not update a row twice):
            // the first member named keeps it.
            if !topics
                .iter()
                .zip(&partitions)
                .any(|(t, p)| *t == topic && *p == partition)
            {
                topics.push(topic);
                partitions.push(partition);
                owners.push(member.id.as_str());
            }
        }
    }
    tx.execute(CLEAR_OWNERS, &[&group.id]).await?;
    tx.execute(SET_OWNERS, &[&group.id, &topics, &partitions, &owners])
        .await?;
    Ok(())
}

/// The (topic, partition) pairs of a consumer-protocol assignment (a
/// version, then an int32-counted array of a string topic and an
/// int32-counted array of partitions; user data after it is not read).
/// Read by hand, bounded by the bytes: they come from a client. None if
/// they are not one.
fn assigned_partitions(mut bytes: &[u8]) -> Option<Vec<(String, i32)>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = bytes.split_at_checked(n)?;
        *bytes = rest;
        Some(head)
    }
    fn int32(bytes: &mut &[u8]) -> Option<i32> {
        Some(i32::from_be_bytes(take(bytes, 4)?.try_into().ok()?))
    }
    take(&mut bytes, 2)?;
    let mut assigned = Vec::new();
    for _ in 0..int32(&mut bytes)?.max(0) {
        let length = i16::from_be_bytes(take(&mut bytes, 2)?.try_into().ok()?);
        let topic = std::str::from_utf8(take(&mut bytes, usize::try_from(length).ok()?)?).ok()?;
        for _ in 0..int32(&mut bytes)?.max(0) {
            assigned.push((topic.to_string(), int32(&mut bytes)?));
        }
    }
    Some(assigned)
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    [
        ("kafka_api::group_store::LOCK_GROUP", LOCK_GROUP),
        ("kafka_api::group_store::CREATE_GROUP", CREATE_GROUP),
        ("kafka_api::group_store::IS_NATIVE", IS_NATIVE),
        ("kafka_api::group_store::MEMBERS", MEMBERS),
        ("kafka_api::group_store::SAVE_GROUP", SAVE_GROUP),
        ("kafka_api::group_store::REMOVE_MEMBERS", REMOVE_MEMBERS),
        ("kafka_api::group_store::RENEW_SESSION", RENEW_SESSION),
        ("kafka_api::group_store::SAVE_MEMBER", SAVE_MEMBER),
        (
            "kafka_api::group_store::SAVE_KAFKA_MEMBER",
            SAVE_KAFKA_MEMBER,
        ),
        ("kafka_api::group_store::CLEAR_OWNERS", CLEAR_OWNERS),
        ("kafka_api::group_store::SET_OWNERS", SET_OWNERS),
    ]
    .into_iter()
    .map(|(name, sql)| (name, sql.to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::assigned_partitions;

    #[test]
    fn a_consumer_protocol_assignment_is_read_and_anything_else_is_not() {
        let mut bytes = vec![0, 1, 0, 0, 0, 1, 0, 5];
        bytes.extend_from_slice(b"order");
        bytes.extend_from_slice(&[0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            assigned_partitions(&bytes),
            Some(vec![("order".to_string(), 3), ("order".to_string(), 7)])
        );
        // A count past the bytes, a truncated topic: not an assignment.
        assert_eq!(assigned_partitions(&[0, 1, 0x7f, 0xff, 0xff, 0xff]), None);
        assert_eq!(assigned_partitions(&[0, 1, 0, 0, 0, 1, 0, 9, b'o']), None);
        assert_eq!(assigned_partitions(&[]), None);
    }
}
