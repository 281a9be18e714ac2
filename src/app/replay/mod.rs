//! Replaying a topic's order mails (docs/invariants.md, 10): a time or
//! offset range becomes a run with a cursor of its own, never touching the
//! live `mail-service` group.
//!
//! * **Plan.** The bounds become per-partition offset ranges from one
//!   reading of the partition heads ([`crate::log::ranges`]): a time is the
//!   first offset created at or after it (Kafka's offsetsForTimes), the end
//!   defaults to the log end captured then, so records appended later are
//!   not part of the run. The plan is stored with the run.
//! * **Once per run.** Each event is recorded in the run's ledger as
//!   `sending` (committed) before its SMTP exchange, then `sent`, `failed`
//!   or `unknown`. A resumed run skips what is settled, and also what is
//!   still `sending`: such an event was in flight when the run stopped, and
//!   may or may not have gone out. It is reported as *in doubt* and sent
//!   again only on request, so a run never mails an event twice.
//! * **Cursor.** Each partition's `next_offset` is the lowest offset not
//!   settled, saved every fraction of a second; a resumed run re-reads from
//!   there, which is at most the records in flight when it stopped.
//! * **Marked.** A replayed mail carries `X-Outbox-Replay: <run id>` and a
//!   Message-ID of its own, and goes out whatever the live ledger says.
//! * **One process per run.** A run is claimed with a session advisory lock
//!   on a dedicated connection: it is freed the moment its process dies,
//!   so a killed run can be resumed at once, and two processes never work
//!   on one run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::app::mail::Letterhead;
use anyhow::Context;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::app::mail::{
    render_replay, replay_message_id, MailTransport, OrderCreated, RetryPolicy, SendOutcome,
};
use crate::group::records::PartitionState;

use crate::log::Record;
use crate::shutdown::Shutdown;
use ledger::{RunLedger, Settle};
use rate::RateLimit;
use runs::run_partitions;
pub use runs::{
    create_run, describe_run, find_unfinished, list_runs, Run, RunDeadLetter, RunDescription,
    RunPartition,
};

mod ledger;
mod rate;
mod runs;

/// Advisory lock keys of runs: this plus the run id ("rply" in the high
/// bits keeps them clear of the schema lock's key).
const RUN_LOCK_BASE: i64 = 0x7270_6c79 << 32;

/// How often each partition's cursor is saved: what a resumed run may read
/// again is what settled since.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(100);

const CLAIM_RUN: &str = "SELECT pg_try_advisory_lock($1)";

const SET_STATE: &str = "
    UPDATE replay_runs SET state = $2, updated_at = now(),
           finished_at = CASE WHEN $2 = 'done' THEN now() END
     WHERE id = $1";

/// The run's ledger rows at or past the cursor (settled or in doubt).
const RUN_LEDGER_FROM: &str = "
    SELECT d.partition, d.\"offset\", d.status FROM replay_deliveries d
      JOIN replay_partitions p ON p.run_id = d.run_id AND p.partition = d.partition
     WHERE d.run_id = $1 AND d.\"offset\" >= p.next_offset";

const SAVE_CURSORS: &str = "
    UPDATE replay_partitions p SET next_offset = v.next_offset
      FROM unnest($2::int4[], $3::int8[]) AS v(partition, next_offset)
     WHERE p.run_id = $1 AND p.partition = v.partition AND p.next_offset < v.next_offset";

// ─── Running a replay ────────────────────────────────────────────────────────

/// Settings of one replay process.
#[derive(Clone)]
pub struct ReplaySettings {
    pub transport: MailTransport,
    pub letterhead: Letterhead,
    pub retry: RetryPolicy,
    /// At most this many mails per second (None: as fast as the SMTP pool goes).
    pub max_rate: Option<f64>,
    /// Send the events in doubt again (they may have gone out before).
    pub resend_in_doubt: bool,
    /// Records read ahead per partition.
    pub window: usize,
}

