-- compatible-from: 1
-- Issue 12 (database side) and issue 13's bug 5: trust between users. See SECURITY.md.
--
-- Trusted definitions: register_flow computes a version from the shape (canonical_json, shape_version) and
-- refuses a version that does not match, validates shapes in full (check_shape) and records who registered
-- what (flow_registrations; flows and flow_steps under row-level security). Definer hygiene: is_admin and
-- may_use with a pinned search_path ending in pg_temp and schema-qualified catalog references; may_use
-- answers only for the caller; _check_caller. Quotas and input limits (role_quotas, check_start,
-- check_signal_quota, set_quota); queues count per role (queues.created_by, ensure_queue). Per-owner
-- notification channels (role_channels, done_channel, notify_done). A lock table for maintenance
-- (engine_locks). Additive for older code: register_flow and ensure_queue gain a defaulted p_caller argument
-- (old callers pass four and one arguments), flow versions are computed as the Python client always did.

-- schema/02_tables.sql
ALTER TABLE pgflow.queues ADD COLUMN created_by  name;

-- schema/18_roles_and_rls.sql
CREATE OR REPLACE FUNCTION pgflow.is_admin() RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'pgflow_admin')
           AND pg_catalog.pg_has_role(current_user, 'pgflow_admin', 'member')
$$;
REVOKE ALL ON FUNCTION pgflow.is_admin() FROM PUBLIC;

CREATE FUNCTION pgflow._check_caller(p_caller name) RETURNS name
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_caller IS NULL
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) p_caller)
       OR NOT (p_caller OPERATOR(pg_catalog.=) session_user
               OR pg_catalog.pg_has_role(session_user, p_caller, 'member')) THEN
        RAISE EXCEPTION 'pgflow: role % may not act as role %', session_user, coalesce(p_caller, 'NULL')
            USING ERRCODE = '42501';
    END IF;
    RETURN p_caller;
END $$;
REVOKE ALL ON FUNCTION pgflow._check_caller(name) FROM PUBLIC;

ALTER POLICY own_instances ON pgflow.instances
    USING (owner = current_user OR (SELECT pgflow.is_admin()))
    WITH CHECK (owner = current_user OR (SELECT pgflow.is_admin()));

CREATE OR REPLACE FUNCTION pgflow.may_use(p_what text, p_role name DEFAULT current_user) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    pgflow_owner name := (SELECT n.nspowner::regrole::name FROM pg_catalog.pg_namespace n
                          WHERE n.nspname = 'pgflow');
BEGIN
    IF NOT (pg_catalog.pg_has_role(session_user, pgflow_owner, 'member')
            OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_admin')
                AND pg_catalog.pg_has_role(session_user, 'pgflow_admin', 'member'))) THEN
        PERFORM pgflow._check_caller(p_role);
    END IF;
    RETURN p_role = pgflow_owner
        OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = p_role), false)
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_admin')
            AND pg_catalog.pg_has_role(p_role, 'pgflow_admin', 'member'))
        OR coalesce((SELECT bool_or(CASE p_what WHEN 'http' THEN g.http WHEN 'python' THEN g.python END)
                     FROM pgflow.role_grants g
                     WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = g.role_name)
                       AND pg_catalog.pg_has_role(p_role, g.role_name, 'member')), false);
END $$;
REVOKE ALL ON FUNCTION pgflow.may_use(text, name) FROM PUBLIC;

-- schema/25_trust.sql
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
    updated_at             timestamptz NOT NULL DEFAULT now()
);
INSERT INTO pgflow.role_quotas (role_name, max_open_instances, max_map_width, max_queues, max_pending_signals,
                                max_input_bytes, max_input_depth)
VALUES ('', 100000, 100000, 20, 10000, 16 * 1024 * 1024, 100);

-- The quotas that apply to a role: its own row, else the defaults.
CREATE FUNCTION pgflow.quotas_of(p_role name) RETURNS pgflow.role_quotas
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT q.* FROM pgflow.role_quotas q WHERE q.role_name IN (p_role, '')
    ORDER BY q.role_name = '' LIMIT 1
$$;
REVOKE ALL ON FUNCTION pgflow.quotas_of(name) FROM PUBLIC;

