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

-- Every catalog reference schema-qualified and the search_path pinned with pg_temp last: a function or view
-- of the caller's own (b.pg_has_role, a temporary pg_roles) is never called instead. The policies call it as
-- (SELECT pgflow.is_admin()): evaluated once per statement, not once per row.
CREATE FUNCTION pgflow.is_admin() RETURNS boolean LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) 'pgflow_admin')
           AND pg_catalog.pg_has_role(current_user, 'pgflow_admin', 'member')
$$;
REVOKE ALL ON FUNCTION pgflow.is_admin() FROM PUBLIC;

-- Proofs that a role is the current_user of a frame that is about to act through a definer function, for
-- the one case the session's role cannot vouch for: a SECURITY DEFINER function of the caller's own (owned by
-- another role, who chose to run it as itself) that calls df.start. Parameter defaults cannot carry that
-- identity (an explicit argument forges them) and a definer function sees only its owner as current_user,
-- so the frame writes it down first: its INSERT is stamped by the trigger with the inserting current_user,
-- backend and transaction, whatever the row said (a BYPASSRLS role cannot choose them either), and refused
-- where the session could act as that role anyway (so no one writes rows they need not). The writer
-- removes it (pgflow._end_proof) as soon as the call it covers returns; a rollback removes it too.
CREATE UNLOGGED TABLE pgflow.caller_proofs (
    pid integer NOT NULL,
    xact xid8 NOT NULL,
    role name NOT NULL
);
REVOKE ALL ON pgflow.caller_proofs FROM PUBLIC;

CREATE FUNCTION pgflow._stamp_proof() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- only a frame whose role the session cannot vouch for needs (or may write) a proof: no junk rows
    IF current_user OPERATOR(pg_catalog.=) session_user
       OR pg_catalog.pg_has_role(session_user, current_user, 'member') THEN
        RAISE EXCEPTION 'pgflow: % needs no proof of its role (the session may act as it)', current_user
            USING ERRCODE = '42501';
    END IF;
    NEW.pid := pg_catalog.pg_backend_pid();
    NEW.xact := pg_catalog.pg_current_xact_id();
    NEW.role := current_user;  -- a trigger runs as the role that inserts (this function is not a definer)
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION pgflow._stamp_proof() FROM PUBLIC;
CREATE TRIGGER stamp BEFORE INSERT ON pgflow.caller_proofs FOR EACH ROW EXECUTE FUNCTION pgflow._stamp_proof();

-- Drop the proofs this backend wrote (the call they covered has returned).
CREATE FUNCTION pgflow._end_proof() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
    DELETE FROM pgflow.caller_proofs WHERE pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
$$;
REVOKE ALL ON FUNCTION pgflow._end_proof() FROM PUBLIC;

-- The roles of the SQL-step executors (pgflow_exec.<role>, 19_executors.sql) on the call stack. A worker runs a
-- user's SQL step inside one, in a session whose role is the worker's own: that role must not vouch for the
-- step's code. Read from the stack's text (language-independent: only the executor's name is matched); text a
-- user controls can only add names, which only narrows what pgflow._check_caller accepts.
CREATE FUNCTION pgflow._executor_frames() RETURNS name[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    stack text;
BEGIN
    GET DIAGNOSTICS stack = PG_CONTEXT;
    IF pg_catalog.strpos(stack, 'pgflow_exec.') OPERATOR(pg_catalog.=) 0 THEN
        RETURN '{}';  -- the common case, without the regular expression
    END IF;
    RETURN ARRAY(SELECT CASE WHEN m[1] LIKE '"%' THEN replace(substr(m[1], 2, length(m[1]) - 2), '""', '"')
                             ELSE m[1] END::name
                 FROM regexp_matches(stack, 'pgflow_exec\.("(?:[^"]|"")+"|[a-z0-9_$]+)\(', 'g') AS m);
END $$;
REVOKE ALL ON FUNCTION pgflow._executor_frames() FROM PUBLIC;

-- The role a definer function acts for: p_caller, which callers pass as their current_user (a parameter
-- default, evaluated before the function switches to its owner). A caller may only name a role its session
-- could SET ROLE to, or one whose frame proved itself in this transaction (pgflow.caller_proofs), so naming
-- another role gains nothing it did not have. In an engine session, code inside a SQL step's executor acts
-- only as a role every executor on the stack may SET ROLE to: the worker's role (and its membership in every
-- role, as a superuser) never vouches for a user's step. Called by definer functions only (it reads
-- caller_proofs).
CREATE FUNCTION pgflow._check_caller(p_caller name) RETURNS name
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    engine boolean := pgflow.is_engine_role(session_user);
    frames name[];
