//! The Postgres side of an append: advancing the partition heads, copying
//! rows from the outbox into the log (payloads never leave Postgres), the
//! sparse time index, and parking rows that cannot be placed.

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
///   appended any;
/// - saves the relay's cursor and extends its lease at our epoch (`$17`,
///   `$18`: relay and epoch; `$19`..`$21`: relayed snapshot, draining
///   snapshot, cursor id; `$22`: lease seconds); fails unless the row was
///   updated.
///
/// It runs for every batch, one with no records too (it only parks rows, or
/// moves none): then it saves the cursor alone.
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
        RETURNING 1),
    indexed AS (
        INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
        SELECT * FROM unnest($1::text[], $2::int4[], $5::int8[], $13::int8[], $14::timestamptz[])),
    saved AS (
        UPDATE relay_state
           SET relayed_snapshot = $19::text::pg_snapshot,
               draining_snapshot = $20::text::pg_snapshot,
               cursor_id = $21,
               lease_expires_at = clock_timestamp() + make_interval(secs => $22)
         WHERE relay = $17 AND epoch = $18
        RETURNING 1)
    SELECT outbox_relay_assert((SELECT count(*) FROM advanced) = cardinality($1::text[]),
                               'partition heads moved under the relay'),
           outbox_relay_assert((SELECT count(*) FROM appended) = cardinality($6::int8[]),
                               'fewer records appended than outbox rows'),
           outbox_relay_assert((SELECT count(*) FROM saved) = 1, 'the relay cursor was not saved'),
           CASE WHEN cardinality($6::int8[]) > 0 THEN pg_notify($15, $16) END";

pub(super) const PARK_ROWS: &str = "
    INSERT INTO outbox_parked (outbox_id, topic, key, payload, headers, created_at, reason, retry_of)
    SELECT o.id, o.topic, o.key, o.payload, o.headers, o.created_at, v.reason,
           (SELECT r.retry_of FROM outbox_retries r WHERE r.outbox_id = o.id)
      FROM unnest($1::int8[], $2::text[]) AS v(id, reason)
      JOIN outbox o ON o.id = v.id
    ON CONFLICT (outbox_id) DO NOTHING";

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::append::APPEND_BATCH", APPEND_BATCH.to_string()),
        ("relay::append::PARK_ROWS", PARK_ROWS.to_string()),
    ]
}
