//! The relay lease: one row of `relay_state` per relay deployment holds the
//! holder, an epoch and an expiry. Whoever takes the lease bumps the epoch;
//! every batch locks the row *at its epoch*, so a leader that lost the lease
//! can no longer append (docs/invariants.md, 5). All SQL on `relay_state`
//! lives in the relay.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::batch::{AdvancedHead, TopicHeads};

/// The `relay_state` row a relay uses unless configured otherwise (the
/// schema creates it).
pub const DEFAULT_RELAY_NAME: &str = "default";

/// `host-pid-random`: unique per process, readable in `relay_state`.
pub fn instance_id() -> String {
    let host = crate::host_name();
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Takes the lease when it is free, ours, or expired; records our backend
/// so a later standby can end it should this process freeze mid-batch.
pub(super) const ACQUIRE_LEASE: &str = "
    UPDATE relay_state
       SET holder = $2, epoch = epoch + 1, lease_expires_at = clock_timestamp() + make_interval(secs => $3),
           holder_pid = pg_backend_pid()
     WHERE relay = $1 AND (holder IS NULL OR holder = $2 OR lease_expires_at < clock_timestamp())
    RETURNING epoch, relayed_snapshot::text, draining_snapshot::text, cursor_id";

/// Ends the backends of a leader whose lease expired while it still holds
/// the lease row (a frozen process keeps its transaction and its locks):
/// the one the lease records, and whichever holds the row's lock (the
/// leader's second connection, when a batch written ahead runs there; found
/// by the transaction id the lock left in the row's `xmax`). Only our own
/// relay sessions in this database, never ourselves.
pub(super) const END_EXPIRED_HOLDER: &str = "
    SELECT a.pid, pg_terminate_backend(a.pid)
      FROM relay_state r JOIN pg_stat_activity a
        ON a.pid = r.holder_pid
        OR a.pid IN (SELECT l.pid FROM pg_locks l
                      WHERE l.locktype = 'transactionid' AND l.transactionid = r.xmax AND l.granted)
     WHERE r.relay = $1 AND r.lease_expires_at < clock_timestamp()
       AND a.datname = current_database() AND a.application_name = 'outbox-relay'
       AND a.pid <> pg_backend_pid()";

/// Every relay session: the default plan cache (the snapshot-dependent
/// statements are sent unnamed, so they are planned with their snapshots;
/// the others get generic plans once Postgres finds them as good, saving
/// a planning per execution), a name that `END_EXPIRED_HOLDER` recognises, and bounds derived from the
/// lease: a transaction left idle longer than `$1` (a frozen holder) is
/// ended by Postgres, and a row lock is waited for at most `$2`. Statements
/// themselves are not bounded: a drain after a long outage may rightly take
/// long, and a frozen client does not stop a running statement.
pub(super) const SESSION_SETTINGS: &str = "
    SELECT pg_backend_pid(),
           set_config('plan_cache_mode', 'auto', false),
           set_config('application_name', 'outbox-relay', false),
           set_config('idle_in_transaction_session_timeout', $1, false),
           set_config('lock_timeout', $2, false)";

/// Renews the lease. An idle leader also records its last empty peek ($4)
/// as relayed (nothing became visible between the two), but only over the
/// relayed snapshot it peeked from ($5): never backwards.
pub(super) const RENEW_LEASE: &str = "
    UPDATE relay_state
       SET lease_expires_at = clock_timestamp() + make_interval(secs => $3),
           relayed_snapshot = CASE WHEN $4::text IS NOT NULL AND draining_snapshot IS NULL
                                        AND relayed_snapshot::text = $5
                                   THEN $4::text::pg_snapshot ELSE relayed_snapshot END
     WHERE relay = $1 AND epoch = $2
    RETURNING relayed_snapshot::text, draining_snapshot::text, cursor_id";

pub(super) const RELEASE_LEASE: &str = "
    UPDATE relay_state SET holder = NULL, holder_pid = NULL, lease_expires_at = '-infinity'
     WHERE relay = $1 AND epoch = $2";

/// A batch's lock: locks the lease row at our epoch (fencing: no row means
/// another process took the lease) and returns the cursor, with every
/// topic, its partition count and each partition head's log end offset and
/// running maximum `created_at`, one row per head (a topic without heads
/// gives one row with the head's columns NULL; no topic at all, one row
/// with the topic's NULL too). The relay places records only in topics
/// whose heads match the count (docs/invariants.md, 4 and 5).
///
/// Sent after the batch's read, so that its snapshot (which the topics and
/// heads are read from) sees every topic the read's does. One statement
/// rather than two: a wait for the lock does not renew that snapshot, but
/// the append checks every head it advances against the offset read here,
/// so a head that moved meanwhile fails the batch instead of giving an
/// offset twice.
///
/// It also sets, for the rest of the batch's transaction, prepared
/// statements on their generic plans (a `SET LOCAL` of its own was one
/// statement more per batch). The append's generic plan joins its records
/// to the outbox's id range whatever the batch's size; left to choose,
/// Postgres planned it anew for every small batch (a custom plan of one
/// record looks cheaper than the generic plan, which expects a thousand),
/// 0.3 ms of planning per batch. Local to the transaction, as the setting
/// also governs unnamed statements: the batch's read, which comes before
/// it, and the next transaction's must stay planned with their snapshots.
pub(super) const LOCK_STATE_WITH_HEADS: &str = "
    SELECT r.relayed_snapshot::text, r.draining_snapshot::text, r.cursor_id,
           t.name, t.partitions, h.partition, h.log_end_offset, h.max_created_at,
           set_config('plan_cache_mode', 'force_generic_plan', true)
      FROM relay_state r
      LEFT JOIN (topics t LEFT JOIN partition_heads h ON h.topic = t.name) ON true
     WHERE r.relay = $1 AND r.epoch = $2
       FOR UPDATE OF r";

/// What [`LOCK_STATE_WITH_HEADS`] returned: the relay's cursor as the
/// database holds it, and every topic with its partition count and heads.
pub(super) struct LockedState {
    pub relayed: String,
    pub draining: Option<String>,
    pub cursor: Option<i64>,
    /// Per topic: its partition count and the heads found.
    pub topics: TopicHeads,
}

impl LockedState {
    /// None without a row: the lease is no longer ours at this epoch.
    pub fn from_rows(rows: &[tokio_postgres::Row]) -> Option<LockedState> {
        let first = rows.first()?;
        let mut topics = TopicHeads::new();
        for row in rows {
            let Some(topic) = row.get::<_, Option<String>>(3) else {
                continue; // no topic at all
            };
            let partitions: i32 = row.get(4);
            let entry = topics
                .entry(topic.clone())
                .or_insert((partitions, Vec::new()));
            if let Some(partition) = row.get::<_, Option<i32>>(5) {
                entry.1.push(AdvancedHead {
                    topic,
                    partition,
                    base_offset: row.get(6),
                    running_max_created_at: row
                        .get::<_, Option<DateTime<Utc>>>(7)
                        .unwrap_or(DateTime::<Utc>::MIN_UTC),
                });
            }
        }
        Some(LockedState {
            relayed: first.get(0),
            draining: first.get(1),
            cursor: first.get(2),
            topics,
        })
    }

    /// The topics whose heads match their partition count, with the count:
    /// the only ones records are placed in (a wrong count would move keys).
    pub fn partition_counts(&self) -> HashMap<String, i32> {
        super::batch::partition_counts(&self.topics)
    }
}

/// The lease and the backlog of one relay (`outbox-relay relay status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayStatus {
    pub relay: String,
    /// The process holding (or last holding) the lease.
    pub holder: Option<String>,
    /// Bumps at every change of leader; fences the previous one.
    pub epoch: i64,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// A holder whose lease has not expired: someone is relaying.
    pub leader_alive: bool,
    /// A large difference is being moved in batches.
    pub draining: bool,
    /// Committed outbox rows not yet in the log.
    pub backlog: i64,
    /// Age of the oldest of them (by `created_at`), 0 when there are none.
    pub oldest_age_seconds: f64,
}

