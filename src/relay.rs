//! The relay: moves committed outbox rows into the event log, exactly once,
//! never skipping a row that commits late and never waiting for an open
//! transaction (docs/relay.md explains the mechanism and its trade-offs).
//!
//! * **Which rows.** The relay keeps `relayed_snapshot`: every outbox row
//!   visible in it is in the log. The next rows to move are those visible in
//!   a newer snapshot and not in `relayed_snapshot` (PgQ's two-snapshot
//!   difference). A transaction open at the older snapshot is in its
//!   in-progress list, so its rows are picked up whenever it commits; it does
//!   not hold back anyone else's rows.
//! * **Order.** A drain moves its rows in outbox id (insert) order, so two
//!   events of one key written one after the other keep their order.
//! * **Exactly once.** Reading a batch, appending it, advancing the partition
//!   heads and the cursor happen in one transaction.
//! * **One writer.** A lease row (holder, epoch, expiry) elects a leader; every
//!   batch locks the row *at the leader's epoch*, so a leader that lost the
//!   lease can no longer append (fencing).
//! * **Adaptive.** An idle leader peeks with one read-only statement every
//!   few milliseconds; a busy one runs batches back to back, doubling the
//!   batch size while batches come back full.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::partitioner::partition_for_key;
use crate::shutdown::Shutdown;

/// Channel the relay notifies once per appended batch (for log readers).
pub const LOG_NOTIFY_CHANNEL: &str = "event_log_appended";

/// The `relay_state` row a relay uses unless configured otherwise (the
/// schema creates it).
pub const DEFAULT_RELAY_NAME: &str = "default";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Row of `relay_state` this relay uses (one per relay deployment).
    pub relay_name: String,
    /// This process's identity in the lease.
    pub instance_id: String,
    /// How long a lease lasts without renewal; a standby takes over after it.
    pub lease_ttl: Duration,
    /// How often a standby tries to take the lease.
    pub standby_poll: Duration,
    /// Longest pause between peeks of an idle leader.
    pub idle_poll_max: Duration,
    /// Batch size bounds; the size doubles while batches are full.
    pub min_batch: i64,
    pub max_batch: i64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            relay_name: DEFAULT_RELAY_NAME.into(),
            instance_id: instance_id(),
            lease_ttl: Duration::from_secs(3),
            standby_poll: Duration::from_millis(250),
            idle_poll_max: Duration::from_millis(5),
            min_batch: 256,
            max_batch: 16_384,
        }
    }
}

/// `host-pid-random`: unique per process, readable in `relay_state`.
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// What one [`Relay::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    /// Another process holds the lease.
    Standby,
    /// This process just became the leader at `epoch`.
    BecameLeader { epoch: i64 },
    /// Leader with nothing to move.
    Idle,
    /// Moved a batch: `appended` records into the log, `parked` rows set aside.
    Moved { appended: usize, parked: usize },
    /// The lease was taken over by another process.
    LostLeadership,
}

