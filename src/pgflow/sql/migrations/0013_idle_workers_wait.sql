-- compatible-from: 1
-- pgflow.next_parked_in answered 0 ("due now") instead of NULL when no message was parked (greatest()
-- skips NULLs), so an idle worker read its queues without pause: twice the transactions per step in the
-- chain benchmark and a busy core on an idle system. schema/22_limits.sql. A replacement only.

CREATE OR REPLACE FUNCTION pgflow.next_parked_in(p_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    due timestamptz;
BEGIN
    EXECUTE format('SELECT min(vt) FROM pgmq.%I WHERE (headers->>''parked'') IS NOT NULL', 'q_' || p_queue) INTO due;
    -- greatest() skips NULLs: without the CASE, no parked message would read as "due now" and an idle
    -- worker would poll without pause
    RETURN CASE WHEN due IS NOT NULL THEN greatest(0, extract(epoch FROM due - clock_timestamp())) END;
END $$;
