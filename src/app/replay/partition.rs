//! One partition of a run: its range read from the cursor, the records of
//! one key one after another, others concurrently, the cursor never past
//! an unsettled record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::task::JoinSet;

use super::send::{ReplayTarget, SendContext};
use super::RunPartition;
use crate::group::records::PartitionState;
use crate::shutdown::Shutdown;

pub(super) struct PartitionJob<T: ReplayTarget> {
    pub pool: deadpool_postgres::Pool,
    pub topic: String,
    pub partition: RunPartition,
    pub cursors: Arc<Mutex<BTreeMap<i32, i64>>>,
    pub send: Arc<SendContext<T>>,
    pub shutdown: Shutdown,
}

/// Reads one partition's range from its cursor and sends what is not
/// settled, records of one key one after another, others concurrently.
pub(super) async fn replay_partition<T: ReplayTarget>(
    mut job: PartitionJob<T>,
) -> anyhow::Result<()> {
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
                    let (offset, key, settled) = done.context("a replayed event's task failed")?;
                    if settled {
                        state.finish(offset, key);
                    }
                }
                _ = job.shutdown.recv(), if !stopping => {}
            }
        }
    }
}
