-- What `pgflow console` (and anyone in psql or Python) needs beyond the front door: retrying a failed
-- instance, starting a registered flow version, requeueing or discarding dead letters, and the aggregate
-- numbers of the queues page. Users see rows through their row-level security (18_roles_and_rls.sql) and
-- write through definer functions only, which check what the caller may do themselves, and say how.

-- The console's instance list for a role that sees only its own instances (row-level security): the same
-- keyset scan, on the owner's rows only (without it, a user owning 1 in 1,000 of 1,000,000 instances waited
-- 0.4-1.9 s for a page: loadtests/scenarios/console.py).
CREATE INDEX instances_owner_id ON pgflow.instances (owner, id);

-- Retrying a failed instance: the transition 'failed' -> 'running', after which its failed steps run again
-- with fresh attempts and its completed steps are kept. A definer function acting for p_caller
-- (pgflow._check_caller): users have no UPDATE on instances or steps, and may retry only instances they own
-- (pgflow_admin members and the pgflow owner: any; another user's instance is "not found"). The instance
-- becomes 'pending' first; the steps are reopened by _reopen_failed_steps below, which only acts on an
-- instance in that state and makes it 'running' (so that the tasks it queues again can be claimed at once).
-- Returns 'retried', NULL for an unknown (or another user's) instance, or its status when it is not failed
-- (nothing changes).
CREATE FUNCTION pgflow.retry_instance(p_id bigint, p_caller name DEFAULT current_user) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    owner_name name;
    st text;
BEGIN
    -- ownership before any row lock: another user's instance is never locked
    SELECT i.owner, i.status INTO owner_name, st FROM pgflow.instances i WHERE i.id = p_id;
    IF NOT FOUND OR NOT pgflow._may_control(caller, owner_name) THEN
        RETURN NULL;
    END IF;
    UPDATE pgflow.instances SET status = 'pending', error = NULL, finished_at = NULL
    WHERE id = p_id AND status = 'failed';
    IF NOT FOUND THEN
        RETURN st;
    END IF;
    PERFORM pgflow._reopen_failed_steps(p_id);
    RETURN 'retried';
END $$;
REVOKE ALL ON FUNCTION pgflow.retry_instance(bigint, name) FROM PUBLIC;

-- The front door's form (like pgflow.cancel): an error for an unknown instance or one that is not failed.
CREATE FUNCTION pgflow.retry(p_id bigint) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    outcome text := pgflow.retry_instance(p_id);
BEGIN
    IF outcome IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF outcome <> 'retried' THEN
        RAISE EXCEPTION 'pgflow: instance % is %; only a failed instance can be retried', p_id, outcome
            USING ERRCODE = '55000';
    END IF;
    RETURN outcome;
END $$;
REVOKE ALL ON FUNCTION pgflow.retry(bigint) FROM PUBLIC;

-- The steps' half of a retry (called by retry_instance only; never granted to users, see
-- _internal_functions). It acts only on a 'pending' instance that has step rows: a pending instance has none
-- until a coordinator first looks at it (it marks it running in the same transaction), so such an instance
-- is one whose retry_instance has just run in this very transaction. The instance becomes 'running' again
-- (keeping its first start time): workers claim tasks of running instances only, and the map tasks queued
-- here may be read before a coordinator looks at the instance.
--   * messages still queued for the instance (tasks cancelled before a worker read them) are archived, so
--     that they cannot claim the reopened rows a second time;
--   * DAG: failed or cancelled steps lose their row (the coordinator queues them again, attempt 1); a map
--     keeps its completed tasks, its failed or cancelled tasks are queued again here (fresh attempt, their
--     element re-read from the list the map fans out over) and its parent row goes back to 'mapping';
--   * control flow: failed or cancelled leaves, timers and signal waits lose their row (the coordinator
--     queues or arms them again); composite nodes keep theirs (a loop its iteration, an if its branch) and
--     are 'running' again.
CREATE FUNCTION pgflow._reopen_failed_steps(p_id bigint) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    inst pgflow.instances;
    shape jsonb;
    q text;
    m record;
    items jsonb;
    msgs jsonb[];
    reopened integer := 0;
    n integer;
BEGIN
    SELECT * INTO inst FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND OR inst.status <> 'pending' THEN
        RETURN 0;
    END IF;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    IF NOT EXISTS (SELECT 1 FROM pgflow.steps WHERE instance_id = p_id) THEN
        RETURN 0;
    END IF;
    UPDATE pgflow.instances SET status = 'running' WHERE id = p_id;
    FOR q IN SELECT DISTINCT s.queue FROM pgflow.steps s
             WHERE s.instance_id = p_id AND s.queue IS NOT NULL
               AND EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = s.queue) LOOP
        EXECUTE format('SELECT pgmq.archive(%L, ARRAY(SELECT msg_id FROM pgmq.%I WHERE message->>''instance'' = %L))',
                       q, 'q_' || q, p_id::text);
    END LOOP;
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = inst.flow_name AND f.version = inst.flow_version;
    IF shape ? 'tree' THEN
        DELETE FROM pgflow.steps s USING pgflow.instance_nodes(p_id) nd
        WHERE s.instance_id = p_id AND s.task_index = -1 AND s.step_name = nd.path
          AND s.status IN ('failed', 'cancelled')
          AND nd.node_type IN ('sql', 'python', 'http', 'sleep', 'schedule', 'wait_signal');
        GET DIAGNOSTICS reopened = ROW_COUNT;
        UPDATE pgflow.steps SET status = 'running', finished_at = NULL, error = NULL
        WHERE instance_id = p_id AND status IN ('failed', 'cancelled');
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN reopened + n;
    END IF;
    FOR m IN SELECT fs.step_name, fs.over, coalesce((s->>'flatten')::boolean, false) AS flatten
             FROM pgflow.flow_steps fs
             JOIN jsonb_array_elements(shape->'steps') AS s ON s->>'name' = fs.step_name
             WHERE fs.flow_name = inst.flow_name AND fs.version = inst.flow_version AND fs.over IS NOT NULL
               AND EXISTS (SELECT 1 FROM pgflow.steps t WHERE t.instance_id = p_id AND t.step_name = fs.step_name
                           AND t.status IN ('failed', 'cancelled')) LOOP
        items := CASE WHEN m.over = 'input' THEN inst.input
                      ELSE (SELECT t.output FROM pgflow.steps t
                            WHERE t.instance_id = p_id AND t.step_name = m.over AND t.task_index = -1) END;
        IF m.flatten THEN
            items := (SELECT coalesce(jsonb_agg(e ORDER BY a.i, b.j), '[]'::jsonb)
                      FROM jsonb_array_elements(items) WITH ORDINALITY AS a(l, i),
                           jsonb_array_elements(a.l) WITH ORDINALITY AS b(e, j));
        END IF;
        -- the message of engine/messages.py task_message (tests check that both are the same)
        WITH again AS (
            UPDATE pgflow.steps t
            SET status = 'queued', attempt = 0, output = NULL, error = NULL, traceback = NULL, msg_id = NULL,
                enqueued_at = now(), started_at = NULL, finished_at = NULL, next_attempt_at = NULL
            WHERE t.instance_id = p_id AND t.step_name = m.step_name AND t.task_index >= 0
              AND t.status IN ('failed', 'cancelled')
            RETURNING t.queue, t.task_index
        )
        SELECT again.queue, array_agg(jsonb_build_object('flow', inst.flow_name, 'version', inst.flow_version,
                                                         'instance', p_id, 'step', m.step_name,
                                                         'task', again.task_index,
                                                         'item', items->again.task_index)
                                      ORDER BY again.task_index)
        INTO q, msgs
        FROM again GROUP BY again.queue;
        IF q IS NOT NULL THEN
            PERFORM pgmq.send_batch(q, msgs);
            PERFORM pg_notify('pgflow_queue_' || q, '');
            reopened := reopened + cardinality(msgs);
        END IF;
        UPDATE pgflow.steps SET status = 'mapping', finished_at = NULL, error = NULL
        WHERE instance_id = p_id AND step_name = m.step_name AND task_index = -1
          AND status IN ('failed', 'cancelled');
    END LOOP;
    DELETE FROM pgflow.steps
    WHERE instance_id = p_id AND task_index = -1 AND status IN ('failed', 'cancelled');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN reopened + n;
