-- Named queries of pgflow.engine.coordinator (wake-ups, DAG scheduling, fan-out/fan-in, finishing).

-- name: listen
LISTEN pgflow_coordinator;

-- name: claim_wakeups
-- (materialized first: a DELETE ... WHERE id IN (SELECT ... SKIP LOCKED) may re-run its subquery)
WITH picked AS MATERIALIZED (
    SELECT id FROM pgflow.wakeups WHERE due_at <= now()
    ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
DELETE FROM pgflow.wakeups w USING picked WHERE w.id = picked.id
RETURNING w.instance_id;

-- name: next_wakeup_in
SELECT extract(epoch FROM min(due_at) - now()) FROM pgflow.wakeups;

-- name: lock_instances
-- Never waits for a lock a user's open transaction holds (a cancel, a retry): such an instance is skipped
-- and woken again later (rewake_skipped). NO KEY UPDATE: a signal's foreign-key check (KEY SHARE) does not
-- conflict with it at all. Input and variables as text: decoded per instance, so one that cannot be decoded
-- fails alone (coordinator.py).
-- One primary-key probe per id, in the order given (sorted: coordinators lock in one order): with the
-- statistics of a table filled in a burst, "id = ANY(ids) AND status is open" read every open instance
-- through the status index and sorted them (5.2 s of a 10 s chain run on PostgreSQL 15).
SELECT i.id, i.flow_name, i.flow_version, i.status, i.input::text, i.variables::text, i.owner
FROM unnest(%(ids)s::bigint[]) AS u(id)
CROSS JOIN LATERAL (
    SELECT * FROM pgflow.instances i
    WHERE i.id = u.id AND i.status = ANY (pgflow.open_instance_statuses())
    FOR NO KEY UPDATE SKIP LOCKED
) AS i
ORDER BY i.id;

-- name: rewake_skipped
-- open instances that were woken but locked by someone else: looked at again shortly
INSERT INTO pgflow.wakeups (instance_id, due_at)
SELECT i.id, now() + make_interval(secs => %(delay)s) FROM pgflow.instances i
WHERE i.id = ANY(%(ids)s::bigint[]) AND i.status = ANY (pgflow.open_instance_statuses());

-- name: map_quotas
-- per owner: the widest map it may fan out and the tasks it may have on queues at once. NULL: no limit;
-- the pgflow owner has none.
SELECT o, CASE WHEN engine THEN NULL ELSE (pgflow.quotas_of(o)).max_map_width END AS width,
       CASE WHEN engine THEN NULL ELSE (pgflow.quotas_of(o)).max_queued_tasks END AS depth
FROM unnest(%(owners)s::name[]) AS o, pgflow.is_engine_role(o) AS engine;

-- name: queued_tasks
-- per owner: the tasks it has on queues, counted up to one past its queue-depth quota
SELECT u.o, (SELECT count(*) FROM (
                 SELECT 1 FROM pgflow.instances i JOIN pgflow.steps s ON s.instance_id = i.id
                 WHERE i.owner = u.o AND i.status = ANY (pgflow.open_instance_statuses())
                   AND s.status = ANY (pgflow.claimable_step_statuses())
                 LIMIT u.depth + 1) AS n)
FROM unnest(%(owners)s::name[], %(depths)s::bigint[]) AS u(o, depth);

-- name: mark_started
UPDATE pgflow.instances SET status = 'running', started_at = now()
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending';

-- name: step_states
SELECT instance_id, step_name, status, error
FROM pgflow.steps
WHERE instance_id = ANY(%(ids)s::bigint[]) AND task_index = -1;

-- name: map_progress
SELECT c.instance_id, c.step_name,
       count(*) FILTER (WHERE c.status <> 'completed') AS unfinished,
       min(c.step_name || '[' || c.task_index || ']: ' || c.error) FILTER (WHERE c.status = 'failed')
           AS failure
FROM pgflow.steps p
JOIN pgflow.steps c ON c.instance_id = p.instance_id AND c.step_name = p.step_name AND c.task_index >= 0
WHERE p.instance_id = ANY(%(ids)s::bigint[]) AND p.task_index = -1 AND p.status = 'mapping'
GROUP BY c.instance_id, c.step_name;

-- name: step_outputs
SELECT s.instance_id, s.step_name, s.output
FROM unnest(%(ids)s::bigint[], %(steps)s::text[]) AS u(instance_id, step_name)
JOIN pgflow.steps s ON s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = -1;

-- name: insert_map_parents
INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, queue, output, finished_at)
SELECT u.instance_id, u.step_name, -1, u.status, u.queue,
       CASE WHEN u.status = 'completed' THEN '[]'::jsonb END,
       CASE WHEN u.status = 'completed' THEN now() END
