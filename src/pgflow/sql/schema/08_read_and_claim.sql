-- Reading and claiming tasks: a worker's transition 'queued' | 'retrying' | 'running' (a redelivery) ->
-- 'running', with attempt + 1.
--
-- read_tasks reads a batch from a queue and claims it in one statement (one round trip per batch: reading
-- and claiming separately cost the workers 27% of their wall time). Messages that are not well-formed task
-- messages are read but not claimed; the worker dead-letters them. If the claim fails as a whole, the read
-- fails with it (nothing is hidden) and the worker falls back to reading and claiming separately, one
-- message at a time, with claim_tasks.

-- The same rules as pgflow.engine.messages.decode (tests check that both agree): names are strings, the instance
-- id fits a bigint and is positive, the task index fits an integer and is >= -1, scope and column types
-- are objects when present. CASE keeps every cast behind its check.
CREATE FUNCTION pgflow.is_task_message(m jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
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
REVOKE ALL ON FUNCTION pgflow.is_task_message(jsonb) FROM PUBLIC;

-- Mark read messages' steps as running (attempt + 1) and return what the step needs to run: its input,
-- the owner's variables, its dependencies' outputs (and SQL column types), the owner (SQL steps run as
-- it), secret references (resolved for HTTP steps) and the trace context the instance was started in.
-- Messages whose step is not runnable any more (instance cancelled or failed, step finished) return no
-- row; a message must also name the instance's own flow and version: a forged one claims nothing.
-- Each instance is looked up by primary key (LATERAL ... OFFSET 0 keeps the lookup a per-row index probe:
-- otherwise the planner may hash every running instance for each batch of 20 tasks). PL/pgSQL, not SQL, so
-- that PostgreSQL before 18 keeps its plan too (plans kept for the session, as enqueue_tasks's are:
-- 07_enqueue.sql).
CREATE FUNCTION pgflow.claim_tasks(
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
REVOKE ALL ON FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[], text[], text[]) FROM PUBLIC;

-- pgflow reads its queues with its own function instead of pgmq.read (pgmq still sends, archives, deletes
-- and sets visibility timeouts): pgmq.read takes messages by msg_id, strict FIFO, and pgmq's grouped
-- round-robin read (read_grouped_rr) holds a whole group back while its head message is in flight and scans
-- the queue on each read, which does not suit a 20,000-wide fan-out. This is pgmq.read's statement (hide
-- the messages for p_vt seconds, read_ct + 1, SKIP LOCKED between readers) in fair order (04_queues.sql):
-- first parked messages that are due (tasks a limit held back, 22_limits.sql; oldest due first), then
-- ready messages by priority, virtual-time tag, instance and msg_id, each through its own index.
-- The plan is pinned to those index scans (and the UPDATE to msg_id probes): a queue table's statistics
-- lag behind its churn (it fills from empty in a second), and with them the planner read 20 messages by
-- sorting every ready one and joined them back by a sequential scan (5-18 ms a read at 20,000 queued, in
-- the chain benchmark on PostgreSQL 15; the index scans take a fraction of a millisecond at any depth).
-- The statement is prepared once per session (pgflow._prepare_once), so a read is not parsed and planned
-- again each time; its generic plan knows nothing of p_qty, so the UPDATE takes the picked messages as an
-- array of ids (primary-key probes) rather than as a join, which such a plan made hash the whole queue
-- (2 ms a read instead of 0.6).
CREATE FUNCTION pgflow.read_queue(p_queue text, p_vt integer, p_qty integer)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    stmt text := 'pgflow_read_' || p_queue;
BEGIN
    PERFORM pgflow._prepare_once(stmt, format($q$
        WITH due AS MATERIALIZED (
            SELECT msg_id FROM pgmq.%1$I
            WHERE vt <= clock_timestamp() AND (headers->>'parked') IS NOT NULL
            ORDER BY vt LIMIT $1 FOR UPDATE SKIP LOCKED
        ), fair AS MATERIALIZED (
            SELECT msg_id FROM pgmq.%1$I
            WHERE vt <= clock_timestamp() AND (headers->>'parked') IS NULL
            ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), pgflow.task_instance(message),
                     msg_id
            LIMIT greatest($1 - (SELECT count(*) FROM due), 0) FOR UPDATE SKIP LOCKED
        )
        UPDATE pgmq.%1$I m
        SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => $2),
            read_ct = read_ct + 1
        WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM due UNION ALL SELECT msg_id FROM fair))
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message, m.headers
        $q$, 'q_' || p_queue));
    RETURN QUERY EXECUTE format('EXECUTE %I(%L, %L)', stmt, p_qty, p_vt);
END $$;
REVOKE ALL ON FUNCTION pgflow.read_queue(text, integer, integer) FROM PUBLIC;

-- A worker also learns how long each task waited in its queue (for a message read for the first time; a
-- redelivery's waiting is its backoff or the visibility timeout, not the queue): operators scale workers
-- on the time from enqueue to start, since depth alone does not say whether the workers keep up.
-- Messages of tasks that consume a limit pass its admission first (22_limits.sql): those it holds back are
-- parked (hidden until their turn) and neither claimed nor returned. Rows come in fair order.
CREATE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
RETURNS TABLE (
    msg_id bigint, message jsonb, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text, queue_wait double precision
) LANGUAGE plpgsql SET plan_cache_mode = auto SET enable_seqscan = off AS $$
#variable_conflict use_column
DECLARE
    msgs pgmq.message_record[] := ARRAY(SELECT r FROM pgflow.read_queue(p_queue, p_vt, p_qty) r);
    held bigint[] := '{}';
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(msgs) r WHERE r.headers ? 'limit') THEN
        held := pgflow.admit_tasks(p_queue, msgs);
    END IF;
    RETURN QUERY
    WITH m AS MATERIALIZED (
        SELECT r.msg_id, r.message, pgflow.is_task_message(r.message) AS ok,
               CASE WHEN r.read_ct = 1 THEN extract(epoch FROM clock_timestamp() - r.enqueued_at)::float8
               END AS queue_wait,
               row_number() OVER (ORDER BY (r.headers->>'parked') IS NULL, pgflow.task_priority(r.headers) DESC,
                                           pgflow.task_tag(r.headers), pgflow.task_instance(r.message), r.msg_id) AS n
        FROM unnest(msgs) r
        WHERE r.msg_id <> ALL (held)
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
    ORDER BY m.n;
END $$;
REVOKE ALL ON FUNCTION pgflow.read_tasks(text, integer, integer) FROM PUBLIC;
