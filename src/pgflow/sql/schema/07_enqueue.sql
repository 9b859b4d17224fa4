-- Enqueueing tasks: the coordinator's transition "no step row" -> 'queued'. The messages are sent and the
-- step rows written in the coordinator's transaction, so a task is on its queue exactly when its row says so.

CREATE FUNCTION pgflow.enqueue_tasks(
    p_queue text, p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_messages jsonb[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmq.send_batch(p_queue, p_messages);
    INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, queue)
    SELECT u.instance_id, u.step_name, u.task_index, 'queued', p_queue
    FROM unnest(p_instance_ids, p_steps, p_tasks) AS u(instance_id, step_name, task_index);
    PERFORM pg_notify('pgflow_queue_' || p_queue, '');
END $$;
REVOKE ALL ON FUNCTION pgflow.enqueue_tasks(text, bigint[], text[], integer[], jsonb[]) FROM PUBLIC;
