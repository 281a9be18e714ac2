-- Replays of a topic's mail under a cursor of their own (docs/invariants.md,
-- 10), and what a parked outbox row needs to be re-driven.

-- One replay: the bounds as asked and as planned, and where it stands.
CREATE TABLE replay_runs (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic       text        NOT NULL REFERENCES topics (name),
    -- The command's bounds, as given (a re-run of the same command finds
    -- its unfinished run by them).
    request     jsonb       NOT NULL,
    state       text        NOT NULL DEFAULT 'running'
                            CHECK (state IN ('running', 'interrupted', 'done')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

-- The plan per partition, [from_offset, to_offset), and the run's cursor:
-- every offset below next_offset is finished (sent, failed or in doubt).
CREATE TABLE replay_partitions (
    run_id      bigint  NOT NULL REFERENCES replay_runs (id) ON DELETE CASCADE,
    partition   integer NOT NULL,
    from_offset bigint  NOT NULL,
    to_offset   bigint  NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (run_id, partition)
) WITH (fillfactor = 50);

-- The run's own delivery ledger. `sending` is written (and committed)
-- before the SMTP exchange: after a crash, such a row is in doubt (the mail
-- may or may not have gone out) and is not sent again unless asked.
CREATE TABLE replay_deliveries (
    run_id      bigint      NOT NULL REFERENCES replay_runs (id) ON DELETE CASCADE,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    status      text        NOT NULL CHECK (status IN ('sending', 'sent', 'failed', 'unknown')),
    message_id  text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 0,
    reason      text,
    last_error  text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, partition, "offset")
);

-- A row parked for an unknown topic keeps what `dead-letters retry` marked.
ALTER TABLE outbox_parked ADD COLUMN retry_of text;

-- A group partition's epoch comes from one sequence: an epoch is never
-- handed out twice, even after a group is deleted and made again, so a
-- member frozen across that cannot pass for the new owner.
CREATE SEQUENCE group_partition_epochs;
SELECT setval('group_partition_epochs', coalesce(max(epoch), 0) + 1) FROM group_partitions;