-- Whether a role is the pgflow owner (or a member of it): the engine's own role, which quotas do not limit.
CREATE FUNCTION pgflow.is_engine_role(p_role name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.pg_has_role(p_role, n.nspowner, 'member')
    FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'pgflow'
$$;
REVOKE ALL ON FUNCTION pgflow.is_engine_role(name) FROM PUBLIC;

-- Set a role's quotas ('' for the defaults); NULL arguments keep the current value of an existing row.
-- For the pgflow owner and pgflow_admin members (granted below; never by grant_usage: see
-- _internal_functions); a definer function, so administrators need no write access to the table.
CREATE FUNCTION pgflow.set_quota(p_role name, p_max_open_instances bigint DEFAULT NULL,
                                 p_max_map_width bigint DEFAULT NULL, p_max_queues integer DEFAULT NULL,
                                 p_max_pending_signals bigint DEFAULT NULL, p_max_input_bytes integer DEFAULT NULL,
                                 p_max_input_depth integer DEFAULT NULL)
RETURNS void LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    INSERT INTO pgflow.role_quotas AS q (role_name, max_open_instances, max_map_width, max_queues,
                                         max_pending_signals, max_input_bytes, max_input_depth)
    SELECT p_role, coalesce(p_max_open_instances, d.max_open_instances), coalesce(p_max_map_width, d.max_map_width),
           coalesce(p_max_queues, d.max_queues), coalesce(p_max_pending_signals, d.max_pending_signals),
           coalesce(p_max_input_bytes, d.max_input_bytes), coalesce(p_max_input_depth, d.max_input_depth)
    FROM pgflow.quotas_of(p_role) d
    ON CONFLICT (role_name) DO UPDATE
    SET max_open_instances = coalesce(p_max_open_instances, q.max_open_instances),
        max_map_width = coalesce(p_max_map_width, q.max_map_width),
        max_queues = coalesce(p_max_queues, q.max_queues),
        max_pending_signals = coalesce(p_max_pending_signals, q.max_pending_signals),
        max_input_bytes = coalesce(p_max_input_bytes, q.max_input_bytes),
        max_input_depth = coalesce(p_max_input_depth, q.max_input_depth),
        updated_at = now()
$$;
REVOKE ALL ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        GRANT SELECT ON pgflow.role_quotas TO pgflow_admin;
        GRANT EXECUTE ON FUNCTION pgflow.set_quota(name, bigint, bigint, integer, bigint, integer, integer),
                                  pgflow.quotas_of(name) TO pgflow_admin;
    END IF;
END $$;

-- The checks of a start, before anything is written: every input within the role's size and depth limits
-- (a 300-deep document or a 17 MiB one is refused here, with the reason, instead of reaching a coordinator),
-- and the role's open instances within its quota. A definer function: it counts the role's instances
-- without its row-level security in the way and reads the quotas.
CREATE FUNCTION pgflow.check_start(p_inputs jsonb[], p_caller name DEFAULT current_user) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q pgflow.role_quotas := pgflow.quotas_of(pgflow._check_caller(p_caller));
    open_count bigint;
    bad record;
BEGIN
    SELECT x.ord, pg_column_size(x.input) AS bytes INTO bad
    FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
    WHERE pg_column_size(x.input) > q.max_input_bytes LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgflow: input % is % bytes, over the % bytes allowed (pgflow.set_quota)',
            bad.ord, bad.bytes, q.max_input_bytes USING ERRCODE = '54000';
    END IF;
    SELECT x.ord INTO bad FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
    WHERE jsonb_typeof(x.input) IN ('array', 'object')
      AND jsonb_path_exists(x.input, format('strict $.**{%s} ? (@.type() == "array" || @.type() == "object")',
                                            q.max_input_depth)::jsonpath) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgflow: input % nests arrays or objects deeper than % levels (pgflow.set_quota)',
            bad.ord, q.max_input_depth USING ERRCODE = '54001';
    END IF;
    IF q.max_open_instances IS NOT NULL AND NOT pgflow.is_engine_role(p_caller) THEN
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
-- without one (the owner, superusers) uses the shared channel. A definer function: users see only their
-- own channel (pgflow.done_channel).
CREATE FUNCTION pgflow._channel_of(p_role name) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT coalesce((SELECT c.channel FROM pgflow.role_channels c WHERE c.role_name = p_role),
                    'pgflow_instance_done')
$$;
REVOKE ALL ON FUNCTION pgflow._channel_of(name) FROM PUBLIC;

-- The caller's channel, for LISTEN (the Python client waits on it).
CREATE FUNCTION pgflow.done_channel(p_caller name DEFAULT current_user) RETURNS text
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pgflow._channel_of(pgflow._check_caller(p_caller))
$$;
REVOKE ALL ON FUNCTION pgflow.done_channel(name) FROM PUBLIC;

-- Tell the owner's waiters that an instance finished (its id on the owner's channel). Anyone may call it:
-- a waiter re-reads the instance's status, so a false alarm costs one read.
CREATE FUNCTION pgflow.notify_done(p_owner name, p_id bigint) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    SELECT pg_catalog.pg_notify(pgflow._channel_of(p_owner), p_id::text)
$$;
REVOKE ALL ON FUNCTION pgflow.notify_done(name, bigint) FROM PUBLIC;

