-- pgflow schema, version 1: the baseline.
--
-- GENERATED AND FROZEN: NEVER EDIT THIS FILE. It is a verbatim copy of src/pgflow/sql/schema/*.sql, in
-- file-name order, taken when the development migrations 0001-0010 were squashed into one (nothing had
-- been released). Databases that applied it keep what they applied: to change the schema, edit schema/
-- (the current truth) and add a migration 0002_<what>.sql that brings a database from here to the same
-- place; tests/db/test_schema.py checks that a database built from schema/ and one built from the migrations
-- are the same.

-- ====================================================================================================
-- schema/00_schemas.sql
-- ====================================================================================================

-- Schemas: pgflow holds the engine's tables and functions; pgflow_exec holds one executor function per role
-- granted usage (see 19_executors.sql), kept apart so that those role-owned functions never sit among
-- pgflow's own.
--
-- Nothing is granted to PUBLIC: pgflow.grant_usage(role) grants a role what it needs (20_usage.sql). Every
-- function is followed by its `REVOKE ALL ... FROM PUBLIC` (PostgreSQL grants EXECUTE to PUBLIC on creation,
-- and per-schema default privileges cannot take away a privilege granted globally, so only an explicit
-- REVOKE makes a function owner-only).

CREATE SCHEMA IF NOT EXISTS pgflow;
REVOKE ALL ON SCHEMA pgflow FROM PUBLIC;

CREATE SCHEMA pgflow_exec;
REVOKE ALL ON SCHEMA pgflow_exec FROM PUBLIC;

-- ====================================================================================================
-- schema/01_statuses.sql
-- ====================================================================================================

-- Status vocabularies, defined once. The tables' status columns have these domains, and every function or
-- named query that needs a *set* of statuses ("still open", "a worker may claim it") calls the functions
-- below instead of spelling the set out. The Python side is src/pgflow/statuses.py; tests/db/test_schema.py
-- checks that both say the same.
--
-- An instance is 'pending' until the coordinator first looks at it, 'running' until it ends 'completed',
-- 'failed' or 'cancelled'.
--
-- A step row (a DAG step, a map task, or a node of a control-flow workflow) is:
--   queued     its message is on a queue, not yet claimed
--   running    claimed by a worker (or, for a composite node, some child is still open)
--   retrying   an attempt failed; its message becomes visible again after the backoff
--   mapping    a map step whose element tasks are running
--   waiting    a timer or signal wait, completed by the coordinator
--   completed, failed, cancelled (the instance was cancelled or failed), skipped (a branch an if did not
--   take, the losers of a race)

CREATE DOMAIN pgflow.instance_status AS text
    CHECK (VALUE IN ('pending', 'running', 'completed', 'failed', 'cancelled'));

CREATE DOMAIN pgflow.step_status AS text
    CHECK (VALUE IN ('queued', 'running', 'retrying', 'mapping', 'waiting', 'completed', 'failed', 'cancelled',
                     'skipped'));

-- Instances that are not finished: they may still be started, signalled, cancelled.
CREATE FUNCTION pgflow.open_instance_statuses() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['pending', 'running']
$$;
REVOKE ALL ON FUNCTION pgflow.open_instance_statuses() FROM PUBLIC;

-- Steps that are not finished: cancelling or failing an instance cancels these.
CREATE FUNCTION pgflow.open_step_statuses() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['queued', 'running', 'retrying', 'mapping', 'waiting']
$$;
REVOKE ALL ON FUNCTION pgflow.open_step_statuses() FROM PUBLIC;

-- Open steps that have a message out on a queue: a worker reading it may claim the step (again, for a
-- redelivery of a 'running' one whose worker died). Every open step is one of these, a 'mapping' parent
-- (its element tasks are) or a 'waiting' timer or signal wait.
CREATE FUNCTION pgflow.claimable_step_statuses() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['queued', 'running', 'retrying']
$$;
REVOKE ALL ON FUNCTION pgflow.claimable_step_statuses() FROM PUBLIC;

-- ====================================================================================================
-- schema/02_tables.sql
-- ====================================================================================================

-- Tables: what the engine knows, and why each table exists. Functions that change these rows live in the
-- files after this one, one file per state transition.
--
-- Flow definitions live in Python code (or are built in SQL); the database keeps each *version* of a
-- flow's shape, so that an instance keeps running the shape it started with and the coordinator never
-- imports user code.

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

-- One row per started workflow. `owner` (the role that started it) decides who may see it (row-level
-- security, 18_roles_and_rls.sql) and as whom its SQL steps run; `variables` and `secret_refs` are the
-- owner's variables and secret references as they were at start.
--
-- The trace context (OpenTelemetry, W3C traceparent) reaches the row through the transaction-local
-- setting pgflow.trace_context, read by the column's default: the start functions keep their signatures,
-- roles need no privilege on the column, and one setting serves start_instance and start_instances alike.
-- Anything that is not a well-formed traceparent is not kept.
CREATE TABLE pgflow.instances (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_name     text        NOT NULL,
    flow_version  text        NOT NULL,
    status        pgflow.instance_status NOT NULL DEFAULT 'pending',
    label         text,
    input         jsonb,
    output        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    variables     jsonb,
    owner         name        NOT NULL DEFAULT current_user,
    secret_refs   jsonb,
    trace_context text DEFAULT (
        CASE WHEN current_setting('pgflow.trace_context', true) ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
             THEN current_setting('pgflow.trace_context', true) END),
    FOREIGN KEY (flow_name, flow_version) REFERENCES pgflow.flows (flow_name, version)
);
CREATE INDEX instances_status_id ON pgflow.instances (status, id);
CREATE INDEX instances_flow_id ON pgflow.instances (flow_name, id);
CREATE INDEX instances_label_id ON pgflow.instances (label, id) WHERE label IS NOT NULL;
CREATE INDEX instances_finished_at ON pgflow.instances (finished_at) WHERE finished_at IS NOT NULL;

-- A step row exists once the coordinator has scheduled the step (no row = not reached yet).
-- task_index = -1 is the step itself; a map step additionally has one row per element (0..n-1).
-- In a control-flow workflow (a tree of nodes) the step name is the node's path ("r", "r.0", "r.0.1", ...)
-- and composite nodes have rows too. The statuses are described in 01_statuses.sql.
--
-- fillfactor 70 leaves room in pages so that status changes (queued -> running -> completed, none of them
-- on an indexed column) can be HOT updates: no index writes, less WAL, less bloat (measured before: 40% of
-- step updates were HOT in a 5,000-chain run).
CREATE TABLE pgflow.steps (
    instance_id      bigint      NOT NULL REFERENCES pgflow.instances ON DELETE CASCADE,
    step_name        text        NOT NULL,
    task_index       integer     NOT NULL DEFAULT -1,
    status           pgflow.step_status NOT NULL,
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
    -- [[column, SQL type], ...] of a SQL step's result, in order: `$name` is its first column, `$name.*` a
    -- typed relation
    columns          jsonb,
    PRIMARY KEY (instance_id, step_name, task_index)
) WITH (fillfactor = 70);

-- "Look at this instance again": written by workers when a step ends, by starts, signals and timers; the
-- coordinator consumes them with SKIP LOCKED so several coordinators share the work. The index on
-- (due_at, id) serves the coordinator's claim_wakeups query (sql/queries/coordinator.sql).
CREATE TABLE pgflow.wakeups (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  bigint      NOT NULL,
    due_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wakeups_due_at_id ON pgflow.wakeups (due_at, id);

-- Signals sent to instances; kept until a wait consumes them (so one sent early is not lost).
CREATE TABLE pgflow.signals (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    instance_id  bigint      NOT NULL REFERENCES pgflow.instances ON DELETE CASCADE,
    name         text        NOT NULL,
    data         jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    consumed_at  timestamptz,
    consumed_by  text                   -- the node path of the wait that received it
);
CREATE INDEX signals_pending ON pgflow.signals (instance_id, name, id) WHERE consumed_at IS NULL;

-- Per-user named values, copied into an instance when it starts ($vars.name, ctx.vars). A secret is a
-- reference ('env:NAME' or 'file:/path'), resolved by the worker when an HTTP step uses it: the value itself
-- is never stored.
CREATE TABLE pgflow.variables (
    owner       name        NOT NULL DEFAULT current_user,
    name        text        NOT NULL,
    value       jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    secret_ref  text
                CHECK (secret_ref IS NULL OR secret_ref ~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$'),
    PRIMARY KEY (owner, name)
);

-- Messages put aside without running (undecodable, unknown flow version...), with the reason.
CREATE TABLE pgflow.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text        NOT NULL,
    msg_id      bigint      NOT NULL,
    message     jsonb,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- What grant_usage gave each role beyond the basics.
CREATE TABLE pgflow.role_grants (
    role_name   name        PRIMARY KEY,
    http        boolean     NOT NULL DEFAULT false,
    python      boolean     NOT NULL DEFAULT false,
    granted_at  timestamptz NOT NULL DEFAULT now()
);

-- ====================================================================================================
-- schema/03_jsonb_list.sql
-- ====================================================================================================

-- Passing lists of JSON values: a client sends one JSON document instead of a jsonb[] array literal, whose
-- per-element quoting cost the coordinator ~20% of its time in psycopg's array dumper. Used by the named
-- queries that enqueue tasks, complete tasks and start many instances.

-- A list of JSON values passed as one jsonb array, as the jsonb[] the engine's functions take. Elements keep
-- their order; JSON null stays a JSON null.
CREATE FUNCTION pgflow.jsonb_list(p jsonb) RETURNS jsonb[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT e FROM jsonb_array_elements(p) WITH ORDINALITY AS x(e, n) ORDER BY n)
$$;
REVOKE ALL ON FUNCTION pgflow.jsonb_list(jsonb) FROM PUBLIC;

-- ====================================================================================================
-- schema/04_queues.sql
-- ====================================================================================================

-- Queues: the pgmq queues that carry task messages, and what an autoscaler reads about them.
--
-- A queue is created once by whichever comes first: a flow registered with a step on it, a worker serving
-- it, or `pgflow init --queue` (so workers and autoscalers find it before any flow names it).

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
REVOKE ALL ON FUNCTION pgflow.check_queue_name(text) FROM PUBLIC;

-- Idempotent and safe between replicas that start at once: the first INSERT of the name wins the unique
-- index, concurrent ones wait for it to commit and then insert nothing, so pgmq.create runs once. A definer
-- function: queues are shared, users need no write access to create one.
CREATE FUNCTION pgflow.ensure_queue(p_queue text)
RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgflow, pg_temp AS $$
BEGIN
    PERFORM pgflow.check_queue_name(p_queue);
    INSERT INTO pgflow.queues (queue_name) VALUES (p_queue) ON CONFLICT DO NOTHING;
    IF FOUND THEN
        PERFORM pgmq.create(p_queue);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.ensure_queue(text) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow.queue_backlog(text) FROM PUBLIC;

-- ====================================================================================================
-- schema/05_register_flow.sql
-- ====================================================================================================

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

-- ====================================================================================================
-- schema/06_start.sql
-- ====================================================================================================

-- Starting instances: the transition "no instance" -> 'pending' (the coordinator then makes it 'running').
--
-- One call checks the role once, snapshots its variables once and inserts all instances and their wake-ups
-- (a single client starting instances one by one managed ~800-1,400 starts/s, which capped end-to-end
-- throughput); start_instance is the one-input case of the same code. Both run in the caller's transaction:
-- a rollback means the instances never existed.
--
-- Guards, in order: a superuser may not start instances unless pgflow.allow_superuser is on (its SQL steps
-- would run as superuser); HTTP steps need the 'http' right and Python steps of a control-flow workflow the
-- 'python' right (pgflow.may_use, 18_roles_and_rls.sql). The owner, variables and secret references are
-- captured here; the trace context by the instances table's column default.

CREATE FUNCTION pgflow.start_instances(p_flow text, p_version text, p_inputs jsonb[], p_label text)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb;
    vars jsonb;
    secrets jsonb;
    ids bigint[];
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND coalesce(current_setting('pgflow.allow_superuser', true), '') NOT IN ('on', 'true', '1') THEN
        RAISE EXCEPTION 'pgflow: refusing to start an instance as superuser %: its SQL steps would run as '
                        'superuser. Start it as an ordinary role (see pgflow.grant_usage), or allow it with '
                        'SET pgflow.allow_superuser = on', current_user USING ERRCODE = '42501';
    END IF;
    SELECT f.shape INTO shape FROM pgflow.flows f WHERE f.flow_name = p_flow AND f.version = p_version;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'http')
       AND NOT pgflow.may_use('http') THEN
        RAISE EXCEPTION 'pgflow: role % may not use HTTP steps (pgflow.grant_usage(role, include_http => true))',
            current_user USING ERRCODE = '42501';
    END IF;
    IF shape ? 'tree'  -- a control-flow workflow names its Python functions itself
       AND EXISTS (SELECT 1 FROM jsonb_array_elements(shape->'steps') s WHERE s->>'kind' = 'python')
       AND NOT pgflow.may_use('python') THEN
        RAISE EXCEPTION 'pgflow: role % may not use Python steps in workflows (pgflow.grant_usage(role, '
                        'include_python => true))', current_user USING ERRCODE = '42501';
    END IF;
    SELECT jsonb_object_agg(v.name, v.value) FILTER (WHERE v.secret_ref IS NULL),
           jsonb_object_agg(v.name, v.secret_ref) FILTER (WHERE v.secret_ref IS NOT NULL)
    INTO vars, secrets
    FROM pgflow.variables v WHERE v.owner = current_user;
    WITH created AS (
        INSERT INTO pgflow.instances (flow_name, flow_version, input, label, variables, secret_refs)
        SELECT p_flow, p_version, x.input, p_label, vars, secrets
        FROM unnest(p_inputs) WITH ORDINALITY AS x(input, ord)
        ORDER BY x.ord
        RETURNING id
    )
    SELECT array_agg(id ORDER BY id) INTO ids FROM created;  -- identities follow insertion order
    -- a statement of its own: the wake-ups' row-level security check must see the new instances
    INSERT INTO pgflow.wakeups (instance_id) SELECT unnest(ids);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN QUERY SELECT unnest(ids);
END $$;
REVOKE ALL ON FUNCTION pgflow.start_instances(text, text, jsonb[], text) FROM PUBLIC;

CREATE FUNCTION pgflow.start_instance(p_flow text, p_version text, p_input jsonb, p_label text)
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgflow.start_instances(p_flow, p_version, ARRAY[p_input], p_label)
$$;
REVOKE ALL ON FUNCTION pgflow.start_instance(text, text, jsonb, text) FROM PUBLIC;

-- ====================================================================================================
-- schema/07_enqueue.sql
-- ====================================================================================================

-- Enqueueing tasks: the coordinator's transition "no step row" -> 'queued'. The messages are sent and the
-- step rows written in the coordinator's transaction, so a task is on its queue exactly when its row says so.

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
REVOKE ALL ON FUNCTION pgflow.enqueue_tasks(text, bigint[], text[], integer[], jsonb[]) FROM PUBLIC;

-- ====================================================================================================
-- schema/08_read_and_claim.sql
-- ====================================================================================================

-- Reading and claiming tasks: a worker's transition 'queued' | 'retrying' | 'running' (a redelivery) ->
-- 'running', with attempt + 1.
--
-- read_tasks reads a batch from a queue and claims it in one statement (one round trip per batch: reading
-- and claiming separately cost the workers 27% of their wall time). Messages that are not well-formed task
-- messages are read but not claimed; the worker dead-letters them. If the claim fails as a whole, the read
-- fails with it (nothing is hidden) and the worker falls back to reading and claiming separately, one
-- message at a time, with claim_tasks.

-- The same rules as pgflow.engine.messages.decode (tests check that both agree): names are strings, the instance
-- id fits a bigint and is positive, the task index fits an integer and is >= -1, scope and column types
-- are objects when present. CASE keeps every cast behind its check.
CREATE FUNCTION pgflow.is_task_message(m jsonb) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(m) IS DISTINCT FROM 'object' THEN false
        WHEN jsonb_typeof(m->'flow') IS DISTINCT FROM 'string' OR jsonb_typeof(m->'version') IS DISTINCT FROM 'string'
             OR jsonb_typeof(m->'step') IS DISTINCT FROM 'string' THEN false
        WHEN jsonb_typeof(m->'instance') IS DISTINCT FROM 'number' OR m->>'instance' !~ '^[0-9]{1,19}$'
             OR jsonb_typeof(m->'task') IS DISTINCT FROM 'number' OR m->>'task' !~ '^-?[0-9]{1,10}$' THEN false
        WHEN coalesce(jsonb_typeof(m->'scope'), 'null') NOT IN ('object', 'null')
             OR coalesce(jsonb_typeof(m->'columns'), 'null') NOT IN ('object', 'null') THEN false
        ELSE (m->>'instance')::numeric BETWEEN 1 AND 9223372036854775807
             AND (m->>'task')::numeric BETWEEN -1 AND 2147483647
    END
$$;
REVOKE ALL ON FUNCTION pgflow.is_task_message(jsonb) FROM PUBLIC;

-- Mark read messages' steps as running (attempt + 1) and return what the step needs to run: its input,
-- the owner's variables, its dependencies' outputs (and SQL column types), the owner (SQL steps run as
-- it), secret references (resolved for HTTP steps) and the trace context the instance was started in.
-- Messages whose step is not runnable any more (instance cancelled or failed, step finished) return no
-- row; a message must also name the instance's own flow and version: a forged one claims nothing.
-- Each instance is looked up by primary key (LATERAL ... OFFSET 0 keeps the lookup a per-row index probe:
-- otherwise the planner may hash every running instance for each batch of 20 tasks).
CREATE FUNCTION pgflow.claim_tasks(
    p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[], p_flows text[],
    p_versions text[]
) RETURNS TABLE (
    msg_id bigint, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text
) LANGUAGE sql AS $$
    WITH u AS MATERIALIZED (
        SELECT u.*, i.input, i.variables, i.owner, i.secret_refs, i.trace_context
        FROM unnest(p_msg_ids, p_instance_ids, p_steps, p_tasks, p_flows, p_versions)
            AS u(msg_id, instance_id, step_name, task_index, flow_name, flow_version)
        CROSS JOIN LATERAL (
            SELECT i.input, i.variables, i.owner, i.secret_refs, i.trace_context FROM pgflow.instances i
            WHERE i.id = u.instance_id AND i.status = 'running'
              AND i.flow_name = u.flow_name AND i.flow_version = u.flow_version
            OFFSET 0
        ) i
    ), claimed AS (
        UPDATE pgflow.steps s
        SET status = 'running', attempt = s.attempt + 1, started_at = clock_timestamp(),
            msg_id = u.msg_id, next_attempt_at = NULL
        FROM u
        WHERE s.instance_id = u.instance_id AND s.step_name = u.step_name AND s.task_index = u.task_index
          AND s.status = ANY (pgflow.claimable_step_statuses())
        RETURNING u.msg_id, s.instance_id, s.step_name, s.task_index, s.attempt,
                  u.flow_name, u.flow_version, u.input, u.variables, u.owner, u.secret_refs, u.trace_context
    )
    SELECT c.msg_id, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name, c.flow_version,
           -- a task of a map over the input gets its element, not the whole input list (no N^2 reads)
           CASE WHEN c.task_index >= 0 AND fs.over = 'input' THEN NULL ELSE c.input END,
           c.variables, d.deps, d.dep_columns, c.owner, c.secret_refs, c.trace_context
    FROM claimed c
    JOIN pgflow.flow_steps fs
      ON fs.flow_name = c.flow_name AND fs.version = c.flow_version AND fs.step_name = c.step_name
    LEFT JOIN LATERAL (
        SELECT jsonb_object_agg(s.step_name, s.output) AS deps,
               jsonb_object_agg(s.step_name, s.columns) FILTER (WHERE s.columns IS NOT NULL) AS dep_columns
        FROM pgflow.steps s
        WHERE s.instance_id = c.instance_id AND s.task_index = -1 AND s.step_name = ANY (fs.deps)
          -- likewise a map task gets its element from the message, not the list it fans out over
          AND (c.task_index < 0 OR s.step_name IS DISTINCT FROM fs.over)
    ) d ON true;
$$;
REVOKE ALL ON FUNCTION pgflow.claim_tasks(bigint[], bigint[], text[], integer[], text[], text[]) FROM PUBLIC;

-- A worker also learns how long each task waited in its queue (for a message read for the first time; a
-- redelivery's waiting is its backoff or the visibility timeout, not the queue): operators scale workers
-- on the time from enqueue to start, since depth alone does not say whether the workers keep up.
CREATE FUNCTION pgflow.read_tasks(p_queue text, p_vt integer, p_qty integer)
RETURNS TABLE (
    msg_id bigint, message jsonb, instance_id bigint, step_name text, task_index integer, attempt integer,
    flow_name text, flow_version text, input jsonb, variables jsonb, deps jsonb, dep_columns jsonb,
    owner name, secret_refs jsonb, trace_context text, queue_wait double precision
) LANGUAGE sql AS $$
    WITH m AS MATERIALIZED (
        SELECT r.msg_id, r.message, pgflow.is_task_message(r.message) AS ok,
               CASE WHEN r.read_ct = 1 THEN extract(epoch FROM clock_timestamp() - r.enqueued_at)::float8
               END AS queue_wait
        FROM pgmq.read(p_queue, p_vt, p_qty) r
    ), t AS MATERIALIZED (
        SELECT m.msg_id,
               CASE WHEN m.ok THEN (m.message->>'instance')::bigint END AS instance_id,
               CASE WHEN m.ok THEN (m.message->>'task')::integer END AS task_index,
               m.message->>'step' AS step_name, m.message->>'flow' AS flow_name,
               m.message->>'version' AS flow_version
        FROM m WHERE m.ok
    ), c AS MATERIALIZED (
        SELECT * FROM pgflow.claim_tasks(
            ARRAY(SELECT t.msg_id FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.instance_id FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.step_name FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.task_index FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.flow_name FROM t ORDER BY t.msg_id),
            ARRAY(SELECT t.flow_version FROM t ORDER BY t.msg_id))
    )
    SELECT m.msg_id, m.message, c.instance_id, c.step_name, c.task_index, c.attempt, c.flow_name,
           c.flow_version, c.input, c.variables, c.deps, c.dep_columns, c.owner, c.secret_refs, c.trace_context,
           m.queue_wait
    FROM m LEFT JOIN c ON c.msg_id = m.msg_id
    ORDER BY m.msg_id;
$$;
REVOKE ALL ON FUNCTION pgflow.read_tasks(text, integer, integer) FROM PUBLIC;

-- ====================================================================================================
-- schema/09_complete.sql
-- ====================================================================================================

-- Completing tasks: a worker's transition 'running' -> 'completed', the checkpoint and the acknowledgement
-- in one transaction.
--
-- A checkpoint only lands for the attempt that is still current; a message is deleted unless a newer
-- attempt of the same task is live (then that attempt owns the message). The coordinator is woken to
-- schedule what comes next.

CREATE FUNCTION pgflow.complete_tasks(
    p_queue text, p_msg_ids bigint[], p_instance_ids bigint[], p_steps text[], p_tasks integer[],
    p_attempts integer[], p_outputs jsonb[], p_columns jsonb[] DEFAULT NULL
) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE pgflow.steps s
    SET status = 'completed', output = u.output, columns = u.columns, finished_at = clock_timestamp(),
        error = NULL
    FROM unnest(p_instance_ids, p_steps, p_tasks, p_attempts, p_outputs,
                coalesce(p_columns, array_fill(NULL::jsonb, ARRAY[cardinality(p_msg_ids)])))
        AS u(instance_id, step_name, task_index, attempt, output, columns)
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
REVOKE ALL ON FUNCTION pgflow.complete_tasks(text, bigint[], bigint[], text[], integer[], integer[], jsonb[], jsonb[]) FROM PUBLIC;

-- ====================================================================================================
-- schema/10_fail_and_retry.sql
-- ====================================================================================================

-- Failing and retrying: a worker's transitions 'running' -> 'retrying' (the message becomes visible again
-- after the backoff), 'running' -> 'failed' (for good: the message is archived, never dropped, and the
-- coordinator is woken to fail the instance), and 'running' -> 'queued' when a worker shutting down gives
-- back tasks it claimed but has not started (without spending an attempt).

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
REVOKE ALL ON FUNCTION pgflow.fail_task(text, bigint, bigint, text, integer, integer, text, text, double precision) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION pgflow.release_tasks(text, bigint[], bigint[], text[], integer[], integer[]) FROM PUBLIC;

-- ====================================================================================================
-- schema/11_cancel.sql
-- ====================================================================================================

-- Cancelling an instance: 'pending' | 'running' -> 'cancelled', and every open step with it. Queued
-- messages are archived by the workers that read them (the claim finds nothing runnable), so no message is
-- lost or run.

CREATE FUNCTION pgflow.cancel_instance(p_id bigint, p_reason text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RETURN st;
    END IF;
    UPDATE pgflow.instances
    SET status = 'cancelled', error = coalesce(p_reason, 'cancelled'), finished_at = clock_timestamp()
    WHERE id = p_id;
    UPDATE pgflow.steps SET status = 'cancelled', finished_at = clock_timestamp()
    WHERE instance_id = p_id AND status = ANY (pgflow.open_step_statuses());
    PERFORM pg_notify('pgflow_instance_done', p_id::text);
    RETURN 'cancelled';
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel_instance(bigint, text) FROM PUBLIC;

-- ====================================================================================================
-- schema/12_tree_nodes.sql
-- ====================================================================================================

-- Control-flow workflows (the pg_durable model): a workflow is a tree of nodes stored as jsonb
-- ({"t": type, ...}); the coordinator walks it. Leaves that do work (sql, python, http) are queued like DAG
-- steps; timers and signal waits are rows in status 'waiting'. This file holds the node constructors: what
-- `pgflow.seq(...)`, `pgflow.sleep(60)` and friends build (validation is in 14_tree_validation.sql).

-- Nodes are passed around as text holding their JSON ({"t": ...}); any other text where a node is expected
-- is a SQL step. (Text, not jsonb, so that PostgreSQL resolves `node ~> 'SELECT ...'` to the text operators:
-- with a jsonb ~> jsonb operator it would try to parse the SQL literal as JSON.)
CREATE FUNCTION pgflow.node(p_node text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    parsed jsonb;
BEGIN
    IF p_node IS NULL THEN
        RAISE EXCEPTION 'pgflow: a workflow node cannot be NULL' USING ERRCODE = '22004';
    END IF;
    IF ltrim(p_node) LIKE '{%' THEN
        BEGIN
            parsed := p_node::jsonb;
        EXCEPTION WHEN others THEN
            RAISE EXCEPTION 'pgflow: malformed node JSON: %', left(p_node, 200) USING ERRCODE = '22023';
        END;
        RETURN pgflow.node(parsed);
    END IF;
    RETURN jsonb_build_object('t', 'sql', 'sql', p_node);
END $$;
REVOKE ALL ON FUNCTION pgflow.node(text) FROM PUBLIC;
CREATE FUNCTION pgflow.node(p_node jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF jsonb_typeof(p_node) = 'string' THEN
        RETURN pgflow.node(p_node #>> '{}');
    END IF;
    IF jsonb_typeof(p_node) IS DISTINCT FROM 'object' OR NOT p_node ? 't' THEN
        RAISE EXCEPTION 'pgflow: not a workflow node: % (build nodes with pgflow.* functions or operators)',
            left(coalesce(p_node::text, 'NULL'), 200) USING ERRCODE = '22023';
    END IF;
    RETURN p_node;
END $$;
REVOKE ALL ON FUNCTION pgflow.node(jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow._compose(p_type text, p_left text, p_right text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    -- a ~> b ~> c is one sequence of three, not nested pairs
    SELECT jsonb_build_object('t', p_type, 'c',
        (CASE WHEN pgflow.node(p_left)->>'t' = p_type
              THEN pgflow.node(p_left)->'c' ELSE jsonb_build_array(pgflow.node(p_left)) END)
        || jsonb_build_array(pgflow.node(p_right)))::text
$$;
REVOKE ALL ON FUNCTION pgflow._compose(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow._list(p_type text, p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', p_type, 'c', (SELECT jsonb_agg(pgflow.node(n) ORDER BY i)
                                                 FROM unnest(p_nodes) WITH ORDINALITY AS x(n, i)))::text
$$;
REVOKE ALL ON FUNCTION pgflow._list(text, text[]) FROM PUBLIC;

CREATE FUNCTION pgflow.seq(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('seq', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.seq(VARIADIC text[]) FROM PUBLIC;
CREATE FUNCTION pgflow.join(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('join', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.join(VARIADIC text[]) FROM PUBLIC;
CREATE FUNCTION pgflow.race(VARIADIC p_nodes text[]) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow._list('race', p_nodes) $$;
REVOKE ALL ON FUNCTION pgflow.race(VARIADIC text[]) FROM PUBLIC;
CREATE FUNCTION pgflow.named(p_node text, p_name text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'name', 'name', p_name, 'c', jsonb_build_array(pgflow.node(p_node)))::text
$$;
REVOKE ALL ON FUNCTION pgflow.named(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.if_then(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'if', 'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_then))
        || CASE WHEN p_else IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_else)) END)::text
$$;
REVOKE ALL ON FUNCTION pgflow.if_then(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.has_rows(p_name text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'has_rows', 'name', p_name)::text
$$;
REVOKE ALL ON FUNCTION pgflow.has_rows(text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop(p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'c', jsonb_build_array(pgflow.node(p_body)))::text
$$;
REVOKE ALL ON FUNCTION pgflow.loop(text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop_while(p_cond text, p_body text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'loop', 'while', true,
                              'c', jsonb_build_array(pgflow.node(p_cond), pgflow.node(p_body)))::text
$$;
REVOKE ALL ON FUNCTION pgflow.loop_while(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.break_loop(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'break', 'c',
        CASE WHEN p_value IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(pgflow.node(p_value)) END)::text
$$;
REVOKE ALL ON FUNCTION pgflow.break_loop(text) FROM PUBLIC;
CREATE FUNCTION pgflow.sleep(p_seconds double precision) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'sleep', 'seconds', p_seconds)::text
$$;
REVOKE ALL ON FUNCTION pgflow.sleep(double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.wait_for_schedule(p_cron text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'schedule', 'cron', p_cron)::text
$$;
REVOKE ALL ON FUNCTION pgflow.wait_for_schedule(text) FROM PUBLIC;
CREATE FUNCTION pgflow.wait_for_signal(p_name text, p_timeout double precision DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'wait_signal', 'name', p_name, 'timeout', p_timeout)::text
$$;
REVOKE ALL ON FUNCTION pgflow.wait_for_signal(text, double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.http(p_url text, p_method text DEFAULT 'GET', p_body jsonb DEFAULT NULL,
                            p_headers jsonb DEFAULT NULL, p_timeout double precision DEFAULT 30)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'http', 'url', p_url, 'method', upper(p_method), 'body', p_body,
                              'headers', coalesce(p_headers, '{}'::jsonb), 'timeout', p_timeout)::text
$$;
REVOKE ALL ON FUNCTION pgflow.http(text, text, jsonb, jsonb, double precision) FROM PUBLIC;
CREATE FUNCTION pgflow.python(p_function text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('t', 'python', 'fn', p_function)::text
$$;
REVOKE ALL ON FUNCTION pgflow.python(text) FROM PUBLIC;
-- Names pg_durable users know (df.sql, df.if, df.loop(body, cond), df.break, df.join3).
CREATE FUNCTION pgflow.sql(p_statement text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.node(p_statement)::text $$;
REVOKE ALL ON FUNCTION pgflow.sql(text) FROM PUBLIC;
CREATE FUNCTION pgflow."if"(p_cond text, p_then text, p_else text DEFAULT NULL) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT pgflow.if_then(p_cond, p_then, p_else) $$;
REVOKE ALL ON FUNCTION pgflow."if"(text, text, text) FROM PUBLIC;
CREATE FUNCTION pgflow.loop(p_body text, p_cond text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.loop_while(p_cond, p_body) $$;
REVOKE ALL ON FUNCTION pgflow.loop(text, text) FROM PUBLIC;
CREATE FUNCTION pgflow."break"(p_value text DEFAULT NULL) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.break_loop(p_value) $$;
REVOKE ALL ON FUNCTION pgflow."break"(text) FROM PUBLIC;
CREATE FUNCTION pgflow.join3(a text, b text, c text) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.join(a, b, c) $$;
REVOKE ALL ON FUNCTION pgflow.join3(text, text, text) FROM PUBLIC;

-- per-node options for leaves: max_attempts, timeout, queue, backoff_base, backoff_cap, retry_on (http)
CREATE FUNCTION pgflow.with_options(p_node text, p_options jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT (pgflow.node(p_node) || p_options)::text
$$;
REVOKE ALL ON FUNCTION pgflow.with_options(text, jsonb) FROM PUBLIC;

-- ====================================================================================================
-- schema/13_operators.sql
-- ====================================================================================================

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

-- ====================================================================================================
-- schema/14_tree_validation.sql
-- ====================================================================================================

-- Validating a control-flow workflow before it starts: node fields, result names and the `$references`
-- of SQL steps, cron expressions; then the stored shape (the validated tree plus its leaves as step specs).
-- Every refusal is SQLSTATE 22023 with a message that starts with "pgflow:". These checks are the one
-- definition of what a workflow may contain: the Python front door calls pgflow.tree_shape too.

-- A 5-field cron expression (minute hour day-of-month month day-of-week, UTC), with *, lists, ranges, steps
-- and month/day names: the one definition of a valid schedule. Checked when a workflow starts; the
-- coordinator computes fire times with croniter, and tests/data/cron.json checks that croniter accepts and can
-- schedule every expression valid here (croniter also reads extensions such as L, #, ? or @daily, which are
-- not valid here). A schedule must be able to fire: a day of the month that none of its months has (30
-- February, 31 April) is refused, whatever the day of the week says.
CREATE FUNCTION pgflow.valid_cron(p_cron text) RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    fields text[] := regexp_split_to_array(btrim(coalesce(p_cron, '')), '\s+');
    lows int[] := ARRAY[0, 0, 1, 1, 0];
    highs int[] := ARRAY[59, 23, 31, 12, 7];
    names text[] := ARRAY['', '', '', 'jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec', 'sun|mon|tue|wed|thu|fri|sat'];
    month_days int[] := ARRAY[31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];  -- 29 February: leap years come
    part text;
    m text[];
    i int;
    first int;
    last int;
    step int;
    days int[] := '{}';    -- the days of the month and the months the schedule may fire on
    months int[] := '{}';
BEGIN
    IF array_length(fields, 1) IS DISTINCT FROM 5 THEN
        RETURN false;
    END IF;
    FOR i IN 1..5 LOOP
        FOREACH part IN ARRAY string_to_array(lower(fields[i]), ',') LOOP
            m := regexp_match(part, '^(\*|[0-9]{1,2}|[a-z]{3})(?:-([0-9]{1,2}|[a-z]{3}))?(?:/([0-9]{1,2}))?$');
            IF m IS NULL OR (m[1] = '*' AND m[2] IS NOT NULL) THEN
                RETURN false;
            END IF;
            IF m[1] ~ '^[a-z]' AND (names[i] = '' OR m[1] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            IF m[2] ~ '^[a-z]' AND (names[i] = '' OR m[2] !~ ('^(' || names[i] || ')$')) THEN
                RETURN false;
            END IF;
            -- names as numbers: jan = 1, sun = 0
            first := CASE WHEN m[1] = '*' THEN lows[i]
                          WHEN m[1] ~ '^[a-z]' THEN (strpos(names[i], m[1]) - 1) / 4 + lows[i]
                          ELSE m[1]::int END;
            last := CASE WHEN m[2] IS NULL AND (m[1] = '*' OR m[3] IS NOT NULL) THEN highs[i]  -- *, */n, n/step
                         WHEN m[2] IS NULL THEN first
                         WHEN m[2] ~ '^[a-z]' THEN (strpos(names[i], m[2]) - 1) / 4 + lows[i]
                         ELSE m[2]::int END;
            step := coalesce(m[3]::int, 1);
            IF NOT first BETWEEN lows[i] AND highs[i] OR NOT last BETWEEN lows[i] AND highs[i] OR step = 0 THEN
                RETURN false;
            END IF;
            IF last < first THEN
                IF m[1] ~ '^[0-9]' AND m[2] ~ '^[0-9]' THEN
                    RETURN false;  -- 5-1: a reversed range of numbers
                END IF;
                last := first;  -- fri-mon, dec-jan wrap around; here only their first value counts
            END IF;
            IF i = 3 THEN
                days := days || ARRAY(SELECT generate_series(first, last, step));
            ELSIF i = 4 THEN
                months := months || ARRAY(SELECT generate_series(first, last, step));
            END IF;
        END LOOP;
    END LOOP;
    RETURN EXISTS (SELECT 1 FROM unnest(days) d, unnest(months) mo WHERE d <= month_days[mo]);
