-- Batched maps: a map with a batch size has one task per slice of its elements, its task index the index of
-- the slice's first element (so the fan-in orders outputs by task index, then by position in the slice).
--
-- A failing batch of a map with split_on_failure is bisected: its row and message are replaced by one task
-- per half (the worker builds their messages, each with its slice), which start with fresh attempts. A
-- poison element ends up alone in a task of one element, which fails by the step's usual rules, while every
-- other element completes.
CREATE FUNCTION pgflow.split_task(
    p_queue text, p_msg_id bigint, p_instance_id bigint, p_step text, p_task integer, p_attempt integer,
    p_tasks integer[], p_messages jsonb[]
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    h jsonb;
BEGIN
    DELETE FROM pgflow.steps
    WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
      AND status = 'running' AND attempt = p_attempt;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    EXECUTE format('DELETE FROM pgmq.%I WHERE msg_id = $1 RETURNING headers', 'q_' || p_queue) INTO h USING p_msg_id;
    -- the halves keep the batch's limit; tag and priority are given again by enqueue_tasks
    h := coalesce(h, '{}') - 'tag' - 'priority' - 'parked' - 'slot';
    PERFORM pgflow.enqueue_tasks(
        p_queue, array_fill(p_instance_id, ARRAY[cardinality(p_tasks)]), array_fill(p_step, ARRAY[cardinality(p_tasks)]),
        p_tasks, p_messages, array_fill(h, ARRAY[cardinality(p_tasks)]));
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION pgflow.split_task(text, bigint, bigint, text, integer, integer, integer[], jsonb[]) FROM PUBLIC;
