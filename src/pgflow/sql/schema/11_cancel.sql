-- Cancelling an instance: 'pending' | 'running' -> 'cancelled', and every open step with it. Queued
-- messages are archived by the workers that read them (the claim finds nothing runnable), so no message is
-- lost or run.

CREATE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
    WHERE instance_id = p_id AND status = ANY (pgflow.open_step_statuses());
    PERFORM pgflow.notify_done(owner, p_id) FROM pgflow.instances WHERE id = p_id;
    RETURN 'cancelled';
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel_instance(bigint, text) FROM PUBLIC;
