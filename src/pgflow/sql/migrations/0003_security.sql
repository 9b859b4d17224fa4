-- pgflow schema, version 3: multi-user security and hardening (see SECURITY.md).
--
-- * Nothing is granted to PUBLIC; pgflow.grant_usage(role) grants a role what it needs.
-- * Row-level security: a user sees and controls only the instances (and their steps, results and signals)
--   and the variables it owns; members of pgflow_admin see all. The owner is captured at start.
-- * SQL steps of an instance run as its owner, through a SECURITY DEFINER executor owned by that role
--   (inside which SET ROLE is impossible), never with the worker's privileges.
-- * Starting an instance as a superuser is refused unless pgflow.allow_superuser is on.
-- * HTTP steps need a per-role grant; secrets are stored as references, resolved by workers.

-- Messages put aside without running (undecodable, unknown flow version...), with the reason.
CREATE TABLE pgflow.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text        NOT NULL,
    msg_id      bigint      NOT NULL,
    message     jsonb,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- What grant_usage gave each role beyond the basics.
CREATE TABLE pgflow.role_grants (
    role_name   name        PRIMARY KEY,
    http        boolean     NOT NULL DEFAULT false,
    python      boolean     NOT NULL DEFAULT false,
    granted_at  timestamptz NOT NULL DEFAULT now()
);

-- A secret is a reference ('env:NAME' or 'file:/path'), resolved by the worker when an HTTP step uses it.
ALTER TABLE pgflow.variables ADD COLUMN secret_ref text
    CHECK (secret_ref IS NULL OR secret_ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$');
ALTER TABLE pgflow.instances ADD COLUMN secret_refs jsonb;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        CREATE ROLE pgflow_admin NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pgflow: cannot create role pgflow_admin (no CREATEROLE); only the pgflow owner sees all';
END $$;

CREATE FUNCTION pgflow.is_admin() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
           AND pg_has_role(current_user, 'pgflow_admin', 'member')
$$;

-- ------------------------------------------------------------------------------------------------------
-- Row-level security (the owner of the tables — the role that ran `pgflow init`, which coordinators and
-- workers connect as — is not subject to it)
-- ------------------------------------------------------------------------------------------------------

ALTER TABLE pgflow.instances ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_instances ON pgflow.instances
    USING (owner = current_user OR pgflow.is_admin())
    WITH CHECK (owner = current_user OR pgflow.is_admin());

ALTER TABLE pgflow.steps ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_steps ON pgflow.steps
    USING (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

ALTER TABLE pgflow.signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_signals ON pgflow.signals
    USING (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

ALTER TABLE pgflow.variables ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_variables ON pgflow.variables
    USING (owner = current_user)
    WITH CHECK (owner = current_user);

-- A signal for a visible instance only: wake-ups carry no data, but must not be used to poke others'.
ALTER TABLE pgflow.wakeups ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_wakeups ON pgflow.wakeups
    USING (false)
    WITH CHECK (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

-- ------------------------------------------------------------------------------------------------------
-- Starting: identity, superuser guard, variables and secrets snapshot, HTTP right
-- ------------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION pgflow.start_instance(p_flow text, p_version text, p_input jsonb, p_label text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
    shape jsonb;
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser %: its SQL steps would run as '
                        'superuser. Start it as an ordinary role (see pgflow.grant_usage), or allow it with '
                        'SET pgflow.allow_superuser = on', current_user USING ERRCODE = '42501';
    END IF;
    SELECT f.shape INTO shape FROM pgflow.flows f WHERE f.flow_name = p_flow AND f.version = p_version;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'http')
       AND NOT pgflow.may_use('http') THEN
        RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => true))',
            current_user USING ERRCODE = '42501';
    END IF;
    IF shape ? 'tree'  -- a control-flow workflow names its Python functions itself
       AND EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'python')
       AND NOT pgflow.may_use('python') THEN
        RAISE EXCEPTION 'pgflow: role % may not use Python steps in workflows (pgflow.grant_usage(role, '
                        'include_python => true))', current_user USING ERRCODE = '42501';
    END IF;
    INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables, secret_refs)
    VALUES (p_flow, p_version, p_input, p_label,
            (SELECT jsonb_object_agg(v.name, v.value) FROM pgflow.variables v
             WHERE v.owner = current_user AND v.secret_ref IS NULL),
            (SELECT jsonb_object_agg(v.name, v.secret_ref) FROM pgflow.variables v
             WHERE v.owner = current_user AND v.secret_ref IS NOT NULL))
    RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (new_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;

-- Whether a role (by default the current one) may use a capability ('http', 'python'): the pgflow owner,
-- superusers, pgflow_admin members, and roles granted it. A definer function: users cannot read role_grants.
CREATE FUNCTION pgflow.may_use(p_what text, p_role name DEFAULT current_user) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow AS $$
    SELECT p_role = (SELECT nspowner::regrole::name FROM pg_namespace WHERE nspname = 'pgflow')
        OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = p_role), false)
        OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
            AND pg_has_role(p_role, 'pgflow_admin', 'member'))
        OR coalesce((SELECT bool_or(CASE p_what WHEN 'http' THEN g.http WHEN 'python' THEN g.python END)
                     FROM pgflow.role_grants g
                     WHERE EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role_name)
                       AND pg_has_role(p_role, g.role_name, 'member')), false)
