-- Named queries of pgflow.engine.loop (the coordinator's and workers' sessions).

-- name: engine_session
-- synchronous_commit off is safe for pgflow's contract: a transaction is never half-applied, so a server
-- crash can only lose whole recent acknowledgements or scheduling decisions, which are then redone (a
-- Python step may run again: at least once; a SQL step's effect is lost with its acknowledgement and runs
-- again: still exactly once). Starts, signals and cancellations, which clients rely on, use the server's.
-- plan_cache_mode: plan each execution for its actual parameters; a generic plan cached while the tables were
-- small can be disastrous once the backlog is large (psycopg prepares frequent statements). The functions
-- every step passes through set their own (07_enqueue.sql): their plans are kept, pinned to index scans.
SELECT set_config('synchronous_commit', %(synchronous_commit)s, false),
       set_config('plan_cache_mode', 'force_custom_plan', false);
