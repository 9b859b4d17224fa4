-- Named queries of pgflow.queues (the pgmq queues pgflow created).

-- name: ensure_queue
SELECT pgflow.ensure_queue(%(queue)s);

-- name: list_queues
SELECT queue_name FROM pgflow.queues ORDER BY queue_name;
