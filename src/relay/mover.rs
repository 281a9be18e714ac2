//! Moving one batch: the difference between `relayed_snapshot` and the
//! drain's target, read (or read ahead), placed, appended with the cursor,
//! and committed, in two pipelined round trips within one transaction.
//!
//! Mid-drain, two batches are in flight: while batch N commits on the
//! relay's connection, the second connection reads batch N+1 and, if it
//! comes back full, begins its transaction and writes its records (offsets
//! continuing from where N leaves the heads). N+1 then runs on the second
//! connection: its lock waits for nothing (N committed), finds the heads
//! where its records continue from (or the batch fails and rolls back), and
//! its heads, time index and cursor commit with it, while the first
//! connection reads N+2. So on two cores two batches' inserts overlap.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use chrono::Utc;
use tokio_postgres::types::ToSql;

use super::append::{Append, CursorUpdate, Handover, Park, HANDOVER_MAX_RECORDS};
use super::batch::{self, PendingRow, Records, TopicHeads};
use super::connection::Second;
use super::drain::{select_batch_params, woken_batch, SELECT_BATCH};
use super::lease::LockedState;
use super::{drain_from, metrics, Drain, Relay, Role, Snapshot, StepOutcome, Target};
use crate::log::Record;

/// A drain batch read ahead, and the cursor state it was read for.
pub(super) struct Prefetched {
    relayed: String,
    target: String,
    cursor: i64,
    limit: i64,
    rows: Vec<PendingRow>,
    /// Its records written already, in an open transaction on the second
    /// connection (held here meanwhile; dropping it rolls them back).
    written_ahead: Option<WrittenAhead>,
}

/// A batch whose records are written on the second connection, its heads
/// and cursor not yet.
pub(super) struct WrittenAhead {
    second: Second,
    records: Records,
}