END $$;
REVOKE ALL ON FUNCTION pgflow.valid_cron(text) FROM PUBLIC;

-- The `$references` of a SQL step, in the order they are written ('$load', '$input.key?', '$rows.*'...): the
-- same grammar as the worker's lexer (pgflow.dsl.compile_sql), checked against the same test vectors
-- (tests/data/references.json). Like PostgreSQL's own lexer it skips string literals ('...', E'...' with
-- backslash escapes), quoted identifiers, -- and nested /* */ comments and dollar-quoted bodies ($$...$$,
-- $tag$...$tag$), and reads an identifier whole (PostgreSQL allows $ inside one: foo$bar is no reference).
-- SQL the worker could not run is refused here, before the workflow starts: unterminated literals, comments
-- or dollar quotes, positional parameters ($1), a stray $, a row-set reference with a path ($x.col.*).
CREATE FUNCTION pgflow.parse_sql_references(p_sql text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    rest text := p_sql;        -- what is left to read
    refs text[] := '{}';
    e_prefix boolean := false; -- the token just read is the identifier E: a quote now opens an E'' string
    m text[];
    token text;
    depth int;
    open_at int;
    close_at int;
    problem text;
BEGIN
    WHILE rest <> '' AND problem IS NULL LOOP
        token := NULL;
        CASE
        WHEN left(rest, 1) = '''' THEN
            token := (regexp_match(rest, CASE WHEN e_prefix THEN '^''(?:[^''\\]|''''|\\.)*'''
                                              ELSE '^''(?:[^'']|'''')*''' END))[1];
            IF token IS NULL THEN
                problem := 'unterminated '' literal';
            END IF;
        WHEN left(rest, 1) = '"' THEN
            token := (regexp_match(rest, '^("(?:[^"]|"")*")'))[1];
            IF token IS NULL THEN
                problem := 'unterminated " literal';
            END IF;
        WHEN left(rest, 2) = '--' THEN
            token := (regexp_match(rest, '^(--[^\n\r]*)'))[1];
        WHEN left(rest, 2) = '/*' THEN
            depth := 1;
            token := '/*';
            WHILE depth > 0 LOOP
                open_at := strpos(substr(rest, length(token) + 1), '/*');
                close_at := strpos(substr(rest, length(token) + 1), '*/');
                IF close_at = 0 THEN
                    problem := 'unterminated /* comment';
                    EXIT;
                END IF;
                IF open_at > 0 AND open_at < close_at THEN
                    depth := depth + 1;
                    token := left(rest, length(token) + open_at + 1);
                ELSE
                    depth := depth - 1;
                    token := left(rest, length(token) + close_at + 1);
                END IF;
            END LOOP;
        WHEN left(rest, 1) = '$' THEN
            m := regexp_match(rest, '^(\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$)');
            IF m IS NOT NULL THEN  -- a dollar-quoted body runs to the next occurrence of its opening tag
                close_at := strpos(substr(rest, length(m[1]) + 1), m[1]);
                IF close_at = 0 THEN
                    problem := format('unterminated dollar-quoted string %s', m[1]);
                ELSE
                    token := left(rest, length(m[1]) + close_at + length(m[1]) - 1);
                END IF;
            ELSIF rest ~ '^\$[0-9]' THEN
                problem := format('positional parameter %s: refer to values by name ($input, $input.key, '
                                  '$step, $step.col, $item)', substring(rest from '^\$[0-9]+'));
            ELSE
                m := regexp_match(rest, '^(\$[A-Za-z_][A-Za-z0-9_]*((?:\.[A-Za-z_][A-Za-z0-9_]*)*)(\.\*)?\??)');
                IF m IS NULL THEN
                    problem := format('stray ''$'' at %s', quote_literal(left(rest, 20)));
                ELSIF m[2] <> '' AND m[3] IS NOT NULL THEN
                    problem := format('row-set reference %s: use $name.* on a whole result', m[1]);
                ELSE
                    token := m[1];
                    refs := refs || token;
                END IF;
            END IF;
        WHEN rest ~ '^[A-Za-z_]|^[^\x01-\x7f]' THEN  -- an identifier or key word, read whole
            token := (regexp_match(rest, '^((?:[A-Za-z0-9_$]|[^\x01-\x7f])+)'))[1];
            e_prefix := token IN ('E', 'e');
            rest := substr(rest, length(token) + 1);
            CONTINUE;
        ELSE  -- anything else, up to the next character that may start one of the above
            token := coalesce((regexp_match(rest, '^((?:(?![''"$/_A-Za-z-])[\x01-\x7f])+)'))[1], left(rest, 1));
        END CASE;
        e_prefix := false;
        rest := substr(rest, length(token) + 1);
    END LOOP;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'pgflow: % in SQL step "%"', problem, left(p_sql, 80) USING ERRCODE = '22023';
    END IF;
    RETURN refs;