$$;

-- Flows and queues are shared: registered through definer functions, so users need no write access.
ALTER FUNCTION pgflow.register_flow(text, text, text, jsonb) SECURITY DEFINER SET search_path = pg_catalog, pgflow;
ALTER FUNCTION pgflow.ensure_queue(text) SECURITY DEFINER SET search_path = pg_catalog, pgflow;

CREATE FUNCTION pgflow.set_secret(p_name text, p_ref text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_ref !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$' THEN
        RAISE EXCEPTION 'pgflow: a secret is a reference, ''env:NAME'' or ''file:/path'' (the value is never '
                        'stored), got %', left(p_ref, 40) USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.variables (name, value, secret_ref) VALUES (p_name, NULL, p_ref)
    ON CONFLICT (owner, name) DO UPDATE SET value = NULL, secret_ref = excluded.secret_ref, updated_at = now();
END $$;

-- Workers learn each task's owner (SQL steps run as it) and secret references (resolved for HTTP steps).
DROP FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[]);
-- (a message must also name the instance's own flow and version: a forged one claims nothing)
CREATE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_flows text[],
    p_versions text[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb
) LANGUAGE sql AS $$
    WITH u AS (
        SELECT * FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks, p_flows, p_versions)
            AS u(msg_id, instance_id, step_name, task_index, flow_name, flow_version)
    ), claimed AS (
        UPDATE pgflow.steps s
        SET status = 'running', attempt = s.attempt + 1, started_at = clock_timestamp(),
            msg_id = u.msg_id, next_attempt_at = NULL
        FROM u, pgflow.instances i
        WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
          AND i.id = s.instance_id AND i.status = 'running'
          AND i.flow_name = u.flow_name AND i.flow_version = u.flow_version
          AND s.status IN ('queued', 'running', 'retrying')
        RETURNING u.msg_id, s.instance_id, s.step_name, s.task_index, s.attempt,
                  i.flow_name, i.flow_version, i.input, i.variables, i.owner, i.secret_refs
    )
    SELECT c.msg_id, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name, c.flow_version,
           -- a task of a map over the input gets its element, not the whole input list (no N^2 reads)
           CASE WHEN c.task_index >= 0 AND fs.over = 'input' THEN NULL ELSE c.input END,
           c.variables, d.deps, d.dep_columns, c.owner, c.secret_refs
    FROM claimed c
    JOIN pgflow.flow_steps fs
      ON fs.flow_name = c.flow_name AND fs.version = c.flow_version AND fs.step_name = c.step_name
    LEFT JOIN LATERAL (
        SELECT jsonb_object_agg(s.step_name, s.output) AS deps,
               jsonb_object_agg(s.step_name, s.columns) FILTER (WHERE s.columns IS NOT NULL) AS dep_columns
        FROM pgflow.steps s
        WHERE s.instance_id = c.instance_id AND s.task_index = -1 AND s.step_name = ANY (fs.deps)
          -- likewise a map task gets its element from the message, not the list it fans out over
          AND (c.task_index < 0 OR s.step_name IS DISTINCT FROM fs.over)
    ) d ON true;
