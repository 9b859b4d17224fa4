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
