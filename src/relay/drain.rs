//! Which outbox rows move next: those visible in a newer snapshot and not in
//! `relayed_snapshot` (PgQ's two-snapshot difference), in outbox id order,
//! and the cursor that records how far a drain got.

use tokio_postgres::types::{ToSql, Type};

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

/// This module's SQL by name: tests/it/sql.rs prepares each statement
/// against the migrated schema.
pub(super) fn statements() -> Vec<(&'static str, String)> {
    vec![
        ("relay::drain::SELECT_BATCH", SELECT_BATCH.to_string()),
        ("relay::drain::PEEK", PEEK.to_string()),
    ]
}
