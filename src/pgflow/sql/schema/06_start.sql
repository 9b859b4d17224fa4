-- Starting instances: the transition "no instance" -> 'pending' (the coordinator then makes it 'running').
--
-- One call checks the role once, snapshots its variables once and inserts all instances and their wake-ups
-- (a single client starting instances one by one managed ~800-1,400 starts/s, which capped end-to-end
-- throughput); start_instance is the one-input case of the same code. Both run in the caller's transaction:
-- a rollback means the instances never existed.
--
-- Guards, in order: a superuser may not start instances unless pgflow.allow_superuser is on (its SQL steps
-- would run as superuser); HTTP steps need the 'http' right and Python steps of a control-flow workflow the
-- 'python' right (pgflow.may_use, 18_roles_and_rls.sql), unless pgflow.check_rights_at_start is off (the df
-- layer's start, as pg_durable: the workers check both rights again before each such step runs, so skipping
-- the early check only moves the refusal to run time, where the instance fails). The owner, variables and
-- secret references are captured here; the trace context by the instances table's column default. Inputs
-- and the role's open instances are checked against its limits and quotas first (pgflow._check_start_as,
-- 25_trust.sql), and only a flow version the caller registered can be started.

-- Whether a start refuses HTTP and Python steps its owner has no right to (pgflow.check_rights_at_start, on
-- unless set off). Anyone may set it off: the workers refuse those steps anyway.
CREATE FUNCTION pgflow._rights_at_start() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(pg_catalog.current_setting('pgflow.check_rights_at_start', true), '')
           OPERATOR(pg_catalog.<>) ALL (ARRAY['off', 'false', '0'])
$$;
REVOKE ALL ON FUNCTION pgflow._rights_at_start() FROM PUBLIC;

-- The start itself, for a caller a definer function has checked (pgflow._check_caller) and a shape that
-- caller may start (registered by it, or it is the pgflow owner or a pgflow_admin member: its caller looked
-- that up, or registered it just now): users have no INSERT on instances, wake-ups or signals, so every
-- instance passes these checks. Internal (never granted): it trusts p_caller and p_shape. No SET search_path:
-- only definer functions call it, and they pin it; each statement here is one more a start pays for (a start
-- used to run about 30, which doubled the server's CPU per start: loadtests/README.md, "Where the chain
-- stands"), so the shape's step kinds are tested with jsonpath expressions rather than queries.
CREATE FUNCTION pgflow._start_as(p_caller name, p_flow text, p_version text, p_shape jsonb, p_inputs jsonb[],
                                 p_label text)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    vars jsonb;
    secrets jsonb;
    ids bigint[];
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = p_caller)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser %: its SQL steps would run as '
                        'superuser. Start it as an ordinary role (see pgflow.grant_usage), or allow it with '
                        'SET pgflow.allow_superuser = on', p_caller USING ERRCODE = '42501';
    END IF;
    PERFORM pgflow._check_start_as(p_caller, p_inputs);
    IF pgflow._rights_at_start() THEN
        IF p_shape @? '$.steps[*] ? (@.kind == "http")' AND NOT pgflow.may_use('http', p_caller) THEN
            RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => '
                            'true))', p_caller USING ERRCODE = '42501';
        END IF;
        IF p_shape ? 'tree'  -- a control-flow workflow names its Python functions itself
           AND p_shape @? '$.steps[*] ? (@.kind == "python")' AND NOT pgflow.may_use('python', p_caller) THEN
            RAISE EXCEPTION 'pgflow: role % may not use Python steps in workflows (pgflow.grant_usage(role, '
                            'include_python => true))', p_caller USING ERRCODE = '42501';
        END IF;
    END IF;
    SELECT jsonb_object_agg(v.name, v.value) FILTER (WHERE v.secret_ref IS NULL),
           jsonb_object_agg(v.name, v.secret_ref) FILTER (WHERE v.secret_ref IS NOT NULL)
    INTO vars, secrets
    FROM pgflow.variables v WHERE v.owner = p_caller;
    WITH created AS (
        INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables, secret_refs, owner)
        SELECT p_flow, p_version, x.input, p_label, vars, secrets, p_caller
        FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
        ORDER BY x.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) INTO ids FROM created;  -- identities follow insertion order
    INSERT INTO pgflow.wakeups (instance_id) SELECT unnest(ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN QUERY SELECT unnest(ids);
END $$;
REVOKE ALL ON FUNCTION pgflow._start_as(name, text, text, jsonb, jsonb[], text) FROM PUBLIC;

-- Start instances of a registered flow version as p_caller (its default is the caller's current_user,
-- evaluated before the function switches to its owner; pgflow._check_caller). The caller sees only the flow
-- versions it registered (pgflow.register_flow), unless it is privileged (pgflow._is_privileged).
CREATE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text,
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

-- What the Python client's start and start_many send: register the flow version (a read when it is known)
-- and start, in one definer call that checks the caller once. The shape registered is the one started.
CREATE FUNCTION pgflow.register_and_start(p_flow text, p_version text, p_ref text, p_shape jsonb,
                                          p_inputs jsonb[], p_label text, p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    PERFORM pgflow._register_as(caller, p_flow, p_version, p_ref, p_shape);
    RETURN QUERY SELECT pgflow._start_as(caller, p_flow, p_version, p_shape, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.register_and_start(text, text, text, jsonb, jsonb[], text, name) FROM PUBLIC;

CREATE FUNCTION pgflow.start_instance(p_flow text, p_version text, p_input jsonb, p_label text)
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgflow.start_instances(p_flow, p_version, ARRAY[p_input], p_label)
$$;
REVOKE ALL ON FUNCTION pgflow.start_instance(text, text, jsonb, text) FROM PUBLIC;