-- who registered the flow versions already stored: the owners of their instances
INSERT INTO pgflow.flow_registrations (flow_name, version, role_name)
SELECT DISTINCT flow_name, flow_version, owner FROM pgflow.instances ON CONFLICT DO NOTHING;

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

-- schema/04_queues.sql
DROP FUNCTION pgflow.ensure_queue(text);
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

-- schema/05_register_flow.sql
CREATE FUNCTION pgflow.canonical_json(p jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN CASE jsonb_typeof(p)
        WHEN 'object' THEN '{' || coalesce((SELECT string_agg(to_jsonb(e.key)::text || ':'
                                                              || pgflow.canonical_json(e.value), ','
                                                              ORDER BY e.key COLLATE "C")
                                            FROM jsonb_each(p) AS e), '') || '}'
        WHEN 'array' THEN '[' || coalesce((SELECT string_agg(pgflow.canonical_json(a.value), ',' ORDER BY a.n)
                                           FROM jsonb_array_elements(p) WITH ORDINALITY AS a(value, n)), '') || ']'
        ELSE p::text END;
END $$;
REVOKE ALL ON FUNCTION pgflow.canonical_json(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow.shape_version(p_shape jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT left(encode(sha256(convert_to(pgflow.canonical_json(p_shape), 'UTF8')), 'hex'), 16)
$$;
REVOKE ALL ON FUNCTION pgflow.shape_version(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow._bad_shape(p_name text, p_what text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pgflow: invalid shape for flow %: %', left(coalesce(p_name, 'NULL'), 60), p_what
        USING ERRCODE = '22023';
END $$;
REVOKE ALL ON FUNCTION pgflow._bad_shape(text, text) FROM PUBLIC;

CREATE FUNCTION pgflow._is_number(v jsonb, lo numeric, hi numeric, p_int boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT jsonb_typeof(v) = 'number' AND v::text::numeric BETWEEN lo AND hi
           AND (NOT p_int OR v::text::numeric = trunc(v::text::numeric))
$$;
REVOKE ALL ON FUNCTION pgflow._is_number(jsonb, numeric, numeric, boolean) FROM PUBLIC;

CREATE FUNCTION pgflow.check_shape(p_name text, p_shape jsonb) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    s jsonb;
    names text[] := ARRAY[]::text[];
    left_over text[];
    n integer;
BEGIN
    IF p_name IS NULL OR p_name !~ '^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$' THEN
        PERFORM pgflow._bad_shape(p_name, 'a flow name is 1 to 100 letters, digits or _ . : -');
    END IF;
    IF jsonb_typeof(p_shape) IS DISTINCT FROM 'object' OR p_shape->>'name' IS DISTINCT FROM p_name
       OR jsonb_typeof(p_shape->'steps') IS DISTINCT FROM 'array'
       OR (jsonb_array_length(p_shape->'steps') = 0 AND NOT p_shape ? 'tree') THEN
        PERFORM pgflow._bad_shape(p_name, 'a shape is an object with the flow''s "name" and a "steps" list '
                                          '(not empty)');
    END IF;
    IF p_shape ? 'tree' THEN
        IF p_shape IS DISTINCT FROM pgflow.tree_shape(p_shape->'tree', p_name) THEN
            PERFORM pgflow._bad_shape(p_name, 'its steps are not those of its tree (use pgflow.tree_shape)');
        END IF;
        RETURN;
    END IF;
    IF (SELECT count(*) FROM jsonb_object_keys(p_shape) k WHERE k NOT IN ('name', 'steps')) > 0 THEN
        PERFORM pgflow._bad_shape(p_name, 'unknown keys besides "name" and "steps"');
    END IF;
    FOR s IN SELECT value FROM jsonb_array_elements(p_shape->'steps') LOOP
        IF jsonb_typeof(s) IS DISTINCT FROM 'object' OR jsonb_typeof(s->'name') IS DISTINCT FROM 'string'
           OR s->>'name' !~ '^[^\x01-\x1f]{1,200}$' OR s->>'name' = ANY (names) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: a step needs a unique name of 1 to 200 characters',
                                                     left(coalesce(s->>'name', s::text), 60)));
        END IF;
        names := names || (s->>'name');
    END LOOP;
    FOR s IN SELECT value FROM jsonb_array_elements(p_shape->'steps') LOOP
        IF s->>'kind' IS DISTINCT FROM 'python' AND s->>'kind' IS DISTINCT FROM 'sql' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "kind" must be "python" or "sql"', s->>'name'));
        ELSIF jsonb_typeof(s->'deps') IS DISTINCT FROM 'array'
              OR EXISTS (SELECT 1 FROM jsonb_array_elements(s->'deps') d
                         WHERE jsonb_typeof(d) <> 'string' OR NOT d #>> '{}' = ANY (names) OR d #>> '{}' = s->>'name') THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "deps" must list other steps of the flow', s->>'name'));
        ELSIF NOT (jsonb_typeof(coalesce(s->'over', 'null')) = 'null'
                   OR (jsonb_typeof(s->'over') = 'string' AND (s->>'over' = 'input' OR s->>'over' = ANY (names)))) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "over" must be null, "input" or a step of the flow',
                                                     s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'flatten', 'false')) <> 'boolean'
              OR jsonb_typeof(coalesce(s->'split_on_failure', 'false')) <> 'boolean' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "flatten" and "split_on_failure" are booleans',
                                                     s->>'name'));
        ELSIF jsonb_typeof(s->'queue') IS DISTINCT FROM 'string' OR s->>'queue' !~ '^[a-z][a-z0-9_]{0,46}$' THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "queue" must be a lower-case queue name', s->>'name'));
        ELSIF NOT pgflow._is_number(s->'max_attempts', 1, 1000, true) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "max_attempts" must be an integer from 1 to 1000',
                                                     s->>'name'));
        ELSIF NOT pgflow._is_number(s->'backoff_base', 0, 1e9, false)
              OR NOT pgflow._is_number(s->'backoff_cap', 0, 1e9, false)
              OR NOT (jsonb_typeof(coalesce(s->'timeout', 'null')) = 'null'
                      OR pgflow._is_number(s->'timeout', 0, 1e9, false)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "backoff_base", "backoff_cap" and "timeout" are '
                                                     'seconds (numbers from 0 to 1e9)', s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'sql', 'null')) NOT IN ('null', 'string')
              OR (s->>'kind' = 'sql') <> (jsonb_typeof(s->'sql') = 'string') THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "sql" is the text of a SQL step (only)', s->>'name'));
        ELSIF NOT (jsonb_typeof(coalesce(s->'batch_size', 'null')) = 'null'
                   OR pgflow._is_number(s->'batch_size', 1, 1000000, true))
              OR NOT (jsonb_typeof(coalesce(s->'priority', 'null')) = 'null'
                      OR pgflow._is_number(s->'priority', -1000, 1000, true)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "batch_size" and "priority" are small integers',
                                                     s->>'name'));
        ELSIF jsonb_typeof(coalesce(s->'limit', 'null')) NOT IN ('null', 'object')
              OR (s ? 'limit' AND jsonb_typeof(s->'limit'->'name') IS DISTINCT FROM 'string')
              OR jsonb_typeof(coalesce(s->'limit_key', 'null')) NOT IN ('null', 'string')
              OR NOT (jsonb_typeof(coalesce(s->'cost', 'null')) = 'null' OR s->'cost' = '"function"'
                      OR pgflow._is_number(s->'cost', 0, 1e12, false)) THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: "limit" is an object with a "name", "limit_key" a '
                                                     'string, "cost" a number or "function"', s->>'name'));
        ELSIF (SELECT count(*) FROM jsonb_object_keys(s) k
               WHERE k NOT IN ('name', 'kind', 'deps', 'over', 'flatten', 'queue', 'max_attempts', 'backoff_base',
                               'backoff_cap', 'timeout', 'sql', 'batch_size', 'split_on_failure', 'priority',
                               'limit', 'limit_key', 'cost')) > 0 THEN
            PERFORM pgflow._bad_shape(p_name, format('step %s: unknown keys', s->>'name'));
        END IF;
    END LOOP;
    -- no cycle: peel off steps whose deps are all peeled until none is left (or none can be)
    left_over := names;
    LOOP
        n := cardinality(left_over);
        left_over := ARRAY(SELECT st->>'name' FROM jsonb_array_elements(p_shape->'steps') AS st
                           WHERE st->>'name' = ANY (left_over)
                             AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(st->'deps') AS d
                                         WHERE d = ANY (left_over)));
        EXIT WHEN cardinality(left_over) = 0;
        IF cardinality(left_over) = n THEN
            PERFORM pgflow._bad_shape(p_name, format('steps %s depend on each other in a cycle',
                                                     array_to_string(left_over, ', ')));
        END IF;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.check_shape(text, jsonb) FROM PUBLIC;