/// A pg_snapshot (`xmin:xmax:xip,…`) parsed, to reason about it in Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub text: String,
    pub xmin: u64,
    pub xmax: u64,
    pub in_progress: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> anyhow::Result<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let mut number = |what: &str| -> anyhow::Result<u64> {
            parts
                .next()
                .with_context(|| format!("snapshot {text:?} lacks {what}"))?
                .parse::<u64>()
                .with_context(|| format!("snapshot {text:?} has a bad {what}"))
        };
        let xmin = number("xmin")?;
        let xmax = number("xmax")?;
        let in_progress = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| {
                    x.parse::<u64>()
                        .with_context(|| format!("snapshot {text:?}"))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Snapshot {
            text: text.to_string(),
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Transactions in progress when the snapshot was taken, as xid8 text.
    pub fn in_progress_ids(&self) -> Vec<String> {
        self.in_progress.iter().map(u64::to_string).collect()
    }

    /// Was transaction `xid` complete (committed or aborted) when this
    /// snapshot was taken? Postgres' `pg_visible_in_snapshot`.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }

    /// Transactions in progress in `self` that `later` sees complete: the
    /// late commits a drain from `self` to `later` must pick up, as xid8 text.
    pub fn completed_by(&self, later: &Snapshot) -> Vec<String> {
        self.in_progress
            .iter()
            .filter(|xid| later.sees(**xid))
            .map(u64::to_string)
            .collect()
    }
}

/// One page of a drain: rows visible in the target snapshot ($2) and not in
/// the relayed one ($1), after outbox id $3, in id (insert) order.
///
/// Two branches so each is an index scan: transactions that started after
/// the relayed snapshot, and those in progress in it that the target sees
/// complete ($5, computed in Rust so the planner sees how few they are).
const SELECT_BATCH: &str = "
    SELECT batch.txid::text, batch.id, batch.topic, batch.key, batch.created_at FROM (
        (SELECT o.txid, o.id, o.topic, o.key, o.created_at FROM outbox o
          WHERE o.id > $3
            AND o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
            AND o.txid <  pg_snapshot_xmax($2::text::pg_snapshot)
            AND pg_visible_in_snapshot(o.txid, $2::text::pg_snapshot)
          ORDER BY o.id LIMIT $4)
        UNION ALL
        (SELECT o.txid, o.id, o.topic, o.key, o.created_at FROM outbox o
          WHERE o.txid = ANY ($5::text[]::xid8[]) AND o.id > $3
          ORDER BY o.id LIMIT $4)
    ) AS batch
    ORDER BY batch.id LIMIT $4";

/// Where a new drain starts: just below the smallest outbox id it holds.
/// (`id + 0` keeps the planner from walking the id index up from the
/// oldest relayed row: the transaction id range is the narrow side.)
const DRAIN_START: &str = "
    SELECT least(
        (SELECT min(o.id + 0) FROM outbox o
          WHERE o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
            AND o.txid <  pg_snapshot_xmax($2::text::pg_snapshot)
            AND pg_visible_in_snapshot(o.txid, $2::text::pg_snapshot)),
        (SELECT min(o.id + 0) FROM outbox o WHERE o.txid = ANY ($3::text[]::xid8[]))
    ) - 1";

/// Read-only check an idle leader runs: the current snapshot, and whether
/// any outbox row became visible since `relayed_snapshot` ($1, with its
/// in-progress transaction ids as $2). Only in-progress transactions that
/// have since completed are looked up, so a large open writer costs nothing.
const PEEK: &str = "
    WITH cur AS (SELECT pg_current_snapshot() AS snap)
    SELECT cur.snap::text,
           EXISTS (SELECT 1 FROM outbox o
                    WHERE o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
                      AND o.txid <  pg_snapshot_xmax(cur.snap)
                      AND pg_visible_in_snapshot(o.txid, cur.snap))
        OR EXISTS (SELECT 1 FROM unnest($2::text[]::xid8[]) AS x
                    WHERE pg_visible_in_snapshot(x, cur.snap)
                      AND EXISTS (SELECT 1 FROM outbox o WHERE o.txid = x))
    FROM cur";

const LOCK_STATE_AT_EPOCH: &str = "
    SELECT relayed_snapshot::text, draining_snapshot::text, cursor_id
      FROM relay_state WHERE relay = $1 AND epoch = $2 FOR UPDATE";

/// Partition counts come from the heads: they are the partitions that exist.
const PARTITION_COUNTS: &str = "SELECT topic, count(*)::int4 FROM partition_heads GROUP BY topic";

const ADVANCE_HEADS: &str = "
    UPDATE partition_heads h
       SET log_end_offset = h.log_end_offset + v.n,
           max_created_at = greatest(h.max_created_at, v.max_created_at)
      FROM unnest($1::text[], $2::int4[], $3::int8[], $4::timestamptz[]) AS v(topic, partition, n, max_created_at)
     WHERE h.topic = v.topic AND h.partition = v.partition
    RETURNING h.topic, h.partition, h.log_end_offset - v.n, h.max_created_at";

/// Copies rows from the outbox into the log; payloads never leave Postgres.
const APPEND_RECORDS: &str = "
    INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
    SELECT o.topic, v.partition, v.log_offset, o.key, o.headers, o.payload, o.created_at, now(), o.id
      FROM unnest($1::int8[], $2::int4[], $3::int8[]) AS v(id, partition, log_offset)
      JOIN outbox o ON o.id = v.id";

const APPEND_TIME_INDEX: &str = "
    INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
    SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::int8[], $5::timestamptz[])";

