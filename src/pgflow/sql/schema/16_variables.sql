-- Variables and secrets: per-user named values copied into an instance when it starts ($vars.name in SQL
-- steps, ctx.vars in Python). A secret is stored as a reference ('env:NAME' or 'file:/path') that workers
-- resolve for HTTP steps, never as its value.

-- Users have no INSERT, UPDATE or DELETE on pgflow.variables: they write their own through these definer
-- functions, acting for p_caller (pgflow._check_caller), whose rows are always p_caller's.
CREATE FUNCTION pgflow.set_variable(p_name text, p_value jsonb, p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    INSERT INTO pgflow.variables (owner, name, value) VALUES (pgflow._check_caller(p_caller), p_name, p_value)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value, updated_at = pg_catalog.now();
END $$;
REVOKE ALL ON FUNCTION pgflow.set_variable(text, jsonb, name) FROM PUBLIC;
CREATE FUNCTION pgflow.delete_variable(p_name text, p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    DELETE FROM pgflow.variables WHERE owner = caller AND name = p_name;
END $$;
REVOKE ALL ON FUNCTION pgflow.delete_variable(text, name) FROM PUBLIC;
CREATE FUNCTION pgflow.get_variable(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT value FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
REVOKE ALL ON FUNCTION pgflow.get_variable(text) FROM PUBLIC;
-- pg_durable's names
CREATE FUNCTION pgflow.setvar(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.set_variable(p_name, p_value) $$;
REVOKE ALL ON FUNCTION pgflow.setvar(text, jsonb) FROM PUBLIC;
CREATE FUNCTION pgflow.getvar(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS
    $$ SELECT pgflow.get_variable(p_name) $$;
REVOKE ALL ON FUNCTION pgflow.getvar(text) FROM PUBLIC;
CREATE FUNCTION pgflow.unsetvar(p_name text) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.delete_variable(p_name) $$;
REVOKE ALL ON FUNCTION pgflow.unsetvar(text) FROM PUBLIC;
CREATE FUNCTION pgflow.clearvars(p_caller name DEFAULT current_user)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
BEGIN
    DELETE FROM pgflow.variables WHERE owner = caller;
END $$;
REVOKE ALL ON FUNCTION pgflow.clearvars(name) FROM PUBLIC;

-- Secrets are no longer chosen by users (a reference a user picks, e.g. env:PGFLOW_DSN, reads the worker's
-- own credentials): an administrator grants them with pgflow.grant_secret (24_secrets_and_egress.sql).
CREATE FUNCTION pgflow.set_secret(p_name text, p_ref text) RETURNS void LANGUAGE plpgsql
SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'pgflow: secrets are granted by an administrator, not set by users: ask for '
                    'SELECT pgflow.grant_secret(''%'', ''%'', ''env:...'' or ''file:/...'')', current_user, p_name
        USING ERRCODE = '42501';
END $$;
REVOKE ALL ON FUNCTION pgflow.set_secret(text, text) FROM PUBLIC;
