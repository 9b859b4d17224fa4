-- Variables and secrets: per-user named values copied into an instance when it starts ($vars.name in SQL
-- steps, ctx.vars in Python). A secret is stored as a reference ('env:NAME' or 'file:/path') that workers
-- resolve for HTTP steps, never as its value.

CREATE FUNCTION pgflow.set_variable(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgflow.variables (name, value) VALUES (p_name, p_value)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value, updated_at = now()
$$;
REVOKE ALL ON FUNCTION pgflow.set_variable(text, jsonb) FROM PUBLIC;
CREATE FUNCTION pgflow.delete_variable(p_name text) RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
REVOKE ALL ON FUNCTION pgflow.delete_variable(text) FROM PUBLIC;
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
CREATE FUNCTION pgflow.clearvars() RETURNS void LANGUAGE sql AS
    $$ DELETE FROM pgflow.variables WHERE owner = current_user $$;
REVOKE ALL ON FUNCTION pgflow.clearvars() FROM PUBLIC;

CREATE FUNCTION pgflow.set_secret(p_name text, p_ref text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_ref !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$' THEN
        RAISE EXCEPTION 'pgflow: a secret is a reference, ''env:NAME'' or ''file:/path'' (the value is never '
                        'stored), got %', left(p_ref, 40) USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.variables (name, value, secret_ref) VALUES (p_name, NULL, p_ref)
    ON CONFLICT (owner, name) DO UPDATE SET value = NULL, secret_ref = excluded.secret_ref, updated_at = now();
END $$;
REVOKE ALL ON FUNCTION pgflow.set_secret(text, text) FROM PUBLIC;
