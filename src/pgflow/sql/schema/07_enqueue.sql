-- Enqueueing tasks: the coordinator's transition "no step row" -> 'queued'. The messages are sent and the
-- step rows written in the coordinator's transaction, so a task is on its queue exactly when its row says so.
--
-- The functions every step passes through (enqueue_tasks, read_tasks, claim_tasks, complete_tasks) keep
-- their statements' plans for the session: the engine's sessions plan each top-level statement for its
-- actual parameters (plan_cache_mode = force_custom_plan, loop.sql), which inside these functions meant
-- planning every statement, and every foreign-key check of every step row, on every call: 17-20% of the
-- server's CPU in the chain benchmark. Here the planner's own choice applies (auto: a generic plan once it
-- is no worse), and sequential scans are off, so that a plan cached while the tables were small still
-- probes their indexes once they are large (a seq scan remains where no index serves).

-- The virtual time at the head of a queue: the tag of the first ready message in fair order (0 when none
-- is ready). One probe of the fair index (04_queues.sql), pinned and prepared as read_queue's is
-- (08_read_and_claim.sql).
CREATE FUNCTION pgflow.queue_head(p_queue text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    stmt text := 'pgflow_head_' || p_queue;
    head bigint;
BEGIN
    PERFORM pgflow._prepare_once(stmt, format(
        'SELECT pgflow.task_tag(headers) FROM pgmq.%I '
        'WHERE vt <= clock_timestamp() AND (headers->>''parked'') IS NULL '
        'ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), '
        'pgflow.task_instance(message), msg_id LIMIT 1', 'q_' || p_queue));
    EXECUTE format('EXECUTE %I', stmt) INTO head;
    RETURN coalesce(head, 0);
END $$;
REVOKE ALL ON FUNCTION pgflow.queue_head(text) FROM PUBLIC;

-- p_headers (one per message, or NULL) carry what the coordinator knows of a task's claim: its step's
-- priority and its limit (22_limits.sql). Each message is tagged here (start-time fair queueing): tag = the
-- queue's head tag + the task's rank among this call's tasks of the same instance, so a new instance's task
-- lands at the head and a wide map's tasks interleave with every other instance's, one round each; its
-- priority is the step's plus its instance's.
CREATE FUNCTION pgflow.enqueue_tasks(
    p_queue text, p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_messages jsonb[],
    p_headers jsonb[] DEFAULT NULL
) RETURNS void LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
DECLARE
    head bigint := pgflow.queue_head(p_queue);
    sent integer;
BEGIN
    WITH u AS (
        SELECT u.n, u.message, u.instance_id, coalesce(u.headers, '{}'::jsonb) AS headers,
               row_number() OVER (PARTITION BY u.instance_id ORDER BY u.n) - 1 AS rank
        FROM unnest(p_messages, p_instance_ids,
                    coalesce(p_headers, array_fill(NULL::jsonb, ARRAY[cardinality(p_messages)])))
            WITH ORDINALITY AS u(message, instance_id, headers, n)
    ), t AS (
        SELECT u.n, u.message,
               u.headers || jsonb_build_object('tag', head + u.rank)
                         || CASE WHEN p.priority IS NULL THEN '{}'::jsonb
                                 ELSE jsonb_build_object('priority', pgflow.task_priority(u.headers) + p.priority)
                            END AS headers
        FROM u
        -- (the partial index instances_prioritized: no lookup among every instance for unprioritized ones)
        LEFT JOIN (SELECT i.id, i.priority FROM pgflow.instances i
                   WHERE i.priority <> 0 AND i.id = ANY (p_instance_ids)) p ON p.id = u.instance_id
    )
    SELECT count(*) INTO sent
    FROM pgmq.send_batch(p_queue, ARRAY(SELECT t.message FROM t ORDER BY t.n),
                         ARRAY(SELECT t.headers FROM t ORDER BY t.n));
    INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, queue)
    SELECT u.instance_id, u.step_name, u.task_index, 'queued', p_queue
    FROM unnest(p_instance_ids, p_steps, p_tasks) AS u(instance_id, step_name, task_index);
    PERFORM pg_notify('pgflow_queue_' || p_queue, '');
END $$;
REVOKE ALL ON FUNCTION pgflow.enqueue_tasks(text, bigint[], text[], integer[], jsonb[], jsonb[]) FROM PUBLIC;