END $$;
REVOKE ALL ON FUNCTION pgflow.parse_sql_references(text) FROM PUBLIC;

-- The names a SQL step refers to with `$name...`, each once (see parse_sql_references).
CREATE FUNCTION pgflow.sql_references(p_sql text) RETURNS SETOF text LANGUAGE sql IMMUTABLE AS $$
    SELECT DISTINCT substring(r FROM '^\$([A-Za-z_][A-Za-z0-9_]*)') FROM unnest(pgflow.parse_sql_references(p_sql)) AS r
$$;
REVOKE ALL ON FUNCTION pgflow.sql_references(text) FROM PUBLIC;

-- Validate a node tree; returns the result names it binds. Raises with a clear message (SQLSTATE 22023).
-- A number field of a node: absent/null allowed unless required; otherwise a JSON number in [lo, hi].
CREATE FUNCTION pgflow._check_number(p_node jsonb, p_key text, p_lo float8, p_hi float8, p_required boolean,
                                     p_integer boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v jsonb := p_node->p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF p_required THEN
            RAISE EXCEPTION 'pgflow: % node needs %', p_node->>'t', p_key USING ERRCODE = '22023';
        END IF;
        RETURN;
    END IF;
    IF jsonb_typeof(v) <> 'number' OR (p_integer AND (v #>> '{}') !~ '^[0-9]+$')
       OR (v #>> '{}')::numeric NOT BETWEEN p_lo::numeric AND p_hi::numeric THEN
        RAISE EXCEPTION 'pgflow: % of a % node must be % between % and %, not %', p_key, p_node->>'t',
            CASE WHEN p_integer THEN 'an integer' ELSE 'a number' END, p_lo, p_hi, left(v::text, 40)
            USING ERRCODE = '22023';
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow._check_number(jsonb, text, float8, float8, boolean, boolean) FROM PUBLIC;

CREATE FUNCTION pgflow._validate(p_node jsonb, p_in_loop boolean, p_names text[], p_depth integer DEFAULT 0)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    t text := p_node->>'t';
    child jsonb;
    names text[] := p_names;
    ref text;
    n int := coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(p_node->'c') = 'array' THEN p_node->'c' END), 0);
    d int := p_depth + 1;
BEGIN
    IF jsonb_typeof(p_node) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'pgflow: not a workflow node: %', left(coalesce(p_node::text, 'NULL'), 200)
            USING ERRCODE = '22023';
    END IF;
    IF p_depth > 100 THEN
        RAISE EXCEPTION 'pgflow: a workflow may nest at most 100 levels' USING ERRCODE = '22023';
    END IF;
    IF p_node ? 'c' AND jsonb_typeof(p_node->'c') <> 'array' THEN
        RAISE EXCEPTION 'pgflow: the children of a % node must be an array', t USING ERRCODE = '22023';
    END IF;
    IF t IN ('sql', 'python', 'http') THEN
        PERFORM pgflow._check_number(p_node, 'max_attempts', 1, 1000, false, true);
        PERFORM pgflow._check_number(p_node, 'backoff_base', 0.001, 86400, false);
        PERFORM pgflow._check_number(p_node, 'backoff_cap', 0.001, 86400, false);
        PERFORM pgflow._check_number(p_node, 'timeout', 0.001, 86400, false);
    END IF;
    CASE t
    WHEN 'sql' THEN
        IF jsonb_typeof(p_node->'sql') IS DISTINCT FROM 'string' OR btrim(p_node->>'sql') = '' THEN
            RAISE EXCEPTION 'pgflow: a SQL step needs non-empty SQL text' USING ERRCODE = '22023';
        END IF;
        FOR ref IN SELECT pgflow.sql_references(p_node->>'sql') LOOP
            IF NOT ref = ANY (names || ARRAY['input', 'vars']) THEN
                RAISE EXCEPTION 'pgflow: $% in SQL step "%" names no earlier result (known: %)', ref,
                    left(p_node->>'sql', 80), array_to_string(names || ARRAY['input', 'vars'], ', ')
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
    WHEN 'python' THEN
        IF coalesce(p_node->>'fn', '') !~ '^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$' THEN
            RAISE EXCEPTION 'pgflow: python node needs "module:function", got %', p_node->>'fn'
                USING ERRCODE = '22023';
        END IF;
    WHEN 'http' THEN
        IF coalesce(p_node->>'url', '') = '' THEN
            RAISE EXCEPTION 'pgflow: http node without url' USING ERRCODE = '22023';
        END IF;
        IF jsonb_typeof(p_node->'url') <> 'string'
           OR NOT coalesce(p_node->>'method', '') = ANY (ARRAY['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD']) THEN
            RAISE EXCEPTION 'pgflow: an http node needs a URL and a method (GET, POST, PUT, PATCH, DELETE, HEAD), '
                            'got %', coalesce(p_node->>'method', 'NULL') USING ERRCODE = '22023';
        END IF;
        IF coalesce(jsonb_typeof(p_node->'headers'), 'null') NOT IN ('object', 'null')
           OR coalesce(jsonb_typeof(p_node->'retry_on'), 'null') NOT IN ('array', 'null') THEN
            RAISE EXCEPTION 'pgflow: http headers must be an object and retry_on an array of statuses'
                USING ERRCODE = '22023';
        END IF;
    WHEN 'seq', 'join', 'race' THEN
        IF n < (CASE WHEN t = 'seq' THEN 1 ELSE 2 END) THEN
            RAISE EXCEPTION 'pgflow: % needs at least % children', t, CASE WHEN t = 'seq' THEN 1 ELSE 2 END
                USING ERRCODE = '22023';
        END IF;
        FOR child IN SELECT jsonb_array_elements(p_node->'c') LOOP
            names := pgflow._validate(child, p_in_loop, names, d);
        END LOOP;
    WHEN 'name' THEN
        IF coalesce(p_node->>'name', '') !~ '^[A-Za-z_][A-Za-z0-9_]*$'
           OR p_node->>'name' IN ('input', 'vars', 'item') THEN
            RAISE EXCEPTION 'pgflow: result name % must be an identifier other than input, vars, item',
                coalesce(p_node->>'name', 'NULL') USING ERRCODE = '22023';
        END IF;
        IF n <> 1 THEN
            RAISE EXCEPTION 'pgflow: |=> names exactly one node' USING ERRCODE = '22023';
        END IF;
        names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d) || (p_node->>'name');
    WHEN 'if' THEN
        IF n NOT IN (2, 3) THEN
            RAISE EXCEPTION 'pgflow: if needs a condition, a then branch and an optional else' USING ERRCODE = '22023';
        END IF;
        names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d);
        names := pgflow._validate(p_node->'c'->1, p_in_loop, names, d);
        IF n = 3 THEN
            names := pgflow._validate(p_node->'c'->2, p_in_loop, names, d);
        END IF;
    WHEN 'has_rows' THEN
        IF NOT coalesce(p_node->>'name', '') = ANY (names) THEN
            RAISE EXCEPTION 'pgflow: has_rows(%) names no earlier result (known: %)', p_node->>'name',
                array_to_string(names, ', ') USING ERRCODE = '22023';
        END IF;
    WHEN 'loop' THEN
        IF coalesce(jsonb_typeof(p_node->'while'), 'null') NOT IN ('boolean', 'null')
           OR n <> (CASE WHEN p_node->'while' = 'true'::jsonb THEN 2 ELSE 1 END) THEN
            RAISE EXCEPTION 'pgflow: malformed loop node (while must be true or absent, with 2 or 1 children)'
                USING ERRCODE = '22023';
        END IF;
        FOR child IN SELECT jsonb_array_elements(p_node->'c') LOOP
            names := pgflow._validate(child, true, names, d);
        END LOOP;
    WHEN 'break' THEN
        IF NOT p_in_loop THEN
            RAISE EXCEPTION 'pgflow: break outside a loop' USING ERRCODE = '22023';
        END IF;
        IF n > 1 THEN
            RAISE EXCEPTION 'pgflow: break takes at most one node (its value)' USING ERRCODE = '22023';
        END IF;
        IF n = 1 THEN
            names := pgflow._validate(p_node->'c'->0, p_in_loop, names, d);
        END IF;
    WHEN 'sleep' THEN
        PERFORM pgflow._check_number(p_node, 'seconds', 0, 1e9, true);
    WHEN 'schedule' THEN
        IF jsonb_typeof(p_node->'cron') IS DISTINCT FROM 'string' OR NOT pgflow.valid_cron(p_node->>'cron') THEN
            RAISE EXCEPTION 'pgflow: invalid cron expression % (5 fields: minute hour day month weekday)',
                coalesce(quote_literal(p_node->>'cron'), 'NULL') USING ERRCODE = '22023';
        END IF;
    WHEN 'wait_signal' THEN
        IF coalesce(p_node->>'name', '') = '' THEN
            RAISE EXCEPTION 'pgflow: wait_for_signal needs a name' USING ERRCODE = '22023';
        END IF;
        PERFORM pgflow._check_number(p_node, 'timeout', 0, 1e9, false);
    ELSE
        RAISE EXCEPTION 'pgflow: unknown node type % in %', coalesce(quote_literal(t), 'NULL'),
            left(p_node::text, 200) USING ERRCODE = '22023';
    END CASE;
    IF p_node ? 'queue' AND p_node->>'queue' !~ '^[a-z_][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'pgflow: queue % must be lowercase letters, digits, _', p_node->>'queue'
            USING ERRCODE = '22023';
    END IF;
    RETURN names;
