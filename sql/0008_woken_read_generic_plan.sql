-- The woken read (migration 7) on a generic plan, cached per session: it
-- was planned for every call (force_custom_plan), and planning cost about
-- three times its execution (0.58 against 0.16 ms a call in pgbench on a
-- two-core machine), once per order at a steady rate.
--
-- A generic plan is built once per session from the statistics of that
-- moment, without the snapshots. Built on an empty outbox, it scanned the
-- whole table: 650 ms a call once a million rows were in it, until an
-- ANALYZE replaced it. Without sequential scans it reads the transaction id
-- index over the range and sorts the page by id, whatever the outbox held
-- when it was built: 0.3–0.6 ms a call on a million relayed rows with 10
-- new ones (the custom plan 0.5–1.0), 0.3–0.4 s for the first page of a
-- million new ones (custom 0.75–0.86 s), 0.13 ms on a 2,000-row outbox
-- (custom 0.51). docs/relay.md has the measurements.
ALTER FUNCTION outbox_relay_read_woken(text, bigint)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off;
