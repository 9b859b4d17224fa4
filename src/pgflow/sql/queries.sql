-- Named queries used by pgflow's Python code. Each block starts with "-- name: <name>" and runs with
-- psycopg placeholders (%s / %(name)s); every value is a bound parameter.

-- name: migrations_table_exists
SELECT to_regclass('pgflow.migrations') IS NOT NULL;

-- name: create_migrations_table
-- compatible_from: the oldest code (by schema version) that works once this migration is applied
CREATE SCHEMA IF NOT EXISTS pgflow;
CREATE TABLE IF NOT EXISTS pgflow.migrations (
    version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE pgflow.migrations ADD COLUMN IF NOT EXISTS compatible_from integer;

-- name: record_migration
INSERT INTO pgflow.migrations (version, name, compatible_from)
VALUES (%(version)s, %(name)s, %(compatible_from)s);

-- name: schema_state
-- (through to_jsonb: a database initialised before compatible_from existed has no such column); the
-- baseline's version recorded under another name means the database was initialised before the squash
SELECT coalesce(max(version), 0),
       coalesce(max(coalesce((to_jsonb(m)->>'compatible_from')::integer, version)), 0),
       coalesce(bool_or(version = %(baseline_version)s AND name <> %(baseline)s), false)
FROM pgflow.migrations m;

-- name: register_flow
SELECT pgflow.register_flow(%(name)s, %(version)s, %(ref)s, %(shape)s::jsonb);

-- name: register_and_start
-- one round trip: register the flow version (a no-op when known), then start the instance. Every start
-- sets pgflow.trace_context (read by the instances' column default; '' for none) for its transaction.
WITH registered AS (SELECT pgflow.register_flow(%(flow)s, %(version)s, %(ref)s, %(shape)s::jsonb)),
     traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true))
SELECT pgflow.start_instance(%(flow)s, %(version)s, %(input)s::jsonb, %(label)s) FROM registered, traced;

-- name: register_and_start_many
WITH registered AS (SELECT pgflow.register_flow(%(flow)s, %(version)s, %(ref)s, %(shape)s::jsonb)),
     traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true))
SELECT pgflow.start_instances(%(flow)s, %(version)s, pgflow.jsonb_list(%(inputs)s::jsonb), %(label)s)
FROM registered, traced;

-- name: start_instance
WITH traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true))
SELECT pgflow.start_instance(%(flow)s, %(version)s, %(input)s::jsonb, %(label)s) FROM traced;

-- name: flow_shape
SELECT ref, shape FROM pgflow.flows WHERE flow_name = %(name)s AND version = %(version)s;

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
SELECT id, flow_name, flow_version, status, input, variables
FROM pgflow.instances
WHERE id = ANY(%(ids)s) AND status = ANY (pgflow.open_instance_statuses())
ORDER BY id
FOR UPDATE;

-- name: step_states
SELECT instance_id, step_name, status, error
FROM pgflow.steps
WHERE instance_id = ANY(%(ids)s) AND task_index = -1;

-- name: map_progress
SELECT c.instance_id, c.step_name,
       count(*) FILTER (WHERE c.status <> 'completed') AS unfinished,
       min(c.step_name || '[' || c.task_index || ']: ' || c.error) FILTER (WHERE c.status = 'failed')
           AS failure
FROM pgflow.steps p
JOIN pgflow.steps c ON c.instance_id = p.instance_id AND c.step_name = p.step_name AND c.task_index >= 0
WHERE p.instance_id = ANY(%(ids)s) AND p.task_index = -1 AND p.status = 'mapping'
GROUP BY c.instance_id, c.step_name;

-- name: step_outputs
SELECT s.instance_id, s.step_name, s.output
FROM unnest(%(ids)s::bigint[], %(steps)s::text[]) AS u(instance_id, step_name)
JOIN pgflow.steps s ON s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = -1;

-- name: mark_started
UPDATE pgflow.instances SET status = 'running', started_at = now()
WHERE id = ANY(%(ids)s) AND status = 'pending';