DROP FUNCTION pgflow.register_flow(text, text, text, jsonb);
CREATE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb,
                                     p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    q text;
    stored record;
    exists boolean;
    caller name := pgflow._check_caller(p_caller);
BEGIN
    SELECT f.shape, f.ref INTO stored FROM pgflow.flows f WHERE f.flow_name = p_name AND f.version = p_version;
    exists := FOUND;
    IF exists AND stored.shape = p_shape AND stored.ref IS NOT DISTINCT FROM p_ref THEN
        INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, caller)
        ON CONFLICT DO NOTHING;
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
    INSERT INTO pgflow.flow_registrations (flow_name, version, role_name) VALUES (p_name, p_version, caller)
    ON CONFLICT DO NOTHING;
    FOR q IN SELECT DISTINCT s->>'queue' FROM jsonb_array_elements(p_shape->'steps') AS s LOOP
        PERFORM pgflow.ensure_queue(q, caller);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.register_flow(text, text, text, jsonb, name) FROM PUBLIC;

-- schema/06_start.sql
DROP FUNCTION pgflow.start_instances(text, text, jsonb[], text);
CREATE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text,
                                       p_caller name DEFAULT current_user)
RETURNS SETOF bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    shape jsonb;
    vars jsonb;
    secrets jsonb;
    ids bigint[];
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = caller)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser %: its SQL steps would run as '
                        'superuser. Start it as an ordinary role (see pgflow.grant_usage), or allow it with '
                        'SET pgflow.allow_superuser = on', caller USING ERRCODE = '42501';
    END IF;
    PERFORM pgflow.check_start(p_inputs, caller);
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = p_flow AND f.version = p_version
      AND (EXISTS (SELECT 1 FROM pgflow.flow_registrations r
                   WHERE r.flow_name = p_flow AND r.version = p_version AND r.role_name = caller)
           OR pgflow.is_engine_role(caller)
           OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
               AND pg_has_role(caller, 'pgflow_admin', 'member')));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: flow % version % is not registered (by role %): register it first',
            p_flow, p_version, caller USING ERRCODE = 'P0002';
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'http')
       AND NOT pgflow.may_use('http', caller) THEN
        RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => true))',
            caller USING ERRCODE = '42501';
    END IF;
    IF shape ? 'tree'  -- a control-flow workflow names its Python functions itself
       AND EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'python')
       AND NOT pgflow.may_use('python', caller) THEN
        RAISE EXCEPTION 'pgflow: role % may not use Python steps in workflows (pgflow.grant_usage(role, '
                        'include_python => true))', caller USING ERRCODE = '42501';
    END IF;
    SELECT jsonb_object_agg(v.name, v.value) FILTER (WHERE v.secret_ref IS NULL),
           jsonb_object_agg(v.name, v.secret_ref) FILTER (WHERE v.secret_ref IS NOT NULL)
    INTO vars, secrets
    FROM pgflow.variables v WHERE v.owner = caller;
    WITH created AS (
        INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables, secret_refs, owner)
        SELECT p_flow, p_version, x.input, p_label, vars, secrets, caller
        FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
        ORDER BY x.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) INTO ids FROM created;  -- identities follow insertion order
    INSERT INTO pgflow.wakeups (instance_id) SELECT unnest(ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN QUERY SELECT unnest(ids);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_instances(text, text, jsonb[], text, name) FROM PUBLIC;

-- schema/11_cancel.sql
CREATE OR REPLACE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
    WHERE instance_id = p_id AND status = ANY (pgflow.open_step_statuses());
    PERFORM pgflow.notify_done(owner, p_id) FROM pgflow.instances WHERE id = p_id;
    RETURN 'cancelled';
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel_instance(bigint, text) FROM PUBLIC;

-- schema/15_front_door.sql
CREATE OR REPLACE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb := pgflow.tree_shape(p_node, p_name);
    version text := pgflow.shape_version(shape);
    new_id bigint;
BEGIN
    IF p_detached THEN
        IF to_regproc('public.dblink') IS NULL AND to_regproc('dblink') IS NULL THEN
            RAISE EXCEPTION 'pgflow: a detached start needs the dblink extension (CREATE EXTENSION dblink)'
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE 'SELECT id FROM dblink($1, $2) AS t(id bigint)' INTO new_id
            USING format('dbname=%s user=%s', current_database(), current_user),
                  format('SELECT pgflow.start(%L::jsonb, %L::jsonb, %L, false, %L)', p_node, p_input, p_label,
                         p_name);
        RETURN new_id;
    END IF;
    PERFORM pgflow.register_flow(p_name, version, NULL, shape);
    RETURN pgflow.start_instance(p_name, version, p_input, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start(jsonb, jsonb, text, boolean, text) FROM PUBLIC;

DROP FUNCTION pgflow.signal(bigint, text, jsonb);
CREATE FUNCTION pgflow.signal(p_id bigint, p_name text, p_data jsonb DEFAULT NULL,
                              p_caller name DEFAULT current_user) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    st text;
    new_id bigint;
BEGIN
    SELECT i.status INTO st FROM pgflow.instances i
    WHERE i.id = p_id
      AND (i.owner = caller OR pgflow.is_engine_role(caller)
           OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
               AND pg_has_role(caller, 'pgflow_admin', 'member')));
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RAISE EXCEPTION 'pgflow: instance % is % and takes no signals', p_id, st USING ERRCODE = '55000';
    END IF;
    IF coalesce(p_name, '') = '' THEN
        RAISE EXCEPTION 'pgflow: a signal needs a name' USING ERRCODE = '22023';
    END IF;
    PERFORM pgflow.check_signal_quota(caller);
    INSERT INTO pgflow.signals (instance_id, name, data) VALUES (p_id, p_name, p_data) RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;
REVOKE ALL ON FUNCTION pgflow.signal(bigint, text, jsonb, name) FROM PUBLIC;

-- schema/20_usage.sql
CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret', 'set_quota', 'quotas_of', '_channel_of']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.grant_usage(p_role name, p_include_http boolean DEFAULT false,
                                   p_include_python boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fn record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgflow: no role %', p_role USING ERRCODE = '42704';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA pgflow TO %I', p_role);
    EXECUTE format('GRANT SELECT ON pgflow.instances, pgflow.steps, pgflow.signals, pgflow.variables, '
                   'pgflow.flows, pgflow.flow_steps, pgflow.flow_registrations, pgflow.role_channels, pgflow.queues, '
                   'pgflow.migrations, pgflow.http_audit TO %I', p_role);
    -- no INSERT on instances, signals or wake-ups: starts and signals go through definer functions that check
    -- rights, limits and quotas (start_instances, signal)
    EXECUTE format('GRANT UPDATE (status, error, finished_at) ON pgflow.instances TO %I', p_role);
    EXECUTE format('GRANT UPDATE (status, finished_at) ON pgflow.steps TO %I', p_role);
    EXECUTE format('GRANT INSERT (name, value, secret_ref), UPDATE (value, secret_ref, updated_at), DELETE '
                   'ON pgflow.variables TO %I', p_role);
    FOR fn IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'pgflow'::regnamespace AND NOT p.proname = ANY (pgflow._internal_functions())
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn.sig, p_role);
    END LOOP;
    -- ALTER FUNCTION ... OWNER needs the new owner to have CREATE on the schema: only for this moment
    EXECUTE format('GRANT CREATE ON SCHEMA pgflow_exec TO %I', p_role);
    EXECUTE pgflow._executor_sql(p_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA pgflow_exec FROM %I', p_role);
    INSERT INTO pgflow.role_grants (role_name, http, python) VALUES (p_role, p_include_http, p_include_python)
    ON CONFLICT (role_name) DO UPDATE SET http = excluded.http, python = excluded.python, granted_at = now();
    INSERT INTO pgflow.role_channels (role_name) VALUES (p_role) ON CONFLICT DO NOTHING;
END $$;
REVOKE ALL ON FUNCTION pgflow.grant_usage(name, boolean, boolean) FROM PUBLIC;

-- roles granted usage before: no more direct INSERT on instances, signals and wake-ups; the new functions and
-- tables (their rights kept)
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT rg.* FROM pgflow.role_grants rg
             WHERE EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = rg.role_name) LOOP
        EXECUTE format('REVOKE INSERT ON pgflow.instances, pgflow.signals, pgflow.wakeups FROM %I', g.role_name);
        PERFORM pgflow.grant_usage(g.role_name, g.http, g.python);
    END LOOP;
END $$;
