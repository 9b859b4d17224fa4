-- Cancelling an instance: 'pending' | 'running' -> 'cancelled', and every open step with it. Queued
-- messages are archived by the workers that read them (the claim finds nothing runnable), so no message is
-- lost or run.
--
-- A definer function acting for p_caller (pgflow._check_caller): users have no UPDATE on instances or steps,
-- and may cancel only instances they own (pgflow_admin members and the pgflow owner: any). Another user's
-- instance is "not found" (NULL), as under row-level security, and never locked.
CREATE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text, p_caller name DEFAULT current_user)
RETURNS text LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    owner_name name;
    st text;
BEGIN
    -- ownership before the row lock: another user's instance is never locked, not even for a moment
    SELECT i.owner INTO owner_name FROM pgflow.instances i WHERE i.id = p_id;
    IF NOT FOUND OR NOT pgflow._may_control(caller, owner_name) THEN
        RETURN NULL;
    END IF;
    SELECT i.status INTO st FROM pgflow.instances i WHERE i.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = pg_catalog.clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = pg_catalog.clock_timestamp()
    WHERE instance_id = p_id AND status = ANY (pgflow.open_step_statuses());
    PERFORM pgflow.notify_done(owner_name, p_id);
    RETURN 'cancelled';
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel_instance(bigint, text, name) FROM PUBLIC;
