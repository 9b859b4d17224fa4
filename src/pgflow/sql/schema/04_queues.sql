-- Queues: the pgmq queues that carry task messages, and what an autoscaler reads about them.
--
-- A queue is created once by whichever comes first: a flow registered with a step on it, a worker serving
-- it, or `pgflow init --queue` (so workers and autoscalers find it before any flow names it).

-- Queue names become table names (pgmq.q_<name>): lower case, a letter first, at most 47 characters (pgmq's
-- limit). pgmq itself lower-cases names, so 'Upper' would create q_upper and then be looked up as q_Upper.
CREATE FUNCTION pgflow.check_queue_name(p_queue text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'pgflow: invalid queue name %: use 1 to 47 lower-case letters, digits or _, '
                        'starting with a letter', coalesce(quote_literal(left(p_queue, 60)), 'NULL')
              USING ERRCODE = '22023';
    END IF;
    RETURN p_queue;
END $$;
REVOKE ALL ON FUNCTION pgflow.check_queue_name(text) FROM PUBLIC;

-- Prepare a statement once per session (a no-op when the session has it): the engine's reads name their
-- queue's table, so they are dynamic SQL, and EXECUTE parses and plans its text on every call (0.3-0.5 ms a
-- read on PostgreSQL 15, more than the read itself). A prepared statement keeps its plan: it is planned in
-- its caller's settings (read_queue pins its index scans and asks for the generic plan, which a LIMIT
-- parameter would otherwise make the planner refuse, planning each call anew) and planned again when the
-- table's statistics change. PREPARE is not transactional, so the check is against the session's
-- statements themselves, by text as well as by name: a statement of that name prepared by anything else in
-- the session is replaced, never executed by the engine's role.
CREATE FUNCTION pgflow._prepare_once(p_name text, p_sql text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    wanted text := format('PREPARE %I AS %s', p_name, p_sql);
    found text;
BEGIN
    SELECT s.statement INTO found FROM pg_prepared_statements s WHERE s.name = p_name;
    IF found IS DISTINCT FROM wanted THEN
        IF found IS NOT NULL THEN
            EXECUTE format('DEALLOCATE %I', p_name);
        END IF;
        EXECUTE wanted;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow._prepare_once(text, text) FROM PUBLIC;

-- Fair claiming (08_read_and_claim.sql reads in this order). pgmq reads strictly by msg_id (FIFO): every
-- later step of every instance waits behind every task enqueued before it, so a 20,000-wide fan-out delays
-- a new 3-step chain by tens of seconds. pgflow instead reads each queue in start-time fair-queueing order:
-- priority (higher first), then a virtual-time tag given at enqueue (07_enqueue.sql: the queue's head tag
-- plus the task's rank within its instance's enqueue), then the instance (older first), then msg_id. These
-- live in the message's pgmq headers (never in the message body, which stays what the worker decodes).
-- The functions are total: a header that is absent or not a small number counts as 0, so a message from
-- older code or from someone else's send can never make its insert fail.
CREATE FUNCTION pgflow.task_priority(h jsonb) RETURNS integer LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN h->>'priority' ~ '^-?[0-9]{1,5}$' THEN (h->>'priority')::integer ELSE 0 END
$$;
REVOKE ALL ON FUNCTION pgflow.task_priority(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow.task_tag(h jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN h->>'tag' ~ '^[0-9]{1,18}$' THEN (h->>'tag')::bigint ELSE 0 END
$$;
REVOKE ALL ON FUNCTION pgflow.task_tag(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow.task_instance(m jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN m->>'instance' ~ '^[0-9]{1,18}$' THEN (m->>'instance')::bigint ELSE 0 END
$$;
REVOKE ALL ON FUNCTION pgflow.task_instance(jsonb) FROM PUBLIC;

-- The indexes of that order on a queue table: ready messages in fair order (parked ones excluded: a task
-- held back by a rate limit may wait minutes, and thousands of them must not be scanned past on every
-- read), and parked messages by the time they are due.
CREATE FUNCTION pgflow.ensure_queue_order(p_queue text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (pgflow.task_priority(headers) DESC, '
                   'pgflow.task_tag(headers), pgflow.task_instance(message), msg_id) '
                   'WHERE (headers->>''parked'') IS NULL',
                   'q_' || p_queue || '_fair', 'q_' || pgflow.check_queue_name(p_queue));
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (vt) WHERE (headers->>''parked'') IS NOT NULL',
                   'q_' || p_queue || '_parked', 'q_' || p_queue);
END $$;
REVOKE ALL ON FUNCTION pgflow.ensure_queue_order(text) FROM PUBLIC;

-- Idempotent and safe between replicas that start at once: the first INSERT of the name wins the unique
-- index, concurrent ones wait for it to commit and then insert nothing, so pgmq.create runs once. A definer
-- function: queues are shared, users need no write access to create one. A role may create at most its
-- max_queues (pgflow.role_quotas, 25_trust.sql); p_caller is the role asking (see pgflow._check_caller).
CREATE FUNCTION pgflow.ensure_queue(p_queue text, p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    quota integer;
BEGIN
    PERFORM pgflow.check_queue_name(p_queue);
    IF EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = p_queue) THEN
        RETURN;
    END IF;
    quota := (pgflow.quotas_of(caller)).max_queues;
    IF quota IS NOT NULL AND NOT pgflow.is_engine_role(caller)
       AND (SELECT count(*) FROM pgflow.queues WHERE created_by = caller) >= quota THEN
        RAISE EXCEPTION 'pgflow: role % has created % queues, its quota (pgflow.set_quota); queue % was not '
                        'created', caller, quota, p_queue USING ERRCODE = '53400';
    END IF;
    INSERT INTO pgflow.queues (queue_name, created_by) VALUES (p_queue, caller) ON CONFLICT DO NOTHING;
    IF FOUND THEN
        PERFORM pgmq.create(p_queue);
        PERFORM pgflow.ensure_queue_order(p_queue);
        EXECUTE format('REVOKE ALL ON pgmq.%I, pgmq.%I FROM pg_monitor, PUBLIC', 'q_' || p_queue, 'a_' || p_queue);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.ensure_queue(text, name) FROM PUBLIC;

-- What an autoscaler scales a queue's workers on: the messages ready to run plus those being run (read and
-- still hidden), so that scaling to zero never removes a worker holding an in-flight step. Messages delayed
-- for a retry's backoff count too: they will need a worker soon. A queue that does not exist has 0.
CREATE FUNCTION pgflow.queue_backlog(p_queue text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = p_queue) THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT count(*) FROM pgmq.%I', 'q_' || p_queue) INTO n;
    RETURN n;
END $$;
REVOKE ALL ON FUNCTION pgflow.queue_backlog(text) FROM PUBLIC;
