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

mod append;
pub mod batch;
mod drain;
mod lease;
mod maintenance;
pub mod parked;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::db::Db;
use crate::shutdown::Shutdown;
use batch::{AdvancedHead, PendingRow};
use drain::{DRAIN_START, PEEK, SAVE_CURSOR, SELECT_BATCH};
pub use lease::{instance_id, status, RelayStatus, DEFAULT_RELAY_NAME};
use lease::{
    ACQUIRE_LEASE, END_EXPIRED_HOLDER, LOCK_STATE_AT_EPOCH, RELEASE_LEASE, RENEW_LEASE,
    SESSION_SETTINGS,
};
pub use maintenance::{delete_relayed_outbox_rows, Maintenance};
pub use snapshot::Snapshot;

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

/// The drain target when a drain starts without a peeked snapshot.
const CURRENT_SNAPSHOT: &str = "SELECT pg_current_snapshot()::text";

/// Wakes readers waiting on channel `$1`; delivered at commit.
const NOTIFY_APPENDED: &str = "SELECT pg_notify($1, '')";

/// The relay of one process. Call [`Relay::step`] (tests) or [`Relay::run`].
pub struct Relay {
    db: Db,
    config: RelayConfig,
    client: Option<Client>,
    role: Role,
    batch_size: i64,
    is_leader: Arc<AtomicBool>,
}

impl Relay {
    /// A relay on `db` (its one connection is reserved by whoever builds
    /// the process's roles).
    pub fn new(db: impl Into<Db>, config: RelayConfig) -> Relay {
        let batch_size = config.min_batch;
        Relay {
            db: db.into(),
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
            if self.client.is_some() && matches!(self.role, Role::Leader { .. }) {
                // The lease records the old backend: step down and take the
                // lease again on the new connection (it is ours, at once).
                self.set_role(Role::Standby);
                anyhow::bail!("the relay's connection closed");
            }
            let client = self.db.connect().await?;
            let (bound, lock_wait) = session_bounds(self.config.lease_ttl);
            client
                .execute(SESSION_SETTINGS, &[&bound, &lock_wait])
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
                let acquired = match client
                    .query_opt(ACQUIRE_LEASE, &[&name, &instance, &ttl])
                    .await
                {
                    Ok(row) => row,
                    Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                        // Someone holds the lease row. If its lease expired, it
                        // is frozen mid-batch: end its backend, take over next.
                        for row in client.query(END_EXPIRED_HOLDER, &[&name]).await? {
                            let pid: i32 = row.get(0);
                            tracing::warn!(pid, "ended the backend of an expired relay leader that still held the lease row");
                        }
                        return Ok(StepOutcome::Standby);
                    }
                    Err(e) => return Err(e.into()),
                };
                let Some(row) = acquired else {
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
                    None => Snapshot::parse(tx.query_one(CURRENT_SNAPSHOT, &[]).await?.get(0))?,
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

        // Topics whose heads do not match their partition count are not
        // placed (a wrong count would move keys): their rows are parked.
        let mut partition_counts: HashMap<String, i32> = HashMap::new();
        let mut mismatched: HashMap<String, (i32, i32)> = HashMap::new();
        for row in tx.query(append::PARTITION_COUNTS, &[]).await? {
            let (topic, partitions, heads): (String, i32, i32) =
                (row.get(0), row.get(1), row.get(2));
            if heads == partitions {
                partition_counts.insert(topic, partitions);
            } else {
                mismatched.insert(topic, (partitions, heads));
            }
        }
        let mut plan = batch::plan(&batch, &partition_counts);
        if !plan.per_partition.is_empty() {
            let appends = plan.per_partition.iter();
            let topics: Vec<&str> = appends.clone().map(|(k, _)| k.0).collect();
            let partitions: Vec<i32> = appends.clone().map(|(k, _)| k.1).collect();
            let counts: Vec<i64> = appends.clone().map(|(_, v)| v.count).collect();
            let maxes: Vec<DateTime<Utc>> = appends.map(|(_, v)| v.max_created_at).collect();
            let heads: Vec<AdvancedHead> = tx
                .query(
                    append::ADVANCE_HEADS,
                    &[&topics, &partitions, &counts, &maxes],
                )
                .await
                .context("advancing partition heads")?
                .iter()
                .map(|r| AdvancedHead {
                    topic: r.get(0),
                    partition: r.get(1),
                    base_offset: r.get(2),
                    running_max_created_at: r.get(3),
                })
                .collect();
            plan.set_heads(&heads)?;
            let records = plan.records();
            let appended = tx
                .execute(
                    append::APPEND_RECORDS,
                    &[
                        &records.ids,
                        &records.partitions,
                        &records.offsets,
                        &crate::outbox::RESERVED_HEADERS,
                        &crate::outbox::RETRY_OF_HEADER,
                    ],
                )
                .await
                .context("appending records to the event log")?;
            anyhow::ensure!(
                appended == records.ids.len() as u64,
                "appended {appended} records for {} outbox rows",
                records.ids.len()
            );
            let mut index = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((topic, partition), append) in &plan.per_partition {
                index.0.push(*topic);
                index.1.push(*partition);
                index.2.push(append.base_offset);
                index.3.push(append.base_offset + append.count - 1);
                index.4.push(append.running_max_created_at);
            }
            tx.execute(
                append::APPEND_TIME_INDEX,
                &[&index.0, &index.1, &index.2, &index.3, &index.4],
            )
            .await?;
            tx.execute(NOTIFY_APPENDED, &[&crate::log::notify::APPENDED_CHANNEL])
                .await?;
        }
        if !plan.parked.is_empty() {
            let ids: Vec<i64> = plan.parked.iter().map(|r| r.id).collect();
            let reasons: Vec<String> = plan
                .parked
                .iter()
                .map(|r| match mismatched.get(&r.topic) {
                    Some((partitions, heads)) => format!(
                        "topic {:?} has {partitions} partitions but {heads} partition heads",
                        r.topic
                    ),
                    None => format!("unknown topic {:?}", r.topic),
                })
                .collect();
            tx.execute(append::PARK_ROWS, &[&ids, &reasons]).await?;
            tracing::warn!(
                rows = plan.parked.len(),
                reason = %reasons[0],
                "parked outbox rows that cannot be placed"
            );
        }
        let (placed, parked) = (plan.placed.len(), plan.parked.len());

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
        for (row, _) in &plan.placed {
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
            appended: placed,
            parked,
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

/// Server-side bounds of a relay session, from the lease: a transaction
/// idle longer than the lease, or at least a second, is ended by Postgres,
/// so a frozen leader's locks go within about a lease; row locks are waited
/// for at most a fifth of the lease (at most 200 ms), after which a standby
/// looks for an expired holder to end.
fn session_bounds(lease: Duration) -> (String, String) {
    let bound = lease.max(Duration::from_secs(1));
    let lock_wait = (lease / 5).min(Duration::from_millis(200));
    (
        format!("{}ms", bound.as_millis()),
        format!("{}ms", lock_wait.as_millis().max(1)),
    )
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

/// The relay's SQL by name, its private submodules' included:
/// tests/it/sql.rs prepares each statement against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    let mut all = vec![
        ("relay::CURRENT_SNAPSHOT", CURRENT_SNAPSHOT.to_string()),
        ("relay::NOTIFY_APPENDED", NOTIFY_APPENDED.to_string()),
    ];
    all.extend(lease::statements());
    all.extend(drain::statements());
    all.extend(append::statements());
    all.extend(maintenance::statements());
    all.extend(parked::statements());
    all
}
