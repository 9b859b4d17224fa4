-- compatible-from: 1
-- Issue 13: pgflow.start(..., p_detached => true) found no dblink when it was installed (to_regproc is NULL
-- for dblink's overloaded name) and connected without naming the server's socket: schema/15_front_door.sql.
-- Only replacements and one new function: code of schema version 6 keeps working.

-- A libpq connection string back to this database as the current user, through this server's own socket
-- directory (127.0.0.1 where it has none): what a detached start connects with. Values are quoted.
CREATE FUNCTION pgflow.loopback_conninfo() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT string_agg(k || '=''' || replace(replace(v, '\', '\\'), '''', '\''') || '''', ' ')
    FROM (VALUES ('dbname', current_database()::text), ('user', current_user::text),
                 ('host', coalesce(nullif(trim(split_part(current_setting('unix_socket_directories'), ',', 1)),
                                          ''), '127.0.0.1')),
                 ('port', current_setting('port'))) AS p(k, v)
$$;
REVOKE ALL ON FUNCTION pgflow.loopback_conninfo() FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb := pgflow.tree_shape(p_node, p_name);
    version text := pgflow.shape_version(shape);
    new_id bigint;
BEGIN
    IF p_detached THEN
        -- dblink has several overloads (to_regproc is NULL for an ambiguous name): look for a visible one
        IF NOT EXISTS (SELECT FROM pg_proc WHERE proname = 'dblink' AND pg_function_is_visible(oid)) THEN
            RAISE EXCEPTION 'pgflow: a detached start needs the dblink extension (CREATE EXTENSION dblink)'
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE 'SELECT id FROM dblink($1, $2) AS t(id bigint)' INTO new_id
            USING pgflow.loopback_conninfo(),
                  format('SELECT pgflow.start(%L::jsonb, %L::jsonb, %L, false, %L)', p_node, p_input, p_label,
                         p_name);
        RETURN new_id;
    END IF;
    PERFORM pgflow.register_flow(p_name, version, NULL, shape);
    RETURN pgflow.start_instance(p_name, version, p_input, p_label);
END $$;

-- Roles granted usage before this version may call the new function too (grant_usage grants it from now on).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT g.role_name FROM pgflow.role_grants g WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = g.role_name) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION pgflow.loopback_conninfo() TO %I', r.role_name);
    END LOOP;
END $$;