$$;

-- ------------------------------------------------------------------------------------------------------
-- Running SQL steps as their owner
-- ------------------------------------------------------------------------------------------------------

-- Executors live in their own schema, one per role, owned by that role and SECURITY DEFINER: the statement
-- runs with exactly the owner's privileges, and PostgreSQL forbids SET ROLE inside it. Parameters arrive as
-- one jsonb array ($1). Only the pgflow owner (workers) may call them.
CREATE SCHEMA pgflow_exec;
REVOKE ALL ON SCHEMA pgflow_exec FROM PUBLIC;

CREATE FUNCTION pgflow._executor_sql(p_role name) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format($f$
        CREATE OR REPLACE FUNCTION pgflow_exec.%1$I(p_sql text, p_params jsonb, p_timeout_ms integer)
        RETURNS SETOF record LANGUAGE plpgsql SECURITY DEFINER SET search_path = "$user", public AS $body$
        DECLARE n bigint;
        BEGIN
            IF p_timeout_ms IS NOT NULL THEN
                PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
            END IF;
            RETURN QUERY EXECUTE p_sql USING p_params;
        END $body$;
        CREATE OR REPLACE FUNCTION pgflow_exec.%1$I(p_sql text, p_params jsonb, p_timeout_ms integer,
                                                    p_no_rows boolean)
        RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = "$user", public AS $body$
        DECLARE n bigint;
        BEGIN
            IF p_timeout_ms IS NOT NULL THEN
                PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
            END IF;
            EXECUTE p_sql USING p_params;
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN n;
        END $body$;
        ALTER FUNCTION pgflow_exec.%1$I(text, jsonb, integer) OWNER TO %1$I;
        ALTER FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) OWNER TO %1$I;
        REVOKE ALL ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer) FROM PUBLIC;
        REVOKE ALL ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer) TO %2$I;
        GRANT EXECUTE ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) TO %2$I;
    $f$, p_role, (SELECT nspowner::regrole::name FROM pg_namespace WHERE nspname = 'pgflow'))
$$;

-- ------------------------------------------------------------------------------------------------------
-- Grants
-- ------------------------------------------------------------------------------------------------------

REVOKE ALL ON SCHEMA pgflow FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA pgflow REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Internal: what workers and coordinators call (they are the owner); never granted.
CREATE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions']
$$;

-- Let a role use pgflow: start, watch, cancel and signal its own instances, keep variables; optionally use
-- HTTP and Python steps. Run it as the pgflow owner (or a superuser).
CREATE FUNCTION pgflow.grant_usage(p_role name, p_include_http boolean DEFAULT false,
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
                   'pgflow.flows, pgflow.flow_steps, pgflow.queues, pgflow.migrations TO %I', p_role);
    EXECUTE format('GRANT INSERT (flow_name, flow_version, input, label, variables, secret_refs), '
                   'UPDATE (status, error, finished_at) ON pgflow.instances TO %I', p_role);
    EXECUTE format('GRANT UPDATE (status, finished_at) ON pgflow.steps TO %I', p_role);
    EXECUTE format('GRANT INSERT (instance_id, name, data) ON pgflow.signals TO %I', p_role);
    EXECUTE format('GRANT INSERT (instance_id) ON pgflow.wakeups TO %I', p_role);
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
END $$;

CREATE FUNCTION pgflow.revoke_usage(p_role name) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer)', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer, boolean)', p_role);
    DELETE FROM pgflow.role_grants WHERE role_name = p_role;
END $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM PUBLIC;
