-- compatible-from: 1
-- A start's cost: one definer call registers and starts (pgflow.register_and_start, what the Python client
-- now sends), the caller is checked once, and the internal functions behind start_instances, register_flow
-- and check_start (_start_as, _register_as, _check_start_as) trust the caller their definer function
-- checked. quotas_of is no longer a definer function. The old entry points keep their signatures, so older
-- clients work unchanged. The engine's dynamic reads (read_queue, queue_head) are prepared once per session
-- instead of parsed and planned on every call (pgflow._prepare_once), and notify_done finds its channels
-- through a set-returning _channel_of the planner inlines.

-- The quotas that apply to a role: its own row, else the defaults. Read by definer functions, coordinators
-- and administrators (who may read the table), so it needs no definer rights of its own; every name in it is
-- schema-qualified, so it needs no pinned search_path either (as a definer function with a pinned path it
-- cost each start 23 us).
CREATE OR REPLACE FUNCTION pgflow.quotas_of(p_role name) RETURNS pgflow.role_quotas
LANGUAGE sql STABLE AS $$
    SELECT q.* FROM pgflow.role_quotas q
    WHERE q.role_name OPERATOR(pg_catalog.=) ANY (ARRAY[p_role, ''::name])
    ORDER BY q.role_name OPERATOR(pg_catalog.=) '' LIMIT 1
$$;
REVOKE ALL ON FUNCTION pgflow.quotas_of(name) FROM PUBLIC;

-- The checks of a start, before anything is written: every input within the role's size and depth limits
-- (a 300-deep document or a 17 MiB one is refused here, with the reason, instead of reaching a coordinator),
-- and the role's open instances within its quota. For a caller a definer function has checked (it counts
-- the role's instances without row-level security in the way): internal, as pgflow._start_as.
CREATE OR REPLACE FUNCTION pgflow._check_start_as(p_caller name, p_inputs jsonb[]) RETURNS void
LANGUAGE plpgsql STABLE AS $$
DECLARE
    q pgflow.role_quotas := pgflow.quotas_of(p_caller);
    open_count bigint;
    bad record;
BEGIN
    -- one pass over the inputs for both limits: the first input over either
    SELECT x.ord, pg_column_size(x.input) AS bytes, pg_column_size(x.input) > q.max_input_bytes AS too_big
    INTO bad
    FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
    WHERE pg_column_size(x.input) > q.max_input_bytes
       OR (jsonb_typeof(x.input) IN ('array', 'object')
           AND jsonb_path_exists(x.input, format('strict $.**{%s} ? (@.type() == "array" || @.type() == "object")',
                                                 q.max_input_depth)::jsonpath))
    ORDER BY x.ord LIMIT 1;
    IF FOUND AND bad.too_big THEN
        RAISE EXCEPTION 'pgflow: input % is % bytes, over the % bytes allowed (pgflow.set_quota)',
            bad.ord, bad.bytes, q.max_input_bytes USING ERRCODE = '54000';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'pgflow: input % nests arrays or objects deeper than % levels (pgflow.set_quota)',
            bad.ord, q.max_input_depth USING ERRCODE = '54001';
    END IF;
    IF q.max_open_instances IS NOT NULL AND NOT pgflow.is_engine_role(p_caller)
       AND pgflow.open_instances_bound(p_caller) + cardinality(p_inputs) > q.max_open_instances THEN
        SELECT count(*) INTO open_count FROM (
            SELECT 1 FROM pgflow.instances i
            WHERE i.owner = p_caller AND pgflow.open_instance_id(i.status, i.id) IS NOT NULL
            LIMIT q.max_open_instances + 1) AS o;
        IF open_count + cardinality(p_inputs) > q.max_open_instances THEN
            RAISE EXCEPTION 'pgflow: role % has % open instances; starting % more would pass its quota of % '
                            '(pgflow.set_quota)', p_caller, open_count, cardinality(p_inputs),
                            q.max_open_instances USING ERRCODE = '53400';
        END IF;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow._check_start_as(name, jsonb[]) FROM PUBLIC;

