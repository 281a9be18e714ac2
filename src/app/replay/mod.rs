//! Replaying a topic (docs/invariants.md, 10): a time or offset range
//! becomes a run with a cursor of its own, never touching a live group,
//! that sends each event again to a [`ReplayTarget`]: the order
//! confirmation mail (`app::mail::MailReplay`) or a webhook sink
//! (`app::webhook::WebhookSink`).
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
//! * **Marked.** A replayed event carries the run's id and an id of its own
//!   (a mail's `X-Outbox-Replay` and Message-ID; a webhook's
//!   `outbox-relay-replay` and `webhook-id`), and goes out whatever the live
//!   group did with it.
//! * **One process per run.** A run is claimed with a session advisory lock
//!   on a dedicated connection: it is freed the moment its process dies,
//!   so a killed run can be resumed at once, and two processes never work
//!   on one run.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::group::delivery::RetryPolicy;
use crate::shutdown::Shutdown;
use ledger::RunLedger;
use partition::{replay_partition, PartitionJob};
use rate::RateLimit;
use runs::run_partitions;
pub use runs::{
    create_run, describe_run, find_unfinished, list_runs, newest_runs, Run, RunDeadLetter,
    RunDescription, RunPartition,
};

pub use send::{Outcome, ReplayTarget};
use send::{SendContext, TimeRange};

mod ledger;
mod partition;
mod rate;
mod runs;
mod send;

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
    pub retry: RetryPolicy,
    /// At most this many events per second (None: as fast as the target goes).
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

/// Runs (or resumes) run `run_id`, sending to `target`, until it is done
/// or `shutdown` fires.
pub async fn run<T: ReplayTarget>(
    database_url: &str,
    run_id: i64,
    target: Arc<T>,
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
    // What every event of the run needs, shared by all its partitions.
    let send = Arc::new(SendContext {
        run_id,
        target: target.clone(),
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
            target: target.clone(),
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
