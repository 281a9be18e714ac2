-- The limits of an outbox row, refused at the door: a writer's INSERT that
-- breaks one fails with the constraint's name, which names the limit, and
-- its transaction writes nothing. They are what every later stage can
-- carry: the log, the delivery ledger and the dead letters (Postgres), the
-- Kafka mirror (a row within them fits librdkafka's default
-- message.max.bytes of 1,000,000, and Kafka's 1 MiB), a serde_json reader (128 levels of nesting at most)
-- and a mail or webhook. `src/outbox.rs` holds the same figures
-- (`limits`), the README's "Writing to the outbox" explains them.
--
-- The header checks are silent on headers that are not an object (the
-- table's own check refuses those). NOT VALID: rows already written are not checked (a migration must not
-- fail on history); the relay parks a waiting row whose key is over the
-- limit, and the indexes below accept any key.
ALTER TABLE outbox
    ADD CONSTRAINT outbox_topic_is_a_topic_name
        CHECK (topic ~ '^[A-Za-z0-9._-]{1,249}$') NOT VALID,
    ADD CONSTRAINT outbox_key_at_most_1024_bytes
        CHECK (octet_length(key) <= 1024) NOT VALID,
    ADD CONSTRAINT outbox_headers_at_most_64
        CHECK (jsonb_array_length(jsonb_path_query_array(headers, 'strict $.*', '{}', true)) <= 64) NOT VALID,
    ADD CONSTRAINT outbox_headers_at_most_16384_bytes
        CHECK (octet_length(headers::text) <= 16384) NOT VALID,
    ADD CONSTRAINT outbox_header_values_are_not_nested
        CHECK (NOT jsonb_path_exists(headers, 'strict $.* ? (@.type() == "object" || @.type() == "array")', '{}', true)) NOT VALID,
    ADD CONSTRAINT outbox_payload_at_most_900000_bytes
        CHECK (octet_length(payload::text) <= 900000) NOT VALID,
    ADD CONSTRAINT outbox_payload_at_most_64_levels_deep
        CHECK (NOT jsonb_path_exists(payload, 'strict $.**{65}')) NOT VALID;

-- Lookups by key accept any key: a btree entry is capped near 2.7 KB, so a
-- long key (written before the limits above, or kept in a dead letter) made
-- its `sent` mark or its dead letter unwritable. A hash index stores the
-- key's hash only; the lookups are equalities on the key.
DROP INDEX mail_deliveries_by_key;
CREATE INDEX mail_deliveries_by_key ON mail_deliveries USING hash (key);
DROP INDEX dead_letters_by_key;
CREATE INDEX dead_letters_by_key ON dead_letters USING hash (key);
