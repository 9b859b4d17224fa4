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
