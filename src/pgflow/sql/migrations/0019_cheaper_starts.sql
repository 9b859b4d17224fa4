-- compatible-from: 18
-- A start runs fewer statements (loadtests/README.md, "Cheaper starts"): the registration a Python start
-- has just checked is not looked up again (pgflow._start_as takes the shape its caller found or registered),
-- the step kinds are jsonpath tests instead of a query, _register_as reads the flow and the caller's
-- registration in one statement, and the SQL front door's start is one register_and_start call.

DROP FUNCTION pgflow._start_as(name, text, text, jsonb[], text);

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
           OR pgflow.is_engine_role(caller)
           OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
               AND pg_has_role(caller, 'pgflow_admin', 'member')));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: flow % version % is not registered (by role %): register it first',
            p_flow, p_version, caller USING ERRCODE = 'P0002';
    END IF;
    RETURN QUERY SELECT pgflow._start_as(caller, p_flow, p_version, shape, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_instances(text, text, jsonb[], text, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.register_and_start(p_flow text, p_version text, p_ref text, p_shape jsonb,
                                          p_inputs jsonb[], p_label text, p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    PERFORM pgflow._register_as(caller, p_flow, p_version, p_ref, p_shape);
    RETURN QUERY SELECT pgflow._start_as(caller, p_flow, p_version, p_shape, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.register_and_start(text, text, text, jsonb, jsonb[], text, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow._register_as(p_caller name, p_name text, p_version text, p_ref text, p_shape jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q text;
    stored record;
    exists boolean;
BEGIN
    -- every start comes here: one read, and no write once the caller has registered this version
    SELECT f.ref, f.shape = p_shape AND f.ref IS NOT DISTINCT FROM p_ref AS same,
           EXISTS (SELECT 1 FROM pgflow.flow_registrations r
                   WHERE r.flow_name = p_name AND r.version = p_version AND r.role_name = p_caller) AS registered
    INTO stored FROM pgflow.flows f WHERE f.flow_name = p_name AND f.version = p_version;
    exists := FOUND;
    IF exists AND stored.same THEN
        IF NOT stored.registered THEN
            INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, p_caller)
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
    INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, p_caller)
    ON CONFLICT DO NOTHING;
    FOR q IN SELECT DISTINCT s->>'queue' FROM jsonb_array_elements(p_shape->'steps') AS s LOOP
        PERFORM pgflow.ensure_queue(q, p_caller);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow._register_as(name, text, text, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb := pgflow.tree_shape(p_node, p_name);
    version text := pgflow.shape_version(shape);
    new_id bigint;
BEGIN
    IF p_detached THEN
        -- dblink has several overloads (to_regproc is NULL for an ambiguous name): look for a visible one
        IF NOT EXISTS (SELECT FROM pg_proc WHERE proname = 'dblink' AND pg_function_is_visible(oid)) THEN
            RAISE EXCEPTION 'pgflow: a detached start needs the dblink extension (CREATE EXTENSION dblink)'
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE 'SELECT id FROM dblink($1, $2) AS t(id bigint)' INTO new_id
            USING pgflow.loopback_conninfo(),
                  format('SELECT pgflow.start(%L::jsonb, %L::jsonb, %L, false, %L)', p_node, p_input, p_label,
                         p_name);
        RETURN new_id;
    END IF;
    RETURN (SELECT pgflow.register_and_start(p_name, version, NULL, shape, ARRAY[p_input], p_label));
END $$;
REVOKE ALL ON FUNCTION pgflow.start(jsonb, jsonb, text, boolean, text) FROM PUBLIC;
