//! A woken relay's batch in one round trip: `BEGIN`, one function call and
//! `COMMIT`, pipelined. The function (`outbox_relay_move_woken`, migration
//! 12) reads what committed since the relayed snapshot with its own
//! snapshot, locks the lease row at our epoch, places each row as
//! [`batch::plan`] would (Kafka's murmur2 in SQL), numbers it from its
//! partition's head and appends the batch with its notification and cursor.
//!
//! This is the batch of a live rate: a few rows, each of a known topic. For
//! anything else the function writes nothing and says why; the relay then
//! moves the batch up to the same snapshot the two-round-trip way
//! ([`Relay::move_batch`], which parks, drains and shortens notifications).

use anyhow::Context;
use tokio_postgres::types::ToSql;

use super::append::{Handover, HANDOVER_MAX_BYTES, HANDOVER_MAX_RECORDS};
use super::batch::{self, PendingRow};
use super::mover::{handed_over, record_batch};
use super::{Relay, Role, Snapshot, StepOutcome};

/// The woken batch; its parameters are [`Relay::move_woken`]'s.
pub(super) const MOVE_WOKEN: &str =
    "SELECT * FROM outbox_relay_move_woken($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// What a woken batch did.
pub(super) enum Woken {
    /// Done: the step's outcome.
    Done(StepOutcome),
    /// Nothing written; the batch is to be moved up to this snapshot the
    /// two-round-trip way.
    Unfit(Snapshot),
}

impl Relay {
    /// Moves a woken batch in one round trip, or leaves it (see the module's
    /// doc). Only with no drain in progress and no transaction in progress
    /// at the relayed snapshot (as the woken read requires).
    pub(super) async fn move_woken(&mut self, epoch: i64) -> anyhow::Result<Woken> {
        let name = self.config.relay_name.clone();
        let relayed = match &self.role {
            Role::Leader {
                relayed,
                drain: None,
                ..
            } => relayed.text.clone(),
            _ => anyhow::bail!("a woken batch needs a leader with no drain in progress"),
        };
        // Nothing read ahead is for a woken batch: a drain's leftovers roll
        // back.
        self.prefetched = None;
        let limit = self.batch_size;
        let ttl = self.config.lease_ttl.as_secs_f64();
        // The consumers of this process take the records from the result
        // rather than read them back.
        let hand_over = crate::log::notify::listened_here(self.db.url());
        let max_records = HANDOVER_MAX_RECORDS as i32;
        let max_notification = crate::log::notify::MAX_PAYLOAD as i32;
        let max_key = crate::outbox::limits::KEY_MAX_BYTES as i32;
        let params: [&(dyn ToSql + Sync); 13] = [
            &name,
            &epoch,
            &relayed,
            &limit,
            &ttl,
            &crate::outbox::RESERVED_HEADER_PREFIX,
            &crate::outbox::RETRY_OF_HEADER,
            &crate::log::notify::APPENDED_CHANNEL,
            &hand_over,
            &max_records,
            &HANDOVER_MAX_BYTES,
            &max_notification,
            &max_key,
        ];
        let (client, prepared) = self.client().await?;
        let (begun, moved, committed) = tokio::join!(
            client.batch_execute("BEGIN"),
            client.query_one(&prepared.move_woken, &params),
            client.batch_execute("COMMIT"),
        );
        begun?;
        // A failed call aborted the transaction (its COMMIT rolled back):
        // its error is the one to report.
        let row = moved.context("moving a woken batch")?;
        committed.context("committing a woken batch")?;

        let outcome: String = row.get("outcome");
        if outcome == "fenced" {
            return Ok(Woken::Done(self.lose_leadership(epoch)));
        }
        let snapshot = Snapshot::parse(
            row.get::<_, Option<&str>>("snapshot")
                .context("the woken batch returned no snapshot")?,
        )?;
        match outcome.as_str() {
            "moved" => {}
            "idle" => {
                // Woken with nothing new (its rows went with the last
                // batch): what a peek that found nothing records.
                if let Role::Leader { empty_peek, .. } = &mut self.role {
                    *empty_peek = Some(snapshot);
                }
                return Ok(Woken::Done(StepOutcome::Idle));
            }
            _ => return Ok(Woken::Unfit(snapshot)),
        }

        let rows = pending_rows(&row)?;
        let partitions: Vec<i32> = row.get("partitions");
        let offsets: Vec<i64> = row.get("offsets");
        let plan = batch::placed_in_postgres(&rows, &partitions, &offsets)?;
        crate::log::notify::appended_here(
            self.db.url(),
            &handed_over(&plan, &plan.records(), Handover::from_row(&row)),
        );
        record_batch(&plan, rows.len());

        self.batch_size = (limit / 2).max(self.config.min_batch);
        if let Role::Leader {
            relayed,
            empty_peek,
            renewed_at,
            ..
        } = &mut self.role
        {
            *empty_peek = None;
            *renewed_at = std::time::Instant::now();
            *relayed = snapshot;
        }
        Ok(Woken::Done(StepOutcome::Moved {
            appended: rows.len(),
            parked: 0,
            drain_continues: false,
        }))
    }
}

/// The batch's rows, in outbox id order, from the function's arrays.
fn pending_rows(row: &tokio_postgres::Row) -> anyhow::Result<Vec<PendingRow>> {
    let ids: Vec<i64> = row.get("ids");
    let topics: Vec<String> = row.get("topics");
    let keys: Vec<Option<String>> = row.get("keys");
    let created_ats: Vec<chrono::DateTime<chrono::Utc>> = row.get("created_ats");
    anyhow::ensure!(
        ids.len() == topics.len() && ids.len() == keys.len() && ids.len() == created_ats.len(),
        "a woken batch's columns differ in length"
    );
    Ok(ids
        .into_iter()
        .zip(topics)
        .zip(keys)
        .zip(created_ats)
        .map(|(((id, topic), key), created_at)| PendingRow {
            id,
            topic,
            key,
            created_at,
        })
        .collect())
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![("relay::woken::MOVE_WOKEN", MOVE_WOKEN.to_string())]
}