-- The same checks for any caller (p_caller as in pgflow._check_caller): what a start would refuse.
CREATE OR REPLACE FUNCTION pgflow.check_start(p_inputs jsonb[], p_caller name DEFAULT current_user) RETURNS void
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pgflow._check_start_as(pgflow._check_caller(p_caller), p_inputs)
$$;
REVOKE ALL ON FUNCTION pgflow.check_start(jsonb[], name) FROM PUBLIC;

-- Register a flow version for a caller a definer function has checked (register_flow, register_and_start):
-- internal, never granted; no SET search_path, as pgflow._start_as.
CREATE OR REPLACE FUNCTION pgflow._register_as(p_caller name, p_name text, p_version text, p_ref text, p_shape jsonb)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    q text;
    stored record;
    exists boolean;
BEGIN
    SELECT f.shape, f.ref INTO stored FROM pgflow.flows f WHERE f.flow_name = p_name AND f.version = p_version;
    exists := FOUND;
    IF exists AND stored.shape = p_shape AND stored.ref IS NOT DISTINCT FROM p_ref THEN
        IF NOT EXISTS (SELECT 1 FROM pgflow.flow_registrations r  -- every start comes here: read, not write
                       WHERE r.flow_name = p_name AND r.version = p_version AND r.role_name = p_caller) THEN
            INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, p_caller)
            ON CONFLICT DO NOTHING;
        END IF;
        RETURN;
    END IF;
    PERFORM pgflow.check_shape(p_name, p_shape);
    IF p_version IS DISTINCT FROM pgflow.shape_version(p_shape) THEN
        RAISE EXCEPTION 'pgflow: flow % version % does not match its shape (whose version is %)',
            p_name, coalesce(quote_literal(left(p_version, 40)), 'NULL'), pgflow.shape_version(p_shape)
            USING ERRCODE = '22023';
    END IF;
    IF p_ref IS NOT NULL AND p_ref !~ '^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$' THEN
        RAISE EXCEPTION 'pgflow: flow % has an invalid code reference % (module:attribute)', p_name,
            quote_literal(left(p_ref, 60)) USING ERRCODE = '22023';
    END IF;
    IF exists THEN  -- same version, so the same shape: only the code reference differs
        RAISE EXCEPTION 'pgflow: flow % version % is already registered with code reference %, not %', p_name,
            p_version, coalesce(stored.ref, 'NULL'), coalesce(p_ref, 'NULL') USING ERRCODE = '23505';
    END IF;
    INSERT INTO pgflow.flows (flow_name, version, ref, shape)
    VALUES (p_name, p_version, p_ref, p_shape)
    ON CONFLICT DO NOTHING;
    INSERT INTO pgflow.flow_steps (flow_name, version, step_name, deps, over)
    SELECT p_name, p_version, s->>'name',
           ARRAY(SELECT jsonb_array_elements_text(s->'deps')), s->>'over'
    FROM jsonb_array_elements(p_shape->'steps') AS s
    ON CONFLICT DO NOTHING;
    INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, p_caller)
    ON CONFLICT DO NOTHING;
    FOR q IN SELECT DISTINCT s->>'queue' FROM jsonb_array_elements(p_shape->'steps') AS s LOOP
        PERFORM pgflow.ensure_queue(q, p_caller);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow._register_as(name, text, text, text, jsonb) FROM PUBLIC;

-- p_caller: the role registering (its default is evaluated as the caller, before the function switches to
-- its owner); it may only name a role the session could SET ROLE to (pgflow._check_caller).
CREATE OR REPLACE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb,
                                     p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    PERFORM pgflow._register_as(pgflow._check_caller(p_caller), p_name, p_version, p_ref, p_shape);
