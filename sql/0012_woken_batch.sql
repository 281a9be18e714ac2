-- A woken relay's batch in one statement (src/relay/woken.rs): read, lock,
-- place, append and cursor in one function call, sent with its BEGIN and
-- COMMIT in one round trip. Until now a woken batch took two: the read and
-- the lock, then (placed in Rust) the append with the COMMIT.

-- Kafka's murmur2 (src/log/partitioner.rs), its 32-bit state held in an
-- int8: 0x5bd1e995 is below 2^31, so every product of a 32-bit value with
-- it stays below 2^63, and masking to 32 bits gives Java's wrapping
-- multiplication.
CREATE FUNCTION outbox_relay_murmur2(data bytea) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m   constant bigint := 1540483477;      -- 0x5bd1e995
    u32 constant bigint := 4294967295;
    len constant integer := length(data);
    h   bigint := 2538058380 # len;         -- the seed 0x9747b28c, xor the length
    k   bigint;
    i   integer := 0;
BEGIN
    WHILE i + 4 <= len LOOP
        k := get_byte(data, i)::bigint | (get_byte(data, i + 1)::bigint << 8)
           | (get_byte(data, i + 2)::bigint << 16) | (get_byte(data, i + 3)::bigint << 24);
        k := (k * m) & u32;
        k := k # (k >> 24);
        k := (k * m) & u32;
        h := ((h * m) & u32) # k;
        i := i + 4;
    END LOOP;
    IF len - i >= 3 THEN h := h # (get_byte(data, i + 2)::bigint << 16); END IF;
    IF len - i >= 2 THEN h := h # (get_byte(data, i + 1)::bigint << 8); END IF;
    IF len - i >= 1 THEN h := ((h # get_byte(data, i)::bigint) * m) & u32; END IF;
    h := h # (h >> 13);
    h := (h * m) & u32;
    RETURN h # (h >> 15);
END $$;

-- The partition `batch::plan` gives an outbox row: Kafka's partitioner
-- for a key (its UTF-8 bytes, sign bit masked), the outbox id for none.
CREATE FUNCTION outbox_relay_partition(key text, id bigint, partitions integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (CASE WHEN key IS NULL THEN ((id % partitions) + partitions) % partitions
                 ELSE (outbox_relay_murmur2(convert_to(key, 'UTF8')) & 2147483647) % partitions
            END)::integer
$$;

-- The relay's append (src/relay/append.rs, `APPEND_BATCH`, where its
-- parameters are described), now a function so that both the relay and
-- the woken batch below call it. Its plan is kept per session and
-- generic: the generic plan joins the records to the outbox's id range
-- whatever the batch's size (custom plans were made anew for every small
-- batch, 0.3 ms of planning each).
CREATE FUNCTION outbox_relay_append(
    text[], integer[], bigint[], timestamptz[], bigint[],
    bigint[], integer[], bigint[], text, text, bigint, bigint,
    bigint[], timestamptz[], text, text,
    text, bigint, text, text, bigint, float8, boolean, bigint, boolean)
RETURNS TABLE (appended_at timestamptz, handed_ids bigint[], handed_headers jsonb[], handed_payloads jsonb[])
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH advanced AS (
        UPDATE partition_heads h
           SET log_end_offset = h.log_end_offset + v.n,
               max_created_at = greatest(h.max_created_at, v.max_created_at)
          FROM unnest($1, $2, $3, $4, $5) AS v(topic, partition, n, max_created_at, base)
         WHERE h.topic = v.topic AND h.partition = v.partition AND h.log_end_offset = v.base
        RETURNING 1),
    appended AS (
        INSERT INTO event_log (topic, partition, "offset", key, headers, payload, created_at, appended_at, outbox_id)
        SELECT o.topic, v.partition, v.log_offset, o.key,
               CASE WHEN strpos(o.headers::text, $9) = 0 THEN o.headers
                    ELSE (SELECT coalesce(jsonb_object_agg(h.key, h.value), '{}'::jsonb)
                            FROM jsonb_each(o.headers) AS h
                           WHERE NOT starts_with(h.key, $9)) END
                 || CASE WHEN (SELECT EXISTS (SELECT 1 FROM outbox_retries x
                                               WHERE x.outbox_id BETWEEN $11 AND $12))
                         THEN coalesce((SELECT jsonb_build_object($10, r.retry_of)
                                          FROM outbox_retries r WHERE r.outbox_id = o.id), '{}'::jsonb)
                         ELSE '{}'::jsonb END,
               o.payload, o.created_at, now(), o.id
          FROM (SELECT ($6)[i] AS id, ($7)[i] AS partition, ($8)[i] AS log_offset
                  FROM generate_series(1, cardinality($6)) AS i) AS v
          JOIN outbox o ON o.id = v.id
         WHERE o.id BETWEEN $11 AND $12
        RETURNING outbox_id, CASE WHEN $23 THEN headers END AS headers,
                  CASE WHEN $23 THEN payload END AS payload),
    indexed AS (
        INSERT INTO event_log_time_index (topic, partition, base_offset, last_offset, max_created_at)
        SELECT * FROM unnest($1, $2, $5, $13, $14)),
    saved AS (
        UPDATE relay_state
           SET relayed_snapshot = $19::pg_snapshot,
               draining_snapshot = $20::pg_snapshot,
               cursor_id = $21,
               lease_expires_at = clock_timestamp() + make_interval(secs => $22)
         WHERE relay = $17 AND epoch = $18 AND $25
        RETURNING 1),
    stored AS (
        SELECT sum(pg_column_size(a.headers) + pg_column_size(a.payload)) AS bytes
          FROM appended a WHERE $23),
    handed AS (
        SELECT array_agg(a.outbox_id ORDER BY a.outbox_id) AS ids,
               array_agg(a.headers ORDER BY a.outbox_id) AS headers,
               array_agg(a.payload ORDER BY a.outbox_id) AS payloads
          FROM appended a
         WHERE $23 AND (SELECT bytes FROM stored) <= $24
        HAVING count(*) > 0),
    checked AS (
        SELECT outbox_relay_assert((SELECT count(*) FROM advanced) = cardinality($1),
                                   'partition heads moved under the relay'),
               outbox_relay_assert((SELECT count(*) FROM appended) = cardinality($6),
                                   'fewer records appended than outbox rows'),
               outbox_relay_assert((SELECT count(*) FROM saved) = CASE WHEN $25 THEN 1 ELSE 0 END,
                                   'the relay cursor was not saved'),
               CASE WHEN cardinality($1) > 0 THEN pg_notify($15, $16) END)
    SELECT now(), (SELECT ids FROM handed), (SELECT headers FROM handed),
           (SELECT payloads FROM handed)
      FROM checked;
END $$;

-- A woken relay's batch (src/relay/woken.rs): the woken read (migration
-- 7, its own snapshot), the lease row locked at the relay's epoch
-- (fencing), each row placed as `batch::plan` places it and numbered from
-- its partition's head, then the append above with the notification and
-- the cursor. One row: `outcome` and the read's snapshot, and for
-- 'moved' the records in outbox id order with the append's result.
--
-- Only for what is common at a live rate; for the rest it writes nothing
-- and says why, and the relay moves the batch as before up to the same
-- snapshot: 'fenced' (no lease row at this epoch), 'idle' (nothing new),
-- 'full' (a drain begins), 'unplaceable' (a row of an unknown topic, of
-- a topic whose heads do not match its partition count, or with a key over
-- the outbox's limit: the relay parks it), 'long' (a notification over
-- `notification_max_bytes`: the relay sends a shorter form).
CREATE FUNCTION outbox_relay_move_woken(
    relay_name text, relay_epoch bigint, relayed text, batch_limit bigint,
    lease_seconds float8, reserved_prefix text, retry_header text,
    channel text, hand_over boolean, hand_over_max_records integer,
    hand_over_max_bytes bigint, notification_max_bytes integer, key_max_bytes integer)