/// Live counters of a running replay, for a progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events of the run settled before this process started.
    pub already: AtomicU64,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub unknown: AtomicU64,
    /// Skipped because they were in flight when the run last stopped.
    pub in_doubt: AtomicU64,
    /// Read again on resuming although already settled.
    pub reread: AtomicU64,
    /// In the offset range but created outside the run's time range.
    pub outside: AtomicU64,
}

impl Progress {
    /// Events this process has settled or skipped.
    pub fn done(&self) -> u64 {
        [
            &self.already,
            &self.sent,
            &self.failed,
            &self.unknown,
            &self.in_doubt,
            &self.outside,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }
}

/// How a replay process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Finish {
    /// Every event of the plan is settled.
    Done,
    /// Stopped (Ctrl-C, SIGTERM): resume it later.
    Interrupted,
}

/// Runs (or resumes) run `run_id` until it is done or `shutdown` fires.
pub async fn run(
    database_url: &str,
    run_id: i64,
    settings: ReplaySettings,
    progress: Arc<Progress>,
    mut shutdown: Shutdown,
) -> anyhow::Result<Finish> {
    // The claim lives as long as this connection (and this process); it is
    // watched, and the run stops should the connection close under it.
    let claim = crate::db::connect(database_url).await?;
    let claimed: bool = claim
        .query_one(CLAIM_RUN, &[&(RUN_LOCK_BASE + run_id)])
        .await?
        .get(0);
    anyhow::ensure!(
        claimed,
        "replay run {run_id} is being worked on by another process"
    );
    let (stop_run, run_stop) = crate::shutdown::channel();
    let client = crate::db::connect(database_url).await?;
    let run = describe_run(&client, run_id).await?;
    client.execute(SET_STATE, &[&run_id, &"running"]).await?;

    // What is already settled (or in doubt) at or past each cursor.
    let mut settled: HashMap<(i32, i64), String> = HashMap::new();
    for row in client.query(RUN_LEDGER_FROM, &[&run_id]).await? {
        settled.insert((row.get(0), row.get(1)), row.get(2));
    }
    let already: i64 = run
        .partitions
        .iter()
        .map(|p| p.next_offset - p.from_offset)
        .sum();
    progress
        .already
        .store(already.max(0) as u64, Ordering::Relaxed);

    let time_range = TimeRange::of(&run.run.request);
    let pool = crate::db::pool(database_url, 4)?;
    let ledger = RunLedger::spawn(pool.clone(), run_id);
    let limiter = settings.max_rate.map(|rate| Arc::new(RateLimit::new(rate)));
    let settled = Arc::new(settled);
    let cursors: Arc<Mutex<BTreeMap<i32, i64>>> = Arc::default();
    // What every mail of the run needs, shared by all its partitions.
    let send = Arc::new(SendContext {
        run_id,
        time_range,
        settings: settings.clone(),
        ledger: ledger.clone(),
        limiter,
        settled,
        progress: progress.clone(),
        shutdown: run_stop.clone(),
    });
    let mut partitions = JoinSet::new();
    for p in run
        .partitions
        .iter()
        .filter(|p| p.next_offset < p.to_offset)
    {
        partitions.spawn(replay_partition(PartitionJob {
            pool: pool.clone(),
            topic: run.run.topic.clone(),
            partition: p.clone(),
            cursors: cursors.clone(),
            send: send.clone(),
            shutdown: run_stop.clone(),
        }));
    }
    if settings.resend_in_doubt {
        // Those behind a cursor are not read again by the partitions.
        let behind: Vec<(i32, i64)> = run
            .in_doubt_events
            .iter()
            .filter(|(p, o)| {
                run.partitions
                    .iter()
                    .any(|r| r.partition == *p && *o < r.next_offset)
            })
            .copied()
            .collect();
        // The same, for events in doubt wherever they were created.
        let context = Arc::new(SendContext {
            time_range: TimeRange::default(),
            limiter: send.limiter.clone(),
            settled: send.settled.clone(),
            settings: settings.clone(),
            ledger: ledger.clone(),
            progress: progress.clone(),
            shutdown: run_stop.clone(),
            run_id,
        });
        let reader = pool.clone();
        let topic = run.run.topic.clone();
        partitions.spawn(async move {
            for (partition, offset) in behind {
                let client = reader.get().await?;
                let record = crate::log::read(&**client, &topic, partition, offset, 1).await?;
                drop(client);
                if let Some(record) = record.into_iter().find(|r| r.offset == offset) {
                    context.replay_one(record).await;
                }
            }
            anyhow::Ok(())
        });
    }
    let mut failure = None;
    let mut save_every = tokio::time::interval(CURSOR_SAVE_INTERVAL);
    let mut claim_check = tokio::time::interval(Duration::from_secs(1));
    let mut stopping = false;
    loop {
        tokio::select! {
            joined = partitions.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { failure.get_or_insert(e); }
                Some(Err(e)) => { failure.get_or_insert(anyhow::anyhow!("a replay task failed: {e}")); }
            },
            _ = save_every.tick() => save_cursors(&client, run_id, &cursors).await?,
            // The partition tasks stop starting mails and wait for those in flight.
            _ = shutdown.recv(), if !stopping => {
                stopping = true;
                stop_run.trigger();
            }
            _ = claim_check.tick(), if !stopping && claim.is_closed() => {
                stopping = true;
                stop_run.trigger();
                failure.get_or_insert(anyhow::anyhow!(
                    "lost the claim on replay run {run_id} (its connection closed); resume it"
                ));
            }
        }
    }
    save_cursors(&client, run_id, &cursors).await?;
    if let Some(e) = failure {
        client
            .execute(SET_STATE, &[&run_id, &"interrupted"])
            .await?;
        return Err(e);
    }
    let finished = run_partitions(&client, run_id)
        .await?
        .iter()
        .all(|p| p.next_offset >= p.to_offset);
    let finish = if finished {
        Finish::Done
    } else {
        Finish::Interrupted
    };
    let state = if finished { "done" } else { "interrupted" };
    client.execute(SET_STATE, &[&run_id, &state]).await?;
    drop(claim);
    Ok(finish)
}

