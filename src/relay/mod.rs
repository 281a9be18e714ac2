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
//!   Woken faster than 400 rows a second, it gathers: a batch starts no
//!   sooner than `gather` after the last began (`pacing::Gathering`).
//! * **Few round trips.** Statements are prepared once per connection; a
//!   batch is two pipelined round trips, its `COMMIT` included.
//! * **Two batches at once in a drain.** A second connection reads the next
//!   batch while the current one commits and writes its records in a
//!   transaction of its own; that batch's heads and cursor follow once the
//!   one before committed and the lock found the heads where its offsets
//!   continue from (otherwise it rolls back): two cores append at once.

mod append;
pub mod batch;
mod connection;
mod drain;
mod leadership;
mod lease;
mod maintenance;
mod metrics;
mod mover;
mod pacing;
pub mod parked;
pub mod snapshot;
mod wakeup;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::db::Db;
use crate::shutdown::Shutdown;
use connection::{Prepared, Second};
use drain::PEEK;
pub use lease::{instance_id, status, RelayStatus, DEFAULT_RELAY_NAME};
pub use maintenance::{delete_relayed_outbox_rows, Maintenance};
use mover::Prefetched;
pub use pacing::MIN_IDLE_PAUSE;
use pacing::{precise_sleep, Gathering, Pacing};
pub use snapshot::Snapshot;
pub use wakeup::{OutboxWritten, Wakeup};

/// How long a busy relay gathers rows for a batch unless configured
/// (`serve --relay-gather-ms`).
pub const DEFAULT_GATHER: Duration = Duration::from_millis(10);

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
    /// How long a busy relay gathers rows for its next batch (see
    /// `pacing::Gathering`); zero never waits.
    pub gather: Duration,
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
            gather: DEFAULT_GATHER,
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

/// The relay role: the relay and its upkeep, their connections reserved
/// from `db`'s budget (a batch and its second connection, upkeep, and the LISTEN
/// for writers elsewhere).
pub fn role(
    db: &Db,
    lease_ttl: Duration,
    gather: Duration,
) -> anyhow::Result<(Relay, Maintenance)> {
    db.reserve("relay (and its second connection)", 2)?;
    db.reserve("relay upkeep", 1)?;
    db.reserve("relay wake-ups (LISTEN outbox_written)", 1)?;
    let relay = Relay::new(
        db,
        RelayConfig {
            lease_ttl,
            gather,
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
    /// `client`'s backend, whose notifications this process's listeners
    /// skip (its batches are announced here directly).
    announcing: Option<crate::log::notify::AnnouncingBackend>,
    /// A second connection that reads the next drain batch while the
    /// current one commits (outbox rows in a drain are immutable), and
    /// writes batches ahead (see `mover`).
    second: Option<Second>,
    /// The next drain batch, read ahead (and perhaps written ahead, in an
    /// open transaction on the second connection).
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
            announcing: None,
            second: None,
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

    fn set_role(&mut self, role: Role) {
        // A batch read ahead belongs to the leadership that read it (one
        // written ahead is rolled back as its connection closes).
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
            // A batch whose commit's answer was lost is not announced here:
            // from now on its connection's `NOTIFY`s are not skipped (one
            // that came before the error was; the workers' slow poll finds
            // that batch).
            self.announcing = None;
            self.set_role(Role::Standby);
        }
        result
    }

    async fn try_step(&mut self, cue: Cue) -> anyhow::Result<StepOutcome> {
        let (epoch, renewed_at) = match &self.role {
            Role::Standby => return self.take_lease().await,
            Role::Leader {
                epoch, renewed_at, ..
            } => (*epoch, *renewed_at),
        };
        if renewed_at.elapsed() >= self.config.lease_ttl / 3 && !self.renew_lease(epoch).await? {
            return Ok(self.lose_leadership(epoch));
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

    /// Runs steps until shutdown, paced by `pacing`: back to back while
    /// there is work; idle, it waits for a wake-up (a writer in this
    /// process, or `NOTIFY outbox_written`) or polls.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut pacing = Pacing::new(self.config.idle_poll_max, self.config.standby_poll);
        let mut gathering = Gathering::new(self.config.gather);
        // Whether the last wait ended with a wake-up rather than a poll.
        let mut woken = false;
        while !shutdown.is_triggered() {
            let cue = if woken { Cue::Woken } else { Cue::Poll };
            if woken {
                let wait = gathering.wait(Instant::now());
                if !wait.is_zero() {
                    tokio::select! {
                        _ = precise_sleep(wait) => {}
                        _ = shutdown.recv() => {}
                    }
                }
            }
            let started = Instant::now();
            let outcome = self.step_as(cue).await;
            if let (
                true,
                Ok(StepOutcome::Moved {
                    appended,
                    drain_continues: false,
                    ..
                }),
            ) = (woken, &outcome)
            {
                gathering.moved(started, *appended);
            }
            if let Err(e) = &outcome {
                tracing::warn!(error = format!("{e:#}"), "relay step failed; retrying");
            }
            let pause = pacing.after(outcome.as_ref().map_err(drop), woken);
            if !pause.length.is_zero() {
                let wakeup = self.wakeup.clone();
                tokio::select! {
                    _ = precise_sleep(pause.length) => woken = false,
                    _ = wakeup.woken(), if pause.wakeable => {
                        woken = true;
                        pacing.woken();
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
    let mut all = Vec::new();
    all.extend(lease::statements());
    all.extend(drain::statements());
    all.extend(append::statements());
    all.extend(maintenance::statements());
    all.extend(parked::statements());
    all
}
