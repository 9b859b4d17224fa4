-- Running SQL steps as their owner, never with the worker's privileges.
--
-- Executors live in their own schema (pgflow_exec), one per role, owned by that role and SECURITY DEFINER:
-- the statement runs with exactly the owner's privileges, and PostgreSQL forbids SET ROLE inside it. Before
-- returning, an executor fires the deferred triggers the statement queued (SET CONSTRAINTS ALL IMMEDIATE):
-- at commit they would run as the worker's role on PostgreSQL 15-17 (18 fires them as the role that queued
-- them), so a user's deferred constraint trigger ran as a superuser worker.
-- Parameters arrive as one jsonb array ($1). Only the pgflow owner (workers) may call them. This function
-- returns the DDL that grant_usage runs to create a role's executors.

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