const PARK_ROWS: &str = "
    INSERT INTO outbox_parked (outbox_id, topic, key, payload, headers, created_at, reason)
    SELECT o.id, o.topic, o.key, o.payload, o.headers, o.created_at, v.reason
      FROM unnest($1::int8[], $2::text[]) AS v(id, reason)
      JOIN outbox o ON o.id = v.id
    ON CONFLICT (outbox_id) DO NOTHING";

const SAVE_CURSOR: &str = "
    UPDATE relay_state
       SET relayed_snapshot = $3::text::pg_snapshot,
           draining_snapshot = $4::text::pg_snapshot,
           cursor_id = $5,
           lease_expires_at = now() + make_interval(secs => $6)
     WHERE relay = $1 AND epoch = $2";

const ACQUIRE_LEASE: &str = "
    UPDATE relay_state
       SET holder = $2, epoch = epoch + 1, lease_expires_at = now() + make_interval(secs => $3)
     WHERE relay = $1 AND (holder IS NULL OR holder = $2 OR lease_expires_at < now())
    RETURNING epoch, relayed_snapshot::text, draining_snapshot IS NOT NULL";

/// Renews the lease. An idle leader also records its last empty peek ($4)
/// as relayed (nothing became visible between the two), but only over the
/// relayed snapshot it peeked from ($5): never backwards.
const RENEW_LEASE: &str = "
    UPDATE relay_state
       SET lease_expires_at = now() + make_interval(secs => $3),
           relayed_snapshot = CASE WHEN $4::text IS NOT NULL AND draining_snapshot IS NULL
                                        AND relayed_snapshot::text = $5
                                   THEN $4::text::pg_snapshot ELSE relayed_snapshot END
     WHERE relay = $1 AND epoch = $2
    RETURNING relayed_snapshot::text, draining_snapshot IS NOT NULL";

const RELEASE_LEASE: &str = "
    UPDATE relay_state SET holder = NULL, lease_expires_at = '-infinity'
     WHERE relay = $1 AND epoch = $2";

enum Role {
    Standby,
    Leader {
        epoch: i64,
        renewed_at: Instant,
        /// Mirror of `relayed_snapshot` in the database (we are its only writer).
        relayed: Snapshot,
        /// A drain is in progress in the database: skip the peek.
        draining: bool,
        /// Snapshot of the last peek that found nothing new since `relayed`.
        empty_peek: Option<Snapshot>,
    },
}

/// The relay of one process. Call [`Relay::step`] (tests) or [`Relay::run`].
pub struct Relay {
    database_url: String,
    config: RelayConfig,
    client: Option<Client>,
    role: Role,
    batch_size: i64,
    is_leader: Arc<AtomicBool>,
}

/// What one batch appends to one partition.
struct PartitionAppend {
    count: i64,
    max_created_at: DateTime<Utc>,
    /// From the advanced head: the next offset to hand out in this batch.
    next_offset: i64,
    /// The head's running maximum of created_at, for the time index.
    running_max_created_at: DateTime<Utc>,
}

/// An outbox row as the relay sees it (the payload stays in Postgres).
struct PendingRow {
    id: i64,
    topic: String,
    key: Option<String>,
    created_at: DateTime<Utc>,
}

impl Relay {
    pub fn new(database_url: impl Into<String>, config: RelayConfig) -> Relay {
        let batch_size = config.min_batch;
        Relay {
            database_url: database_url.into(),
            config,
            client: None,
            role: Role::Standby,
            batch_size,
            is_leader: Arc::new(AtomicBool::new(false)),
        }
    }

    /// True while this relay holds the lease (shared with maintenance).
    pub fn leadership(&self) -> Arc<AtomicBool> {
        self.is_leader.clone()
    }

    pub fn epoch(&self) -> Option<i64> {
        match &self.role {
            Role::Leader { epoch, .. } => Some(*epoch),
            Role::Standby => None,
        }
    }

