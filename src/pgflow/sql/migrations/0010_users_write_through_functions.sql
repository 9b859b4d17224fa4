-- compatible-from: 1
-- Issue 12, done-criterion 3: users write only through functions. Granted roles lose every INSERT, UPDATE and
-- DELETE on pgflow's tables (so SELECT ... FOR UPDATE too): cancel_instance, retry_instance, set_variable,
-- delete_variable and clearvars become definer functions acting for a defaulted p_caller
-- (pgflow._check_caller) that check ownership themselves (pgflow._may_control: the caller's own instances,
-- any for the pgflow owner and pgflow_admin members). _reopen_failed_steps is no longer granted. Older code
-- calls the same names with the same arguments (the new ones are defaulted). Done-criterion 6: a per-role
-- queue-depth quota (role_quotas.max_queued_tasks, set_quota's new last argument).

-- schema/18_roles_and_rls.sql
CREATE FUNCTION pgflow._may_control(p_caller name, p_owner name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT p_owner OPERATOR(pg_catalog.=) p_caller
        OR pg_catalog.pg_has_role(p_caller, n.nspowner, 'member')
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'pgflow_admin')
            AND pg_catalog.pg_has_role(p_caller, 'pgflow_admin', 'member'))
    FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'pgflow'
$$;
REVOKE ALL ON FUNCTION pgflow._may_control(name, name) FROM PUBLIC;

-- schema/11_cancel.sql
DROP FUNCTION pgflow.cancel_instance(bigint, text);
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

-- schema/16_variables.sql
DROP FUNCTION pgflow.set_variable(text, jsonb);
DROP FUNCTION pgflow.delete_variable(text);
DROP FUNCTION pgflow.clearvars();
CREATE FUNCTION pgflow.set_variable(p_name text, p_value jsonb, p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    INSERT INTO pgflow.variables (owner, name, value) VALUES (pgflow._check_caller(p_caller), p_name, p_value)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value, updated_at = pg_catalog.now();
END $$;
REVOKE ALL ON FUNCTION pgflow.set_variable(text, jsonb, name) FROM PUBLIC;
CREATE FUNCTION pgflow.delete_variable(p_name text, p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    DELETE FROM pgflow.variables WHERE owner = caller AND name = p_name;
END $$;
REVOKE ALL ON FUNCTION pgflow.delete_variable(text, name) FROM PUBLIC;
CREATE FUNCTION pgflow.clearvars(p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    DELETE FROM pgflow.variables WHERE owner = caller;
END $$;
REVOKE ALL ON FUNCTION pgflow.clearvars(name) FROM PUBLIC;

-- schema/23_console.sql
DROP FUNCTION pgflow.retry_instance(bigint);
CREATE FUNCTION pgflow.retry_instance(p_id bigint, p_caller name DEFAULT current_user) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    owner_name name;
    st text;
BEGIN
    -- ownership before any row lock: another user's instance is never locked
    SELECT i.owner, i.status INTO owner_name, st FROM pgflow.instances i WHERE i.id = p_id;
    IF NOT FOUND OR NOT pgflow._may_control(caller, owner_name) THEN
        RETURN NULL;
    END IF;
    UPDATE pgflow.instances SET status = 'pending', error = NULL, finished_at = NULL
    WHERE id = p_id AND status = 'failed';
    IF NOT FOUND THEN
        RETURN st;
    END IF;
    PERFORM pgflow._reopen_failed_steps(p_id);
    RETURN 'retried';
END $$;
REVOKE ALL ON FUNCTION pgflow.retry_instance(bigint, name) FROM PUBLIC;

-- schema/20_usage.sql
CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of',
                 '_may_control', '_reopen_failed_steps']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.grant_usage(p_role name, p_include_http boolean DEFAULT false,
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

-- roles granted usage before: no more writes to any table of pgflow's (column privileges go with them) and no
-- _reopen_failed_steps; the new functions granted (grant_usage again, their rights kept). The pgflow owner
-- (and roles that are members of it) keep theirs.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT rg.* FROM pgflow.role_grants rg
             WHERE EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = rg.role_name)
               AND NOT pgflow.is_engine_role(rg.role_name) LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA pgflow FROM %I', g.role_name);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION pgflow._reopen_failed_steps(bigint) FROM %I', g.role_name);
        PERFORM pgflow.grant_usage(g.role_name, g.http, g.python);
    END LOOP;
END $$;

-- schema/25_trust.sql: a queue-depth quota per role (tasks on queues at once), checked by the coordinator
-- when a map fans out
ALTER TABLE pgflow.role_quotas ADD COLUMN max_queued_tasks       bigint  CHECK (max_queued_tasks >= 0);
UPDATE pgflow.role_quotas SET max_queued_tasks = 1000000 WHERE role_name = '';
DROP FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer);
CREATE FUNCTION pgflow.set_quota(p_role name, p_max_open_instances bigint DEFAULT NULL,
                                 p_max_map_width bigint DEFAULT NULL, p_max_queues integer DEFAULT NULL,
                                 p_max_pending_signals bigint DEFAULT NULL, p_max_input_bytes integer DEFAULT NULL,
                                 p_max_input_depth integer DEFAULT NULL, p_max_queued_tasks bigint DEFAULT NULL)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    INSERT INTO pgflow.role_quotas AS q (role_name, max_open_instances, max_map_width, max_queues,
                                         max_pending_signals, max_input_bytes, max_input_depth, max_queued_tasks)
    SELECT p_role, coalesce(p_max_open_instances, d.max_open_instances), coalesce(p_max_map_width, d.max_map_width),
           coalesce(p_max_queues, d.max_queues), coalesce(p_max_pending_signals, d.max_pending_signals),
           coalesce(p_max_input_bytes, d.max_input_bytes), coalesce(p_max_input_depth, d.max_input_depth),
           coalesce(p_max_queued_tasks, d.max_queued_tasks)
    FROM pgflow.quotas_of(p_role) d
    ON CONFLICT (role_name) DO UPDATE
    SET max_open_instances = coalesce(p_max_open_instances, q.max_open_instances),
        max_map_width = coalesce(p_max_map_width, q.max_map_width),
        max_queues = coalesce(p_max_queues, q.max_queues),
        max_pending_signals = coalesce(p_max_pending_signals, q.max_pending_signals),
        max_input_bytes = coalesce(p_max_input_bytes, q.max_input_bytes),
        max_input_depth = coalesce(p_max_input_depth, q.max_input_depth),
        max_queued_tasks = coalesce(p_max_queued_tasks, q.max_queued_tasks),
        updated_at = now()
$$;
REVOKE ALL ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer, bigint) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        GRANT SELECT ON pgflow.role_quotas TO pgflow_admin;
        GRANT EXECUTE ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer, bigint),
                                  pgflow.quotas_of(name) TO pgflow_admin;
    END IF;
END $$;
