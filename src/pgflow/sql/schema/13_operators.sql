-- Operators for building workflows in SQL (README "Coming from pg_durable"): ~> sequence, & join, | race,
-- ?> if, !> else, |=> name a result, @> loop. PostgreSQL gives all user-defined operators the same
-- precedence, associating to the left: parenthesise mixed expressions.
--
-- They are created in public when the role running init may create there (so that psql users need no
-- OPERATOR(pgflow.~>) syntax), else in pgflow.

CREATE FUNCTION pgflow._op_seq(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('seq', $1, $2) $$;
REVOKE ALL ON FUNCTION pgflow._op_seq(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._op_join(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('join', $1, $2) $$;
REVOKE ALL ON FUNCTION pgflow._op_join(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._op_race(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._compose('race', $1, $2) $$;
REVOKE ALL ON FUNCTION pgflow._op_race(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._op_if(text, text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.if_then($1, $2) $$;
REVOKE ALL ON FUNCTION pgflow._op_if(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._op_else(p_if text, p_else text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    node jsonb := pgflow.node(p_if);
BEGIN
    IF node->>'t' IS DISTINCT FROM 'if' OR jsonb_array_length(node->'c') <> 2 THEN
        RAISE EXCEPTION 'pgflow: !> needs an if without else on its left (cond ?> then !> else), got %',
            left(p_if, 200) USING ERRCODE = '22023';
    END IF;
    RETURN jsonb_set(node, '{c}', (node->'c') || jsonb_build_array(pgflow.node(p_else)))::text;
END $$;
REVOKE ALL ON FUNCTION pgflow._op_else(text, text) FROM PUBLIC;

DO $ops$
DECLARE
    target text := CASE WHEN has_schema_privilege('public', 'CREATE') THEN 'public' ELSE 'pgflow' END;
BEGIN
    EXECUTE format('CREATE OPERATOR %I.~> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_seq)', target);
    EXECUTE format('CREATE OPERATOR %I.& (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_join)', target);
    EXECUTE format('CREATE OPERATOR %I.| (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_race)', target);
    EXECUTE format('CREATE OPERATOR %I.?> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_if)', target);
    EXECUTE format('CREATE OPERATOR %I.!> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow._op_else)', target);
    EXECUTE format('CREATE OPERATOR %I.|=> (LEFTARG = text, RIGHTARG = text, FUNCTION = pgflow.named)', target);
    EXECUTE format('CREATE OPERATOR %I.@> (RIGHTARG = text, FUNCTION = pgflow.loop)', target);
END $ops$;
