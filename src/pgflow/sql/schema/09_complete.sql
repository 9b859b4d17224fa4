-- Completing tasks: a worker's transition 'running' -> 'completed', the checkpoint and the acknowledgement
-- in one transaction.
--
-- A checkpoint only lands for the attempt that is still current; a message is deleted unless a newer
-- attempt of the same task is live (then that attempt owns the message). The coordinator is woken to
-- schedule what comes next. Its plans are kept for the session, as enqueue_tasks's are (07_enqueue.sql).

CREATE FUNCTION pgflow.complete_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[], p_outputs jsonb[], p_columns jsonb[] DEFAULT NULL
) RETURNS integer LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
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
REVOKE ALL ON FUNCTION pgflow.complete_tasks(text, bigint[], bigint[], text[], integer[], integer[], jsonb[], jsonb[]) FROM PUBLIC;
