-- The delivery ledger names each event's key (for order-created: the order
-- id), so "was this order's confirmation sent?" (GET /orders/{id}) is one
-- index lookup instead of a search of the log.

ALTER TABLE mail_deliveries ADD COLUMN key text;

UPDATE mail_deliveries d SET key = e.key
  FROM event_log e
 WHERE e.topic = d.topic AND e.partition = d.partition AND e."offset" = d."offset";

-- Key first: an index led by (group_id, topic) would tempt the planner away
-- from the primary key for the worker's per-event ledger lookups (seen: mail
-- throughput fell to a third as the ledger grew).
CREATE INDEX mail_deliveries_by_key ON mail_deliveries (key, group_id, topic);
CREATE INDEX dead_letters_by_key ON dead_letters (key, group_id, topic);