RETURNS TABLE (outcome text, snapshot text, ids bigint[], topics text[], keys text[],
               created_ats timestamptz[], partitions integer[], offsets bigint[],
               appended_at timestamptz, handed_ids bigint[], handed_headers jsonb[],
               handed_payloads jsonb[])
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    n integer;
    locked_relayed text;
    locked_draining text;
    head_topics text[];
    head_partitions integer[];
    head_counts bigint[];
    head_max_created_at timestamptz[];
    head_bases bigint[];
    head_last_offsets bigint[];
    head_running_max_created_at timestamptz[];
    notification text;
BEGIN
    -- The read comes before the lock, so the topics read after it see
    -- every topic its snapshot sees.
    SELECT (array_agg(w.snapshot))[1],
           array_agg(w.id ORDER BY w.id) FILTER (WHERE w.id IS NOT NULL),
           array_agg(w.topic ORDER BY w.id) FILTER (WHERE w.id IS NOT NULL),
           array_agg(w.key ORDER BY w.id) FILTER (WHERE w.id IS NOT NULL),
           array_agg(w.created_at ORDER BY w.id) FILTER (WHERE w.id IS NOT NULL)
      INTO snapshot, ids, topics, keys, created_ats
      FROM outbox_relay_read_woken(relayed, batch_limit) AS w;
    n := coalesce(cardinality(ids), 0);

    SELECT r.relayed_snapshot::text, r.draining_snapshot::text
      INTO locked_relayed, locked_draining
      FROM relay_state r
     WHERE r.relay = relay_name AND r.epoch = relay_epoch
       FOR UPDATE;
    IF NOT FOUND THEN
        outcome := 'fenced';
    ELSIF locked_relayed IS DISTINCT FROM relayed OR locked_draining IS NOT NULL THEN
        RAISE EXCEPTION 'the relay''s cursor in the database is not the one it holds'
              USING ERRCODE = 'OR001';
    ELSIF n = 0 THEN
        outcome := 'idle';
    ELSIF n >= batch_limit THEN
        outcome := 'full';
    END IF;
    IF outcome IS NOT NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;

    -- Placed only in topics whose heads match their partition count.
    SELECT array_agg(outbox_relay_partition(b.key, b.id, t.partitions) ORDER BY b.i)
      INTO partitions
      FROM unnest(ids, topics, keys) WITH ORDINALITY AS b(id, topic, key, i)
      JOIN topics t ON t.name = b.topic
     WHERE coalesce(octet_length(b.key), 0) <= key_max_bytes
       AND t.partitions = (SELECT count(*) FROM partition_heads h WHERE h.topic = t.name);
    IF coalesce(cardinality(partitions), 0) < n THEN
        outcome := 'unplaceable';
        RETURN NEXT;
        RETURN;
    END IF;

    -- Each partition appended to, in the order `batch::plan` keeps them,
    -- from its head as it stands (the lease row's lock keeps other
    -- appends out; the append checks the head again).
    SELECT array_agg(g.topic ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(g.partition ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(g.n ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(g.max_created_at ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(h.log_end_offset ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(h.log_end_offset + g.n - 1 ORDER BY g.topic COLLATE "C", g.partition),
           array_agg(greatest(h.max_created_at, g.max_created_at) ORDER BY g.topic COLLATE "C", g.partition)
      INTO head_topics, head_partitions, head_counts, head_max_created_at, head_bases,
           head_last_offsets, head_running_max_created_at
      FROM (SELECT b.topic, b.partition, count(*) AS n, max(b.created_at) AS max_created_at
              FROM unnest(topics, partitions, created_ats) AS b(topic, partition, created_at)
             GROUP BY b.topic, b.partition) AS g
      JOIN partition_heads h ON h.topic = g.topic AND h.partition = g.partition;

    -- Offsets in outbox id order within each partition, from its head.
    SELECT array_agg(h.base + b.nth - 1 ORDER BY b.i)
      INTO offsets
      FROM (SELECT b.i, b.topic, b.partition,
                   row_number() OVER (PARTITION BY b.topic, b.partition ORDER BY b.i) AS nth
              FROM unnest(topics, partitions) WITH ORDINALITY AS b(topic, partition, i)) AS b
      JOIN unnest(head_topics, head_partitions, head_bases) AS h(topic, partition, base)
        ON h.topic = b.topic AND h.partition = b.partition;

    -- `crate::log::notify::payload`'s longest form: a line per topic,
    -- "topic<TAB>partition:end,...".
    SELECT string_agg(l.line, E'\n' ORDER BY l.topic COLLATE "C")
      INTO notification
      FROM (SELECT h.topic, h.topic || E'\t'
                   || string_agg(h.partition || ':' || (h.base + h.n), ',' ORDER BY h.partition) AS line
              FROM unnest(head_topics, head_partitions, head_bases, head_counts) AS h(topic, partition, base, n)
             GROUP BY h.topic) AS l;
    IF octet_length(notification) > notification_max_bytes THEN
        outcome := 'long';
        offsets := NULL;
        partitions := NULL;
        RETURN NEXT;
        RETURN;
    END IF;

    outcome := 'moved';
    SELECT a.appended_at, a.handed_ids, a.handed_headers, a.handed_payloads
      INTO appended_at, handed_ids, handed_headers, handed_payloads
      FROM outbox_relay_append(
               head_topics, head_partitions, head_counts, head_max_created_at, head_bases,
               ids, partitions, offsets, reserved_prefix, retry_header, ids[1], ids[n],
               head_last_offsets, head_running_max_created_at, channel, notification,
               relay_name, relay_epoch, snapshot, NULL, NULL, lease_seconds,
               hand_over AND n <= hand_over_max_records, hand_over_max_bytes, true) AS a;
    RETURN NEXT;
END $$;
