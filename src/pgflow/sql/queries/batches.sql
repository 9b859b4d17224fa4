-- Named queries of pgflow.engine.batches (a task's cost, parking a task told to wait, splitting a batch).

-- name: charge_limit
SELECT pgflow.charge_limit(%(name)s, %(key)s, %(cost)s);

-- name: park_task
SELECT pgflow.park_task(%(queue)s, %(msg_id)s, %(instance_id)s, %(step)s, %(task)s, %(attempt)s, %(seconds)s);

-- name: split_task
SELECT pgflow.split_task(%(queue)s, %(msg_id)s, %(instance_id)s, %(step)s, %(task)s, %(attempt)s, %(tasks)s,
                         pgflow.jsonb_list(%(messages)s::jsonb));