END $$;
REVOKE ALL ON FUNCTION pgflow._validate(jsonb, boolean, text[], integer) FROM PUBLIC;

-- The leaves of a tree as step specs (node path = step name), in the format of a flow shape's "steps".
CREATE FUNCTION pgflow._leaves(p_tree jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    WITH RECURSIVE tree(path, node, sort) AS (
        SELECT 'r'::text, p_tree, ARRAY[0]::bigint[]
        UNION ALL
        SELECT t.path || '.' || (c.i - 1), c.child, t.sort || c.i
        FROM tree t,
             jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c' ELSE '[]' END)
                 WITH ORDINALITY AS c(child, i)
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
        'name', path, 'kind', node->>'t', 'deps', '[]'::jsonb, 'over', NULL, 'flatten', false,
        'queue', coalesce(node->>'queue', 'pgflow'),
        'max_attempts', coalesce((node->>'max_attempts')::int, 3),
        'backoff_base', coalesce((node->>'backoff_base')::float8, 1.0),
        'backoff_cap', coalesce((node->>'backoff_cap')::float8, 60.0),
        'timeout', (node->>'timeout')::float8,
        'sql', node->>'sql', 'spec', node) ORDER BY sort), '[]'::jsonb)
    FROM tree
    WHERE node->>'t' IN ('sql', 'python', 'http')