impl Relay {
    /// Moves one batch of the difference between `relayed_snapshot` and the
    /// drain target (`target`: the drain in progress, a peeked snapshot, or
    /// the snapshot of the batch's own read), in two pipelined round trips
    /// within one transaction:
    ///
    /// 1. `BEGIN`, the batch (unless read ahead), and the lease row locked
    ///    at our epoch (fencing) with the partition heads;
    /// 2. in one statement the heads advanced from what was read (it fails
    ///    if any moved), the records appended (fails unless all were), the
    ///    time index, the notification and the cursor; parked rows; `COMMIT`.
    ///
    /// A batch written ahead (see the module's doc) runs on the second
    /// connection, in the transaction that wrote its records: round trip 1
    /// is the lock alone, and round trip 2 leaves the records out.
    ///
    /// A statement that fails aborts the transaction, so the `COMMIT` at the
    /// end of the pipeline rolls back; every result is checked.
    pub(super) async fn move_batch(
        &mut self,
        epoch: i64,
        target: Target,
    ) -> anyhow::Result<StepOutcome> {
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
        let prefetched = self.prefetched.take().filter(|p| {
            let wanted = (&relayed.text, &known_text, cursor, limit);
            wanted == (&p.relayed, &p.target, Some(p.cursor), p.limit)
        });
        let (read_ahead, written_ahead) = match prefetched {
            Some(p) => (Some(p.rows), p.written_ahead),
            None => (None, None),
        };
        // A batch written ahead runs on the second connection, which holds
        // its transaction; the first then reads the next batch.
        let mut second = if written_ahead.is_some() {
            None
        } else if drain.is_some() || read_ahead.is_some() {
            self.take_second().await
        } else {
            self.second.take()
        };
        let listened_here = crate::log::notify::listened_here(self.db.url());
        let (first, first_prepared) = self.client().await?;
        let (client, prepared) = match &written_ahead {
            Some(ahead) => (&ahead.second.client, &ahead.second.prepared),
            None => (&*first, &*first_prepared),
        };

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
            only_if(written_ahead.is_none(), client.batch_execute("BEGIN")),
            async {
                match (read_ahead, &known_target) {
                    (Some(rows), _) => Ok((rows, None)),
                    (None, Some(_)) => client
                        .query_typed(SELECT_BATCH, &select_params)
                        .await
                        .map(|rows| (rows.iter().map(PendingRow::from_row).collect(), None)),
                    (None, None) => client
                        .query(&prepared.select_batch_now, &select_now_params)
                        .await
                        .map(|rows| woken_batch(&rows)),
                }
            },
            client.query(&prepared.lock_state_with_heads, &lock_params),
        );
        begun?;
        // A read that failed aborted the transaction, and the lock's
        // statement with it: the read's error is the one to report.
        let (batch, read_snapshot): (Vec<PendingRow>, Option<String>) =
            rows.context("selecting the next outbox batch")?;
        // Fencing: only the holder of the current epoch gets this row lock.
        let Some(state) = LockedState::from_rows(&state_and_heads?) else {
            client.batch_execute("ROLLBACK").await?;
            return Ok(self.lose_leadership(epoch));
        };
        let saved = drain_from(state.draining.as_deref(), state.cursor)?;
        anyhow::ensure!(
            state.relayed == relayed.text && saved == drain,
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
            self.second = second;
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
        let mut plan = batch::plan(&batch, &state.partition_counts());
        plan.set_heads(&batch::touched_heads(&state.topics, &plan))?;

        // Advance the cursor: either mid-drain, or the drain is complete.
        let new_cursor = full.then(|| batch.last().expect("a full batch is not empty").id);
        let (new_relayed, new_drain) = if full {
            (relayed.text.clone(), Some(target.text.clone()))
        } else {
            (target.text.clone(), None)
        };
        // The consumers of this process take a small batch's records from
        // the append's result rather than read them back (never a drain's
        // full batch: its rows would be gathered only to be dropped).
        let hand_over = listened_here
            && !full
            && !plan.placed.is_empty()
            && plan.placed.len() <= HANDOVER_MAX_RECORDS;
        let append = Append::new(
            &plan,
            CursorUpdate {
                relay: &name,
                epoch,
                relayed: new_relayed,
                draining: new_drain,
                cursor: new_cursor,
                lease_seconds: ttl,
            },
            hand_over,
        );
        let park = Park::new(&plan, &state.topics);
        let appending = !append.records.ids.is_empty();
        let append = match &written_ahead {
            // Written with the offsets the heads found now give, or not at
            // all: a head that moved, or a topic created since the batch was
            // planned that some of its rows are for, fails the batch and
            // rolls it back (the relay then reads it again from its cursor).
            Some(ahead) => {
                if append.records != ahead.records {
                    client.batch_execute("ROLLBACK").await?;
                    anyhow::bail!("the log moved under a batch written ahead");
                }
                append.without_records()
            }
            None => append,
        };

        // Round trip 2.
        let parking = !park.ids.is_empty();
        let read_ahead_params = select_batch_params(
            &relayed.text,
            &target.text,
            &new_cursor,
            &next_limit,
            &late_commits,
        );
        // Mid-drain, the next batch is read on the other connection while
        // this one commits, and written ahead when the second connection
        // read it.
        let ahead_reader = match (&written_ahead, &second) {
            (Some(_), _) => Some(&*first),
            (None, Some(second)) => Some(&second.client),
            (None, None) => None,
        };
        let write_ahead_on = second.as_ref().filter(|_| full && written_ahead.is_none());
        let heads_after = write_ahead_on.map(|_| batch::heads_after(&state.topics, &plan));
        let read_ahead = async {
            let reader = ahead_reader.filter(|_| full)?;
            let rows: Vec<PendingRow> =
                match reader.query_typed(SELECT_BATCH, &read_ahead_params).await {
                    Ok(rows) => rows.iter().map(PendingRow::from_row).collect(),
                    Err(e) => return Some(Err(e)),
                };
            let written = match (write_ahead_on, &heads_after) {
                (Some(second), Some(heads)) if rows.len() as i64 == next_limit => {
                    let unsaved = CursorUpdate {
                        relay: &name,
                        epoch,
                        relayed: relayed.text.clone(),
                        draining: None,
                        cursor: None,
                        lease_seconds: ttl,
                    };
                    Some(write_ahead(second, &rows, heads, unsaved).await)
                }
                _ => None,
            };
            Some(Ok((rows, written)))
        };
        let append_params = append.params();
        let park_params = park.params();
        // The append runs for every batch, as it saves the cursor; with no
        // records it appends nothing and sends no notification. It runs on
        // its generic plan (the lock set it, see `LOCK_STATE_WITH_HEADS`).
        let (read_ahead, (appended, parked, committed)) = tokio::join!(read_ahead, async {
            tokio::join!(
                client.query_one(&prepared.append, &append_params),
                only_if(parking, client.execute(&prepared.park, &park_params)),
                client.batch_execute("COMMIT"),
            )
        });
        let appended =
            appended.context("appending the batch to the event log and saving the cursor")?;
        parked.context("parking outbox rows")?;
        committed.context("committing the relay batch")?;
        if appending {
            let handover = Handover::from_row(&appended);
            crate::log::notify::appended_here(
                self.db.url(),
                &handed_over(&plan, &append, handover),
            );
        }
        match read_ahead {
            Some(Ok((rows, written))) => {
                let written_ahead = match written {
                    Some(Ok(records)) => {
                        second.take().map(|second| WrittenAhead { second, records })
                    }
                    Some(Err(e)) => {
                        tracing::debug!(
                            error = format!("{e:#}"),
                            "writing ahead failed; the batch will be written in turn"
                        );
                        second = None;
                        None
                    }
                    None => None,
                };
                self.prefetched = Some(Prefetched {
                    relayed: relayed.text.clone(),
                    target: target.text.clone(),
                    cursor: new_cursor.expect("read ahead only mid-drain"),
                    limit: next_limit,
                    rows,
                    written_ahead,
                });
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading ahead failed; the batch will be read in turn");
                if written_ahead.is_none() {
                    second = None;
                }
            }
            None => {}
        }
        // The second connection, back from the batch it ran.
        self.second = second.or(written_ahead.map(|ahead| ahead.second));
        if parking {
            tracing::warn!(
                rows = park.ids.len(),
                reason = %park.reasons[0],
                "parked outbox rows that cannot be placed"
            );
        }
        let (placed, parked) = (plan.placed.len(), plan.parked.len());
        record_batch(&plan, batch.len());

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
            *renewed_at = std::time::Instant::now();
            match new_cursor {
                Some(cursor) => *drain = Some(Drain { target, cursor }),
                None => {
                    *drain = None;
                    *relayed = target;
                }
            }
        }
        Ok(StepOutcome::Moved {
            appended: placed,
            parked,
            drain_continues: full,
        })
    }
}

