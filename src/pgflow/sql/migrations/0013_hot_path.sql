-- compatible-from: 1
-- The hot path, made as cheap as before the hardening. Replacements only:
-- - pgflow.next_parked_in answered 0 ("due now") instead of NULL when no message was parked (greatest()
--   skips NULLs), so an idle worker read its queues without pause: twice the transactions per step in the
--   chain benchmark and a busy core on an idle system (schema/22_limits.sql);
-- - a start checked its caller, quotas and engine role through five nested functions with pinned
--   search_paths: _check_caller returns at once for the session's own role (18_roles_and_rls.sql),
--   is_engine_role is inlined (every name in it is qualified) and check_start reads the inputs once
--   (25_trust.sql);
-- - register_flow, which every start of the Python API calls, wrote a registration row for each start (an
--   INSERT ... ON CONFLICT DO NOTHING): it now reads first (05_register_flow.sql);
-- - the coordinator notified each finished instance's waiters with a definer call per instance: one call
--   per batch now (notify_done(name[], bigint[]), 25_trust.sql; queries/coordinator.sql), which inlines
--   _channel_of (no longer a definer function: only definer functions call it).

CREATE OR REPLACE FUNCTION pgflow.next_parked_in(p_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    due timestamptz;
BEGIN
    EXECUTE format('SELECT min(vt) FROM pgmq.%I WHERE (headers->>''parked'') IS NOT NULL', 'q_' || p_queue) INTO due;
    -- greatest() skips NULLs: without the CASE, no parked message would read as "due now" and an idle
    -- worker would poll without pause
    RETURN CASE WHEN due IS NOT NULL THEN greatest(0, extract(epoch FROM due - clock_timestamp())) END;
END $$;

CREATE OR REPLACE FUNCTION pgflow._check_caller(p_caller name) RETURNS name
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_caller OPERATOR(pg_catalog.=) session_user THEN  -- the common case, and the session's role exists
        RETURN p_caller;
    END IF;
    IF p_caller IS NULL
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) p_caller)
       OR NOT (p_caller OPERATOR(pg_catalog.=) session_user
               OR pg_catalog.pg_has_role(session_user, p_caller, 'member')) THEN
        RAISE EXCEPTION 'pgflow: role % may not act as role %', session_user, coalesce(p_caller, 'NULL')
            USING ERRCODE = '42501';
    END IF;
    RETURN p_caller;
END $$;