async fn save_cursors(
    client: &Client,
    run_id: i64,
    cursors: &Mutex<BTreeMap<i32, i64>>,
) -> anyhow::Result<()> {
    let (partitions, offsets): (Vec<i32>, Vec<i64>) = {
        let cursors = cursors.lock().expect("cursor lock");
        cursors.iter().map(|(p, o)| (*p, *o)).unzip()
    };
    if !partitions.is_empty() {
        client
            .execute(SAVE_CURSORS, &[&run_id, &partitions, &offsets])
            .await?;
    }
    Ok(())
}

struct PartitionJob {
    pool: deadpool_postgres::Pool,
    topic: String,
    partition: RunPartition,
    cursors: Arc<Mutex<BTreeMap<i32, i64>>>,
    send: Arc<SendContext>,
    shutdown: Shutdown,
}

/// The created-at range of a run bounded by time: `[from, to)`.
///
/// Its offsets start at the first record created at or after `from` (Kafka's
/// offsetsForTimes) and end at the log end captured when it started; records
/// in between that were created outside the range (CreateTime need not grow
/// with the offset) are skipped, so the run mails exactly the range.
#[derive(Debug, Clone, Copy, Default)]
struct TimeRange {
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
}

impl TimeRange {
    fn of(request: &serde_json::Value) -> TimeRange {
        let time = |field: &str| {
            request[field]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
        };
        TimeRange {
            from: time("from"),
            to: time("to"),
        }
    }

    fn contains(&self, created_at: chrono::DateTime<chrono::Utc>) -> bool {
        self.from.is_none_or(|from| created_at >= from) && self.to.is_none_or(|to| created_at < to)
    }
}