/// Writes a drain's next batch's records ahead on the second connection:
/// placed and numbered on `heads` (the heads as the batch committing now
/// leaves them), in a transaction begun for it and left open. The records
/// written, to check against what the batch's own lock finds. `unsaved`:
/// any cursor of this relay (it is not saved).
async fn write_ahead(
    second: &Second,
    rows: &[PendingRow],
    heads: &TopicHeads,
    unsaved: CursorUpdate<'_>,
) -> anyhow::Result<Records> {
    let mut plan = batch::plan(rows, &batch::partition_counts(heads));
    plan.set_heads(&batch::touched_heads(heads, &plan))?;
    let append = Append::records_only(&plan, unsaved);
    let params = append.params();
    let (begun, appended) = tokio::join!(
        second.client.batch_execute("BEGIN"),
        second.client.query_one(&second.prepared.append, &params),
    );
    begun.context("beginning a batch written ahead")?;
    appended.context("writing a batch's records ahead")?;
    Ok(append.records)
}

/// Each partition the committed batch appended to, with its new log end
/// offset and, if the append handed them over, its records in offset
/// order: the announcement for the consumers of this process.
fn handed_over<'a>(
    plan: &'a batch::BatchPlan<'a>,
    append: &Append<'_>,
    handover: Handover,
) -> Vec<(&'a str, i32, i64, Option<Arc<[Record]>>)> {
    let mut by_partition: HashMap<(&str, i32), Vec<Record>> = HashMap::new();
    if let Some(mut contents) = handover.records {
        let placed = plan.placed.iter().zip(&append.records.offsets);
        for ((row, partition), &offset) in placed {
            let Some((headers, payload)) = contents.remove(&row.id) else {
                // Not what was appended: hand nothing over (the consumers read).
                by_partition.clear();
                break;
            };
            by_partition
                .entry((row.topic.as_str(), *partition))
                .or_default()
                .push(Record {
                    topic: row.topic.clone(),
                    partition: *partition,
                    offset,
                    key: row.key.clone(),
                    created_at: row.created_at,
                    appended_at: handover.appended_at,
                    headers,
                    payload,
                });
        }
    }
    plan.log_ends()
        .into_iter()
        .map(|(topic, partition, end)| {
            let records = by_partition
                .remove(&(topic, partition))
                .map(|records| Arc::<[Record]>::from(records));
            (topic, partition, end, records)
        })
        .collect()
}

/// A committed batch in the trace (its span's fields) and the metrics.
fn record_batch(plan: &batch::BatchPlan<'_>, rows: usize) {
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
    metrics.batch_size.observe(rows as f64);
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