-- name: insert_map_parents
INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, queue, output, finished_at)
SELECT u.instance_id, u.step_name, -1, u.status, u.queue,
       CASE WHEN u.status = 'completed' THEN '[]'::jsonb END,
       CASE WHEN u.status = 'completed' THEN now() END
FROM unnest(%(ids)s::bigint[], %(steps)s::text[], %(statuses)s::text[], %(queues)s::text[])
    AS u(instance_id, step_name, status, queue);

-- name: finish_maps
UPDATE pgflow.steps p
SET status = 'completed', finished_at = now(),
    output = (SELECT coalesce(jsonb_agg(c.output ORDER BY c.task_index), '[]'::jsonb)
              FROM pgflow.steps c
              WHERE c.instance_id = p.instance_id AND c.step_name = p.step_name AND c.task_index >= 0)
FROM unnest(%(ids)s::bigint[], %(steps)s::text[]) AS u(instance_id, step_name)
WHERE p.instance_id = u.instance_id AND p.step_name = u.step_name AND p.task_index = -1;

-- name: complete_instances
-- %(done)s: [{"id": .., "terminal": [step names], "single": bool}]; one terminal step gives its output,
-- several give an object keyed by step name. Waiters are notified in the same statement.
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
    RETURNING i.id, i.flow_name, extract(epoch FROM i.finished_at - i.created_at)::float8 AS seconds
)
SELECT id, flow_name, seconds, pg_notify('pgflow_instance_done', id::text) FROM done;

-- name: complete_tree_instance
-- waiters are notified in the same statement
WITH done AS (
    UPDATE pgflow.instances SET status = 'completed', output = %(output)s::jsonb, finished_at = now()
    WHERE id = %(id)s
    RETURNING id, extract(epoch FROM finished_at - created_at)::float8 AS seconds
)
SELECT seconds, pg_notify('pgflow_instance_done', id::text) FROM done;

-- name: fail_instances
UPDATE pgflow.instances i SET status = 'failed', error = u.error, finished_at = now()
FROM unnest(%(ids)s::bigint[], %(errors)s::text[]) AS u(id, error)
WHERE i.id = u.id
RETURNING i.id, i.flow_name, u.error;

-- name: cancel_open_steps
-- every open step of the failed instances, timers and signal waits included
UPDATE pgflow.steps SET status = 'cancelled', finished_at = now()
WHERE instance_id = ANY(%(ids)s) AND status = ANY (pgflow.open_step_statuses());

-- name: notify_done
SELECT pg_notify('pgflow_instance_done', id::text) FROM unnest(%(ids)s::bigint[]) AS id;

-- name: read_messages
SELECT msg_id, read_ct, message FROM pgmq.read(%(queue)s, %(vt)s, %(qty)s);

-- name: read_tasks
-- one round trip: read a batch and claim the tasks of its well-formed messages
SELECT * FROM pgflow.read_tasks(%(queue)s, %(vt)s, %(qty)s);

-- name: claim_tasks
SELECT * FROM pgflow.claim_tasks(%(msg_ids)s, %(instance_ids)s, %(steps)s, %(tasks)s, %(flows)s, %(versions)s);

-- name: complete_tasks
SELECT pgflow.complete_tasks(%(queue)s, %(msg_ids)s, %(instance_ids)s, %(steps)s, %(tasks)s,
                             %(attempts)s, pgflow.jsonb_list(%(outputs)s::jsonb), %(columns)s::jsonb[]);

-- name: fail_task
SELECT pgflow.fail_task(%(queue)s, %(msg_id)s, %(instance_id)s, %(step)s, %(task)s, %(attempt)s,
                        %(error)s, %(traceback)s, %(retry_in)s);

-- name: release_tasks
SELECT pgflow.release_tasks(%(queue)s, %(msg_ids)s, %(instance_ids)s, %(steps)s, %(tasks)s, %(attempts)s);

-- name: archive_messages
SELECT pgmq.archive(%(queue)s, %(msg_ids)s::bigint[]);

-- name: extend_visibility
SELECT msg_id FROM pgmq.set_vt(%(queue)s, %(msg_ids)s::bigint[], %(vt)s);

