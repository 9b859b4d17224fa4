-- pgflow schema, version 2: control-flow workflows (the pg_durable model) and the SQL front door.
--
-- A control-flow workflow is a tree of nodes stored as jsonb ({"t": type, ...}); the coordinator walks it.
-- Leaves that do work (sql, python, http) are queued like DAG steps, one step row per node path
-- ("r", "r.0", "r.0.1", ...). Timers and signal waits are rows in status 'waiting' that the coordinator
-- completes; the losers of a race and the branch an if did not take are 'skipped'.

ALTER TABLE pgflow.steps DROP CONSTRAINT steps_status_check;
ALTER TABLE pgflow.steps ADD CONSTRAINT steps_status_check
    CHECK (status IN ('queued', 'running', 'retrying', 'mapping', 'waiting', 'completed', 'failed', 'cancelled',
                      'skipped'));
-- [[column, SQL type], ...] of a SQL step's result, in order: `$name` is its first column, `$name.*` a typed relation
ALTER TABLE pgflow.steps ADD COLUMN columns jsonb;

ALTER TABLE pgflow.instances ADD COLUMN variables jsonb;
ALTER TABLE pgflow.instances ADD COLUMN owner name NOT NULL DEFAULT current_user;

CREATE TABLE pgflow.signals (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  bigint      NOT NULL REFERENCES pgflow.instances ON DELETE CASCADE,
    name         text        NOT NULL,
    data         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    consumed_at  timestamptz,
    consumed_by  text                   -- the node path of the wait that received it
);
CREATE INDEX signals_pending ON pgflow.signals (instance_id, name, id) WHERE consumed_at IS NULL;

-- Per-user named values, copied into an instance when it starts ($vars.name, ctx.vars).
CREATE TABLE pgflow.variables (
    owner       name        NOT NULL DEFAULT current_user,
    name        text        NOT NULL,
    value       jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, name)
);

CREATE OR REPLACE FUNCTION pgflow.start_instance(p_flow text, p_version text, p_input jsonb, p_label text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables)
    VALUES (p_flow, p_version, p_input, p_label,
            (SELECT jsonb_object_agg(v.name, v.value) FROM pgflow.variables v WHERE v.owner = current_user))
    RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (new_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;

DROP FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[]);
CREATE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb
) LANGUAGE sql AS $$
    WITH u AS (
        SELECT * FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks)
            AS u(msg_id, instance_id, step_name, task_index)
    ), claimed AS (
        UPDATE pgflow.steps s
        SET status = 'running', attempt = s.attempt + 1, started_at = clock_timestamp(),
            msg_id = u.msg_id, next_attempt_at = NULL
        FROM u, pgflow.instances i
        WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
          AND i.id = s.instance_id AND i.status = 'running'
          AND s.status IN ('queued', 'running', 'retrying')
        RETURNING u.msg_id, s.instance_id, s.step_name, s.task_index, s.attempt,
                  i.flow_name, i.flow_version, i.input, i.variables
    )
    SELECT c.msg_id, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name, c.flow_version,
           -- a task of a map over the input gets its element, not the whole input list (no N^2 reads)
           CASE WHEN c.task_index >= 0 AND fs.over = 'input' THEN NULL ELSE c.input END,
           c.variables, d.deps, d.dep_columns
    FROM claimed c
    JOIN pgflow.flow_steps fs
      ON fs.flow_name = c.flow_name AND fs.version = c.flow_version AND fs.step_name = c.step_name
    LEFT JOIN LATERAL (
        SELECT jsonb_object_agg(s.step_name, s.output) AS deps,
               jsonb_object_agg(s.step_name, s.columns) FILTER (WHERE s.columns IS NOT NULL) AS dep_columns
        FROM pgflow.steps s
        WHERE s.instance_id = c.instance_id AND s.task_index = -1 AND s.step_name = ANY (fs.deps)
          -- likewise a map task gets its element from the message, not the list it fans out over
          AND (c.task_index < 0 OR s.step_name IS DISTINCT FROM fs.over)
    ) d ON true;
