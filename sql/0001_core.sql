-- Core schema: the order table, the outbox any service writes, the event log
-- the relay appends to, and the relay's own state.
--
-- Applied by `outbox-relay migrate` inside one transaction under an advisory
-- transaction lock (see src/migrate.rs).

-- ─── Business table of the reference writer ─────────────────────────────────

CREATE TABLE orders (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint      NOT NULL CHECK (user_id > 0),
    email       text        NOT NULL,
    amount      bigint      NOT NULL CHECK (amount > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Idempotency-Key support for POST /orders: written in the same transaction
-- as the order, so a retry either sees the committed answer or waits for it.
CREATE TABLE order_idempotency_keys (
    idempotency_key text        PRIMARY KEY,
    request_body    jsonb       NOT NULL,
    order_id        bigint      NOT NULL REFERENCES orders (id),
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- ─── The outbox ─────────────────────────────────────────────────────────────
-- Written only by INSERT, inside the producer's own transaction:
--
--   INSERT INTO outbox (topic, key, payload) VALUES ('order-created', '42', '{"order_id":42}');
--
-- `txid` records the writer's transaction id (never set it by hand). The
-- relay uses it to find rows whose transactions committed between two
-- snapshots, so a row that commits late is never skipped and an open
-- transaction never holds back the others (docs/relay.md). `id` is the
-- insert order, which orders events of one key.
CREATE TABLE outbox (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       text        NOT NULL CHECK (topic <> ''),
    key         text,
    payload     jsonb       NOT NULL,
    headers     jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(headers) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    txid        xid8        NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX outbox_txid ON outbox (txid);

-- Outbox rows the relay could not place in the log (unknown topic, ...).
-- Kept whole so nothing written by a producer is ever lost.
CREATE TABLE outbox_parked (
    outbox_id   bigint      PRIMARY KEY,
    topic       text        NOT NULL,
    key         text,
    payload     jsonb       NOT NULL,
    headers     jsonb       NOT NULL,
    created_at  timestamptz NOT NULL,
    reason      text        NOT NULL,
    parked_at   timestamptz NOT NULL DEFAULT now()
);

-- ─── The event log ──────────────────────────────────────────────────────────

CREATE TABLE topics (
    name        text        PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._-]{1,249}$'),
    partitions  integer     NOT NULL CHECK (partitions BETWEEN 1 AND 10000),
    -- Records older than this (by append time) fall below the log start offset.
    retention   interval    NOT NULL DEFAULT '35 days'
                            CHECK (retention > interval '0' AND retention <= interval '100 years'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per (topic, partition): the partitions that exist (adding
-- partitions remaps keys, so a topic's count is fixed at creation).
-- Only the fenced relay leader updates it;
-- rows stay small and are updated in place (HOT), hence the fillfactor.
CREATE TABLE partition_heads (
    topic            text        NOT NULL REFERENCES topics (name),
    partition        integer     NOT NULL CHECK (partition >= 0),
    log_start_offset bigint      NOT NULL DEFAULT 0,
    -- The next offset to assign (Kafka's log end offset).
    log_end_offset   bigint      NOT NULL DEFAULT 0,
    -- Running maximum of created_at up to log_end_offset - 1: feeds the time index.
    max_created_at   timestamptz,
    PRIMARY KEY (topic, partition)
) WITH (fillfactor = 50);

-- Insert-only. Partitioned by append day so retention drops whole days
-- (src/event_log.rs creates the day partitions ahead of time).
CREATE TABLE event_log (
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    key          text,
    headers      jsonb       NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL,
    appended_at  timestamptz NOT NULL,
    outbox_id    bigint      NOT NULL
) PARTITION BY RANGE (appended_at);

CREATE INDEX event_log_position ON event_log (topic, partition, "offset");

-- Sparse time index, one row per partition per relay batch: the running
-- maximum created_at makes offsetsForTimes a lookup plus a short scan.
CREATE TABLE event_log_time_index (
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    base_offset    bigint      NOT NULL,
    last_offset    bigint      NOT NULL,
    max_created_at timestamptz NOT NULL,
    PRIMARY KEY (topic, partition, base_offset)
);
CREATE INDEX event_log_time_index_by_time ON event_log_time_index (topic, partition, max_created_at);

-- ─── Relay state ────────────────────────────────────────────────────────────
-- One row per relay. The lease (holder, epoch, expiry) elects one leader; the
-- epoch fences a stale one. The cursor is the snapshot pair of docs/relay.md.
-- The relay owns this row; no other writer should touch it.
CREATE TABLE relay_state (
    relay             text        PRIMARY KEY,
    holder            text,
    epoch             bigint      NOT NULL DEFAULT 0,
    lease_expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    -- Every outbox row visible in this snapshot is in the log (or parked).
    relayed_snapshot  pg_snapshot NOT NULL DEFAULT '1:1:',
    -- While a large difference is moved in batches: the target snapshot and
    -- the last outbox id moved from it (a drain moves rows in id order).
    draining_snapshot pg_snapshot,
    cursor_id         bigint
) WITH (fillfactor = 50);

INSERT INTO relay_state (relay) VALUES ('default');

INSERT INTO topics (name, partitions) VALUES ('order-created', 8);
INSERT INTO partition_heads (topic, partition)
SELECT 'order-created', p FROM generate_series(0, 7) AS p;