BEGIN
    IF p_caller OPERATOR(pg_catalog.=) session_user AND NOT engine THEN
        RETURN p_caller;  -- the common case: a user's own session (its role exists)
    END IF;
    IF engine THEN
        frames := pgflow._executor_frames();
        IF pg_catalog.cardinality(frames) OPERATOR(pg_catalog.>) 0 THEN
            IF p_caller IS NULL
               OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) p_caller)
               OR EXISTS (SELECT 1 FROM pg_catalog.unnest(frames) AS f(role)
                          WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                                            WHERE r.rolname OPERATOR(pg_catalog.=) f.role)
                             OR NOT pg_catalog.pg_has_role(f.role, p_caller, 'member')) THEN
                RAISE EXCEPTION 'pgflow: a SQL step of role % may not act as role %', frames[1],
                    coalesce(p_caller, 'NULL') USING ERRCODE = '42501';
            END IF;
            RETURN p_caller;
        END IF;
        IF p_caller OPERATOR(pg_catalog.=) session_user THEN
            RETURN p_caller;
        END IF;
    END IF;
    IF p_caller IS NULL
       OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) p_caller)
       OR NOT (pg_catalog.pg_has_role(session_user, p_caller, 'member')
               OR EXISTS (SELECT 1 FROM pgflow.caller_proofs c
                          WHERE c.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                            AND c.xact OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id()
                            AND c.role OPERATOR(pg_catalog.=) p_caller)) THEN
        RAISE EXCEPTION 'pgflow: role % may not act as role %', session_user, coalesce(p_caller, 'NULL')
            USING ERRCODE = '42501';
    END IF;
    RETURN p_caller;
END $$;
REVOKE ALL ON FUNCTION pgflow._check_caller(name) FROM PUBLIC;

-- Whether a role is the pgflow owner (or a member of it): the engine's own role, which quotas do not limit.
-- Every name in it is schema-qualified, so it needs no pinned search_path (a call then saves and restores
-- no setting; a function reading a table is still called, not inlined).
CREATE FUNCTION pgflow.is_engine_role(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pg_catalog.pg_has_role(p_role, n.nspowner, 'member')
    FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) 'pgflow'
$$;
REVOKE ALL ON FUNCTION pgflow.is_engine_role(name) FROM PUBLIC;

-- Whether a role may act on every user's instances and flow versions: the engine's own role or a
-- pgflow_admin member (when that role exists). The one place that rule is written: starting any registered
-- flow version, signalling, cancelling and retrying others' instances (_may_control) and answering for
-- other roles (may_use) ask it. Schema-qualified throughout, as is_engine_role.
CREATE FUNCTION pgflow._is_privileged(p_role name) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT pgflow.is_engine_role(p_role)
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) 'pgflow_admin')
            AND pg_catalog.pg_has_role(p_role, 'pgflow_admin', 'member'))
$$;
REVOKE ALL ON FUNCTION pgflow._is_privileged(name) FROM PUBLIC;

-- Whether p_caller may act on an instance (or variables) of p_owner: its own, or any for a privileged role
-- (_is_privileged). What the definer functions users write through (cancel, retry, signal, ...) check,
-- since row-level security does not apply to them (they run as the table owner).
CREATE FUNCTION pgflow._may_control(p_caller name, p_owner name) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT p_owner OPERATOR(pg_catalog.=) p_caller OR pgflow._is_privileged(p_caller)
$$;
REVOKE ALL ON FUNCTION pgflow._may_control(name, name) FROM PUBLIC;

ALTER TABLE pgflow.instances ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_instances ON pgflow.instances
    USING (owner = current_user OR (SELECT pgflow.is_admin()))
    WITH CHECK (owner = current_user OR (SELECT pgflow.is_admin()));

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

-- Whether a role (by default the current one) may use a capability ('http', 'python'): privileged roles
-- (pgflow._is_privileged: the pgflow owner and its members, superusers among them, and pgflow_admin
-- members), and roles granted it. A definer function: users cannot read role_grants.
-- It answers only about roles the session may act as (pgflow._check_caller), except to the pgflow owner,
-- superusers and pgflow_admin members: others' rights are not revealed.
CREATE FUNCTION pgflow.may_use(p_what text, p_role name DEFAULT current_user) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    IF NOT pgflow._is_privileged(session_user) THEN
        PERFORM pgflow._check_caller(p_role);
    END IF;
    RETURN pgflow._is_privileged(p_role)  -- the owner's members too, superusers among them
        OR coalesce((SELECT bool_or(CASE p_what WHEN 'http' THEN g.http WHEN 'python' THEN g.python END)
                     FROM pgflow.role_grants g
                     JOIN pg_catalog.pg_roles r ON r.rolname = g.role_name  -- by oid: a dropped role's grant
                     WHERE pg_catalog.pg_has_role(p_role, r.oid, 'member')), false);  -- row is skipped
END $$;
REVOKE ALL ON FUNCTION pgflow.may_use(text, name) FROM PUBLIC;
