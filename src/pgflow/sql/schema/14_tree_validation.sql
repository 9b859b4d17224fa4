-- Validating a control-flow workflow before it starts: node fields, result names and the `$references`
-- of SQL steps, cron expressions; then the stored shape (the validated tree plus its leaves as step specs).
-- Every refusal is SQLSTATE 22023 with a message that starts with "pgflow:". These checks are the one
-- definition of what a workflow may contain: the Python front door calls pgflow.tree_shape too.

-- A 5-field cron expression (minute hour day-of-month month day-of-week, UTC), with *, lists, ranges, steps
-- and month/day names: the one definition of a valid schedule. Checked when a workflow starts; the
-- coordinator computes fire times with croniter, and tests/data/cron.json checks that croniter accepts and can
-- schedule every expression valid here (croniter also reads extensions such as L, #, ? or @daily, which are
-- not valid here). A schedule must be able to fire: a day of the month that none of its months has (30
-- February, 31 April) is refused, whatever the day of the week says.
CREATE FUNCTION pgflow.valid_cron(p_cron text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    fields text[] := regexp_split_to_array(btrim(coalesce(p_cron, '')), '\s+');
    lows int[] := ARRAY[0, 0, 1, 1, 0];
    highs int[] := ARRAY[59, 23, 31, 12, 7];
    names text[] := ARRAY['', '', '', 'jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec', 'sun|mon|tue|wed|thu|fri|sat'];
    month_days int[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];  -- 29 February: leap years come
    part text;
    m text[];
    i int;
    first int;
    last int;
    step int;
    days int[] := '{}';    -- the days of the month and the months the schedule may fire on
    months int[] := '{}';
BEGIN
    IF array_length(fields, 1) IS DISTINCT FROM 5 THEN
        RETURN false;
    END IF;
    FOR i IN 1..5 LOOP
        FOREACH part IN ARRAY string_to_array(lower(fields[i]), ',') LOOP
            m := regexp_match(part, '^(\*|[0-9]{1,2}|[a-z]{3})(?:-([0-9]{1,2}|[a-z]{3}))?(?:/([0-9]{1,2}))?$');
            IF m IS NULL OR (m[1] = '*' AND m[2] IS NOT NULL) THEN
                RETURN false;
            END IF;
            IF m[1] ~ '^[a-z]' AND (names[i] = '' OR m[1] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            IF m[2] ~ '^[a-z]' AND (names[i] = '' OR m[2] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            -- names as numbers: jan = 1, sun = 0
            first := CASE WHEN m[1] = '*' THEN lows[i]
                          WHEN m[1] ~ '^[a-z]' THEN (strpos(names[i], m[1]) - 1) / 4 + lows[i]
                          ELSE m[1]::int END;
            last := CASE WHEN m[2] IS NULL AND (m[1] = '*' OR m[3] IS NOT NULL) THEN highs[i]  -- *, */n, n/step
                         WHEN m[2] IS NULL THEN first
                         WHEN m[2] ~ '^[a-z]' THEN (strpos(names[i], m[2]) - 1) / 4 + lows[i]
                         ELSE m[2]::int END;
            step := coalesce(m[3]::int, 1);
            IF NOT first BETWEEN lows[i] AND highs[i] OR NOT last BETWEEN lows[i] AND highs[i] OR step = 0 THEN
                RETURN false;
            END IF;
            IF last < first THEN
                IF m[1] ~ '^[0-9]' AND m[2] ~ '^[0-9]' THEN
                    RETURN false;  -- 5-1: a reversed range of numbers
                END IF;
                last := first;  -- fri-mon, dec-jan wrap around; here only their first value counts
            END IF;
            IF i = 3 THEN
                days := days || ARRAY(SELECT generate_series(first, last, step));
            ELSIF i = 4 THEN
                months := months || ARRAY(SELECT generate_series(first, last, step));
            END IF;
        END LOOP;
    END LOOP;
    RETURN EXISTS (SELECT 1 FROM unnest(days) d, unnest(months) mo WHERE d <= month_days[mo]);
END $$;
REVOKE ALL ON FUNCTION pgflow.valid_cron(text) FROM PUBLIC;

-- The `$references` of a SQL step, in the order they are written ('$load', '$input.key?', '$rows.*'...): the
-- same grammar as the worker's lexer (pgflow.dsl.compile_sql), checked against the same test vectors
-- (tests/data/references.json). Like PostgreSQL's own lexer it skips string literals ('...', E'...' with
-- backslash escapes), quoted identifiers, -- and nested /* */ comments and dollar-quoted bodies ($$...$$,
-- $tag$...$tag$), and reads an identifier whole (PostgreSQL allows $ inside one: foo$bar is no reference).
-- SQL the worker could not run is refused here, before the workflow starts: unterminated literals, comments
-- or dollar quotes, positional parameters ($1), a stray $, a row-set reference with a path ($x.col.*).
CREATE FUNCTION pgflow.parse_sql_references(p_sql text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    rest text := p_sql;        -- what is left to read
    refs text[] := '{}';
    e_prefix boolean := false; -- the token just read is the identifier E: a quote now opens an E'' string
    m text[];
    token text;
    depth int;
    open_at int;
    close_at int;
    problem text;
BEGIN
    WHILE rest <> '' AND problem IS NULL LOOP
        token := NULL;
        CASE
        WHEN left(rest, 1) = '''' THEN
            token := (regexp_match(rest, CASE WHEN e_prefix THEN '^''(?:[^''\\]|''''|\\.)*'''
                                              ELSE '^''(?:[^'']|'''')*''' END))[1];
            IF token IS NULL THEN
                problem := 'unterminated '' literal';
            END IF;
        WHEN left(rest, 1) = '"' THEN
            token := (regexp_match(rest, '^("(?:[^"]|"")*")'))[1];
            IF token IS NULL THEN
                problem := 'unterminated " literal';
            END IF;
        WHEN left(rest, 2) = '--' THEN
            token := (regexp_match(rest, '^(--[^\n\r]*)'))[1];
        WHEN left(rest, 2) = '/*' THEN
            depth := 1;
            token := '/*';
            WHILE depth > 0 LOOP
                open_at := strpos(substr(rest, length(token) + 1), '/*');
                close_at := strpos(substr(rest, length(token) + 1), '*/');
                IF close_at = 0 THEN
                    problem := 'unterminated /* comment';
                    EXIT;
                END IF;
                IF open_at > 0 AND open_at < close_at THEN
                    depth := depth + 1;
                    token := left(rest, length(token) + open_at + 1);
                ELSE
                    depth := depth - 1;
                    token := left(rest, length(token) + close_at + 1);
                END IF;
            END LOOP;
        WHEN left(rest, 1) = '$' THEN
            m := regexp_match(rest, '^(\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)');
            IF m IS NOT NULL THEN  -- a dollar-quoted body runs to the next occurrence of its opening tag
                close_at := strpos(substr(rest, length(m[1]) + 1), m[1]);
                IF close_at = 0 THEN
                    problem := format('unterminated dollar-quoted string %s', m[1]);
                ELSE
                    token := left(rest, length(m[1]) + close_at + length(m[1]) - 1);
                END IF;
            ELSIF rest ~ '^\$[0-9]' THEN
                problem := format('positional parameter %s: refer to values by name ($input, $input.key, '
                                  '$step, $step.col, $item)', substring(rest from '^\$[0-9]+'));
            ELSE
                m := regexp_match(rest, '^(\$[A-Za-z_][A-Za-z0-9_]*((?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\.\*)?\??)');
                IF m IS NULL THEN
                    problem := format('stray ''$'' at %s', quote_literal(left(rest, 20)));
                ELSIF m[2] <> '' AND m[3] IS NOT NULL THEN
                    problem := format('row-set reference %s: use $name.* on a whole result', m[1]);
                ELSE
                    token := m[1];
                    refs := refs || token;
                END IF;
            END IF;
        WHEN rest ~ '^[A-Za-z_]|^[^\x01-\x7f]' THEN  -- an identifier or key word, read whole
            token := (regexp_match(rest, '^((?:[A-Za-z0-9_$]|[^\x01-\x7f])+)'))[1];
            e_prefix := token IN ('E', 'e');
            rest := substr(rest, length(token) + 1);
            CONTINUE;
        ELSE  -- anything else, up to the next character that may start one of the above
            token := coalesce((regexp_match(rest, '^((?:(?![''"$/_A-Za-z-])[\x01-\x7f])+)'))[1], left(rest, 1));
        END CASE;
        e_prefix := false;
        rest := substr(rest, length(token) + 1);
    END LOOP;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'pgflow: % in SQL step "%"', problem, left(p_sql, 80) USING ERRCODE = '22023';
    END IF;
    RETURN refs;
END $$;
REVOKE ALL ON FUNCTION pgflow.parse_sql_references(text) FROM PUBLIC;

-- The names a SQL step refers to with `$name...`, each once (see parse_sql_references).
CREATE FUNCTION pgflow.sql_references(p_sql text) RETURNS SETOF text LANGUAGE sql IMMUTABLE AS $$
    SELECT DISTINCT substring(r FROM '^\$([A-Za-z_][A-Za-z0-9_]*)') FROM unnest(pgflow.parse_sql_references(p_sql)) AS r
$$;
REVOKE ALL ON FUNCTION pgflow.sql_references(text) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow._check_number(jsonb, text, float8, float8, boolean, boolean) FROM PUBLIC;

CREATE FUNCTION pgflow._validate(p_node jsonb, p_in_loop boolean, p_names text[], p_depth integer DEFAULT 0)
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
REVOKE ALL ON FUNCTION pgflow._validate(jsonb, boolean, text[], integer) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow._leaves(jsonb) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow.tree_shape(jsonb, text) FROM PUBLIC;
CREATE FUNCTION pgflow.tree_shape(p_node text, p_name text DEFAULT 'sql') RETURNS jsonb LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.tree_shape(pgflow.node(p_node), p_name) $$;
REVOKE ALL ON FUNCTION pgflow.tree_shape(text, text) FROM PUBLIC;
