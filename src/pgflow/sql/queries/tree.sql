-- Named queries of pgflow.engine.tree (reading and writing control-flow workflows' node rows).

-- name: now
SELECT clock_timestamp();

-- name: tree_rows
SELECT instance_id, step_name, status, output, columns, error, next_attempt_at, finished_at
FROM pgflow.steps
WHERE instance_id = ANY(%(ids)s) AND task_index = -1;

-- name: pending_signals
SELECT instance_id, id, name, data
FROM pgflow.signals
WHERE instance_id = ANY(%(ids)s) AND consumed_at IS NULL
ORDER BY instance_id, id;

-- name: write_row
INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, output, next_attempt_at, finished_at)
VALUES (%(id)s, %(path)s, -1, %(status)s, %(output)s::jsonb, %(due)s, %(finished)s)
ON CONFLICT (instance_id, step_name, task_index) DO UPDATE SET status = excluded.status,
    output = excluded.output, next_attempt_at = excluded.next_attempt_at, finished_at = excluded.finished_at;

-- name: skip_branch
-- a branch's rows that have not ended (its running tasks' acknowledgements no longer land)
UPDATE pgflow.steps SET status = 'skipped', finished_at = now()
WHERE instance_id = %(id)s AND (step_name = %(path)s OR step_name LIKE %(under)s)
  AND status NOT IN ('completed', 'failed');

-- name: forget_iteration
DELETE FROM pgflow.steps WHERE instance_id = %(id)s AND step_name LIKE %(under)s;

-- name: wake
INSERT INTO pgflow.wakeups (instance_id, due_at) VALUES (%(id)s, %(at)s);

-- name: consume_signal
UPDATE pgflow.signals SET consumed_at = now(), consumed_by = %(path)s
WHERE id = %(signal)s AND consumed_at IS NULL;
