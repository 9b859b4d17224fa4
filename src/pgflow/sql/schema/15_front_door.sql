-- The SQL front door: what a psql user calls to start, watch, cancel and signal workflows
-- (`SELECT pgflow.start('SELECT 1' ~> pgflow.sleep(60) ~> ...)`). These run as the caller: row-level security
-- (18_roles_and_rls.sql) limits them to the caller's own instances.

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

-- Start a workflow. It joins the caller's transaction (a rollback means it never started) unless
-- p_detached, which commits it at once through dblink (the extension must be installed).
CREATE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
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
    RETURN (SELECT pgflow.register_and_start(p_name, version, NULL, shape, ARRAY[p_input], p_label));
END $$;
REVOKE ALL ON FUNCTION pgflow.start(jsonb, jsonb, text, boolean, text) FROM PUBLIC;

-- The usual entry point: a node built with the operators and functions above, or plain SQL text.
CREATE FUNCTION pgflow.start(p_node text, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgflow.start(pgflow.node(p_node), p_input, p_label, p_detached, p_name)
$$;
REVOKE ALL ON FUNCTION pgflow.start(text, jsonb, text, boolean, text) FROM PUBLIC;

CREATE FUNCTION pgflow.status(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    r jsonb;
BEGIN
    SELECT jsonb_build_object('id', i.id, 'flow', i.flow_name, 'status', i.status, 'label', i.label,
                              'error', i.error, 'created_at', i.created_at, 'finished_at', i.finished_at)
    INTO r FROM pgflow.instances i WHERE i.id = p_id;
    IF r IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN r;
END $$;
REVOKE ALL ON FUNCTION pgflow.status(bigint) FROM PUBLIC;

CREATE FUNCTION pgflow.result(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    i pgflow.instances;
BEGIN
    SELECT * INTO i FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF i.status IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'pgflow: instance % %: %', p_id, i.status, i.error USING ERRCODE = 'P0001';
    END IF;
    RETURN i.output;  -- NULL while pending or running
END $$;
REVOKE ALL ON FUNCTION pgflow.result(bigint) FROM PUBLIC;

CREATE FUNCTION pgflow.cancel(p_id bigint, p_reason text DEFAULT NULL) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    outcome text := pgflow.cancel_instance(p_id, p_reason);
BEGIN
    IF outcome IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN outcome;
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel(bigint, text) FROM PUBLIC;

-- Deliver a signal. Signals sent before the wait is reached are kept until it consumes them. A definer
-- function acting for p_caller (pgflow._check_caller): users have no INSERT on signals or wake-ups, and may
-- signal only instances they own (pgflow_admin members: any).
CREATE FUNCTION pgflow.signal(p_id bigint, p_name text, p_data jsonb DEFAULT NULL,
                              p_caller name DEFAULT current_user) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    caller name := pgflow._check_caller(p_caller);
    st text;
    new_id bigint;
BEGIN
    SELECT i.status INTO st FROM pgflow.instances i
    WHERE i.id = p_id AND pgflow._may_control(caller, i.owner);
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RAISE EXCEPTION 'pgflow: instance % is % and takes no signals', p_id, st USING ERRCODE = '55000';
    END IF;
    IF coalesce(p_name, '') = '' THEN
        RAISE EXCEPTION 'pgflow: a signal needs a name' USING ERRCODE = '22023';
    END IF;
    PERFORM pgflow.check_signal_quota(caller);
    INSERT INTO pgflow.signals (instance_id, name, data) VALUES (p_id, p_name, p_data) RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;
REVOKE ALL ON FUNCTION pgflow.signal(bigint, text, jsonb, name) FROM PUBLIC;

CREATE FUNCTION pgflow.list_instances(p_status text DEFAULT NULL, p_flow text DEFAULT NULL,
                                      p_label text DEFAULT NULL, p_limit integer DEFAULT 50,
                                      p_before bigint DEFAULT NULL)
RETURNS TABLE (id bigint, flow_name text, status text, label text, created_at timestamptz,
               finished_at timestamptz, error text)
LANGUAGE sql STABLE AS $$
    SELECT i.id, i.flow_name, i.status, i.label, i.created_at, i.finished_at, i.error
    FROM pgflow.instances i
    WHERE (p_status IS NULL OR i.status = p_status) AND (p_flow IS NULL OR i.flow_name = p_flow)
      AND (p_label IS NULL OR i.label = p_label) AND (p_before IS NULL OR i.id < p_before)
    ORDER BY i.id DESC
    LIMIT least(greatest(p_limit, 1), 10000)
$$;
REVOKE ALL ON FUNCTION pgflow.list_instances(text, text, text, integer, bigint) FROM PUBLIC;

-- Wait (polling every 50 ms) until the instance finishes or p_timeout seconds pass; returns its status.
-- An instance started in the same, uncommitted transaction cannot finish: commit first.
CREATE FUNCTION pgflow.await_instance(p_id bigint, p_timeout double precision DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout);
    r jsonb;
BEGIN
    LOOP
        r := pgflow.status(p_id);
        IF NOT r->>'status' = ANY (pgflow.open_instance_statuses()) OR clock_timestamp() >= deadline THEN
            RETURN r || jsonb_build_object('output', (SELECT output FROM pgflow.instances WHERE id = p_id));
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.await_instance(bigint, double precision) FROM PUBLIC;
