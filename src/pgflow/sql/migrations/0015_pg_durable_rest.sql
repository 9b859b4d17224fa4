-- compatible-from: 13
-- Issue 13, the rest of pg_durable's suite:
-- - pgflow.check_rights_at_start (on unless set off): the df layer's start leaves the HTTP and Python rights
--   to the workers, which check them before each such step runs, as pg_durable does (06_start.sql);
-- - pgflow.caller_proofs: a SECURITY DEFINER function of a user's own that calls df.start acts as its owner,
--   as in pg_durable; the frame proves its current_user in a row the trigger stamps, and pgflow._check_caller
--   accepts a role proven in this backend and transaction (18_roles_and_rls.sql). Roles granted usage may
--   insert proofs (of themselves only) (20_usage.sql);
-- - in an engine session, code inside a SQL step's executor (pgflow_exec.<role>) acts only as the executor's
--   role: a user's SQL step could name the worker's role (the session's) as p_caller and act as it.

CREATE FUNCTION pgflow._rights_at_start() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(pg_catalog.current_setting('pgflow.check_rights_at_start', true), '')
           OPERATOR(pg_catalog.<>) ALL (ARRAY['off', 'false', '0'])
$$;
REVOKE ALL ON FUNCTION pgflow._rights_at_start() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text,
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
    IF pgflow._rights_at_start()
       AND EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'http')
       AND NOT pgflow.may_use('http', caller) THEN
        RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => true))',
            caller USING ERRCODE = '42501';
    END IF;
    IF pgflow._rights_at_start() AND shape ? 'tree'  -- a control-flow workflow names its Python functions itself
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

CREATE OR REPLACE FUNCTION pgflow._check_caller(p_caller name) RETURNS name
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
    -- a frame of the role's own proves its identity before it acts through a definer function (the trigger
    -- stamps the row: the role can prove no one but itself; pgflow._check_caller)
    EXECUTE format('GRANT INSERT ON pgflow.caller_proofs TO %I', p_role);
    -- nothing else on any table (no INSERT, UPDATE, DELETE, so no SELECT ... FOR UPDATE either): users write
    -- through definer functions that check ownership, rights, limits and quotas (start_instances, signal,
    -- cancel_instance, retry_instance, set_variable, ...)
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

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role_name FROM pgflow.role_grants g JOIN pg_roles p ON p.rolname = g.role_name LOOP
        EXECUTE format('GRANT INSERT ON pgflow.caller_proofs TO %I', r.role_name);
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow._rights_at_start(), pgflow._end_proof(), '
                       'pgflow._stamp_proof(), '
                       'pgflow._executor_frames() '
                       'TO %I', r.role_name);
    END LOOP;
END $$;