END $$;
REVOKE ALL ON FUNCTION pgflow._reopen_failed_steps(bigint) FROM PUBLIC;

-- Start a registered flow version (the newest one of the flow when p_version is NULL) with an input: what
-- the console's start form calls. A DAG flow's Python steps run on workers that can import its code.
CREATE FUNCTION pgflow.start_registered(p_flow text, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                                        p_version text DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    SELECT f.version INTO v FROM pgflow.flows f
    WHERE f.flow_name = p_flow AND (p_version IS NULL OR f.version = p_version)
    ORDER BY f.created_at DESC, f.version LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no registered flow % %', p_flow, coalesce('version ' || p_version, '')
            USING ERRCODE = 'P0002';
    END IF;
    RETURN pgflow.start_instance(p_flow, v, p_input, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_registered(text, jsonb, text, text) FROM PUBLIC;

-- Dead letters are the operators' business: messages that name no instance cannot be given to a user, and
-- their bodies may hold anyone's data. These two are executable by the pgflow owner and members of
-- pgflow_admin only (granted below; grant_usage does not grant them, see _internal_functions).
CREATE FUNCTION pgflow.requeue_dead_letter(p_id bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    d pgflow.dead_letters;
    new_id bigint;
BEGIN
    DELETE FROM pgflow.dead_letters WHERE id = p_id RETURNING * INTO d;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no dead letter with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF d.message IS NULL OR NOT EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = d.queue) THEN
        RAISE EXCEPTION 'pgflow: dead letter % cannot be requeued (no message body, or queue % is gone)',
            p_id, d.queue USING ERRCODE = '55000';
    END IF;
    SELECT s INTO new_id FROM pgmq.send(d.queue, d.message) AS s;
    PERFORM pg_notify('pgflow_queue_' || d.queue, '');
    RETURN new_id;
END $$;
REVOKE ALL ON FUNCTION pgflow.requeue_dead_letter(bigint) FROM PUBLIC;

CREATE FUNCTION pgflow.discard_dead_letter(p_id bigint) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    DELETE FROM pgflow.dead_letters WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no dead letter with id %', p_id USING ERRCODE = 'P0002';
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.discard_dead_letter(bigint) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        GRANT SELECT ON pgflow.dead_letters TO pgflow_admin;
        GRANT EXECUTE ON FUNCTION pgflow.requeue_dead_letter(bigint), pgflow.discard_dead_letter(bigint)
            TO pgflow_admin;
    END IF;
END $$;

-- The queues page: per queue, messages ready to run, held by a worker (or waiting out a retry's backoff),
-- delayed, the age of the oldest ready message and how many were ever sent (pgmq's message id sequence:
-- the console derives throughput from two samples). Counts only, never a message body: a definer function
-- since users have no access to pgmq's tables.
CREATE FUNCTION pgflow.queue_stats()
RETURNS TABLE (queue text, ready bigint, in_flight bigint, delayed bigint, oldest_ready_seconds double precision,
               total_sent bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT queue_name FROM pgflow.queues ORDER BY queue_name LOOP
        RETURN QUERY EXECUTE format($f$
            SELECT %L::text,
                   count(*) FILTER (WHERE m.vt <= now()),
                   count(*) FILTER (WHERE m.vt > now() AND m.read_ct > 0),
                   count(*) FILTER (WHERE m.vt > now() AND m.read_ct = 0),
                   coalesce(extract(epoch FROM now() - min(m.enqueued_at) FILTER (WHERE m.vt <= now())), 0)::float8,
                   (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM pgmq.%I s)
            FROM pgmq.%I m $f$, q, 'q_' || q || '_msg_id_seq', 'q_' || q);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.queue_stats() FROM PUBLIC;

-- Coordinators and workers connected to this database right now: `pgflow coordinator` and `pgflow worker`
-- name their sessions 'pgflow <kind> <host>:<pid>' (application_name), so "alive" is what the server itself
-- sees, one row per process group with its open connections.
CREATE FUNCTION pgflow.engine_processes()
RETURNS TABLE (kind text, name text, connections bigint, connected_since timestamptz, last_active timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT split_part(a.application_name, ' ', 2), split_part(a.application_name, ' ', 3), count(*),
           min(a.backend_start), max(a.state_change)
    FROM pg_stat_activity a
    WHERE a.datname = current_database()
      AND (a.application_name LIKE 'pgflow worker %' OR a.application_name LIKE 'pgflow coordinator %')
    GROUP BY 1, 2
    ORDER BY 1, 2
$$;
REVOKE ALL ON FUNCTION pgflow.engine_processes() FROM PUBLIC;

-- The id of the first instance created at or after p_time (NULL: none). Ids and creation times grow
-- together, so a binary search over the primary key finds it in about log2(n) index probes: the console's
-- time filter becomes an id range and keeps its keyset pagination on the indexes it has (no index on
-- created_at to maintain on every start). Concurrent starts may interleave by a few milliseconds. Runs as the
-- caller: it searches the instances the caller can see. A role that sees only its own instances passes
-- p_owner, and every probe is then one step of instances_owner_id (owner, id): searching the whole key instead
-- skips other users' rows one by one (250 ms for "until 5 days ago" at 1,000,000 instances, loadtests/run.py console).
CREATE FUNCTION pgflow.first_instance_after(p_time timestamptz, p_owner name DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    lo bigint;
    hi bigint;
    mid bigint;
    found_id bigint;
    found_at timestamptz;
BEGIN
    IF p_owner IS NULL THEN
        SELECT min(id), max(id) + 1 INTO lo, hi FROM pgflow.instances;
    ELSE
        SELECT min(id), max(id) + 1 INTO lo, hi FROM pgflow.instances WHERE owner = p_owner;
    END IF;
    IF lo IS NULL THEN
        RETURN NULL;
    END IF;
    WHILE lo < hi LOOP
        mid := lo + (hi - lo) / 2;
        IF p_owner IS NULL THEN
            SELECT i.id, i.created_at INTO found_id, found_at FROM pgflow.instances i WHERE i.id >= mid
            ORDER BY i.id LIMIT 1;
        ELSE
            SELECT i.id, i.created_at INTO found_id, found_at FROM pgflow.instances i
            WHERE i.owner = p_owner AND i.id >= mid ORDER BY i.owner, i.id LIMIT 1;
        END IF;
        IF NOT FOUND OR found_at >= p_time THEN
            hi := mid;
        ELSE
            lo := found_id + 1;
        END IF;
    END LOOP;
    RETURN CASE WHEN EXISTS (SELECT 1 FROM pgflow.instances WHERE id >= lo) THEN lo END;
END $$;
REVOKE ALL ON FUNCTION pgflow.first_instance_after(timestamptz, name) FROM PUBLIC;
