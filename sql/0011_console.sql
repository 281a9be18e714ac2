-- The web console (src/console/): its audit trail, and the indexes its
-- lookups use, so that no page scans.

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

-- The record browser's search by key, and the order lookup's event: an
-- equality on the key (a hash index stores only the key's hash, so any key
-- length fits, as for mail_deliveries_by_key).
CREATE INDEX event_log_by_key ON event_log USING hash (key);

-- The order lookup by email.
CREATE INDEX orders_by_email ON orders (lower(email));

-- Dead letters listed by group and status, newest first, page by page.
CREATE INDEX dead_letters_by_status ON dead_letters (status, id);
