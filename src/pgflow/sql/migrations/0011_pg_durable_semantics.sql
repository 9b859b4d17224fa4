-- compatible-from: 1
-- Issue 13: pg_durable's semantics in pgflow's own API (schema/12_tree_nodes.sql, schema/14_tree_validation.sql).
-- a & b & c stays (a & b) & c (its result nests); a break outside any loop is no longer refused at start: it
-- fails the instance when it runs; a workflow may nest 256 levels (was 100), a sequence of n counting as
-- n - 1 nested pairs. Replacements only: older code keeps working (an older coordinator leaves an instance whose
-- root ends in a break running, as it did for a break in a loop's condition; it fails it once upgraded).

CREATE OR REPLACE FUNCTION pgflow._compose(p_type text, p_left text, p_right text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- a ~> b ~> c is one sequence of three and a | b | c one race of three (the same results as nested
    -- pairs); a & b & c stays (a & b) & c, whose result nests as [[a, b], c] (as pg_durable's)
    SELECT jsonb_build_object('t', p_type, 'c',
        (CASE WHEN p_type <> 'join' AND pgflow.node(p_left)->>'t' = p_type
              THEN pgflow.node(p_left)->'c' ELSE jsonb_build_array(pgflow.node(p_left)) END)
        || jsonb_build_array(pgflow.node(p_right)))::text
$$;

CREATE OR REPLACE FUNCTION pgflow._validate(p_node jsonb, p_in_loop boolean, p_names text[], p_depth integer DEFAULT 0)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p_node->>'t';
    child jsonb;
    names text[] := p_names;
    ref text;
    n int := coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(p_node->'c') = 'array' THEN p_node->'c' END), 0);
    d int := p_depth + 1;
    i bigint;
BEGIN
    IF jsonb_typeof(p_node) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pgflow: not a workflow node: %', left(coalesce(p_node::text, 'NULL'), 200)
            USING ERRCODE = '22023';
    END IF;
    IF p_depth > 256 THEN
        RAISE EXCEPTION 'pgflow: the workflow exceeds the maximum nesting depth of 256' USING ERRCODE = '22023';
    END IF;
    IF p_node ? 'c' AND jsonb_typeof(p_node->'c') <> 'array' THEN
        RAISE EXCEPTION 'pgflow: the children of a % node must be an array', t USING ERRCODE = '22023';
    END IF;
    IF t IN ('sql', 'python', 'http') THEN
        PERFORM pgflow._check_number(p_node, 'max_attempts', 1, 1000, false, true);
        PERFORM pgflow._check_number(p_node, 'backoff_base', 0.001, 86400, false);
        PERFORM pgflow._check_number(p_node, 'backoff_cap', 0.001, 86400, false);
        PERFORM pgflow._check_number(p_node, 'timeout', 0.001, 86400, false);
    END IF;
    CASE t
    WHEN 'sql' THEN
        IF jsonb_typeof(p_node->'sql') IS DISTINCT FROM 'string' OR btrim(p_node->>'sql') = '' THEN
            RAISE EXCEPTION 'pgflow: a SQL step needs non-empty SQL text' USING ERRCODE = '22023';
        END IF;
        FOR ref IN SELECT pgflow.sql_references(p_node->>'sql') LOOP
            IF NOT ref = ANY (names || ARRAY['input', 'vars']) THEN
                RAISE EXCEPTION 'pgflow: $% in SQL step "%" names no earlier result (known: %)', ref,
                    left(p_node->>'sql', 80), array_to_string(names || ARRAY['input', 'vars'], ', ')
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
    WHEN 'python' THEN
        IF coalesce(p_node->>'fn', '') !~ '^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$' THEN
            RAISE EXCEPTION 'pgflow: python node needs "module:function", got %', p_node->>'fn'
                USING ERRCODE = '22023';
        END IF;
    WHEN 'http' THEN
        IF coalesce(p_node->>'url', '') = '' THEN
            RAISE EXCEPTION 'pgflow: http node without url' USING ERRCODE = '22023';
        END IF;
        IF jsonb_typeof(p_node->'url') <> 'string'
           OR NOT coalesce(p_node->>'method', '') = ANY (ARRAY['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD']) THEN
            RAISE EXCEPTION 'pgflow: an http node needs a URL and a method (GET, POST, PUT, PATCH, DELETE, HEAD), '
                            'got %', coalesce(p_node->>'method', 'NULL') USING ERRCODE = '22023';
        END IF;
        IF coalesce(jsonb_typeof(p_node->'headers'), 'null') NOT IN ('object', 'null')
           OR coalesce(jsonb_typeof(p_node->'retry_on'), 'null') NOT IN ('array', 'null') THEN
            RAISE EXCEPTION 'pgflow: http headers must be an object and retry_on an array of statuses'
                USING ERRCODE = '22023';
        END IF;
    WHEN 'seq', 'join', 'race' THEN
        IF n < (CASE WHEN t = 'seq' THEN 1 ELSE 2 END) THEN
            RAISE EXCEPTION 'pgflow: % needs at least % children', t, CASE WHEN t = 'seq' THEN 1 ELSE 2 END
                USING ERRCODE = '22023';
        END IF;
        -- a sequence of n counts as n - 1 nested pairs (a ~> b ~> c is (a ~> b) ~> c): its first child is
        -- n - 1 levels down, its last one level
        FOR child, i IN SELECT c.v, c.i FROM jsonb_array_elements(p_node->'c') WITH ORDINALITY AS c(v, i) LOOP
            names := pgflow._validate(child, p_in_loop, names,
                                      CASE WHEN t = 'seq' THEN p_depth + greatest(n - greatest(i::int - 1, 1), 1)
                                           ELSE d END);
        END LOOP;
    WHEN 'name' THEN
        IF coalesce(p_node->>'name', '') !~ '^[A-Za-z_][A-Za-z0-9_]*$'
           OR p_node->>'name' IN ('input', 'vars', 'item') THEN
            RAISE EXCEPTION 'pgflow: result name % must be an identifier other than input, vars, item',
                coalesce(p_node->>'name', 'NULL') USING ERRCODE = '22023';
        END IF;
        IF n <> 1 THEN
            RAISE EXCEPTION 'pgflow: |=> names exactly one node' USING ERRCODE = '22023';
        END IF;
        names := pgflow._validate(p_node->'c'->0, p_in_loop, names, p_depth) || (p_node->>'name');
    WHEN 'if' THEN
        IF n NOT IN (2, 3) THEN
            RAISE EXCEPTION 'pgflow: if needs a condition, a then branch and an optional else' USING ERRCODE = '22023';
        END IF;
        names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d);
        names := pgflow._validate(p_node->'c'->1, p_in_loop, names, d);
        IF n = 3 THEN
            names := pgflow._validate(p_node->'c'->2, p_in_loop, names, d);
        END IF;
    WHEN 'has_rows' THEN
        IF NOT coalesce(p_node->>'name', '') = ANY (names) THEN
            RAISE EXCEPTION 'pgflow: has_rows(%) names no earlier result (known: %)', p_node->>'name',
                array_to_string(names, ', ') USING ERRCODE = '22023';
        END IF;
    WHEN 'loop' THEN
        IF coalesce(jsonb_typeof(p_node->'while'), 'null') NOT IN ('boolean', 'null')
           OR n <> (CASE WHEN p_node->'while' = 'true'::jsonb THEN 2 ELSE 1 END) THEN
            RAISE EXCEPTION 'pgflow: malformed loop node (while must be true or absent, with 2 or 1 children)'
                USING ERRCODE = '22023';
        END IF;
        FOR child IN SELECT jsonb_array_elements(p_node->'c') LOOP
            names := pgflow._validate(child, true, names, d);
        END LOOP;
    WHEN 'break' THEN  -- outside a loop it fails the instance when it runs (as pg_durable's)
        IF jsonb_typeof(p_node->'c') IS DISTINCT FROM 'array' OR n > 1 THEN
            RAISE EXCEPTION 'pgflow: break takes a list of at most one node (its value) in "c"' USING ERRCODE = '22023';
        END IF;
        IF n = 1 THEN
            names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d);
        END IF;
    WHEN 'sleep' THEN
        PERFORM pgflow._check_number(p_node, 'seconds', 0, 1e9, true);
    WHEN 'schedule' THEN
        IF jsonb_typeof(p_node->'cron') IS DISTINCT FROM 'string' OR NOT pgflow.valid_cron(p_node->>'cron') THEN
            RAISE EXCEPTION 'pgflow: invalid cron expression % (5 fields: minute hour day month weekday)',
                coalesce(quote_literal(p_node->>'cron'), 'NULL') USING ERRCODE = '22023';
        END IF;
    WHEN 'wait_signal' THEN
        IF coalesce(p_node->>'name', '') = '' THEN
            RAISE EXCEPTION 'pgflow: wait_for_signal needs a name' USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_number(p_node, 'timeout', 0, 1e9, false);
    ELSE
        RAISE EXCEPTION 'pgflow: unknown node type % in %', coalesce(quote_literal(t), 'NULL'),
            left(p_node::text, 200) USING ERRCODE = '22023';
    END CASE;
    IF p_node ? 'queue' AND p_node->>'queue' !~ '^[a-z_][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'pgflow: queue % must be lowercase letters, digits, _', p_node->>'queue'
            USING ERRCODE = '22023';
    END IF;
    RETURN names;
END $$;
