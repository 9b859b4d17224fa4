-- pgflow schema, version 8: queues a worker or `pgflow init --queue` can create before any flow names them,
-- compatible-from: 7
-- and a depth an autoscaler can read for a queue that does not exist yet.
--
-- A worker started with `--queue ops` on a fresh database used to crash-loop on `relation "pgmq.q_ops" does
-- not exist`, and so did KEDA's depth query. Now the worker creates the queues it serves, and KEDA reads
-- pgflow.queue_backlog, which answers 0 for a queue that does not exist.

-- Queue names become table names (pgmq.q_<name>): lower case, a letter first, at most 47 characters (pgmq's
-- limit). pgmq itself lower-cases names, so 'Upper' would create q_upper and then be looked up as q_Upper.
CREATE FUNCTION pgflow.check_queue_name(p_queue text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z][a-z0-9_]{0,46}$' THEN
        RAISE EXCEPTION 'pgflow: invalid queue name %: use 1 to 47 lower-case letters, digits or _, '
                        'starting with a letter', coalesce(quote_literal(left(p_queue, 60)), 'NULL')
              USING ERRCODE = '22023';
    END IF;
    RETURN p_queue;
END $$;

-- Idempotent and safe between replicas that start at once: the first INSERT of the name wins the unique
-- index, concurrent ones wait for it to commit and then insert nothing, so pgmq.create runs once.
CREATE OR REPLACE FUNCTION pgflow.ensure_queue(p_queue text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    PERFORM pgflow.check_queue_name(p_queue);
    INSERT INTO pgflow.queues (queue_name) VALUES (p_queue) ON CONFLICT DO NOTHING;
    IF FOUND THEN
        PERFORM pgmq.create(p_queue);
    END IF;
END $$;

-- What an autoscaler scales a queue's workers on: the messages ready to run plus those being run (read and
-- still hidden), so that scaling to zero never removes a worker holding an in-flight step. Messages delayed
-- for a retry's backoff count too: they will need a worker soon. A queue that does not exist has 0.
CREATE FUNCTION pgflow.queue_backlog(p_queue text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = p_queue) THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT count(*) FROM pgmq.%I', 'q_' || p_queue) INTO n;
    RETURN n;
END $$;

-- like every pgflow function: nothing for PUBLIC (pgflow.grant_usage grants what users may call)
REVOKE ALL ON FUNCTION pgflow.check_queue_name(text), pgflow.queue_backlog(text) FROM PUBLIC;
