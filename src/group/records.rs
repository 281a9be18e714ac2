//! Running a [`RecordHandler`] over the records of one owned partition.
//!
//! Records are read in offset order, up to a read-ahead window refilled
//! once half of it is free. Records with different keys are handled
//! concurrently (what they share, such as an SMTP pool, bounds them; a
//! record waiting out a retry backoff holds nothing); records with the
//! same key one after another, in offset order. The committed offset is
//! the lowest offset not yet finished, so a commit never passes unfinished
//! work (at-least-once, invariant 7).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::partition::{Lease, OwnedPartition, PartitionWork, Stop};
use crate::log::notify::Wake;
use crate::log::{self, Record};

/// Processes one record. It returns once the record is finished: done, or
/// parked as a dead letter. Transient failures are the handler's to retry.
pub trait RecordHandler: Send + Sync + 'static {
    /// `lease` says under which ownership the record was read: a handler
    /// that writes on the group's behalf fences those writes with it, as
    /// the offset commit is fenced (docs/invariants.md, 6).
    ///
    /// A handler is not aborted when its partition worker fails (it is
    /// when the partition is lost): the restarted worker may hand the same
    /// record to a second call while the first still runs, so a handler
    /// with side effects lets one call per record run at a time.
    fn handle(&self, record: Record, lease: Arc<Lease>) -> impl Future<Output = ()> + Send;

    /// Called once the member has stopped (its partitions committed and
    /// released, or abandoned): what the handler still holds, such as
    /// writes handed to a writer of its own, is finished or reported here.
    fn stopped(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// [`PartitionWork`] that runs a [`RecordHandler`] per record.
pub struct Records<H>(pub Arc<H>);

impl<H: RecordHandler> PartitionWork for Records<H> {
    async fn run_partition(self: Arc<Self>, partition: OwnedPartition) -> anyhow::Result<()> {
        run_partition(partition, self.0.clone()).await
    }

    async fn stopped(&self) {
        self.0.stopped().await
    }
}

/// Consumes one owned partition until told to stop or fenced.
async fn run_partition<H: RecordHandler>(
    partition: OwnedPartition,
    handler: Arc<H>,
) -> anyhow::Result<()> {
    let start = partition.start_offset().await;
    let OwnedPartition {
        pool,
        config,
        assignment,
        mut appended,
        mut stop,
    } = partition;
    // Records being handled. If this worker fails (a database error), they
    // are left to finish on their own rather than aborted mid-exchange: a
    // mail whose server already has it must still be recorded, and the
    // handler of the restarted worker waits for them (see `RecordHandler`).
    let mut tasks = JoinSet::new();
    let result: anyhow::Result<()> = async {
        let mut next = start?;
        let lease = Arc::new(Lease {
            group_id: config.group.group_id.clone(),
            member_id: config.group.member_id.clone(),
            topic: assignment.topic.clone(),
            partition: assignment.partition,
            epoch: assignment.epoch,
        });
        let mut partition = PartitionState::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(i64, Option<String>)>();
        let mut last_commit = Instant::now();
        let mut committed = None;
        let mut caught_up = false;
        let mut grace_deadline: Option<Instant> = None;
        let refill_at = config.max_in_flight_per_partition / 2;
        let handed_records = super::metrics::group_metrics()
            .handed_records
            .with_label_values(&[&config.group.group_id]);

        loop {
            let stopping = *stop.borrow();
            if stopping == Stop::Now {
                tasks.abort_all();
                return Ok(());
            }
            if stopping == Stop::Running {
                // Read ahead once half the window is free: a backlog is read
                // a few hundred records a statement, not one per record.
                if !caught_up && partition.in_flight.len() <= refill_at {
                    let room = (config.max_in_flight_per_partition - partition.in_flight.len()) as i64;
                    let asked = room.min(500);
                    let client = pool.get().await?;
                    let read_records = client.prepare_cached(&log::read::READ_RECORDS).await?;
                    let records =
                        log::read::read_with(&**client, &read_records, &assignment.topic, assignment.partition, next, asked)
                            .await
                            .context("reading the partition")?;
                    drop(client);
                    // A short read reached the end of the partition; what
                    // is appended later comes with a notification.
                    caught_up = (records.len() as i64) < asked;
                    for record in records {
                        next = record.offset + 1;
                        partition.enqueue(record);
                    }
                }
                // Start the head record of every idle key.
                for record in partition.take_ready() {
                    let (handler, done, lease) = (handler.clone(), done_tx.clone(), lease.clone());
                    tasks.spawn(async move {
                        let (offset, key) = (record.offset, record.key.clone());
                        handler.handle(record, lease).await;
                        let _ = done.send((offset, key));
                    });
                }
            }
            // Commit progress: the lowest unfinished offset (queued ones
            // included), or `next` when nothing is unfinished.
            let position = partition.committable(next);
            // The first commit is at once: with `latest`, the starting
            // position must be recorded before anything else happens.
            let commit_due =
                committed.is_none() || last_commit.elapsed() >= config.commit_interval || stopping != Stop::Running;
            if committed != Some(position) && commit_due {
                let client = pool.get().await?;
                if !crate::group::commit(&client, &config.group, &assignment, position).await? {
                    tracing::warn!(topic = %assignment.topic, partition = assignment.partition, "commit fenced: partition lost");
                    tasks.abort_all();
                    return Ok(());
                }
                committed = Some(position);
                last_commit = Instant::now();
            }
            if stopping == Stop::Gracefully && partition.running.is_empty() {
                return Ok(());
            }

            let more_to_read =
                stopping == Stop::Running && !caught_up && partition.in_flight.len() <= refill_at;
            let timer = match grace_deadline {
                Some(deadline) => deadline,
                // A full read: read on at once (after anything ready).
                None if more_to_read => Instant::now(),
                None if committed != Some(partition.committable(next)) => Instant::now() + config.commit_interval,
                // Idle: a slow poll in case a notification was missed.
                None => Instant::now() + Duration::from_secs(1),
            };
            tokio::select! {
                Some((offset, key)) = done_rx.recv() => partition.finish(offset, key),
                Some(joined) = tasks.join_next() => {
                    // A handler that panicked never finishes its record:
                    // stop here, uncommitted; the next heartbeat restarts
                    // the partition from its committed offset.
                    if let Err(e) = joined {
                        if e.is_panic() {
                            tasks.abort_all();
                            anyhow::bail!("a record handler panicked");
                        }
                    }
                }
                // Listening all along, records in flight or not: a wake-up
                // that comes while busy is kept for the next turn. Records
                // handed over by a relay of this process, starting where
                // this worker reads next, are taken as read (if the window
                // has room for them).
                wake = appended.past(next), if stopping == Stop::Running => match wake {
                    Wake::Handed(records)
                        if partition.in_flight.len() + records.len()
                            <= config.max_in_flight_per_partition =>
                    {
                        handed_records.inc_by(records.len() as u64);
                        for record in records.iter() {
                            next = record.offset + 1;
                            partition.enqueue(record.clone());
                        }
                    }
                    _ => caught_up = false,
                },
                changed = stop.changed() => match changed {
                    Ok(()) if *stop.borrow() == Stop::Gracefully => {
                        grace_deadline = Some(Instant::now() + config.shutdown_grace);
                    }
                    Ok(()) => {}
                    // The member is gone: nobody may commit for it any more.
                    Err(_) => {
                        tasks.abort_all();
                        return Ok(());
                    }
                },
                _ = tokio::time::sleep_until(timer) => {
                    if grace_deadline.is_some_and(|d| d <= Instant::now()) {
                        // Grace is over: abandon what still runs (it stays uncommitted).
                        tasks.abort_all();
                        partition.running.clear();
                    }
                    caught_up = false;
                }
            }
            // Everything else that finished meanwhile, at once: a finished
            // task's memory is freed only once it is joined, so joining
            // one per turn let a backlog pile up tens of thousands of them.
            while let Ok((offset, key)) = done_rx.try_recv() {
                partition.finish(offset, key);
            }
            while let Some(joined) = tasks.try_join_next() {
                if joined.is_err_and(|e| e.is_panic()) {
                    tasks.abort_all();
                    anyhow::bail!("a record handler panicked");
                }
            }
        }
    }
    .await;
    if result.is_err() {
        tasks.detach_all();
    }
    result
}

/// Per-partition bookkeeping: queued records per key, offsets in flight.
/// Records of one key run one after another in offset order; the lowest
/// unfinished offset is how far progress may be recorded. (Replays use it
/// too.)
#[derive(Default)]
pub(crate) struct PartitionState {
    /// Offsets read but not finished (queued, ready or running).
    pub(crate) in_flight: BTreeSet<i64>,
    /// Records waiting behind a running record of the same key.
    queues: HashMap<Option<String>, VecDeque<Record>>,
    /// Keys with a record running, and its offset.
    running: HashMap<Option<String>, i64>,
    /// Records that may start now (their key is idle).
    ready: Vec<Record>,
}

impl PartitionState {
    pub(crate) fn enqueue(&mut self, record: Record) {
        self.in_flight.insert(record.offset);
        let key = record.key.clone();
        if self.running.contains_key(&key) || self.ready.iter().any(|r| r.key == key) {
            self.queues.entry(key).or_default().push_back(record);
        } else {
            self.ready.push(record);
        }
    }

    /// Records to start now; their keys become busy.
    pub(crate) fn take_ready(&mut self) -> Vec<Record> {
        let ready = std::mem::take(&mut self.ready);
        for record in &ready {
            self.running.insert(record.key.clone(), record.offset);
        }
        ready
    }

    /// A record finished: the next one of its key becomes ready.
    pub(crate) fn finish(&mut self, offset: i64, key: Option<String>) {
        self.in_flight.remove(&offset);
        self.running.remove(&key);
        if let Some(queue) = self.queues.get_mut(&key) {
            if let Some(next) = queue.pop_front() {
                self.ready.push(next);
            }
            if queue.is_empty() {
                self.queues.remove(&key);
            }
        }
    }

    /// The offset to commit: the lowest unfinished one, else `next`.
    pub(crate) fn committable(&self, next: i64) -> i64 {
        self.in_flight.first().copied().unwrap_or(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, key: &str) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(key.into()),
            created_at: chrono::Utc::now(),
            appended_at: chrono::Utc::now(),
            headers: serde_json::json!({}),
            payload: serde_json::json!({}),
        }
    }

    #[test]
    fn keys_run_concurrently_in_order_and_commits_never_pass_unfinished_work() {
        let mut p = PartitionState::default();
        for (offset, key) in [(10, "a"), (11, "b"), (12, "a"), (13, "c")] {
            p.enqueue(record(offset, key));
        }
        let started: Vec<i64> = p.take_ready().iter().map(|r| r.offset).collect();
        assert_eq!(started, vec![10, 11, 13], "one record per key at a time");
        p.finish(11, Some("b".into()));
        p.finish(13, Some("c".into()));
        assert_eq!(
            p.committable(14),
            10,
            "10 is unfinished: commit stays below it"
        );
        assert!(p.take_ready().is_empty(), "12 waits for 10 (same key)");
        p.finish(10, Some("a".into()));
        assert_eq!(p.committable(14), 12);
        assert_eq!(
            p.take_ready().iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![12]
        );
        p.finish(12, Some("a".into()));
        assert_eq!(p.committable(14), 14);
    }
}
