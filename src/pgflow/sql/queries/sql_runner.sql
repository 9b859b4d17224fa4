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
SELECT t, format_type(t, NULL) FROM unnest(%(oids)s::oid[]) AS t;

-- name: execute_as_count
SELECT {executor}(%s, %s::jsonb, %s, true);

-- name: execute_as_rows
SELECT * FROM {executor}(%s, %s::jsonb, %s) AS t({columns});

-- name: deallocate_describe
DEALLOCATE pgflow_describe;
