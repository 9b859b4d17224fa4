-- compatible-from: 1
-- Issue 12, the worker's side (sql/schema/24_secrets_and_egress.sql): secrets granted by an administrator
-- (pgflow.secret_grants, grant_secret/revoke_secret, also named in _internal_functions, 20_usage.sql;
-- pgflow.set_secret now refuses), and the HTTP audit trail (pgflow.http_audit, readable under row-level
-- security: grant_usage grants SELECT on it). Only additions for code of schema version 1 (older workers
-- ignore the new tables; a user's set_secret is refused).

CREATE OR REPLACE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions',
                 'requeue_dead_letter', 'discard_dead_letter',
                 'read_queue', 'queue_head', 'ensure_queue_order', 'admit_tasks', 'park_task', 'charge_limit',
                 'define_limit', 'define_limits', 'split_task', 'next_parked_in',
                 'grant_secret', 'revoke_secret']
$$;

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
                   'pgflow.flows, pgflow.flow_steps, pgflow.queues, pgflow.migrations, pgflow.http_audit TO %I', p_role);
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

CREATE OR REPLACE FUNCTION pgflow.set_secret(p_name text, p_ref text) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pgflow: secrets are granted by an administrator, not set by users: ask for '
                    'SELECT pgflow.grant_secret(''%'', ''%'', ''env:...'' or ''file:/...'')', current_user, p_name
        USING ERRCODE = '42501';
END $$;

-- Secrets granted by an administrator, and the audit trail of HTTP steps (issue 12).
--
-- A secret is a name an administrator gives a role, pointing at a value on the workers (`env:NAME`, a
-- variable of the worker's environment, or `file:/path`, e.g. a mounted Kubernetes Secret). Users refer to
-- it by that name only ($secrets.name in HTTP steps, ctx.secret(name) in Python steps); they never choose
-- where it points (else any HTTP user could send env:PGFLOW_DSN or file:/etc/passwd anywhere). Workers read
-- the grants of a step's owner when the step runs; nobody else reads this table.
CREATE TABLE pgflow.secret_grants (
    role_name   name        NOT NULL,
    name        text        NOT NULL CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_]*$'),
    ref         text        NOT NULL CHECK (ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$'),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, name)
);

-- Give a role the secret `name` (run it as the pgflow owner or a superuser; granting it again repoints it).
CREATE FUNCTION pgflow.grant_secret(p_role name, p_name text, p_ref text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgflow: no role %', p_role USING ERRCODE = '42704';
    END IF;
    IF p_ref IS NULL OR p_ref !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$' THEN
        RAISE EXCEPTION 'pgflow: a secret is a reference, ''env:NAME'' or ''file:/path'' (the value is never '
                        'stored)' USING ERRCODE = '22023';
    END IF;
    IF p_name IS NULL OR p_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN
        RAISE EXCEPTION 'pgflow: a secret''s name is an identifier (letters, digits, _), got %', left(p_name, 40)
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.secret_grants (role_name, name, ref) VALUES (p_role, p_name, p_ref)
    ON CONFLICT (role_name, name) DO UPDATE SET ref = excluded.ref, granted_at = now();
END $$;
REVOKE ALL ON FUNCTION pgflow.grant_secret(name, text, text) FROM PUBLIC;

-- Take a secret back; true when the role had it. Steps that run from now on no longer see it.
CREATE FUNCTION pgflow.revoke_secret(p_role name, p_name text) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    DELETE FROM pgflow.secret_grants WHERE role_name = p_role AND name = p_name;
    RETURN FOUND;
END $$;
REVOKE ALL ON FUNCTION pgflow.revoke_secret(name, text) FROM PUBLIC;

-- One row per HTTP attempt of a step, written by the worker that made it (refused ones too: status NULL,
-- the reason in error). Users read their own rows (row-level security); pgflow_admin members and the owner
-- read all.
CREATE TABLE pgflow.http_audit (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner        name        NOT NULL,
    instance_id  bigint,
    step         text,
    attempt      integer,
    method       text        NOT NULL,
    host         text        NOT NULL,
    address      text,
    status       integer,
    error        text,
    duration_ms  double precision,
    at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX http_audit_owner_at ON pgflow.http_audit (owner, at);
CREATE INDEX http_audit_at ON pgflow.http_audit (at);
ALTER TABLE pgflow.http_audit ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_http_audit ON pgflow.http_audit FOR SELECT USING (owner = current_user OR pgflow.is_admin());

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgflow_admin') THEN
        GRANT SELECT ON pgflow.http_audit TO pgflow_admin;
    END IF;
END $$;

-- roles granted usage before this migration may read their own HTTP audit rows, as grant_usage gives it
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role_name FROM pgflow.role_grants g
             WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = g.role_name) LOOP
        EXECUTE format('GRANT SELECT ON pgflow.http_audit TO %I', r.role_name);
    END LOOP;
END $$;