/// Reads one partition's range from its cursor and mails what is not
/// settled, records of one key one after another, others concurrently.
async fn replay_partition(mut job: PartitionJob) -> anyhow::Result<()> {
    let p = job.partition.partition;
    let end = job.partition.to_offset;
    let mut next = job.partition.next_offset;
    let mut state = PartitionState::default();
    let mut tasks: JoinSet<(i64, Option<String>, bool)> = JoinSet::new();
    let window = job.send.settings.window.max(1);
    loop {
        let stopping = job.shutdown.is_triggered();
        if !stopping && next < end && state.in_flight.len() < window {
            let room = (window - state.in_flight.len()).min(500) as i64;
            let client = job.pool.get().await?;
            let records = crate::log::read(&**client, &job.topic, p, next, room.min(end - next))
                .await
                .context("reading the partition")?;
            drop(client);
            if records.first().is_none_or(|first| first.offset >= end) {
                // Past the range, or retention moved the log start past it:
                // nothing left to read.
                next = end;
            }
            for record in records.into_iter().filter(|r| r.offset < end) {
                next = record.offset + 1;
                state.enqueue(record);
            }
        }
        if !stopping {
            for record in state.take_ready() {
                let send = job.send.clone();
                tasks.spawn(async move {
                    let (offset, key) = (record.offset, record.key.clone());
                    let settled = send.replay_one(record).await;
                    (offset, key, settled)
                });
            }
        }
        let cursor = state.committable(next);
        job.cursors.lock().expect("cursor lock").insert(p, cursor);
        if state.in_flight.is_empty() && (next >= end || stopping) {
            return Ok(());
        }
        if stopping && tasks.is_empty() {
            return Ok(());
        }
        let waiting_for_room = state.in_flight.len() >= window || next >= end || stopping;
        if waiting_for_room || !tasks.is_empty() {
            tokio::select! {
                Some(done) = tasks.join_next() => {
                    let (offset, key, settled) = done.context("a replayed mail's task failed")?;
                    if settled {
                        state.finish(offset, key);
                    }
                }
                _ = job.shutdown.recv(), if !stopping => {}
            }
        }
    }
}

/// What one mail's task needs: one per run, shared.
struct SendContext {
    run_id: i64,
    time_range: TimeRange,
    settings: ReplaySettings,
    ledger: RunLedger,
    limiter: Option<Arc<RateLimit>>,
    settled: Arc<HashMap<(i32, i64), String>>,
    progress: Arc<Progress>,
    shutdown: Shutdown,
}

