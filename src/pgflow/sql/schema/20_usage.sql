-- Letting a role use pgflow (and taking it back). Nothing is granted to PUBLIC (00_schemas.sql); a role
-- granted usage may start, watch, cancel and signal its own instances and keep variables, optionally use
-- HTTP and Python steps: it reads its rows and writes only through functions. The internal functions workers and coordinators call (they are the owner) are
-- never granted.

-- Internal: what workers and coordinators call (they are the owner), and the operators' dead-letter actions
-- (granted to pgflow_admin in 23_console.sql); never granted by grant_usage.
CREATE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of',
                 '_may_control', '_is_privileged', '_reopen_failed_steps', 'open_instances_bound', 'open_instance_id',
                 '_start_as', '_register_as', '_check_start_as', '_prepare_once']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

-- Let a role use pgflow: start, watch, cancel and signal its own instances, keep variables; optionally use
-- HTTP and Python steps. Run it as the pgflow owner (or a superuser).
CREATE FUNCTION pgflow.grant_usage(p_role name, p_include_http boolean DEFAULT false,
                                   p_include_python boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fn record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgflow: no role %', p_role USING ERRCODE = '42704';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA pgflow TO %I', p_role);
    EXECUTE format('GRANT SELECT ON pgflow.instances, pgflow.steps, pgflow.signals, pgflow.variables, '
                   'pgflow.flows, pgflow.flow_steps, pgflow.flow_registrations, pgflow.role_channels, pgflow.queues, '
                   'pgflow.migrations, pgflow.http_audit TO %I', p_role);
    -- a frame of the role's own proves its identity before it acts through a definer function (the trigger
    -- stamps the row: the role can prove no one but itself; pgflow._check_caller)
    EXECUTE format('GRANT INSERT ON pgflow.caller_proofs TO %I', p_role);
    -- nothing else on any table (no INSERT, UPDATE, DELETE, so no SELECT ... FOR UPDATE either): users write
    -- through definer functions that check ownership, rights, limits and quotas (start_instances, signal,
    -- cancel_instance, retry_instance, set_variable, ...)
    FOR fn IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'pgflow'::regnamespace AND NOT p.proname = ANY (pgflow._internal_functions())
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn.sig, p_role);
    END LOOP;
    -- ALTER FUNCTION ... OWNER needs the new owner to have CREATE on the schema: only for this moment
    EXECUTE format('GRANT CREATE ON SCHEMA pgflow_exec TO %I', p_role);
    EXECUTE pgflow._executor_sql(p_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA pgflow_exec FROM %I', p_role);
    INSERT INTO pgflow.role_grants (role_name, http, python) VALUES (p_role, p_include_http, p_include_python)
    ON CONFLICT (role_name) DO UPDATE SET http = excluded.http, python = excluded.python, granted_at = now();
    INSERT INTO pgflow.role_channels (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END $$;
REVOKE ALL ON FUNCTION pgflow.grant_usage(name, boolean, boolean) FROM PUBLIC;

CREATE FUNCTION pgflow.revoke_usage(p_role name) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer)', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer, boolean)', p_role);
    DELETE FROM pgflow.role_grants WHERE role_name = p_role;
END $$;
REVOKE ALL ON FUNCTION pgflow.revoke_usage(name) FROM PUBLIC;
