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
//! * **Adaptive.** An idle leader waits to be woken by a writer (in this
//!   process, or by `NOTIFY outbox_written`) and otherwise peeks with one
//!   read-only statement every few milliseconds; a busy one runs batches
//!   back to back, doubling the batch size while batches come back full.
//! * **Few round trips.** Statements are prepared once per connection; a
//!   batch is two pipelined round trips, its `COMMIT` included.

mod append;
pub mod batch;
mod drain;
mod lease;
mod maintenance;
mod metrics;
pub mod parked;
pub mod snapshot;
mod wakeup;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::clip::clip;
use crate::db::Db;
use crate::shutdown::Shutdown;
use batch::{AdvancedHead, PendingRow, Unplaceable};
use drain::{PEEK, SELECT_BATCH, SELECT_BATCH_NOW};
pub use lease::{instance_id, status, RelayStatus, DEFAULT_RELAY_NAME};
use lease::{
    ACQUIRE_LEASE, END_EXPIRED_HOLDER, LOCK_STATE_WITH_HEADS, RELEASE_LEASE, RENEW_LEASE,
    SESSION_SETTINGS,
};
pub use maintenance::{delete_relayed_outbox_rows, Maintenance};
pub use snapshot::Snapshot;
pub use wakeup::{OutboxWritten, Wakeup};

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
    /// Moved a batch: `appended` records into the log, `parked` rows set
    /// aside. `drain_continues` when the batch was full: the rest of its
    /// snapshot's rows follow in the next batches.
    Moved {
        appended: usize,
        parked: usize,
        drain_continues: bool,
    },
    /// The lease was taken over by another process.
    LostLeadership,
}

/// What set a step off: a poll peeks before it moves a batch; a wake-up
/// (a writer said it committed) reads the batch at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cue {
    Poll,
    Woken,
}

/// Where a batch's rows end: the drain in progress, the snapshot a peek
/// took, or the snapshot of the batch's own read.
enum Target {
    Drain,
    Peeked(Snapshot),
    Now,
}

/// A drain in progress: its target snapshot and the last outbox id moved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Drain {
    target: Snapshot,
    cursor: i64,
}

// One per relay: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Role {
    Standby,
    Leader {
        epoch: i64,
        renewed_at: Instant,
        /// Mirror of `relayed_snapshot` in the database (we are its only writer).
        relayed: Snapshot,
        /// Mirror of the drain in progress, if any: skip the peek.
        drain: Option<Drain>,
        /// Snapshot of the last peek that found nothing new since `relayed`.
        empty_peek: Option<Snapshot>,
    },
}

