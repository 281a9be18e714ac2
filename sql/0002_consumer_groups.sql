-- Consumer groups (Kafka's semantics, coordinated through Postgres) and the
-- mail worker's delivery ledger and dead letters.

-- A live member heartbeats; it is dead once heartbeat_at + session_timeout
-- has passed, and its partitions may then be taken over.
CREATE TABLE group_members (
    group_id        text        NOT NULL,
    member_id       text        NOT NULL,
    host            text        NOT NULL,
    client_id       text        NOT NULL,
    session_timeout interval    NOT NULL,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, member_id)
) WITH (fillfactor = 50);

-- One row per (group, topic, partition): who owns it, at which epoch, and
-- the committed offset (the next offset to read). A commit is fenced by
-- `owner = me AND epoch = my epoch` in its WHERE clause.
CREATE TABLE group_partitions (
    group_id         text        NOT NULL,
    topic            text        NOT NULL,
    partition        integer     NOT NULL,
    owner            text,
    -- Bumps on every change of owner: a member that lost the partition
    -- cannot commit, even if it is later given the partition again.
    epoch            bigint      NOT NULL DEFAULT 0,
    committed_offset bigint,
    committed_at     timestamptz,
    PRIMARY KEY (group_id, topic, partition),
    FOREIGN KEY (topic, partition) REFERENCES partition_heads (topic, partition)
) WITH (fillfactor = 50);

-- The mail worker's delivery ledger: one row per (group, event), so an
-- event redelivered after a crash, rebalance or reset is not mailed twice.
CREATE TABLE mail_deliveries (
    group_id     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    "offset"     bigint      NOT NULL,
    message_id   text        NOT NULL,
    recipient    text,
    status       text        NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    PRIMARY KEY (group_id, topic, partition, "offset")
);

-- Events a consumer could not process (permanent failure, retry budget
-- spent, undecodable payload). The partition moves on; operators list,
-- retry or discard them.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    key         text,
    headers     jsonb       NOT NULL,
    payload     jsonb       NOT NULL,
    reason      text        NOT NULL,
    attempts    integer     NOT NULL,
    last_error  text,
    status      text        NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'retried', 'discarded')),
    parked_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    UNIQUE (group_id, topic, partition, "offset")
);
