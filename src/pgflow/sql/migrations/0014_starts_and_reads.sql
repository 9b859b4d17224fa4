-- compatible-from: 1
-- Starts of a role with a backlog stay as cheap as its first: check_start counted the role's open instances
-- (up to its quota) on every start, so a granted role's starts/s fell fivefold by 10,000 open instances. It
-- now bounds them with two index probes (open_instances_bound, over the new index instances_owner_open on an
-- expression only it uses) and counts only when the bound passes the quota (schema/25_trust.sql); both
-- functions are internal (20_usage.sql).
-- Reads keep their index plans: read_queue, queue_head and next_parked_in pin their statements to the fair and
-- parked indexes and msg_id probes (a queue table's statistics lag behind its churn; with them a read sorted
-- every ready message: 08_read_and_claim.sql).

CREATE FUNCTION pgflow.open_instance_id(p_status text, p_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_status = ANY (pgflow.open_instance_statuses()) THEN p_id END
$$;
REVOKE ALL ON FUNCTION pgflow.open_instance_id(text, bigint) FROM PUBLIC;

CREATE INDEX instances_owner_open ON pgflow.instances (owner, pgflow.open_instance_id(status, id));

CREATE FUNCTION pgflow.open_instances_bound(p_role name) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT max(i.id) FROM pgflow.instances i)
                    - (SELECT min(pgflow.open_instance_id(o.status, o.id)) FROM pgflow.instances o
                       WHERE o.owner OPERATOR(pg_catalog.=) p_role) + 1, 0)
$$;
REVOKE ALL ON FUNCTION pgflow.open_instances_bound(name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.check_start(p_inputs jsonb[], p_caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q pgflow.role_quotas := pgflow.quotas_of(pgflow._check_caller(p_caller));
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
REVOKE ALL ON FUNCTION pgflow.check_start(jsonb[], name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of',
                 '_may_control', '_reopen_failed_steps', 'open_instances_bound', 'open_instance_id']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.read_queue(p_queue text, p_vt integer, p_qty integer)
RETURNS SETOF pgmq.message_record
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $$
BEGIN
    RETURN QUERY EXECUTE format($q$
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
        FROM (SELECT msg_id FROM due UNION ALL SELECT msg_id FROM fair) AS picked
        WHERE m.msg_id = picked.msg_id
        RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.last_read_at, m.vt, m.message, m.headers
        $q$, 'q_' || p_queue) USING p_qty, p_vt;
END $$;
REVOKE ALL ON FUNCTION pgflow.read_queue(text, integer, integer) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.queue_head(p_queue text) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $$
DECLARE
    head bigint;
BEGIN
    EXECUTE format('SELECT pgflow.task_tag(headers) FROM pgmq.%I '
                   'WHERE vt <= clock_timestamp() AND (headers->>''parked'') IS NULL '
                   'ORDER BY pgflow.task_priority(headers) DESC, pgflow.task_tag(headers), '
                   'pgflow.task_instance(message), msg_id LIMIT 1', 'q_' || p_queue) INTO head;
    RETURN coalesce(head, 0);
END $$;
REVOKE ALL ON FUNCTION pgflow.queue_head(text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.next_parked_in(p_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $$
DECLARE
    due timestamptz;
BEGIN
    EXECUTE format('SELECT min(vt) FROM pgmq.%I WHERE (headers->>''parked'') IS NOT NULL', 'q_' || p_queue) INTO due;
    -- greatest() skips NULLs: without the CASE, no parked message would read as "due now" and an idle
    -- worker would poll without pause
    RETURN CASE WHEN due IS NOT NULL THEN greatest(0, extract(epoch FROM due - clock_timestamp())) END;
END $$;
REVOKE ALL ON FUNCTION pgflow.next_parked_in(text) FROM PUBLIC;