/// `drain::SELECT_BATCH`'s parameters with their types: it is sent unnamed
/// (`query_typed`, one round trip), so each execution is planned with its
/// snapshots, as `PEEK` is; a generic plan cannot see how narrow the
/// transaction id range is and may scan the outbox.
fn select_batch_params<'a>(
    relayed: &'a String,
    target: &'a String,
    cursor: &'a Option<i64>,
    limit: &'a i64,
    late_commits: &'a Vec<String>,
) -> [(&'a (dyn ToSql + Sync), Type); 5] {
    [
        (relayed, Type::TEXT),
        (target, Type::TEXT),
        (cursor, Type::INT8),
        (limit, Type::INT8),
        (late_commits, Type::TEXT_ARRAY),
    ]
}

/// Sent before the append, in its round trip: for the rest of the batch's
/// transaction, prepared statements run on their generic plans. The
/// append's generic plan joins its records to the outbox's id range
/// whatever the batch's size; left to choose, Postgres planned it anew for
/// every small batch (a custom plan of one record looks cheaper than the
/// generic plan, which expects a thousand), 0.3 ms of planning per batch.
/// `LOCAL`, as the setting also governs unnamed statements: the batch's
/// read, which comes before it, and the next transaction's must stay
/// planned with their snapshots.
const FORCE_GENERIC_PLAN: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

/// A drain batch read ahead, and the cursor state it was read for.
struct Prefetched {
    relayed: String,
    target: String,
    cursor: i64,
    limit: i64,
    rows: Vec<PendingRow>,
}

/// The relay's statements, prepared once per connection: a batch is then two
/// pipelined round trips with no Parse/Describe per statement. `PEEK` and
/// `SELECT_BATCH` are not among them: they are sent unnamed, to be planned
/// with their snapshots each time (see `select_batch_params`).
/// `SELECT_BATCH_NOW` is, as it calls a function that plans its statement
/// for every call.
struct Prepared {
    acquire: Statement,
    renew: Statement,
    release: Statement,
    end_expired: Statement,
    lock_state_with_heads: Statement,
    select_batch_now: Statement,
    append: Statement,
    park: Statement,
}

impl Prepared {
    async fn on(client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        let all = futures_util::future::try_join_all(
            [
                ACQUIRE_LEASE,
                RENEW_LEASE,
                RELEASE_LEASE,
                END_EXPIRED_HOLDER,
                LOCK_STATE_WITH_HEADS,
                SELECT_BATCH_NOW,
                append::APPEND_BATCH,
                append::PARK_ROWS,
            ]
            .map(|sql| client.prepare(sql)),
        )
        .await?;
        let mut all = all.into_iter();
        let mut next = || all.next().expect("one statement each");
        Ok(Prepared {
            acquire: next(),
            renew: next(),
            release: next(),
            end_expired: next(),
            lock_state_with_heads: next(),
            select_batch_now: next(),
            append: next(),
            park: next(),
        })
    }
}

/// The relay role: the relay and its upkeep, their connections reserved
/// from `db`'s budget (a batch and its read-ahead, upkeep, and the LISTEN
/// for writers elsewhere).
pub fn role(db: &Db, lease_ttl: Duration) -> anyhow::Result<(Relay, Maintenance)> {
    db.reserve("relay (and its read-ahead)", 2)?;
    db.reserve("relay upkeep", 1)?;
    db.reserve("relay wake-ups (LISTEN outbox_written)", 1)?;
    let relay = Relay::new(
        db,
        RelayConfig {
            lease_ttl,
            ..RelayConfig::default()
        },
    );
    let maintenance = Maintenance::new(&relay);
    Ok((relay, maintenance))
}

/// The relay of one process. Call [`Relay::step`] (tests) or [`Relay::run`].
pub struct Relay {
    db: Db,
    config: RelayConfig,
    client: Option<(Client, Prepared)>,
    /// A second connection that reads the next drain batch while the
    /// current one commits (outbox rows in a drain are immutable).
    reader: Option<Client>,
    /// The next drain batch, read ahead.
    prefetched: Option<Prefetched>,
    role: Role,
    batch_size: i64,
    is_leader: Arc<AtomicBool>,
    wakeup: Wakeup,
}

impl Relay {
    /// A relay on `db` (its two connections are reserved by whoever builds
    /// the process's roles).
    pub fn new(db: impl Into<Db>, config: RelayConfig) -> Relay {
        let batch_size = config.min_batch;
        Relay {
            db: db.into(),
            config,
            client: None,
            reader: None,
            prefetched: None,
            role: Role::Standby,
            batch_size,
            is_leader: Arc::new(AtomicBool::new(false)),
            wakeup: Wakeup::default(),
        }
    }

    /// What wakes this relay when idle (share it with writers in this
    /// process).
    pub fn wakeup(&self) -> Wakeup {
        self.wakeup.clone()
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

    async fn client(&mut self) -> anyhow::Result<&mut (Client, Prepared)> {
        if self.client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
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
            let prepared = Prepared::on(&client)
                .await
                .context("preparing the relay's statements")?;
            self.client = Some((client, prepared));
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The read-ahead connection, connected when missing; None when it
    /// cannot be had (the relay then reads each batch itself).
    async fn take_reader(&mut self) -> Option<Client> {
        if let Some(reader) = self.reader.take().filter(|c| !c.is_closed()) {
            return Some(reader);
        }
        let connect = async {
            let client = self.db.connect().await?;
            let (bound, lock_wait) = session_bounds(self.config.lease_ttl);
            client
                .execute(SESSION_SETTINGS, &[&bound, &lock_wait])
                .await?;
            anyhow::Ok(client)
        };
        match connect.await {
            Ok(reader) => Some(reader),
            Err(e) => {
                tracing::debug!(
                    error = format!("{e:#}"),
                    "no read-ahead connection; reading batches in turn"
                );
                None
            }
        }
    }

    fn set_role(&mut self, role: Role) {
        // A batch read ahead belongs to the leadership that read it.
        self.prefetched = None;
        let leading = matches!(role, Role::Leader { .. });
        self.is_leader.store(leading, Ordering::Relaxed);
        metrics::relay_metrics().is_leader.set(i64::from(leading));
        self.role = role;
    }

    /// One unit of work: take the lease, renew it, or move one batch.
    ///
    /// After an error the in-memory view of the cursor may be stale (a
    /// commit whose answer was lost), so the relay steps down to standby;
    /// it takes its own lease back at once, re-reading the cursor.
    pub async fn step(&mut self) -> anyhow::Result<StepOutcome> {
        self.step_as(Cue::Poll).await
    }

    /// [`Relay::step`] after a wake-up: a writer said it committed, so the
    /// batch is read at once, cut at that statement's snapshot, without a
    /// peek first (one statement and one round trip less per wake-up).
    /// Only when the relayed snapshot had no transaction in progress (no
    /// late commits to look up); otherwise it peeks first, as `step` does.
    pub async fn step_woken(&mut self) -> anyhow::Result<StepOutcome> {
        self.step_as(Cue::Woken).await
    }

    async fn step_as(&mut self, cue: Cue) -> anyhow::Result<StepOutcome> {
        let result = self.try_step(cue).await;
        if result.is_err() {
            self.client = None;
            self.set_role(Role::Standby);
        }
        result
    }

    async fn try_step(&mut self, cue: Cue) -> anyhow::Result<StepOutcome> {
        let ttl = self.config.lease_ttl.as_secs_f64();
        let name = self.config.relay_name.clone();
        let (epoch, renewed_at) = match &self.role {
            Role::Standby => {
                let instance = self.config.instance_id.clone();
                let (client, prepared) = self.client().await?;
                let acquired = match client
                    .query_opt(&prepared.acquire, &[&name, &instance, &ttl])
                    .await
                {
                    Ok(row) => row,
                    Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                        // Someone holds the lease row. If its lease expired, it
                        // is frozen mid-batch: end its backend, take over next.
                        for row in client.query(&prepared.end_expired, &[&name]).await? {
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
                let relayed = Snapshot::parse(row.get(1))?;
                let drain = drain_from(row.get(2), row.get(3))?;
                tracing::info!(epoch, instance = %instance, "relay became leader");
                self.set_role(Role::Leader {
                    epoch,
                    renewed_at: Instant::now(),
                    relayed,
                    drain,
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
            let (client, prepared) = self.client().await?;
            let Some(row) = client
                .query_opt(&prepared.renew, &[&name, &epoch, &ttl, &peek, &peeked_from])
                .await?
            else {
                return Ok(self.lose_leadership(epoch));
            };
            let relayed = Snapshot::parse(row.get(0))?;
            let drain_now = drain_from(row.get(1), row.get(2))?;
            if let Role::Leader {
                renewed_at,
                relayed: mirror,
                drain,
                empty_peek,
                ..
            } = &mut self.role
            {
                *renewed_at = Instant::now();
                *mirror = relayed;
                *drain = drain_now;
                *empty_peek = None;
            }
        }

        let (relayed, draining) = match &self.role {
            Role::Leader { relayed, drain, .. } => (relayed.clone(), drain.is_some()),
            Role::Standby => unreachable!("handled above"),
        };
        // A woken read has no late commits to look up (see
        // `SELECT_BATCH_NOW`) only if no transaction was in progress at the
        // relayed snapshot; otherwise it peeks first, as a poll does (the
        // peek looks up only those that finished since, so a large writer
        // still open costs nothing).
        let target = if draining {
            Target::Drain
        } else if cue == Cue::Woken && relayed.in_progress.is_empty() {
            Target::Now
        } else {
            let (client, _) = self.client().await?;
            // Unnamed, so planned with this snapshot each time (see
            // `select_batch_params`).
            let row = client
                .query_typed(
                    PEEK,
                    &[
                        (&relayed.text, Type::TEXT),
                        (&relayed.in_progress_ids(), Type::TEXT_ARRAY),
                    ],
                )
                .await?
                .into_iter()
                .next()
                .context("the peek returned no row")?;
            let snapshot = Snapshot::parse(row.get(0))?;
            let found: bool = row.get(1);
            if let Role::Leader { empty_peek, .. } = &mut self.role {
                *empty_peek = (!found).then(|| snapshot.clone());
            }
            if !found {
                return Ok(StepOutcome::Idle);
            }
            Target::Peeked(snapshot)
        };
        // The batch's size and where it went, recorded once it committed.
        let span = tracing::info_span!(
            "relay.batch",
            epoch,
            appended = tracing::field::Empty,
            parked = tracing::field::Empty,
            partitions = tracing::field::Empty,
        );
        tracing::Instrument::instrument(self.move_batch(epoch, target), span).await
    }

    fn lose_leadership(&mut self, epoch: i64) -> StepOutcome {
        tracing::warn!(epoch, "relay lost its lease to another process");
        self.set_role(Role::Standby);
        StepOutcome::LostLeadership
    }

    /// Moves one batch of the difference between `relayed_snapshot` and the
    /// drain target (`target`: the drain in progress, a peeked snapshot, or
    /// the snapshot of the batch's own read), in two pipelined round trips
    /// within one transaction:
    ///
    /// 1. `BEGIN`, the batch, and the lease row locked at our epoch
    ///    (fencing) with the partition heads;
    /// 2. in one statement the heads advanced from what was read (it fails
    ///    if any moved), the records appended (fails unless all were), the
    ///    time index, the notification and the cursor; parked rows; `COMMIT`.
    ///
    /// A statement that fails aborts the transaction, so the `COMMIT` at the
    /// end of the pipeline rolls back; every result is checked.
    async fn move_batch(&mut self, epoch: i64, target: Target) -> anyhow::Result<StepOutcome> {
        let name = self.config.relay_name.clone();
        let ttl = self.config.lease_ttl.as_secs_f64();
        let limit = self.batch_size;
        let (min_batch, max_batch) = (self.config.min_batch, self.config.max_batch);
        let (relayed, drain) = match &self.role {
            Role::Leader { relayed, drain, .. } => (relayed.clone(), drain.clone()),
            Role::Standby => anyhow::bail!("not the leader"),
        };
        // The target, unless the batch's read takes its own snapshot.
        let (known_target, cursor) = match (&drain, target) {
            (Some(d), _) => (Some(d.target.clone()), Some(d.cursor)),
            (None, Target::Peeked(t)) => (Some(t), None),
            (None, Target::Now) => (None, None),
            (None, Target::Drain) => anyhow::bail!("no drain is in progress"),
        };
        let known_text = known_target
            .as_ref()
            .map(|t| t.text.clone())
            .unwrap_or_default();
        // The late commits this drain looks up. A woken read's target is not
        // known yet, but it runs only with none in progress (so none).
        let late_commits = known_target
            .as_ref()
            .map(|t| relayed.completed_by(t))
            .unwrap_or_default();
        let read_ahead = self.prefetched.take().and_then(|p| {
            let wanted = (&relayed.text, &known_text, cursor, limit);
            (wanted == (&p.relayed, &p.target, Some(p.cursor), p.limit)).then_some(p.rows)
        });
        let mut reader = if drain.is_some() || read_ahead.is_some() {
            self.take_reader().await
        } else {
            self.reader.take()
        };
        let (client, prepared) = self.client().await?;

        // Round trip 1 (the batch's rows were read ahead mid-drain). The lock
        // goes after the read: the topics it returns with the heads must
        // include every topic the read's snapshot sees, or a woken read
        // (whose snapshot is its own) could park a row of a topic created
        // meanwhile as unknown.
        let lock_params: [&(dyn ToSql + Sync); 2] = [&name, &epoch];
        let select_params =
            select_batch_params(&relayed.text, &known_text, &cursor, &limit, &late_commits);
        let select_now_params: [&(dyn ToSql + Sync); 2] = [&relayed.text, &limit];
        let (begun, rows, state_and_heads) = tokio::join!(
            client.batch_execute("BEGIN"),
            async {
                match (read_ahead, &known_target) {
                    (Some(rows), _) => Ok((rows, None)),
                    (None, Some(_)) => client
                        .query_typed(SELECT_BATCH, &select_params)
                        .await
                        .map(|rows| (rows.iter().map(PendingRow::from_row).collect(), None)),
                    // Every row carries the snapshot; without rows to move,
                    // one row carries only it.
                    (None, None) => client
                        .query(&prepared.select_batch_now, &select_now_params)
                        .await
                        .map(|rows| {
                            let snapshot = rows.first().map(|row| row.get::<_, String>(5));
                            let batch = rows
                                .iter()
                                .filter(|row| row.get::<_, Option<i64>>(1).is_some())
                                .map(PendingRow::from_row)
                                .collect();
                            (batch, snapshot)
                        }),
                }
            },
            client.query(&prepared.lock_state_with_heads, &lock_params),
        );
        begun?;
        // A read that failed aborted the transaction, and the lock's
        // statement with it: the read's error is the one to report.
        let (batch, read_snapshot): (Vec<PendingRow>, Option<String>) =
            rows.context("selecting the next outbox batch")?;
        let state_and_heads = state_and_heads?;
        // Fencing: only the holder of the current epoch gets this row lock.
        let Some(state) = state_and_heads.first() else {
            client.batch_execute("ROLLBACK").await?;
            return Ok(self.lose_leadership(epoch));
        };
        let saved = drain_from(state.get(1), state.get(2))?;
        anyhow::ensure!(
            state.get::<_, &str>(0) == relayed.text && saved == drain,
            "the relay's cursor in the database is not the one it holds"
        );
        let read_its_own_snapshot = known_target.is_none();
        let target = match known_target {
            Some(target) => target,
            None => {
                Snapshot::parse(&read_snapshot.context("the batch's read returned no snapshot")?)?
            }
        };
        if batch.is_empty() && read_its_own_snapshot {
            // Woken with nothing new (its rows went with the last batch):
            // what a peek that found nothing records, and nothing to write.
            client.batch_execute("ROLLBACK").await?;
            self.reader = reader;
            if let Role::Leader { empty_peek, .. } = &mut self.role {
                *empty_peek = Some(target);
            }
            return Ok(StepOutcome::Idle);
        }
        let full = batch.len() as i64 == limit;
        let next_limit = if full {
            (limit * 2).min(max_batch)
        } else {
            (limit / 2).max(min_batch)
        };

        // Topics whose heads do not match their partition count are not
        // placed (a wrong count would move keys): their rows are parked.
        let mut topics: HashMap<String, (i32, Vec<AdvancedHead>)> = HashMap::new();
        for row in &state_and_heads {
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
        let partition_counts: HashMap<String, i32> = topics
            .iter()
            .filter(|(_, (count, heads))| heads.len() == *count as usize)
            .map(|(topic, (count, _))| (topic.clone(), *count))
            .collect();
        let mut plan = batch::plan(&batch, &partition_counts);
        let touched: Vec<AdvancedHead> = topics
            .values()
            .flat_map(|(_, heads)| heads)
            .filter(|h| {
                plan.per_partition
                    .contains_key(&(h.topic.as_str(), h.partition))
            })
            .map(|h| {
                let append = &plan.per_partition[&(h.topic.as_str(), h.partition)];
                AdvancedHead {
                    running_max_created_at: h.running_max_created_at.max(append.max_created_at),
                    ..h.clone()
                }
            })
            .collect();
        plan.set_heads(&touched)?;
        let records = plan.records();
        let appends = plan.per_partition.iter();
        let advance = (
            appends.clone().map(|(k, _)| k.0).collect::<Vec<&str>>(),
            appends.clone().map(|(k, _)| k.1).collect::<Vec<i32>>(),
            appends.clone().map(|(_, v)| v.count).collect::<Vec<i64>>(),
            appends
                .clone()
                .map(|(_, v)| v.max_created_at)
                .collect::<Vec<DateTime<Utc>>>(),
            appends
                .clone()
                .map(|(_, v)| v.base_offset)
                .collect::<Vec<i64>>(),
        );
        // The time index: one entry per partition appended to.
        let last_offsets: Vec<i64> = appends
            .clone()
            .map(|(_, v)| v.base_offset + v.count - 1)
            .collect();
        let running_max_created_at: Vec<DateTime<Utc>> =
            appends.map(|(_, v)| v.running_max_created_at).collect();
        let parked_ids: Vec<i64> = plan.parked.iter().map(|(r, _)| r.id).collect();
        let parked_reasons: Vec<String> = plan
            .parked
            .iter()
            .map(|(r, why)| match (why, topics.get(&r.topic)) {
                (Unplaceable::KeyTooLong, _) => format!(
                    "key of {} bytes is over the outbox's limit of {}",
                    r.key.as_ref().map_or(0, String::len),
                    crate::outbox::limits::KEY_MAX_BYTES
                ),
                (Unplaceable::UnknownTopic, Some((partitions, heads))) => format!(
                    "topic {:?} has {partitions} partitions but {} partition heads",
                    clip(&r.topic),
                    heads.len()
                ),
                (Unplaceable::UnknownTopic, None) => format!("unknown topic {:?}", clip(&r.topic)),
            })
            .collect();
        // Each partition appended to, with its new log end offset.
        let log_ends: Vec<(&str, i32, i64)> = plan
            .per_partition
            .iter()
            .map(|((topic, partition), append)| {
                (*topic, *partition, append.base_offset + append.count)
            })
            .collect();
        let notification = crate::log::notify::payload(&log_ends);

        // Advance the cursor: either mid-drain, or the drain is complete.
        let (new_relayed, new_drain, new_cursor) = if full {
            let last = batch.last().expect("a full batch is not empty");
            (
                relayed.text.clone(),
                Some(target.text.clone()),
                Some(last.id),
            )
        } else {
            (target.text.clone(), None, None)
        };

        // Round trip 2.
        let appending = !records.ids.is_empty();
        let id_bounds = (
            records.ids.iter().copied().min().unwrap_or(0),
            records.ids.iter().copied().max().unwrap_or(0),
        );
        let parking = !parked_ids.is_empty();
        let read_ahead_params = select_batch_params(
            &relayed.text,
            &target.text,
            &new_cursor,
            &next_limit,
            &late_commits,
        );
        // Mid-drain, the next batch is read on the other connection while
        // this one commits.
        let read_ahead = async {
            match (&reader, full) {
                (Some(reader), true) => Some(
                    reader
                        .query_typed(SELECT_BATCH, &read_ahead_params)
                        .await
                        .map(|rows| rows.iter().map(PendingRow::from_row).collect::<Vec<_>>()),
                ),
                _ => None,
            }
        };
        type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
        // See `append::APPEND_BATCH` for the parameters' order.
        let append_params: [Param; 22] = [
            &advance.0,
            &advance.1,
            &advance.2,
            &advance.3,
            &advance.4,
            &records.ids,
            &records.partitions,
            &records.offsets,
            &crate::outbox::RESERVED_HEADER_PREFIX,
            &crate::outbox::RETRY_OF_HEADER,
            &id_bounds.0,
            &id_bounds.1,
            &last_offsets,
            &running_max_created_at,
            &crate::log::notify::APPENDED_CHANNEL,
            &notification,
            &name,
            &epoch,
            &new_relayed,
            &new_drain,
            &new_cursor,
            &ttl,
        ];
        let park_params: [Param; 2] = [&parked_ids, &parked_reasons];
        // The append runs for every batch, as it saves the cursor; with no
        // records it appends nothing and sends no notification. It runs on
        // its generic plan (see `FORCE_GENERIC_PLAN`).
        let (read_ahead, (generic, appended, parked, committed)) =
            tokio::join!(read_ahead, async {
                tokio::join!(
                    client.batch_execute(FORCE_GENERIC_PLAN),
                    client.query_one(&prepared.append, &append_params),
                    only_if(parking, client.execute(&prepared.park, &park_params)),
                    client.batch_execute("COMMIT"),
                )
            });
        generic.context("choosing the append's generic plan")?;
        appended.context("appending the batch to the event log and saving the cursor")?;
        parked.context("parking outbox rows")?;
        committed.context("committing the relay batch")?;
        if appending {
            crate::log::notify::appended_here(self.db.url(), &log_ends);
        }
        match read_ahead {
            Some(Ok(rows)) => {
                self.prefetched = Some(Prefetched {
                    relayed: relayed.text.clone(),
                    target: target.text.clone(),
                    cursor: new_cursor.expect("read ahead only mid-drain"),
                    limit: next_limit,
                    rows,
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading ahead failed; the batch will be read in turn");
                reader = None;
            }
            None => {}
        }
        self.reader = reader;
        if parking {
            tracing::warn!(
                rows = parked_ids.len(),
                reason = %parked_reasons[0],
                "parked outbox rows that cannot be placed"
            );
        }
        let (placed, parked) = (plan.placed.len(), plan.parked.len());
        if placed + parked > 0 {
            let partitions: Vec<String> = plan
                .per_partition
                .keys()
                .map(|(topic, partition)| format!("{topic}:{partition}"))
                .collect();
            let span = tracing::Span::current();
            span.record("appended", placed);
            span.record("parked", parked);
            span.record("partitions", partitions.join(",").as_str());
        }
        let metrics = metrics::relay_metrics();
        metrics.batch_size.observe(batch.len() as f64);
        // Counted per partition, not per record: a drain's batch holds up to
        // `max_batch` records, and each label lookup hashes and locks.
        for ((topic, _), append) in &plan.per_partition {
            metrics
                .appended
                .with_label_values(&[*topic])
                .inc_by(append.count as u64);
        }
        let now = Utc::now();
        for (row, _) in &plan.placed {
            let age = (now - row.created_at).to_std().unwrap_or_default();
            metrics.commit_to_log_seconds.observe(age.as_secs_f64());
        }

        self.batch_size = next_limit;
        if let Role::Leader {
            relayed,
            drain,
            empty_peek,
            renewed_at,
            ..
        } = &mut self.role
        {
            *empty_peek = None;
            *renewed_at = Instant::now();
            if full {
                *drain = Some(Drain {
                    target,
                    cursor: batch.last().expect("a full batch is not empty").id,
                });
            } else {
                *drain = None;
                *relayed = target;
            }
        }
        Ok(StepOutcome::Moved {
            appended: placed,
            parked,
            drain_continues: full,
        })
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        if let Role::Leader { epoch, .. } = self.role {
            let name = self.config.relay_name.clone();
            self.set_role(Role::Standby);
            let (client, prepared) = self.client().await?;
            client.execute(&prepared.release, &[&name, &epoch]).await?;
            tracing::info!(epoch, "relay released its lease");
        }
        Ok(())
    }

    /// Runs steps until shutdown: back to back while there is work; idle,
    /// it waits for a wake-up (a writer in this process, or `NOTIFY
    /// outbox_written`) or polls with a pause that doubles from
    /// [`MIN_IDLE_PAUSE`] up to `idle_poll_max` (writers elsewhere that do
    /// not notify).
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut idle_pause = MIN_IDLE_PAUSE;
        let mut error_pause = Duration::from_millis(100);
        // Whether the last wait ended with a wake-up rather than a poll.
        let mut woken = false;
        while !shutdown.is_triggered() {
            let cue = if woken { Cue::Woken } else { Cue::Poll };
            // The first pause after a batch. Writers that woke the relay
            // will wake it again: between their wake-ups it polls at the
            // slow end. Rows found by polling come from writers that do not
            // wake it: poll fast again, as they may write more at once.
            let after_batch = if woken {
                self.config.idle_poll_max
            } else {
                MIN_IDLE_PAUSE
            };
            let (pause, wakeable) = match self.step_as(cue).await {
                // Caught up with the snapshot the batch was cut at: rows
                // committed since come with a wake-up (one that came during
                // the batch is kept) or are found by the next poll.
                Ok(StepOutcome::Moved {
                    drain_continues: false,
                    ..
                }) => {
                    idle_pause = (after_batch * 2).min(self.config.idle_poll_max);
                    error_pause = Duration::from_millis(100);
                    (after_batch, true)
                }
                Ok(StepOutcome::Moved { .. })
                | Ok(StepOutcome::BecameLeader { .. })
                | Ok(StepOutcome::LostLeadership) => {
                    idle_pause = after_batch;
                    error_pause = Duration::from_millis(100);
                    (Duration::ZERO, false)
                }
                Ok(StepOutcome::Idle) => {
                    let pause = idle_pause;
                    idle_pause = (idle_pause * 2).min(self.config.idle_poll_max);
                    error_pause = Duration::from_millis(100);
                    (pause, true)
                }
                Ok(StepOutcome::Standby) => (self.config.standby_poll, false),
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "relay step failed; retrying");
                    let pause = error_pause;
                    error_pause = (error_pause * 2).min(Duration::from_secs(5));
                    (pause, false)
                }
            };
            if !pause.is_zero() {
                let wakeup = self.wakeup.clone();
                tokio::select! {
                    _ = precise_sleep(pause) => woken = false,
                    _ = wakeup.woken(), if wakeable => {
                        woken = true;
                        idle_pause = MIN_IDLE_PAUSE;
                    }
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

/// The shortest pause of an idle relay between peeks.
pub const MIN_IDLE_PAUSE: Duration = Duration::from_micros(500);

/// Sleeps `pause`, honestly below a millisecond too: tokio's timer has a
/// millisecond's resolution (a "0.5 ms" sleep took about 2 ms), so short
/// pauses sleep on a blocking thread, whose timer is precise.
async fn precise_sleep(pause: Duration) {
    if pause >= Duration::from_millis(2) {
        tokio::time::sleep(pause).await;
    } else {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(pause)).await;
    }
}

/// The drain mirrored from `relay_state` (draining snapshot and cursor).
fn drain_from(target: Option<&str>, cursor: Option<i64>) -> anyhow::Result<Option<Drain>> {
    Ok(match target {
        Some(text) => Some(Drain {
            target: Snapshot::parse(text)?,
            cursor: cursor.unwrap_or(0),
        }),
        None => None,
    })
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

/// One statement of a pipelined batch, sent only when `wanted`. Nothing is
/// sent until the future is polled, so an unwanted one costs nothing and
/// the wanted ones keep their order in the pipeline.
async fn only_if<T>(
    wanted: bool,
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(), tokio_postgres::Error> {
    if wanted {
        statement.await.map(drop)
    } else {
        Ok(())
    }
}

/// The relay's SQL by name, its private submodules' included:
/// tests/it/sql.rs prepares each statement against the migrated schema.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    let mut all = Vec::new();
    all.extend(lease::statements());
    all.extend(drain::statements());
    all.extend(append::statements());
    all.extend(maintenance::statements());
    all.extend(parked::statements());
    all
}
