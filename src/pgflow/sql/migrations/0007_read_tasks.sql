-- pgflow schema, version 7: one round trip per worker batch (found by loadtests/run.py --profile).
--
-- A worker used to read a batch with pgmq.read and then claim it with claim_tasks: two statements, two
-- transactions and two round trips per batch, 27% of the workers' wall time waiting on them. read_tasks
-- does both in one statement. Messages that are not well-formed task messages are read but not claimed;
-- the worker dead-letters them as before. If the claim fails as a whole, the read fails with it (nothing
-- is hidden) and the worker falls back to reading and claiming separately, one message at a time.

-- The same rules as pgflow.queue.decode (tests check that both agree): names are strings, the instance
-- id fits a bigint and is positive, the task index fits an integer and is >= -1, scope and column types
-- are objects when present. CASE keeps every cast behind its check.
CREATE FUNCTION pgflow.is_task_message(m jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(m) IS DISTINCT FROM 'object' THEN false
        WHEN jsonb_typeof(m->'f') IS DISTINCT FROM 'string' OR jsonb_typeof(m->'v') IS DISTINCT FROM 'string'
             OR jsonb_typeof(m->'s') IS DISTINCT FROM 'string' THEN false
        WHEN jsonb_typeof(m->'i') IS DISTINCT FROM 'number' OR m->>'i' !~ '^[0-9]{1,19}$'
             OR jsonb_typeof(m->'t') IS DISTINCT FROM 'number' OR m->>'t' !~ '^-?[0-9]{1,10}$' THEN false
        WHEN coalesce(jsonb_typeof(m->'c'), 'null') NOT IN ('object', 'null')
             OR coalesce(jsonb_typeof(m->'ct'), 'null') NOT IN ('object', 'null') THEN false
        ELSE (m->>'i')::numeric BETWEEN 1 AND 9223372036854775807
             AND (m->>'t')::numeric BETWEEN -1 AND 2147483647
    END
$$;

CREATE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
RETURNS TABLE (
    msg_id bigint, message jsonb, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb
) LANGUAGE sql AS $$
    WITH m AS MATERIALIZED (
        SELECT r.msg_id, r.message, pgflow.is_task_message(r.message) AS ok
        FROM pgmq.read(p_queue, p_vt, p_qty) r
    ), t AS MATERIALIZED (
        SELECT m.msg_id,
               CASE WHEN m.ok THEN (m.message->>'i')::bigint END AS instance_id,
               CASE WHEN m.ok THEN (m.message->>'t')::integer END AS task_index,
               m.message->>'s' AS step_name, m.message->>'f' AS flow_name, m.message->>'v' AS flow_version
        FROM m WHERE m.ok
    ), c AS MATERIALIZED (
        SELECT * FROM pgflow.claim_tasks(
            ARRAY(SELECT t.msg_id FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.instance_id FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.step_name FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.task_index FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.flow_name FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.flow_version FROM t ORDER BY t.msg_id))
    )
    SELECT m.msg_id, m.message, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name,
           c.flow_version, c.input, c.variables, c.deps, c.dep_columns, c.owner, c.secret_refs
    FROM m LEFT JOIN c ON c.msg_id = m.msg_id
    ORDER BY m.msg_id;
$$;

-- A list of JSON values passed as one jsonb array, as the jsonb[] the engine's functions take: a client
-- sends one JSON document instead of a text array literal, whose per-element quoting cost the coordinator
-- ~20% of its time in psycopg's array dumper. Elements keep their order; JSON null stays a JSON null.
CREATE FUNCTION pgflow.jsonb_list(p jsonb) RETURNS jsonb[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT e FROM jsonb_array_elements(p) WITH ORDINALITY AS x(e, n) ORDER BY n)
$$;

CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions']
$$;

REVOKE ALL ON FUNCTION pgflow.read_tasks(text, integer, integer), pgflow.is_task_message(jsonb),
    pgflow.jsonb_list(jsonb) FROM PUBLIC;

-- roles granted usage before this version get the new functions clients call (start_many uses jsonb_list)
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT role_name FROM pgflow.role_grants LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow.jsonb_list(jsonb), pgflow.is_task_message(jsonb) TO %I',
                       r.role_name);
    END LOOP;
END $$;
