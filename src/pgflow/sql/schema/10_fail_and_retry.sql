-- Failing and retrying: a worker's transitions 'running' -> 'retrying' (the message becomes visible again
-- after the backoff), 'running' -> 'failed' (for good: the message is archived, never dropped, and the
-- coordinator is woken to fail the instance), and 'running' -> 'queued' when a worker shutting down gives
-- back tasks it claimed but has not started (without spending an attempt).

CREATE FUNCTION pgflow.fail_task(
    p_queue text, p_msg_id bigint, p_instance_id bigint, p_step text, p_task integer, p_attempt integer,
    p_error text, p_traceback text, p_retry_in double precision
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_retry_in IS NOT NULL THEN
        UPDATE pgflow.steps
        SET status = 'retrying', error = p_error, traceback = p_traceback,
            next_attempt_at = clock_timestamp() + make_interval(secs => p_retry_in)
        WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
          AND status = 'running' AND attempt = p_attempt;
        IF FOUND THEN
            PERFORM pgmq.set_vt(p_queue, p_msg_id, clock_timestamp() + make_interval(secs => p_retry_in));
        END IF;
        RETURN;
    END IF;
    UPDATE pgflow.steps
    SET status = 'failed', error = p_error, traceback = p_traceback, finished_at = clock_timestamp()
    WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
      AND status = 'running' AND attempt = p_attempt;
    PERFORM pgmq.archive(p_queue, p_msg_id);
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_instance_id);
    PERFORM pg_notify('pgflow_coordinator', '');
END $$;
REVOKE ALL ON FUNCTION pgflow.fail_task(text, bigint, bigint, text, integer, integer, text, text, double precision) FROM PUBLIC;

-- Worker on shutdown: give back claimed tasks it has not started, without spending an attempt.
CREATE FUNCTION pgflow.release_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgflow.steps s
    SET status = 'queued', attempt = s.attempt - 1, started_at = NULL
    FROM unnest(p_instance_ids, p_steps, p_tasks, p_attempts) AS u(instance_id, step_name, task_index, attempt)
    WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
      AND s.status = 'running' AND s.attempt = u.attempt;
    PERFORM pgmq.set_vt(p_queue, p_msg_ids, 0);
END $$;
REVOKE ALL ON FUNCTION pgflow.release_tasks(text, bigint[], bigint[], text[], integer[], integer[]) FROM PUBLIC;