FROM unnest(%(ids)s::bigint[], %(steps)s::text[], %(statuses)s::text[], %(queues)s::text[])
    AS u(instance_id, step_name, status, queue);

-- name: enqueue_tasks
-- %(headers)s: a JSON list of each task's claim headers (priority, limit), or NULL when none has any
SELECT pgflow.enqueue_tasks(%(queue)s, %(instance_ids)s, %(steps)s, %(tasks)s,
                             pgflow.jsonb_list(%(messages)s::jsonb), pgflow.jsonb_list(%(headers)s::jsonb));

-- name: finish_maps
-- a batched map's tasks each output a list (one output per element of their slice): flattened in order
UPDATE pgflow.steps p
SET status = 'completed', finished_at = now(),
    output = CASE WHEN u.batched
        THEN (SELECT coalesce(jsonb_agg(e.value ORDER BY c.task_index, e.n), '[]'::jsonb)
              FROM pgflow.steps c CROSS JOIN LATERAL jsonb_array_elements(c.output) WITH ORDINALITY AS e(value, n)
              WHERE c.instance_id = p.instance_id AND c.step_name = p.step_name AND c.task_index >= 0)
        ELSE (SELECT coalesce(jsonb_agg(c.output ORDER BY c.task_index), '[]'::jsonb)
              FROM pgflow.steps c
              WHERE c.instance_id = p.instance_id AND c.step_name = p.step_name AND c.task_index >= 0) END
FROM unnest(%(ids)s::bigint[], %(steps)s::text[], %(batched)s::boolean[]) AS u(instance_id, step_name, batched)
WHERE p.instance_id = u.instance_id AND p.step_name = u.step_name AND p.task_index = -1;

-- name: complete_instances
-- %(done)s: [{"id": .., "terminal": [step names], "single": bool}]; one terminal step gives its output,
-- several give an object keyed by step name. Waiters are notified in the same statement, on the owner's
-- channel (pgflow.notify_done).
WITH done AS (
    UPDATE pgflow.instances i
    SET status = 'completed', finished_at = now(),
        output = CASE WHEN u.single
                      THEN (SELECT s.output FROM pgflow.steps s
                            WHERE s.instance_id = i.id AND s.step_name = u.terminal[1] AND s.task_index = -1)
                      ELSE (SELECT jsonb_object_agg(s.step_name, s.output) FROM pgflow.steps s
                            WHERE s.instance_id = i.id AND s.step_name = ANY(u.terminal) AND s.task_index = -1)
                 END
    FROM jsonb_to_recordset(%(done)s::jsonb) AS u(id bigint, terminal text[], single boolean)
    WHERE i.id = u.id
    RETURNING i.id, i.flow_name, i.owner, extract(epoch FROM i.finished_at - i.created_at)::float8 AS seconds
), notified AS (
    SELECT pgflow.notify_done(array_agg(owner), array_agg(id)) FROM done
)
SELECT id, flow_name, owner, seconds FROM done, notified;

-- name: complete_tree_instance
-- waiters are notified in the same statement
WITH done AS (
    UPDATE pgflow.instances SET status = 'completed', output = %(output)s::jsonb, finished_at = now()
    WHERE id = %(id)s
    RETURNING id, owner, extract(epoch FROM finished_at - created_at)::float8 AS seconds
), notified AS (
    SELECT pgflow.notify_done(array_agg(owner), array_agg(id)) FROM done
)
SELECT seconds FROM done, notified;

-- name: fail_instances
UPDATE pgflow.instances i SET status = 'failed', error = u.error, finished_at = now()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS u(id, error)
WHERE i.id = u.id
RETURNING i.id, i.flow_name, i.owner, u.error;

-- name: cancel_open_steps
-- every open step of the failed instances, timers and signal waits included
UPDATE pgflow.steps SET status = 'cancelled', finished_at = now()
WHERE instance_id = ANY(%(ids)s::bigint[]) AND status = ANY (pgflow.open_step_statuses());

-- name: notify_done
SELECT pgflow.notify_done(array_agg(i.owner), array_agg(i.id)) FROM pgflow.instances i WHERE i.id = ANY(%(ids)s::bigint[]);

-- name: define_limits
-- limits declared in flow code, written before their first tasks are enqueued
SELECT pgflow.define_limits(%(limits)s::jsonb);
