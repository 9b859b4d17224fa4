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

-- name: owner_rights
-- what a step's owner may do now (engine/rights.py): checked when each step runs, not only at start. A role
-- using the pg_durable layer (USAGE on schema df) has HTTP only while it may EXECUTE df.http, as there.
SELECT r.rolname IS NOT NULL AS role_exists,
       coalesce(r.rolsuper, false) AS superuser,
       -- pg_durable.enable_superuser_instances: the same switch under pg_durable's name (README)
       coalesce(pg_catalog.current_setting('pgflow.allow_superuser', true), '') IN ('on', 'true', '1')
           OR coalesce(pg_catalog.current_setting('pg_durable.enable_superuser_instances', true), '')
               IN ('on', 'true', '1') AS superuser_allowed,
       CASE WHEN r.rolname IS NULL THEN false ELSE
           o.owner = (SELECT n.nspowner::regrole::name FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgflow')
           OR r.rolsuper
           OR EXISTS (SELECT 1 FROM pgflow.role_grants g WHERE g.role_name = o.owner)
           OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles a WHERE a.rolname = 'pgflow_admin')
               AND pg_catalog.pg_has_role(o.owner, 'pgflow_admin', 'member')) END AS granted,
       CASE WHEN r.rolname IS NOT NULL THEN pgflow.may_use('http', o.owner)
           AND CASE WHEN pg_catalog.to_regprocedure('df.http(text,text,text,jsonb,integer)') IS NULL THEN true
                    WHEN NOT pg_catalog.has_schema_privilege(o.owner, 'df', 'USAGE') THEN true
                    ELSE pg_catalog.has_function_privilege(o.owner, 'df.http(text,text,text,jsonb,integer)',
                                                           'EXECUTE') END
           ELSE false END AS http,
       CASE WHEN r.rolname IS NOT NULL THEN pgflow.may_use('python', o.owner) ELSE false END AS python,
       (SELECT pg_catalog.jsonb_object_agg(s.name, s.ref) FROM pgflow.secret_grants s WHERE s.role_name = o.owner)
           AS secrets
FROM (SELECT %(owner)s::name AS owner) AS o
LEFT JOIN pg_catalog.pg_roles r ON r.rolname = o.owner;

-- name: insert_http_audit
INSERT INTO pgflow.http_audit (owner, instance_id, step, attempt, method, host, address, status, error, duration_ms)
VALUES (%(owner)s, %(instance_id)s, %(step)s, %(attempt)s, %(method)s, %(host)s, %(address)s, %(status)s,
        %(error)s, %(duration_ms)s);
