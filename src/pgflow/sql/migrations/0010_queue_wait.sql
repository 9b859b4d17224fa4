-- pgflow schema, version 10: a worker learns how long each task waited in its queue.
-- compatible-from: 9
--
-- Operators scale workers on the time from enqueue to start (Temporal's schedule-to-start latency): depth
-- alone does not say whether the workers keep up. read_tasks now also returns, for a message read for the
-- first time, the seconds since it was enqueued; redeliveries (retries after their backoff, messages whose
-- worker died) return NULL, since their waiting is the backoff or the visibility timeout, not the queue.
DROP FUNCTION pgflow.read_tasks(text, integer, integer);
CREATE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
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
           c.flow_version, c.input, c.variables, c.deps, c.dep_columns, c.owner, c.secret_refs, c.trace_context,
           m.queue_wait
    FROM m LEFT JOIN c ON c.msg_id = m.msg_id
    ORDER BY m.msg_id;
$$;
REVOKE ALL ON FUNCTION pgflow.read_tasks(text, integer, integer) FROM PUBLIC;
