//! The Postgres side of an append: advancing the partition heads, copying
//! rows from the outbox into the log (payloads never leave Postgres), the
//! sparse time index, and parking rows that cannot be placed.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::batch::{AdvancedHead, BatchPlan, Records, Unplaceable};
use crate::clip::clip;

type Param<'a> = &'a (dyn ToSql + Sync);

/// Appends a batch in one statement, then wakes its readers:
///
/// - advances the heads it appends to (`$1`..`$5`: topic, partition, count,
///   newest `created_at`, base offset), each from the log end offset it was
///   read at: should any have moved, the statement fails;
/// - copies the rows from the outbox into the log (`$6`..`$8`: outbox id,
///   partition, offset); payloads never leave Postgres. The headers are the
///   writer's minus those in the reserved namespace (the prefix `$9`; the
///   slow path runs only for rows that mention it), plus the retry header
///   (`$10`) for a row `dead-letters retry` wrote (its link is in
///   `outbox_retries`, looked up per row only if the batch's id range has
///   any: rows without one are nearly all). Fails unless every row was
///   appended. `$11` and `$12` are the batch's lowest and highest outbox
///   ids: the records are joined to the outbox's primary key over that
///   range, and without the bound a merge join's scan starts at the oldest
///   outbox row on every batch (a million-row backlog read its whole index
///   per batch). The records are read by subscript over `generate_series`
///   rather than `unnest`: the generic plan then expects a thousand rows,
///   not ten, and joins them to that range in one pass (a merge or a hash
///   join, as the statistics were when it was built) instead of probing the
///   index once per record; subscripts are also cheaper than unnesting
///   three arrays (docs/benchmarks.md);
/// - writes the sparse time index, one entry per partition (`$13`: last
///   offset, `$14`: running newest `created_at`);
/// - `NOTIFY $15` with `$16` naming the partitions and their new log end
///   offsets (see [`crate::log::notify`]), delivered at commit, if it
///   advanced any head;
/// - saves the relay's cursor and extends its lease at our epoch (`$17`,
///   `$18`: relay and epoch; `$19`..`$21`: relayed snapshot, draining
///   snapshot, cursor id; `$22`: lease seconds) if `$25`; fails unless the
///   row was updated then;
/// - returns the transaction's time (the records' `appended_at`) and, when
///   `$23` asks and the records' headers and payloads take at most `$24`
///   bytes as stored (summed before anything is gathered), their outbox
///   ids, headers and payloads in id order: what a relay hands to the
///   consumers of its own process so that they need not read back what it
///   just wrote ([`Handover`]). Without `$23` the appended rows' headers
///   and payloads are not kept for the result at all.
///
/// It runs for every batch, one with no records too (it only parks rows, or
/// moves none): then it saves the cursor alone (unless `$25` is false: the
/// first part of a batch written ahead, below).
///
/// A drain's batch may be written ahead in two parts (see
/// [`Append::records_only`]): its records first, on the relay's second
/// connection while the batch before it commits (nothing of it locked:
/// no head, no cursor, no time index); then, once that batch committed
/// and the lock found the heads where the records' offsets continue from,
/// the rest without the records ([`Append::without_records`]).
///
/// A failure aborts the transaction, so the batch's `COMMIT` rolls back.
/// One statement rather than five: each statement costs the server a
/// portal, an executor start and a flush of its own.
pub(super) const APPEND_BATCH: &str = "
    WITH advanced AS (
        UPDATE partition_heads h
           SET log_end_offset = h.log_end_offset + v.n,
               max_created_at = greatest(h.max_created_at, v.max_created_at)
          FROM unnest($1::text[], $2::int4[], $3::int8[], $4::timestamptz[], $5::int8[])
               AS v(topic, partition, n, max_created_at, base)
         WHERE h.topic = v.topic AND h.partition = v.partition AND h.log_end_offset = v.base
        RETURNING 1),
    appended AS (
        INSERT INTO event_log (topic, partition, \"offset\", key, headers, payload, created_at, appended_at, outbox_id)
        SELECT o.topic, v.partition, v.log_offset, o.key,
               CASE WHEN strpos(o.headers::text, $9::text) = 0 THEN o.headers
                    ELSE (SELECT coalesce(jsonb_object_agg(h.key, h.value), '{}'::jsonb)
                            FROM jsonb_each(o.headers) AS h
                           WHERE NOT starts_with(h.key, $9::text)) END
                 || CASE WHEN (SELECT EXISTS (SELECT 1 FROM outbox_retries x
                                               WHERE x.outbox_id BETWEEN $11 AND $12))
                         THEN coalesce((SELECT jsonb_build_object($10::text, r.retry_of)
                                          FROM outbox_retries r WHERE r.outbox_id = o.id), '{}'::jsonb)
                         ELSE '{}'::jsonb END,
               o.payload, o.created_at, now(), o.id
          FROM (SELECT ($6::int8[])[i] AS id, ($7::int4[])[i] AS partition, ($8::int8[])[i] AS log_offset
                  FROM generate_series(1, cardinality($6::int8[])) AS i) AS v
          JOIN outbox o ON o.id = v.id
         WHERE o.id BETWEEN $11 AND $12
        RETURNING outbox_id, CASE WHEN $23::bool THEN headers END AS headers,
                  CASE WHEN $23::bool THEN payload END AS payload),
    indexed AS (
        INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
        SELECT * FROM unnest($1::text[], $2::int4[], $5::int8[], $13::int8[], $14::timestamptz[])),
    saved AS (
        UPDATE relay_state
           SET relayed_snapshot = $19::text::pg_snapshot,
               draining_snapshot = $20::text::pg_snapshot,
               cursor_id = $21,
               lease_expires_at = clock_timestamp() + make_interval(secs => $22)
         WHERE relay = $17 AND epoch = $18 AND $25::bool
        RETURNING 1),
    stored AS (
        SELECT sum(pg_column_size(a.headers) + pg_column_size(a.payload)) AS bytes
          FROM appended a WHERE $23::bool),
    handed AS (
        SELECT array_agg(a.outbox_id ORDER BY a.outbox_id) AS ids,
               array_agg(a.headers ORDER BY a.outbox_id) AS headers,
               array_agg(a.payload ORDER BY a.outbox_id) AS payloads
          FROM appended a
         WHERE $23::bool AND (SELECT bytes FROM stored) <= $24::int8
        HAVING count(*) > 0)
    SELECT outbox_relay_assert((SELECT count(*) FROM advanced) = cardinality($1::text[]),
                               'partition heads moved under the relay'),
           outbox_relay_assert((SELECT count(*) FROM appended) = cardinality($6::int8[]),
                               'fewer records appended than outbox rows'),
           outbox_relay_assert((SELECT count(*) FROM saved) = CASE WHEN $25::bool THEN 1 ELSE 0 END,
                               'the relay cursor was not saved'),
           CASE WHEN cardinality($1::text[]) > 0 THEN pg_notify($15, $16) END,
           now(), (SELECT ids FROM handed), (SELECT headers FROM handed),
           (SELECT payloads FROM handed)";

pub(super) const PARK_ROWS: &str = "
    INSERT INTO outbox_parked (outbox_id, topic, key, payload, headers, created_at, reason, retry_of)
    SELECT o.id, o.topic, o.key, o.payload, o.headers, o.created_at, v.reason,
           (SELECT r.retry_of FROM outbox_retries r WHERE r.outbox_id = o.id)
      FROM unnest($1::int8[], $2::text[]) AS v(id, reason)
      JOIN outbox o ON o.id = v.id
    ON CONFLICT (outbox_id) DO NOTHING";

/// Where the relay's cursor goes with a batch (`$17`..`$22` of
/// [`APPEND_BATCH`]).
pub(super) struct CursorUpdate<'a> {
    pub relay: &'a str,
    pub epoch: i64,
    pub relayed: String,
    pub draining: Option<String>,
    pub cursor: Option<i64>,
    pub lease_seconds: f64,
}

