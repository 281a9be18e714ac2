-- The woken read (migration 7) on a generic plan, cached per session: it
-- was planned for every call (force_custom_plan), and planning cost three
-- times its execution (0.58 against 0.16 ms a call in pgbench on a
-- two-core machine), once per order at a steady rate. Its plan does not
-- depend on the snapshot: the generic plan reads the transaction id index
-- over the range and sorts the page by id, the plan the custom one chose,
-- from a few hundred outbox rows to a million (docs/relay.md).
ALTER FUNCTION outbox_relay_read_woken(text, bigint) SET plan_cache_mode = force_generic_plan;
