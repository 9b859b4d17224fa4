-- compatible-from: 1
-- A deferred trigger queued by a SQL step fires before the step's executor returns, as the step's owner: at
-- commit it ran as the worker's role on PostgreSQL 15-17 (schema/19_executors.sql). Every role's executors
-- are rebuilt; one this role may not rebuild is named, and pgflow.grant_usage(role) run by an administrator
-- rebuilds it.

CREATE OR REPLACE FUNCTION pgflow._executor_sql(p_role name) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format($f$
        CREATE OR REPLACE FUNCTION pgflow_exec.%1$I(p_sql text, p_params jsonb, p_timeout_ms integer)
        RETURNS SETOF record LANGUAGE plpgsql SECURITY DEFINER SET search_path = "$user", public AS $body$
        DECLARE n bigint;
        BEGIN
            IF p_timeout_ms IS NOT NULL THEN
                PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
            END IF;
            RETURN QUERY EXECUTE p_sql USING p_params;
            SET CONSTRAINTS ALL IMMEDIATE;
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
            SET CONSTRAINTS ALL IMMEDIATE;
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
REVOKE ALL ON FUNCTION pgflow._executor_sql(name) FROM PUBLIC;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pgflow_exec'::regnamespace ORDER BY 1 LOOP
        BEGIN
            EXECUTE pgflow._executor_sql(r.proname);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'pgflow: could not rebuild the SQL-step executor of role % (%): run '
                          'SELECT pgflow.grant_usage(%L) as an administrator', r.proname, SQLERRM, r.proname;
        END;
    END LOOP;
END $$;
