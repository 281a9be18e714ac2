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
        k := ((get_byte(data, i)::bigint | (get_byte(data, i + 1)::bigint << 8)
               | (get_byte(data, i + 2)::bigint << 16) | (get_byte(data, i + 3)::bigint << 24)) * m) & u32;
        k := ((k # (k >> 24)) * m) & u32;
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
-- PL/pgSQL rather than SQL: called from PL/pgSQL, a SQL function is parsed
-- and planned anew in every transaction.
CREATE FUNCTION outbox_relay_partition(key text, id bigint, partitions integer) RETURNS integer
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    IF key IS NULL THEN
        RETURN ((id % partitions) + partitions) % partitions;
    END IF;
    RETURN (outbox_relay_murmur2(convert_to(key, 'UTF8')) & 2147483647) % partitions;
END $$;

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
-- 'full' (a drain begins), 'large' (over 64 rows: the placement below
-- searches linearly, and such a batch has round trips to spare),
-- 'unplaceable' (a row of an unknown topic, of
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
    n integer := 0;
    w record;
    locked boolean := false;
    -- Every partition head of the batch's topics, by topic (byte order) and
    -- partition; per topic its count and where its heads begin.
    all_topics text[] := '{}';
    all_partitions integer[] := '{}';
    all_bases bigint[] := '{}';
    all_max_created_at timestamptz[] := '{}';
    all_counts bigint[] := '{}';
    all_newest timestamptz[] := '{}';
    topic_names text[] := '{}';
    topic_partitions integer[] := '{}';
    topic_heads integer[] := '{}';
    topic_first integer[] := '{}';
    -- The heads appended to, for the append.
    head_topics text[] := '{}';
    head_partitions integer[] := '{}';
    head_counts bigint[] := '{}';
    head_max_created_at timestamptz[] := '{}';
    head_bases bigint[] := '{}';
    head_last_offsets bigint[] := '{}';
    head_running_max_created_at timestamptz[] := '{}';
    notification text := '';
    t integer;
    h integer;
BEGIN
    -- The woken read looks up no late commit: its caller's relayed
    -- snapshot must have had no transaction in progress, or one committing
    -- later would be skipped for good.
    IF pg_snapshot_xmin(relayed::pg_snapshot) <> pg_snapshot_xmax(relayed::pg_snapshot) THEN
        RAISE EXCEPTION 'a woken batch needs a relayed snapshot with no transaction in progress'
              USING ERRCODE = 'OR001';
    END IF;
    -- Few rows, so loops over arrays rather than statements: in this
    -- function a statement costs as much as a loop over a hundred rows.
    ids := '{}'; topics := '{}'; keys := '{}'; created_ats := '{}';
    FOR w IN SELECT * FROM outbox_relay_read_woken(relayed, batch_limit) LOOP
        snapshot := w.snapshot;
        IF w.id IS NOT NULL THEN
            n := n + 1;
            ids[n] := w.id; topics[n] := w.topic; keys[n] := w.key; created_ats[n] := w.created_at;
        END IF;
    END LOOP;

    -- The lease row locked at our epoch (fencing), with the batch's topics
    -- and their heads, as `LOCK_STATE_WITH_HEADS` reads them: after the
    -- read, so they include every topic its snapshot sees.
    FOR w IN
        SELECT r.relayed_snapshot::text AS relayed, r.draining_snapshot::text AS draining,
               t.name, t.partitions, h.partition, h.log_end_offset, h.max_created_at
          FROM relay_state r
          LEFT JOIN (topics t JOIN partition_heads h ON h.topic = t.name)
            ON n > 0 AND n < batch_limit AND n <= 64 AND t.name = ANY (topics)
         WHERE r.relay = relay_name AND r.epoch = relay_epoch
         ORDER BY t.name COLLATE "C", h.partition
           FOR UPDATE OF r
    LOOP
        IF NOT locked THEN
            locked := true;
            IF w.relayed IS DISTINCT FROM relayed OR w.draining IS NOT NULL THEN
                RAISE EXCEPTION 'the relay''s cursor in the database is not the one it holds'
                      USING ERRCODE = 'OR001';
            END IF;
        END IF;
        IF w.name IS NOT NULL THEN
            h := cardinality(all_topics) + 1;
            all_topics[h] := w.name; all_partitions[h] := w.partition;
            all_bases[h] := w.log_end_offset; all_max_created_at[h] := w.max_created_at;
            all_counts[h] := 0;
            t := cardinality(topic_names);
            IF t = 0 OR topic_names[t] <> w.name THEN
                t := t + 1;
                topic_names[t] := w.name; topic_partitions[t] := w.partitions;
                topic_heads[t] := 0; topic_first[t] := h;
            END IF;
            topic_heads[t] := topic_heads[t] + 1;
        END IF;
    END LOOP;
    IF NOT locked THEN
        outcome := 'fenced';
    ELSIF n = 0 THEN
        outcome := 'idle';
    ELSIF n >= batch_limit THEN
        outcome := 'full';
    ELSIF n > 64 THEN
        outcome := 'large';
    END IF;
    IF outcome IS NOT NULL THEN
        ids := NULL; topics := NULL; keys := NULL; created_ats := NULL;
        RETURN NEXT;
        RETURN;
    END IF;

    -- Placed only in topics whose heads match their partition count (then
    -- partition p's head is the topic's (p+1)th), and numbered from each
    -- head in outbox id order.
    partitions := '{}';
    offsets := '{}';
    FOR i IN 1..n LOOP
        t := array_position(topic_names, topics[i]);
        IF t IS NULL OR topic_heads[t] <> topic_partitions[t]
           OR coalesce(octet_length(convert_to(keys[i], 'UTF8')), 0) > key_max_bytes THEN
            outcome := 'unplaceable';
            ids := NULL; topics := NULL; keys := NULL; created_ats := NULL;
            partitions := NULL; offsets := NULL;
            RETURN NEXT;
            RETURN;
        END IF;
        partitions[i] := outbox_relay_partition(keys[i], ids[i], topic_partitions[t]);
        h := topic_first[t] + partitions[i];
        IF all_partitions[h] <> partitions[i] THEN
            RAISE EXCEPTION 'a partition head is missing' USING ERRCODE = 'OR001';
        END IF;
        offsets[i] := all_bases[h] + all_counts[h];
        all_counts[h] := all_counts[h] + 1;
        all_newest[h] := greatest(all_newest[h], created_ats[i]);
    END LOOP;

    -- The heads appended to, in order; their time index entries; and
    -- `crate::log::notify::payload`'s longest form: a line per topic,
    -- "topic<TAB>partition:end,...".
    FOR a IN 1..cardinality(all_topics) LOOP
        CONTINUE WHEN all_counts[a] = 0;
        h := cardinality(head_topics) + 1;
        head_topics[h] := all_topics[a];
        head_partitions[h] := all_partitions[a];
        head_counts[h] := all_counts[a];
        head_max_created_at[h] := all_newest[a];
        head_bases[h] := all_bases[a];
        head_last_offsets[h] := all_bases[a] + all_counts[a] - 1;
        head_running_max_created_at[h] := greatest(all_max_created_at[a], all_newest[a]);
        IF h = 1 OR head_topics[h] <> head_topics[h - 1] THEN
            IF h > 1 THEN notification := notification || E'\n'; END IF;
            notification := notification || head_topics[h] || E'\t';
        ELSE
            notification := notification || ',';
        END IF;
        notification := notification || head_partitions[h] || ':' || (head_bases[h] + head_counts[h]);
    END LOOP;
    IF octet_length(notification) > notification_max_bytes THEN
        outcome := 'long';
        ids := NULL; topics := NULL; keys := NULL; created_ats := NULL;
        partitions := NULL; offsets := NULL;
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
