-- Named queries of pgflow.engine.maintenance (retention, safety net, vacuum, sampled metrics). {archive},
-- {table} are filled in as quoted identifiers (a queue's pgmq tables; a table to vacuum).

-- name: try_maintenance_lock
-- a row of pgflow.engine_locks (25_trust.sql), which no user may lock; never waited for
SELECT count(*) > 0 FROM (SELECT 1 FROM pgflow.engine_locks WHERE name = 'maintenance'
                          FOR UPDATE SKIP LOCKED) AS l;

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

-- name: purge_http_audit
-- the HTTP audit trail is kept as long as finished instances (pgflow.http_audit, 24_secrets_and_egress.sql)
DELETE FROM pgflow.http_audit
WHERE id IN (SELECT id FROM pgflow.http_audit WHERE at < now() - make_interval(secs => %(seconds)s) LIMIT 10000);

-- name: purge_archive
DELETE FROM {archive} WHERE archived_at < now() - make_interval(secs => %(seconds)s);

-- name: churned_tables
-- tables whose rows live for milliseconds, once enough dead rows have gathered (statistics lag ~1 s)
SELECT schemaname, relname FROM pg_stat_user_tables
WHERE n_dead_tup >= %(min_dead)s
  AND ((schemaname = 'pgflow' AND relname = 'wakeups')
       OR (schemaname = 'pgmq' AND relname IN (SELECT 'q_' || queue_name FROM pgflow.queues)));

-- name: stale_statistics
-- the engine's busiest tables whose live rows differ by half from what the planner believes (pg_class
-- .reltuples, -1 before the first VACUUM or ANALYZE): they fill in bursts (20,000 starts in a second), and
-- with statistics that still say "nearly empty" the planner took scans of every open instance for lookups
-- by id (autovacuum's ANALYZE comes a minute later at best). Steady churn, whose size does not move, is
-- left alone: an ANALYZE reads up to 30,000 rows.
SELECT s.schemaname, s.relname FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE abs(s.n_live_tup - greatest(c.reltuples, 0)) >= greatest(%(min_changes)s, 0.5 * greatest(c.reltuples, 0))
  AND ((s.schemaname = 'pgflow' AND s.relname IN ('instances', 'steps', 'wakeups'))
       OR (s.schemaname = 'pgmq' AND s.relname IN (SELECT 'q_' || queue_name FROM pgflow.queues)));

-- name: analyze
ANALYZE (SKIP_LOCKED) {table};

-- name: vacuum
-- no truncation: it takes an exclusive lock (the engine's statements waited on it) to give back pages the
-- next second refills; index cleanup always, since the dead index entries are the point
VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP on) {table};

-- name: instance_counts
-- users' flows are not named unless the operator opts in (pgflow.metrics.flow_label)
SELECT CASE WHEN owner = current_user OR %(all_flows)s THEN flow_name ELSE %(other)s END, status, count(*)
FROM pgflow.instances GROUP BY 1, 2;

-- name: queue_totals
SELECT m.queue_name, m.total_messages
FROM pgmq.metrics_all() m JOIN pgflow.queues q ON q.queue_name = m.queue_name;

-- name: ready_messages
-- depth and age of *ready* messages (not in-flight or delayed ones)
SELECT count(*), coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8
FROM {table} WHERE vt <= now();

-- name: wakeup_backlog
SELECT count(*), coalesce(extract(epoch FROM now() - min(due_at)), 0)::float8
FROM pgflow.wakeups WHERE due_at <= now();

-- name: dead_letter_counts
SELECT queue, count(*) FROM pgflow.dead_letters GROUP BY queue;
