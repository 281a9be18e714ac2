//! Which outbox rows move next: those visible in a newer snapshot and not in
//! `relayed_snapshot` (PgQ's two-snapshot difference), in outbox id order,
//! and the cursor that records how far a drain got.

use tokio_postgres::types::{ToSql, Type};

use super::batch::PendingRow;

/// One page of a drain: rows visible in the target snapshot ($2) and not in
/// the relayed one ($1), after outbox id $3, in id (insert) order.
///
/// Two branches so each is an index scan: transactions that started after
/// the relayed snapshot, and those in progress in it that the target sees
/// complete ($5, computed in Rust so the planner sees how few they are).
///
/// A new drain has no cursor yet ($3 NULL): it starts just below the
/// smallest outbox id it holds, so neither branch walks the id index up
/// from the oldest relayed row (`id + 0` keeps that lookup on the
/// transaction id side, the narrow one).
pub(super) const SELECT_BATCH: &str = "
    WITH start AS MATERIALIZED (
        SELECT coalesce($3::int8, least(
            (SELECT min(o.id + 0) FROM outbox o
              WHERE o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
                AND o.txid <  pg_snapshot_xmax($2::text::pg_snapshot)
                AND pg_visible_in_snapshot(o.txid, $2::text::pg_snapshot)),
            (SELECT min(o.id + 0) FROM outbox o WHERE o.txid = ANY ($5::text[]::xid8[]))
        ) - 1, 0) AS after_id)
    SELECT batch.id, batch.topic, batch.key, batch.created_at FROM (
        (SELECT o.id, o.topic, o.key, o.created_at FROM outbox o
          WHERE o.id > (SELECT after_id FROM start)
            AND o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
            AND o.txid <  pg_snapshot_xmax($2::text::pg_snapshot)
            AND pg_visible_in_snapshot(o.txid, $2::text::pg_snapshot)
          ORDER BY o.id LIMIT $4)
        UNION ALL
        (SELECT o.id, o.topic, o.key, o.created_at FROM outbox o
          WHERE o.txid = ANY ($5::text[]::xid8[]) AND o.id > (SELECT after_id FROM start)
          ORDER BY o.id LIMIT $4)
    ) AS batch
    ORDER BY batch.id LIMIT $4";

/// The first page of a drain whose target is the read's own snapshot, for
/// a relay that was woken (a writer told it something committed): the peek
/// and the read in one statement. `$1` is the relayed snapshot, `$2` the
/// limit. Every row carries the target snapshot; with nothing to move it is
/// the only column set (one row, the outbox columns NULL).
///
/// Only for a relayed snapshot with no transaction in progress: then every
/// transaction below its `xmax` was complete and relayed, so there are no
/// late commits to look up, and this is `SELECT_BATCH`'s first branch
/// alone. The statement is a function (migration 7) so that it is parsed
/// once per session; it runs on a generic plan without sequential scans
/// (migration 8), which reads the transaction id index whatever the outbox
/// held when the plan was built (docs/relay.md). This call is prepared
/// once per connection.
pub(super) const SELECT_BATCH_NOW: &str = "SELECT * FROM outbox_relay_read_woken($1, $2)";

/// Read-only check an idle leader runs: the current snapshot, and whether
/// any outbox row became visible since `relayed_snapshot` ($1, with its
/// in-progress transaction ids as $2). Only in-progress transactions that
/// have since completed are looked up, so a large open writer costs nothing.
pub(super) const PEEK: &str = "
    WITH cur AS (SELECT pg_current_snapshot() AS snap)
    SELECT cur.snap::text,
           EXISTS (SELECT 1 FROM outbox o
                    WHERE o.txid >= pg_snapshot_xmax($1::text::pg_snapshot)
                      AND o.txid <  pg_snapshot_xmax(cur.snap)
                      AND pg_visible_in_snapshot(o.txid, cur.snap))
        OR EXISTS (SELECT 1 FROM unnest($2::text[]::xid8[]) AS x
                    WHERE pg_visible_in_snapshot(x, cur.snap)
                      AND EXISTS (SELECT 1 FROM outbox o WHERE o.txid = x))
    FROM cur";

/// [`SELECT_BATCH`]'s parameters with their types: it is sent unnamed
/// (`query_typed`, one round trip), so each execution is planned with its
/// snapshots, as [`PEEK`] is; a generic plan cannot see how narrow the
/// transaction id range is and may scan the outbox.
pub(super) fn select_batch_params<'a>(
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

/// The rows of [`SELECT_BATCH_NOW`]: the batch, and the snapshot it was
/// cut at. Every row carries the snapshot; without rows to move, one row
/// carries only it.
pub(super) fn woken_batch(rows: &[tokio_postgres::Row]) -> (Vec<PendingRow>, Option<String>) {
    let snapshot = rows.first().map(|row| row.get::<_, String>("snapshot"));
    let batch = rows
        .iter()
        .filter(|row| row.get::<_, Option<i64>>("id").is_some())
        .map(PendingRow::from_row)
        .collect();
    (batch, snapshot)
}

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::drain::SELECT_BATCH", SELECT_BATCH.to_string()),
        (
            "relay::drain::SELECT_BATCH_NOW",
            SELECT_BATCH_NOW.to_string(),
        ),
        ("relay::drain::PEEK", PEEK.to_string()),
    ]
}
