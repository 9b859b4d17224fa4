-- The pg_durable compatibility layer (`pgflow init --compat pg_durable`): the df schema with pg_durable's
-- functions, views and result shapes, so that SQL written for pg_durable runs unchanged on pgflow. It is
-- thin on purpose: every function here is a wrapper over pgflow's own API and every table a view over
-- pgflow's tables (one engine, one set of rows; row-level security applies through the views, which are
-- security_invoker). Instance ids are pgflow's bigint ids written as text, node ids are the nodes' paths.
--
-- Rebuilt from scratch by every `pgflow init` once installed (DROP SCHEMA df CASCADE: nothing in it holds
-- data; the roles granted usage get their df privileges back at the end of this file).

DROP SCHEMA IF EXISTS df CASCADE;
CREATE SCHEMA df;
COMMENT ON SCHEMA df IS 'pgflow compatibility layer: pg_durable (rebuilt by pgflow init)';
REVOKE ALL ON SCHEMA df FROM PUBLIC;

-- ------------------------------------------------------------------------------------------------ helpers

-- pg_durable's ids are 8 hex digits: a pgflow id in hex, zero-padded to 8 (more digits past 4 billion).
CREATE FUNCTION df._text_id(p_id bigint) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT lpad(to_hex(p_id), 8, '0')
$$;
-- ... and back; NULL for text that is no such id (so lookups find nothing).
CREATE FUNCTION df._id(p_id text) RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN btrim(p_id) ~ '^[0-9a-fA-F]{1,15}$' THEN ('x' || lpad(btrim(p_id), 16, '0'))::bit(64)::bigint END
$$;

-- A role by its name, as regrole (a cast of the text would fold the case of 'labUser' and find no role).
CREATE FUNCTION df._role(p_name name) RETURNS regrole LANGUAGE sql STABLE AS $$
    SELECT oid::regrole FROM pg_roles WHERE rolname = p_name
$$;

