-- Limits: named rate limits (requests and/or cost per interval) and concurrency limits, enforced when
-- workers claim tasks (08_read_and_claim.sql), in PostgreSQL, so every worker on every host shares them.
--
-- A step that consumes a limit has its name (and, for a limit per key, the key: e.g. a tenant) in its
-- messages' headers. Rates are paced with GCRA (the "virtual scheduling" form of a token bucket): each
-- admitted task moves the limit's next free time on by per/requests seconds (and by its estimated cost
-- times per/cost); a task is admitted when that time has come, up to `burst` requests early. So a window
-- of `per` seconds never sees more than requests + burst - 1 admissions, and with plenty of work the rate
-- is the limit itself. A task that is not admitted is not claimed and spends no attempt: its message is
-- parked (hidden until its turn). Turns are reserved on a second schedule (request_reserved, cost_reserved)
-- so that each waiting task is read about once instead of polling; the admission itself always checks the
-- real clock (request_at, cost_at), so a task that comes back late never makes a burst. Concurrency is
-- counted from the step rows of the tasks holding the limit: a holder whose step is no longer running
-- (completed, failed, parked back, or redelivered after a crash) frees its slot.

CREATE TABLE pgflow.limits (
    name         text        PRIMARY KEY CHECK (name ~ '^[A-Za-z_][A-Za-z0-9_.:-]{0,62}$'),
    requests     integer     CHECK (requests > 0),               -- requests (task starts) per `per` seconds
    cost         double precision CHECK (cost > 0),              -- cost units (e.g. tokens) per `per` seconds
    per          double precision NOT NULL DEFAULT 60 CHECK (per > 0 AND per <= 86400),
    concurrency  integer     CHECK (concurrency > 0),            -- tasks running at once (per key)
    burst        integer     NOT NULL DEFAULT 1 CHECK (burst >= 1),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (requests IS NOT NULL OR cost IS NOT NULL OR concurrency IS NOT NULL)
);

-- The state of a limit, per key ('' when the limit has no key).
CREATE TABLE pgflow.limit_state (
    name           text        NOT NULL REFERENCES pgflow.limits ON DELETE CASCADE,
    key            text        NOT NULL DEFAULT '',
    request_at     timestamptz NOT NULL DEFAULT '-infinity',  -- when the next request may start (GCRA)
    cost_at        timestamptz NOT NULL DEFAULT '-infinity',  -- when the cost budget is paid up (GCRA)
    request_reserved timestamptz NOT NULL DEFAULT '-infinity', -- the same, counting parked tasks' turns
    cost_reserved  timestamptz NOT NULL DEFAULT '-infinity',
    blocked_until  timestamptz,                                -- a step was told to wait (RateLimited, 429)
    avg_cost       double precision,                           -- of recent tasks: the estimate reserved
    PRIMARY KEY (name, key)
);

-- Tasks admitted under a concurrency limit; they hold a slot while their step row is 'running'.
CREATE TABLE pgflow.limit_holders (
    instance_id  bigint  NOT NULL REFERENCES pgflow.instances ON DELETE CASCADE,
    step_name    text    NOT NULL,
    task_index   integer NOT NULL,
    name         text    NOT NULL,
    key          text    NOT NULL,
    PRIMARY KEY (instance_id, step_name, task_index)
);
CREATE INDEX limit_holders_name_key ON pgflow.limit_holders (name, key);

