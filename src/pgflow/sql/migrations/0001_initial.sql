-- pgflow schema, version 1.
-- Flow definitions live in Python code; the database keeps each *version* of a flow's shape so that an
-- instance keeps running the shape it started with, and so that the coordinator never imports user code.

CREATE SCHEMA IF NOT EXISTS pgflow;

CREATE TABLE pgflow.flows (
    flow_name   text        NOT NULL,
    version     text        NOT NULL,   -- hash of the shape
    ref         text,                   -- "module:attribute" where workers import the step code
    shape       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow_name, version)
);

-- One row per step of a flow version: lets set-based SQL find a step's dependencies.
CREATE TABLE pgflow.flow_steps (
    flow_name  text   NOT NULL,
    version    text   NOT NULL,
    step_name  text   NOT NULL,
    deps       text[] NOT NULL DEFAULT '{}',
    over       text,                    -- for a map: the step whose output list it fans out over
    PRIMARY KEY (flow_name, version, step_name),
    FOREIGN KEY (flow_name, version) REFERENCES pgflow.flows ON DELETE CASCADE
);

-- Queues pgflow created in pgmq (so workers and metrics can find "all pgflow queues").
CREATE TABLE pgflow.queues (
    queue_name  text PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgflow.instances (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_name     text        NOT NULL,
    flow_version  text        NOT NULL,
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    label         text,
    input         jsonb,
    output        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    FOREIGN KEY (flow_name, flow_version) REFERENCES pgflow.flows (flow_name, version)
);
CREATE INDEX instances_status_id ON pgflow.instances (status, id);
CREATE INDEX instances_flow_id ON pgflow.instances (flow_name, id);
CREATE INDEX instances_label_id ON pgflow.instances (label, id) WHERE label IS NOT NULL;
CREATE INDEX instances_finished_at ON pgflow.instances (finished_at) WHERE finished_at IS NOT NULL;

-- A step row exists once the coordinator has scheduled the step (no row = not reached yet).
-- task_index = -1 is the step itself; a map step additionally has one row per element (0..n-1).
CREATE TABLE pgflow.steps (
    instance_id      bigint      NOT NULL REFERENCES pgflow.instances ON DELETE CASCADE,
    step_name        text        NOT NULL,
    task_index       integer     NOT NULL DEFAULT -1,
    status           text        NOT NULL
                     -- 'mapping': a map step whose element tasks are running
                     CHECK (status IN ('queued', 'running', 'retrying', 'mapping', 'completed', 'failed',
                                       'cancelled')),
    queue            text,
    msg_id           bigint,
    attempt          integer     NOT NULL DEFAULT 0,
    output           jsonb,
    error            text,
    traceback        text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    next_attempt_at  timestamptz,
    PRIMARY KEY (instance_id, step_name, task_index)
);

-- "Look at this instance again": written by workers when a step ends and by start(); the coordinator
-- consumes them with SKIP LOCKED so several coordinators share the work.
CREATE TABLE pgflow.wakeups (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  bigint      NOT NULL,
    due_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wakeups_due_at ON pgflow.wakeups (due_at);

-- Register a flow version and create its queues. Idempotent and safe to call concurrently.
CREATE FUNCTION pgflow.register_flow(p_name text, p_version text, p_ref text, p_shape jsonb)
RETURNS void LANGUAGE plpgsql AS $$
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

CREATE FUNCTION pgflow.ensure_queue(p_queue text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgflow.queues WHERE queue_name = p_queue) THEN
        PERFORM pgmq.create(p_queue);
        INSERT INTO pgflow.queues (queue_name) VALUES (p_queue) ON CONFLICT DO NOTHING;
    END IF;
END $$;

-- Create an instance and wake the coordinator. Runs in the caller's transaction: a rollback means the
-- instance never existed.
CREATE FUNCTION pgflow.start_instance(p_flow text, p_version text, p_input jsonb, p_label text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    INSERT INTO pgflow.instances (flow_name, flow_version, input, label)
    VALUES (p_flow, p_version, p_input, p_label)
    RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (new_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;

-- Coordinator: push tasks onto a queue and record them as queued, in the coordinator's transaction.
CREATE FUNCTION pgflow.enqueue_tasks(
    p_queue text, p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_messages jsonb[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmq.send_batch(p_queue, p_messages);
    INSERT INTO pgflow.steps (instance_id, step_name, task_index, status, queue)
    SELECT u.instance_id, u.step_name, u.task_index, 'queued', p_queue
    FROM unnest(p_instance_ids, p_steps, p_tasks) AS u(instance_id, step_name, task_index);
    PERFORM pg_notify('pgflow_queue_' || p_queue, '');
END $$;

-- Worker: mark read messages' steps as running (attempt + 1) and return what the step needs to run.
-- Messages whose step is not runnable any more (instance cancelled or failed, step finished) return no row.
CREATE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, deps jsonb
) LANGUAGE sql AS $$
    WITH u AS (
        SELECT * FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks)
            AS u(msg_id, instance_id, step_name, task_index)
    ), claimed AS (
        UPDATE pgflow.steps s
        SET status = 'running', attempt = s.attempt + 1, started_at = clock_timestamp(),
            msg_id = u.msg_id, next_attempt_at = NULL
        FROM u, pgflow.instances i
        WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
          AND i.id = s.instance_id AND i.status = 'running'
          AND s.status IN ('queued', 'running', 'retrying')
        RETURNING u.msg_id, s.instance_id, s.step_name, s.task_index, s.attempt,
                  i.flow_name, i.flow_version, i.input
    )
    SELECT c.msg_id, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name, c.flow_version,
           -- a task of a map over the input gets its element, not the whole input list (no N^2 reads)
           CASE WHEN c.task_index >= 0 AND fs.over = 'input' THEN NULL ELSE c.input END,
           (SELECT jsonb_object_agg(d.step_name, d.output)
              FROM pgflow.steps d
             WHERE d.instance_id = c.instance_id AND d.task_index = -1 AND d.step_name = ANY (fs.deps)
               -- likewise a map task gets its element from the message, not the list it fans out over
               AND (c.task_index < 0 OR d.step_name IS DISTINCT FROM fs.over)) AS deps
    FROM claimed c
    JOIN pgflow.flow_steps fs
      ON fs.flow_name = c.flow_name AND fs.version = c.flow_version AND fs.step_name = c.step_name;
$$;

-- Worker: checkpoint finished tasks and acknowledge their messages in one transaction.
-- A checkpoint only lands for the attempt that is still current; a message is deleted unless a newer
-- attempt of the same task is live (then that attempt owns the message).
CREATE FUNCTION pgflow.complete_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[], p_outputs jsonb[]
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE pgflow.steps s
    SET status = 'completed', output = u.output, finished_at = clock_timestamp(), error = NULL
    FROM unnest(p_instance_ids, p_steps, p_tasks, p_attempts, p_outputs)
        AS u(instance_id, step_name, task_index, attempt, output)
    WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
      AND s.status = 'running' AND s.attempt = u.attempt;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pgmq.delete(p_queue, ARRAY(
        SELECT u.msg_id
        FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks, p_attempts)
            AS u(msg_id, instance_id, step_name, task_index, attempt)
        WHERE NOT EXISTS (
            SELECT 1 FROM pgflow.steps s
            WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name
              AND s.task_index = u.task_index AND s.status IN ('running', 'retrying')
              AND s.attempt > u.attempt)));
    INSERT INTO pgflow.wakeups (instance_id) SELECT DISTINCT unnest(p_instance_ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN n;
END $$;

-- Worker: record a failed attempt. With p_retry_in (seconds) the message becomes visible again after the
-- backoff; without it the step has failed for good, its message is archived (never dropped) and the
-- coordinator is woken to fail the instance.
CREATE FUNCTION pgflow.fail_task(
    p_queue text, p_msg_id bigint, p_instance_id bigint, p_step text, p_task integer, p_attempt integer,
    p_error text, p_traceback text, p_retry_in double precision
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_retry_in IS NOT NULL THEN
        UPDATE pgflow.steps
        SET status = 'retrying', error = p_error, traceback = p_traceback,
            next_attempt_at = clock_timestamp() + make_interval(secs => p_retry_in)
        WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
          AND status = 'running' AND attempt = p_attempt;
        IF FOUND THEN
            PERFORM pgmq.set_vt(p_queue, p_msg_id, clock_timestamp() + make_interval(secs => p_retry_in));
        END IF;
        RETURN;
    END IF;
    UPDATE pgflow.steps
    SET status = 'failed', error = p_error, traceback = p_traceback, finished_at = clock_timestamp()
    WHERE instance_id = p_instance_id AND step_name = p_step AND task_index = p_task
      AND status = 'running' AND attempt = p_attempt;
    PERFORM pgmq.archive(p_queue, p_msg_id);
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_instance_id);
    PERFORM pg_notify('pgflow_coordinator', '');
END $$;

-- Worker on shutdown: give back claimed tasks it has not started, without spending an attempt.
CREATE FUNCTION pgflow.release_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[]
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pgflow.steps s
    SET status = 'queued', attempt = s.attempt - 1, started_at = NULL
    FROM unnest(p_instance_ids, p_steps, p_tasks, p_attempts) AS u(instance_id, step_name, task_index, attempt)
    WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
      AND s.status = 'running' AND s.attempt = u.attempt;
    PERFORM pgmq.set_vt(p_queue, p_msg_ids, 0);
END $$;

-- Cancel an instance: its unfinished steps stop counting; queued messages are archived by the workers
-- that read them (the claim finds nothing runnable), so no message is lost or run.
CREATE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF st NOT IN ('pending', 'running') THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
    WHERE instance_id = p_id AND status IN ('queued', 'running', 'retrying', 'mapping');
    PERFORM pg_notify('pgflow_instance_done', p_id::text);
    RETURN 'cancelled';
END $$;