    async fn client(&mut self) -> anyhow::Result<&mut Client> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = crate::db::connect(&self.database_url).await?;
            // Plan every statement with its actual snapshot parameters: a
            // generic plan cannot know the in-progress list is short.
            client
                .batch_execute("SET plan_cache_mode = force_custom_plan; SET application_name = 'outbox-relay'")
                .await?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn set_role(&mut self, role: Role) {
        let leading = matches!(role, Role::Leader { .. });
        self.is_leader.store(leading, Ordering::Relaxed);
        crate::metrics::metrics()
            .relay_is_leader
            .set(i64::from(leading));
        self.role = role;
    }

    /// One unit of work: take the lease, renew it, or move one batch.
    ///
    /// After an error the in-memory view of the cursor may be stale (a
    /// commit whose answer was lost), so the relay steps down to standby;
    /// it takes its own lease back at once, re-reading the cursor.
    pub async fn step(&mut self) -> anyhow::Result<StepOutcome> {
        let result = self.try_step().await;
        if result.is_err() {
            self.client = None;
            self.set_role(Role::Standby);
        }
        result
    }

    async fn try_step(&mut self) -> anyhow::Result<StepOutcome> {
        let ttl = self.config.lease_ttl.as_secs_f64();
        let name = self.config.relay_name.clone();
        let (epoch, renewed_at) = match &self.role {
            Role::Standby => {
                let instance = self.config.instance_id.clone();
                let client = self.client().await?;
                let Some(row) = client
                    .query_opt(ACQUIRE_LEASE, &[&name, &instance, &ttl])
                    .await?
                else {
                    return Ok(StepOutcome::Standby);
                };
                let epoch: i64 = row.get(0);
                tracing::info!(epoch, instance = %instance, "relay became leader");
                self.set_role(Role::Leader {
                    epoch,
                    renewed_at: Instant::now(),
                    relayed: Snapshot::parse(row.get(1))?,
                    draining: row.get(2),
                    empty_peek: None,
                });
                return Ok(StepOutcome::BecameLeader { epoch });
            }
            Role::Leader {
                epoch, renewed_at, ..
            } => (*epoch, *renewed_at),
        };

        if renewed_at.elapsed() >= self.config.lease_ttl / 3 {
            let (peek, peeked_from) = match &self.role {
                Role::Leader {
                    empty_peek: Some(peek),
                    relayed,
                    ..
                } => (Some(peek.text.clone()), Some(relayed.text.clone())),
                _ => (None, None),
            };
            let client = self.client().await?;
            let Some(row) = client
                .query_opt(RENEW_LEASE, &[&name, &epoch, &ttl, &peek, &peeked_from])
                .await?
            else {
                return Ok(self.lose_leadership(epoch));
            };
            let relayed = Snapshot::parse(row.get(0))?;
            let draining_now: bool = row.get(1);
            if let Role::Leader {
                renewed_at,
                relayed: mirror,
                draining,
                empty_peek,
                ..
            } = &mut self.role
            {
                *renewed_at = Instant::now();
                *mirror = relayed;
                *draining = draining_now;
                *empty_peek = None;
            }
        }

        let (relayed, draining) = match &self.role {
            Role::Leader {
                relayed, draining, ..
            } => (relayed.clone(), *draining),
            Role::Standby => unreachable!("handled above"),
        };
        let target = if draining {
            None
        } else {
            let client = self.client().await?;
            let row = client
                .query_one(PEEK, &[&relayed.text, &relayed.in_progress_ids()])
                .await?;
            let snapshot = Snapshot::parse(row.get(0))?;
            let found: bool = row.get(1);
            if let Role::Leader { empty_peek, .. } = &mut self.role {
                *empty_peek = (!found).then(|| snapshot.clone());
            }
            if !found {
                return Ok(StepOutcome::Idle);
            }
            Some(snapshot)
        };
        self.move_batch(epoch, target).await
    }

    fn lose_leadership(&mut self, epoch: i64) -> StepOutcome {
        tracing::warn!(epoch, "relay lost its lease to another process");
        self.set_role(Role::Standby);
        StepOutcome::LostLeadership
    }

