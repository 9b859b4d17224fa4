-- Named queries of pgflow.console (the web console's pages). They run as the console's database role, so
-- row-level security decides what each returns. Filters are "%(x)s IS NULL OR ...": the console's
-- connections never prepare statements, so every execution is planned with its values and the planner drops
-- the filters that are not set (each list stays a keyset scan of one index: the primary key,
-- instances_status_id, instances_flow_id or instances_label_id).

-- name: whoami
-- the role, and whether it sees every instance (pgflow owner, superuser, pgflow_admin member)
SELECT current_user::text,
       current_user = (SELECT nspowner::regrole::name FROM pg_namespace WHERE nspname = 'pgflow')
       OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
       OR pgflow.is_admin(),
       has_table_privilege('pgflow.dead_letters', 'SELECT');

-- name: list_instances
SELECT id, flow_name, flow_version, status, label, owner::text AS owner, created_at, started_at, finished_at,
       left(error, 300) AS error
FROM pgflow.instances
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(flow)s::text IS NULL OR flow_name = %(flow)s)
  AND (%(label)s::text IS NULL OR label = %(label)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
  AND (%(from_id)s::bigint IS NULL OR id >= %(from_id)s)
  -- a role that sees only its own rows says so, and the scan uses instances_owner_id
  AND (%(mine)s::name IS NULL OR owner = %(mine)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: first_instance_after
-- mine: the role, when it sees only its own rows (the search then walks instances_owner_id)
SELECT pgflow.first_instance_after(%(at)s, %(mine)s);

-- name: flow_names
SELECT DISTINCT flow_name FROM pgflow.flows ORDER BY flow_name LIMIT 500;

-- name: instance
SELECT i.id, i.flow_name, i.flow_version, i.status, i.label, i.owner::text AS owner, i.input, i.output, i.error,
       i.created_at, i.started_at, i.finished_at, f.shape, f.ref
FROM pgflow.instances i
JOIN pgflow.flows f ON f.flow_name = i.flow_name AND f.version = i.flow_version
WHERE i.id = %(id)s;

-- name: step_rows
-- one row per step (DAG) or node path (control flow): its own row, and for a map the count of its tasks by
-- status, the time span of its tasks and the first failed task's error
SELECT s.step_name,
       max(s.status) FILTER (WHERE s.task_index = -1) AS status,
       max(s.attempt) FILTER (WHERE s.task_index = -1) AS attempts,
       max(s.attempt) FILTER (WHERE s.task_index >= 0) AS task_attempts,
       count(*) FILTER (WHERE s.task_index >= 0) AS tasks,
       count(*) FILTER (WHERE s.task_index >= 0 AND s.status = 'completed') AS tasks_completed,
       count(*) FILTER (WHERE s.task_index >= 0 AND s.status = 'failed') AS tasks_failed,
       count(*) FILTER (WHERE s.task_index >= 0 AND s.status IN ('running', 'retrying')) AS tasks_running,
       min(s.enqueued_at) AS enqueued_at,
       min(s.started_at) AS started_at,
       CASE WHEN bool_and(s.finished_at IS NOT NULL) THEN max(s.finished_at) END AS finished_at,
       max(s.queue) AS queue,
       (array_agg(s.error ORDER BY s.task_index) FILTER (WHERE s.status IN ('failed', 'retrying')))[1] AS error,
       (array_agg(s.traceback ORDER BY s.task_index) FILTER (WHERE s.status IN ('failed', 'retrying')))[1]
           AS traceback,
       (array_agg(s.task_index ORDER BY s.task_index) FILTER (WHERE s.status IN ('failed', 'retrying')))[1]
           AS failed_task,
       max(s.next_attempt_at) FILTER (WHERE s.task_index = -1) AS due_at,
       (array_agg(s.output) FILTER (WHERE s.task_index = -1))[1] AS output
FROM pgflow.steps s
WHERE s.instance_id = %(id)s
GROUP BY s.step_name;

-- name: tree_nodes
SELECT path, depth, node_type, label, status, attempts, error, due_at FROM pgflow.instance_nodes(%(id)s);

-- name: signals
SELECT id, name, data, created_at, consumed_at, consumed_by FROM pgflow.signals
WHERE instance_id = %(id)s ORDER BY id;

-- name: flows
SELECT f.flow_name, f.version, f.ref, f.created_at, f.shape ? 'tree' AS is_tree,
       jsonb_array_length(f.shape->'steps') AS steps,
       row_number() OVER (PARTITION BY f.flow_name ORDER BY f.created_at DESC, f.version) AS recency
FROM pgflow.flows f
ORDER BY f.flow_name, f.created_at DESC, f.version;

-- name: flow
SELECT flow_name, version, ref, shape, created_at FROM pgflow.flows
WHERE flow_name = %(flow)s AND version = %(version)s;

-- name: queue_stats
SELECT queue, ready, in_flight, delayed, oldest_ready_seconds, total_sent FROM pgflow.queue_stats();

-- name: engine_processes
SELECT kind, name, connections, connected_since, last_active FROM pgflow.engine_processes();

-- name: dead_letter_counts
SELECT queue, count(*), max(created_at) FROM pgflow.dead_letters GROUP BY queue ORDER BY queue;

-- name: dead_letters
SELECT id, queue, msg_id, message, reason, created_at FROM pgflow.dead_letters
WHERE (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC
LIMIT %(limit)s;
