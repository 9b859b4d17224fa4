-- Registering a flow version: its shape, one row per step, and its queues. Idempotent and safe to call
-- concurrently. A definer function: flows are shared, registered by anyone allowed to start them, so users
-- need no write access to the flow tables.
--
-- Trusted definitions (SECURITY.md): the version is computed here from the shape stored, never taken on
-- trust. A version that does not match its shape is refused, so no one can register another user's version
-- with different steps; a version already stored with a different code reference is refused too. Shapes are
-- validated in full (the type of every field the engine reads), so a malformed one can never reach a
-- coordinator or a worker.

-- The shape's canonical JSON text: keys sorted by code point, no spaces, strings escaped as JSON. It is the
-- text the Python side hashes (orjson with sorted keys, pgflow.flow.version_hash), so both compute the same
-- version for the same shape.
CREATE FUNCTION pgflow.canonical_json(p jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN CASE jsonb_typeof(p)
        WHEN 'object' THEN '{' || coalesce((SELECT string_agg(to_jsonb(e.key)::text || ':'
                                                              || pgflow.canonical_json(e.value), ','
                                                              ORDER BY e.key COLLATE "C")
                                            FROM jsonb_each(p) AS e), '') || '}'
        WHEN 'array' THEN '[' || coalesce((SELECT string_agg(pgflow.canonical_json(a.value), ',' ORDER BY a.n)
                                           FROM jsonb_array_elements(p) WITH ORDINALITY AS a(value, n)), '') || ']'
        ELSE p::text END;
END $$;
REVOKE ALL ON FUNCTION pgflow.canonical_json(jsonb) FROM PUBLIC;

-- The version of a shape: the first 16 hex digits of the SHA-256 of its canonical JSON.
CREATE FUNCTION pgflow.shape_version(p_shape jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT left(encode(sha256(convert_to(pgflow.canonical_json(p_shape), 'UTF8')), 'hex'), 16)
$$;
REVOKE ALL ON FUNCTION pgflow.shape_version(jsonb) FROM PUBLIC;

-- Raise the one-line error of a malformed shape.
CREATE FUNCTION pgflow._bad_shape(p_name text, p_what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pgflow: invalid shape for flow %: %', left(coalesce(p_name, 'NULL'), 60), p_what
        USING ERRCODE = '22023';
END $$;
REVOKE ALL ON FUNCTION pgflow._bad_shape(text, text) FROM PUBLIC;

-- Whether a jsonb value is a number in [lo, hi] (and integral when p_int).
CREATE FUNCTION pgflow._is_number(v jsonb, lo numeric, hi numeric, p_int boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_typeof(v) = 'number' AND v::text::numeric BETWEEN lo AND hi
           AND (NOT p_int OR v::text::numeric = trunc(v::text::numeric))
$$;
REVOKE ALL ON FUNCTION pgflow._is_number(jsonb, numeric, numeric, boolean) FROM PUBLIC;

-- Every field of every step that a coordinator or worker reads, with its type; DAG dependencies must name
-- steps of the flow and form no cycle; a control-flow workflow's steps must be exactly those its tree gives.
CREATE FUNCTION pgflow.check_shape(p_name text, p_shape jsonb) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    s jsonb;
    names text[] := ARRAY[]::text[];
    left_over text[];
    n integer;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$' THEN
        PERFORM pgflow._bad_shape(p_name, 'a flow name is 1 to 100 letters, digits or _ . : -');
    END IF;
    IF jsonb_typeof(p_shape) IS DISTINCT FROM 'object' OR p_shape->>'name' IS DISTINCT FROM p_name
       OR jsonb_typeof(p_shape->'steps') IS DISTINCT FROM 'array'
       OR (jsonb_array_length(p_shape->'steps') = 0 AND NOT p_shape ? 'tree') THEN
        PERFORM pgflow._bad_shape(p_name, 'a shape is an object with the flow''s "name" and a "steps" list '
                                          '(not empty)');
    END IF;
    IF p_shape ? 'tree' THEN
        IF p_shape IS DISTINCT FROM pgflow.tree_shape(p_shape->'tree', p_name) THEN
            PERFORM pgflow._bad_shape(p_name, 'its steps are not those of its tree (use pgflow.tree_shape)');
        END IF;
        RETURN;
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(p_shape) k WHERE k NOT IN ('name', 'steps')) > 0 THEN
        PERFORM pgflow._bad_shape(p_name, 'unknown keys besides "name" and "steps"');
    END IF;
    FOR s IN SELECT value FROM jsonb_array_elements(p_shape->'steps') LOOP
        IF jsonb_typeof(s) IS DISTINCT FROM 'object' OR jsonb_typeof(s->'name') IS DISTINCT FROM 'string'
           OR s->>'name' !~ '^[^\x01-\x1f]{1,200}$' OR s->>'name' = ANY (names) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: a step needs a unique name of 1 to 200 characters',
                                                     left(coalesce(s->>'name', s::text), 60)));
        END IF;
        names := names || (s->>'name');
    END LOOP;
    FOR s IN SELECT value FROM jsonb_array_elements(p_shape->'steps') LOOP
        IF s->>'kind' IS DISTINCT FROM 'python' AND s->>'kind' IS DISTINCT FROM 'sql' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "kind" must be "python" or "sql"', s->>'name'));
        ELSIF jsonb_typeof(s->'deps') IS DISTINCT FROM 'array'
              OR EXISTS (SELECT 1 FROM jsonb_array_elements(s->'deps') d
                         WHERE jsonb_typeof(d) <> 'string' OR NOT d #>> '{}' = ANY (names) OR d #>> '{}' = s->>'name') THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "deps" must list other steps of the flow', s->>'name'));
        ELSIF NOT (jsonb_typeof(coalesce(s->'over', 'null')) = 'null'
                   OR (jsonb_typeof(s->'over') = 'string' AND (s->>'over' = 'input' OR s->>'over' = ANY (names)))) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "over" must be null, "input" or a step of the flow',
                                                     s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'flatten', 'false')) <> 'boolean'
              OR jsonb_typeof(coalesce(s->'split_on_failure', 'false')) <> 'boolean' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "flatten" and "split_on_failure" are booleans',
                                                     s->>'name'));
        ELSIF jsonb_typeof(s->'queue') IS DISTINCT FROM 'string' OR s->>'queue' !~ '^[a-z][a-z0-9_]{0,46}$' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "queue" must be a lower-case queue name', s->>'name'));
        ELSIF NOT pgflow._is_number(s->'max_attempts', 1, 1000, true) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "max_attempts" must be an integer from 1 to 1000',
                                                     s->>'name'));
        ELSIF NOT pgflow._is_number(s->'backoff_base', 0, 1e9, false)
              OR NOT pgflow._is_number(s->'backoff_cap', 0, 1e9, false)
              OR NOT (jsonb_typeof(coalesce(s->'timeout', 'null')) = 'null'
                      OR pgflow._is_number(s->'timeout', 0, 1e9, false)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "backoff_base", "backoff_cap" and "timeout" are '
                                                     'seconds (numbers from 0 to 1e9)', s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'sql', 'null')) NOT IN ('null', 'string')
              OR (s->>'kind' = 'sql') <> (jsonb_typeof(s->'sql') = 'string') THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "sql" is the text of a SQL step (only)', s->>'name'));
        ELSIF NOT (jsonb_typeof(coalesce(s->'batch_size', 'null')) = 'null'
                   OR pgflow._is_number(s->'batch_size', 1, 1000000, true))
              OR NOT (jsonb_typeof(coalesce(s->'priority', 'null')) = 'null'
                      OR pgflow._is_number(s->'priority', -1000, 1000, true)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "batch_size" and "priority" are small integers',
                                                     s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'limit', 'null')) NOT IN ('null', 'object')
              OR (s ? 'limit' AND jsonb_typeof(s->'limit'->'name') IS DISTINCT FROM 'string')
              OR jsonb_typeof(coalesce(s->'limit_key', 'null')) NOT IN ('null', 'string')
              OR NOT (jsonb_typeof(coalesce(s->'cost', 'null')) = 'null' OR s->'cost' = '"function"'
                      OR pgflow._is_number(s->'cost', 0, 1e12, false)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "limit" is an object with a "name", "limit_key" a '
                                                     'string, "cost" a number or "function"', s->>'name'));
        ELSIF (SELECT count(*) FROM jsonb_object_keys(s) k
               WHERE k NOT IN ('name', 'kind', 'deps', 'over', 'flatten', 'queue', 'max_attempts', 'backoff_base',
                               'backoff_cap', 'timeout', 'sql', 'batch_size', 'split_on_failure', 'priority',
                               'limit', 'limit_key', 'cost')) > 0 THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: unknown keys', s->>'name'));
        END IF;
    END LOOP;
    -- no cycle: peel off steps whose deps are all peeled until none is left (or none can be)
    left_over := names;
    LOOP
        n := cardinality(left_over);
        left_over := ARRAY(SELECT st->>'name' FROM jsonb_array_elements(p_shape->'steps') AS st
                           WHERE st->>'name' = ANY (left_over)
                             AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(st->'deps') AS d
                                         WHERE d = ANY (left_over)));
        EXIT WHEN cardinality(left_over) = 0;
        IF cardinality(left_over) = n THEN
            PERFORM pgflow._bad_shape(p_name, format('steps %s depend on each other in a cycle',
                                                     array_to_string(left_over, ', ')));
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.check_shape(text, jsonb) FROM PUBLIC;

-- Register a flow version for a caller a definer function has checked (register_flow, register_and_start):
-- internal, never granted; no SET search_path, as pgflow._start_as.
CREATE FUNCTION pgflow._register_as(p_caller name, p_name text, p_version text, p_ref text, p_shape jsonb)
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

-- p_caller: the role registering (its default is evaluated as the caller, before the function switches to
-- its owner); it may only name a role the session could SET ROLE to (pgflow._check_caller).
CREATE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb,
                                     p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    PERFORM pgflow._register_as(pgflow._check_caller(p_caller), p_name, p_version, p_ref, p_shape);
END $$;
REVOKE ALL ON FUNCTION pgflow.register_flow(text, text, text, jsonb, name) FROM PUBLIC;