    /// Moves one batch of the difference between `relayed_snapshot` and the
    /// drain target (`target`, or the one saved by an unfinished drain).
    async fn move_batch(
        &mut self,
        epoch: i64,
        target: Option<Snapshot>,
    ) -> anyhow::Result<StepOutcome> {
        let name = self.config.relay_name.clone();
        let ttl = self.config.lease_ttl.as_secs_f64();
        let limit = self.batch_size;
        let client = self.client().await?;
        let tx = client.transaction().await?;

        // Fencing: only the holder of the current epoch gets this row lock.
        let Some(state) = tx.query_opt(LOCK_STATE_AT_EPOCH, &[&name, &epoch]).await? else {
            drop(tx);
            return Ok(self.lose_leadership(epoch));
        };
        let relayed = Snapshot::parse(state.get(0))?;
        let (drain, cursor_id) = match state.get::<_, Option<String>>(1) {
            Some(saved) => (
                Snapshot::parse(&saved)?,
                state.get::<_, Option<i64>>(2).unwrap_or(0),
            ),
            None => {
                let drain = match target {
                    Some(t) => t,
                    None => Snapshot::parse(
                        tx.query_one("SELECT pg_current_snapshot()::text", &[])
                            .await?
                            .get(0),
                    )?,
                };
                let start: Option<i64> = tx
                    .query_one(
                        DRAIN_START,
                        &[&relayed.text, &drain.text, &relayed.completed_by(&drain)],
                    )
                    .await?
                    .get(0);
                (drain, start.unwrap_or(0))
            }
        };
        let late_commits = relayed.completed_by(&drain);

        let rows = tx
            .query(
                SELECT_BATCH,
                &[
                    &relayed.text,
                    &drain.text,
                    &cursor_id,
                    &limit,
                    &late_commits,
                ],
            )
            .await
            .context("selecting the next outbox batch")?;
        let batch: Vec<PendingRow> = rows
            .iter()
            .map(|r| PendingRow {
                id: r.get(1),
                topic: r.get(2),
                key: r.get(3),
                created_at: r.get(4),
            })
            .collect();
        let full = batch.len() as i64 == limit;

        let partition_counts: HashMap<String, i32> = tx
            .query(PARTITION_COUNTS, &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();

        // Assign each row its partition; rows for unknown topics are parked.
        let mut placed: Vec<(&PendingRow, i32)> = Vec::with_capacity(batch.len());
        let mut parked: Vec<&PendingRow> = Vec::new();
        for row in &batch {
            match partition_counts.get(&row.topic) {
                Some(&partitions) => {
                    let partition = match &row.key {
                        Some(key) => partition_for_key(key, partitions as u32) as i32,
                        // Kafka spreads keyless records; the outbox id does so deterministically.
                        None => row.id.rem_euclid(i64::from(partitions)) as i32,
                    };
                    placed.push((row, partition));
                }
                None => parked.push(row),
            }
        }

        // What the batch adds to each partition it touches.
        let mut per_partition: BTreeMap<(&str, i32), PartitionAppend> = BTreeMap::new();
        for (row, partition) in &placed {
            let entry = per_partition
                .entry((row.topic.as_str(), *partition))
                .or_insert(PartitionAppend {
                    count: 0,
                    max_created_at: row.created_at,
                    next_offset: 0,
                    running_max_created_at: row.created_at,
                });
            entry.count += 1;
            entry.max_created_at = entry.max_created_at.max(row.created_at);
        }
        if !per_partition.is_empty() {
            let topics: Vec<&str> = per_partition.keys().map(|k| k.0).collect();
            let partitions: Vec<i32> = per_partition.keys().map(|k| k.1).collect();
            let counts: Vec<i64> = per_partition.values().map(|v| v.count).collect();
            let maxes: Vec<DateTime<Utc>> =
                per_partition.values().map(|v| v.max_created_at).collect();
            let heads = tx
                .query(ADVANCE_HEADS, &[&topics, &partitions, &counts, &maxes])
                .await
                .context("advancing partition heads")?;
            // Every partition the batch touches has a head (partition counts
            // come from the heads); anything else must not get offsets.
            anyhow::ensure!(
                heads.len() == per_partition.len(),
                "a partition head is missing"
            );
            for head in heads {
                let (topic, partition): (&str, i32) = (head.get(0), head.get(1));
                let (_, append) = per_partition
                    .iter_mut()
                    .find(|(key, _)| key.0 == topic && key.1 == partition)
                    .context("a partition head the batch did not ask for")?;
                append.next_offset = head.get(2);
                append.running_max_created_at = head.get(3);
            }
        }

        // Offsets in batch (outbox id) order: per-key order is insert order.
        let mut ids = Vec::with_capacity(placed.len());
        let mut partitions = Vec::with_capacity(placed.len());
        let mut offsets = Vec::with_capacity(placed.len());
        for (row, partition) in &placed {
            let append = per_partition
                .get_mut(&(row.topic.as_str(), *partition))
                .expect("every placed row counted above");
            ids.push(row.id);
            partitions.push(*partition);
            offsets.push(append.next_offset);
            append.next_offset += 1;
        }
        if !placed.is_empty() {
            let appended = tx
                .execute(APPEND_RECORDS, &[&ids, &partitions, &offsets])
                .await
                .context("appending records to the event log")?;
            anyhow::ensure!(
                appended == placed.len() as u64,
                "appended {appended} records for {} outbox rows",
                placed.len()
            );
            let mut index = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((topic, partition), append) in &per_partition {
                index.0.push(*topic);
                index.1.push(*partition);
                index.2.push(append.next_offset - append.count);
                index.3.push(append.next_offset - 1);
                index.4.push(append.running_max_created_at);
            }
            tx.execute(
                APPEND_TIME_INDEX,
                &[&index.0, &index.1, &index.2, &index.3, &index.4],
            )
            .await?;
            tx.execute("SELECT pg_notify($1, '')", &[&LOG_NOTIFY_CHANNEL])
                .await?;
        }
        if !parked.is_empty() {
            let ids: Vec<i64> = parked.iter().map(|r| r.id).collect();
            let reasons: Vec<String> = parked
                .iter()
                .map(|r| format!("unknown topic {:?}", r.topic))
                .collect();
            tx.execute(PARK_ROWS, &[&ids, &reasons]).await?;
            tracing::warn!(rows = parked.len(), "parked outbox rows for unknown topics");
        }

        // Advance the cursor: either mid-drain, or the drain is complete.
        let (new_relayed, new_drain, new_cursor) = if full {
            let last = batch.last().expect("a full batch is not empty");
            (
                relayed.text.clone(),
                Some(drain.text.clone()),
                Some(last.id),
            )
        } else {
            (drain.text.clone(), None, None)
        };
        tx.execute(
            SAVE_CURSOR,
            &[&name, &epoch, &new_relayed, &new_drain, &new_cursor, &ttl],
        )
        .await?;
        tx.commit().await.context("committing the relay batch")?;
        let metrics = crate::metrics::metrics();
        metrics.relay_batch_size.observe(batch.len() as f64);
        let now = Utc::now();
        for (row, _) in &placed {
            metrics
                .relay_appended
                .with_label_values(&[row.topic.as_str()])
                .inc();
            let age = (now - row.created_at).to_std().unwrap_or_default();
            metrics.commit_to_log_seconds.observe(age.as_secs_f64());
        }

        self.batch_size = if full {
            (self.batch_size * 2).min(self.config.max_batch)
        } else {
            (self.batch_size / 2).max(self.config.min_batch)
        };
        if let Role::Leader {
            relayed,
            draining,
            empty_peek,
            renewed_at,
            ..
        } = &mut self.role
        {
            *draining = full;
            *empty_peek = None;
            *renewed_at = Instant::now();
            if !full {
                *relayed = drain;
            }
        }
        Ok(StepOutcome::Moved {
            appended: placed.len(),
            parked: parked.len(),
        })
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        if let Role::Leader { epoch, .. } = self.role {
            let name = self.config.relay_name.clone();
            self.set_role(Role::Standby);
            let client = self.client().await?;
            client.execute(RELEASE_LEASE, &[&name, &epoch]).await?;
            tracing::info!(epoch, "relay released its lease");
        }
        Ok(())
    }

    /// Runs steps until shutdown: back to back while there is work, polling
    /// with a pause that doubles up to `idle_poll_max` while idle.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let min_pause = Duration::from_micros(500);
        let mut idle_pause = min_pause;
        let mut error_pause = Duration::from_millis(100);
        while !shutdown.is_triggered() {
            let pause = match self.step().await {
                Ok(StepOutcome::Moved { .. })
                | Ok(StepOutcome::BecameLeader { .. })
                | Ok(StepOutcome::LostLeadership) => {
                    idle_pause = min_pause;
                    error_pause = Duration::from_millis(100);
                    Duration::ZERO
                }
                Ok(StepOutcome::Idle) => {
                    let pause = idle_pause;
                    idle_pause = (idle_pause * 2).min(self.config.idle_poll_max);
                    error_pause = Duration::from_millis(100);
                    pause
                }
                Ok(StepOutcome::Standby) => self.config.standby_poll,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "relay step failed; retrying");
                    let pause = error_pause;
                    error_pause = (error_pause * 2).min(Duration::from_secs(5));
                    pause
                }
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.recv() => {}
                }
            }
        }
        if let Err(e) = self.release().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not release the relay lease"
            );
        }
    }
}

