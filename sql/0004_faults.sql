-- Faults found by an adversarial run (issue "faults"): what each needs.

-- The relay leader's backend: a standby whose takeover is blocked by an
-- expired leader's open transaction (a frozen process keeps its locks) ends
-- that backend instead of waiting for it.
ALTER TABLE relay_state ADD COLUMN holder_pid integer;

-- A topic's partition count has one source of truth, topics.partitions: a
-- partition head outside it (which would re-partition every key) is refused.
CREATE FUNCTION partition_heads_within_topic() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM topics t WHERE t.name = NEW.topic AND NEW.partition < t.partitions) THEN
        RAISE EXCEPTION 'topic % has no partition %: its partition count is fixed at creation',
            NEW.topic, NEW.partition
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER partition_heads_within_topic
    BEFORE INSERT OR UPDATE OF topic, partition ON partition_heads
    FOR EACH ROW EXECUTE FUNCTION partition_heads_within_topic();

-- The delivery ledger: an SMTP exchange whose outcome is unknown (no final
-- answer to the end of the message within its time, or the connection lost
-- after the message was sent) is not a failure; the time of the first
-- attempt bounds retries in time.
ALTER TABLE mail_deliveries DROP CONSTRAINT mail_deliveries_status_check;
ALTER TABLE mail_deliveries ADD CONSTRAINT mail_deliveries_status_check
    CHECK (status IN ('pending', 'sent', 'failed', 'unknown'));
ALTER TABLE mail_deliveries ADD COLUMN unknown_outcomes integer NOT NULL DEFAULT 0;
ALTER TABLE mail_deliveries ADD COLUMN first_attempt_at timestamptz;

-- Static membership (Kafka's group.instance.id): a member restarted with the
-- same id takes its partitions back at once; each start is an incarnation,
-- and an older incarnation still running is fenced.
ALTER TABLE group_members ADD COLUMN incarnation text;

-- A dead letter retried through the outbox: which record the new outbox row
-- retries is kept here, written only by `dead-letters retry`, never in the
-- outbox row itself (writers set those, headers included).
CREATE TABLE outbox_retries (
    outbox_id bigint PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    retry_of  text   NOT NULL
);
