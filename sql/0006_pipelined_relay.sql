-- The relay sends a batch's statements in one pipeline, COMMIT included, so
-- a condition that must hold for the batch to count (its epoch, the heads it
-- read) is checked by a statement that fails: the transaction then aborts
-- and the COMMIT at the end of the pipeline rolls back.
CREATE FUNCTION outbox_relay_assert(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION '%', message USING ERRCODE = 'OR001';
    END IF;
    RETURN true;
END $$;
