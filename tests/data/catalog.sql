-- What tests/db/test_schema.py compares between a database built from src/pgflow/sql/schema/ and one built
-- from src/pgflow/sql/migrations/. Each block ("-- name: <what>") returns (key, detail as jsonb) rows for
-- pgflow's own objects: everything in the schemas pgflow and pgflow_exec, plus pgflow's operators (which
-- may live in public). Nothing here depends on OIDs, creation order or the name of the role that ran init.

-- name: acl_helper
-- an ACL as sorted [grantee, privilege, grantable] triples, the owner written as OWNER; NULL (the
-- built-in default) expanded, so that "never granted" and "granted back to the defaults" compare equal
CREATE FUNCTION pg_temp.acl(p_acl aclitem[], p_owner oid, p_kind "char") RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_array(g.grantee, g.privilege, g.grantable)
                              ORDER BY g.grantee, g.privilege, g.grantable), '[]'::jsonb)
    FROM (SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' WHEN a.grantee = p_owner THEN 'OWNER'
                               ELSE pg_get_userbyid(a.grantee)::text END AS grantee,
                          a.privilege_type AS privilege, a.is_grantable AS grantable
          FROM aclexplode(coalesce(p_acl, acldefault(p_kind, p_owner))) a) g
$$;

-- name: schemas
SELECT n.nspname, jsonb_build_object('acl', pg_temp.acl(n.nspacl, n.nspowner, 'n'))
FROM pg_namespace n WHERE n.nspname IN ('pgflow', 'pgflow_exec');

-- name: default_privileges
SELECT n.nspname || ' ' || d.defaclobjtype::text, jsonb_build_object('acl', pg_temp.acl(d.defaclacl, d.defaclrole, 'f'))
FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace
WHERE n.nspname IN ('pgflow', 'pgflow_exec');

-- name: functions
SELECT p.oid::regprocedure::text, jsonb_build_object(
    'result', pg_get_function_result(p.oid), 'arguments', pg_get_function_arguments(p.oid),
    'kind', p.prokind, 'language', l.lanname, 'body', p.prosrc, 'volatility', p.provolatile,
    'strict', p.proisstrict, 'security_definer', p.prosecdef, 'leakproof', p.proleakproof,
    'parallel', p.proparallel, 'cost', p.procost, 'rows', p.prorows, 'config', p.proconfig,
    'acl', pg_temp.acl(p.proacl, p.proowner, 'f'))
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
WHERE p.pronamespace::regnamespace::text IN ('pgflow', 'pgflow_exec');

-- name: operators
SELECT o.oprnamespace::regnamespace::text || '.' || o.oprname || '(' || coalesce(format_type(o.oprleft, NULL), 'NONE')
       || ', ' || coalesce(format_type(o.oprright, NULL), 'NONE') || ')',
       jsonb_build_object('function', o.oprcode::regprocedure::text, 'result', format_type(o.oprresult, NULL),
                          'commutator', o.oprcom::regoperator::text, 'negator', o.oprnegate::regoperator::text)
FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode
WHERE p.pronamespace::regnamespace::text IN ('pgflow', 'pgflow_exec')
   OR o.oprnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec');

-- name: relations
SELECT c.oid::regclass::text, jsonb_build_object(
    'kind', c.relkind, 'persistence', c.relpersistence, 'options', c.reloptions,
    'row_security', c.relrowsecurity, 'force_row_security', c.relforcerowsecurity,
    'acl', pg_temp.acl(c.relacl, c.relowner, (CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END)::"char"))
FROM pg_class c
WHERE c.relnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec') AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S');

-- name: columns
-- the position among the live columns, not attnum: a column dropped once leaves a gap in attnum
SELECT a.attrelid::regclass::text || '.' || a.attname, jsonb_build_object(
    'position', row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum),
    'type', format_type(a.atttypid, a.atttypmod), 'not_null', a.attnotnull,
    'default', pg_get_expr(d.adbin, d.adrelid), 'identity', a.attidentity, 'generated', a.attgenerated,
    'collation', a.attcollation::regcollation::text, 'storage', a.attstorage,
    'acl', CASE WHEN a.attacl IS NOT NULL THEN pg_temp.acl(a.attacl, c.relowner, 'c') END)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec') AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped;

-- name: constraints
SELECT CASE WHEN con.conrelid <> 0 THEN con.conrelid::regclass::text ELSE con.contypid::regtype::text END || ' ' || con.conname,
       jsonb_build_object('type', con.contype, 'definition', pg_get_constraintdef(con.oid),
                          'deferrable', con.condeferrable, 'deferred', con.condeferred, 'validated', con.convalidated)
FROM pg_constraint con
WHERE con.connamespace::regnamespace::text IN ('pgflow', 'pgflow_exec');

-- name: indexes
SELECT i.indexrelid::regclass::text, jsonb_build_object('definition', pg_get_indexdef(i.indexrelid),
                                                        'options', c.reloptions)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE c.relnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec');

-- name: policies
SELECT p.schemaname || '.' || p.tablename || ' ' || p.policyname, jsonb_build_object(
    'permissive', p.permissive, 'roles', p.roles, 'command', p.cmd, 'using', p.qual, 'check', p.with_check)
FROM pg_policies p WHERE p.schemaname IN ('pgflow', 'pgflow_exec');

-- name: triggers
SELECT t.tgrelid::regclass::text || ' ' || t.tgname, jsonb_build_object('definition', pg_get_triggerdef(t.oid),
                                                                      'enabled', t.tgenabled)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE NOT t.tgisinternal AND c.relnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec');

-- name: sequences
SELECT s.schemaname || '.' || s.sequencename, jsonb_build_object(
    'type', s.data_type::text, 'start', s.start_value, 'min', s.min_value, 'max', s.max_value,
    'increment', s.increment_by, 'cycle', s.cycle, 'cache', s.cache_size)
FROM pg_sequences s WHERE s.schemaname IN ('pgflow', 'pgflow_exec');

-- name: types
-- domains, enums, composite and range types of pgflow's own (not the row types of its tables)
SELECT t.oid::regtype::text, jsonb_build_object(
    'kind', t.typtype, 'base', CASE WHEN t.typbasetype <> 0 THEN format_type(t.typbasetype, t.typtypmod) END,
    'not_null', t.typnotnull, 'default', t.typdefault,
    'labels', (SELECT jsonb_agg(e.enumlabel ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid),
    'acl', pg_temp.acl(t.typacl, t.typowner, 'T'))
FROM pg_type t
WHERE t.typnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec') AND t.typtype IN ('d', 'e', 'r', 'm')
   OR (t.typnamespace::regnamespace::text IN ('pgflow', 'pgflow_exec') AND t.typtype = 'c'
       AND (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c');

-- name: comments
SELECT (pg_identify_object(d.classoid, d.objoid, d.objsubid)).identity || ' (' ||
       (pg_identify_object(d.classoid, d.objoid, d.objsubid)).type || ')',
       jsonb_build_object('comment', d.description)
FROM pg_description d
WHERE (pg_identify_object(d.classoid, d.objoid, d.objsubid)).schema IN ('pgflow', 'pgflow_exec')
   OR (d.classoid = 'pg_namespace'::regclass
       AND d.objoid IN (SELECT oid FROM pg_namespace WHERE nspname IN ('pgflow', 'pgflow_exec')));