$$;
REVOKE ALL ON FUNCTION pgflow._leaves(jsonb) FROM PUBLIC;

-- The stored shape of a control-flow workflow: validated tree plus its leaves.
CREATE FUNCTION pgflow.tree_shape(p_node jsonb, p_name text DEFAULT 'sql') RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    node jsonb := pgflow.node(p_node);
BEGIN
    PERFORM pgflow._validate(node, false, ARRAY[]::text[], 0);
    RETURN jsonb_build_object('name', p_name, 'tree', node,
                              'steps', pgflow._leaves(node));
END $$;
REVOKE ALL ON FUNCTION pgflow.tree_shape(jsonb, text) FROM PUBLIC;
CREATE FUNCTION pgflow.tree_shape(p_node text, p_name text DEFAULT 'sql') RETURNS jsonb LANGUAGE sql IMMUTABLE AS
    $$ SELECT pgflow.tree_shape(pgflow.node(p_node), p_name) $$;
REVOKE ALL ON FUNCTION pgflow.tree_shape(text, text) FROM PUBLIC;

-- ====================================================================================================
-- schema/15_front_door.sql
-- ====================================================================================================

-- The SQL front door: what a psql user calls to start, watch, cancel and signal workflows
-- (`SELECT pgflow.start('SELECT 1' ~> pgflow.sleep(60) ~> ...)`). These run as the caller: row-level security
-- (18_roles_and_rls.sql) limits them to the caller's own instances.

