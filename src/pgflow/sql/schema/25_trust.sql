-- Trust between users (SECURITY.md): who registered which flow versions (and so may read them), per-role
-- quotas and input limits with clear errors, and the locks the coordinators take among themselves, kept
-- where no user can take them.

-- Who registered each flow version: a flow (its SQL text, inline headers, code reference) is visible to the
-- roles that registered it and to administrators, never to other users. Registering the same shape again
-- only adds a row here (pgflow.register_flow).
CREATE TABLE pgflow.flow_registrations (
    flow_name   text        NOT NULL,
    version     text        NOT NULL,
    role_name   name        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow_name, version, role_name),
    FOREIGN KEY (flow_name, version) REFERENCES pgflow.flows ON DELETE CASCADE
);
ALTER TABLE pgflow.flow_registrations ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_registrations ON pgflow.flow_registrations
    USING (role_name = current_user OR (SELECT pgflow.is_admin()));

ALTER TABLE pgflow.flows ENABLE ROW LEVEL SECURITY;
CREATE POLICY registered_flows ON pgflow.flows
    USING ((SELECT pgflow.is_admin())
           OR EXISTS (SELECT 1 FROM pgflow.flow_registrations r
                      WHERE r.flow_name = flows.flow_name AND r.version = flows.version
                        AND r.role_name = current_user));

ALTER TABLE pgflow.flow_steps ENABLE ROW LEVEL SECURITY;
CREATE POLICY registered_flow_steps ON pgflow.flow_steps
    USING (EXISTS (SELECT 1 FROM pgflow.flows f WHERE f.flow_name = flow_steps.flow_name
                                                    AND f.version = flow_steps.version));

-- Quotas and limits per role; the row with role_name '' holds the defaults for every role without a row of
-- its own. NULL: no limit. The pgflow owner (coordinators, workers, operators' scripts) is not limited by
-- the quotas (max_*), only by the input limits. Administrators change them with pgflow.set_quota.
CREATE TABLE pgflow.role_quotas (
    role_name              name    PRIMARY KEY,  -- '' = the defaults
    max_open_instances     bigint  CHECK (max_open_instances >= 0),   -- pending or running, per role
    max_map_width          bigint  CHECK (max_map_width >= 0),        -- tasks of one map step
    max_queues             integer CHECK (max_queues >= 0),           -- queues a role may create
    max_pending_signals    bigint  CHECK (max_pending_signals >= 0),  -- unconsumed signals, per role
    max_input_bytes        integer CHECK (max_input_bytes > 0),       -- an instance's input, stored size
    max_input_depth        integer CHECK (max_input_depth > 0 AND max_input_depth <= 200),  -- nesting levels
    updated_at             timestamptz NOT NULL DEFAULT now(),
    max_queued_tasks       bigint  CHECK (max_queued_tasks >= 0)      -- tasks on queues at once, per role
);
INSERT INTO pgflow.role_quotas (role_name, max_open_instances, max_map_width, max_queues, max_pending_signals,
                                max_input_bytes, max_input_depth, max_queued_tasks)
VALUES ('', 100000, 100000, 20, 10000, 16 * 1024 * 1024, 100, 1000000);

-- The quotas that apply to a role: its own row, else the defaults. Read by definer functions, coordinators
-- and administrators (who may read the table), so it needs no definer rights of its own; every name in it is
-- schema-qualified, so it needs no pinned search_path either (as a definer function with a pinned path it
-- cost each start 23 us).
CREATE FUNCTION pgflow.quotas_of(p_role name) RETURNS pgflow.role_quotas
LANGUAGE sql STABLE AS $$
    SELECT q.* FROM pgflow.role_quotas q
    WHERE q.role_name OPERATOR(pg_catalog.=) ANY (ARRAY[p_role, ''::name])
    ORDER BY q.role_name OPERATOR(pg_catalog.=) '' LIMIT 1
$$;
REVOKE ALL ON FUNCTION pgflow.quotas_of(name) FROM PUBLIC;

-- Set a role's quotas ('' for the defaults); NULL arguments keep the current value of an existing row.
-- max_queued_tasks (queue depth) is checked by the coordinator when a map fans out: the only way one instance
-- puts many tasks on the queues (other steps are bounded by max_open_instances times the steps of a shape).
-- For the pgflow owner and pgflow_admin members (granted below; never by grant_usage: see
-- _internal_functions); a definer function, so administrators need no write access to the table.
CREATE FUNCTION pgflow.set_quota(p_role name, p_max_open_instances bigint DEFAULT NULL,
                                 p_max_map_width bigint DEFAULT NULL, p_max_queues integer DEFAULT NULL,
                                 p_max_pending_signals bigint DEFAULT NULL, p_max_input_bytes integer DEFAULT NULL,
                                 p_max_input_depth integer DEFAULT NULL, p_max_queued_tasks bigint DEFAULT NULL)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    INSERT INTO pgflow.role_quotas AS q (role_name, max_open_instances, max_map_width, max_queues,
                                         max_pending_signals, max_input_bytes, max_input_depth, max_queued_tasks)
    SELECT p_role, coalesce(p_max_open_instances, d.max_open_instances), coalesce(p_max_map_width, d.max_map_width),
           coalesce(p_max_queues, d.max_queues), coalesce(p_max_pending_signals, d.max_pending_signals),
           coalesce(p_max_input_bytes, d.max_input_bytes), coalesce(p_max_input_depth, d.max_input_depth),
           coalesce(p_max_queued_tasks, d.max_queued_tasks)
    FROM pgflow.quotas_of(p_role) d
    ON CONFLICT (role_name) DO UPDATE
    SET max_open_instances = coalesce(p_max_open_instances, q.max_open_instances),
        max_map_width = coalesce(p_max_map_width, q.max_map_width),
        max_queues = coalesce(p_max_queues, q.max_queues),
        max_pending_signals = coalesce(p_max_pending_signals, q.max_pending_signals),
        max_input_bytes = coalesce(p_max_input_bytes, q.max_input_bytes),
        max_input_depth = coalesce(p_max_input_depth, q.max_input_depth),
        max_queued_tasks = coalesce(p_max_queued_tasks, q.max_queued_tasks),
        updated_at = now()
$$;
REVOKE ALL ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer, bigint) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        GRANT SELECT ON pgflow.role_quotas TO pgflow_admin;
        GRANT EXECUTE ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer, bigint),
                                  pgflow.quotas_of(name) TO pgflow_admin;
    END IF;
