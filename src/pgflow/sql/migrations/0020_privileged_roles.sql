-- compatible-from: 19
-- One place for "may act on every user's instances": pgflow._is_privileged (the engine's own role or a
-- pgflow_admin member). start_instances, signal, _may_control and may_use wrote that test out each; they
-- ask the helper now. One answer changes: may_use says yes for a member of the pgflow owner role (it used
-- to for the owner itself and superusers only), as every other check already treated such a member as the
-- engine's role (it may SET ROLE to the owner anyway).

CREATE FUNCTION pgflow._is_privileged(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pgflow.is_engine_role(p_role)
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'pgflow_admin')
            AND pg_catalog.pg_has_role(p_role, 'pgflow_admin', 'member'))
$$;
REVOKE ALL ON FUNCTION pgflow._is_privileged(name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow._may_control(p_caller name, p_owner name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT p_owner OPERATOR(pg_catalog.=) p_caller OR pgflow._is_privileged(p_caller)
$$;
REVOKE ALL ON FUNCTION pgflow._may_control(name, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.may_use(p_what text, p_role name DEFAULT current_user) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    IF NOT pgflow._is_privileged(session_user) THEN
        PERFORM pgflow._check_caller(p_role);
    END IF;
    RETURN pgflow._is_privileged(p_role)  -- the owner's members too, superusers among them
        OR coalesce((SELECT bool_or(CASE p_what WHEN 'http' THEN g.http WHEN 'python' THEN g.python END)
                     FROM pgflow.role_grants g
                     JOIN pg_catalog.pg_roles r ON r.rolname = g.role_name  -- by oid: a dropped role's grant
                     WHERE pg_catalog.pg_has_role(p_role, r.oid, 'member')), false);  -- row is skipped
END $$;
REVOKE ALL ON FUNCTION pgflow.may_use(text, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text,
                                       p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    shape jsonb;
BEGIN
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = p_flow AND f.version = p_version
      AND (EXISTS (SELECT 1 FROM pgflow.flow_registrations r
                   WHERE r.flow_name = p_flow AND r.version = p_version AND r.role_name = caller)
           OR pgflow._is_privileged(caller));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: flow % version % is not registered (by role %): register it first',
            p_flow, p_version, caller USING ERRCODE = 'P0002';
    END IF;
    RETURN QUERY SELECT pgflow._start_as(caller, p_flow, p_version, shape, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_instances(text, text, jsonb[], text, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.signal(p_id bigint, p_name text, p_data jsonb DEFAULT NULL,
                              p_caller name DEFAULT current_user) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    st text;
    new_id bigint;
BEGIN
    SELECT i.status INTO st FROM pgflow.instances i
    WHERE i.id = p_id AND pgflow._may_control(caller, i.owner);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RAISE EXCEPTION 'pgflow: instance % is % and takes no signals', p_id, st USING ERRCODE = '55000';
    END IF;
    IF coalesce(p_name, '') = '' THEN
        RAISE EXCEPTION 'pgflow: a signal needs a name' USING ERRCODE = '22023';
    END IF;
    PERFORM pgflow.check_signal_quota(caller);
    INSERT INTO pgflow.signals (instance_id, name, data) VALUES (p_id, p_name, p_data) RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;

CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of',
                 '_may_control', '_is_privileged', '_reopen_failed_steps', 'open_instances_bound', 'open_instance_id',
                 '_start_as', '_register_as', '_check_start_as', '_prepare_once']
$$;
