-- pgflow schema, version 9: an instance keeps the trace context it was started in (OpenTelemetry, W3C
-- traceparent), and a worker gets it with each task it claims, so the steps' spans join the starter's trace.
--
-- The context reaches the row through the transaction-local setting pgflow.trace_context, read by the
-- column's default: the start functions keep their signatures, roles need no new privilege (a default is
-- not a column they insert), and one setting serves start_instance and start_instances alike. Python's
-- pgflow.start sets it in its own statement; from SQL, SELECT set_config('pgflow.trace_context', tp, true)
-- before starting. Anything that is not a well-formed traceparent is not kept.

ALTER TABLE pgflow.instances ADD COLUMN trace_context text DEFAULT (
    CASE WHEN current_setting('pgflow.trace_context', true) ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
         THEN current_setting('pgflow.trace_context', true) END);

-- claim_tasks and read_tasks as in versions 5 and 7, with the instance's trace_context as a last column (a
-- new result type: dropped and created again; both are internal, never granted)
DROP FUNCTION pgflow.read_tasks(text, integer, integer);
DROP FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[], text[], text[]);

CREATE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_flows text[],
    p_versions text[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text
) LANGUAGE sql AS $$
    WITH u AS MATERIALIZED (
        SELECT u.*, i.input, i.variables, i.owner, i.secret_refs, i.trace_context
        FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks, p_flows, p_versions)
            AS u(msg_id, instance_id, step_name, task_index, flow_name, flow_version)
        CROSS JOIN LATERAL (
            SELECT i.input, i.variables, i.owner, i.secret_refs, i.trace_context FROM pgflow.instances i
            WHERE i.id = u.instance_id AND i.status = 'running'
              AND i.flow_name = u.flow_name AND i.flow_version = u.flow_version
            OFFSET 0
        ) i
    ), claimed AS (
        UPDATE pgflow.steps s
        SET status = 'running', attempt = s.attempt + 1, started_at = clock_timestamp(),
            msg_id = u.msg_id, next_attempt_at = NULL
        FROM u
        WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
          AND s.status IN ('queued', 'running', 'retrying')
        RETURNING u.msg_id, s.instance_id, s.step_name, s.task_index, s.attempt,
                  u.flow_name, u.flow_version, u.input, u.variables, u.owner, u.secret_refs, u.trace_context
    )
    SELECT c.msg_id, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name, c.flow_version,
           -- a task of a map over the input gets its element, not the whole input list (no N^2 reads)
           CASE WHEN c.task_index >= 0 AND fs.over = 'input' THEN NULL ELSE c.input END,
           c.variables, d.deps, d.dep_columns, c.owner, c.secret_refs, c.trace_context
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

CREATE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
RETURNS TABLE (
    msg_id bigint, message jsonb, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text
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
           c.flow_version, c.input, c.variables, c.deps, c.dep_columns, c.owner, c.secret_refs, c.trace_context
    FROM m LEFT JOIN c ON c.msg_id = m.msg_id
    ORDER BY m.msg_id;
$$;

REVOKE ALL ON FUNCTION pgflow.read_tasks(text, integer, integer),
    pgflow.claim_tasks(bigint[], bigint[], text[], integer[], text[], text[]) FROM PUBLIC;
