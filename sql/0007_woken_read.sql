-- The read of a woken relay (src/relay/drain.rs, `SELECT_BATCH_NOW`): the
-- first page of a drain whose target is the read's own snapshot. A function
-- so that its statement is parsed once per session (plpgsql keeps it), while
-- `plan_cache_mode` keeps it planned for every call with the relayed
-- snapshot folded in: a generic plan cannot see how narrow the transaction
-- id range is. Only for a relayed snapshot with no transaction in progress
-- (then there are no late commits to look up). Every row carries the target
-- snapshot; with nothing to move it is the only column set.
CREATE FUNCTION outbox_relay_read_woken(relayed text, batch_limit bigint)
RETURNS TABLE (txid text, id bigint, topic text, key text, created_at timestamptz, snapshot text)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    RETURN QUERY
    WITH target AS MATERIALIZED (SELECT pg_current_snapshot() AS snap),
    start AS MATERIALIZED (
        -- Just below the first row to move, so the page's walk of the id
        -- index does not start at the oldest row not yet cleaned up.
        SELECT coalesce(
            (SELECT min(o.id + 0) FROM outbox o
              WHERE o.txid >= pg_snapshot_xmax(relayed::pg_snapshot)
                AND o.txid <  pg_snapshot_xmax((SELECT snap FROM target))
                AND pg_visible_in_snapshot(o.txid, (SELECT snap FROM target))) - 1,
            0) AS after_id)
    SELECT batch.txid::text, batch.id, batch.topic, batch.key, batch.created_at, target.snap::text
      FROM target LEFT JOIN (
        SELECT o.txid, o.id, o.topic, o.key, o.created_at FROM outbox o
         WHERE o.id > (SELECT after_id FROM start)
           AND o.txid >= pg_snapshot_xmax(relayed::pg_snapshot)
           AND o.txid <  pg_snapshot_xmax((SELECT snap FROM target))
           AND pg_visible_in_snapshot(o.txid, (SELECT snap FROM target))
         ORDER BY o.id LIMIT batch_limit
      ) AS batch ON true
     ORDER BY batch.id;
END $$;