$$;

DROP FUNCTION pgflow.complete_tasks(text, bigint[], bigint[], text[], integer[], integer[], jsonb[]);
CREATE FUNCTION pgflow.complete_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[], p_outputs jsonb[], p_columns jsonb[] DEFAULT NULL
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE pgflow.steps s
    SET status = 'completed', output = u.output, columns = u.columns, finished_at = clock_timestamp(),
        error = NULL
    FROM unnest(p_instance_ids, p_steps, p_tasks, p_attempts, p_outputs,
                coalesce(p_columns, array_fill(NULL::jsonb, ARRAY[cardinality(p_msg_ids)])))
        AS u(instance_id, step_name, task_index, attempt, output, columns)
    WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
      AND s.status = 'running' AND s.attempt = u.attempt;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pgmq.delete(p_queue, ARRAY(
        SELECT u.msg_id
        FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks, p_attempts)
            AS u(msg_id, instance_id, step_name, task_index, attempt)
        WHERE NOT EXISTS (
            SELECT 1 FROM pgflow.steps s
            WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name
              AND s.task_index = u.task_index AND s.status IN ('running', 'retrying')
              AND s.attempt > u.attempt)));
    INSERT INTO pgflow.wakeups (instance_id) SELECT DISTINCT unnest(p_instance_ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN n;
END $$;

CREATE OR REPLACE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF st NOT IN ('pending', 'running') THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
    WHERE instance_id = p_id AND status IN ('queued', 'running', 'retrying', 'mapping', 'waiting');
    PERFORM pg_notify('pgflow_instance_done', p_id::text);
    RETURN 'cancelled';
END $$;

-- ------------------------------------------------------------------------------------------------------
-- Nodes: constructors, validation, leaves
-- ------------------------------------------------------------------------------------------------------

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

CREATE FUNCTION pgflow._compose(p_type text, p_left text, p_right text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- a ~> b ~> c is one sequence of three, not nested pairs
    SELECT jsonb_build_object('t', p_type, 'c',
        (CASE WHEN pgflow.node(p_left)->>'t' = p_type
              THEN pgflow.node(p_left)->'c' ELSE jsonb_build_array(pgflow.node(p_left)) END)
        || jsonb_build_array(pgflow.node(p_right)))::text
$$;
CREATE FUNCTION pgflow._list(p_type text, p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', p_type, 'c', (SELECT jsonb_agg(pgflow.node(n) ORDER BY i)
                                                 FROM unnest(p_nodes) WITH ORDINALITY AS x(n, i)))::text
$$;

CREATE FUNCTION pgflow.seq(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('seq', p_nodes) $$;
CREATE FUNCTION pgflow.join(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('join', p_nodes) $$;
CREATE FUNCTION pgflow.race(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('race', p_nodes) $$;
CREATE FUNCTION pgflow.named(p_node text, p_name text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'name', 'name', p_name, 'c', jsonb_build_array(pgflow.node(p_node)))::text
$$;
CREATE FUNCTION pgflow.if_then(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'if', 'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_then))
        || CASE WHEN p_else IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_else)) END)::text
$$;
CREATE FUNCTION pgflow.has_rows(p_name text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'has_rows', 'name', p_name)::text
$$;
CREATE FUNCTION pgflow.loop(p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'c', jsonb_build_array(pgflow.node(p_body)))::text
$$;
CREATE FUNCTION pgflow.loop_while(p_cond text, p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'while', true,
                              'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_body)))::text
$$;
CREATE FUNCTION pgflow.break_loop(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'break', 'c',
        CASE WHEN p_value IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_value)) END)::text
$$;
CREATE FUNCTION pgflow.sleep(p_seconds double precision) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'sleep', 'seconds', p_seconds)::text
$$;
CREATE FUNCTION pgflow.wait_for_schedule(p_cron text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'schedule', 'cron', p_cron)::text
$$;
CREATE FUNCTION pgflow.wait_for_signal(p_name text, p_timeout double precision DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'wait_signal', 'name', p_name, 'timeout', p_timeout)::text
$$;
CREATE FUNCTION pgflow.http(p_url text, p_method text DEFAULT 'GET', p_body jsonb DEFAULT NULL,
                            p_headers jsonb DEFAULT NULL, p_timeout double precision DEFAULT 30)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'http', 'url', p_url, 'method', upper(p_method), 'body', p_body,
                              'headers', coalesce(p_headers, '{}'::jsonb), 'timeout', p_timeout)::text
