-- Who sees what (see SECURITY.md). A user sees and controls only the instances (and their steps, results and
-- signals) and the variables it owns; members of pgflow_admin see all. The owner of the tables (the role
-- that ran `pgflow init`, which coordinators and workers connect as) is not subject to row-level security.
-- Capabilities beyond the basics (HTTP steps, Python steps in workflows) are granted per role.

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
REVOKE ALL ON FUNCTION pgflow.is_admin() FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow.may_use(text, name) FROM PUBLIC;
