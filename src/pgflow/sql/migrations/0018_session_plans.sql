-- compatible-from: 17
-- The functions every step passes through keep their statements' plans for the session, pinned to index
-- scans (07_enqueue.sql says why): the engine's sessions force a custom plan per execution, which inside
-- them meant planning every statement and every foreign-key check on every call. claim_tasks becomes
-- PL/pgSQL so that PostgreSQL before 18 keeps its plan too.

ALTER FUNCTION pgflow.enqueue_tasks(text, bigint[], text[], integer[], jsonb[], jsonb[])
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pgflow.read_tasks(text, integer, integer)
    SET plan_cache_mode = auto SET enable_seqscan = off;
ALTER FUNCTION pgflow.complete_tasks(text, bigint[], bigint[], text[], integer[], integer[], jsonb[], jsonb[])
    SET plan_cache_mode = auto SET enable_seqscan = off;

CREATE OR REPLACE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_flows text[],
    p_versions text[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text
) LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
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
          AND s.status = ANY (pgflow.claimable_step_statuses())
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
END $$;
