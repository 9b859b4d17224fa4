-- Control-flow workflows (the pg_durable model): a workflow is a tree of nodes stored as jsonb
-- ({"t": type, ...}); the coordinator walks it. Leaves that do work (sql, python, http) are queued like DAG
-- steps; timers and signal waits are rows in status 'waiting'. This file holds the node constructors: what
-- `pgflow.seq(...)`, `pgflow.sleep(60)` and friends build (validation is in 14_tree_validation.sql).

-- Nodes are passed around as text holding their JSON ({"t": ...}); any other text where a node is expected
-- is a SQL step. (Text, not jsonb, so that PostgreSQL resolves `node ~> 'SELECT ...'` to the text operators:
-- with a jsonb ~> jsonb operator it would try to parse the SQL literal as JSON.)
CREATE FUNCTION pgflow.node(p_node text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parsed jsonb;
BEGIN
    IF p_node IS NULL THEN
        RAISE EXCEPTION 'pgflow: a workflow node cannot be NULL' USING ERRCODE = '22004';
    END IF;
    IF ltrim(p_node) LIKE '{%' THEN
        BEGIN
            parsed := p_node::jsonb;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'pgflow: malformed node JSON: %', left(p_node, 200) USING ERRCODE = '22023';
        END;
        RETURN pgflow.node(parsed);
    END IF;
    RETURN jsonb_build_object('t', 'sql', 'sql', p_node);
END $$;
REVOKE ALL ON FUNCTION pgflow.node(text) FROM PUBLIC;
CREATE FUNCTION pgflow.node(p_node jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(p_node) = 'string' THEN
        RETURN pgflow.node(p_node #>> '{}');
    END IF;
    IF jsonb_typeof(p_node) IS DISTINCT FROM 'object' OR NOT p_node ? 't' THEN
        RAISE EXCEPTION 'pgflow: not a workflow node: % (build nodes with pgflow.* functions or operators)',
            left(coalesce(p_node::text, 'NULL'), 200) USING ERRCODE = '22023';
    END IF;
    RETURN p_node;
END $$;
REVOKE ALL ON FUNCTION pgflow.node(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow._compose(p_type text, p_left text, p_right text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- a ~> b ~> c is one sequence of three and a | b | c one race of three (the same results as nested
    -- pairs); a & b & c stays (a & b) & c, whose result nests as [[a, b], c] (as pg_durable's)
    SELECT jsonb_build_object('t', p_type, 'c',
        (CASE WHEN p_type <> 'join' AND pgflow.node(p_left)->>'t' = p_type
              THEN pgflow.node(p_left)->'c' ELSE jsonb_build_array(pgflow.node(p_left)) END)
        || jsonb_build_array(pgflow.node(p_right)))::text
$$;
REVOKE ALL ON FUNCTION pgflow._compose(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._list(p_type text, p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', p_type, 'c', (SELECT jsonb_agg(pgflow.node(n) ORDER BY i)
                                                 FROM unnest(p_nodes) WITH ORDINALITY AS x(n, i)))::text
$$;
REVOKE ALL ON FUNCTION pgflow._list(text, text[]) FROM PUBLIC;

CREATE FUNCTION pgflow.seq(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('seq', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.seq(VARIADIC text[]) FROM PUBLIC;
CREATE FUNCTION pgflow.join(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('join', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.join(VARIADIC text[]) FROM PUBLIC;
CREATE FUNCTION pgflow.race(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('race', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.race(VARIADIC text[]) FROM PUBLIC;
-- A result's name is checked when it is given (an error at the line that named it, not at start).
CREATE FUNCTION pgflow.named(p_node text, p_name text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_name IS NOT NULL AND (p_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' OR p_name IN ('input', 'vars', 'item')) THEN
        RAISE EXCEPTION 'pgflow: result name % is not a valid identifier (letters, digits and _, not starting '
                        'with a digit; not input, vars or item)', left(p_name, 80) USING ERRCODE = '22023';
    END IF;
    RETURN jsonb_build_object('t', 'name', 'name', p_name, 'c', jsonb_build_array(pgflow.node(p_node)))::text;
END $$;
REVOKE ALL ON FUNCTION pgflow.named(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.if_then(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'if', 'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_then))
        || CASE WHEN p_else IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_else)) END)::text
$$;
REVOKE ALL ON FUNCTION pgflow.if_then(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.has_rows(p_name text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'has_rows', 'name', p_name)::text
$$;
REVOKE ALL ON FUNCTION pgflow.has_rows(text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop(p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'c', jsonb_build_array(pgflow.node(p_body)))::text
$$;
REVOKE ALL ON FUNCTION pgflow.loop(text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop_while(p_cond text, p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'while', true,
                              'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_body)))::text
$$;
REVOKE ALL ON FUNCTION pgflow.loop_while(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.break_loop(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'break', 'c',
        CASE WHEN p_value IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_value)) END)::text
$$;
REVOKE ALL ON FUNCTION pgflow.break_loop(text) FROM PUBLIC;
CREATE FUNCTION pgflow.sleep(p_seconds double precision) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'sleep', 'seconds', p_seconds)::text
$$;
REVOKE ALL ON FUNCTION pgflow.sleep(double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.wait_for_schedule(p_cron text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'schedule', 'cron', p_cron)::text
$$;
REVOKE ALL ON FUNCTION pgflow.wait_for_schedule(text) FROM PUBLIC;
CREATE FUNCTION pgflow.wait_for_signal(p_name text, p_timeout double precision DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'wait_signal', 'name', p_name, 'timeout', p_timeout)::text
$$;
REVOKE ALL ON FUNCTION pgflow.wait_for_signal(text, double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.http(p_url text, p_method text DEFAULT 'GET', p_body jsonb DEFAULT NULL,
                            p_headers jsonb DEFAULT NULL, p_timeout double precision DEFAULT 30)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'http', 'url', p_url, 'method', upper(p_method), 'body', p_body,
                              'headers', coalesce(p_headers, '{}'::jsonb), 'timeout', p_timeout)::text
$$;
REVOKE ALL ON FUNCTION pgflow.http(text, text, jsonb, jsonb, double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.python(p_function text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'python', 'fn', p_function)::text
$$;
REVOKE ALL ON FUNCTION pgflow.python(text) FROM PUBLIC;
-- Names pg_durable users know (df.sql, df.if, df.loop(body, cond), df.break, df.join3).
CREATE FUNCTION pgflow.sql(p_statement text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.node(p_statement)::text $$;
REVOKE ALL ON FUNCTION pgflow.sql(text) FROM PUBLIC;
CREATE FUNCTION pgflow."if"(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT pgflow.if_then(p_cond, p_then, p_else) $$;
REVOKE ALL ON FUNCTION pgflow."if"(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop(p_body text, p_cond text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.loop_while(p_cond, p_body) $$;
REVOKE ALL ON FUNCTION pgflow.loop(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow."break"(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.break_loop(p_value) $$;
REVOKE ALL ON FUNCTION pgflow."break"(text) FROM PUBLIC;
CREATE FUNCTION pgflow.join3(a text, b text, c text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.join(a, b, c) $$;
REVOKE ALL ON FUNCTION pgflow.join3(text, text, text) FROM PUBLIC;

-- per-node options for leaves: max_attempts, timeout, queue, backoff_base, backoff_cap, retry_on (http)
CREATE FUNCTION pgflow.with_options(p_node text, p_options jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (pgflow.node(p_node) || p_options)::text
$$;
REVOKE ALL ON FUNCTION pgflow.with_options(text, jsonb) FROM PUBLIC;
