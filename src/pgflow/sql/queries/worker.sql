-- Named queries of pgflow.engine.worker (read, claim, acknowledge, fail, put aside). {channel} is filled in
-- as a quoted identifier.

-- name: listen
LISTEN {channel};

-- name: read_tasks
-- one round trip: read a batch and claim the tasks of its well-formed messages
SELECT * FROM pgflow.read_tasks(%(queue)s, %(vt)s, %(qty)s);

-- name: next_parked_in
-- seconds until the first parked message of the served queues comes due (NULL: none parked)
SELECT min(pgflow.next_parked_in(q)) FROM unnest(%(queues)s::text[]) AS q;

-- name: read_messages
-- (when the batch cannot be claimed as a whole: read alone, in the same fair order, then claim one by one)
SELECT msg_id, message FROM pgflow.read_queue(%(queue)s, %(vt)s, %(qty)s);

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

-- name: unclaimable
-- why messages that were not claimed cannot run: is there such an instance, such a step in the version?
SELECT u.msg_id, i.id IS NOT NULL, fs.step_name IS NOT NULL
FROM unnest(%(msg_ids)s::bigint[], %(instance_ids)s::bigint[], %(flows)s::text[], %(versions)s::text[],
            %(steps)s::text[]) AS u(msg_id, instance_id, flow, version, step)
LEFT JOIN pgflow.instances i ON i.id = u.instance_id
LEFT JOIN pgflow.flow_steps fs ON fs.flow_name = u.flow AND fs.version = u.version AND fs.step_name = u.step;

-- name: archive_messages
SELECT pgmq.archive(%(queue)s, %(msg_ids)s::bigint[]);

-- name: insert_dead_letter
INSERT INTO pgflow.dead_letters (queue, msg_id, message, reason)
VALUES (%(queue)s, %(msg_id)s, %(message)s, %(reason)s);

-- name: extend_visibility
SELECT msg_id FROM pgmq.set_vt(%(queue)s, %(msg_ids)s::bigint[], %(vt)s);