END $$;
REVOKE ALL ON FUNCTION pgflow.register_flow(text, text, text, jsonb, name) FROM PUBLIC;

-- The start itself, for a caller a definer function has checked (pgflow._check_caller): users have no
-- INSERT on instances, wake-ups or signals, so every instance passes these checks. The caller sees only the
-- flow versions it registered (pgflow.register_flow), unless it is the pgflow owner or a pgflow_admin
-- member. Internal (never granted): it trusts p_caller. No SET search_path: only definer functions call it,
-- and they pin it; each statement here is one more a start pays for (a start used to run about 30, which
-- doubled the server's CPU per start: loadtests/README.md, "Where the chain stands").
CREATE OR REPLACE FUNCTION pgflow._start_as(p_caller name, p_flow text, p_version text, p_inputs jsonb[], p_label text)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb;
    kinds record;
    vars jsonb;
    secrets jsonb;
    ids bigint[];
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = p_caller)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser %: its SQL steps would run as '
                        'superuser. Start it as an ordinary role (see pgflow.grant_usage), or allow it with '
                        'SET pgflow.allow_superuser = on', p_caller USING ERRCODE = '42501';
    END IF;
    PERFORM pgflow._check_start_as(p_caller, p_inputs);
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = p_flow AND f.version = p_version
      AND (EXISTS (SELECT 1 FROM pgflow.flow_registrations r
                   WHERE r.flow_name = p_flow AND r.version = p_version AND r.role_name = p_caller)
           OR pgflow.is_engine_role(p_caller)
           OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
               AND pg_has_role(p_caller, 'pgflow_admin', 'member')));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: flow % version % is not registered (by role %): register it first',
            p_flow, p_version, p_caller USING ERRCODE = 'P0002';
    END IF;
    IF pgflow._rights_at_start() THEN
        SELECT bool_or(s->>'kind' = 'http') AS http,
               shape ? 'tree' AND bool_or(s->>'kind' = 'python') AS python  -- a workflow names its functions
        INTO kinds FROM jsonb_array_elements(shape->'steps') s;
        IF kinds.http AND NOT pgflow.may_use('http', p_caller) THEN
            RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => '
                            'true))', p_caller USING ERRCODE = '42501';
        END IF;
        IF kinds.python AND NOT pgflow.may_use('python', p_caller) THEN
            RAISE EXCEPTION 'pgflow: role % may not use Python steps in workflows (pgflow.grant_usage(role, '
                            'include_python => true))', p_caller USING ERRCODE = '42501';
        END IF;
    END IF;
    SELECT jsonb_object_agg(v.name, v.value) FILTER (WHERE v.secret_ref IS NULL),
           jsonb_object_agg(v.name, v.secret_ref) FILTER (WHERE v.secret_ref IS NOT NULL)
    INTO vars, secrets
    FROM pgflow.variables v WHERE v.owner = p_caller;
    WITH created AS (
        INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables, secret_refs, owner)
        SELECT p_flow, p_version, x.input, p_label, vars, secrets, p_caller
        FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
        ORDER BY x.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) INTO ids FROM created;  -- identities follow insertion order
    INSERT INTO pgflow.wakeups (instance_id) SELECT unnest(ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN QUERY SELECT unnest(ids);
END $$;
REVOKE ALL ON FUNCTION pgflow._start_as(name, text, text, jsonb[], text) FROM PUBLIC;

-- Start instances of a registered flow version as p_caller (its default is the caller's current_user,
-- evaluated before the function switches to its owner; pgflow._check_caller).
CREATE OR REPLACE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text,
                                       p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    RETURN QUERY SELECT pgflow._start_as(pgflow._check_caller(p_caller), p_flow, p_version, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_instances(text, text, jsonb[], text, name) FROM PUBLIC;

-- What the Python client's start and start_many send: register the flow version (a read when it is known)
-- and start, in one definer call that checks the caller once.
CREATE OR REPLACE FUNCTION pgflow.register_and_start(p_flow text, p_version text, p_ref text, p_shape jsonb,
                                          p_inputs jsonb[], p_label text, p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    PERFORM pgflow._register_as(caller, p_flow, p_version, p_ref, p_shape);
    RETURN QUERY SELECT pgflow._start_as(caller, p_flow, p_version, p_inputs, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.register_and_start(text, text, text, jsonb, jsonb[], text, name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of',
                 '_may_control', '_reopen_failed_steps', 'open_instances_bound', 'open_instance_id',
                 '_start_as', '_register_as', '_check_start_as', '_prepare_once']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

-- Prepare a statement once per session (a no-op when the session has it): the engine's reads name their
-- queue's table, so they are dynamic SQL, and EXECUTE parses and plans its text on every call (0.3-0.5 ms a
-- read on PostgreSQL 15, more than the read itself). A prepared statement keeps its plan: it is planned in
-- its caller's settings (read_queue pins its index scans and asks for the generic plan, which a LIMIT
-- parameter would otherwise make the planner refuse, planning each call anew) and planned again when the
-- table's statistics change. PREPARE is not transactional, so the check is against the session's
-- statements themselves, by text as well as by name: a statement of that name prepared by anything else in
-- the session is replaced, never executed by the engine's role.
CREATE OR REPLACE FUNCTION pgflow._prepare_once(p_name text, p_sql text) RETURNS void
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

-- The virtual time at the head of a queue: the tag of the first ready message in fair order (0 when none
-- is ready). One probe of the fair index (04_queues.sql), pinned and prepared as read_queue's is
-- (08_read_and_claim.sql).
CREATE OR REPLACE FUNCTION pgflow.queue_head(p_queue text) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    stmt text := 'pgflow_head_' || p_queue;
    head bigint;
BEGIN
    PERFORM pgflow._prepare_once(stmt, format(
        'SELECT pgflow.task_tag(headers) FROM pgmq.%I '
        'WHERE vt <= clock_timestamp() AND (headers->>''parked'') IS NULL '
        'ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), '
        'pgflow.task_instance(message), msg_id LIMIT 1', 'q_' || p_queue));
    EXECUTE format('EXECUTE %I', stmt) INTO head;
    RETURN coalesce(head, 0);
END $$;
REVOKE ALL ON FUNCTION pgflow.queue_head(text) FROM PUBLIC;

-- pgflow reads its queues with its own function instead of pgmq.read (pgmq still sends, archives, deletes
-- and sets visibility timeouts): pgmq.read takes messages by msg_id, strict FIFO, and pgmq's grouped
-- round-robin read (read_grouped_rr) holds a whole group back while its head message is in flight and scans
-- the queue on each read, which does not suit a 20,000-wide fan-out. This is pgmq.read's statement (hide
-- the messages for p_vt seconds, read_ct + 1, SKIP LOCKED between readers) in fair order (04_queues.sql):
-- first parked messages that are due (tasks a limit held back, 22_limits.sql; oldest due first), then
-- ready messages by priority, virtual-time tag, instance and msg_id, each through its own index.
-- The plan is pinned to those index scans (and the UPDATE to msg_id probes): a queue table's statistics
-- lag behind its churn (it fills from empty in a second), and with them the planner read 20 messages by
-- sorting every ready one and joined them back by a sequential scan (5-18 ms a read at 20,000 queued, in
-- the chain benchmark on PostgreSQL 15; the index scans take a fraction of a millisecond at any depth).
-- The statement is prepared once per session (pgflow._prepare_once), so a read is not parsed and planned
-- again each time; its generic plan knows nothing of p_qty, so the UPDATE takes the picked messages as an
-- array of ids (primary-key probes) rather than as a join, which such a plan made hash the whole queue
-- (2 ms a read instead of 0.6).
CREATE OR REPLACE FUNCTION pgflow.read_queue(p_queue text, p_vt integer, p_qty integer)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    stmt text := 'pgflow_read_' || p_queue;
BEGIN
    PERFORM pgflow._prepare_once(stmt, format($q$
        WITH due AS MATERIALIZED (
            SELECT msg_id FROM pgmq.%1$I
            WHERE vt <= clock_timestamp() AND (headers->>'parked') IS NOT NULL
            ORDER BY vt LIMIT $1 FOR UPDATE SKIP LOCKED
        ), fair AS MATERIALIZED (
            SELECT msg_id FROM pgmq.%1$I
            WHERE vt <= clock_timestamp() AND (headers->>'parked') IS NULL
            ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), pgflow.task_instance(message),
                     msg_id
            LIMIT greatest($1 - (SELECT count(*) FROM due), 0) FOR UPDATE SKIP LOCKED
        )
        UPDATE pgmq.%1$I m
        SET last_read_at = clock_timestamp(), vt = clock_timestamp() + make_interval(secs => $2),
            read_ct = read_ct + 1
        WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM due UNION ALL SELECT msg_id FROM fair))
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message, m.headers
        $q$, 'q_' || p_queue));
    RETURN QUERY EXECUTE format('EXECUTE %I(%L, %L)', stmt, p_qty, p_vt);
