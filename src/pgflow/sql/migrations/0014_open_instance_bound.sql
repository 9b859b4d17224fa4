-- compatible-from: 1
-- Starts of a role with a backlog stay as cheap as its first: check_start counted the role's open instances
-- (up to its quota) on every start, so a granted role's starts/s fell fivefold by 10,000 open instances. It
-- now bounds them with two index probes (open_instances_bound, over the new partial index
-- instances_owner_open) and counts only when the bound passes the quota (schema/25_trust.sql); the bound is
-- internal (20_usage.sql).

CREATE INDEX instances_owner_open ON pgflow.instances (owner, id) WHERE status = ANY (pgflow.open_instance_statuses());

CREATE FUNCTION pgflow.open_instances_bound(p_role name) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT max(i.id) FROM pgflow.instances i)
                    - (SELECT min(o.id) FROM pgflow.instances o
                       WHERE o.owner OPERATOR(pg_catalog.=) p_role
                         AND o.status OPERATOR(pg_catalog.=) ANY (pgflow.open_instance_statuses())) + 1, 0)
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
            WHERE i.owner = p_caller AND i.status = ANY (pgflow.open_instance_statuses())
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
                 '_may_control', '_reopen_failed_steps', 'open_instances_bound']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;
