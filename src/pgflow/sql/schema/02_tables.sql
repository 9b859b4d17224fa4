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
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name                    -- the role that asked for it (its quota of queues)
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
    -- The start's priority (higher runs first, 08_read_and_claim.sql), from the transaction-local setting
    -- pgflow.priority like the trace context: the start functions keep their signatures. Out of range: 0.
    priority      smallint    NOT NULL DEFAULT (
        CASE WHEN current_setting('pgflow.priority', true) ~ '^-?[0-9]{1,4}$'
             THEN current_setting('pgflow.priority', true)::smallint ELSE 0 END),
    FOREIGN KEY (flow_name, flow_version) REFERENCES pgflow.flows (flow_name, version)
);
CREATE INDEX instances_status_id ON pgflow.instances (status, id);
CREATE INDEX instances_flow_id ON pgflow.instances (flow_name, id);
CREATE INDEX instances_label_id ON pgflow.instances (label, id) WHERE label IS NOT NULL;
CREATE INDEX instances_finished_at ON pgflow.instances (finished_at) WHERE finished_at IS NOT NULL;
-- the few instances started with a priority: enqueue_tasks looks them up here, not among every instance
CREATE INDEX instances_prioritized ON pgflow.instances (id) INCLUDE (priority) WHERE priority <> 0;

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
