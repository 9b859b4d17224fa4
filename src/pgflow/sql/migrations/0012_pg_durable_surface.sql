-- compatible-from: 1
-- Issue 13 (the pg_durable surface): a result name is checked when |=> / pgflow.named gives it
-- (schema/12_tree_nodes.sql). Only replacements: code of earlier schema versions keeps working.

-- A result's name is checked when it is given (an error at the line that named it, not at start).
CREATE OR REPLACE FUNCTION pgflow.named(p_node text, p_name text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_name IS NOT NULL AND (p_name !~ '^[A-Za-z_][A-Za-z0-9_]*$' OR p_name IN ('input', 'vars', 'item')) THEN
        RAISE EXCEPTION 'pgflow: result name % is not a valid identifier (letters, digits and _, not starting '
                        'with a digit; not input, vars or item)', left(p_name, 80) USING ERRCODE = '22023';
    END IF;
    RETURN jsonb_build_object('t', 'name', 'name', p_name, 'c', jsonb_build_array(pgflow.node(p_node)))::text;
END $$;