END $$;

-- At most how many open instances a role has, in two index probes: every open instance of the role lies
-- between its oldest open one and the newest instance of anyone. Counting them instead cost each start of a
-- role with 10,000 open instances 10,000 index entries (its starts/s fell fivefold while its backlog grew:
-- loadtests/scenarios/backlog_starts.py); check_start counts only when this bound is over the quota, so only
-- a role near its quota pays for the exact count. The index is on an expression only these queries use
-- (open_instance_id: the id of an open instance, else NULL): a partial index "WHERE status is open" was
-- also taken, with a queue's statistics lagging, for every query on open instances, such as the
-- coordinator's lock of 500 instances by id, which then read every open instance (28 ms a batch).
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

-- The checks of a start, before anything is written: every input within the role's size and depth limits
-- (a 300-deep document or a 17 MiB one is refused here, with the reason, instead of reaching a coordinator),
-- and the role's open instances within its quota. For a caller a definer function has checked (it counts
-- the role's instances without row-level security in the way): internal, as pgflow._start_as.
CREATE FUNCTION pgflow._check_start_as(p_caller name, p_inputs jsonb[]) RETURNS void
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
CREATE FUNCTION pgflow.check_start(p_inputs jsonb[], p_caller name DEFAULT current_user) RETURNS void
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pgflow._check_start_as(pgflow._check_caller(p_caller), p_inputs)
$$;
REVOKE ALL ON FUNCTION pgflow.check_start(jsonb[], name) FROM PUBLIC;

