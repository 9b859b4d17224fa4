-- Named queries of pgflow.engine.runners.sql (running SQL steps). {executor} and {columns} are filled in
-- as quoted identifiers (the role's executor function, the described result columns).

-- name: current_user
SELECT current_user;

-- name: local_statement_timeout
SELECT set_config('statement_timeout', %(timeout)s, true);

-- name: executor_owners
SELECT proowner::regrole::text FROM pg_proc
WHERE pronamespace = 'pgflow_exec'::regnamespace AND proname = %(role)s;

-- name: type_names
-- the name of each type, and whether it is a pseudo-type (void, record: no column may have one)
SELECT u.t, pg_catalog.format_type(u.t, NULL), coalesce(ty.typtype = 'p', false)
FROM unnest(%(oids)s::oid[]) AS u(t) LEFT JOIN pg_catalog.pg_type ty ON ty.oid = u.t;

-- name: execute_as_count
SELECT {executor}(%s, %s::jsonb, %s, true);

-- name: execute_as_rows
SELECT * FROM {executor}(%s, %s::jsonb, %s) AS t({columns});

-- name: deallocate_describe
DEALLOCATE pgflow_describe;

-- name: pin_search_path
-- after the user's statement, before pgflow's acknowledgement in the same transaction: whatever search_path
-- the step set, pgflow's statements resolve names in pg_catalog (and temporary relations last) only
SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

-- name: reset_session
-- after every step: nothing it left in the step session (settings, role, temporary tables, prepared
-- statements, cursors, session advisory locks, LISTENs, sequence caches) reaches the next step. DISCARD ALL
-- minus DISCARD PLANS (cached plans are checked against the search_path and temporary objects anyway)
CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *;
SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;
