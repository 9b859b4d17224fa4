-- pgflow schema, version 11: task messages name their fields in words.
--
-- A message was {"f", "v", "i", "s", "t", "x", "c", "ct"}; it is now {"flow", "version", "instance", "step",
-- "task", "item", "scope", "columns"} (pgflow.engine.messages writes them). The rules do not change: names
-- are strings, the instance id fits a bigint and is positive, the task index fits an integer and is >= -1,
-- scope and columns are objects when present. Breaking: workers of earlier versions cannot read the new
-- messages (stop them before this migration); messages still queued are rewritten here, so none is lost.

-- The same rules as pgflow.engine.messages.decode (a property test checks that both agree). CASE keeps every
-- cast behind its check.
CREATE OR REPLACE FUNCTION pgflow.is_task_message(m jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(m) IS DISTINCT FROM 'object' THEN false
        WHEN jsonb_typeof(m->'flow') IS DISTINCT FROM 'string' OR jsonb_typeof(m->'version') IS DISTINCT FROM 'string'
             OR jsonb_typeof(m->'step') IS DISTINCT FROM 'string' THEN false
        WHEN jsonb_typeof(m->'instance') IS DISTINCT FROM 'number' OR m->>'instance' !~ '^[0-9]{1,19}$'
             OR jsonb_typeof(m->'task') IS DISTINCT FROM 'number' OR m->>'task' !~ '^-?[0-9]{1,10}$' THEN false
        WHEN coalesce(jsonb_typeof(m->'scope'), 'null') NOT IN ('object', 'null')
             OR coalesce(jsonb_typeof(m->'columns'), 'null') NOT IN ('object', 'null') THEN false
        ELSE (m->>'instance')::numeric BETWEEN 1 AND 9223372036854775807
             AND (m->>'task')::numeric BETWEEN -1 AND 2147483647
    END
$$;

-- as in version 10, reading the new keys
CREATE OR REPLACE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
RETURNS TABLE (
    msg_id bigint, message jsonb, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text, queue_wait double precision
) LANGUAGE sql AS $$
    WITH m AS MATERIALIZED (
        SELECT r.msg_id, r.message, pgflow.is_task_message(r.message) AS ok,
               CASE WHEN r.read_ct = 1 THEN extract(epoch FROM clock_timestamp() - r.enqueued_at)::float8
               END AS queue_wait
        FROM pgmq.read(p_queue, p_vt, p_qty) r
    ), t AS MATERIALIZED (
        SELECT m.msg_id,
               CASE WHEN m.ok THEN (m.message->>'instance')::bigint END AS instance_id,
               CASE WHEN m.ok THEN (m.message->>'task')::integer END AS task_index,
               m.message->>'step' AS step_name, m.message->>'flow' AS flow_name,
               m.message->>'version' AS flow_version
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
           c.flow_version, c.input, c.variables, c.deps, c.dep_columns, c.owner, c.secret_refs, c.trace_context,
           m.queue_wait
    FROM m LEFT JOIN c ON c.msg_id = m.msg_id
    ORDER BY m.msg_id;
$$;

-- messages written by earlier versions and not consumed yet: the same fields under their new names
DO $$
DECLARE
    q record;
BEGIN
    FOR q IN SELECT queue_name FROM pgflow.queues LOOP
        EXECUTE format($sql$
            UPDATE pgmq.%I SET message = (
                SELECT jsonb_object_agg(CASE key WHEN 'f' THEN 'flow' WHEN 'v' THEN 'version' WHEN 'i' THEN 'instance'
                                                 WHEN 's' THEN 'step' WHEN 't' THEN 'task' WHEN 'x' THEN 'item'
                                                 WHEN 'c' THEN 'scope' WHEN 'ct' THEN 'columns' ELSE key END, value)
                FROM jsonb_each(message))
            WHERE jsonb_typeof(message) = 'object' AND message ?& ARRAY['f', 'v', 'i', 's', 't']
              AND NOT message ?| ARRAY['flow', 'version', 'instance', 'step', 'task']
        $sql$, 'q_' || q.queue_name);
    END LOOP;
END $$;