-- A signal is refused once the role has max_pending_signals signals not yet consumed (each one is a row and
-- a wake-up of the coordinator's).
CREATE FUNCTION pgflow.check_signal_quota(p_caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    quota bigint := (pgflow.quotas_of(pgflow._check_caller(p_caller))).max_pending_signals;
BEGIN
    IF quota IS NOT NULL AND NOT pgflow.is_engine_role(p_caller)
       AND (SELECT count(*) FROM (SELECT 1 FROM pgflow.signals s JOIN pgflow.instances i ON i.id = s.instance_id
                                  WHERE i.owner = p_caller AND s.consumed_at IS NULL LIMIT quota) AS p) >= quota THEN
        RAISE EXCEPTION 'pgflow: role % has % signals not yet received, its quota (pgflow.set_quota)',
            p_caller, quota USING ERRCODE = '53400';
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.check_signal_quota(name) FROM PUBLIC;

-- The locks coordinators take among themselves (maintenance: one at a time), as rows of a table no user
-- may lock (users have no privilege on it), taken with NOWAIT or SKIP LOCKED: an advisory lock key is open
-- to anyone (pg_advisory_lock(hashtext('pgflow.maintenance')) by a user stopped retention and the
-- stalled-instance safety net).
CREATE TABLE pgflow.engine_locks (
    name  text PRIMARY KEY
);
INSERT INTO pgflow.engine_locks (name) VALUES ('maintenance');

-- Notifications that an instance finished go to a channel of its owner's, named by a random token only that
-- role (and administrators) can read: LISTEN takes no privilege, so a shared channel (or one named after
-- the role) showed every user's instance ids to anyone listening.
CREATE TABLE pgflow.role_channels (
    role_name  name PRIMARY KEY,
    channel    text NOT NULL UNIQUE DEFAULT 'pgflow_done_' || replace(gen_random_uuid()::text, '-', '')
);
ALTER TABLE pgflow.role_channels ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_channel ON pgflow.role_channels USING (role_name = current_user);
INSERT INTO pgflow.role_channels (role_name) VALUES (current_user);

-- The channel of a role's finished instances: made by grant_usage (and for the role that installed pgflow),
-- never here: a row inserted in a user's open transaction would make the coordinator wait on it. A role
-- without one (the owner, superusers) uses the shared channel. Internal (never granted) and called only by
-- definer functions (done_channel, notify_done), as the owner: so no definer or search_path of its own
-- (every name in it is qualified), so a call saves and restores no setting. A set-returning function, so
-- that in a FROM clause the planner inlines it (a scalar one with a subquery is called row by row: 17 us
-- an instance when notify_done tells the owners of hundreds at once).
CREATE FUNCTION pgflow._channel_of(p_role name) RETURNS TABLE (channel text)
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT c.channel FROM pgflow.role_channels c
                     WHERE c.role_name OPERATOR(pg_catalog.=) p_role), 'pgflow_instance_done')
$$;
REVOKE ALL ON FUNCTION pgflow._channel_of(name) FROM PUBLIC;

-- The caller's channel, for LISTEN (the Python client waits on it).
CREATE FUNCTION pgflow.done_channel(p_caller name DEFAULT current_user) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT ch.channel FROM pgflow._channel_of(pgflow._check_caller(p_caller)) AS ch
$$;
REVOKE ALL ON FUNCTION pgflow.done_channel(name) FROM PUBLIC;

-- Tell the owners' waiters that instances finished (each id on its owner's channel, _channel_of). Anyone may
-- call it: a waiter re-reads the instance's status, so a false alarm costs one read. One call per batch: the
-- coordinator finishes instances by the hundred, and a definer call per instance cost more than the rest of
-- finishing it. count() makes the statement run every row (a SQL function's last statement otherwise stops
-- at its first).
CREATE FUNCTION pgflow.notify_done(p_owners name[], p_ids bigint[]) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT count(pg_catalog.pg_notify(ch.channel, u.id::text))
    FROM unnest(p_owners, p_ids) AS u(owner, id) CROSS JOIN LATERAL pgflow._channel_of(u.owner) AS ch
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name[], bigint[]) FROM PUBLIC;

-- ... and for one instance (a cancel).
CREATE FUNCTION pgflow.notify_done(p_owner name, p_id bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pgflow.notify_done(ARRAY[p_owner], ARRAY[p_id])
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name, bigint) FROM PUBLIC;

-- pg_monitor members read no user data: pgmq grants them SELECT on every table of its schema, and queue
-- messages carry instances' inputs (kept in the archives for the retention). New queues' tables are closed
-- by ensure_queue (04_queues.sql) too, in case pgmq was installed by another role.
DO $$
BEGIN
    REVOKE SELECT ON ALL TABLES IN SCHEMA pgmq FROM pg_monitor;
    ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq REVOKE SELECT ON TABLES FROM pg_monitor;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pgflow: cannot revoke pg_monitor''s access to pgmq''s tables (not their owner)';
END $$;