-- name: enqueue_tasks
SELECT pgflow.enqueue_tasks(%(queue)s, %(instance_ids)s, %(steps)s, %(tasks)s,
                             pgflow.jsonb_list(%(messages)s::jsonb));

-- name: ensure_queue
SELECT pgflow.ensure_queue(%(queue)s);

-- name: insert_dead_letter
INSERT INTO pgflow.dead_letters (queue, msg_id, message, reason)
VALUES (%(queue)s, %(msg_id)s, %(message)s, %(reason)s);

-- name: list_queues
SELECT queue_name FROM pgflow.queues ORDER BY queue_name;

-- name: instance
SELECT id, flow_name, flow_version, status, label, input, output, error,
       created_at, started_at, finished_at
FROM pgflow.instances WHERE id = %(id)s;

-- name: instance_steps
SELECT step_name,
       count(*) FILTER (WHERE task_index >= 0) AS tasks,
       max(status) FILTER (WHERE task_index = -1) AS status,
       count(*) FILTER (WHERE task_index >= 0 AND status = 'completed') AS tasks_completed,
       max(attempt) AS attempts,
       max(error) FILTER (WHERE status IN ('failed', 'retrying')) AS error,
       max(traceback) FILTER (WHERE status = 'failed') AS traceback
FROM pgflow.steps WHERE instance_id = %(id)s
GROUP BY step_name;

-- name: cancel_instance
SELECT pgflow.cancel_instance(%(id)s, %(reason)s);

-- name: list_instances
SELECT id, flow_name, status, label, created_at, finished_at, error
FROM pgflow.instances
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(flow)s::text IS NULL OR flow_name = %(flow)s)
  AND (%(label)s::text IS NULL OR label = %(label)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: stalled_instances
-- Safety net: open instances with nothing to wake them: no wake-up, no task with a message out (its worker
-- wakes the instance) and no timer or signal wait (the coordinator does). A 'mapping' parent wakes nobody
-- itself: its element tasks do.
INSERT INTO pgflow.wakeups (instance_id)
SELECT i.id FROM pgflow.instances i
WHERE i.status = ANY (pgflow.open_instance_statuses()) AND i.created_at < now() - make_interval(secs => %(age)s)
  AND NOT EXISTS (SELECT 1 FROM pgflow.wakeups w WHERE w.instance_id = i.id)
  AND NOT EXISTS (SELECT 1 FROM pgflow.steps s WHERE s.instance_id = i.id
                  AND (s.status = ANY (pgflow.claimable_step_statuses()) OR s.status = 'waiting'))
RETURNING instance_id;

-- name: delete_finished_instances
DELETE FROM pgflow.instances
WHERE id IN (SELECT id FROM pgflow.instances
             WHERE finished_at < now() - make_interval(secs => %(seconds)s) LIMIT 10000);

-- name: churned_tables
-- tables whose rows live for milliseconds, once enough dead rows have gathered (statistics lag ~1 s)
SELECT schemaname, relname FROM pg_stat_user_tables
WHERE n_dead_tup >= %(min_dead)s
  AND ((schemaname = 'pgflow' AND relname = 'wakeups')
       OR (schemaname = 'pgmq' AND relname IN (SELECT 'q_' || queue_name FROM pgflow.queues)));

-- name: try_maintenance_lock
SELECT pg_try_advisory_xact_lock(hashtext('pgflow.maintenance'));

-- name: instance_counts
SELECT flow_name, status, count(*) FROM pgflow.instances GROUP BY 1, 2;

-- name: queue_totals
SELECT m.queue_name, m.total_messages
FROM pgmq.metrics_all() m JOIN pgflow.queues q ON q.queue_name = m.queue_name;

-- name: ready_messages
-- depth and age of *ready* messages (not in-flight or delayed ones); the table name is formatted in
SELECT count(*), coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8
FROM pgmq.{table} WHERE vt <= now();

-- name: wakeup_backlog
SELECT count(*), coalesce(extract(epoch FROM now() - min(due_at)), 0)::float8
FROM pgflow.wakeups WHERE due_at <= now();

-- name: dead_letter_counts
SELECT queue, count(*) FROM pgflow.dead_letters GROUP BY queue;
