-- Named queries of pgflow.db.migrations (pgflow init, schema checks).

-- name: lock_migrations
-- before the first init only (no table to lock yet)
SELECT pg_advisory_xact_lock(%(key)s);

-- name: lock_migrations_table
-- one init at a time, on a lock no user can hold: users may only read the table (ACCESS SHARE, which EXCLUSIVE
-- does not wait for), unlike an advisory lock key, which anyone may take
LOCK TABLE pgflow.migrations IN EXCLUSIVE MODE;

-- name: pgmq_installed
SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'send_batch' AND pronamespace = to_regnamespace('pgmq'));

-- name: migrations_table_exists
SELECT to_regclass('pgflow.migrations') IS NOT NULL;

-- name: create_migrations_table
-- compatible_from: the oldest code (by schema version) that works once this migration is applied. The
-- ALTER only when the column is missing: even a no-op ADD COLUMN IF NOT EXISTS waits for an exclusive lock,
-- so any user's open transaction that read the table held up every `pgflow init` (and, queued behind it,
-- every engine process starting)
CREATE SCHEMA IF NOT EXISTS pgflow;
CREATE TABLE IF NOT EXISTS pgflow.migrations (
    version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now()
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                   WHERE attrelid = 'pgflow.migrations'::regclass AND attname = 'compatible_from'
                     AND NOT attisdropped) THEN
        ALTER TABLE pgflow.migrations ADD COLUMN compatible_from integer;
    END IF;
END $$;

-- name: record_migration
INSERT INTO pgflow.migrations (version, name, compatible_from)
VALUES (%(version)s, %(name)s, %(compatible_from)s);

-- name: schema_state
-- (through to_jsonb: a database initialised before compatible_from existed has no such column); the
-- baseline's version recorded under another name means the database was initialised before the squash
SELECT coalesce(max(version), 0),
       coalesce(max(coalesce((to_jsonb(m)->>'compatible_from')::integer, version)), 0),
       coalesce(bool_or(version = %(baseline_version)s AND name <> %(baseline)s), false)
FROM pgflow.migrations m;

-- name: compat_schema
-- whether a compatibility layer's schema exists, and whether pgflow installed it (its comment says so)
SELECT n.oid IS NOT NULL, coalesce(obj_description(n.oid, 'pg_namespace') LIKE 'pgflow compatibility layer%%', false)
FROM (SELECT %(schema)s::name AS nspname) AS want
LEFT JOIN pg_namespace n USING (nspname);
