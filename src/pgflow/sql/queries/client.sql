-- Named queries of pgflow.client (starting, watching and controlling instances).

-- name: register_and_start
-- one round trip and one definer call: register the flow version (a read when it is known), then start the
-- instance. Every start sets pgflow.trace_context (read by the instances' column default; '' for none) for
-- its transaction.
WITH traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true),
                       set_config('pgflow.priority', %(priority)s, true))
SELECT pgflow.register_and_start(%(flow)s, %(version)s, %(ref)s, %(shape)s::jsonb, ARRAY[%(input)s::jsonb],
                                 %(label)s)
FROM traced;

-- name: register_and_start_many
WITH traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true),
                       set_config('pgflow.priority', %(priority)s, true))
SELECT pgflow.register_and_start(%(flow)s, %(version)s, %(ref)s, %(shape)s::jsonb,
                                 pgflow.jsonb_list(%(inputs)s::jsonb), %(label)s)
FROM traced;

-- name: start_instance
WITH traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true),
                      set_config('pgflow.priority', %(priority)s, true))
SELECT pgflow.start_instance(%(flow)s, %(version)s, %(input)s::jsonb, %(label)s) FROM traced;

-- name: tree_shape
SELECT pgflow.tree_shape(%(tree)s::jsonb, %(name)s);

-- name: register_flow
SELECT pgflow.register_flow(%(name)s, %(version)s, %(ref)s, %(shape)s::jsonb);

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

-- name: done_channel
-- the caller's own channel of finished instances (25_trust.sql)
SELECT pgflow.done_channel();

-- name: listen_done
LISTEN {channel};

-- name: unlisten_done
UNLISTEN {channel};

-- name: list_instances
SELECT id, flow_name, status, label, created_at, finished_at, error
FROM pgflow.instances
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(flow)s::text IS NULL OR flow_name = %(flow)s)
  AND (%(label)s::text IS NULL OR label = %(label)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: explain
SELECT pgflow.explain(%(id)s);

-- name: cancel_instance
SELECT pgflow.cancel_instance(%(id)s, %(reason)s);

-- name: signal
SELECT pgflow.signal(%(id)s, %(name)s, %(data)s::jsonb);

-- name: set_variable
SELECT pgflow.set_variable(%(name)s, %(value)s::jsonb);

-- name: grant_secret
SELECT pgflow.grant_secret(%(role)s, %(name)s, %(ref)s);

-- name: retry_instance
SELECT pgflow.retry_instance(%(id)s);

-- name: start_registered
WITH traced AS (SELECT set_config('pgflow.trace_context', coalesce(%(trace_context)s, ''), true))
SELECT pgflow.start_registered(%(flow)s, %(input)s::jsonb, %(label)s, %(version)s) FROM traced;

-- name: requeue_dead_letter
SELECT pgflow.requeue_dead_letter(%(id)s);

-- name: discard_dead_letter
SELECT pgflow.discard_dead_letter(%(id)s);