-- A literal as pg_durable takes it: valid JSON stays JSON, other text becomes a JSON string.
CREATE FUNCTION df._json(p_text text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN p_text::jsonb;
EXCEPTION WHEN invalid_text_representation THEN
    RETURN to_jsonb(p_text);
END $$;

-- pg_durable's node type names for pgflow's node types.
CREATE FUNCTION df._node_type(p_node jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_node->>'t'
        WHEN 'sql' THEN 'SQL' WHEN 'seq' THEN 'THEN' WHEN 'if' THEN 'IF' WHEN 'join' THEN 'JOIN'
        WHEN 'race' THEN 'RACE' WHEN 'loop' THEN 'LOOP' WHEN 'break' THEN 'BREAK' WHEN 'sleep' THEN 'SLEEP'
        WHEN 'schedule' THEN 'WAIT_SCHEDULE' WHEN 'wait_signal' THEN 'SIGNAL'
        WHEN 'http' THEN CASE WHEN p_node ? 'multipart' THEN 'HTTP_MULTIPART' ELSE 'HTTP' END
        WHEN 'python' THEN 'PYTHON' ELSE upper(p_node->>'t') END
$$;

-- pg_durable's physical node status for a pgflow step status (NULL: the node was not reached).
CREATE FUNCTION df._node_status(p_status text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_status IS NULL OR p_status = 'skipped' THEN 'pending'
        WHEN p_status = 'completed' THEN 'completed'
        WHEN p_status IN ('failed', 'cancelled') THEN 'failed'
        ELSE 'running' END
$$;

-- A SQL step's output in pg_durable's shape: {"rows": [...], "row_count": n}.
CREATE FUNCTION df._rows(p_output jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(p_output) = 'array'
            THEN jsonb_build_object('rows', p_output, 'row_count', jsonb_array_length(p_output))
        WHEN jsonb_typeof(p_output) = 'object' AND p_output ? 'rowcount'
            THEN jsonb_build_object('rows', '[]'::jsonb, 'row_count', p_output->'rowcount')
        ELSE p_output END
$$;

-- The value a (sub)tree produced, in pg_durable's shapes: SQL results as {"rows", "row_count"}, a join as
-- the array of its branches' values, a name as its node's value, a sequence as its last node's.
CREATE FUNCTION df._shaped(p_node jsonb, p_value jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p_node->>'t';
BEGIN
    IF p_value IS NULL OR p_node IS NULL THEN
        RETURN p_value;
    END IF;
    CASE t
    WHEN 'sql' THEN
        RETURN df._rows(p_value);
    WHEN 'name' THEN
        RETURN df._shaped(p_node->'c'->0, p_value);
    WHEN 'seq' THEN
        RETURN df._shaped(p_node->'c'->(jsonb_array_length(p_node->'c') - 1), p_value);
    WHEN 'join' THEN
        IF jsonb_typeof(p_value) = 'array' AND jsonb_array_length(p_value) = jsonb_array_length(p_node->'c') THEN
            RETURN (SELECT jsonb_agg(df._shaped(p_node->'c'->(i::int - 1), v) ORDER BY i)
                    FROM jsonb_array_elements(p_value) WITH ORDINALITY AS x(v, i));
        END IF;
        RETURN p_value;
    ELSE
        RETURN p_value;
    END CASE;
END $$;

-- A pg_durable setting as an administrator made it, never a session's SET: ALTER ROLE/DATABASE ... SET
-- (only superusers may store a setting no extension defines) or the server's configuration files (read
-- with this layer's owner's rights; NULL when it may not read them). pg_durable's names only: the files
-- hold other settings users may not read.
CREATE FUNCTION df._admin_setting(p_name text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v text;
BEGIN
    IF p_name NOT LIKE 'pg\_durable.%' THEN
        RETURN NULL;
    END IF;
    SELECT substr(c, length(p_name) + 2) INTO v
    FROM pg_db_role_setting s, unnest(s.setconfig) AS c
    WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
      AND s.setrole IN (0, (SELECT oid FROM pg_roles WHERE rolname = session_user))
      AND c LIKE p_name || '=%'
    ORDER BY s.setrole <> 0 DESC, s.setdatabase <> 0 DESC
    LIMIT 1;
    IF v IS NULL THEN
        BEGIN
            SELECT f.setting INTO v FROM pg_file_settings f WHERE f.name = p_name AND f.applied
            ORDER BY f.seqno DESC LIMIT 1;
        EXCEPTION WHEN insufficient_privilege THEN
            v := NULL;
        END;
    END IF;
    RETURN v;
END $$;

-- The largest page list_instances returns: pg_durable.list_instances_max_limit as an administrator set it
-- (default 1000). A session's own SET may lower it; only a superuser's raises it (pg_durable's setting is
-- superuser-only; here any session can SET a name no extension defines, so a user's higher value is
-- ignored instead of refused).
CREATE FUNCTION df._list_limit(p_limit integer) RETURNS integer LANGUAGE plpgsql STABLE AS $$
DECLARE
    cap integer := coalesce(nullif(df._admin_setting('pg_durable.list_instances_max_limit'), '')::integer, 1000);
    own integer := nullif(current_setting('pg_durable.list_instances_max_limit', true), '')::integer;
BEGIN
    IF own IS NOT NULL AND (own < cap OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)) THEN
        cap := own;
    END IF;
    IF p_limit IS NULL OR p_limit < 1 THEN
        RAISE EXCEPTION 'limit_count must be at least 1' USING ERRCODE = '22023';
    END IF;
    IF p_limit > cap THEN
        RAISE EXCEPTION 'limit_count % exceeds pg_durable.list_instances_max_limit (%): page with after_cursor',
            p_limit, cap USING ERRCODE = '22023';
    END IF;
    RETURN p_limit;
END $$;

-- pg_durable's own node JSON ({"node_type": "SQL", "query": ..., "left_node": {...}, ...}), as its functions
-- build it and as users stored it, turned into pgflow's node: the same workflow, checked the way pg_durable
-- checks it (its error texts). Other text is returned as it is (a node of pgflow's, or SQL).
CREATE FUNCTION df._checked(p_fut text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parsed jsonb;
BEGIN
    BEGIN
        parsed := p_fut::jsonb;
    EXCEPTION WHEN OTHERS THEN
        RETURN p_fut;
    END;
    IF jsonb_typeof(parsed) <> 'object' OR NOT parsed ? 'node_type' THEN
        RETURN p_fut;
    END IF;
    RETURN df._from_durofut(parsed, 0)::text;
END $$;

CREATE FUNCTION df._from_durofut(p jsonb, p_depth integer) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p->>'node_type';
    q text := p->>'query';
    cfg jsonb;
    node jsonb;
    kids jsonb := '[]';
    extra jsonb;
BEGIN
    IF p_depth > 256 THEN
        RAISE EXCEPTION 'Graph exceeds maximum nesting depth of 256' USING ERRCODE = '22023';
    END IF;
    IF t IS NULL OR t NOT IN ('SQL', 'THEN', 'IF', 'JOIN', 'LOOP', 'BREAK', 'RACE', 'SLEEP', 'WAIT_SCHEDULE',
                              'HTTP', 'SIGNAL') THEN
        RAISE EXCEPTION 'Unknown node_type ''%''. Valid types: SQL, THEN, IF, JOIN, LOOP, BREAK, RACE, SLEEP, '
                        'WAIT_SCHEDULE, HTTP, SIGNAL', coalesce(t, (p->'node_type')::text) USING ERRCODE = '22023';
    END IF;
    IF p ? 'condition_node' AND (jsonb_typeof(p->'condition_node') <> 'object'
                                 OR jsonb_typeof(p->'condition_node'->'node_type') IS DISTINCT FROM 'string') THEN
        RAISE EXCEPTION 'condition_node must be a Durofut JSON object' USING ERRCODE = '22023';
    END IF;
    IF p ? 'condition_node' AND t NOT IN ('IF', 'LOOP') THEN
        RAISE EXCEPTION 'condition_node is not valid for % nodes', t USING ERRCODE = '22023';
    END IF;
    IF p ? 'extra_nodes' AND (jsonb_typeof(p->'extra_nodes') <> 'array' OR EXISTS (
            SELECT FROM jsonb_array_elements(p->'extra_nodes') e WHERE jsonb_typeof(e) <> 'object')) THEN
        RAISE EXCEPTION 'extra_nodes entries must be Durofut JSON objects' USING ERRCODE = '22023';
    END IF;
    IF p ? 'extra_nodes' AND t <> 'JOIN' THEN
        RAISE EXCEPTION 'extra_nodes is not valid for % nodes', t USING ERRCODE = '22023';
    END IF;
    IF t <> 'SQL' AND q IS NOT NULL THEN
        BEGIN
            cfg := q::jsonb;
        EXCEPTION WHEN OTHERS THEN
            IF p ? 'condition_node' OR p ? 'extra_nodes' THEN
                RAISE EXCEPTION 'query in % must be valid JSON config', t USING ERRCODE = '22023';
            END IF;
        END;
        IF jsonb_typeof(cfg) = 'object' AND ((t IN ('IF', 'LOOP') AND cfg ? 'condition_node')
                                             OR (t = 'JOIN' AND cfg ? 'extra_nodes')) THEN
            RAISE EXCEPTION '% in % must be a first-class Durofut field, not embedded in query',
                CASE WHEN t = 'JOIN' THEN 'extra_nodes' ELSE 'condition_node' END, t USING ERRCODE = '22023';
        END IF;
    END IF;
    IF t IN ('IF', 'LOOP') AND p ? 'condition_node' THEN
        kids := kids || jsonb_build_array(df._from_durofut(p->'condition_node', p_depth + 1));
    END IF;
    IF jsonb_typeof(p->'left_node') = 'object' THEN
        kids := kids || jsonb_build_array(df._from_durofut(p->'left_node', p_depth + 1));
    END IF;
    IF jsonb_typeof(p->'right_node') = 'object' THEN
        kids := kids || jsonb_build_array(df._from_durofut(p->'right_node', p_depth + 1));
    END IF;
    FOR extra IN SELECT e FROM jsonb_array_elements(coalesce(p->'extra_nodes', '[]')) e LOOP
        kids := kids || jsonb_build_array(df._from_durofut(extra, p_depth + 1));
    END LOOP;
    node := CASE t
        WHEN 'SQL' THEN jsonb_build_object('t', 'sql', 'sql', q)
        WHEN 'THEN' THEN jsonb_build_object('t', 'seq', 'c', kids)
        WHEN 'JOIN' THEN jsonb_build_object('t', 'join', 'c', kids)
        WHEN 'RACE' THEN jsonb_build_object('t', 'race', 'c', kids)
        WHEN 'IF' THEN jsonb_build_object('t', 'if', 'c', kids)
        WHEN 'LOOP' THEN jsonb_build_object('t', 'loop', 'c', kids)
                         || CASE WHEN p ? 'condition_node' THEN '{"while": true}'::jsonb ELSE '{}'::jsonb END
        WHEN 'BREAK' THEN jsonb_build_object('t', 'break', 'c', '[]'::jsonb)
                          || CASE WHEN cfg->>'break_value' IS NOT NULL
                                  THEN jsonb_build_object('value', df._json(cfg->>'break_value')) ELSE '{}'::jsonb END
        WHEN 'SLEEP' THEN pgflow.sleep(coalesce(q, '0')::double precision)::jsonb
        WHEN 'WAIT_SCHEDULE' THEN pgflow.wait_for_schedule(cfg->>'cron_expr')::jsonb
        WHEN 'SIGNAL' THEN df.wait_for_signal(cfg->>'signal_name', (cfg->>'timeout_seconds')::integer)::jsonb
        WHEN 'HTTP' THEN pgflow.http(cfg->>'url', coalesce(cfg->>'method', 'POST'),
                                     CASE WHEN cfg->'body' IS NULL OR cfg->'body' = 'null' THEN NULL
                                          ELSE df._json(cfg->>'body') END,
                                     nullif(cfg->'headers', 'null'),
                                     coalesce((cfg->>'timeout_seconds')::double precision, 30))::jsonb
    END;
    IF coalesce(p->>'result_name', '') <> '' THEN
        node := jsonb_build_object('t', 'name', 'name', p->>'result_name', 'c', jsonb_build_array(node));
    END IF;
    RETURN node;
END $$;

-- The tree an instance runs (NULL for a DAG flow started from Python).
CREATE FUNCTION df._tree(p_id bigint) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT f.shape->'tree' FROM pgflow.instances i
    JOIN pgflow.flows f ON f.flow_name = i.flow_name AND f.version = i.flow_version
    WHERE i.id = p_id
$$;

-- ------------------------------------------------------------------------------------------------ nodes

CREATE FUNCTION df.sql(query text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.sql(query) $$;
CREATE FUNCTION df.seq(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow._op_seq(a, b) $$;
CREATE FUNCTION df.then(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow._op_seq(a, b) $$;
CREATE FUNCTION df.as(fut text, name text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.named(fut, name) $$;
CREATE FUNCTION df.join(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.join(a, b) $$;
CREATE FUNCTION df.join3(a text, b text, c text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.join(a, b, c) $$;
CREATE FUNCTION df.race(a text, b text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.race(a, b) $$;
CREATE FUNCTION df."if"(condition text, then_branch text, else_branch text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT pgflow.if_then(condition, then_branch, else_branch) $$;
CREATE FUNCTION df.if_rows(result_name text, then_branch text, else_branch text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT pgflow.if_then(pgflow.has_rows(result_name), then_branch, else_branch) $$;
CREATE FUNCTION df.loop(body text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.loop(body) $$;
CREATE FUNCTION df.loop(body text, condition text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT CASE WHEN condition IS NULL THEN pgflow.loop(body) ELSE pgflow.loop_while(condition, body) END $$;
-- pg_durable's break takes a literal JSON value (not a node): valid JSON is kept, other text is a string
CREATE FUNCTION df."break"(value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value IS NULL THEN pgflow.break_loop()
                ELSE (pgflow.break_loop()::jsonb || jsonb_build_object('value', df._json(value)))::text END
$$;
CREATE FUNCTION df.sleep(seconds integer) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.sleep(seconds) $$;
CREATE FUNCTION df.wait_for_schedule(cron_expr text) RETURNS text LANGUAGE sql IMMUTABLE STRICT AS
    $$ SELECT pgflow.wait_for_schedule(cron_expr) $$;
-- its result is {signal_name, timed_out, data}
CREATE FUNCTION df.wait_for_signal(name text, timeout integer DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT (pgflow.wait_for_signal(name, timeout)::jsonb || '{"envelope": true}')::text
$$;
-- df.http() is refused when it is built if this database says HTTP is off (pgflow.http = off, set where the
-- workers run with PGFLOW_HTTP_ALLOW=none, which refuses every request whatever a session sets), and for
-- a URL whose scheme is not http(s) (a URL starting with a {var} template is checked when it runs).
CREATE FUNCTION df._http_checked(p_url text) RETURNS text LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF lower(coalesce(current_setting('pgflow.http', true), '')) IN ('off', 'false', '0') THEN
        RAISE EXCEPTION 'df.http() is disabled on this server (pgflow.http = off)' USING ERRCODE = '0A000';
    END IF;
    IF p_url ~ '^[A-Za-z][A-Za-z0-9+.-]*:' AND p_url !~* '^https?://' THEN
        RAISE EXCEPTION 'unsupported URL scheme in %: only http and https', left(p_url, 80)
            USING ERRCODE = '22023';
    END IF;
    RETURN p_url;
END $$;

CREATE FUNCTION df.http(url text, method text DEFAULT 'POST', body text DEFAULT NULL, headers jsonb DEFAULT NULL,
                        timeout integer DEFAULT 30) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT pgflow.http(df._http_checked(url), coalesce(method, 'POST'), df._json(body), headers, coalesce(timeout, 30))
$$;

-- A multipart/form-data request: parts are {name, data_b64, filename?, content_type?} (data_b64 is base64
-- or exactly one $reference; the worker builds the body).
CREATE FUNCTION df.http_multipart(url text, method text DEFAULT 'POST', parts jsonb DEFAULT '[]',
                                  headers jsonb DEFAULT NULL, timeout integer DEFAULT 30) RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF jsonb_typeof(parts) IS DISTINCT FROM 'array' OR jsonb_array_length(parts) = 0
       OR EXISTS (SELECT FROM jsonb_array_elements(parts) p
                  WHERE jsonb_typeof(p->'name') IS DISTINCT FROM 'string'
                     OR jsonb_typeof(p->'data_b64') IS DISTINCT FROM 'string') THEN
        RAISE EXCEPTION 'df.http_multipart: parts must be a non-empty array of {name, data_b64[, filename, '
                        'content_type]} objects' USING ERRCODE = '22023';
    END IF;
    RETURN (pgflow.http(df._http_checked(url), coalesce(method, 'POST'), NULL, headers,
                        coalesce(timeout, 30))::jsonb || jsonb_build_object('multipart', parts))::text;
END $$;

-- ------------------------------------------------------------------------------------------------ control
-- pg_durable's text templates: {name} is the caller's variable name, {sys_label} the start's label (pgflow's
-- own $vars.name binds values as parameters instead). {sys_instance_id} is filled in by the workers.
CREATE FUNCTION df._fill(p_text text, p_label text) RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    v record;
    out text := p_text;
BEGIN
    IF out IS NULL OR position('{' IN out) = 0 THEN
        RETURN out;
    END IF;
    FOR v IN SELECT name, CASE WHEN jsonb_typeof(value) = 'string' THEN value #>> '{}' ELSE value::text END AS txt
             FROM pgflow.variables WHERE owner = current_user AND secret_ref IS NULL LOOP
        out := replace(out, '{' || v.name || '}', coalesce(v.txt, ''));
    END LOOP;
    RETURN replace(out, '{sys_label}', coalesce(p_label, ''));
END $$;

-- The templates filled in every SQL text, URL and string body of a tree.
CREATE FUNCTION df._filled(p_node jsonb, p_label text) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    node jsonb := p_node;
BEGIN
    IF jsonb_typeof(node) <> 'object' THEN
        RETURN node;
    END IF;
    IF node->>'t' = 'sql' THEN
        node := jsonb_set(node, '{sql}', to_jsonb(df._fill(node->>'sql', p_label)));
    ELSIF node->>'t' = 'http' THEN
        node := jsonb_set(node, '{url}', to_jsonb(df._fill(node->>'url', p_label)));
        IF jsonb_typeof(node->'multipart') = 'array' THEN
            node := jsonb_set(node, '{multipart}', (SELECT jsonb_agg(CASE WHEN jsonb_typeof(p->'filename') = 'string'
                THEN jsonb_set(p, '{filename}', to_jsonb(df._fill(p->>'filename', p_label))) ELSE p END ORDER BY i)
                FROM jsonb_array_elements(node->'multipart') WITH ORDINALITY AS x(p, i)));
        END IF;
        IF jsonb_typeof(node->'body') = 'string' THEN
            node := jsonb_set(node, '{body}', to_jsonb(df._fill(node->>'body', p_label)));
        END IF;
    END IF;
    IF jsonb_typeof(node->'c') = 'array' THEN
        node := jsonb_set(node, '{c}', coalesce((SELECT jsonb_agg(df._filled(c, p_label) ORDER BY i)
                                                 FROM jsonb_array_elements(node->'c') WITH ORDINALITY AS x(c, i)),
                                                '[]'));
    END IF;
    RETURN node;
END $$;


-- pg_durable's signals, and its starts with transaction_mode => 'new', commit on their own (they go through
-- the engine, not the caller's transaction): here a second session through dblink, logged in as the owner of
-- this layer and switched to the caller's role (dblink lets only superusers connect without a password, so
-- this needs dblink installed and an owner who is a superuser; otherwise NULL: the caller's transaction is
-- used). Only the two fixed calls below can be made, with quoted values, and only as a role the session's
-- login may become anyway or one proved by its caller's frame (a definer function of that role calls df).
CREATE FUNCTION df._autonomous(p_role name, p_kind text, p_args jsonb) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn text;
    statement text;
    out text;
BEGIN
    -- a role the session may become, or one the caller's frame proved (df._prove_current_role)
    PERFORM pgflow._check_caller(p_role);
    SELECT format('%I.dblink', n.nspname) INTO fn FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.proname = 'dblink' AND p.pronargs = 2 LIMIT 1;
    IF fn IS NULL OR NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RETURN NULL;
    END IF;
    -- the caller's own choice to allow a superuser instance (a setting anyone may set) goes along
    statement := format('SET ROLE %I; ', p_role)
        || CASE WHEN coalesce(current_setting('pgflow.allow_superuser', true), '') IN ('on', 'true', '1')
                THEN 'SET pgflow.allow_superuser = on; ' ELSE '' END
        || CASE p_kind
        WHEN 'signal' THEN format('SELECT pgflow.signal(%s, %L, %L::jsonb)::text',
                                  (p_args->>'id')::bigint, p_args->>'name', p_args->'data')
        -- the new instance is read back through df.instances, so that a LOCK TABLE df.instances holds the
        -- launch back there, as it holds back pg_durable's insert
        -- (rights are checked when the steps run, as for every df.start)
        WHEN 'start' THEN format('SET pgflow.check_rights_at_start = off; '
                                 'WITH s AS MATERIALIZED (SELECT pgflow.start(%L::jsonb, NULL, %L) AS id) '
                                 'SELECT s.id::text FROM s WHERE NOT EXISTS (SELECT FROM df.instances WHERE false)',
                                 p_args->'node', p_args->>'label')
    END;
    EXECUTE format('SELECT r FROM %s($1, $2) AS t(r text)', fn) INTO out
        USING pgflow.loopback_conninfo(), statement;
    RETURN out;
END $$;

-- database: pgflow runs an instance in the database it was started in (one engine per database);
-- transaction_mode 'new' is pgflow's detached start (through dblink).
-- A launch slot for a start with transaction_mode 'new' (each opens a loopback session): at most
-- pg_durable.max_new_transaction_starts (default 16) at once in the cluster, a caller waiting at most
-- pg_durable.new_transaction_start_timeout seconds (default 10) for one. A slot is a session advisory lock
-- (1346982470, n), released by the caller as soon as its launch has returned or failed.
CREATE FUNCTION df._launch_slot() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    slots integer := coalesce(nullif(current_setting('pg_durable.max_new_transaction_starts', true), '')::integer, 16);
    wait integer := coalesce(nullif(current_setting('pg_durable.new_transaction_start_timeout', true), '')::integer, 10);
    deadline timestamptz := clock_timestamp() + make_interval(secs => wait);
BEGIN
    LOOP
        FOR n IN 1..greatest(slots, 1) LOOP
            IF pg_try_advisory_lock(1346982470, n) THEN
                RETURN n;
            END IF;
        END LOOP;
        IF clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'Timed out after %s waiting for a launch slot for df.start(transaction_mode => ''new'') '
                            '(pg_durable.max_new_transaction_starts=%)', wait, slots USING ERRCODE = '53400';
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;

-- When the current role is not one the session may SET ROLE to (a SECURITY DEFINER function of the user's own,
-- owned by another role, calls df), the frame proves it (pgflow.caller_proofs, stamped with current_user by
-- its trigger) for the call that follows, and ends the proof with pgflow._end_proof() once that call returns.
-- Whether it wrote one.
CREATE FUNCTION df._prove_current_role() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF current_user = session_user OR pg_has_role(session_user, current_user, 'member') THEN
        RETURN false;
    END IF;
    INSERT INTO pgflow.caller_proofs DEFAULT VALUES;
    RETURN true;
END $$;

-- pgflow.start as the current role, with pg_durable's timing of rights: HTTP and Python rights are checked
-- when each step runs (the instance fails there), not at start. When the current role is not one the session
-- may SET ROLE to (a SECURITY DEFINER function of the user's own, owned by another role, calls df.start), the
-- frame proves it first (pgflow.caller_proofs) and the proof ends with the call. Detached (transaction_mode
-- 'new'): through the layer's loopback session (df._autonomous) when it has one, else pgflow's detached start.
CREATE FUNCTION df._start_as_caller(node jsonb, label text, detached boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    rights text := current_setting('pgflow.check_rights_at_start', true);
    proven boolean := df._prove_current_role();
    new_id bigint;
BEGIN
    IF detached THEN
        new_id := df._autonomous(current_user, 'start', jsonb_build_object('node', node, 'label', label))::bigint;
    END IF;
    IF new_id IS NULL THEN
        PERFORM set_config('pgflow.check_rights_at_start', 'off', true);
        new_id := pgflow.start(node, NULL, label, detached);
        PERFORM set_config('pgflow.check_rights_at_start', coalesce(rights, ''), true);
    END IF;
    IF proven THEN
        PERFORM pgflow._end_proof();
    END IF;
    RETURN new_id;
END $$;

CREATE FUNCTION df.start(fut text, label text DEFAULT NULL, database text DEFAULT NULL,
                         transaction_mode text DEFAULT 'caller') RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    slot integer;
    new_id bigint;
    node jsonb;
BEGIN
    IF transaction_mode IS NULL OR transaction_mode NOT IN ('caller', 'new') THEN
        RAISE EXCEPTION 'invalid transaction_mode %: expected ''caller'' or ''new''',
            coalesce(quote_literal(transaction_mode), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF database IS NOT NULL AND NOT EXISTS (SELECT FROM pg_database WHERE datname = database) THEN
        RAISE EXCEPTION 'database "%" does not exist', database USING ERRCODE = '3D000';
    END IF;
    IF database IS NOT NULL AND database <> current_database() THEN
        RAISE EXCEPTION 'pgflow: df.start(database => %): pgflow runs instances in the database they are started '
                        'in; connect to % (with pgflow initialised there) and start it there', database, database
            USING ERRCODE = '0A000';
    END IF;
    IF coalesce(current_setting('pg_durable.enable_superuser_instances', true), '') IN ('on', 'true', '1') THEN
        PERFORM set_config('pgflow.allow_superuser', 'on', true);
    END IF;
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser % (its SQL would run as superuser): '
                        'set pg_durable.enable_superuser_instances = on (or pgflow.allow_superuser) to allow it',
                        current_user USING ERRCODE = '42501';
    END IF;
    IF fut IS NULL THEN
        RAISE EXCEPTION 'df.start: the workflow is NULL' USING ERRCODE = '22004';
    END IF;
    IF NOT df._accepting() THEN
        RAISE EXCEPTION 'pgflow: df.start refused: df._worker_ready shows no ready engine in this transaction'
            USING ERRCODE = '55000';
    END IF;
    node := df._filled(pgflow.node(df._checked(fut)), label);
    IF transaction_mode = 'new' THEN
        slot := df._launch_slot();
        BEGIN
            new_id := df._start_as_caller(node, label, true);
        EXCEPTION WHEN OTHERS OR query_canceled THEN  -- a failed or cancelled launch gives its slot back too
            PERFORM pg_advisory_unlock(1346982470, slot);
            RAISE;
        END;
        PERFORM pg_advisory_unlock(1346982470, slot);
        RETURN df._text_id(new_id);
    END IF;
    RETURN df._text_id(df._start_as_caller(node, label, false));
END $$;

CREATE FUNCTION df.status(instance_id text) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT status::text FROM pgflow.instances WHERE id = df._id(instance_id)
$$;

-- The root's value as JSON text (NULL until completed).
CREATE FUNCTION df.result(instance_id text) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT df._shaped(df._tree(i.id), i.output)::text FROM pgflow.instances i
    WHERE i.id = df._id(instance_id) AND i.status = 'completed'
$$;

-- Wait until the instance ends or timeout_seconds pass; its status (NULL for an unknown id).
CREATE FUNCTION df.await_instance(instance_id text, timeout_seconds integer DEFAULT 30) RETURNS text
LANGUAGE plpgsql STRICT AS $$
DECLARE
    iid bigint := df._id(instance_id);
BEGIN
    -- a step waiting for an instance would hold a worker (and its transaction) for as long
    IF current_setting('application_name') LIKE 'pgflow worker %' THEN
        RAISE EXCEPTION 'df.await_instance cannot be called inside a workflow' USING ERRCODE = '0A000';
    END IF;
    IF NOT EXISTS (SELECT FROM pgflow.instances WHERE id = iid) THEN
        RETURN NULL;
    END IF;
    RETURN pgflow.await_instance(iid, timeout_seconds)->>'status';
END $$;
CREATE FUNCTION df.wait_for_completion(instance_id text, timeout_seconds integer DEFAULT 30) RETURNS text
LANGUAGE sql STRICT AS $$ SELECT df.await_instance(instance_id, timeout_seconds) $$;

CREATE FUNCTION df.cancel(instance_id text, reason text DEFAULT 'Cancelled by user') RETURNS text
LANGUAGE plpgsql STRICT AS $$
BEGIN
    RETURN pgflow.cancel(df._id(instance_id), reason);
EXCEPTION WHEN no_data_found THEN
    RAISE EXCEPTION 'instance % not found or access denied', instance_id USING ERRCODE = 'P0002';
END $$;

-- Signal data: valid JSON is kept, other text is sent as a JSON string.
CREATE FUNCTION df.signal(instance_id text, signal_name text, signal_data text DEFAULT '{}') RETURNS text
LANGUAGE plpgsql STRICT AS $$
DECLARE
    st text;
    proven boolean;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = df._id(instance_id);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'instance % not found or access denied', instance_id USING ERRCODE = 'P0002';
    END IF;
    -- a finished instance refuses it (object_not_in_prerequisite_state), also when it finished after the
    -- caller looked: as pg_durable, too late means nothing happens
    BEGIN
        proven := df._prove_current_role();  -- a definer function of another role signals as that role
        IF df._autonomous(current_user, 'signal', jsonb_build_object('id', df._id(instance_id), 'name',
                                                                     signal_name, 'data', df._json(signal_data)))
           IS NULL THEN
            PERFORM pgflow.signal(df._id(instance_id), signal_name, df._json(signal_data));
        END IF;
        IF proven THEN
            PERFORM pgflow._end_proof();
        END IF;
    EXCEPTION WHEN object_not_in_prerequisite_state THEN
        SELECT status INTO st FROM pgflow.instances WHERE id = df._id(instance_id);
        RETURN format('instance %s is %s: signal %s ignored', instance_id, st, signal_name);
    END;
    RETURN format('signal %s sent to %s', signal_name, instance_id);
EXCEPTION WHEN no_data_found THEN
    RAISE EXCEPTION 'instance % not found or access denied', instance_id USING ERRCODE = 'P0002';
END $$;

-- ------------------------------------------------------------------------------------------------ variables

CREATE VIEW df.vars WITH (security_invoker = true) AS
    SELECT v.name, CASE WHEN jsonb_typeof(v.value) = 'string' THEN v.value #>> '{}' ELSE v.value::text END AS value,
           df._role(v.owner) AS owner
    FROM pgflow.variables v WHERE v.secret_ref IS NULL;

-- Variables are the caller's settings for the workflows it starts: a step may not change them.
CREATE FUNCTION df._outside_workflow(p_function text) RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF current_setting('application_name') LIKE 'pgflow worker %' THEN
        RAISE EXCEPTION '% cannot be called inside a workflow', p_function USING ERRCODE = '0A000';
    END IF;
END $$;

CREATE FUNCTION df.setvar(name text, value text) RETURNS text LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._outside_workflow('df.setvar');
    PERFORM pgflow.set_variable(name, to_jsonb(value));
    RETURN format('variable %s set', name);
END $$;
CREATE FUNCTION df.getvar(name text) RETURNS text LANGUAGE sql STABLE STRICT AS $$
    SELECT CASE WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}' ELSE v::text END FROM pgflow.get_variable(name) v
$$;
CREATE FUNCTION df.unsetvar(name text) RETURNS text LANGUAGE plpgsql STRICT AS $$
BEGIN
    PERFORM df._outside_workflow('df.unsetvar');
    PERFORM pgflow.delete_variable(name);
    RETURN format('variable %s removed', name);
END $$;
CREATE FUNCTION df.clearvars() RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM df._outside_workflow('df.clearvars');
    PERFORM pgflow.clearvars();
    RETURN 'variables cleared';
END $$;

-- ------------------------------------------------------------------------------------------------ views

CREATE VIEW df.instances WITH (security_invoker = true) AS
    SELECT df._text_id(i.id) AS id, i.label, 'r'::text AS root_node, i.status::text AS status,
           df._role(i.owner) AS submitted_by, current_database()::text AS database, i.created_at,
           coalesce(i.finished_at, i.started_at, i.created_at) AS updated_at,
           CASE WHEN i.status = 'completed' THEN i.finished_at END AS completed_at,
           i.flow_name AS function_name, i.error
    FROM pgflow.instances i;

-- pg_durable's engine (duroxide) keeps an event history per instance; pgflow's tables are the state, so this
-- view derives the events they imply: each instance started (one execution: pgflow has no continue-as-new)
-- and, once it ended, completed or failed (a cancellation is a failure there too).
CREATE VIEW df.history WITH (security_invoker = true) AS
    SELECT df._text_id(i.id) AS instance_id, 1::bigint AS execution_id, e.event_id, e.event_type,
           (jsonb_build_object('type', e.event_type, 'instance_id', df._text_id(i.id), 'execution_id', 1)
            || CASE WHEN e.event_id = 2 AND i.status <> 'completed'
                    THEN jsonb_build_object('status', i.status, 'error', i.error) ELSE '{}' END)::text AS event_data,
           e.created_at
    FROM pgflow.instances i
    CROSS JOIN LATERAL (VALUES (1::bigint, 'OrchestrationStarted', i.created_at),
                               (2::bigint, CASE i.status WHEN 'completed' THEN 'OrchestrationCompleted'
                                                         ELSE 'OrchestrationFailed' END, i.finished_at))
        AS e(event_id, event_type, created_at)
    WHERE e.event_id = 1 OR i.status IN ('completed', 'failed', 'cancelled');

-- A node's id as pg_durable shows it: 8 hex digits, fixed by the instance and the node's place in its tree.
CREATE FUNCTION df._node_id(p_id bigint, p_path text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT left(md5(p_id::text || '/' || p_path), 8)
$$;

-- A LOOP node stopped from outside (a race it lost, a cancelled instance) shows as failed, as pg_durable
-- records the end of the loop's own execution.
CREATE FUNCTION df._shown_status(p_node jsonb, p_status text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_node->>'t' = 'loop' AND p_status IN ('skipped', 'cancelled') THEN 'failed'
                ELSE df._node_status(p_status) END
$$;

-- One row per node of one instance, shaped as pg_durable's df.nodes:
-- - result-name nodes are folded into the node they name, and a sequence of n steps shows as the n - 1
--   nested THEN pairs pg_durable builds for a ~> b ~> c ((a ~> b) ~> c);
-- - an IF's condition and a LOOP's while-condition are named in query (condition_node), a JOIN's branches
--   past the second too (extra_nodes);
-- - status_details.execution_id names the execution that ran the node as pg_durable's does: the instance
--   (<id>::1), a JOIN/RACE branch (<parent execution>::<branch node>::1), a loop that is not the root
--   (<parent execution>::<loop node>::<iteration>);
-- - inferred_status: nodes that will never run (an untaken branch, a race's loser, what follows a failure)
--   are 'skipped', with the nearest ancestor that ran in inferred_status_from_ancestor_id.
CREATE FUNCTION df._nodes(p_id bigint)
RETURNS TABLE (id text, instance_id text, node_type text, query text, result_name text, left_node text,
               right_node text, status text, result jsonb, error text, submitted_by regrole, database text,
               created_at timestamptz, updated_at timestamptz, status_details jsonb, inferred_status text,
               inferred_status_from_ancestor_id text, sort_key integer[])
-- jit off: the planner's guess for the recursive walk makes JIT compile it, seconds for a few rows
LANGUAGE sql STABLE SET jit = off AS $$
    WITH RECURSIVE st AS (
        SELECT s.step_name, s.status, s.output, s.error, s.attempt, s.enqueued_at, s.started_at, s.finished_at
        FROM pgflow.steps s WHERE s.instance_id = p_id AND s.task_index = -1
    ), tree(path, node, name, sort, orch, gen, branch, anchor) AS (
        -- orch/gen: the execution that runs the node; branch: a JOIN/RACE branch not yet given its own
        -- execution (passed through result names); anchor: the child slot a node fills (its topmost name)
        SELECT 'r'::text, df._tree(p_id), NULL::text, ARRAY[0], df._text_id(p_id), 1, false, 'r'::text
        UNION ALL
        SELECT c.path, c.child, CASE WHEN t.node->>'t' = 'name' THEN t.node->>'name' END, t.sort || c.i::int,
               CASE WHEN c.own THEN t.orch || '::' || t.gen || '::' || df._node_id(p_id, c.path) ELSE t.orch END,
               CASE WHEN NOT c.own THEN t.gen
                    WHEN c.child->>'t' = 'loop' THEN 1 + coalesce(
                        (SELECT (l.output->>'iteration')::int FROM st l WHERE l.step_name = c.path), 0)
                    ELSE 1 END,
               c.branch AND NOT c.shown,
               CASE WHEN t.node->>'t' = 'name' THEN t.anchor ELSE c.path END
        FROM tree t
        CROSS JOIN LATERAL (
            SELECT x.*, x.shown AND (x.branch OR x.child->>'t' = 'loop') AS own
            FROM (SELECT t.path || '.' || (e.i - 1) AS path, e.child, e.i,
                         e.child->>'t' NOT IN ('name', 'has_rows') AS shown,
                         t.node->>'t' IN ('join', 'race') OR (t.node->>'t' = 'name' AND t.branch) AS branch
                  FROM jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c'
                                                 ELSE '[]' END) WITH ORDINALITY AS e(child, i)) x
        ) c
    ), shown AS (
        SELECT t.*, df._node_id(p_id, t.path) AS nid,
               coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c' END), 0)
                   AS k
        FROM tree t WHERE t.node->>'t' NOT IN ('name', 'has_rows')
    ), slot AS (  -- the node shown in each child slot
        SELECT s.anchor, s.nid FROM shown s
    ), inst AS (
        SELECT i.owner, i.status, i.error FROM pgflow.instances i WHERE i.id = p_id
    ), real AS (
        SELECT s.path, s.nid, s.node, s.name, s.sort, s.orch, s.gen, st.status AS raw, st.output, st.error,
               st.attempt, st.enqueued_at, coalesce(st.finished_at, st.started_at, st.enqueued_at) AS updated,
               CASE s.node->>'t'
                   WHEN 'seq' THEN CASE WHEN s.k > 2 THEN df._node_id(p_id, s.path || '>2') ELSE c0.nid END
                   WHEN 'if' THEN c1.nid
                   WHEN 'loop' THEN CASE WHEN s.node->'while' = 'true' THEN c1.nid ELSE c0.nid END
                   ELSE c0.nid END AS left_node,
               CASE s.node->>'t'
                   WHEN 'seq' THEN cl.nid
                   WHEN 'if' THEN c2.nid
                   WHEN 'loop' THEN NULL
                   ELSE c1.nid END AS right_node,
               CASE WHEN s.node->>'t' = 'sql' THEN s.node->>'sql'
                    ELSE ((s.node - 'c')
                          || CASE WHEN s.node->>'t' = 'if' OR (s.node->>'t' = 'loop' AND s.node->'while' = 'true')
                                  THEN jsonb_build_object('condition_node', c0.nid) ELSE '{}' END
                          || CASE WHEN s.node->>'t' = 'join' AND s.k > 2 THEN jsonb_build_object('extra_nodes',
                                      (SELECT jsonb_agg(x.nid ORDER BY x.i) FROM (
                                          SELECT e.nid, substring(e.anchor FROM '[0-9]+$')::int AS i FROM slot e
                                          WHERE e.anchor LIKE s.path || '.%'
                                            AND e.anchor !~~ (s.path || '.%.%')) x WHERE x.i >= 2))
                                  ELSE '{}' END)::text END AS query
        FROM shown s
        LEFT JOIN st ON st.step_name = s.path
        LEFT JOIN slot c0 ON c0.anchor = s.path || '.0'
        LEFT JOIN slot c1 ON c1.anchor = s.path || '.1'
        LEFT JOIN slot c2 ON c2.anchor = s.path || '.2'
        LEFT JOIN slot cl ON cl.anchor = s.path || '.' || (s.k - 1)
    ), virtual AS (
        -- the inner THEN pairs of a sequence of k > 2: pair j (2 .. k - 1) covers children 0 .. k - j
        SELECT r.path || '>' || j AS path, df._node_id(p_id, r.path || '>' || j) AS nid, r.sort || ARRAY[0, j] AS sort,
               r.orch, r.gen, r.enqueued_at, r.updated,
               CASE WHEN j < s.k - 1 THEN df._node_id(p_id, r.path || '>' || (j + 1)) ELSE c0.nid END AS left_node,
               cr.nid AS right_node,
               CASE WHEN r.raw IS NULL OR r.raw = 'skipped' THEN r.raw
                    WHEN (SELECT x.status FROM st x WHERE x.step_name = r.path || '.' || (s.k - j)) = 'completed'
                        THEN 'completed'
                    WHEN EXISTS (SELECT FROM st x WHERE x.step_name ~ ('^' || replace(r.path, '.', '\.') || '\.[0-9]+$')
                                 AND substring(x.step_name FROM '[0-9]+$')::int <= s.k - j AND x.status = 'failed')
                        THEN 'failed'
                    WHEN EXISTS (SELECT FROM st x WHERE x.step_name = r.path || '.0') THEN 'running'
               END AS raw
        FROM real r
        JOIN shown s ON s.path = r.path
        CROSS JOIN LATERAL generate_series(2, s.k - 1) AS j
        LEFT JOIN slot c0 ON c0.anchor = r.path || '.0'
        LEFT JOIN slot cr ON cr.anchor = r.path || '.' || (s.k - j)
        WHERE r.node->>'t' = 'seq' AND s.k > 2
    ), every AS (
        SELECT r.path, r.nid, df._node_type(r.node) AS node_type, r.query, r.name, r.left_node, r.right_node,
               r.raw, df._shown_status(r.node, r.raw) AS status, r.node, r.output, r.error, r.attempt, r.sort,
               r.orch, r.gen, r.enqueued_at, r.updated
        FROM real r
        UNION ALL
        SELECT v.path, v.nid, 'THEN', NULL::text, NULL::text, v.left_node, v.right_node, v.raw,
               df._node_status(v.raw), '{"t": "seq"}'::jsonb, NULL::jsonb, NULL::text, NULL::integer, v.sort,
               v.orch, v.gen,
               v.enqueued_at, v.updated
        FROM virtual v
    ), judged AS (
        SELECT e.*,
               CASE WHEN e.node->>'t' = 'loop' AND e.raw IN ('skipped', 'cancelled') THEN 'failed'
                    WHEN e.raw = 'skipped' OR EXISTS (SELECT FROM st sk WHERE sk.status = 'skipped'
                                                      AND e.path LIKE sk.step_name || '.%') THEN 'skipped'
                    WHEN e.raw IS NULL AND NOT (SELECT status FROM inst) = ANY (pgflow.open_instance_statuses())
                        THEN 'skipped'
                    ELSE e.status END AS inferred,
               CASE WHEN e.raw IN ('failed', 'cancelled') OR (e.node->>'t' = 'loop' AND e.raw = 'skipped') THEN
                   coalesce(e.error,
                            (SELECT f.error FROM st f WHERE f.step_name LIKE e.path || '.%' AND f.status = 'failed'
                             AND f.error IS NOT NULL ORDER BY f.finished_at LIMIT 1),
                            CASE WHEN e.raw = 'skipped' THEN 'cancelled: another branch won the race' END,
                            (SELECT i.error FROM inst i))
               END AS failure
        FROM every e
    )
    SELECT j.nid, df._text_id(p_id), j.node_type, j.query, j.name, j.left_node, j.right_node, j.status,
           CASE WHEN j.failure IS NOT NULL THEN to_jsonb(j.failure)
                WHEN j.raw = 'completed' THEN
                    CASE j.node->>'t'
                        WHEN 'sql' THEN df._rows(j.output)
                        WHEN 'loop' THEN j.output->'value'
                        WHEN 'race' THEN j.output->'value'
                        WHEN 'if' THEN NULL
                        ELSE j.output END
           END,
           j.failure, (SELECT df._role(i.owner) FROM inst i), current_database()::text, j.enqueued_at, j.updated,
           CASE WHEN j.raw IS NOT NULL THEN jsonb_build_object('execution_id', j.orch || '::' || j.gen,
                                                               'attempt', j.attempt) END,
           j.inferred,
           CASE WHEN j.inferred = 'skipped' THEN
               (SELECT a.nid FROM shown a JOIN st ON st.step_name = a.path
                WHERE j.path LIKE a.path || '.%' AND st.status <> 'skipped'
                ORDER BY length(a.path) DESC LIMIT 1)
           END,
           j.sort
    FROM judged j
$$;

CREATE VIEW df.nodes WITH (security_invoker = true) AS
    SELECT n.id, n.instance_id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status,
           n.result, n.error, n.submitted_by, n.database, n.created_at, n.updated_at, n.status_details,
           n.inferred_status
    FROM pgflow.instances i, LATERAL df._nodes(i.id) n;

CREATE FUNCTION df.instance_nodes(instance_id_param text, last_n_executions integer DEFAULT 5)
RETURNS TABLE (node_id text, node_type text, query text, result_name text, left_node text, right_node text,
               status text, result text, status_details text, inferred_status text,
               inferred_status_from_ancestor_id text, updated_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT n.id, n.node_type, n.query, n.result_name, n.left_node, n.right_node, n.status, n.result::text,
           n.status_details::text, n.inferred_status, n.inferred_status_from_ancestor_id, n.updated_at
    FROM df._nodes(df._id(instance_id_param)) n
    ORDER BY n.sort_key
$$;

-- ------------------------------------------------------------------------------------------------ writes
-- pg_durable lets users write a few columns of its tables; here the views take those writes and map them
-- onto pgflow's API, as the caller (row-level security: nobody reaches another user's rows, whose UPDATE
-- then affects 0 rows). Columns nobody may write are not granted (grant_usage), so writing them fails
-- with insufficient_privilege.

-- A write of another submitted_by (a column an administrator may grant) is a forgery. The engine never reads
-- the owner back from these views, so it never runs as the forged role; like pg_durable, whose engine rejects
-- an instance whose owner changed before its graph was loaded, the write fails an instance the coordinator has
-- not picked up yet (still pending; no node ran). Afterwards it changes nothing. A definer function (users
-- cannot write instances): it acts only for a session that holds the UPDATE right on submitted_by.
CREATE FUNCTION df._owner_forged(p_id bigint, p_caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    owner_name name;
BEGIN
    IF NOT (has_column_privilege(caller, 'df.instances', 'submitted_by', 'UPDATE')
            OR has_column_privilege(caller, 'df.nodes', 'submitted_by', 'UPDATE')) THEN
        RAISE EXCEPTION 'permission denied for column submitted_by' USING ERRCODE = '42501';
    END IF;
    -- only an instance the caller's UPDATE could reach: its own (or any, for administrators), or any for a
    -- role that bypasses row-level security
    SELECT i.owner INTO owner_name FROM pgflow.instances i WHERE i.id = p_id;
    IF NOT FOUND OR NOT (pgflow._may_control(caller, owner_name)
                         OR (SELECT r.rolbypassrls OR r.rolsuper FROM pg_roles r WHERE r.rolname = caller)) THEN
        RETURN;
    END IF;
    UPDATE pgflow.instances
    SET status = 'failed', finished_at = clock_timestamp(),
        error = 'rejected before it ran: its submitted_by was changed (by ' || caller || ')'
    WHERE id = p_id AND status = 'pending';
    IF FOUND THEN
        UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
        WHERE instance_id = p_id AND status = ANY (pgflow.open_step_statuses());
        PERFORM pgflow.notify_done(owner_name, p_id);
    END IF;
END $$;

-- UPDATE df.instances: status 'cancelled' cancels the instance (df.cancel); setting the status it already
-- has, or updated_at, changes nothing; another submitted_by is a forgery (df._owner_forged).
CREATE FUNCTION df._instances_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.submitted_by IS DISTINCT FROM OLD.submitted_by THEN
        PERFORM df._owner_forged(df._id(OLD.id));
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.root_node IS DISTINCT FROM OLD.root_node THEN
        RAISE EXCEPTION 'an instance''s id and root_node cannot change' USING ERRCODE = '42501';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NEW.status <> 'cancelled' THEN
            RAISE EXCEPTION 'df.instances.status can only be set to cancelled (the engine sets the others), not %',
                coalesce(NEW.status, 'NULL') USING ERRCODE = '0A000';
        END IF;
        PERFORM pgflow.cancel(df._id(OLD.id), 'cancelled through df.instances');
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER instances_update INSTEAD OF UPDATE ON df.instances
    FOR EACH ROW EXECUTE FUNCTION df._instances_update();

-- UPDATE df.nodes: the status it already has and updated_at change nothing, another submitted_by is a forgery
-- (df._owner_forged); a node's other state is the engine's.
CREATE FUNCTION df._nodes_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.submitted_by IS DISTINCT FROM OLD.submitted_by THEN
        PERFORM df._owner_forged(df._id(OLD.instance_id));
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        RAISE EXCEPTION 'df.nodes.status is set by the engine (cancel the instance with df.cancel)'
            USING ERRCODE = '0A000';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER nodes_update INSTEAD OF UPDATE ON df.nodes
    FOR EACH ROW EXECUTE FUNCTION df._nodes_update();

-- INSERT: the columns df.start fills are checked as pg_durable checks them (check_violation), then refused:
-- an instance is started with df.start, which builds and validates its tree.
CREATE FUNCTION df._instances_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS NULL OR NEW.id !~ '^[0-9a-f]{8,16}$' OR NEW.root_node IS NULL THEN
        RAISE EXCEPTION 'new row for df.instances violates its id/root_node shape (% / %)', NEW.id, NEW.root_node
            USING ERRCODE = '23514';
    END IF;
    RAISE EXCEPTION 'instances are created by df.start, not by INSERT into df.instances' USING ERRCODE = '0A000';
END $$;
CREATE TRIGGER instances_insert INSTEAD OF INSERT ON df.instances
    FOR EACH ROW EXECUTE FUNCTION df._instances_insert();

CREATE FUNCTION df._nodes_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id IS NULL OR NEW.instance_id IS NULL OR NEW.node_type IS NULL
       OR (NEW.result_name IS NOT NULL AND NEW.result_name !~ '^[A-Za-z_][A-Za-z0-9_]*$') THEN
        RAISE EXCEPTION 'new row for df.nodes violates its shape (node %, result name %)', NEW.id, NEW.result_name
            USING ERRCODE = '23514';
    END IF;
    RAISE EXCEPTION 'nodes are created by df.start, not by INSERT into df.nodes' USING ERRCODE = '0A000';
END $$;
CREATE TRIGGER nodes_insert INSTEAD OF INSERT ON df.nodes
    FOR EACH ROW EXECUTE FUNCTION df._nodes_insert();

-- DELETE FROM df.vars removes variables: the caller's own (the view shows no other), through
-- pgflow.delete_variable since users write no table directly.
CREATE FUNCTION df._vars_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgflow.delete_variable(OLD.name);
    RETURN OLD;
END $$;
CREATE TRIGGER vars_delete INSTEAD OF DELETE ON df.vars
    FOR EACH ROW EXECUTE FUNCTION df._vars_delete();

-- The columns a granted role may write (grant_usage, and the rebuild below).
CREATE FUNCTION df._grant_writes(p_role text, p_option text DEFAULT '') RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('GRANT UPDATE (status, updated_at) ON df.instances, df.nodes TO %I', p_role) || p_option;
    EXECUTE format('GRANT INSERT (id, root_node, label, submitted_by) ON df.instances TO %I', p_role) || p_option;
    EXECUTE format('GRANT INSERT (id, instance_id, node_type, query, result_name, left_node, right_node, '
                   'submitted_by) ON df.nodes TO %I', p_role) || p_option;
    EXECUTE format('GRANT DELETE ON df.vars TO %I', p_role) || p_option;
END $$;

-- ------------------------------------------------------------------------------------------------ monitoring

CREATE FUNCTION df.instance_info(instance_id text)
RETURNS TABLE (instance_id text, label text, function_name text, function_version text,
               current_execution_id bigint, status text, output text)
LANGUAGE sql STABLE STRICT AS $$
    SELECT df._text_id(i.id), i.label, i.flow_name, i.flow_version, 1::bigint, i.status::text,
           df._shaped(df._tree(i.id), i.output)::text
    FROM pgflow.instances i WHERE i.id = df._id(instance_info.instance_id)
$$;

-- pgflow has no continue-as-new generations: an instance is one execution.
CREATE FUNCTION df.instance_executions(instance_id text, limit_count integer DEFAULT 5)
RETURNS TABLE (execution_id bigint, status text, event_count bigint, duration_ms bigint, output text)
LANGUAGE sql STABLE STRICT AS $$
    SELECT 1::bigint, i.status::text,
           (SELECT count(*) FROM pgflow.steps s WHERE s.instance_id = i.id),
           (extract(epoch FROM coalesce(i.finished_at, now()) - i.created_at) * 1000)::bigint,
           df._shaped(df._tree(i.id), i.output)::text
    FROM pgflow.instances i WHERE i.id = df._id(instance_executions.instance_id)
    LIMIT df._list_limit(limit_count)
$$;

CREATE FUNCTION df.metrics()
RETURNS TABLE (total_instances bigint, running_instances bigint, completed_instances bigint,
               failed_instances bigint, total_executions bigint, total_events bigint)
LANGUAGE sql STABLE AS $$
    SELECT count(*), count(*) FILTER (WHERE status IN ('pending', 'running')),
           count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed'),
           count(*), (SELECT count(*) FROM pgflow.steps)
    FROM pgflow.instances
$$;

CREATE FUNCTION df.list_instances(status_filter text DEFAULT NULL, limit_count integer DEFAULT 100)
RETURNS TABLE (instance_id text, label text, function_name text, status text, execution_count bigint,
               output text)
LANGUAGE sql STABLE AS $$
    SELECT df._text_id(i.id), i.label, i.flow_name, i.status::text, 1::bigint, df._shaped(df._tree(i.id), i.output)::text
    FROM pgflow.instances i
    WHERE status_filter IS NULL OR i.status = status_filter
    ORDER BY i.created_at DESC, i.id
    LIMIT df._list_limit(limit_count)
$$;

-- The cursor is the last row's (created_at, id), hex-encoded.
CREATE FUNCTION df.list_instances(status_filter text, limit_count integer, label_filter text,
                                  after_cursor text DEFAULT NULL)
RETURNS TABLE (instance_id text, label text, function_name text, status text, execution_count bigint,
               output text, created_at timestamptz, completed_at timestamptz, next_cursor text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lim integer := df._list_limit(limit_count);
    c_at timestamptz;
    c_id bigint;
    decoded text;
BEGIN
    IF after_cursor IS NOT NULL THEN
        BEGIN
            decoded := convert_from(decode(after_cursor, 'hex'), 'UTF8');
            c_at := split_part(decoded, '|', 1)::timestamptz;
            c_id := split_part(decoded, '|', 2)::bigint;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'malformed after_cursor %', after_cursor USING ERRCODE = '22023';
        END;
    END IF;
    RETURN QUERY
    WITH page AS (
        SELECT i.* FROM pgflow.instances i
        WHERE (status_filter IS NULL OR i.status = status_filter)
          AND (label_filter IS NULL OR i.label = label_filter)
          AND (after_cursor IS NULL OR i.created_at < c_at OR (i.created_at = c_at AND i.id > c_id))
        ORDER BY i.created_at DESC, i.id
        LIMIT lim + 1
    ), numbered AS (
        SELECT p.*, row_number() OVER (ORDER BY p.created_at DESC, p.id) AS n, count(*) OVER () AS total FROM page p
    )
    SELECT df._text_id(x.id), x.label, x.flow_name, x.status::text, 1::bigint, df._shaped(df._tree(x.id), x.output)::text,
           x.created_at, CASE WHEN x.status = 'completed' THEN x.finished_at END,
           CASE WHEN x.total > lim THEN
               (SELECT encode(convert_to(l.created_at::text || '|' || l.id, 'UTF8'), 'hex') FROM numbered l WHERE l.n = lim)
           END
    FROM numbered x WHERE x.n <= lim ORDER BY x.n;
END $$;

-- A tree as pg_durable's explain shows it: one line per node (result-name nodes folded into their node, a
-- sequence's steps one under the other, each after the first marked →), with a marker and status when the
-- instance exists (p_id; nodes that will never run are skipped, ⊘), "branch N:" before a join's or race's
-- branches.
CREATE FUNCTION df._explain_lines(p_tree jsonb, p_id bigint) RETURNS text LANGUAGE sql STABLE SET jit = off AS $$
    WITH RECURSIVE t(path, depth, node, sort, prefix, name) AS (
        SELECT 'r'::text, 0, p_tree, ARRAY[0], ''::text, NULL::text
        UNION ALL
        SELECT t.path || '.' || (c.i - 1),
               t.depth + CASE WHEN t.node->>'t' IN ('name', 'has_rows', 'seq') THEN 0 ELSE 1 END, c.child,
               t.sort || c.i::int,
               CASE WHEN t.node->>'t' = 'name' OR (t.node->>'t' = 'seq' AND c.i = 1) THEN t.prefix
                    WHEN t.node->>'t' = 'seq' THEN '→ '
                    WHEN t.node->>'t' IN ('join', 'race') THEN format('branch %s: ', c.i)
                    WHEN t.node->>'t' = 'if' THEN (ARRAY['condition: ', 'then: ', 'else: '])[c.i]
                    ELSE '' END,
               CASE WHEN t.node->>'t' = 'name' THEN t.node->>'name' END
        FROM t, jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c'
                                          ELSE '[]' END) WITH ORDINALITY AS c(child, i)
    ), shown AS (
        SELECT t.*, df._shown_status(t.node, st.status) AS status,
               NOT (t.node->>'t' = 'loop' AND coalesce(st.status IN ('skipped', 'cancelled'), false))
               AND (st.status = 'skipped'
                    OR EXISTS (SELECT FROM pgflow.steps sk WHERE sk.instance_id = p_id AND sk.task_index = -1
                               AND sk.status = 'skipped' AND t.path LIKE sk.step_name || '.%')
                    OR (st.status IS NULL AND NOT (SELECT i.status FROM pgflow.instances i WHERE i.id = p_id)
                                                  = ANY (pgflow.open_instance_statuses()))) AS skipped
        FROM t
        LEFT JOIN pgflow.steps st ON st.instance_id = p_id AND st.step_name = t.path AND st.task_index = -1
        WHERE t.node->>'t' NOT IN ('name', 'has_rows', 'seq')
    )
    SELECT string_agg(repeat('  ', depth)
        || CASE WHEN p_id IS NULL THEN ''
                WHEN skipped THEN '⊘ '
                ELSE CASE status WHEN 'completed' THEN '✓ ' WHEN 'failed' THEN '✗ ' WHEN 'running' THEN '▶ '
                                 ELSE '○ ' END END
        || prefix
        || CASE node->>'t'
               WHEN 'sql' THEN 'SQL: ' || regexp_replace(btrim(node->>'sql'), '\s+', ' ', 'g')
               WHEN 'sleep' THEN format('SLEEP %ss', node->>'seconds')
               WHEN 'schedule' THEN 'WAIT_SCHEDULE ' || (node->>'cron')
               WHEN 'wait_signal' THEN 'SIGNAL ' || (node->>'name')
                   || coalesce(format(' (timeout %ss)', node->>'timeout'), '')
               WHEN 'http' THEN format('HTTP %s %s', node->>'method', node->>'url')
               WHEN 'break' THEN 'BREAK' || coalesce(' ' || (node->'value')::text, '')
               ELSE df._node_type(node) END
        || coalesce(' |=> ' || name, '')
        || CASE WHEN p_id IS NULL THEN '' WHEN skipped THEN ' (skipped)' ELSE format(' (%s)', status) END,
        E'\n' ORDER BY sort)
    FROM shown
$$;

-- The tree of an instance (by id), or of a workflow not started (a dry run): a node, plain SQL, or the text
-- of a DSL expression (evaluated as the caller, like the same expression typed in psql).
CREATE FUNCTION df.explain(input text) RETURNS text LANGUAGE plpgsql STRICT AS $$
DECLARE
    iid bigint := df._id(input);
    node jsonb;
    inst pgflow.instances;
BEGIN
    SELECT * INTO inst FROM pgflow.instances WHERE id = iid;
    IF FOUND THEN
        RETURN format('Instance %s (%s)%s', df._text_id(inst.id), inst.status,
                      coalesce(' label ' || inst.label, '')) || coalesce(E'\nerror: ' || inst.error, '') || E'\n'
               || df._explain_lines(df._tree(inst.id), inst.id);
    END IF;
    BEGIN
        node := input::jsonb;
    EXCEPTION WHEN invalid_text_representation THEN
        IF input !~* '^\s*(select|insert|update|delete|with|values|table|call|merge|create|drop|alter)\M' THEN
            BEGIN
                EXECUTE format('SELECT (%s)::text', input) INTO input;
            EXCEPTION WHEN syntax_error OR undefined_function OR undefined_column OR undefined_object THEN
                NULL;  -- not an expression: SQL text
            END;
        END IF;
    END;
    BEGIN
        node := pgflow.tree_shape(df._checked(input))->'tree';
    EXCEPTION WHEN invalid_parameter_value THEN  -- explaining an invalid graph says why, as text
        RETURN 'Invalid durable function graph: root: ' || regexp_replace(SQLERRM, '^pgflow: ', '');
    END;
    RETURN 'Durable function (dry run, not started)' || E'\n' || df._explain_lines(node, NULL);
END $$;

-- ------------------------------------------------------------------------------------------------ engine

-- The schema where pg_durable kept its engine tables; here df, whose _worker_ready view shows a row once a
-- pgflow coordinator and worker are connected to this database.
-- The database this engine serves (pg_durable's pg_durable.database): the one it is connected to.
CREATE FUNCTION df.target_database() RETURNS text LANGUAGE sql STABLE AS $$ SELECT current_database()::text $$;
CREATE FUNCTION df.duroxide_schema() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'df'::text $$;
-- Whether a coordinator and a worker are connected. pg_stat_activity is otherwise read once per transaction:
-- a loop polling df._worker_ready in one transaction (a DO block) would never see the engine connect.
CREATE FUNCTION df._engine_ready() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_stat_clear_snapshot();
    RETURN EXISTS (SELECT FROM pgflow.engine_processes() WHERE kind = 'coordinator')
       AND EXISTS (SELECT FROM pgflow.engine_processes() WHERE kind = 'worker');
END $$;

-- The version an administrator's UPDATE of df._worker_ready set in this transaction (1 when none did).
CREATE FUNCTION df._ready_version() RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('df.worker_ready', true), '')::integer, 1)
$$;

CREATE VIEW df._worker_ready AS SELECT df._ready_version() AS schema_version WHERE df._engine_ready();

-- pg_durable's df.start refuses while its worker_ready row is below version 1, and an administrator may set
-- it so (to hold starts back). The view holds no data: the UPDATE lasts until the end of the transaction.
-- Starts are not refused merely because no coordinator is connected: they wait durably for one.
CREATE FUNCTION df._set_ready_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('df.worker_ready', NEW.schema_version::text, true);
    RETURN NEW;
END $$;
CREATE TRIGGER set_version INSTEAD OF UPDATE ON df._worker_ready
    FOR EACH ROW EXECUTE FUNCTION df._set_ready_version();

-- Whether df.start accepts a start (see df._set_ready_version).
CREATE FUNCTION df._accepting() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT df._ready_version() >= 1
$$;

-- ------------------------------------------------------------------------------------------------ grants

-- The functions only administrators of usage get (with_grant), and the HTTP ones (include_http).
CREATE FUNCTION df._admin_functions() RETURNS regprocedure[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ARRAY['df.grant_usage(text,boolean,boolean)', 'df.revoke_usage(text)', 'df.metrics()',
                 'df._pgflow_usage(text)']::regprocedure[];
END $$;
CREATE FUNCTION df._http_functions() RETURNS regprocedure[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ARRAY['df.http(text,text,text,jsonb,integer)', 'df.http_multipart(text,text,jsonb,jsonb,integer)']::regprocedure[];
END $$;

-- pgflow's usage follows a role's df privileges: granted (with HTTP if it may EXECUTE df.http, keeping its
-- Python right) while it has USAGE on df, revoked when it has none. A definer function that only mirrors
-- privileges someone already granted or revoked with their own grant options, so a delegated
-- administrator (with_grant) never reaches further than PostgreSQL's GRANT lets it.
CREATE FUNCTION df._pgflow_usage(p_role text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    IF has_schema_privilege(p_role, 'df', 'USAGE') THEN
        PERFORM pgflow.grant_usage(p_role, has_function_privilege(p_role, 'df.http(text,text,text,jsonb,integer)',
                                                                  'EXECUTE'),
                                   coalesce((SELECT g.python FROM pgflow.role_grants g WHERE g.role_name = p_role),
                                            false));
    ELSIF EXISTS (SELECT FROM pgflow.role_grants g WHERE g.role_name = p_role) THEN
        PERFORM pgflow.revoke_usage(p_role);
    END IF;
END $$;

-- Let a role use df (and pgflow underneath), as pg_durable does: whoever may EXECUTE this (pgflow's owner,
-- or a role granted usage with_grant) grants what they hold with grant option. include_http needs the
-- right to grant df.http; with_grant makes the role an administrator of usage in turn.
CREATE FUNCTION df.grant_usage(p_role text, include_http boolean DEFAULT false, with_grant boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    opt text := CASE WHEN with_grant THEN ' WITH GRANT OPTION' ELSE '' END;
    f regprocedure;
BEGIN
    IF include_http AND NOT has_function_privilege('df.http(text,text,text,jsonb,integer)', 'EXECUTE WITH GRANT OPTION') THEN
        RAISE EXCEPTION 'permission denied to grant HTTP use (include_http) to %: % may not grant df.http', p_role,
            current_user USING ERRCODE = '42501';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'role "%" does not exist', p_role USING ERRCODE = '42704';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA df TO %I', p_role) || opt;
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'df'::regnamespace AND has_function_privilege(p.oid, 'EXECUTE WITH GRANT OPTION')
    LOOP
        CONTINUE WHEN f = ANY (df._http_functions()) AND NOT include_http;
        CONTINUE WHEN f = ANY (df._admin_functions()) AND NOT with_grant;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, p_role) || opt;
    END LOOP;
    EXECUTE format('GRANT SELECT ON df.instances, df.nodes, df.vars, df.history, df._worker_ready TO %I', p_role) || opt;
    PERFORM df._grant_writes(p_role, opt);
    FOR f IN SELECT u.f FROM unnest(CASE WHEN include_http THEN '{}' ELSE df._http_functions() END
                                    || CASE WHEN with_grant THEN '{}' ELSE df._admin_functions() END) AS u(f)
             WHERE has_function_privilege(u.f, 'EXECUTE WITH GRANT OPTION') LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', f, p_role);  -- granted again with less
    END LOOP;
    PERFORM df._pgflow_usage(p_role);
END $$;

-- Take usage back: the privileges this caller granted (PostgreSQL's REVOKE), then pgflow's usage if the role
-- has no USAGE on df left.
CREATE FUNCTION df.revoke_usage(p_role text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'df'::regnamespace AND has_function_privilege(p.oid, 'EXECUTE WITH GRANT OPTION')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I CASCADE', f, p_role);
    END LOOP;
    EXECUTE format('REVOKE ALL ON df.instances, df.nodes, df.vars, df.history, df._worker_ready FROM %I CASCADE', p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA df FROM %I CASCADE', p_role);
    PERFORM df._pgflow_usage(p_role);
END $$;

-- Nothing here is PUBLIC's (PostgreSQL grants EXECUTE on new functions to PUBLIC).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA df FROM PUBLIC;

-- Roles granted usage before this rebuild get their df privileges back (those granted with_grant get their
-- administrator functions back by being granted again).
DO $$
DECLARE
    r record;
    f regprocedure;
BEGIN
    FOR r IN SELECT g.role_name, g.http FROM pgflow.role_grants g
             WHERE EXISTS (SELECT FROM pg_roles WHERE rolname = g.role_name) LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA df TO %I', r.role_name);
        EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA df TO %I', r.role_name);
        EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA df TO %I', r.role_name);
        PERFORM df._grant_writes(r.role_name);
        FOR f IN SELECT unnest(df._admin_functions()
                               || CASE WHEN r.http THEN '{}'::regprocedure[] ELSE df._http_functions() END) LOOP
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', f, r.role_name);
        END LOOP;
    END LOOP;
END $$;
