-- compatible-from: 1
-- Issue 13 (the pg_durable surface): a result name is checked when |=> / pgflow.named gives it
-- (schema/12_tree_nodes.sql); pgflow.may_use skips the grants of dropped roles instead of failing every
-- step of every granted user once one granted role is dropped (schema/18_roles_and_rls.sql). Only
-- replacements: code of earlier schema versions keeps working.

-- A result's name is checked when it is given (an error at the line that named it, not at start).
CREATE OR REPLACE FUNCTION pgflow.named(p_node text, p_name text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_name IS NOT NULL AND (p_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' OR p_name IN ('input', 'vars', 'item')) THEN
        RAISE EXCEPTION 'pgflow: result name % is not a valid identifier (letters, digits and _, not starting '
                        'with a digit; not input, vars or item)', left(p_name, 80) USING ERRCODE = '22023';
    END IF;
    RETURN jsonb_build_object('t', 'name', 'name', p_name, 'c', jsonb_build_array(pgflow.node(p_node)))::text;
END $$;

-- Whether a role (by default the current one) may use a capability ('http', 'python'): the pgflow owner,
-- superusers, pgflow_admin members, and roles granted it. A definer function: users cannot read role_grants.
-- It answers only about roles the session may act as (pgflow._check_caller), except to the pgflow owner,
-- superusers and pgflow_admin members: others' rights are not revealed.
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
                     JOIN pg_catalog.pg_roles r ON r.rolname = g.role_name  -- by oid: a dropped role's grant
                     WHERE pg_catalog.pg_has_role(p_role, r.oid, 'member')), false);  -- row is skipped
END $$;
