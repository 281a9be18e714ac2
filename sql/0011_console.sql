-- The web console (src/console/): its audit trail, and the indexes its
-- lookups use.

-- Every action taken in the console: who, what, on what, what the preview
-- counted, and how it ended. Shown on the console's Audit page.
CREATE TABLE console_audit (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    action     text        NOT NULL,
    target     text        NOT NULL,
    -- The request as given and the preview's counts.
    detail     jsonb       NOT NULL DEFAULT '{}',
    outcome    text        NOT NULL
);

-- No index on the log's keys: measured, one (hash or btree) costs the
-- relay's append about as much as the append itself (a 1,000,000-row
-- backlog: 170,097 events/s without, 93,929 with, docs/benchmarks.md). The
-- console finds a key's records in the one partition Kafka's partitioner
-- gives it, a bounded range of offsets at a time, and an order's events
-- through the delivery ledger's and the dead letters' key indexes.

-- The order lookup by email.
CREATE INDEX orders_by_email ON orders (lower(email));

-- Dead letters listed by group and status, newest first, page by page.
CREATE INDEX dead_letters_by_status ON dead_letters (status, id);
