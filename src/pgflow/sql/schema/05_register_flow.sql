-- Registering a flow version: its shape, one row per step, and its queues. Idempotent and safe to call
-- concurrently. A definer function: flows are shared, registered by anyone allowed to start them, so users
-- need no write access to the flow tables.

CREATE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow AS $$
DECLARE
    q text;
BEGIN
    IF EXISTS (SELECT 1 FROM pgflow.flows WHERE flow_name = p_name AND version = p_version) THEN
        RETURN;
    END IF;
    INSERT INTO pgflow.flows (flow_name, version, ref, shape)
    VALUES (p_name, p_version, p_ref, p_shape)
    ON CONFLICT DO NOTHING;
    INSERT INTO pgflow.flow_steps (flow_name, version, step_name, deps, over)
    SELECT p_name, p_version, s->>'name',
           ARRAY(SELECT jsonb_array_elements_text(s->'deps')), s->>'over'
    FROM jsonb_array_elements(p_shape->'steps') AS s
    ON CONFLICT DO NOTHING;
    FOR q IN SELECT DISTINCT s->>'queue' FROM jsonb_array_elements(p_shape->'steps') AS s LOOP
        PERFORM pgflow.ensure_queue(q);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.register_flow(text, text, text, jsonb) FROM PUBLIC;
