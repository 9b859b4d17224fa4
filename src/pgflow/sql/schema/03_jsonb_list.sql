-- Passing lists of JSON values: a client sends one JSON document instead of a jsonb[] array literal, whose
-- per-element quoting cost the coordinator ~20% of its time in psycopg's array dumper. Used by the named
-- queries that enqueue tasks, complete tasks and start many instances.

-- A list of JSON values passed as one jsonb array, as the jsonb[] the engine's functions take. Elements keep
-- their order; JSON null stays a JSON null.
CREATE FUNCTION pgflow.jsonb_list(p jsonb) RETURNS jsonb[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT e FROM jsonb_array_elements(p) WITH ORDINALITY AS x(e, n) ORDER BY n)
$$;
REVOKE ALL ON FUNCTION pgflow.jsonb_list(jsonb) FROM PUBLIC;