impl crate::service::Service for Relay {
    fn name(&self) -> &'static str {
        "relay"
    }

    async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        Relay::run(self, shutdown).await;
        Ok(())
    }
}

/// The relay leader's upkeep, as a role of its own beside the relay.
pub struct Maintenance {
    database_url: String,
    relay_name: String,
    leadership: Arc<AtomicBool>,
}

impl Maintenance {
    /// Upkeep that runs while `relay` leads.
    pub fn new(database_url: &str, relay: &Relay) -> Maintenance {
        Maintenance {
            database_url: database_url.to_string(),
            relay_name: relay.config.relay_name.clone(),
            leadership: relay.leadership(),
        }
    }
}

impl crate::service::Service for Maintenance {
    fn name(&self) -> &'static str {
        "maintenance"
    }

    async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        run_maintenance(
            self.database_url,
            self.relay_name,
            self.leadership,
            shutdown,
        )
        .await;
        Ok(())
    }
}

/// Periodic upkeep while this process leads: remove relayed outbox rows,
/// keep day partitions ahead, enforce retention.
pub async fn run_maintenance(
    database_url: String,
    relay_name: String,
    leadership: Arc<AtomicBool>,
    mut shutdown: Shutdown,
) {
    let mut last_retention: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.recv() => return,
        }
        if !leadership.load(Ordering::Relaxed) {
            continue;
        }
        let result = async {
            let mut client = crate::db::connect(&database_url).await?;
            // In chunks, until caught up: keeps up with any relay rate.
            const CHUNK: i64 = 50_000;
            let mut removed = 0;
            loop {
                let n = delete_relayed_outbox_rows(&client, &relay_name, CHUNK).await?;
                removed += n;
                if n < CHUNK as u64 || shutdown.is_triggered() {
                    break;
                }
            }
            if removed > 0 {
                tracing::debug!(removed, "removed relayed outbox rows");
            }
            if last_retention.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                let tx = client.transaction().await?;
                crate::event_log::ensure_day_partitions(&tx).await?;
                tx.commit().await?;
                let outcome = crate::event_log::enforce_retention(&mut client).await?;
                if outcome != Default::default() {
                    tracing::info!(?outcome, "retention applied");
                }
                last_retention = Some(Instant::now());
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = format!("{e:#}"), "relay maintenance failed");
        }
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

/// Deletes up to `limit` outbox rows that are certainly in the log: those
/// of transactions that completed before `relayed_snapshot` was taken.
pub async fn delete_relayed_outbox_rows(
    client: &Client,
    relay_name: &str,
    limit: i64,
) -> anyhow::Result<u64> {
    let removed = client
        .execute(
            "DELETE FROM outbox o USING (
                 SELECT id FROM outbox
                  WHERE txid < (SELECT pg_snapshot_xmin(relayed_snapshot) FROM relay_state WHERE relay = $2)
                  LIMIT $1) d
              WHERE o.id = d.id",
            &[&limit, &relay_name],
        )
        .await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert_eq!(
            (s.xmin, s.xmax, s.in_progress.clone()),
            (10, 20, vec![12, 15])
        );
        let empty = Snapshot::parse("727:727:").unwrap();
        assert!(empty.in_progress.is_empty());
        assert!(Snapshot::parse("x:1:").is_err());
        assert!(s.sees(9) && s.sees(13) && !s.sees(12) && !s.sees(20));
        let later = Snapshot::parse("15:30:15,22").unwrap();
        assert_eq!(s.completed_by(&later), vec!["12".to_string()]);
        assert!(Snapshot::parse("1").is_err());
    }
}