-- Start a workflow. It joins the caller's transaction (a rollback means it never started) unless
-- p_detached, which commits it at once through dblink (the extension must be installed).
CREATE FUNCTION pgflow.start(p_node jsonb, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    shape jsonb := pgflow.tree_shape(p_node, p_name);
    version text := left(md5(shape::text), 16);
    new_id bigint;
BEGIN
    IF p_detached THEN
        IF to_regproc('public.dblink') IS NULL AND to_regproc('dblink') IS NULL THEN
            RAISE EXCEPTION 'pgflow: a detached start needs the dblink extension (CREATE EXTENSION dblink)'
                USING ERRCODE = '0A000';
        END IF;
        EXECUTE 'SELECT id FROM dblink($1, $2) AS t(id bigint)' INTO new_id
            USING format('dbname=%s user=%s', current_database(), current_user),
                  format('SELECT pgflow.start(%L::jsonb, %L::jsonb, %L, false, %L)', p_node, p_input, p_label,
                         p_name);
        RETURN new_id;
    END IF;
    PERFORM pgflow.register_flow(p_name, version, NULL, shape);
    RETURN pgflow.start_instance(p_name, version, p_input, p_label);
END $$;
REVOKE ALL ON FUNCTION pgflow.start(jsonb, jsonb, text, boolean, text) FROM PUBLIC;

-- The usual entry point: a node built with the operators and functions above, or plain SQL text.
CREATE FUNCTION pgflow.start(p_node text, p_input jsonb DEFAULT NULL, p_label text DEFAULT NULL,
                             p_detached boolean DEFAULT false, p_name text DEFAULT 'sql')
RETURNS bigint LANGUAGE sql AS $$
    SELECT pgflow.start(pgflow.node(p_node), p_input, p_label, p_detached, p_name)
$$;
REVOKE ALL ON FUNCTION pgflow.start(text, jsonb, text, boolean, text) FROM PUBLIC;

CREATE FUNCTION pgflow.status(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    r jsonb;
BEGIN
    SELECT jsonb_build_object('id', i.id, 'flow', i.flow_name, 'status', i.status, 'label', i.label,
                              'error', i.error, 'created_at', i.created_at, 'finished_at', i.finished_at)
    INTO r FROM pgflow.instances i WHERE i.id = p_id;
    IF r IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN r;
END $$;
REVOKE ALL ON FUNCTION pgflow.status(bigint) FROM PUBLIC;

CREATE FUNCTION pgflow.result(p_id bigint) RETURNS jsonb LANGUAGE plpgsql STABLE AS $$
DECLARE
    i pgflow.instances;
BEGIN
    SELECT * INTO i FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF i.status IN ('failed', 'cancelled') THEN
        RAISE EXCEPTION 'pgflow: instance % %: %', p_id, i.status, i.error USING ERRCODE = 'P0001';
    END IF;
    RETURN i.output;  -- NULL while pending or running
END $$;
REVOKE ALL ON FUNCTION pgflow.result(bigint) FROM PUBLIC;

CREATE FUNCTION pgflow.cancel(p_id bigint, p_reason text DEFAULT NULL) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    outcome text := pgflow.cancel_instance(p_id, p_reason);
BEGIN
    IF outcome IS NULL THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    RETURN outcome;
END $$;
REVOKE ALL ON FUNCTION pgflow.cancel(bigint, text) FROM PUBLIC;

-- Deliver a signal. Signals sent before the wait is reached are kept until it consumes them.
CREATE FUNCTION pgflow.signal(p_id bigint, p_name text, p_data jsonb DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    new_id bigint;
BEGIN
    SELECT status INTO st FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    IF NOT st = ANY (pgflow.open_instance_statuses()) THEN
        RAISE EXCEPTION 'pgflow: instance % is % and takes no signals', p_id, st USING ERRCODE = '55000';
    END IF;
    IF coalesce(p_name, '') = '' THEN
        RAISE EXCEPTION 'pgflow: a signal needs a name' USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.signals (instance_id, name, data) VALUES (p_id, p_name, p_data) RETURNING id INTO new_id;
    INSERT INTO pgflow.wakeups (instance_id) VALUES (p_id);
    PERFORM pg_notify('pgflow_coordinator', '');
    RETURN new_id;
END $$;
REVOKE ALL ON FUNCTION pgflow.signal(bigint, text, jsonb) FROM PUBLIC;

CREATE FUNCTION pgflow.list_instances(p_status text DEFAULT NULL, p_flow text DEFAULT NULL,
                                      p_label text DEFAULT NULL, p_limit integer DEFAULT 50,
                                      p_before bigint DEFAULT NULL)
RETURNS TABLE (id bigint, flow_name text, status text, label text, created_at timestamptz,
               finished_at timestamptz, error text)
LANGUAGE sql STABLE AS $$
    SELECT i.id, i.flow_name, i.status, i.label, i.created_at, i.finished_at, i.error
    FROM pgflow.instances i
    WHERE (p_status IS NULL OR i.status = p_status) AND (p_flow IS NULL OR i.flow_name = p_flow)
      AND (p_label IS NULL OR i.label = p_label) AND (p_before IS NULL OR i.id < p_before)
    ORDER BY i.id DESC
    LIMIT least(greatest(p_limit, 1), 10000)
$$;
REVOKE ALL ON FUNCTION pgflow.list_instances(text, text, text, integer, bigint) FROM PUBLIC;

-- Wait (polling every 50 ms) until the instance finishes or p_timeout seconds pass; returns its status.
-- An instance started in the same, uncommitted transaction cannot finish: commit first.
CREATE FUNCTION pgflow.await_instance(p_id bigint, p_timeout double precision DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_timeout);
    r jsonb;
BEGIN
    LOOP
        r := pgflow.status(p_id);
        IF NOT r->>'status' = ANY (pgflow.open_instance_statuses()) OR clock_timestamp() >= deadline THEN
            RETURN r || jsonb_build_object('output', (SELECT output FROM pgflow.instances WHERE id = p_id));
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgflow.await_instance(bigint, double precision) FROM PUBLIC;

-- ====================================================================================================
-- schema/16_variables.sql
-- ====================================================================================================

-- Variables and secrets: per-user named values copied into an instance when it starts ($vars.name in SQL
-- steps, ctx.vars in Python). A secret is stored as a reference ('env:NAME' or 'file:/path') that workers
-- resolve for HTTP steps, never as its value.

CREATE FUNCTION pgflow.set_variable(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgflow.variables (name, value) VALUES (p_name, p_value)
    ON CONFLICT (owner, name) DO UPDATE SET value = excluded.value, updated_at = now()
$$;
REVOKE ALL ON FUNCTION pgflow.set_variable(text, jsonb) FROM PUBLIC;
CREATE FUNCTION pgflow.delete_variable(p_name text) RETURNS void LANGUAGE sql AS $$
    DELETE FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
REVOKE ALL ON FUNCTION pgflow.delete_variable(text) FROM PUBLIC;
CREATE FUNCTION pgflow.get_variable(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT value FROM pgflow.variables WHERE owner = current_user AND name = p_name
$$;
REVOKE ALL ON FUNCTION pgflow.get_variable(text) FROM PUBLIC;
-- pg_durable's names
CREATE FUNCTION pgflow.setvar(p_name text, p_value jsonb) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.set_variable(p_name, p_value) $$;
REVOKE ALL ON FUNCTION pgflow.setvar(text, jsonb) FROM PUBLIC;
CREATE FUNCTION pgflow.getvar(p_name text) RETURNS jsonb LANGUAGE sql STABLE AS
    $$ SELECT pgflow.get_variable(p_name) $$;
REVOKE ALL ON FUNCTION pgflow.getvar(text) FROM PUBLIC;
CREATE FUNCTION pgflow.unsetvar(p_name text) RETURNS void LANGUAGE sql AS
    $$ SELECT pgflow.delete_variable(p_name) $$;
REVOKE ALL ON FUNCTION pgflow.unsetvar(text) FROM PUBLIC;
CREATE FUNCTION pgflow.clearvars() RETURNS void LANGUAGE sql AS
    $$ DELETE FROM pgflow.variables WHERE owner = current_user $$;
REVOKE ALL ON FUNCTION pgflow.clearvars() FROM PUBLIC;

CREATE FUNCTION pgflow.set_secret(p_name text, p_ref text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_ref !~ '^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$' THEN
        RAISE EXCEPTION 'pgflow: a secret is a reference, ''env:NAME'' or ''file:/path'' (the value is never '
                        'stored), got %', left(p_ref, 40) USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgflow.variables (name, value, secret_ref) VALUES (p_name, NULL, p_ref)
    ON CONFLICT (owner, name) DO UPDATE SET value = NULL, secret_ref = excluded.secret_ref, updated_at = now();
END $$;
REVOKE ALL ON FUNCTION pgflow.set_secret(text, text) FROM PUBLIC;

-- ====================================================================================================
-- schema/17_explain.sql
-- ====================================================================================================

-- Seeing what an instance does: one row per node (or DAG step) with its status, and the same as an
-- indented text tree (`SELECT pgflow.explain(id)`).

CREATE FUNCTION pgflow._label(p_node jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_node->>'t'
        WHEN 'sql' THEN 'sql: ' || left(regexp_replace(btrim(p_node->>'sql'), '\s+', ' ', 'g'), 70)
        WHEN 'python' THEN 'python: ' || (p_node->>'fn')
        WHEN 'http' THEN 'http: ' || coalesce(p_node->>'method', 'GET') || ' ' || (p_node->>'url')
        WHEN 'name' THEN 'name: ' || (p_node->>'name')
        WHEN 'if' THEN 'if'
        WHEN 'has_rows' THEN 'has_rows: ' || (p_node->>'name')
        WHEN 'loop' THEN CASE WHEN (p_node->>'while')::boolean THEN 'loop while' ELSE 'loop' END
        WHEN 'sleep' THEN 'sleep ' || (p_node->>'seconds') || ' s'
        WHEN 'schedule' THEN 'wait for schedule ' || (p_node->>'cron')
        WHEN 'wait_signal' THEN 'wait for signal ' || (p_node->>'name')
            || coalesce(' (timeout ' || (p_node->>'timeout') || ' s)', '')
        ELSE p_node->>'t'
    END
$$;
REVOKE ALL ON FUNCTION pgflow._label(jsonb) FROM PUBLIC;

-- One row per node of an instance (tree nodes, or DAG steps), in display order, with its status.
CREATE FUNCTION pgflow.instance_nodes(p_id bigint)
RETURNS TABLE (path text, depth integer, node_type text, label text, status text, attempts integer,
               error text, due_at timestamptz, tasks bigint, tasks_completed bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    inst pgflow.instances;
    shape jsonb;
BEGIN
    SELECT * INTO inst FROM pgflow.instances WHERE id = p_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgflow: no instance with id %', p_id USING ERRCODE = 'P0002';
    END IF;
    SELECT f.shape INTO shape FROM pgflow.flows f
    WHERE f.flow_name = inst.flow_name AND f.version = inst.flow_version;
    IF shape ? 'tree' THEN
        RETURN QUERY
        WITH RECURSIVE tree(path, depth, node, sort) AS (
            SELECT 'r'::text, 0, shape->'tree', ARRAY[0]
            UNION ALL
            SELECT t.path || '.' || (c.i - 1), t.depth + 1, c.child, t.sort || c.i::int
            FROM tree t,
                 jsonb_array_elements(CASE WHEN jsonb_typeof(t.node->'c') = 'array' THEN t.node->'c'
                                           ELSE '[]' END) WITH ORDINALITY AS c(child, i)
        ), own AS (
            SELECT t.*, s.status AS own_status, s.attempt, s.error AS own_error, s.next_attempt_at, s.output
            FROM tree t
            LEFT JOIN pgflow.steps s ON s.instance_id = p_id AND s.step_name = t.path AND s.task_index = -1
        ), derived AS (
            -- the coordinator records every node it reaches (composites too) and marks the branch an if did
            -- not take and the losers of a race as skipped: nodes below a skipped one are skipped as well
            SELECT o.*, EXISTS (SELECT 1 FROM own a WHERE a.own_status = 'skipped' AND o.path LIKE a.path || '.%')
                            AS under_skipped
            FROM own o
        )
        SELECT d.path, d.depth, d.node->>'t',
               pgflow._label(d.node) || CASE WHEN d.node->>'t' = 'loop' AND d.output ? 'iteration'
                                             THEN format(' (iteration %s)', d.output->>'iteration') ELSE '' END,
               CASE
                   WHEN d.under_skipped THEN 'skipped'
                   WHEN d.own_status IS NOT NULL THEN d.own_status
                   WHEN NOT inst.status = ANY (pgflow.open_instance_statuses()) THEN 'skipped'
                   ELSE 'pending'
               END,
               d.attempt, d.own_error,
               CASE WHEN d.own_status = 'waiting' THEN d.next_attempt_at END,
               NULL::bigint, NULL::bigint
        FROM derived d
        ORDER BY d.sort;
    ELSE
        RETURN QUERY
        SELECT s->>'name', 0, s->>'kind' || CASE WHEN s->>'over' IS NOT NULL THEN ' map' ELSE '' END,
               s->>'name' || CASE WHEN jsonb_array_length(s->'deps') > 0
                                  THEN ' (after ' || (SELECT string_agg(d, ', ') FROM jsonb_array_elements_text(s->'deps') d) || ')'
                                  ELSE '' END,
               coalesce(st.status, CASE WHEN NOT inst.status = ANY (pgflow.open_instance_statuses()) THEN 'skipped'
                                        ELSE 'pending' END),
               st.attempt, st.error, CASE WHEN st.status = 'retrying' THEN st.next_attempt_at END,
               (SELECT count(*) FROM pgflow.steps t WHERE t.instance_id = p_id AND t.step_name = s->>'name'
                                                     AND t.task_index >= 0),
               (SELECT count(*) FROM pgflow.steps t WHERE t.instance_id = p_id AND t.step_name = s->>'name'
                                                     AND t.task_index >= 0 AND t.status = 'completed')
        FROM jsonb_array_elements(shape->'steps') WITH ORDINALITY AS x(s, i)
        LEFT JOIN pgflow.steps st ON st.instance_id = p_id AND st.step_name = s->>'name' AND st.task_index = -1
        ORDER BY x.i;
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgflow.instance_nodes(bigint) FROM PUBLIC;

-- The instance as an indented tree with a status marker per node.
CREATE FUNCTION pgflow.explain(p_id bigint) RETURNS text LANGUAGE sql STABLE AS $$
    SELECT format('instance %s  %s  %s%s', i.id, i.flow_name, i.status,
                  coalesce(E'\nerror: ' || i.error, '')) || E'\n' ||
           string_agg(repeat('  ', n.depth) ||
                      CASE n.status
                          WHEN 'completed' THEN '[done]    '
                          WHEN 'failed' THEN '[FAILED]  '
                          WHEN 'running' THEN '[running] '
                          WHEN 'queued' THEN '[queued]  '
                          WHEN 'retrying' THEN '[retry]   '
                          WHEN 'waiting' THEN '[waiting] '
                          WHEN 'mapping' THEN '[mapping] '
                          WHEN 'skipped' THEN '[skipped] '
                          WHEN 'cancelled' THEN '[cancel]  '
                          ELSE '[pending] '
                      END || n.label ||
                      CASE WHEN n.tasks > 0 THEN format('  (%s/%s tasks)', n.tasks_completed, n.tasks) ELSE '' END ||
                      CASE WHEN n.attempts > 1 THEN format('  attempts %s', n.attempts) ELSE '' END ||
                      CASE WHEN n.due_at IS NOT NULL THEN format('  until %s', to_char(n.due_at, 'YYYY-MM-DD HH24:MI:SS TZ'))
                           ELSE '' END ||
                      CASE WHEN n.error IS NOT NULL AND n.status IN ('failed', 'retrying')
                           THEN '  error: ' || left(n.error, 200) ELSE '' END,
                      E'\n' ORDER BY n.ordinality)
    FROM pgflow.instances i,
         LATERAL pgflow.instance_nodes(i.id) WITH ORDINALITY AS n
    WHERE i.id = p_id
    GROUP BY i.id, i.flow_name, i.status, i.error
$$;
REVOKE ALL ON FUNCTION pgflow.explain(bigint) FROM PUBLIC;

-- ====================================================================================================
-- schema/18_roles_and_rls.sql
-- ====================================================================================================

-- Who sees what (see SECURITY.md). A user sees and controls only the instances (and their steps, results and
-- signals) and the variables it owns; members of pgflow_admin see all. The owner of the tables (the role
-- that ran `pgflow init`, which coordinators and workers connect as) is not subject to row-level security.
-- Capabilities beyond the basics (HTTP steps, Python steps in workflows) are granted per role.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin') THEN
        CREATE ROLE pgflow_admin NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE NOTICE 'pgflow: cannot create role pgflow_admin (no CREATEROLE); only the pgflow owner sees all';
END $$;

CREATE FUNCTION pgflow.is_admin() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
           AND pg_has_role(current_user, 'pgflow_admin', 'member')
$$;
REVOKE ALL ON FUNCTION pgflow.is_admin() FROM PUBLIC;

ALTER TABLE pgflow.instances ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_instances ON pgflow.instances
    USING (owner = current_user OR pgflow.is_admin())
    WITH CHECK (owner = current_user OR pgflow.is_admin());

ALTER TABLE pgflow.steps ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_steps ON pgflow.steps
    USING (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

ALTER TABLE pgflow.signals ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_signals ON pgflow.signals
    USING (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id))
    WITH CHECK (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

ALTER TABLE pgflow.variables ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_variables ON pgflow.variables
    USING (owner = current_user)
    WITH CHECK (owner = current_user);

-- A signal for a visible instance only: wake-ups carry no data, but must not be used to poke others'.
ALTER TABLE pgflow.wakeups ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_wakeups ON pgflow.wakeups
    USING (false)
    WITH CHECK (EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = instance_id));

-- Whether a role (by default the current one) may use a capability ('http', 'python'): the pgflow owner,
-- superusers, pgflow_admin members, and roles granted it. A definer function: users cannot read role_grants.
CREATE FUNCTION pgflow.may_use(p_what text, p_role name DEFAULT current_user) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pgflow AS $$
    SELECT p_role = (SELECT nspowner::regrole::name FROM pg_namespace WHERE nspname = 'pgflow')
        OR coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = p_role), false)
        OR (EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgflow_admin')
            AND pg_has_role(p_role, 'pgflow_admin', 'member'))
        OR coalesce((SELECT bool_or(CASE p_what WHEN 'http' THEN g.http WHEN 'python' THEN g.python END)
                     FROM pgflow.role_grants g
                     WHERE EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = g.role_name)
                       AND pg_has_role(p_role, g.role_name, 'member')), false)
$$;
REVOKE ALL ON FUNCTION pgflow.may_use(text, name) FROM PUBLIC;

-- ====================================================================================================
-- schema/19_executors.sql
-- ====================================================================================================

-- Running SQL steps as their owner, never with the worker's privileges.
--
-- Executors live in their own schema (pgflow_exec), one per role, owned by that role and SECURITY DEFINER:
-- the statement runs with exactly the owner's privileges, and PostgreSQL forbids SET ROLE inside it.
-- Parameters arrive as one jsonb array ($1). Only the pgflow owner (workers) may call them. This function
-- returns the DDL that grant_usage runs to create a role's executors.

CREATE FUNCTION pgflow._executor_sql(p_role name) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT format($f$
        CREATE OR REPLACE FUNCTION pgflow_exec.%1$I(p_sql text, p_params jsonb, p_timeout_ms integer)
        RETURNS SETOF record LANGUAGE plpgsql SECURITY DEFINER SET search_path = "$user", public AS $body$
        DECLARE n bigint;
        BEGIN
            IF p_timeout_ms IS NOT NULL THEN
                PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
            END IF;
            RETURN QUERY EXECUTE p_sql USING p_params;
        END $body$;
        CREATE OR REPLACE FUNCTION pgflow_exec.%1$I(p_sql text, p_params jsonb, p_timeout_ms integer,
                                                    p_no_rows boolean)
        RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = "$user", public AS $body$
        DECLARE n bigint;
        BEGIN
            IF p_timeout_ms IS NOT NULL THEN
                PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
            END IF;
            EXECUTE p_sql USING p_params;
            GET DIAGNOSTICS n = ROW_COUNT;
            RETURN n;
        END $body$;
        ALTER FUNCTION pgflow_exec.%1$I(text, jsonb, integer) OWNER TO %1$I;
        ALTER FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) OWNER TO %1$I;
        REVOKE ALL ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer) FROM PUBLIC;
        REVOKE ALL ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer) TO %2$I;
        GRANT EXECUTE ON FUNCTION pgflow_exec.%1$I(text, jsonb, integer, boolean) TO %2$I;
    $f$, p_role, (SELECT nspowner::regrole::name FROM pg_namespace WHERE nspname = 'pgflow'))
$$;
REVOKE ALL ON FUNCTION pgflow._executor_sql(name) FROM PUBLIC;

-- ====================================================================================================
-- schema/20_usage.sql
-- ====================================================================================================

-- Letting a role use pgflow (and taking it back). Nothing is granted to PUBLIC (00_schemas.sql); a role
-- granted usage may start, watch, cancel and signal its own instances and keep variables, optionally use
-- HTTP and Python steps. The internal functions workers and coordinators call (they are the owner) are
-- never granted.

-- Internal: what workers and coordinators call (they are the owner); never granted.
CREATE FUNCTION pgflow._internal_functions() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['claim_tasks', 'read_tasks', 'complete_tasks', 'fail_task', 'release_tasks', 'enqueue_tasks',
                 '_executor_sql', 'grant_usage', 'revoke_usage', '_internal_functions']
$$;
REVOKE ALL ON FUNCTION pgflow._internal_functions() FROM PUBLIC;

-- Let a role use pgflow: start, watch, cancel and signal its own instances, keep variables; optionally use
-- HTTP and Python steps. Run it as the pgflow owner (or a superuser).
CREATE FUNCTION pgflow.grant_usage(p_role name, p_include_http boolean DEFAULT false,
                                   p_include_python boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    fn record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = p_role) THEN
        RAISE EXCEPTION 'pgflow: no role %', p_role USING ERRCODE = '42704';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA pgflow TO %I', p_role);
    EXECUTE format('GRANT SELECT ON pgflow.instances, pgflow.steps, pgflow.signals, pgflow.variables, '
                   'pgflow.flows, pgflow.flow_steps, pgflow.queues, pgflow.migrations TO %I', p_role);
    EXECUTE format('GRANT INSERT (flow_name, flow_version, input, label, variables, secret_refs), '
                   'UPDATE (status, error, finished_at) ON pgflow.instances TO %I', p_role);
    EXECUTE format('GRANT UPDATE (status, finished_at) ON pgflow.steps TO %I', p_role);
    EXECUTE format('GRANT INSERT (instance_id, name, data) ON pgflow.signals TO %I', p_role);
    EXECUTE format('GRANT INSERT (instance_id) ON pgflow.wakeups TO %I', p_role);
    EXECUTE format('GRANT INSERT (name, value, secret_ref), UPDATE (value, secret_ref, updated_at), DELETE '
                   'ON pgflow.variables TO %I', p_role);
    FOR fn IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'pgflow'::regnamespace AND NOT p.proname = ANY (pgflow._internal_functions())
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', fn.sig, p_role);
    END LOOP;
    -- ALTER FUNCTION ... OWNER needs the new owner to have CREATE on the schema: only for this moment
    EXECUTE format('GRANT CREATE ON SCHEMA pgflow_exec TO %I', p_role);
    EXECUTE pgflow._executor_sql(p_role);
    EXECUTE format('REVOKE CREATE ON SCHEMA pgflow_exec FROM %I', p_role);
    INSERT INTO pgflow.role_grants (role_name, http, python) VALUES (p_role, p_include_http, p_include_python)
    ON CONFLICT (role_name) DO UPDATE SET http = excluded.http, python = excluded.python, granted_at = now();
END $$;
REVOKE ALL ON FUNCTION pgflow.grant_usage(name, boolean, boolean) FROM PUBLIC;

CREATE FUNCTION pgflow.revoke_usage(p_role name) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('REVOKE ALL ON SCHEMA pgflow FROM %I', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer)', p_role);
    EXECUTE format('DROP FUNCTION IF EXISTS pgflow_exec.%I(text, jsonb, integer, boolean)', p_role);
    DELETE FROM pgflow.role_grants WHERE role_name = p_role;
END $$;
REVOKE ALL ON FUNCTION pgflow.revoke_usage(name) FROM PUBLIC;