-- Declare or change a limit (from SQL, or by the coordinator for limits declared in flow code).
CREATE FUNCTION pgflow.define_limit(
    p_name text, p_requests integer DEFAULT NULL, p_cost double precision DEFAULT NULL,
    p_per double precision DEFAULT 60, p_concurrency integer DEFAULT NULL, p_burst integer DEFAULT 1
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgflow.limits AS l (name, requests, cost, per, concurrency, burst)
    VALUES (p_name, p_requests, p_cost, coalesce(p_per, 60), p_concurrency, coalesce(p_burst, 1))
    ON CONFLICT (name) DO UPDATE
    SET requests = excluded.requests, cost = excluded.cost, per = excluded.per,
        concurrency = excluded.concurrency, burst = excluded.burst, updated_at = now()
    WHERE (l.requests, l.cost, l.per, l.concurrency, l.burst) IS DISTINCT FROM
          (excluded.requests, excluded.cost, excluded.per, excluded.concurrency, excluded.burst);
$$;
REVOKE ALL ON FUNCTION pgflow.define_limit(text, integer, double precision, double precision, integer, integer)
    FROM PUBLIC;

-- [{"name", "requests", "cost", "per", "concurrency", "burst"}, ...]: the limits a flow's code declares.
CREATE FUNCTION pgflow.define_limits(p_limits jsonb) RETURNS void LANGUAGE sql AS $$
    SELECT pgflow.define_limit(l.name, l.requests, l.cost, l.per, l.concurrency, l.burst)
    FROM jsonb_to_recordset(p_limits)
        AS l(name text, requests integer, cost double precision, per double precision, concurrency integer,
             burst integer)
    ORDER BY l.name;
$$;
REVOKE ALL ON FUNCTION pgflow.define_limits(jsonb) FROM PUBLIC;

-- Admission of a batch just read (pgflow.read_tasks): returns the ids of the messages it parked. Limits are
-- taken in name order (row locks in one order: no deadlock between workers), tasks in the order read.
-- A limit that is not defined limits nothing.
CREATE FUNCTION pgflow.admit_tasks(p_queue text, p_msgs pgmq.message_record[]) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    now_ timestamptz := clock_timestamp();
    lim record;
    st pgflow.limit_state;
    task record;
    step_r interval;        -- GCRA emission interval of requests
    early interval;         -- how early a request may come (burst - 1 intervals)
    est double precision;   -- cost reserved per task
    step_c interval;
    running integer;
    waiting integer;
    due timestamptz;
    paid boolean;
    ids bigint[] := '{}';
    vts timestamptz[] := '{}';
    hdrs jsonb[] := '{}';
    holders jsonb := '[]';
BEGIN
    FOR lim IN
        SELECT DISTINCT l.*, coalesce(r.headers->>'limit_key', '') AS key
        FROM unnest(p_msgs) r JOIN pgflow.limits l ON l.name = r.headers->>'limit'
        WHERE pgflow.is_task_message(r.message)
        ORDER BY l.name, key
    LOOP
        INSERT INTO pgflow.limit_state (name, key) VALUES (lim.name, lim.key) ON CONFLICT DO NOTHING;
        SELECT * INTO st FROM pgflow.limit_state WHERE name = lim.name AND key = lim.key FOR UPDATE;
        step_r := make_interval(secs => lim.per / lim.requests);
        early := (lim.burst - 1) * step_r;
        -- until real costs are known (charge_limit), a task is assumed to cost a request's share of the
        -- budget, or 5% of it
        est := coalesce(st.avg_cost, lim.cost / lim.requests, lim.cost * 0.05);
        step_c := make_interval(secs => est * lim.per / lim.cost);
        IF lim.concurrency IS NOT NULL THEN
            DELETE FROM pgflow.limit_holders h
            WHERE h.name = lim.name AND h.key = lim.key AND NOT EXISTS (
                SELECT 1 FROM pgflow.steps s
                WHERE s.instance_id = h.instance_id AND s.step_name = h.step_name AND s.task_index = h.task_index
                  AND s.status = 'running');
            SELECT count(*) INTO running FROM pgflow.limit_holders WHERE name = lim.name AND key = lim.key;
        END IF;
        waiting := 0;
        FOR task IN
            SELECT r.msg_id, r.headers, r.message
            FROM unnest(p_msgs) WITH ORDINALITY AS r
            WHERE r.headers->>'limit' = lim.name AND coalesce(r.headers->>'limit_key', '') = lim.key
              AND pgflow.is_task_message(r.message)
            ORDER BY ordinality
        LOOP
            -- its turn: reserved when it was parked (unless a block came since), else the next free one
            paid := task.headers ? 'slot' AND (st.blocked_until IS NULL OR st.blocked_until <= now_);
            IF NOT paid THEN
                due := greatest(now_, st.blocked_until,
                                CASE WHEN lim.requests IS NOT NULL THEN st.request_reserved - early END,
                                CASE WHEN lim.cost IS NOT NULL THEN st.cost_reserved END);
                IF lim.requests IS NOT NULL THEN
                    st.request_reserved := greatest(st.request_reserved, due) + step_r;
                END IF;
                IF lim.cost IS NOT NULL THEN
                    st.cost_reserved := greatest(st.cost_reserved, due) + step_c;
                END IF;
                IF due > now_ THEN  -- parked until its turn, which is reserved for it
                    ids := ids || task.msg_id;
                    vts := vts || due;
                    hdrs := hdrs || jsonb_build_object('parked', true, 'slot', extract(epoch FROM due));
                    CONTINUE;
                END IF;
            END IF;
            -- the real clock: never more than the limit at once, even when turns come back late together
            due := greatest(CASE WHEN lim.requests IS NOT NULL THEN st.request_at - early END,
                            CASE WHEN lim.cost IS NOT NULL THEN st.cost_at END);
            IF due > now_ OR (lim.concurrency IS NOT NULL AND running >= lim.concurrency) THEN
                -- look again at the next free moment, or shortly for a concurrency slot (spread out)
                waiting := waiting + 1;
                ids := ids || task.msg_id;
                vts := vts || greatest(due, now_ + make_interval(
                    secs => CASE WHEN lim.concurrency IS NOT NULL AND running >= lim.concurrency
                                 THEN least(2.0, 0.05 * waiting) + random() * 0.05 ELSE 0 END));
                hdrs := hdrs || jsonb_build_object('parked', true, 'slot', extract(epoch FROM now_));
                CONTINUE;
            END IF;
            IF lim.requests IS NOT NULL THEN
                st.request_at := greatest(st.request_at, now_) + step_r;
            END IF;
            IF lim.cost IS NOT NULL THEN
                st.cost_at := greatest(st.cost_at, now_) + step_c;
            END IF;
            IF lim.concurrency IS NOT NULL THEN
                running := running + 1;
                holders := holders || jsonb_build_object(
                    'instance_id', task.message->'instance', 'step_name', task.message->'step',
                    'task_index', task.message->'task', 'name', lim.name, 'key', lim.key);
            END IF;
            IF task.headers ? 'slot' THEN  -- its reserved turn is used: a retry waits for a new one
                ids := ids || task.msg_id;
                vts := vts || NULL::timestamptz;
                hdrs := hdrs || NULL::jsonb;
            END IF;
        END LOOP;
        UPDATE pgflow.limit_state
        SET request_at = st.request_at, cost_at = st.cost_at, request_reserved = st.request_reserved,
            cost_reserved = st.cost_reserved
        WHERE name = lim.name AND key = lim.key;
    END LOOP;
    IF jsonb_array_length(holders) > 0 THEN
        INSERT INTO pgflow.limit_holders (instance_id, step_name, task_index, name, key)
        SELECT h.instance_id, h.step_name, h.task_index, h.name, h.key
        FROM jsonb_to_recordset(holders) AS h(instance_id bigint, step_name text, task_index integer, name text,
                                              key text)
        ON CONFLICT (instance_id, step_name, task_index) DO UPDATE SET name = excluded.name, key = excluded.key;
    END IF;
    IF cardinality(ids) > 0 THEN
        EXECUTE format('UPDATE pgmq.%I q SET vt = coalesce(p.vt, q.vt), '
                       'headers = CASE WHEN p.h IS NULL THEN q.headers - ''slot'' - ''parked'' '
                       'ELSE coalesce(q.headers, ''{}'') || p.h END '
                       'FROM unnest($1, $2, $3) AS p(msg_id, vt, h) WHERE q.msg_id = p.msg_id', 'q_' || p_queue)
        USING ids, vts, hdrs;
    END IF;
    RETURN ARRAY(SELECT i FROM unnest(ids, vts) AS p(i, v) WHERE v IS NOT NULL);
END $$;
REVOKE ALL ON FUNCTION pgflow.admit_tasks(text, pgmq.message_record[]) FROM PUBLIC;

-- A step said "not now" (pgflow.RateLimited, an HTTP 429 with Retry-After): its task goes back to 'queued'
-- without spending the attempt, its message is parked for p_seconds, and its limit (if it has one) holds
-- back every other task until then.
CREATE FUNCTION pgflow.park_task(
    p_queue text, p_msg_id bigint, p_instance_id bigint, p_step text, p_task integer, p_attempt integer,
    p_seconds double precision
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    until timestamptz := clock_timestamp() + make_interval(secs => greatest(p_seconds, 0));
    h jsonb;
BEGIN
    UPDATE pgflow.steps
    SET status = 'queued', attempt = attempt - 1, started_at = NULL
    WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
      AND status = 'running' AND attempt = p_attempt;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    EXECUTE format('UPDATE pgmq.%I SET vt = $2, headers = coalesce(headers, ''{}'') - ''slot'' || ''{"parked": true}'' '
                   'WHERE msg_id = $1 RETURNING headers', 'q_' || p_queue)
    INTO h USING p_msg_id, until;
    IF h ? 'limit' AND EXISTS (SELECT 1 FROM pgflow.limits WHERE name = h->>'limit') THEN
        INSERT INTO pgflow.limit_state AS s (name, key, blocked_until)
        VALUES (h->>'limit', coalesce(h->>'limit_key', ''), until)
        ON CONFLICT (name, key) DO UPDATE SET blocked_until = greatest(s.blocked_until, excluded.blocked_until);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.park_task(text, bigint, bigint, text, integer, integer, double precision) FROM PUBLIC;

-- A task's actual cost, known once the worker has its element(s): the reservation made at admission (the
-- recent average) is corrected, so a window's cost stays within the limit up to one estimate's error.
CREATE FUNCTION pgflow.charge_limit(p_name text, p_key text, p_cost double precision) RETURNS void
LANGUAGE sql AS $$
    UPDATE pgflow.limit_state s
    SET cost_at = s.cost_at + make_interval(secs => (p_cost - coalesce(s.avg_cost, l.cost / l.requests, l.cost * 0.05)) * l.per / l.cost),
        cost_reserved = s.cost_reserved
                        + make_interval(secs => (p_cost - coalesce(s.avg_cost, l.cost / l.requests, l.cost * 0.05)) * l.per / l.cost),
        avg_cost = coalesce(0.8 * s.avg_cost + 0.2 * p_cost, p_cost)
    FROM pgflow.limits l
    WHERE l.name = s.name AND s.name = p_name AND s.key = coalesce(p_key, '') AND l.cost IS NOT NULL;
$$;
REVOKE ALL ON FUNCTION pgflow.charge_limit(text, text, double precision) FROM PUBLIC;

-- When a worker with nothing to do should look again: the first parked message of a queue to come due (in
-- seconds, NULL when none is parked), so tasks a limit held back start on time, not at the next poll.
CREATE FUNCTION pgflow.next_parked_in(p_queue text) RETURNS double precision
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pgflow, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off SET enable_sort = off AS $$
DECLARE
    due timestamptz;
BEGIN
    EXECUTE format('SELECT min(vt) FROM pgmq.%I WHERE (headers->>''parked'') IS NOT NULL', 'q_' || p_queue) INTO due;
    -- greatest() skips NULLs: without the CASE, no parked message would read as "due now" and an idle
    -- worker would poll without pause
    RETURN CASE WHEN due IS NOT NULL THEN greatest(0, extract(epoch FROM due - clock_timestamp())) END;
END $$;
REVOKE ALL ON FUNCTION pgflow.next_parked_in(text) FROM PUBLIC;