$$;
CREATE FUNCTION pgflow.python(p_function text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'python', 'fn', p_function)::text
$$;
-- Names pg_durable users know (df.sql, df.if, df.loop(body, cond), df.break, df.join3).
CREATE FUNCTION pgflow.sql(p_statement text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.node(p_statement)::text $$;
CREATE FUNCTION pgflow."if"(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT pgflow.if_then(p_cond, p_then, p_else) $$;
CREATE FUNCTION pgflow.loop(p_body text, p_cond text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.loop_while(p_cond, p_body) $$;
CREATE FUNCTION pgflow."break"(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.break_loop(p_value) $$;
CREATE FUNCTION pgflow.join3(a text, b text, c text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.join(a, b, c) $$;

-- per-node options for leaves: max_attempts, timeout, queue, backoff_base, backoff_cap, retry_on (http)
CREATE FUNCTION pgflow.with_options(p_node text, p_options jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (pgflow.node(p_node) || p_options)::text
$$;

-- Operators (README "Coming from pg_durable"). PostgreSQL gives all user-defined operators the same
-- precedence, associating to the left: parenthesise mixed expressions.
CREATE FUNCTION pgflow._op_seq(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('seq', $1, $2) $$;
CREATE FUNCTION pgflow._op_join(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('join', $1, $2) $$;
CREATE FUNCTION pgflow._op_race(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('race', $1, $2) $$;
CREATE FUNCTION pgflow._op_if(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.if_then($1, $2) $$;
CREATE FUNCTION pgflow._op_else(p_if text, p_else text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    node jsonb := pgflow.node(p_if);
BEGIN
    IF node->>'t' IS DISTINCT FROM 'if' OR jsonb_array_length(node->'c') <> 2 THEN
        RAISE EXCEPTION 'pgflow: !> needs an if without else on its left (cond ?> then !> else), got %',
            left(p_if, 200) USING ERRCODE = '22023';
    END IF;
    RETURN jsonb_set(node, '{c}', (node->'c') || jsonb_build_array(pgflow.node(p_else)))::text;
END $$;

DO $ops$
DECLARE
    target text := CASE WHEN has_schema_privilege('public', 'CREATE') THEN 'public' ELSE 'pgflow' END;
BEGIN
    EXECUTE format('CREATE OPERATOR %I.~> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_seq)', target);
    EXECUTE format('CREATE OPERATOR %I.& (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_join)', target);
    EXECUTE format('CREATE OPERATOR %I.| (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_race)', target);
    EXECUTE format('CREATE OPERATOR %I.?> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_if)', target);
    EXECUTE format('CREATE OPERATOR %I.!> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_else)', target);
    EXECUTE format('CREATE OPERATOR %I.|=> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow.named)', target);
    EXECUTE format('CREATE OPERATOR %I.@> (RIGHTARG = text, FUNCTION = pgflow.loop)', target);
END $ops$;

-- A 5-field cron expression (minute hour day-of-month month day-of-week), with *, lists, ranges, steps
-- and month/day names.
CREATE FUNCTION pgflow.valid_cron(p_cron text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    fields text[] := regexp_split_to_array(btrim(coalesce(p_cron, '')), '\s+');
    lows int[] := ARRAY[0, 0, 1, 1, 0];
    highs int[] := ARRAY[59, 23, 31, 12, 7];
    names text[] := ARRAY['', '', '', 'jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec', 'sun|mon|tue|wed|thu|fri|sat'];
    part text;
    m text[];
    i int;
BEGIN
    IF array_length(fields, 1) IS DISTINCT FROM 5 THEN
        RETURN false;
    END IF;
    FOR i IN 1..5 LOOP
        FOREACH part IN ARRAY string_to_array(lower(fields[i]), ',') LOOP
            m := regexp_match(part, '^(\*|[0-9]{1,2}|[a-z]{3})(?:-([0-9]{1,2}|[a-z]{3}))?(?:/([0-9]{1,2}))?$');
            IF m IS NULL THEN
                RETURN false;
            END IF;
            IF m[1] ~ '^[a-z]' AND (names[i] = '' OR m[1] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            IF m[2] ~ '^[a-z]' AND (names[i] = '' OR m[2] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            IF m[1] ~ '^[0-9]+$' AND NOT m[1]::int BETWEEN lows[i] AND highs[i] THEN
                RETURN false;
            END IF;
            IF m[2] ~ '^[0-9]+$' AND (NOT m[2]::int BETWEEN lows[i] AND highs[i]
                                      OR (m[1] ~ '^[0-9]+$' AND m[2]::int < m[1]::int)) THEN
                RETURN false;
            END IF;
            IF m[3] IS NOT NULL AND m[3]::int = 0 THEN
                RETURN false;
            END IF;
        END LOOP;
    END LOOP;
    RETURN true;
END $$;

-- SQL text without literals, quoted identifiers, comments and dollar-quoted bodies (an approximation of
-- the worker's lexer, for validation: comments first, so a quote inside a comment does not open a literal).
CREATE FUNCTION pgflow._strip_sql(p_sql text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(regexp_replace(p_sql,
        '\$([A-Za-z_][A-Za-z0-9_]*)?\$.*?\$\1\$', ' ', 'g'),
        '--[^\n]*', ' ', 'g'),
        '/\*.*?\*/', ' ', 'g'),
        '[Ee]''(?:[^''\\]|''''|\\.)*''', ' ', 'g'),
        '''(?:[^'']|'''')*''', ' ', 'g'),
        '"(?:[^"]|"")*"', ' ', 'g')
$$;

-- `$name` references in SQL text, outside literals, quoted identifiers, comments and dollar-quoted bodies.
CREATE FUNCTION pgflow.sql_references(p_sql text) RETURNS SETOF text LANGUAGE sql IMMUTABLE AS $$
    SELECT DISTINCT m[1] FROM regexp_matches(pgflow._strip_sql(p_sql), '\$([A-Za-z_][A-Za-z0-9_]*)', 'g') AS m
$$;

-- Validate a node tree; returns the result names it binds. Raises with a clear message (SQLSTATE 22023).
-- A number field of a node: absent/null allowed unless required; otherwise a JSON number in [lo, hi].
CREATE FUNCTION pgflow._check_number(p_node jsonb, p_key text, p_lo float8, p_hi float8, p_required boolean,
                                     p_integer boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v jsonb := p_node->p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF p_required THEN
            RAISE EXCEPTION 'pgflow: % node needs %', p_node->>'t', p_key USING ERRCODE = '22023';
        END IF;
        RETURN;
    END IF;
    IF jsonb_typeof(v) <> 'number' OR (p_integer AND (v #>> '{}') !~ '^[0-9]+$')
       OR (v #>> '{}')::numeric NOT BETWEEN p_lo::numeric AND p_hi::numeric THEN
        RAISE EXCEPTION 'pgflow: % of a % node must be % between % and %, not %', p_key, p_node->>'t',
            CASE WHEN p_integer THEN 'an integer' ELSE 'a number' END, p_lo, p_hi, left(v::text, 40)
            USING ERRCODE = '22023';
    END IF;
END $$;

CREATE FUNCTION pgflow._validate(p_node jsonb, p_in_loop boolean, p_names text[], p_depth integer DEFAULT 0)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p_node->>'t';
    child jsonb;
    names text[] := p_names;
    ref text;
    n int := coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(p_node->'c') = 'array' THEN p_node->'c' END), 0);
    d int := p_depth + 1;
BEGIN
    IF jsonb_typeof(p_node) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pgflow: not a workflow node: %', left(coalesce(p_node::text, 'NULL'), 200)
            USING ERRCODE = '22023';
    END IF;
    IF p_depth > 100 THEN
        RAISE EXCEPTION 'pgflow: a workflow may nest at most 100 levels' USING ERRCODE = '22023';
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
        IF pgflow._strip_sql(p_node->>'sql') ~ '\$[0-9]' THEN
            RAISE EXCEPTION 'pgflow: positional parameters ($1) in SQL step "%": refer to values by name',
                left(p_node->>'sql', 80) USING ERRCODE = '22023';
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
        FOR child IN SELECT jsonb_array_elements(p_node->'c') LOOP
            names := pgflow._validate(child, p_in_loop, names, d);
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
        names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d) || (p_node->>'name');
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
    WHEN 'break' THEN
        IF NOT p_in_loop THEN
            RAISE EXCEPTION 'pgflow: break outside a loop' USING ERRCODE = '22023';
        END IF;
        IF n > 1 THEN
            RAISE EXCEPTION 'pgflow: break takes at most one node (its value)' USING ERRCODE = '22023';
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

-- The leaves of a tree as step specs (node path = step name), in the format of a flow shape's "steps".
CREATE FUNCTION pgflow._leaves(p_tree jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE tree(path, node, sort) AS (
        SELECT 'r'::text, p_tree, ARRAY[0]::bigint[]
        UNION ALL
        SELECT t.path || '.' || (c.i - 1), c.child, t.sort || c.i
        FROM tree t,
             jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c' ELSE '[]' END)
                 WITH ORDINALITY AS c(child, i)
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'name', path, 'kind', node->>'t', 'deps', '[]'::jsonb, 'over', NULL, 'flatten', false,
        'queue', coalesce(node->>'queue', 'pgflow'),
        'max_attempts', coalesce((node->>'max_attempts')::int, 3),
        'backoff_base', coalesce((node->>'backoff_base')::float8, 1.0),
        'backoff_cap', coalesce((node->>'backoff_cap')::float8, 60.0),
        'timeout', (node->>'timeout')::float8,
        'sql', node->>'sql', 'spec', node) ORDER BY sort), '[]'::jsonb)
    FROM tree
    WHERE node->>'t' IN ('sql', 'python', 'http')
$$;

-- The stored shape of a control-flow workflow: validated tree plus its leaves.
CREATE FUNCTION pgflow.tree_shape(p_node jsonb, p_name text DEFAULT 'sql') RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    node jsonb := pgflow.node(p_node);
BEGIN
    PERFORM pgflow._validate(node, false, ARRAY[]::text[], 0);
    RETURN jsonb_build_object('name', p_name, 'tree', node,
                              'steps', pgflow._leaves(node));
END $$;
CREATE FUNCTION pgflow.tree_shape(p_node text, p_name text DEFAULT 'sql') RETURNS jsonb LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.tree_shape(pgflow.node(p_node), p_name) $$;

-- ------------------------------------------------------------------------------------------------------
-- The SQL front door
-- ------------------------------------------------------------------------------------------------------

-- Start a workflow. It joins the caller's transaction (a rollback means it never started) unless
-- p_detached, which commits it at once through dblink (the extension must be installed).
CREATE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb := pgflow.tree_shape(p_node, p_name);
    version text := left(md5(shape::text), 16);
    new_id bigint;
BEGIN
    IF p_detached THEN
        IF to_regproc('public.dblink') IS NULL AND to_regproc('dblink') IS NULL THEN
            RAISE EXCEPTION 'pgflow: a detached start needs the dblink extension (CREATE EXTENSION dblink)'
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE 'SELECT id FROM dblink($1, $2) AS t(id bigint)' INTO new_id
            USING format('dbname=%s user=%s', current_database(), current_user),
                  format('SELECT pgflow.start(%L::jsonb, %L::jsonb, %L, false, %L)', p_node, p_input, p_label,
                         p_name);
        RETURN new_id;
    END IF;
    PERFORM pgflow.register_flow(p_name, version, NULL, shape);
    RETURN pgflow.start_instance(p_name, version, p_input, p_label);
END $$;

-- The usual entry point: a node built with the operators and functions above, or plain SQL text.
CREATE FUNCTION pgflow.start(p_node text, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgflow.start(pgflow.node(p_node), p_input, p_label, p_detached, p_name)
$$;

CREATE FUNCTION pgflow.status(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    r jsonb;
BEGIN
    SELECT jsonb_build_object('id', i.id, 'flow', i.flow_name, 'status', i.status, 'label', i.label,
                              'error', i.error, 'created_at', i.created_at, 'finished_at', i.finished_at)
    INTO r FROM pgflow.instances i WHERE i.id = p_id;
    IF r IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN r;
END $$;

CREATE FUNCTION pgflow.result(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    i pgflow.instances;
BEGIN
    SELECT * INTO i FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF i.status IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'pgflow: instance % %: %', p_id, i.status, i.error USING ERRCODE = 'P0001';
    END IF;
    RETURN i.output;  -- NULL while pending or running
END $$;

CREATE FUNCTION pgflow.cancel(p_id bigint, p_reason text DEFAULT NULL) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    outcome text := pgflow.cancel_instance(p_id, p_reason);
BEGIN
    IF outcome IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN outcome;
END $$;

-- Deliver a signal. Signals sent before the wait is reached are kept until it consumes them.
CREATE FUNCTION pgflow.signal(p_id bigint, p_name text, p_data jsonb DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    new_id bigint;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF st NOT IN ('pending', 'running') THEN
        RAISE EXCEPTION 'pgflow: instance % is % and takes no signals', p_id, st USING ERRCODE = '55000';
    END IF;
    IF coalesce(p_name, '') = '' THEN
        RAISE EXCEPTION 'pgflow: a signal needs a name' USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.signals (instance_id, name, data) VALUES (p_id, p_name, p_data) RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;

CREATE FUNCTION pgflow.list_instances(p_status text DEFAULT NULL, p_flow text DEFAULT NULL,
                                      p_label text DEFAULT NULL, p_limit integer DEFAULT 50,
                                      p_before bigint DEFAULT NULL)
RETURNS TABLE (id bigint, flow_name text, status text, label text, created_at timestamptz,
               finished_at timestamptz, error text)
LANGUAGE sql STABLE AS $$
    SELECT i.id, i.flow_name, i.status, i.label, i.created_at, i.finished_at, i.error
    FROM pgflow.instances i
    WHERE (p_status IS NULL OR i.status = p_status) AND (p_flow IS NULL OR i.flow_name = p_flow)
      AND (p_label IS NULL OR i.label = p_label) AND (p_before IS NULL OR i.id < p_before)
    ORDER BY i.id DESC
    LIMIT least(greatest(p_limit, 1), 10000)
$$;

-- Wait (polling every 50 ms) until the instance finishes or p_timeout seconds pass; returns its status.
-- An instance started in the same, uncommitted transaction cannot finish: commit first.
CREATE FUNCTION pgflow.await_instance(p_id bigint, p_timeout double precision DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout);
    r jsonb;
BEGIN
    LOOP
        r := pgflow.status(p_id);
        IF r->>'status' IN ('completed', 'failed', 'cancelled') OR clock_timestamp() >= deadline THEN
            RETURN r || jsonb_build_object('output', (SELECT output FROM pgflow.instances WHERE id = p_id));
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;

CREATE FUNCTION pgflow.set_variable(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgflow.variables (name, value) VALUES (p_name, p_value)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value, updated_at = now()
$$;
CREATE FUNCTION pgflow.delete_variable(p_name text) RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
CREATE FUNCTION pgflow.get_variable(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT value FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
-- pg_durable's names
CREATE FUNCTION pgflow.setvar(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.set_variable(p_name, p_value) $$;
CREATE FUNCTION pgflow.getvar(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS
    $$ SELECT pgflow.get_variable(p_name) $$;
CREATE FUNCTION pgflow.unsetvar(p_name text) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.delete_variable(p_name) $$;
CREATE FUNCTION pgflow.clearvars() RETURNS void LANGUAGE sql AS
    $$ DELETE FROM pgflow.variables WHERE owner = current_user $$;

-- ------------------------------------------------------------------------------------------------------
-- Seeing what an instance does
-- ------------------------------------------------------------------------------------------------------

CREATE FUNCTION pgflow._label(p_node jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_node->>'t'
        WHEN 'sql' THEN 'sql: ' || left(regexp_replace(btrim(p_node->>'sql'), '\s+', ' ', 'g'), 70)
        WHEN 'python' THEN 'python: ' || (p_node->>'fn')
        WHEN 'http' THEN 'http: ' || coalesce(p_node->>'method', 'GET') || ' ' || (p_node->>'url')
        WHEN 'name' THEN 'name: ' || (p_node->>'name')
        WHEN 'if' THEN 'if'
        WHEN 'has_rows' THEN 'has_rows: ' || (p_node->>'name')
        WHEN 'loop' THEN CASE WHEN (p_node->>'while')::boolean THEN 'loop while' ELSE 'loop' END
        WHEN 'sleep' THEN 'sleep ' || (p_node->>'seconds') || ' s'
        WHEN 'schedule' THEN 'wait for schedule ' || (p_node->>'cron')
        WHEN 'wait_signal' THEN 'wait for signal ' || (p_node->>'name')
            || coalesce(' (timeout ' || (p_node->>'timeout') || ' s)', '')
        ELSE p_node->>'t'
    END
$$;

-- One row per node of an instance (tree nodes, or DAG steps), in display order, with its status.
CREATE FUNCTION pgflow.instance_nodes(p_id bigint)
RETURNS TABLE (path text, depth integer, node_type text, label text, status text, attempts integer,
               error text, due_at timestamptz, tasks bigint, tasks_completed bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    inst pgflow.instances;
    shape jsonb;
BEGIN
    SELECT * INTO inst FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = inst.flow_name AND f.version = inst.flow_version;
    IF shape ? 'tree' THEN
        RETURN QUERY
        WITH RECURSIVE tree(path, depth, node, sort) AS (
            SELECT 'r'::text, 0, shape->'tree', ARRAY[0]
            UNION ALL
            SELECT t.path || '.' || (c.i - 1), t.depth + 1, c.child, t.sort || c.i::int
            FROM tree t,
                 jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c'
                                           ELSE '[]' END) WITH ORDINALITY AS c(child, i)
        ), own AS (
            SELECT t.*, s.status AS own_status, s.attempt, s.error AS own_error, s.next_attempt_at, s.output
            FROM tree t
            LEFT JOIN pgflow.steps s ON s.instance_id = p_id AND s.step_name = t.path AND s.task_index = -1
        ), derived AS (
            -- the coordinator records every node it reaches (composites too) and marks the branch an if did
            -- not take and the losers of a race as skipped: nodes below a skipped one are skipped as well
            SELECT o.*, EXISTS (SELECT 1 FROM own a WHERE a.own_status = 'skipped' AND o.path LIKE a.path || '.%')
                            AS under_skipped
            FROM own o
        )
        SELECT d.path, d.depth, d.node->>'t',
               pgflow._label(d.node) || CASE WHEN d.node->>'t' = 'loop' AND d.output ? 'iteration'
                                             THEN format(' (iteration %s)', d.output->>'iteration') ELSE '' END,
               CASE
                   WHEN d.under_skipped THEN 'skipped'
                   WHEN d.own_status IS NOT NULL THEN d.own_status
                   WHEN inst.status IN ('completed', 'failed', 'cancelled') THEN 'skipped'
                   ELSE 'pending'
               END,
               d.attempt, d.own_error,
               CASE WHEN d.own_status = 'waiting' THEN d.next_attempt_at END,
               NULL::bigint, NULL::bigint
        FROM derived d
        ORDER BY d.sort;
    ELSE
        RETURN QUERY
        SELECT s->>'name', 0, s->>'kind' || CASE WHEN s->>'over' IS NOT NULL THEN ' map' ELSE '' END,
               s->>'name' || CASE WHEN jsonb_array_length(s->'deps') > 0
                                  THEN ' (after ' || (SELECT string_agg(d, ', ') FROM jsonb_array_elements_text(s->'deps') d) || ')'
                                  ELSE '' END,
               coalesce(st.status, CASE WHEN inst.status IN ('completed', 'failed', 'cancelled') THEN 'skipped'
                                        ELSE 'pending' END),
               st.attempt, st.error, CASE WHEN st.status = 'retrying' THEN st.next_attempt_at END,
               (SELECT count(*) FROM pgflow.steps t WHERE t.instance_id = p_id AND t.step_name = s->>'name'
                                                     AND t.task_index >= 0),
               (SELECT count(*) FROM pgflow.steps t WHERE t.instance_id = p_id AND t.step_name = s->>'name'
                                                     AND t.task_index >= 0 AND t.status = 'completed')
        FROM jsonb_array_elements(shape->'steps') WITH ORDINALITY AS x(s, i)
        LEFT JOIN pgflow.steps st ON st.instance_id = p_id AND st.step_name = s->>'name' AND st.task_index = -1
        ORDER BY x.i;
    END IF;
END $$;

-- The instance as an indented tree with a status marker per node.
CREATE FUNCTION pgflow.explain(p_id bigint) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT format('instance %s  %s  %s%s', i.id, i.flow_name, i.status,
                  coalesce(E'\nerror: ' || i.error, '')) || E'\n' ||
           string_agg(repeat('  ', n.depth) ||
                      CASE n.status
                          WHEN 'completed' THEN '[done]    '
                          WHEN 'failed' THEN '[FAILED]  '
                          WHEN 'running' THEN '[running] '
                          WHEN 'queued' THEN '[queued]  '
                          WHEN 'retrying' THEN '[retry]   '
                          WHEN 'waiting' THEN '[waiting] '
                          WHEN 'mapping' THEN '[mapping] '
                          WHEN 'skipped' THEN '[skipped] '
                          WHEN 'cancelled' THEN '[cancel]  '
                          ELSE '[pending] '
                      END || n.label ||
                      CASE WHEN n.tasks > 0 THEN format('  (%s/%s tasks)', n.tasks_completed, n.tasks) ELSE '' END ||
                      CASE WHEN n.attempts > 1 THEN format('  attempts %s', n.attempts) ELSE '' END ||
                      CASE WHEN n.due_at IS NOT NULL THEN format('  until %s', to_char(n.due_at, 'YYYY-MM-DD HH24:MI:SS TZ'))
                           ELSE '' END ||
                      CASE WHEN n.error IS NOT NULL AND n.status IN ('failed', 'retrying')
                           THEN '  error: ' || left(n.error, 200) ELSE '' END,
                      E'\n' ORDER BY n.ordinality)
    FROM pgflow.instances i,
         LATERAL pgflow.instance_nodes(i.id) WITH ORDINALITY AS n
    WHERE i.id = p_id
    GROUP BY i.id, i.flow_name, i.status, i.error
$$;