impl SendContext {
    /// Settles one record of the run: skipped when the run's ledger says
    /// it is done (or in doubt), else mailed and recorded. False when the
    /// run stopped before its exchange began (nothing was done).
    async fn replay_one(&self, record: Record) -> bool {
        if !self.time_range.contains(record.created_at) {
            self.progress.outside.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let event = (record.partition, record.offset);
        match self.settled.get(&event).map(String::as_str) {
            Some("sending") if !self.settings.resend_in_doubt => {
                self.progress.in_doubt.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Some("sent") | Some("failed") | Some("unknown") => {
                self.progress.reread.fetch_add(1, Ordering::Relaxed);
                self.progress.already.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            _ => {}
        }
        let message_id = replay_message_id(self.run_id, &record);
        let settle = |status: &'static str,
                      attempts: i32,
                      reason: Option<String>,
                      error: Option<String>| Settle {
            partition: record.partition,
            offset: record.offset,
            status,
            message_id: message_id.clone(),
            attempts,
            reason,
            last_error: error,
        };
        let (order, to) = match OrderCreated::decode(&record.payload) {
            Ok(decoded) => decoded,
            Err(reason) => {
                self.ledger
                    .settle(settle("failed", 0, Some(reason), None))
                    .await;
                self.progress.failed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        };
        let message =
            match render_replay(self.run_id, &record, &order, &to, &self.settings.letterhead) {
                Ok(m) => m,
                Err(e) => {
                    let reason = format!("cannot render: {e:#}");
                    self.ledger
                        .settle(settle("failed", 0, Some(reason), None))
                        .await;
                    self.progress.failed.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
            };
        if let Some(limiter) = &self.limiter {
            let mut stop = self.shutdown.clone();
            tokio::select! {
                _ = limiter.wait() => {}
                _ = stop.recv() => {}
            }
        }
        // The exchange begins once the transport has a slot for it: only
        // then is the event written `sending`, so what a crash leaves in
        // doubt is at most the exchanges in flight (about the pool size),
        // not every record read ahead.
        let mut slot = Some(self.settings.transport.slot().await);
        // A stopping run starts no new exchange: the record stays unsettled
        // (below the cursor) for the resumed run.
        if self.shutdown.is_triggered() {
            return false;
        }
        // In the run's ledger before the exchange: after a crash it is in
        // doubt. A row the ledger refuses is not sent: it is settled failed.
        match self
            .ledger
            .sending(record.partition, record.offset, &message_id)
            .await
        {
            Ok(()) => {}
            Err(crate::db::batch::ItemError::Refused(error)) => {
                let reason = Some("the run's ledger refused its row".into());
                self.ledger
                    .settle(settle("failed", 0, reason, Some(error)))
                    .await;
                self.count_unsettled("failed");
                return true;
            }
            Err(crate::db::batch::ItemError::Stopped(_)) => return false,
        }
        let name = format!(
            "order-{}.replay-{}.{}.{}.{}",
            order.order_id, self.run_id, record.topic, record.partition, record.offset
        );
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let outcome = match slot.take() {
                Some(slot) => slot.send(message.clone(), &name).await,
                None => self.settings.transport.send(message.clone(), &name).await,
            };
            let error = match outcome {
                SendOutcome::Sent => {
                    self.ledger
                        .settle(settle("sent", attempts, None, None))
                        .await;
                    self.progress.sent.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                SendOutcome::Permanent(error) => {
                    let reason = Some("permanent SMTP failure".into());
                    self.ledger
                        .settle(settle("failed", attempts, reason, Some(error)))
                        .await;
                    self.count_unsettled("failed");
                    return true;
                }
                // The message reached the server and no final answer came:
                // it may have gone out. Like an event in doubt, it is not
                // sent again by this run (never twice).
                SendOutcome::Unknown(error) => {
                    let reason =
                        Some("no final answer to the message: it may have gone out".into());
                    self.ledger
                        .settle(settle("unknown", attempts, reason, Some(error)))
                        .await;
                    self.count_unsettled("unknown");
                    return true;
                }
                SendOutcome::Transient(error) => error,
            };
            if self.settings.retry.spent(attempts, started.elapsed()) {
                self.ledger
                    .settle(settle(
                        "failed",
                        attempts,
                        Some("retry budget spent".into()),
                        Some(error),
                    ))
                    .await;
                self.count_unsettled("failed");
                return true;
            }
            tokio::time::sleep(self.settings.retry.backoff(attempts - 1)).await;
        }
    }

    fn count_unsettled(&self, status: &str) {
        let counter = if status == "unknown" {
            &self.progress.unknown
        } else {
            &self.progress.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement.
pub(crate) fn statements() -> Vec<(&'static str, String)> {
    [
        ("app::replay::CLAIM_RUN", CLAIM_RUN),
        ("app::replay::SET_STATE", SET_STATE),
        ("app::replay::RUN_LEDGER_FROM", RUN_LEDGER_FROM),
        ("app::replay::SAVE_CURSORS", SAVE_CURSORS),
    ]
    .into_iter()
    .map(|(name, sql)| (name, sql.to_string()))
    .chain(ledger::statements())
    .chain(runs::statements())
    .collect()
}