/// [`APPEND_BATCH`]'s parameters for a planned batch whose heads are set.
pub(super) struct Append<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    counts: Vec<i64>,
    max_created_at: Vec<DateTime<Utc>>,
    base_offsets: Vec<i64>,
    pub records: Records,
    id_bounds: (i64, i64),
    last_offsets: Vec<i64>,
    running_max_created_at: Vec<DateTime<Utc>>,
    notification: String,
    cursor: CursorUpdate<'a>,
    hand_over: bool,
    save_cursor: bool,
}

/// Most bytes of headers and payloads (as stored, so compressed ones count
/// compressed) a batch hands to the consumers of its process; a larger
/// batch is read back by them from the log. With [`HANDOVER_MAX_RECORDS`]
/// it bounds the statement's result and what announcements hold (each
/// partition's newest handed records, decompressed and parsed).
pub(super) const HANDOVER_MAX_BYTES: i64 = 64 * 1024;

/// Most records a batch hands over: only the small batches of live
/// traffic are; a drain's (full) batches never are.
pub(super) const HANDOVER_MAX_RECORDS: usize = 256;

impl<'a> Append<'a> {
    /// `hand_over`: the batch's records are asked back for the consumers
    /// of this process (see [`Handover`]).
    pub fn new(plan: &'a BatchPlan<'a>, cursor: CursorUpdate<'a>, hand_over: bool) -> Append<'a> {
        let appends = &plan.per_partition;
        let records = plan.records();
        let id_bounds = (
            records.ids.iter().copied().min().unwrap_or(0),
            records.ids.iter().copied().max().unwrap_or(0),
        );
        Append {
            topics: appends.keys().map(|k| k.0).collect(),
            partitions: appends.keys().map(|k| k.1).collect(),
            counts: appends.values().map(|v| v.count).collect(),
            max_created_at: appends.values().map(|v| v.max_created_at).collect(),
            base_offsets: appends.values().map(|v| v.base_offset).collect(),
            records,
            id_bounds,
            // The time index: one entry per partition appended to.
            last_offsets: appends
                .values()
                .map(|v| v.base_offset + v.count - 1)
                .collect(),
            running_max_created_at: appends.values().map(|v| v.running_max_created_at).collect(),
            notification: crate::log::notify::payload(&plan.log_ends()),
            cursor,
            hand_over,
            save_cursor: true,
        }
    }

    /// The first part of a batch written ahead: its records alone, in the
    /// batch's own transaction, while the batch before it commits. It
    /// locks nothing that batch holds (no head, no cursor, no time index),
    /// so the two inserts run side by side; its heads and cursor follow in
    /// [`Append::without_records`] once that batch committed, or the
    /// transaction rolls back.
    /// `cursor` is not saved, but its snapshots must parse (the statement
    /// casts them whether or not it saves them).
    pub fn records_only(plan: &'a BatchPlan<'a>, cursor: CursorUpdate<'a>) -> Append<'a> {
        let mut append = Append::new(plan, cursor, false);
        append.topics.clear();
        append.partitions.clear();
        append.counts.clear();
        append.max_created_at.clear();
        append.base_offsets.clear();
        append.last_offsets.clear();
        append.running_max_created_at.clear();
        append.save_cursor = false;
        append
    }

    /// The second part of a batch written ahead: heads, time index,
    /// notification and cursor, its records being in the log already.
    pub fn without_records(mut self) -> Append<'a> {
        self.records = Records::default();
        self.hand_over = false;
        self
    }

    /// In [`APPEND_BATCH`]'s order.
    pub fn params(&self) -> [Param<'_>; 25] {
        [
            &self.topics,
            &self.partitions,
            &self.counts,
            &self.max_created_at,
            &self.base_offsets,
            &self.records.ids,
            &self.records.partitions,
            &self.records.offsets,
            &crate::outbox::RESERVED_HEADER_PREFIX,
            &crate::outbox::RETRY_OF_HEADER,
            &self.id_bounds.0,
            &self.id_bounds.1,
            &self.last_offsets,
            &self.running_max_created_at,
            &crate::log::notify::APPENDED_CHANNEL,
            &self.notification,
            &self.cursor.relay,
            &self.cursor.epoch,
            &self.cursor.relayed,
            &self.cursor.draining,
            &self.cursor.cursor,
            &self.cursor.lease_seconds,
            &self.hand_over,
            &HANDOVER_MAX_BYTES,
            &self.save_cursor,
        ]
    }
}

/// What [`APPEND_BATCH`] gave back: when the records were appended, and
/// the headers and payloads of those it handed over, by outbox id.
pub(super) struct Handover {
    pub appended_at: DateTime<Utc>,
    pub records: Option<HashMap<i64, (serde_json::Value, serde_json::Value)>>,
}

impl Handover {
    pub fn from_row(row: &tokio_postgres::Row) -> Handover {
        let ids: Option<Vec<i64>> = row.get(5);
        let headers: Option<Vec<serde_json::Value>> = row.get(6);
        let payloads: Option<Vec<serde_json::Value>> = row.get(7);
        let records = match (ids, headers, payloads) {
            (Some(ids), Some(headers), Some(payloads)) => Some(
                ids.into_iter()
                    .zip(headers.into_iter().zip(payloads))
                    .collect(),
            ),
            _ => None,
        };
        Handover {
            appended_at: row.get(4),
            records,
        }
    }
}

/// [`PARK_ROWS`]'s parameters: the rows a batch cannot place, and why.
pub(super) struct Park {
    pub ids: Vec<i64>,
    pub reasons: Vec<String>,
}

impl Park {
    /// `topics`: every topic with its partition count and the heads found.
    pub fn new(plan: &BatchPlan<'_>, topics: &HashMap<String, (i32, Vec<AdvancedHead>)>) -> Park {
        let reason =
            |row: &super::batch::PendingRow, why: &Unplaceable| match (why, topics.get(&row.topic))
            {
                (Unplaceable::KeyTooLong, _) => format!(
                    "key of {} bytes is over the outbox's limit of {}",
                    row.key.as_ref().map_or(0, String::len),
                    crate::outbox::limits::KEY_MAX_BYTES
                ),
                (Unplaceable::UnknownTopic, Some((partitions, heads))) => format!(
                    "topic {:?} has {partitions} partitions but {} partition heads",
                    clip(&row.topic),
                    heads.len()
                ),
                (Unplaceable::UnknownTopic, None) => {
                    format!("unknown topic {:?}", clip(&row.topic))
                }
            };
        Park {
            ids: plan.parked.iter().map(|(row, _)| row.id).collect(),
            reasons: plan
                .parked
                .iter()
                .map(|(row, why)| reason(row, why))
                .collect(),
        }
    }

    pub fn params(&self) -> [Param<'_>; 2] {
        [&self.ids, &self.reasons]
    }
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::append::APPEND_BATCH", APPEND_BATCH.to_string()),
        ("relay::append::PARK_ROWS", PARK_ROWS.to_string()),
    ]
}
