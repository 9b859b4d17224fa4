-- Seeing what an instance does: one row per node (or DAG step) with its status, and the same as an
-- indented text tree (`SELECT pgflow.explain(id)`).

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
REVOKE ALL ON FUNCTION pgflow._label(jsonb) FROM PUBLIC;

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
                   WHEN NOT inst.status = ANY (pgflow.open_instance_statuses()) THEN 'skipped'
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
               coalesce(st.status, CASE WHEN NOT inst.status = ANY (pgflow.open_instance_statuses()) THEN 'skipped'
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
REVOKE ALL ON FUNCTION pgflow.instance_nodes(bigint) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow.explain(bigint) FROM PUBLIC;