CREATE OR REPLACE FUNCTION pgflow.is_engine_role(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(p_role, n.nspowner, 'member')
    FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'pgflow'
$$;

CREATE OR REPLACE FUNCTION pgflow.check_start(p_inputs jsonb[], p_caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q pgflow.role_quotas := pgflow.quotas_of(pgflow._check_caller(p_caller));
    open_count bigint;
    bad record;
BEGIN
    -- one pass over the inputs for both limits: the first input over either
    SELECT x.ord, pg_column_size(x.input) AS bytes, pg_column_size(x.input) > q.max_input_bytes AS too_big
    INTO bad
    FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
    WHERE pg_column_size(x.input) > q.max_input_bytes
       OR (jsonb_typeof(x.input) IN ('array', 'object')
           AND jsonb_path_exists(x.input, format('strict $.**{%s} ? (@.type() == "array" || @.type() == "object")',
                                                 q.max_input_depth)::jsonpath))
    ORDER BY x.ord LIMIT 1;
    IF FOUND AND bad.too_big THEN
        RAISE EXCEPTION 'pgflow: input % is % bytes, over the % bytes allowed (pgflow.set_quota)',
            bad.ord, bad.bytes, q.max_input_bytes USING ERRCODE = '54000';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'pgflow: input % nests arrays or objects deeper than % levels (pgflow.set_quota)',
            bad.ord, q.max_input_depth USING ERRCODE = '54001';
    END IF;
    IF q.max_open_instances IS NOT NULL AND NOT pgflow.is_engine_role(p_caller) THEN
        SELECT count(*) INTO open_count FROM (
            SELECT 1 FROM pgflow.instances i
            WHERE i.owner = p_caller AND i.status = ANY (pgflow.open_instance_statuses())
            LIMIT q.max_open_instances + 1) AS o;
        IF open_count + cardinality(p_inputs) > q.max_open_instances THEN
            RAISE EXCEPTION 'pgflow: role % has % open instances; starting % more would pass its quota of % '
                            '(pgflow.set_quota)', p_caller, open_count, cardinality(p_inputs),
                            q.max_open_instances USING ERRCODE = '53400';
        END IF;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb,
                                     p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q text;
    stored record;
    exists boolean;
    caller name := pgflow._check_caller(p_caller);
BEGIN
    SELECT f.shape, f.ref INTO stored FROM pgflow.flows f WHERE f.flow_name = p_name AND f.version = p_version;
    exists := FOUND;
    IF exists AND stored.shape = p_shape AND stored.ref IS NOT DISTINCT FROM p_ref THEN
        IF NOT EXISTS (SELECT 1 FROM pgflow.flow_registrations r  -- every start comes here: read, not write
                       WHERE r.flow_name = p_name AND r.version = p_version AND r.role_name = caller) THEN
            INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, caller)
            ON CONFLICT DO NOTHING;
        END IF;
        RETURN;
    END IF;
    PERFORM pgflow.check_shape(p_name, p_shape);
    IF p_version IS DISTINCT FROM pgflow.shape_version(p_shape) THEN
        RAISE EXCEPTION 'pgflow: flow % version % does not match its shape (whose version is %)',
            p_name, coalesce(quote_literal(left(p_version, 40)), 'NULL'), pgflow.shape_version(p_shape)
            USING ERRCODE = '22023';
    END IF;
    IF p_ref IS NOT NULL AND p_ref !~ '^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$' THEN
        RAISE EXCEPTION 'pgflow: flow % has an invalid code reference % (module:attribute)', p_name,
            quote_literal(left(p_ref, 60)) USING ERRCODE = '22023';
    END IF;
    IF exists THEN  -- same version, so the same shape: only the code reference differs
        RAISE EXCEPTION 'pgflow: flow % version % is already registered with code reference %, not %', p_name,
            p_version, coalesce(stored.ref, 'NULL'), coalesce(p_ref, 'NULL') USING ERRCODE = '23505';
    END IF;
    INSERT INTO pgflow.flows (flow_name, version, ref, shape)
    VALUES (p_name, p_version, p_ref, p_shape)
    ON CONFLICT DO NOTHING;
    INSERT INTO pgflow.flow_steps (flow_name, version, step_name, deps, over)
    SELECT p_name, p_version, s->>'name',
           ARRAY(SELECT jsonb_array_elements_text(s->'deps')), s->>'over'
    FROM jsonb_array_elements(p_shape->'steps') AS s
    ON CONFLICT DO NOTHING;
    INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, caller)
    ON CONFLICT DO NOTHING;
    FOR q IN SELECT DISTINCT s->>'queue' FROM jsonb_array_elements(p_shape->'steps') AS s LOOP
        PERFORM pgflow.ensure_queue(q, caller);
    END LOOP;
END $$;

-- The channel of a role's finished instances: made by grant_usage (and for the role that installed pgflow),
-- never here: a row inserted in a user's open transaction would make the coordinator wait on it. A role
-- without one (the owner, superusers) uses the shared channel. Internal (never granted) and called only by
-- definer functions (done_channel, notify_done), as the owner: so no definer or search_path of its own
-- (every name in it is qualified), and the planner inlines it into notify_done's batch.
CREATE OR REPLACE FUNCTION pgflow._channel_of(p_role name) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.channel FROM pgflow.role_channels c
                     WHERE c.role_name OPERATOR(pg_catalog.=) p_role), 'pgflow_instance_done')
$$;

-- Tell the owners' waiters that instances finished (each id on its owner's channel, _channel_of). Anyone may
-- call it: a waiter re-reads the instance's status, so a false alarm costs one read. One call per batch: the
-- coordinator finishes instances by the hundred, and a definer call per instance cost more than the rest of
-- finishing it. count() makes the statement run every row (a SQL function's last statement otherwise stops
-- at its first).
CREATE FUNCTION pgflow.notify_done(p_owners name[], p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT count(pg_catalog.pg_notify(pgflow._channel_of(u.owner), u.id::text))
    FROM unnest(p_owners, p_ids) AS u(owner, id)
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name[], bigint[]) FROM PUBLIC;

-- ... and for one instance (a cancel).
CREATE OR REPLACE FUNCTION pgflow.notify_done(p_owner name, p_id bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pgflow.notify_done(ARRAY[p_owner], ARRAY[p_id])
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name, bigint) FROM PUBLIC;

-- Roles granted usage before this version may call the new function too (grant_usage grants it from now on).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role_name FROM pgflow.role_grants g WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = g.role_name) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow.notify_done(name[], bigint[]) TO %I', r.role_name);
    END LOOP;
END $$;