/// Backlog rows: not visible in the relayed snapshot (committed later or
/// in progress then), minus those a drain has already moved (visible in
/// the drain's snapshot, at or below its cursor). Rows of transactions
/// still open are invisible here, as they should be.
const STATUS: &str = "
    SELECT r.holder, r.epoch,
           CASE WHEN r.lease_expires_at = '-infinity' THEN NULL ELSE r.lease_expires_at END,
           r.holder IS NOT NULL AND r.lease_expires_at > now(),
           r.draining_snapshot IS NOT NULL,
           b.n, coalesce(extract(epoch FROM now() - b.oldest), 0)::float8
      FROM relay_state r,
      LATERAL (SELECT count(*) AS n, min(o.created_at) AS oldest FROM outbox o
                WHERE (o.txid >= pg_snapshot_xmax(r.relayed_snapshot)
                       OR o.txid IN (SELECT pg_snapshot_xip(r.relayed_snapshot)))
                  AND NOT coalesce(pg_visible_in_snapshot(o.txid, r.draining_snapshot)
                                   AND o.id <= r.cursor_id, false)) b
     WHERE r.relay = $1";

/// The status of relay `relay_name`.
pub async fn status(
    client: &impl tokio_postgres::GenericClient,
    relay_name: &str,
) -> anyhow::Result<RelayStatus> {
    let row = client
        .query_opt(STATUS, &[&relay_name])
        .await?
        .with_context(|| format!("no relay named {relay_name:?} in relay_state"))?;
    Ok(RelayStatus {
        relay: relay_name.to_string(),
        holder: row.get(0),
        epoch: row.get(1),
        lease_expires_at: row.get(2),
        leader_alive: row.get(3),
        draining: row.get(4),
        backlog: row.get(5),
        oldest_age_seconds: f64::max(row.get(6), 0.0),
    })
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::lease::ACQUIRE_LEASE", ACQUIRE_LEASE.to_string()),
        (
            "relay::lease::END_EXPIRED_HOLDER",
            END_EXPIRED_HOLDER.to_string(),
        ),
        (
            "relay::lease::SESSION_SETTINGS",
            SESSION_SETTINGS.to_string(),
        ),
        ("relay::lease::RENEW_LEASE", RENEW_LEASE.to_string()),
        ("relay::lease::RELEASE_LEASE", RELEASE_LEASE.to_string()),
        (
            "relay::lease::LOCK_STATE_WITH_HEADS",
            LOCK_STATE_WITH_HEADS.to_string(),
        ),
        ("relay::lease::STATUS", STATUS.to_string()),
    ]
}