END $$;
REVOKE ALL ON FUNCTION pgflow.read_queue(text, integer, integer) FROM PUBLIC;

-- The channel of a role's finished instances: made by grant_usage (and for the role that installed pgflow),
-- never here: a row inserted in a user's open transaction would make the coordinator wait on it. A role
-- without one (the owner, superusers) uses the shared channel. Internal (never granted) and called only by
-- definer functions (done_channel, notify_done), as the owner: so no definer or search_path of its own
-- (every name in it is qualified), so a call saves and restores no setting. A set-returning function, so
-- that in a FROM clause the planner inlines it (a scalar one with a subquery is called row by row: 17 us
-- an instance when notify_done tells the owners of hundreds at once).
DROP FUNCTION pgflow._channel_of(name);
CREATE FUNCTION pgflow._channel_of(p_role name) RETURNS TABLE (channel text)
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.channel FROM pgflow.role_channels c
                     WHERE c.role_name OPERATOR(pg_catalog.=) p_role), 'pgflow_instance_done')
$$;
REVOKE ALL ON FUNCTION pgflow._channel_of(name) FROM PUBLIC;

-- The caller's channel, for LISTEN (the Python client waits on it).
CREATE OR REPLACE FUNCTION pgflow.done_channel(p_caller name DEFAULT current_user) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT ch.channel FROM pgflow._channel_of(pgflow._check_caller(p_caller)) AS ch
$$;
REVOKE ALL ON FUNCTION pgflow.done_channel(name) FROM PUBLIC;

-- Tell the owners' waiters that instances finished (each id on its owner's channel, _channel_of). Anyone may
-- call it: a waiter re-reads the instance's status, so a false alarm costs one read. One call per batch: the
-- coordinator finishes instances by the hundred, and a definer call per instance cost more than the rest of
-- finishing it. count() makes the statement run every row (a SQL function's last statement otherwise stops
-- at its first).
CREATE OR REPLACE FUNCTION pgflow.notify_done(p_owners name[], p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT count(pg_catalog.pg_notify(ch.channel, u.id::text))
    FROM unnest(p_owners, p_ids) AS u(owner, id) CROSS JOIN LATERAL pgflow._channel_of(u.owner) AS ch
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name[], bigint[]) FROM PUBLIC;

-- Roles granted usage before this version may call the new front door too (grant_usage grants it from now on).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role_name FROM pgflow.role_grants g JOIN pg_roles p ON p.rolname = g.role_name LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow.register_and_start(text, text, text, jsonb, jsonb[], text, '
                       'name) TO %I', r.role_name);
    END LOOP;
END $$;
